// CPU reference of expert-choice routing (semantics: src/ops/moe_ops.h, "expert choice"; this
// file defines the outputs the CUDA version must reproduce).
//
// Per token t with logits z[t, 0..E):
//   priority q[t, e] (fp32, bit-identical on both backends: src/ops/routing_math.h), from the
//     logits rounded to float (the f64 path rounds them for the ranking only):
//       softmax: routing_softmax_priority(z_e, m, S), m = max_f z_f, S = routing_softmax_denominator
//       sigmoid: routing_sigmoid(z_e)
//     ranked through ordered_key(q) (an order-preserving uint32, so the order is total and
//     exactly the CUDA kernels' order, whatever the values)
//   score (double): softmax p_e = exp(z_e - lse), sigmoid s_e = 1 / (1 + exp(-z_e)), from the
//     logits as given; lse = log sum_e exp(z_e)
// Over the batch:
//   C = min(T, expert_capacity(params, T * k_max))
//   expert e takes the C tokens of highest (q[t, e], then lower t)
//   token t keeps at most k_max of the experts that took it, by (q[t, e] high, then lower e):
//     expert_ids[t, 0..k_t), gates score_e (/ sum of the k_t kept scores when renormalizing)
//     * routed_scaling_factor; choices j >= k_t: id -1, gate 0, slot -1
//   slot(t, j) = rank of t among the tokens expert e_j kept, in token order (< C)
//   expert_counts_e = tokens e kept, first_choice_counts_e = tokens whose choice 0 is e,
//   prob_sums_e = sum_t p[t, e] (sigmoid: s'[t, e] = s_e / sum_f s_f)
//   scalars: capacity C, total choices sum_t k_t, dropped = E * C - sum_t k_t (picks the per-token
//     cap cut), padded rows offsets[E]; offsets: kept counts rounded up to segment_alignment
//   losses: aux = w_aux * E * sum_e (first_choice_counts_e / T) (prob_sums_e / T),
//     z = w_z * mean_t lse_t^2, sequence and global-batch terms 0 (as token choice writes them).
//
// Layout: logits [T, E] row-major; per-choice tensors [T, K]; float tensors in the logits' type.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/cpu/routing_scores.h"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "src/ops/routing_math.h"

