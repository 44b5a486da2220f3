// CPU reference of routing and its backward (semantics: src/ops/moe_ops.h; this file defines them).
//
// Forward, per token t with logits z[t, 0..E):
//   lse_t = log sum_e exp(z_e),  p_e = exp(z_e - lse_t)                      (double)
//   choices e_0..e_{K-1}: the K largest logits, ties to the lower expert index
//   k_t = K, or k_min + floor(c_t * (K - k_min) + 0.5) with c_t in [0, 1] (given or entropy)
//   gate_j = p[e_j] (or p[e_j] / sum_{i<k_t} p[e_i] when renormalizing) for j < k_t
// then over all tokens: GShard slots (choice 0 of every token in token order, then choice 1, ...),
// capacity from sum_t k_t, drops (slot >= capacity), the padded layout offsets, and
//   aux = w_aux * E * sum_e (first_choice_count_e / T) * (prob_sum_e / T)
//   z   = w_z * mean_t lse_t^2.
// Backward: through the gates (renormalization, softmax) for kept choices only, plus
//   d aux / d p[t, e] = w_aux * E * f_e / T   (f_e held constant, as in Switch Transformer)
//   d z / d z[t, e]   = w_z * 2 * lse_t * p[t, e] / T.
// k_t, the choices and the drops are piecewise constant: no gradient flows through them.
//
// Layout: logits [T, E] row-major; per-choice tensors [T, K]; every float tensor of one call has
// the logits' type (f32 or f64); index tensors are int32.
#include <algorithm>
#include <cmath>
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace cpu {
namespace {

using detail::expect_tensor;

// Softmax of one row in double; returns logsumexp.
template <typename Real>
double softmax_row(const Real* logits, int num_experts, double* probabilities) {
  double max_logit = -INFINITY;
  for (int expert = 0; expert < num_experts; ++expert) max_logit = std::max(max_logit, double(logits[expert]));
  double sum = 0.0;
  for (int expert = 0; expert < num_experts; ++expert) {
    probabilities[expert] = std::exp(double(logits[expert]) - max_logit);
    sum += probabilities[expert];
  }
  for (int expert = 0; expert < num_experts; ++expert) probabilities[expert] /= sum;
  return max_logit + std::log(sum);
}

// The k largest logits by repeated selection: "a beats b" when its logit is larger, or equal with a
// lower index. Selection (not a sort) keeps the tie rule obvious and is safe with any values.
template <typename Real>
void select_top_k(const Real* logits, int num_experts, int k, int* chosen) {
  std::vector<char> taken(static_cast<size_t>(num_experts), 0);
  for (int choice = 0; choice < k; ++choice) {
    int best = -1;
    for (int expert = 0; expert < num_experts; ++expert) {
      if (taken[size_t(expert)]) continue;
      if (best < 0 || logits[expert] > logits[best]) best = expert;  // strict >: ties keep the lower index
    }
    chosen[choice] = best;
    taken[size_t(best)] = 1;
  }
}

int choices_for_complexity(const RoutingParams& params, double complexity) {
  const double clamped = std::min(1.0, std::max(0.0, complexity));
  return params.k_min + int(std::floor(clamped * double(params.k_max - params.k_min) + 0.5));
}

// Normalized router entropy in [0, 1]; 0 for a single expert (nothing to be uncertain about).
double normalized_entropy(const double* probabilities, int num_experts) {
  if (num_experts < 2) return 0.0;
  double entropy = 0.0;
  for (int expert = 0; expert < num_experts; ++expert)
    if (probabilities[expert] > 0.0) entropy -= probabilities[expert] * std::log(probabilities[expert]);
  return entropy / std::log(double(num_experts));
}

void check_routing_tensors(const char* op, const RoutingResult& result, const RoutingParams& params, DType real) {
  const int64_t tokens = params.num_tokens, experts = params.num_experts, k = params.k_max;
  expect_tensor(op, "expert_ids", result.expert_ids, DType::i32, {tokens, k});
  expect_tensor(op, "gates", result.gates, real, {tokens, k});
  expect_tensor(op, "slots", result.slots, DType::i32, {tokens, k});
  expect_tensor(op, "token_k", result.token_k, DType::i32, {tokens});
  expect_tensor(op, "logsumexp", result.logsumexp, real, {tokens});
  expect_tensor(op, "expert_counts", result.expert_counts, DType::i32, {experts});
  expect_tensor(op, "first_choice_counts", result.first_choice_counts, DType::i32, {experts});
  expect_tensor(op, "prob_sums", result.prob_sums, real, {experts});
  expect_tensor(op, "expert_offsets", result.expert_offsets, DType::i32, {experts + 1});
  expect_tensor(op, "scalars", result.scalars, DType::i32, {kNumRoutingScalars});
  expect_tensor(op, "losses", result.losses, real, {kNumRoutingLosses});
}

template <typename Real>
void route_impl(const Tensor& logits_tensor, const Tensor* complexity_tensor, const RoutingParams& params,
                RoutingResult& result) {
  const int64_t num_tokens = params.num_tokens;
  const int num_experts = params.num_experts, k_max = params.k_max;
  const Real* logits = logits_tensor.as<Real>();
  int32_t* expert_ids = result.expert_ids.as<int32_t>();
  Real* gates = result.gates.as<Real>();
  int32_t* slots = result.slots.as<int32_t>();
  int32_t* token_k = result.token_k.as<int32_t>();

  std::vector<double> probabilities(static_cast<size_t>(num_experts));
  std::vector<double> prob_sums(static_cast<size_t>(num_experts), 0.0);
  std::vector<int> chosen(static_cast<size_t>(k_max));
  std::vector<int64_t> first_choice_counts(static_cast<size_t>(num_experts), 0);
  double sum_squared_logsumexp = 0.0;
  int64_t total_choices = 0;

  // Per token: softmax, top-k, k_t, gates.
  for (int64_t token = 0; token < num_tokens; ++token) {
    const Real* row = logits + token * num_experts;
    const double logsumexp = softmax_row(row, num_experts, probabilities.data());
    result.logsumexp.as<Real>()[token] = Real(logsumexp);
    sum_squared_logsumexp += logsumexp * logsumexp;
    for (int expert = 0; expert < num_experts; ++expert) prob_sums[size_t(expert)] += probabilities[size_t(expert)];

    select_top_k(row, num_experts, k_max, chosen.data());
    int choices = k_max;
    if (params.complexity == ComplexityMode::given) {
      const double complexity = double(complexity_tensor->as<Real>()[token]);
      SY_CHECK(!std::isnan(complexity), "route: complexity of token ", token, " is NaN");
      choices = choices_for_complexity(params, complexity);
    } else if (params.complexity == ComplexityMode::entropy) {
      choices = choices_for_complexity(params, normalized_entropy(probabilities.data(), num_experts));
    }
    token_k[token] = choices;
    total_choices += choices;
    ++first_choice_counts[size_t(chosen[0])];  // k_t >= 1, so choice 0 always exists

    double kept_probability = 0.0;
    for (int choice = 0; choice < choices; ++choice) kept_probability += probabilities[size_t(chosen[size_t(choice)])];
    const double normalizer = params.renormalize ? kept_probability : 1.0;
    for (int choice = 0; choice < k_max; ++choice) {
      const int64_t index = token * k_max + choice;
      const bool active = choice < choices;
      expert_ids[index] = active ? chosen[size_t(choice)] : -1;
      gates[index] = active ? Real(probabilities[size_t(chosen[size_t(choice)])] / normalizer) : Real(0);
      slots[index] = -1;
    }
  }

  // GShard priority: rank choice j of every token (in token order) before any choice j + 1.
  const int64_t capacity = expert_capacity(params, total_choices);
  std::vector<int64_t> counts(static_cast<size_t>(num_experts), 0);
  int64_t dropped = 0;
  for (int choice = 0; choice < k_max; ++choice) {
    for (int64_t token = 0; token < num_tokens; ++token) {
      const int64_t index = token * k_max + choice;
      const int expert = expert_ids[index];
      if (expert < 0) continue;
      const int64_t slot = counts[size_t(expert)]++;
      slots[index] = int32_t(slot);
      if (slot >= capacity) ++dropped;
    }
  }

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
  losses[kSeqAuxLoss] = Real(0);
  losses[kGlobalAuxLoss] = Real(0);
}

template <typename Real>
void route_backward_impl(const Tensor& logits_tensor, const Tensor& grad_gates_tensor, const RoutingResult& routing,
                         const RoutingParams& params, double grad_aux_scale, double grad_z_scale,
                         Tensor& grad_logits_tensor) {
  const int64_t num_tokens = params.num_tokens;
  const int num_experts = params.num_experts, k_max = params.k_max;
  const Real* logits = logits_tensor.as<Real>();
  const Real* grad_gates = grad_gates_tensor.as<Real>();
  const int32_t* expert_ids = routing.expert_ids.as<int32_t>();
  const int32_t* slots = routing.slots.as<int32_t>();
  const int32_t* token_k = routing.token_k.as<int32_t>();
  const int64_t capacity = routing.scalars.as<int32_t>()[kCapacity];
  Real* grad_logits = grad_logits_tensor.as<Real>();

  // d aux / d p[t, e] is the same for every token.
  std::vector<double> aux_grad_per_prob(static_cast<size_t>(num_experts), 0.0);
  const double tokens = double(num_tokens);
  for (int expert = 0; expert < num_experts && num_tokens; ++expert)
    aux_grad_per_prob[size_t(expert)] = grad_aux_scale * double(params.aux_loss_weight) * num_experts *
                                        double(routing.first_choice_counts.as<int32_t>()[expert]) / (tokens * tokens);

  std::vector<double> probabilities(static_cast<size_t>(num_experts));
  std::vector<double> grad_probs(static_cast<size_t>(num_experts));
  for (int64_t token = 0; token < num_tokens; ++token) {
    const Real* row = logits + token * num_experts;
    const double logsumexp = softmax_row(row, num_experts, probabilities.data());
    for (int expert = 0; expert < num_experts; ++expert) grad_probs[size_t(expert)] = aux_grad_per_prob[size_t(expert)];

    // Gate gradients of kept choices; dropped and empty choices contribute nothing to the output.
    const int choices = token_k[token];
    SY_CHECK(choices >= 1 && choices <= k_max, "route_backward: token_k[", token, "] = ", choices,
             " is outside [1, k_max]: routing does not belong to these params");
    for (int choice = 0; choice < choices; ++choice) {
      const int expert = expert_ids[token * k_max + choice];
      SY_CHECK(expert >= 0 && expert < num_experts, "route_backward: expert id ", expert, " of token ", token,
               " is outside [0, E)");
    }
    double kept_probability = 0.0;
    for (int choice = 0; choice < choices; ++choice)
      kept_probability += probabilities[size_t(expert_ids[token * k_max + choice])];
    auto gate_grad = [&](int choice) {
      const int64_t index = token * k_max + choice;
      const bool kept = expert_ids[index] >= 0 && slots[index] >= 0 && slots[index] < capacity;
      return kept ? double(grad_gates[index]) : 0.0;
    };
    if (params.renormalize) {
      // gate_j = p_j / S with S = sum_{i<k_t} p_i:  dL/dp_i = (G_i - sum_j G_j gate_j) / S.
      double weighted = 0.0;
      for (int choice = 0; choice < choices; ++choice)
        weighted += gate_grad(choice) * probabilities[size_t(expert_ids[token * k_max + choice])] / kept_probability;
      for (int choice = 0; choice < choices; ++choice)
        grad_probs[size_t(expert_ids[token * k_max + choice])] += (gate_grad(choice) - weighted) / kept_probability;
    } else {
      for (int choice = 0; choice < choices; ++choice)
        grad_probs[size_t(expert_ids[token * k_max + choice])] += gate_grad(choice);
    }

    // Softmax backward: dL/dz_e = p_e (dL/dp_e - sum_f p_f dL/dp_f); plus the z-loss term.
    double dot = 0.0;
    for (int expert = 0; expert < num_experts; ++expert)
      dot += probabilities[size_t(expert)] * grad_probs[size_t(expert)];
    const double z_factor = grad_z_scale * double(params.z_loss_weight) * 2.0 * logsumexp / tokens;
    for (int expert = 0; expert < num_experts; ++expert) {
      const double probability = probabilities[size_t(expert)];
      grad_logits[token * num_experts + expert] =
          Real(probability * (grad_probs[size_t(expert)] - dot) + z_factor * probability);
    }
  }
}

}  // namespace

void route(const Tensor& logits, const RoutingInputs& inputs, const RoutingParams& params, RoutingResult& result) {
  validate_routing_params(params);
  const Tensor* complexity = inputs.complexity;
  SY_CHECK_INPUT(params.method == RoutingMethod::token_choice && params.score_function == ScoreFunction::softmax &&
                     params.num_groups == 1 && params.drop_policy == DropPolicy::position &&
                     params.seq_aux_loss_weight == 0.0f && inputs.selection_bias == nullptr,
                 "route: this CPU build routes with softmax top-k only (sigmoid, bias, groups, probability drops, "
                 "the sequence loss and expert choice are not in it yet)");
  detail::expect_float_matrix("route", "logits", logits, 2);
  expect_tensor("route", "logits", logits, logits.dtype, {params.num_tokens, params.num_experts});
  check_routing_tensors("route", result, params, logits.dtype);
  if (params.complexity == ComplexityMode::given) {
    SY_CHECK(complexity != nullptr, "route: complexity = given needs a complexity tensor");
    expect_tensor("route", "complexity", *complexity, logits.dtype, {params.num_tokens});
  }
  detail::dispatch_float("route", logits.dtype, [&](auto real) {
    route_impl<decltype(real)>(logits, complexity, params, result);
  });
}

void route_backward(const Tensor& logits, const Tensor& grad_gates, const RoutingResult& routing,
                    const RoutingParams& params, float grad_aux_scale, float grad_z_scale, Tensor& grad_logits,
                    const Tensor* global_fractions) {
  validate_routing_params(params);
  SY_CHECK_INPUT(global_fractions == nullptr && params.score_function == ScoreFunction::softmax,
                 "route_backward: this CPU build has no sigmoid or global-batch loss gradient yet");
  detail::expect_float_matrix("route_backward", "logits", logits, 2);
  const DType real = logits.dtype;
  expect_tensor("route_backward", "logits", logits, real, {params.num_tokens, params.num_experts});
  expect_tensor("route_backward", "grad_gates", grad_gates, real, {params.num_tokens, params.k_max});
  expect_tensor("route_backward", "grad_logits", grad_logits, real, {params.num_tokens, params.num_experts});
  expect_tensor("route_backward", "expert_ids", routing.expert_ids, DType::i32, {params.num_tokens, params.k_max});
  expect_tensor("route_backward", "slots", routing.slots, DType::i32, {params.num_tokens, params.k_max});
  expect_tensor("route_backward", "token_k", routing.token_k, DType::i32, {params.num_tokens});
  expect_tensor("route_backward", "first_choice_counts", routing.first_choice_counts, DType::i32,
                {params.num_experts});
  expect_tensor("route_backward", "scalars", routing.scalars, DType::i32, {kNumRoutingScalars});
  detail::dispatch_float("route_backward", real, [&](auto tag) {
    route_backward_impl<decltype(tag)>(logits, grad_gates, routing, params, grad_aux_scale, grad_z_scale,
                                       grad_logits);
  });
}

}  // namespace cpu
}  // namespace switchyard
