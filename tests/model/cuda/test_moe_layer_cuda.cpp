// The MoE layer on CUDA (bf16 activations, fp32 logits and weight gradients) against the same layer
// on the CPU backend in float64, both fed the same bf16-representable inputs. Inputs are drawn so
// that no routing decision is near a tie under either side's router input (the GPU's jittered
// input is rounded to bf16, the CPU's is not), so the integer routing outputs must match exactly;
// y, the two losses and every gradient must match to bf16 accuracy. Two steps run on one layer
// (buffer and scratch reuse). Cases: the sm_90a grouped GEMM path (alignment 128) and the cuBLAS
// fallback (alignment 16), top-1 and top-2, capacity drops, renormalization, swiglu, jitter, dense
// compute mode. Device outputs and gradients are poisoned before every pass.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "src/model/moe_layer.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

struct LayerCudaCase {
  const char* name;
  ExpertActivation activation;
  int k;
  bool renormalize, dropless;
  float capacity_factor;
  float jitter_eps;
  int alignment;
  ExpertComputeMode mode;
  int64_t tokens;
};

void PrintTo(const LayerCudaCase& test, std::ostream* os) { *os << test.name; }

MoeLayerConfig make_config(const LayerCudaCase& test) {
  MoeLayerConfig config;
  config.d_model = 64;  // multiples of 64: the sm_90a grouped GEMM takes these shapes
  config.moe.expert_d_ff = 128;
  config.moe.num_experts = 8;
  config.moe.top_k = config.moe.k_min = test.k;
  config.moe.renormalize_gates = test.renormalize;
  config.moe.dropless = test.dropless;
  config.moe.capacity_factor = config.moe.eval_capacity_factor = test.capacity_factor;
  config.moe.segment_alignment = test.alignment;
  config.moe.aux_loss_weight = 0.05f;
  config.moe.z_loss_weight = 0.01f;
  config.moe.activation = test.activation;
  config.moe.jitter_eps = test.jitter_eps;
  config.jitter_seed = 99;
  config.jitter_stream = 3;
  config.moe.compute_mode = test.mode;
  return config;
}

double bf16_value(double value) { return double(float(Bf16(float(value)))); }

// Host copies (f64) of the layer's inputs; every value is exactly representable in bf16.
struct HostData {
  HostTensor x, router, w1, w2, grad_y;
  HostData(const MoeLayerConfig& config, int64_t tokens, uint64_t seed)
      : x(DType::f64, {tokens, config.d_model}),
        router(DType::f64, {config.d_model, config.moe.num_experts}),
        w1(DType::f64, {config.moe.num_experts, config.d_model, config.w1_columns()}),
        w2(DType::f64, {config.moe.num_experts, config.moe.expert_d_ff, config.d_model}),
        grad_y(DType::f64, {tokens, config.d_model}) {
    std::mt19937_64 generator(seed);
    fill_uniform(x, generator, -1, 1);
    fill_normal(router, generator, 0, 0.3);
    fill_normal(w1, generator, 0, 1.0 / std::sqrt(double(config.d_model)));
    fill_normal(w2, generator, 0, 1.0 / std::sqrt(double(config.moe.expert_d_ff)));
    fill_uniform(grad_y, generator, -1, 1);
    for (Tensor* tensor : {&x.tensor(), &router.tensor(), &w1.tensor(), &w2.tensor(), &grad_y.tensor()})
      for (int64_t index = 0; index < tensor->numel(); ++index)
        set_element(*tensor, index, bf16_value(get_element(*tensor, index)));
  }
};

// The experts of the k+1 largest logits of a row, in order (ties to the lower index), and the
// smallest gap between consecutive ones.
std::vector<int> leading_experts(const std::vector<double>& row, int count, double& smallest_gap) {
  std::vector<int> order(row.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[size_t(a)] > row[size_t(b)]; });
  order.resize(size_t(count));
  smallest_gap = INFINITY;
  for (int i = 0; i + 1 < count; ++i)
    smallest_gap = std::min(smallest_gap, row[size_t(order[size_t(i)])] - row[size_t(order[size_t(i + 1)])]);
  return order;
}

