// LayerNorm and RMSNorm on CUDA (contract: src/ops/model_ops.h; reference: src/ops/cpu/norm.cpp).
//
//   forward:  per row of x [T, D]: mean (layernorm), rstd = 1 / sqrt(var + eps) (rmsnorm: the
//             mean square), y = (x - mean) rstd w (+ b). Two-pass statistics in fp32.
//   backward: g = dy w, xhat = (x - mean) rstd;
//             dx = rstd (g - mean_D(g) - xhat mean_D(g xhat))   (rmsnorm: without mean_D(g))
//             dw = sum_t dy xhat, db = sum_t dy
//             dx overwrites grad_x or (NormAccumulate::grad_x) is added to it: the residual stream's
//             gradient, so the block's residual add costs no pass of its own.
// x, w, b, y, dy, dx share the activation dtype (bf16, fp16 or fp32); mean, rstd [T], dw, db [D]
// are fp32. Row work uses one warp per row (16-byte packs when the width and pointers allow; the
// row is re-read from L1/L2 rather than held in registers, so any width works).
// Backward is one pass over HBM: a block per chunk of kRowsPerChunk rows first writes the chunk's
// dx (warp per row), then, while the chunk's x and dy are still in L1/L2, sums dy xhat and dy per
// column over the chunk's rows in order into fp32 partials [chunk][D]; a second kernel adds the
// chunks in a fixed order (8 interleaved runs per column, then the runs in order) and overwrites or
// adds to dw, db. The chunking depends only on T, so the bits are the same on every run.
#include <algorithm>
#include <climits>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kRowsPerChunk = 64;
constexpr int kScratchNormPartials = 0x4402;  // persistent_scratch tag (cuda_common.cuh)

template <typename T, int kElems, bool kCenter>
__global__ void __launch_bounds__(kThreads)
    norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias, int64_t rows,
                        int64_t width, float eps, T* __restrict__ out, float* __restrict__ mean_out,
                        float* __restrict__ rstd_out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = int64_t(gridDim.x) * kWarps;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows; row += warps_total) {
    const T* x_row = x + row * width;
    float mean = 0.0f;
    if (kCenter) {
      float sum = 0.0f;
      for (int64_t column = int64_t(lane) * kElems; column < width; column += 32 * kElems) {
        float values[kElems];
        load_elems<T, kElems>(x_row + column, values);
#pragma unroll
        for (int i = 0; i < kElems; ++i) sum += values[i];
      }
      mean = warp_sum(sum) / float(width);
    }
    float squares = 0.0f;
    for (int64_t column = int64_t(lane) * kElems; column < width; column += 32 * kElems) {
      float values[kElems];
      load_elems<T, kElems>(x_row + column, values);
#pragma unroll
      for (int i = 0; i < kElems; ++i) squares = fmaf(values[i] - mean, values[i] - mean, squares);
    }
    const float rstd = 1.0f / sqrtf(warp_sum(squares) / float(width) + eps);
    T* out_row = out + row * width;
    for (int64_t column = int64_t(lane) * kElems; column < width; column += 32 * kElems) {
      float values[kElems], scales[kElems], shifts[kElems];
      load_elems<T, kElems>(x_row + column, values);
      load_elems<T, kElems>(weight + column, scales);
      if (kCenter) load_elems<T, kElems>(bias + column, shifts);
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        values[i] = (values[i] - mean) * rstd * scales[i];
        if (kCenter) values[i] += shifts[i];
      }
      store_elems<T, kElems>(out_row + column, values);
    }
    if (lane == 0) {
      if (kCenter) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// One block per chunk of kRowsPerChunk rows (grid = chunks: a function of T only).
// Phase 1, warp per row: dx = rstd (g - mean_D(g) - xhat mean_D(g xhat)), written or added to grad_x.
// Phase 2, thread per column: the chunk's dw and db partials, its rows in order.
template <typename T, int kElems, bool kCenter>
__global__ void __launch_bounds__(kThreads)
    norm_backward_kernel(const T* __restrict__ x, const T* __restrict__ weight, const float* __restrict__ mean,
                         const float* __restrict__ rstd, const T* __restrict__ grad_out, int64_t rows, int64_t width,
                         bool accumulate_grad_x, T* __restrict__ grad_x, int64_t chunks, float* __restrict__ partials) {
  const int lane = threadIdx.x % 32;
  const int64_t chunk = blockIdx.x, first = chunk * kRowsPerChunk, last = min(rows, first + kRowsPerChunk);
  for (int64_t row = first + threadIdx.x / 32; row < last; row += kWarps) {
    const float row_mean = kCenter ? mean[row] : 0.0f, row_rstd = rstd[row];
    const T* x_row = x + row * width;
    const T* dy_row = grad_out + row * width;
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    for (int64_t column = int64_t(lane) * kElems; column < width; column += 32 * kElems) {
      float values[kElems], grads[kElems], scales[kElems];
      load_elems<T, kElems>(x_row + column, values);
      load_elems<T, kElems>(dy_row + column, grads);
      load_elems<T, kElems>(weight + column, scales);
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        const float g = grads[i] * scales[i];
        sum_g += g;
        sum_g_xhat = fmaf(g, (values[i] - row_mean) * row_rstd, sum_g_xhat);
      }
    }
    const float mean_g = kCenter ? warp_sum(sum_g) / float(width) : 0.0f;
    const float mean_g_xhat = warp_sum(sum_g_xhat) / float(width);
    T* dx_row = grad_x + row * width;
    for (int64_t column = int64_t(lane) * kElems; column < width; column += 32 * kElems) {
      float values[kElems], grads[kElems], scales[kElems], old[kElems];
      load_elems<T, kElems>(x_row + column, values);
      load_elems<T, kElems>(dy_row + column, grads);
      load_elems<T, kElems>(weight + column, scales);
      if (accumulate_grad_x) load_elems<T, kElems>(dx_row + column, old);
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        const float xhat = (values[i] - row_mean) * row_rstd;
        values[i] = row_rstd * (grads[i] * scales[i] - mean_g - xhat * mean_g_xhat);
        if (accumulate_grad_x) values[i] += old[i];
      }
      store_elems<T, kElems>(dx_row + column, values);
    }
  }
  // Column sums of the chunk (its x and dy were just read: L1/L2 hits).
  for (int64_t column = threadIdx.x; column < width; column += kThreads) {
    float weight_sum = 0.0f, bias_sum = 0.0f;
#pragma unroll 8
    for (int64_t row = first; row < last; ++row) {
      const float dy = to_float(grad_out[row * width + column]);
      const float xhat = (to_float(x[row * width + column]) - (kCenter ? mean[row] : 0.0f)) * rstd[row];
      weight_sum = fmaf(dy, xhat, weight_sum);
      bias_sum += dy;
    }
    partials[chunk * width + column] = weight_sum;
    if (kCenter) partials[(chunks + chunk) * width + column] = bias_sum;
  }
}

