// route_backward of the CPU reference with the modern routing options (src/ops/cpu/routing_backward.cpp;
// semantics: src/ops/moe_ops.h, issue #19) against float64 central finite differences of the whole
// routing loss, and its acceptance of token_k = 0 under expert-choice routing.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <ostream>
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

// ---- route_backward -----------------------------------------------------------------------------

struct BackwardCase {
  ScoreFunction function;
  int k;
  bool renormalize;
  float scaling;
  float capacity_factor;  // small: drops
  ComplexityMode complexity;
  int64_t tokens_per_sequence;  // -1: no sequence loss
  float global_weight;
  bool with_bias;
  int num_groups, topk_groups;
  DropPolicy drops;
  double aux_scale, z_scale;
};

void PrintTo(const BackwardCase& c, std::ostream* os) {
  *os << (c.function == kSigmoid ? "sigmoid" : "softmax") << " k=" << c.k << (c.renormalize ? " renormalize" : "")
      << " scale=" << c.scaling << " cf=" << c.capacity_factor << " complexity=" << int(c.complexity)
      << " seq=" << c.tokens_per_sequence << " global=" << c.global_weight << (c.with_bias ? " bias" : "")
      << " groups=" << c.topk_groups << "/" << c.num_groups << (c.drops == kProbability ? " probability-drops" : "")
      << " aux_scale=" << c.aux_scale << " z_scale=" << c.z_scale;
}

class ModernRouteBackwardMatchesFiniteDifferences : public ::testing::TestWithParam<BackwardCase> {};

