// The ops layer's public API, and the only way up: code above src/ops (src/comm, src/model,
// src/train, src/report, src/cli) calls ops::NAME(const ExecContext&, ...) declared here and never
// names a backend: no cpu:: or cuda::, no include of src/ops/cpu/, src/ops/cuda/ or
// src/ops/dispatch.h (tests/scripts/test_ops_boundary.sh checks).
//
// Every ops:: function takes the parameters of cpu::NAME / cuda::NAME (without the stream) behind
// an ExecContext, checks that its tensors live on context.device, and calls the CPU reference or
// (builds with SWITCHYARD_WITH_CUDA) the CUDA version on context.stream. That choice is made in
// src/ops/dispatch_*.cpp and nowhere else.
//
// What it offers, by family; each family header is the contract (math, layouts, shared types)
// and declares the backends, cpu:: and cuda::, which only src/ops and the tests use:
//   MoE layer          route, permute, grouped GEMMs, activations, jitter     src/ops/moe_ops.h
//   small batch        small_batch_experts (the experts of a few tokens)      src/ops/small_batch_ops.h
//   router statistics  accumulate_router_sums                                 src/ops/router_sums.h
//   dense GEMM         gemm                                                   src/ops/gemm.h
//   dense model        embedding, norms, rotary, attention, cross-entropy,    src/ops/model_ops.h
//                      adamw_step, grad_norm_and_check
//   expert parallel    ep_send_counts, ep_receive_layout, ep_*_expert_layout  src/ops/ep_ops.h
//   hierarchical EP    ep_kept_choices, ep_choice_layout, ep_node_choices,    src/ops/ep_hier_ops.h
//                      ep_pack_node_choices, ep_unpack_node_gate_grads,
//                      ep_map_choice_ids (hot-expert replicas)
//   nvlink exchange    ep_push_rows, ep_pull_*, ep_zero_padding_rows, the     src/ops/ep_nvlink_ops.h
//                      signals (CUDA only)
//   fp8 rows           quantize_rows_fp8, dequantize_rows_fp8 (e4m3 with a     src/ops/fp8_rows.h
//                      scale per 128 elements: the FP8 dispatch's wire format)
//   memory helpers     fill_zero, copy, convert, add_into, synchronize        src/ops/elementwise_ops.h
// Besides the ops: what both backends must agree on (routing parameter rules, the capacity
// formula) and RoutingBuffers, which owns the memory of a RoutingResult and a DispatchMap sized
// once for the largest token count.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

// The family headers, for their types. ep_ops.h and small_batch_ops.h include this header at
// their end (after their own declarations, so the cycle is harmless): code that includes only
// one of them still reaches ops::.
#include "src/ops/elementwise_ops.h"
#include "src/ops/ep_hier_ops.h"
#include "src/ops/ep_nvlink_ops.h"
#include "src/ops/ep_ops.h"
#include "src/ops/fp8_rows.h"
#include "src/ops/gemm.h"
#include "src/ops/model_ops.h"
#include "src/ops/moe_ops.h"
#include "src/ops/router_sums.h"
#include "src/ops/small_batch_ops.h"
#include "src/core/device.h"

