// The cross-tile phases of the router forward kernel (src/ops/cuda/routing.cu; its top comment
// describes the phases): phase 2a, the scans of the column counts over the tiles and the fixed-order
// float reductions, spread over the grid; and block 0's layout outputs of phase 2b (expert offsets,
// scalars, the aux loss). Included by routing.cu only.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/cuda/routing_forward_args.cuh"
#include "src/ops/moe_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

// Phase 2a: tiles each lane of an item's group loads at once (independent L2 loads in flight).
constexpr int kTilesPerLoad = 8;

// ---- Phase 2a: scans over tiles and the float reductions, one lane group per item --------------

// Column `column` of tile_columns (or nothing when !active; every lane of the warp calls this):
// counts -> counts of all earlier tiles (in place), the total to column_totals. Lane m of the
// group takes kTilesPerLoad consecutive tiles of each chunk of kTilesPerLoad * G tiles: independent
// L2 loads, then one scan over the group per chunk.
__device__ __forceinline__ void scan_column(const RouteArgs& args, int lanes, bool active, int column, int member) {
  const RouteWorkspace& workspace = args.workspace;
  const int columns = args.params.num_experts * args.params.k_max, num_tiles = args.num_tiles;
  int carry = 0;
  for (int chunk = 0; chunk < num_tiles; chunk += kTilesPerLoad * lanes) {
    const int first = chunk + member * kTilesPerLoad;
    int values[kTilesPerLoad], member_sum = 0;
#pragma unroll
    for (int q = 0; q < kTilesPerLoad; ++q) {
      values[q] = active && first + q < num_tiles
                      ? __ldcg(workspace.tile_columns + int64_t(first + q) * columns + column) : 0;
      member_sum += values[q];
    }
    int inclusive = member_sum;
#pragma unroll
    for (int offset = 1; offset < lanes; offset <<= 1) {
      const int other = __shfl_up_sync(kFullWarpMask, inclusive, offset, lanes);
      if (member >= offset) inclusive += other;
    }
    int running = carry + inclusive - member_sum;
#pragma unroll
    for (int q = 0; q < kTilesPerLoad; ++q) {
      if (active && first + q < num_tiles) workspace.tile_columns[int64_t(first + q) * columns + column] = running;
      running += values[q];
    }
    carry += __shfl_sync(kFullWarpMask, inclusive, lanes - 1, lanes);
  }
  if (active && member == 0) workspace.column_totals[column] = carry;
}

// sum over tiles of values[tile * stride] in a fixed order: member m adds tiles m, m+G, ... in
// turn (loaded kTilesPerLoad at a time), then the group's xor tree. Every lane of the warp calls this.
__device__ __forceinline__ float sum_over_tiles(const float* values, int64_t stride, int num_tiles, int lanes,
                                                bool active, int member) {
  float sum = 0.0f;
  if (active) {
    for (int base = member; base < num_tiles; base += kTilesPerLoad * lanes) {
      float loaded[kTilesPerLoad];
#pragma unroll
      for (int q = 0; q < kTilesPerLoad; ++q) {
        const int tile = base + q * lanes;
        loaded[q] = tile < num_tiles ? __ldcg(values + int64_t(tile) * stride) : 0.0f;
      }
#pragma unroll
      for (int q = 0; q < kTilesPerLoad; ++q) sum += loaded[q];
    }
  }
  for (int offset = lanes / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFullWarpMask, sum, offset);
  return sum;
}

