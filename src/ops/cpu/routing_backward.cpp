// CPU reference of route_backward (semantics: src/ops/moe_ops.h; forward: src/ops/cpu/routing.cpp,
// scores: src/ops/cpu/routing_scores.h). Per token t, with r = routed_scaling_factor and G_j the
// gate gradient of choice j (0 for dropped and empty choices, which add nothing to the output):
//   gates (x = the score: p for softmax, s for sigmoid; gate_j = r x_j, or r x_j / X with
//   X = sum_{i<k_t} x_i when renormalizing):
//     dL/dx_{e_j} = r G_j,  or  r (G_j - sum_i G_i x_i / X) / X
//   balance losses, on the balance score n (p for softmax, s' for sigmoid), each times
//   grad_aux_scale, f / F held constant (as f in Switch Transformer):
//     d aux    / d n[t, e] = w_aux * E * f_e / T,        f_e = first_choice_count_e / T
//     d seq    / d n[t, e] = w_seq * f_{s(t),e} / (S * T_s)
//     d global / d n[t, e] = w_global * E * F_e / T
//   softmax: n = x = p, dL/dz_e = p_e (g_e - sum_f p_f g_f) with g = dL/dp
//   sigmoid: dL/ds_e = dL/dx_e + (dL/dn_e - sum_f n_f dL/dn_f) / sum_f s_f, dL/dz_e = dL/ds_e s_e (1 - s_e)
//   z loss (every score function): d z / d z[t, e] = w_z * 2 * lse_t * p[t, e] / T, times grad_z_scale.
// k_t, the choices and the drops are piecewise constant: no gradient flows through them.
// Expert-choice routing (src/ops/cpu/expert_choice.cpp) reuses this; its tokens may have k_t = 0.
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

