// Per-lane pieces of the router forward kernel's per-token phase (src/ops/cuda/routing.cu; its top
// comment describes the kernel): the MUFU exp, pairwise trees over one lane's slice of a token's
// row (kPerLane consecutive experts; src/ops/cuda/routing_layout.h), and one top-k round over the
// token's lanes. Included by the phase headers
// routing_forward_tile.cuh and routing_forward_modern.cuh only.
#pragma once

#include <cstdint>

#include "src/ops/cuda/cuda_common.cuh"

namespace switchyard {
namespace {

using namespace cuda_detail;

// exp(logit - row_max) as 2^x on the MUFU unit, results below 2^-126 flushed to zero (probabilities
// that small change no output), which spares exp2f's denormal fix-up: one instruction per logit.
__device__ __forceinline__ float route_exp(float logit, float row_max) {
  float result;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"((logit - row_max) * 1.4426950408889634f));
  return result;
}

// Pairwise trees over a lane's slice (depth log2 kPerLane instead of a chain of kPerLane dependent
// ops), laid out as a heap: node n combines nodes 2n (lower indices) and 2n + 1; one flat loop, so it
// unrolls into registers. The order is fixed, so the sum is deterministic.
template <int kPerLane, typename Combine>
__device__ __forceinline__ float slice_reduce(const float (&values)[kPerLane], Combine combine) {
  float node[2 * kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) node[kPerLane + i] = values[i];
#pragma unroll
  for (int n = kPerLane - 1; n >= 1; --n) node[n] = combine(node[2 * n], node[2 * n + 1]);
  return node[1];
}

// The largest key of the slice and its index; the lower child wins ties, so the lowest index among
// equal keys wins.
template <int kPerLane>
__device__ __forceinline__ void slice_argmax(const unsigned (&keys)[kPerLane], unsigned& best_key, int& best_index) {
  unsigned node_key[2 * kPerLane];
  int node_index[2 * kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    node_key[kPerLane + i] = keys[i];
    node_index[kPerLane + i] = i;
  }
#pragma unroll
  for (int n = kPerLane - 1; n >= 1; --n) {
    const bool upper = node_key[2 * n + 1] > node_key[2 * n];
    node_key[n] = upper ? node_key[2 * n + 1] : node_key[2 * n];
    node_index[n] = upper ? node_index[2 * n + 1] : node_index[2 * n];
  }
  best_key = node_key[1];
  best_index = node_index[1];
}

// One round of a token's top-k over its kGroup lanes (every lane of the warp calls it, for its
// token): the slice's best key (tree, lowest index on ties), the token's largest key (32 bits) and
// the lowest lane holding it (a ballot): lanes own ascending slices, so that is the lowest expert
// among equal keys, the order the reference breaks ties in. The winner's lane clears that key.
// On the winner's lane, on_winner(i) sees the winner's slice index i (in the same unrolled loop,
// so a value can be picked from a register array without dynamic indexing). Returns the winner's
// expert (index in the token's row; the token's lanes agree), with `token_best` the key it won
// with and `winner_lane` its lane.
template <int kGroup, int kPerLane, typename OnWinner>
__device__ __forceinline__ int take_largest_key(unsigned (&keys)[kPerLane], int lane, unsigned& token_best,
                                                int& winner_lane, OnWinner&& on_winner) {
  unsigned best_key;
  int best_index;
  slice_argmax(keys, best_key, best_index);
  token_best = group_max_bits<kGroup>(best_key);
  const int group_base = lane & ~(kGroup - 1);
  const unsigned group_lanes = kGroup == 32 ? kFullWarpMask : ((1u << kGroup) - 1u) << group_base;
  winner_lane = __ffs(__ballot_sync(kFullWarpMask, best_key == token_best) & group_lanes) - 1;
  if (lane == winner_lane) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (i == best_index) {
        keys[i] = 0u;
        on_winner(i);
      }
    }
  }
  return (winner_lane - group_base) * kPerLane + __shfl_sync(kFullWarpMask, best_index, winner_lane);
}

}  // namespace
}  // namespace switchyard
