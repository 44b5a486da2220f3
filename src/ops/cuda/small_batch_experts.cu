// The small-batch expert path on CUDA (semantics: src/ops/small_batch_ops.h; reference:
// src/ops/cpu/small_batch_experts.cpp). For N = T*K <= 512 choices:
//
//   kernel 1 (expert_up):   block (u, b): u-th used expert e, W1 tiles b, b + B1, ...
//                           hidden[i, tile] = act(round(x[token(i)] W1[e][:, tile]))   for e's kept choices i
//   kernel 2 (expert_down): block (u, b): items (D tile, F split) b, b + B2, ...
//                           partial[s, i, tile] = hidden[i, split s] W2[e][split s, tile]   (fp32)
//                           the last arrival at a D tile: y[t, tile] = round(sum_j gate[t, j] *
//                           round(sum_s partial[s, t*K + j, tile]))   over kept j, in choice order
//
// Workspace (small_batch_geometry): int32 arrival counters [d_tiles] | hidden [N, F] (activation
// dtype) | partial fp32 [f_splits, N, D]. Rows of choices that are not kept are never written
// nor read. Kernel 1's block 0 zeroes the counters, so kernel 2 (next on the stream) finds them
// at zero whatever the workspace held; the kernels leave nothing to clean up.
//
// Memory-bound GEMV: a block streams a tile of 4 16-byte packs from every weight row in its range
// (64 row groups of 4 threads; each thread keeps 8 or 16 row loads in flight before using any) and
// multiplies it with up to 8 choices' rows staged in shared memory as fp32, accumulating in fp32
// registers [choice][8 columns]. The row groups are then summed (xor shuffles within a warp, then
// over the 8 warps in order), so results do not depend on timing. More than 8 choices of one
// expert are handled 8 at a time (the tile is re-read, from L2); with at most 8 the weights are
// read with evict-first loads since nothing reads them again.
//
// Which expert a block serves is found on the device: every block reads the T*K routing choices,
// marks the used experts in a 1024-bit set in shared memory and takes the u-th set bit; blocks
// with u >= the number of used experts exit. Grids are sized for min(E, N) used experts.
#include <type_traits>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/small_batch_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
// Two resident blocks per multiprocessor (<= 128 registers a thread): 16 warps' loads in flight.
constexpr int kMinBlocksPerMultiprocessor = 2;
constexpr int kWarps = kThreads / 32;
constexpr int kPackElems = int(kSmallBatchPackElements);  // 8 bf16 / f16 per 16-byte load
constexpr int kPacksPerRow = 4;                           // packs of one weight row in a tile
constexpr int kRowGroups = kThreads / kPacksPerRow;       // 64
constexpr int kGroup = 8;                                 // choices multiplied at once
constexpr int kStagedFloats = 4096;                       // operand values staged per round (16 KB)
// Weight rows a thread loads before using any: 16 for 1 or 2 choices (1024 rows a round, so a
// D <= 1024 tile costs one memory round trip), 8 for 4 or 8 choices, whose accumulators need the
// registers (128 a thread for two resident blocks; more spills).
template <int kCount>
constexpr int rows_in_flight() {
  return kCount >= 4 ? 8 : 16;
}
template <int kCount>
constexpr int chunk_rows() {
  return kRowGroups * rows_in_flight<kCount>();
}
static_assert(kGroup * chunk_rows<kGroup>() <= kStagedFloats && 4 * chunk_rows<4>() <= kStagedFloats,
              "a staging round fits the staged buffer");
constexpr int kTileColumns = kPacksPerRow * kPackElems;   // 32: kernel 2's D tile, kernel 1's gelu tile
constexpr int kBitmapWords = kSmallBatchMaxExperts / 32;
constexpr int kMaxChoices = int(kSmallBatchMaxChoices);
static_assert(kBitmapWords == 32, "one warp scans the used-expert set");
static_assert(kThreads / kTileColumns >= kGroup, "the epilogues give each (choice, column) one thread");

constexpr float kSqrtTwoOverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

