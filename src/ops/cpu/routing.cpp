// CPU reference of token-choice routing (semantics: src/ops/moe_ops.h; this file defines them).
// The backward is src/ops/cpu/routing_backward.cpp, the per-token scores src/ops/cpu/routing_scores.h.
//
// Forward, per token t with logits z[t, 0..E) (double unless marked fp32):
//   lse_t = log sum_e exp(z_e)
//   score:          softmax p_e = exp(z_e - lse_t); sigmoid s_e = 1 / (1 + exp(-z_e))
//   balance score:  softmax p_e;                    sigmoid s'_e = s_e / sum_f s_f
//   key_e (fp32, routing_math.h): softmax fp32(z_e) (+ b_e); sigmoid routing_sigmoid(fp32(z_e)) (+ b_e)
//   groups (num_groups > topk_groups): group score from the group's two largest keys k1 >= k2:
//     sigmoid k1 + k2, softmax routing_exp(k1 - m) + routing_exp(k2 - m), m = max key (k1 term
//     only for one-expert groups); keep the topk_groups best groups, ties to the lower group
//   choices e_0..e_{K-1}: the K largest keys of the allowed experts, ties to the lower expert index
//   k_t = K, or k_min + floor(c_t * (K - k_min) + 0.5), c_t in [0, 1] given or the normalized
//     entropy of the balance score
//   gate_j = r * score[e_j] (/ sum_{i<k_t} score[e_i] when renormalizing) for j < k_t, r = the
//     routed_scaling_factor
// then over all tokens: slots (position: GShard order, choice 0 of every token in token order, then
// choice 1, ...; probability: per expert by the fp32 priority score from high to low, ties in GShard
// order), capacity from sum_t k_t, drops (slot >= capacity), the padded layout offsets, and
//   aux = w_aux * E * sum_e (first_choice_count_e / T) * (prob_sum_e / T), prob_sum_e = sum_t balance
//   z   = w_z * mean_t lse_t^2
//   seq = w_seq * mean_s sum_e f_{s,e} P_{s,e}, f_{s,e} = E count_{s,e} / C_s, P_{s,e} = the mean
//         balance score of e over the sequence's tokens (written only when w_seq > 0)
//   global = 0 (global_balance_loss computes it once the loads are reduced).
// k_t, the choices and the drops are piecewise constant: no gradient flows through them.
//
// Layout: logits [T, E] row-major; per-choice tensors [T, K]; every float tensor of one call has
// the logits' type (f32 or f64), the selection bias f32 or f64; index tensors are int32.
#include <algorithm>
#include <cmath>
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/cpu/routing_scores.h"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace cpu {
namespace {

using detail::expect_tensor;
using routing_detail::token_scores;

// The k largest values among the candidates (allowed == nullptr: all) by repeated selection: "a
// beats b" when its value is larger, or equal with a lower index. Selection (not a sort) keeps the
// tie rule obvious and is safe with any values.
void select_top_k(const float* values, int count, int k, const char* allowed, int* chosen) {
  std::vector<char> taken(static_cast<size_t>(count), 0);
  for (int choice = 0; choice < k; ++choice) {
    int best = -1;
    for (int candidate = 0; candidate < count; ++candidate) {
      if (taken[size_t(candidate)] || (allowed && !allowed[candidate])) continue;
      if (best < 0 || values[candidate] > values[best]) best = candidate;  // strict >: ties keep the lower index
    }
    chosen[choice] = best;
    taken[size_t(best)] = 1;
  }
}

// fp32 selection keys of one token, bit-identical to the CUDA router's (routing_math.h).
template <typename Real>
void selection_keys(const Real* logits, const RoutingParams& params, const std::vector<float>& bias, float* keys) {
  for (int expert = 0; expert < params.num_experts; ++expert) {
    const float logit = float(logits[expert]);
    float key = params.score_function == ScoreFunction::sigmoid ? routing_sigmoid(logit) : logit;
    if (!bias.empty()) key = key + bias[size_t(expert)];
    keys[expert] = key;
  }
}

// Group-limited routing: marks the experts of the token's topk_groups best groups in `allowed`.
// group_scores: scratch of num_groups floats.
void allowed_experts_of_groups(const float* keys, const RoutingParams& params, float* group_scores,
                               int* kept_groups, char* allowed) {
  const int group_size = params.num_experts / params.num_groups;
  float max_key = keys[0];
  for (int expert = 1; expert < params.num_experts; ++expert) max_key = keys[expert] > max_key ? keys[expert] : max_key;
  int top_two[2] = {0, 0};
  for (int group = 0; group < params.num_groups; ++group) {
    const float* group_keys = keys + group * group_size;
    select_top_k(group_keys, group_size, std::min(2, group_size), nullptr, top_two);
    const float first = group_keys[top_two[0]];
    if (params.score_function == ScoreFunction::sigmoid) {
      group_scores[group] = group_size == 1 ? first : first + group_keys[top_two[1]];
    } else {  // the two largest probabilities up to the token's common factor
      const float first_term = routing_exp(first - max_key);
      group_scores[group] = group_size == 1 ? first_term : first_term + routing_exp(group_keys[top_two[1]] - max_key);
    }
  }
  select_top_k(group_scores, params.num_groups, params.topk_groups, nullptr, kept_groups);
  std::fill(allowed, allowed + params.num_experts, char(0));
  for (int kept = 0; kept < params.topk_groups; ++kept)
    std::fill(allowed + kept_groups[kept] * group_size, allowed + (kept_groups[kept] + 1) * group_size, char(1));
}

// The fp32 priority score of expert `expert` for probability drops (routing_math.h): the unbiased
// score in the fixed order both backends share.
template <typename Real>
float priority_score(const Real* logits, const RoutingParams& params, float max_logit, float denominator,
                     int expert) {
  if (params.score_function == ScoreFunction::sigmoid) return routing_sigmoid(float(logits[expert]));
  return routing_softmax_priority(float(logits[expert]), max_logit, denominator);
}

int choices_for_complexity(const RoutingParams& params, double complexity) {
  const double clamped = std::min(1.0, std::max(0.0, complexity));
  return params.k_min + int(std::floor(clamped * double(params.k_max - params.k_min) + 0.5));
}

// Normalized entropy of a distribution in [0, 1]; 0 for a single expert (nothing to be unsure of).
double normalized_entropy(const double* distribution, int num_experts) {
  if (num_experts < 2) return 0.0;
  double entropy = 0.0;
  for (int expert = 0; expert < num_experts; ++expert)
    if (distribution[expert] > 0.0) entropy -= distribution[expert] * std::log(distribution[expert]);
  return entropy / std::log(double(num_experts));
}

// Per-sequence sums of the sequence-level loss.
struct SequenceSums {
  std::vector<int64_t> counts;         // [S, E] choices of the sequence's tokens per expert (before capacity)
  std::vector<int64_t> choices;        // [S] sum of k_t
  std::vector<double> balance_sums;    // [S, E] sum of the balance scores
};

// seq = w_seq * mean_s sum_e f_{s,e} P_{s,e}; writes f to sequence_fractions [S, E].
template <typename Real>
double sequence_balance_loss(const SequenceSums& sums, const RoutingParams& params, Tensor& sequence_fractions) {
  const int64_t sequences = routing_num_sequences(params);
  const int num_experts = params.num_experts;
  Real* fractions = sequence_fractions.as<Real>();
  double total = 0.0;
  for (int64_t sequence = 0; sequence < sequences; ++sequence) {
    const int64_t tokens = routing_detail::sequence_tokens(params, sequence);
    const int64_t choices = sums.choices[size_t(sequence)];
    double product = 0.0;
    for (int expert = 0; expert < num_experts; ++expert) {
      const size_t index = size_t(sequence * num_experts + expert);
      const double fraction = choices > 0 ? double(num_experts) * double(sums.counts[index]) / double(choices) : 0.0;
      fractions[index] = Real(fraction);
      if (tokens > 0) product += fraction * sums.balance_sums[index] / double(tokens);
    }
    total += product;
  }
  return double(params.seq_aux_loss_weight) * total / double(sequences);
}

// Slots by probability: per expert, its choices in GShard order, then stably sorted by priority
// from high to low (NaN ranks last). Writes slots and per-expert counts.
void probability_slots(const int32_t* expert_ids, const std::vector<float>& priorities, const RoutingParams& params,
                       int32_t* slots, std::vector<int64_t>& counts) {
  std::vector<std::vector<int64_t>> choices_of_expert(static_cast<size_t>(params.num_experts));
  for (int choice = 0; choice < params.k_max; ++choice)
    for (int64_t token = 0; token < params.num_tokens; ++token) {
      const int64_t index = token * params.k_max + choice;
      if (expert_ids[index] >= 0) choices_of_expert[size_t(expert_ids[index])].push_back(index);
    }
  auto rank_key = [&](int64_t index) {
    const float priority = priorities[size_t(index)];
    return std::isnan(priority) ? -INFINITY : priority;
  };
  for (int expert = 0; expert < params.num_experts; ++expert) {
    std::vector<int64_t>& order = choices_of_expert[size_t(expert)];
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return rank_key(a) > rank_key(b); });
    for (size_t rank = 0; rank < order.size(); ++rank) slots[order[rank]] = int32_t(rank);
    counts[size_t(expert)] = int64_t(order.size());
  }
}

