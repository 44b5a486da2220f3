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
//
// The modern options (issue #19; the defaults above reproduce the Switch behaviour exactly):
//  * score function. softmax: score p = softmax(z) as above. sigmoid (DeepSeek-V3): s_e =
//    sigmoid(z_e) per expert, independent of the others. Gates of the chosen experts: the score,
//    divided by the sum over the token's k_t chosen scores when params.renormalize, then times
//    params.routed_scaling_factor (both functions). The balance losses use the normalized score
//    s'_e = s_e / sum_f s_f (all experts) in place of p; prob_sums holds sum_t s'_{t,e}.
//  * selection key, fp32 and bit-identical on both backends (src/ops/routing_math.h): softmax
//    key_e = fp32(z_e) (+ b_e), sigmoid key_e = routing_sigmoid(fp32(z_e)) (+ b_e), with b the
//    optional selection bias (RoutingInputs::selection_bias, fp32 [E]; aux-loss-free balancing).
//    The k choices are the k largest keys, ties to the lower expert index. The bias moves the
//    choice only: gates and losses use the unbiased scores. Without a bias and with softmax this is
//    today's top-k over the logits.
//  * group-limited routing: experts form params.num_groups groups of E / num_groups consecutive
//    ids. Group score, from the keys: sigmoid: k1 + k2, the group's two largest keys added in that
//    order (k1 alone for one-expert groups); softmax: routing_exp(k1 - m) + routing_exp(k2 - m) with
//    m the token's largest key (the sum of the two largest probabilities, up to the token's common
//    factor). A token keeps the params.topk_groups highest groups (ties to the lower group index)
//    and takes its k choices among their experts only. topk_groups == num_groups: no limit.
//  * drop policy under capacity. position: the GShard slots above. probability: an expert's
//    choices are ranked by their priority score (routing_priority_score: the unbiased score,
//    computed in a fixed order on both backends) from high to low, ties in GShard order; slot =
//    that rank, so the lowest-scored choices of an over-full expert drop first. Slots of experts
//    within capacity are then a permutation of the GShard ones; the layout is the same.
//  * sequence-level balance loss (DeepSeek-V3): tokens form sequences of params.tokens_per_sequence
//    consecutive tokens (0: the whole batch is one; the last may be shorter). Per sequence s with
//    tokens T_s and choices C_s = sum_{t in s} k_t (all k_t choices, before capacity):
//      f_{s,e} = E * count_{s,e} / C_s,   P_{s,e} = sum_{t in s} p_{t,e} / T_s  (p: s' for sigmoid)
//      seq = seq_aux_loss_weight * mean_s sum_e f_{s,e} P_{s,e}
//    f is held constant in backward (as f in the Switch loss); route() writes f to
//    sequence_fractions [S, E].
//  * global-batch balance loss (Qwen3; Megatron-Core's global_aux_loss): F_e = load_e / sum_f
//    load_f from expert counts summed over all data-parallel ranks and the micro-batches of the step
//    so far (the caller reduces them), global = global_aux_loss_weight * E * sum_e F_e * P_e with this
//    batch's P_e = prob_sum_e / T. global_balance_loss() writes F and losses[kGlobalAuxLoss];
//    route_backward takes F (global_fractions) and adds d global / d p[t,e] = w * E * F_e / T.
//    route() writes 0 there.
//  * expert choice (Zhou et al. 2022; params.method = expert_choice): each expert takes the
//    capacity C = min(T, ceil(capacity_factor * T * k_max / E)) tokens with the highest priority
//    score (ties to the lower token index); a token keeps at most k_max of the experts that took
//    it, the highest-scored first (ties to the lower expert id), so k_t is in [0, k_max] (0: no
//    expert; the routed output is zero). expert_ids / gates hold them in that order, slots are the
//    token's rank among the tokens its expert kept (token order), so every kept slot < C;
//    expert_counts are those kept tokens, kDroppedChoices the picks cut by the per-token cap.
//    It looks at every token of the batch at once: in a causal LM it leaks across positions
//    and batch rows, so it is for training research and encoders. No complexity, groups, bias,
//    dropless, probability drops or sequence loss with it (validate_routing_params).
//  * every score function works with complexity routing (k_t from c_t as above; entropy from p,
//    or from s' for sigmoid).
#pragma once

