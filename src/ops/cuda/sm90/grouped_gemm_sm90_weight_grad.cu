// sm_90a grouped GEMM, weight gradient: dB_e = A_e^T * G_e, reducing over the rows of segment e.
//
// A [R, M] bf16 and G [R, N] bf16 row-major; dB [E, M, N] fp32 row-major, overwritten (zeros for an
// empty expert) or, with Options::accumulate, added to (each epilogue reads and adds, or TMA
// reduce-adds; every element has one writer, so the result is deterministic). Tile (e, m-tile,
// n-tile) is 128 rows of dB_e x block_n columns; its reduction runs over segment e in 64-row stages. Both operands are MN-major in shared memory (A^T: the M values of
// one row of A are contiguous; G: the N values are), which wgmma reads with its transpose bits.
//
// Epilogue (pipelined): direct st.global of the fragments (red.global.add accumulating), or (tma,
// the default) the fp32 tile is written to swizzled shared memory and stored by TMA bulk stores
// that drain while the consumers already run the next tile's mainloop (grouped_gemm_sm90.h says
// why). Shared-memory layout of
// one warpgroup's 64 x 128 staging: four 64 x 32 fp32 boxes of 8 KiB, row r of a box at 128 * r,
// its 16-byte unit u at position u ^ (r % 8) (the TMA's 128-byte swizzle); a warp's float2
// fragment writes then hit every bank exactly twice (the minimum for 256 bytes).
//
// Tile geometry and shared-memory layouts: grouped_gemm_sm90_common.cuh; PTX wrappers and
// descriptors: grouped_gemm_sm90_ptx.cuh; mainloops: grouped_gemm_sm90_pipeline.cuh; tile
// scheduler: grouped_gemm_sm90_schedule.cuh.
#include "src/ops/cuda/sm90/grouped_gemm_sm90_common.cuh"
#include "src/ops/cuda/sm90/grouped_gemm_sm90_ptx.cuh"
#include "src/ops/cuda/sm90/grouped_gemm_sm90_pipeline.cuh"
#include "src/ops/cuda/sm90/grouped_gemm_sm90_schedule.cuh"
#include "src/core/cuda_check.h"

