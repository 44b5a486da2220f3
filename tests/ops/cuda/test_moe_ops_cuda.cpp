// The CUDA MoE ops other than routing (src/ops/cuda/{permute,grouped_gemm,gemm,activation,jitter}.cu)
// against the CPU reference on identical inputs: bf16/fp16 data are rounded on the host first and
// the reference gets the same values as fp32. Row moves (permute, its map) must match exactly;
// float results to a relative error of 1e-2 for bf16/fp16 outputs and 1e-5 for fp32 outputs.
// The routing fed to the row ops is the CPU reference's, copied to the device, so these tests do
// not depend on the CUDA router. Widths cover the 16-byte pack paths and the element fallbacks.
// Every output is poisoned (NaN / garbage) on the device before the call under test.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "src/ops/gemm.h"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "src/core/device.h"
#include "src/core/rng.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

double tolerance_for(DType output) { return output == DType::f32 ? 1e-5 : 1e-2; }

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

// Random host data of `dtype` (rounded to it) and its values as an fp32 tensor of the same shape.
struct HostPair {
  HostTensor data, reference;
};

HostPair random_pair(DType dtype, std::initializer_list<int64_t> dims, std::mt19937_64& generator, double low = -1.0,
                     double high = 1.0) {
  HostPair pair{HostTensor(dtype, dims), HostTensor(DType::f32, dims)};
  fill_uniform(pair.data, generator, low, high);
  copy_values(pair.data, pair.reference);
  return pair;
}

void expect_close(const char* name, const Tensor& device, const Tensor& host_reference, double tolerance) {
  HostTensor actual = download(device);
  const double error = relative_error(to_vector(actual), to_vector(host_reference));
  EXPECT_LE(error, tolerance) << name << ": relative error " << error;
}

void expect_equal(const char* name, const Tensor& device, const Tensor& host_reference) {
  HostTensor actual = download(device);
  EXPECT_EQ(max_abs_difference(to_vector(actual), to_vector(host_reference)), 0.0) << name;
}

const char* short_name(DType dtype) { return dtype_name(dtype); }

// ---- Row moves: permute, permute_backward, unpermute_combine and its backward ----------------

struct RowCase {
  DType dtype;
  int64_t width;
  int experts, k_max;
  bool dropless;
};

std::string row_case_name(const ::testing::TestParamInfo<RowCase>& info) {
  const RowCase& test = info.param;
  return std::string(short_name(test.dtype)) + "_D" + std::to_string(test.width) + "_E" +
         std::to_string(test.experts) + "_top" + std::to_string(test.k_max) + (test.dropless ? "_dropless" : "_drops");
}

// CPU routing of random logits, with a copy of it on the device.
struct RoutedBatch {
  RoutingParams params;
  int64_t rows = 0;
  RoutingBuffers host_buffers, device_buffers;
  RoutingResult host, device;
};

void make_routed_batch(const RowCase& test, uint64_t seed, RoutedBatch& batch) {
  batch.params.num_tokens = 900;
  batch.params.num_experts = test.experts;
  batch.params.k_max = test.k_max;
  batch.params.renormalize = true;
  batch.params.dropless = test.dropless;
  batch.params.capacity_factor = 1.0f;
  batch.params.segment_alignment = 16;
  const int64_t tokens = batch.params.num_tokens;
  batch.rows = padded_rows_upper_bound(batch.params);
  std::mt19937_64 generator(seed);
  HostTensor logits(DType::f32, {tokens, test.experts});
  fill_normal(logits, generator, 0.0, 1.0);
  batch.host_buffers = RoutingBuffers(DeviceKind::cpu, DType::f32, tokens, test.experts, test.k_max, batch.rows);
  batch.host = batch.host_buffers.result(tokens);
  cpu::route(logits, nullptr, batch.params, batch.host);
  batch.device_buffers = RoutingBuffers(DeviceKind::cuda, DType::f32, tokens, test.experts, test.k_max, batch.rows);
  batch.device = batch.device_buffers.result(tokens);
  const Tensor* sources[] = {&batch.host.expert_ids, &batch.host.gates, &batch.host.slots, &batch.host.token_k,
                             &batch.host.logsumexp, &batch.host.expert_counts, &batch.host.first_choice_counts,
                             &batch.host.prob_sums, &batch.host.expert_offsets, &batch.host.scalars,
                             &batch.host.losses};
  Tensor* destinations[] = {&batch.device.expert_ids, &batch.device.gates, &batch.device.slots,
                            &batch.device.token_k, &batch.device.logsumexp, &batch.device.expert_counts,
                            &batch.device.first_choice_counts, &batch.device.prob_sums,
                            &batch.device.expert_offsets, &batch.device.scalars, &batch.device.losses};
  for (size_t index = 0; index < std::size(sources); ++index) upload(*sources[index], *destinations[index]);
}

