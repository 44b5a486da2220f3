// The modern token-choice routing options of the CPU reference (src/ops/cpu/routing.cpp,
// routing_backward.cpp; semantics: src/ops/moe_ops.h, issue #19): sigmoid scores with scaling,
// the selection bias, group-limited routing, probability drops and the
// sequence-level balance loss, against an independent brute force written here from the rules in
// moe_ops.h. Hand-worked cases and invariants: test_routing_modern_cases_cpu.cpp; route_backward
// against finite differences: test_routing_modern_backward_cpu.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <ostream>
#include <random>
#include <vector>

#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "src/ops/routing_math.h"
#include "tests/ops/test_routing_modern_cpu.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;
using namespace switchyard::testing::routing_modern;

namespace {

// ---- Brute force ----------------------------------------------------------------------------
// Different algorithms from the reference on purpose: stable sorts for groups and top-k, long
// double scores, and slots by counting the choices of the same expert that rank first. The fp32
// keys and priorities come from src/ops/routing_math.h, which is their definition.
struct BruteRouting {
  std::vector<int> expert_ids, slots, token_k, counts, first_choice_counts, offsets;
  std::vector<double> gates, prob_sums, sequence_fractions;
  int64_t capacity = 0, total_choices = 0, dropped = 0;
  double aux = 0, seq = 0;
};

struct BruteToken {
  std::vector<long double> probabilities, scores, balance_scores;
  std::vector<float> keys;
};

BruteToken brute_token(const double* row, const RoutingParams& params, const std::vector<float>& bias) {
  const int experts = params.num_experts;
  BruteToken token;
  long double max_logit = row[0];
  for (int e = 1; e < experts; ++e) max_logit = std::max<long double>(max_logit, row[e]);
  long double sum = 0, sigmoid_sum = 0;
  for (int e = 0; e < experts; ++e) sum += std::exp((long double)row[e] - max_logit);
  for (int e = 0; e < experts; ++e) {
    token.probabilities.push_back(std::exp((long double)row[e] - max_logit) / sum);
    const long double sigmoid = 1.0L / (1.0L + std::exp(-(long double)row[e]));
    token.scores.push_back(params.score_function == ScoreFunction::sigmoid ? sigmoid : token.probabilities.back());
    sigmoid_sum += sigmoid;
    float key = params.score_function == ScoreFunction::sigmoid ? routing_sigmoid(float(row[e])) : float(row[e]);
    if (!bias.empty()) key += bias[size_t(e)];
    token.keys.push_back(key);
  }
  const bool sigmoid = params.score_function == ScoreFunction::sigmoid;
  for (int e = 0; e < experts; ++e)
    token.balance_scores.push_back(sigmoid ? token.scores[size_t(e)] / sigmoid_sum : token.probabilities[size_t(e)]);
  return token;
}

// The experts a token may pick, best key first (ties: lower index), under the group limit.
std::vector<int> brute_candidates(const std::vector<float>& keys, const RoutingParams& params) {
  const int experts = params.num_experts, group_size = experts / params.num_groups;
  auto by_key = [&](std::vector<int> ids) {
    std::stable_sort(ids.begin(), ids.end(), [&](int a, int b) { return keys[size_t(a)] > keys[size_t(b)]; });
    return ids;
  };
  std::vector<int> all(static_cast<size_t>(experts));
  std::iota(all.begin(), all.end(), 0);
  if (params.topk_groups == params.num_groups) return by_key(all);
  const float max_key = *std::max_element(keys.begin(), keys.end());
  std::vector<float> group_score(static_cast<size_t>(params.num_groups));
  for (int g = 0; g < params.num_groups; ++g) {
    std::vector<int> members(static_cast<size_t>(group_size));
    std::iota(members.begin(), members.end(), g * group_size);
    members = by_key(members);
    const float k1 = keys[size_t(members[0])], k2 = group_size > 1 ? keys[size_t(members[1])] : 0.0f;
    if (params.score_function == ScoreFunction::sigmoid)
      group_score[size_t(g)] = group_size == 1 ? k1 : k1 + k2;
    else
      group_score[size_t(g)] = group_size == 1 ? routing_exp(k1 - max_key)
                                               : routing_exp(k1 - max_key) + routing_exp(k2 - max_key);
  }
  std::vector<int> groups(static_cast<size_t>(params.num_groups));
  std::iota(groups.begin(), groups.end(), 0);
  std::stable_sort(groups.begin(), groups.end(),
                   [&](int a, int b) { return group_score[size_t(a)] > group_score[size_t(b)]; });
  std::vector<int> allowed;
  for (int kept = 0; kept < params.topk_groups; ++kept)
    for (int e = 0; e < group_size; ++e) allowed.push_back(groups[size_t(kept)] * group_size + e);
  return by_key(allowed);
}

float brute_priority(const double* row, const RoutingParams& params, int expert) {
  if (params.score_function == ScoreFunction::sigmoid) return routing_sigmoid(float(row[expert]));
  float max_logit = float(row[0]);
  for (int e = 1; e < params.num_experts; ++e) max_logit = std::max(max_logit, float(row[e]));
  const float denominator =
      routing_softmax_denominator(params.num_experts, max_logit, [&](int e) { return float(row[e]); });
  return routing_softmax_priority(float(row[expert]), max_logit, denominator);
}

BruteRouting brute_force_route(const std::vector<double>& logits, const RoutingParams& params,
                               const std::vector<float>& bias, const std::vector<double>& complexity) {
  const int64_t tokens = params.num_tokens;
  const int experts = params.num_experts, k_max = params.k_max;
  const int64_t sequences = routing_num_sequences(params);
  BruteRouting out;
  out.expert_ids.assign(size_t(tokens * k_max), -1);
  out.slots.assign(size_t(tokens * k_max), -1);
  out.gates.assign(size_t(tokens * k_max), 0.0);
  out.token_k.assign(size_t(tokens), 0);
  out.prob_sums.assign(size_t(experts), 0.0);
  out.counts.assign(size_t(experts), 0);
  out.first_choice_counts.assign(size_t(experts), 0);
  std::vector<float> priority(static_cast<size_t>(tokens * k_max), 0.0f);
  const size_t sequence_rows = static_cast<size_t>(sequences), expert_columns = static_cast<size_t>(experts);
  std::vector<std::vector<long double>> sequence_balance(sequence_rows, std::vector<long double>(expert_columns));
  std::vector<std::vector<int>> sequence_counts(sequence_rows, std::vector<int>(expert_columns));
  std::vector<int> sequence_choices(sequence_rows), sequence_length(sequence_rows);
  for (int64_t t = 0; t < tokens; ++t) {
    const double* row = logits.data() + t * experts;
    const BruteToken token = brute_token(row, params, bias);
    const std::vector<int> order = brute_candidates(token.keys, params);
    int k = k_max;
    if (params.complexity != ComplexityMode::none) {
      double c = 0;
      if (params.complexity == ComplexityMode::given) {
        c = complexity[size_t(t)];
      } else if (experts > 1) {
        for (long double n : token.balance_scores) c -= n > 0 ? double(n * std::log(n)) : 0.0;
        c /= std::log(double(experts));
      }
      c = std::min(1.0, std::max(0.0, c));
      k = params.k_min + int(std::floor(c * (k_max - params.k_min) + 0.5));
    }
    out.token_k[size_t(t)] = k;
    out.total_choices += k;
    out.first_choice_counts[size_t(order[0])]++;
    long double kept_sum = 0;
    for (int j = 0; j < k; ++j) kept_sum += token.scores[size_t(order[size_t(j)])];
    const int64_t s = params.tokens_per_sequence > 0 ? t / params.tokens_per_sequence : 0;
    sequence_choices[size_t(s)] += k;
    sequence_length[size_t(s)] += 1;
    for (int j = 0; j < k; ++j) {
      const int e = order[size_t(j)];
      out.expert_ids[size_t(t * k_max + j)] = e;
      out.gates[size_t(t * k_max + j)] = double(params.routed_scaling_factor) *
                                         double(token.scores[size_t(e)] / (params.renormalize ? kept_sum : 1.0L));
      out.counts[size_t(e)]++;
      priority[size_t(t * k_max + j)] = brute_priority(row, params, e);
      sequence_counts[size_t(s)][size_t(e)]++;
    }
    for (int e = 0; e < experts; ++e) {
      out.prob_sums[size_t(e)] += double(token.balance_scores[size_t(e)]);
      sequence_balance[size_t(s)][size_t(e)] += token.balance_scores[size_t(e)];
    }
  }
  out.capacity = params.dropless ? INT32_MAX
                                 : int64_t(std::ceil(double(params.capacity_factor) * double(out.total_choices) /
                                                     double(experts)));
  // slot(t, j) = number of choices of the same expert that rank first.
  const bool by_probability = params.drop_policy == DropPolicy::probability;
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < k_max; ++j) {
      const size_t index = size_t(t * k_max + j);
      if (out.expert_ids[index] < 0) continue;
      int slot = 0;
      for (int64_t u = 0; u < tokens; ++u)
        for (int i = 0; i < k_max; ++i) {
          const size_t other = size_t(u * k_max + i);
          if (out.expert_ids[other] != out.expert_ids[index]) continue;
          const bool gshard_first = i < j || (i == j && u < t);
          slot += by_probability ? (priority[other] > priority[index] ||
                                    (priority[other] == priority[index] && gshard_first))
                                 : gshard_first;
        }
      out.slots[index] = slot;
      if (slot >= out.capacity) out.dropped++;
    }
  out.offsets.assign(size_t(experts + 1), 0);
  for (int e = 0; e < experts; ++e) {
    const int64_t kept = std::min<int64_t>(out.counts[size_t(e)], out.capacity);
    const int64_t padded = (kept + params.segment_alignment - 1) / params.segment_alignment * params.segment_alignment;
    out.offsets[size_t(e + 1)] = int(out.offsets[size_t(e)] + padded);
  }
  double balance = 0;
  for (int e = 0; e < experts; ++e)
    balance += (double(out.first_choice_counts[size_t(e)]) / double(tokens)) *
               (out.prob_sums[size_t(e)] / double(tokens));
  out.aux = double(params.aux_loss_weight) * experts * balance;
  long double seq = 0;
  for (int64_t s = 0; s < sequences; ++s)
    for (int e = 0; e < experts; ++e) {
      const long double fraction =
          (long double)experts * sequence_counts[size_t(s)][size_t(e)] / sequence_choices[size_t(s)];
      out.sequence_fractions.push_back(double(fraction));
      seq += fraction * sequence_balance[size_t(s)][size_t(e)] / sequence_length[size_t(s)];
    }
  out.seq = double(params.seq_aux_loss_weight) * double(seq / sequences);
  return out;
}

