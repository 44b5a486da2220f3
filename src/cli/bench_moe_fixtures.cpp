// The fixtures of `switchyard bench moe` (src/cli/bench_moe_fixtures.h).
#include "src/cli/bench_moe_fixtures.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <sstream>

#include "src/core/json.h"
#include "src/core/timing.h"

namespace switchyard::bench_moe {

// Random inputs on the bench's device (src/cli/bench_common.h).
Buffer random_buffer(const BenchSettings& settings, DType dtype, int64_t count, float stddev, uint64_t seed) {
  return random_device_buffer(settings.context.device, dtype, count, stddev, seed);
}

double time_median_ms(const BenchSettings& settings, const std::function<void()>& fn) {
  return median_call_ms(settings.context, settings.warmup, settings.iterations, fn);
}

double expert_forward_flops(const LayerShape& shape) {
  const double up_columns = shape.activation == ExpertActivation::swiglu ? 2.0 * shape.d_ff : double(shape.d_ff);
  return 2.0 * double(shape.tokens) * shape.top_k * (double(shape.d_model) * up_columns + double(shape.d_ff) * shape.d_model);
}

MoeBench::MoeBench(const BenchSettings& settings, const LayerShape& shape, ExpertComputeMode mode) {
  config.d_model = shape.d_model;
  config.moe.expert_d_ff = shape.d_ff;
  config.moe.num_experts = shape.experts;
  config.moe.top_k = config.moe.k_min = shape.top_k;
  config.moe.renormalize_gates = shape.top_k > 1;
  config.moe.dropless = settings.dropless;
  config.moe.capacity_factor = config.moe.eval_capacity_factor = settings.capacity_factor;
  config.moe.compute_mode = mode;
  config.moe.activation = shape.activation;
  const DType act = settings.activation_dtype;
  layer = std::make_unique<MoeLayer>(config, settings.context.device, act, shape.tokens);
  const int64_t tokens = shape.tokens, d = shape.d_model, f = shape.d_ff, e = shape.experts;
  x = random_buffer(settings, act, tokens * d, 1.0f, settings.seed + 1);
  grad_y = random_buffer(settings, act, tokens * d, 1.0f, settings.seed + 2);
  router = random_buffer(settings, act, d * e, 1.0f / std::sqrt(float(d)), settings.seed + 3);
  w1 = random_buffer(settings, act, e * d * config.w1_columns(), 1.0f / std::sqrt(float(d)), settings.seed + 4);
  w2 = random_buffer(settings, act, e * f * d, 1.0f / std::sqrt(float(f)), settings.seed + 5);
  const DeviceKind device = settings.context.device;
  y = Buffer(device, size_t(tokens * d) * dtype_size(act));
  grad_x = Buffer(device, size_t(tokens * d) * dtype_size(act));
  const DType grad_dtype = layer->gradient_dtype();
  grad_router = Buffer(device, size_t(d * e) * dtype_size(grad_dtype));
  grad_w1 = Buffer(device, size_t(e * d * config.w1_columns()) * dtype_size(grad_dtype));
  grad_w2 = Buffer(device, size_t(e * f * d) * dtype_size(grad_dtype));
  weights = {router.view(act, {d, e}), w1.view(act, {e, d, config.w1_columns()}), w2.view(act, {e, f, d})};
  gradients = {grad_router.view(grad_dtype, {d, e}), grad_w1.view(grad_dtype, {e, d, config.w1_columns()}),
               grad_w2.view(grad_dtype, {e, f, d})};
  x_view = x.view(act, {tokens, d});
  y_view = y.view(act, {tokens, d});
  grad_y_view = grad_y.view(act, {tokens, d});
  grad_x_view = grad_x.view(act, {tokens, d});
}

void MoeBench::forward(const ExecContext& context, bool training) {
  MoeForwardArgs args;
  args.training = training;
  args.read_losses = false;
  layer->forward(context, x_view, weights, args, y_view);
}

void MoeBench::forward_backward(const ExecContext& context) {
  forward(context, true);
  layer->backward(context, grad_y_view, weights, 1.0f, 1.0f, grad_x_view, gradients);
}

DenseFfnBench::DenseFfnBench(const BenchSettings& settings, const LayerShape& shape) {
  const DType act = settings.activation_dtype;
  const DType grad_dtype = settings.context.device == DeviceKind::cuda ? DType::f32 : act;
  const int64_t rows = shape.tokens * shape.top_k, d = shape.d_model, f = shape.d_ff;
  activation = shape.activation;
  const int64_t up = activation == ExpertActivation::swiglu ? 2 * f : f;  // columns of W1 and H
  const DeviceKind device = settings.context.device;
  auto buffer = [&](Buffer& storage, Tensor& view, DType dtype, int64_t r, int64_t c) {
    storage = Buffer(device, size_t(r * c) * dtype_size(dtype));
    view = storage.view(dtype, {r, c});
  };
  x = random_buffer(settings, act, rows * d, 1.0f, settings.seed + 11);
  tx = x.view(act, {rows, d});
  w1 = random_buffer(settings, act, d * up, 1.0f / std::sqrt(float(d)), settings.seed + 12);
  tw1 = w1.view(act, {d, up});
  w2 = random_buffer(settings, act, f * d, 1.0f / std::sqrt(float(f)), settings.seed + 13);
  tw2 = w2.view(act, {f, d});
  grad_y = random_buffer(settings, act, rows * d, 1.0f, settings.seed + 14);
  tgy = grad_y.view(act, {rows, d});
  buffer(hidden, th, act, rows, up);
  buffer(activated, ta, act, rows, f);
  buffer(y, ty, act, rows, d);
  buffer(grad_activated, tga, act, rows, f);
  buffer(grad_hidden, tgh, act, rows, up);
  buffer(grad_x, tgx, act, rows, d);
  buffer(grad_w1, tgw1, grad_dtype, d, up);
  buffer(grad_w2, tgw2, grad_dtype, f, d);
}

void DenseFfnBench::forward(const ExecContext& context) {
  ops::gemm(context, false, false, 1.0f, tx, tw1, 0.0f, th);
  ops::activation_forward(context, activation, th, ta);
  ops::gemm(context, false, false, 1.0f, ta, tw2, 0.0f, ty);
}

void DenseFfnBench::forward_backward(const ExecContext& context) {
  forward(context);
  ops::gemm(context, false, true, 1.0f, tgy, tw2, 0.0f, tga);   // dA = dY W2^T
  ops::gemm(context, true, false, 1.0f, ta, tgy, 0.0f, tgw2);   // dW2 = A^T dY
  ops::activation_backward(context, activation, th, tga, tgh);
  ops::gemm(context, false, true, 1.0f, tgh, tw1, 0.0f, tgx);   // dX = dH W1^T
  ops::gemm(context, true, false, 1.0f, tx, tgh, 0.0f, tgw1);   // dW1 = X^T dH
}

}  // namespace switchyard::bench_moe
