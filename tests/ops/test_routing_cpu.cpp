// CPU routing reference (src/ops/cpu/routing.cpp) against an independent brute-force routing
// written here from the rules in src/ops/moe_ops.h, plus route_backward against float64 central
// finite differences.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <ostream>
#include <random>
#include <vector>

#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

// ---- Brute force ----------------------------------------------------------------------------
// Different algorithms from the reference on purpose: a stable sort for top-k, long double
// softmax, and slots by counting higher-priority choices of the same expert.
struct BruteRouting {
  std::vector<int> expert_ids, slots, token_k, counts, first_choice_counts, offsets;
  std::vector<double> gates, logsumexp, prob_sums;
  int64_t capacity = 0, total_choices = 0, dropped = 0;
  double aux = 0, z = 0;
};

BruteRouting brute_force_route(const std::vector<double>& logits, const RoutingParams& params,
                               const std::vector<double>& complexity) {
  const int64_t tokens = params.num_tokens;
  const int experts = params.num_experts, k_max = params.k_max;
  BruteRouting out;
  out.expert_ids.assign(size_t(tokens * k_max), -1);
  out.slots.assign(size_t(tokens * k_max), -1);
  out.gates.assign(size_t(tokens * k_max), 0.0);
  out.token_k.assign(size_t(tokens), 0);
  out.logsumexp.assign(size_t(tokens), 0.0);
  out.prob_sums.assign(size_t(experts), 0.0);
  out.counts.assign(size_t(experts), 0);
  out.first_choice_counts.assign(size_t(experts), 0);
  long double squared_lse = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    const double* row = logits.data() + t * experts;
    long double max_logit = row[0];
    for (int e = 1; e < experts; ++e) max_logit = std::max<long double>(max_logit, row[e]);
    long double sum = 0;
    for (int e = 0; e < experts; ++e) sum += std::exp((long double)row[e] - max_logit);
    const long double lse = max_logit + std::log(sum);
    std::vector<double> probs(static_cast<size_t>(experts));
    for (int e = 0; e < experts; ++e) probs[size_t(e)] = double(std::exp((long double)row[e] - lse));
    out.logsumexp[size_t(t)] = double(lse);
    squared_lse += lse * lse;
    for (int e = 0; e < experts; ++e) out.prob_sums[size_t(e)] += probs[size_t(e)];

    std::vector<int> order(static_cast<size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[a] > row[b]; });

    int k = k_max;
    if (params.complexity != ComplexityMode::none) {
      double c = 0;
      if (params.complexity == ComplexityMode::given) {
        c = complexity[size_t(t)];
      } else if (experts > 1) {
        for (double p : probs) c -= p > 0 ? p * std::log(p) : 0.0;
        c /= std::log(double(experts));
      }
      c = std::min(1.0, std::max(0.0, c));
      k = params.k_min + int(std::floor(c * (k_max - params.k_min) + 0.5));
    }
    out.token_k[size_t(t)] = k;
    out.total_choices += k;
    out.first_choice_counts[size_t(order[0])]++;
    double kept_sum = 0;
    for (int j = 0; j < k; ++j) kept_sum += probs[size_t(order[size_t(j)])];
    for (int j = 0; j < k; ++j) {
      out.expert_ids[size_t(t * k_max + j)] = order[size_t(j)];
      out.gates[size_t(t * k_max + j)] = probs[size_t(order[size_t(j)])] / (params.renormalize ? kept_sum : 1.0);
      out.counts[size_t(order[size_t(j)])]++;
    }
  }
  out.capacity = params.dropless ? INT32_MAX
                                 : int64_t(std::ceil(double(params.capacity_factor) * double(out.total_choices) /
                                                     double(experts)));
  // slot(t, j) = number of choices of the same expert that come first in GShard order.
  std::vector<std::vector<std::pair<int, int64_t>>> by_expert(static_cast<size_t>(experts));  // (j, t)
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < k_max; ++j)
      if (out.expert_ids[size_t(t * k_max + j)] >= 0) by_expert[size_t(out.expert_ids[size_t(t * k_max + j)])].push_back({j, t});
  for (const auto& list : by_expert) {
    for (const auto& [j, t] : list) {
      int slot = 0;
      for (const auto& [other_j, other_t] : list) slot += (other_j < j || (other_j == j && other_t < t)) ? 1 : 0;
      out.slots[size_t(t * k_max + j)] = slot;
      if (slot >= out.capacity) out.dropped++;
    }
  }
  out.offsets.assign(size_t(experts + 1), 0);
  for (int e = 0; e < experts; ++e) {
    const int64_t kept = std::min<int64_t>(out.counts[size_t(e)], out.capacity);
    const int64_t padded = (kept + params.segment_alignment - 1) / params.segment_alignment * params.segment_alignment;
    out.offsets[size_t(e + 1)] = int(out.offsets[size_t(e)] + padded);
  }
  double balance = 0;
  for (int e = 0; e < experts; ++e)
    balance += (double(out.first_choice_counts[size_t(e)]) / double(tokens)) * (out.prob_sums[size_t(e)] / double(tokens));
  out.aux = double(params.aux_loss_weight) * experts * balance;
  out.z = double(params.z_loss_weight) * double(squared_lse) / double(tokens);
  return out;
}

