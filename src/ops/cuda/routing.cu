// Router forward on CUDA (semantics: src/ops/moe_ops.h; the CPU reference defines them). The
// backward is src/ops/cuda/routing_backward.cu.
//
// One cooperative kernel after the logits GEMM; logits fp32 [T, E] row-major. Tiles of 32 W tokens,
// one warp per 32 tokens (W = 16, or 8, 4, 2, 1 for smaller batches so that >= 128 tiles spread
// over the SMs; at most 8 above 128 experts; W depends on T and E only, so the float sums have one
// order on any GPU). Fewer, taller tiles shorten the cross-tile phase: at 65,536 tokens x 64
// experts, W = 16 (128 tiles) took 25.8-25.9 us against 29.8-30.0 for W = 8 (256 tiles) on an H100.
// A token's row lies over kGroup lanes, kPerLane = 8 logits each (two 16-byte streaming loads, the
// next pass prefetched), which keeps blocks within 64 registers: 1024 threads per SM (16 logits
// per lane above 128 experts: 128 registers, 512 threads per SM). The grid holds at most 3/4 of
// the co-resident blocks (a grid barrier must never wait for a block that cannot be scheduled while
// kernels on other streams, e.g. NCCL, hold SMs); block b walks tiles b, b + grid, ...
// Phase 1, per tile: softmax statistics (e_i = exp(l_i - max), p_i = e_i / sum, lse), k_t, top-k on
//   the key (ordered(l) << 32 | ~e) so ties go to the lower expert (per round a pairwise tree over
//   the lane's slice, then over the group), gates (renormalized over the k_t choices or not). Slots
//   follow GShard order (all choices j before any j+1), as ranks in the columns c = j E + e:
//     slot(t, j) = sum_{j'<j} C[j'][e] + (tiles before t's)[c] + (warps before, in the tile)[c]
//                  + (lanes before, in the warp)
//   The last two come from __match_any_sync and a shared-memory scan of per-warp counts; phase 1
//   writes ids, gates, k_t, lse, the partial slots (except of the block's last tile), the tile's
//   column counts [K*E] and float partials (prob sums [E], sum of lse^2). Grid barrier.
// Phase 2a, a group of G lanes per item over the grid (G = 1..32 from the tile count): scan each
//   column over the tiles in place (counts of earlier tiles) and keep its total; sum each expert's
//   prob partials and the lse^2 partials in a fixed order (member m takes tiles m, m+G, ..., then
//   an xor tree): deterministic and independent of the grid size. Grid barrier.
// Phase 2b: every block forms choice_base[j][e] = sum_{j'<j} C[j'][e] and completes the slots of
//   its tiles: the last one from shared memory (phase 1 left its choices, ranks and warp offsets
//   there), earlier ones (only when tiles outnumber the grid) in global memory. Block 0 writes
//   counts, offsets, scalars and the aux loss. Capacity depends on sum_t k_t, known only here, so
//   slots are written unconditionally and a choice is dropped when slot >= scalars[kCapacity].
// Why this shape: the only waits are two barriers polled by one thread per block; cross-tile work is
// spread over the grid; per-token work is lean (trees, not dependent chains; one MUFU op per exp; no
// per-choice register arrays). Integer sums are exact (outputs equal the CPU reference's bit for bit);
// float sums have a fixed order. The barrier counter is per-stream scratch; the last block out resets it.
#include <algorithm>
#include <climits>
#include <cmath>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

// A block of W warps (1, 2, 4, 8 or 16, chosen per call) handles 32 W tokens, one per lane of each
// warp; at most 8 warps with the 16-logit lane layout (its 128 registers per thread).
constexpr int kMaxRouteWarps = 16;
constexpr int kMaxWideRouteWarps = 8;
template <int kPerLane>
constexpr int max_route_threads() { return (kPerLane <= 8 ? kMaxRouteWarps : kMaxWideRouteWarps) * 32; }
// The smallest batch that gets W warps per tile is W * 32 * kTargetTiles tokens (H100: 132 SMs).
constexpr int64_t kTargetTiles = 128;
// Arrivals at the two grid barriers plus one at the exit: the last block out sees this many.
constexpr unsigned kArrivalsPerBlock = 3;
// Phase 2a: tiles each lane of an item's group loads at once (independent L2 loads in flight).
constexpr int kTilesPerLoad = 8;

