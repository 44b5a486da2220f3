// CPU reference of rotary position embedding on packed qkv [T, 3D] (contract: src/ops/model_ops.h).
//
// Row t is at position p = position_offset + t % S. Every q head and every k head x (Dh values)
// is rotated pairwise, GPT-NeoX half style: for i < Dh/2, theta_i = p * base^(-2i/Dh),
//   y[i] = x[i] cos - x[i + Dh/2] sin,   y[i + Dh/2] = x[i + Dh/2] cos + x[i] sin.
// Backward applies the inverse (transposed) rotation to the gradient:
//   dx[i] = dy[i] cos + dy[i + Dh/2] sin,  dx[i + Dh/2] = dy[i + Dh/2] cos - dy[i] sin.
// v (the last D columns) is not rotated: copied out of place, left alone in place. Angles and
// products in double.
#include <cmath>
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace cpu {
namespace {

void check_rotary(const char* op, const AttentionShape& shape, const Tensor& input, const Tensor& output, double base,
                  int64_t position_offset) {
  SY_CHECK_INPUT(
      shape.batch >= 0 && shape.seq_len >= 1 && shape.heads >= 1 && shape.head_dim >= 2 && shape.head_dim % 2 == 0, op,
      ": need seq_len >= 1, heads >= 1 and an even head_dim >= 2, got B=", shape.batch, " S=", shape.seq_len,
      " H=", shape.heads, " Dh=", shape.head_dim);
  SY_CHECK_INPUT(base > 1.0 && std::isfinite(base), op, ": base must be > 1, got ", base);
  SY_CHECK_INPUT(position_offset >= 0, op, ": position_offset must be >= 0, got ", position_offset);
  detail::expect_float_matrix(op, "input", input, 2);
  detail::expect_tensor(op, "input", input, input.dtype, {shape.tokens(), 3 * shape.model_dim()});
  detail::expect_tensor(op, "output", output, input.dtype, {shape.tokens(), 3 * shape.model_dim()});
}

// direction +1 rotates by +theta (forward), -1 by -theta (backward).
template <typename Real>
void rotate(const AttentionShape& shape, const Tensor& input_tensor, double base, int64_t position_offset,
            double direction, Tensor& output_tensor) {
  const int64_t tokens = shape.tokens(), model_dim = shape.model_dim(), row_width = 3 * model_dim;
  const int64_t half = shape.head_dim / 2;
  const Real* input = input_tensor.as<Real>();
  Real* output = output_tensor.as<Real>();
  const bool in_place = input_tensor.data == output_tensor.data;
  std::vector<double> inverse_frequency(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inverse_frequency[size_t(i)] = std::pow(base, -2.0 * double(i) / double(shape.head_dim));
  for (int64_t t = 0; t < tokens; ++t) {
    const double position = double(position_offset + t % shape.seq_len);
    const Real* in_row = input + t * row_width;
    Real* out_row = output + t * row_width;
    for (int64_t i = 0; i < half; ++i) {
      const double theta = position * inverse_frequency[size_t(i)];
      const double cosine = std::cos(theta), sine = direction * std::sin(theta);
      for (int64_t head = 0; head < 2 * shape.heads; ++head) {  // q heads, then k heads
        const int64_t first = head * shape.head_dim + i, second = first + half;
        const double x1 = double(in_row[first]), x2 = double(in_row[second]);
        out_row[first] = Real(x1 * cosine - x2 * sine);
        out_row[second] = Real(x2 * cosine + x1 * sine);
      }
    }
    if (!in_place)
      for (int64_t column = 2 * model_dim; column < row_width; ++column) out_row[column] = in_row[column];
  }
}

}  // namespace

void rotary_forward(const AttentionShape& shape, const Tensor& qkv, double base, int64_t position_offset,
                    Tensor& qkv_out) {
  check_rotary("rotary_forward", shape, qkv, qkv_out, base, position_offset);
  detail::dispatch_float("rotary_forward", qkv.dtype,
                         [&](auto tag) { rotate<decltype(tag)>(shape, qkv, base, position_offset, 1.0, qkv_out); });
}

void rotary_backward(const AttentionShape& shape, const Tensor& grad_qkv_out, double base, int64_t position_offset,
                     Tensor& grad_qkv) {
  check_rotary("rotary_backward", shape, grad_qkv_out, grad_qkv, base, position_offset);
  detail::dispatch_float("rotary_backward", grad_qkv_out.dtype, [&](auto tag) {
    rotate<decltype(tag)>(shape, grad_qkv_out, base, position_offset, -1.0, grad_qkv);
  });
}

}  // namespace cpu
}  // namespace switchyard
