// Expert-choice routing's CPU reference (src/ops/cpu/expert_choice.cpp) against hand-checked cases
// and an independent brute force written here from src/ops/moe_ops.h (a token is taken when fewer
// than C tokens outrank it, keeps by repeated selection, slots by counting), invariants on larger
// random batches, f32 against f64, the parameter rules, the gates' gradient through
// cpu::route_backward by float64 central differences, and the row moves and the small-batch path
// on a routing where tokens have no expert (k_t = 0).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "src/ops/routing_math.h"
#include "src/ops/small_batch_ops.h"
#include "tests/support/expect_error.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

RoutingParams ec_params(int64_t tokens, int experts, int k, float capacity_factor, bool sigmoid = false,
                        bool renormalize = false, int alignment = 1, float scaling = 1.0f) {
  RoutingParams params;
  params.method = RoutingMethod::expert_choice;
  params.num_tokens = tokens;
  params.num_experts = experts;
  params.k_max = k;
  params.capacity_factor = capacity_factor;
  params.score_function = sigmoid ? ScoreFunction::sigmoid : ScoreFunction::softmax;
  params.renormalize = renormalize;
  params.segment_alignment = alignment;
  params.routed_scaling_factor = scaling;
  params.aux_loss_weight = 0.01f;
  params.z_loss_weight = 0.001f;
  return params;
}

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

HostTensor logits_tensor(const std::vector<double>& values, int64_t tokens, int experts, DType real) {
  HostTensor logits(real, {tokens, experts});
  for (size_t index = 0; index < values.size(); ++index) set_element(logits, int64_t(index), values[index]);
  return logits;
}

std::vector<int> ints(const Tensor& tensor) {
  std::vector<int> values;
  for (double value : to_vector(tensor)) values.push_back(int(value));
  return values;
}