// Lane layouts of the forward: 8 logits per lane up to 128 experts (<= 64 registers, 1024 threads
// per SM); 16 per lane above, where 32 lanes per token would make every top-k round a 5-level
// shuffle tree (<= 128 registers, 512 threads per SM).
template <typename Functor>
void dispatch_route_layout(int num_experts, Functor&& functor) {
  if (num_experts <= 8) functor(LaneLayout<1, 8>{});
  else if (num_experts <= 16) functor(LaneLayout<2, 8>{});
  else if (num_experts <= 32) functor(LaneLayout<4, 8>{});
  else if (num_experts <= 64) functor(LaneLayout<8, 8>{});
  else if (num_experts <= 128) functor(LaneLayout<16, 8>{});
  else functor(LaneLayout<16, 16>{});
}

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

// ---- Phase 1: one tile ------------------------------------------------------------------------

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

// Softmax statistics, k_t and the top-k of the tile's tokens (warp w: tokens 32w..32w+31, kGroup
// lanes per token, 32 / kGroup tokens per pass), then ranks, counts, partials and outputs.
// defer_slots: the block's last tile, whose slots phase 2b writes from shared memory.
template <int kGroup, int kPerLane>
__device__ __forceinline__ void route_tile(const RouteArgs& args, const RouteShared& shared, int tile,
                                           bool defer_slots) {
  const int num_experts = args.params.num_experts, k_max = args.params.k_max, columns = num_experts * k_max;
  const int float_items = num_experts + 1;  // prob sums, then the sum of lse^2
  const int threads = blockDim.x, num_warps = threads / 32, tile_tokens = threads;
  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const RouteWorkspace& workspace = args.workspace;
  const int64_t tile_first_token = int64_t(tile) * tile_tokens;
  for (int column = lane; column < columns; column += 32) shared.warp_counts[warp * columns + column] = 0;

  // ---- Per token: softmax statistics, k_t, top-k (kGroup lanes per token) ----
  constexpr int kTokensPerPass = 32 / kGroup;
  constexpr int kPasses = 32 / kTokensPerPass;
  const int group = lane / kGroup, member = lane % kGroup, first_expert = member * kPerLane;
  const int lane_experts = num_experts - first_expert;  // < kPerLane: the slice runs past the row
  const bool given = args.params.complexity == ComplexityMode::given,
             entropy = args.params.complexity == ComplexityMode::entropy;
  float prob_accumulator[kPerLane] = {}, z_accumulator = 0.0f;
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

    // Top-k: per round the slice's best key (tree), then the group's best by (key, lower expert);
    // the owner zeroes the winner's key. Missing experts (past the row) have key 0, below every
    // logit. Only as many rounds as some token of the warp needs.
    if (lane_experts < kPerLane) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
        if (i >= lane_experts) keys[i] = 0u;
    }
    const int rounds = int(__reduce_max_sync(kFullWarpMask, unsigned(k_token)));
    float normalizer = 0.0f;
#pragma unroll 1
    for (int choice = 0; choice < rounds; ++choice) {
      unsigned best_key;
      int best_index;
      slice_argmax(keys, best_key, best_index);
      const unsigned long long best = group_max<kGroup>(
          (static_cast<unsigned long long>(best_key) << 32) | (0xffffffffu - unsigned(first_expert + best_index)));
      const int winner = int(0xffffffffu - unsigned(best & 0xffffffffu));
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
        if (first_expert + i == winner) keys[i] = 0u;
      const float prob = route_exp(from_ordered_bits(unsigned(best >> 32)), row_max) * inverse_sum;
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
  for (int index = thread; index < tile_tokens * k_max; index += threads) {
    const int tile_token = index / k_max, choice = index - tile_token * k_max;
    const int64_t token = tile_first_token + tile_token;
    if (token >= args.params.num_tokens) break;
    const bool active = choice < shared.token_choices[tile_token];
    const int expert = active ? int(shared.choice_experts[index]) : -1;
    const int64_t out = tile_first_token * k_max + index;
    args.expert_ids[out] = expert;
    args.gates[out] = active ? shared.choice_gates[index] / shared.token_norm[tile_token] : 0.0f;
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
  }
}

