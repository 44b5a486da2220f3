// Backend dispatch: model code calls ops::NAME(context, ...) and never names a backend.
//
// Every ops:: function takes the parameters of cpu::NAME / cuda::NAME (src/ops/moe_ops.h,
// src/ops/gemm.h) behind an ExecContext, checks that the tensors live on context.device, and calls
// the CPU reference or (builds with SWITCHYARD_WITH_CUDA) the CUDA version on context.stream.
//
// Besides the MoE ops this header holds what both backends must agree on (routing parameter
// rules, the capacity formula), the few memory helpers the model needs (fill_zero, copy, convert,
// add_into, synchronize), and RoutingBuffers, which owns the memory of a RoutingResult and a
// DispatchMap sized once for the largest token count.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "src/ops/gemm.h"
#include "src/ops/moe_ops.h"
#include "src/core/device.h"

namespace switchyard {

struct ExecContext {
  DeviceKind device = DeviceKind::cpu;
  void* stream = nullptr;  // cudaStream_t on CUDA (nullptr: the legacy default stream); unused on CPU
};

// Checks a RoutingParams for values either backend would reject (SY_BAD_INPUT naming the field):
// num_tokens >= 0, num_experts >= 1, 1 <= k_max <= min(8, num_experts), 1 <= k_min <= k_max when
// complexity routing is on, capacity_factor > 0 (unless dropless), segment_alignment >= 1, and
// num_tokens * k_max and the padded row count fit int32.
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

namespace cpu {
// dtype conversion between any two of f32, f64, bf16, f16 (same element count).
void convert(const Tensor& source, Tensor& destination);
// accumulator += addend, same float dtype and element count (f32, f64, bf16, f16; math in double).
void add_into(const Tensor& addend, Tensor& accumulator);
}  // namespace cpu

namespace ops {
void route(const ExecContext& context, const Tensor& logits, const Tensor* complexity, const RoutingParams& params,
           RoutingResult& result);
void route_backward(const ExecContext& context, const Tensor& logits, const Tensor& grad_gates,
                    const RoutingResult& routing, const RoutingParams& params, float grad_aux_scale,
                    float grad_z_scale, Tensor& grad_logits);
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
void grouped_gemm_weight_grad(const ExecContext& context, const Tensor& a, const Tensor& g,
                              const Tensor& expert_offsets, Tensor& grad_b, int segment_alignment = 1,
                              const Tensor* row_tokens = nullptr);
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
void gemm(const ExecContext& context, bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b,
          float beta, Tensor& c);

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
  RoutingBuffers(DeviceKind device, DType float_dtype, int64_t max_tokens, int num_experts, int k_max,
                 int64_t max_rows);
  RoutingResult result(int64_t num_tokens) const;
  DispatchMap map(int64_t num_tokens, int64_t rows) const;
  int64_t max_tokens() const { return max_tokens_; }
  int64_t max_rows() const { return max_rows_; }

 private:
  DeviceKind device_ = DeviceKind::cpu;
  DType float_dtype_ = DType::f32;
  int64_t max_tokens_ = 0, max_rows_ = 0;
  int num_experts_ = 0, k_max_ = 0;
  Buffer expert_ids_, gates_, slots_, token_k_, logsumexp_, expert_counts_, first_choice_counts_, prob_sums_,
      expert_offsets_, scalars_, losses_, choice_rows_, row_tokens_;
};

}  // namespace switchyard
