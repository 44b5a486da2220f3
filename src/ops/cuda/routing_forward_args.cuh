// The router forward kernel's data (src/ops/cuda/routing.cu; its top comment describes the kernel):
// its arguments, its global scratch and the carving of its dynamic shared memory. Included only by
// routing.cu and the headers of its phases (routing_forward_tile.cuh, routing_forward_cross_tile.cuh):
// the anonymous namespace keeps all of it in that one translation unit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "src/ops/cuda/cuda_common.cuh"
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
  int num_tiles;
  bool vector_loads;
  float entropy_scale;  // 1 / ln E (0 for E = 1): normalizes the router entropy to [0, 1]
  // Outputs (RoutingResult).
  int *expert_ids, *slots, *token_k, *expert_counts, *first_choice_counts, *expert_offsets, *scalars;
  float *gates, *logsumexp, *prob_sums, *losses;
  RouteWorkspace workspace;
};

// Shared memory of the kernel, carved from one dynamic allocation (4-byte items first; the host
// builds it on a null base for the size). choice_base and tile_offset serve phase 2b, the rest
// phase 1; phase 2b reuses warp_floats (max(W, 3) rows of E + 1 words) for the expert totals, first-choice
// counts and prob sums, and reads the last tile's choices, ranks and warp offsets where phase 1 left them.
struct RouteShared {
  int *choice_base, *tile_offset;                         // [K*E] each
  float *warp_floats, *choice_gates, *token_lse, *token_norm;  // [W][E + 1] (as float_partials), [tile][K], [tile]
  uint16_t* warp_counts;                                  // [W][K*E]
  int16_t* choice_experts;                                // [tile][K]; valid for choices < token_choices
  uint8_t *choice_ranks, *token_choices;                  // [tile][K], [tile] (k_t; 0 past the last token)
  size_t bytes = 0;
  __host__ __device__ RouteShared(unsigned char* base, int num_experts, int k_max, int num_warps) {
    const size_t tile = size_t(num_warps) * 32, columns = size_t(num_experts) * k_max, choices = tile * k_max;
    auto take = [&](size_t count, size_t item_bytes) {
      void* at = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(base) + bytes);
      bytes += (count * item_bytes + 15) / 16 * 16;
      return at;
    };
    choice_base = static_cast<int*>(take(columns, 4));
    tile_offset = static_cast<int*>(take(columns, 4));
    warp_floats = static_cast<float*>(take(size_t(num_warps > 3 ? num_warps : 3) * (num_experts + 1), 4));
    choice_gates = static_cast<float*>(take(choices, 4));
    token_lse = static_cast<float*>(take(tile, 4));
    token_norm = static_cast<float*>(take(tile, 4));
    warp_counts = static_cast<uint16_t*>(take(size_t(num_warps) * columns, 2));
    choice_experts = static_cast<int16_t*>(take(choices, 2));
    choice_ranks = static_cast<uint8_t*>(take(choices, 1));
    token_choices = static_cast<uint8_t*>(take(tile, 1));
  }
};

}  // namespace
}  // namespace switchyard