// ---- The kernel ---------------------------------------------------------------------------------

template <int kGroup, int kPerLane>
__global__ void __launch_bounds__(max_route_threads<kPerLane>(), (kPerLane <= 8 ? 1024 : 512) / max_route_threads<kPerLane>())
    route_forward_kernel(RouteArgs args) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int num_experts = args.params.num_experts, k_max = args.params.k_max, columns = num_experts * k_max;
  const int threads = blockDim.x, tile_tokens = threads, thread = threadIdx.x;
  RouteShared shared(shared_bytes, num_experts, k_max, threads / 32);
  const RouteWorkspace& workspace = args.workspace;
  const unsigned blocks = gridDim.x;
  // grid <= num_tiles, so every block has at least one tile; this is its last.
  const int last_tile = int(blockIdx.x) + (args.num_tiles - 1 - int(blockIdx.x)) / int(blocks) * int(blocks);

  for (int tile = blockIdx.x; tile < args.num_tiles; tile += int(blocks))
    route_tile<kGroup, kPerLane>(args, shared, tile, tile == last_tile);
  grid_barrier(workspace.arrivals, blocks);
  scan_tiles_and_reduce(args);
  grid_barrier(workspace.arrivals, 2 * blocks);

  // ---- Phase 2b: choice bases, block 0's outputs, final slots of this block's tiles ----
  // warp_floats (>= 3 rows of E + 1 words) holds the per-expert totals, first-choice counts, prob sums.
  int* choice_base = shared.choice_base;
  int* tile_offset = shared.tile_offset;  // the last tile's offsets: counts of all earlier tiles
  int* expert_total = reinterpret_cast<int*>(shared.warp_floats);
  int* first_choice = expert_total + num_experts;
  float* prob_sum = shared.warp_floats + 2 * num_experts;
#pragma unroll 4
  for (int column = thread; column < columns; column += threads) {
    choice_base[column] = __ldcg(workspace.column_totals + column);
    tile_offset[column] = __ldcg(workspace.tile_columns + int64_t(last_tile) * columns + column);
  }
  if (blockIdx.x == 0)
    for (int expert = thread; expert < num_experts; expert += threads)
      prob_sum[expert] = __ldcg(args.prob_sums + expert);
  __syncthreads();
  for (int expert = thread; expert < num_experts; expert += threads) {
    int running = 0;  // exclusive scan over the choices, in place: totals -> choice bases
    for (int choice = 0; choice < k_max; ++choice) {
      const int column = choice * num_experts + expert, count = choice_base[column];
      if (choice == 0) first_choice[expert] = count;
      choice_base[column] = running;
      running += count;
    }
    expert_total[expert] = running;
    if (blockIdx.x == 0) {
      args.expert_counts[expert] = running;
      args.first_choice_counts[expert] = first_choice[expert];
    }
  }
  __syncthreads();
  if (blockIdx.x == 0 && thread < 32) write_layout(args, expert_total, first_choice, prob_sum);

  // The last tile's choices, ranks and warp offsets are still in shared memory; earlier tiles (only
  // when tiles outnumber the grid) get the offsets added to the partial slots phase 1 wrote, by the
  // thread that wrote them (the same index -> thread mapping).
  for (int tile = blockIdx.x; tile < args.num_tiles; tile += int(blocks)) {
    const int64_t tile_first_token = int64_t(tile) * tile_tokens;
    const int* earlier_tiles = workspace.tile_columns + int64_t(tile) * columns;
    for (int index = thread; index < tile_tokens * k_max; index += threads) {
      const int tile_token = index / k_max, choice = index - tile_token * k_max;
      if (tile_first_token + tile_token >= args.params.num_tokens) break;
      const int64_t out = tile_first_token * k_max + index;
      if (tile == last_tile) {
        int slot = -1;
        if (choice < shared.token_choices[tile_token]) {
          const int column = choice * num_experts + shared.choice_experts[index];
          slot = shared.warp_counts[(tile_token / 32) * columns + column] + shared.choice_ranks[index] +
                 tile_offset[column] + choice_base[column];
        }
        args.slots[out] = slot;
      } else if (const int expert = args.expert_ids[out]; expert >= 0) {
        const int column = choice * num_experts + expert;
        args.slots[out] += __ldcg(earlier_tiles + column) + choice_base[column];
      }
    }
  }

  // Leave the counter at zero for the next call: every block has passed both barriers once its
  // third arrival is counted, so the block that counts the last one may reset it.
  if (thread == 0 && atomicAdd(workspace.arrivals, 1u) == kArrivalsPerBlock * blocks - 1) *workspace.arrivals = 0;
}

}  // namespace

