// FP8 row packing on CUDA (math, record layout and error bound: src/ops/fp8_rows.h; reference:
// src/ops/cpu/fp8_rows.cpp, which this matches byte for byte).
//
// One warp per (row, 128-element block), grid-stride over the R * B blocks. Lane l holds elements
// l, l+32, l+64, l+96 of its block, so loads are coalesced and each byte store of the warp covers
// 32 consecutive codes.
//   quantize:   amax by a butterfly of fmaxf (exact and order-free, NaN ignored); inv =
//               __fdiv_rn(448, amax), scale = __fdiv_rn(amax, 448) (or 1 and 1, see the header);
//               code = __nv_cvt_float_to_fp8(__fmul_rn(x, inv), __NV_SATFINITE, __NV_E4M3), i.e.
//               cvt.rn.satfinite.e4m3x2.f32 on sm_89+. Lane 0 stores the block's scale; the warp of
//               block 0 also zeroes the record's padding bytes, so every byte is written.
//   dequantize: code -> __nv_cvt_fp8_to_halfraw (exact: every e4m3 value is a half) -> float,
//               __fmul_rn(value, scale), rounded to the output type with round-to-nearest-even.
// The explicit _rn intrinsics keep the compiler from contracting or approximating the scale math,
// which the CPU reference reproduces operation by operation.
#include <cuda_fp8.h>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/fp8_rows.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kLaneElements = int(kFp8BlockElements) / 32;
static_assert(kFp8BlockElements % 32 == 0, "a block is whole warps of elements");

struct Fp8RowShape {
  int64_t rows, width, blocks, scale_offset, row_bytes;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_rows_kernel(const T* __restrict__ rows, uint8_t* __restrict__ packed, Fp8RowShape shape) {
  const int lane = int(threadIdx.x % 32);
  const int64_t items = shape.rows * shape.blocks, stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; item < items; item += stride) {
    const int64_t row = item / shape.blocks, block = item % shape.blocks;
    const int64_t begin = block * kFp8BlockElements;
    const T* source = rows + row * shape.width;
    uint8_t* record = packed + row * shape.row_bytes;

    float values[kLaneElements];
    float amax = 0.0f;
#pragma unroll
    for (int index = 0; index < kLaneElements; ++index) {
      const int64_t column = begin + lane + 32 * index;
      values[index] = column < shape.width ? to_float(source[column]) : 0.0f;
      amax = fmaxf(amax, fabsf(values[index]));
    }
    amax = group_max<32>(amax);
    float inv = __fdiv_rn(kE4m3Max, amax), scale = __fdiv_rn(amax, kE4m3Max);
    if (amax == 0.0f || isinf(inv)) inv = scale = 1.0f;
#pragma unroll
    for (int index = 0; index < kLaneElements; ++index) {
      const int64_t column = begin + lane + 32 * index;
      if (column < shape.width)
        record[column] = __nv_cvt_float_to_fp8(__fmul_rn(values[index], inv), __NV_SATFINITE, __NV_E4M3);
    }
    if (lane == 0) reinterpret_cast<float*>(record + shape.scale_offset)[block] = scale;
    if (block == 0) {
      // Padding: [width, scale_offset) (< 4 bytes) and [scales end, row_bytes) (< 16 bytes).
      const int64_t gap = shape.scale_offset - shape.width, tail = shape.scale_offset + 4 * shape.blocks;
      for (int64_t index = lane; index < gap + (shape.row_bytes - tail); index += 32)
        record[index < gap ? shape.width + index : tail + (index - gap)] = 0;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_rows_kernel(const uint8_t* __restrict__ packed, T* __restrict__ rows, Fp8RowShape shape) {
  const int lane = int(threadIdx.x % 32);
  const int64_t items = shape.rows * shape.blocks, stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; item < items; item += stride) {
    const int64_t row = item / shape.blocks, block = item % shape.blocks;
    const int64_t begin = block * kFp8BlockElements;
    const uint8_t* record = packed + row * shape.row_bytes;
    T* destination = rows + row * shape.width;
    const float scale = reinterpret_cast<const float*>(record + shape.scale_offset)[block];
#pragma unroll
    for (int index = 0; index < kLaneElements; ++index) {
      const int64_t column = begin + lane + 32 * index;
      if (column >= shape.width) continue;
      const float value = __half2float(__half(__nv_cvt_fp8_to_halfraw(record[column], __NV_E4M3)));
      destination[column] = from_float<T>(__fmul_rn(value, scale));
    }
  }
}

// rows [R, D] of an activation dtype and packed u8 [R, fp8_row_bytes(D)], both on the device.
Fp8RowShape check_fp8_rows(const char* op, const Tensor& rows, const Tensor& packed) {
  SY_CHECK(rows.rank == 2 && is_activation_dtype(rows.dtype), op,
           ": rows must be a bf16, fp16 or fp32 [R, D] tensor, got ", rows.describe());
  check_tensor(rows, op, rows.dtype, {-1, -1});
  check_tensor(packed, op, DType::u8, {rows.dim(0), fp8_row_bytes(rows.dim(1))});
  SY_CHECK(is_aligned(packed.data, 4), op, ": the packed rows must be 4-byte aligned (their scales are float32)");
  const int64_t width = rows.dim(1);
  return Fp8RowShape{rows.dim(0), width, fp8_block_count(width), fp8_scale_offset(width), fp8_row_bytes(width)};
}

unsigned fp8_grid(const Fp8RowShape& shape) {
  return grid_for(shape.rows * shape.blocks, kWarpsPerBlock, int64_t(multiprocessor_count()) * 32);
}

}  // namespace

namespace cuda {

void quantize_rows_fp8(const Tensor& rows, Tensor& packed, void* stream) {
  const Fp8RowShape shape = check_fp8_rows("quantize_rows_fp8", rows, packed);
  if (shape.rows == 0 || shape.width == 0) return;
  dispatch_activation_dtype(rows.dtype, "quantize_rows_fp8", [&](auto tag) {
    using T = decltype(tag);
    quantize_rows_kernel<T><<<fp8_grid(shape), kThreads, 0, as_stream(stream)>>>(rows.as<const T>(),
                                                                                  packed.as<uint8_t>(), shape);
  });
  CUDA_CHECK_LAUNCH();
}

void dequantize_rows_fp8(const Tensor& packed, Tensor& rows, void* stream) {
  const Fp8RowShape shape = check_fp8_rows("dequantize_rows_fp8", rows, packed);
  if (shape.rows == 0 || shape.width == 0) return;
  dispatch_activation_dtype(rows.dtype, "dequantize_rows_fp8", [&](auto tag) {
    using T = decltype(tag);
    dequantize_rows_kernel<T><<<fp8_grid(shape), kThreads, 0, as_stream(stream)>>>(packed.as<const uint8_t>(),
                                                                                    rows.as<T>(), shape);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
