// Token (+ learned position) embedding on CUDA (contract: src/ops/model_ops.h; reference:
// src/ops/cpu/embedding.cpp).
//
// Forward: out[t] = token_table[tokens[t]] + position_table[t % S]; one warp per row, 16-byte
// packs when the width and pointers allow. Tables and out share the activation dtype.
//
// Backward: grad_table[v] (+)= sum_{t : tokens[t] = v} grad_out[t] in fp32, deterministically and
// without a sort or float atomics. The vocabulary is cut into groups of kGroupRows ids and the
// columns into slices of kThreads; the tokens into `splits` equal ranges. Block (group, slice,
// split) scans its token range in tiles, compacts the tokens whose id falls in its group into a
// shared list in token order (ballot + per-warp prefix), and adds their gradient rows into a
// shared [kGroupRows, kThreads] fp32 accumulator: each thread owns one column, so every (id,
// column) sum is formed in increasing t by one thread. With one split the block then writes (or
// adds to) the table rows of its group; with several, it writes fp32 partials [split, V, D] and
// a second kernel adds the splits in order. Splits exist so that small vocabularies (few groups,
// heavy ids) still spread over the GPU; they depend only on (V, D, T), so the summation order,
// and with it every bit of the result, is the same on every run and every device.
// Position gradients: one thread per (position, column) sums the B sequences in order.
// Ids outside [0, V) contribute nothing (forward writes their token part as zero).
#include <algorithm>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroupRows = 64;          // vocabulary ids per block
constexpr int kListCapacity = 2048;     // matched tokens buffered before they are added
constexpr int64_t kTargetBlocks = 512;  // enough to fill an H100 several times over
constexpr int64_t kMinTokensPerSplit = 256;
constexpr size_t kMaxPartialBytes = size_t(128) << 20;
constexpr int kScratchEmbeddingPartials = 0x4401;  // persistent_scratch tag (cuda_common.cuh)

template <typename T, int kElems>
__global__ void __launch_bounds__(kThreads)
    embedding_forward_kernel(const int32_t* __restrict__ tokens, const T* __restrict__ table,
                             const T* __restrict__ positions, int64_t rows, int64_t width, int64_t vocab,
                             int64_t seq_len, T* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = int64_t(gridDim.x) * kWarps;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows; row += warps_total) {
    const int64_t id = tokens[row];
    const bool valid = id >= 0 && id < vocab;
    const T* token_row = table + (valid ? id : 0) * width;
    const T* position_row = positions ? positions + (row % seq_len) * width : nullptr;
    T* out_row = out + row * width;
    for (int64_t column = int64_t(lane) * kElems; column < width; column += 32 * kElems) {
      float values[kElems];
      if (valid) {
        load_elems<T, kElems>(token_row + column, values);
      } else {
#pragma unroll
        for (int i = 0; i < kElems; ++i) values[i] = 0.0f;
      }
      if (position_row) {
        float position_values[kElems];
        load_elems<T, kElems>(position_row + column, position_values);
#pragma unroll
        for (int i = 0; i < kElems; ++i) values[i] += position_values[i];
      }
      store_elems<T, kElems>(out_row + column, values);
    }
  }
}

struct BackwardPlan {
  int64_t groups, slices, splits, tokens_per_split;
};

// Shared memory of one backward block: the accumulator and the list of matched tokens.
struct BackwardShared {
  float accumulator[kGroupRows][kThreads];
  int32_t list_tokens[kListCapacity];
  int16_t list_rows[kListCapacity];
  int warp_counts[kWarps];
};