namespace switchyard {
namespace cuda {
namespace sm90 {
namespace detail {
namespace {

#ifdef SY_SM90A_DEVICE_CODE
// TMA loads of one stage: 64 rows (from `row`) of A's columns [m0, m0 + 64*chunks_a) and of G's
// columns [n0, n0 + 64*chunks_b), one 64 x 64 box per chunk (chunks past M or N are skipped).
__device__ __forceinline__ void load_weight_grad_stage(const CUtensorMap* map_a, const CUtensorMap* map_g,
                                                       uint32_t barrier, uint32_t a_tile, uint32_t g_tile, int row,
                                                       int m0, int n0, int chunks_a, int chunks_b) {
  mbarrier_arrive_expect_tx(barrier, (chunks_a + chunks_b) * kChunkBytes);
  for (int chunk = 0; chunk < chunks_a; ++chunk) {
    tma_load_2d(a_tile + chunk * kChunkBytes, map_a, barrier, m0 + chunk * kChunk, row);
  }
  for (int chunk = 0; chunk < chunks_b; ++chunk) {
    tma_load_2d(g_tile + chunk * kChunkBytes, map_g, barrier, n0 + chunk * kChunk, row);
  }
}

// Writes one consumer warpgroup's 64 x kBlockN fp32 fragment tile (rows from `row0`, columns from
// `n0`) of dB_e: each quad of threads writes a full 32-byte sector per row. Accumulating, each pair
// goes to the L2 as a vector reduce-add (red.global.add.v2.f32): the warps go on to the next tile
// without waiting for a load of the old values, and each element still gets exactly one add per
// call (deterministic).
template <int kBlockN>
__device__ __forceinline__ void store_weight_grad_tile(const float (&acc)[kBlockN / 2], float* grad_expert, int row0,
                                                       int n0, int m, int n, bool accumulate, int thread_in_warpgroup) {
  const int warp = thread_in_warpgroup / 32, lane = thread_in_warpgroup % 32;
  const int row = row0 + warp * 16 + lane / 4;
  if (row0 >= m) return;  // M is a multiple of 64: the warpgroup's rows are all in or all out
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
    const int column = n0 + j * 8 + (lane % 4) * 2;
    if (column >= n) continue;
    float* upper = grad_expert + int64_t(row) * n + column;
    float* lower = grad_expert + int64_t(row + 8) * n + column;
    if (accumulate) {
      red_add_f32x2(upper, acc[4 * j], acc[4 * j + 1]);
      red_add_f32x2(lower, acc[4 * j + 2], acc[4 * j + 3]);
    } else {
      *reinterpret_cast<float2*>(upper) = make_float2(acc[4 * j], acc[4 * j + 1]);
      *reinterpret_cast<float2*>(lower) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
}

// One warpgroup's 64 x kBlockN fp32 fragments into its staging, in the boxes' swizzled layout
// (see the top comment): both the TMA stores and the storer warps read it.
template <int kBlockN>
__device__ __forceinline__ void write_staged_fragments(const float (&acc)[kBlockN / 2], uint8_t* staging,
                                                       int thread_in_warpgroup) {
  const int warp = thread_in_warpgroup / 32, lane = thread_in_warpgroup % 32;
  const int row = warp * 16 + lane / 4, column = (lane % 4) * 2;
  const int swizzle = row % 8;  // the same for rows row and row + 8
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
    // Columns 8j + column, +1: box j / 4, byte 32 (j % 4) + 4 column of the box row.
    const int unit = 2 * (j % 4) + column / 4;
    uint8_t* base = staging + (j / 4) * kFloatBoxBytes + ((unit ^ swizzle) << 4) + (column % 4) * 4;
    *reinterpret_cast<float2*>(base + row * 128) = make_float2(acc[4 * j], acc[4 * j + 1]);
    *reinterpret_cast<float2*>(base + (row + 8) * 128) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
  }
}

// The TMA-store epilogue of one warpgroup: its 64 x kBlockN fp32 tile (rows from row0 of dB_e,
// columns from n0) goes to `staging` (see the top comment), then thread 0 issues the bulk stores
// of the boxes inside N and commits them as one group. The staging is reused per tile: before
// overwriting it, thread 0 waits until the previous tile's stores have read it.
template <int kBlockN>
__device__ __forceinline__ void store_weight_grad_tile_tma(const float (&acc)[kBlockN / 2], const CUtensorMap* map_grad,
                                                           uint8_t* staging, int expert, int row0, int n0, int m,
                                                           int n, bool accumulate, int barrier_id,
                                                           int thread_in_warpgroup) {
  if (row0 >= m) return;  // M is a multiple of 64: uniform over the warpgroup
  if (thread_in_warpgroup == 0) bulk_wait_group_read_all();
  warpgroup_barrier(barrier_id);
  write_staged_fragments<kBlockN>(acc, staging, thread_in_warpgroup);
  fence_proxy_async_shared();  // every writer, before the barrier that precedes the TMA's reads
  warpgroup_barrier(barrier_id);
  if (thread_in_warpgroup == 0) {
    const int boxes = min(kBlockN, n - n0) / kFloatBoxColumns;
    for (int box = 0; box < boxes; ++box) {
      const uint32_t source = shared_address(staging + box * kFloatBoxBytes);
      if (accumulate)
        tma_reduce_add_3d(map_grad, source, n0 + box * kFloatBoxColumns, row0, expert);
      else
        tma_store_3d(map_grad, source, n0 + box * kFloatBoxColumns, row0, expert);
    }
    bulk_commit_group();
  }
}

// Storer-warp epilogue: consumer warpgroup c stages its 64 x 128 fp32 tile in the TMA layout
// above, then hands it to warp 1 + c of the producer warpgroup, which copies it out with 16-byte
// st.global (the TMA unit then only loads). Named barriers per consumer c (128 + 32 threads):
// kStagedBarrier + c (the staging holds a tile) and kFreedBarrier + c (the storer has read it).
constexpr int kStagedBarrier = 3, kFreedBarrier = 5, kStorerHandoffThreads = kWarpgroupThreads + 32;

__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

template <int kBlockN>
__device__ __forceinline__ void stage_weight_grad_tile(const float (&acc)[kBlockN / 2], uint8_t* staging, int consumer,
                                                       int thread_in_warpgroup) {
  named_barrier_sync(kFreedBarrier + consumer, kStorerHandoffThreads);  // the storer read the previous tile
  write_staged_fragments<kBlockN>(acc, staging, thread_in_warpgroup);
  named_barrier_arrive(kStagedBarrier + consumer, kStorerHandoffThreads);
}

// One storer warp: lane l copies 16 bytes of every row (box l / 8, unit l % 8), 512 bytes per row.
__device__ __forceinline__ void store_staged_tile(const uint8_t* staging, float* grad_rows, int n, int columns,
                                                  bool accumulate, int lane) {
  const int box = lane / 8, unit = lane % 8;
  if (box * kFloatBoxColumns >= columns) return;
  float* out = grad_rows + box * kFloatBoxColumns + unit * 4;
  const uint8_t* in = staging + box * kFloatBoxBytes;
#pragma unroll 8
  for (int row = 0; row < 64; ++row) {
    float4 value = *reinterpret_cast<const float4*>(in + row * 128 + ((unit ^ (row % 8)) << 4));
    float4* target = reinterpret_cast<float4*>(out + int64_t(row) * n);
    if (accumulate) {
      const float4 old = *target;
      value = make_float4(old.x + value.x, old.y + value.y, old.z + value.z, old.w + value.w);
    }
    *target = value;
  }
}

// Multicast pairs: the cluster's rank-r CTA loads A^T chunks c with c % 2 == r into both CTAs.
__device__ __forceinline__ void load_weight_grad_stage_pair(const CUtensorMap* map_a, const CUtensorMap* map_g,
                                                            uint32_t barrier, uint32_t a_tile, uint32_t g_tile,
                                                            int row, int m0, int n0, int chunks_a, int chunks_b,
                                                            int rank) {
  mbarrier_arrive_expect_tx(barrier, (chunks_a + chunks_b) * kChunkBytes);
  for (int chunk = rank; chunk < chunks_a; chunk += 2) {
    tma_load_2d_multicast(a_tile + chunk * kChunkBytes, map_a, barrier, m0 + chunk * kChunk, row, uint16_t(0x3));
  }
  for (int chunk = 0; chunk < chunks_b; ++chunk) {
    tma_load_2d(g_tile + chunk * kChunkBytes, map_g, barrier, n0 + chunk * kChunk, row);
  }
}

struct WeightGradTile {
  int expert;
  int m0;
  int n0;  // >= N: the idle half of a multicast pair (an odd last n-tile); nothing is stored
};

// Work item `tile` (kPair: the pair of n-tiles 2p, 2p + 1 of one (expert, m-tile); `rank` picks one).
template <int kBlockN, bool kPair>
__device__ __forceinline__ WeightGradTile weight_grad_tile(const WeightGradProblem& problem, int tile, int rank) {
  const int n_items = kPair ? (problem.n_tiles + 1) / 2 : problem.n_tiles;
  const int tiles_per_expert = problem.m_tiles * n_items;
  const int expert = tile / tiles_per_expert;
  const TileCoord coord = raster_tile(tile - expert * tiles_per_expert, problem.m_tiles, n_items);
  const int n_tile = kPair ? 2 * coord.n + rank : coord.n;
  return WeightGradTile{expert, coord.m * kBlockM, n_tile * kBlockN};
}

// A work item's segment and the padding marks of its last two k-blocks' first rows, loaded one item
// ahead (independent loads, so the per-item decision costs no exposed L2 round trip).
struct SegmentTail {
  int begin = 0, k_blocks = 0, last_mark = 0, previous_mark = 0;
};

__device__ __forceinline__ SegmentTail load_segment_tail(const WeightGradProblem& problem, int expert) {
  SegmentTail tail;
  tail.begin = __ldg(problem.expert_offsets + expert);
  tail.k_blocks = (__ldg(problem.expert_offsets + expert + 1) - tail.begin) / kBlockK;
  if (problem.row_tokens != nullptr && tail.k_blocks > 0) {
    tail.last_mark = __ldg(problem.row_tokens + tail.begin + (tail.k_blocks - 1) * kBlockK);
    if (tail.k_blocks > 1) tail.previous_mark = __ldg(problem.row_tokens + tail.begin + (tail.k_blocks - 2) * kBlockK);
  }
  return tail;
}

// The k-blocks that hold a real row (Options::row_tokens: padding is a segment's last rows).
__device__ __forceinline__ int item_k_blocks(const WeightGradProblem& problem, const SegmentTail& tail) {
  if (tail.last_mark >= 0) return tail.k_blocks;
  if (tail.previous_mark >= 0) return tail.k_blocks - 1;
  return real_k_blocks(problem.row_tokens, tail.begin, tail.k_blocks - 2);  // padding past 128 rows
}

template <int kBlockN, bool kPair>
__device__ __forceinline__ SegmentTail item_tail(const WeightGradProblem& problem, int item, int total_items,
                                                 int rank) {
  return item < total_items ? load_segment_tail(problem, weight_grad_tile<kBlockN, kPair>(problem, item, rank).expert)
                            : SegmentTail{};
}
#endif

template <int kBlockN, bool kTmaStore>
using WeightGradLayout = PipelineLayout<kBlockN, kTmaStore ? kFloatTileStagingBytes : 0>;

// Warp-specialized persistent kernel: warpgroup 0 (one thread) loads, warpgroups 1 and 2 own rows
// [0, 64) and [64, 128) of each dB tile. map_grad (dB as [E, M, N] fp32, 32 x 64 boxes) is used by
// the TMA-store epilogue only.
// kPair (launched in clusters of 2): both CTAs walk the same work items in lockstep, rank r taking
// n-tile 2p + r; every stage holds A^T chunks multicast by both CTAs, so a stage is free again only
// when the consumers of both CTAs released it (each consumer warp arrives on both CTAs' empty
// barriers), and a producer leaves only after its empty barriers saw every arrival (no remote
// arrival may reach an exited CTA).
template <int kBlockN, bool kTmaStore, bool kPair, bool kStorerWarps = false>
__global__ void __launch_bounds__(3 * kWarpgroupThreads, 1)
    weight_grad_pipelined_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_g,
                                 const __grid_constant__ CUtensorMap map_grad, const WeightGradProblem problem) {
#ifdef SY_SM90A_DEVICE_CODE
  static_assert(!kTmaStore || kBlockN == kTmaStoreBlockN, "the fp32 staging holds one 128 x 128 tile");
  using Layout = WeightGradLayout<kBlockN, kTmaStore>;
  constexpr int kStages = Layout::kStages;
  extern __shared__ uint8_t dynamic_smem[];
  const PipelineSmem smem = setup_pipeline<Layout>(dynamic_smem, kPair ? 2 * kConsumerWarps : kConsumerWarps);
  if constexpr (kPair) cluster_sync();  // the peer's barriers are initialized before any multicast
  const int rank = kPair ? int(cluster_cta_rank()) : 0;
  const int first_item = kPair ? int(cluster_index()) : int(blockIdx.x);
  const int item_stride = kPair ? int(cluster_count()) : int(gridDim.x);
  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const int thread_in_warpgroup = threadIdx.x % kWarpgroupThreads;

  const int n_items = kPair ? (problem.n_tiles + 1) / 2 : problem.n_tiles;
  const int total_items = problem.num_experts * problem.m_tiles * n_items;
  // The producer's bookkeeping (pairs, the prefetched segment tail) spills at 40 registers; the
  // consumers need far fewer than 232.
  constexpr int kWeightGradProducerRegisters = 56, kWeightGradConsumerRegisters = 224;
  static_assert(kWarpgroupThreads * (kWeightGradProducerRegisters + 2 * kWeightGradConsumerRegisters) <= 65536,
                "register file");
  if (warpgroup == 0) {
    setmaxnreg_decrease<kWeightGradProducerRegisters>();
    if constexpr (kStorerWarps) {
      const int storer = thread_in_warpgroup / 32 - 1;
      if (storer == 0 || storer == 1) {
        const uint8_t* staging = smem.base + Layout::kOffsetStaging + storer * (Layout::kStagingBytes / 2);
        for (int item = first_item; item < total_items; item += item_stride) {
          const WeightGradTile where = weight_grad_tile<kBlockN, kPair>(problem, item, rank);
          const int row0 = where.m0 + storer * (kBlockM / 2);
          if ((kPair && where.n0 >= problem.n) || row0 >= problem.m) continue;  // as the consumer skips
          // Freed: the previous tile's rows are read (their loads fed the stores issued above).
          named_barrier_arrive(kFreedBarrier + storer, kStorerHandoffThreads);
          named_barrier_sync(kStagedBarrier + storer, kStorerHandoffThreads);
          store_staged_tile(staging, problem.grad_b + (int64_t(where.expert) * problem.m + row0) * problem.n + where.n0,
                            problem.n, min(kBlockN, problem.n - where.n0), problem.accumulate != 0,
                            thread_in_warpgroup % 32);
        }
        return;
      }
    }
    if (thread_in_warpgroup != 0) return;
    prefetch_tensor_map(&map_a);
    prefetch_tensor_map(&map_g);
    PipelineState state;
    SegmentTail next_tail = item_tail<kBlockN, kPair>(problem, first_item, total_items, rank);
    for (int item = first_item; item < total_items; item += item_stride) {
      const WeightGradTile where = weight_grad_tile<kBlockN, kPair>(problem, item, rank);
      check_segment(problem.expert_offsets, where.expert, kBlockK, problem.rows);
      const SegmentTail tail = next_tail;
      next_tail = item_tail<kBlockN, kPair>(problem, item + item_stride, total_items, rank);
      const int begin = tail.begin, k_blocks = item_k_blocks(problem, tail);
      const int chunks_a = min(kBlockM / kChunk, (problem.m - where.m0) / kChunk);
      const int chunks_b = max(0, min(kBlockN / kChunk, (problem.n - where.n0) / kChunk));
      for (int k_block = 0; k_block < k_blocks; ++k_block) {
        mbarrier_wait(smem.empty_barriers + 8 * state.stage, state.phase ^ 1u);
        const uint32_t a_tile = smem.address + Layout::kOffsetA + state.stage * kTileBytesA;
        const uint32_t g_tile = smem.address + Layout::kOffsetB + state.stage * Layout::kTileBytesB;
        if constexpr (kPair) {
          load_weight_grad_stage_pair(&map_a, &map_g, smem.full_barriers + 8 * state.stage, a_tile, g_tile,
                                      begin + k_block * kBlockK, where.m0, where.n0, chunks_a, chunks_b, rank);
        } else {
          load_weight_grad_stage(&map_a, &map_g, smem.full_barriers + 8 * state.stage, a_tile, g_tile,
                                 begin + k_block * kBlockK, where.m0, where.n0, chunks_a, chunks_b);
        }
        state.advance<kStages>();
      }
    }
    if constexpr (kPair) {
      for (int stage = 0; stage < kStages; ++stage) {  // every arrival (local and the peer's) is in
        mbarrier_wait(smem.empty_barriers + 8 * state.stage, state.phase ^ 1u);
        state.advance<kStages>();
      }
    }
    return;
  }

  setmaxnreg_increase<kWeightGradConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int lane = thread_in_warpgroup % 32;
  // A^T rows [64*consumer, +64) are chunk `consumer` of the stage's A tile.
  const uint32_t a_tiles = smem.address + Layout::kOffsetA + consumer * kChunkBytes;
  const uint32_t g_tiles = smem.address + Layout::kOffsetB;
  uint8_t* staging = smem.base + Layout::kOffsetStaging + consumer * (Layout::kStagingBytes / 2);
  if (kTmaStore && thread_in_warpgroup == 0) prefetch_tensor_map(&map_grad);
  float acc[kBlockN / 2];
  PipelineState state;
  SegmentTail next_tail = item_tail<kBlockN, kPair>(problem, first_item, total_items, rank);
  for (int item = first_item; item < total_items; item += item_stride) {
    const WeightGradTile where = weight_grad_tile<kBlockN, kPair>(problem, item, rank);
    const SegmentTail tail = next_tail;
    next_tail = item_tail<kBlockN, kPair>(problem, item + item_stride, total_items, rank);
    const int k_blocks = item_k_blocks(problem, tail);
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) acc[i] = 0.0f;
    consume_k_blocks<kBlockN, true, true, kStages>(acc, k_blocks, a_tiles, kTileBytesA, g_tiles, Layout::kTileBytesB,
                                                   smem.full_barriers, smem.empty_barriers, state, lane == 0,
                                                   kPair ? 1 - rank : -1);
    if (kPair && where.n0 >= problem.n) continue;  // the idle half of a pair: its G was never loaded
    const int row0 = where.m0 + consumer * (kBlockM / 2);
    if constexpr (kStorerWarps) {
      if (row0 < problem.m) stage_weight_grad_tile<kBlockN>(acc, staging, consumer, thread_in_warpgroup);
    } else if constexpr (kTmaStore) {
      store_weight_grad_tile_tma<kBlockN>(acc, &map_grad, staging, where.expert, row0, where.n0, problem.m, problem.n,
                                          problem.accumulate != 0, 1 + consumer, thread_in_warpgroup);
    } else {
      store_weight_grad_tile<kBlockN>(acc, problem.grad_b + int64_t(where.expert) * problem.m * problem.n, row0,
                                      where.n0, problem.m, problem.n, problem.accumulate != 0, thread_in_warpgroup);
    }
  }
  // The last stores must be done with the staging before the CTA's shared memory goes away.
  if (kTmaStore && thread_in_warpgroup == 0) bulk_wait_group_all();
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a code: never run silently
#endif
}

// Basic variant: one CTA (two warpgroups) per (expert, 128 x 128 tile), no warp specialization.
__global__ void __launch_bounds__(2 * kWarpgroupThreads, 1)
    weight_grad_basic_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_g,
                             const WeightGradProblem problem) {
#ifdef SY_SM90A_DEVICE_CODE
  const int expert = blockIdx.z, m0 = blockIdx.y * kBlockM, n0 = blockIdx.x * kBasicBlockN;
  extern __shared__ uint8_t dynamic_smem[];
  const uint32_t a_tiles = shared_address(aligned_dynamic_smem(dynamic_smem));
  const uint32_t g_tiles = a_tiles + kBasicStages * kTileBytesA;
  const uint32_t full_barriers = g_tiles + kBasicStages * kBasicTileBytesB;
  const int begin = __ldg(problem.expert_offsets + expert);
  const int k_blocks = (__ldg(problem.expert_offsets + expert + 1) - begin) / kBlockK;
  const int chunks_a = min(kBlockM / kChunk, (problem.m - m0) / kChunk);
  const int chunks_b = min(kBasicBlockN / kChunk, (problem.n - n0) / kChunk);
  if (threadIdx.x == 0) check_segment(problem.expert_offsets, expert, kBlockK, problem.rows);
  const int consumer = threadIdx.x / kWarpgroupThreads;
  float acc[kBasicBlockN / 2];
  // A^T rows [64*consumer, +64) are chunk `consumer` of the stage's A tile.
  basic_mainloop<kBasicBlockN, true, true, kBasicStages>(
      acc, k_blocks, a_tiles, consumer * kChunkBytes, g_tiles, full_barriers, [&](int k_block, int stage) {
        load_weight_grad_stage(&map_a, &map_g, full_barriers + 8 * stage, a_tiles + stage * kTileBytesA,
                               g_tiles + stage * kBasicTileBytesB, begin + k_block * kBlockK, m0, n0, chunks_a,
                               chunks_b);
      });
  store_weight_grad_tile<kBasicBlockN>(acc, problem.grad_b + int64_t(expert) * problem.m * problem.n,
                                       m0 + consumer * (kBlockM / 2), n0, problem.m, problem.n,
                                       problem.accumulate != 0, threadIdx.x % kWarpgroupThreads);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

template <int kBlockN, bool kTmaStore, bool kStorerWarps = false>
void launch_pipelined(const CUtensorMap& map_a, const CUtensorMap& map_g, const CUtensorMap& map_grad,
                      const WeightGradProblem& problem, cudaStream_t stream) {
  constexpr int kSmemBytes = WeightGradLayout<kBlockN, kTmaStore>::kSmemBytes;
  auto kernel = weight_grad_pipelined_kernel<kBlockN, kTmaStore, false, kStorerWarps>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  const int64_t tiles = int64_t(problem.num_experts) * problem.m_tiles * problem.n_tiles;
  const int grid = int(std::min<int64_t>(tiles, current_device_sm_count()));
  kernel<<<grid, 3 * kWarpgroupThreads, kSmemBytes, stream>>>(map_a, map_g, map_grad, problem);
  CUDA_CHECK_LAUNCH();
}

// The TMA-store kernel in clusters of two (multicast pairs). False when no cluster of two fits
// (then nothing was launched).
template <bool kStorerWarps = false>
bool launch_pipelined_pairs(const CUtensorMap& map_a, const CUtensorMap& map_g, const CUtensorMap& map_grad,
                            const WeightGradProblem& problem, cudaStream_t stream) {
  constexpr int kSmemBytes = WeightGradLayout<kTmaStoreBlockN, true>::kSmemBytes;
  auto kernel = weight_grad_pipelined_kernel<kTmaStoreBlockN, true, true, kStorerWarps>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = 2;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(2 * current_device_sm_count()));
  config.blockDim = dim3(3 * kWarpgroupThreads);
  config.dynamicSmemBytes = kSmemBytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  int clusters = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
  if (clusters < 1) return false;
  const int64_t pairs = int64_t(problem.num_experts) * problem.m_tiles * ((problem.n_tiles + 1) / 2);
  config.gridDim = dim3(unsigned(2 * std::min<int64_t>(pairs, clusters)));
  CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, map_a, map_g, map_grad, problem));
  CUDA_CHECK_LAUNCH();
  return true;
}

