// CPU reference of the small-batch expert path (src/ops/small_batch_ops.h):
//   y[t] = sum over kept j of gate[t, j] * Real(act(Real(x[t] W1[e])) W2[e]),  e = expert_ids[t, j]
// kept: expert id >= 0 and 0 <= slot < capacity (scalars[kCapacity]), the rule permute applies.
//
// Built from the same pieces as the padded CPU path so that both agree bit for bit: the matrix
// products are detail::row_times_matrix (double accumulation, the loop grouped_gemm runs), the
// activation is cpu::activation_forward on the token's row, and the gated sum over choices is
// accumulated in double in choice order as unpermute_combine does. f32 or f64, one type per call.
#include <algorithm>
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/small_batch_ops.h"

namespace switchyard {
namespace cpu {
namespace {

using detail::expect_tensor;

template <typename Real>
void small_batch_experts_impl(ExpertActivation activation, const Tensor& x_tensor, const RoutingResult& routing,
                              const Tensor& w1_tensor, const Tensor& w2_tensor, Tensor& y_tensor) {
  const int64_t tokens = x_tensor.dim(0), d_model = x_tensor.dim(1);
  const int64_t num_experts = w1_tensor.dim(0), w1_columns = w1_tensor.dim(2), d_ff = w2_tensor.dim(1);
  const int64_t k_max = routing.expert_ids.dim(1);
  const Real* x = x_tensor.as<Real>();
  const Real* w1 = w1_tensor.as<Real>();
  const Real* w2 = w2_tensor.as<Real>();
  const Real* gates = routing.gates.as<Real>();
  const int32_t* expert_ids = routing.expert_ids.as<int32_t>();
  const int32_t* slots = routing.slots.as<int32_t>();
  const int64_t capacity = routing.scalars.as<int32_t>()[kCapacity];
  Real* y = y_tensor.as<Real>();

  std::vector<double> input_row(static_cast<size_t>(d_model)), hidden_row(static_cast<size_t>(d_ff));
  std::vector<double> product(static_cast<size_t>(std::max(w1_columns, d_model))), sum(static_cast<size_t>(d_model));
  std::vector<Real> pre(static_cast<size_t>(w1_columns)), post(static_cast<size_t>(d_ff));
  Tensor pre_view(pre.data(), x_tensor.dtype, DeviceKind::cpu, {1, w1_columns});
  Tensor post_view(post.data(), x_tensor.dtype, DeviceKind::cpu, {1, d_ff});
  for (int64_t token = 0; token < tokens; ++token) {
    for (int64_t column = 0; column < d_model; ++column)
      input_row[size_t(column)] = double(x[token * d_model + column]);
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int64_t choice = 0; choice < k_max; ++choice) {
      const int64_t index = token * k_max + choice;
      const int64_t expert = expert_ids[index], slot = slots[index];
      if (expert < 0 || slot < 0 || slot >= capacity) continue;  // empty or dropped
      SY_CHECK(expert < num_experts, "small_batch_experts: expert id ", expert, " of token ", token, " is >= E = ",
               num_experts);
      // Expert GEMM 1, stored in Real as grouped_gemm stores it; then the activation.
      detail::row_times_matrix(input_row.data(), w1 + expert * d_model * w1_columns, d_model, w1_columns, false,
                               product.data());
      for (int64_t column = 0; column < w1_columns; ++column) pre[size_t(column)] = Real(product[size_t(column)]);
      activation_forward(activation, pre_view, post_view);
      // Expert GEMM 2, its output stored in Real; the gated sum in double.
      for (int64_t column = 0; column < d_ff; ++column) hidden_row[size_t(column)] = double(post[size_t(column)]);
      detail::row_times_matrix(hidden_row.data(), w2 + expert * d_ff * d_model, d_ff, d_model, false, product.data());
      const double gate = double(gates[index]);
      for (int64_t column = 0; column < d_model; ++column)
        sum[size_t(column)] += gate * double(Real(product[size_t(column)]));
    }
    for (int64_t column = 0; column < d_model; ++column) y[token * d_model + column] = Real(sum[size_t(column)]);
  }
}

}  // namespace

void small_batch_experts(ExpertActivation activation, const Tensor& x, const RoutingResult& routing, const Tensor& w1,
                         const Tensor& w2, Tensor& y) {
  const char* op = "small_batch_experts";
  detail::expect_float_matrix(op, "x", x, 2);
  const DType real = x.dtype;
  const int64_t tokens = x.dim(0), d_model = x.dim(1);
  SY_CHECK(w1.rank == 3 && w2.rank == 3, op, ": w1 must be [E, D, F or 2F] and w2 [E, F, D], got ", w1.describe(),
           " and ", w2.describe());
  const int64_t num_experts = w1.dim(0), d_ff = w2.dim(1);
  SY_CHECK(activation == ExpertActivation::gelu_tanh || activation == ExpertActivation::swiglu, op,
           ": unknown activation ", int(activation));
  const int64_t w1_columns = activation == ExpertActivation::swiglu ? 2 * d_ff : d_ff;
  SY_CHECK(routing.expert_ids.rank == 2, op, ": expert_ids must be [T, K], got ", routing.expert_ids.describe());
  const int64_t k_max = routing.expert_ids.dim(1);
  expect_tensor(op, "w1", w1, real, {num_experts, d_model, w1_columns});
  expect_tensor(op, "w2", w2, real, {num_experts, d_ff, d_model});
  expect_tensor(op, "y", y, real, {tokens, d_model});
  expect_tensor(op, "expert_ids", routing.expert_ids, DType::i32, {tokens, k_max});
  expect_tensor(op, "slots", routing.slots, DType::i32, {tokens, k_max});
  expect_tensor(op, "gates", routing.gates, real, {tokens, k_max});
  expect_tensor(op, "scalars", routing.scalars, DType::i32, {kNumRoutingScalars});
  detail::dispatch_float(op, real, [&](auto tag) {
    small_batch_experts_impl<decltype(tag)>(activation, x, routing, w1, w2, y);
  });
}

}  // namespace cpu
}  // namespace switchyard