__device__ __forceinline__ void scan_tiles_and_reduce(const RouteArgs& args) {
  const int num_experts = args.params.num_experts, columns = num_experts * args.params.k_max;
  int lanes = 1;  // per item: enough that one load of kTilesPerLoad tiles per lane covers most counts
  while (lanes < 32 && lanes * kTilesPerLoad < args.num_tiles) lanes *= 2;
  const int items_per_warp = 32 / lanes, warps_per_block = blockDim.x / 32;
  const int lane = threadIdx.x % 32, member = lane % lanes, float_items = num_experts + 1;
  const int items = columns + float_items, items_per_round = int(gridDim.x) * warps_per_block * items_per_warp;
  // Uniform trip count over the warp (the shuffles need every lane); inactive groups add nothing.
  for (int base = (int(blockIdx.x) * warps_per_block + int(threadIdx.x / 32)) * items_per_warp; base < items;
       base += items_per_round) {
    const int item = base + lane / lanes, float_item = item - columns;
    if (base < columns) scan_column(args, lanes, item < columns, item, member);
    if (base + items_per_warp <= columns) continue;  // every item of this warp was a column
    const bool is_float = item >= columns && item < items;
    const float sum = sum_over_tiles(args.workspace.float_partials + (is_float ? float_item : 0), float_items,
                                     args.num_tiles, lanes, is_float, member);
    if (!is_float || member != 0) continue;
    if (float_item < num_experts) args.prob_sums[float_item] = sum;
    else args.losses[kZLoss] = args.params.z_loss_weight * sum / float(max(args.params.num_tokens, int64_t(1)));
  }
}

// ---- Phase 2b: block 0's layout outputs (expert_offsets, scalars, the aux loss) from the per-expert
// totals in shared memory; one warp.
__device__ __forceinline__ void write_layout(const RouteArgs& args, const int* expert_total, const int* first_choice,
                                             const float* prob_sum) {
  const int num_experts = args.params.num_experts, lane = threadIdx.x % 32;
  const float token_count = float(args.params.num_tokens > 0 ? args.params.num_tokens : 1);
  // Each lane owns a contiguous run of experts, so one warp scan gives the offsets.
  const int per_lane = (num_experts + 31) / 32;
  const int begin = min(lane * per_lane, num_experts), end = min(begin + per_lane, num_experts);
  int lane_choices = 0;
  float lane_aux = 0.0f;
  for (int expert = begin; expert < end; ++expert) {
    lane_choices += expert_total[expert];
    lane_aux += (float(first_choice[expert]) / token_count) * (prob_sum[expert] / token_count);
  }
  const int total_choices = warp_sum(lane_choices);
  const float aux_sum = warp_sum(lane_aux);
  int capacity = INT_MAX;
  if (!args.params.dropless) {
    const double wanted = ceil(double(args.params.capacity_factor) * double(total_choices) / double(num_experts));
    capacity = wanted >= double(INT_MAX) ? INT_MAX : int(wanted);
  }
  const int alignment = args.params.segment_alignment;
  int lane_rows = 0, lane_dropped = 0;
  for (int expert = begin; expert < end; ++expert) {
    const int kept = min(expert_total[expert], capacity);
    lane_dropped += expert_total[expert] - kept;
    lane_rows += (kept + alignment - 1) / alignment * alignment;
  }
  int inclusive_rows = lane_rows;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(kFullWarpMask, inclusive_rows, offset);
    if (lane >= offset) inclusive_rows += other;
  }
  int row = inclusive_rows - lane_rows;
  for (int expert = begin; expert < end; ++expert) {
    args.expert_offsets[expert] = row;
    const int kept = min(expert_total[expert], capacity);
    row += (kept + alignment - 1) / alignment * alignment;
  }
  const int padded_rows = __shfl_sync(kFullWarpMask, inclusive_rows, 31);
  const int dropped = warp_sum(lane_dropped);
  if (lane == 0) {
    args.expert_offsets[num_experts] = padded_rows;
    args.scalars[kCapacity] = capacity;
    args.scalars[kTotalChoices] = total_choices;
    args.scalars[kDroppedChoices] = dropped;
    args.scalars[kPaddedRows] = padded_rows;
    args.losses[kAuxLoss] = args.params.aux_loss_weight * float(num_experts) * aux_sum;
    args.losses[kSeqAuxLoss] = 0.0f;     // written by the sequence-loss pass when its weight is > 0
    args.losses[kGlobalAuxLoss] = 0.0f;  // written by global_balance_loss
  }
}

}  // namespace
}  // namespace switchyard