// The expressions of src/ops/cuda/activation.cu (and the fused GEMM epilogue), so that this path
// rounds like the padded one.
__device__ __forceinline__ float fast_sigmoid(float z) { return __fdividef(1.0f, 1.0f + __expf(fminf(-z, 80.0f))); }

__device__ __forceinline__ float gelu_tanh(float x) {
  const float inner = kSqrtTwoOverPi * fmaf(kGeluCubic * x, x * x, x);
  return x * fast_sigmoid(2.0f * inner);
}

// What a value looks like after storage in T.
template <typename T>
__device__ __forceinline__ float round_to(float value) {
  return to_float(from_float<T>(value));
}

struct RoutingView {
  const int* expert_ids;  // [T, K]
  const int* slots;       // [T, K]
  const float* gates;     // [T, K]
  const int* scalars;     // [kNumRoutingScalars]
  int choices;            // N = T * K
  int k;
  int num_experts;
};

struct SharedState {
  int choice_expert[kMaxChoices];  // expert of each kept choice, -1 for empty and dropped ones
  int choices[kMaxChoices];        // the block expert's kept choices, ascending
  unsigned used_bitmap[kBitmapWords];
  int warp_counts[kWarps];
  int expert, used_experts;
  int last_arrival;
  float staged[kStagedFloats];                                 // operand rows of one round, fp32
  float reduced[kWarps * kGroup * kPackElems * kPacksPerRow];  // per-warp sums
};

// Finds the `used_index`-th used expert (ascending id) and lists its kept choices in ascending
// order (shared.expert, shared.choices[0, count)). Also fills shared.choice_expert and
// shared.used_experts. Returns false, uniformly over the block, when fewer experts are used.
__device__ bool find_expert(const RoutingView& routing, int used_index, SharedState& shared, int& count) {
  const int thread = threadIdx.x, lane = thread % 32, warp = thread / 32;
  if (thread < kBitmapWords) shared.used_bitmap[thread] = 0u;
  __syncthreads();
  const int capacity = routing.scalars[kCapacity];
  for (int index = thread; index < routing.choices; index += kThreads) {
    const int expert = routing.expert_ids[index], slot = routing.slots[index];
    // permute's rule; an id >= E cannot come from routing and is ignored rather than read past W.
    const bool kept = expert >= 0 && expert < routing.num_experts && slot >= 0 && slot < capacity;
    shared.choice_expert[index] = kept ? expert : -1;
    if (kept) atomicOr(&shared.used_bitmap[expert / 32], 1u << (expert % 32));
  }
  __syncthreads();
  if (warp == 0) {
    const unsigned word = shared.used_bitmap[lane];
    const int bits = __popc(word);
    int inclusive = bits;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int other = __shfl_up_sync(kFullWarpMask, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    const int exclusive = inclusive - bits;
    if (lane == 31) shared.used_experts = inclusive;
    if (used_index >= exclusive && used_index < inclusive)
      shared.expert = lane * 32 + int(__fns(word, 0u, used_index - exclusive + 1));
  }
  __syncthreads();
  if (used_index >= shared.used_experts) return false;
  const int expert = shared.expert;
  int listed = 0;
  for (int start = 0; start < routing.choices; start += kThreads) {
    const int index = start + thread;
    const bool match = index < routing.choices && shared.choice_expert[index] == expert;
    const unsigned ballot = __ballot_sync(kFullWarpMask, match);
    if (lane == 0) shared.warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int other = 0; other < kWarps; ++other) {
      const int counted = shared.warp_counts[other];
      before += other < warp ? counted : 0;
      total += counted;
    }
    if (match) shared.choices[listed + before + __popc(ballot & lanemask_lt())] = index;
    listed += total;
    __syncthreads();  // warp_counts is rewritten next round; choices complete after the last
  }
  count = listed;
  return true;
}

// Row of choice `index` of a multiplication's left operand: base + (index / divisor) * stride
// (kernel 1: x, one row per token; kernel 2: hidden, one row per choice).
template <typename T>
struct OperandRows {
  const T* base;
  int divisor;
  int64_t stride;
};

