// Expert-parallel row moves on CUDA (semantics: src/ops/ep_ops.h; reference: src/ops/cpu/ep_permute.cpp).
//
// ep_send_counts: one thread per expert.
// ep_receive_layout: one block. The layout is O(P*L) integers (P ranks x L local experts, a few
//   thousand at most), so one block of scans beats a multi-kernel scan: threads own sources for
//   the source-major packed prefix and experts for the per-expert totals and row starts; the two
//   short prefix sums over P and over L run on one thread in shared memory, in int64 so an
//   overflow cannot wrap silently (values are then stored as int32, as src/ops/moe_ops.h does).
// ep_to_expert_layout / ep_from_expert_layout: one warp per padded row r of the experts' range,
//   grid-stride. The warp finds r's expert l (binary search over expert_offsets), its index
//   i = r - expert_offsets[l] (segment padding when i >= totals[l]), then the source rank p (the
//   last p with segment_rows[p, l] <= r; empty segments share their start with the next one, so
//   "last" picks the segment that holds r) and copies the row packed_starts[p*L + l] + r -
//   segment_rows[p, l] <-> r in 16/4/2/1-byte units, whichever the row width and pointers allow.
//   Every output row is written by exactly one warp; no atomics, results are exact copies.
#include <algorithm>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/ep_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kLayoutThreads = 512;

__global__ void send_counts_kernel(const int* offsets, int experts, int* counts) {
  const int expert = blockIdx.x * blockDim.x + threadIdx.x;
  if (expert < experts) counts[expert] = offsets[expert + 1] - offsets[expert];
}

struct LayoutArgs {
  const int* recv_counts;
  int* packed_starts;
  int* expert_totals;
  int* expert_offsets;
  int* segment_rows;
  int* chunk_offsets;
  int ranks, experts, chunks, alignment;
};

__global__ void __launch_bounds__(kLayoutThreads) receive_layout_kernel(LayoutArgs args) {
  extern __shared__ long long shared[];
  long long* source_starts = shared;              // [P + 1]
  long long* expert_starts = shared + args.ranks + 1;  // [L + 1]
  const int ranks = args.ranks, experts = args.experts;

  // Per source: its rows (prefix within the source written now, the source's start added below).
  for (int rank = threadIdx.x; rank < ranks; rank += blockDim.x) {
    long long running = 0;
    for (int expert = 0; expert < experts; ++expert) {
      args.packed_starts[rank * experts + expert] = int(running);
      running += args.recv_counts[rank * experts + expert];
    }
    source_starts[rank + 1] = running;
  }
  // Per expert: its total over sources, padded to the alignment.
  for (int expert = threadIdx.x; expert < experts; expert += blockDim.x) {
    long long total = 0;
    for (int rank = 0; rank < ranks; ++rank) total += args.recv_counts[rank * experts + expert];
    args.expert_totals[expert] = int(total);
    expert_starts[expert + 1] = (total + args.alignment - 1) / args.alignment * args.alignment;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    source_starts[0] = 0;
    for (int rank = 0; rank < ranks; ++rank) source_starts[rank + 1] += source_starts[rank];
    expert_starts[0] = 0;
    for (int expert = 0; expert < experts; ++expert) expert_starts[expert + 1] += expert_starts[expert];
    args.packed_starts[ranks * experts] = int(source_starts[ranks]);
  }
  __syncthreads();
  for (int segment = threadIdx.x; segment < ranks * experts; segment += blockDim.x)
    args.packed_starts[segment] += int(source_starts[segment / experts]);
  for (int expert = threadIdx.x; expert <= experts; expert += blockDim.x)
    args.expert_offsets[expert] = int(expert_starts[expert]);
  for (int expert = threadIdx.x; expert < experts; expert += blockDim.x) {
    long long row = expert_starts[expert];
    for (int rank = 0; rank < ranks; ++rank) {
      args.segment_rows[rank * experts + expert] = int(row);
      row += args.recv_counts[rank * experts + expert];
    }
  }
  for (int chunk = threadIdx.x; chunk < args.chunks; chunk += blockDim.x) {
    const int first = int((long long)chunk * experts / args.chunks);
    const int end = int((long long)(chunk + 1) * experts / args.chunks);
    for (int expert = first; expert <= end; ++expert)
      args.chunk_offsets[expert + chunk] = int(expert_starts[expert] - expert_starts[first]);
  }
}

