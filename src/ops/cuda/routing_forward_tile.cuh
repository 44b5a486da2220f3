// Phase 1 of the router forward kernel (src/ops/cuda/routing.cu; its top comment describes the
// phases): for one tile of 32 W tokens the softmax statistics, k_t, the top-k choices and gates,
// the ranks and counts of the choices, the tile's partials, and the outputs of the tile. Included
// by routing.cu only.
#pragma once

#include <cstdint>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/cuda/routing_forward_args.cuh"
#include "src/ops/cuda/routing_forward_modern.cuh"
#include "src/ops/cuda/routing_forward_slices.cuh"
#include "src/ops/moe_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

// ---- Phase 1: one tile ------------------------------------------------------------------------

// The Switch router's per-token phase (softmax, top-k over the logits): for the tile's tokens (warp
// w: tokens 32w..32w+31, kGroup lanes per token, 32 / kGroup tokens per pass) the softmax
// statistics, k_t and the choices; member 0 of each token's lanes leaves the choices, gates (before
// renormalization), k_t, lse and normalizer in shared memory. prob_accumulator / z_accumulator: the
// lane's sums of p over its tokens, and of lse^2.
template <int kGroup, int kPerLane>
__device__ __forceinline__ void route_tokens_switch(const RouteArgs& args, const RouteShared& shared, int tile,
                                                    float (&prob_accumulator)[kPerLane], float& z_accumulator) {
  const int num_experts = args.params.num_experts, k_max = args.params.k_max;
  const int tile_tokens = blockDim.x, thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const int64_t tile_first_token = int64_t(tile) * tile_tokens;
  constexpr int kTokensPerPass = 32 / kGroup;
  constexpr int kPasses = 32 / kTokensPerPass;
  const int group = lane / kGroup, member = lane % kGroup, first_expert = member * kPerLane;
  const int lane_experts = num_experts - first_expert;  // < kPerLane: the slice runs past the row
  const bool given = args.params.complexity == ComplexityMode::given,
             entropy = args.params.complexity == ComplexityMode::entropy;
  float logits_now[kPerLane], logits_next[kPerLane];
  const int64_t warp_first_token = tile_first_token + warp * 32 + group;
  load_logit_slice<kPerLane>(args.logits, args.params.num_tokens, num_experts, args.vector_loads, warp_first_token,
                             first_expert, logits_now);
  float complexity_now = given && warp_first_token < args.params.num_tokens ? args.complexity[warp_first_token] : 0.0f;
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    const int tile_token = warp * 32 + pass * kTokensPerPass + group;
    const int64_t token = tile_first_token + tile_token;
    float complexity_next = 0.0f;
    if (pass + 1 < kPasses) {  // prefetch the next pass while this one computes
      const int64_t next_token = token + kTokensPerPass;
      load_logit_slice<kPerLane>(args.logits, args.params.num_tokens, num_experts, args.vector_loads, next_token,
                                 first_expert, logits_next);
      if (given && next_token < args.params.num_tokens) complexity_next = args.complexity[next_token];
    }
    const bool token_exists = token < args.params.num_tokens;

    // Softmax: e_i = exp(l_i - max), p_i = e_i / sum (as the reference forms it), lse = max + ln sum.
    // The logits die into keys as the exps are formed (fewer live registers).
    const float group_maximum =  // every lane shuffles, existing token or not
        group_max<kGroup>(slice_reduce(logits_now, [](float a, float b) { return fmaxf(a, b); }));
    const float row_max = token_exists ? group_maximum : 0.0f;
    float exps[kPerLane], weighted_distance = 0.0f;
    unsigned keys[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      exps[i] = route_exp(logits_now[i], row_max);  // 0 for -inf
      if (entropy && exps[i] > 0.0f) weighted_distance += exps[i] * (row_max - logits_now[i]);
      keys[i] = ordered_bits(logits_now[i]);
    }
    const float sum = group_sum<kGroup>(slice_reduce(exps, [](float a, float b) { return a + b; }));
    const float inverse_sum = token_exists ? 1.0f / sum : 0.0f, log_sum = logf(sum), lse = row_max + log_sum;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) prob_accumulator[i] = fmaf(exps[i], inverse_sum, prob_accumulator[i]);

    // Entropy -sum_e p_e ln p_e = ln sum + sum_e p_e (max - l_e): two sums of terms >= 0.
    float complexity = complexity_now;
    if (entropy) complexity = (log_sum + inverse_sum * group_sum<kGroup>(weighted_distance)) * args.entropy_scale;
    const int k_token = token_exists ? choices_of_token(args.params.complexity != ComplexityMode::none,
                                                        complexity, args.params.k_min, k_max)
                                     : 0;

    // Top-k (take_largest_key: per round the token's largest key, ties to the lowest expert; the
    // winner's lane clears it): the gate comes back from the key, the logit. Missing experts (past
    // the row) have key 0, below every logit. Only as many rounds as some token of the warp needs.
    if (lane_experts < kPerLane) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
        if (i >= lane_experts) keys[i] = 0u;
    }
    const int rounds = int(__reduce_max_sync(kFullWarpMask, unsigned(k_token)));
    float normalizer = 0.0f;
#pragma unroll 1
    for (int choice = 0; choice < rounds; ++choice) {
      unsigned group_best;
      int winner_lane;
      const int winner = take_largest_key<kGroup>(keys, lane, group_best, winner_lane, [](int) {});
      const float prob = route_exp(from_ordered_bits(group_best), row_max) * inverse_sum;
      if (choice < k_token) normalizer += prob;  // in choice order, as the reference sums
      if (member == 0) {
        shared.choice_experts[tile_token * k_max + choice] = int16_t(winner);
        shared.choice_gates[tile_token * k_max + choice] = prob;
      }
    }
    if (member == 0) {
      shared.token_lse[tile_token] = lse;
      shared.token_norm[tile_token] = args.params.renormalize ? normalizer : 1.0f;
      shared.token_choices[tile_token] = uint8_t(k_token);
      if (token_exists) z_accumulator += lse * lse;
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) logits_now[i] = logits_next[i];
    complexity_now = complexity_next;
  }
}

