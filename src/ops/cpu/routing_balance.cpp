// CPU reference of the balance bookkeeping around routing (semantics: src/ops/moe_ops.h):
//   accumulate_expert_load: load_e += count_e
//   global_balance_loss:    F_e = load_e / sum_f load_f (0 when the sum is 0),
//                           global = w_global * E * sum_e F_e * prob_sums_e / T
//   update_routing_bias:    b_e += rate * sign(mean_f load_f - load_e), sign(0) = 0
// Loads, fractions and the bias are [E] in the reference's float type (f32 or f64); counts int32.
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace cpu {

using detail::expect_tensor;

void accumulate_expert_load(const Tensor& counts, Tensor& accumulator) {
  const int64_t experts = counts.numel();
  expect_tensor("accumulate_expert_load", "counts", counts, DType::i32, {experts});
  detail::expect_float_matrix("accumulate_expert_load", "accumulator", accumulator, 1);
  expect_tensor("accumulate_expert_load", "accumulator", accumulator, accumulator.dtype, {experts});
  detail::dispatch_float("accumulate_expert_load", accumulator.dtype, [&](auto real) {
    using Real = decltype(real);
    for (int64_t expert = 0; expert < experts; ++expert)
      accumulator.as<Real>()[expert] += Real(counts.as<int32_t>()[expert]);
  });
}

void global_balance_loss(const Tensor& loads, const RoutingParams& params, RoutingResult& routing,
                         Tensor& global_fractions) {
  const int64_t experts = params.num_experts;
  detail::expect_float_matrix("global_balance_loss", "loads", loads, 1);
  const DType real_type = routing.prob_sums.dtype;
  expect_tensor("global_balance_loss", "loads", loads, real_type, {experts});
  expect_tensor("global_balance_loss", "global_fractions", global_fractions, real_type, {experts});
  expect_tensor("global_balance_loss", "prob_sums", routing.prob_sums, real_type, {experts});
  expect_tensor("global_balance_loss", "losses", routing.losses, real_type, {kNumRoutingLosses});
  detail::dispatch_float("global_balance_loss", real_type, [&](auto real) {
    using Real = decltype(real);
    double total = 0.0;
    for (int64_t expert = 0; expert < experts; ++expert) total += double(loads.as<Real>()[expert]);
    double product = 0.0;
    for (int64_t expert = 0; expert < experts; ++expert) {
      const double fraction = total > 0.0 ? double(loads.as<Real>()[expert]) / total : 0.0;
      global_fractions.as<Real>()[expert] = Real(fraction);
      product += fraction * double(routing.prob_sums.as<Real>()[expert]);
    }
    routing.losses.as<Real>()[kGlobalAuxLoss] =
        params.num_tokens > 0
            ? Real(double(params.global_aux_loss_weight) * double(experts) * product / double(params.num_tokens))
            : Real(0);
  });
}

void update_routing_bias(const Tensor& loads, float rate, Tensor& bias) {
  const int64_t experts = bias.numel();
  detail::expect_float_matrix("update_routing_bias", "bias", bias, 1);
  detail::expect_float_matrix("update_routing_bias", "loads", loads, 1);
  expect_tensor("update_routing_bias", "loads", loads, loads.dtype, {experts});
  SY_CHECK(rate >= 0.0f, "update_routing_bias: rate must be >= 0, got ", rate);
  std::vector<double> load(static_cast<size_t>(experts));
  detail::dispatch_float("update_routing_bias", loads.dtype, [&](auto real) {
    using Real = decltype(real);
    for (int64_t expert = 0; expert < experts; ++expert) load[size_t(expert)] = double(loads.as<Real>()[expert]);
  });
  double mean = 0.0;
  for (double value : load) mean += value;
  mean = experts > 0 ? mean / double(experts) : 0.0;
  detail::dispatch_float("update_routing_bias", bias.dtype, [&](auto real) {
    using Real = decltype(real);
    for (int64_t expert = 0; expert < experts; ++expert) {
      const double gap = mean - load[size_t(expert)];
      const Real step = gap > 0.0 ? Real(rate) : gap < 0.0 ? Real(-rate) : Real(0);
      bias.as<Real>()[expert] += step;
    }
  });
}

}  // namespace cpu
}  // namespace switchyard
