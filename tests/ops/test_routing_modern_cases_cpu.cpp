// Hand-worked cases and invariants of the modern routing options of the CPU reference
// (src/ops/cpu/routing.cpp; semantics: src/ops/moe_ops.h, issue #19): sigmoid gates and scaling,
// group selection, the selection bias, probability drops, sequence fractions, f32 / f64 agreement
// and the checks on bad inputs. The brute-force comparison is test_routing_modern_cpu.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "tests/ops/test_routing_modern_cpu.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;
using namespace switchyard::testing::routing_modern;

namespace {

// ---- Hand-worked cases ------------------------------------------------------------------------

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

TEST(RoutingModern, SigmoidGatesAreScaledScores) {
  RoutingParams params = make_params(2, 4, 2, kSigmoid);
  params.routed_scaling_factor = 2.5f;
  params.dropless = true;
  const std::vector<double> logit_values{0.5, -1.0, 2.0, 0.1, -0.3, -2.0, 1.2, 0.9};
  HostTensor logits = make_tensor(DType::f64, {2, 4}, logit_values);
  Routed plain(params, logits);
  EXPECT_EQ(to_ints(plain->expert_ids), (std::vector<int>{2, 0, 2, 3}));
  EXPECT_NEAR(get_element(plain->gates, 0), 2.5 * sigmoid(2.0), 1e-15);
  EXPECT_NEAR(get_element(plain->gates, 1), 2.5 * sigmoid(0.5), 1e-15);
  EXPECT_NEAR(get_element(plain->gates, 3), 2.5 * sigmoid(0.9), 1e-15);
  // prob_sums hold s' = s / sum s, which sums to one per token.
  double token0_sum = 0, token1_sum = 0;
  for (int e = 0; e < 4; ++e) {
    token0_sum += sigmoid(logit_values[size_t(e)]);
    token1_sum += sigmoid(logit_values[size_t(4 + e)]);
  }
  EXPECT_NEAR(get_element(plain->prob_sums, 1), sigmoid(-1.0) / token0_sum + sigmoid(-2.0) / token1_sum, 1e-15);
  double prob_total = 0;
  for (int e = 0; e < 4; ++e) prob_total += get_element(plain->prob_sums, e);
  EXPECT_NEAR(prob_total, 2.0, 1e-14);

  params.renormalize = true;
  Routed renormalized(params, logits);
  EXPECT_NEAR(get_element(renormalized->gates, 0), 2.5 * sigmoid(2.0) / (sigmoid(2.0) + sigmoid(0.5)), 1e-15);
  EXPECT_NEAR(get_element(renormalized->gates, 2) + get_element(renormalized->gates, 3), 2.5, 1e-15);
  // The z loss comes from the logits whatever the score function.
  RoutingParams softmax_params = params;
  softmax_params.score_function = kSoftmax;
  Routed softmax(softmax_params, logits);
  EXPECT_EQ(get_element(renormalized->losses, kZLoss), get_element(softmax->losses, kZLoss));
  EXPECT_EQ(get_element(renormalized->logsumexp, 1), get_element(softmax->logsumexp, 1));
}

TEST(RoutingModern, GroupLimitKeepsTheBestGroups) {
  // Groups of two: [3, -3] [2, 2] [1.5, 1.4] [-1, -1]. Sigmoid group scores (k1 + k2): 1.0, 1.76,
  // 1.62, 0.54, so groups 1 and 2 win and expert 0, the best single expert, is out. Softmax scores
  // (e^{k1-m} + e^{k2-m}, m = 3): 1.0025, 0.736, 0.425, 0.037: groups 0 and 1.
  const std::vector<double> row{3.0, -3.0, 2.0, 2.0, 1.5, 1.4, -1.0, -1.0};
  HostTensor logits = make_tensor(DType::f64, {1, 8}, row);
  RoutingParams params = make_params(1, 8, 3, kSigmoid);
  params.dropless = true;
  params.num_groups = 4;
  params.topk_groups = 2;
  EXPECT_EQ(to_ints(Routed(params, logits)->expert_ids), (std::vector<int>{2, 3, 4}));  // tie 2 / 3: lower first
  params.score_function = kSoftmax;
  EXPECT_EQ(to_ints(Routed(params, logits)->expert_ids), (std::vector<int>{0, 2, 3}));
  params.topk_groups = 4;  // no limit
  EXPECT_EQ(to_ints(Routed(params, logits)->expert_ids), (std::vector<int>{0, 2, 3}));
  // One group, k = 2: sigmoid takes group 1, softmax group 0 (both its experts, -3 included).
  params.k_max = 2;
  params.topk_groups = 1;
  EXPECT_EQ(to_ints(Routed(params, logits)->expert_ids), (std::vector<int>{0, 1}));
  params.score_function = kSigmoid;
  EXPECT_EQ(to_ints(Routed(params, logits)->expert_ids), (std::vector<int>{2, 3}));
  // Softmax group scores add the second term: [3, -3] scores 1 + e^-6, [2.9, 2.9] 2 e^-0.1 = 1.81,
  // so the group without the best expert wins (k1 alone would keep group 0).
  HostTensor second_term = make_tensor(DType::f64, {1, 8}, {3.0, -3.0, 2.9, 2.9, -1.0, -1.2, -1.1, -1.3});
  params.score_function = kSoftmax;
  EXPECT_EQ(to_ints(Routed(params, second_term)->expert_ids), (std::vector<int>{2, 3}));
  params.score_function = kSigmoid;
  // Equal group scores go to the lower group: groups 1 and 3 tie (the same two keys), group 1 is
  // kept; without the limit expert 7 would be the second choice.
  HostTensor tied = make_tensor(DType::f32, {1, 8}, {-2.0, -2.5, 0.75, 0.25, -1.0, -1.0, 0.25, 0.75});
  EXPECT_EQ(to_ints(Routed(params, tied)->expert_ids), (std::vector<int>{2, 3}));
  params.topk_groups = 4;
  EXPECT_EQ(to_ints(Routed(params, tied)->expert_ids), (std::vector<int>{2, 7}));
  // One-expert groups: the group score is the key alone, so group limits change nothing.
  params.num_groups = 8;
  params.topk_groups = 3;
  params.k_max = 3;
  EXPECT_EQ(to_ints(Routed(params, logits)->expert_ids), (std::vector<int>{0, 2, 3}));
}

TEST(RoutingModern, BiasMovesTheChoiceButNotTheGates) {
  const std::vector<double> row{1.0, 0.5, 0.0, -0.5, 0.6, -0.1};
  HostTensor logits = make_tensor(DType::f64, {2, 3}, row);
  HostTensor bias = make_tensor(DType::f64, {3}, {0.0, 0.0, 2.0});  // f64 is allowed on the CPU
  for (ScoreFunction function : {kSoftmax, kSigmoid}) {
    RoutingParams params = make_params(2, 3, 1, function);
    params.routed_scaling_factor = 1.5f;
    params.dropless = true;
    Routed unbiased(params, logits), biased(params, logits, &bias.tensor());
    EXPECT_EQ(to_ints(unbiased->expert_ids), (std::vector<int>{0, 1}));
    EXPECT_EQ(to_ints(biased->expert_ids), (std::vector<int>{2, 2}));
    const double score = function == kSoftmax
                             ? std::exp(0.0) / (std::exp(1.0) + std::exp(0.5) + std::exp(0.0))
                             : sigmoid(0.0);
    EXPECT_NEAR(get_element(biased->gates, 0), 1.5 * score, 1e-15);
    // The balance statistics use the unbiased scores; the first-choice counts follow the choice.
    EXPECT_EQ(to_vector(biased->prob_sums), to_vector(unbiased->prob_sums));
    EXPECT_EQ(to_vector(biased->logsumexp), to_vector(unbiased->logsumexp));
    EXPECT_EQ(to_ints(biased->first_choice_counts), (std::vector<int>{0, 0, 2}));
  }
  // A bias of -1 on expert 0 puts it behind expert 1 (keys 0.0, 0.5, 0.0) and ties it with expert 2,
  // which it beats as the lower index.
  RoutingParams params = make_params(2, 3, 2);
  params.dropless = true;
  HostTensor pull_down = make_tensor(DType::f32, {3}, {-1.0, 0.0, 0.0});
  EXPECT_EQ(to_ints(Routed(params, logits, &pull_down.tensor())->expert_ids), (std::vector<int>{1, 0, 1, 2}));
  // Keys tie exactly (1.0 - 0.5 == 0.5): the lower expert wins.
  HostTensor tie = make_tensor(DType::f32, {3}, {-0.5, 0.0, -5.0});
  EXPECT_EQ(to_ints(Routed(params, logits, &tie.tensor())->expert_ids), (std::vector<int>{0, 1, 1, 0}));
}

TEST(RoutingModern, ProbabilityDropsTheLowestScoresFirst) {
  // Six tokens, all on expert 0 (k = 1, E = 2): capacity ceil(6 / 2) = 3. Tokens 1, 3, 4 are the
  // most sure of expert 0, so they keep slots 0, 1, 2 in that order; the rest drop.
  const std::vector<double> margins{0.5, 3.0, 1.0, 4.0, 2.0, 0.2};
  std::vector<double> values;
  for (double margin : margins) values.insert(values.end(), {margin, 0.0});
  HostTensor logits = make_tensor(DType::f32, {6, 2}, values);
  for (ScoreFunction function : {kSoftmax, kSigmoid}) {
    RoutingParams params = make_params(6, 2, 1, function);
    params.capacity_factor = 1.0f;
    params.drop_policy = kProbability;
    Routed routed(params, logits);
    EXPECT_EQ(to_ints(routed->slots), (std::vector<int>{4, 1, 3, 0, 2, 5}));
    EXPECT_EQ(get_element(routed->scalars, kDroppedChoices), 3.0);
    params.drop_policy = kPosition;
    EXPECT_EQ(to_ints(Routed(params, logits)->slots), (std::vector<int>{0, 1, 2, 3, 4, 5}));
  }
  // k = 2: a sure second choice outranks an unsure first choice of another token, and equal
  // scores keep GShard order (choice, then token). Softmax probabilities:
  //   tokens 0, 1 (the same row): expert 0 0.834, expert 1 0.125;  token 2: expert 0 0.525,
  //   expert 1 0.475;  token 3: expert 1 0.361, expert 2 0.343.
  HostTensor mixed = make_tensor(DType::f64, {4, 3},
                                 {2.0, 0.1, -1.0, 2.0, 0.1, -1.0, 3.0, 2.9, -5.0, -0.1, 0.1, 0.05});
  RoutingParams params = make_params(4, 3, 2);
  params.dropless = true;
  params.drop_policy = kProbability;
  Routed routed(params, mixed);
  EXPECT_EQ(to_ints(routed->expert_ids), (std::vector<int>{0, 1, 0, 1, 0, 1, 1, 2}));
  // Expert 0: tokens 0, 1 (tie: token order), then token 2. Expert 1: token 2's second choice
  // (0.475) before token 3's first (0.361), then tokens 0 and 1 in token order. Expert 2: token 3.
  EXPECT_EQ(to_ints(routed->slots), (std::vector<int>{0, 2, 1, 3, 2, 0, 1, 0}));
  params.drop_policy = kPosition;
  EXPECT_EQ(to_ints(Routed(params, mixed)->slots), (std::vector<int>{0, 1, 1, 2, 2, 3, 0, 0}));
}

TEST(RoutingModern, SequenceFractionsCountChoicesPerSequence) {
  // Five tokens, sequences of two: {0, 1} {2, 3} {4}. Choices follow the one large logit and the
  // one middling one of each row.
  const std::vector<std::pair<int, int>> picks{{0, 1}, {0, 2}, {3, 0}, {1, 2}, {3, 0}};
  std::vector<double> values;
  std::mt19937_64 generator(4);
  std::uniform_real_distribution<double> small(-0.5, 0.0);
  for (const auto& [first, second] : picks)
    for (int e = 0; e < 4; ++e) values.push_back(e == first ? 3.0 : e == second ? 1.0 : small(generator));
  HostTensor logits = make_tensor(DType::f64, {5, 4}, values);
  RoutingParams params = make_params(5, 4, 2);
  params.dropless = true;
  params.tokens_per_sequence = 2;
  params.seq_aux_loss_weight = 0.5f;
  ASSERT_EQ(routing_num_sequences(params), 3);
  Routed routed(params, logits);
  EXPECT_EQ(to_ints(routed->expert_ids), (std::vector<int>{0, 1, 0, 2, 3, 0, 1, 2, 3, 0}));
  // f_{s,e} = E * count_{s,e} / C_s with C_s = 4, 4, 2.
  const std::vector<double> fractions{2, 1, 1, 0, 1, 1, 1, 1, 2, 0, 0, 2};
  EXPECT_EQ(to_vector(routed->sequence_fractions), fractions);
  // seq = w * mean_s sum_e f_{s,e} * mean_{t in s} p_{t,e}.
  double expected = 0;
  for (int s = 0; s < 3; ++s) {
    const int first = 2 * s, length = s < 2 ? 2 : 1;
    for (int e = 0; e < 4; ++e) {
      double mean_p = 0;
      for (int t = first; t < first + length; ++t) {
        double sum = 0;
        for (int f = 0; f < 4; ++f) sum += std::exp(values[size_t(t * 4 + f)]);
        mean_p += std::exp(values[size_t(t * 4 + e)]) / sum / length;
      }
      expected += fractions[size_t(s * 4 + e)] * mean_p;
    }
  }
  EXPECT_NEAR(get_element(routed->losses, kSeqAuxLoss), 0.5 * expected / 3.0, 1e-14);
  // tokens_per_sequence = 0: the whole batch is one sequence, C = 10.
  params.tokens_per_sequence = 0;
  Routed whole(params, logits);
  std::vector<double> whole_fractions = to_vector(whole->sequence_fractions);
  whole_fractions.resize(4);
  EXPECT_EQ(whole_fractions, (std::vector<double>{4 * 4 / 10.0, 4 * 2 / 10.0, 4 * 2 / 10.0, 4 * 2 / 10.0}));
  // Weight 0: the loss is 0 and the fractions are left alone.
  params.seq_aux_loss_weight = 0.0f;
  Routed off(params, logits);
  EXPECT_EQ(get_element(off->losses, kSeqAuxLoss), 0.0);
  EXPECT_TRUE(std::isnan(get_element(off->sequence_fractions, 0)));
}

TEST(RoutingModern, SequenceFractionsUseEachTokensChoiceCount) {
  // Given complexity gives k_t = 1 or 3: C_s counts k_t, not k_max.
  RoutingParams params = make_params(4, 4, 3);
  params.dropless = true;
  params.complexity = ComplexityMode::given;
  params.tokens_per_sequence = 4;
  params.seq_aux_loss_weight = 1.0f;
  const std::vector<double> falling{3.2, 2.1, 1.3, 0.4}, rising{-0.4, 1.3, 2.1, 3.2};
  std::vector<double> values;
  for (const auto* row : {&falling, &falling, &rising, &rising}) values.insert(values.end(), row->begin(), row->end());
  HostTensor logits = make_tensor(DType::f64, {4, 4}, values);
  HostTensor complexity = make_tensor(DType::f64, {4}, {0.0, 1.0, 0.0, 0.1});
  Routed routed(params, logits, nullptr, &complexity.tensor());
  EXPECT_EQ(to_ints(routed->token_k), (std::vector<int>{1, 3, 1, 1}));
  std::vector<double> fractions = to_vector(routed->sequence_fractions);
  EXPECT_EQ(fractions, (std::vector<double>{4 * 2 / 6.0, 4 * 1 / 6.0, 4 * 1 / 6.0, 4 * 2 / 6.0}));
}

// ---- Invariants -------------------------------------------------------------------------------

TEST(RoutingModern, ZeroBiasEqualsNoBias) {
  const std::vector<double> values = random_values(150 * 16, 61);
  HostTensor logits = make_tensor(DType::f32, {150, 16}, values);
  HostTensor zero32 = make_tensor(DType::f32, {16}, std::vector<double>(16, 0.0));
  HostTensor zero64 = make_tensor(DType::f64, {16}, std::vector<double>(16, 0.0));
  for (ScoreFunction function : {kSoftmax, kSigmoid}) {
    RoutingParams params = make_params(150, 16, 4, function);
    params.num_groups = 4;
    params.topk_groups = 2;
    params.renormalize = true;
    params.drop_policy = kProbability;
    Routed without(params, logits);
    for (const HostTensor* zero : {&zero32, &zero64}) {
      Routed with(params, logits, &zero->tensor());
      expect_same_integers(*with, *without);
      EXPECT_EQ(to_vector(with->gates), to_vector(without->gates));
      EXPECT_EQ(to_vector(with->losses), to_vector(without->losses));
    }
  }
}

TEST(RoutingModern, AllGroupsKeptEqualsNoGroups) {
  HostTensor logits = make_tensor(DType::f64, {150, 16}, random_values(150 * 16, 62));
  HostTensor bias = make_tensor(DType::f32, {16}, random_values(16, 63, 0.2));
  for (ScoreFunction function : {kSoftmax, kSigmoid}) {
    RoutingParams params = make_params(150, 16, 4, function);
    Routed ungrouped(params, logits, &bias.tensor());
    for (int groups : {2, 4, 8, 16}) {
      params.num_groups = groups;
      params.topk_groups = groups;
      Routed grouped(params, logits, &bias.tensor());
      expect_same_integers(*grouped, *ungrouped);
      EXPECT_EQ(to_vector(grouped->gates), to_vector(ungrouped->gates));
    }
  }
}

TEST(RoutingModern, ScalingMultipliesGatesOnly) {
  HostTensor logits = make_tensor(DType::f64, {120, 8}, random_values(120 * 8, 64));
  for (ScoreFunction function : {kSoftmax, kSigmoid})
    for (bool renormalize : {false, true}) {
      RoutingParams params = make_params(120, 8, 3, function);
      params.renormalize = renormalize;
      Routed unscaled(params, logits);
      params.routed_scaling_factor = 2.5f;
      Routed scaled(params, logits);
      expect_same_integers(*scaled, *unscaled);
      EXPECT_EQ(to_vector(scaled->losses), to_vector(unscaled->losses));
      std::vector<double> expected = to_vector(unscaled->gates);
      for (double& gate : expected) gate *= 2.5;
      EXPECT_LE(max_abs_difference(to_vector(scaled->gates), expected), 1e-15);
      if (renormalize)
        for (int64_t t = 0; t < 120; ++t) {
          double sum = 0;
          for (int j = 0; j < 3; ++j) sum += get_element(scaled->gates, t * 3 + j);
          EXPECT_NEAR(sum, 2.5, 1e-14) << "token " << t;
        }
    }
}

TEST(RoutingModern, ProbabilitySlotsPermuteThePositionSlotsWithinEachExpert) {
  HostTensor logits = make_tensor(DType::f32, {400, 8}, random_values(400 * 8, 65));
  for (ScoreFunction function : {kSoftmax, kSigmoid}) {
    RoutingParams params = make_params(400, 8, 2, function);
    params.capacity_factor = 0.7f;
    params.segment_alignment = 8;
    Routed by_position(params, logits);
    params.drop_policy = kProbability;
    Routed by_probability(params, logits);
    EXPECT_EQ(to_ints(by_probability->expert_ids), to_ints(by_position->expert_ids));
    EXPECT_EQ(to_ints(by_probability->expert_counts), to_ints(by_position->expert_counts));
    EXPECT_EQ(to_ints(by_probability->expert_offsets), to_ints(by_position->expert_offsets));
    EXPECT_EQ(to_ints(by_probability->scalars), to_ints(by_position->scalars));
    EXPECT_NE(to_ints(by_probability->slots), to_ints(by_position->slots));
    const std::vector<int> ids = to_ints(by_probability->expert_ids), slots = to_ints(by_probability->slots);
    const std::vector<int> counts = to_ints(by_probability->expert_counts);
    for (int e = 0; e < 8; ++e) {
      std::vector<int> expert_slots;
      for (size_t i = 0; i < ids.size(); ++i)
        if (ids[i] == e) expert_slots.push_back(slots[i]);
      std::sort(expert_slots.begin(), expert_slots.end());
      std::vector<int> permutation(static_cast<size_t>(counts[size_t(e)]));
      std::iota(permutation.begin(), permutation.end(), 0);
      EXPECT_EQ(expert_slots, permutation) << "expert " << e;
    }
  }
}

TEST(RoutingModern, F32AndF64ReferencesAgreeOnIntegers) {
  const std::vector<double> values = random_values(300 * 32, 66);
  std::vector<double> rounded;
  for (double value : values) rounded.push_back(double(float(value)));
  HostTensor logits32 = make_tensor(DType::f32, {300, 32}, rounded);
  HostTensor logits64 = make_tensor(DType::f64, {300, 32}, rounded);
  HostTensor bias = make_tensor(DType::f32, {32}, random_values(32, 67, 0.3));
  for (ScoreFunction function : {kSoftmax, kSigmoid})
    for (ComplexityMode complexity : {ComplexityMode::none, ComplexityMode::entropy}) {
      RoutingParams params = make_params(300, 32, 6, function);
      params.renormalize = true;
      params.routed_scaling_factor = 2.0f;
      params.num_groups = 8;
      params.topk_groups = 3;
      params.drop_policy = kProbability;
      params.capacity_factor = 0.9f;
      params.complexity = complexity;
      params.tokens_per_sequence = 64;
      params.seq_aux_loss_weight = 0.1f;
      Routed single(params, logits32, &bias.tensor()), dual(params, logits64, &bias.tensor());
      expect_same_integers(*single, *dual);
      EXPECT_LE(relative_error(single->gates, dual->gates), 1e-6);
      EXPECT_LE(relative_error(single->losses, dual->losses), 1e-6);
      EXPECT_LE(relative_error(single->sequence_fractions, dual->sequence_fractions), 1e-6);
    }
}

TEST(RoutingModern, RejectsBadModernInputs) {
  auto expect_error = [](auto&& call, bool bad_input) {
    try {
      call();
      ADD_FAILURE() << "no throw";
    } catch (const Error& error) {
      if (bad_input) EXPECT_EQ(error.exit_code(), kExitBadInput) << error.what();
    }
  };
  RoutingParams params = make_params(10, 4, 2, kSigmoid);
  HostTensor logits = make_tensor(DType::f32, {10, 4}, random_values(40, 68));
  HostRouting routing(params, DType::f32);
  HostTensor short_bias = make_tensor(DType::f32, {3}, {0.1, 0.2, 0.3});
  RoutingInputs inputs;
  inputs.selection_bias = &short_bias.tensor();
  expect_error([&] { cpu::route(logits.tensor(), inputs, params, routing.result); }, false);
  // Sequences of 3 tokens need 4 rows of fractions; these buffers have 1.
  params.tokens_per_sequence = 3;
  params.seq_aux_loss_weight = 0.1f;
  HostRouting one_row(make_params(10, 4, 2), DType::f32);
  expect_error([&] { cpu::route(logits.tensor(), nullptr, params, one_row.result); }, false);
  // Expert choice has its own entry point.
  RoutingParams expert_choice = make_params(10, 4, 2);
  expert_choice.method = RoutingMethod::expert_choice;
  expect_error([&] { cpu::route(logits.tensor(), nullptr, expert_choice, routing.result); }, true);
  // The global-batch gradient needs the fractions.
  RoutingParams global = make_params(10, 4, 2);
  global.global_aux_loss_weight = 0.1f;
  HostRouting routed(global, DType::f32);
  cpu::route(logits.tensor(), nullptr, global, routed.result);
  HostTensor grad_gates = make_tensor(DType::f32, {10, 2}, random_values(20, 69));
  HostTensor grad_logits(DType::f32, {10, 4});
  expect_error([&] { cpu::route_backward(logits.tensor(), grad_gates.tensor(), routed.result, global, 1.0f, 1.0f,
                                         grad_logits.tensor()); },
               true);
}

}  // namespace
