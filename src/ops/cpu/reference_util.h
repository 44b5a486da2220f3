// Shared pieces of the CPU reference ops (src/ops/cpu/*.cpp): argument checks with messages that
// name the op and the tensor, the f32/f64 dispatch, and the one row-times-matrix loop that both
// gemm and grouped_gemm use (double accumulation).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>

#include "src/core/tensor.h"

namespace switchyard {
namespace cpu {
namespace detail {

inline std::string shape_string(std::initializer_list<int64_t> dims) {
  std::ostringstream stream;
  stream << "[";
  bool first = true;
  for (int64_t dim : dims) {
    stream << (first ? "" : ", ") << dim;
    first = false;
  }
  stream << "]";
  return stream.str();
}

inline bool shape_equals(const Tensor& tensor, std::initializer_list<int64_t> dims) {
  if (tensor.rank != int(dims.size())) return false;
  int axis = 0;
  for (int64_t dim : dims)
    if (tensor.shape[axis++] != dim) return false;
  return true;
}

// `tensor` must be a host tensor of `dtype` with exactly `dims` and memory behind it.
inline void expect_tensor(const char* op, const char* name, const Tensor& tensor, DType dtype,
                          std::initializer_list<int64_t> dims) {
  const bool matches = tensor.device == DeviceKind::cpu && tensor.dtype == dtype && shape_equals(tensor, dims) &&
                       (tensor.data != nullptr || tensor.numel() == 0);
  SY_CHECK(matches, op, ": ", name, " must be ", dtype_name(dtype), shape_string(dims), " on cpu, got ",
           tensor.describe(), tensor.data == nullptr && tensor.numel() > 0 ? " (null data)" : "");
}

// `tensor` must be a host tensor of rank `rank` holding f32 or f64.
inline void expect_float_matrix(const char* op, const char* name, const Tensor& tensor, int rank) {
  const bool matches = tensor.device == DeviceKind::cpu && tensor.rank == rank &&
                       (tensor.dtype == DType::f32 || tensor.dtype == DType::f64) &&
                       (tensor.data != nullptr || tensor.numel() == 0);
  SY_CHECK(matches, op, ": ", name, " must be an f32 or f64 tensor of rank ", rank, " on cpu, got ",
           tensor.describe());
}

// Calls body(float{}) or body(double{}) for the reference's float type; other dtypes are an error.
template <typename Body>
void dispatch_float(const char* op, DType dtype, Body&& body) {
  if (dtype == DType::f32) {
    body(float{});
  } else if (dtype == DType::f64) {
    body(double{});
  } else {
    SY_THROW(op, ": the CPU reference takes f32 or f64 tensors, got ", dtype_name(dtype));
  }
}

// out[0, n) = a_row[0, k) * op(B), where B is [k, n] (trans_b false) or [n, k] (trans_b true),
// row-major. Accumulates in double; `out` is overwritten.
template <typename Real>
void row_times_matrix(const double* a_row, const Real* b, int64_t k, int64_t n, bool trans_b, double* out) {
  if (!trans_b) {
    for (int64_t column = 0; column < n; ++column) out[column] = 0.0;
    for (int64_t inner = 0; inner < k; ++inner) {
      const double a_value = a_row[inner];
      const Real* b_row = b + inner * n;
      for (int64_t column = 0; column < n; ++column) out[column] += a_value * double(b_row[column]);
    }
  } else {
    for (int64_t column = 0; column < n; ++column) {
      const Real* b_row = b + column * k;
      double sum = 0.0;
      for (int64_t inner = 0; inner < k; ++inner) sum += a_row[inner] * double(b_row[inner]);
      out[column] = sum;
    }
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace switchyard
