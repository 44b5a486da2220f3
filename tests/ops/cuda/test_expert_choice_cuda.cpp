// CUDA expert-choice routing (src/ops/cuda/expert_choice.cu) against the CPU reference
// (src/ops/cpu/expert_choice.cpp) on the same fp32 logits: integer outputs (expert ids, slots,
// k_t, counts, first-choice counts, offsets, scalars) exactly, floats (gates, logsumexp, prob
// sums, losses) to a relative error of 1e-5. The grid: T in {1, 37, 4096, 65536} x E in {4, 64,
// 256} x k in {1, 2, 8} (k <= E) x softmax / sigmoid, with renormalization, capacity factor,
// alignment and the scaling factor varied over the cases; plus logits on a coarse grid (exact
// ties among tokens, so the tie boundary scan runs), C = T, E not a power of two, no tokens,
// repeated calls of different sizes on one stream (scratch growth, determinism), and the row
// moves and the small-batch path on a routing with tokens that have no expert. Fresh random
// inputs per case; device outputs poisoned before every call.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "src/core/device.h"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "src/ops/small_batch_ops.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

constexpr double kFloatTolerance = 1e-5;

void upload(const Tensor& host, Tensor& device) {
  ASSERT_EQ(host.bytes(), device.bytes());
  device_copy(device.data, DeviceKind::cuda, host.data, DeviceKind::cpu, host.bytes());
}

HostTensor download(const Tensor& device) {
  HostTensor host(device.dtype, {device.numel()});
  device_copy(host.tensor().data, DeviceKind::cpu, device.data, DeviceKind::cuda, device.bytes());
  return host;
}

void poison_device(Tensor& device) {
  HostTensor host(device.dtype, {device.numel()});
  poison(host);
  upload(host, device);
}

std::vector<Tensor*> routing_tensors(RoutingResult& result) {
  return {&result.expert_ids, &result.gates, &result.slots, &result.token_k, &result.logsumexp,
          &result.expert_counts, &result.first_choice_counts, &result.prob_sums, &result.expert_offsets,
          &result.scalars, &result.losses};
}

void expect_ints_equal(const char* name, const Tensor& host_reference, const Tensor& device) {
  HostTensor actual = download(device);
  const int32_t* expected = host_reference.as<int32_t>();
  const int32_t* got = actual.data<int32_t>();
  int64_t mismatches = 0, first = -1;
  for (int64_t index = 0; index < host_reference.numel(); ++index)
    if (expected[index] != got[index]) {
      if (first < 0) first = index;
      ++mismatches;
    }
  EXPECT_EQ(mismatches, 0) << name << ": " << mismatches << " of " << host_reference.numel() << " differ; first at "
                           << first << ": expected " << (first >= 0 ? expected[first] : 0) << ", got "
                           << (first >= 0 ? got[first] : 0);
}

void expect_floats_close(const char* name, const Tensor& host_reference, const Tensor& device, double tolerance) {
  HostTensor actual = download(device);
  const double error = relative_error(to_vector(actual), to_vector(host_reference));
  EXPECT_LE(error, tolerance) << name << ": relative error " << error;
}

struct EcCase {
  std::string name;
  int64_t tokens;
  int experts, k;
  bool sigmoid, renormalize;
  float capacity_factor;
  int alignment;
  float scaling;
  bool ties;  // logits on a coarse grid: many exactly equal priorities
};

void PrintTo(const EcCase& test, std::ostream* os) { *os << test.name; }

RoutingParams params_of(const EcCase& test) {
  RoutingParams params;
  params.method = RoutingMethod::expert_choice;
  params.num_tokens = test.tokens;
  params.num_experts = test.experts;
  params.k_max = test.k;
  params.score_function = test.sigmoid ? ScoreFunction::sigmoid : ScoreFunction::softmax;
  params.renormalize = test.renormalize;
  params.capacity_factor = test.capacity_factor;
  params.segment_alignment = test.alignment;
  params.routed_scaling_factor = test.scaling;
  params.aux_loss_weight = 0.05f;
  params.z_loss_weight = 0.01f;
  return params;
}

