// sm_90a grouped GEMM, forward: C[r, :] = A[r, :] * op(B_e) for the rows r of each expert segment.
//
// A [R, K] bf16 row-major (K-major operand), B [E, K, N] bf16 (N-major operand: wgmma transposes it
// from shared memory) or, with trans_b, B [E, N, K] (K-major), C [R, N] bf16; fp32 accumulation.
// Tiles are 128 rows x block_n columns; a tile's 128 rows belong to one expert (segments are
// multiples of 128 rows), found by a binary search of expert_offsets on the device. Tiles at or
// beyond expert_offsets[E] are not scheduled.
//
// Shared-memory layouts, descriptors and PTX wrappers: grouped_gemm_sm90_common.cuh.
#include "kernels/cuda/grouped_gemm_sm90_common.cuh"
#include "src/core/cuda_check.h"

namespace switchyard {
namespace cuda {
namespace sm90 {
namespace detail {
namespace {

#ifdef SY_SM90A_DEVICE_CODE
// Issues the TMA loads of one stage: A rows [row0, row0+128) x K block, and `chunks` 64-column
// pieces of op(B_e)'s tile (pieces past N are skipped; their accumulator columns are never stored).
template <bool kBMNMajor>
__device__ __forceinline__ void load_forward_stage(const CUtensorMap* map_a, const CUtensorMap* map_b,
                                                   uint32_t barrier, uint32_t a_tile, uint32_t b_tile, int k_block,
                                                   int row0, int n0, int expert, int chunks) {
  mbarrier_arrive_expect_tx(barrier, kTileBytesA + chunks * kChunkBytes);
  tma_load_2d(a_tile, map_a, barrier, k_block * kBlockK, row0);
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int column = n0 + chunk * kChunk;
    if constexpr (kBMNMajor) {
      tma_load_3d(b_tile + chunk * kChunkBytes, map_b, barrier, column, k_block * kBlockK, expert);
    } else {
      tma_load_3d(b_tile + chunk * kChunkBytes, map_b, barrier, k_block * kBlockK, column, expert);
    }
  }
}

// Rows of C that tiles may cover: up to expert_offsets[E], never past the allocation.
__device__ __forceinline__ int forward_valid_rows(const ForwardProblem& problem) {
  return max(0, min(__ldg(problem.expert_offsets + problem.num_experts), problem.rows));
}
#endif

// Warp-specialized persistent kernel. Warpgroup 0: one thread streams TMA loads for this CTA's
// tiles through the kStages ring. Warpgroups 1 and 2: rows [0, 64) and [64, 128) of each tile.
template <int kBlockN, bool kBMNMajor>
__global__ void __launch_bounds__(3 * kWarpgroupThreads, 1)
    forward_pipelined_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                             const ForwardProblem problem) {
#ifdef SY_SM90A_DEVICE_CODE
  using Layout = PipelineLayout<kBlockN, true>;
  constexpr int kStages = Layout::kStages;
  extern __shared__ uint8_t dynamic_smem[];
  const PipelineSmem smem = setup_pipeline<Layout>(dynamic_smem);
  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const int thread_in_warpgroup = threadIdx.x % kWarpgroupThreads;
  const int m_tiles = (forward_valid_rows(problem) + kBlockM - 1) / kBlockM;
  const int total_tiles = m_tiles * problem.n_tiles;

  if (warpgroup == 0) {
    setmaxnreg_decrease<kProducerRegisters>();
    if (thread_in_warpgroup != 0) return;
    prefetch_tensor_map(&map_a);
    prefetch_tensor_map(&map_b);
    PipelineState state;
    for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
      const TileCoord coord = raster_tile(tile, m_tiles, problem.n_tiles);
      const int row0 = coord.m * kBlockM, n0 = coord.n * kBlockN;
      const int expert = expert_of_row(problem.expert_offsets, problem.num_experts, row0);
      check_segment(problem.expert_offsets, expert, kBlockM, problem.rows);
      const int chunks = min(kBlockN / kChunk, (problem.n - n0) / kChunk);
      for (int k_block = 0; k_block < problem.k_blocks; ++k_block) {
        mbarrier_wait(smem.empty_barriers + 8 * state.stage, state.phase ^ 1u);
        load_forward_stage<kBMNMajor>(&map_a, &map_b, smem.full_barriers + 8 * state.stage,
                                      smem.address + Layout::kOffsetA + state.stage * kTileBytesA,
                                      smem.address + Layout::kOffsetB + state.stage * Layout::kTileBytesB, k_block,
                                      row0, n0, expert, chunks);
        state.advance<kStages>();
      }
    }
    return;
  }