// ---- Against brute force ----------------------------------------------------------------------

struct ModernCase {
  int64_t tokens;
  int experts, k;
  ScoreFunction function;
  bool renormalize, with_bias;
  float scaling;
  int num_groups, topk_groups;
  DropPolicy drops;
  float capacity_factor;
  int64_t tokens_per_sequence;  // -1: no sequence loss
  ComplexityMode complexity;
  DType real;
};

void PrintTo(const ModernCase& c, std::ostream* os) {
  *os << "T=" << c.tokens << " E=" << c.experts << " k=" << c.k
      << (c.function == ScoreFunction::sigmoid ? " sigmoid" : " softmax") << (c.renormalize ? " renormalize" : "")
      << (c.with_bias ? " bias" : "") << " scale=" << c.scaling << " groups=" << c.topk_groups << "/" << c.num_groups
      << (c.drops == DropPolicy::probability ? " probability-drops" : "") << " cf=" << c.capacity_factor
      << " seq=" << c.tokens_per_sequence << " complexity=" << int(c.complexity) << " " << dtype_name(c.real);
}

RoutingParams params_of(const ModernCase& c) {
  RoutingParams params = make_params(c.tokens, c.experts, c.k, c.function);
  params.renormalize = c.renormalize;
  params.routed_scaling_factor = c.scaling;
  params.num_groups = c.num_groups;
  params.topk_groups = c.topk_groups;
  params.drop_policy = c.drops;
  params.capacity_factor = c.capacity_factor;
  params.segment_alignment = 4;
  params.complexity = c.complexity;
  if (c.tokens_per_sequence >= 0) {
    params.tokens_per_sequence = c.tokens_per_sequence;
    params.seq_aux_loss_weight = 0.02f;
  }
  return params;
}

