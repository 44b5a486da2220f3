// The MoE layer's ops: one declaration, two backends.
//
//   switchyard::cpu::NAME   src/ops/cpu/NAME.cpp   plain C++ reference; float32 or float64 tensors
//                                                  (every tensor of one call in the same float type)
//   switchyard::cuda::NAME  src/ops/cuda/NAME.cu   the fast version; activations bf16, router
//                                                  logits / gates / losses fp32, integer outputs int32
//   switchyard::ops::NAME   src/ops/ops.h          picks the backend from the context's device
//                                                  (src/ops/dispatch_moe.cpp)
//
// Shapes: T tokens, D = d_model, F = d_ff, E experts, K = k_max choices per token,
// R = padded_rows_upper_bound(params): rows of the expert-contiguous layout.
//
// Routing semantics (the CPU reference is the definition):
//  * top-k is taken over the logits (same order as the probabilities, and exact on any backend);
//    ties go to the lower expert index. Choice j of token t is its (j+1)-th largest logit.
//  * probabilities p = softmax(logits) in fp32 (fp64 on the fp64 reference); gate of choice j:
//    p[e_j], or p[e_j] / sum_{i<k_t} p[e_i] when params.renormalize.
//  * k_t: k_max, unless complexity routing: k_t = k_min + floor(c_t * (k_max - k_min) + 0.5) with
//    c_t in [0,1] given by the caller (complexity = given, clamped) or the normalized router
//    entropy c_t = -sum_e p_e ln p_e / ln E (complexity = entropy). Choices j >= k_t are empty:
//    expert id -1, gate 0, slot -1.
//  * slots: the choices of all tokens are ranked per expert in GShard priority order: every
//    token's choice 0 (in token order), then every token's choice 1, and so on. slot = that rank.
//  * capacity = dropless ? INT32_MAX : ceil(capacity_factor * total_choices / E) with
//    total_choices = sum_t k_t. A choice with slot >= capacity is dropped: it contributes zero.
//  * kept_e = min(count_e, capacity); the layout gives expert e the rows
//    [expert_offsets[e], expert_offsets[e+1]), kept_e rounded up to params.segment_alignment.
//  * losses: aux = aux_loss_weight * E * sum_e f_e * P_e, f_e = first_choice_count_e / T,
//    P_e = prob_sum_e / T; z = z_loss_weight * mean_t(logsumexp_t^2). Both are computed on
//    every pass; the caller decides whether they join the loss.
#pragma once

#include <cstdint>

#include "src/core/tensor.h"