  setmaxnreg_increase<kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int warp = thread_in_warpgroup / 32, lane = thread_in_warpgroup % 32;
  const int fragment_row = warp * 16 + lane / 4;  // wgmma D layout: rows r and r + 8, column pairs
  const int fragment_column = (lane % 4) * 2;
  uint8_t* staging = smem.base + Layout::kOffsetStaging + consumer * kStagingBytesPerWarpgroup;
  const uint32_t a_tiles = smem.address + Layout::kOffsetA + consumer * (kTileBytesA / 2);
  const uint32_t b_tiles = smem.address + Layout::kOffsetB;
  float acc[kBlockN / 2];
  PipelineState state;
  for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const TileCoord coord = raster_tile(tile, m_tiles, problem.n_tiles);
    const int row0 = coord.m * kBlockM + consumer * (kBlockM / 2), n0 = coord.n * kBlockN;
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) acc[i] = 0.0f;
    consume_k_blocks<kBlockN, false, kBMNMajor, kStages>(acc, problem.k_blocks, a_tiles, kTileBytesA, b_tiles,
                                                          Layout::kTileBytesB, smem.full_barriers,
                                                          smem.empty_barriers, state, lane == 0);
    // Epilogue, one 64-column slice at a time: fragments -> bf16 in the padded staging rows ->
    // 16-byte coalesced stores (8 threads per 128-byte row segment).
#pragma unroll
    for (int slice = 0; slice < kBlockN / kChunk; ++slice) {
      const int slice_column = n0 + slice * kChunk;
      if (slice_column >= problem.n) break;  // uniform over the warpgroup
#pragma unroll
      for (int j = 0; j < kChunk / 8; ++j) {
        const float* pair = acc + 4 * (slice * (kChunk / 8) + j);
        const int byte_column = (j * 8 + fragment_column) * 2;
        *reinterpret_cast<uint32_t*>(staging + fragment_row * kStagingPitch + byte_column) =
            pack_bf16x2(pair[0], pair[1]);
        *reinterpret_cast<uint32_t*>(staging + (fragment_row + 8) * kStagingPitch + byte_column) =
            pack_bf16x2(pair[2], pair[3]);
      }
      warpgroup_barrier(1 + consumer);
#pragma unroll
      for (int pass = 0; pass < 64 * 8 / kWarpgroupThreads; ++pass) {
        const int piece = pass * kWarpgroupThreads + thread_in_warpgroup;
        const int row = piece / 8, piece_column = (piece % 8) * 8;
        const uint4 value = *reinterpret_cast<const uint4*>(staging + row * kStagingPitch + piece_column * 2);
        const int64_t global_row = int64_t(row0) + row;
        if (global_row < problem.rows) {
          *reinterpret_cast<uint4*>(problem.c + global_row * problem.n + slice_column + piece_column) = value;
        }
      }
      warpgroup_barrier(1 + consumer);
    }
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

template <int kBlockN, bool kBMNMajor>
void launch_pipelined(const CUtensorMap& map_a, const CUtensorMap& map_b, const ForwardProblem& problem,
                      int64_t m_tiles_upper_bound, cudaStream_t stream) {
  constexpr int kSmemBytes = PipelineLayout<kBlockN, true>::kSmemBytes;
  auto kernel = forward_pipelined_kernel<kBlockN, kBMNMajor>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  const int64_t tiles = m_tiles_upper_bound * problem.n_tiles;
  const int grid = int(std::min<int64_t>(tiles, current_device_sm_count()));
  kernel<<<grid, 3 * kWarpgroupThreads, kSmemBytes, stream>>>(map_a, map_b, problem);
  CUDA_CHECK_LAUNCH();
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

}  // namespace
}  // namespace detail

void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c,
                  const Options& options, void* stream) {
  using namespace detail;
  SY_CHECK(supported(a, b, trans_b, expert_offsets, c), "sm90::grouped_gemm: unsupported problem: a ", a.describe(),
           ", b ", b.describe(), trans_b ? " (trans_b)" : "", ", expert_offsets ", expert_offsets.describe(), ", c ",
           c.describe());
  const int64_t rows = a.dim(0), k = a.dim(1), n = c.dim(1), experts = b.dim(0);
  if (rows == 0) return;
  const uint64_t dims_a[2] = {uint64_t(k), uint64_t(rows)};
  const uint64_t strides_a[1] = {uint64_t(k) * 2};
  const uint32_t box_a[2] = {kBlockK, kBlockM};
  const CUtensorMap map_a = make_bf16_tensor_map(a.data, 2, dims_a, strides_a, box_a);
  // B_e as [N, K] (trans_b, K-major) or [K, N] (N-major); the expert is the outermost coordinate.
  const uint64_t inner = trans_b ? uint64_t(k) : uint64_t(n), outer = trans_b ? uint64_t(n) : uint64_t(k);
  const uint64_t dims_b[3] = {inner, outer, uint64_t(experts)};
  const uint64_t strides_b[2] = {inner * 2, inner * outer * 2};
  const uint32_t box_b[3] = {kChunk, kChunk, 1};
  const CUtensorMap map_b = make_bf16_tensor_map(b.data, 3, dims_b, strides_b, box_b);

  ForwardProblem problem{};
  problem.expert_offsets = expert_offsets.as<const int>();
  problem.c = c.as<__nv_bfloat16>();
  problem.num_experts = int(experts);
  problem.rows = int(rows);
  problem.n = int(n);
  problem.k_blocks = int(k / kBlockK);
  const int64_t m_tiles = (rows + kBlockM - 1) / kBlockM;
  cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  if (options.variant == Variant::basic) {
    problem.n_tiles = int((n + kBasicBlockN - 1) / kBasicBlockN);
    if (trans_b) {
      launch_basic<false>(map_a, map_b, problem, m_tiles, cuda_stream);
    } else {
      launch_basic<true>(map_a, map_b, problem, m_tiles, cuda_stream);
    }
    return;
  }
  const int block_n = choose_block_n(options, n, m_tiles);
  problem.n_tiles = int((n + block_n - 1) / block_n);
  if (block_n == 256) {
    if (trans_b) {
      launch_pipelined<256, false>(map_a, map_b, problem, m_tiles, cuda_stream);
    } else {
      launch_pipelined<256, true>(map_a, map_b, problem, m_tiles, cuda_stream);
    }
  } else {
    if (trans_b) {
      launch_pipelined<128, false>(map_a, map_b, problem, m_tiles, cuda_stream);
    } else {
      launch_pipelined<128, true>(map_a, map_b, problem, m_tiles, cuda_stream);
    }
  }
}

void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c,
                  void* stream) {
  grouped_gemm(a, b, trans_b, expert_offsets, c, default_options(), stream);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