#include <cstdint>

#include "src/core/tensor.h"
#include "src/ops/routing_math.h"

namespace switchyard {

enum class ComplexityMode : uint8_t { none, given, entropy };
enum class ScoreFunction : uint8_t { softmax, sigmoid };
enum class DropPolicy : uint8_t { position, probability };
enum class RoutingMethod : uint8_t { token_choice, expert_choice };
enum class ExpertActivation : uint8_t { gelu_tanh, swiglu };

// Routing limits, checked when a run config is read (src/train/config.h) so that a config that
// validates does not fail at its first forward:
//  * kMaxTopK: choices per token, both backends (validate_routing_params; the CUDA kernels keep a
//    token's choices in registers sized for it).
//  * kCudaMaxExperts: experts per layer the CUDA router takes, one token's logits over at most 32
//    lanes (a full warp) of 16 registers (src/ops/cuda/routing_layout.h). The CPU backend has no
//    limit of its own.
// The kernels' own constants (kMaxRouteExperts in src/ops/cuda/cuda_common.cuh, kMaxChoices in the
// row-move kernels) are defined from these.
inline constexpr int kMaxTopK = 8;
inline constexpr int kCudaMaxExperts = 512;

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
  // The modern options (semantics above); the defaults are the Switch router.
  RoutingMethod method = RoutingMethod::token_choice;
  ScoreFunction score_function = ScoreFunction::softmax;
  float routed_scaling_factor = 1.0f;  // gates *= this, after renormalization
  int num_groups = 1;                  // divides num_experts
  int topk_groups = 1;                 // 1..num_groups; == num_groups: no group limit
  DropPolicy drop_policy = DropPolicy::position;
  int64_t tokens_per_sequence = 0;     // sequence-level loss; 0: one sequence of num_tokens
  float seq_aux_loss_weight = 0.0f;
  float global_aux_loss_weight = 0.0f;
};

// Sequences of the sequence-level loss: ceil(T / tokens_per_sequence), or 1 (also for T = 0).
inline int64_t routing_num_sequences(const RoutingParams& params) {
  if (params.tokens_per_sequence <= 0 || params.num_tokens <= 0) return 1;
  return (params.num_tokens + params.tokens_per_sequence - 1) / params.tokens_per_sequence;
}

// Optional inputs of route(). Converts from the complexity pointer alone (the Switch router's only
// input), so `route(..., nullptr, ...)` and `route(..., &complexity, ...)` keep working.
struct RoutingInputs {
  RoutingInputs(const Tensor* complexity_in = nullptr) : complexity(complexity_in) {}  // NOLINT: implicit
  const Tensor* complexity = nullptr;      // [T] in [0, 1], the logits' float type; complexity = given only
  const Tensor* selection_bias = nullptr;  // fp32 [E] (float64 allowed on the CPU): added to the keys only
};

// Rows of the padded expert-contiguous layout in the worst case, known on the host without a sync.
int64_t padded_rows_upper_bound(const RoutingParams& params);

// Indices into RoutingResult::scalars.
enum RoutingScalar : int { kCapacity = 0, kTotalChoices = 1, kDroppedChoices = 2, kPaddedRows = 3, kNumRoutingScalars = 4 };
// Indices into RoutingResult::losses.
enum RoutingLoss : int { kAuxLoss = 0, kZLoss = 1, kSeqAuxLoss = 2, kGlobalAuxLoss = 3, kNumRoutingLosses = 4 };

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
  Tensor sequence_fractions;   // float [>= S, E]: f_{s,e} of the sequence-level loss (rows < S written
                               // when seq_aux_loss_weight > 0)
};