HostTensor make_logits(const EcCase& test, uint64_t seed) {
  std::mt19937_64 generator(seed);
  HostTensor logits(DType::f32, {test.tokens, test.experts});
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> row_scale(0.05f, 4.0f);
  std::uniform_int_distribution<int> grid(-2, 2);
  float* values = logits.data<float>();
  for (int64_t token = 0; token < test.tokens; ++token) {
    const float scale = row_scale(generator);  // rows of different sharpness
    for (int e = 0; e < test.experts; ++e)
      values[token * test.experts + e] = test.ties ? 0.5f * float(grid(generator)) : scale * normal(generator);
  }
  return logits;
}

// Routes on both backends and compares every output; returns the device result's buffers.
void run_and_compare(const EcCase& test, uint64_t seed, void* stream = nullptr) {
  const RoutingParams params = params_of(test);
  HostTensor logits = make_logits(test, seed);
  const int64_t tokens = test.tokens;
  RoutingBuffers host_buffers(DeviceKind::cpu, DType::f32, tokens, test.experts, test.k, 0);
  RoutingResult expected = host_buffers.result(tokens);
  cpu::route_expert_choice(logits, {}, params, expected);

  DeviceTensor device_logits = to_device(logits);
  RoutingBuffers device_buffers(DeviceKind::cuda, DType::f32, tokens, test.experts, test.k, 0);
  RoutingResult actual = device_buffers.result(tokens);
  for (Tensor* tensor : routing_tensors(actual)) poison_device(*tensor);
  cuda::route_expert_choice(device_logits, {}, params, actual, stream);
  ASSERT_EQ(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), cudaSuccess);

  expect_ints_equal("expert_ids", expected.expert_ids, actual.expert_ids);
  expect_ints_equal("slots", expected.slots, actual.slots);
  expect_ints_equal("token_k", expected.token_k, actual.token_k);
  expect_ints_equal("expert_counts", expected.expert_counts, actual.expert_counts);
  expect_ints_equal("first_choice_counts", expected.first_choice_counts, actual.first_choice_counts);
  expect_ints_equal("expert_offsets", expected.expert_offsets, actual.expert_offsets);
  expect_ints_equal("scalars", expected.scalars, actual.scalars);
  expect_floats_close("gates", expected.gates, actual.gates, kFloatTolerance);
  expect_floats_close("logsumexp", expected.logsumexp, actual.logsumexp, kFloatTolerance);
  expect_floats_close("prob_sums", expected.prob_sums, actual.prob_sums, kFloatTolerance);
  HostTensor losses = download(actual.losses);
  for (int loss = 0; loss < kNumRoutingLosses; ++loss) {
    const double want = expected.losses.as<float>()[loss], got = losses.data<float>()[loss];
    EXPECT_LE(std::fabs(got - want), kFloatTolerance * std::max(std::fabs(want), 1e-30))
        << "loss " << loss << ": expected " << want << ", got " << got;
  }
}

class ExpertChoiceCudaTest : public ::testing::TestWithParam<EcCase> {};

TEST_P(ExpertChoiceCudaTest, MatchesCpuReference) {
  SKIP_WITHOUT_CUDA();
  run_and_compare(GetParam(), 2024 + uint64_t(GetParam().tokens) * 7 + uint64_t(GetParam().experts * 3 + GetParam().k));
}

