// The modern routing options on CUDA (src/ops/cuda/routing.cu and its passes, routing_backward.cu)
// against the CPU reference (src/ops/cpu/routing.cpp) on the same fp32 logits and bias: integer
// outputs (expert ids, slots, k_t, counts, offsets, scalars) must match exactly; gates, lse, prob
// sums, losses, sequence fractions and grad_logits to a relative error of 1e-5. Cases: sigmoid
// scores, the selection bias, group-limited routing (groups spanning lanes, inside a lane, one-expert
// groups, sizes that are not powers of two), routed scaling, probability drops (with exact ties,
// dropless, complexity), the sequence-level loss (short last sequence, one sequence, chunks longer
// than 128 tokens), complexity with sigmoid scores, the DeepSeek-V3 shape (E = 256, K = 8, 8 groups,
// 4 kept) and E up to 512, and the backward with the global-batch and sequence losses and k_t = 0
// (expert choice). Inputs are drawn per case; device outputs are poisoned before every call.
// Tests named Layout* check the host-side layout arithmetic (src/ops/cuda/routing_layout.h) and run
// without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "src/core/device.h"
#include "src/ops/cuda/routing_layout.h"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

constexpr double kTolerance = 1e-5;

// The CPU reference of these options is written on another branch; until it lands, its placeholder
// refuses them ("this CPU build ..."), and the comparison skips with that message. Any other
// error fails the test.
#define RUN_CPU_REFERENCE(call)                                                                  \
  do {                                                                                           \
    try {                                                                                        \
      call;                                                                                      \
    } catch (const std::exception& error) {                                                      \
      if (std::string(error.what()).find("this CPU build") == std::string::npos) throw;          \
      GTEST_SKIP() << "the CPU reference does not take these options yet: " << error.what();     \
    }                                                                                            \
  } while (0)

struct ModernCase {
  std::string name;
  int64_t tokens = 1000;
  int experts = 8, k_max = 2, k_min = 1;
  ScoreFunction score = ScoreFunction::softmax;
  bool bias = false, ties = false, renormalize = true, dropless = false;
  int groups = 1, topk_groups = 1;
  DropPolicy drop = DropPolicy::position;
  ComplexityMode complexity = ComplexityMode::none;
  float capacity_factor = 1.0f, scaling = 1.0f, seq_weight = 0.0f, global_weight = 0.0f;
  int64_t sequence_tokens = 0;
  int alignment = 16;
};

ModernCase make_case(const std::string& name, int64_t tokens, int experts, int k_max,
                     const std::function<void(ModernCase&)>& modify = {}) {
  ModernCase test;
  test.name = name;
  test.tokens = tokens;
  test.experts = experts;
  test.k_max = k_max;
  if (modify) modify(test);
  return test;
}

RoutingParams params_of(const ModernCase& test) {
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
  params.score_function = test.score;
  params.routed_scaling_factor = test.scaling;
  params.num_groups = test.groups;
  params.topk_groups = test.topk_groups;
  params.drop_policy = test.drop;
  params.tokens_per_sequence = test.sequence_tokens;
  params.seq_aux_loss_weight = test.seq_weight;
  params.global_aux_loss_weight = test.global_weight;
  return params;
}

// Normalized entropy of the score the complexity uses (p, or s' for sigmoid), in double.
double normalized_entropy(const float* row, int experts, ScoreFunction score) {
  std::vector<double> q(static_cast<size_t>(experts));
  double max_logit = row[0], sum = 0.0, entropy = 0.0;
  for (int e = 1; e < experts; ++e) max_logit = std::max(max_logit, double(row[e]));
  for (int e = 0; e < experts; ++e) {
    q[size_t(e)] = score == ScoreFunction::sigmoid ? 1.0 / (1.0 + std::exp(-double(row[e])))
                                                  : std::exp(double(row[e]) - max_logit);
    sum += q[size_t(e)];
  }
  for (int e = 0; e < experts; ++e) {
    const double value = q[size_t(e)] / sum;
    if (value > 0.0) entropy -= value * std::log(value);
  }
  return experts > 1 ? entropy / std::log(double(experts)) : 0.0;
}