// L(logits) = sum_{kept (t, j)} G[t, j] gate[t, j] + a (aux + seq + global) + b z, routed afresh
// for every evaluation; F of the global loss comes from fixed loads, so it is constant, and the
// fractions f of the other two are piecewise constant in the logits, as the backward assumes.
TEST_P(ModernRouteBackwardMatchesFiniteDifferences, AllLogits) {
  const BackwardCase& c = GetParam();
  const int64_t tokens = 24;
  const int experts = 8;
  RoutingParams params = make_params(tokens, experts, c.k, c.function);
  params.renormalize = c.renormalize;
  params.routed_scaling_factor = c.scaling;
  params.capacity_factor = c.capacity_factor;
  params.segment_alignment = 2;
  params.complexity = c.complexity;
  params.num_groups = c.num_groups;
  params.topk_groups = c.topk_groups;
  params.drop_policy = c.drops;
  params.aux_loss_weight = 0.3f;  // large weights so every loss term matters in the check
  params.z_loss_weight = 0.05f;
  if (c.tokens_per_sequence >= 0) {
    params.tokens_per_sequence = c.tokens_per_sequence;
    params.seq_aux_loss_weight = 0.4f;
  }
  params.global_aux_loss_weight = c.global_weight;

  // Well-separated logits (gaps >= 0.2 between any two of a token) so that no choice flips under
  // the 1e-6 perturbation; every evaluation checks that (flips below). Given complexity is kept
  // away from the rounding boundaries.
  std::mt19937_64 generator(uint64_t(c.k * 100 + c.num_groups * 10 + int(c.function) + (c.renormalize ? 1000 : 0)));
  std::uniform_real_distribution<double> jitter(-0.05, 0.05);
  HostTensor logits(DType::f64, {tokens, experts}), complexity(DType::f64, {tokens});
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int> rank(static_cast<size_t>(experts));
    std::iota(rank.begin(), rank.end(), 0);
    std::shuffle(rank.begin(), rank.end(), generator);
    for (int e = 0; e < experts; ++e)
      set_element(logits, t * experts + e, 0.3 * rank[size_t(e)] - 1.0 + jitter(generator));
    const int level = int(generator() % uint64_t(c.k));
    set_element(complexity, t, c.k > 1 ? double(level) / double(c.k - 1) : 0.0);
  }
  HostTensor bias = make_tensor(DType::f32, {experts}, random_values(size_t(experts), uint64_t(c.k) + 7, 0.1));
  HostTensor loads = make_tensor(DType::f64, {experts}, {}), global_fractions(DType::f64, {experts});
  for (int e = 0; e < experts; ++e) set_element(loads, e, 10.0 + double(generator() % 50));
  std::vector<double> grad_gate_values(static_cast<size_t>(tokens * c.k));
  std::normal_distribution<double> normal(0.0, 1.0);
  for (double& value : grad_gate_values) value = normal(generator);
  HostTensor grad_gates = make_tensor(DType::f64, {tokens, c.k}, grad_gate_values);
  const Tensor* bias_tensor = c.with_bias ? &bias.tensor() : nullptr;
  const Tensor* complexity_tensor = c.complexity == ComplexityMode::given ? &complexity.tensor() : nullptr;

  Routed routed(params, logits, bias_tensor, complexity_tensor);
  if (c.capacity_factor < 1.0f) ASSERT_GT(get_element(routed->scalars, kDroppedChoices), 0.0);
  RoutingResult result = *routed;
  if (c.global_weight > 0.0f) cpu::global_balance_loss(loads.tensor(), params, result, global_fractions.tensor());
  HostTensor grad_logits(DType::f64, {tokens, experts});
  poison(grad_logits);
  cpu::route_backward(logits.tensor(), grad_gates.tensor(), result, params, float(c.aux_scale), float(c.z_scale),
                      grad_logits.tensor(), c.global_weight > 0.0f ? &global_fractions.tensor() : nullptr);

  int flips = 0;
  auto objective = [&] {
    Routed again(params, logits, bias_tensor, complexity_tensor);
    RoutingResult perturbed = *again;
    HostTensor fractions(DType::f64, {experts});
    if (c.global_weight > 0.0f) cpu::global_balance_loss(loads.tensor(), params, perturbed, fractions.tensor());
    flips += to_ints(perturbed.expert_ids) != to_ints(result.expert_ids) ||
             to_ints(perturbed.slots) != to_ints(result.slots) || to_ints(perturbed.token_k) != to_ints(result.token_k);
    const double capacity = get_element(perturbed.scalars, kCapacity);
    double sum = 0;
    for (int64_t index = 0; index < tokens * c.k; ++index)
      if (get_element(perturbed.expert_ids, index) >= 0 && get_element(perturbed.slots, index) < capacity)
        sum += grad_gate_values[size_t(index)] * get_element(perturbed.gates, index);
    const double balance = get_element(perturbed.losses, kAuxLoss) + get_element(perturbed.losses, kSeqAuxLoss) +
                           (c.global_weight > 0.0f ? get_element(perturbed.losses, kGlobalAuxLoss) : 0.0);
    return sum + c.aux_scale * balance + c.z_scale * get_element(perturbed.losses, kZLoss);
  };
  const std::vector<double> numeric = central_difference_gradient(objective, logits.tensor(), 1e-6);
  ASSERT_EQ(flips, 0) << "a perturbation changed the routing: the finite differences are not valid";
  EXPECT_LE(relative_error(to_vector(grad_logits), numeric), 1e-6);
  double norm = 0;
  for (double value : numeric) norm += value * value;
  EXPECT_GT(norm, 1e-6);  // the check is not vacuous
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ModernRouteBackwardMatchesFiniteDifferences,
    ::testing::Values(
        BackwardCase{kSigmoid, 2, false, 1.0f, 2.0f, kNone, -1, 0.0f, false, 1, 1, kPosition, 1.0, 1.0},
        BackwardCase{kSigmoid, 2, true, 1.0f, 2.0f, kNone, -1, 0.0f, false, 1, 1, kPosition, 1.0, 1.0},
        BackwardCase{kSigmoid, 3, false, 2.5f, 0.6f, kNone, -1, 0.0f, false, 1, 1, kPosition, 1.0, 1.0},  // drops
        BackwardCase{kSigmoid, 3, true, 2.5f, 0.6f, kNone, -1, 0.0f, true, 4, 2, kProbability, 2.0, 0.5},
        BackwardCase{kSoftmax, 2, true, 1.5f, 2.0f, kNone, -1, 0.0f, false, 1, 1, kPosition, 1.0, 1.0},  // scaled
        BackwardCase{kSoftmax, 2, false, 1.0f, 2.0f, kNone, 5, 0.0f, false, 1, 1, kPosition, 1.0, 0.0},  // seq, S = 5
        BackwardCase{kSigmoid, 2, true, 1.0f, 0.7f, kNone, 0, 0.0f, false, 1, 1, kPosition, 3.0, 1.0},   // seq, S = 1
        BackwardCase{kSoftmax, 2, false, 1.0f, 2.0f, kNone, -1, 0.5f, false, 1, 1, kPosition, 1.0, 1.0},  // global
        BackwardCase{kSigmoid, 2, true, 2.0f, 2.0f, kNone, -1, 0.5f, true, 1, 1, kPosition, 0.5, 1.0},
        BackwardCase{kSoftmax, 4, true, 1.0f, 0.8f, ComplexityMode::given, 8, 0.3f, false, 2, 1, kProbability, 1.0,
                     1.0},
        BackwardCase{kSigmoid, 4, true, 2.5f, 1.0f, ComplexityMode::given, 8, 0.3f, true, 1, 1, kPosition, 1.0, 1.0},
        BackwardCase{kSigmoid, 4, false, 1.0f, 1.25f, ComplexityMode::entropy, 7, 0.3f, false, 1, 1, kPosition, 1.0,
                     1.0},
        BackwardCase{kSoftmax, 3, true, 1.0f, 1.25f, ComplexityMode::entropy, 6, 0.2f, true, 4, 3, kPosition, 1.0,
                     1.0}));