struct MoveArgs {
  const void* source;
  void* destination;
  const int* packed_starts;
  const int* expert_totals;
  const int* expert_offsets;
  const int* segment_rows;
  int ranks, experts, first_expert, end_expert;
  int64_t row_units;
  int64_t packed_rows, padded_rows;  // extents of the tensors: never read or write past them
};

// Last index in [low, high) whose value (base[index * stride]) is <= target; `low` if none.
__device__ __forceinline__ int last_at_most(const int* base, int stride, int low, int high, int64_t target) {
  while (high - low > 1) {
    const int middle = low + (high - low) / 2;
    if (base[int64_t(middle) * stride] <= target) low = middle;
    else high = middle;
  }
  return low;
}

// kToPadded: packed -> padded (padding rows zeroed); otherwise padded -> packed (data rows only).
template <typename Unit, bool kToPadded>
__global__ void __launch_bounds__(kThreads) move_rows_kernel(MoveArgs args) {
  const int lane = threadIdx.x % 32;
  const int64_t begin = args.expert_offsets[args.first_expert], end = args.expert_offsets[args.end_expert];
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = begin + int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; row < end; row += warps) {
    if (row >= args.padded_rows) break;  // the host checks sizes it knows; never write out of bounds
    const int expert = last_at_most(args.expert_offsets, 1, args.first_expert, args.end_expert, row);
    const bool padding = row - args.expert_offsets[expert] >= args.expert_totals[expert];
    int64_t packed_row = -1;
    if (!padding) {
      const int rank = last_at_most(args.segment_rows + expert, args.experts, 0, args.ranks, row);
      const int segment = rank * args.experts + expert;
      packed_row = int64_t(args.packed_starts[segment]) + (row - args.segment_rows[segment]);
      if (packed_row >= args.packed_rows) continue;
    }
    if constexpr (kToPadded) {
      Unit* out = static_cast<Unit*>(args.destination) + row * args.row_units;
      if (padding) {
        for (int64_t unit = lane; unit < args.row_units; unit += 32) out[unit] = Unit{};
      } else {
        const Unit* in = static_cast<const Unit*>(args.source) + packed_row * args.row_units;
        for (int64_t unit = lane; unit < args.row_units; unit += 32) out[unit] = in[unit];
      }
    } else {
      if (padding) continue;
      const Unit* in = static_cast<const Unit*>(args.source) + row * args.row_units;
      Unit* out = static_cast<Unit*>(args.destination) + packed_row * args.row_units;
      for (int64_t unit = lane; unit < args.row_units; unit += 32) out[unit] = in[unit];
    }
  }
}

void check_layout(const EpReceiveLayout& layout) {
  validate_ep_receive_layout(layout, DeviceKind::cuda);
  // Shared memory of the layout kernel: (P + 1 + L + 1) int64.
  SY_CHECK_INPUT(int64_t(layout.num_ranks) + layout.local_experts + 2 <= 6000,
                 "ep layout: ", layout.num_ranks, " ranks x ", layout.local_experts,
                 " local experts exceed the one-block layout kernel");
}

