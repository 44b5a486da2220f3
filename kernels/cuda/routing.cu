// Router forward and backward on CUDA (semantics: kernels/moe_ops.h; the CPU reference defines them).
//
// Forward: one fused kernel after the logits GEMM, plus a tiny slot fix-up for choices j >= 1.
//   logits fp32 [T, E] row-major. A block of W warps (16 for large batches, 8 or 4 for small ones
//   so they still spread over the SMs) handles a tile of 32 W consecutive tokens, each warp 32 of
//   them with kGroup lanes per token and kPerLane (16 where E allows) logits per lane, read with
//   16-byte streaming loads, the next pass prefetched. Per token, in registers:
//     e_i = exp(l_i - max), p_i = e_i / sum e, lse = max + ln sum e;
//     top-k by k rounds of "best remaining key per lane, then the best over the lane group" on the
//     key (ordered(l) << 32 | ~e), so ties go to the lower expert; gate_j = p[e_j], or
//     p[e_j] / sum_{i<k_t} p[e_i] when renormalizing; k_t from the complexity (given, or the
//     entropy sum_i p_i (ln sum - (l_i - max)) over ln E).
//   Slots (GShard order: all choices j of all tokens before any choice j+1) are built per
//   (choice j, expert e) column:
//     slot(t, j) = sum_{j'<j} C[j'][e] + (tiles before t's tile)[j][e] + (warps before, in the
//                  tile)[j][e] + (lanes before, in the warp)
//   Lanes: __match_any_sync over the warp's 32 tokens; warps: a shared-memory scan of per-warp
//   counts; tiles: a decoupled look-back over per-tile count vectors [K*E] in tile order. Tiles
//   are numbered by an atomic ticket taken when a block starts, so a tile only ever waits on tiles
//   already running (no deadlock whatever the grid size). The whole block inspects up to
//   blockDim predecessors' flags at once, stops at the nearest one holding an inclusive prefix and
//   sums the aggregates after it. C[j'][e] (the totals of whole choice columns) exist only once
//   every tile is done: the fused kernel writes slot - sum_{j'<j} C[j'][e] and the last block
//   leaves choice_base[j][e] = sum_{j'<j} C[j'][e] in the workspace; a second kernel, launched
//   with programmatic dependent launch so its launch overlaps the first kernel, adds it.
//   Floats that cross tiles (prob sums, sum of lse^2) are reduced as per-tile partials, then in a
//   fixed order by the last block to finish (a done counter): deterministic, no float atomics. That
//   block writes expert_counts, first_choice_counts, prob_sums, expert_offsets, scalars and losses,
//   and resets the workspace (ticket, done counter, flags) for the next call on the stream.
//   Capacity depends on sum_t k_t, known only there, so slots are written unconditionally and a
//   choice is dropped when slot >= scalars[kCapacity]; permute / combine read it from the device.
//
// Backward: one kernel, same lane-group layout, probabilities recomputed from the logits and lse:
//   dL/dp_e = aux' * w_aux * E * f_e / T + (gate terms of kept choices, slot < capacity):
//     plain: dL/dp[e_j] += gg_j;  renormalized (S = sum_{i<k_t} p[e_i], g_j = p[e_j] / S):
//     dL/dp[e_i] += (gg_i - sum_j gg_j g_j) / S
//   dL/dl_e = p_e (dL/dp_e - sum_i p_i dL/dp_i) + z' * w_z * 2 * lse * p_e / T.
#include <cfloat>
#include <climits>
#include <cmath>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/moe_ops.h"
#include "kernels/ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

// A block of W warps (W = 4, 8 or 16, chosen per call) handles a tile of 32 W tokens: 32 tokens per
// warp, so that ranking within a warp has one token per lane.
constexpr int kMaxRouteWarps = 16;
constexpr int kMaxRouteThreads = kMaxRouteWarps * 32;
constexpr int kMaxChoices = 8;
constexpr int kMaxRouteExperts = 256;

enum : unsigned { kFlagEmpty = 0, kFlagAggregate = 1, kFlagPrefix = 2 };

// Global scratch of the forward kernel. `ticket`, `done` and `flags` must be zero at kernel start;
// the kernel's last block restores that.
struct RouteWorkspace {
  unsigned* ticket;
  unsigned* done;
  unsigned* flags;        // [num_tiles]
  int* aggregates;        // [num_tiles][K*E] counts of each tile (tile 0 writes `inclusive` only)
  int* inclusive;         // [num_tiles][K*E] counts of tiles 0..tile
  float* prob_partials;   // [num_tiles][E]
  float* z_partials;      // [num_tiles]
  int* choice_base;       // [K][E] sum_{j'<j} C[j'][e]
};

struct RouteArgs {
  const float* logits;
  const float* complexity;
  int64_t num_tokens;
  int num_experts;
  int k_max;
  int k_min;
  int complexity_mode;
  bool renormalize;
  bool dropless;
  bool vector_loads;
  float capacity_factor;
  int segment_alignment;
  float aux_loss_weight;
  float z_loss_weight;
  int num_tiles;
  int* expert_ids;
  float* gates;
  int* slots;
  int* token_k;
  float* logsumexp;
  int* expert_counts;
  int* first_choice_counts;
  float* prob_sums;
  int* expert_offsets;
  int* scalars;
  float* losses;
  RouteWorkspace workspace;
};