__device__ __forceinline__ int reduced_index(int warp, int choice, int element, int pack) {
  // pack fastest: the 4 lanes that publish a warp's sums write consecutive words (no conflicts).
  return ((warp * kGroup + choice) * kPackElems + element) * kPacksPerRow + pack;
}

// Sum over the block's row groups of the products for (choice, pack, element), warps in order.
__device__ __forceinline__ float reduced_sum(const SharedState& shared, int choice, int pack, int element) {
  float total = 0.0f;
#pragma unroll
  for (int warp = 0; warp < kWarps; ++warp) total += shared.reduced[reduced_index(warp, choice, element, pack)];
  return total;
}

// For the n <= kCount choices shared.choices[first, first + n):
//   sum over weight rows r in [row_begin, row_end) of operand(choice, r) * weights[r, pack columns]
// where this thread's pack starts at column pack_column of `weights` (row-major, row_stride
// elements per row; -1: the pack lies outside the matrix and contributes nothing). Leaves the
// per-warp sums in shared.reduced (read them with reduced_sum) after a block barrier.
template <typename T, int kCount>
__device__ void multiply_tile(const T* weights, int64_t row_stride, int64_t pack_column, int64_t row_begin,
                              int64_t row_end, const OperandRows<T>& operand, int first, int n, bool streaming,
                              SharedState& shared) {
  const int thread = threadIdx.x, lane = thread % 32, warp = thread / 32;
  const int row_group = thread / kPacksPerRow;
  float sums[kCount][kPackElems];
#pragma unroll
  for (int choice = 0; choice < kCount; ++choice)
#pragma unroll
    for (int element = 0; element < kPackElems; ++element) sums[choice][element] = 0.0f;

  constexpr int kRowsInFlight = rows_in_flight<kCount>(), kChunkRows = chunk_rows<kCount>();
  for (int64_t chunk = row_begin; chunk < row_end; chunk += kChunkRows) {
    // Weight loads first: they depend on nothing else, so their latency overlaps the staging.
    uint4 raw[kRowsInFlight];
#pragma unroll
    for (int step = 0; step < kRowsInFlight; ++step) {
      const int64_t row = chunk + row_group + int64_t(step) * kRowGroups;
      raw[step] = make_uint4(0u, 0u, 0u, 0u);
      if (pack_column >= 0 && row < row_end) {
        const uint4* address = reinterpret_cast<const uint4*>(weights + row * row_stride + pack_column);
        raw[step] = streaming ? __ldcs(address) : __ldg(address);
      }
    }
    __syncthreads();  // the previous round's readers of `staged` are done
    const int64_t rows_here = row_end - chunk < kChunkRows ? row_end - chunk : kChunkRows;
    for (int item = thread; item < kCount * kChunkRows; item += kThreads) {
      const int choice = item / kChunkRows, row = item % kChunkRows;
      float value = 0.0f;  // rows past the range and unused choice slots stay finite zeros
      if (choice < n && row < rows_here) {
        const int index = shared.choices[first + choice];
        value = to_float(operand.base[int64_t(index / operand.divisor) * operand.stride + chunk + row]);
      }
      shared.staged[choice * kChunkRows + row] = value;
    }
    __syncthreads();
#pragma unroll
    for (int step = 0; step < kRowsInFlight; ++step) {
      float weight[kPackElems];
      const T* elements = reinterpret_cast<const T*>(&raw[step]);
#pragma unroll
      for (int element = 0; element < kPackElems; ++element) weight[element] = to_float(elements[element]);
      const int row = row_group + step * kRowGroups;
#pragma unroll
      for (int choice = 0; choice < kCount; ++choice) {
        const float value = shared.staged[choice * kChunkRows + row];
#pragma unroll
        for (int element = 0; element < kPackElems; ++element)
          sums[choice][element] = fmaf(value, weight[element], sums[choice][element]);
      }
    }
  }

  // The 8 row groups of a warp hold lanes pack, pack + 4, ..., pack + 28.
#pragma unroll
  for (int choice = 0; choice < kCount; ++choice)
#pragma unroll
    for (int element = 0; element < kPackElems; ++element) {
      float value = sums[choice][element];
#pragma unroll
      for (int offset = kPacksPerRow; offset < 32; offset <<= 1)
        value += __shfl_xor_sync(kFullWarpMask, value, offset);
      sums[choice][element] = value;
    }
  if (lane < kPacksPerRow) {
#pragma unroll
    for (int choice = 0; choice < kCount; ++choice)
#pragma unroll
      for (int element = 0; element < kPackElems; ++element)
        shared.reduced[reduced_index(warp, choice, element, lane)] = sums[choice][element];
  }
  __syncthreads();
}

