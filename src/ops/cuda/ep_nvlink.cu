// Direct peer row moves on CUDA (semantics: src/ops/ep_nvlink_ops.h; reference:
// src/ops/cpu/ep_nvlink.cpp).
//
// Grids: at most EpPeerRows::max_blocks blocks when it is > 0 (parallel.ep_sm_budget); the row
//   moves and the pull-combine stride over their rows or tokens.
// ep_push_rows / ep_pull_rows: one warp per packed row, grid-stride from the rows of peer rank+1,
//   wrapping (no incast). The warp finds the row's global expert e (binary search over
//   packed_offsets, E + 1 ints, L1-resident), the peer p = e / L and the destination row, and
//   copies the row in 16-byte units where the row width and pointers allow (4- or 2-byte
//   otherwise). Peer memory is mapped (cudaIpcOpenMemHandle), so the stores (push) or loads (pull)
//   of peer rows go over NVLink; a warp moves 512 bytes per instruction and enough warps are
//   resident to keep the links busy.
//   Push then signals: every thread fences at system scope, then one thread per block takes a
//   ticket; the last block resets the counter and adds 1 to board_p[kind][r] of every peer p
//   (the textbook "last block" pattern: a peer that sees the count sees all rows).
// ep_signal_peers: one thread per peer, a system fence then the same add; it follows work that
//   finished earlier on the stream (kernel boundaries order it after that work's writes).
// ep_wait_signals: one warp, a lane per source, spinning on acquire loads with a %globaltimer
//   timeout; on timeout the first lane to fail records itself in host-mapped memory and traps.
// ep_zero_padding_rows: a few blocks per local expert over its padding rows.
// ep_all_gather_counts: one block; every rank's counts into every rank's [P][E] table.
#include <algorithm>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/ep_nvlink_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kUnroll = 4;  // units per lane in flight (16-byte units: 2 KB per warp)

__device__ __forceinline__ void add_signal(unsigned long long* counter) {
  asm volatile("red.release.sys.global.add.u64 [%0], 1;" ::"l"(counter) : "memory");
}

__device__ __forceinline__ unsigned long long load_acquire(const unsigned long long* counter) {
  unsigned long long value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(counter) : "memory");
  return value;
}

__device__ __forceinline__ unsigned long long global_nanoseconds() {
  unsigned long long value;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(value));
  return value;
}

// The last e with packed_offsets[e] <= row (empty segments share their start with the next).
__device__ __forceinline__ int expert_of_row(const int32_t* offsets, int experts, int64_t row) {
  int low = 0, high = experts - 1;
  while (low < high) {
    const int middle = (low + high + 1) / 2;
    if (offsets[middle] <= row) low = middle;
    else high = middle - 1;
  }
  return low;
}

struct MoveArgs {
  char* packed;
  int64_t rows, row_units;
  EpPeerRows peers;
  EpSignalBoards signal;
  int signal_kind;
  unsigned* block_counter;  // push: last-block detection (zero between calls)
};

