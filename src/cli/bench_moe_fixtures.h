// What `switchyard bench moe` (src/cli/bench_moe_command.cpp) times and how: the settings every
// measurement shares, device tensors of random normal values, the median of device-event timings
// after warm-up, layer shapes, the MoE layer and a dense FFN of the same active size with random
// weights ready to run, and the flat JSON record each measurement leaves for --json.
//
// FLOP count of the expert GEMMs (forward): 2 * T * k * (D * F + F * D) (gelu) and
// 2 * T * k * (D * 2F + F * D) (swiglu); backward is twice that.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "src/ops/ops.h"
#include "src/cli/bench_common.h"
#include "src/core/device.h"
#include "src/model/moe_layer.h"

namespace switchyard::bench_moe {

struct BenchSettings {
  ExecContext context;
  DType activation_dtype = DType::bf16;
  int warmup = 5, iterations = 20;
  bool dropless = true;
  float capacity_factor = 1.25f;
  uint64_t seed = 1;
};

// A device tensor of normal(0, stddev) values, generated on the host in float and stored in `dtype`.
Buffer random_buffer(const BenchSettings& settings, DType dtype, int64_t count, float stddev, uint64_t seed);

// Median time of fn in ms (settings.warmup untimed calls first, then settings.iterations timed).
double time_median_ms(const BenchSettings& settings, const std::function<void()>& fn);

struct LayerShape {
  std::string name;
  int64_t tokens;
  int d_model, d_ff, experts, top_k;
  ExpertActivation activation = ExpertActivation::gelu_tanh;
};

// FLOPs of the expert GEMMs of one forward: 2 T k (D F + F D) with gelu, 2 T k (D 2F + F D) =
// 6 T k D F with swiglu (SonicMoE's count); backward is twice that.
double expert_forward_flops(const LayerShape& shape);

// The MoE layer with random weights, ready to time.
struct MoeBench {
  MoeLayerConfig config;
  std::unique_ptr<MoeLayer> layer;
  Buffer x, y, grad_y, grad_x, router, w1, w2, grad_router, grad_w1, grad_w2;
  MoeWeights weights;
  MoeGradients gradients;
  Tensor x_view, y_view, grad_y_view, grad_x_view;

  MoeBench(const BenchSettings& settings, const LayerShape& shape, ExpertComputeMode mode);
  void forward(const ExecContext& context, bool training);
  void forward_backward(const ExecContext& context);
};

// y = act(x W1) W2 with the same active size as the MoE layer (T*k rows; swiglu: W1 is D x 2F),
// through the same gemm and activation ops.
struct DenseFfnBench {
  Buffer x, w1, w2, hidden, activated, y, grad_y, grad_activated, grad_hidden, grad_x, grad_w1, grad_w2;
  Tensor tx, tw1, tw2, th, ta, ty, tgy, tga, tgh, tgx, tgw1, tgw2;
  ExpertActivation activation = ExpertActivation::gelu_tanh;

  DenseFfnBench(const BenchSettings& settings, const LayerShape& shape);
  void forward(const ExecContext& context);
  void forward_backward(const ExecContext& context);
};

// One measurement as a flat JSON object (src/cli/bench_common.h).
using Record = BenchRecord;

}  // namespace switchyard::bench_moe