template <typename Real>
void route_backward_impl(const Tensor& logits_tensor, const Tensor& grad_gates_tensor, const RoutingResult& routing,
                         const RoutingParams& params, double grad_aux_scale, double grad_z_scale,
                         const Tensor* global_fractions, Tensor& grad_logits_tensor) {
  const int64_t num_tokens = params.num_tokens;
  const int num_experts = params.num_experts, k_max = params.k_max;
  const bool sigmoid = params.score_function == ScoreFunction::sigmoid;
  const int min_choices = params.method == RoutingMethod::expert_choice ? 0 : 1;
  const double scaling = double(params.routed_scaling_factor);
  const Real* logits = logits_tensor.as<Real>();
  const Real* grad_gates = grad_gates_tensor.as<Real>();
  const int32_t* expert_ids = routing.expert_ids.as<int32_t>();
  const int32_t* slots = routing.slots.as<int32_t>();
  const int32_t* token_k = routing.token_k.as<int32_t>();
  const int64_t capacity = routing.scalars.as<int32_t>()[kCapacity];
  Real* grad_logits = grad_logits_tensor.as<Real>();
  if (num_tokens == 0) return;

  // The Switch and global-batch terms of d balance / d n[t, e] are the same for every token.
  const size_t experts = static_cast<size_t>(num_experts);
  std::vector<double> batch_balance_grad(experts, 0.0);
  const double tokens = double(num_tokens);
  for (int expert = 0; expert < num_experts; ++expert) {
    double grad = double(params.aux_loss_weight) * num_experts *
                  double(routing.first_choice_counts.as<int32_t>()[expert]) / (tokens * tokens);
    if (global_fractions != nullptr)
      grad += double(params.global_aux_loss_weight) * num_experts * double(global_fractions->as<Real>()[expert]) /
              tokens;
    batch_balance_grad[size_t(expert)] = grad_aux_scale * grad;
  }
  const bool sequence_loss = params.seq_aux_loss_weight > 0.0f;
  const int64_t sequences = routing_num_sequences(params);
  const Real* sequence_fractions = sequence_loss ? routing.sequence_fractions.as<Real>() : nullptr;

  std::vector<double> probabilities(experts), scores(experts), balance_scores(experts);
  std::vector<double> grad_scores(experts), grad_balance(experts);
  for (int64_t token = 0; token < num_tokens; ++token) {
    const Real* row = logits + token * num_experts;
    const double logsumexp = routing_detail::token_scores(row, num_experts, params.score_function,
                                                          probabilities.data(), scores.data(), balance_scores.data());
    grad_balance = batch_balance_grad;
    if (sequence_loss) {
      const int64_t sequence = routing_detail::sequence_of_token(params, token);
      const double sequence_scale = grad_aux_scale * double(params.seq_aux_loss_weight) /
                                    (double(sequences) * double(routing_detail::sequence_tokens(params, sequence)));
      for (int expert = 0; expert < num_experts; ++expert)
        grad_balance[size_t(expert)] += sequence_scale * double(sequence_fractions[sequence * num_experts + expert]);
    }

    // Gate gradients of kept choices; dropped and empty choices contribute nothing to the output.
    const int choices = token_k[token];
    SY_CHECK(choices >= min_choices && choices <= k_max, "route_backward: token_k[", token, "] = ", choices,
             " is outside [", min_choices, ", k_max]: routing does not belong to these params");
    for (int choice = 0; choice < choices; ++choice) {
      const int expert = expert_ids[token * k_max + choice];
      SY_CHECK(expert >= 0 && expert < num_experts, "route_backward: expert id ", expert, " of token ", token,
               " is outside [0, E)");
    }
    auto chosen_expert = [&](int choice) { return size_t(expert_ids[token * k_max + choice]); };
    auto gate_grad = [&](int choice) {
      const int64_t index = token * k_max + choice;
      const bool kept = expert_ids[index] >= 0 && slots[index] >= 0 && slots[index] < capacity;
      return kept ? scaling * double(grad_gates[index]) : 0.0;
    };
    std::fill(grad_scores.begin(), grad_scores.end(), 0.0);
    if (params.renormalize) {
      // gate_j = r x_j / X with X = sum_{i<k_t} x_i:  dL/dx_i = r (G_i - sum_j G_j x_j / X) / X.
      double kept_score = 0.0;
      for (int choice = 0; choice < choices; ++choice) kept_score += scores[chosen_expert(choice)];
      double weighted = 0.0;
      for (int choice = 0; choice < choices; ++choice)
        weighted += gate_grad(choice) * scores[chosen_expert(choice)] / kept_score;
      for (int choice = 0; choice < choices; ++choice)
        grad_scores[chosen_expert(choice)] += (gate_grad(choice) - weighted) / kept_score;
    } else {
      for (int choice = 0; choice < choices; ++choice) grad_scores[chosen_expert(choice)] += gate_grad(choice);
    }

    const double z_factor = grad_z_scale * double(params.z_loss_weight) * 2.0 * logsumexp / tokens;
    Real* grad_row = grad_logits + token * num_experts;
    if (!sigmoid) {
      // Softmax backward: dL/dz_e = p_e (dL/dp_e - sum_f p_f dL/dp_f); plus the z-loss term.
      double dot = 0.0;
      for (size_t expert = 0; expert < experts; ++expert)
        dot += probabilities[expert] * (grad_scores[expert] + grad_balance[expert]);
      for (size_t expert = 0; expert < experts; ++expert)
        grad_row[expert] =
            Real(probabilities[expert] * (grad_scores[expert] + grad_balance[expert] - dot + z_factor));
      continue;
    }
    // Sigmoid: s' = s / sum s, so dL/ds_e += (dL/ds'_e - sum_f s'_f dL/ds'_f) / sum s; ds/dz = s (1 - s).
    double score_sum = 0.0, dot = 0.0;
    for (size_t expert = 0; expert < experts; ++expert) {
      score_sum += scores[expert];
      dot += balance_scores[expert] * grad_balance[expert];
    }
    for (size_t expert = 0; expert < experts; ++expert) {
      const double grad_score =
          grad_scores[expert] + (score_sum > 0.0 ? (grad_balance[expert] - dot) / score_sum : 0.0);
      const double complement = routing_detail::sigmoid(-double(row[expert]));  // 1 - s, without cancellation
      grad_row[expert] = Real(grad_score * scores[expert] * complement + z_factor * probabilities[expert]);
    }
  }
}

}  // namespace

void route_backward(const Tensor& logits, const Tensor& grad_gates, const RoutingResult& routing,
                    const RoutingParams& params, float grad_aux_scale, float grad_z_scale, Tensor& grad_logits,
                    const Tensor* global_fractions) {
  validate_routing_params(params);
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
  if (params.seq_aux_loss_weight > 0.0f)
    routing_detail::check_sequence_fractions("route_backward", routing.sequence_fractions, params, real);
  SY_CHECK_INPUT(params.global_aux_loss_weight == 0.0f || global_fractions != nullptr,
                 "route_backward: global_aux_loss_weight > 0 needs global_fractions (from global_balance_loss)");
  if (global_fractions != nullptr)
    expect_tensor("route_backward", "global_fractions", *global_fractions, real, {params.num_experts});
  detail::dispatch_float("route_backward", real, [&](auto tag) {
    route_backward_impl<decltype(tag)>(logits, grad_gates, routing, params, grad_aux_scale, grad_z_scale,
                                       global_fractions, grad_logits);
  });
}

}  // namespace cpu
}  // namespace switchyard
