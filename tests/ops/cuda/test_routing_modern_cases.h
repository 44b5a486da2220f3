// What the tests of the modern routing options on CUDA share (test_routing_modern_cuda.cpp,
// test_routing_modern_backward_cuda.cpp): the case description, its RoutingParams, random inputs
// (logits, complexity, bias; rows of different sharpness, exact ties on request, complexity kept
// away from k_t rounding boundaries), device upload / download / poison, and the comparisons.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "src/core/device.h"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

namespace switchyard {
namespace routing_modern_test {

using namespace switchyard::testing;

inline constexpr double kTolerance = 1e-5;

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

inline ModernCase make_case(const std::string& name, int64_t tokens, int experts, int k_max,
                            const std::function<void(ModernCase&)>& modify = {}) {
  ModernCase test;
  test.name = name;
  test.tokens = tokens;
  test.experts = experts;
  test.k_max = k_max;
  if (modify) modify(test);
  return test;
}

inline RoutingParams params_of(const ModernCase& test) {
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
inline double normalized_entropy(const float* row, int experts, ScoreFunction score) {
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
inline bool near_rounding_boundary(double complexity, const RoutingParams& params) {
  const double clamped = std::min(1.0, std::max(0.0, complexity));
  const double scaled = clamped * double(params.k_max - params.k_min) + 0.5;
  return params.k_max > params.k_min && std::fabs(scaled - std::round(scaled)) < 1e-3;
}

struct Inputs {
  HostTensor logits, complexity, bias;
};

inline Inputs make_inputs(const ModernCase& test, const RoutingParams& params, uint64_t seed) {
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
      for (int e = 0; e < test.experts; ++e)
        row[e] = test.ties ? 0.5f * float(grid(generator)) : scale * normal(generator);
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

inline uint64_t seed_of(const std::string& name) { return std::hash<std::string>{}(name)&0xffffffffu; }

inline HostTensor download(const Tensor& device) {
  HostTensor host(device.dtype, {device.numel()});
  device_copy(host.tensor().data, DeviceKind::cpu, device.data, DeviceKind::cuda, device.bytes());
  return host;
}

inline void upload(const Tensor& host, Tensor& device) {
  ASSERT_EQ(host.bytes(), device.bytes());
  device_copy(device.data, DeviceKind::cuda, host.data, DeviceKind::cpu, host.bytes());
}

inline std::vector<Tensor*> routing_tensors(RoutingResult& result) {
  return {&result.expert_ids,
          &result.gates,
          &result.slots,
          &result.token_k,
          &result.logsumexp,
          &result.expert_counts,
          &result.first_choice_counts,
          &result.prob_sums,
          &result.expert_offsets,
          &result.scalars,
          &result.losses,
          &result.sequence_fractions};
}

// NaN / 0x5EED5EEF: values no correct op writes (-1, a valid slot, is not one of them).
inline void poison_device(Tensor& device) {
  HostTensor host(device.dtype, {device.numel()});
  poison(host);
  upload(host, device);
}

inline void expect_ints_equal(const char* name, const Tensor& expected, const Tensor& device) {
  HostTensor actual = download(device);
  int64_t mismatches = 0, first = -1;
  for (int64_t index = 0; index < expected.numel(); ++index) {
    if (expected.as<int32_t>()[index] == actual.data<int32_t>()[index]) continue;
    if (first < 0) first = index;
    ++mismatches;
  }
  EXPECT_EQ(mismatches, 0) << name << ": " << mismatches << " of " << expected.numel() << " differ; first at " << first
                           << ": expected " << (first >= 0 ? expected.as<int32_t>()[first] : 0) << ", got "
                           << (first >= 0 ? actual.data<int32_t>()[first] : 0);
}

// The first `count` values (all when count < 0).
inline void expect_floats_close(const char* name, const Tensor& expected, const Tensor& device, int64_t count = -1) {
  std::vector<double> want = to_vector(expected), got = to_vector(download(device));
  if (count >= 0) {
    want.resize(size_t(count));
    got.resize(size_t(count));
  }
  const double error = relative_error(got, want);
  EXPECT_LE(error, kTolerance) << name << ": relative error " << error;
}

inline void expect_losses_close(const Tensor& expected, const Tensor& device) {
  HostTensor losses = download(device);
  for (int loss = 0; loss < kNumRoutingLosses; ++loss) {
    const double want = expected.as<float>()[loss], got = losses.data<float>()[loss];
    EXPECT_LE(std::fabs(got - want), kTolerance * std::max(std::fabs(want), 1e-30))
        << "loss " << loss << ": expected " << want << ", got " << got;
  }
}

}  // namespace routing_modern_test
}  // namespace switchyard
