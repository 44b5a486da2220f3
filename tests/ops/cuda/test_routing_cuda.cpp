// CUDA routing (src/ops/cuda/routing.cu) against the CPU reference (src/ops/cpu/routing.cpp) on the
// same fp32 logits: integer outputs (expert ids, slots, k_t, counts, offsets, scalars) must match
// exactly, floats (gates, lse, prob sums, losses, grad_logits) to a relative error of 1e-5.
// Cases cover every lane layout of the kernel (E <= 8, 16, 32, 64, 128, 256, 512), all four tile heights
// (32, 64, 128, 256 tokens: T < 8192, < 16384, < 32768, larger), rows that are not 16-byte
// multiples (E % 4 != 0), slices that run past the row (E = 100, 200, 300, 384), capacity drops,
// renormalization, both complexity modes, exact ties, K = 1, no tokens, a single tile, and more
// tiles than the cooperative grid holds (each block walks several tiles and completes the slots of
// all but its last in global memory: 274 tiles of 2048 columns, 782 of 128, 1172 of 16), and
// repeated calls of different grid sizes on one stream (the barrier counter must be left at zero
// and the results deterministic). route_backward is
// checked with fp32 output against the CPU and with bf16 / fp16 output against the fp32 result
// rounded. Device outputs are poisoned before every call. The modern options (sigmoid, bias, groups,
// probability drops, the sequence and global losses) are tested in test_routing_modern_cuda.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "src/core/device.h"
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

// Fills a device tensor with values no correct op writes (NaN / 0x5EED5EEF).
void poison_device(Tensor& device) {
  HostTensor host(device.dtype, {device.numel()});
  poison(host);
  upload(host, device);
}

void poison_routing(RoutingResult& result) {
  for (Tensor* tensor : {&result.expert_ids, &result.gates, &result.slots, &result.token_k, &result.logsumexp,
                         &result.expert_counts, &result.first_choice_counts, &result.prob_sums,
                         &result.expert_offsets, &result.scalars, &result.losses})
    poison_device(*tensor);
}

void copy_routing_to_device(const RoutingResult& host, RoutingResult& device) {
  const Tensor* sources[] = {&host.expert_ids, &host.gates, &host.slots, &host.token_k, &host.logsumexp,
                             &host.expert_counts, &host.first_choice_counts, &host.prob_sums,
                             &host.expert_offsets, &host.scalars, &host.losses};
  Tensor* destinations[] = {&device.expert_ids, &device.gates, &device.slots, &device.token_k, &device.logsumexp,
                            &device.expert_counts, &device.first_choice_counts, &device.prob_sums,
                            &device.expert_offsets, &device.scalars, &device.losses};
  for (size_t index = 0; index < std::size(sources); ++index) upload(*sources[index], *destinations[index]);
}

