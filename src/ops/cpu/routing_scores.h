// The per-token router scores of the CPU routing reference, in double, shared by route
// (src/ops/cpu/routing.cpp) and route_backward (src/ops/cpu/routing_backward.cpp) so that both
// see the same numbers (semantics: src/ops/moe_ops.h):
//   lse     = log sum_e exp(z_e)                          (every score function: the z loss)
//   softmax: score p_e = exp(z_e - lse),          balance score p_e
//   sigmoid: score s_e = 1 / (1 + exp(-z_e)),     balance score s'_e = s_e / sum_f s_f
// "score" feeds the gates; "balance score" feeds prob_sums, the balance losses and the entropy.
// These are the reference's values, not the selection keys: those are fp32 (routing_math.h).
#pragma once

#include <algorithm>
#include <cmath>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/moe_ops.h"

namespace switchyard {
namespace cpu {
namespace routing_detail {

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

inline double sigmoid(double logit) { return 1.0 / (1.0 + std::exp(-logit)); }

// One token's scores. scores / balance_scores / probabilities: [E] each (balance_scores may alias
// probabilities for softmax, where they are the same). Returns logsumexp.
template <typename Real>
double token_scores(const Real* logits, int num_experts, ScoreFunction function, double* probabilities,
                    double* scores, double* balance_scores) {
  const double logsumexp = softmax_row(logits, num_experts, probabilities);
  if (function == ScoreFunction::softmax) {
    for (int expert = 0; expert < num_experts; ++expert) {
      scores[expert] = probabilities[expert];
      balance_scores[expert] = probabilities[expert];
    }
    return logsumexp;
  }
  double score_sum = 0.0;
  for (int expert = 0; expert < num_experts; ++expert) {
    scores[expert] = sigmoid(double(logits[expert]));
    score_sum += scores[expert];
  }
  // The sum is 0 only when every s_e underflows (logits below about -745): no balance signal then.
  for (int expert = 0; expert < num_experts; ++expert)
    balance_scores[expert] = score_sum > 0.0 ? scores[expert] / score_sum : 0.0;
  return logsumexp;
}

// Tokens of sequence `sequence` of the sequence-level loss (the last one may be shorter).
inline int64_t sequence_tokens(const RoutingParams& params, int64_t sequence) {
  if (params.tokens_per_sequence <= 0) return params.num_tokens;
  return std::min(params.tokens_per_sequence, params.num_tokens - sequence * params.tokens_per_sequence);
}

inline int64_t sequence_of_token(const RoutingParams& params, int64_t token) {
  return params.tokens_per_sequence <= 0 ? 0 : token / params.tokens_per_sequence;
}

// sequence_fractions must hold f_{s,e} for every sequence: [>= S, E] of the reference's float type.
inline void check_sequence_fractions(const char* op, const Tensor& fractions, const RoutingParams& params,
                                     DType real) {
  const int64_t sequences = routing_num_sequences(params);
  const bool matches = fractions.device == DeviceKind::cpu && fractions.dtype == real && fractions.rank == 2 &&
                       fractions.shape[0] >= sequences && fractions.shape[1] == params.num_experts &&
                       fractions.data != nullptr;
  SY_CHECK(matches, op, ": sequence_fractions must be ", dtype_name(real), "[>= ", sequences, ", ",
           params.num_experts, "] on cpu (seq_aux_loss_weight > 0), got ", fractions.describe());
}

// Every output tensor of a routing call (token or expert choice) has its shape, dtype and memory.
inline void check_routing_tensors(const char* op, const RoutingResult& result, const RoutingParams& params,
                                  DType real) {
  using detail::expect_tensor;
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
  if (params.seq_aux_loss_weight > 0.0f) check_sequence_fractions(op, result.sequence_fractions, params, real);
}

}  // namespace routing_detail
}  // namespace cpu
}  // namespace switchyard