template <bool kToPadded>
void move_rows(const char* op, const Tensor& packed, const Tensor& padded, const EpReceiveLayout& layout,
               int first_expert, int end_expert, int64_t expected_rows, void* stream) {
  check_layout(layout);
  SY_CHECK(first_expert >= 0 && first_expert <= end_expert && end_expert <= layout.local_experts, op,
           ": expert range [", first_expert, ", ", end_expert, ") is not within [0, ", layout.local_experts, ")");
  SY_CHECK_INPUT(packed.rank == 2 && padded.rank == 2 && packed.dtype == padded.dtype && packed.dim(1) == padded.dim(1),
                 op, ": packed and padded must be [N, D] and [R, D] of one dtype, got ", packed.describe(), " and ",
                 padded.describe());
  check_tensor(packed, op, packed.dtype, {-1, -1});
  check_tensor(padded, op, padded.dtype, {-1, -1});
  if (first_expert == end_expert || packed.dim(1) == 0) return;

  MoveArgs args{};
  args.source = kToPadded ? packed.data : padded.data;
  args.destination = kToPadded ? padded.data : packed.data;
  args.packed_starts = layout.packed_starts.as<int>();
  args.expert_totals = layout.expert_totals.as<int>();
  args.expert_offsets = layout.expert_offsets.as<int>();
  args.segment_rows = layout.segment_rows.as<int>();
  args.ranks = layout.num_ranks;
  args.experts = layout.local_experts;
  args.first_expert = first_expert;
  args.end_expert = end_expert;
  args.packed_rows = packed.dim(0);
  args.padded_rows = padded.dim(0);

  const size_t row_bytes = size_t(packed.dim(1)) * dtype_size(packed.dtype);
  const unsigned blocks = grid_for(std::max<int64_t>(expected_rows, 1), kWarpsPerBlock,
                                   int64_t(multiprocessor_count()) * 32);
  cudaStream_t cuda_stream = as_stream(stream);
  auto fits = [&](size_t unit) {
    return row_bytes % unit == 0 && is_aligned(packed.data, unit) && is_aligned(padded.data, unit);
  };
  if (fits(16)) {
    args.row_units = int64_t(row_bytes / 16);
    move_rows_kernel<uint4, kToPadded><<<blocks, kThreads, 0, cuda_stream>>>(args);
  } else if (fits(4)) {
    args.row_units = int64_t(row_bytes / 4);
    move_rows_kernel<unsigned, kToPadded><<<blocks, kThreads, 0, cuda_stream>>>(args);
  } else if (fits(2)) {
    args.row_units = int64_t(row_bytes / 2);
    move_rows_kernel<unsigned short, kToPadded><<<blocks, kThreads, 0, cuda_stream>>>(args);
  } else {
    args.row_units = int64_t(row_bytes);
    move_rows_kernel<unsigned char, kToPadded><<<blocks, kThreads, 0, cuda_stream>>>(args);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace

namespace cuda {

void ep_send_counts(const Tensor& expert_offsets, Tensor& send_counts, void* stream) {
  SY_CHECK_INPUT(send_counts.rank == 1, "ep_send_counts: send_counts must be i32[E], got ", send_counts.describe());
  const int64_t experts = send_counts.dim(0);
  check_tensor(expert_offsets, "ep_send_counts: expert_offsets", DType::i32, {experts + 1});
  check_tensor(send_counts, "ep_send_counts: send_counts", DType::i32, {experts});
  if (experts == 0) return;
  const int threads = 256;
  send_counts_kernel<<<unsigned((experts + threads - 1) / threads), threads, 0, as_stream(stream)>>>(
      expert_offsets.as<int>(), int(experts), send_counts.as<int>());
  CUDA_CHECK_LAUNCH();
}

void ep_receive_layout(EpReceiveLayout& layout, void* stream) {
  check_layout(layout);
  LayoutArgs args{};
  args.recv_counts = layout.recv_counts.as<int>();
  args.packed_starts = layout.packed_starts.as<int>();
  args.expert_totals = layout.expert_totals.as<int>();
  args.expert_offsets = layout.expert_offsets.as<int>();
  args.segment_rows = layout.segment_rows.as<int>();
  args.chunk_offsets = layout.chunk_offsets.as<int>();
  args.ranks = layout.num_ranks;
  args.experts = layout.local_experts;
  args.chunks = layout.chunks;
  args.alignment = layout.alignment;
  const size_t shared_bytes = size_t(layout.num_ranks + layout.local_experts + 2) * sizeof(long long);
  receive_layout_kernel<<<1, kLayoutThreads, shared_bytes, as_stream(stream)>>>(args);
  CUDA_CHECK_LAUNCH();
}

void ep_to_expert_layout(const Tensor& packed, const EpReceiveLayout& layout, int first_expert, int end_expert,
                         int64_t expected_rows, Tensor& padded, void* stream) {
  move_rows<true>("ep_to_expert_layout", packed, padded, layout, first_expert, end_expert, expected_rows, stream);
}

void ep_from_expert_layout(const Tensor& padded, const EpReceiveLayout& layout, int first_expert, int end_expert,
                           int64_t expected_rows, Tensor& packed, void* stream) {
  move_rows<false>("ep_from_expert_layout", packed, padded, layout, first_expert, end_expert, expected_rows, stream);
}

}  // namespace cuda
}  // namespace switchyard