// dw (and db) from the partials: a block of kThreads serves kFinalColumns columns; run r of a column
// adds chunks r, r + kFinalRuns, ... in order, then run 0 adds the runs in order. Overwrites or adds.
constexpr int kFinalRuns = kThreads / 32;
constexpr int kFinalColumns = 32;

__global__ void __launch_bounds__(kThreads)
    norm_param_final_kernel(const float* __restrict__ partials, int64_t chunks, int64_t width, bool accumulate,
                            float* __restrict__ grad_weight, float* __restrict__ grad_bias) {
  __shared__ float run_sums[2][kFinalRuns][kFinalColumns];
  const int lane = threadIdx.x % 32, run = threadIdx.x / 32;
  const int64_t column = int64_t(blockIdx.x) * kFinalColumns + lane;
  float weight_sum = 0.0f, bias_sum = 0.0f;
  if (column < width) {
#pragma unroll 4
    for (int64_t chunk = run; chunk < chunks; chunk += kFinalRuns) {
      weight_sum += partials[chunk * width + column];
      if (grad_bias) bias_sum += partials[(chunks + chunk) * width + column];
    }
  }
  run_sums[0][run][lane] = weight_sum;
  run_sums[1][run][lane] = bias_sum;
  __syncthreads();
  if (run != 0 || column >= width) return;
  float total_weight = 0.0f, total_bias = 0.0f;
#pragma unroll
  for (int r = 0; r < kFinalRuns; ++r) {
    total_weight += run_sums[0][r][lane];
    total_bias += run_sums[1][r][lane];
  }
  grad_weight[column] = accumulate ? grad_weight[column] + total_weight : total_weight;
  if (grad_bias) grad_bias[column] = accumulate ? grad_bias[column] + total_bias : total_bias;
}

template <typename T>
bool packs_fit(int64_t width, std::initializer_list<const void*> pointers) {
  if (width % Pack<T>::kElems != 0) return false;
  for (const void* pointer : pointers)
    if (pointer && !is_aligned(pointer, 16)) return false;
  return true;
}

unsigned row_blocks(int64_t rows) { return grid_for(rows, kWarps, int64_t(multiprocessor_count()) * 32); }

void check_rows(const char* op, const Tensor& x) {
  SY_CHECK_INPUT(x.rank == 2 && is_activation_dtype(x.dtype), op, ": x must be a bf16/fp16/fp32 [T, D] tensor, got ",
                 x.describe());
  check_tensor(x, op, x.dtype, {x.dim(0), x.dim(1)});
}