std::vector<double> random_logits(int64_t tokens, int experts, uint64_t seed, double stddev = 1.5) {
  std::mt19937_64 generator(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  std::vector<double> values(static_cast<size_t>(tokens * experts));
  for (double& value : values) value = normal(generator);
  return values;
}

// ---- Brute force ---------------------------------------------------------------------------

struct Brute {
  std::vector<int> expert_ids, slots, token_k, counts, first_choice_counts, offsets;
  std::vector<double> gates, logsumexp, prob_sums;
  int64_t capacity = 0, total = 0, dropped = 0;
  double aux = 0, z = 0;
};

Brute brute_force(const std::vector<double>& logits, const RoutingParams& params) {
  const int64_t tokens = params.num_tokens;
  const int experts = params.num_experts, k_max = params.k_max;
  const bool sigmoid = params.score_function == ScoreFunction::sigmoid;
  Brute out;
  // Priorities: the fp32 definition of routing_math.h on the logits rounded to float.
  std::vector<float> priority(logits.size());
  std::vector<long double> score(logits.size());
  out.logsumexp.assign(size_t(tokens), 0.0);
  out.prob_sums.assign(size_t(experts), 0.0);
  long double squares = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    const double* row = logits.data() + t * experts;
    float m = float(row[0]);
    for (int e = 1; e < experts; ++e) m = std::max(m, float(row[e]));
    const float denominator = routing_softmax_denominator(experts, m, [&](int e) { return float(row[e]); });
    long double max_logit = row[0], sum = 0, sigmoid_sum = 0;
    for (int e = 1; e < experts; ++e) max_logit = std::max<long double>(max_logit, row[e]);
    for (int e = 0; e < experts; ++e) sum += std::exp((long double)row[e] - max_logit);
    const long double lse = max_logit + std::log(sum);
    out.logsumexp[size_t(t)] = double(lse);
    squares += lse * lse;
    for (int e = 0; e < experts; ++e) {
      const size_t at = size_t(t * experts + e);
      priority[at] = sigmoid ? routing_sigmoid(float(row[e])) : routing_softmax_priority(float(row[e]), m, denominator);
      score[at] = sigmoid ? 1.0L / (1.0L + std::exp(-(long double)row[e])) : std::exp((long double)row[e] - lse);
      sigmoid_sum += score[at];
    }
    for (int e = 0; e < experts; ++e)
      out.prob_sums[size_t(e)] += double(sigmoid ? score[size_t(t * experts + e)] / sigmoid_sum
                                                 : score[size_t(t * experts + e)]);
  }
  out.capacity = std::min<int64_t>(
      tokens, int64_t(std::ceil(double(params.capacity_factor) * double(tokens * k_max) / double(experts))));
  auto q = [&](int64_t t, int e) { return priority[size_t(t * experts + e)]; };
  // taken[t][e]: fewer than C tokens outrank t for e (higher priority, or equal and earlier).
  std::vector<std::vector<char>> taken(size_t(tokens), std::vector<char>(size_t(experts), 0));
  int64_t picks = 0;
  for (int e = 0; e < experts; ++e)
    for (int64_t t = 0; t < tokens; ++t) {
      int64_t ahead = 0;
      for (int64_t other = 0; other < tokens; ++other)
        ahead += (q(other, e) > q(t, e) || (q(other, e) == q(t, e) && other < t)) ? 1 : 0;
      taken[size_t(t)][size_t(e)] = ahead < out.capacity;
      picks += ahead < out.capacity ? 1 : 0;
    }
  out.expert_ids.assign(size_t(tokens * k_max), -1);
  out.slots.assign(size_t(tokens * k_max), -1);
  out.gates.assign(size_t(tokens * k_max), 0.0);
  out.token_k.assign(size_t(tokens), 0);
  out.counts.assign(size_t(experts), 0);
  out.first_choice_counts.assign(size_t(experts), 0);
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<char> left = taken[size_t(t)];
    int k = 0;
    long double kept_sum = 0;
    for (; k < k_max; ++k) {  // repeated selection: the best remaining taker, ties to the lower id
      int best = -1;
      for (int e = 0; e < experts; ++e)
        if (left[size_t(e)] && (best < 0 || q(t, e) > q(t, best))) best = e;
      if (best < 0) break;
      left[size_t(best)] = 0;
      out.expert_ids[size_t(t * k_max + k)] = best;
      kept_sum += score[size_t(t * experts + best)];
    }
    out.token_k[size_t(t)] = k;
    out.total += k;
    if (k > 0) out.first_choice_counts[size_t(out.expert_ids[size_t(t * k_max)])]++;
    for (int j = 0; j < k; ++j) {
      const int e = out.expert_ids[size_t(t * k_max + j)];
      out.gates[size_t(t * k_max + j)] = double(score[size_t(t * experts + e)] / (params.renormalize ? kept_sum : 1.0L) *
                                                params.routed_scaling_factor);
      out.counts[size_t(e)]++;
    }
  }
  for (int64_t t = 0; t < tokens; ++t)  // slot: kept tokens of the same expert before t
    for (int j = 0; j < out.token_k[size_t(t)]; ++j) {
      const int e = out.expert_ids[size_t(t * k_max + j)];
      int slot = 0;
      for (int64_t other = 0; other < t; ++other)
        for (int i = 0; i < k_max; ++i) slot += out.expert_ids[size_t(other * k_max + i)] == e ? 1 : 0;
      out.slots[size_t(t * k_max + j)] = slot;
    }
  out.dropped = picks - out.total;
  out.offsets.assign(size_t(experts + 1), 0);
  const int a = params.segment_alignment;
  for (int e = 0; e < experts; ++e) out.offsets[size_t(e + 1)] = out.offsets[size_t(e)] + (out.counts[size_t(e)] + a - 1) / a * a;
  double balance = 0;
  for (int e = 0; e < experts; ++e)
    balance += double(out.first_choice_counts[size_t(e)]) / double(tokens) * out.prob_sums[size_t(e)] / double(tokens);
  out.aux = tokens ? double(params.aux_loss_weight) * experts * balance : 0.0;
  out.z = tokens ? double(params.z_loss_weight) * double(squares) / double(tokens) : 0.0;
  return out;
}