template <typename Unit, bool kPush>
__global__ void __launch_bounds__(kThreads) move_rows_kernel(MoveArgs args) {
  const int lane = threadIdx.x & 31;
  const int experts = args.peers.num_ranks * args.peers.local_experts;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  // Packed rows are grouped by peer (0, 1, ..., P-1). Walking them from row 0 on every rank would
  // send all ranks' first rows to peer 0 at once (incast: one GPU's NVLink ingress shared by P-1
  // senders, the others idle). Start at peer rank+1 instead and wrap, as NCCL orders its peers, so
  // at any moment each GPU sends to one peer and receives from one; the local rows go last.
  const int first_peer = (args.peers.rank + 1) % args.peers.num_ranks;
  const int64_t rotation = args.rows > 0 ? args.peers.packed_offsets[first_peer * args.peers.local_experts] : 0;
  for (int64_t step = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; step < args.rows; step += warps) {
    const int64_t row = step + rotation < args.rows ? step + rotation : step + rotation - args.rows;
    const int expert = expert_of_row(args.peers.packed_offsets, experts, row);
    const int peer = expert / args.peers.local_experts;
    const int64_t remote_row = int64_t(args.peers.peer_rows[expert]) + row - args.peers.packed_offsets[expert];
    Unit* local = reinterpret_cast<Unit*>(args.packed) + row * args.row_units;
    Unit* remote = static_cast<Unit*>(args.peers.peer_bases[peer]) + remote_row * args.row_units;
    const Unit* from = kPush ? local : remote;
    Unit* to = kPush ? remote : local;
    // kUnroll loads in flight per lane before the stores: peer memory is far (NVLink latency).
    for (int64_t base = 0; base < args.row_units; base += 32 * kUnroll) {
      Unit values[kUnroll];
#pragma unroll
      for (int step = 0; step < kUnroll; ++step) {
        const int64_t unit = base + step * 32 + lane;
        if (unit < args.row_units) values[step] = from[unit];
      }
#pragma unroll
      for (int step = 0; step < kUnroll; ++step) {
        const int64_t unit = base + step * 32 + lane;
        if (unit < args.row_units) to[unit] = values[step];
      }
    }
  }
  if (!kPush) return;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned ticket = atomicAdd(args.block_counter, 1u);
    if (ticket == gridDim.x - 1) {
      *args.block_counter = 0;  // the next call starts from zero (kernels on one stream run in order)
      __threadfence_system();
      const int ranks = args.signal.num_ranks;
      for (int peer = 0; peer < ranks; ++peer)
        add_signal(args.signal.boards[peer] + size_t(args.signal_kind) * ranks + args.signal.rank);
    }
  }
}

__global__ void signal_peers_kernel(EpSignalBoards signal, int kind) {
  const int peer = threadIdx.x;
  if (peer >= signal.num_ranks) return;
  __threadfence_system();
  add_signal(signal.boards[peer] + size_t(kind) * signal.num_ranks + signal.rank);
}

// Rank r's send counts (differences of its packed offsets) into row r of every rank's [P][E]
// table, then a signal: computing the counts here saves a kernel before the host's one sync.
__global__ void all_gather_counts_kernel(const int32_t* packed_offsets, int64_t segments, void* const* peer_bases,
                                         EpSignalBoards signal, int kind) {
  const int ranks = signal.num_ranks;
  for (int64_t index = threadIdx.x; index < int64_t(ranks) * segments; index += blockDim.x) {
    const int peer = int(index / segments);
    const int64_t segment = index % segments;
    static_cast<int32_t*>(peer_bases[peer])[int64_t(signal.rank) * segments + segment] =
        packed_offsets[segment + 1] - packed_offsets[segment];
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < ranks) add_signal(signal.boards[threadIdx.x] + size_t(kind) * ranks + signal.rank);
}

template <bool kSignalFirst>
__global__ void wait_signals_kernel(EpSignalBoards signal, int kind, unsigned long long expected, long long timeout_ns,
                                    EpWaitFailure* failure) {
  const int ranks = signal.num_ranks;
  if (kSignalFirst) {
    __threadfence_system();
    for (int peer = threadIdx.x; peer < ranks; peer += blockDim.x)
      add_signal(signal.boards[peer] + size_t(kind) * ranks + signal.rank);
  }
  const unsigned long long* board = signal.boards[signal.rank] + size_t(kind) * ranks;
  const unsigned long long start = global_nanoseconds();
  for (int source = threadIdx.x; source < ranks; source += blockDim.x) {
    unsigned long long seen = load_acquire(board + source);
    while (seen < expected) {
      if (timeout_ns > 0 && (long long)(global_nanoseconds() - start) > timeout_ns) {
        if (atomicCAS(&failure->failed, 0, 1) == 0) {
          failure->kind = kind;
          failure->source = source;
          failure->rank = signal.rank;
          failure->expected = expected;
          failure->seen = seen;
          __threadfence_system();
        }
        __trap();
      }
      __nanosleep(200);
      seen = load_acquire(board + source);
    }
  }
}

