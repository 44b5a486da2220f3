// sm_90a grouped GEMM, forward: C[r, :] = A[r, :] * op(B_e) for the rows r of each expert segment,
// optionally with the expert activation (or its backward) fused into the epilogue.
//
// A [R, K] bf16 row-major (K-major operand), B [E, K, N] bf16 (N-major operand: wgmma transposes it
// from shared memory) or, with trans_b, B [E, N, K] (K-major), C [R, N] bf16; fp32 accumulation.
// Tiles are 128 rows x block_n columns; a tile's 128 rows belong to one expert (segments are
// multiples of 128 rows), found by a binary search of expert_offsets on the device. Tiles at or
// beyond expert_offsets[E] are not scheduled.
//
// Fused epilogues (pipelined variant; grouped_gemm_sm90_epilogue.cuh):
//   grouped_gemm_activation           A = X [R, D], B = W1 [E, D, F or 2F]:  pre = X W1_e (kept or
//                                     not), post = act(pre) [R, F]. swiglu tiles cover block_n/2
//                                     post columns and load gate and up columns of W1 side by side.
//   grouped_gemm_activation_backward  A = dL/dO [R, D], B = W2 [E, F, D] used transposed:
//                                     grad_pre = act'(pre) * (dL/dO W2_e^T), [R, F] or [R, 2F];
//                                     dL/d post never reaches memory.
//
// Schedules (grouped_gemm_sm90.h, Options::schedule): cooperative (both consumer warpgroups on one
// 128 x block_n tile, 64 rows each) or pingpong (each consumer on whole 128 x 128 tiles, in turn,
// so one's epilogue overlaps the other's MMAs).
//
// Tile geometry and shared-memory layouts: grouped_gemm_sm90_common.cuh; PTX wrappers and
// descriptors: grouped_gemm_sm90_ptx.cuh; mainloops: grouped_gemm_sm90_pipeline.cuh; tile
// scheduler: grouped_gemm_sm90_schedule.cuh.
#include "src/ops/cuda/sm90/grouped_gemm_sm90_common.cuh"
#include "src/ops/cuda/sm90/grouped_gemm_sm90_ptx.cuh"
#include "src/ops/cuda/sm90/grouped_gemm_sm90_pipeline.cuh"
#include "src/ops/cuda/sm90/grouped_gemm_sm90_schedule.cuh"
#include "src/ops/cuda/sm90/grouped_gemm_sm90_epilogue.cuh"
#include "src/core/cuda_check.h"