// ---- Running the reference ------------------------------------------------------------------

struct HostRouting {
  RoutingBuffers buffers;
  RoutingResult result;
  HostRouting(const RoutingParams& params, DType real)
      : buffers(DeviceKind::cpu, real, params.num_tokens, params.num_experts, params.k_max,
                padded_rows_upper_bound(params)),
        result(buffers.result(params.num_tokens)) {
    for (Tensor* tensor : {&result.expert_ids, &result.gates, &result.slots, &result.token_k, &result.logsumexp,
                           &result.expert_counts, &result.first_choice_counts, &result.prob_sums,
                           &result.expert_offsets, &result.scalars, &result.losses})
      poison(*tensor);
  }
};

std::vector<int> to_ints(const Tensor& tensor) {
  std::vector<int> values;
  for (double value : to_vector(tensor)) values.push_back(int(value));
  return values;
}

RoutingParams make_params(int64_t tokens, int experts, int k, bool renormalize = false, bool dropless = false,
                          float capacity_factor = 1.25f, int alignment = 1) {
  RoutingParams params;
  params.num_tokens = tokens;
  params.num_experts = experts;
  params.k_max = k;
  params.k_min = 1;
  params.renormalize = renormalize;
  params.dropless = dropless;
  params.capacity_factor = capacity_factor;
  params.segment_alignment = alignment;
  params.aux_loss_weight = 0.01f;
  params.z_loss_weight = 0.001f;
  return params;
}

// Routes `logits` (values given in double; stored as `real`) and compares with brute force.
void expect_matches_brute_force(const std::vector<double>& logit_values, const RoutingParams& params, DType real,
                                const std::vector<double>& complexity_values = {}) {
  HostTensor logits(real, {params.num_tokens, params.num_experts});
  for (size_t index = 0; index < logit_values.size(); ++index) set_element(logits, int64_t(index), logit_values[index]);
  HostTensor complexity(real, {params.num_tokens});
  for (size_t index = 0; index < complexity_values.size(); ++index)
    set_element(complexity, int64_t(index), complexity_values[index]);
  // Brute force sees the values exactly as stored (f32 rounding included).
  const std::vector<double> stored_logits = to_vector(logits), stored_complexity = to_vector(complexity);
  BruteRouting expected = brute_force_route(stored_logits, params, stored_complexity);

  HostRouting routing(params, real);
  cpu::route(logits, params.complexity == ComplexityMode::given ? &complexity.tensor() : nullptr, params,
             routing.result);
  const RoutingResult& result = routing.result;
  const double tolerance = real == DType::f64 ? 1e-12 : 2e-6;

  EXPECT_EQ(to_ints(result.expert_ids), expected.expert_ids);
  EXPECT_EQ(to_ints(result.slots), expected.slots);
  EXPECT_EQ(to_ints(result.token_k), expected.token_k);
  EXPECT_EQ(to_ints(result.expert_counts), expected.counts);
  EXPECT_EQ(to_ints(result.first_choice_counts), expected.first_choice_counts);
  EXPECT_EQ(to_ints(result.expert_offsets), expected.offsets);
  EXPECT_LE(max_abs_difference(to_vector(result.gates), expected.gates), tolerance);
  EXPECT_LE(relative_error(to_vector(result.logsumexp), expected.logsumexp), tolerance);
  EXPECT_LE(relative_error(to_vector(result.prob_sums), expected.prob_sums), tolerance);
  const std::vector<int> scalars = to_ints(result.scalars);
  EXPECT_EQ(scalars[kCapacity], expected.capacity);
  EXPECT_EQ(scalars[kTotalChoices], expected.total_choices);
  EXPECT_EQ(scalars[kDroppedChoices], expected.dropped);
  EXPECT_EQ(scalars[kPaddedRows], expected.offsets.back());
  EXPECT_LE(scalars[kPaddedRows], padded_rows_upper_bound(params));
  EXPECT_NEAR(get_element(result.losses, kAuxLoss), expected.aux, tolerance * std::max(1.0, expected.aux));
  EXPECT_NEAR(get_element(result.losses, kZLoss), expected.z, tolerance * std::max(1.0, expected.z));
}

