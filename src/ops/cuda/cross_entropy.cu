// Fused softmax cross-entropy on CUDA (contract: src/ops/model_ops.h; reference:
// src/ops/cpu/cross_entropy.cpp).
//
// One block per token row of logits [T, V] (bf16, fp16 or fp32):
//   pass 1  online max / sum of exp over the row (each thread a running pair, then a fixed-order
//           warp and block combine): lse = max + log(sum); loss_t = lse - z[y_t] (fp32)
//   pass 2  grad[t, v] = grad_scale * (exp(z_v - lse) - [v == y_t]), in the logits' dtype
// Pass 2 re-reads the row (from L2 for all but huge vocabularies); each element is read before it
// is written by the same thread, so grad_logits may alias the logits. Ignored rows (y = -1) get a
// zero loss and a zero gradient; a target outside [-1, V) gets a NaN loss (so it cannot pass
// unnoticed) and a zero gradient. A second one-block kernel forms summary = {mean of the losses of
// non-ignored tokens, their count} in a fixed order (double accumulation), so it is
// deterministic.
#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kSummaryThreads = 1024;

struct MaxSum {
  float max, sum;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float max = fmaxf(a.max, b.max);
  if (max == -INFINITY) return {max, 0.0f};
  return {max, a.sum * __expf(a.max - max) + b.sum * __expf(b.max - max)};
}

template <typename T, int kElems>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(const T* logits, const int32_t* __restrict__ targets, int64_t rows, int64_t vocab,
                         float grad_scale, float* __restrict__ losses, T* grad) {
  __shared__ MaxSum warp_partials[kWarps];
  __shared__ float row_lse;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* z = logits + row * vocab;
    const int32_t target = targets[row];
    const bool ignored = target == -1, valid = target >= 0 && target < vocab;
    if (!valid) {  // uniform over the block: no reduction needed
      if (threadIdx.x == 0) losses[row] = ignored ? 0.0f : __int_as_float(0x7fc00000);  // NaN for a bad target
      if (grad) {
        float zeros[kElems];
#pragma unroll
        for (int i = 0; i < kElems; ++i) zeros[i] = 0.0f;
        for (int64_t column = int64_t(threadIdx.x) * kElems; column < vocab; column += int64_t(kThreads) * kElems)
          store_elems<T, kElems>(grad + row * vocab + column, zeros);
      }
      continue;
    }
    MaxSum running{-INFINITY, 0.0f};
    for (int64_t column = int64_t(threadIdx.x) * kElems; column < vocab; column += int64_t(kThreads) * kElems) {
      float values[kElems];
      load_elems<T, kElems>(z + column, values);
      // one rescale per pack: kElems + 1 exponentials instead of 2 per element
      float pack_max = values[0];
#pragma unroll
      for (int i = 1; i < kElems; ++i) pack_max = fmaxf(pack_max, values[i]);
      const float new_max = fmaxf(running.max, pack_max);
      if (new_max == -INFINITY) continue;
      float pack_sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kElems; ++i) pack_sum += __expf(values[i] - new_max);
      running.sum = running.sum * __expf(running.max - new_max) + pack_sum;
      running.max = new_max;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      MaxSum other{__shfl_xor_sync(kFullWarpMask, running.max, offset),
                   __shfl_xor_sync(kFullWarpMask, running.sum, offset)};
      running = combine(running, other);
    }
    if (lane == 0) warp_partials[warp] = running;
    __syncthreads();
    if (threadIdx.x == 0) {
      MaxSum total = warp_partials[0];
      for (int w = 1; w < kWarps; ++w) total = combine(total, warp_partials[w]);
      const float lse = total.max + logf(total.sum);
      row_lse = lse;
      losses[row] = lse - to_float(z[target]);
    }
    __syncthreads();
    const float lse = row_lse;
    if (grad) {
      for (int64_t column = int64_t(threadIdx.x) * kElems; column < vocab; column += int64_t(kThreads) * kElems) {
        float values[kElems];
        load_elems<T, kElems>(z + column, values);
#pragma unroll
        for (int i = 0; i < kElems; ++i) {
          const float one_hot = column + i == target ? 1.0f : 0.0f;
          values[i] = grad_scale * (__expf(values[i] - lse) - one_hot);
        }
        store_elems<T, kElems>(grad + row * vocab + column, values);
      }
    }
    __syncthreads();  // row_lse and warp_partials are reused by the next row
  }
}