namespace switchyard {
namespace cuda {
namespace sm90 {
namespace detail {
namespace {

#ifdef SY_SM90A_DEVICE_CODE
// Issues the TMA loads of one stage: A rows [row0, row0+128) x K block, and `chunks` 64-column
// pieces of op(B_e) from column n0 into the tile's first chunks (pieces past N are skipped; their
// accumulator columns are never stored). With second_n0 >= 0 (swiglu) another `chunks` pieces from
// column second_n0 go to the chunks from `second_slot` on.
template <bool kBMNMajor>
__device__ __forceinline__ void load_forward_stage(const CUtensorMap* map_a, const CUtensorMap* map_b,
                                                   uint32_t barrier, uint32_t a_tile, uint32_t b_tile, int k_block,
                                                   int row0, int n0, int expert, int chunks, int second_n0 = -1,
                                                   int second_slot = 0) {
  const int groups = second_n0 >= 0 ? 2 : 1;
  mbarrier_arrive_expect_tx(barrier, kTileBytesA + groups * chunks * kChunkBytes);
  tma_load_2d(a_tile, map_a, barrier, k_block * kBlockK, row0);
  for (int group = 0; group < groups; ++group) {
    const int first_column = group == 0 ? n0 : second_n0, first_slot = group == 0 ? 0 : second_slot;
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int column = first_column + chunk * kChunk;
      const uint32_t destination = b_tile + (first_slot + chunk) * kChunkBytes;
      if constexpr (kBMNMajor) {
        tma_load_3d(destination, map_b, barrier, column, k_block * kBlockK, expert);
      } else {
        tma_load_3d(destination, map_b, barrier, k_block * kBlockK, column, expert);
      }
    }
  }
}

// Rows of C that tiles may cover: up to expert_offsets[E], never past the allocation.
__device__ __forceinline__ int forward_valid_rows(const ForwardProblem& problem) {
  return max(0, min(__ldg(problem.expert_offsets + problem.num_experts), problem.rows));
}

// Issues L2 prefetches of the pre boxes (64 columns x 64 rows) a backward epilogue will read for
// the tile at rows [row0, +128), tile columns from n0; by the time the mainloop is done they are
// L2 hits.
template <Epilogue kEpilogue>
__device__ __forceinline__ void prefetch_epilogue_input(const CUtensorMap* map_pre, const ForwardProblem& problem,
                                                        int row0, int n0, int chunks) {
  if constexpr (is_backward_epilogue(kEpilogue)) {
    for (int chunk = 0; chunk < chunks; ++chunk) {
      for (int half = 0; half < kBlockM; half += 64) {  // the map's boxes are 64 rows high
        tma_prefetch_l2_2d(map_pre, n0 + chunk * kChunk, row0 + half);
        if constexpr (kEpilogue == Epilogue::swiglu_backward)
          tma_prefetch_l2_2d(map_pre, problem.n + n0 + chunk * kChunk, row0 + half);
      }
    }
  }
}
#endif

template <int kBlockN, bool kTmaStore>
using ForwardLayout = PipelineLayout<kBlockN, kTmaStore ? kBf16TmaStagingBytes : kBf16StagingBytes>;

// The pingpong kernel's staging adds, for gelu_backward, two 64 x 64 pre boxes per consumer and
// their four mbarriers (SmemPreSource) after the writers' staging.
constexpr int kWriterStagingBytes(bool tma_store) { return tma_store ? kBf16TmaStagingBytes : kBf16StagingBytes; }
constexpr int kPreBoxesBytesPerConsumer = 2 * kBf16BoxBytes;
constexpr int kPreBarrierBytesPerConsumer = 2 * 8;
template <int kBlockN, bool kTmaStore, Epilogue kEpilogue>
using PingpongLayout = PipelineLayout<kBlockN, kWriterStagingBytes(kTmaStore) +
                                                   (kEpilogue == Epilogue::gelu_backward
                                                        ? 2 * (kPreBoxesBytesPerConsumer + kPreBarrierBytesPerConsumer)
                                                        : 0)>;
static_assert(kBf16StagingBytes % kSwizzleAtomBytes == 0 && kBf16TmaStagingBytes % kSwizzleAtomBytes == 0,
              "the pre boxes after the writers' staging stay 1024-byte aligned");

#ifdef SY_SM90A_DEVICE_CODE
// The producer thread of both schedules: streams the TMA loads of this CTA's tiles (blockIdx.x,
// + gridDim.x, ...), every k-block in order, through the kStages ring.
template <int kBlockN, bool kBMNMajor, Epilogue kEpilogue, class Layout>
__device__ __forceinline__ void run_forward_producer(const ForwardMaps& maps, const ForwardProblem& problem,
                                                     const PipelineSmem& smem, int m_tiles, int total_tiles) {
  constexpr int kStages = Layout::kStages;
  // swiglu: a tile holds kBlockN/2 gate and as many up columns of W1 for kBlockN/2 post columns.
  constexpr bool kPairedColumns = kEpilogue == Epilogue::swiglu;
  constexpr int kTileColumns = kPairedColumns ? kBlockN / 2 : kBlockN;
  const CUtensorMap* map_a = &maps.a;
  const CUtensorMap* map_b = &maps.b;
  prefetch_tensor_map(map_a);
  prefetch_tensor_map(map_b);
  if constexpr (is_backward_epilogue(kEpilogue)) prefetch_tensor_map(&maps.pre);
  PipelineState state;
  for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const TileCoord coord = raster_tile(tile, m_tiles, problem.n_tiles);
    const int row0 = coord.m * kBlockM, n0 = coord.n * kTileColumns;
    const int expert = expert_of_row(problem.expert_offsets, problem.num_experts, row0);
    check_segment(problem.expert_offsets, expert, kBlockM, problem.rows);
    const int chunks = min(kTileColumns / kChunk, (problem.n - n0) / kChunk);
    prefetch_epilogue_input<kEpilogue>(&maps.pre, problem, row0, n0, chunks);
    for (int k_block = 0; k_block < problem.k_blocks; ++k_block) {
      mbarrier_wait(smem.empty_barriers + 8 * state.stage, state.phase ^ 1u);
      load_forward_stage<kBMNMajor>(map_a, map_b, smem.full_barriers + 8 * state.stage,
                                    smem.address + Layout::kOffsetA + state.stage * kTileBytesA,
                                    smem.address + Layout::kOffsetB + state.stage * Layout::kTileBytesB, k_block,
                                    row0, n0, expert, chunks, kPairedColumns ? problem.n + n0 : -1,
                                    kTileColumns / kChunk);
      state.advance<kStages>();
    }
  }
}

// Options::row_tokens: the padding mark of row `half_row` of tile `tile` (its first row, or the first
// of its bottom half), loaded one tile ahead so that no L2 round trip sits before a mainloop;
// 0 (a real row) without marks or past the last tile.
__device__ __forceinline__ int tile_row_mark(const ForwardProblem& problem, int tile, int total_tiles, int m_tiles,
                                             int half) {
  if (problem.row_tokens == nullptr || tile >= total_tiles) return 0;
  const TileCoord coord = raster_tile(tile, m_tiles, problem.n_tiles);
  return __ldg(problem.row_tokens + coord.m * kBlockM + half * (kBlockM / 2));
}

// The epilogue writer of one consumer warpgroup (its staging area and named barrier 1 + consumer).
template <bool kTmaStore, Epilogue kEpilogue>
__device__ __forceinline__ auto make_writer(const ForwardMaps& maps, const ForwardProblem& problem, uint8_t* staging,
                                            int consumer, int thread_in_warpgroup) {
  const FragmentPosition position = fragment_position(thread_in_warpgroup);
  if constexpr (kTmaStore) {
    if (thread_in_warpgroup == 0) {
      prefetch_tensor_map(&maps.c);
      if constexpr (kEpilogue == Epilogue::gelu || kEpilogue == Epilogue::swiglu) prefetch_tensor_map(&maps.post);
    }
    return TmaWriter{staging, &maps.c, &maps.post, position, 1 + consumer, thread_in_warpgroup};
  } else {
    return DirectWriter{staging, &problem, position, 1 + consumer, thread_in_warpgroup};
  }
}
#endif

#ifdef SY_SM90A_DEVICE_CODE
// Cooperative consumers: warpgroup `consumer` takes rows [64 consumer, +64) of each of the CTA's
// 128 x kBlockN tiles, then that part of the tile's epilogue, which stores through TMA
// (kTmaStore: maps.c, maps.post) or st.global.
template <int kBlockN, bool kBMNMajor, Epilogue kEpilogue, bool kTmaStore, class Layout>
__device__ __forceinline__ void run_cooperative_consumer(const ForwardMaps& maps, const ForwardProblem& problem,
                                                         const PipelineSmem& smem, int m_tiles, int total_tiles,
                                                         int consumer, int thread_in_warpgroup) {
  constexpr int kStages = Layout::kStages;
  constexpr int kTileColumns = kEpilogue == Epilogue::swiglu ? kBlockN / 2 : kBlockN;
  const int lane = thread_in_warpgroup % 32;
  uint8_t* staging = smem.base + Layout::kOffsetStaging + consumer * (Layout::kStagingBytes / 2);
  const uint32_t a_tiles = smem.address + Layout::kOffsetA + consumer * (kTileBytesA / 2);
  const uint32_t b_tiles = smem.address + Layout::kOffsetB;
  const FragmentPosition position = fragment_position(thread_in_warpgroup);
  auto writer = make_writer<kTmaStore, kEpilogue>(maps, problem, staging, consumer, thread_in_warpgroup);
  float acc[kBlockN / 2];
  PipelineState state;
  int next_mark = tile_row_mark(problem, blockIdx.x, total_tiles, m_tiles, consumer);
  for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const TileCoord coord = raster_tile(tile, m_tiles, problem.n_tiles);
    const int row0 = coord.m * kBlockM + consumer * (kBlockM / 2), n0 = coord.n * kTileColumns;
    const bool padding_rows = next_mark < 0;  // this warpgroup's 64 rows are all padding (zero)
    next_mark = tile_row_mark(problem, tile + gridDim.x, total_tiles, m_tiles, consumer);
    EpilogueInput<kEpilogue> epilogue_input;
    load_epilogue_input<kEpilogue>(problem, row0, n0, thread_in_warpgroup, epilogue_input);
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) acc[i] = 0.0f;
    if (padding_rows) {  // zero rows: acc stays 0, no MMA
      drain_k_blocks<kStages>(problem.k_blocks, smem.full_barriers, smem.empty_barriers, state, lane == 0);
    } else {
      consume_k_blocks<kBlockN, false, kBMNMajor, kStages>(acc, problem.k_blocks, a_tiles, kTileBytesA, b_tiles,
                                                            Layout::kTileBytesB, smem.full_barriers,
                                                            smem.empty_barriers, state, lane == 0);
    }
    run_epilogue<kEpilogue, kBlockN>(acc, problem, row0, n0, epilogue_input, position, writer);
  }
  writer.finish();
}

// Pingpong schedule of the same work: each consumer warpgroup computes whole 128 x kBlockN tiles
// (two m64 wgmmas per k16 slice), consumer 0 the CTA's tiles 0, 2, 4, ..., consumer 1 tiles 1, 3,
// .... The ring holds the k-blocks in CTA tile order, so while one warpgroup runs its epilogue the
// other's mainloop keeps the tensor cores busy: the epilogue (activation math, stores) no longer
// idles them. Each stage is released by the 4 warps of one warpgroup; a consumer skips the other's
// stages by advancing its ring position over them. The mainloops take turns (named barriers
// kOrderBarrier + c: "consumer c may start"): a consumer must not wait on a stage's full barrier
// before the other has waited on that stage's previous phase, or the parity wait would take the
// other's data (a phase two ahead) for its own.
template <int kBlockN, bool kBMNMajor, Epilogue kEpilogue, bool kTmaStore, class Layout>
__device__ __forceinline__ void run_pingpong_consumer(const ForwardMaps& maps, const ForwardProblem& problem,
                                                      const PipelineSmem& smem, int m_tiles, int total_tiles,
                                                      int consumer, int thread_in_warpgroup) {
  static_assert(kBlockN == 128, "two 64 x kBlockN accumulators per thread must fit the registers");
  constexpr bool kSmemPre = kEpilogue == Epilogue::gelu_backward;
  constexpr int kWriterBytes = kWriterStagingBytes(kTmaStore);
  constexpr int kStages = Layout::kStages;
  constexpr int kTileColumns = kEpilogue == Epilogue::swiglu ? kBlockN / 2 : kBlockN;
  const int lane = thread_in_warpgroup % 32;
  uint8_t* staging = smem.base + Layout::kOffsetStaging + consumer * (kWriterBytes / 2);
  const uint32_t a_tiles = smem.address + Layout::kOffsetA;
  const uint32_t b_tiles = smem.address + Layout::kOffsetB;
  const FragmentPosition position = fragment_position(thread_in_warpgroup);
  auto writer = make_writer<kTmaStore, kEpilogue>(maps, problem, staging, consumer, thread_in_warpgroup);
  const int pre_offset = Layout::kOffsetStaging + kWriterBytes;
  SmemPreSource pre_source{smem.base + pre_offset + consumer * kPreBoxesBytesPerConsumer,
                           smem.address + pre_offset + 2 * kPreBoxesBytesPerConsumer +
                               consumer * kPreBarrierBytesPerConsumer,
                           &maps.pre, thread_in_warpgroup};
  if constexpr (kSmemPre) {
    pre_source.init();
    warpgroup_barrier(1 + consumer);  // the initialized barriers are visible to the warpgroup
  }
  auto skip_other_tile = [&](PipelineState& ring) {
    for (int k_block = 0; k_block < problem.k_blocks; ++k_block) ring.advance<kStages>();
  };
  float acc_top[kBlockN / 2], acc_bottom[kBlockN / 2];  // rows [0, 64) and [64, 128) of the tile
  constexpr int kOrderBarrier = 3;  // ids 1 and 2 are the writers' warpgroup barriers
  PipelineState state;
  if (consumer == 1) skip_other_tile(state);
  int next_mark = tile_row_mark(problem, blockIdx.x + consumer * gridDim.x, total_tiles, m_tiles, 1);
  for (int tile = blockIdx.x + consumer * gridDim.x; tile < total_tiles; tile += 2 * gridDim.x) {
    const TileCoord coord = raster_tile(tile, m_tiles, problem.n_tiles);
    const int row0 = coord.m * kBlockM, n0 = coord.n * kTileColumns;
    const bool bottom_padding = next_mark < 0;  // rows [64, 128) of the tile are all padding (zero)
    next_mark = tile_row_mark(problem, tile + 2 * gridDim.x, total_tiles, m_tiles, 1);
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) acc_top[i] = acc_bottom[i] = 0.0f;
    if constexpr (kSmemPre) {  // the top half's pre slices travel during the mainloop
      warpgroup_barrier(1 + consumer);  // every thread is done with the boxes' previous loads
      for (int slice = 0; slice < 2 && n0 + slice * kChunk < problem.n; ++slice)
        pre_source.issue(slice, row0, n0 + slice * kChunk);
    }
    // Every tile but the CTA's first follows the other consumer's mainloop of the tile before it.
    if (tile != int(blockIdx.x)) consumer_pair_wait(kOrderBarrier + consumer);
    if (bottom_padding) {  // the top half only: the rest is zero
      consume_k_blocks<kBlockN, false, kBMNMajor, kStages>(acc_top, problem.k_blocks, a_tiles, kTileBytesA, b_tiles,
                                                            Layout::kTileBytesB, smem.full_barriers,
                                                            smem.empty_barriers, state, lane == 0);
    } else {
      consume_k_blocks_whole_tile<kBlockN, false, kBMNMajor, kStages>(
          acc_top, acc_bottom, problem.k_blocks, a_tiles, kTileBytesA, b_tiles, Layout::kTileBytesB,
          smem.full_barriers, smem.empty_barriers, state, lane == 0);
    }
    if (tile + int(gridDim.x) < total_tiles) consumer_pair_signal(kOrderBarrier + (1 - consumer));
    // The epilogue inputs load only now: the two accumulators leave no registers for them during
    // the mainloop, and their latency hides under the other warpgroup's MMAs.
    auto epilogue_of_half = [&](const float (&acc)[kBlockN / 2], int half_row0) {
      EpilogueInput<kEpilogue> input;
      load_epilogue_input<kEpilogue>(problem, half_row0, n0, thread_in_warpgroup, input);
      run_epilogue<kEpilogue, kBlockN>(acc, problem, half_row0, n0, input, position, writer);
    };
    if constexpr (kSmemPre) {
      gelu_backward_half_from_smem(acc_top, problem, row0, n0, pre_source, row0 + kBlockM / 2, position, writer,
                                   1 + consumer);
      gelu_backward_half_from_smem(acc_bottom, problem, row0 + kBlockM / 2, n0, pre_source, -1, position, writer,
                                   1 + consumer);
    } else {
      epilogue_of_half(acc_top, row0);  // (a runtime choice between the arrays would put them on the stack)
      epilogue_of_half(acc_bottom, row0 + kBlockM / 2);
    }
    skip_other_tile(state);
  }
  writer.finish();
}
#endif

