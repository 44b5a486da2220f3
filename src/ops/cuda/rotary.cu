// Rotary position embedding on CUDA over packed qkv [T, 3D] (contract: src/ops/model_ops.h;
// reference: src/ops/cpu/rotary.cpp).
//
// Row t sits at position p = position_offset + t % S. For i < Dh/2, theta = p * base^(-2i/Dh):
//   forward   y[i] = x[i] cos - x[i + Dh/2] sin,  y[i + Dh/2] = x[i + Dh/2] cos + x[i] sin
//   backward  the same with -theta (the inverse rotation), applied to the gradient
// for every q head and every k head; v (the last D columns) is copied when out of place.
// The angle is computed in double (theta reaches S * 1 rad and an fp32 angle would be off by ~1e-3
// rad at a few thousand positions), then its cos and sin rounded to fp32.
//
// Both kernels read the (cos, sin) pairs from one table over positions x (Dh/2), built once per
// stream by rotary_table_kernel and kept while positions, Dh and base stay the same (float2
// table[p * Dh/2 + i], L2-resident: 256 KB at S 1024, Dh 64). The packed kernel (Dh/2 a multiple
// of a 16-byte pack of T, 16-byte aligned tensors: every model config) is a memory pass: one
// thread per (row, head, pack) loads 16 bytes of x[i..] and of x[i + Dh/2..]. The scalar one (any
// even Dh) takes one (row, i) per thread over the 2H heads of its row. Each thread reads its pairs
// before writing them, so in place is safe in both.
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kScratchRotaryTable = 0x524f5459;  // persistent_scratch tag ("ROTY"; cuda_common.cuh)

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const T* input, int64_t tokens, int64_t seq_len, int64_t heads, int64_t head_dim,
                  const float2* table, int64_t position_offset, float direction, bool copy_values, T* output) {
  const int64_t half = head_dim / 2, model_dim = heads * head_dim, row_width = 3 * model_dim;
  const int64_t count = tokens * half, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < count; index += stride) {
    const int64_t row = index / half, i = index % half;
    const float2 angle = table[(position_offset + row % seq_len) * half + i];
    const float cosine = angle.x, sine = direction * angle.y;
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

// (cos, sin) of position * base^(-2i/Dh) for positions [0, positions) and i < half: the angle in
// double, its cos and sin rounded to fp32.
__global__ void __launch_bounds__(kThreads)
    rotary_table_kernel(int64_t positions, int64_t half, int64_t head_dim, double log_base, float2* table) {
  const int64_t count = positions * half, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < count; index += stride) {
    const int64_t position = index / half, i = index % half;
    const double inverse_frequency = exp(-2.0 * double(i) / double(head_dim) * log_base);
    double sine, cosine;
    sincos(double(position) * inverse_frequency, &sine, &cosine);
    table[index] = make_float2(float(cosine), float(sine));
  }
}

// One thread per (row, unit): units [0, 2H * packs) rotate pack `unit % packs` of q/k head
// `unit / packs` (packs = half / kElems); units past that (out of place only) copy v's packs.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rotary_packed_kernel(const T* input, int64_t tokens, int64_t seq_len, int64_t heads, int64_t head_dim,
                         const float2* table, int64_t position_offset, float direction, bool copy_values, T* output) {
  constexpr int kElems = Pack<T>::kElems;
  const int64_t half = head_dim / 2, model_dim = heads * head_dim, row_width = 3 * model_dim;
  const int64_t packs = half / kElems, rotate_units = 2 * heads * packs;
  const int64_t units = rotate_units + (copy_values ? model_dim / kElems : 0);
  const int64_t count = tokens * units, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < count; index += stride) {
    const int64_t row = index / units, unit = index % units;
    const T* in_row = input + row * row_width;
    T* out_row = output + row * row_width;
    if (unit >= rotate_units) {  // v, copied as it is
      const int64_t column = 2 * model_dim + (unit - rotate_units) * kElems;
      *reinterpret_cast<uint4*>(out_row + column) = *reinterpret_cast<const uint4*>(in_row + column);
      continue;
    }
    const int64_t i0 = (unit % packs) * kElems, first = (unit / packs) * head_dim + i0;
    const float2* angles = table + (position_offset + row % seq_len) * half + i0;
    float x1[kElems], x2[kElems];
    load_pack(in_row + first, x1);
    load_pack(in_row + first + half, x2);
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const float2 angle = angles[e];
      const float cosine = angle.x, sine = direction * angle.y;
      const float y1 = x1[e] * cosine - x2[e] * sine, y2 = x2[e] * cosine + x1[e] * sine;
      x1[e] = y1;
      x2[e] = y2;
    }
    store_pack(out_row + first, x1);
    store_pack(out_row + first + half, x2);
  }
}

// The (cos, sin) table of `stream` covering positions [0, positions) for (head_dim, log_base),
// rebuilt on that stream when it does not: a new Dh or base, more positions (grown to the next
// power of two, at least 1024, so a decode loop's offsets rebuild it rarely), or new memory.
const float2* rotary_table(int64_t positions, int64_t head_dim, double log_base, cudaStream_t stream) {
  struct Built {
    const void* address = nullptr;
    int64_t positions = 0, head_dim = 0;
    double log_base = 0.0;
  };
  static std::mutex mutex;
  static auto* built = new std::map<std::tuple<int, cudaStream_t>, Built>();  // never destroyed
  const int64_t half = head_dim / 2;
  std::lock_guard<std::mutex> lock(mutex);
  Built& entry = (*built)[{current_device(), stream}];
  const bool same_key = entry.head_dim == head_dim && entry.log_base == log_base;
  const int64_t wanted = same_key ? std::max(positions, entry.positions) : positions;
  int64_t capacity = 1024;
  while (capacity < wanted) capacity *= 2;
  void* table = persistent_scratch(stream, kScratchRotaryTable, size_t(capacity * half) * sizeof(float2));
  if (entry.address != table || !same_key || entry.positions < positions) {
    rotary_table_kernel<<<grid_for(capacity * half, kThreads, int64_t(multiprocessor_count()) * 16), kThreads, 0,
                          stream>>>(capacity, half, head_dim, log_base, static_cast<float2*>(table));
    CUDA_CHECK_LAUNCH();
    entry = Built{table, capacity, head_dim, log_base};
  }
  return static_cast<const float2*>(table);
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
  cudaStream_t cuda_stream = as_stream(stream);
  dispatch_activation_dtype(input.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kElems = Pack<T>::kElems;
    const int64_t half = shape.head_dim / 2;
    const float2* table = rotary_table(position_offset + shape.seq_len, shape.head_dim, std::log(base), cuda_stream);
    if (half % kElems == 0 && is_aligned(input.data, 16) && is_aligned(output.data, 16)) {
      const int64_t units = 2 * shape.heads * (half / kElems) + (copy_values ? shape.model_dim() / kElems : 0);
      rotary_packed_kernel<T><<<grid_for(tokens * units, kThreads, int64_t(multiprocessor_count()) * 16), kThreads, 0,
                                cuda_stream>>>(input.as<T>(), tokens, shape.seq_len, shape.heads, shape.head_dim, table,
                                               position_offset, float(direction), copy_values, output.as<T>());
      CUDA_CHECK_LAUNCH();
      return;
    }
    const int64_t count = tokens * half;
    rotary_kernel<T>
        <<<grid_for(count, kThreads, int64_t(multiprocessor_count()) * 16), kThreads, 0, cuda_stream>>>(
            input.as<T>(), tokens, shape.seq_len, shape.heads, shape.head_dim, table, position_offset,
            float(direction), copy_values, output.as<T>());
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
