// The per-token phase of the router forward kernel (src/ops/cuda/routing.cu; its top comment
// describes the kernel) for the modern options of src/ops/moe_ops.h: the kernel variants
// routing_layout::kSoftmaxKeyVariant (softmax scores, keys that are not the logits) and
// kSigmoidVariant. Included by routing_forward_tile.cuh only. Per token, over its kGroup lanes of
// kPerLane consecutive experts (fp32 logits z):
//   lse = max + ln sum_e exp(z_e - max) (the z loss and route_backward use it with either score)
//   score  softmax: p_e = exp(z_e - max) / sum;   sigmoid: s_e = routing_sigmoid(z_e)
//   key    softmax: z_e (+ b_e);                  sigmoid: s_e (+ b_e)   (one rounded fp32 add)
//   prob_sums term  softmax: p_e;  sigmoid: s'_e = s_e / sum_f s_f
//   entropy (complexity = entropy)  softmax: ln sum + sum_e p_e (max - z_e);
//                                   sigmoid: ln S + (1/S) sum_e s_e ln(1 + e^-z_e), S = sum_f s_f
//     (-sum q ln q of the normalized scores, as sums of terms >= 0; e^-z_e is the value the sigmoid
//     was formed from)
//   group limit (args.grouped): group scores from the keys (moe_ops.h: sigmoid k1 + k2, softmax
//     routing_exp(k1 - m) + routing_exp(k2 - m), m the token's largest key; k1 alone, or
//     routing_exp(k1 - m), for one-expert groups); the topk_groups best groups (ties to the lower
//     group) stay, the keys of the others become 0, below every key
//   top-k over the keys (ties to the lower expert), as the Switch kernel's, but the gate is the
//   winner's unbiased score, which its owner lane broadcasts (the key no longer gives it back).
// Memory: when every group covers a power-of-two run of whole lane slices (args.lanes_per_group > 0:
// E = 256 in 8 groups, for one) the group limit stays in registers and shuffles
// (limit_to_groups_in_registers); otherwise keys and group scores pass through the warp's group
// scratch in shared memory (RouteShared::group_scratch: per token of the pass E keys, then
// num_groups scores; the keys' first num_groups slots then hold the kept flags). The bias comes
// through RouteShared::bias (zero-padded to kGroup * kPerLane floats). Group selection costs
// O(num_groups^2 / kGroup) comparisons per token (shared path) or num_groups shuffles (registers).
#pragma once

#include <cmath>
#include <cstdint>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/cuda/routing_forward_args.cuh"
#include "src/ops/cuda/routing_forward_slices.cuh"
#include "src/ops/moe_ops.h"
#include "src/ops/routing_math.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

// m, the token's largest key (the token's lanes agree on it): what softmax group scores are taken
// relative to. Every lane of the warp calls this (shuffles); the sigmoid variant never does.
template <int kGroup, int kPerLane>
__device__ __forceinline__ float token_largest_key(const unsigned (&keys)[kPerLane]) {
  unsigned lane_max = 0u;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) lane_max = keys[i] > lane_max ? keys[i] : lane_max;
  return from_ordered_bits(group_max_bits<kGroup>(lane_max));
}