template <int kBlockN, bool kTmaStore, Epilogue kEpilogue, bool kPingpong>
using ForwardKernelLayout = std::conditional_t<kPingpong, PingpongLayout<kBlockN, kTmaStore, kEpilogue>,
                                               ForwardLayout<kBlockN, kTmaStore>>;

// Warp-specialized persistent kernel. Warpgroup 0: one thread streams TMA loads for this CTA's
// tiles through the kStages ring. Warpgroups 1 and 2 consume them, cooperatively or in pingpong.
template <int kBlockN, bool kBMNMajor, Epilogue kEpilogue, bool kTmaStore, bool kPingpong>
__global__ void __launch_bounds__(3 * kWarpgroupThreads, 1)
    forward_pipelined_kernel(const __grid_constant__ ForwardMaps maps, const ForwardProblem problem) {
#ifdef SY_SM90A_DEVICE_CODE
  using Layout = ForwardKernelLayout<kBlockN, kTmaStore, kEpilogue, kPingpong>;
  extern __shared__ uint8_t dynamic_smem[];
  // A stage is read by both consumer warpgroups (cooperative) or by one (pingpong).
  const PipelineSmem smem = setup_pipeline<Layout>(dynamic_smem, kPingpong ? kConsumerWarps / 2 : kConsumerWarps);
  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const int thread_in_warpgroup = threadIdx.x % kWarpgroupThreads;
  const int m_tiles = (forward_valid_rows(problem) + kBlockM - 1) / kBlockM;
  const int total_tiles = m_tiles * problem.n_tiles;

  if (warpgroup == 0) {
    setmaxnreg_decrease<kProducerRegisters>();
    if (thread_in_warpgroup == 0)
      run_forward_producer<kBlockN, kBMNMajor, kEpilogue, Layout>(maps, problem, smem, m_tiles, total_tiles);
    return;
  }
  setmaxnreg_increase<kConsumerRegisters>();
  if constexpr (kPingpong) {
    run_pingpong_consumer<kBlockN, kBMNMajor, kEpilogue, kTmaStore, Layout>(maps, problem, smem, m_tiles, total_tiles,
                                                                            warpgroup - 1, thread_in_warpgroup);
  } else {
    run_cooperative_consumer<kBlockN, kBMNMajor, kEpilogue, kTmaStore, Layout>(
        maps, problem, smem, m_tiles, total_tiles, warpgroup - 1, thread_in_warpgroup);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a code: never run silently
#endif
}

// Basic variant: one CTA (two warpgroups) per 128 x 128 tile, no warp specialization.
template <bool kBMNMajor>
__global__ void __launch_bounds__(2 * kWarpgroupThreads, 1)
    forward_basic_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                         const ForwardProblem problem) {
#ifdef SY_SM90A_DEVICE_CODE
  const int tile_row0 = blockIdx.y * kBlockM, n0 = blockIdx.x * kBasicBlockN;
  if (tile_row0 >= forward_valid_rows(problem)) return;
  extern __shared__ uint8_t dynamic_smem[];
  const uint32_t a_tiles = shared_address(aligned_dynamic_smem(dynamic_smem));
  const uint32_t b_tiles = a_tiles + kBasicStages * kTileBytesA;
  const uint32_t full_barriers = b_tiles + kBasicStages * kBasicTileBytesB;
  const int expert = expert_of_row(problem.expert_offsets, problem.num_experts, tile_row0);
  const int chunks = min(kBasicBlockN / kChunk, (problem.n - n0) / kChunk);
  if (threadIdx.x == 0) check_segment(problem.expert_offsets, expert, kBlockM, problem.rows);
  const int consumer = threadIdx.x / kWarpgroupThreads;
  float acc[kBasicBlockN / 2];
  basic_mainloop<kBasicBlockN, false, kBMNMajor, kBasicStages>(
      acc, problem.k_blocks, a_tiles, consumer * (kTileBytesA / 2), b_tiles, full_barriers,
      [&](int k_block, int stage) {
        load_forward_stage<kBMNMajor>(&map_a, &map_b, full_barriers + 8 * stage, a_tiles + stage * kTileBytesA,
                                      b_tiles + stage * kBasicTileBytesB, k_block, tile_row0, n0, expert, chunks);
      });

  // Epilogue straight from the fragments: bf16 pairs, guarded by N and R.
  const int thread_in_warpgroup = threadIdx.x % kWarpgroupThreads;
  const int warp = thread_in_warpgroup / 32, lane = thread_in_warpgroup % 32;
  const int64_t row = int64_t(tile_row0) + consumer * (kBlockM / 2) + warp * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < kBasicBlockN / 8; ++j) {
    const int column = n0 + j * 8 + (lane % 4) * 2;
    if (column >= problem.n) continue;
    if (row < problem.rows) {
      *reinterpret_cast<uint32_t*>(problem.c + row * problem.n + column) = pack_bf16x2(acc[4 * j], acc[4 * j + 1]);
    }
    if (row + 8 < problem.rows) {
      *reinterpret_cast<uint32_t*>(problem.c + (row + 8) * problem.n + column) =
          pack_bf16x2(acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// Tensor maps of A [R, K] and of B: [E, N, K] with trans_b, else [E, K, N] (N = gemm_n).
ForwardMaps make_forward_maps(const Tensor& a, const Tensor& b, bool trans_b, int64_t gemm_n) {
  const int64_t rows = a.dim(0), k = a.dim(1), experts = b.dim(0);
  ForwardMaps maps;
  const uint64_t dims_a[2] = {uint64_t(k), uint64_t(rows)};
  const uint64_t strides_a[1] = {uint64_t(k) * 2};
  const uint32_t box_a[2] = {kBlockK, kBlockM};
  maps.a = make_bf16_tensor_map(a.data, 2, dims_a, strides_a, box_a);
  // B_e as [N, K] (trans_b, K-major) or [K, N] (N-major); the expert is the outermost coordinate.
  const uint64_t inner = trans_b ? uint64_t(k) : uint64_t(gemm_n), outer = trans_b ? uint64_t(gemm_n) : uint64_t(k);
  const uint64_t dims_b[3] = {inner, outer, uint64_t(experts)};
  const uint64_t strides_b[2] = {inner * 2, inner * outer * 2};
  const uint32_t box_b[3] = {kChunk, kChunk, 1};
  maps.b = make_bf16_tensor_map(b.data, 3, dims_b, strides_b, box_b);
  maps.pre = maps.c = maps.post = maps.a;
  return maps;
}

// A row-major bf16 matrix in `box_rows` x 64 boxes: the TMA-store outputs and the backward
// epilogues' pre (L2 prefetch; the pingpong gelu_backward's shared-memory loads).
CUtensorMap matrix_map(const Tensor& matrix, uint32_t box_rows) {
  const uint64_t dims[2] = {uint64_t(matrix.dim(1)), uint64_t(matrix.dim(0))};
  const uint64_t strides[1] = {uint64_t(matrix.dim(1)) * 2};
  const uint32_t box[2] = {kChunk, box_rows};
  return make_bf16_tensor_map(matrix.data, 2, dims, strides, box);
}

ForwardProblem make_problem(const Tensor& a, const Tensor& expert_offsets, int64_t experts, int64_t n) {
  ForwardProblem problem{};
  problem.expert_offsets = expert_offsets.as<const int>();
  problem.num_experts = int(experts);
  problem.rows = int(a.dim(0));
  problem.n = int(n);
  problem.k_blocks = int(a.dim(1) / kBlockK);
  return problem;
}

template <int kBlockN, bool kBMNMajor, Epilogue kEpilogue, bool kTmaStore>
void launch_pipelined(const ForwardMaps& maps, const ForwardProblem& problem, int64_t m_tiles_upper_bound,
                      bool pingpong, cudaStream_t stream) {
  int smem_bytes = ForwardLayout<kBlockN, kTmaStore>::kSmemBytes;
  auto kernel = forward_pipelined_kernel<kBlockN, kBMNMajor, kEpilogue, kTmaStore, false>;
  if constexpr (kBlockN == 128) {
    if (pingpong) {
      kernel = forward_pipelined_kernel<kBlockN, kBMNMajor, kEpilogue, kTmaStore, true>;
      smem_bytes = PingpongLayout<kBlockN, kTmaStore, kEpilogue>::kSmemBytes;
    }
  }
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  const int64_t tiles = m_tiles_upper_bound * problem.n_tiles;
  const int grid = int(std::min<int64_t>(pingpong ? (tiles + 1) / 2 : tiles, current_device_sm_count()));
  kernel<<<grid, 3 * kWarpgroupThreads, smem_bytes, stream>>>(maps, problem);
  CUDA_CHECK_LAUNCH();
}

// Sets the problem's tile count for the chosen width and launches the pipelined kernel with the
// chosen store and schedule (pingpong: 128-wide tiles). `c` and `post` are the output matrices
// (post: activation epilogues only; c may be null when pre is not kept), for the TMA store's maps.
template <bool kBMNMajor, Epilogue kEpilogue>
void launch_pipelined(int block_n, const Options& options, ForwardMaps maps, ForwardProblem problem, const Tensor* c,
                      const Tensor* post, int64_t m_tiles_upper_bound, cudaStream_t stream) {
  problem.row_tokens = options.row_tokens;
  const bool pingpong = uses_pingpong(options, kEpilogue, problem.k_blocks);
  if (pingpong) block_n = 128;
  const int tile_columns = kEpilogue == Epilogue::swiglu ? block_n / 2 : block_n;
  problem.n_tiles = (problem.n + tile_columns - 1) / tile_columns;
  if (options.store != Store::direct) {  // warps is a weight-grad choice: tma here
    if (c) maps.c = matrix_map(*c, 64);
    if (post) maps.post = matrix_map(*post, 64);
    if (block_n == 256) {
      launch_pipelined<256, kBMNMajor, kEpilogue, true>(maps, problem, m_tiles_upper_bound, false, stream);
    } else {
      launch_pipelined<128, kBMNMajor, kEpilogue, true>(maps, problem, m_tiles_upper_bound, pingpong, stream);
    }
  } else if (block_n == 256) {
    launch_pipelined<256, kBMNMajor, kEpilogue, false>(maps, problem, m_tiles_upper_bound, false, stream);
  } else {
    launch_pipelined<128, kBMNMajor, kEpilogue, false>(maps, problem, m_tiles_upper_bound, pingpong, stream);
  }
}

template <bool kBMNMajor>
void launch_basic(const CUtensorMap& map_a, const CUtensorMap& map_b, const ForwardProblem& problem,
                  int64_t m_tiles_upper_bound, cudaStream_t stream) {
  auto kernel = forward_basic_kernel<kBMNMajor>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBasicSmemBytes));
  SY_CHECK(m_tiles_upper_bound <= 65535, "sm90 basic grouped GEMM: ", m_tiles_upper_bound, " row tiles exceed the grid");
  const dim3 grid(unsigned(problem.n_tiles), unsigned(m_tiles_upper_bound));
  kernel<<<grid, 2 * kWarpgroupThreads, kBasicSmemBytes, stream>>>(map_a, map_b, problem);
  CUDA_CHECK_LAUNCH();
}

int64_t m_tile_bound(const Tensor& a) { return (a.dim(0) + kBlockM - 1) / kBlockM; }

}  // namespace
}  // namespace detail