std::vector<EcCase> grid_cases() {
  std::vector<EcCase> cases;
  const float capacity_factors[] = {1.0f, 1.25f, 0.5f, 2.0f};
  const int alignments[] = {1, 16, 128};
  int index = 0;
  for (int64_t tokens : {int64_t(1), int64_t(37), int64_t(4096), int64_t(65536)})
    for (int experts : {4, 64, 256})
      for (int k : {1, 2, 8}) {
        if (k > experts) continue;
        for (bool sigmoid : {false, true}) {
          EcCase test;
          test.tokens = tokens;
          test.experts = experts;
          test.k = k;
          test.sigmoid = sigmoid;
          test.renormalize = index % 2 == 1;
          test.capacity_factor = capacity_factors[index % 4];
          test.alignment = alignments[index % 3];
          test.scaling = index % 5 == 0 ? 2.5f : 1.0f;
          test.ties = false;
          test.name = "T" + std::to_string(tokens) + "_E" + std::to_string(experts) + "_k" + std::to_string(k) +
                      (sigmoid ? "_sigmoid" : "_softmax");
          cases.push_back(test);
          ++index;
        }
      }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Grid, ExpertChoiceCudaTest, ::testing::ValuesIn(grid_cases()),
                         [](const ::testing::TestParamInfo<EcCase>& info) { return info.param.name; });

INSTANTIATE_TEST_SUITE_P(
    Special, ExpertChoiceCudaTest,
    ::testing::Values(
        // name, T, E, k, sigmoid, renormalize, capacity factor, alignment, scaling, ties
        EcCase{"ties_softmax_E4", 5000, 4, 2, false, false, 1.0f, 8, 1.0f, true},
        EcCase{"ties_sigmoid_E8", 3000, 8, 2, true, true, 1.25f, 16, 1.0f, true},
        EcCase{"ties_sigmoid_E64_k8", 20000, 64, 8, true, false, 0.5f, 128, 1.0f, true},
        EcCase{"ties_softmax_E256_k1", 4097, 256, 1, false, true, 1.0f, 1, 1.0f, true},
        EcCase{"capacity_is_T", 999, 16, 4, false, true, 8.0f, 4, 1.0f, false},
        EcCase{"E7_odd_stride", 3001, 7, 3, false, true, 1.25f, 8, 1.0f, false},
        EcCase{"E100_k4", 6000, 100, 4, true, true, 1.1f, 32, 2.5f, false},
        EcCase{"E1", 100, 1, 1, false, false, 1.0f, 1, 1.0f, false},
        EcCase{"no_tokens", 0, 8, 2, false, false, 1.25f, 16, 1.0f, false},
        EcCase{"T100000_E64_k2", 100000, 64, 2, false, true, 1.25f, 128, 1.0f, false}),
    [](const ::testing::TestParamInfo<EcCase>& info) { return info.param.name; });