namespace switchyard {
namespace cpu {
namespace {

using detail::expect_tensor;

// Larger float -> larger key; -0 folds into +0 (the CUDA kernels' ordered_bits).
uint32_t ordered_key(float value) {
  const float folded = value + 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &folded, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

template <typename Real>
void route_expert_choice_impl(const Tensor& logits_tensor, const RoutingParams& params, RoutingResult& result) {
  const int64_t num_tokens = params.num_tokens;
  const int num_experts = params.num_experts, k_max = params.k_max;
  const bool sigmoid = params.score_function == ScoreFunction::sigmoid;
  const Real* logits = logits_tensor.as<Real>();
  const size_t cells = size_t(num_tokens) * size_t(num_experts);

  // Per token: ranking keys [T, E], scores [T, E] (double), lse, the balance-loss sums.
  std::vector<uint32_t> keys(cells);
  std::vector<double> scores(cells);
  std::vector<double> prob_sums(static_cast<size_t>(num_experts), 0.0);
  std::vector<float> rounded(static_cast<size_t>(num_experts));
  double sum_squared_logsumexp = 0.0;
  for (int64_t token = 0; token < num_tokens; ++token) {
    const Real* row = logits + token * num_experts;
    uint32_t* key_row = keys.data() + token * num_experts;
    double* score_row = scores.data() + token * num_experts;
    for (int expert = 0; expert < num_experts; ++expert) rounded[size_t(expert)] = float(row[expert]);
    if (sigmoid) {
      for (int expert = 0; expert < num_experts; ++expert)
        key_row[expert] = ordered_key(routing_sigmoid(rounded[size_t(expert)]));
    } else {
      float max_logit = rounded[0];
      for (int expert = 1; expert < num_experts; ++expert)
        if (rounded[size_t(expert)] > max_logit) max_logit = rounded[size_t(expert)];
      const float denominator = routing_softmax_denominator(
          num_experts, max_logit, [&](int expert) { return rounded[size_t(expert)]; });
      for (int expert = 0; expert < num_experts; ++expert)
        key_row[expert] = ordered_key(routing_softmax_priority(rounded[size_t(expert)], max_logit, denominator));
    }

    double max_logit = double(row[0]);
    for (int expert = 1; expert < num_experts; ++expert) max_logit = std::max(max_logit, double(row[expert]));
    double sum = 0.0;
    for (int expert = 0; expert < num_experts; ++expert) sum += std::exp(double(row[expert]) - max_logit);
    const double logsumexp = max_logit + std::log(sum);
    result.logsumexp.as<Real>()[token] = Real(logsumexp);
    sum_squared_logsumexp += logsumexp * logsumexp;
    double sigmoid_sum = 0.0;
    for (int expert = 0; expert < num_experts; ++expert) {
      const double z = double(row[expert]);
      score_row[expert] = sigmoid ? 1.0 / (1.0 + std::exp(-z)) : std::exp(z - logsumexp);
      sigmoid_sum += score_row[expert];
    }
    for (int expert = 0; expert < num_experts; ++expert)
      prob_sums[size_t(expert)] += sigmoid ? score_row[expert] / sigmoid_sum : score_row[expert];
  }

  // Each expert takes its C best tokens: (key high, then token low), a strict total order.
  const int64_t capacity =
      num_tokens == 0 ? 0 : std::min<int64_t>(num_tokens, expert_capacity(params, num_tokens * k_max));
  std::vector<std::vector<int>> taken_by(static_cast<size_t>(num_tokens));  // experts, ascending
  std::vector<int64_t> order(static_cast<size_t>(num_tokens));
  for (int expert = 0; expert < num_experts && capacity > 0; ++expert) {
    std::iota(order.begin(), order.end(), int64_t(0));
    auto before = [&](int64_t a, int64_t b) {
      const uint32_t key_a = keys[size_t(a * num_experts + expert)], key_b = keys[size_t(b * num_experts + expert)];
      return key_a != key_b ? key_a > key_b : a < b;
    };
    if (capacity < num_tokens) std::nth_element(order.begin(), order.begin() + capacity, order.end(), before);
    for (int64_t pick = 0; pick < capacity; ++pick) taken_by[size_t(order[size_t(pick)])].push_back(expert);
  }

  // Each token keeps its k_max best experts among those that took it: (key high, then expert low).
  int32_t* expert_ids = result.expert_ids.as<int32_t>();
  Real* gates = result.gates.as<Real>();
  int32_t* slots = result.slots.as<int32_t>();
  int32_t* token_k = result.token_k.as<int32_t>();
  std::vector<int64_t> counts(static_cast<size_t>(num_experts), 0), first_choice_counts(counts);
  int64_t total_choices = 0;
  for (int64_t token = 0; token < num_tokens; ++token) {
    std::vector<int>& taken = taken_by[size_t(token)];
    const uint32_t* key_row = keys.data() + token * num_experts;
    const double* score_row = scores.data() + token * num_experts;
    std::stable_sort(taken.begin(), taken.end(), [&](int a, int b) { return key_row[a] > key_row[b]; });
    const int choices = int(std::min<size_t>(taken.size(), size_t(k_max)));
    token_k[token] = choices;
    total_choices += choices;
    if (choices > 0) ++first_choice_counts[size_t(taken[0])];
    double kept_score = 0.0;
    for (int choice = 0; choice < choices; ++choice) kept_score += score_row[taken[size_t(choice)]];
    const double normalizer = params.renormalize ? kept_score : 1.0;
    for (int choice = 0; choice < k_max; ++choice) {
      const int64_t index = token * k_max + choice;
      if (choice < choices) {
        const int expert = taken[size_t(choice)];
        expert_ids[index] = expert;
        gates[index] = Real(score_row[expert] / normalizer * double(params.routed_scaling_factor));
        slots[index] = int32_t(counts[size_t(expert)]++);  // tokens visit in order: rank in token order
      } else {
        expert_ids[index] = -1;
        gates[index] = Real(0);
        slots[index] = -1;
      }
    }
  }

  int32_t* offsets = result.expert_offsets.as<int32_t>();
  offsets[0] = 0;
  for (int expert = 0; expert < num_experts; ++expert) {
    offsets[expert + 1] = int32_t(offsets[expert] + round_up(counts[size_t(expert)], params.segment_alignment));
    result.expert_counts.as<int32_t>()[expert] = int32_t(counts[size_t(expert)]);
    result.first_choice_counts.as<int32_t>()[expert] = int32_t(first_choice_counts[size_t(expert)]);
    result.prob_sums.as<Real>()[expert] = Real(prob_sums[size_t(expert)]);
  }
  int32_t* scalars = result.scalars.as<int32_t>();
  scalars[kCapacity] = int32_t(capacity);
  scalars[kTotalChoices] = int32_t(total_choices);
  scalars[kDroppedChoices] = int32_t(int64_t(num_experts) * capacity - total_choices);
  scalars[kPaddedRows] = offsets[num_experts];

  double balance = 0.0;
  for (int expert = 0; expert < num_experts; ++expert)
    balance += double(first_choice_counts[size_t(expert)]) * prob_sums[size_t(expert)];
  const double tokens = double(num_tokens);
  Real* losses = result.losses.as<Real>();
  losses[kAuxLoss] =
      num_tokens ? Real(double(params.aux_loss_weight) * num_experts * balance / (tokens * tokens)) : Real(0);
  losses[kZLoss] = num_tokens ? Real(double(params.z_loss_weight) * sum_squared_logsumexp / tokens) : Real(0);
  losses[kSeqAuxLoss] = Real(0);
  losses[kGlobalAuxLoss] = Real(0);
}

}  // namespace

void route_expert_choice(const Tensor& logits, const RoutingInputs& inputs, const RoutingParams& params,
                         RoutingResult& result) {
  validate_routing_params(params);
  SY_CHECK_INPUT(params.method == RoutingMethod::expert_choice,
                 "route_expert_choice: params.method must be expert_choice");
  SY_CHECK_INPUT(inputs.selection_bias == nullptr,
                 "route: expert choice takes no selection bias (each expert picks by the unbiased score)");
  detail::expect_float_matrix("route", "logits", logits, 2);
  expect_tensor("route", "logits", logits, logits.dtype, {params.num_tokens, params.num_experts});
  routing_detail::check_routing_tensors("route (expert choice)", result, params, logits.dtype);
  detail::dispatch_float("route", logits.dtype, [&](auto real) {
    route_expert_choice_impl<decltype(real)>(logits, params, result);
  });
}

}  // namespace cpu
}  // namespace switchyard