void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c,
                  const Options& options, void* stream) {
  using namespace detail;
  SY_CHECK(supported(a, b, trans_b, expert_offsets, c), "sm90::grouped_gemm: unsupported problem: a ", a.describe(),
           ", b ", b.describe(), trans_b ? " (trans_b)" : "", ", expert_offsets ", expert_offsets.describe(), ", c ",
           c.describe());
  const int64_t rows = a.dim(0), n = c.dim(1);
  if (rows == 0) return;
  const ForwardMaps maps = make_forward_maps(a, b, trans_b, n);
  ForwardProblem problem = make_problem(a, expert_offsets, b.dim(0), n);
  problem.c = c.as<__nv_bfloat16>();
  const int64_t m_tiles = m_tile_bound(a);
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  if (options.variant == Variant::basic) {
    problem.n_tiles = int((n + kBasicBlockN - 1) / kBasicBlockN);
    if (trans_b) {
      launch_basic<false>(maps.a, maps.b, problem, m_tiles, cuda_stream);
    } else {
      launch_basic<true>(maps.a, maps.b, problem, m_tiles, cuda_stream);
    }
    return;
  }
  const int block_n = choose_block_n(options, n, m_tiles);
  if (trans_b) {
    launch_pipelined<false, Epilogue::store>(block_n, options, maps, problem, &c, nullptr, m_tiles, cuda_stream);
  } else {
    launch_pipelined<true, Epilogue::store>(block_n, options, maps, problem, &c, nullptr, m_tiles, cuda_stream);
  }
}

