// CPU reference of the grouped expert GEMMs over the padded expert-contiguous layout.
//
//   grouped_gemm:             C[r, :] = A[r, :] * op(B_e)  for r in [offsets[e], offsets[e+1])
//                             A [R, Kdim], B [E, Kdim, N] (trans_b: [E, N, Kdim]), C [R, N];
//                             rows at or past offsets[E] are written as zero.
//   grouped_gemm_weight_grad: dB_e = sum_{r in segment e} A[r, :]^T G[r, :]
//                             A [R, M], G [R, N], dB [E, M, N] (overwritten; empty segments give 0),
//                             dB of A's type or f64 with f32 A. accumulate: the sum starts from
//                             dB's values instead of 0 (so a chain of calls over consecutive rows
//                             into an f64 dB is the one sum over all the rows, bit for bit).
//   grouped_gemm_activation(_backward): the expert GEMMs composed with the activation
//                             (src/ops/cpu/activation.cpp); the CUDA backend fuses them.
// Row-major, one float type per call (f32 or f64), accumulation in double.
#include <algorithm>
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/moe_ops.h"

namespace switchyard {
namespace cpu {
namespace {

using detail::expect_tensor;

// Checks offsets[0] == 0, non-decreasing, offsets[E] <= rows.
void check_offsets(const char* op, const Tensor& offsets_tensor, int64_t num_experts, int64_t rows) {
  expect_tensor(op, "expert_offsets", offsets_tensor, DType::i32, {num_experts + 1});
  const int32_t* offsets = offsets_tensor.as<int32_t>();
  SY_CHECK(offsets[0] == 0, op, ": expert_offsets[0] must be 0, got ", offsets[0]);
  for (int64_t expert = 0; expert < num_experts; ++expert)
    SY_CHECK(offsets[expert] <= offsets[expert + 1], op, ": expert_offsets decrease at expert ", expert);
  SY_CHECK(offsets[num_experts] <= rows, op, ": the layout needs ", offsets[num_experts], " rows, the operands have ",
           rows);
}

template <typename Real>
void grouped_gemm_impl(const Tensor& a_tensor, const Tensor& b_tensor, bool trans_b, const Tensor& offsets_tensor,
                       Tensor& c_tensor) {
  const int64_t rows = a_tensor.dim(0), inner = a_tensor.dim(1), columns = c_tensor.dim(1);
  const int64_t num_experts = b_tensor.dim(0);
  const Real* a = a_tensor.as<Real>();
  const Real* b = b_tensor.as<Real>();
  Real* c = c_tensor.as<Real>();
  const int32_t* offsets = offsets_tensor.as<int32_t>();
  std::vector<double> a_row(static_cast<size_t>(inner)), c_row(static_cast<size_t>(columns));
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    const Real* b_expert = b + expert * inner * columns;
    for (int64_t row = offsets[expert]; row < offsets[expert + 1]; ++row) {
      for (int64_t k = 0; k < inner; ++k) a_row[size_t(k)] = double(a[row * inner + k]);
      detail::row_times_matrix(a_row.data(), b_expert, inner, columns, trans_b, c_row.data());
      for (int64_t column = 0; column < columns; ++column) c[row * columns + column] = Real(c_row[size_t(column)]);
    }
  }
  std::fill(c + int64_t(offsets[num_experts]) * columns, c + rows * columns, Real(0));
}

template <typename Real, typename Gradient>
void grouped_gemm_weight_grad_impl(const Tensor& a_tensor, const Tensor& g_tensor, const Tensor& offsets_tensor,
                                   Tensor& grad_b_tensor, bool accumulate) {
  const int64_t left = a_tensor.dim(1), right = g_tensor.dim(1), num_experts = grad_b_tensor.dim(0);
  const Real* a = a_tensor.as<Real>();
  const Real* g = g_tensor.as<Real>();
  Gradient* grad_b = grad_b_tensor.as<Gradient>();
  const int32_t* offsets = offsets_tensor.as<int32_t>();
  std::vector<double> sum(static_cast<size_t>(left * right));
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    Gradient* out = grad_b + expert * left * right;
    for (int64_t index = 0; index < left * right; ++index) sum[size_t(index)] = accumulate ? double(out[index]) : 0.0;
    for (int64_t row = offsets[expert]; row < offsets[expert + 1]; ++row) {
      const Real* g_row = g + row * right;
      for (int64_t m = 0; m < left; ++m) {
        const double a_value = double(a[row * left + m]);
        double* sum_row = sum.data() + m * right;
        for (int64_t n = 0; n < right; ++n) sum_row[n] += a_value * double(g_row[n]);
      }
    }
    for (int64_t index = 0; index < left * right; ++index) out[index] = Gradient(sum[size_t(index)]);
  }
}

}  // namespace