// Adds the grad_out rows of the listed tokens into the accumulator, in list (= token) order.
// Gradient loads are issued eight at a time so that their latencies overlap.
template <typename T>
__device__ __forceinline__ void add_listed_rows(BackwardShared& shared, int count, const T* __restrict__ grad_out,
                                                int64_t width, int64_t column) {
  constexpr int kUnroll = 8;
  const bool in_range = column < width;
  for (int base = 0; base < count; base += kUnroll) {
    float values[kUnroll];
    int rows[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int index = base + u;
      rows[u] = index < count ? shared.list_rows[index] : -1;
      values[u] =
          (index < count && in_range) ? to_float(grad_out[int64_t(shared.list_tokens[index]) * width + column]) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (rows[u] >= 0) shared.accumulator[rows[u]][threadIdx.x] += values[u];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    embedding_backward_kernel(const int32_t* __restrict__ tokens, const T* __restrict__ grad_out, int64_t num_tokens,
                              int64_t width, int64_t vocab, BackwardPlan plan, bool accumulate,
                              float* __restrict__ grad_table, float* __restrict__ partials) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  BackwardShared& shared = *reinterpret_cast<BackwardShared*>(shared_bytes);
  const int64_t group = blockIdx.x % plan.groups;
  const int64_t slice = (blockIdx.x / plan.groups) % plan.slices;
  const int64_t split = blockIdx.x / (plan.groups * plan.slices);
  const int64_t first_id = group * kGroupRows;
  const int64_t column = slice * kThreads + threadIdx.x;
  const int64_t token_begin = split * plan.tokens_per_split;
  const int64_t token_end = min(num_tokens, token_begin + plan.tokens_per_split);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int row = 0; row < kGroupRows; ++row) shared.accumulator[row][threadIdx.x] = 0.0f;
  int listed = 0;  // the same value in every thread
  for (int64_t tile = token_begin; tile < token_end; tile += kThreads) {
    const int64_t token = tile + threadIdx.x;
    const int64_t id = token < token_end ? int64_t(tokens[token]) : -1;
    const bool match = id >= first_id && id < first_id + kGroupRows && id < vocab;
    const unsigned ballot = __ballot_sync(kFullWarpMask, match);
    if (lane == 0) shared.warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, tile_matches = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? shared.warp_counts[w] : 0;
      tile_matches += shared.warp_counts[w];
    }
    if (match) {
      const int slot = listed + before + __popc(ballot & lanemask_lt());
      shared.list_tokens[slot] = int32_t(token);
      shared.list_rows[slot] = int16_t(id - first_id);
    }
    listed += tile_matches;
    __syncthreads();  // the list is complete and warp_counts may be reused
    if (listed > kListCapacity - kThreads || tile + kThreads >= token_end) {
      add_listed_rows(shared, listed, grad_out, width, column);
      listed = 0;
      __syncthreads();  // nobody refills the list while others still read it
    }
  }

  if (column >= width) return;
  for (int row = 0; row < kGroupRows; ++row) {
    const int64_t id = first_id + row;
    if (id >= vocab) break;
    const float sum = shared.accumulator[row][threadIdx.x];
    if (plan.splits > 1) {
      partials[(split * vocab + id) * width + column] = sum;
    } else {
      float& destination = grad_table[id * width + column];
      destination = accumulate ? destination + sum : sum;
    }
  }
}

__global__ void sum_splits_kernel(const float* __restrict__ partials, int64_t splits, int64_t count, bool accumulate,
                                  float* __restrict__ grad_table) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < count; index += stride) {
    float sum = accumulate ? grad_table[index] : 0.0f;
    for (int64_t split = 0; split < splits; ++split) sum += partials[split * count + index];
    grad_table[index] = sum;
  }
}

// grad_positions[p, c] (+)= sum_b grad_out[b * S + p, c] for p < S; rows p >= S get zero (or stay).
template <typename T>
__global__ void position_backward_kernel(const T* __restrict__ grad_out, int64_t sequences, int64_t seq_len,
                                         int64_t table_rows, int64_t width, bool accumulate,
                                         float* __restrict__ grad_positions) {
  const int64_t count = table_rows * width, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < count; index += stride) {
    const int64_t position = index / width, column = index % width;
    float sum = accumulate ? grad_positions[index] : 0.0f;
    if (position < seq_len)
      for (int64_t b = 0; b < sequences; ++b) sum += to_float(grad_out[(b * seq_len + position) * width + column]);
    grad_positions[index] = sum;
  }
}

BackwardPlan plan_backward(int64_t tokens, int64_t width, int64_t vocab) {
  BackwardPlan plan;
  plan.groups = (vocab + kGroupRows - 1) / kGroupRows;
  plan.slices = (width + kThreads - 1) / kThreads;
  const int64_t base_blocks = plan.groups * plan.slices;
  int64_t splits = (kTargetBlocks + base_blocks - 1) / base_blocks;
  splits = std::min(splits, std::max<int64_t>(1, tokens / kMinTokensPerSplit));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, int64_t(kMaxPartialBytes / (size_t(vocab * width) * 4))));
  plan.splits = std::max<int64_t>(1, splits);
  plan.tokens_per_split = std::max<int64_t>(1, (tokens + plan.splits - 1) / plan.splits);
  return plan;
}

void check_ids(const char* op, const Tensor& tokens, int64_t seq_len) {
  SY_CHECK_INPUT(tokens.rank == 1, op, ": tokens must be int32 [T], got ", tokens.describe());
  check_tensor(tokens, op, DType::i32, {tokens.dim(0)});
  SY_CHECK_INPUT(seq_len >= 1 && tokens.dim(0) % seq_len == 0, op, ": ", tokens.dim(0),
                 " tokens are not whole sequences of ", seq_len);
}

}  // namespace

