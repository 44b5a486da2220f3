// The modern routing options on CUDA (src/ops/cuda/routing.cu and its passes) against the CPU
// reference (src/ops/cpu/routing.cpp) on the same fp32 logits and bias: integer outputs (expert ids,
// slots, k_t, counts, offsets, scalars) must match exactly; gates, lse, prob sums, losses and
// sequence fractions to a relative error of 1e-5. Cases: sigmoid scores, the selection bias,
// group-limited routing (groups spanning lanes, inside a lane, one-expert groups, sizes that are
// not powers of two), routed scaling, probability drops (with exact ties, dropless, complexity),
// the sequence-level loss (short last sequence, one sequence, chunks longer than 128 tokens),
// complexity with sigmoid scores, the DeepSeek-V3 shape (E = 256, K = 8, 8 groups, 4 kept) and E =
// 512. Inputs are drawn per case (test_routing_modern_cases.h); device outputs are poisoned before
// every call. The backward is in test_routing_modern_backward_cuda.cpp, the Switch router's cases
// in test_routing_cuda.cpp.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "tests/ops/cuda/test_routing_modern_cases.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;
using namespace switchyard::routing_modern_test;

namespace {

// ---- Forward ------------------------------------------------------------------------------------

class RouteModernCudaTest : public ::testing::TestWithParam<ModernCase> {};

TEST_P(RouteModernCudaTest, MatchesCpuReference) {
  SKIP_WITHOUT_CUDA();
  const ModernCase& test = GetParam();
  const RoutingParams params = params_of(test);
  Inputs inputs = make_inputs(test, params, seed_of(test.name));
  const int64_t tokens = test.tokens, sequences = routing_num_sequences(params);
  RoutingInputs cpu_inputs(test.complexity == ComplexityMode::given ? &inputs.complexity.tensor() : nullptr);
  cpu_inputs.selection_bias = test.bias ? &inputs.bias.tensor() : nullptr;
  RoutingBuffers host_buffers(DeviceKind::cpu, DType::f32, tokens, test.experts, test.k_max, 0, sequences);
  RoutingResult expected = host_buffers.result(tokens);
  cpu::route(inputs.logits, cpu_inputs, params, expected);

  DeviceTensor logits = to_device(inputs.logits), complexity = to_device(inputs.complexity),
               bias = to_device(inputs.bias);
  RoutingInputs device_inputs(test.complexity == ComplexityMode::given ? &complexity.tensor() : nullptr);
  device_inputs.selection_bias = test.bias ? &bias.tensor() : nullptr;
  RoutingBuffers device_buffers(DeviceKind::cuda, DType::f32, tokens, test.experts, test.k_max, 0, sequences + 2);
  RoutingResult actual = device_buffers.result(tokens);
  for (Tensor* tensor : routing_tensors(actual)) poison_device(*tensor);
  cuda::route(logits, device_inputs, params, actual, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  expect_ints_equal("expert_ids", expected.expert_ids, actual.expert_ids);
  expect_ints_equal("slots", expected.slots, actual.slots);
  expect_ints_equal("token_k", expected.token_k, actual.token_k);
  expect_ints_equal("expert_counts", expected.expert_counts, actual.expert_counts);
  expect_ints_equal("first_choice_counts", expected.first_choice_counts, actual.first_choice_counts);
  expect_ints_equal("expert_offsets", expected.expert_offsets, actual.expert_offsets);
  expect_ints_equal("scalars", expected.scalars, actual.scalars);
  expect_floats_close("gates", expected.gates, actual.gates);
  expect_floats_close("logsumexp", expected.logsumexp, actual.logsumexp);
  expect_floats_close("prob_sums", expected.prob_sums, actual.prob_sums);
  expect_losses_close(expected.losses, actual.losses);
  if (test.seq_weight > 0.0f)
    expect_floats_close("sequence_fractions", expected.sequence_fractions, actual.sequence_fractions,
                        sequences * test.experts);
}

std::vector<ModernCase> forward_cases() {
  using S = ScoreFunction;
  const auto sigmoid = [](ModernCase& c) { c.score = S::sigmoid; };
  return {
      make_case("E64_sigmoid_top4", 3000, 64, 4, sigmoid),
      make_case("E64_sigmoid_top4_plain_scaled", 3000, 64, 4,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.renormalize = false;
                  c.scaling = 2.5f;
                }),
      make_case("E64_softmax_bias_top2", 2500, 64, 2, [](ModernCase& c) { c.bias = true; }),
      make_case("E16_switch_scaled", 2000, 16, 2, [](ModernCase& c) { c.scaling = 3.0f; }),
      make_case("E64_sigmoid_bias_top6", 2200, 64, 6,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.bias = true;
                  c.scaling = 2.5f;
                }),
      make_case("E256_deepseek_v3", 5000, 256, 8,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.bias = true;
                  c.groups = 8;
                  c.topk_groups = 4;
                  c.scaling = 2.5f;
                  c.capacity_factor = 1.25f;
                }),
      make_case("E256_deepseek_v3_persistent_tiles", 40000, 256, 8,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.bias = true;
                  c.groups = 8;
                  c.topk_groups = 4;
                  c.scaling = 2.5f;
                  c.alignment = 128;
                }),
      make_case("E128_softmax_groups", 3000, 128, 4,
                [](ModernCase& c) {
                  c.groups = 8;
                  c.topk_groups = 2;
                }),
      make_case("E96_softmax_bias_groups_of_12", 2500, 96, 3,
                [](ModernCase& c) {
                  c.bias = true;
                  c.groups = 8;
                  c.topk_groups = 3;
                }),
      make_case("E100_sigmoid_groups_of_20", 2000, 100, 4,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.groups = 5;
                  c.topk_groups = 2;
                }),
      // Groups of whole lane slices take the register path (1, 2 and 4 lanes per group here).
      make_case("E64_sigmoid_bias_ties_groups_of_8", 1500, 64, 4,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.bias = true;
                  c.ties = true;
                  c.groups = 8;
                  c.topk_groups = 3;
                }),
      make_case("E128_softmax_bias_ties_groups_of_32", 1500, 128, 6,
                [](ModernCase& c) {
                  c.bias = true;
                  c.ties = true;
                  c.groups = 4;
                  c.topk_groups = 2;
                }),
      make_case("E192_sigmoid_groups_of_32_padded_lanes", 1500, 192, 8,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.groups = 6;
                  c.topk_groups = 3;
                }),
      make_case("E16_softmax_bias_one_expert_groups", 1500, 16, 2,
                [](ModernCase& c) {
                  c.bias = true;
                  c.groups = 16;
                  c.topk_groups = 4;
                }),
      make_case("E8_sigmoid_one_expert_groups_ties", 1500, 8, 2,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.bias = true;
                  c.ties = true;
                  c.groups = 8;
                  c.topk_groups = 3;
                }),
      make_case("E32_sigmoid_groups_all_kept", 1200, 32, 2,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.groups = 4;
                  c.topk_groups = 4;
                }),
      make_case("E512_sigmoid_bias_groups", 2000, 512, 8,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.bias = true;
                  c.groups = 16;
                  c.topk_groups = 4;
                  c.scaling = 2.5f;
                }),
      make_case("E512_softmax_probability_drops", 2000, 512, 8,
                [](ModernCase& c) {
                  c.drop = DropPolicy::probability;
                  c.capacity_factor = 0.8f;
                }),
      make_case("E64_softmax_probability_drops", 3000, 64, 2,
                [](ModernCase& c) {
                  c.drop = DropPolicy::probability;
                  c.capacity_factor = 0.8f;
                }),
      make_case("E8_sigmoid_probability_drops_ties", 2000, 8, 2,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.drop = DropPolicy::probability;
                  c.ties = true;
                }),
      make_case("E16_softmax_probability_drops_ties", 2000, 16, 4,
                [](ModernCase& c) {
                  c.drop = DropPolicy::probability;
                  c.ties = true;
                  c.capacity_factor = 0.7f;
                }),
      make_case("E32_probability_dropless", 1500, 32, 4,
                [](ModernCase& c) {
                  c.drop = DropPolicy::probability;
                  c.dropless = true;
                }),
      make_case("E32_probability_drops_entropy", 2500, 32, 6,
                [](ModernCase& c) {
                  c.drop = DropPolicy::probability;
                  c.complexity = ComplexityMode::entropy;
                  c.k_min = 2;
                }),
      make_case("E32_softmax_sequence_loss_short_last", 2000, 32, 2,
                [](ModernCase& c) {
                  c.sequence_tokens = 300;
                  c.seq_weight = 0.01f;
                }),
      make_case("E64_sigmoid_sequence_loss", 4096, 64, 4,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.sequence_tokens = 512;
                  c.seq_weight = 0.001f;
                }),
      make_case("E16_sequence_loss_one_sequence_long_chunks", 20000, 16, 2,
                [](ModernCase& c) {
                  c.seq_weight = 0.02f;  // one sequence of 20000 tokens: 53 chunks of 384
                }),
      make_case("E8_sequence_longer_than_batch", 700, 8, 2,
                [](ModernCase& c) {
                  c.sequence_tokens = 5000;
                  c.seq_weight = 0.02f;
                }),
      make_case("E512_sequence_loss_drops", 1500, 512, 4,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.sequence_tokens = 256;
                  c.seq_weight = 0.01f;
                  c.drop = DropPolicy::probability;
                }),
      make_case("E32_sigmoid_entropy_complexity", 3000, 32, 8,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.complexity = ComplexityMode::entropy;
                  c.k_min = 2;
                }),
      make_case("E64_sigmoid_given_complexity_groups", 2000, 64, 4,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.complexity = ComplexityMode::given;
                  c.groups = 4;
                  c.topk_groups = 2;
                  c.bias = true;
                }),
      make_case("E128_softmax_bias_entropy", 2000, 128, 4,
                [](ModernCase& c) {
                  c.bias = true;
                  c.complexity = ComplexityMode::entropy;
                }),
      make_case("E8_no_tokens_everything", 0, 8, 2,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.bias = true;
                  c.drop = DropPolicy::probability;
                  c.seq_weight = 0.01f;
                  c.groups = 4;
                  c.topk_groups = 2;
                }),
  };
}

INSTANTIATE_TEST_SUITE_P(Cases, RouteModernCudaTest, ::testing::ValuesIn(forward_cases()),
                         [](const ::testing::TestParamInfo<ModernCase>& info) { return info.param.name; });

}  // namespace