// True when both backends must make the same routing decisions at this step: the CPU's router
// input is x * u in float64, the GPU's is fp32(x * u) rounded to bf16; the k+1 leading experts of
// every token must agree, with gaps far above fp32 accumulation noise.
bool decisions_are_robust(const MoeLayerConfig& config, const HostData& data, int64_t tokens, uint64_t step) {
  const int64_t d_model = config.d_model, experts = config.moe.num_experts;
  std::vector<double> cpu_input(size_t(tokens * d_model)), gpu_input(cpu_input.size());
  HostTensor ones(DType::f32, {tokens, d_model}), factors(DType::f32, {tokens, d_model});
  std::fill(ones.data<float>(), ones.data<float>() + ones.numel(), 1.0f);
  const float eps = config.moe.jitter_eps;
  cpu::apply_jitter(ones, eps, config.jitter_seed, config.jitter_stream, step, factors);  // factors exactly
  for (size_t index = 0; index < cpu_input.size(); ++index) {
    const double x = get_element(data.x, int64_t(index));
    const float factor = eps > 0.0f ? factors.data<float>()[index] : 1.0f;
    cpu_input[index] = eps > 0.0f ? x * double(factor) : x;
    gpu_input[index] = eps > 0.0f ? bf16_value(float(x) * factor) : x;
  }
  const int leading = std::min<int>(config.moe.top_k + 1, int(experts));
  for (int64_t token = 0; token < tokens; ++token) {
    std::vector<double> cpu_row(size_t(experts), 0.0), gpu_row(size_t(experts), 0.0);
    for (int64_t e = 0; e < experts; ++e)
      for (int64_t d = 0; d < d_model; ++d) {
        const double weight = get_element(data.router, d * experts + e);
        cpu_row[size_t(e)] += cpu_input[size_t(token * d_model + d)] * weight;
        gpu_row[size_t(e)] += gpu_input[size_t(token * d_model + d)] * weight;
      }
    double cpu_gap = 0.0, gpu_gap = 0.0;
    if (leading_experts(cpu_row, leading, cpu_gap) != leading_experts(gpu_row, leading, gpu_gap)) return false;
    if (cpu_gap < 1e-4 || gpu_gap < 1e-4) return false;
  }
  return true;
}

// A device copy of a host f64 tensor in `dtype`.
struct DeviceCopy {
  Buffer memory;
  Tensor tensor;
  DeviceCopy(const Tensor& host, DType dtype, std::initializer_list<int64_t> dims) {
    tensor = Tensor(nullptr, dtype, DeviceKind::cuda, dims);
    memory = Buffer(DeviceKind::cuda, tensor.bytes());
    tensor.data = memory.data();
    if (host.data) {
      HostTensor staged(dtype, {host.numel()});
      copy_values(host, staged);
      device_copy(tensor.data, DeviceKind::cuda, staged.tensor().data, DeviceKind::cpu, tensor.bytes());
    } else {
      poison_now();
    }
  }
  void poison_now() {
    HostTensor staged(tensor.dtype, {tensor.numel()});
    poison(staged);
    device_copy(tensor.data, DeviceKind::cuda, staged.tensor().data, DeviceKind::cpu, tensor.bytes());
  }
  HostTensor download() const {
    HostTensor host(tensor.dtype, {tensor.numel()});
    device_copy(host.tensor().data, DeviceKind::cpu, tensor.data, DeviceKind::cuda, tensor.bytes());
    return host;
  }
};

HostTensor download(const Tensor& device) {
  HostTensor host(device.dtype, {device.numel()});
  device_copy(host.tensor().data, DeviceKind::cpu, device.data, DeviceKind::cuda, device.bytes());
  return host;
}

void expect_ints_equal(const char* name, const Tensor& expected_host, const Tensor& actual_device) {
  HostTensor actual = download(actual_device);
  ASSERT_EQ(actual.numel(), expected_host.numel()) << name;
  int64_t mismatches = 0;
  for (int64_t index = 0; index < expected_host.numel(); ++index)
    mismatches += expected_host.as<int32_t>()[index] != actual.data<int32_t>()[index];
  EXPECT_EQ(mismatches, 0) << name << ": " << mismatches << " of " << expected_host.numel() << " differ";
}

void expect_close(const char* name, const Tensor& actual_host, const Tensor& expected_host, double tolerance) {
  const double error = relative_error(actual_host, expected_host);
  EXPECT_LE(error, tolerance) << name << ": relative error " << error;
}

class MoeLayerCudaTest : public ::testing::TestWithParam<LayerCudaCase> {};

