// The router forward kernel's data (src/ops/cuda/routing.cu; its top comment describes the kernel):
// its arguments, its global scratch and the carving of its dynamic shared memory. Included only by
// routing.cu and the headers of its phases (routing_forward_tile.cuh, routing_forward_cross_tile.cuh):
// the anonymous namespace keeps all of it in that one translation unit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/cuda/routing_layout.h"
#include "src/ops/moe_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

// Global scratch of the kernel. `arrivals` is zero at kernel start (the last block out restores it).
struct RouteWorkspace {
  unsigned* arrivals;
  int* tile_columns;      // [num_tiles][K*E]: counts of each tile, then (phase 2a) counts of earlier tiles
  int* column_totals;     // [K*E]
  float* float_partials;  // [num_tiles][E + 1]: prob sums of each expert, then the sum of lse^2
};

struct RouteArgs {
  RoutingParams params;
  const float *logits, *complexity;
  const float* selection_bias;  // fp32 [E] or nullptr
  int num_tiles;
  bool vector_loads;
  bool grouped;         // group-limited routing with topk_groups < num_groups
  int group_size;       // E / num_groups
  int lanes_per_group;  // group_size / lanes' slice width when groups cover whole lanes (a power of two); 0: the
                        // group limit goes through shared memory
  float entropy_scale;  // 1 / ln E (0 for E = 1): normalizes the router entropy to [0, 1]
  routing_layout::ForwardShared shared_layout;  // byte offsets in the dynamic shared memory
  int group_floats;     // floats of group scratch per warp (routing_layout::group_scratch_floats_per_warp)
  // Outputs (RoutingResult).
  int *expert_ids, *slots, *token_k, *expert_counts, *first_choice_counts, *expert_offsets, *scalars;
  float *gates, *logsumexp, *prob_sums, *losses;
  RouteWorkspace workspace;
};

// Shared memory of the kernel, carved from one dynamic allocation at the offsets of
// routing_layout::forward_shared (which the host also uses for the size). choice_base and
// tile_offset serve phase 2b, the rest phase 1; phase 2b reuses warp_floats (max(W, 3) rows of E + 1
// words) for the expert totals, first-choice counts and prob sums, and reads the last tile's
// choices, ranks and warp offsets where phase 1 left them. bias (the selection bias, zero-padded to
// the lane layout's width) and group_scratch (keys, group scores and kept flags of the tokens of
// each warp's pass) exist only for calls that use them.
struct RouteShared {
  int *choice_base, *tile_offset;                              // [K*E] each
  float *warp_floats, *choice_gates, *token_lse, *token_norm;  // [W][E + 1] (as float_partials), [tile][K], [tile]
  float *bias, *group_scratch;                                 // [lanes], [W][group_floats]
  uint16_t* warp_counts;                                       // [W][K*E]
  int16_t* choice_experts;                                     // [tile][K]; valid for choices < token_choices
  uint8_t *choice_ranks, *token_choices;                       // [tile][K], [tile] (k_t; 0 past the last token)
  __device__ RouteShared(unsigned char* base, const routing_layout::ForwardShared& layout) {
    choice_base = reinterpret_cast<int*>(base + layout.choice_base);
    tile_offset = reinterpret_cast<int*>(base + layout.tile_offset);
    warp_floats = reinterpret_cast<float*>(base + layout.warp_floats);
    choice_gates = reinterpret_cast<float*>(base + layout.choice_gates);
    token_lse = reinterpret_cast<float*>(base + layout.token_lse);
    token_norm = reinterpret_cast<float*>(base + layout.token_norm);
    bias = reinterpret_cast<float*>(base + layout.bias);
    group_scratch = reinterpret_cast<float*>(base + layout.group_scratch);
    warp_counts = reinterpret_cast<uint16_t*>(base + layout.warp_counts);
    choice_experts = reinterpret_cast<int16_t*>(base + layout.choice_experts);
    choice_ranks = reinterpret_cast<uint8_t*>(base + layout.choice_ranks);
    token_choices = reinterpret_cast<uint8_t*>(base + layout.token_choices);
  }
};

}  // namespace
}  // namespace switchyard