class ModernRoutingMatchesBruteForce : public ::testing::TestWithParam<ModernCase> {};

TEST_P(ModernRoutingMatchesBruteForce, RandomLogits) {
  const ModernCase& c = GetParam();
  const RoutingParams params = params_of(c);
  const uint64_t seed = 500 + uint64_t(c.tokens * 3 + c.experts * 5 + c.k + c.num_groups * 7);
  HostTensor logits = make_tensor(c.real, {c.tokens, c.experts}, random_values(size_t(c.tokens * c.experts), seed));
  // A bias large enough to move choices (the sigmoid keys lie in (0, 1)).
  const double bias_scale = c.function == ScoreFunction::sigmoid ? 0.3 : 1.5;
  HostTensor bias = make_tensor(DType::f32, {c.experts}, random_values(size_t(c.experts), seed + 1, bias_scale));
  std::vector<double> complexity_values(static_cast<size_t>(c.tokens));
  std::mt19937_64 generator(seed + 2);
  for (double& value : complexity_values) value = std::uniform_real_distribution<double>(0.0, 1.0)(generator);
  HostTensor complexity = make_tensor(c.real, {c.tokens}, complexity_values);

  std::vector<float> bias_values;
  if (c.with_bias)
    for (double value : to_vector(bias)) bias_values.push_back(float(value));
  const BruteRouting expected = brute_force_route(to_vector(logits), params, bias_values, to_vector(complexity));
  Routed routed(params, logits, c.with_bias ? &bias.tensor() : nullptr,
                c.complexity == ComplexityMode::given ? &complexity.tensor() : nullptr);
  const double tolerance = c.real == DType::f64 ? 1e-12 : 2e-6;

  EXPECT_EQ(to_ints(routed->expert_ids), expected.expert_ids);
  EXPECT_EQ(to_ints(routed->slots), expected.slots);
  EXPECT_EQ(to_ints(routed->token_k), expected.token_k);
  EXPECT_EQ(to_ints(routed->expert_counts), expected.counts);
  EXPECT_EQ(to_ints(routed->first_choice_counts), expected.first_choice_counts);
  EXPECT_EQ(to_ints(routed->expert_offsets), expected.offsets);
  EXPECT_LE(max_abs_difference(to_vector(routed->gates), expected.gates), tolerance * c.scaling);
  EXPECT_LE(relative_error(to_vector(routed->prob_sums), expected.prob_sums), tolerance);
  const std::vector<int> scalars = to_ints(routed->scalars);
  EXPECT_EQ(scalars[kCapacity], expected.capacity);
  EXPECT_EQ(scalars[kTotalChoices], expected.total_choices);
  EXPECT_EQ(scalars[kDroppedChoices], expected.dropped);
  EXPECT_EQ(scalars[kPaddedRows], expected.offsets.back());
  EXPECT_LE(scalars[kPaddedRows], padded_rows_upper_bound(params));
  EXPECT_NEAR(get_element(routed->losses, kAuxLoss), expected.aux, tolerance * std::max(1.0, expected.aux));
  EXPECT_NEAR(get_element(routed->losses, kSeqAuxLoss), expected.seq, tolerance * std::max(1.0, expected.seq));
  EXPECT_EQ(get_element(routed->losses, kGlobalAuxLoss), 0.0);
  if (params.seq_aux_loss_weight > 0.0f) {
    std::vector<double> fractions = to_vector(routed->sequence_fractions);
    fractions.resize(expected.sequence_fractions.size());
    EXPECT_LE(max_abs_difference(fractions, expected.sequence_fractions), tolerance * c.experts);
  }
  if (c.capacity_factor < 1.0f) EXPECT_GT(scalars[kDroppedChoices], 0);
}