namespace switchyard {

struct ExecContext {
  DeviceKind device = DeviceKind::cpu;
  void* stream = nullptr;  // cudaStream_t on CUDA (nullptr: the legacy default stream); unused on CPU
};

// Checks a RoutingParams for values either backend would reject (SY_BAD_INPUT naming the field):
// num_tokens >= 0, num_experts >= 1, 1 <= k_max <= min(8, num_experts), 1 <= k_min <= k_max when
// complexity routing is on, capacity_factor > 0 (unless dropless), segment_alignment >= 1, and
// num_tokens * k_max and the padded row count fit int32; num_groups divides num_experts, 1 <=
// topk_groups <= num_groups, k_max <= topk_groups * (E / num_groups); routed_scaling_factor > 0;
// loss weights >= 0; expert choice without complexity, groups, dropless or probability drops.
void validate_routing_params(const RoutingParams& params);

// The capacity rule of src/ops/moe_ops.h, written once so both backends round identically:
// ceil(capacity_factor * total_choices / E) evaluated in double, INT32_MAX when dropless.
inline int64_t expert_capacity(const RoutingParams& params, int64_t total_choices) {
  if (params.dropless) return std::numeric_limits<int32_t>::max();
  double capacity = std::ceil(double(params.capacity_factor) * double(total_choices) / double(params.num_experts));
  return capacity >= double(std::numeric_limits<int32_t>::max()) ? std::numeric_limits<int32_t>::max()
                                                                  : int64_t(capacity);
}

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// What permute, unpermute_combine and their backwards take with a layout that ep_choice_layout made
// (src/ops/ep_hier_ops.h): `choices` per token over `num_experts` ids, every one kept (no capacity:
// the worst case is every choice of every token), packed (segment alignment 1).
inline RoutingParams choice_layout_params(int64_t tokens, int num_experts, int choices) {
  RoutingParams params;
  params.num_tokens = tokens;
  params.num_experts = num_experts;
  params.k_max = choices;
  params.dropless = true;
  params.segment_alignment = 1;
  return params;
}

namespace ops {
void route(const ExecContext& context, const Tensor& logits, const RoutingInputs& inputs,
           const RoutingParams& params, RoutingResult& result);
void route_backward(const ExecContext& context, const Tensor& logits, const Tensor& grad_gates,
                    const RoutingResult& routing, const RoutingParams& params, float grad_aux_scale,
                    float grad_z_scale, Tensor& grad_logits, const Tensor* global_fractions = nullptr);
// The global-batch balance loss, expert loads and the bias update (src/ops/moe_ops.h).
void global_balance_loss(const ExecContext& context, const Tensor& loads, const RoutingParams& params,
                         RoutingResult& routing, Tensor& global_fractions);
void accumulate_expert_load(const ExecContext& context, const Tensor& counts, Tensor& accumulator);
void update_routing_bias(const ExecContext& context, const Tensor& loads, float rate, Tensor& bias);
void permute(const ExecContext& context, const Tensor& tokens, const RoutingResult& routing,
             const RoutingParams& params, Tensor& permuted, DispatchMap& map);
void permute_backward(const ExecContext& context, const Tensor& grad_permuted, const DispatchMap& map,
                      int64_t num_tokens, Tensor& grad_tokens);
void unpermute_combine(const ExecContext& context, const Tensor& expert_outputs, const RoutingResult& routing,
                       const DispatchMap& map, Tensor& combined);
void unpermute_combine_backward(const ExecContext& context, const Tensor& grad_combined,
                                const Tensor& expert_outputs, const RoutingResult& routing, const DispatchMap& map,
                                Tensor& grad_expert_outputs, Tensor& grad_gates);
// row_tokens: the layout's padding marks, a promise that padding rows of A are zero (src/ops/moe_ops.h,
// cuda::grouped_gemm); the CPU ignores them.
void grouped_gemm(const ExecContext& context, const Tensor& a, const Tensor& b, bool trans_b,
                  const Tensor& expert_offsets, Tensor& c, int segment_alignment = 1,
                  const Tensor* row_tokens = nullptr);
// accumulate: grad_b += the product instead of = (src/ops/moe_ops.h: on the CPU in double from
// grad_b's values, which may be f64 with f32 inputs; on CUDA in the sm_90a kernel's epilogue, or
// the cuBLAS loop with beta 1).
void grouped_gemm_weight_grad(const ExecContext& context, const Tensor& a, const Tensor& g,
                              const Tensor& expert_offsets, Tensor& grad_b, int segment_alignment = 1,
                              const Tensor* row_tokens = nullptr, bool accumulate = false);
void activation_forward(const ExecContext& context, ExpertActivation activation, const Tensor& pre, Tensor& post);
void activation_backward(const ExecContext& context, ExpertActivation activation, const Tensor& pre,
                         const Tensor& grad_post, Tensor& grad_pre);
// Expert GEMM 1 + activation and data grad 2 + activation backward (src/ops/moe_ops.h): fused on
// CUDA where fuses_expert_activation() holds, the two ops in sequence otherwise (always on CPU,
// where keep_pre is ignored and pre always written).
void grouped_gemm_activation(const ExecContext& context, ExpertActivation activation, const Tensor& a,
                             const Tensor& w1, const Tensor& expert_offsets, Tensor& pre, Tensor& post,
                             bool keep_pre = true, int segment_alignment = 1, const Tensor* row_tokens = nullptr);
void grouped_gemm_activation_backward(const ExecContext& context, ExpertActivation activation,
                                      const Tensor& grad_out, const Tensor& w2, const Tensor& expert_offsets,
                                      const Tensor& pre, Tensor& grad_post, Tensor& grad_pre,
                                      int segment_alignment = 1, const Tensor* row_tokens = nullptr);
// Whether those two ops run fused on this context for a layer of these sizes (false on CPU).
bool fuses_expert_activation(const ExecContext& context, ExpertActivation activation, DType dtype, int64_t d_model,
                             int64_t d_ff, int segment_alignment);
void apply_jitter(const ExecContext& context, const Tensor& x, float eps, uint64_t seed, uint32_t stream_id,
                  uint64_t offset, Tensor& out);
// c = alpha op(a) op(b) + beta * (addend ? *addend : c) (src/ops/gemm.h).
void gemm(const ExecContext& context, bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b,
          float beta, Tensor& c, const Tensor* addend = nullptr);

// The small-batch expert path (src/ops/small_batch_ops.h); the CPU reference ignores `workspace`
// (it may be empty), CUDA needs it on the device.
void small_batch_experts(const ExecContext& context, ExpertActivation activation, const Tensor& x,
                         const RoutingResult& routing, const Tensor& w1, const Tensor& w2, Tensor& workspace,
                         Tensor& y);

// accumulator += this routing's sums (src/ops/router_sums.h). `scratch`: float64
// [kRouterSumsScratchDoubles] on the device (unused on CPU).
void accumulate_router_sums(const ExecContext& context, const RoutingResult& routing, const Tensor& logits,
                            Tensor& accumulator, Tensor& scratch);

// The dense transformer ops (src/ops/model_ops.h).
void embedding_forward(const ExecContext& context, const Tensor& tokens, const Tensor& token_table,
                       const Tensor* position_table, int64_t seq_len, Tensor& out);
void embedding_backward(const ExecContext& context, const Tensor& tokens, const Tensor& grad_out, int64_t seq_len,
                        bool accumulate, Tensor& grad_token_table, Tensor* grad_position_table);
void layernorm_forward(const ExecContext& context, const Tensor& x, const Tensor& weight, const Tensor& bias,
                       float eps, Tensor& out, Tensor& mean, Tensor& rstd);
void layernorm_backward(const ExecContext& context, const Tensor& x, const Tensor& weight, const Tensor& mean,
                        const Tensor& rstd, const Tensor& grad_out, Tensor& grad_x, Tensor& grad_weight,
                        Tensor& grad_bias, NormAccumulate accumulate = {});
void rmsnorm_forward(const ExecContext& context, const Tensor& x, const Tensor& weight, float eps, Tensor& out,
                     Tensor& rstd);
void rmsnorm_backward(const ExecContext& context, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                      const Tensor& grad_out, Tensor& grad_x, Tensor& grad_weight, NormAccumulate accumulate = {});
void rotary_forward(const ExecContext& context, const AttentionShape& shape, const Tensor& qkv, double base,
                    int64_t position_offset, Tensor& qkv_out);
void rotary_backward(const ExecContext& context, const AttentionShape& shape, const Tensor& grad_qkv_out,
                     double base, int64_t position_offset, Tensor& grad_qkv);
void attention_forward(const ExecContext& context, const AttentionShape& shape, const Tensor& qkv, Tensor& out,
                       Tensor& softmax_stats, Tensor& workspace);
// deterministic = false lets CUDA's fused backward accumulate dQ with fp32 atomics (faster, not
// bit-reproducible; parallel.deterministic); the CPU is deterministic either way.
void attention_backward(const ExecContext& context, const AttentionShape& shape, const Tensor& qkv,
                        const Tensor& out, const Tensor& grad_out, const Tensor& softmax_stats, Tensor& workspace,
                        Tensor& grad_qkv, bool deterministic = true);
void cross_entropy(const ExecContext& context, const Tensor& logits, const Tensor& targets, float grad_scale,
                   Tensor& token_losses, Tensor& summary, Tensor* grad_logits);
void adamw_step(const ExecContext& context, const std::vector<AdamWTensor>& tensors, const AdamWParams& params);
void grad_norm_and_check(const ExecContext& context, const std::vector<Tensor>& tensors, Tensor& result);

// Expert-parallel row moves (src/ops/ep_ops.h).
void ep_send_counts(const ExecContext& context, const Tensor& expert_offsets, Tensor& send_counts);
void ep_receive_layout(const ExecContext& context, EpReceiveLayout& layout);
void ep_kept_choices(const ExecContext& context, const Tensor& ids, const Tensor& slots, const Tensor& scalars,
                     Tensor& kept_ids);
void ep_choice_layout(const ExecContext& context, const Tensor& ids, int num_slots, Tensor& slots, Tensor& counts,
                      Tensor& offsets, Tensor& scalars);
void ep_map_choice_ids(const ExecContext& context, const Tensor& ids, const Tensor& expert_map, Tensor& mapped_ids);
void ep_node_choices(const ExecContext& context, const Tensor& ids, const Tensor& slots, const Tensor& scalars, int experts_per_node,
                     int num_nodes, Tensor& node_ids);
void ep_pack_node_choices(const ExecContext& context, const Tensor& ids, const Tensor& gates,
                          const Tensor& slots, const Tensor& scalars, const Tensor& node_ids, const Tensor& node_rows,
                          int experts_per_node, Tensor& meta_ids, Tensor& meta_gates);
void ep_unpack_node_gate_grads(const ExecContext& context, const Tensor& meta_grad_gates, const Tensor& ids,
                               const Tensor& slots, const Tensor& scalars, const Tensor& node_ids, const Tensor& node_rows,
                               int experts_per_node, Tensor& grad_gates);
void ep_to_expert_layout(const ExecContext& context, const Tensor& packed, const EpReceiveLayout& layout,
                         int first_expert, int end_expert, int64_t expected_rows, Tensor& padded);
void ep_from_expert_layout(const ExecContext& context, const Tensor& padded, const EpReceiveLayout& layout,
                           int first_expert, int end_expert, int64_t expected_rows, Tensor& packed);

// FP8 row packing (src/ops/fp8_rows.h): rows [R, D] <-> packed u8 [R, fp8_row_bytes(D)].
void quantize_rows_fp8(const ExecContext& context, const Tensor& rows, Tensor& packed);
void dequantize_rows_fp8(const ExecContext& context, const Tensor& packed, Tensor& rows);

// Direct peer row moves of the nvlink transport (src/ops/ep_nvlink_ops.h): raw pointers,
// device-visible on CUDA, host memory standing for the peers' on CPU. The CPU reference moves the
// rows on the spot and has no signal boards: it ignores `signal`, `signal_kind`, `block_counter`
// and the launch-size hint `max_padding_rows`.
void ep_push_rows(const ExecContext& context, const void* packed, int64_t rows, const EpPeerRows& peers,
                  const EpSignalBoards& signal, int signal_kind, unsigned* block_counter);
void ep_pull_rows(const ExecContext& context, void* packed, int64_t rows, const EpPeerRows& peers);
void ep_pull_combine(const ExecContext& context, const EpPeerRows& peers, int64_t rows, const int32_t* choice_rows,
                     const float* gates, int64_t num_tokens, int k_max, DType dtype, void* tokens_out, void* keep);
void ep_zero_padding_rows(const ExecContext& context, void* padded, int64_t row_bytes, const int32_t* expert_offsets,
                          const int32_t* expert_totals, int local_experts, int64_t max_padding_rows);
// The signals and the count all-gather live in peer-mapped device memory: CUDA only (a CPU
// context is an error naming the op).
void ep_signal_peers(const ExecContext& context, const EpSignalBoards& signal, int signal_kind);
void ep_all_gather_counts(const ExecContext& context, const int32_t* packed_offsets, int64_t segments,
                          void* const* peer_bases, const EpSignalBoards& signal, int signal_kind);
void ep_wait_signals(const ExecContext& context, const EpSignalBoards& signal, int signal_kind,
                     unsigned long long expected, int64_t timeout_ns, EpWaitFailure* failure);
void ep_signal_and_wait(const ExecContext& context, const EpSignalBoards& signal, int signal_kind,
                        unsigned long long expected, int64_t timeout_ns, EpWaitFailure* failure);

// Memory helpers, ordered on context.stream like the ops.
void fill_zero(const ExecContext& context, Tensor& tensor);
// Same dtype and byte size; each side on the host or on context.device. A copy to the host is
// complete on return (it synchronizes), so the host may read it at once.
void copy(const ExecContext& context, const Tensor& source, Tensor& destination);
// dtype conversion, same element count, both on context.device. On CUDA, f32 <-> bf16/f16 is done
// by cuda::apply_jitter with eps = 0 (an exact multiply by 1), so that op must accept an `out`
// whose dtype differs from `x`.
void convert(const ExecContext& context, const Tensor& source, Tensor& destination);
// accumulator += addend (same dtype, same element count). CUDA: cublasAxpyEx, fp32 math.
void add_into(const ExecContext& context, const Tensor& addend, Tensor& accumulator);
// The host waits for everything enqueued on context.stream.
void synchronize(const ExecContext& context);
}  // namespace ops

// Owns the tensors of one RoutingResult and one DispatchMap, allocated once for max_tokens and
// max_rows, and hands out views for the tokens and rows of the current step (row-major prefixes
// of the same memory, so no allocation happens per step). Float tensors are `float_dtype`
// (fp32 on CUDA, the reference's type on CPU); index tensors are int32.
class RoutingBuffers {
 public:
  RoutingBuffers() = default;
  // max_sequences: rows of sequence_fractions (routing_num_sequences of the largest call).
  RoutingBuffers(DeviceKind device, DType float_dtype, int64_t max_tokens, int num_experts, int k_max,
                 int64_t max_rows, int64_t max_sequences = 1);
  RoutingResult result(int64_t num_tokens) const;
  DispatchMap map(int64_t num_tokens, int64_t rows) const;
  int64_t max_tokens() const { return max_tokens_; }
  int64_t max_rows() const { return max_rows_; }

 private:
  DeviceKind device_ = DeviceKind::cpu;
  DType float_dtype_ = DType::f32;
  int64_t max_tokens_ = 0, max_rows_ = 0, max_sequences_ = 1;
  int num_experts_ = 0, k_max_ = 0;
  Buffer sequence_fractions_;
  Buffer expert_ids_, gates_, slots_, token_k_, logsumexp_, expert_counts_, first_choice_counts_, prob_sums_,
      expert_offsets_, scalars_, losses_, choice_rows_, row_tokens_;
};

}  // namespace switchyard