// Where fp32 and fp64 evaluations of k_t = k_min + floor(c (k_max - k_min) + 1/2) could differ.
bool near_rounding_boundary(double complexity, const RoutingParams& params) {
  const double clamped = std::min(1.0, std::max(0.0, complexity));
  const double scaled = clamped * double(params.k_max - params.k_min) + 0.5;
  return params.k_max > params.k_min && std::fabs(scaled - std::round(scaled)) < 1e-3;
}

struct Inputs {
  HostTensor logits, complexity, bias;
};

Inputs make_inputs(const ModernCase& test, const RoutingParams& params, uint64_t seed) {
  std::mt19937_64 generator(seed);
  Inputs inputs{HostTensor(DType::f32, {test.tokens, test.experts}), HostTensor(DType::f32, {test.tokens}),
                HostTensor(DType::f32, {test.experts})};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> row_scale(0.05f, 4.0f), complexity(-0.2f, 1.2f);
  std::uniform_int_distribution<int> grid(0, 2);
  for (int64_t token = 0; token < test.tokens; ++token) {
    float* row = inputs.logits.data<float>() + token * test.experts;
    while (true) {
      const float scale = row_scale(generator);  // rows of different sharpness: k_t varies
      for (int e = 0; e < test.experts; ++e) row[e] = test.ties ? 0.5f * float(grid(generator)) : scale * normal(generator);
      if (test.complexity != ComplexityMode::entropy ||
          !near_rounding_boundary(normalized_entropy(row, test.experts, test.score), params))
        break;
    }
    float value;
    do {
      value = complexity(generator);
    } while (test.complexity == ComplexityMode::given && near_rounding_boundary(value, params));
    inputs.complexity.data<float>()[token] = value;
  }
  for (int e = 0; e < test.experts; ++e)
    inputs.bias.data<float>()[e] = test.ties ? 0.25f * float(grid(generator) - 1) : 0.3f * normal(generator);
  return inputs;
}

uint64_t seed_of(const std::string& name) { return std::hash<std::string>{}(name) & 0xffffffffu; }

HostTensor download(const Tensor& device) {
  HostTensor host(device.dtype, {device.numel()});
  device_copy(host.tensor().data, DeviceKind::cpu, device.data, DeviceKind::cuda, device.bytes());
  return host;
}

void upload(const Tensor& host, Tensor& device) {
  ASSERT_EQ(host.bytes(), device.bytes());
  device_copy(device.data, DeviceKind::cuda, host.data, DeviceKind::cpu, host.bytes());
}

std::vector<Tensor*> routing_tensors(RoutingResult& result) {
  return {&result.expert_ids, &result.gates, &result.slots, &result.token_k, &result.logsumexp,
          &result.expert_counts, &result.first_choice_counts, &result.prob_sums, &result.expert_offsets,
          &result.scalars, &result.losses, &result.sequence_fractions};
}

// NaN / 0x5EED5EEF: values no correct op writes (-1, a valid slot, is not one of them).
void poison_device(Tensor& device) {
  HostTensor host(device.dtype, {device.numel()});
  poison(host);
  upload(host, device);
}

void expect_ints_equal(const char* name, const Tensor& expected, const Tensor& device) {
  HostTensor actual = download(device);
  int64_t mismatches = 0, first = -1;
  for (int64_t index = 0; index < expected.numel(); ++index) {
    if (expected.as<int32_t>()[index] == actual.data<int32_t>()[index]) continue;
    if (first < 0) first = index;
    ++mismatches;
  }
  EXPECT_EQ(mismatches, 0) << name << ": " << mismatches << " of " << expected.numel() << " differ; first at "
                           << first << ": expected " << (first >= 0 ? expected.as<int32_t>()[first] : 0)
                           << ", got " << (first >= 0 ? actual.data<int32_t>()[first] : 0);
}