namespace cuda {

void route(const Tensor& logits, const Tensor* complexity, const RoutingParams& params, RoutingResult& result,
           void* stream_handle) {
  validate_routing_params(params);  // the rules both backends share (src/ops/ops.h)
  SY_CHECK_INPUT(params.num_experts <= kMaxRouteExperts, "routing on CUDA supports up to ", kMaxRouteExperts,
                 " experts, got ", params.num_experts);
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
  // Tile height 32 W: W = 8 warps while that leaves >= kTargetTiles tiles, fewer for smaller batches
  // so that they still spread over the SMs (a function of T alone: see the top comment).
  int num_warps = experts <= 128 ? kMaxRouteWarps : kMaxWideRouteWarps;  // as dispatch_route_layout
  while (num_warps > 1 && tokens < int64_t(num_warps) * 32 * kTargetTiles) num_warps /= 2;
  const int tile_tokens = num_warps * 32;
  const int64_t tile_count = std::max<int64_t>(1, (tokens + tile_tokens - 1) / tile_tokens);
  SY_CHECK(tile_count <= int64_t(INT_MAX), "route: too many tokens");
  const int num_tiles = int(tile_count);
  const int64_t columns = int64_t(experts) * k_max;

  // Scratch: the barrier counter (zero between calls) apart from the data, which every call
  // overwrites before reading.
  unsigned* arrivals = static_cast<unsigned*>(persistent_scratch(stream, kScratchRoutingControl, 256));
  size_t data_bytes = 0;
  auto take = [&](size_t bytes) {
    size_t at = data_bytes;
    data_bytes += (bytes + 255) / 256 * 256;
    return at;
  };
  const size_t columns_at = take(size_t(num_tiles) * columns * 4), totals_at = take(size_t(columns) * 4),
               floats_at = take(size_t(num_tiles) * (experts + 1) * 4);
  unsigned char* data = static_cast<unsigned char*>(persistent_scratch(stream, kScratchRoutingData, data_bytes));

  RouteArgs args{};
  args.params = params;
  args.logits = logits.as<float>();
  args.complexity = complexity_data;
  args.vector_loads = experts % 4 == 0 && is_aligned(logits.data, 16);
  args.entropy_scale = experts > 1 ? 1.0f / logf(float(experts)) : 0.0f;
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
  args.workspace.arrivals = arrivals;
  args.workspace.tile_columns = reinterpret_cast<int*>(data + columns_at);
  args.workspace.column_totals = reinterpret_cast<int*>(data + totals_at);
  args.workspace.float_partials = reinterpret_cast<float*>(data + floats_at);

  const size_t shared_bytes = RouteShared(nullptr, experts, k_max, num_warps).bytes;
  dispatch_route_layout(experts, [&](auto lanes) {
    using Lanes = decltype(lanes);
    auto kernel = route_forward_kernel<Lanes::group, Lanes::per_lane>;
    if (shared_bytes > 48 * 1024)
      CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)));
    // A grid barrier must never wait for blocks that cannot be scheduled because other kernels (NCCL
    // on the communication stream, waiting for a peer) hold part of the GPU: the grid takes at most
    // 3/4 of the co-resident blocks (half where only one block fits per SM). The tile loop is
    // persistent, so a smaller grid only changes the schedule.
    const int resident = cooperative_grid_limit(reinterpret_cast<const void*>(kernel), tile_tokens, shared_bytes);
    const int cap = resident >= 2 * multiprocessor_count() ? resident / 4 * 3 : resident / 2;
    const int grid = std::min(num_tiles, std::max(1, cap));
    void* kernel_args[] = {&args};
    CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(unsigned(grid)),
                                           dim3(unsigned(tile_tokens)), kernel_args, shared_bytes, stream));
  });
}

}  // namespace cuda
}  // namespace switchyard