// Back-to-back calls of different sizes on one stream (the scratch grows, then serves smaller
// calls without cleaning); equal inputs give bit-identical outputs.
TEST(ExpertChoiceCuda, RepeatedCallsAreCleanAndDeterministic) {
  SKIP_WITHOUT_CUDA();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  const EcCase small{"small", 3000, 8, 2, true, false, 1.0f, 16, 1.0f, false};
  const EcCase big{"big", 65536, 256, 8, false, true, 1.25f, 128, 1.0f, false};
  for (int repeat = 0; repeat < 2; ++repeat) {
    run_and_compare(small, 7 + uint64_t(repeat), stream);
    run_and_compare(big, 99 + uint64_t(repeat), stream);
  }
  const RoutingParams params = params_of(big);
  DeviceTensor logits = to_device(make_logits(big, 5));
  RoutingBuffers first_buffers(DeviceKind::cuda, DType::f32, big.tokens, big.experts, big.k, 0);
  RoutingBuffers second_buffers(DeviceKind::cuda, DType::f32, big.tokens, big.experts, big.k, 0);
  RoutingResult first = first_buffers.result(big.tokens), second = second_buffers.result(big.tokens);
  for (Tensor* tensor : routing_tensors(first)) poison_device(*tensor);
  for (Tensor* tensor : routing_tensors(second)) poison_device(*tensor);
  cuda::route_expert_choice(logits, {}, params, first, stream);
  cuda::route_expert_choice(logits, {}, params, second, stream);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const std::vector<Tensor*> a = routing_tensors(first), b = routing_tensors(second);
  for (size_t index = 0; index < a.size(); ++index) {
    HostTensor x = download(*a[index]), y = download(*b[index]);
    EXPECT_EQ(std::memcmp(x.tensor().data, y.tensor().data, x.tensor().bytes()), 0) << "output " << index;
  }
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

TEST(ExpertChoiceCuda, RejectsASelectionBias) {
  SKIP_WITHOUT_CUDA();
  const EcCase test{"bias", 64, 8, 2, false, false, 1.0f, 1, 1.0f, false};
  DeviceTensor logits = to_device(make_logits(test, 1));
  DeviceTensor bias(DType::f32, {8});
  RoutingBuffers buffers(DeviceKind::cuda, DType::f32, test.tokens, test.experts, test.k, 0);
  RoutingResult result = buffers.result(test.tokens);
  RoutingInputs inputs;
  inputs.selection_bias = &bias.tensor();
  EXPECT_THROW(cuda::route_expert_choice(logits, inputs, params_of(test), result, nullptr), Error);
}

// ---- The layer's row moves and the small-batch path with tokens that have no expert ---------

TEST(ExpertChoiceCuda, RowMovesAndSmallBatchTakeTokensWithoutExperts) {
  SKIP_WITHOUT_CUDA();
  const EcCase test{"pipeline", 48, 8, 2, false, true, 0.5f, 16, 1.0f, false};  // C = 6: 48 picks
  const RoutingParams params = params_of(test);
  const int64_t tokens = test.tokens, width = 64, d_ff = 32, rows = padded_rows_upper_bound(params);
  const int experts = test.experts, k = test.k;
  HostTensor logits = make_logits(test, 31);
  RoutingBuffers host_buffers(DeviceKind::cpu, DType::f32, tokens, experts, k, rows);
  RoutingResult host = host_buffers.result(tokens);
  cpu::route_expert_choice(logits, {}, params, host);
  const std::vector<double> token_k = to_vector(host.token_k);
  ASSERT_GT(std::count(token_k.begin(), token_k.end(), 0.0), 0);

  DeviceTensor device_logits = to_device(logits);
  RoutingBuffers device_buffers(DeviceKind::cuda, DType::f32, tokens, experts, k, rows);
  RoutingResult device = device_buffers.result(tokens);
  cuda::route_expert_choice(device_logits, {}, params, device, nullptr);
  DispatchMap host_map = host_buffers.map(tokens, rows), device_map = device_buffers.map(tokens, rows);

  std::mt19937_64 generator(12);
  HostTensor x(DType::f32, {tokens, width}), outputs(DType::f32, {rows, width}), grad_combined(DType::f32, {tokens, width}),
      grad_permuted(DType::f32, {rows, width});
  fill_uniform(x, generator, -1, 1);
  fill_uniform(outputs, generator, -1, 1);
  fill_uniform(grad_combined, generator, -1, 1);
  fill_uniform(grad_permuted, generator, -1, 1);
  HostTensor permuted(DType::f32, {rows, width}), combined(DType::f32, {tokens, width}), grad_outputs(DType::f32, {rows, width}),
      grad_gates(DType::f32, {tokens, k}), grad_x(DType::f32, {tokens, width});
  cpu::permute(x, host, params, permuted, host_map);
  cpu::unpermute_combine(outputs, host, host_map, combined);
  cpu::unpermute_combine_backward(grad_combined, outputs, host, host_map, grad_outputs, grad_gates);
  cpu::permute_backward(grad_permuted, host_map, tokens, grad_x);

  DeviceTensor x_d = to_device(x), outputs_d = to_device(outputs), grad_combined_d = to_device(grad_combined),
               grad_permuted_d = to_device(grad_permuted);
  DeviceTensor permuted_d(DType::f32, {rows, width}), combined_d(DType::f32, {tokens, width}),
      grad_outputs_d(DType::f32, {rows, width}), grad_gates_d(DType::f32, {tokens, k}), grad_x_d(DType::f32, {tokens, width});
  poison_device(device_map.choice_rows);
  poison_device(device_map.row_tokens);
  cuda::permute(x_d, device, params, permuted_d, device_map, nullptr);
  cuda::unpermute_combine(outputs_d, device, device_map, combined_d, nullptr);
  cuda::unpermute_combine_backward(grad_combined_d, outputs_d, device, device_map, grad_outputs_d, grad_gates_d, nullptr);
  cuda::permute_backward(grad_permuted_d, device_map, tokens, grad_x_d, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_ints_equal("choice_rows", host_map.choice_rows, device_map.choice_rows);
  expect_ints_equal("row_tokens", host_map.row_tokens, device_map.row_tokens);
  EXPECT_EQ(max_abs_difference(permuted_d.values(), to_vector(permuted)), 0.0);
  expect_floats_close("combined", combined, combined_d, kFloatTolerance);
  expect_floats_close("grad_expert_outputs", grad_outputs, grad_outputs_d, kFloatTolerance);
  expect_floats_close("grad_gates", grad_gates, grad_gates_d, kFloatTolerance);
  expect_floats_close("grad_tokens", grad_x, grad_x_d, kFloatTolerance);
  const std::vector<double> combined_values = combined_d.values(), grad_x_values = grad_x_d.values();
  for (int64_t t = 0; t < tokens; ++t)
    if (token_k[size_t(t)] == 0)
      for (int64_t c = 0; c < width; ++c) {
        ASSERT_EQ(combined_values[size_t(t * width + c)], 0.0) << "token " << t;
        ASSERT_EQ(grad_x_values[size_t(t * width + c)], 0.0) << "token " << t;
      }

  // Small-batch path (bf16) against the CPU reference on the same bf16-representable values.
  HostTensor x16(DType::bf16, {tokens, width}), w1_16(DType::bf16, {experts, width, d_ff}),
      w2_16(DType::bf16, {experts, d_ff, width});
  fill_normal(x16, generator, 0.0, 1.0);
  fill_normal(w1_16, generator, 0.0, 0.2);
  fill_normal(w2_16, generator, 0.0, 0.2);
  HostTensor x32(DType::f32, {tokens, width}), w1_32(DType::f32, {experts, width, d_ff}),
      w2_32(DType::f32, {experts, d_ff, width}), want(DType::f32, {tokens, width});
  copy_values(x16, x32);
  copy_values(w1_16, w1_32);
  copy_values(w2_16, w2_32);
  cpu::small_batch_experts(ExpertActivation::gelu_tanh, x32, host, w1_32, w2_32, want);
  ASSERT_TRUE(small_batch_supported(DType::bf16, tokens, k, experts, width, d_ff));
  const SmallBatchGeometry geometry =
      small_batch_geometry(tokens, k, experts, width, d_ff, ExpertActivation::gelu_tanh, 2);
  DeviceTensor workspace(DType::u8, {int64_t(geometry.workspace_bytes)});
  DeviceTensor x_dev = to_device(x16), w1_dev = to_device(w1_16), w2_dev = to_device(w2_16), y(DType::bf16, {tokens, width});
  cuda::small_batch_experts(ExpertActivation::gelu_tanh, x_dev, device, w1_dev, w2_dev, workspace, y, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<double> got = y.values();
  EXPECT_LE(relative_error(got, to_vector(want)), 1e-2);
  for (int64_t t = 0; t < tokens; ++t)
    if (token_k[size_t(t)] == 0)
      for (int64_t c = 0; c < width; ++c) ASSERT_EQ(got[size_t(t * width + c)], 0.0) << "token " << t;
}

}  // namespace