INSTANTIATE_TEST_SUITE_P(
    Options, ModernRoutingMatchesBruteForce,
    ::testing::Values(
        ModernCase{97, 8, 2, kSigmoid, false, false, 1.0f, 1, 1, kPosition, 1.25f, -1, kNone, DType::f64},
        ModernCase{97, 8, 2, kSigmoid, true, false, 2.5f, 1, 1, kPosition, 1.25f, -1, kNone, DType::f32},
        ModernCase{97, 8, 3, kSoftmax, true, true, 1.5f, 1, 1, kPosition, 1.25f, -1, kNone, DType::f64},
        ModernCase{97, 8, 3, kSigmoid, false, true, 1.0f, 1, 1, kPosition, 1.25f, -1, kNone, DType::f32},
        ModernCase{200, 16, 4, kSigmoid, true, true, 2.5f, 8, 3, kPosition, 1.0f, -1, kNone, DType::f64},  // V3-like
        ModernCase{200, 16, 4, kSoftmax, false, false, 1.0f, 4, 2, kPosition, 1.0f, -1, kNone, DType::f32},
        // one-expert groups
        ModernCase{200, 16, 2, kSoftmax, true, true, 1.0f, 16, 3, kPosition, 1.0f, -1, kNone, DType::f64},
        ModernCase{200, 16, 2, kSigmoid, false, false, 1.0f, 16, 2, kPosition, 1.0f, -1, kNone, DType::f64},
        ModernCase{300, 8, 2, kSoftmax, false, false, 1.0f, 1, 1, kProbability, 0.6f, -1, kNone, DType::f64},
        ModernCase{300, 8, 2, kSigmoid, true, true, 1.0f, 2, 1, kProbability, 0.6f, -1, kNone, DType::f32},
        ModernCase{300, 8, 1, kSoftmax, false, true, 1.0f, 1, 1, kProbability, 0.5f, -1, kNone, DType::f32},
        // sequences: S = 4, the last one short
        ModernCase{100, 8, 2, kSoftmax, true, false, 1.0f, 1, 1, kPosition, 1.25f, 32, kNone, DType::f64},
        ModernCase{100, 8, 2, kSigmoid, false, true, 1.0f, 4, 2, kProbability, 0.8f, 25, ComplexityMode::given,
                   DType::f64},
        ModernCase{100, 8, 4, kSigmoid, true, false, 1.0f, 1, 1, kPosition, 1.25f, 0, ComplexityMode::entropy,
                   DType::f64},
        ModernCase{100, 8, 4, kSoftmax, true, true, 1.0f, 2, 2, kPosition, 1.25f, 7, ComplexityMode::entropy,
                   DType::f32},
        ModernCase{1, 8, 2, kSigmoid, true, true, 1.0f, 4, 1, kProbability, 1.0f, 5, kNone, DType::f64}));  // one token

}  // namespace