// Grid (L, kZeroBlocksPerExpert): the blocks of one expert stride its padding rows together.
constexpr int kZeroBlocksPerExpert = 8;

template <typename Unit>
__global__ void __launch_bounds__(kThreads) zero_padding_kernel(Unit* padded, int64_t row_units,
                                                                 const int32_t* expert_offsets,
                                                                 const int32_t* expert_totals) {
  const int expert = blockIdx.x;
  const int64_t first = (int64_t(expert_offsets[expert]) + expert_totals[expert]) * row_units;
  const int64_t end = int64_t(expert_offsets[expert + 1]) * row_units;
  for (int64_t unit = first + blockIdx.y * int64_t(kThreads) + threadIdx.x; unit < end;
       unit += int64_t(gridDim.y) * kThreads)
    padded[unit] = Unit{};
}

// One warp per token; lane j < k finds its choice's peer row, the warp shares the addresses, and
// weighted_row_gather (cuda_common.cuh) issues all of a lane's peer loads before it uses any
// (kChoices = K rounded up to 1, 2, 4 or 8: the register arrays are sized by it).
constexpr int kMaxChoices = kMaxTopK;  // src/ops/moe_ops.h

// One token's sum, by one warp.
template <typename T, int kElems, int kChoices>
__device__ __forceinline__ void pull_combine_token(const EpPeerRows& peers, int64_t rows, const int32_t* choice_rows,
                                                   const float* gates, int k_max, int64_t width, T* tokens_out, T* keep,
                                                   int experts, int lane, int64_t token) {
  int row = -1;
  const T* remote = nullptr;
  float weight = 1.0f;
  if (lane < k_max) {
    row = choice_rows[token * k_max + lane];
    if (row >= rows) row = -1;  // never read out of bounds
    if (row >= 0) {
      const int expert = expert_of_row(peers.packed_offsets, experts, row);
      const int peer = expert / peers.local_experts;
      const int64_t remote_row = int64_t(peers.peer_rows[expert]) + row - peers.packed_offsets[expert];
      remote = static_cast<const T*>(peers.peer_bases[peer]) + remote_row * width;
      if (gates) weight = gates[token * k_max + lane];
    }
  }
  int rows_of[kChoices];
  const T* remote_of[kChoices];
  float weight_of[kChoices];
#pragma unroll
  for (int choice = 0; choice < kChoices; ++choice) {
    rows_of[choice] = __shfl_sync(kFullWarpMask, row, choice);
    remote_of[choice] = reinterpret_cast<const T*>(
        __shfl_sync(kFullWarpMask, reinterpret_cast<unsigned long long>(remote), choice));
    weight_of[choice] = __shfl_sync(kFullWarpMask, weight, choice);
  }
  // As unpermute_combine sums (src/ops/cuda/permute.cu), the rows read from the peers.
  weighted_row_gather<T, kElems, kChoices>(remote_of, weight_of, width, tokens_out + token * width, keep, rows_of);
}

template <typename T, int kElems, int kChoices>
__global__ void __launch_bounds__(kThreads)
    pull_combine_kernel(EpPeerRows peers, int64_t rows, const int32_t* choice_rows, const float* gates,
                        int64_t num_tokens, int k_max, int64_t width, T* tokens_out, T* keep) {
  const int lane = threadIdx.x & 31;
  const int experts = peers.num_ranks * peers.local_experts;
  // Grid-stride over tokens (a warp each): the grid may be capped (EpPeerRows::max_blocks).
  for (int64_t token = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; token < num_tokens;
       token += int64_t(gridDim.x) * kWarpsPerBlock) {
    pull_combine_token<T, kElems, kChoices>(peers, rows, choice_rows, gates, k_max, width, tokens_out, keep, experts,
                                            lane, token);
  }
}