void expect_matches_brute_force(const std::vector<double>& values, const RoutingParams& params, DType real) {
  HostTensor logits = logits_tensor(values, params.num_tokens, params.num_experts, real);
  const Brute want = brute_force(to_vector(logits), params);  // the values as stored
  HostRouting routing(params, real);
  cpu::route_expert_choice(logits, {}, params, routing.result);
  const RoutingResult& got = routing.result;
  const double tolerance = real == DType::f64 ? 1e-12 : 2e-6;
  EXPECT_EQ(ints(got.expert_ids), want.expert_ids);
  EXPECT_EQ(ints(got.slots), want.slots);
  EXPECT_EQ(ints(got.token_k), want.token_k);
  EXPECT_EQ(ints(got.expert_counts), want.counts);
  EXPECT_EQ(ints(got.first_choice_counts), want.first_choice_counts);
  EXPECT_EQ(ints(got.expert_offsets), want.offsets);
  EXPECT_LE(max_abs_difference(to_vector(got.gates), want.gates), tolerance);
  EXPECT_LE(relative_error(to_vector(got.logsumexp), want.logsumexp), tolerance);
  EXPECT_LE(relative_error(to_vector(got.prob_sums), want.prob_sums), tolerance);
  const std::vector<int> scalars = ints(got.scalars);
  EXPECT_EQ(scalars[kCapacity], want.capacity);
  EXPECT_EQ(scalars[kTotalChoices], want.total);
  EXPECT_EQ(scalars[kDroppedChoices], want.dropped);
  EXPECT_EQ(scalars[kPaddedRows], want.offsets.back());
  EXPECT_LE(scalars[kPaddedRows], padded_rows_upper_bound(params));
  EXPECT_NEAR(get_element(got.losses, kAuxLoss), want.aux, tolerance * std::max(1.0, want.aux));
  EXPECT_NEAR(get_element(got.losses, kZLoss), want.z, tolerance * std::max(1.0, want.z));
  EXPECT_EQ(get_element(got.losses, kSeqAuxLoss), 0.0);
  EXPECT_EQ(get_element(got.losses, kGlobalAuxLoss), 0.0);
}

// The hand case: sigmoid scores (monotone in each logit, experts independent), T = 6, E = 3,
// C = 2 with k_max = 1 (cf 1) or k_max = 2 (cf 0.5).
//   expert 0 takes t0 (3), t1 (2);  expert 1 takes t2 (3), t0 (2);
//   expert 2: t1, t3, t4 tie at 1 -> the lower tokens t1, t3;  t4 and t5 are taken by none.
const std::vector<double> kHandLogits = {3, 2, -3, /**/ 2, -3, 1, /**/ -3, 3, -3,
                                         -3, -3, 1, /**/ -2, -2, 1, /**/ -3, -3, -3};
double sigmoid_of(double z) { return 1.0 / (1.0 + std::exp(-z)); }

TEST(ExpertChoiceCpu, HandCaseWithTheCapCuttingPicks) {
  for (DType real : {DType::f32, DType::f64}) {
    const RoutingParams params = ec_params(6, 3, 1, 1.0f, /*sigmoid=*/true);
    HostTensor logits = logits_tensor(kHandLogits, 6, 3, real);
    HostRouting routing(params, real);
    cpu::route_expert_choice(logits, {}, params, routing.result);
    const RoutingResult& r = routing.result;
    // t0 taken by experts 0 and 1, t1 by 0 and 2: each keeps its best (expert 0); 2 picks cut.
    EXPECT_EQ(ints(r.expert_ids), (std::vector<int>{0, 0, 1, 2, -1, -1}));
    EXPECT_EQ(ints(r.token_k), (std::vector<int>{1, 1, 1, 1, 0, 0}));
    EXPECT_EQ(ints(r.slots), (std::vector<int>{0, 1, 0, 0, -1, -1}));
    EXPECT_EQ(ints(r.expert_counts), (std::vector<int>{2, 1, 1}));
    EXPECT_EQ(ints(r.first_choice_counts), (std::vector<int>{2, 1, 1}));
    EXPECT_EQ(ints(r.expert_offsets), (std::vector<int>{0, 2, 3, 4}));
    EXPECT_EQ(ints(r.scalars), (std::vector<int>{2, 4, 2, 4}));  // C, total, dropped, padded rows
    const std::vector<double> gates = to_vector(r.gates);
    const std::vector<double> want = {sigmoid_of(3), sigmoid_of(2), sigmoid_of(3), sigmoid_of(1), 0, 0};
    EXPECT_LE(max_abs_difference(gates, want), 1e-7) << dtype_name(real);
    expect_matches_brute_force(kHandLogits, params, real);
  }
}