void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c,
                  void* stream) {
  grouped_gemm(a, b, trans_b, expert_offsets, c, default_options(), stream);
}

void grouped_gemm_activation(ExpertActivation activation, const Tensor& a, const Tensor& w1,
                             const Tensor& expert_offsets, Tensor* pre, Tensor& post, const Options& options,
                             void* stream) {
  using namespace detail;
  SY_CHECK(options.variant == Variant::pipelined, "sm90::grouped_gemm_activation: the fused epilogue needs the "
           "pipelined kernel");
  SY_CHECK(activation_supported(activation, a, w1, expert_offsets, pre, post),
           "sm90::grouped_gemm_activation: unsupported problem: a ", a.describe(), ", w1 ", w1.describe(),
           ", expert_offsets ", expert_offsets.describe(), ", pre ", pre ? pre->describe() : std::string("(not kept)"),
           ", post ", post.describe());
  if (a.dim(0) == 0) return;
  const int64_t gemm_n = w1.dim(2), width = post.dim(1);
  const ForwardMaps maps = make_forward_maps(a, w1, false, gemm_n);
  ForwardProblem problem = make_problem(a, expert_offsets, w1.dim(0), width);
  problem.c = pre ? pre->as<__nv_bfloat16>() : nullptr;
  problem.post = post.as<__nv_bfloat16>();
  const int64_t m_tiles = m_tile_bound(a);
  const int block_n = choose_block_n(options, gemm_n, m_tiles);
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  if (activation == ExpertActivation::swiglu) {
    launch_pipelined<true, Epilogue::swiglu>(block_n, options, maps, problem, pre, &post, m_tiles, cuda_stream);
  } else {
    launch_pipelined<true, Epilogue::gelu>(block_n, options, maps, problem, pre, &post, m_tiles, cuda_stream);
  }
}

