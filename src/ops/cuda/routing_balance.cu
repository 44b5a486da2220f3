// The balance bookkeeping around routing on CUDA (semantics: src/ops/moe_ops.h; CPU reference
// src/ops/cpu/routing_balance.cpp). All tensors are [E] fp32 (counts int32), E <= a few hundred:
// one block of 256 threads per op, sums in a fixed order (a strided partial per thread, then a
// shared-memory tree), so results do not depend on timing.
//   accumulate_expert_load: load_e += count_e
//   global_balance_loss:    F_e = load_e / sum_f load_f (0 when the sum is 0),
//                           losses[kGlobalAuxLoss] = w_global * E * sum_e F_e * prob_sums_e / T
//   update_routing_bias:    b_e += rate * sign(mean_f load_f - load_e)
#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;

// Sum of value over the block in a fixed order; every thread gets the total.
__device__ float block_sum(float value, float* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const float total = shared[0];
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kThreads) accumulate_load_kernel(const int* counts, float* loads, int experts) {
  for (int expert = threadIdx.x; expert < experts; expert += kThreads) loads[expert] += float(counts[expert]);
}

__global__ void __launch_bounds__(kThreads)
    global_balance_kernel(const float* loads, const float* prob_sums, float* fractions, float* losses, int experts,
                          int64_t tokens, float weight) {
  __shared__ float shared[kThreads];
  float partial = 0.0f;
  for (int expert = threadIdx.x; expert < experts; expert += kThreads) partial += loads[expert];
  const float total = block_sum(partial, shared);
  float product = 0.0f;
  for (int expert = threadIdx.x; expert < experts; expert += kThreads) {
    const float fraction = total > 0.0f ? loads[expert] / total : 0.0f;
    fractions[expert] = fraction;
    product += fraction * prob_sums[expert];
  }
  const float sum = block_sum(product, shared);
  if (threadIdx.x == 0) losses[kGlobalAuxLoss] = tokens > 0 ? weight * float(experts) * sum / float(tokens) : 0.0f;
}

__global__ void __launch_bounds__(kThreads) update_bias_kernel(const float* loads, float* bias, int experts, float rate) {
  __shared__ float shared[kThreads];
  float partial = 0.0f;
  for (int expert = threadIdx.x; expert < experts; expert += kThreads) partial += loads[expert];
  const float mean = block_sum(partial, shared) / float(experts);
  for (int expert = threadIdx.x; expert < experts; expert += kThreads) {
    const float gap = mean - loads[expert];
    bias[expert] += gap > 0.0f ? rate : gap < 0.0f ? -rate : 0.0f;
  }
}

}  // namespace

namespace cuda {

void accumulate_expert_load(const Tensor& counts, Tensor& accumulator, void* stream) {
  const int64_t experts = counts.numel();
  check_tensor(counts, "accumulate_expert_load: counts", DType::i32, {experts});
  check_tensor(accumulator, "accumulate_expert_load: accumulator", DType::f32, {experts});
  if (experts == 0) return;
  accumulate_load_kernel<<<1, kThreads, 0, as_stream(stream)>>>(counts.as<int>(), accumulator.as<float>(),
                                                                int(experts));
  CUDA_CHECK_LAUNCH();
}

void global_balance_loss(const Tensor& loads, const RoutingParams& params, RoutingResult& routing,
                         Tensor& global_fractions, void* stream) {
  const int64_t experts = params.num_experts;
  check_tensor(loads, "global_balance_loss: loads", DType::f32, {experts});
  check_tensor(global_fractions, "global_balance_loss: global_fractions", DType::f32, {experts});
  check_tensor(routing.prob_sums, "global_balance_loss: prob_sums", DType::f32, {experts});
  check_tensor(routing.losses, "global_balance_loss: losses", DType::f32, {kNumRoutingLosses});
  global_balance_kernel<<<1, kThreads, 0, as_stream(stream)>>>(
      loads.as<float>(), routing.prob_sums.as<float>(), global_fractions.as<float>(), routing.losses.as<float>(),
      int(experts), params.num_tokens, params.global_aux_loss_weight);
  CUDA_CHECK_LAUNCH();
}

void update_routing_bias(const Tensor& loads, float rate, Tensor& bias, void* stream) {
  const int64_t experts = bias.numel();
  SY_CHECK(rate >= 0.0f, "update_routing_bias: rate must be >= 0, got ", rate);
  check_tensor(bias, "update_routing_bias: bias", DType::f32, {experts});
  check_tensor(loads, "update_routing_bias: loads", DType::f32, {experts});
  if (experts == 0) return;
  update_bias_kernel<<<1, kThreads, 0, as_stream(stream)>>>(loads.as<float>(), bias.as<float>(), int(experts), rate);
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