// Phase 1 for one tile of 32 W tokens: the per-token phase of the kernel's variant
// (routing_layout::ForwardVariant: route_tokens_switch, or route_tokens_modern of
// routing_forward_modern.cuh), then ranks, counts, partials and outputs.
// defer_slots: the block's last tile, whose slots phase 2b writes from shared memory.
template <int kGroup, int kPerLane, int kVariant>
__device__ __forceinline__ void route_tile(const RouteArgs& args, const RouteShared& shared, int tile,
                                           bool defer_slots) {
  const int num_experts = args.params.num_experts, k_max = args.params.k_max, columns = num_experts * k_max;
  const int float_items = num_experts + 1;  // prob sums, then the sum of lse^2
  const int threads = blockDim.x, num_warps = threads / 32, tile_tokens = threads;
  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const RouteWorkspace& workspace = args.workspace;
  const int64_t tile_first_token = int64_t(tile) * tile_tokens;
  for (int column = lane; column < columns; column += 32) shared.warp_counts[warp * columns + column] = 0;

  // ---- Per token (kGroup lanes per token) ----
  const int first_expert = (lane % kGroup) * kPerLane;
  const int lane_experts = num_experts - first_expert;  // < kPerLane: the slice runs past the row
  float prob_accumulator[kPerLane] = {}, z_accumulator = 0.0f;
  if constexpr (kVariant == routing_layout::kSwitchVariant)
    route_tokens_switch<kGroup, kPerLane>(args, shared, tile, prob_accumulator, z_accumulator);
  else
    route_tokens_modern<kGroup, kPerLane, kVariant == routing_layout::kSigmoidVariant>(args, shared, tile,
                                                                                      prob_accumulator, z_accumulator);

  // ---- Per warp: probability sums over its tokens, sum of lse^2, ranks among its 32 tokens ----
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
#pragma unroll
    for (int offset = kGroup; offset < 32; offset <<= 1)
      prob_accumulator[i] += __shfl_xor_sync(kFullWarpMask, prob_accumulator[i], offset);
    if (lane < kGroup && i < lane_experts)
      shared.warp_floats[warp * float_items + first_expert + i] = prob_accumulator[i];
  }
  z_accumulator = warp_sum(z_accumulator);
  if (lane == 0) shared.warp_floats[warp * float_items + num_experts] = z_accumulator;
  __syncwarp();
  {
    const int tile_token = warp * 32 + lane;  // one token per lane, in token order
    const int token_choices = shared.token_choices[tile_token];
    const int rounds = int(__reduce_max_sync(kFullWarpMask, unsigned(token_choices)));
    for (int choice = 0; choice < rounds; ++choice) {
      const int expert = choice < token_choices ? int(shared.choice_experts[tile_token * k_max + choice]) : -1;
      const unsigned peers = __match_any_sync(kFullWarpMask, expert >= 0 ? expert : -1 - lane);
      if (expert >= 0) {
        const unsigned earlier = peers & lanemask_lt();
        shared.choice_ranks[tile_token * k_max + choice] = uint8_t(__popc(earlier));
        if (earlier == 0) shared.warp_counts[warp * columns + choice * num_experts + expert] = uint16_t(__popc(peers));
      }
    }
  }
  __syncthreads();

  // ---- Per tile: warp counts -> offsets of each warp in the tile; publish counts and partials ----
  for (int column = thread; column < columns; column += threads) {
    int running = 0;
    for (int w = 0; w < num_warps; ++w) {
      const int count = shared.warp_counts[w * columns + column];
      shared.warp_counts[w * columns + column] = uint16_t(running);
      running += count;
    }
    workspace.tile_columns[int64_t(tile) * columns + column] = running;
  }
  for (int item = thread; item < float_items; item += threads) {
    float sum = 0.0f;
    for (int w = 0; w < num_warps; ++w) sum += shared.warp_floats[w * float_items + item];
    workspace.float_partials[int64_t(tile) * float_items + item] = sum;
  }
  __syncthreads();

  // ---- Outputs of the tile (coalesced); slots still lack the tile and choice offsets ----
  const float scale = args.params.routed_scaling_factor;  // 1 for the Switch router: exact
  for (int index = thread; index < tile_tokens * k_max; index += threads) {
    const int tile_token = index / k_max, choice = index - tile_token * k_max;
    const int64_t token = tile_first_token + tile_token;
    if (token >= args.params.num_tokens) break;
    const bool active = choice < shared.token_choices[tile_token];
    const int expert = active ? int(shared.choice_experts[index]) : -1;
    const int64_t out = tile_first_token * k_max + index;
    args.expert_ids[out] = expert;
    args.gates[out] = active ? shared.choice_gates[index] / shared.token_norm[tile_token] * scale : 0.0f;
    if (!defer_slots)
      args.slots[out] = active ? shared.warp_counts[(tile_token / 32) * columns + choice * num_experts + expert] +
                                     shared.choice_ranks[index]
                               : -1;
  }
  for (int tile_token = thread; tile_token < tile_tokens; tile_token += threads) {
    const int64_t token = tile_first_token + tile_token;
    if (token >= args.params.num_tokens) break;
    args.token_k[token] = shared.token_choices[tile_token];
    args.logsumexp[token] = shared.token_lse[tile_token];
  }
  __syncthreads();  // the next tile of this block reuses the shared arrays
}

}  // namespace
}  // namespace switchyard