// Where each kept choice went in the expert-contiguous layout.
struct DispatchMap {
  Tensor choice_rows;  // int32 [T, K]: row of choice (t, j) or -1 (empty or dropped)
  Tensor row_tokens;   // int32 [R]: token of each row, -1 for padding rows
};

namespace cpu {
void route(const Tensor& logits, const RoutingInputs& inputs, const RoutingParams& params, RoutingResult& result);
// params.method = expert_choice (ops::route picks it; src/ops/cpu/expert_choice.cpp).
void route_expert_choice(const Tensor& logits, const RoutingInputs& inputs, const RoutingParams& params,
                         RoutingResult& result);
// global_fractions: F [E] of the global-batch loss (global_balance_loss), the logits' float type;
// required when params.global_aux_loss_weight > 0. grad_aux_scale scales all three balance losses.
void route_backward(const Tensor& logits, const Tensor& grad_gates, const RoutingResult& routing,
                    const RoutingParams& params, float grad_aux_scale, float grad_z_scale, Tensor& grad_logits,
                    const Tensor* global_fractions = nullptr);
// loads [E] float: expert counts summed over ranks and micro-batches (the caller's reduction).
// F_e = load_e / sum_f load_f (0 when the sum is 0) -> global_fractions [E];
// routing.losses[kGlobalAuxLoss] = params.global_aux_loss_weight * E * sum_e F_e * prob_sums_e / T.
void global_balance_loss(const Tensor& loads, const RoutingParams& params, RoutingResult& routing,
                         Tensor& global_fractions);
// accumulator [E] float += counts [E] int32 (e.g. routing.expert_counts).
void accumulate_expert_load(const Tensor& counts, Tensor& accumulator);
// Aux-loss-free balancing (DeepSeek-V3): bias_e += rate * sign(mean_f load_f - load_e), sign(0) = 0.
// loads [E] float (the step's counts over all ranks and micro-batches), bias [E] fp32 (or f64).
void update_routing_bias(const Tensor& loads, float rate, Tensor& bias);
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
// dB_e = A_e^T * G_e: A [R, M], G [R, N], dB [E, M, N] of A's type, or f64 with f32 A. Sums in
// double over the segment's rows in order, starting from 0 (overwritten) or, with `accumulate`,
// from dB's values: into an f64 dB, calls over consecutive row ranges chain to the one sum over
// all of them bit for bit (the EP layer's hot-expert replicas rely on it).
void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b,
                              bool accumulate = false);
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
void route(const Tensor& logits, const RoutingInputs& inputs, const RoutingParams& params, RoutingResult& result,
           void* stream);
void route_expert_choice(const Tensor& logits, const RoutingInputs& inputs, const RoutingParams& params,
                         RoutingResult& result, void* stream);
// grad_logits may be fp32, bf16 or fp16 (written in the router GEMM's input type, saving a conversion).
void route_backward(const Tensor& logits, const Tensor& grad_gates, const RoutingResult& routing,
                    const RoutingParams& params, float grad_aux_scale, float grad_z_scale, Tensor& grad_logits,
                    void* stream, const Tensor* global_fractions = nullptr);
void global_balance_loss(const Tensor& loads, const RoutingParams& params, RoutingResult& routing,
                         Tensor& global_fractions, void* stream);
void accumulate_expert_load(const Tensor& counts, Tensor& accumulator, void* stream);
void update_routing_bias(const Tensor& loads, float rate, Tensor& bias, void* stream);
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
// accumulate: dB_e += A_e^T G_e (fp32 math; the cuBLAS loop with beta 1, never the sm_90a kernel).
void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b,
                              void* stream, int segment_alignment = 1, const Tensor* row_tokens = nullptr,
                              bool accumulate = false);
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