// multiply_tile with kCount the smallest of 1, 2, 4, 8 that holds n choices (fewer wasted FMAs).
template <typename T>
__device__ __forceinline__ void multiply_tile_for(int n, const T* weights, int64_t row_stride, int64_t pack_column,
                                                  int64_t row_begin, int64_t row_end, const OperandRows<T>& operand,
                                                  int first, bool streaming, SharedState& shared) {
  if (n <= 1)
    multiply_tile<T, 1>(weights, row_stride, pack_column, row_begin, row_end, operand, first, n, streaming, shared);
  else if (n <= 2)
    multiply_tile<T, 2>(weights, row_stride, pack_column, row_begin, row_end, operand, first, n, streaming, shared);
  else if (n <= 4)
    multiply_tile<T, 4>(weights, row_stride, pack_column, row_begin, row_end, operand, first, n, streaming, shared);
  else
    multiply_tile<T, 8>(weights, row_stride, pack_column, row_begin, row_end, operand, first, n, streaming, shared);
}

// ---- kernel 1: hidden = act(x W1) ----

struct UpArgs {
  const void* x;  // [T, D]
  const void* w1;  // [E, D, w1_columns]
  void* hidden;    // [N, F]
  RoutingView routing;
  int64_t d_model, d_ff, w1_columns;
  int tiles, blocks_per_expert;
  int* counters;  // kernel 2's arrival counters, zeroed here
  int counter_count;
};

template <typename T, ExpertActivation kActivation>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerMultiprocessor) expert_up_kernel(UpArgs args) {
  __shared__ SharedState shared;
  if (blockIdx.x == 0)
    for (int index = threadIdx.x; index < args.counter_count; index += kThreads) args.counters[index] = 0;
  const int used_index = int(blockIdx.x) / args.blocks_per_expert;
  const int block_in_expert = int(blockIdx.x) % args.blocks_per_expert;
  int count = 0;
  if (!find_expert(args.routing, used_index, shared, count)) return;

  constexpr bool kSwiglu = kActivation == ExpertActivation::swiglu;
  constexpr int kOutputColumns = kSwiglu ? kTileColumns / 2 : kTileColumns;  // swiglu: 2 gate + 2 up packs
  const int64_t d_model = args.d_model, d_ff = args.d_ff;
  const T* weights = static_cast<const T*>(args.w1) + int64_t(shared.expert) * d_model * args.w1_columns;
  T* hidden = static_cast<T*>(args.hidden);
  const OperandRows<T> operand{static_cast<const T*>(args.x), args.routing.k, d_model};
  const bool streaming = count <= kGroup;
  const int pack = threadIdx.x % kPacksPerRow;
  const int output_choice = threadIdx.x / kOutputColumns, output_column = threadIdx.x % kOutputColumns;

  for (int tile = block_in_expert; tile < args.tiles; tile += args.blocks_per_expert) {
    const int64_t column0 = int64_t(tile) * kOutputColumns;
    // Output column of this thread's pack; swiglu packs 0, 1 read gate columns, 2, 3 the up
    // columns F further on.
    const int64_t output_of_pack = column0 + int64_t(kSwiglu ? pack % 2 : pack) * kPackElems;
    const int64_t pack_column =
        output_of_pack >= d_ff ? -1 : (kSwiglu && pack >= 2 ? d_ff + output_of_pack : output_of_pack);
    for (int first = 0; first < count; first += kGroup) {
      const int n = count - first < kGroup ? count - first : kGroup;
      multiply_tile_for<T>(n, weights, args.w1_columns, pack_column, 0, d_model, operand, first, streaming, shared);
      const int64_t column = column0 + output_column;
      if (output_choice < n && column < d_ff) {
        const int element = output_column % kPackElems, pack_of_column = output_column / kPackElems;
        float value;
        if constexpr (kSwiglu) {
          const float gate = round_to<T>(reduced_sum(shared, output_choice, pack_of_column, element));
          const float up = round_to<T>(reduced_sum(shared, output_choice, pack_of_column + 2, element));
          value = gate * fast_sigmoid(gate) * up;
        } else {
          value = gelu_tanh(round_to<T>(reduced_sum(shared, output_choice, pack_of_column, element)));
        }
        hidden[int64_t(shared.choices[first + output_choice]) * d_ff + column] = from_float<T>(value);
      }
      __syncthreads();  // `reduced` is rewritten by the next group or tile
    }
  }
}