TEST(RoutingModern, BackwardAcceptsTokensWithoutChoicesUnderExpertChoice) {
  // Expert-choice routing reuses route_backward and may leave a token with no expert. Such a token
  // gets the loss gradients only: the same as a token-choice token whose gate gradients are zero.
  const int64_t tokens = 12;
  const int experts = 4;
  RoutingParams params = make_params(tokens, experts, 2);
  params.global_aux_loss_weight = 0.2f;
  HostTensor logits = make_tensor(DType::f64, {tokens, experts}, random_values(size_t(tokens * experts), 71));
  HostTensor fractions = make_tensor(DType::f64, {experts}, {0.1, 0.4, 0.3, 0.2});
  std::vector<double> grad_values = random_values(size_t(tokens * 2), 72);
  HostTensor grad_gates = make_tensor(DType::f64, {tokens, 2}, grad_values);
  Routed routed(params, logits);
  RoutingResult result = *routed;
  const int64_t empty_token = 5;
  grad_values[size_t(empty_token * 2)] = grad_values[size_t(empty_token * 2 + 1)] = 0.0;
  HostTensor zeroed_gates = make_tensor(DType::f64, {tokens, 2}, grad_values);
  HostTensor expected(DType::f64, {tokens, experts}), actual(DType::f64, {tokens, experts});
  poison(expected);
  poison(actual);
  cpu::route_backward(logits.tensor(), zeroed_gates.tensor(), result, params, 1.0f, 1.0f, expected.tensor(),
                      &fractions.tensor());

  set_element(result.token_k, empty_token, 0.0);
  for (int j = 0; j < 2; ++j) {
    set_element(result.expert_ids, empty_token * 2 + j, -1.0);
    set_element(result.slots, empty_token * 2 + j, -1.0);
  }
  EXPECT_THROW(cpu::route_backward(logits.tensor(), grad_gates.tensor(), result, params, 1.0f, 1.0f,
                                   actual.tensor(), &fractions.tensor()),
               Error);  // token choice: every token has k_t >= 1
  params.method = RoutingMethod::expert_choice;
  cpu::route_backward(logits.tensor(), grad_gates.tensor(), result, params, 1.0f, 1.0f, actual.tensor(),
                      &fractions.tensor());
  EXPECT_LE(max_abs_difference(to_vector(actual), to_vector(expected)), 1e-15);
}

}  // namespace
