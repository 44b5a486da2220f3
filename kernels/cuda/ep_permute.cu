// Expert-parallel layout ops on CUDA (semantics: kernels/ep_ops.h; reference: kernels/cpu/ep_permute.cpp).
//
// ep_send_counts: one thread per expert.
// ep_receive_layout: one block. The layout is O(P*L) integers (P ranks x L local experts, a few
//   thousand at most), so one block beats a multi-kernel scan: threads own experts for the totals
//   over sources, then one thread runs the short prefix sum over L in shared memory, in int64 so
//   an overflow cannot wrap silently (values are then stored as int32, as kernels/moe_ops.h does).
// ep_zero_padding: grid (expert, slice). Expert l's padding rows [offsets[l] + totals[l],
//   offsets[l+1]) are one contiguous byte run, fewer than A rows long; the blocks of l zero it with
//   16/4/2/1-byte stores, whichever the row width and pointer allow. No other row is touched.
#include <algorithm>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/ep_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kLayoutThreads = 512;
constexpr int kZeroThreads = 256;
constexpr int64_t kMaxSlicesPerExpert = 64;

__global__ void send_counts_kernel(const int* offsets, int experts, int* counts) {
  const int expert = blockIdx.x * blockDim.x + threadIdx.x;
  if (expert < experts) counts[expert] = offsets[expert + 1] - offsets[expert];
}

struct LayoutArgs {
  const int* recv_counts;
  int* expert_totals;
  int* expert_offsets;
  int* chunk_offsets;
  int ranks, experts, chunks, alignment;
};

__global__ void __launch_bounds__(kLayoutThreads) receive_layout_kernel(LayoutArgs args) {
  extern __shared__ long long expert_starts[];  // [L + 1]
  const int ranks = args.ranks, experts = args.experts;
  // Per expert: its total over sources, padded to the alignment.
  for (int expert = threadIdx.x; expert < experts; expert += blockDim.x) {
    long long total = 0;
    for (int rank = 0; rank < ranks; ++rank) total += args.recv_counts[rank * experts + expert];
    args.expert_totals[expert] = int(total);
    expert_starts[expert + 1] = (total + args.alignment - 1) / args.alignment * args.alignment;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    expert_starts[0] = 0;
    for (int expert = 0; expert < experts; ++expert) expert_starts[expert + 1] += expert_starts[expert];
  }
  __syncthreads();
  for (int expert = threadIdx.x; expert <= experts; expert += blockDim.x)
    args.expert_offsets[expert] = int(expert_starts[expert]);
  for (int chunk = threadIdx.x; chunk < args.chunks; chunk += blockDim.x) {
    const int first = int((long long)chunk * experts / args.chunks);
    const int end = int((long long)(chunk + 1) * experts / args.chunks);
    for (int expert = first; expert <= end; ++expert)
      args.chunk_offsets[expert + chunk] = int(expert_starts[expert] - expert_starts[first]);
  }
}

struct ZeroArgs {
  void* padded;
  const int* expert_totals;
  const int* expert_offsets;
  int first_expert;
  int64_t row_units;    // row width in units of the store type
  int64_t padded_rows;  // the tensor's extent: never write past it
};

template <typename Unit>
__global__ void __launch_bounds__(kZeroThreads) zero_padding_kernel(ZeroArgs args) {
  const int expert = args.first_expert + int(blockIdx.x);
  const int64_t first_row = int64_t(args.expert_offsets[expert]) + args.expert_totals[expert];
  const int64_t end_row = min(int64_t(args.expert_offsets[expert + 1]), args.padded_rows);
  if (end_row <= first_row) return;
  Unit* base = static_cast<Unit*>(args.padded) + first_row * args.row_units;
  const int64_t units = (end_row - first_row) * args.row_units;
  const int64_t stride = int64_t(gridDim.y) * kZeroThreads;
  for (int64_t unit = int64_t(blockIdx.y) * kZeroThreads + threadIdx.x; unit < units; unit += stride)
    base[unit] = Unit{};
}

void check_layout(const EpReceiveLayout& layout) {
  validate_ep_receive_layout(layout, DeviceKind::cuda);
  // Shared memory of the layout kernel: (L + 1) int64.
  SY_CHECK_INPUT(int64_t(layout.local_experts) + 1 <= 6000, "ep layout: ", layout.local_experts,
                 " local experts exceed the one-block layout kernel");
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
  args.expert_totals = layout.expert_totals.as<int>();
  args.expert_offsets = layout.expert_offsets.as<int>();
  args.chunk_offsets = layout.chunk_offsets.as<int>();
  args.ranks = layout.num_ranks;
  args.experts = layout.local_experts;
  args.chunks = layout.chunks;
  args.alignment = layout.alignment;
  const size_t shared_bytes = size_t(layout.local_experts + 1) * sizeof(long long);
  receive_layout_kernel<<<1, kLayoutThreads, shared_bytes, as_stream(stream)>>>(args);
  CUDA_CHECK_LAUNCH();
}

void ep_zero_padding(const EpReceiveLayout& layout, int first_expert, int end_expert, Tensor& padded, void* stream) {
  check_layout(layout);
  SY_CHECK(first_expert >= 0 && first_expert <= end_expert && end_expert <= layout.local_experts,
           "ep_zero_padding: expert range [", first_expert, ", ", end_expert, ") is not within [0, ",
           layout.local_experts, ")");
  check_tensor(padded, "ep_zero_padding: padded", padded.dtype, {-1, -1});
  const size_t row_bytes = size_t(padded.dim(1)) * dtype_size(padded.dtype);
  // Alignment 1 leaves no padding; an empty range or zero-width rows leave nothing to write.
  if (layout.alignment == 1 || first_expert == end_expert || row_bytes == 0 || padded.dim(0) == 0) return;

  ZeroArgs args{};
  args.padded = padded.data;
  args.expert_totals = layout.expert_totals.as<int>();
  args.expert_offsets = layout.expert_offsets.as<int>();
  args.first_expert = first_expert;
  args.padded_rows = padded.dim(0);
  const size_t unit = row_bytes % 16 == 0 && is_aligned(padded.data, 16) ? 16
                      : row_bytes % 4 == 0 && is_aligned(padded.data, 4) ? 4
                      : row_bytes % 2 == 0 && is_aligned(padded.data, 2) ? 2
                                                                          : 1;
  args.row_units = int64_t(row_bytes / unit);
  // At most A - 1 padding rows per expert: enough slices to cover them in one pass.
  const int64_t max_units = int64_t(layout.alignment - 1) * args.row_units;
  const dim3 grid(unsigned(end_expert - first_expert),
                  unsigned(std::clamp<int64_t>((max_units + kZeroThreads - 1) / kZeroThreads, 1, kMaxSlicesPerExpert)));
  cudaStream_t cuda_stream = as_stream(stream);
  switch (unit) {
    case 16: zero_padding_kernel<uint4><<<grid, kZeroThreads, 0, cuda_stream>>>(args); break;
    case 4: zero_padding_kernel<unsigned><<<grid, kZeroThreads, 0, cuda_stream>>>(args); break;
    case 2: zero_padding_kernel<unsigned short><<<grid, kZeroThreads, 0, cuda_stream>>>(args); break;
    default: zero_padding_kernel<unsigned char><<<grid, kZeroThreads, 0, cuda_stream>>>(args); break;
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