void grouped_gemm_activation_backward(ExpertActivation activation, const Tensor& grad_out, const Tensor& w2,
                                      const Tensor& expert_offsets, const Tensor& pre, Tensor& grad_pre,
                                      const Options& options, void* stream) {
  using namespace detail;
  SY_CHECK(options.variant == Variant::pipelined, "sm90::grouped_gemm_activation_backward: the fused epilogue needs "
           "the pipelined kernel");
  SY_CHECK(activation_backward_supported(activation, grad_out, w2, expert_offsets, pre, grad_pre),
           "sm90::grouped_gemm_activation_backward: unsupported problem: grad_out ", grad_out.describe(), ", w2 ",
           w2.describe(), ", expert_offsets ", expert_offsets.describe(), ", pre ", pre.describe(), ", grad_pre ",
           grad_pre.describe());
  const int64_t rows = grad_out.dim(0), width = w2.dim(1);
  if (rows == 0) return;
  ForwardMaps maps = make_forward_maps(grad_out, w2, true, width);
  maps.pre = matrix_map(pre, 64);
  ForwardProblem problem = make_problem(grad_out, expert_offsets, w2.dim(0), width);
  problem.c = grad_pre.as<__nv_bfloat16>();
  problem.pre = pre.as<const __nv_bfloat16>();
  const int64_t m_tiles = m_tile_bound(grad_out);
  const int block_n = choose_block_n(options, width, m_tiles);
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  if (activation == ExpertActivation::swiglu) {
    launch_pipelined<false, Epilogue::swiglu_backward>(block_n, options, maps, problem, &grad_pre, nullptr, m_tiles,
                                                       cuda_stream);
  } else {
    launch_pipelined<false, Epilogue::gelu_backward>(block_n, options, maps, problem, &grad_pre, nullptr, m_tiles,
                                                     cuda_stream);
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