// Shared memory of the forward kernel, carved from one dynamic allocation (4-byte items first).
struct RouteSmemLayout {
  size_t tile_counts, tile_prefix, warp_probs, choice_gates, token_lse, warp_counts, choice_experts,
      choice_ranks, token_choices, total;
  __host__ __device__ RouteSmemLayout(int num_experts, int k_max, int num_warps) {
    const size_t tile_tokens = size_t(num_warps) * 32;
    size_t columns = size_t(num_experts) * k_max, choices = tile_tokens * k_max, offset = 0;
    auto take = [&](size_t bytes) {
      size_t at = offset;
      offset += (bytes + 15) / 16 * 16;
      return at;
    };
    tile_counts = take(columns * 4);
    tile_prefix = take(columns * 4);
    warp_probs = take(size_t(num_warps) * num_experts * 4);
    choice_gates = take(choices * 4);
    token_lse = take(tile_tokens * 4);
    warp_counts = take(size_t(num_warps) * columns * 2);
    choice_experts = take(choices * 2);
    choice_ranks = take(choices);
    token_choices = take(tile_tokens);
    total = offset;
  }
};

// Orders floats as unsigned integers (larger float -> larger key); -0 is folded into +0 first so
// that equal logits tie exactly as they do in a float comparison.
__device__ __forceinline__ unsigned ordered_bits(float value) {
  unsigned bits = __float_as_uint(value + 0.0f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float from_ordered_bits(unsigned ordered) {
  return __uint_as_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}

// The kPerLane logits of experts [first_expert, first_expert + kPerLane) of `token`; -inf where
// the expert or the token does not exist. Read once, so streamed past L1.
template <int kPerLane>
__device__ __forceinline__ void load_logit_slice(const float* logits, int64_t num_tokens, int num_experts,
                                                 bool vector_loads, int64_t token, int first_expert,
                                                 float (&values)[kPerLane]) {
  if (token >= num_tokens) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) values[i] = -INFINITY;
    return;
  }
  const float* row = logits + token * num_experts;
  if (vector_loads && first_expert + kPerLane <= num_experts) {
#pragma unroll
    for (int i = 0; i < kPerLane; i += 4) {
      float4 quad = __ldcs(reinterpret_cast<const float4*>(row + first_expert + i));
      values[i] = quad.x;
      values[i + 1] = quad.y;
      values[i + 2] = quad.z;
      values[i + 3] = quad.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      values[i] = first_expert + i < num_experts ? __ldcs(row + first_expert + i) : -INFINITY;
  }
}

// k_t of a token: k_max without complexity routing, else k_min + floor(c (k_max - k_min) + 1/2).
__device__ __forceinline__ int choices_of_token(int mode, float complexity, int k_min, int k_max) {
  if (mode == int(ComplexityMode::none)) return k_max;
  float clamped = fminf(fmaxf(complexity, 0.0f), 1.0f);  // fmaxf(NaN, 0) = 0
  return k_min + int(floorf(clamped * float(k_max - k_min) + 0.5f));
}

// exp(logit - row_max) through the MUFU exp2 unit: relative error ~1e-6 for the logit spreads of a
// router (|logit - max| < ~30), well inside the 1e-5 the outputs promise; exp(-inf) = 0.
__device__ __forceinline__ float exp_from_max(float logit, float row_max) {
  return exp2f((logit - row_max) * 1.4426950408889634f);
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <int kGroup, int kPerLane>
__global__ void __launch_bounds__(kMaxRouteThreads, 1) route_forward_kernel(RouteArgs args) {
  // Let the slot fix-up kernel (programmatic dependent launch) be scheduled as soon as every tile
  // has started; it waits for this grid's completion before reading anything.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int num_experts = args.num_experts, k_max = args.k_max, columns = num_experts * k_max;
  const int threads = blockDim.x, num_warps = threads / 32, tile_tokens = threads;
  const RouteSmemLayout layout(num_experts, k_max, num_warps);
  int* tile_counts = reinterpret_cast<int*>(shared_bytes + layout.tile_counts);
  int* tile_prefix = reinterpret_cast<int*>(shared_bytes + layout.tile_prefix);
  float* warp_probs = reinterpret_cast<float*>(shared_bytes + layout.warp_probs);
  float* choice_gates = reinterpret_cast<float*>(shared_bytes + layout.choice_gates);
  float* token_lse = reinterpret_cast<float*>(shared_bytes + layout.token_lse);
  uint16_t* warp_counts = reinterpret_cast<uint16_t*>(shared_bytes + layout.warp_counts);
  int16_t* choice_experts = reinterpret_cast<int16_t*>(shared_bytes + layout.choice_experts);
  uint8_t* choice_ranks = shared_bytes + layout.choice_ranks;
  uint8_t* token_choices = shared_bytes + layout.token_choices;
  __shared__ float warp_z[kMaxRouteWarps];
  __shared__ int shared_tile, nearest_prefix_tile, shared_is_last;

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const RouteWorkspace& workspace = args.workspace;
  if (thread == 0) shared_tile = int(atomicAdd(workspace.ticket, 1u));
  for (int column = lane; column < columns; column += 32) warp_counts[warp * columns + column] = 0;
  __syncthreads();
  const int tile = shared_tile;
  const int64_t tile_first_token = int64_t(tile) * tile_tokens;

  // ---- Per token: softmax statistics, k_t, top-k, gates (kGroup lanes per token) ----
  constexpr int kTokensPerPass = 32 / kGroup;
  constexpr int kPasses = 32 / kTokensPerPass;
  const int group = lane / kGroup, member = lane % kGroup, first_expert = member * kPerLane;
  float prob_accumulator[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) prob_accumulator[i] = 0.0f;
  float z_accumulator = 0.0f;
  const float inverse_log_experts = num_experts > 1 ? 1.0f / logf(float(num_experts)) : 0.0f;

  float logits_now[kPerLane], logits_next[kPerLane];
  load_logit_slice<kPerLane>(args.logits, args.num_tokens, num_experts, args.vector_loads,
                             tile_first_token + warp * 32 + group, first_expert, logits_now);
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    const int tile_token = warp * 32 + pass * kTokensPerPass + group;
    const int64_t token = tile_first_token + tile_token;
    if (pass + 1 < kPasses)  // prefetch the next pass while this one computes
      load_logit_slice<kPerLane>(args.logits, args.num_tokens, num_experts, args.vector_loads,
                                 token + kTokensPerPass, first_expert, logits_next);
    const bool token_exists = token < args.num_tokens;

    // Softmax: e_i = exp(l_i - max), p_i = e_i / sum (as the reference forms it), lse = max + ln sum.
    float local_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) local_max = fmaxf(local_max, logits_now[i]);
    const float group_maximum = group_max<kGroup>(local_max);  // every lane shuffles, existing token or not
    const float row_max = token_exists ? group_maximum : 0.0f;
    float exps[kPerLane], local_sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      exps[i] = exp_from_max(logits_now[i], row_max);  // 0 for missing experts (-inf)
      local_sum += exps[i];
    }
    const float sum = group_sum<kGroup>(local_sum);
    const float inverse_sum = 1.0f / sum, log_sum = logf(sum), lse = row_max + log_sum;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (token_exists) prob_accumulator[i] = fmaf(exps[i], inverse_sum, prob_accumulator[i]);

    float complexity = 0.0f;
    if (args.complexity_mode == int(ComplexityMode::given)) {
      complexity = token_exists ? args.complexity[token] : 0.0f;
    } else if (args.complexity_mode == int(ComplexityMode::entropy)) {
      float local_entropy = 0.0f;  // sum_e p_e (ln sum - (l_e - max)) = -sum_e p_e ln p_e, terms >= 0
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
        if (exps[i] > 0.0f) local_entropy += exps[i] * inverse_sum * (log_sum - (logits_now[i] - row_max));
      complexity = group_sum<kGroup>(local_entropy) * inverse_log_experts;
    }
    const int k_token = choices_of_token(args.complexity_mode, complexity, args.k_min, k_max);

    // Top-k: per round, each lane's best remaining key (a strict > scan keeps the lower index on
    // ties), then the group's best by (key, lower expert); the owner zeroes the winner's key.
    unsigned keys[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) keys[i] = first_expert + i < num_experts ? ordered_bits(logits_now[i]) : 0u;
    int chosen_expert[kMaxChoices];
    float chosen_prob[kMaxChoices];
#pragma unroll
    for (int choice = 0; choice < kMaxChoices; ++choice) {
      chosen_expert[choice] = -1;
      chosen_prob[choice] = 0.0f;
      if (choice < k_max) {  // uniform over the warp
        unsigned best_key = keys[0];
        int best_index = 0;
#pragma unroll
        for (int i = 1; i < kPerLane; ++i) {
          if (keys[i] > best_key) {
            best_key = keys[i];
            best_index = i;
          }
        }
        const unsigned long long best = group_max<kGroup>(
            (static_cast<unsigned long long>(best_key) << 32) | (0xffffffffu - unsigned(first_expert + best_index)));
        const int winner = int(0xffffffffu - unsigned(best & 0xffffffffu));
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
          if (first_expert + i == winner) keys[i] = 0u;
        chosen_expert[choice] = winner;
        chosen_prob[choice] = exp_from_max(from_ordered_bits(unsigned(best >> 32)), row_max) * inverse_sum;
      }
    }

    if (member == 0) {
      float normalizer = 1.0f;
      if (args.renormalize) {
        normalizer = 0.0f;
#pragma unroll
        for (int choice = 0; choice < kMaxChoices; ++choice)
          if (choice < k_token) normalizer += chosen_prob[choice];
      }
#pragma unroll
      for (int choice = 0; choice < kMaxChoices; ++choice) {
        if (choice < k_max) {
          const bool active = token_exists && choice < k_token;
          choice_experts[tile_token * k_max + choice] = int16_t(active ? chosen_expert[choice] : -1);
          choice_gates[tile_token * k_max + choice] =
              active ? (args.renormalize ? chosen_prob[choice] / normalizer : chosen_prob[choice]) : 0.0f;
        }
      }
      token_lse[tile_token] = lse;
      token_choices[tile_token] = uint8_t(token_exists ? k_token : 0);
      if (token_exists) z_accumulator += lse * lse;
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) logits_now[i] = logits_next[i];
  }

  // ---- Per warp: probability sums over its tokens, sum of lse^2, ranks among its 32 tokens ----
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
#pragma unroll
    for (int offset = kGroup; offset < 32; offset <<= 1)
      prob_accumulator[i] += __shfl_xor_sync(kFullWarpMask, prob_accumulator[i], offset);
    if (lane < kGroup && first_expert + i < num_experts)
      warp_probs[warp * num_experts + first_expert + i] = prob_accumulator[i];
  }
  z_accumulator = warp_sum(z_accumulator);
  if (lane == 0) warp_z[warp] = z_accumulator;
  __syncwarp();
  {
    const int tile_token = warp * 32 + lane;  // one token per lane, in token order
    for (int choice = 0; choice < k_max; ++choice) {
      const int expert = choice_experts[tile_token * k_max + choice];
      const unsigned peers = __match_any_sync(kFullWarpMask, expert >= 0 ? expert : -1 - lane);
      if (expert >= 0) {
        const unsigned earlier = peers & lanemask_lt();
        choice_ranks[tile_token * k_max + choice] = uint8_t(__popc(earlier));
        if (earlier == 0) warp_counts[warp * columns + choice * num_experts + expert] = uint16_t(__popc(peers));
      }
    }
  }
  __syncthreads();

  // ---- Per tile: scan the warp counts, publish the tile's counts and float partials ----
  for (int column = thread; column < columns; column += threads) {
    int running = 0;
    for (int w = 0; w < num_warps; ++w) {
      const int count = warp_counts[w * columns + column];
      warp_counts[w * columns + column] = uint16_t(running);
      running += count;
    }
    tile_counts[column] = running;
    tile_prefix[column] = 0;
    if (tile == 0) workspace.inclusive[column] = running;
    else workspace.aggregates[int64_t(tile) * columns + column] = running;
  }
  for (int expert = thread; expert < num_experts; expert += threads) {
    float sum = 0.0f;
    for (int w = 0; w < num_warps; ++w) sum += warp_probs[w * num_experts + expert];
    workspace.prob_partials[int64_t(tile) * num_experts + expert] = sum;
  }
  if (thread == 0) {
    float sum = 0.0f;
    for (int w = 0; w < num_warps; ++w) sum += warp_z[w];
    workspace.z_partials[tile] = sum;
  }
  __threadfence();
  __syncthreads();
  if (thread == 0) store_release(workspace.flags + tile, tile == 0 ? kFlagPrefix : kFlagAggregate);

  // ---- Decoupled look-back: tile_prefix = counts of all earlier tiles ----
  if (tile > 0) {
    const int lanes_per_column = columns >= threads ? 1 : threads / columns;
    const int columns_per_sweep = threads / lanes_per_column;
    int window_end = tile;  // inspect tiles [window_end - threads, window_end)
    while (true) {
      if (thread == 0) nearest_prefix_tile = -1;
      __syncthreads();
      const int predecessor = window_end - 1 - thread;
      if (predecessor >= 0) {
        unsigned status;
        do {
          status = load_acquire(workspace.flags + predecessor);
        } while (status == kFlagEmpty);
        if (status == kFlagPrefix) atomicMax(&nearest_prefix_tile, predecessor);
      }
      __syncthreads();
      const int stop = nearest_prefix_tile;
      const int first = stop >= 0 ? stop + 1 : max(window_end - threads, 0);
      for (int sweep = 0; sweep < columns; sweep += columns_per_sweep) {
        const int column = sweep + thread % columns_per_sweep, part = thread / columns_per_sweep;
        if (column < columns && part < lanes_per_column) {
          int sum = (part == 0 && stop >= 0) ? __ldcg(workspace.inclusive + int64_t(stop) * columns + column) : 0;
#pragma unroll 16
          for (int source = first + part; source < window_end; source += lanes_per_column)
            sum += __ldcg(workspace.aggregates + int64_t(source) * columns + column);
          atomicAdd(tile_prefix + column, sum);
        }
      }
      __syncthreads();
      if (stop >= 0) break;
      window_end -= threads;
    }
    for (int column = thread; column < columns; column += threads)
      workspace.inclusive[int64_t(tile) * columns + column] = tile_prefix[column] + tile_counts[column];
    __threadfence();
    __syncthreads();
    if (thread == 0) store_release(workspace.flags + tile, kFlagPrefix);
  }

  // ---- Outputs of the tile (coalesced) ----
  for (int index = thread; index < tile_tokens * k_max; index += threads) {
    const int tile_token = index / k_max, choice = index - tile_token * k_max;
    const int64_t token = tile_first_token + tile_token;
    if (token >= args.num_tokens) break;
    const int expert = choice_experts[index];
    int slot = -1;
    if (expert >= 0) {
      const int column = choice * num_experts + expert;
      slot = tile_prefix[column] + warp_counts[(tile_token / 32) * columns + column] + choice_ranks[index];
    }
    const int64_t out = tile_first_token * k_max + index;
    args.expert_ids[out] = expert;
    args.gates[out] = choice_gates[index];
    args.slots[out] = slot;
  }
  for (int tile_token = thread; tile_token < tile_tokens; tile_token += threads) {
    const int64_t token = tile_first_token + tile_token;
    if (token >= args.num_tokens) break;
    args.token_k[token] = token_choices[tile_token];
    args.logsumexp[token] = token_lse[tile_token];
  }

  // ---- The last block to finish reduces across tiles ----
  __threadfence();
  __syncthreads();
  if (thread == 0) shared_is_last = atomicAdd(workspace.done, 1u) == unsigned(args.num_tiles - 1);
  __syncthreads();
  if (!shared_is_last) return;
  __threadfence();

  int* totals = tile_counts;            // reused: [K][E] counts over all tokens
  int* expert_total = tile_prefix;      // reused: [E]
  float* part_sums = warp_probs;        // reused: [parts][E] partial prob sums, row 0 then the totals
  float* expert_prob_sum = warp_probs;  // [E], written over row 0 once its column is read
  const int64_t last_tile = args.num_tiles - 1;
  for (int column = thread; column < columns; column += threads)
    totals[column] = __ldcg(workspace.inclusive + last_tile * columns + column);
  // Tile partials: `parts` threads per expert each sum every parts-th tile (so many L2 loads are in
  // flight at once), then one thread per expert adds the parts in order. Depends on E only, so the
  // sum is the same for every run.
  const int parts = min(num_warps, max(1, threads / num_experts));
  for (int index = thread; index < parts * num_experts; index += threads) {
    const int part = index / num_experts, expert = index - part * num_experts;
    float sum = 0.0f;
#pragma unroll 8
    for (int source = part; source < args.num_tiles; source += parts)
      sum += __ldcg(workspace.prob_partials + int64_t(source) * num_experts + expert);
    part_sums[part * num_experts + expert] = sum;
  }
  __syncthreads();
  for (int expert = thread; expert < num_experts; expert += threads) {
    int running = 0;
    for (int choice = 0; choice < k_max; ++choice) {
      workspace.choice_base[choice * num_experts + expert] = running;
      running += totals[choice * num_experts + expert];
    }
    float sum = 0.0f;
    for (int part = 0; part < parts; ++part) sum += part_sums[part * num_experts + expert];
    expert_total[expert] = running;
    expert_prob_sum[expert] = sum;
    args.expert_counts[expert] = running;
    args.first_choice_counts[expert] = totals[expert];
    args.prob_sums[expert] = sum;
  }
  __syncthreads();

  const float token_count = float(args.num_tokens > 0 ? args.num_tokens : 1);
  if (warp == 0) {
    // Each lane owns a contiguous run of experts, so one warp scan gives the offsets.
    const int per_lane = (num_experts + 31) / 32;
    const int begin = min(lane * per_lane, num_experts), end = min(begin + per_lane, num_experts);
    int lane_choices = 0;
    float lane_aux = 0.0f;
    for (int expert = begin; expert < end; ++expert) {
      lane_choices += expert_total[expert];
      lane_aux += (float(totals[expert]) / token_count) * (expert_prob_sum[expert] / token_count);
    }
    const int total_choices = warp_sum(lane_choices);
    const float aux_sum = warp_sum(lane_aux);
    int capacity = INT_MAX;
    if (!args.dropless) {
      const double wanted = ceil(double(args.capacity_factor) * double(total_choices) / double(num_experts));
      capacity = wanted >= double(INT_MAX) ? INT_MAX : int(wanted);
    }
    const int alignment = args.segment_alignment;
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
      args.losses[kAuxLoss] = args.aux_loss_weight * float(num_experts) * aux_sum;
    }
  } else if (warp == 1) {
    float sum = 0.0f;
    for (int source = lane; source < args.num_tiles; source += 32) sum += __ldcg(workspace.z_partials + source);
    sum = warp_sum(sum);
    if (lane == 0) args.losses[kZLoss] = args.z_loss_weight * sum / token_count;
  }

  // Leave the workspace as the next call expects it (every other block is past its last use).
  for (int index = thread; index < args.num_tiles; index += threads) workspace.flags[index] = kFlagEmpty;
  if (thread == 0) {
    *workspace.ticket = 0;
    *workspace.done = 0;
  }
}