void forward(bool center, const Tensor& x, const Tensor& weight, const Tensor* bias, float eps, Tensor& out,
             Tensor* mean, Tensor& rstd, void* stream) {
  const char* op = center ? "layernorm_forward" : "rmsnorm_forward";
  check_rows(op, x);
  SY_CHECK_INPUT(eps > 0.0f && std::isfinite(eps), op, ": eps must be positive and finite, got ", eps);
  const int64_t rows = x.dim(0), width = x.dim(1);
  check_tensor(weight, "norm: weight", x.dtype, {width});
  if (bias) check_tensor(*bias, "norm: bias", x.dtype, {width});
  check_tensor(out, "norm: out", x.dtype, {rows, width});
  if (mean) check_tensor(*mean, "norm: mean", DType::f32, {rows});
  check_tensor(rstd, "norm: rstd", DType::f32, {rows});
  if (rows == 0 || width == 0) return;
  dispatch_activation_dtype(x.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    const T* bias_data = bias ? bias->as<T>() : nullptr;
    dispatch_elems<T>(packs_fit<T>(width, {x.data, weight.data, bias_data, out.data}), [&](auto elems) {
      constexpr int kElems = decltype(elems)::value;
      auto kernel = center ? norm_forward_kernel<T, kElems, true> : norm_forward_kernel<T, kElems, false>;
      kernel<<<row_blocks(rows), kThreads, 0, as_stream(stream)>>>(x.as<T>(), weight.as<T>(), bias_data, rows, width,
                                                                   eps, out.as<T>(), mean ? mean->as<float>() : nullptr,
                                                                   rstd.as<float>());
      CUDA_CHECK_LAUNCH();
    });
  });
}

void backward(bool center, const Tensor& x, const Tensor& weight, const Tensor* mean, const Tensor& rstd,
              const Tensor& grad_out, Tensor& grad_x, Tensor& grad_weight, Tensor* grad_bias, NormAccumulate accumulate,
              void* stream) {
  const char* op = center ? "layernorm_backward" : "rmsnorm_backward";
  check_rows(op, x);
  const int64_t rows = x.dim(0), width = x.dim(1);
  check_tensor(weight, "norm backward: weight", x.dtype, {width});
  if (mean) check_tensor(*mean, "norm backward: mean", DType::f32, {rows});
  check_tensor(rstd, "norm backward: rstd", DType::f32, {rows});
  check_tensor(grad_out, "norm backward: grad_out", x.dtype, {rows, width});
  check_tensor(grad_x, "norm backward: grad_x", x.dtype, {rows, width});
  check_tensor(grad_weight, "norm backward: grad_weight", DType::f32, {width});
  if (grad_bias) check_tensor(*grad_bias, "norm backward: grad_bias", DType::f32, {width});
  if (width == 0) return;
  cudaStream_t cuda_stream = as_stream(stream);
  const float* mean_data = mean ? mean->as<float>() : nullptr;
  const int64_t chunks = std::max<int64_t>(1, (rows + kRowsPerChunk - 1) / kRowsPerChunk);
  SY_CHECK_INPUT(chunks <= int64_t(INT_MAX), op, ": ", rows, " rows are too many");
  float* partials = static_cast<float*>(
      persistent_scratch(cuda_stream, kScratchNormPartials, size_t(2 * chunks * width) * sizeof(float)));
  dispatch_activation_dtype(x.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    if (rows > 0) {
      dispatch_elems<T>(packs_fit<T>(width, {x.data, weight.data, grad_out.data, grad_x.data}), [&](auto elems) {
        constexpr int kElems = decltype(elems)::value;
        auto kernel = center ? norm_backward_kernel<T, kElems, true> : norm_backward_kernel<T, kElems, false>;
        kernel<<<unsigned(chunks), kThreads, 0, cuda_stream>>>(x.as<T>(), weight.as<T>(), mean_data, rstd.as<float>(),
                                                                grad_out.as<T>(), rows, width, accumulate.grad_x,
                                                                grad_x.as<T>(), chunks, partials);
        CUDA_CHECK_LAUNCH();
      });
    } else {  // no rows: the sums are zero
      CUDA_CHECK(cudaMemsetAsync(partials, 0, size_t(2 * chunks * width) * sizeof(float), cuda_stream));
    }
    norm_param_final_kernel<<<unsigned((width + kFinalColumns - 1) / kFinalColumns), kThreads, 0, cuda_stream>>>(
        partials, chunks, width, accumulate.params, grad_weight.as<float>(),
        grad_bias ? grad_bias->as<float>() : nullptr);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

namespace cuda {

void layernorm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, Tensor& out, Tensor& mean,
                       Tensor& rstd, void* stream) {
  forward(true, x, weight, &bias, eps, out, &mean, rstd, stream);
}

void layernorm_backward(const Tensor& x, const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                        const Tensor& grad_out, Tensor& grad_x, Tensor& grad_weight, Tensor& grad_bias, void* stream,
                        NormAccumulate accumulate) {
  backward(true, x, weight, &mean, rstd, grad_out, grad_x, grad_weight, &grad_bias, accumulate, stream);
}

void rmsnorm_forward(const Tensor& x, const Tensor& weight, float eps, Tensor& out, Tensor& rstd, void* stream) {
  forward(false, x, weight, nullptr, eps, out, nullptr, rstd, stream);
}

void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& grad_out, Tensor& grad_x,
                      Tensor& grad_weight, void* stream, NormAccumulate accumulate) {
  backward(false, x, weight, nullptr, rstd, grad_out, grad_x, grad_weight, nullptr, accumulate, stream);
}

}  // namespace cuda
}  // namespace switchyard