namespace switchyard {

enum class ComplexityMode : uint8_t { none, given, entropy };
enum class ExpertActivation : uint8_t { gelu_tanh, swiglu };

// Routing limits, checked when a run config is read (src/train/config.h) so that a config that
// validates does not fail at its first forward:
//  * kMaxTopK: choices per token, both backends (validate_routing_params; the CUDA kernels keep a
//    token's choices in registers sized for it).
//  * kCudaMaxExperts: experts per layer the CUDA router takes, one token's logits over at most 16
//    lanes of 16 registers. The CPU backend has no limit of its own.
// The kernels' own constants (kMaxRouteExperts in src/ops/cuda/cuda_common.cuh, kMaxChoices in the
// row-move kernels) are defined from these.
inline constexpr int kMaxTopK = 8;
inline constexpr int kCudaMaxExperts = 256;

struct RoutingParams {
  int64_t num_tokens = 0;
  int num_experts = 0;
  int k_max = 1;  // 1..kMaxTopK
  int k_min = 1;  // <= k_max; only used with complexity routing
  ComplexityMode complexity = ComplexityMode::none;
  bool renormalize = false;
  bool dropless = false;
  float capacity_factor = 1.25f;
  int segment_alignment = 128;  // rows; the grouped GEMM tile height
  float aux_loss_weight = 1e-2f;
  float z_loss_weight = 1e-3f;
};

// Rows of the padded expert-contiguous layout in the worst case, known on the host without a sync.
int64_t padded_rows_upper_bound(const RoutingParams& params);

// Indices into RoutingResult::scalars.
enum RoutingScalar : int { kCapacity = 0, kTotalChoices = 1, kDroppedChoices = 2, kPaddedRows = 3, kNumRoutingScalars = 4 };
// Indices into RoutingResult::losses.
enum RoutingLoss : int { kAuxLoss = 0, kZLoss = 1, kNumRoutingLosses = 2 };

// Everything routing produces. Tensors live on the backend's device; float ones are fp32 on CUDA
// and the reference's float type on CPU.
struct RoutingResult {
  Tensor expert_ids;           // int32 [T, K]
  Tensor gates;                // float [T, K]
  Tensor slots;                // int32 [T, K]
  Tensor token_k;              // int32 [T]
  Tensor logsumexp;            // float [T]
  Tensor expert_counts;        // int32 [E]   choices routed to e before capacity
  Tensor first_choice_counts;  // int32 [E]
  Tensor prob_sums;            // float [E]   sum_t p[t, e]
  Tensor expert_offsets;       // int32 [E+1]
  Tensor scalars;              // int32 [kNumRoutingScalars]
  Tensor losses;               // float [kNumRoutingLosses]
};

// Where each kept choice went in the expert-contiguous layout.
struct DispatchMap {
  Tensor choice_rows;  // int32 [T, K]: row of choice (t, j) or -1 (empty or dropped)
  Tensor row_tokens;   // int32 [R]: token of each row, -1 for padding rows
};

namespace cpu {
void route(const Tensor& logits, const Tensor* complexity, const RoutingParams& params, RoutingResult& result);
void route_backward(const Tensor& logits, const Tensor& grad_gates, const RoutingResult& routing,
                    const RoutingParams& params, float grad_aux_scale, float grad_z_scale, Tensor& grad_logits);
void permute(const Tensor& tokens, const RoutingResult& routing, const RoutingParams& params,
             Tensor& permuted, DispatchMap& map);
void unpermute_combine(const Tensor& expert_outputs, const RoutingResult& routing, const DispatchMap& map,
                       Tensor& combined);
void unpermute_combine_backward(const Tensor& grad_combined, const Tensor& expert_outputs,
                                const RoutingResult& routing, const DispatchMap& map,
                                Tensor& grad_expert_outputs, Tensor& grad_gates);
void permute_backward(const Tensor& grad_permuted, const DispatchMap& map, int64_t num_tokens, Tensor& grad_tokens);
// C_e = A_e * B_e for each expert segment e: A [R, Kdim] rows of segment e, B [E, Kdim, N],
// C [R, N]. trans_b uses B [E, N, Kdim]. Padding rows of C are written as zero.
void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c);
// dB_e = A_e^T * G_e: A [R, M], G [R, N], dB [E, M, N] (overwritten).
void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b);
// gelu_tanh: post = gelu(pre), both [R, F]. swiglu: pre [R, 2F] = [gate | up] (two halves of each
// row), post [R, F] = silu(gate) * up.
void activation_forward(ExpertActivation activation, const Tensor& pre, Tensor& post);
void activation_backward(ExpertActivation activation, const Tensor& pre, const Tensor& grad_post, Tensor& grad_pre);
// Expert GEMM 1 with its activation: pre = A * W1_e (grouped_gemm, W1 [E, D, F] or swiglu
// [E, D, 2F]), post = act(pre) (activation_forward). Exactly those two ops in sequence.
void grouped_gemm_activation(ExpertActivation activation, const Tensor& a, const Tensor& w1,
                             const Tensor& expert_offsets, Tensor& pre, Tensor& post);
// Data gradient of expert GEMM 2 through the activation: grad_post = G * W2_e^T (grouped_gemm
// with trans_b, G [R, D], W2 [E, F, D], grad_post [R, F]), grad_pre = act'(pre) * grad_post
// (activation_backward). Exactly those two ops in sequence.
void grouped_gemm_activation_backward(ExpertActivation activation, const Tensor& grad_out, const Tensor& w2,
                                      const Tensor& expert_offsets, const Tensor& pre, Tensor& grad_post,
                                      Tensor& grad_pre);
// Multiplicative router jitter: out = x * u, u uniform in [1-eps, 1+eps], u of element i =
// 1 - eps + 2 * eps * philox_uniform(seed, stream_id, offset, i) (src/core/rng.h).
void apply_jitter(const Tensor& x, float eps, uint64_t seed, uint32_t stream_id, uint64_t offset, Tensor& out);
}  // namespace cpu