void launch_basic(const CUtensorMap& map_a, const CUtensorMap& map_g, const WeightGradProblem& problem,
                  cudaStream_t stream) {
  CUDA_CHECK(cudaFuncSetAttribute(weight_grad_basic_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  kBasicSmemBytes));
  SY_CHECK(problem.m_tiles <= 65535 && problem.num_experts <= 65535, "sm90 basic weight grad: grid too large");
  const dim3 grid(unsigned(problem.n_tiles), unsigned(problem.m_tiles), unsigned(problem.num_experts));
  weight_grad_basic_kernel<<<grid, 2 * kWarpgroupThreads, kBasicSmemBytes, stream>>>(map_a, map_g, problem);
  CUDA_CHECK_LAUNCH();
}

}  // namespace
}  // namespace detail

void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b,
                              const Options& options, void* stream) {
  using namespace detail;
  SY_CHECK(weight_grad_supported(a, g, expert_offsets, grad_b), "sm90::grouped_gemm_weight_grad: unsupported problem: a ",
           a.describe(), ", g ", g.describe(), ", expert_offsets ", expert_offsets.describe(), ", grad_b ",
           grad_b.describe());
  const int64_t rows = a.dim(0), m = a.dim(1), n = g.dim(1), experts = grad_b.dim(0);
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  if (rows == 0) {  // every segment is empty (and a zero-row tensor map cannot be encoded): dB_e += 0
    if (!options.accumulate) CUDA_CHECK(cudaMemsetAsync(grad_b.data, 0, grad_b.bytes(), cuda_stream));
    return;
  }
  const uint32_t box[2] = {kChunk, kBlockK};
  const uint64_t dims_a[2] = {uint64_t(m), uint64_t(rows)};
  const uint64_t strides_a[1] = {uint64_t(m) * 2};
  const CUtensorMap map_a = make_bf16_tensor_map(a.data, 2, dims_a, strides_a, box);
  const uint64_t dims_g[2] = {uint64_t(n), uint64_t(rows)};
  const uint64_t strides_g[1] = {uint64_t(n) * 2};
  const CUtensorMap map_g = make_bf16_tensor_map(g.data, 2, dims_g, strides_g, box);

  WeightGradProblem problem{};
  problem.expert_offsets = expert_offsets.as<const int>();
  problem.row_tokens = options.variant == Variant::basic ? nullptr : options.row_tokens;
  problem.grad_b = grad_b.as<float>();
  problem.num_experts = int(experts);
  problem.rows = int(rows);
  problem.m = int(m);
  problem.n = int(n);
  problem.m_tiles = int((m + kBlockM - 1) / kBlockM);
  problem.accumulate = options.accumulate ? 1 : 0;
  if (options.variant == Variant::basic) {
    problem.n_tiles = int((n + kBasicBlockN - 1) / kBasicBlockN);
    launch_basic(map_a, map_g, problem, cuda_stream);
    return;
  }
  if (options.store != Store::direct && options.block_n != 256) {
    // dB as [E, M, N] fp32 for the TMA stores: boxes of 32 columns x 64 rows of one expert.
    const uint64_t dims_grad[3] = {uint64_t(n), uint64_t(m), uint64_t(experts)};
    const uint64_t strides_grad[2] = {uint64_t(n) * 4, uint64_t(m) * uint64_t(n) * 4};
    const uint32_t box_grad[3] = {kFloatBoxColumns, kBlockM / 2, 1};
    const CUtensorMap map_grad = make_f32_tensor_map(grad_b.data, 3, dims_grad, strides_grad, box_grad);
    problem.n_tiles = int((n + kTmaStoreBlockN - 1) / kTmaStoreBlockN);
    const bool pair = options.multicast == Multicast::pair ||
                      (options.multicast == Multicast::automatic && problem.n_tiles % 2 == 0);
    if (options.store == Store::warps) {
      if (pair && launch_pipelined_pairs<true>(map_a, map_g, map_grad, problem, cuda_stream)) return;
      launch_pipelined<kTmaStoreBlockN, true, true>(map_a, map_g, map_grad, problem, cuda_stream);
      return;
    }
    if (pair && launch_pipelined_pairs(map_a, map_g, map_grad, problem, cuda_stream)) return;
    launch_pipelined<kTmaStoreBlockN, true>(map_a, map_g, map_grad, problem, cuda_stream);
    return;
  }
  const int block_n = choose_block_n(options, n, experts * problem.m_tiles);
  problem.n_tiles = int((n + block_n - 1) / block_n);
  if (block_n == 256) {
    launch_pipelined<256, false>(map_a, map_g, map_a, problem, cuda_stream);
  } else {
    launch_pipelined<128, false>(map_a, map_g, map_a, problem, cuda_stream);
  }
}

void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b,
                              void* stream) {
  grouped_gemm_weight_grad(a, g, expert_offsets, grad_b, default_options(), stream);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