// The most blocks a row move launches: 4 per SM (enough warps in flight to keep the links busy),
// or the exchange's SM budget (parallel.ep_sm_budget), whichever is smaller, so that the experts'
// GEMMs keep the other SMs while rows move.
int grid_cap(const EpPeerRows& peers) {
  const int cap = 4 * multiprocessor_count();
  return peers.max_blocks > 0 ? std::min(cap, peers.max_blocks) : cap;
}

template <bool kPush>
void launch_move(void* packed, int64_t rows, const EpPeerRows& peers, const EpSignalBoards& signal, int signal_kind,
                 unsigned* block_counter, void* stream) {
  SY_CHECK(peers.num_ranks >= 1 && peers.local_experts >= 1 && peers.row_bytes > 0 && rows >= 0,
           "ep peer rows: bad geometry (P ", peers.num_ranks, ", L ", peers.local_experts, ", row bytes ",
           peers.row_bytes, ", rows ", rows, ")");
  MoveArgs args{};
  args.packed = static_cast<char*>(packed);
  args.rows = rows;
  args.peers = peers;
  args.signal = signal;
  args.signal_kind = signal_kind;
  args.block_counter = block_counter;
  // Peer bases come from cudaMalloc (256-byte aligned) and row strides are whole rows, so the row
  // width and the local pointer decide the unit.
  const int64_t row_bytes = peers.row_bytes;
  const int64_t wanted = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int blocks = int(std::max<int64_t>(1, std::min<int64_t>(grid_cap(peers), wanted)));
  auto launch = [&](auto unit) {
    using Unit = decltype(unit);
    args.row_units = row_bytes / int64_t(sizeof(Unit));
    move_rows_kernel<Unit, kPush><<<blocks, kThreads, 0, as_stream(stream)>>>(args);
  };
  if (row_bytes % 16 == 0 && is_aligned(packed, 16)) launch(uint4{});
  else if (row_bytes % 4 == 0 && is_aligned(packed, 4)) launch(unsigned{});
  else {
    SY_CHECK(row_bytes % 2 == 0 && is_aligned(packed, 2), "ep peer rows: rows of ", row_bytes,
             " bytes are not 2-byte units");
    launch(uint16_t{});
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace

namespace cuda {

void ep_push_rows(const void* packed, int64_t rows, const EpPeerRows& peers, const EpSignalBoards& signal,
                  int signal_kind, unsigned* block_counter, void* stream) {
  SY_CHECK(signal_kind >= 0 && signal_kind < kEpSignalKinds && block_counter != nullptr &&
               signal.num_ranks == peers.num_ranks && signal.rank == peers.rank,
           "ep_push_rows: bad signal arguments");
  launch_move<true>(const_cast<void*>(packed), rows, peers, signal, signal_kind, block_counter, stream);
}

void ep_pull_rows(void* packed, int64_t rows, const EpPeerRows& peers, void* stream) {
  launch_move<false>(packed, rows, peers, EpSignalBoards{}, 0, nullptr, stream);
}

void ep_pull_combine(const EpPeerRows& peers, int64_t rows, const int32_t* choice_rows, const float* gates,
                     int64_t num_tokens, int k_max, DType dtype, void* tokens_out, void* keep, void* stream) {
  SY_CHECK(k_max >= 1 && k_max <= kMaxChoices, "ep_pull_combine: K must be in 1..8, got ", k_max);
  SY_CHECK(dtype == DType::bf16 || dtype == DType::f16 || dtype == DType::f32, "ep_pull_combine: dtype ",
           dtype_name(dtype), " is not an activation type");
  SY_CHECK(peers.row_bytes % int64_t(dtype_size(dtype)) == 0, "ep_pull_combine: rows of ", peers.row_bytes,
           " bytes are not whole ", dtype_name(dtype), " elements");
  if (num_tokens == 0) return;
  const int64_t width = peers.row_bytes / int64_t(dtype_size(dtype));
  int64_t blocks = (num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (peers.max_blocks > 0) blocks = std::min<int64_t>(blocks, peers.max_blocks);  // the kernel strides
  SY_CHECK(blocks < (int64_t(1) << 31), "ep_pull_combine: too many tokens for one launch");
  dispatch_activation_dtype(dtype, "ep_pull_combine", [&](auto tag) {
    using T = decltype(tag);
    // Packs need whole 16-byte packs per row and aligned local bases (peer bases are cudaMalloc'd).
    bool packs = width % Pack<T>::kElems == 0 && is_aligned(tokens_out, 16) && (!keep || is_aligned(keep, 16));
    dispatch_elems<T>(packs, [&](auto elems) {
      auto launch = [&](auto choices) {
        pull_combine_kernel<T, decltype(elems)::value, decltype(choices)::value>
            <<<unsigned(blocks), kThreads, 0, as_stream(stream)>>>(peers, rows, choice_rows, gates, num_tokens, k_max,
                                                                   width, static_cast<T*>(tokens_out),
                                                                   static_cast<T*>(keep));
      };
      dispatch_choices(k_max, launch);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void ep_zero_padding_rows(void* padded, int64_t row_bytes, const int32_t* expert_offsets, const int32_t* expert_totals,
                          int local_experts, int64_t max_padding_rows, void* stream) {
  if (local_experts < 1 || max_padding_rows <= 0) return;
  if (row_bytes % 16 == 0 && is_aligned(padded, 16)) {
    zero_padding_kernel<uint4><<<dim3(local_experts, kZeroBlocksPerExpert), kThreads, 0, as_stream(stream)>>>(
        static_cast<uint4*>(padded), row_bytes / 16, expert_offsets, expert_totals);
  } else {
    SY_CHECK(row_bytes % 4 == 0 && is_aligned(padded, 4), "ep_zero_padding_rows: rows of ", row_bytes,
             " bytes are not whole 4-byte units");
    zero_padding_kernel<unsigned><<<dim3(local_experts, kZeroBlocksPerExpert), kThreads, 0, as_stream(stream)>>>(
        static_cast<unsigned*>(padded), row_bytes / 4, expert_offsets, expert_totals);
  }
  CUDA_CHECK_LAUNCH();
}

void ep_signal_peers(const EpSignalBoards& signal, int signal_kind, void* stream) {
  SY_CHECK(signal.num_ranks >= 1 && signal.num_ranks <= 1024, "ep_signal_peers: ", signal.num_ranks, " ranks");
  signal_peers_kernel<<<1, signal.num_ranks, 0, as_stream(stream)>>>(signal, signal_kind);
  CUDA_CHECK_LAUNCH();
}

void ep_all_gather_counts(const int32_t* packed_offsets, int64_t segments, void* const* peer_bases,
                          const EpSignalBoards& signal, int signal_kind, void* stream) {
  SY_CHECK(segments >= 1 && signal.num_ranks >= 1 && signal.num_ranks <= 1024, "ep_all_gather_counts: ", segments,
           " segments over ", signal.num_ranks, " ranks (>= 1 segment, <= 1024 ranks)");
  all_gather_counts_kernel<<<1, 1024, 0, as_stream(stream)>>>(packed_offsets, segments, peer_bases, signal,
                                                              signal_kind);
  CUDA_CHECK_LAUNCH();
}

void ep_wait_signals(const EpSignalBoards& signal, int signal_kind, unsigned long long expected, int64_t timeout_ns,
                     EpWaitFailure* failure, void* stream) {
  SY_CHECK(failure != nullptr, "ep_wait_signals: no failure record");
  wait_signals_kernel<false><<<1, 32, 0, as_stream(stream)>>>(signal, signal_kind, expected, (long long)timeout_ns,
                                                              failure);
  CUDA_CHECK_LAUNCH();
}

void ep_signal_and_wait(const EpSignalBoards& signal, int signal_kind, unsigned long long expected, int64_t timeout_ns,
                        EpWaitFailure* failure, void* stream) {
  SY_CHECK(failure != nullptr, "ep_signal_and_wait: no failure record");
  wait_signals_kernel<true><<<1, 32, 0, as_stream(stream)>>>(signal, signal_kind, expected, (long long)timeout_ns,
                                                             failure);
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