template <typename Real>
void route_impl(const Tensor& logits_tensor, const Tensor* complexity_tensor, const std::vector<float>& bias,
                const RoutingParams& params, RoutingResult& result) {
  const int64_t num_tokens = params.num_tokens;
  const int num_experts = params.num_experts, k_max = params.k_max;
  const bool limit_groups = params.topk_groups < params.num_groups;
  const bool probability_drops = params.drop_policy == DropPolicy::probability;
  const bool sequence_loss = params.seq_aux_loss_weight > 0.0f;
  const double scaling = double(params.routed_scaling_factor);
  const Real* logits = logits_tensor.as<Real>();
  int32_t* expert_ids = result.expert_ids.as<int32_t>();
  Real* gates = result.gates.as<Real>();
  int32_t* slots = result.slots.as<int32_t>();
  int32_t* token_k = result.token_k.as<int32_t>();

  const size_t experts = static_cast<size_t>(num_experts);
  std::vector<double> probabilities(experts), scores(experts), balance_scores(experts);
  std::vector<double> prob_sums(experts, 0.0);
  std::vector<float> keys(experts), group_scores(static_cast<size_t>(params.num_groups));
  std::vector<int> kept_groups(static_cast<size_t>(params.num_groups));
  std::vector<char> allowed(experts, 1);
  std::vector<int> chosen(static_cast<size_t>(k_max));
  std::vector<int64_t> first_choice_counts(experts, 0);
  std::vector<float> priorities(probability_drops ? size_t(num_tokens * k_max) : 0);
  const int64_t sequences = routing_num_sequences(params);
  SequenceSums sequence_sums;
  if (sequence_loss) {
    sequence_sums.counts.assign(size_t(sequences) * experts, 0);
    sequence_sums.choices.assign(size_t(sequences), 0);
    sequence_sums.balance_sums.assign(size_t(sequences) * experts, 0.0);
  }
  double sum_squared_logsumexp = 0.0;
  int64_t total_choices = 0;

  // Per token: scores, keys, (groups,) top-k, k_t, gates.
  for (int64_t token = 0; token < num_tokens; ++token) {
    const Real* row = logits + token * num_experts;
    const double logsumexp = token_scores(row, num_experts, params.score_function, probabilities.data(),
                                          scores.data(), balance_scores.data());
    result.logsumexp.as<Real>()[token] = Real(logsumexp);
    sum_squared_logsumexp += logsumexp * logsumexp;
    for (size_t expert = 0; expert < experts; ++expert) prob_sums[expert] += balance_scores[expert];

    selection_keys(row, params, bias, keys.data());
    if (limit_groups)
      allowed_experts_of_groups(keys.data(), params, group_scores.data(), kept_groups.data(), allowed.data());
    select_top_k(keys.data(), num_experts, k_max, limit_groups ? allowed.data() : nullptr, chosen.data());
    int choices = k_max;
    if (params.complexity == ComplexityMode::given) {
      const double complexity = double(complexity_tensor->as<Real>()[token]);
      SY_CHECK(!std::isnan(complexity), "route: complexity of token ", token, " is NaN");
      choices = choices_for_complexity(params, complexity);
    } else if (params.complexity == ComplexityMode::entropy) {
      choices = choices_for_complexity(params, normalized_entropy(balance_scores.data(), num_experts));
    }
    token_k[token] = choices;
    total_choices += choices;
    ++first_choice_counts[size_t(chosen[0])];  // k_t >= 1, so choice 0 always exists

    double kept_score = 0.0;
    for (int choice = 0; choice < choices; ++choice) kept_score += scores[size_t(chosen[size_t(choice)])];
    const double normalizer = params.renormalize ? kept_score : 1.0;
    for (int choice = 0; choice < k_max; ++choice) {
      const int64_t index = token * k_max + choice;
      const bool active = choice < choices;
      expert_ids[index] = active ? chosen[size_t(choice)] : -1;
      gates[index] = active ? Real(scaling * (scores[size_t(chosen[size_t(choice)])] / normalizer)) : Real(0);
      slots[index] = -1;
    }

    if (probability_drops) {
      float max_logit = float(row[0]);
      for (int expert = 1; expert < num_experts; ++expert)
        max_logit = float(row[expert]) > max_logit ? float(row[expert]) : max_logit;
      const float denominator =
          params.score_function == ScoreFunction::softmax
              ? routing_softmax_denominator(num_experts, max_logit, [&](int expert) { return float(row[expert]); })
              : 1.0f;
      for (int choice = 0; choice < choices; ++choice)
        priorities[size_t(token * k_max + choice)] =
            priority_score(row, params, max_logit, denominator, chosen[size_t(choice)]);
    }
    if (sequence_loss) {
      const int64_t sequence = routing_detail::sequence_of_token(params, token);
      sequence_sums.choices[size_t(sequence)] += choices;
      for (int choice = 0; choice < choices; ++choice)
        ++sequence_sums.counts[size_t(sequence) * experts + size_t(chosen[size_t(choice)])];
      for (size_t expert = 0; expert < experts; ++expert)
        sequence_sums.balance_sums[size_t(sequence) * experts + expert] += balance_scores[expert];
    }
  }

  const int64_t capacity = expert_capacity(params, total_choices);
  std::vector<int64_t> counts(experts, 0);
  if (probability_drops) {
    probability_slots(expert_ids, priorities, params, slots, counts);
  } else {
    // GShard priority: rank choice j of every token (in token order) before any choice j + 1.
    for (int choice = 0; choice < k_max; ++choice) {
      for (int64_t token = 0; token < num_tokens; ++token) {
        const int64_t index = token * k_max + choice;
        const int expert = expert_ids[index];
        if (expert >= 0) slots[index] = int32_t(counts[size_t(expert)]++);
      }
    }
  }
  int64_t dropped = 0;
  for (int64_t index = 0; index < num_tokens * k_max; ++index)
    if (expert_ids[index] >= 0 && slots[index] >= capacity) ++dropped;

  int32_t* offsets = result.expert_offsets.as<int32_t>();
  offsets[0] = 0;
  for (int expert = 0; expert < num_experts; ++expert) {
    const int64_t kept = std::min(counts[size_t(expert)], capacity);
    offsets[expert + 1] = int32_t(offsets[expert] + round_up(kept, params.segment_alignment));
    result.expert_counts.as<int32_t>()[expert] = int32_t(counts[size_t(expert)]);
    result.first_choice_counts.as<int32_t>()[expert] = int32_t(first_choice_counts[size_t(expert)]);
    result.prob_sums.as<Real>()[expert] = Real(prob_sums[size_t(expert)]);
  }

  int32_t* scalars = result.scalars.as<int32_t>();
  scalars[kCapacity] = int32_t(capacity);
  scalars[kTotalChoices] = int32_t(total_choices);
  scalars[kDroppedChoices] = int32_t(dropped);
  scalars[kPaddedRows] = offsets[num_experts];

  double balance = 0.0;
  for (int expert = 0; expert < num_experts; ++expert)
    balance += double(first_choice_counts[size_t(expert)]) * prob_sums[size_t(expert)];
  const double tokens = double(num_tokens);
  Real* losses = result.losses.as<Real>();
  losses[kAuxLoss] = num_tokens ? Real(double(params.aux_loss_weight) * num_experts * balance / (tokens * tokens))
                                : Real(0);
  losses[kZLoss] = num_tokens ? Real(double(params.z_loss_weight) * sum_squared_logsumexp / tokens) : Real(0);
  losses[kSeqAuxLoss] =
      sequence_loss ? Real(sequence_balance_loss<Real>(sequence_sums, params, result.sequence_fractions)) : Real(0);
  losses[kGlobalAuxLoss] = Real(0);
}