void expect_ints_equal(const char* name, const Tensor& host_reference, const Tensor& device) {
  HostTensor actual = download(device);
  const int32_t* expected = host_reference.as<int32_t>();
  const int32_t* got = actual.data<int32_t>();
  int64_t mismatches = 0, first = -1;
  for (int64_t index = 0; index < host_reference.numel(); ++index) {
    if (expected[index] != got[index]) {
      if (first < 0) first = index;
      ++mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0) << name << ": " << mismatches << " of " << host_reference.numel()
                           << " differ; first at " << first << ": expected "
                           << (first >= 0 ? expected[first] : 0) << ", got " << (first >= 0 ? got[first] : 0);
}

void expect_floats_close(const char* name, const Tensor& host_reference, const Tensor& device, double tolerance) {
  HostTensor actual = download(device);
  const double error = relative_error(to_vector(actual), to_vector(host_reference));
  EXPECT_LE(error, tolerance) << name << ": relative error " << error;
}

struct RouteCase {
  std::string name;
  int64_t tokens;
  int experts, k_max, k_min;
  ComplexityMode complexity;
  bool renormalize, dropless;
  float capacity_factor;
  int alignment;
  bool ties;  // logits on a coarse grid, so equal logits are common
};

RoutingParams params_of(const RouteCase& test) {
  RoutingParams params;
  params.num_tokens = test.tokens;
  params.num_experts = test.experts;
  params.k_max = test.k_max;
  params.k_min = test.k_min;
  params.complexity = test.complexity;
  params.renormalize = test.renormalize;
  params.dropless = test.dropless;
  params.capacity_factor = test.capacity_factor;
  params.segment_alignment = test.alignment;
  params.aux_loss_weight = 0.05f;
  params.z_loss_weight = 0.01f;
  return params;
}

// Distance of k_min + c (k_max - k_min) + 1/2 from the nearest integer: where fp32 and fp64
// evaluations could round k_t differently. Inputs within a margin of it are redrawn.
bool near_rounding_boundary(double complexity, const RoutingParams& params) {
  const double clamped = std::min(1.0, std::max(0.0, complexity));
  const double scaled = clamped * double(params.k_max - params.k_min) + 0.5;
  return params.k_max > params.k_min && std::fabs(scaled - std::round(scaled)) < 1e-3;
}

double normalized_entropy(const float* row, int experts) {
  double max_logit = row[0], sum = 0.0, entropy = 0.0;
  for (int e = 1; e < experts; ++e) max_logit = std::max(max_logit, double(row[e]));
  for (int e = 0; e < experts; ++e) sum += std::exp(double(row[e]) - max_logit);
  for (int e = 0; e < experts; ++e) {
    const double p = std::exp(double(row[e]) - max_logit) / sum;
    if (p > 0.0) entropy -= p * std::log(p);
  }
  return experts > 1 ? entropy / std::log(double(experts)) : 0.0;
}

struct RouteInputs {
  HostTensor logits, complexity;
};

RouteInputs make_inputs(const RouteCase& test, const RoutingParams& params, uint64_t seed) {
  std::mt19937_64 generator(seed);
  RouteInputs inputs{HostTensor(DType::f32, {test.tokens, test.experts}), HostTensor(DType::f32, {test.tokens})};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> scale_of_row(0.05f, 4.0f), complexity(-0.2f, 1.2f);
  std::uniform_int_distribution<int> grid(0, 2);
  float* logits = inputs.logits.data<float>();
  for (int64_t token = 0; token < test.tokens; ++token) {
    float* row = logits + token * test.experts;
    while (true) {
      // Rows of different sharpness, so the entropy (and k_t) varies over its range.
      const float scale = scale_of_row(generator);
      for (int e = 0; e < test.experts; ++e)
        row[e] = test.ties ? 0.5f * float(grid(generator)) : scale * normal(generator);
      if (test.complexity != ComplexityMode::entropy || !near_rounding_boundary(normalized_entropy(row, test.experts), params))
        break;
    }
    float value;
    do {
      value = complexity(generator);
    } while (test.complexity == ComplexityMode::given && near_rounding_boundary(value, params));
    inputs.complexity.data<float>()[token] = value;
  }
  return inputs;
}

// Runs both backends on the same inputs and compares every output.
void run_and_compare(const RouteCase& test, uint64_t seed, void* stream = nullptr) {
  const RoutingParams params = params_of(test);
  RouteInputs inputs = make_inputs(test, params, seed);
  const int64_t tokens = test.tokens;

  RoutingBuffers host_buffers(DeviceKind::cpu, DType::f32, tokens, test.experts, test.k_max, 0);
  RoutingResult expected = host_buffers.result(tokens);
  cpu::route(inputs.logits, test.complexity == ComplexityMode::given ? &inputs.complexity.tensor() : nullptr, params,
             expected);

  Buffer logits_memory(DeviceKind::cuda, inputs.logits.tensor().bytes());
  Buffer complexity_memory(DeviceKind::cuda, inputs.complexity.tensor().bytes());
  Tensor logits = logits_memory.view(DType::f32, {tokens, test.experts});
  Tensor complexity = complexity_memory.view(DType::f32, {tokens});
  upload(inputs.logits, logits);
  upload(inputs.complexity, complexity);
  RoutingBuffers device_buffers(DeviceKind::cuda, DType::f32, tokens, test.experts, test.k_max, 0);
  RoutingResult actual = device_buffers.result(tokens);
  poison_routing(actual);
  cuda::route(logits, test.complexity == ComplexityMode::given ? &complexity : nullptr, params, actual, stream);
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

class RouteCudaTest : public ::testing::TestWithParam<RouteCase> {};

TEST_P(RouteCudaTest, MatchesCpuReference) {
  SKIP_WITHOUT_CUDA();
  run_and_compare(GetParam(), 1234 + uint64_t(GetParam().tokens));
}

const ComplexityMode kNone = ComplexityMode::none, kGiven = ComplexityMode::given, kEntropy = ComplexityMode::entropy;

INSTANTIATE_TEST_SUITE_P(
    Cases, RouteCudaTest,
    ::testing::Values(
        // name, T, E, K, k_min, complexity, renormalize, dropless, capacity factor, alignment, ties
        RouteCase{"E8_top2_drops", 1000, 8, 2, 1, kNone, true, false, 1.0f, 16, false},
        RouteCase{"E64_top2_dropless", 4099, 64, 2, 1, kNone, false, true, 1.25f, 128, false},
        RouteCase{"E6_top3_unaligned_rows", 777, 6, 3, 1, kNone, false, false, 1.25f, 8, false},
        RouteCase{"E100_top4_drops", 2500, 100, 4, 1, kNone, true, false, 0.8f, 16, false},
        RouteCase{"E256_top8", 1500, 256, 8, 1, kNone, true, false, 1.5f, 32, false},
        RouteCase{"E200_top1", 3000, 200, 1, 1, kNone, false, false, 1.25f, 64, false},
        RouteCase{"E16_given_complexity", 2000, 16, 4, 1, kGiven, true, false, 1.25f, 16, false},
        RouteCase{"E32_entropy_complexity", 3000, 32, 8, 2, kEntropy, true, false, 1.1f, 8, false},
        RouteCase{"E4_ties", 1200, 4, 2, 1, kNone, false, false, 1.0f, 4, true},
        RouteCase{"E128_top2_ties", 1100, 128, 2, 1, kNone, true, false, 1.0f, 16, true},
        RouteCase{"E1_top1", 100, 1, 1, 1, kNone, false, false, 1.0f, 1, false},
        RouteCase{"E8_no_tokens", 0, 8, 2, 1, kNone, false, false, 1.25f, 16, false},
        RouteCase{"E32_top1_64_token_tiles", 8192, 32, 1, 1, kNone, false, false, 1.25f, 128, false},
        RouteCase{"E48_top3_128_token_tiles", 20000, 48, 3, 1, kNone, false, false, 1.25f, 32, false},
        RouteCase{"E64_top2_128_tiles_of_512", 65536, 64, 2, 1, kNone, false, false, 1.25f, 128, false},
        RouteCase{"E256_top8_large_shared_memory", 40000, 256, 8, 1, kNone, true, false, 1.0f, 128, false},
        RouteCase{"E256_top8_274_tiles_persistent", 70000, 256, 8, 1, kNone, true, false, 1.0f, 128, false},
        RouteCase{"E128_top4_196_tiles", 100000, 128, 4, 1, kNone, true, false, 1.1f, 128, false},
        RouteCase{"E64_top2_391_tiles_persistent", 200000, 64, 2, 1, kNone, true, false, 1.25f, 128, false},
        RouteCase{"E8_top2_586_tiles_persistent", 300000, 8, 2, 1, kNone, true, false, 1.0f, 128, false},
        RouteCase{"E512_top8", 3000, 512, 8, 1, kNone, true, false, 1.25f, 32, false},
        RouteCase{"E300_top2_slices_past_the_row", 2500, 300, 2, 1, kNone, false, false, 1.0f, 16, false},
        RouteCase{"E512_top8_entropy_274_tiles_persistent", 70000, 512, 8, 2, kEntropy, true, false, 1.0f, 128,
                  false},
        RouteCase{"E384_top4_ties", 2000, 384, 4, 1, kNone, true, false, 1.0f, 16, true}),
    [](const ::testing::TestParamInfo<RouteCase>& info) { return info.param.name; });

// Back-to-back calls of different shapes on one stream: each call must find the workspace clean
// (flags, ticket and done counter reset by the previous call's last block), and equal inputs must
// give bit-identical outputs (the float reductions have a fixed order).
TEST(RouteCuda, RepeatedCallsAreCleanAndDeterministic) {
  SKIP_WITHOUT_CUDA();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  const RouteCase big{"big", 70000, 64, 2, 1, kNone, true, false, 1.25f, 128, false};
  const RouteCase small{"small", 3000, 8, 4, 1, kNone, false, false, 1.0f, 16, false};
  for (int repeat = 0; repeat < 2; ++repeat) {
    run_and_compare(big, 99, stream);
    run_and_compare(small, 7, stream);
  }

  const RoutingParams params = params_of(big);
  RouteInputs inputs = make_inputs(big, params, 5);
  Buffer logits_memory(DeviceKind::cuda, inputs.logits.tensor().bytes());
  Tensor logits = logits_memory.view(DType::f32, {big.tokens, big.experts});
  upload(inputs.logits, logits);
  RoutingBuffers first_buffers(DeviceKind::cuda, DType::f32, big.tokens, big.experts, big.k_max, 0);
  RoutingBuffers second_buffers(DeviceKind::cuda, DType::f32, big.tokens, big.experts, big.k_max, 0);
  RoutingResult first = first_buffers.result(big.tokens), second = second_buffers.result(big.tokens);
  poison_routing(first);
  poison_routing(second);
  cuda::route(logits, nullptr, params, first, stream);
  cuda::route(logits, nullptr, params, second, stream);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const Tensor* first_tensors[] = {&first.gates, &first.logsumexp, &first.prob_sums, &first.losses, &first.slots};
  const Tensor* second_tensors[] = {&second.gates, &second.logsumexp, &second.prob_sums, &second.losses,
                                    &second.slots};
  for (size_t index = 0; index < std::size(first_tensors); ++index) {
    HostTensor a = download(*first_tensors[index]), b = download(*second_tensors[index]);
    EXPECT_EQ(std::memcmp(a.tensor().data, b.tensor().data, a.tensor().bytes()), 0) << "output " << index;
  }
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

// ---- route_backward -------------------------------------------------------------------------

class RouteBackwardCudaTest : public ::testing::TestWithParam<RouteCase> {};

// The CPU routing result goes to the device, so the backward kernels are compared on identical
// routing. Gate gradients are random for every choice; both sides must ignore dropped and empty
// ones.
TEST_P(RouteBackwardCudaTest, MatchesCpuReference) {
  SKIP_WITHOUT_CUDA();
  const RouteCase& test = GetParam();
  const RoutingParams params = params_of(test);
  RouteInputs inputs = make_inputs(test, params, 4321 + uint64_t(test.tokens));
  const int64_t tokens = test.tokens;
  RoutingBuffers host_buffers(DeviceKind::cpu, DType::f32, tokens, test.experts, test.k_max, 0);
  RoutingResult routing = host_buffers.result(tokens);
  cpu::route(inputs.logits, test.complexity == ComplexityMode::given ? &inputs.complexity.tensor() : nullptr, params,
             routing);
  ASSERT_GT(routing.scalars.as<int32_t>()[kDroppedChoices] + int(test.dropless), 0)
      << "the case should drop choices, so that the kept-only rule is exercised";

  std::mt19937_64 generator(77);
  HostTensor grad_gates(DType::f32, {tokens, test.k_max});
  fill_normal(grad_gates, generator, 0.0, 1.0);
  HostTensor expected(DType::f32, {tokens, test.experts});
  const float aux_scale = 0.7f, z_scale = 1.3f;
  cpu::route_backward(inputs.logits, grad_gates, routing, params, aux_scale, z_scale, expected);

  RoutingBuffers device_buffers(DeviceKind::cuda, DType::f32, tokens, test.experts, test.k_max, 0);
  RoutingResult device_routing = device_buffers.result(tokens);
  copy_routing_to_device(routing, device_routing);
  Buffer logits_memory(DeviceKind::cuda, inputs.logits.tensor().bytes());
  Buffer grad_gates_memory(DeviceKind::cuda, grad_gates.tensor().bytes());
  Buffer grad_logits_memory(DeviceKind::cuda, expected.tensor().bytes());
  Tensor logits = logits_memory.view(DType::f32, {tokens, test.experts});
  Tensor device_grad_gates = grad_gates_memory.view(DType::f32, {tokens, test.k_max});
  Tensor grad_logits = grad_logits_memory.view(DType::f32, {tokens, test.experts});
  upload(inputs.logits, logits);
  upload(grad_gates, device_grad_gates);
  poison_device(grad_logits);
  cuda::route_backward(logits, device_grad_gates, device_routing, params, aux_scale, z_scale, grad_logits, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_floats_close("grad_logits", expected, grad_logits, kFloatTolerance);
}

// grad_logits in bf16 / fp16 (what the MoE layer asks for) must be the fp32 result rounded to
// nearest, bit for bit.
TEST(RouteBackwardCuda, ActivationDtypeOutputIsTheRoundedFp32Output) {
  SKIP_WITHOUT_CUDA();
  const RouteCase test{"lowp", 1500, 64, 2, 1, kNone, true, false, 1.0f, 16, false};
  const RoutingParams params = params_of(test);
  RouteInputs inputs = make_inputs(test, params, 17);
  const int64_t tokens = test.tokens;
  Buffer logits_memory(DeviceKind::cuda, inputs.logits.tensor().bytes());
  Tensor logits = logits_memory.view(DType::f32, {tokens, test.experts});
  upload(inputs.logits, logits);
  RoutingBuffers buffers(DeviceKind::cuda, DType::f32, tokens, test.experts, test.k_max, 0);
  RoutingResult routing = buffers.result(tokens);
  cuda::route(logits, nullptr, params, routing, nullptr);
  std::mt19937_64 generator(5);
  HostTensor grad_gates(DType::f32, {tokens, test.k_max});
  fill_normal(grad_gates, generator, 0.0, 1.0);
  Buffer grad_gates_memory(DeviceKind::cuda, grad_gates.tensor().bytes());
  Tensor device_grad_gates = grad_gates_memory.view(DType::f32, {tokens, test.k_max});
  upload(grad_gates, device_grad_gates);

  Buffer full_memory(DeviceKind::cuda, size_t(tokens * test.experts) * 4);
  Tensor full = full_memory.view(DType::f32, {tokens, test.experts});
  poison_device(full);
  cuda::route_backward(logits, device_grad_gates, routing, params, 0.5f, 2.0f, full, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  HostTensor expected_full = download(full);
  for (DType dtype : {DType::bf16, DType::f16}) {
    Buffer low_memory(DeviceKind::cuda, size_t(tokens * test.experts) * 2);
    Tensor low = low_memory.view(dtype, {tokens, test.experts});
    poison_device(low);
    cuda::route_backward(logits, device_grad_gates, routing, params, 0.5f, 2.0f, low, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    HostTensor actual = download(low);
    int64_t mismatches = 0;
    for (int64_t index = 0; index < actual.numel(); ++index) {
      const float value = expected_full.data<float>()[index];
      const uint16_t want = dtype == DType::bf16 ? Bf16(value).bits : Half(value).bits;
      mismatches += actual.data<uint16_t>()[index] != want;
    }
    EXPECT_EQ(mismatches, 0) << dtype_name(dtype) << ": " << mismatches << " of " << actual.numel() << " differ";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, RouteBackwardCudaTest,
    ::testing::Values(RouteCase{"E64_top2_plain", 3000, 64, 2, 1, kNone, false, false, 1.0f, 16, false},
                      RouteCase{"E64_top2_renormalized", 3000, 64, 2, 1, kNone, true, false, 1.0f, 16, false},
                      RouteCase{"E6_top3_unaligned_rows", 999, 6, 3, 1, kNone, true, false, 0.9f, 8, false},
                      RouteCase{"E256_top8", 700, 256, 8, 1, kNone, true, false, 0.9f, 8, false},
                      RouteCase{"E32_entropy", 2000, 32, 4, 1, kEntropy, true, false, 0.9f, 8, false},
                      RouteCase{"E16_dropless", 1000, 16, 2, 1, kNone, true, true, 1.0f, 8, false},
                      RouteCase{"E512_top8", 900, 512, 8, 1, kNone, true, false, 0.9f, 8, false},
                      RouteCase{"E300_top3_plain", 1100, 300, 3, 1, kNone, false, false, 0.9f, 8, false}),
    [](const ::testing::TestParamInfo<RouteCase>& info) { return info.param.name; });

// Not a pass/fail check: microseconds per cuda::route call, back to back on the default stream
// (the logits stay in L2 between calls, as they do after the router GEMM), for docs/PERFORMANCE.md.
double time_route(const RouteCase& test) {
  const RoutingParams params = params_of(test);
  RouteInputs inputs = make_inputs(test, params, 3);
  Buffer logits_memory(DeviceKind::cuda, inputs.logits.tensor().bytes());
  Tensor logits = logits_memory.view(DType::f32, {test.tokens, test.experts});
  upload(inputs.logits, logits);
  RoutingBuffers buffers(DeviceKind::cuda, DType::f32, test.tokens, test.experts, test.k_max, 0);
  RoutingResult result = buffers.result(test.tokens);
  for (int warmup = 0; warmup < 5; ++warmup) cuda::route(logits, nullptr, params, result, nullptr);
  cudaEvent_t start, stop;
  EXPECT_EQ(cudaEventCreate(&start), cudaSuccess);
  EXPECT_EQ(cudaEventCreate(&stop), cudaSuccess);
  constexpr int kIterations = 50;
  EXPECT_EQ(cudaEventRecord(start, nullptr), cudaSuccess);
  for (int iteration = 0; iteration < kIterations; ++iteration) cuda::route(logits, nullptr, params, result, nullptr);
  EXPECT_EQ(cudaEventRecord(stop, nullptr), cudaSuccess);
  EXPECT_EQ(cudaEventSynchronize(stop), cudaSuccess);
  float milliseconds = 0.0f;
  EXPECT_EQ(cudaEventElapsedTime(&milliseconds, start, stop), cudaSuccess);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  const double microseconds = 1000.0 * milliseconds / kIterations;
  std::printf("[ timing ] cuda::route %lld x %d top-%d: %.1f us per call (back to back)\n",
              static_cast<long long>(test.tokens), test.experts, test.k_max, microseconds);
  return microseconds;
}

// The brief's reference shape (target <= 30 us on H100; one read of the 16 MiB of logits is 5.6 us).
TEST(RouteCuda, TimingAt65536x64Top2) {
  SKIP_WITHOUT_CUDA();
  const double microseconds = time_route({"timing", 65536, 64, 2, 1, kNone, true, false, 1.25f, 128, false});
  RecordProperty("route_us", std::to_string(microseconds));
}

// A small layer's shape (8192 tokens, 32 experts, top-1): latency, not bandwidth, bound.
TEST(RouteCuda, TimingAt8192x32Top1) {
  SKIP_WITHOUT_CUDA();
  const double microseconds = time_route({"timing", 8192, 32, 1, 1, kNone, false, false, 1.25f, 128, false});
  RecordProperty("route_us", std::to_string(microseconds));
}

}  // namespace