TEST(ExpertChoiceCpu, HandCaseWithTwoChoicesRenormalizedAndScaled) {
  RoutingParams params = ec_params(6, 3, 2, 0.5f, /*sigmoid=*/true, /*renormalize=*/true, /*alignment=*/4, 2.5f);
  HostTensor logits = logits_tensor(kHandLogits, 6, 3, DType::f64);
  HostRouting routing(params, DType::f64);
  cpu::route_expert_choice(logits, {}, params, routing.result);
  const RoutingResult& r = routing.result;
  EXPECT_EQ(ints(r.expert_ids), (std::vector<int>{0, 1, 0, 2, 1, -1, 2, -1, -1, -1, -1, -1}));
  EXPECT_EQ(ints(r.token_k), (std::vector<int>{2, 2, 1, 1, 0, 0}));
  // expert 0 kept t0, t1; expert 1 kept t0, t2; expert 2 kept t1, t3 (slots in token order).
  EXPECT_EQ(ints(r.slots), (std::vector<int>{0, 0, 1, 0, 1, -1, 1, -1, -1, -1, -1, -1}));
  EXPECT_EQ(ints(r.expert_counts), (std::vector<int>{2, 2, 2}));
  EXPECT_EQ(ints(r.first_choice_counts), (std::vector<int>{2, 1, 1}));
  EXPECT_EQ(ints(r.expert_offsets), (std::vector<int>{0, 4, 8, 12}));
  EXPECT_EQ(ints(r.scalars), (std::vector<int>{2, 6, 0, 12}));
  const double s3 = sigmoid_of(3), s2 = sigmoid_of(2), s1 = sigmoid_of(1);
  const std::vector<double> want = {2.5 * s3 / (s3 + s2), 2.5 * s2 / (s3 + s2), 2.5 * s2 / (s2 + s1), 2.5 * s1 / (s2 + s1),
                                    2.5, 0, 2.5, 0, 0, 0, 0, 0};
  EXPECT_LE(max_abs_difference(to_vector(r.gates), want), 1e-12);
  expect_matches_brute_force(kHandLogits, params, DType::f64);
}

TEST(ExpertChoiceCpu, TiesGoToLowerTokensAndLowerExperts) {
  // C = min(T, ceil(2 * 2 * 2 / 4)) = 2 = T: every expert takes both tokens; each keeps its two
  // best, ties to the lower expert id. Token 2 of a second batch shows the token tie rule.
  const RoutingParams params = ec_params(2, 4, 2, 2.0f);
  HostTensor logits = logits_tensor({0, 0, 0, 0, /**/ 0, 1, 1, 5}, 2, 4, DType::f32);
  HostRouting routing(params, DType::f32);
  cpu::route_expert_choice(logits, {}, params, routing.result);
  EXPECT_EQ(ints(routing.result.expert_ids), (std::vector<int>{0, 1, 3, 1}));  // by priority, not id
  EXPECT_EQ(get_element(routing.result.scalars, kCapacity), 2.0);
  EXPECT_EQ(get_element(routing.result.scalars, kDroppedChoices), 4.0);
  EXPECT_NEAR(get_element(routing.result.gates, 0), 0.25, 1e-7);

  // Five equal rows, C = ceil(1 * 5 * 1 / 4) = 2: every expert takes tokens 0 and 1 (the lower
  // ones); each of them keeps expert 0; tokens 2..4 get nothing.
  const RoutingParams tied = ec_params(5, 4, 1, 1.0f);
  HostTensor flat = logits_tensor(std::vector<double>(20, 0.5), 5, 4, DType::f64);
  HostRouting flat_routing(tied, DType::f64);
  cpu::route_expert_choice(flat, {}, tied, flat_routing.result);
  EXPECT_EQ(ints(flat_routing.result.expert_ids), (std::vector<int>{0, 0, -1, -1, -1}));
  EXPECT_EQ(ints(flat_routing.result.slots), (std::vector<int>{0, 1, -1, -1, -1}));
  EXPECT_EQ(ints(flat_routing.result.expert_counts), (std::vector<int>{2, 0, 0, 0}));
  EXPECT_EQ(get_element(flat_routing.result.scalars, kDroppedChoices), 6.0);
}