namespace cuda {
void route(const Tensor& logits, const Tensor* complexity, const RoutingParams& params, RoutingResult& result,
           void* stream);
// grad_logits may be fp32, bf16 or fp16 (written in the router GEMM's input type, saving a conversion).
void route_backward(const Tensor& logits, const Tensor& grad_gates, const RoutingResult& routing,
                    const RoutingParams& params, float grad_aux_scale, float grad_z_scale, Tensor& grad_logits,
                    void* stream);
void permute(const Tensor& tokens, const RoutingResult& routing, const RoutingParams& params,
             Tensor& permuted, DispatchMap& map, void* stream);
void unpermute_combine(const Tensor& expert_outputs, const RoutingResult& routing, const DispatchMap& map,
                       Tensor& combined, void* stream);
void unpermute_combine_backward(const Tensor& grad_combined, const Tensor& expert_outputs,
                                const RoutingResult& routing, const DispatchMap& map,
                                Tensor& grad_expert_outputs, Tensor& grad_gates, void* stream);
void permute_backward(const Tensor& grad_permuted, const DispatchMap& map, int64_t num_tokens, Tensor& grad_tokens,
                      void* stream);
// segment_alignment: a promise that every segment length is a multiple of it (the routing's
// params.segment_alignment). With a multiple of 128 on an sm_90 GPU the hand-written wgmma kernels
// run without any host sync (src/ops/cuda/sm90/grouped_gemm_sm90.h); otherwise one cuBLAS GEMM per
// expert after a copy of the offsets to the host. SWITCHYARD_GROUPED_GEMM=cublas forces the latter.
// Rows at or beyond expert_offsets[E] of c are unspecified. row_tokens (optional, int32 [R] on the
// GPU, DispatchMap::row_tokens): -1 marks padding rows (a segment's last rows), which the caller
// promises are zero in A; the sm_90a kernels then skip the products only they feed
// (sm90::Options::row_tokens); results are the same.
void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c,
                  void* stream, int segment_alignment = 1, const Tensor* row_tokens = nullptr);
void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b,
                              void* stream, int segment_alignment = 1, const Tensor* row_tokens = nullptr);
void activation_forward(ExpertActivation activation, const Tensor& pre, Tensor& post, void* stream);
void activation_backward(ExpertActivation activation, const Tensor& pre, const Tensor& grad_post, Tensor& grad_pre,
                         void* stream);
// The two compositions above (bf16 or fp16). Where the sm_90a kernels take the problem
// (fuses_expert_activation) the activation runs in the grouped GEMM's epilogue: no separate pass
// over the [R, F] rows, and results equal the unfused ops (the GEMM result is rounded to the
// activation dtype before the activation reads it, as when it is stored). Otherwise the two ops
// run in sequence. keep_pre = false (inference): the fused kernel skips writing pre, whose
// contents are then unspecified (the unfused path uses it as scratch). grad_post [R, F] is
// scratch as well: written by the unfused path only. Rows at or beyond expert_offsets[E] of pre,
// post, grad_post and grad_pre are unspecified.
void grouped_gemm_activation(ExpertActivation activation, const Tensor& a, const Tensor& w1,
                             const Tensor& expert_offsets, Tensor& pre, Tensor& post, bool keep_pre, void* stream,
                             int segment_alignment = 1, const Tensor* row_tokens = nullptr);
void grouped_gemm_activation_backward(ExpertActivation activation, const Tensor& grad_out, const Tensor& w2,
                                      const Tensor& expert_offsets, const Tensor& pre, Tensor& grad_post,
                                      Tensor& grad_pre, void* stream, int segment_alignment = 1,
                                      const Tensor* row_tokens = nullptr);
// Whether the two ops above fuse for a layer of these sizes (with 16-byte aligned operands, as
// buffer allocations are): bf16, d_model and d_ff multiples of 64, segment_alignment a multiple of
// 128, an sm_90a build on a compute capability 9.0 GPU with the pipelined kernel variant, and
// neither SWITCHYARD_GROUPED_GEMM=cublas nor SWITCHYARD_FUSED_ACTIVATION=0 (1 or unset: fuse).
bool fuses_expert_activation(ExpertActivation activation, DType dtype, int64_t d_model, int64_t d_ff,
                             int segment_alignment);
void apply_jitter(const Tensor& x, float eps, uint64_t seed, uint32_t stream_id, uint64_t offset, Tensor& out,
                  void* stream);
}  // namespace cuda

}  // namespace switchyard