void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c) {
  const char* op = "grouped_gemm";
  detail::expect_float_matrix(op, "a", a, 2);
  detail::expect_float_matrix(op, "b", b, 3);
  detail::expect_float_matrix(op, "c", c, 2);
  const DType real = a.dtype;
  const int64_t rows = a.dim(0), inner = a.dim(1), num_experts = b.dim(0);
  const int64_t columns = trans_b ? b.dim(1) : b.dim(2);
  if (trans_b)
    expect_tensor(op, "b (trans_b: [E, N, Kdim])", b, real, {num_experts, columns, inner});
  else
    expect_tensor(op, "b ([E, Kdim, N])", b, real, {num_experts, inner, columns});
  expect_tensor(op, "c", c, real, {rows, columns});
  check_offsets(op, expert_offsets, num_experts, rows);
  detail::dispatch_float(op, real, [&](auto tag) {
    grouped_gemm_impl<decltype(tag)>(a, b, trans_b, expert_offsets, c);
  });
}

void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b,
                              bool accumulate) {
  const char* op = "grouped_gemm_weight_grad";
  detail::expect_float_matrix(op, "a", a, 2);
  detail::expect_float_matrix(op, "g", g, 2);
  detail::expect_float_matrix(op, "grad_b", grad_b, 3);
  const DType real = a.dtype;
  // The gradient may be wider than the inputs (f64 with f32), as fp32 is with bf16 on CUDA.
  const DType gradient = grad_b.dtype == DType::f64 ? DType::f64 : real;
  const int64_t rows = a.dim(0), num_experts = grad_b.dim(0);
  expect_tensor(op, "g", g, real, {rows, g.dim(1)});
  expect_tensor(op, "grad_b", grad_b, gradient, {num_experts, a.dim(1), g.dim(1)});
  check_offsets(op, expert_offsets, num_experts, rows);
  detail::dispatch_float(op, real, [&](auto tag) {
    using Real = decltype(tag);
    if (gradient == DType::f64)
      grouped_gemm_weight_grad_impl<Real, double>(a, g, expert_offsets, grad_b, accumulate);
    else
      grouped_gemm_weight_grad_impl<Real, Real>(a, g, expert_offsets, grad_b, accumulate);
  });
}

void grouped_gemm_activation(ExpertActivation activation, const Tensor& a, const Tensor& w1,
                             const Tensor& expert_offsets, Tensor& pre, Tensor& post) {
  grouped_gemm(a, w1, false, expert_offsets, pre);
  activation_forward(activation, pre, post);
}

void grouped_gemm_activation_backward(ExpertActivation activation, const Tensor& grad_out, const Tensor& w2,
                                      const Tensor& expert_offsets, const Tensor& pre, Tensor& grad_post,
                                      Tensor& grad_pre) {
  grouped_gemm(grad_out, w2, true, expert_offsets, grad_post);
  activation_backward(activation, pre, grad_post, grad_pre);
}

}  // namespace cpu
}  // namespace switchyard