// ---- kernel 2: partial = hidden W2, then the combine of each finished D tile ----

struct DownArgs {
  const void* hidden;  // [N, F]
  const void* w2;      // [E, F, D]
  float* partial;      // [f_splits, N, D]
  void* y;             // [T, D]
  RoutingView routing;
  int64_t tokens, d_model, d_ff;
  int d_tiles, f_splits, split_rows, blocks_per_expert;
  int* counters;  // [d_tiles], zero at kernel start
};

// y[:, tile] for every token, once every used expert's every split has written its partials of
// the tile. Reads other blocks' partials through L2 (__ldcg): L1 is not coherent.
template <typename T>
__device__ void combine_tile(const DownArgs& args, const SharedState& shared, int d_tile) {
  const int64_t column0 = int64_t(d_tile) * kTileColumns, d_model = args.d_model;
  const int64_t split_plane = int64_t(args.routing.choices) * d_model;
  const int k = args.routing.k;
  T* y = static_cast<T*>(args.y);
  for (int64_t item = threadIdx.x; item < args.tokens * kTileColumns; item += kThreads) {
    const int64_t token = item / kTileColumns, column = column0 + item % kTileColumns;
    if (column >= d_model) continue;
    float sum = 0.0f;
    for (int choice = 0; choice < k; ++choice) {
      const int64_t index = token * k + choice;
      if (shared.choice_expert[index] < 0) continue;
      const float* partial = args.partial + index * d_model + column;
      float output = 0.0f;
      for (int split = 0; split < args.f_splits; ++split) output += __ldcg(partial + split * split_plane);
      sum = fmaf(args.routing.gates[index], round_to<T>(output), sum);  // as unpermute_combine
    }
    y[token * d_model + column] = from_float<T>(sum);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerMultiprocessor) expert_down_kernel(DownArgs args) {
  __shared__ SharedState shared;
  const int used_index = int(blockIdx.x) / args.blocks_per_expert;
  const int block_in_expert = int(blockIdx.x) % args.blocks_per_expert;
  int count = 0;
  if (!find_expert(args.routing, used_index, shared, count)) {
    if (shared.used_experts == 0 && blockIdx.x == 0) {  // no kept choice at all: y = 0
      T* y = static_cast<T*>(args.y);
      for (int64_t index = threadIdx.x; index < args.tokens * args.d_model; index += kThreads)
        y[index] = from_float<T>(0.0f);
    }
    return;
  }

  const int64_t d_model = args.d_model, d_ff = args.d_ff;
  const T* weights = static_cast<const T*>(args.w2) + int64_t(shared.expert) * d_ff * d_model;
  const OperandRows<T> operand{static_cast<const T*>(args.hidden), 1, d_ff};
  const bool streaming = count <= kGroup;
  const int pack = threadIdx.x % kPacksPerRow;
  const int output_choice = threadIdx.x / kTileColumns, output_column = threadIdx.x % kTileColumns;
  const int arrivals_per_tile = shared.used_experts * args.f_splits;
  const int items = args.d_tiles * args.f_splits;

  // Items split-major: blocks next to each other read neighbouring columns of the same W2 rows.
  for (int item = block_in_expert; item < items; item += args.blocks_per_expert) {
    const int d_tile = item % args.d_tiles, split = item / args.d_tiles;
    const int64_t column0 = int64_t(d_tile) * kTileColumns;
    const int64_t pack_column = column0 + pack * kPackElems < d_model ? column0 + pack * kPackElems : -1;
    const int64_t row_begin = int64_t(split) * args.split_rows;
    const int64_t row_end = row_begin + args.split_rows < d_ff ? row_begin + args.split_rows : d_ff;
    float* partial = args.partial + int64_t(split) * args.routing.choices * d_model;
    for (int first = 0; first < count; first += kGroup) {
      const int n = count - first < kGroup ? count - first : kGroup;
      multiply_tile_for<T>(n, weights, d_model, pack_column, row_begin, row_end, operand, first, streaming, shared);
      const int64_t column = column0 + output_column;
      if (output_choice < n && column < d_model)
        partial[int64_t(shared.choices[first + output_choice]) * d_model + column] =
            reduced_sum(shared, output_choice, output_column / kPackElems, output_column % kPackElems);
      __syncthreads();  // partials written; `reduced` free again
    }
    // Arrival at the tile (the pattern of grid_barrier: barrier, fence, atomic); the last one
    // combines. Its fence orders the partial reads after every arrival it has counted.
    if (threadIdx.x == 0) {
      __threadfence();
      const int arrived = atomicAdd(&args.counters[d_tile], 1);
      shared.last_arrival = arrived == arrivals_per_tile - 1;
      if (shared.last_arrival) __threadfence();
    }
    __syncthreads();
    if (shared.last_arrival) combine_tile<T>(args, shared, d_tile);
  }
}

// ---- host ----

template <typename T>
void launch(ExpertActivation activation, const SmallBatchGeometry& geometry, const UpArgs& up, const DownArgs& down,
            cudaStream_t stream) {
  const unsigned up_blocks = unsigned(geometry.expert_bound * geometry.w1_blocks_per_expert);
  if (activation == ExpertActivation::swiglu)
    expert_up_kernel<T, ExpertActivation::swiglu><<<up_blocks, kThreads, 0, stream>>>(up);
  else
    expert_up_kernel<T, ExpertActivation::gelu_tanh><<<up_blocks, kThreads, 0, stream>>>(up);
  CUDA_CHECK_LAUNCH();
  const unsigned down_blocks = unsigned(geometry.expert_bound * geometry.w2_blocks_per_expert);
  expert_down_kernel<T><<<down_blocks, kThreads, 0, stream>>>(down);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

namespace cuda {

void small_batch_experts(ExpertActivation activation, const Tensor& x, const RoutingResult& routing, const Tensor& w1,
                         const Tensor& w2, Tensor& workspace, Tensor& y, void* stream) {
  const char* op = "small_batch_experts";
  SY_CHECK(x.rank == 2 && (x.dtype == DType::bf16 || x.dtype == DType::f16), op,
           ": x must be a bf16 or fp16 [T, D] tensor, got ", x.describe());
  SY_CHECK(w1.rank == 3 && w2.rank == 3, op, ": w1 must be [E, D, F or 2F] and w2 [E, F, D], got ", w1.describe(),
           " and ", w2.describe());
  SY_CHECK(activation == ExpertActivation::gelu_tanh || activation == ExpertActivation::swiglu, op,
           ": unknown activation ", int(activation));
  const DType dtype = x.dtype;
  const int64_t tokens = x.dim(0), d_model = x.dim(1), num_experts = w1.dim(0), d_ff = w2.dim(1);
  const int64_t w1_columns = activation == ExpertActivation::swiglu ? 2 * d_ff : d_ff;
  SY_CHECK(routing.expert_ids.rank == 2, op, ": expert_ids must be [T, K], got ", routing.expert_ids.describe());
  const int64_t k = routing.expert_ids.dim(1);
  check_tensor(x, "small_batch_experts: x", dtype, {tokens, d_model});
  check_tensor(w1, "small_batch_experts: w1", dtype, {num_experts, d_model, w1_columns});
  check_tensor(w2, "small_batch_experts: w2", dtype, {num_experts, d_ff, d_model});
  check_tensor(y, "small_batch_experts: y", dtype, {tokens, d_model});
  check_tensor(routing.expert_ids, "small_batch_experts: expert_ids", DType::i32, {tokens, k});
  check_tensor(routing.slots, "small_batch_experts: slots", DType::i32, {tokens, k});
  check_tensor(routing.gates, "small_batch_experts: gates", DType::f32, {tokens, k});
  check_tensor(routing.scalars, "small_batch_experts: scalars", DType::i32, {kNumRoutingScalars});
  if (tokens == 0) return;
  SY_CHECK(small_batch_supported(dtype, tokens, int(k), int(num_experts), d_model, d_ff), op, ": ", tokens,
           " tokens, K = ", k, ", E = ", num_experts, ", D = ", d_model, ", F = ", d_ff, " in ", dtype_name(dtype),
           " is outside what the CUDA version takes (src/ops/small_batch_ops.h: T*K <= ", kSmallBatchMaxChoices,
           ", E <= ", kSmallBatchMaxExperts, ", D and F multiples of 8)");
  const SmallBatchGeometry geometry = small_batch_geometry(tokens, int(k), int(num_experts), d_model, d_ff, activation,
                                                           dtype_size(dtype));
  SY_CHECK(workspace.device == DeviceKind::cuda && workspace.data != nullptr &&
               workspace.bytes() >= geometry.workspace_bytes,
           op, ": workspace ", workspace.describe(), " must hold ", geometry.workspace_bytes, " bytes on cuda");
  SY_CHECK(is_aligned(w1.data, 16) && is_aligned(w2.data, 16) && is_aligned(workspace.data, 16), op,
           ": w1, w2 and the workspace must be 16-byte aligned");

  char* base = static_cast<char*>(workspace.data);
  const RoutingView view{routing.expert_ids.as<int>(), routing.slots.as<int>(), routing.gates.as<float>(),
                         routing.scalars.as<int>(),    int(tokens * k),          int(k),
                         int(num_experts)};
  int* counters = reinterpret_cast<int*>(base + geometry.counters_offset);
  void* hidden = base + geometry.hidden_offset;

  UpArgs up{};
  up.x = x.data;
  up.w1 = w1.data;
  up.hidden = hidden;
  up.routing = view;
  up.d_model = d_model;
  up.d_ff = d_ff;
  up.w1_columns = w1_columns;
  up.tiles = int(geometry.w1_tiles);
  up.blocks_per_expert = int(geometry.w1_blocks_per_expert);
  up.counters = counters;
  up.counter_count = int(geometry.d_tiles);

  DownArgs down{};
  down.hidden = hidden;
  down.w2 = w2.data;
  down.partial = reinterpret_cast<float*>(base + geometry.partial_offset);
  down.y = y.data;
  down.routing = view;
  down.tokens = tokens;
  down.d_model = d_model;
  down.d_ff = d_ff;
  down.d_tiles = int(geometry.d_tiles);
  down.f_splits = int(geometry.f_splits);
  down.split_rows = int(geometry.split_rows);
  down.blocks_per_expert = int(geometry.w2_blocks_per_expert);
  down.counters = counters;

  cudaStream_t cuda_stream = as_stream(stream);
  if (dtype == DType::bf16)
    launch<__nv_bfloat16>(activation, geometry, up, down, cuda_stream);
  else
    launch<__half>(activation, geometry, up, down, cuda_stream);
}

}  // namespace cuda
}  // namespace switchyard