struct BruteCase {
  int64_t tokens;
  int experts, k;
  float capacity_factor;
  bool sigmoid, renormalize;
  int alignment;
  float scaling;
  DType real;
  bool ties;
};

void PrintTo(const BruteCase& c, std::ostream* os) {
  *os << "T=" << c.tokens << " E=" << c.experts << " k=" << c.k << " cf=" << c.capacity_factor
      << (c.sigmoid ? " sigmoid" : " softmax") << (c.renormalize ? " renormalize" : "") << " align=" << c.alignment
      << " scale=" << c.scaling << " " << dtype_name(c.real) << (c.ties ? " ties" : "");
}

class ExpertChoiceMatchesBruteForce : public ::testing::TestWithParam<BruteCase> {};

TEST_P(ExpertChoiceMatchesBruteForce, RandomLogits) {
  const BruteCase& c = GetParam();
  const RoutingParams params =
      ec_params(c.tokens, c.experts, c.k, c.capacity_factor, c.sigmoid, c.renormalize, c.alignment, c.scaling);
  std::vector<double> logits = random_logits(c.tokens, c.experts, 17 + uint64_t(c.tokens * 31 + c.experts * 7 + c.k));
  if (c.ties)
    for (double& value : logits) value = std::round(value);  // a coarse grid: equal priorities are common
  expect_matches_brute_force(logits, params, c.real);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ExpertChoiceMatchesBruteForce,
    ::testing::Values(BruteCase{37, 4, 1, 1.25f, false, false, 1, 1.0f, DType::f64, false},
                      BruteCase{37, 4, 2, 1.0f, false, true, 8, 1.0f, DType::f32, false},
                      BruteCase{37, 8, 4, 0.75f, true, true, 4, 2.5f, DType::f64, false},
                      BruteCase{60, 16, 8, 1.0f, true, false, 16, 1.0f, DType::f32, false},
                      BruteCase{1, 4, 2, 1.25f, false, false, 1, 1.0f, DType::f64, false},  // one token
                      BruteCase{50, 4, 2, 3.0f, false, true, 1, 1.0f, DType::f64, false},   // C = T
                      BruteCase{80, 8, 2, 1.0f, false, false, 2, 1.0f, DType::f64, true},
                      BruteCase{80, 8, 2, 1.0f, true, true, 1, 1.0f, DType::f32, true},
                      BruteCase{40, 32, 8, 0.5f, false, true, 8, 1.0f, DType::f64, false}));

TEST(ExpertChoiceCpu, InvariantsOnLargerBatches) {
  for (bool sigmoid : {false, true}) {
    const int64_t tokens = 1500;
    const int experts = 64, k = 4;
    const RoutingParams params = ec_params(tokens, experts, k, 0.5f, sigmoid, true, 16);
    HostTensor logits = logits_tensor(random_logits(tokens, experts, 3 + sigmoid), tokens, experts, DType::f32);
    HostRouting routing(params, DType::f32);
    ops::route(kCpu, logits, nullptr, params, routing.result);  // through the dispatch
    const RoutingResult& r = routing.result;
    const int capacity = int(get_element(r.scalars, kCapacity));
    EXPECT_EQ(capacity, int(std::ceil(0.5 * double(tokens * k) / experts)));
    const std::vector<int> ids = ints(r.expert_ids), slots = ints(r.slots), token_k = ints(r.token_k),
                           counts = ints(r.expert_counts);
    std::vector<std::vector<int>> slots_of(static_cast<size_t>(experts));
    int zero_k = 0, total = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      const int kt = token_k[size_t(t)];
      ASSERT_GE(kt, 0);
      ASSERT_LE(kt, k);
      zero_k += kt == 0;
      total += kt;
      double gate_sum = 0;
      for (int j = 0; j < k; ++j) {
        const size_t at = size_t(t * k + j);
        if (j >= kt) {
          EXPECT_EQ(ids[at], -1);
          EXPECT_EQ(slots[at], -1);
          EXPECT_EQ(get_element(r.gates, int64_t(at)), 0.0);
          continue;
        }
        ASSERT_GE(ids[at], 0);
        for (int i = 0; i < j; ++i) EXPECT_NE(ids[size_t(t * k + i)], ids[at]);
        EXPECT_GT(get_element(r.gates, int64_t(at)), 0.0);
        if (j > 0) EXPECT_LE(get_element(r.gates, int64_t(at)), get_element(r.gates, int64_t(at - 1)) * (1 + 1e-6));
        gate_sum += get_element(r.gates, int64_t(at));
        slots_of[size_t(ids[at])].push_back(slots[at]);  // tokens visited in order
      }
      if (kt > 0) EXPECT_NEAR(gate_sum, 1.0, 1e-5);
    }
    EXPECT_GT(zero_k, 0) << "some tokens should be left without an expert (sigmoid " << sigmoid << ")";
    EXPECT_EQ(get_element(r.scalars, kTotalChoices), double(total));
    EXPECT_EQ(get_element(r.scalars, kDroppedChoices), double(int64_t(experts) * capacity - total));
    for (int e = 0; e < experts; ++e) {
      EXPECT_LE(counts[size_t(e)], capacity);
      ASSERT_EQ(int(slots_of[size_t(e)].size()), counts[size_t(e)]);
      for (int i = 0; i < counts[size_t(e)]; ++i) EXPECT_EQ(slots_of[size_t(e)][size_t(i)], i) << "expert " << e;
    }
  }
}

