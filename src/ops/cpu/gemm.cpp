// CPU reference of the dense GEMM (src/ops/gemm.h), row-major:
//   C[M, N] = alpha * op(A)[M, K] * op(B)[K, N] + beta * Z,  op(X) = X^T when trans_x,
// Z the addend (C when none is given). A is [M, K] or (trans_a) [K, M]; B is [K, N] or (trans_b)
// [N, K]. f32 or f64, one type per call, accumulation in double. With beta == 0, Z is not read
// (BLAS convention), so NaN in an uninitialized C does not leak into the result.
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/gemm.h"

namespace switchyard {
namespace cpu {
namespace {

template <typename Real>
void gemm_impl(bool trans_a, bool trans_b, double alpha, const Tensor& a_tensor, const Tensor& b_tensor, double beta,
               Tensor& c_tensor, const Tensor& addend_tensor, int64_t inner) {
  const int64_t rows = c_tensor.dim(0), columns = c_tensor.dim(1);
  const Real* a = a_tensor.as<Real>();
  const Real* b = b_tensor.as<Real>();
  Real* c = c_tensor.as<Real>();
  const Real* addend = addend_tensor.as<Real>();  // may be c: each element is read before it is written
  std::vector<double> a_row(static_cast<size_t>(inner)), c_row(static_cast<size_t>(columns));
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t k = 0; k < inner; ++k)
      a_row[size_t(k)] = double(trans_a ? a[k * rows + row] : a[row * inner + k]);
    detail::row_times_matrix(a_row.data(), b, inner, columns, trans_b, c_row.data());
    Real* c_out = c + row * columns;
    const Real* addend_row = addend + row * columns;
    for (int64_t column = 0; column < columns; ++column) {
      const double scaled = alpha * c_row[size_t(column)];
      c_out[column] = Real(beta == 0.0 ? scaled : scaled + beta * double(addend_row[column]));
    }
  }
}

}  // namespace

void gemm(bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b, float beta, Tensor& c,
          const Tensor* addend) {
  const char* op = "gemm";
  detail::expect_float_matrix(op, "a", a, 2);
  detail::expect_float_matrix(op, "b", b, 2);
  detail::expect_float_matrix(op, "c", c, 2);
  const int64_t rows = c.dim(0), columns = c.dim(1);
  const int64_t inner = trans_a ? a.dim(0) : a.dim(1);
  if (trans_a)
    detail::expect_tensor(op, "a (trans_a: [K, M])", a, c.dtype, {inner, rows});
  else
    detail::expect_tensor(op, "a ([M, K])", a, c.dtype, {rows, inner});
  if (trans_b)
    detail::expect_tensor(op, "b (trans_b: [N, K])", b, c.dtype, {columns, inner});
  else
    detail::expect_tensor(op, "b ([K, N])", b, c.dtype, {inner, columns});
  if (addend) detail::expect_tensor(op, "addend ([M, N], as c)", *addend, c.dtype, {rows, columns});
  detail::dispatch_float(op, c.dtype, [&](auto tag) {
    gemm_impl<decltype(tag)>(trans_a, trans_b, alpha, a, b, beta, c, addend ? *addend : c, inner);
  });
}

}  // namespace cpu
}  // namespace switchyard