std::vector<double> random_logits(int64_t tokens, int experts, uint64_t seed, double stddev = 2.0) {
  std::mt19937_64 generator(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  std::vector<double> values(static_cast<size_t>(tokens * experts));
  for (double& value : values) value = normal(generator);
  return values;
}

struct RoutingCase {
  int64_t tokens;
  int experts, k;
  bool renormalize, dropless;
  float capacity_factor;
  int alignment;
  DType real;
};

void PrintTo(const RoutingCase& c, std::ostream* os) {
  *os << "T=" << c.tokens << " E=" << c.experts << " k=" << c.k << (c.renormalize ? " renormalize" : "")
      << (c.dropless ? " dropless" : "") << " cf=" << c.capacity_factor << " align=" << c.alignment << " "
      << dtype_name(c.real);
}

class RoutingMatchesBruteForce : public ::testing::TestWithParam<RoutingCase> {};

TEST_P(RoutingMatchesBruteForce, RandomLogits) {
  const RoutingCase& c = GetParam();
  RoutingParams params = make_params(c.tokens, c.experts, c.k, c.renormalize, c.dropless, c.capacity_factor, c.alignment);
  expect_matches_brute_force(random_logits(c.tokens, c.experts, 1000 + uint64_t(c.tokens * 7 + c.experts + c.k)), params,
                             c.real);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RoutingMatchesBruteForce,
    ::testing::Values(RoutingCase{37, 4, 1, false, false, 1.25f, 1, DType::f64},
                      RoutingCase{37, 4, 2, true, false, 1.0f, 8, DType::f64},
                      RoutingCase{37, 4, 4, true, false, 1.1f, 3, DType::f32},
                      RoutingCase{1, 4, 2, true, false, 1.25f, 4, DType::f64},          // one token
                      RoutingCase{1000, 4, 2, false, false, 0.5f, 1, DType::f64},       // heavy drops
                      RoutingCase{1000, 8, 8, false, true, 1.0f, 128, DType::f32},      // dropless, k = E
                      RoutingCase{1000, 256, 8, true, false, 1.25f, 128, DType::f64},
                      RoutingCase{1000, 256, 1, false, false, 1.0f, 16, DType::f32},
                      RoutingCase{37, 256, 8, false, false, 2.0f, 128, DType::f64}));  // empty experts

TEST(Routing, ExpertWithNoTokensGetsAnEmptySegment) {
  RoutingParams params = make_params(37, 256, 1, false, false, 1.25f, 16);
  std::vector<double> logits = random_logits(37, 256, 5);
  HostTensor logit_tensor(DType::f64, {37, 256});
  for (size_t i = 0; i < logits.size(); ++i) set_element(logit_tensor, int64_t(i), logits[i]);
  HostRouting routing(params, DType::f64);
  cpu::route(logit_tensor, nullptr, params, routing.result);
  const std::vector<int> counts = to_ints(routing.result.expert_counts), offsets = to_ints(routing.result.expert_offsets);
  int empty = 0;
  for (int e = 0; e < 256; ++e) {
    if (counts[size_t(e)] == 0) {
      ++empty;
      EXPECT_EQ(offsets[size_t(e)], offsets[size_t(e + 1)]) << "expert " << e;
    } else {
      EXPECT_EQ(offsets[size_t(e + 1)] - offsets[size_t(e)], 16 * ((counts[size_t(e)] + 15) / 16));
    }
  }
  EXPECT_GT(empty, 200);  // 37 tokens over 256 experts
}

TEST(Routing, AllTokensToOneExpertOverflowCapacity) {
  const int64_t tokens = 37;
  RoutingParams params = make_params(tokens, 4, 1, false, false, 1.25f, 8);
  std::vector<double> logits = random_logits(tokens, 4, 9, 0.5);
  for (int64_t t = 0; t < tokens; ++t) logits[size_t(t * 4 + 2)] += 10.0;
  expect_matches_brute_force(logits, params, DType::f64);

  HostTensor logit_tensor(DType::f64, {tokens, 4});
  for (size_t i = 0; i < logits.size(); ++i) set_element(logit_tensor, int64_t(i), logits[i]);
  HostRouting routing(params, DType::f64);
  cpu::route(logit_tensor, nullptr, params, routing.result);
  const std::vector<int> scalars = to_ints(routing.result.scalars);
  EXPECT_EQ(scalars[kCapacity], 12);  // ceil(1.25 * 37 / 4)
  EXPECT_EQ(scalars[kDroppedChoices], 37 - 12);
  EXPECT_EQ(to_ints(routing.result.expert_counts), (std::vector<int>{0, 0, 37, 0}));
  EXPECT_EQ(to_ints(routing.result.expert_offsets), (std::vector<int>{0, 0, 0, 16, 16}));
  // Slots follow token order; tokens 12.. are the dropped ones.
  for (int64_t t = 0; t < tokens; ++t) EXPECT_EQ(get_element(routing.result.slots, t), double(t));

  params.dropless = true;
  HostRouting dropless(params, DType::f64);
  cpu::route(logit_tensor, nullptr, params, dropless.result);
  EXPECT_EQ(get_element(dropless.result.scalars, kDroppedChoices), 0.0);
  EXPECT_EQ(get_element(dropless.result.scalars, kCapacity), double(INT32_MAX));
  EXPECT_EQ(to_ints(dropless.result.expert_offsets), (std::vector<int>{0, 0, 0, 40, 40}));
}

TEST(Routing, CapacityOverflowWithTwoChoicesDropsSecondChoicesFirst) {
  // Every token picks experts 0 then 1: choice 0 of all tokens outranks every choice 1.
  const int64_t tokens = 20;
  RoutingParams params = make_params(tokens, 4, 2, true, false, 1.0f, 1);  // capacity = ceil(40 / 4) = 10
  std::vector<double> logits(size_t(tokens * 4));
  for (int64_t t = 0; t < tokens; ++t) {
    logits[size_t(t * 4 + 0)] = 3.0 + 0.01 * double(t);
    logits[size_t(t * 4 + 1)] = 2.0;
    logits[size_t(t * 4 + 2)] = -1.0;
    logits[size_t(t * 4 + 3)] = -2.0 - 0.01 * double(t);
  }
  expect_matches_brute_force(logits, params, DType::f64);
  HostTensor logit_tensor(DType::f64, {tokens, 4});
  for (size_t i = 0; i < logits.size(); ++i) set_element(logit_tensor, int64_t(i), logits[i]);
  HostRouting routing(params, DType::f64);
  cpu::route(logit_tensor, nullptr, params, routing.result);
  EXPECT_EQ(get_element(routing.result.scalars, kCapacity), 10.0);
  EXPECT_EQ(get_element(routing.result.scalars, kDroppedChoices), 20.0);  // 10 of expert 0, 10 of expert 1
  EXPECT_EQ(get_element(routing.result.slots, 0 * 2 + 0), 0.0);
  EXPECT_EQ(get_element(routing.result.slots, 15 * 2 + 0), 15.0);  // dropped: slot >= 10
  EXPECT_EQ(get_element(routing.result.slots, 3 * 2 + 1), 3.0);
}

TEST(Routing, TiesGoToTheLowerExpertIndex) {
  RoutingParams params = make_params(5, 8, 3, false, true);
  std::vector<double> logits(40, 0.25);
  HostTensor logit_tensor(DType::f32, {5, 8});
  for (size_t i = 0; i < logits.size(); ++i) set_element(logit_tensor, int64_t(i), logits[i]);
  set_element(logit_tensor, 1 * 8 + 6, 1.0);  // token 1: expert 6 first, then 0, 1
  HostRouting routing(params, DType::f32);
  cpu::route(logit_tensor, nullptr, params, routing.result);
  EXPECT_EQ(to_ints(routing.result.expert_ids),
            (std::vector<int>{0, 1, 2, 6, 0, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2}));
  EXPECT_NEAR(get_element(routing.result.gates, 0), 1.0 / 8.0, 1e-7);
  params.renormalize = true;
  HostRouting renormalized(params, DType::f32);
  cpu::route(logit_tensor, nullptr, params, renormalized.result);
  EXPECT_NEAR(get_element(renormalized.result.gates, 0), 1.0 / 3.0, 1e-7);
  double sum = 0;
  for (int j = 0; j < 3; ++j) sum += get_element(renormalized.result.gates, 1 * 3 + j);
  EXPECT_NEAR(sum, 1.0, 1e-6);
}

TEST(Routing, GivenComplexityExtremesPickKMinAndKMax) {
  const int64_t tokens = 100;
  RoutingParams params = make_params(tokens, 8, 4, true, false, 1.0f, 4);
  params.complexity = ComplexityMode::given;
  params.k_min = 1;
  const std::vector<double> logits = random_logits(tokens, 8, 21);
  for (double c : {0.0, 1.0, -3.0, 7.0}) {  // out-of-range values clamp
    HostTensor logit_tensor(DType::f64, {tokens, 8}), complexity(DType::f64, {tokens});
    for (size_t i = 0; i < logits.size(); ++i) set_element(logit_tensor, int64_t(i), logits[i]);
    for (int64_t t = 0; t < tokens; ++t) set_element(complexity, t, c);
    HostRouting routing(params, DType::f64);
    cpu::route(logit_tensor, &complexity.tensor(), params, routing.result);
    const int expected_k = c <= 0.0 ? 1 : 4;
    for (int64_t t = 0; t < tokens; ++t) ASSERT_EQ(get_element(routing.result.token_k, t), double(expected_k));
    for (int64_t t = 0; t < tokens; ++t)
      for (int j = expected_k; j < 4; ++j) {
        EXPECT_EQ(get_element(routing.result.expert_ids, t * 4 + j), -1.0);
        EXPECT_EQ(get_element(routing.result.gates, t * 4 + j), 0.0);
        EXPECT_EQ(get_element(routing.result.slots, t * 4 + j), -1.0);
      }
    // Capacity counts the choices actually made.
    EXPECT_EQ(get_element(routing.result.scalars, kTotalChoices), double(tokens * expected_k));
    EXPECT_EQ(get_element(routing.result.scalars, kCapacity), std::ceil(double(tokens * expected_k) / 8.0));
  }
}

TEST(Routing, MeanChoicesFollowGivenComplexity) {
  const int64_t tokens = 1000;
  RoutingParams params = make_params(tokens, 16, 5, false, false, 1.25f, 8);
  params.complexity = ComplexityMode::given;
  params.k_min = 1;
  // Constant levels give exactly k_min + round(c * (k_max - k_min)).
  for (const auto& [c, k] : std::vector<std::pair<double, int>>{{0.0, 1}, {0.3, 2}, {0.5, 3}, {0.7, 4}, {1.0, 5}}) {
    std::vector<double> complexity(size_t(tokens), c);
    HostTensor logit_tensor(DType::f64, {tokens, 16}), complexity_tensor(DType::f64, {tokens});
    const std::vector<double> logits = random_logits(tokens, 16, 77);
    for (size_t i = 0; i < logits.size(); ++i) set_element(logit_tensor, int64_t(i), logits[i]);
    for (int64_t t = 0; t < tokens; ++t) set_element(complexity_tensor, t, c);
    HostRouting routing(params, DType::f64);
    cpu::route(logit_tensor, &complexity_tensor.tensor(), params, routing.result);
    EXPECT_EQ(get_element(routing.result.scalars, kTotalChoices), double(tokens * k)) << "c = " << c;
  }
  // Random levels: brute force agrees token by token, and the mean follows the mean level.
  std::mt19937_64 generator(3);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<double> complexity(static_cast<size_t>(tokens));
  double mean_c = 0;
  for (double& value : complexity) {
    value = uniform(generator);
    mean_c += value / double(tokens);
  }
  const std::vector<double> logits = random_logits(tokens, 16, 78);
  expect_matches_brute_force(logits, params, DType::f64, complexity);
  HostTensor logit_tensor(DType::f64, {tokens, 16}), complexity_tensor(DType::f64, {tokens});
  for (size_t i = 0; i < logits.size(); ++i) set_element(logit_tensor, int64_t(i), logits[i]);
  for (int64_t t = 0; t < tokens; ++t) set_element(complexity_tensor, t, complexity[size_t(t)]);
  HostRouting routing(params, DType::f64);
  cpu::route(logit_tensor, &complexity_tensor.tensor(), params, routing.result);
  const double mean_k = get_element(routing.result.scalars, kTotalChoices) / double(tokens);
  EXPECT_NEAR(mean_k, 1.0 + 4.0 * mean_c, 0.05);
}

TEST(Routing, EntropyComplexityUsesKMaxWhenUnsureAndKMinWhenSure) {
  const int64_t tokens = 6;
  RoutingParams params = make_params(tokens, 8, 4, false, true);
  params.complexity = ComplexityMode::entropy;
  params.k_min = 2;
  HostTensor logits(DType::f64, {tokens, 8});
  for (int64_t t = 0; t < tokens; ++t)
    for (int e = 0; e < 8; ++e) set_element(logits, t * 8 + e, t < 3 ? 0.5 : (e == int(t) ? 40.0 : 0.0));
  HostRouting routing(params, DType::f64);
  cpu::route(logits, nullptr, params, routing.result);
  EXPECT_EQ(to_ints(routing.result.token_k), (std::vector<int>{4, 4, 4, 2, 2, 2}));
  // Random logits: token-by-token agreement with brute force.
  RoutingParams random_params = make_params(500, 16, 6, true, false, 1.25f, 8);
  random_params.complexity = ComplexityMode::entropy;
  random_params.k_min = 1;
  expect_matches_brute_force(random_logits(500, 16, 31, 1.5), random_params, DType::f64);
  expect_matches_brute_force(random_logits(500, 16, 32, 1.5), random_params, DType::f32);
}

TEST(Routing, F32AndF64ReferencesAgree) {
  RoutingParams params = make_params(300, 32, 4, true, false, 1.0f, 8);
  const std::vector<double> logits = random_logits(300, 32, 55);
  HostTensor logits32(DType::f32, {300, 32}), logits64(DType::f64, {300, 32});
  for (size_t i = 0; i < logits.size(); ++i) {
    set_element(logits32, int64_t(i), logits[i]);
    set_element(logits64, int64_t(i), double(float(logits[i])));  // identical values
  }
  HostRouting single(params, DType::f32), dual(params, DType::f64);
  cpu::route(logits32, nullptr, params, single.result);
  cpu::route(logits64, nullptr, params, dual.result);
  EXPECT_EQ(to_ints(single.result.expert_ids), to_ints(dual.result.expert_ids));
  EXPECT_EQ(to_ints(single.result.slots), to_ints(dual.result.slots));
  EXPECT_LE(relative_error(single.result.gates, dual.result.gates), 1e-6);
  EXPECT_LE(relative_error(single.result.losses, dual.result.losses), 1e-6);
}

TEST(Routing, PaddedRowsUpperBoundHoldsAndIsTight) {
  std::mt19937_64 generator(11);
  for (int trial = 0; trial < 60; ++trial) {
    const int experts = 1 << (trial % 6);
    const int k = 1 + int(generator() % uint64_t(std::min(experts, 8)));
    const int64_t tokens = 1 + int64_t(generator() % 300);
    RoutingParams params = make_params(tokens, experts, k, false, trial % 5 == 0, 0.25f + float(trial % 7) * 0.3f,
                                       1 + int(generator() % 64));
    // Skewed logits pile choices onto few experts, where padding and capacity matter most.
    std::vector<double> logits = random_logits(tokens, experts, uint64_t(trial), 1.0 + double(trial % 4) * 3.0);
    HostTensor logit_tensor(DType::f64, {tokens, experts});
    for (size_t i = 0; i < logits.size(); ++i) set_element(logit_tensor, int64_t(i), logits[i]);
    HostRouting routing(params, DType::f64);
    cpu::route(logit_tensor, nullptr, params, routing.result);
    ASSERT_LE(get_element(routing.result.scalars, kPaddedRows), double(padded_rows_upper_bound(params)))
        << "trial " << trial;
  }
  // Tight: four tokens on four distinct experts, each padded to 8 rows.
  RoutingParams params = make_params(4, 4, 1, false, true, 1.0f, 8);
  HostTensor logits(DType::f64, {4, 4});
  for (int64_t t = 0; t < 4; ++t)
    for (int e = 0; e < 4; ++e) set_element(logits, t * 4 + e, e == int(t) ? 1.0 : 0.0);
  HostRouting routing(params, DType::f64);
  cpu::route(logits, nullptr, params, routing.result);
  EXPECT_EQ(get_element(routing.result.scalars, kPaddedRows), 32.0);
  EXPECT_EQ(padded_rows_upper_bound(params), 32);
  EXPECT_EQ(padded_rows_upper_bound(make_params(0, 4, 2)), 0);
}

TEST(Routing, RejectsBadParamsAndTensors) {
  auto expect_bad_input = [](const RoutingParams& params) {
    try {
      padded_rows_upper_bound(params);
      ADD_FAILURE() << "no throw";
    } catch (const Error& error) {
      EXPECT_EQ(error.exit_code(), kExitBadInput) << error.what();
    }
  };
  expect_bad_input(make_params(10, 4, 5));            // k > E
  expect_bad_input(make_params(10, 16, 9));           // k > 8
  expect_bad_input(make_params(10, 4, 2, false, false, 0.0f));
  expect_bad_input(make_params(10, 4, 2, false, false, 1.0f, 0));
  expect_bad_input(make_params(10, 0, 1));
  RoutingParams complexity = make_params(10, 4, 2);
  complexity.complexity = ComplexityMode::entropy;
  complexity.k_min = 3;
  expect_bad_input(complexity);

  RoutingParams params = make_params(10, 4, 2);
  HostRouting routing(params, DType::f32);
  HostTensor wrong_shape(DType::f32, {10, 5}), wrong_dtype(DType::f64, {10, 4}), bf16(DType::bf16, {10, 4});
  EXPECT_THROW(cpu::route(wrong_shape, nullptr, params, routing.result), Error);
  EXPECT_THROW(cpu::route(wrong_dtype, nullptr, params, routing.result), Error);  // gates are f32
  EXPECT_THROW(cpu::route(bf16, nullptr, params, routing.result), Error);
  params.complexity = ComplexityMode::given;
  HostTensor logits(DType::f32, {10, 4});
  std::mt19937_64 generator(1);
  fill_uniform(logits, generator, -1, 1);
  EXPECT_THROW(cpu::route(logits, nullptr, params, routing.result), Error);  // given needs the tensor
}

// ---- route_backward --------------------------------------------------------------------------

// L(logits) = sum_{kept (t, j)} G[t, j] gate[t, j] + a * aux + b * z, evaluated by routing afresh.
double routing_objective(const Tensor& logits, const RoutingParams& params, const std::vector<double>& grad_gates,
                         double aux_scale, double z_scale, const Tensor* complexity) {
  HostRouting routing(params, DType::f64);
  cpu::route(logits, complexity, params, routing.result);
  const double capacity = get_element(routing.result.scalars, kCapacity);
  double sum = 0;
  for (int64_t index = 0; index < params.num_tokens * params.k_max; ++index) {
    const double slot = get_element(routing.result.slots, index);
    if (get_element(routing.result.expert_ids, index) >= 0 && slot < capacity)
      sum += grad_gates[size_t(index)] * get_element(routing.result.gates, index);
  }
  return sum + aux_scale * get_element(routing.result.losses, kAuxLoss) +
         z_scale * get_element(routing.result.losses, kZLoss);
}

struct BackwardCase {
  int k;
  bool renormalize;
  float capacity_factor;  // small: drops
  ComplexityMode complexity;
  double aux_scale, z_scale;
};

void PrintTo(const BackwardCase& c, std::ostream* os) {
  *os << "k=" << c.k << (c.renormalize ? " renormalize" : "") << " cf=" << c.capacity_factor << " complexity="
      << int(c.complexity) << " aux_scale=" << c.aux_scale << " z_scale=" << c.z_scale;
}

class RouteBackwardMatchesFiniteDifferences : public ::testing::TestWithParam<BackwardCase> {};

TEST_P(RouteBackwardMatchesFiniteDifferences, AllLogits) {
  const BackwardCase& c = GetParam();
  const int64_t tokens = 24;
  const int experts = 6;
  RoutingParams params = make_params(tokens, experts, c.k, c.renormalize, false, c.capacity_factor, 2);
  params.complexity = c.complexity;
  params.k_min = 1;
  params.aux_loss_weight = 0.3f;  // large weights so both loss terms matter in the check
  params.z_loss_weight = 0.05f;
  // Well-separated logits (gaps >= 0.2 between any two of a token) so no choice flips under the
  // 1e-6 perturbation; given complexity is kept away from the rounding boundaries.
  std::mt19937_64 generator(uint64_t(c.k * 10 + (c.renormalize ? 1 : 0)));
  HostTensor logits(DType::f64, {tokens, experts}), complexity(DType::f64, {tokens});
  std::uniform_real_distribution<double> jitter(-0.05, 0.05);
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int> rank(static_cast<size_t>(experts));
    std::iota(rank.begin(), rank.end(), 0);
    std::shuffle(rank.begin(), rank.end(), generator);
    for (int e = 0; e < experts; ++e) set_element(logits, t * experts + e, 0.3 * rank[size_t(e)] + jitter(generator));
    const int level = int(generator() % uint64_t(c.k));
    set_element(complexity, t, c.k > 1 ? double(level) / double(c.k - 1) : 0.0);
  }
  std::vector<double> grad_gate_values(static_cast<size_t>(tokens * c.k));
  std::normal_distribution<double> normal(0.0, 1.0);
  for (double& value : grad_gate_values) value = normal(generator);
  const Tensor* complexity_tensor = c.complexity == ComplexityMode::given ? &complexity.tensor() : nullptr;

  HostRouting routing(params, DType::f64);
  cpu::route(logits, complexity_tensor, params, routing.result);
  if (c.capacity_factor < 1.0f) ASSERT_GT(get_element(routing.result.scalars, kDroppedChoices), 0.0);
  HostTensor grad_gates(DType::f64, {tokens, c.k}), grad_logits(DType::f64, {tokens, experts});
  for (size_t i = 0; i < grad_gate_values.size(); ++i) set_element(grad_gates, int64_t(i), grad_gate_values[i]);
  poison(grad_logits);
  cpu::route_backward(logits, grad_gates, routing.result, params, float(c.aux_scale), float(c.z_scale), grad_logits);

  auto objective = [&] {
    return routing_objective(logits, params, grad_gate_values, c.aux_scale, c.z_scale, complexity_tensor);
  };
  const std::vector<double> numeric = central_difference_gradient(objective, logits, 1e-6);
  EXPECT_LE(relative_error(to_vector(grad_logits), numeric), 1e-6);
  double norm = 0;
  for (double value : numeric) norm += value * value;
  EXPECT_GT(norm, 1e-6);  // the check is not vacuous
}

INSTANTIATE_TEST_SUITE_P(
    Cases, RouteBackwardMatchesFiniteDifferences,
    ::testing::Values(BackwardCase{1, false, 2.0f, ComplexityMode::none, 1.0, 1.0},
                      BackwardCase{2, true, 2.0f, ComplexityMode::none, 1.0, 1.0},
                      BackwardCase{2, true, 0.5f, ComplexityMode::none, 1.0, 1.0},   // drops
                      BackwardCase{3, false, 0.6f, ComplexityMode::none, 0.0, 2.5},  // drops, z only
                      BackwardCase{4, true, 1.0f, ComplexityMode::given, 3.0, 0.0},
                      BackwardCase{3, true, 0.7f, ComplexityMode::given, 1.0, 1.0}));

}  // namespace