TEST(ExpertChoiceCpu, Float32AndFloat64Agree) {
  for (bool sigmoid : {false, true}) {
    const RoutingParams params = ec_params(300, 16, 2, 1.0f, sigmoid, true, 8);
    std::vector<double> values = random_logits(300, 16, 11);
    for (double& value : values) value = double(float(value));  // the same logits in both types
    HostRouting single(params, DType::f32), twice(params, DType::f64);
    cpu::route_expert_choice(logits_tensor(values, 300, 16, DType::f32), {}, params, single.result);
    cpu::route_expert_choice(logits_tensor(values, 300, 16, DType::f64), {}, params, twice.result);
    for (auto member : {&RoutingResult::expert_ids, &RoutingResult::slots, &RoutingResult::token_k,
                        &RoutingResult::expert_counts, &RoutingResult::first_choice_counts,
                        &RoutingResult::expert_offsets, &RoutingResult::scalars})
      EXPECT_EQ(ints(single.result.*member), ints(twice.result.*member));
    for (auto member : {&RoutingResult::gates, &RoutingResult::logsumexp, &RoutingResult::prob_sums,
                        &RoutingResult::losses})
      EXPECT_LE(relative_error(single.result.*member, twice.result.*member), 1e-6);
  }
}

TEST(ExpertChoiceCpu, NoTokens) {
  const RoutingParams params = ec_params(0, 8, 2, 1.25f, false, false, 16);
  HostRouting routing(params, DType::f32);
  cpu::route_expert_choice(HostTensor(DType::f32, {0, 8}), {}, params, routing.result);
  EXPECT_EQ(ints(routing.result.expert_counts), std::vector<int>(8, 0));
  EXPECT_EQ(ints(routing.result.expert_offsets), std::vector<int>(9, 0));
  EXPECT_EQ(ints(routing.result.scalars), (std::vector<int>{0, 0, 0, 0}));
  EXPECT_EQ(to_vector(routing.result.losses), std::vector<double>(kNumRoutingLosses, 0.0));
}

TEST(ExpertChoiceCpu, RejectsWhatItDoesNotTake) {
  HostTensor logits = logits_tensor(random_logits(8, 4, 1), 8, 4, DType::f32);
  auto run = [&](const RoutingParams& params, const RoutingInputs& inputs = {}) {
    HostRouting routing(ec_params(8, 4, 2, 1.0f), DType::f32);
    cpu::route_expert_choice(logits, inputs, params, routing.result);
  };
  HostTensor bias(DType::f32, {4});
  RoutingInputs with_bias;
  with_bias.selection_bias = &bias.tensor();
  expect_bad_input([&] { run(ec_params(8, 4, 2, 1.0f), with_bias); }, "selection bias");
  RoutingParams params = ec_params(8, 4, 2, 1.0f);
  params.complexity = ComplexityMode::entropy;
  expect_bad_input([&] { run(params); }, "complexity");
  params = ec_params(8, 4, 2, 1.0f);
  params.num_groups = 2;
  expect_bad_input([&] { run(params); }, "group");
  params = ec_params(8, 4, 2, 1.0f);
  params.dropless = true;
  expect_bad_input([&] { run(params); }, "dropless");
  params = ec_params(8, 4, 2, 1.0f);
  params.drop_policy = DropPolicy::probability;
  expect_bad_input([&] { run(params); }, "drop_policy");
  params = ec_params(8, 4, 2, 1.0f);
  params.seq_aux_loss_weight = 0.1f;
  expect_bad_input([&] { run(params); }, "sequence");
  params = ec_params(8, 4, 2, 1.0f);
  params.method = RoutingMethod::token_choice;
  expect_bad_input([&] { run(params); }, "expert_choice");
}