// The selection bias as fp32 (the keys are fp32 on both backends); empty without one.
std::vector<float> selection_bias_values(const Tensor* bias, const RoutingParams& params) {
  std::vector<float> values;
  if (bias == nullptr) return values;
  detail::expect_float_matrix("route", "selection_bias", *bias, 1);
  expect_tensor("route", "selection_bias", *bias, bias->dtype, {params.num_experts});
  values.resize(size_t(params.num_experts));
  detail::dispatch_float("route", bias->dtype, [&](auto real) {
    using Real = decltype(real);
    for (int expert = 0; expert < params.num_experts; ++expert)
      values[size_t(expert)] = float(bias->as<Real>()[expert]);
  });
  return values;
}

}  // namespace

void route(const Tensor& logits, const RoutingInputs& inputs, const RoutingParams& params, RoutingResult& result) {
  validate_routing_params(params);
  SY_CHECK_INPUT(params.method == RoutingMethod::token_choice,
                 "route: params.method is expert_choice: route it with route_expert_choice (ops::route does)");
  const Tensor* complexity = inputs.complexity;
  detail::expect_float_matrix("route", "logits", logits, 2);
  expect_tensor("route", "logits", logits, logits.dtype, {params.num_tokens, params.num_experts});
  routing_detail::check_routing_tensors("route", result, params, logits.dtype);
  if (params.complexity == ComplexityMode::given) {
    SY_CHECK(complexity != nullptr, "route: complexity = given needs a complexity tensor");
    expect_tensor("route", "complexity", *complexity, logits.dtype, {params.num_tokens});
  }
  const std::vector<float> bias = selection_bias_values(inputs.selection_bias, params);
  detail::dispatch_float("route", logits.dtype, [&](auto real) {
    route_impl<decltype(real)>(logits, complexity, bias, params, result);
  });
}

}  // namespace cpu
}  // namespace switchyard