// slots[t, j] += choice_base[j][e] for j >= 1 (choice 0 needs nothing). Launched as a programmatic
// dependent of the forward kernel: griddepcontrol.wait returns once that grid has completed and
// its writes are visible.
__global__ void __launch_bounds__(256) add_choice_base_kernel(int* slots, const int* expert_ids,
                                                              const int* choice_base, int64_t num_tokens,
                                                              int k_max, int num_experts) {
  extern __shared__ int base[];
  asm volatile("griddepcontrol.wait;" ::: "memory");
  for (int index = threadIdx.x; index < k_max * num_experts; index += blockDim.x) base[index] = choice_base[index];
  __syncthreads();
  for (int64_t token = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; token < num_tokens;
       token += int64_t(gridDim.x) * blockDim.x) {
    for (int choice = 1; choice < k_max; ++choice) {
      const int64_t index = token * k_max + choice;
      const int expert = expert_ids[index];
      if (expert >= 0) slots[index] += base[choice * num_experts + expert];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

struct RouteBackwardArgs {
  const float* logits;
  const float* grad_gates;
  const int* expert_ids;
  const int* slots;
  const int* scalars;
  const int* token_k;
  const float* logsumexp;
  const int* first_choice_counts;
  int64_t num_tokens;
  int num_experts;
  int k_max;
  bool renormalize;
  bool vector_loads;
  float aux_coefficient;  // grad_aux_scale * w_aux * E / T^2: dL/dp[t, e] = it * first_choice_count_e
  float z_coefficient;    // grad_z_scale * w_z * 2 / T
  float* grad_logits;
};

template <int kGroup, int kPerLane>
__global__ void __launch_bounds__(256) route_backward_kernel(RouteBackwardArgs args) {
  constexpr int kTokensPerPass = 32 / kGroup;
  const int lane = threadIdx.x % 32, group = lane / kGroup, member = lane % kGroup;
  const int first_expert = member * kPerLane, num_experts = args.num_experts, k_max = args.k_max;
  float aux_gradient[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    aux_gradient[i] =
        first_expert + i < num_experts ? args.aux_coefficient * float(args.first_choice_counts[first_expert + i]) : 0.0f;

  const int capacity = args.scalars[kCapacity];
  const int64_t warps_total = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t first_token = (blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32) * kTokensPerPass;
       first_token < args.num_tokens; first_token += warps_total * kTokensPerPass) {
    const int64_t token = first_token + group;
    const bool token_exists = token < args.num_tokens;
    const int64_t safe_token = token_exists ? token : args.num_tokens - 1;
    float logits[kPerLane];
    load_logit_slice<kPerLane>(args.logits, args.num_tokens, num_experts, args.vector_loads, safe_token, first_expert,
                               logits);
    const float lse = args.logsumexp[safe_token];
    const int k_token = args.token_k[safe_token];
    float probs[kPerLane], grad_probs[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      probs[i] = expf(logits[i] - lse);
      grad_probs[i] = aux_gradient[i];
    }

    // Gate terms: every lane of the group reads the token's choices (broadcast loads). Only kept
    // choices (slot < capacity) pass a gate gradient; dropped ones still count in S.
    const float* row = args.logits + safe_token * num_experts;
    int experts[kMaxChoices];
    float gate_grads[kMaxChoices], chosen_probs[kMaxChoices];
    float normalizer = 0.0f;
#pragma unroll
    for (int choice = 0; choice < kMaxChoices; ++choice) {
      const bool active = choice < k_token && choice < k_max;
      experts[choice] = active ? args.expert_ids[safe_token * k_max + choice] : -1;
      const int slot = active ? args.slots[safe_token * k_max + choice] : -1;
      const bool kept = experts[choice] >= 0 && slot >= 0 && slot < capacity;
      gate_grads[choice] = kept ? args.grad_gates[safe_token * k_max + choice] : 0.0f;
      chosen_probs[choice] = args.renormalize && experts[choice] >= 0 ? expf(row[experts[choice]] - lse) : 0.0f;
      normalizer += chosen_probs[choice];
    }
    if (args.renormalize && normalizer > 0.0f) {
      float weighted = 0.0f;  // sum_j gg_j g_j
#pragma unroll
      for (int choice = 0; choice < kMaxChoices; ++choice)
        weighted += gate_grads[choice] * (chosen_probs[choice] / normalizer);
#pragma unroll
      for (int choice = 0; choice < kMaxChoices; ++choice)
        gate_grads[choice] = (gate_grads[choice] - weighted) / normalizer;
    }
#pragma unroll
    for (int choice = 0; choice < kMaxChoices; ++choice) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
        if (first_expert + i == experts[choice]) grad_probs[i] += gate_grads[choice];
    }

    float local_dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) local_dot += probs[i] * grad_probs[i];
    const float shift = group_sum<kGroup>(local_dot) - args.z_coefficient * lse;
    float grads[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) grads[i] = probs[i] * (grad_probs[i] - shift);

    if (!token_exists) continue;
    float* out = args.grad_logits + token * num_experts;
    if (args.vector_loads && first_expert + kPerLane <= num_experts) {
#pragma unroll
      for (int i = 0; i < kPerLane; i += 4)
        *reinterpret_cast<float4*>(out + first_expert + i) = make_float4(grads[i], grads[i + 1], grads[i + 2], grads[i + 3]);
    } else {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
        if (first_expert + i < num_experts) out[first_expert + i] = grads[i];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

// Calls functor(LaneLayout<kGroup, kPerLane>{}) for the lane layout that covers `num_experts`
// (kGroup * kPerLane >= E).
template <int kGroup, int kPerLane>
struct LaneLayout {
  static constexpr int group = kGroup;
  static constexpr int per_lane = kPerLane;
};
template <typename Functor>
void dispatch_lane_layout(int num_experts, Functor&& functor) {
  // 16 logits per lane where E allows: fewer lanes per token means fewer shuffle rounds per token,
  // which is what bounds this kernel once the loads stream at full bandwidth.
  if (num_experts <= 4) functor(LaneLayout<1, 4>{});
  else if (num_experts <= 8) functor(LaneLayout<1, 8>{});
  else if (num_experts <= 16) functor(LaneLayout<1, 16>{});
  else if (num_experts <= 32) functor(LaneLayout<2, 16>{});
  else if (num_experts <= 64) functor(LaneLayout<4, 16>{});
  else if (num_experts <= 128) functor(LaneLayout<8, 16>{});
  else functor(LaneLayout<16, 16>{});
}

void check_routing_params(const RoutingParams& params) {
  validate_routing_params(params);  // the rules both backends share (kernels/ops.h)
  SY_CHECK_INPUT(params.num_experts <= kMaxRouteExperts, "routing on CUDA supports up to ", kMaxRouteExperts,
                 " experts, got ", params.num_experts);
}

}  // namespace

namespace cuda {

void route(const Tensor& logits, const Tensor* complexity, const RoutingParams& params, RoutingResult& result,
           void* stream_handle) {
  check_routing_params(params);
  const int64_t tokens = params.num_tokens;
  const int experts = params.num_experts, k_max = params.k_max;
  check_tensor(logits, "route: logits", DType::f32, {tokens, experts});
  const float* complexity_data = nullptr;
  if (params.complexity == ComplexityMode::given) {
    SY_CHECK(complexity != nullptr, "route: complexity = given needs a complexity tensor");
    check_tensor(*complexity, "route: complexity", DType::f32, {tokens});
    complexity_data = complexity->as<float>();
  }
  check_tensor(result.expert_ids, "route: expert_ids", DType::i32, {tokens, k_max});
  check_tensor(result.gates, "route: gates", DType::f32, {tokens, k_max});
  check_tensor(result.slots, "route: slots", DType::i32, {tokens, k_max});
  check_tensor(result.token_k, "route: token_k", DType::i32, {tokens});
  check_tensor(result.logsumexp, "route: logsumexp", DType::f32, {tokens});
  check_tensor(result.expert_counts, "route: expert_counts", DType::i32, {experts});
  check_tensor(result.first_choice_counts, "route: first_choice_counts", DType::i32, {experts});
  check_tensor(result.prob_sums, "route: prob_sums", DType::f32, {experts});
  check_tensor(result.expert_offsets, "route: expert_offsets", DType::i32, {experts + 1});
  check_tensor(result.scalars, "route: scalars", DType::i32, {kNumRoutingScalars});
  check_tensor(result.losses, "route: losses", DType::f32, {kNumRoutingLosses});

  cudaStream_t stream = as_stream(stream_handle);
  // Tile height: 512 tokens for large batches (fewer tiles, less look-back); 256 or 128 for small
  // ones, so that they still spread over most SMs.
  const int num_warps = tokens >= int64_t(64) * 512 ? 16 : tokens >= int64_t(64) * 256 ? 8 : 4;
  const int tile_tokens = num_warps * 32;
  const int num_tiles = int(std::max<int64_t>(1, (tokens + tile_tokens - 1) / tile_tokens));
  const int64_t columns = int64_t(experts) * k_max;

  // Scratch: the zero-initialized control part (counters + flags) apart from the data part, so a
  // later call with another shape still finds its flags zero.
  const size_t control_bytes = 256 + size_t(num_tiles) * 4;
  unsigned char* control =
      static_cast<unsigned char*>(persistent_scratch(stream, kScratchRoutingControl, control_bytes));
  size_t data_bytes = 0;
  auto take = [&](size_t bytes) {
    size_t at = data_bytes;
    data_bytes += (bytes + 255) / 256 * 256;
    return at;
  };
  const size_t aggregates_at = take(size_t(num_tiles) * columns * 4), inclusive_at = take(size_t(num_tiles) * columns * 4),
               prob_at = take(size_t(num_tiles) * experts * 4), z_at = take(size_t(num_tiles) * 4),
               base_at = take(size_t(columns) * 4);
  unsigned char* data = static_cast<unsigned char*>(persistent_scratch(stream, kScratchRoutingData, data_bytes));

  RouteArgs args{};
  args.logits = logits.as<float>();
  args.complexity = complexity_data;
  args.num_tokens = tokens;
  args.num_experts = experts;
  args.k_max = k_max;
  args.k_min = params.k_min;
  args.complexity_mode = int(params.complexity);
  args.renormalize = params.renormalize;
  args.dropless = params.dropless;
  args.vector_loads = experts % 4 == 0 && is_aligned(logits.data, 16);
  args.capacity_factor = params.capacity_factor;
  args.segment_alignment = params.segment_alignment;
  args.aux_loss_weight = params.aux_loss_weight;
  args.z_loss_weight = params.z_loss_weight;
  args.num_tiles = num_tiles;
  args.expert_ids = result.expert_ids.as<int>();
  args.gates = result.gates.as<float>();
  args.slots = result.slots.as<int>();
  args.token_k = result.token_k.as<int>();
  args.logsumexp = result.logsumexp.as<float>();
  args.expert_counts = result.expert_counts.as<int>();
  args.first_choice_counts = result.first_choice_counts.as<int>();
  args.prob_sums = result.prob_sums.as<float>();
  args.expert_offsets = result.expert_offsets.as<int>();
  args.scalars = result.scalars.as<int>();
  args.losses = result.losses.as<float>();
  args.workspace.ticket = reinterpret_cast<unsigned*>(control);
  args.workspace.done = reinterpret_cast<unsigned*>(control + 4);
  args.workspace.flags = reinterpret_cast<unsigned*>(control + 256);
  args.workspace.aggregates = reinterpret_cast<int*>(data + aggregates_at);
  args.workspace.inclusive = reinterpret_cast<int*>(data + inclusive_at);
  args.workspace.prob_partials = reinterpret_cast<float*>(data + prob_at);
  args.workspace.z_partials = reinterpret_cast<float*>(data + z_at);
  args.workspace.choice_base = reinterpret_cast<int*>(data + base_at);

  const size_t shared_bytes = RouteSmemLayout(experts, k_max, num_warps).total;
  dispatch_lane_layout(experts, [&](auto lanes) {
    using Lanes = decltype(lanes);
    auto kernel = route_forward_kernel<Lanes::group, Lanes::per_lane>;
    if (shared_bytes > 48 * 1024)
      CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)));
    kernel<<<num_tiles, num_warps * 32, shared_bytes, stream>>>(args);
    CUDA_CHECK_LAUNCH();
  });

  if (k_max > 1 && tokens > 0) {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(grid_for(tokens, 256, int64_t(multiprocessor_count()) * 4));
    config.blockDim = dim3(256);
    config.dynamicSmemBytes = size_t(columns) * 4;
    config.stream = stream;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    auto launch = [&]() {
      return cudaLaunchKernelEx(&config, add_choice_base_kernel, args.slots, static_cast<const int*>(args.expert_ids),
                                static_cast<const int*>(args.workspace.choice_base), tokens, k_max, experts);
    };
    if (launch() != cudaSuccess) {  // a stream that refuses programmatic serialization: plain stream order
      (void)cudaGetLastError();
      config.numAttrs = 0;
      CUDA_CHECK(launch());
    }
  }
}

void route_backward(const Tensor& logits, const Tensor& grad_gates, const RoutingResult& routing,
                    const RoutingParams& params, float grad_aux_scale, float grad_z_scale, Tensor& grad_logits,
                    void* stream_handle) {
  check_routing_params(params);
  const int64_t tokens = params.num_tokens;
  const int experts = params.num_experts, k_max = params.k_max;
  check_tensor(logits, "route_backward: logits", DType::f32, {tokens, experts});
  check_tensor(grad_gates, "route_backward: grad_gates", DType::f32, {tokens, k_max});
  check_tensor(routing.expert_ids, "route_backward: expert_ids", DType::i32, {tokens, k_max});
  check_tensor(routing.slots, "route_backward: slots", DType::i32, {tokens, k_max});
  check_tensor(routing.scalars, "route_backward: scalars", DType::i32, {kNumRoutingScalars});
  check_tensor(routing.token_k, "route_backward: token_k", DType::i32, {tokens});
  check_tensor(routing.logsumexp, "route_backward: logsumexp", DType::f32, {tokens});
  check_tensor(routing.first_choice_counts, "route_backward: first_choice_counts", DType::i32, {experts});
  check_tensor(grad_logits, "route_backward: grad_logits", DType::f32, {tokens, experts});
  if (tokens == 0) return;

  RouteBackwardArgs args{};
  args.logits = logits.as<float>();
  args.grad_gates = grad_gates.as<float>();
  args.expert_ids = routing.expert_ids.as<int>();
  args.slots = routing.slots.as<int>();
  args.scalars = routing.scalars.as<int>();
  args.token_k = routing.token_k.as<int>();
  args.logsumexp = routing.logsumexp.as<float>();
  args.first_choice_counts = routing.first_choice_counts.as<int>();
  args.num_tokens = tokens;
  args.num_experts = experts;
  args.k_max = k_max;
  args.renormalize = params.renormalize;
  args.vector_loads = experts % 4 == 0 && is_aligned(logits.data, 16) && is_aligned(grad_logits.data, 16);
  const double token_count = double(tokens);
  args.aux_coefficient =
      float(double(grad_aux_scale) * params.aux_loss_weight * experts / (token_count * token_count));
  args.z_coefficient = float(double(grad_z_scale) * params.z_loss_weight * 2.0 / token_count);
  args.grad_logits = grad_logits.as<float>();

  cudaStream_t stream = as_stream(stream_handle);
  dispatch_lane_layout(experts, [&](auto lanes) {
    using Lanes = decltype(lanes);
    constexpr int kTokensPerBlock = (256 / 32) * (32 / Lanes::group);
    const unsigned blocks = grid_for(tokens, kTokensPerBlock, int64_t(multiprocessor_count()) * 16);
    route_backward_kernel<Lanes::group, Lanes::per_lane><<<blocks, 256, 0, stream>>>(args);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace cuda
}  // namespace switchyard