// The first `count` values (all when count < 0).
void expect_floats_close(const char* name, const Tensor& expected, const Tensor& device, int64_t count = -1) {
  std::vector<double> want = to_vector(expected), got = to_vector(download(device));
  if (count >= 0) {
    want.resize(size_t(count));
    got.resize(size_t(count));
  }
  const double error = relative_error(got, want);
  EXPECT_LE(error, kTolerance) << name << ": relative error " << error;
}

void expect_losses_close(const Tensor& expected, const Tensor& device) {
  HostTensor losses = download(device);
  for (int loss = 0; loss < kNumRoutingLosses; ++loss) {
    const double want = expected.as<float>()[loss], got = losses.data<float>()[loss];
    EXPECT_LE(std::fabs(got - want), kTolerance * std::max(std::fabs(want), 1e-30))
        << "loss " << loss << ": expected " << want << ", got " << got;
  }
}

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
  RUN_CPU_REFERENCE(cpu::route(inputs.logits, cpu_inputs, params, expected));

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
      make_case("E64_sigmoid_top4_plain_scaled", 3000, 64, 4, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.renormalize = false;
        c.scaling = 2.5f;
      }),
      make_case("E64_softmax_bias_top2", 2500, 64, 2, [](ModernCase& c) { c.bias = true; }),
      make_case("E16_switch_scaled", 2000, 16, 2, [](ModernCase& c) { c.scaling = 3.0f; }),
      make_case("E64_sigmoid_bias_top6", 2200, 64, 6, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.bias = true;
        c.scaling = 2.5f;
      }),
      make_case("E256_deepseek_v3", 5000, 256, 8, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.bias = true;
        c.groups = 8;
        c.topk_groups = 4;
        c.scaling = 2.5f;
        c.capacity_factor = 1.25f;
      }),
      make_case("E256_deepseek_v3_persistent_tiles", 40000, 256, 8, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.bias = true;
        c.groups = 8;
        c.topk_groups = 4;
        c.scaling = 2.5f;
        c.alignment = 128;
      }),
      make_case("E128_softmax_groups", 3000, 128, 4, [](ModernCase& c) {
        c.groups = 8;
        c.topk_groups = 2;
      }),
      make_case("E96_softmax_bias_groups_of_12", 2500, 96, 3, [](ModernCase& c) {
        c.bias = true;
        c.groups = 8;
        c.topk_groups = 3;
      }),
      make_case("E100_sigmoid_groups_of_20", 2000, 100, 4, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.groups = 5;
        c.topk_groups = 2;
      }),
      make_case("E16_softmax_bias_one_expert_groups", 1500, 16, 2, [](ModernCase& c) {
        c.bias = true;
        c.groups = 16;
        c.topk_groups = 4;
      }),
      make_case("E8_sigmoid_one_expert_groups_ties", 1500, 8, 2, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.bias = true;
        c.ties = true;
        c.groups = 8;
        c.topk_groups = 3;
      }),
      make_case("E32_sigmoid_groups_all_kept", 1200, 32, 2, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.groups = 4;
        c.topk_groups = 4;
      }),
      make_case("E512_sigmoid_bias_groups", 2000, 512, 8, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.bias = true;
        c.groups = 16;
        c.topk_groups = 4;
        c.scaling = 2.5f;
      }),
      make_case("E512_softmax_probability_drops", 2000, 512, 8, [](ModernCase& c) {
        c.drop = DropPolicy::probability;
        c.capacity_factor = 0.8f;
      }),
      make_case("E64_softmax_probability_drops", 3000, 64, 2, [](ModernCase& c) {
        c.drop = DropPolicy::probability;
        c.capacity_factor = 0.8f;
      }),
      make_case("E8_sigmoid_probability_drops_ties", 2000, 8, 2, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.drop = DropPolicy::probability;
        c.ties = true;
      }),
      make_case("E16_softmax_probability_drops_ties", 2000, 16, 4, [](ModernCase& c) {
        c.drop = DropPolicy::probability;
        c.ties = true;
        c.capacity_factor = 0.7f;
      }),
      make_case("E32_probability_dropless", 1500, 32, 4, [](ModernCase& c) {
        c.drop = DropPolicy::probability;
        c.dropless = true;
      }),
      make_case("E32_probability_drops_entropy", 2500, 32, 6, [](ModernCase& c) {
        c.drop = DropPolicy::probability;
        c.complexity = ComplexityMode::entropy;
        c.k_min = 2;
      }),
      make_case("E32_softmax_sequence_loss_short_last", 2000, 32, 2, [](ModernCase& c) {
        c.sequence_tokens = 300;
        c.seq_weight = 0.01f;
      }),
      make_case("E64_sigmoid_sequence_loss", 4096, 64, 4, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.sequence_tokens = 512;
        c.seq_weight = 0.001f;
      }),
      make_case("E16_sequence_loss_one_sequence_long_chunks", 20000, 16, 2, [](ModernCase& c) {
        c.seq_weight = 0.02f;  // one sequence of 20000 tokens: 53 chunks of 384
      }),
      make_case("E8_sequence_longer_than_batch", 700, 8, 2, [](ModernCase& c) {
        c.sequence_tokens = 5000;
        c.seq_weight = 0.02f;
      }),
      make_case("E512_sequence_loss_drops", 1500, 512, 4, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.sequence_tokens = 256;
        c.seq_weight = 0.01f;
        c.drop = DropPolicy::probability;
      }),
      make_case("E32_sigmoid_entropy_complexity", 3000, 32, 8, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.complexity = ComplexityMode::entropy;
        c.k_min = 2;
      }),
      make_case("E64_sigmoid_given_complexity_groups", 2000, 64, 4, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.complexity = ComplexityMode::given;
        c.groups = 4;
        c.topk_groups = 2;
        c.bias = true;
      }),
      make_case("E128_softmax_bias_entropy", 2000, 128, 4, [](ModernCase& c) {
        c.bias = true;
        c.complexity = ComplexityMode::entropy;
      }),
      make_case("E8_no_tokens_everything", 0, 8, 2, [](ModernCase& c) {
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

// ---- Backward -----------------------------------------------------------------------------------

class RouteBackwardModernCudaTest : public ::testing::TestWithParam<ModernCase> {};

// The CPU routing result goes to the device, so both backwards see identical routing; F (the
// global fractions) is a random distribution.
void compare_backward(const ModernCase& test, RoutingParams params, bool empty_tokens) {
  Inputs inputs = make_inputs(test, params, seed_of(test.name) + 1);
  const int64_t tokens = test.tokens, sequences = routing_num_sequences(params);
  RoutingInputs cpu_inputs(test.complexity == ComplexityMode::given ? &inputs.complexity.tensor() : nullptr);
  cpu_inputs.selection_bias = test.bias ? &inputs.bias.tensor() : nullptr;
  RoutingBuffers host_buffers(DeviceKind::cpu, DType::f32, tokens, test.experts, test.k_max, 0, sequences);
  RoutingResult routing = host_buffers.result(tokens);
  RUN_CPU_REFERENCE(cpu::route(inputs.logits, cpu_inputs, params, routing));
  if (empty_tokens) {  // expert choice: every third token has no expert
    params.method = RoutingMethod::expert_choice;
    for (int64_t token = 0; token < tokens; token += 3) {
      routing.token_k.as<int32_t>()[token] = 0;
      for (int choice = 0; choice < test.k_max; ++choice) {
        routing.expert_ids.as<int32_t>()[token * test.k_max + choice] = -1;
        routing.slots.as<int32_t>()[token * test.k_max + choice] = -1;
        routing.gates.as<float>()[token * test.k_max + choice] = 0.0f;
      }
    }
  }

  std::mt19937_64 generator(seed_of(test.name) + 2);
  HostTensor grad_gates(DType::f32, {tokens, test.k_max}), fractions(DType::f32, {test.experts});
  fill_normal(grad_gates, generator, 0.0, 1.0);
  fill_uniform(fractions, generator, 0.1, 1.0);
  double total = 0.0;
  for (int e = 0; e < test.experts; ++e) total += fractions.data<float>()[e];
  for (int e = 0; e < test.experts; ++e) fractions.data<float>()[e] = float(fractions.data<float>()[e] / total);
  const Tensor* global = test.global_weight > 0.0f ? &fractions.tensor() : nullptr;
  const float aux_scale = 0.7f, z_scale = 1.3f;
  HostTensor expected(DType::f32, {tokens, test.experts});
  RUN_CPU_REFERENCE(cpu::route_backward(inputs.logits, grad_gates, routing, params, aux_scale, z_scale, expected,
                                        global));

  RoutingBuffers device_buffers(DeviceKind::cuda, DType::f32, tokens, test.experts, test.k_max, 0, sequences);
  RoutingResult device_routing = device_buffers.result(tokens);
  std::vector<Tensor*> sources = routing_tensors(routing), destinations = routing_tensors(device_routing);
  for (size_t index = 0; index < sources.size(); ++index) upload(*sources[index], *destinations[index]);
  DeviceTensor logits = to_device(inputs.logits), device_grad_gates = to_device(grad_gates),
               device_fractions = to_device(fractions), grad_logits(DType::f32, {tokens, test.experts});
  poison_device(grad_logits);
  cuda::route_backward(logits, device_grad_gates, device_routing, params, aux_scale, z_scale, grad_logits, nullptr,
                       global ? &device_fractions.tensor() : nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_floats_close("grad_logits", expected, grad_logits);
}

TEST_P(RouteBackwardModernCudaTest, MatchesCpuReference) {
  SKIP_WITHOUT_CUDA();
  compare_backward(GetParam(), params_of(GetParam()), false);
}

std::vector<ModernCase> backward_cases() {
  using S = ScoreFunction;
  return {
      make_case("E64_sigmoid_renormalized_all_losses", 3000, 64, 4, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.scaling = 2.5f;
        c.sequence_tokens = 700;
        c.seq_weight = 0.01f;
        c.global_weight = 0.02f;
        c.capacity_factor = 0.9f;
      }),
      make_case("E64_sigmoid_plain", 2000, 64, 2, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.renormalize = false;
        c.capacity_factor = 0.9f;
      }),
      make_case("E32_softmax_sequence_and_global", 2000, 32, 2, [](ModernCase& c) {
        c.renormalize = false;
        c.sequence_tokens = 300;
        c.seq_weight = 0.01f;
        c.global_weight = 0.05f;
      }),
      make_case("E256_deepseek_v3", 1500, 256, 8, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.bias = true;
        c.groups = 8;
        c.topk_groups = 4;
        c.scaling = 2.5f;
        c.global_weight = 0.001f;
        c.seq_weight = 0.001f;
        c.sequence_tokens = 512;
      }),
      make_case("E512_softmax_top8_sequence", 1200, 512, 8, [](ModernCase& c) {
        c.seq_weight = 0.01f;
        c.sequence_tokens = 400;
        c.capacity_factor = 0.9f;
      }),
      make_case("E300_sigmoid_top2_global", 1500, 300, 2, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.global_weight = 0.01f;
      }),
      make_case("E6_sigmoid_top3_unaligned", 999, 6, 3, [](ModernCase& c) {
        c.score = S::sigmoid;
        c.scaling = 1.5f;
        c.seq_weight = 0.01f;
      }),
      make_case("E16_softmax_probability_drops_scaled", 1500, 16, 4, [](ModernCase& c) {
        c.drop = DropPolicy::probability;
        c.capacity_factor = 0.7f;
        c.scaling = 2.0f;
      }),
  };
}