// ---- Gradient of the gates (and the balance losses) through cpu::route_backward ---------------

// loss(z) = sum_{t,j} G[t,j] gate[t,j] + a * aux + b * z_loss, the routing's choices piecewise
// constant; route_backward's d loss / d z against central differences, all in float64.
void check_gradient(const RoutingParams& params, const std::vector<double>& values) {
  const int64_t tokens = params.num_tokens;
  HostTensor logits = logits_tensor(values, tokens, params.num_experts, DType::f64);
  std::mt19937_64 generator(99);
  HostTensor grad_gates(DType::f64, {tokens, params.k_max});
  fill_normal(grad_gates, generator, 0.0, 1.0);
  const double aux_scale = 3.0, z_scale = 2.0;
  auto loss = [&] {
    HostRouting routing(params, DType::f64);
    cpu::route_expert_choice(logits, {}, params, routing.result);
    return dot(grad_gates, routing.result.gates) + aux_scale * get_element(routing.result.losses, kAuxLoss) +
           z_scale * get_element(routing.result.losses, kZLoss);
  };
  HostRouting routing(params, DType::f64);
  cpu::route_expert_choice(logits, {}, params, routing.result);
  HostTensor grad_logits(DType::f64, {tokens, params.num_experts});
  cpu::route_backward(logits, grad_gates, routing.result, params, float(aux_scale), float(z_scale), grad_logits);
  const std::vector<double> numeric = central_difference_gradient(loss, logits, 1e-6);
  EXPECT_LE(relative_error(to_vector(grad_logits), numeric), 1e-6);
}

TEST(ExpertChoiceCpuGradient, GatesMatchFiniteDifferencesWhenEveryTokenHasAnExpert) {
  for (bool renormalize : {false, true}) {
    RoutingParams params = ec_params(12, 4, 2, 1.5f, false, renormalize);
    params.aux_loss_weight = 0.1f;
    params.z_loss_weight = 0.05f;
    bool found = false;
    for (uint64_t seed = 1; seed < 200 && !found; ++seed) {
      const std::vector<double> values = random_logits(12, 4, seed);
      HostRouting routing(params, DType::f64);
      cpu::route_expert_choice(logits_tensor(values, 12, 4, DType::f64), {}, params, routing.result);
      const std::vector<int> token_k = ints(routing.result.token_k);
      const bool every_token = *std::min_element(token_k.begin(), token_k.end()) >= 1;
      if (!every_token || get_element(routing.result.scalars, kDroppedChoices) == 0) continue;
      found = true;
      check_gradient(params, values);
    }
    ASSERT_TRUE(found) << "no seed gave every token an expert with picks cut";
  }
}

TEST(ExpertChoiceCpuGradient, GatesMatchFiniteDifferencesWithTokensWithoutExperts) {
  for (bool renormalize : {false, true}) {
    RoutingParams params = ec_params(12, 4, 2, 0.5f, false, renormalize);  // C = 3: 12 picks at most
    params.aux_loss_weight = 0.1f;
    params.z_loss_weight = 0.05f;
    const std::vector<double> values = random_logits(12, 4, 5);
    HostRouting routing(params, DType::f64);
    cpu::route_expert_choice(logits_tensor(values, 12, 4, DType::f64), {}, params, routing.result);
    const std::vector<int> token_k = ints(routing.result.token_k);
    ASSERT_EQ(*std::min_element(token_k.begin(), token_k.end()), 0);
    check_gradient(params, values);
  }
}

// ---- The rest of the layer with tokens that have no expert --------------------------------