// Group-limited routing for one token (every lane of the warp calls this together: __syncwarp).
// `scratch` is the token's [E + num_groups] floats, its E keys written (folded -0: key + 0.0f);
// `keys` the lane's ordered keys (0 past the row). Leaves the keys of experts outside the kept
// groups at 0.
template <int kGroup, int kPerLane, bool kSigmoid>
__device__ __forceinline__ void limit_to_groups(const RouteArgs& args, float* scratch, unsigned (&keys)[kPerLane],
                                                int member, int first_expert, int lane_experts) {
  const int num_experts = args.params.num_experts, num_groups = args.params.num_groups;
  const int group_size = args.group_size, keep = args.params.topk_groups;
  float* group_scores = scratch + num_experts;
  const float largest_key = kSigmoid ? 0.0f : token_largest_key<kGroup>(keys);  // softmax group scores only
  __syncwarp();  // the keys are in scratch

  // Group scores: member m scores groups m, m + kGroup, ...
  for (int g = member; g < num_groups; g += kGroup) {
    float first = -INFINITY, second = -INFINITY;  // the group's two largest keys (equal ones both count)
    const float* group_keys = scratch + g * group_size;
    for (int e = 0; e < group_size; ++e) {
      const float key = group_keys[e];
      if (key > first) {
        second = first;
        first = key;
      } else if (key > second) {
        second = key;
      }
    }
    float score;
    if constexpr (kSigmoid) {
      score = group_size > 1 ? __fadd_rn(first, second) : first;
    } else {
      const float top = routing_exp(__fsub_rn(first, largest_key));
      score = group_size > 1 ? __fadd_rn(top, routing_exp(__fsub_rn(second, largest_key))) : top;
    }
    group_scores[g] = score;
  }
  __syncwarp();

  // Kept flags: group g stays when fewer than topk_groups groups beat it (higher score, or equal
  // with a lower index). The keys are read: their slots take the flags.
  for (int g = member; g < num_groups; g += kGroup) {
    const float mine = group_scores[g];
    int rank = 0;
    for (int other = 0; other < num_groups; ++other) {
      const float theirs = group_scores[other];
      rank += (theirs > mine || (theirs == mine && other < g)) ? 1 : 0;
    }
    scratch[g] = rank < keep ? 1.0f : 0.0f;
  }
  __syncwarp();

  // Keys of the lane's experts outside the kept groups -> 0 (group of expert e: e / group_size).
  int g = first_expert / group_size, position = first_expert - g * group_size;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (i < lane_experts && scratch[g] == 0.0f) keys[i] = 0u;
    if (++position == group_size) {
      position = 0;
      ++g;
    }
  }
  __syncwarp();  // the next pass writes the scratch again
}

// Group-limited routing for one token with the group scores in registers: for groups that cover
// whole lanes (args.lanes_per_group = group_size / kPerLane, a power of two, > 0; the host picks this
// path), each lane takes the two largest keys of its slice, the group's lanes merge them by xor
// shuffles, and each lane ranks its group against the others' scores (one shuffle per group). The
// values and comparisons are the shared-memory path's (the two largest keys as a multiset, equal
// ones both count; ties to the lower group), so the kept groups are the same. Every lane of the
// warp calls this.
template <int kGroup, int kPerLane, bool kSigmoid>
__device__ __forceinline__ void limit_to_groups_in_registers(const RouteArgs& args, unsigned (&keys)[kPerLane],
                                                             int member, int lane_experts) {
  const int num_groups = args.params.num_groups, keep = args.params.topk_groups;
  const int lanes_per_group = args.lanes_per_group, group_base = (threadIdx.x % 32) & ~(kGroup - 1);
  const float largest_key = kSigmoid ? 0.0f : token_largest_key<kGroup>(keys);  // softmax group scores only
  // The slice's two largest keys (experts past the row take no part).
  float first = -INFINITY, second = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (i >= lane_experts) continue;
    const float key = from_ordered_bits(keys[i]) + 0.0f;
    if (key > first) {
      second = first;
      first = key;
    } else if (key > second) {
      second = key;
    }
  }
  // Merge with the group's other lanes: the top two of {a1 >= a2} and {b1 >= b2}.
  for (int offset = 1; offset < lanes_per_group; offset <<= 1) {
    const float other_first = __shfl_xor_sync(kFullWarpMask, first, offset);
    const float other_second = __shfl_xor_sync(kFullWarpMask, second, offset);
    const float merged_second = first >= other_first ? fmaxf(second, other_first) : fmaxf(first, other_second);
    first = fmaxf(first, other_first);
    second = merged_second;
  }
  const bool whole_group = args.group_size > 1;  // lanes_per_group > 0 implies group_size >= kPerLane
  float score;
  if constexpr (kSigmoid) {
    score = whole_group ? __fadd_rn(first, second) : first;
  } else {
    const float top = routing_exp(__fsub_rn(first, largest_key));
    score = whole_group ? __fadd_rn(top, routing_exp(__fsub_rn(second, largest_key))) : top;
  }
  // Rank of this lane's group: groups with a higher score, or an equal one and a lower index.
  const int my_group = member / lanes_per_group;
  int rank = 0;
  for (int other = 0; other < num_groups; ++other) {
    const float theirs = __shfl_sync(kFullWarpMask, score, group_base + other * lanes_per_group);
    rank += (theirs > score || (theirs == score && other < my_group)) ? 1 : 0;
  }
  if (my_group >= num_groups || rank >= keep) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) keys[i] = 0u;
  }
}

