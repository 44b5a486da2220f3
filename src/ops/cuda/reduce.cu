// Global gradient check on CUDA: squared L2 norm and non-finite count of a list of tensors in one
// pass (contract: src/ops/model_ops.h; reference: src/ops/cpu/reduce.cpp).
//
//   result[kGradSquaredNorm]    = sum of x^2 over every element of every tensor (fp32)
//   result[kGradNonFiniteCount] = number of inf / NaN elements (fp32; exact below 2^24)
// The tensors (fp32, bf16 or fp16, mixed) are cut into chunks of kChunkElements described by a
// device table (uploaded only when the list changes, as in adamw.cu). Block b reads chunk b once:
// each thread squares and sums a fixed subset in fp32, the block combines the threads in a fixed
// tree, and writes one partial (sum, count). A one-block kernel then adds the partials in chunk
// order in double. No atomics, so the result is bit-reproducible.
#include <vector>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kFinalThreads = 1024;
constexpr int64_t kChunkElements = 16384;
constexpr int kScratchGradCheckTable = 0x4404;  // persistent_scratch tags (cuda_common.cuh)
constexpr int kScratchGradCheckPartials = 0x4405;

enum ElementKind : int32_t { kF32 = 0, kBf16 = 1, kF16 = 2 };

struct Chunk {
  const void* data;  // already offset to the chunk
  int64_t count;
  int32_t kind;
  int32_t vectorized;  // 16-byte aligned: load 16-byte packs
};

struct Partial {
  float squared_sum;
  int32_t non_finite;
};

template <typename T>
__device__ __forceinline__ void accumulate_chunk(const Chunk& chunk, float& squared_sum, int& non_finite) {
  const T* data = static_cast<const T*>(chunk.data);
  constexpr int kElems = Pack<T>::kElems;
  int64_t start = 0;
  if (chunk.vectorized) {
    const int64_t packs = chunk.count / kElems;
    for (int64_t pack = threadIdx.x; pack < packs; pack += kThreads) {
      float values[kElems];
      load_pack_streaming(data + pack * kElems, values);
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        squared_sum = fmaf(values[i], values[i], squared_sum);
        non_finite += isfinite(values[i]) ? 0 : 1;
      }
    }
    start = packs * kElems;
  }
  for (int64_t index = start + threadIdx.x; index < chunk.count; index += kThreads) {
    const float value = to_float(data[index]);
    squared_sum = fmaf(value, value, squared_sum);
    non_finite += isfinite(value) ? 0 : 1;
  }
}

__global__ void __launch_bounds__(kThreads)
    chunk_kernel(const Chunk* __restrict__ chunks, Partial* __restrict__ partials) {
  __shared__ float warp_sums[kThreads / 32];
  __shared__ int warp_counts[kThreads / 32];
  const Chunk chunk = chunks[blockIdx.x];
  float squared_sum = 0.0f;
  int non_finite = 0;
  if (chunk.kind == kBf16)
    accumulate_chunk<__nv_bfloat16>(chunk, squared_sum, non_finite);
  else if (chunk.kind == kF16)
    accumulate_chunk<__half>(chunk, squared_sum, non_finite);
  else
    accumulate_chunk<float>(chunk, squared_sum, non_finite);
  squared_sum = warp_sum(squared_sum);
  non_finite = warp_sum(non_finite);
  if (threadIdx.x % 32 == 0) {
    warp_sums[threadIdx.x / 32] = squared_sum;
    warp_counts[threadIdx.x / 32] = non_finite;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Partial partial{0.0f, 0};
    for (int w = 0; w < kThreads / 32; ++w) {
      partial.squared_sum += warp_sums[w];
      partial.non_finite += warp_counts[w];
    }
    partials[blockIdx.x] = partial;
  }
}