TEST(ExpertChoiceCpuPipeline, RowMovesAndSmallBatchTakeTokensWithoutExperts) {
  for (DType real : {DType::f32, DType::f64}) {
    const int64_t tokens = 20, width = 12, d_ff = 16;
    const int experts = 4, k = 2;
    const RoutingParams params = ec_params(tokens, experts, k, 0.5f, false, true, 4);  // C = 5
    const int64_t rows = padded_rows_upper_bound(params);
    HostRouting routing(params, real);
    DispatchMap map = routing.buffers.map(tokens, rows);
    cpu::route_expert_choice(logits_tensor(random_logits(tokens, experts, 8), tokens, experts, real), {}, params,
                             routing.result);
    const RoutingResult& r = routing.result;
    const std::vector<int> token_k = ints(r.token_k);
    ASSERT_GT(std::count(token_k.begin(), token_k.end(), 0), 0);

    std::mt19937_64 generator(4);
    HostTensor x(real, {tokens, width}), permuted(real, {rows, width}), outputs(real, {rows, width});
    fill_uniform(x, generator, -1, 1);
    fill_uniform(outputs, generator, -1, 1);
    poison(permuted);
    ops::permute(kCpu, x, r, params, permuted, map);
    HostTensor combined(real, {tokens, width}), grad_combined(real, {tokens, width}), grad_outputs(real, {rows, width}),
        grad_gates(real, {tokens, k}), grad_permuted(real, {rows, width}), grad_x(real, {tokens, width});
    fill_uniform(grad_combined, generator, -1, 1);
    fill_uniform(grad_permuted, generator, -1, 1);
    poison(combined);
    poison(grad_gates);
    poison(grad_x);
    ops::unpermute_combine(kCpu, outputs, r, map, combined);
    ops::unpermute_combine_backward(kCpu, grad_combined, outputs, r, map, grad_outputs, grad_gates);
    ops::permute_backward(kCpu, grad_permuted, map, tokens, grad_x);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int j = 0; j < k; ++j) {
        const int row = map.choice_rows.as<int32_t>()[t * k + j];
        if (j >= token_k[size_t(t)]) {
          EXPECT_EQ(row, -1);
          EXPECT_EQ(get_element(grad_gates, t * k + j), 0.0);
          continue;
        }
        const int e = r.expert_ids.as<int32_t>()[t * k + j];
        EXPECT_EQ(row, r.expert_offsets.as<int32_t>()[e] + r.slots.as<int32_t>()[t * k + j]);
        EXPECT_EQ(map.row_tokens.as<int32_t>()[row], int(t));
        for (int64_t c = 0; c < width; ++c) EXPECT_EQ(get_element(permuted, row * width + c), get_element(x, t * width + c));
      }
      if (token_k[size_t(t)] > 0) continue;
      for (int64_t c = 0; c < width; ++c) {
        EXPECT_EQ(get_element(combined, t * width + c), 0.0) << "token " << t;
        EXPECT_EQ(get_element(grad_x, t * width + c), 0.0) << "token " << t;
      }
    }
    EXPECT_TRUE(all_finite(combined) && all_finite(grad_gates) && all_finite(grad_x) && all_finite(permuted));

    // Small-batch path against the padded path, bit for bit.
    HostTensor w1(real, {experts, width, d_ff}), w2(real, {experts, d_ff, width});
    fill_normal(w1, generator, 0.0, 0.3);
    fill_normal(w2, generator, 0.0, 0.3);
    HostTensor pre(real, {rows, d_ff}), post(real, {rows, d_ff}), out(real, {rows, width}), want(real, {tokens, width}),
        got(real, {tokens, width});
    ops::grouped_gemm(kCpu, permuted, w1, false, r.expert_offsets, pre);
    ops::activation_forward(kCpu, ExpertActivation::gelu_tanh, pre, post);
    ops::grouped_gemm(kCpu, post, w2, false, r.expert_offsets, out);
    ops::unpermute_combine(kCpu, out, r, map, want);
    poison(got);
    HostTensor no_workspace;
    ops::small_batch_experts(kCpu, ExpertActivation::gelu_tanh, x, r, w1, w2, no_workspace, got);
    EXPECT_EQ(std::memcmp(got.tensor().data, want.tensor().data, want.tensor().bytes()), 0) << dtype_name(real);
  }
}

}  // namespace