// The per-token phase with scores, keys and the group limit above (same outputs and shared-memory
// hand-off as route_tokens_switch in routing_forward_tile.cuh).
template <int kGroup, int kPerLane, bool kSigmoid>
__device__ __forceinline__ void route_tokens_modern(const RouteArgs& args, const RouteShared& shared, int tile,
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
  const bool has_bias = args.selection_bias != nullptr, grouped = args.grouped;
  const bool grouped_in_shared = grouped && args.lanes_per_group == 0;
  const float* lane_bias = shared.bias + first_expert;  // zero-padded to kGroup * kPerLane
  float* scratch = shared.group_scratch + warp * args.group_floats + group * (num_experts + args.params.num_groups);
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

    const float group_maximum =  // every lane shuffles, existing token or not
        group_max<kGroup>(slice_reduce(logits_now, [](float a, float b) { return fmaxf(a, b); }));
    const float row_max = token_exists ? group_maximum : 0.0f;
    float exps[kPerLane], scores[kPerLane], entropy_terms = 0.0f;
    unsigned keys[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      exps[i] = route_exp(logits_now[i], row_max);  // 0 for -inf
      float key;
      if constexpr (kSigmoid) {
        const float exp_minus = routing_exp(-logits_now[i]);  // routing_sigmoid, spelled out to keep e^-z
        scores[i] = routing_divide(1.0f, 1.0f + exp_minus);
        if (entropy && scores[i] > 0.0f) entropy_terms += scores[i] * log1pf(exp_minus);
        key = scores[i];
      } else {
        scores[i] = exps[i];
        if (entropy && exps[i] > 0.0f) entropy_terms += exps[i] * (row_max - logits_now[i]);
        key = logits_now[i];
      }
      if (has_bias) key = __fadd_rn(key, lane_bias[i]);
      keys[i] = i < lane_experts ? ordered_bits(key) : 0u;
      if (grouped_in_shared && i < lane_experts) scratch[first_expert + i] = key + 0.0f;
    }
    const float sum = group_sum<kGroup>(slice_reduce(exps, [](float a, float b) { return a + b; }));
    const float inverse_sum = token_exists ? 1.0f / sum : 0.0f, log_sum = logf(sum), lse = row_max + log_sum;
    // The balance losses' normalized score: p = e * inverse_sum, or s' = s / S.
    float score_scale = inverse_sum, score_log_sum = log_sum;
    if constexpr (kSigmoid) {
      const float score_sum = group_sum<kGroup>(slice_reduce(scores, [](float a, float b) { return a + b; }));
      score_scale = token_exists && score_sum > 0.0f ? 1.0f / score_sum : 0.0f;
      score_log_sum = logf(score_sum);
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) prob_accumulator[i] = fmaf(scores[i], score_scale, prob_accumulator[i]);

    float complexity = complexity_now;
    if (entropy) complexity = (score_log_sum + score_scale * group_sum<kGroup>(entropy_terms)) * args.entropy_scale;
    const int k_token = token_exists ? choices_of_token(args.params.complexity != ComplexityMode::none,
                                                        complexity, args.params.k_min, k_max)
                                     : 0;
    if (grouped_in_shared)
      limit_to_groups<kGroup, kPerLane, kSigmoid>(args, scratch, keys, member, first_expert, lane_experts);
    else if (grouped)
      limit_to_groups_in_registers<kGroup, kPerLane, kSigmoid>(args, keys, member, lane_experts);

    // Top-k over the keys (take_largest_key: per round the token's largest key, ties to the lowest
    // expert; the winner's lane clears it), but the gate is the winner's unbiased score, which its
    // lane hands to the token's lanes (the key no longer gives it back).
    const int rounds = int(__reduce_max_sync(kFullWarpMask, unsigned(k_token)));
    float normalizer = 0.0f;
#pragma unroll 1
    for (int choice = 0; choice < rounds; ++choice) {
      unsigned group_best;
      int winner_lane;
      float winner_score = 0.0f;
      const int winner =
          take_largest_key<kGroup>(keys, lane, group_best, winner_lane, [&](int i) { winner_score = scores[i]; });
      winner_score = __shfl_sync(kFullWarpMask, winner_score, winner_lane);
      const float gate = kSigmoid ? winner_score : winner_score * inverse_sum;
      if (choice < k_token) normalizer += gate;  // in choice order, as the reference sums
      if (member == 0) {
        shared.choice_experts[tile_token * k_max + choice] = int16_t(winner);
        shared.choice_gates[tile_token * k_max + choice] = gate;
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

}  // namespace
}  // namespace switchyard