__global__ void __launch_bounds__(kFinalThreads)
    final_kernel(const Partial* __restrict__ partials, int64_t count, float* __restrict__ result) {
  __shared__ double warp_sums[kFinalThreads / 32];
  __shared__ long long warp_counts[kFinalThreads / 32];
  double squared_sum = 0.0;
  long long non_finite = 0;
  for (int64_t index = threadIdx.x; index < count; index += kFinalThreads) {
    squared_sum += double(partials[index].squared_sum);
    non_finite += partials[index].non_finite;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    squared_sum += __shfl_xor_sync(kFullWarpMask, squared_sum, offset);
    non_finite += __shfl_xor_sync(kFullWarpMask, non_finite, offset);
  }
  if (threadIdx.x % 32 == 0) {
    warp_sums[threadIdx.x / 32] = squared_sum;
    warp_counts[threadIdx.x / 32] = non_finite;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    long long total_count = 0;
    for (int w = 0; w < kFinalThreads / 32; ++w) {
      total += warp_sums[w];
      total_count += warp_counts[w];
    }
    result[kGradSquaredNorm] = float(total);
    result[kGradNonFiniteCount] = float(total_count);
  }
}

std::vector<Chunk> build_chunks(const std::vector<Tensor>& tensors) {
  std::vector<Chunk> chunks;
  for (size_t index = 0; index < tensors.size(); ++index) {
    const Tensor& tensor = tensors[index];
    SY_CHECK_INPUT(tensor.device == DeviceKind::cuda && (tensor.data != nullptr || tensor.numel() == 0),
                   "grad_norm_and_check: tensor ", index, " must be a cuda tensor with data, got ", tensor.describe());
    int32_t kind = kF32;
    if (tensor.dtype == DType::bf16)
      kind = kBf16;
    else if (tensor.dtype == DType::f16)
      kind = kF16;
    else
      SY_CHECK_INPUT(tensor.dtype == DType::f32, "grad_norm_and_check: tensor ", index,
                     " must be fp32, bf16 or fp16, got ", tensor.describe());
    const size_t element = dtype_size(tensor.dtype);
    const int32_t vectorized = is_aligned(tensor.data, 16) ? 1 : 0;  // chunk starts keep the alignment
    for (int64_t start = 0; start < tensor.numel(); start += kChunkElements) {
      Chunk chunk{};
      chunk.data = static_cast<const unsigned char*>(tensor.data) + size_t(start) * element;
      chunk.count = std::min(kChunkElements, tensor.numel() - start);
      chunk.kind = kind;
      chunk.vectorized = vectorized;
      chunks.push_back(chunk);
    }
  }
  return chunks;
}

// The device copy of `chunks` for `stream` (uploaded only when it changed).
const Chunk* device_table(const std::vector<Chunk>& chunks, cudaStream_t stream) {
  const size_t bytes = chunks.size() * sizeof(Chunk);
  return static_cast<const Chunk*>(cached_device_table(chunks.data(), bytes, stream, kScratchGradCheckTable));
}

}  // namespace

namespace cuda {

void grad_norm_and_check(const std::vector<Tensor>& tensors, Tensor& result, void* stream) {
  check_tensor(result, "grad_norm_and_check: result", DType::f32, {kNumGradCheckResults});
  const std::vector<Chunk> chunks = build_chunks(tensors);
  SY_CHECK_INPUT(chunks.size() < (size_t(1) << 31), "grad_norm_and_check: too many chunks: ", chunks.size());
  cudaStream_t cuda_stream = as_stream(stream);
  Partial* partials = nullptr;
  if (!chunks.empty()) {
    const Chunk* table = device_table(chunks, cuda_stream);
    partials = static_cast<Partial*>(
        persistent_scratch(cuda_stream, kScratchGradCheckPartials, chunks.size() * sizeof(Partial)));
    chunk_kernel<<<unsigned(chunks.size()), kThreads, 0, cuda_stream>>>(table, partials);
    CUDA_CHECK_LAUNCH();
  }
  final_kernel<<<1, kFinalThreads, 0, cuda_stream>>>(partials, int64_t(chunks.size()), result.as<float>());
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