INSTANTIATE_TEST_SUITE_P(Cases, RouteBackwardModernCudaTest, ::testing::ValuesIn(backward_cases()),
                         [](const ::testing::TestParamInfo<ModernCase>& info) { return info.param.name; });

// Expert choice reuses the backward: tokens no expert took (k_t = 0) get only the loss terms.
TEST(RouteBackwardModernCuda, TokensWithoutChoicesForExpertChoice) {
  SKIP_WITHOUT_CUDA();
  for (ScoreFunction score : {ScoreFunction::softmax, ScoreFunction::sigmoid}) {
    ModernCase test = make_case(score == ScoreFunction::softmax ? "ec_softmax" : "ec_sigmoid", 1200, 32, 2);
    test.score = score;
    test.global_weight = 0.01f;
    compare_backward(test, params_of(test), true);
    if (IsSkipped()) return;
  }
}

// grad_logits in bf16 with sigmoid scores: the fp32 result rounded to nearest, bit for bit.
TEST(RouteBackwardModernCuda, SigmoidBf16OutputIsTheRoundedFp32Output) {
  SKIP_WITHOUT_CUDA();
  const ModernCase test = make_case("lowp", 1500, 256, 8, [](ModernCase& c) {
    c.score = ScoreFunction::sigmoid;
    c.bias = true;
    c.groups = 8;
    c.topk_groups = 4;
    c.scaling = 2.5f;
  });
  const RoutingParams params = params_of(test);
  Inputs inputs = make_inputs(test, params, 17);
  DeviceTensor logits = to_device(inputs.logits), bias = to_device(inputs.bias);
  RoutingInputs device_inputs;
  device_inputs.selection_bias = &bias.tensor();
  RoutingBuffers buffers(DeviceKind::cuda, DType::f32, test.tokens, test.experts, test.k_max, 0);
  RoutingResult routing = buffers.result(test.tokens);
  cuda::route(logits, device_inputs, params, routing, nullptr);
  std::mt19937_64 generator(5);
  HostTensor grad_gates(DType::f32, {test.tokens, test.k_max});
  fill_normal(grad_gates, generator, 0.0, 1.0);
  DeviceTensor device_grad_gates = to_device(grad_gates);
  DeviceTensor full(DType::f32, {test.tokens, test.experts}), low(DType::bf16, {test.tokens, test.experts});
  cuda::route_backward(logits, device_grad_gates, routing, params, 0.5f, 2.0f, full, nullptr);
  cuda::route_backward(logits, device_grad_gates, routing, params, 0.5f, 2.0f, low, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  HostTensor expected = full.download(), actual = low.download();
  int64_t mismatches = 0;
  for (int64_t index = 0; index < actual.numel(); ++index)
    mismatches += actual.data<uint16_t>()[index] != Bf16(expected.data<float>()[index]).bits;
  EXPECT_EQ(mismatches, 0) << mismatches << " of " << actual.numel() << " differ";
}

// Not a pass/fail check: microseconds per cuda::route call at the DeepSeek-V3 shape, against the
// Switch router on the same logits (both back to back on the default stream).
TEST(RouteModernCuda, TimingDeepSeekV3Shape) {
  SKIP_WITHOUT_CUDA();
  const ModernCase test = make_case("timing", 32768, 256, 8, [](ModernCase& c) {
    c.score = ScoreFunction::sigmoid;
    c.bias = true;
    c.groups = 8;
    c.topk_groups = 4;
    c.scaling = 2.5f;
    c.capacity_factor = 1.25f;
    c.alignment = 128;
  });
  Inputs inputs = make_inputs(test, params_of(test), 3);
  DeviceTensor logits = to_device(inputs.logits), bias = to_device(inputs.bias);
  RoutingBuffers buffers(DeviceKind::cuda, DType::f32, test.tokens, test.experts, test.k_max, 0);
  RoutingResult result = buffers.result(test.tokens);
  ModernCase switch_case = test;
  switch_case.score = ScoreFunction::softmax;
  switch_case.bias = false;
  switch_case.groups = switch_case.topk_groups = 1;
  switch_case.scaling = 1.0f;
  for (const ModernCase* which : {static_cast<const ModernCase*>(&switch_case), &test}) {
    const RoutingParams params = params_of(*which);
    RoutingInputs device_inputs;
    device_inputs.selection_bias = which->bias ? &bias.tensor() : nullptr;
    for (int warmup = 0; warmup < 5; ++warmup) cuda::route(logits, device_inputs, params, result, nullptr);
    cudaEvent_t start, stop;
    ASSERT_EQ(cudaEventCreate(&start), cudaSuccess);
    ASSERT_EQ(cudaEventCreate(&stop), cudaSuccess);
    constexpr int kIterations = 50;
    ASSERT_EQ(cudaEventRecord(start, nullptr), cudaSuccess);
    for (int iteration = 0; iteration < kIterations; ++iteration)
      cuda::route(logits, device_inputs, params, result, nullptr);
    ASSERT_EQ(cudaEventRecord(stop, nullptr), cudaSuccess);
    ASSERT_EQ(cudaEventSynchronize(stop), cudaSuccess);
    float milliseconds = 0.0f;
    ASSERT_EQ(cudaEventElapsedTime(&milliseconds, start, stop), cudaSuccess);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    std::printf("[ timing ] cuda::route 32768 x 256 top-8 %s: %.1f us per call\n",
                which == &test ? "sigmoid + bias + 8 groups (4 kept)" : "Switch (softmax)",
                1000.0 * milliseconds / kIterations);
  }
}

// ---- Layout arithmetic (host only) --------------------------------------------------------------

namespace layout = switchyard::routing_layout;

TEST(RouteModernLayout, LaneLayoutsCoverEveryExpertCount) {
  EXPECT_EQ(kCudaMaxExperts, layout::kMaxExperts);
  for (int experts = 1; experts <= layout::kMaxExperts; ++experts) {
    for (const layout::Lanes lanes : {layout::forward_lanes(experts), layout::row_lanes(experts)}) {
      EXPECT_GE(lanes.group * lanes.per_lane, experts) << experts;
      EXPECT_TRUE(lanes.group >= 1 && lanes.group <= 32 && (lanes.group & (lanes.group - 1)) == 0) << experts;
      EXPECT_EQ(lanes.per_lane % 4, 0) << experts;  // float4 loads
    }
  }
  EXPECT_EQ(layout::forward_lanes(512).group, 32);
  EXPECT_EQ(layout::row_lanes(257).group, 32);
}

// The forward kernel's shared memory fits an H100 block for every E <= 512, K <= 8 and variant,
// with the bias and the largest group scratch (one-expert groups); arrays are 16-byte aligned and
// in order without overlap.
TEST(RouteModernLayout, ForwardSharedMemoryFits) {
  size_t largest = 0;
  for (int experts = 1; experts <= layout::kMaxExperts; ++experts) {
    for (int k = 1; k <= std::min(kMaxTopK, experts); ++k) {
      for (int variant : {layout::kSwitchVariant, layout::kSoftmaxKeyVariant, layout::kSigmoidVariant}) {
        const int warps = layout::forward_max_warps(experts, variant);
        const bool modern = variant != layout::kSwitchVariant;
        const int groups = modern ? layout::group_scratch_floats_per_warp(experts, experts) : 0;
        const layout::ForwardShared shared =
            layout::forward_shared(experts, k, warps, modern ? layout::bias_floats(experts) : 0, groups);
        largest = std::max(largest, shared.bytes);
        ASSERT_LE(shared.bytes, layout::kMaxSharedBytes) << "E " << experts << " K " << k << " variant " << variant;
        const size_t offsets[] = {shared.choice_base, shared.tile_offset, shared.warp_floats, shared.choice_gates,
                                  shared.token_lse, shared.token_norm, shared.bias, shared.group_scratch,
                                  shared.warp_counts, shared.choice_experts, shared.choice_ranks,
                                  shared.token_choices, shared.bytes};
        for (size_t index = 0; index + 1 < std::size(offsets); ++index) {
          EXPECT_EQ(offsets[index] % 16, 0u);
          EXPECT_LE(offsets[index], offsets[index + 1]);
        }
        // Phase 2b reuses warp_floats for 3 rows of E + 1 words.
        EXPECT_GE(shared.choice_gates - shared.warp_floats, size_t(3) * (experts + 1) * 4);
        EXPECT_GE(shared.warp_counts - shared.group_scratch, size_t(warps) * groups * 4);
        EXPECT_GE(shared.bytes - shared.token_choices, size_t(warps) * 32);
      }
    }
  }
  std::printf("largest forward shared memory: %zu bytes\n", largest);
  EXPECT_LE(layout::forward_tile_warps(1 << 20, 512, layout::kSwitchVariant), 8);
  EXPECT_EQ(layout::forward_tile_warps(1 << 20, 64, layout::kSwitchVariant), 16);
  EXPECT_EQ(layout::forward_tile_warps(1 << 20, 64, layout::kSigmoidVariant), 8);
  EXPECT_EQ(layout::forward_tile_warps(100, 64, layout::kSwitchVariant), 1);
}

// Chunks of the sequence loss cover every token once, never straddle sequences, and number at most
// kMaxChunksPerSequence per sequence; the sequence count is routing_num_sequences.
TEST(RouteModernLayout, SequenceChunksPartitionTheTokens) {
  for (int64_t tokens : {0, 1, 127, 128, 129, 700, 2000, 8192, 20000, 100003}) {
    for (int64_t per_sequence : {0, 1, 5, 128, 300, 512, 4096, 9000, 200000}) {
      RoutingParams params;
      params.num_tokens = tokens;
      params.tokens_per_sequence = per_sequence;
      const layout::SequenceChunks chunks = layout::sequence_chunks(tokens, per_sequence);
      ASSERT_EQ(chunks.num_sequences, routing_num_sequences(params)) << tokens << " " << per_sequence;
      EXPECT_LE(chunks.chunks_per_sequence, layout::kMaxChunksPerSequence);
      int64_t covered = 0, lengths = 0;
      for (int64_t s = 0; s < chunks.num_sequences; ++s) lengths += layout::sequence_length(chunks, s);
      EXPECT_EQ(lengths, tokens);
      for (int64_t chunk = 0; chunk < chunks.num_chunks; ++chunk) {
        int64_t begin = 0, end = 0;
        layout::chunk_tokens(chunks, chunk, begin, end);
        const int64_t sequence = chunk / chunks.chunks_per_sequence;
        ASSERT_LE(begin, end);
        EXPECT_LE(end - begin, chunks.chunk_tokens);
        if (begin < end) {
          ASSERT_EQ(begin, covered) << "chunks must tile the tokens in order";
          EXPECT_EQ(begin / chunks.sequence_tokens, sequence);
          EXPECT_EQ((end - 1) / chunks.sequence_tokens, sequence);
        }
        covered = std::max(covered, end);
      }
      EXPECT_EQ(covered, tokens);
    }
  }
}

// Sorting drop keys high to low orders by priority high to low, then GShard slot low to high,
// with -0 and +0 equal.
TEST(RouteModernLayout, DropKeysOrderByPriorityThenSlot) {
  std::mt19937_64 generator(11);
  std::uniform_int_distribution<int> pick(0, 7);
  const float values[] = {0.0f, -0.0f, 1e-30f, 0.125f, 0.5f, 0.5f, 0.75f, 1.0f};
  struct Item {
    float priority;
    int slot;
    uint64_t key;
  };
  std::vector<Item> items;
  for (int slot = 0; slot < 2000; ++slot) {
    const float priority = values[pick(generator)];
    uint32_t bits;
    std::memcpy(&bits, &priority, sizeof(bits));
    items.push_back({priority, slot, layout::drop_sort_key(bits, slot)});
  }
  std::vector<Item> by_key = items, by_rule = items;
  std::sort(by_key.begin(), by_key.end(), [](const Item& a, const Item& b) { return a.key > b.key; });
  std::sort(by_rule.begin(), by_rule.end(), [](const Item& a, const Item& b) {
    return a.priority > b.priority || (a.priority == b.priority && a.slot < b.slot);
  });
  for (size_t index = 0; index < items.size(); ++index) ASSERT_EQ(by_key[index].slot, by_rule[index].slot) << index;
}

}  // namespace