__global__ void __launch_bounds__(kSummaryThreads)
    summary_kernel(const float* __restrict__ losses, const int32_t* __restrict__ targets, int64_t rows,
                   float* __restrict__ summary) {
  __shared__ double warp_sums[kSummaryThreads / 32];
  __shared__ long long warp_counts[kSummaryThreads / 32];
  double sum = 0.0;
  long long count = 0;
  for (int64_t row = threadIdx.x; row < rows; row += kSummaryThreads) {
    if (targets[row] != -1) {
      sum += double(losses[row]);
      ++count;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    sum += __shfl_xor_sync(kFullWarpMask, sum, offset);
    count += __shfl_xor_sync(kFullWarpMask, count, offset);
  }
  if (threadIdx.x % 32 == 0) {
    warp_sums[threadIdx.x / 32] = sum;
    warp_counts[threadIdx.x / 32] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    long long valid = 0;
    for (int w = 0; w < kSummaryThreads / 32; ++w) {
      total += warp_sums[w];
      valid += warp_counts[w];
    }
    summary[kCrossEntropyMeanLoss] = valid > 0 ? float(total / double(valid)) : 0.0f;
    summary[kCrossEntropyValidTokens] = float(valid);
  }
}

}  // namespace

namespace cuda {

void cross_entropy(const Tensor& logits, const Tensor& targets, float grad_scale, Tensor& token_losses, Tensor& summary,
                   Tensor* grad_logits, void* stream) {
  const char* op = "cross_entropy";
  SY_CHECK_INPUT(logits.rank == 2 && is_activation_dtype(logits.dtype), op,
                 ": logits must be a bf16/fp16/fp32 [T, V] tensor, got ", logits.describe());
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  SY_CHECK_INPUT(vocab >= 1, op, ": the vocabulary is empty: ", logits.describe());
  check_tensor(logits, "cross_entropy: logits", logits.dtype, {rows, vocab});
  check_tensor(targets, "cross_entropy: targets", DType::i32, {rows});
  check_tensor(token_losses, "cross_entropy: token_losses", DType::f32, {rows});
  check_tensor(summary, "cross_entropy: summary", DType::f32, {kNumCrossEntropySummary});
  if (grad_logits) check_tensor(*grad_logits, "cross_entropy: grad_logits", logits.dtype, {rows, vocab});
  SY_CHECK_INPUT(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ", grad_scale);
  cudaStream_t cuda_stream = as_stream(stream);
  dispatch_activation_dtype(logits.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    T* grad = grad_logits ? grad_logits->as<T>() : nullptr;
    const bool packs = vocab % Pack<T>::kElems == 0 && is_aligned(logits.data, 16) && (!grad || is_aligned(grad, 16));
    if (rows > 0) {
      dispatch_elems<T>(packs, [&](auto elems) {
        constexpr int kElems = decltype(elems)::value;
        const unsigned blocks = grid_for(rows, 1, int64_t(multiprocessor_count()) * 4);
        cross_entropy_kernel<T, kElems><<<blocks, kThreads, 0, cuda_stream>>>(
            logits.as<T>(), targets.as<int32_t>(), rows, vocab, grad_scale, token_losses.as<float>(), grad);
        CUDA_CHECK_LAUNCH();
      });
    }
  });
  summary_kernel<<<1, kSummaryThreads, 0, cuda_stream>>>(token_losses.as<float>(), targets.as<int32_t>(), rows,
                                                         summary.as<float>());
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