namespace cuda {

void embedding_forward(const Tensor& tokens, const Tensor& token_table, const Tensor* position_table, int64_t seq_len,
                       Tensor& out, void* stream) {
  const char* op = "embedding_forward";
  check_ids(op, tokens, seq_len);
  SY_CHECK_INPUT(token_table.rank == 2 && is_activation_dtype(token_table.dtype), op,
                 ": token_table must be a bf16/fp16/fp32 [V, D] tensor, got ", token_table.describe());
  const DType dtype = token_table.dtype;
  const int64_t rows = tokens.dim(0), vocab = token_table.dim(0), width = token_table.dim(1);
  check_tensor(token_table, "embedding_forward: token_table", dtype, {vocab, width});
  if (position_table) {
    check_tensor(*position_table, "embedding_forward: position_table", dtype, {-1, width});
    SY_CHECK_INPUT(position_table->dim(0) >= seq_len, op, ": position_table needs seq_len = ", seq_len, " rows, got ",
                   position_table->describe());
  }
  check_tensor(out, "embedding_forward: out", dtype, {rows, width});
  if (rows == 0 || width == 0) return;
  dispatch_activation_dtype(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    const T* positions = position_table ? position_table->as<T>() : nullptr;
    const bool packs = width % Pack<T>::kElems == 0 && is_aligned(token_table.data, 16) && is_aligned(out.data, 16) &&
                       (!positions || is_aligned(positions, 16));
    dispatch_elems<T>(packs, [&](auto elems) {
      constexpr int kElems = decltype(elems)::value;
      const unsigned blocks = grid_for(rows, kWarps, int64_t(multiprocessor_count()) * 32);
      embedding_forward_kernel<T, kElems><<<blocks, kThreads, 0, as_stream(stream)>>>(
          tokens.as<int32_t>(), token_table.as<T>(), positions, rows, width, vocab, seq_len, out.as<T>());
      CUDA_CHECK_LAUNCH();
    });
  });
}

void embedding_backward(const Tensor& tokens, const Tensor& grad_out, int64_t seq_len, bool accumulate,
                        Tensor& grad_token_table, Tensor* grad_position_table, void* stream) {
  const char* op = "embedding_backward";
  check_ids(op, tokens, seq_len);
  SY_CHECK_INPUT(grad_token_table.rank == 2, op, ": grad_token_table must be fp32 [V, D], got ",
                 grad_token_table.describe());
  const int64_t rows = tokens.dim(0), vocab = grad_token_table.dim(0), width = grad_token_table.dim(1);
  check_tensor(grad_token_table, "embedding_backward: grad_token_table", DType::f32, {vocab, width});
  SY_CHECK_INPUT(is_activation_dtype(grad_out.dtype), op, ": grad_out must be bf16/fp16/fp32, got ",
                 grad_out.describe());
  check_tensor(grad_out, "embedding_backward: grad_out", grad_out.dtype, {rows, width});
  if (grad_position_table) {
    check_tensor(*grad_position_table, "embedding_backward: grad_position_table", DType::f32, {-1, width});
    SY_CHECK_INPUT(grad_position_table->dim(0) >= seq_len, op, ": grad_position_table needs seq_len = ", seq_len,
                   " rows, got ", grad_position_table->describe());
  }
  SY_CHECK_INPUT(vocab * width < (int64_t(1) << 40), op, ": table too large: ", grad_token_table.describe());
  if (width == 0) return;
  cudaStream_t cuda_stream = as_stream(stream);

  dispatch_activation_dtype(grad_out.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    if (vocab > 0) {
      const BackwardPlan plan = plan_backward(rows, width, vocab);
      float* partials = nullptr;
      if (plan.splits > 1)
        partials = static_cast<float*>(persistent_scratch(cuda_stream, kScratchEmbeddingPartials,
                                                          size_t(plan.splits * vocab * width) * sizeof(float)));
      const size_t shared_bytes = sizeof(BackwardShared);
      CUDA_CHECK(cudaFuncSetAttribute(embedding_backward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(shared_bytes)));
      const int64_t blocks = plan.groups * plan.slices * plan.splits;
      SY_CHECK_INPUT(blocks < (int64_t(1) << 31), op, ": too many blocks for V=", vocab, " D=", width);
      embedding_backward_kernel<T><<<unsigned(blocks), kThreads, shared_bytes, cuda_stream>>>(
          tokens.as<int32_t>(), grad_out.as<T>(), rows, width, vocab, plan, accumulate, grad_token_table.as<float>(),
          partials);
      CUDA_CHECK_LAUNCH();
      if (plan.splits > 1) {
        const int64_t count = vocab * width;
        sum_splits_kernel<<<grid_for(count, kThreads, int64_t(multiprocessor_count()) * 16), kThreads, 0,
                            cuda_stream>>>(partials, plan.splits, count, accumulate, grad_token_table.as<float>());
        CUDA_CHECK_LAUNCH();
      }
    }
    if (grad_position_table && grad_position_table->dim(0) > 0) {
      const int64_t count = grad_position_table->dim(0) * width;
      position_backward_kernel<T>
          <<<grid_for(count, kThreads, int64_t(multiprocessor_count()) * 16), kThreads, 0, cuda_stream>>>(
              grad_out.as<T>(), rows / seq_len, seq_len, grad_position_table->dim(0), width, accumulate,
              grad_position_table->as<float>());
      CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace cuda
}  // namespace switchyard