class RowOpsCudaTest : public ::testing::TestWithParam<RowCase> {};

TEST_P(RowOpsCudaTest, PermuteMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const RowCase& test = GetParam();
  RoutedBatch batch;
  make_routed_batch(test, 11, batch);
  const int64_t tokens = batch.params.num_tokens, rows = batch.rows;
  std::mt19937_64 generator(12);
  HostPair input = random_pair(test.dtype, {tokens, test.width}, generator);

  HostTensor expected(DType::f32, {rows, test.width});
  DispatchMap host_map = batch.host_buffers.map(tokens, rows);
  cpu::permute(input.reference, batch.host, batch.params, expected, host_map);
  if (!test.dropless)
    ASSERT_GT(batch.host.scalars.as<int32_t>()[kDroppedChoices], 0) << "the case should drop choices";

  DeviceTensor tokens_device = to_device(input.data);
  DeviceTensor permuted(test.dtype, {rows, test.width});
  DispatchMap map = batch.device_buffers.map(tokens, rows);
  poison_device(permuted.tensor());
  poison_device(map.choice_rows);
  poison_device(map.row_tokens);
  cuda::permute(tokens_device.tensor(), batch.device, batch.params, permuted.tensor(), map, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_equal("permuted", permuted.tensor(), expected);
  expect_equal("choice_rows", map.choice_rows, host_map.choice_rows);
  expect_equal("row_tokens", map.row_tokens, host_map.row_tokens);
}

TEST_P(RowOpsCudaTest, GathersMatchCpu) {
  SKIP_WITHOUT_CUDA();
  const RowCase& test = GetParam();
  RoutedBatch batch;
  make_routed_batch(test, 21, batch);
  const int64_t tokens = batch.params.num_tokens, rows = batch.rows;
  // The map comes from the CPU permute (its own test checks the CUDA one equals it).
  DispatchMap host_map = batch.host_buffers.map(tokens, rows);
  {
    HostTensor scratch_tokens(DType::f32, {tokens, test.width}), scratch_rows(DType::f32, {rows, test.width});
    std::mt19937_64 generator(1);
    fill_uniform(scratch_tokens, generator, -1.0, 1.0);
    cpu::permute(scratch_tokens, batch.host, batch.params, scratch_rows, host_map);
  }
  DispatchMap map = batch.device_buffers.map(tokens, rows);
  upload(host_map.choice_rows, map.choice_rows);
  upload(host_map.row_tokens, map.row_tokens);

  // Padding rows hold random data too: every op must ignore (or zero) them.
  std::mt19937_64 generator(22);
  HostPair expert_outputs = random_pair(test.dtype, {rows, test.width}, generator);
  HostPair grad_combined = random_pair(test.dtype, {tokens, test.width}, generator);
  HostPair grad_permuted = random_pair(test.dtype, {rows, test.width}, generator);
  DeviceTensor outputs_device = to_device(expert_outputs.data);
  DeviceTensor grad_combined_device = to_device(grad_combined.data);
  DeviceTensor grad_permuted_device = to_device(grad_permuted.data);
  const double tolerance = tolerance_for(test.dtype);

  {  // unpermute_combine
    HostTensor expected(DType::f32, {tokens, test.width});
    cpu::unpermute_combine(expert_outputs.reference, batch.host, host_map, expected);
    DeviceTensor combined(test.dtype, {tokens, test.width});
    poison_device(combined.tensor());
    cuda::unpermute_combine(outputs_device.tensor(), batch.device, map, combined.tensor(), nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_close("combined", combined.tensor(), expected, tolerance);
  }
  {  // unpermute_combine_backward
    HostTensor expected_grad_outputs(DType::f32, {rows, test.width}), expected_grad_gates(DType::f32, {tokens, test.k_max});
    cpu::unpermute_combine_backward(grad_combined.reference, expert_outputs.reference, batch.host, host_map,
                                    expected_grad_outputs, expected_grad_gates);
    DeviceTensor grad_outputs(test.dtype, {rows, test.width});
    DeviceTensor grad_gates(DType::f32, {tokens, test.k_max});
    poison_device(grad_outputs.tensor());
    poison_device(grad_gates.tensor());
    cuda::unpermute_combine_backward(grad_combined_device.tensor(), outputs_device.tensor(), batch.device, map,
                                     grad_outputs.tensor(), grad_gates.tensor(), nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_close("grad_expert_outputs", grad_outputs.tensor(), expected_grad_outputs, tolerance);
    // The dot products see identical inputs and accumulate in fp32: fp32 tolerance either way.
    expect_close("grad_gates", grad_gates.tensor(), expected_grad_gates, 1e-5);
  }
  {  // permute_backward
    HostTensor expected(DType::f32, {tokens, test.width});
    cpu::permute_backward(grad_permuted.reference, host_map, tokens, expected);
    DeviceTensor grad_tokens(test.dtype, {tokens, test.width});
    poison_device(grad_tokens.tensor());
    cuda::permute_backward(grad_permuted_device.tensor(), map, tokens, grad_tokens.tensor(), nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_close("grad_tokens", grad_tokens.tensor(), expected, tolerance);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, RowOpsCudaTest,
                         ::testing::Values(RowCase{DType::bf16, 256, 16, 2, false},  // 16-byte packs
                                           RowCase{DType::bf16, 100, 8, 4, false},   // 4-byte units / elements
                                           RowCase{DType::bf16, 33, 16, 1, false},   // 2-byte units / elements
                                           RowCase{DType::f16, 64, 32, 8, false},
                                           RowCase{DType::f32, 52, 16, 2, true},
                                           RowCase{DType::f32, 50, 64, 2, false}),
                         row_case_name);

// ---- Grouped GEMMs --------------------------------------------------------------------------

// Offsets with empty experts (first, middle) and segments padded to `alignment`; rows past
// offsets[E] are spare.
HostTensor make_offsets(int experts, int max_rows_per_expert, int alignment, std::mt19937_64& generator,
                        int64_t& rows) {
  HostTensor offsets(DType::i32, {experts + 1});
  std::uniform_int_distribution<int> count(1, max_rows_per_expert);
  int32_t* data = offsets.data<int32_t>();
  data[0] = 0;
  for (int expert = 0; expert < experts; ++expert) {
    const int kept = (expert == 0 || expert % 3 == 2) ? 0 : count(generator);
    data[expert + 1] = data[expert] + (kept + alignment - 1) / alignment * alignment;
  }
  rows = data[experts] + 3 * alignment / 2;
  return offsets;
}

struct GroupedCase {
  bool trans_b;
  DType output;
  int experts, max_rows, inner, columns;
};

std::string grouped_case_name(const ::testing::TestParamInfo<GroupedCase>& info) {
  const GroupedCase& test = info.param;
  return std::string(test.trans_b ? "transB_" : "") + short_name(test.output) + "_E" + std::to_string(test.experts) +
         "_K" + std::to_string(test.inner) + "_N" + std::to_string(test.columns);
}

class GroupedGemmCudaTest : public ::testing::TestWithParam<GroupedCase> {};

TEST_P(GroupedGemmCudaTest, ForwardMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const GroupedCase& test = GetParam();
  std::mt19937_64 generator(31);
  int64_t rows = 0;
  HostTensor offsets = make_offsets(test.experts, test.max_rows, 16, generator, rows);
  HostPair a = random_pair(DType::bf16, {rows, test.inner}, generator);
  HostPair b = test.trans_b ? random_pair(DType::bf16, {test.experts, test.columns, test.inner}, generator)
                            : random_pair(DType::bf16, {test.experts, test.inner, test.columns}, generator);
  HostTensor expected(DType::f32, {rows, test.columns});
  cpu::grouped_gemm(a.reference, b.reference, test.trans_b, offsets, expected);

  DeviceTensor a_device = to_device(a.data), b_device = to_device(b.data), offsets_device = to_device(offsets);
  DeviceTensor c(test.output, {rows, test.columns});
  poison_device(c.tensor());
  cuda::grouped_gemm(a_device.tensor(), b_device.tensor(), test.trans_b, offsets_device.tensor(), c.tensor(), nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close("c", c.tensor(), expected, tolerance_for(test.output));
}

TEST_P(GroupedGemmCudaTest, WeightGradMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const GroupedCase& test = GetParam();
  std::mt19937_64 generator(41);
  int64_t rows = 0;
  HostTensor offsets = make_offsets(test.experts, test.max_rows, 16, generator, rows);
  HostPair a = random_pair(DType::bf16, {rows, test.inner}, generator);
  HostPair g = random_pair(DType::bf16, {rows, test.columns}, generator);
  HostTensor expected(DType::f32, {test.experts, test.inner, test.columns});
  cpu::grouped_gemm_weight_grad(a.reference, g.reference, offsets, expected);

  DeviceTensor a_device = to_device(a.data), g_device = to_device(g.data), offsets_device = to_device(offsets);
  DeviceTensor grad_b(test.output, {test.experts, test.inner, test.columns});
  poison_device(grad_b.tensor());  // empty experts must come back as zeros, not NaN
  cuda::grouped_gemm_weight_grad(a_device.tensor(), g_device.tensor(), offsets_device.tensor(), grad_b.tensor(),
                                 nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close("grad_b", grad_b.tensor(), expected, tolerance_for(test.output));
}

// accumulate: grad_b += A^T G (the cuBLAS loop with beta 1), experts
// without rows keep their values: the reference's sum plus the starting values.
TEST_P(GroupedGemmCudaTest, WeightGradAccumulatesOntoItsStartingValues) {
  SKIP_WITHOUT_CUDA();
  const GroupedCase& test = GetParam();
  if (test.output != DType::f32) GTEST_SKIP() << "the EP layer accumulates fp32 gradients";
  std::mt19937_64 generator(42);
  int64_t rows = 0;
  HostTensor offsets = make_offsets(test.experts, test.max_rows, 16, generator, rows);
  HostPair a = random_pair(DType::bf16, {rows, test.inner}, generator);
  HostPair g = random_pair(DType::bf16, {rows, test.columns}, generator);
  HostTensor start(DType::f32, {test.experts, test.inner, test.columns});
  fill_uniform(start, generator, -1, 1);
  HostTensor expected(DType::f32, {test.experts, test.inner, test.columns});
  cpu::grouped_gemm_weight_grad(a.reference, g.reference, offsets, expected);
  for (int64_t index = 0; index < expected.numel(); ++index)
    expected.data<float>()[index] += start.data<float>()[index];

  DeviceTensor a_device = to_device(a.data), g_device = to_device(g.data), offsets_device = to_device(offsets);
  DeviceTensor grad_b = to_device(start);
  cuda::grouped_gemm_weight_grad(a_device.tensor(), g_device.tensor(), offsets_device.tensor(), grad_b.tensor(),
                                 nullptr, /*segment_alignment=*/16, nullptr, /*accumulate=*/true);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close("grad_b", grad_b.tensor(), expected, tolerance_for(test.output));
}

INSTANTIATE_TEST_SUITE_P(Cases, GroupedGemmCudaTest,
                         ::testing::Values(GroupedCase{false, DType::bf16, 8, 70, 96, 80},
                                           GroupedCase{true, DType::bf16, 8, 70, 96, 80},
                                           GroupedCase{false, DType::f32, 6, 50, 40, 24},
                                           GroupedCase{true, DType::f32, 5, 300, 256, 128},
                                           GroupedCase{false, DType::bf16, 4, 600, 512, 384}),
                         grouped_case_name);

// ---- Dense GEMM (cuBLASLt) ------------------------------------------------------------------

struct GemmCase {
  bool trans_a, trans_b;
  DType input, output;
  int64_t rows, columns, inner;
  float alpha, beta;
};

std::string gemm_case_name(const ::testing::TestParamInfo<GemmCase>& info) {
  const GemmCase& test = info.param;
  return std::string(test.trans_a ? "T" : "N") + (test.trans_b ? "T" : "N") + "_" + short_name(test.input) + "_to_" +
         short_name(test.output) + "_" + std::to_string(test.rows) + "x" + std::to_string(test.columns) + "x" +
         std::to_string(test.inner) + (test.beta != 0.0f ? "_beta" : "");
}

class GemmCudaTest : public ::testing::TestWithParam<GemmCase> {};

// A random operand op(X) [rows, columns]: stored [columns, rows] when transposed.
HostPair gemm_operand(DType dtype, bool transposed, int64_t rows, int64_t columns, std::mt19937_64& generator) {
  return transposed ? random_pair(dtype, {columns, rows}, generator) : random_pair(dtype, {rows, columns}, generator);
}

TEST_P(GemmCudaTest, MatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const GemmCase& test = GetParam();
  std::mt19937_64 generator(51);
  HostPair a = gemm_operand(test.input, test.trans_a, test.rows, test.inner, generator);
  HostPair b = gemm_operand(test.input, test.trans_b, test.inner, test.columns, generator);
  HostPair c = random_pair(test.output, {test.rows, test.columns}, generator);
  HostTensor expected(DType::f32, {test.rows, test.columns});
  copy_values(c.reference, expected);
  cpu::gemm(test.trans_a, test.trans_b, test.alpha, a.reference, b.reference, test.beta, expected);

  DeviceTensor a_device = to_device(a.data), b_device = to_device(b.data);
  DeviceTensor c_device = to_device(c.data);
  if (test.beta == 0.0f) poison_device(c_device.tensor());  // beta = 0: C must not be read
  for (int repeat = 0; repeat < 2; ++repeat) {  // the second call runs from the plan cache
    if (repeat == 1) {
      if (test.beta == 0.0f) poison_device(c_device.tensor());
      else upload(c.data, c_device.tensor());
    }
    cuda::gemm(test.trans_a, test.trans_b, test.alpha, a_device.tensor(), b_device.tensor(), test.beta,
               c_device.tensor(), nullptr, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_close("c", c_device.tensor(), expected, tolerance_for(test.output));
  }
}

// C = alpha op(A) op(B) + beta Z with Z a tensor of its own: C starts poisoned (never read), Z is
// left as it was, and with beta = 0 a poisoned Z must not be read either.
TEST_P(GemmCudaTest, SeparateAddendMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const GemmCase& test = GetParam();
  std::mt19937_64 generator(52);
  HostPair a = gemm_operand(test.input, test.trans_a, test.rows, test.inner, generator);
  HostPair b = gemm_operand(test.input, test.trans_b, test.inner, test.columns, generator);
  HostPair addend = random_pair(test.output, {test.rows, test.columns}, generator);
  HostTensor expected(DType::f32, {test.rows, test.columns});
  fill_uniform(expected, generator, -1.0, 1.0);  // overwritten: the reference reads the addend
  cpu::gemm(test.trans_a, test.trans_b, test.alpha, a.reference, b.reference, test.beta, expected,
            &addend.reference.tensor());

  DeviceTensor a_device = to_device(a.data), b_device = to_device(b.data);
  DeviceTensor addend_device = to_device(addend.data);
  if (test.beta == 0.0f) poison_device(addend_device.tensor());
  const std::vector<uint8_t> addend_before = addend_device.bytes();
  DeviceTensor c_device(test.output, {test.rows, test.columns});
  for (int repeat = 0; repeat < 2; ++repeat) {  // the second call runs from the plan cache
    poison_device(c_device.tensor());
    cuda::gemm(test.trans_a, test.trans_b, test.alpha, a_device.tensor(), b_device.tensor(), test.beta,
               c_device.tensor(), &addend_device.tensor(), nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_close("c", c_device.tensor(), expected, tolerance_for(test.output));
    EXPECT_EQ(addend_device.bytes(), addend_before) << "the addend was written";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GemmCudaTest,
    ::testing::Values(GemmCase{false, false, DType::bf16, DType::f32, 37, 53, 29, 1.0f, 0.0f},
                      GemmCase{true, false, DType::bf16, DType::f32, 37, 53, 29, 1.0f, 0.0f},
                      GemmCase{false, true, DType::bf16, DType::f32, 37, 53, 29, 1.0f, 0.0f},
                      GemmCase{true, true, DType::bf16, DType::f32, 37, 53, 29, 1.0f, 0.0f},
                      GemmCase{false, true, DType::bf16, DType::bf16, 256, 384, 512, 1.0f, 0.0f},
                      GemmCase{true, false, DType::bf16, DType::bf16, 128, 64, 96, 0.5f, 0.75f},
                      GemmCase{false, false, DType::f16, DType::f16, 64, 128, 256, 1.0f, 0.0f},
                      GemmCase{false, false, DType::f32, DType::f32, 45, 31, 70, 1.5f, -0.25f},
                      GemmCase{true, true, DType::f32, DType::f32, 128, 96, 64, 1.0f, 0.0f},
                      // a residual as the transformer adds it (x_out = x + h W, bf16), and k = 0
                      // (cublasGemmEx's path: C = beta Z)
                      GemmCase{false, false, DType::bf16, DType::bf16, 192, 256, 320, 1.0f, 1.0f},
                      GemmCase{false, false, DType::bf16, DType::bf16, 64, 96, 0, 1.0f, 1.0f}),
    gemm_case_name);

// ---- Activations ----------------------------------------------------------------------------

struct ActivationCase {
  ExpertActivation activation;
  DType dtype;
  int64_t rows, width;  // width = F (post's width)
};

std::string activation_case_name(const ::testing::TestParamInfo<ActivationCase>& info) {
  const ActivationCase& test = info.param;
  return std::string(test.activation == ExpertActivation::swiglu ? "swiglu_" : "gelu_") + short_name(test.dtype) +
         "_F" + std::to_string(test.width);
}

class ActivationCudaTest : public ::testing::TestWithParam<ActivationCase> {};

TEST_P(ActivationCudaTest, ForwardAndBackwardMatchCpu) {
  SKIP_WITHOUT_CUDA();
  const ActivationCase& test = GetParam();
  const int64_t pre_width = test.activation == ExpertActivation::swiglu ? 2 * test.width : test.width;
  std::mt19937_64 generator(61);
  HostPair pre = random_pair(test.dtype, {test.rows, pre_width}, generator, -6.0, 6.0);
  HostPair grad_post = random_pair(test.dtype, {test.rows, test.width}, generator);
  HostTensor expected_post(DType::f32, {test.rows, test.width}), expected_grad_pre(DType::f32, {test.rows, pre_width});
  cpu::activation_forward(test.activation, pre.reference, expected_post);
  cpu::activation_backward(test.activation, pre.reference, grad_post.reference, expected_grad_pre);

  DeviceTensor pre_device = to_device(pre.data), grad_post_device = to_device(grad_post.data);
  DeviceTensor post(test.dtype, {test.rows, test.width}), grad_pre(test.dtype, {test.rows, pre_width});
  poison_device(post.tensor());
  poison_device(grad_pre.tensor());
  cuda::activation_forward(test.activation, pre_device.tensor(), post.tensor(), nullptr);
  cuda::activation_backward(test.activation, pre_device.tensor(), grad_post_device.tensor(), grad_pre.tensor(),
                            nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_close("post", post.tensor(), expected_post, tolerance_for(test.dtype));
  expect_close("grad_pre", grad_pre.tensor(), expected_grad_pre, tolerance_for(test.dtype));
}

INSTANTIATE_TEST_SUITE_P(Cases, ActivationCudaTest,
                         ::testing::Values(ActivationCase{ExpertActivation::gelu_tanh, DType::bf16, 300, 256},
                                           ActivationCase{ExpertActivation::gelu_tanh, DType::f32, 70, 37},
                                           ActivationCase{ExpertActivation::gelu_tanh, DType::f16, 33, 64},
                                           ActivationCase{ExpertActivation::swiglu, DType::bf16, 300, 256},
                                           ActivationCase{ExpertActivation::swiglu, DType::f32, 70, 37},
                                           ActivationCase{ExpertActivation::swiglu, DType::bf16, 40, 100}),
                         activation_case_name);

// ---- Jitter (and dtype conversion through eps = 0) ------------------------------------------

struct JitterCase {
  DType input, output;
  int64_t rows, columns;
  float eps;
  bool in_place;
};

std::string jitter_case_name(const ::testing::TestParamInfo<JitterCase>& info) {
  const JitterCase& test = info.param;
  return std::string(short_name(test.input)) + "_to_" + short_name(test.output) + "_" + std::to_string(test.rows) +
         "x" + std::to_string(test.columns) + (test.eps == 0.0f ? "_convert" : "_jitter") +
         (test.in_place ? "_in_place" : "");
}

class JitterCudaTest : public ::testing::TestWithParam<JitterCase> {};

TEST_P(JitterCudaTest, MatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const JitterCase& test = GetParam();
  const uint64_t seed = 0x1234567890ull, offset = (uint64_t(3) << 32) + 17;
  const uint32_t stream_id = 5;
  std::mt19937_64 generator(71);
  HostPair x = random_pair(test.input, {test.rows, test.columns}, generator, -3.0, 3.0);
  HostTensor expected(DType::f32, {test.rows, test.columns});
  cpu::apply_jitter(x.reference, test.eps, seed, stream_id, offset, expected);
  if (test.eps > 0.0f)  // the factor must actually vary, or the test could not see a wrong draw
    ASSERT_GT(relative_error(to_vector(expected), to_vector(x.reference)), 1e-3);

  DeviceTensor x_device = to_device(x.data);
  DeviceTensor out(test.output, {test.rows, test.columns});
  Tensor* target = test.in_place ? &x_device.tensor() : &out.tensor();
  if (!test.in_place) poison_device(out.tensor());
  cuda::apply_jitter(x_device.tensor(), test.eps, seed, stream_id, offset, *target, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (test.input == DType::f32 && test.output == DType::f32) {
    // Same factor bits and one rounding of an exact product on both sides.
    expect_close("out", *target, expected, 1e-6);
  } else if (test.eps == 0.0f) {
    HostTensor rounded(test.output, {test.rows, test.columns});
    copy_values(x.reference, rounded);  // the host's round-to-nearest-even into the output type
    expect_equal("converted", *target, rounded);
  } else {
    expect_close("out", *target, expected, tolerance_for(test.output));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, JitterCudaTest,
                         ::testing::Values(JitterCase{DType::f32, DType::f32, 64, 128, 0.1f, false},
                                           JitterCase{DType::f32, DType::f32, 37, 13, 0.01f, false},
                                           JitterCase{DType::f32, DType::f32, 37, 13, 0.2f, true},
                                           JitterCase{DType::bf16, DType::bf16, 100, 77, 0.1f, false},
                                           JitterCase{DType::f32, DType::bf16, 41, 9, 0.0f, false},
                                           JitterCase{DType::bf16, DType::f32, 41, 9, 0.0f, false},
                                           JitterCase{DType::f32, DType::f16, 64, 64, 0.0f, false}),
                         jitter_case_name);

// ---- Timing of the row moves at a production shape (printed, not asserted) -------------------

TEST(MoeOpsCuda, TimingOfRowMoves) {
  SKIP_WITHOUT_CUDA();
  RoutingParams params;
  params.num_tokens = 65536;
  params.num_experts = 64;
  params.k_max = 2;
  params.capacity_factor = 1.25f;
  params.segment_alignment = 128;
  const int64_t tokens = params.num_tokens, width = 768, rows = padded_rows_upper_bound(params);
  std::mt19937_64 generator(81);
  HostTensor logits(DType::f32, {tokens, params.num_experts});
  fill_normal(logits, generator, 0.0, 1.0);
  DeviceTensor logits_device = to_device(logits);
  RoutingBuffers buffers(DeviceKind::cuda, DType::f32, tokens, params.num_experts, params.k_max, rows);
  RoutingResult routing = buffers.result(tokens);
  DispatchMap map = buffers.map(tokens, rows);
  cuda::route(logits_device.tensor(), nullptr, params, routing, nullptr);
  DeviceTensor token_rows(DType::bf16, {tokens, width}), expert_rows(DType::bf16, {rows, width});
  DeviceTensor combined(DType::bf16, {tokens, width});
  device_memset(token_rows.tensor().data, DeviceKind::cuda, 0, token_rows.tensor().bytes());

  cudaEvent_t start, stop;
  ASSERT_EQ(cudaEventCreate(&start), cudaSuccess);
  ASSERT_EQ(cudaEventCreate(&stop), cudaSuccess);
  auto time_us = [&](auto&& body) {
    for (int warmup = 0; warmup < 3; ++warmup) body();
    constexpr int kIterations = 20;
    cudaEventRecord(start, nullptr);
    for (int iteration = 0; iteration < kIterations; ++iteration) body();
    cudaEventRecord(stop, nullptr);
    cudaEventSynchronize(stop);
    float milliseconds = 0.0f;
    cudaEventElapsedTime(&milliseconds, start, stop);
    return 1000.0 * milliseconds / kIterations;
  };
  const double permute_us =
      time_us([&] { cuda::permute(token_rows.tensor(), routing, params, expert_rows.tensor(), map, nullptr); });
  const double combine_us =
      time_us([&] { cuda::unpermute_combine(expert_rows.tensor(), routing, map, combined.tensor(), nullptr); });
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::printf("[ timing ] 65536 tokens x 768 bf16, E64 top-2: permute %.1f us, unpermute_combine %.1f us\n",
              permute_us, combine_us);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

}  // namespace
