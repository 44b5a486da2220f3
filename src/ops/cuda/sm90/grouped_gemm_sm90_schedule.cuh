// The tile scheduler of the sm_90a grouped GEMM kernels (device code only): which expert owns a
// row, the checks of a segment's layout contract, the k-blocks of a weight-grad segment that hold
// real rows, and the grouped raster order of the tiles.
#pragma once

#include "src/ops/cuda/sm90/grouped_gemm_sm90_common.cuh"

namespace switchyard {
namespace cuda {
namespace sm90 {
namespace detail {

#ifdef SY_SM90A_DEVICE_CODE

// The expert owning `row`: the largest e < E with offsets[e] <= row (empty experts share offsets).
__device__ __forceinline__ int expert_of_row(const int* offsets, int num_experts, int row) {
  int low = 0, high = num_experts - 1;
  while (low < high) {
    const int middle = (low + high + 1) >> 1;
    if (__ldg(offsets + middle) <= row) {
      low = middle;
    } else {
      high = middle - 1;
    }
  }
  return low;
}

// Segments must be whole stages/tiles: a violated layout contract is a bug upstream, so stop loudly
// (an illegal-instruction trap; compute-sanitizer shows this line). No printf here: a function call
// in the kernel would make ptxas serialize the wgmma pipeline.
__device__ __forceinline__ void check_segment(const int* offsets, int expert, int alignment, int rows) {
  const int begin = __ldg(offsets + expert), end = __ldg(offsets + expert + 1);
  if (begin % alignment != 0 || end % alignment != 0 || begin < 0 || end < begin || end > rows) __trap();
}

// The k-blocks (64 rows each) of a weight-grad segment from `begin` that hold any real row: the
// trailing all-padding ones dropped (padding is under one segment alignment: 0 or 1 of them at 128).
__device__ __forceinline__ int real_k_blocks(const int* row_tokens, int begin, int k_blocks) {
  if (row_tokens == nullptr) return k_blocks;
  while (k_blocks > 0 && __ldg(row_tokens + begin + (k_blocks - 1) * kBlockK) < 0) --k_blocks;
  return k_blocks;
}

struct TileCoord {
  int m;
  int n;
};

// Grouped raster: runs of kRasterGroupM m-tiles sweep the n-tiles together, so concurrently running
// CTAs share A row blocks and B column blocks in L2.
__device__ __forceinline__ TileCoord raster_tile(int tile, int m_tiles, int n_tiles) {
  const int tiles_per_group = kRasterGroupM * n_tiles;
  const int group = tile / tiles_per_group;
  const int first_m = group * kRasterGroupM;
  const int group_m = min(kRasterGroupM, m_tiles - first_m);
  const int local = tile - group * tiles_per_group;
  return TileCoord{first_m + local % group_m, local / group_m};
}

#endif  // SY_SM90A_DEVICE_CODE

}  // namespace detail
}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
