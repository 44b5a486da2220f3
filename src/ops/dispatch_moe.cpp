// Backend dispatch of the MoE layer's ops (src/ops/moe_ops.h), the small-batch experts
// (src/ops/small_batch_ops.h) and the router sums (src/ops/router_sums.h); declared in
// src/ops/ops.h, rules in src/ops/dispatch.h.
#include "src/ops/dispatch.h"

namespace switchyard {
namespace ops {

using dispatch::expect_on_device;
using dispatch::expect_routing_on_device;
using dispatch::is_cpu;

void route(const ExecContext& context, const Tensor& logits, const RoutingInputs& inputs,
           const RoutingParams& params, RoutingResult& result) {
  expect_on_device(context, "route", {&logits});
  if (inputs.complexity) expect_on_device(context, "route", {inputs.complexity});
  if (inputs.selection_bias) expect_on_device(context, "route", {inputs.selection_bias});
  expect_routing_on_device(context, "route", result);
  if (params.method == RoutingMethod::expert_choice) {
    if (is_cpu(context)) return cpu::route_expert_choice(logits, inputs, params, result);
    SY_CUDA_BACKEND("route", cuda::route_expert_choice(logits, inputs, params, result, context.stream));
  }
  if (is_cpu(context)) return cpu::route(logits, inputs, params, result);
  SY_CUDA_BACKEND("route", cuda::route(logits, inputs, params, result, context.stream));
}

void route_backward(const ExecContext& context, const Tensor& logits, const Tensor& grad_gates,
                    const RoutingResult& routing, const RoutingParams& params, float grad_aux_scale,
                    float grad_z_scale, Tensor& grad_logits, const Tensor* global_fractions) {
  expect_on_device(context, "route_backward", {&logits, &grad_gates, &grad_logits});
  if (global_fractions) expect_on_device(context, "route_backward", {global_fractions});
  expect_routing_on_device(context, "route_backward", routing);
  if (is_cpu(context))
    return cpu::route_backward(logits, grad_gates, routing, params, grad_aux_scale, grad_z_scale, grad_logits,
                               global_fractions);
  SY_CUDA_BACKEND("route_backward", cuda::route_backward(logits, grad_gates, routing, params, grad_aux_scale,
                                                         grad_z_scale, grad_logits, context.stream,
                                                         global_fractions));
}

void global_balance_loss(const ExecContext& context, const Tensor& loads, const RoutingParams& params,
                         RoutingResult& routing, Tensor& global_fractions) {
  expect_on_device(context, "global_balance_loss", {&loads, &global_fractions});
  expect_routing_on_device(context, "global_balance_loss", routing);
  if (is_cpu(context)) return cpu::global_balance_loss(loads, params, routing, global_fractions);
  SY_CUDA_BACKEND("global_balance_loss",
                  cuda::global_balance_loss(loads, params, routing, global_fractions, context.stream));
}

void accumulate_expert_load(const ExecContext& context, const Tensor& counts, Tensor& accumulator) {
  expect_on_device(context, "accumulate_expert_load", {&counts, &accumulator});
  if (is_cpu(context)) return cpu::accumulate_expert_load(counts, accumulator);
  SY_CUDA_BACKEND("accumulate_expert_load", cuda::accumulate_expert_load(counts, accumulator, context.stream));
}

void update_routing_bias(const ExecContext& context, const Tensor& loads, float rate, Tensor& bias) {
  expect_on_device(context, "update_routing_bias", {&loads, &bias});
  if (is_cpu(context)) return cpu::update_routing_bias(loads, rate, bias);
  SY_CUDA_BACKEND("update_routing_bias", cuda::update_routing_bias(loads, rate, bias, context.stream));
}

void permute(const ExecContext& context, const Tensor& tokens, const RoutingResult& routing,
             const RoutingParams& params, Tensor& permuted, DispatchMap& map) {
  expect_on_device(context, "permute", {&tokens, &permuted, &map.choice_rows, &map.row_tokens});
  expect_routing_on_device(context, "permute", routing);
  if (is_cpu(context)) return cpu::permute(tokens, routing, params, permuted, map);
  SY_CUDA_BACKEND("permute", cuda::permute(tokens, routing, params, permuted, map, context.stream));
}

void permute_backward(const ExecContext& context, const Tensor& grad_permuted, const DispatchMap& map,
                      int64_t num_tokens, Tensor& grad_tokens) {
  expect_on_device(context, "permute_backward", {&grad_permuted, &map.choice_rows, &map.row_tokens, &grad_tokens});
  if (is_cpu(context)) return cpu::permute_backward(grad_permuted, map, num_tokens, grad_tokens);
  SY_CUDA_BACKEND("permute_backward",
                  cuda::permute_backward(grad_permuted, map, num_tokens, grad_tokens, context.stream));
}

void unpermute_combine(const ExecContext& context, const Tensor& expert_outputs, const RoutingResult& routing,
                       const DispatchMap& map, Tensor& combined) {
  expect_on_device(context, "unpermute_combine", {&expert_outputs, &map.choice_rows, &map.row_tokens, &combined});
  expect_routing_on_device(context, "unpermute_combine", routing);
  if (is_cpu(context)) return cpu::unpermute_combine(expert_outputs, routing, map, combined);
  SY_CUDA_BACKEND("unpermute_combine", cuda::unpermute_combine(expert_outputs, routing, map, combined, context.stream));
}

void unpermute_combine_backward(const ExecContext& context, const Tensor& grad_combined,
                                const Tensor& expert_outputs, const RoutingResult& routing, const DispatchMap& map,
                                Tensor& grad_expert_outputs, Tensor& grad_gates) {
  expect_on_device(context, "unpermute_combine_backward",
                   {&grad_combined, &expert_outputs, &map.choice_rows, &map.row_tokens, &grad_expert_outputs,
                    &grad_gates});
  expect_routing_on_device(context, "unpermute_combine_backward", routing);
  if (is_cpu(context))
    return cpu::unpermute_combine_backward(grad_combined, expert_outputs, routing, map, grad_expert_outputs,
                                           grad_gates);
  SY_CUDA_BACKEND("unpermute_combine_backward",
                  cuda::unpermute_combine_backward(grad_combined, expert_outputs, routing, map, grad_expert_outputs,
                                                   grad_gates, context.stream));
}

void grouped_gemm(const ExecContext& context, const Tensor& a, const Tensor& b, bool trans_b,
                  const Tensor& expert_offsets, Tensor& c, [[maybe_unused]] int segment_alignment,
                  [[maybe_unused]] const Tensor* row_tokens) {
  expect_on_device(context, "grouped_gemm", {&a, &b, &expert_offsets, &c});
  if (is_cpu(context)) return cpu::grouped_gemm(a, b, trans_b, expert_offsets, c);
  SY_CUDA_BACKEND("grouped_gemm",
                  cuda::grouped_gemm(a, b, trans_b, expert_offsets, c, context.stream, segment_alignment,
                                     row_tokens));
}

void grouped_gemm_weight_grad(const ExecContext& context, const Tensor& a, const Tensor& g,
                              const Tensor& expert_offsets, Tensor& grad_b, [[maybe_unused]] int segment_alignment,
                              [[maybe_unused]] const Tensor* row_tokens, bool accumulate) {
  expect_on_device(context, "grouped_gemm_weight_grad", {&a, &g, &expert_offsets, &grad_b});
  if (is_cpu(context)) return cpu::grouped_gemm_weight_grad(a, g, expert_offsets, grad_b, accumulate);
  SY_CUDA_BACKEND("grouped_gemm_weight_grad",
                  cuda::grouped_gemm_weight_grad(a, g, expert_offsets, grad_b, context.stream, segment_alignment,
                                                 row_tokens, accumulate));
}

void activation_forward(const ExecContext& context, ExpertActivation activation, const Tensor& pre, Tensor& post) {
  expect_on_device(context, "activation_forward", {&pre, &post});
  if (is_cpu(context)) return cpu::activation_forward(activation, pre, post);
  SY_CUDA_BACKEND("activation_forward", cuda::activation_forward(activation, pre, post, context.stream));
}

void activation_backward(const ExecContext& context, ExpertActivation activation, const Tensor& pre,
                         const Tensor& grad_post, Tensor& grad_pre) {
  expect_on_device(context, "activation_backward", {&pre, &grad_post, &grad_pre});
  if (is_cpu(context)) return cpu::activation_backward(activation, pre, grad_post, grad_pre);
  SY_CUDA_BACKEND("activation_backward",
                  cuda::activation_backward(activation, pre, grad_post, grad_pre, context.stream));
}

// [[maybe_unused]]: builds without CUDA read these parameters on the CUDA path only.
void grouped_gemm_activation(const ExecContext& context, ExpertActivation activation, const Tensor& a,
                             const Tensor& w1, const Tensor& expert_offsets, Tensor& pre, Tensor& post,
                             [[maybe_unused]] bool keep_pre, [[maybe_unused]] int segment_alignment,
                             [[maybe_unused]] const Tensor* row_tokens) {
  expect_on_device(context, "grouped_gemm_activation", {&a, &w1, &expert_offsets, &pre, &post});
  if (is_cpu(context)) return cpu::grouped_gemm_activation(activation, a, w1, expert_offsets, pre, post);
  SY_CUDA_BACKEND("grouped_gemm_activation",
                  cuda::grouped_gemm_activation(activation, a, w1, expert_offsets, pre, post, keep_pre,
                                                context.stream, segment_alignment, row_tokens));
}

void grouped_gemm_activation_backward(const ExecContext& context, ExpertActivation activation,
                                      const Tensor& grad_out, const Tensor& w2, const Tensor& expert_offsets,
                                      const Tensor& pre, Tensor& grad_post, Tensor& grad_pre,
                                      [[maybe_unused]] int segment_alignment,
                                      [[maybe_unused]] const Tensor* row_tokens) {
  expect_on_device(context, "grouped_gemm_activation_backward",
                   {&grad_out, &w2, &expert_offsets, &pre, &grad_post, &grad_pre});
  if (is_cpu(context))
    return cpu::grouped_gemm_activation_backward(activation, grad_out, w2, expert_offsets, pre, grad_post, grad_pre);
  SY_CUDA_BACKEND("grouped_gemm_activation_backward",
                  cuda::grouped_gemm_activation_backward(activation, grad_out, w2, expert_offsets, pre, grad_post,
                                                         grad_pre, context.stream, segment_alignment, row_tokens));
}

bool fuses_expert_activation(const ExecContext& context, [[maybe_unused]] ExpertActivation activation,
                             [[maybe_unused]] DType dtype, [[maybe_unused]] int64_t d_model,
                             [[maybe_unused]] int64_t d_ff, [[maybe_unused]] int segment_alignment) {
  if (is_cpu(context)) return false;
#if defined(SWITCHYARD_WITH_CUDA)
  return cuda::fuses_expert_activation(activation, dtype, d_model, d_ff, segment_alignment);
#else
  dispatch::no_cuda_backend("fuses_expert_activation");
#endif
}

void apply_jitter(const ExecContext& context, const Tensor& x, float eps, uint64_t seed, uint32_t stream_id,
                  uint64_t offset, Tensor& out) {
  expect_on_device(context, "apply_jitter", {&x, &out});
  if (is_cpu(context)) return cpu::apply_jitter(x, eps, seed, stream_id, offset, out);
  SY_CUDA_BACKEND("apply_jitter", cuda::apply_jitter(x, eps, seed, stream_id, offset, out, context.stream));
}

void small_batch_experts(const ExecContext& context, ExpertActivation activation, const Tensor& x,
                         const RoutingResult& routing, const Tensor& w1, const Tensor& w2,
                         [[maybe_unused]] Tensor& workspace, Tensor& y) {
  expect_on_device(context, "small_batch_experts",
                   {&x, &w1, &w2, &y, &routing.expert_ids, &routing.gates, &routing.slots, &routing.scalars});
  if (is_cpu(context)) return cpu::small_batch_experts(activation, x, routing, w1, w2, y);
#if defined(SWITCHYARD_WITH_CUDA)
  SY_CHECK(workspace.device == DeviceKind::cuda, "ops::small_batch_experts: workspace ", workspace.describe(),
           " is not on cuda");
  cuda::small_batch_experts(activation, x, routing, w1, w2, workspace, y, context.stream);
#else
  dispatch::no_cuda_backend("small_batch_experts");
#endif
}

// The tensors' devices are checked with their shapes (validate_router_sums_arguments).
void accumulate_router_sums(const ExecContext& context, const RoutingResult& routing, const Tensor& logits,
                            Tensor& accumulator, [[maybe_unused]] Tensor& scratch) {
  if (is_cpu(context)) return cpu::accumulate_router_sums(routing, logits, accumulator);
#if defined(SWITCHYARD_WITH_CUDA)
  validate_router_sums_arguments(routing, logits, accumulator, DeviceKind::cuda);
  SY_CHECK(
      scratch.dtype == DType::f64 && scratch.device == DeviceKind::cuda && scratch.numel() >= kRouterSumsScratchDoubles,
      "ops::accumulate_router_sums: scratch must be f64[", kRouterSumsScratchDoubles, "] on cuda, got ",
      scratch.describe());
  cuda::accumulate_router_sums(routing, logits, accumulator, scratch, context.stream);
#else
  dispatch::no_cuda_backend("accumulate_router_sums");
#endif
}

}  // namespace ops
}  // namespace switchyard
