// Rotary position embedding on CUDA over packed qkv [T, 3D] (contract: src/ops/model_ops.h;
// reference: src/ops/cpu/rotary.cpp).
//
// Row t sits at position p = position_offset + t % S. For i < Dh/2, theta = p * base^(-2i/Dh):
//   forward   y[i] = x[i] cos - x[i + Dh/2] sin,  y[i + Dh/2] = x[i + Dh/2] cos + x[i] sin
//   backward  the same with -theta (the inverse rotation), applied to the gradient
// for every q head and every k head; v (the last D columns) is copied when out of place.
// One thread per (row, i): the angle is computed once in double (theta reaches S * 1 rad and an
// fp32 angle would be off by ~1e-3 rad at a few thousand positions) and reused for the 2H heads
// of the row, so the double-precision cost is spread over 2H rotations. Each thread reads its
// pairs before writing them, so in place is safe.
#include <cmath>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const T* input, int64_t tokens, int64_t seq_len, int64_t heads, int64_t head_dim, double log_base,
                  int64_t position_offset, double direction, bool copy_values, T* output) {
  const int64_t half = head_dim / 2, model_dim = heads * head_dim, row_width = 3 * model_dim;
  const int64_t count = tokens * half, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < count; index += stride) {
    const int64_t row = index / half, i = index % half;
    const double position = double(position_offset + row % seq_len);
    const double inverse_frequency = exp(-2.0 * double(i) / double(head_dim) * log_base);
    double sine_d, cosine_d;
    sincos(position * inverse_frequency, &sine_d, &cosine_d);
    const float cosine = float(cosine_d), sine = float(direction * sine_d);
    const T* in_row = input + row * row_width;
    T* out_row = output + row * row_width;
    for (int64_t head = 0; head < 2 * heads; ++head) {  // q heads, then k heads
      const int64_t first = head * head_dim + i, second = first + half;
      const float x1 = to_float(in_row[first]), x2 = to_float(in_row[second]);
      out_row[first] = from_float<T>(x1 * cosine - x2 * sine);
      out_row[second] = from_float<T>(x2 * cosine + x1 * sine);
    }
    if (copy_values) {
      for (int64_t head = 0; head < heads; ++head) {
        const int64_t first = 2 * model_dim + head * head_dim + i;
        out_row[first] = in_row[first];
        out_row[first + half] = in_row[first + half];
      }
    }
  }
}

void rotate(const char* op, const AttentionShape& shape, const Tensor& input, double base, int64_t position_offset,
            double direction, Tensor& output, void* stream) {
  SY_CHECK_INPUT(
      shape.batch >= 0 && shape.seq_len >= 1 && shape.heads >= 1 && shape.head_dim >= 2 && shape.head_dim % 2 == 0, op,
      ": need seq_len >= 1, heads >= 1 and an even head_dim >= 2, got B=", shape.batch, " S=", shape.seq_len,
      " H=", shape.heads, " Dh=", shape.head_dim);
  SY_CHECK_INPUT(base > 1.0 && std::isfinite(base), op, ": base must be > 1, got ", base);
  SY_CHECK_INPUT(position_offset >= 0, op, ": position_offset must be >= 0, got ", position_offset);
  SY_CHECK_INPUT(is_activation_dtype(input.dtype), op, ": qkv must be bf16/fp16/fp32, got ", input.describe());
  const int64_t tokens = shape.tokens(), width = 3 * shape.model_dim();
  check_tensor(input, op, input.dtype, {tokens, width});
  check_tensor(output, op, input.dtype, {tokens, width});
  if (tokens == 0) return;
  const bool copy_values = input.data != output.data;
  dispatch_activation_dtype(input.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    const int64_t count = tokens * (shape.head_dim / 2);
    rotary_kernel<T>
        <<<grid_for(count, kThreads, int64_t(multiprocessor_count()) * 16), kThreads, 0, as_stream(stream)>>>(
            input.as<T>(), tokens, shape.seq_len, shape.heads, shape.head_dim, std::log(base), position_offset,
            direction, copy_values, output.as<T>());
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

namespace cuda {

void rotary_forward(const AttentionShape& shape, const Tensor& qkv, double base, int64_t position_offset,
                    Tensor& qkv_out, void* stream) {
  rotate("rotary_forward", shape, qkv, base, position_offset, 1.0, qkv_out, stream);
}

void rotary_backward(const AttentionShape& shape, const Tensor& grad_qkv_out, double base, int64_t position_offset,
                     Tensor& grad_qkv, void* stream) {
  rotate("rotary_backward", shape, grad_qkv_out, base, position_offset, -1.0, grad_qkv, stream);
}

}  // namespace cuda
}  // namespace switchyard