TEST_P(MoeLayerCudaTest, MatchesCpuLayer) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const LayerCudaCase& test = GetParam();
  const MoeLayerConfig config = make_config(test);
  const int64_t tokens = test.tokens, d_model = config.d_model, experts = config.moe.num_experts;
  const uint64_t first_step = 5;
  constexpr int kSteps = 2;

  uint64_t seed = 1000;
  auto robust = [&](const HostData& data) {
    for (int step = 0; step < kSteps; ++step)
      if (!decisions_are_robust(config, data, tokens, first_step + uint64_t(step))) return false;
    return true;
  };
  HostData data(config, tokens, seed);
  while (!robust(data)) {
    ASSERT_LT(seed, 1400u) << "no input draw without near-tie routing decisions";
    data = HostData(config, tokens, ++seed);
  }

  MoeLayer cpu_layer(config, DeviceKind::cpu, DType::f64, tokens);
  MoeLayer gpu_layer(config, DeviceKind::cuda, DType::bf16, tokens);
  const ExecContext cpu_context{DeviceKind::cpu, nullptr};
  const ExecContext gpu_context{DeviceKind::cuda, nullptr};
  const int64_t w1_columns = config.w1_columns(), d_ff = config.moe.expert_d_ff;
  DeviceCopy x(data.x, DType::bf16, {tokens, d_model}), grad_y(data.grad_y, DType::bf16, {tokens, d_model});
  DeviceCopy router(data.router, DType::bf16, {d_model, experts});
  DeviceCopy w1(data.w1, DType::bf16, {experts, d_model, w1_columns}), w2(data.w2, DType::bf16, {experts, d_ff, d_model});
  const Tensor none;
  DeviceCopy y(none, DType::bf16, {tokens, d_model}), grad_x(none, DType::bf16, {tokens, d_model});
  DeviceCopy grad_router(none, DType::f32, {d_model, experts});
  DeviceCopy grad_w1(none, DType::f32, {experts, d_model, w1_columns}), grad_w2(none, DType::f32, {experts, d_ff, d_model});
  const MoeWeights gpu_weights{router.tensor, w1.tensor, w2.tensor};
  MoeGradients gpu_gradients{grad_router.tensor, grad_w1.tensor, grad_w2.tensor};

  HostTensor cpu_y(DType::f64, {tokens, d_model}), cpu_grad_x(DType::f64, {tokens, d_model});
  HostTensor cpu_grad_router(DType::f64, {d_model, experts});
  HostTensor cpu_grad_w1(DType::f64, {experts, d_model, w1_columns}), cpu_grad_w2(DType::f64, {experts, d_ff, d_model});
  const MoeWeights cpu_weights{data.router, data.w1, data.w2};
  MoeGradients cpu_gradients{cpu_grad_router, cpu_grad_w1, cpu_grad_w2};

  // Step 1 accumulates (MoeGradients::accumulate): both layers add to step 0's weight gradients, so
  // the GPU's in-place accumulating GEMMs meet the CPU's sums (its gradients are not poisoned).
  for (int step = 0; step < kSteps; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    cpu_gradients.accumulate = gpu_gradients.accumulate = step > 0;
    MoeForwardArgs args;
    args.training = true;
    args.step = first_step + uint64_t(step);
    args.read_losses = true;
    const MoeLosses cpu_losses = cpu_layer.forward(cpu_context, data.x, cpu_weights, args, cpu_y);
    cpu_layer.backward(cpu_context, data.grad_y, cpu_weights, 0.7f, 1.3f, cpu_grad_x, cpu_gradients);

    for (DeviceCopy* output : {&y, &grad_x}) output->poison_now();
    if (!gpu_gradients.accumulate)
      for (DeviceCopy* output : {&grad_router, &grad_w1, &grad_w2}) output->poison_now();
    const MoeLosses gpu_losses = gpu_layer.forward(gpu_context, x.tensor, gpu_weights, args, y.tensor);
    gpu_layer.backward(gpu_context, grad_y.tensor, gpu_weights, 0.7f, 1.3f, grad_x.tensor, gpu_gradients);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

    const RoutingResult& expected = cpu_layer.routing();
    const RoutingResult& actual = gpu_layer.routing();
    expect_ints_equal("expert_ids", expected.expert_ids, actual.expert_ids);
    expect_ints_equal("slots", expected.slots, actual.slots);
    expect_ints_equal("expert_offsets", expected.expert_offsets, actual.expert_offsets);
    expect_ints_equal("scalars", expected.scalars, actual.scalars);
    ASSERT_TRUE(gpu_losses.read);
    EXPECT_NEAR(gpu_losses.aux_loss, cpu_losses.aux_loss, 1e-2 * std::fabs(cpu_losses.aux_loss) + 1e-6);
    EXPECT_NEAR(gpu_losses.z_loss, cpu_losses.z_loss, 1e-2 * std::fabs(cpu_losses.z_loss) + 1e-6);

    expect_close("y", y.download(), cpu_y, 2e-2);
    expect_close("grad_x", grad_x.download(), cpu_grad_x, 3e-2);
    expect_close("grad_router", grad_router.download(), cpu_grad_router, 3e-2);
    expect_close("grad_w1", grad_w1.download(), cpu_grad_w1, 3e-2);
    expect_close("grad_w2", grad_w2.download(), cpu_grad_w2, 3e-2);
  }
}

const ExpertActivation kGelu = ExpertActivation::gelu_tanh, kSwiglu = ExpertActivation::swiglu;
const ExpertComputeMode kSparse = ExpertComputeMode::sparse, kDense = ExpertComputeMode::dense;

INSTANTIATE_TEST_SUITE_P(
    Cases, MoeLayerCudaTest,
    ::testing::Values(
        // name, activation, k, renormalize, dropless, capacity factor, jitter, alignment, mode, tokens
        LayerCudaCase{"gelu_top1_dropless_sm90", kGelu, 1, false, true, 1.0f, 0.0f, 128, kSparse, 200},
        LayerCudaCase{"gelu_top2_drops_sm90", kGelu, 2, true, false, 0.8f, 0.0f, 128, kSparse, 240},
        LayerCudaCase{"swiglu_top2_jitter_sm90", kSwiglu, 2, true, false, 1.25f, 0.05f, 128, kSparse, 160},
        LayerCudaCase{"gelu_top2_cublas_fallback", kGelu, 2, false, false, 1.0f, 0.0f, 16, kSparse, 200},
        LayerCudaCase{"swiglu_top2_dense_mode", kSwiglu, 2, true, false, 0.9f, 0.0f, 128, kDense, 100}),
    [](const ::testing::TestParamInfo<LayerCudaCase>& info) { return std::string(info.param.name); });

}  // namespace
