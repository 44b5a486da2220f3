// Router forward on CUDA (semantics: kernels/moe_ops.h; the CPU reference defines them). The
// backward is kernels/cuda/routing_backward.cu.
//
// One cooperative kernel after the logits GEMM; logits fp32 [T, E] row-major. Tiles of 32 W tokens
// (W warps: 16 for large batches, 8 or 4 for small ones so they still spread over the SMs), one
// warp per 32 tokens, a token's row over a group of kGroup lanes (cuda_common.cuh), 16-byte
// streaming loads with the next pass prefetched. The grid holds at most the blocks the GPU keeps
// resident at once (the cooperative launch guarantees it); block b walks tiles b, b + grid, ...
// Phase 1, per tile: softmax statistics (e_i = exp(l_i - max), p_i = e_i / sum, lse), k_t, top-k on
//   the key (ordered(l) << 32 | ~e) so ties go to the lower expert, gates (renormalized over the
//   k_t choices or not). Slots follow GShard order (all choices j before any j+1), as ranks in the
//   (choice j, expert e) columns c = j E + e:
//     slot(t, j) = sum_{j'<j} C[j'][e] + (tiles before t's)[c] + (warps before, in the tile)[c]
//                  + (lanes before, in the warp)
//   The last two come from __match_any_sync and a shared-memory scan of per-warp counts; phase 1
//   writes ids, gates, k_t, lse and that partial slot, the tile's column counts [K*E] and its float
//   partials (prob sums [E], sum of lse^2). Grid barrier.
// Phase 2a, a group of G lanes per item over the grid (G = 1..32 from the tile count): scan each
//   column over the tiles in place (counts of earlier tiles) and keep its total; sum each expert's
//   prob partials and the lse^2 partials in a fixed order (member m takes tiles m, m+G, ..., then
//   an xor tree): deterministic and independent of the grid size. Grid barrier.
// Phase 2b: every block forms choice_base[j][e] = sum_{j'<j} C[j'][e] and completes the slots of
//   its tiles; block 0 writes counts, offsets, scalars and the aux loss. Capacity depends on
//   sum_t k_t, known only here, so slots are written unconditionally and a choice is dropped when
//   slot >= scalars[kCapacity] (permute / combine read it on the device).
// Why this shape: the previous version (decoupled look-back over per-tile flags, a last-block
// reduction, a second kernel for the choice bases) mostly waited: hundreds of threads per block
// spinning on a few flag lines in L2, one block reducing alone, a second launch. Here the only
// waits are two barriers polled by one thread per block, and the cross-tile work is spread over the
// grid. Integer sums are exact (outputs equal the CPU reference's bit for bit); float sums have a
// fixed order. The barrier counter lives in per-stream scratch; the last block out resets it.
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
// Arrivals at the two grid barriers plus one at the exit: the last block out sees this many.
constexpr unsigned kArrivalsPerBlock = 3;

// Global scratch of the kernel. `arrivals` is zero at kernel start (the last block out restores it).
struct RouteWorkspace {
  unsigned* arrivals;
  int* tile_columns;     // [num_tiles][K*E]: counts of each tile, then (phase 2a) counts of earlier tiles
  int* column_totals;    // [K*E]
  float* prob_partials;  // [num_tiles][E]
  float* z_partials;     // [num_tiles]
};

struct RouteArgs {
  const float *logits, *complexity;
  int64_t num_tokens;
  int num_experts, k_max, k_min, complexity_mode, segment_alignment, num_tiles, lanes_per_item;
  bool renormalize, dropless, vector_loads;
  float capacity_factor, aux_loss_weight, z_loss_weight;
  // Outputs (RoutingResult).
  int *expert_ids, *slots, *token_k, *expert_counts, *first_choice_counts, *expert_offsets, *scalars;
  float *gates, *logsumexp, *prob_sums, *losses;
  RouteWorkspace workspace;
};

// Shared memory of the kernel, carved from one dynamic allocation (4-byte items first). choice_base
// and slot_offset serve phase 2b, the rest phase 1; phase 2b reuses warp_probs (W >= 4 rows of E
// words) for the expert totals, first-choice counts and prob sums.
struct RouteSmemLayout {
  size_t choice_base, slot_offset, warp_probs, choice_gates, token_lse, warp_counts, choice_experts,
      choice_ranks, token_choices, total;
  __host__ __device__ RouteSmemLayout(int num_experts, int k_max, int num_warps) {
    const size_t tile_tokens = size_t(num_warps) * 32;
    size_t columns = size_t(num_experts) * k_max, choices = tile_tokens * k_max, offset = 0;
    auto take = [&](size_t bytes) {
      size_t at = offset;
      offset += (bytes + 15) / 16 * 16;
      return at;
    };
    choice_base = take(columns * 4);
    slot_offset = take(columns * 4);
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

struct RouteShared {
  int *choice_base, *slot_offset;                         // [K*E] each
  float *warp_probs, *choice_gates, *token_lse, *warp_z;  // [W][E], [tile][K], [tile], [W]
  uint16_t* warp_counts;                                  // [W][K*E]
  int16_t* choice_experts;                                // [tile][K]
  uint8_t *choice_ranks, *token_choices;                  // [tile][K], [tile]
};

// ---- Phase 1: one tile ------------------------------------------------------------------------

template <int kGroup, int kPerLane>
__device__ __forceinline__ void route_tile(const RouteArgs& args, const RouteShared& shared, int tile) {
  const int num_experts = args.num_experts, k_max = args.k_max, columns = num_experts * k_max;
  const int threads = blockDim.x, num_warps = threads / 32, tile_tokens = threads;
  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const RouteWorkspace& workspace = args.workspace;
  const int64_t tile_first_token = int64_t(tile) * tile_tokens;
  for (int column = lane; column < columns; column += 32) shared.warp_counts[warp * columns + column] = 0;

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
    const int k_token =
        choices_of_token(args.complexity_mode != int(ComplexityMode::none), complexity, args.k_min, k_max);

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
          shared.choice_experts[tile_token * k_max + choice] = int16_t(active ? chosen_expert[choice] : -1);
          shared.choice_gates[tile_token * k_max + choice] =
              active ? (args.renormalize ? chosen_prob[choice] / normalizer : chosen_prob[choice]) : 0.0f;
        }
      }
      shared.token_lse[tile_token] = lse;
      shared.token_choices[tile_token] = uint8_t(token_exists ? k_token : 0);
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
      shared.warp_probs[warp * num_experts + first_expert + i] = prob_accumulator[i];
  }
  z_accumulator = warp_sum(z_accumulator);
  if (lane == 0) shared.warp_z[warp] = z_accumulator;
  __syncwarp();
  {
    const int tile_token = warp * 32 + lane;  // one token per lane, in token order
    for (int choice = 0; choice < k_max; ++choice) {
      const int expert = shared.choice_experts[tile_token * k_max + choice];
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
  for (int expert = thread; expert < num_experts; expert += threads) {
    float sum = 0.0f;
    for (int w = 0; w < num_warps; ++w) sum += shared.warp_probs[w * num_experts + expert];
    workspace.prob_partials[int64_t(tile) * num_experts + expert] = sum;
  }
  if (thread == 0) {
    float sum = 0.0f;
    for (int w = 0; w < num_warps; ++w) sum += shared.warp_z[w];
    workspace.z_partials[tile] = sum;
  }
  __syncthreads();

  // ---- Outputs of the tile (coalesced); slots still lack the tile and choice offsets ----
  for (int index = thread; index < tile_tokens * k_max; index += threads) {
    const int tile_token = index / k_max, choice = index - tile_token * k_max;
    const int64_t token = tile_first_token + tile_token;
    if (token >= args.num_tokens) break;
    const int expert = shared.choice_experts[index];
    int slot = -1;
    if (expert >= 0)
      slot = shared.warp_counts[(tile_token / 32) * columns + choice * num_experts + expert] + shared.choice_ranks[index];
    const int64_t out = tile_first_token * k_max + index;
    args.expert_ids[out] = expert;
    args.gates[out] = shared.choice_gates[index];
    args.slots[out] = slot;
  }
  for (int tile_token = thread; tile_token < tile_tokens; tile_token += threads) {
    const int64_t token = tile_first_token + tile_token;
    if (token >= args.num_tokens) break;
    args.token_k[token] = shared.token_choices[tile_token];
    args.logsumexp[token] = shared.token_lse[tile_token];
  }
  __syncthreads();  // the next tile of this block reuses the shared arrays
}

// ---- Phase 2a: scans over tiles and the float reductions, one lane group per item --------------

// Lanes per phase-2a item: enough that one sweep of four tiles per lane covers most columns.
inline int lanes_per_item(int num_tiles) {
  int lanes = 1;
  while (lanes < 32 && lanes * 4 < num_tiles) lanes *= 2;
  return lanes;
}

// Column `column` of tile_columns (or nothing when !active; every lane of the warp calls this):
// counts -> counts of all earlier tiles (in place), the total to column_totals. Lane m of the
// group takes four consecutive tiles of each 4G-tile chunk: four independent L2 loads and one
// scan over the group per chunk.
__device__ __forceinline__ void scan_column(const RouteArgs& args, int lanes, bool active, int column, int member) {
  const RouteWorkspace& workspace = args.workspace;
  const int columns = args.num_experts * args.k_max, num_tiles = args.num_tiles;
  int carry = 0;
  for (int chunk = 0; chunk < num_tiles; chunk += 4 * lanes) {
    const int first = chunk + member * 4;
    int values[4], member_sum = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
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
    for (int q = 0; q < 4; ++q) {
      if (active && first + q < num_tiles) workspace.tile_columns[int64_t(first + q) * columns + column] = running;
      running += values[q];
    }
    carry += __shfl_sync(kFullWarpMask, inclusive, lanes - 1, lanes);
  }
  if (active && member == 0) workspace.column_totals[column] = carry;
}

// sum over tiles of values[tile * stride] in a fixed order: member m adds tiles m, m+G, ... in
// turn, then the group's xor tree. Every lane of the warp calls this.
__device__ __forceinline__ float sum_over_tiles(const float* values, int64_t stride, int num_tiles, int lanes,
                                                bool active, int member) {
  float sum = 0.0f;
  if (active)
    for (int tile = member; tile < num_tiles; tile += lanes) sum += __ldcg(values + int64_t(tile) * stride);
  for (int offset = lanes / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFullWarpMask, sum, offset);
  return sum;
}

__device__ __forceinline__ void scan_tiles_and_reduce(const RouteArgs& args) {
  const RouteWorkspace& workspace = args.workspace;
  const int num_experts = args.num_experts, columns = num_experts * args.k_max, num_tiles = args.num_tiles;
  const int lanes = args.lanes_per_item, items_per_warp = 32 / lanes, warps_per_block = blockDim.x / 32;
  const int lane = threadIdx.x % 32, member = lane % lanes;
  const int items = columns + num_experts + 1, items_per_round = int(gridDim.x) * warps_per_block * items_per_warp;
  // Uniform trip count over the warp (the shuffles need every lane); inactive groups add nothing.
  for (int base = (int(blockIdx.x) * warps_per_block + int(threadIdx.x / 32)) * items_per_warp; base < items;
       base += items_per_round) {
    const int item = base + lane / lanes;
    if (base < columns) scan_column(args, lanes, item < columns, item, member);
    if (base + items_per_warp <= columns) continue;  // every item of this warp was a column
    const bool is_expert = item >= columns && item < columns + num_experts, is_z = item == columns + num_experts;
    const float prob_sum = sum_over_tiles(workspace.prob_partials + (is_expert ? item - columns : 0), num_experts,
                                          num_tiles, lanes, is_expert, member);
    const float z_sum = sum_over_tiles(workspace.z_partials, 1, num_tiles, lanes, is_z, member);
    if (is_expert && member == 0) args.prob_sums[item - columns] = prob_sum;
    const float token_count = float(args.num_tokens > 0 ? args.num_tokens : 1);
    if (is_z && member == 0) args.losses[kZLoss] = args.z_loss_weight * z_sum / token_count;
  }
}

// ---- Phase 2b: block 0's layout outputs -------------------------------------------------------

// expert_counts, first_choice_counts, expert_offsets, scalars and the aux loss from the per-expert
// totals in shared memory. Warp-level only (no block barrier inside).
__device__ __forceinline__ void write_layout(const RouteArgs& args, const int* expert_total, const int* first_choice,
                                             const float* prob_sum) {
  const int num_experts = args.num_experts, thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  for (int expert = thread; expert < num_experts; expert += blockDim.x) {
    args.expert_counts[expert] = expert_total[expert];
    args.first_choice_counts[expert] = first_choice[expert];
  }
  if (warp != 0) return;
  const float token_count = float(args.num_tokens > 0 ? args.num_tokens : 1);
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
}

// ---- The kernel ---------------------------------------------------------------------------------

template <int kGroup, int kPerLane>
__global__ void __launch_bounds__(kMaxRouteThreads, 1) route_forward_kernel(RouteArgs args) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  __shared__ float warp_z[kMaxRouteWarps];
  const int num_experts = args.num_experts, k_max = args.k_max, columns = num_experts * k_max;
  const int threads = blockDim.x, tile_tokens = threads, thread = threadIdx.x;
  const RouteSmemLayout layout(num_experts, k_max, threads / 32);
  RouteShared shared;
  shared.choice_base = reinterpret_cast<int*>(shared_bytes + layout.choice_base);
  shared.slot_offset = reinterpret_cast<int*>(shared_bytes + layout.slot_offset);
  shared.warp_probs = reinterpret_cast<float*>(shared_bytes + layout.warp_probs);
  shared.choice_gates = reinterpret_cast<float*>(shared_bytes + layout.choice_gates);
  shared.token_lse = reinterpret_cast<float*>(shared_bytes + layout.token_lse);
  shared.warp_counts = reinterpret_cast<uint16_t*>(shared_bytes + layout.warp_counts);
  shared.choice_experts = reinterpret_cast<int16_t*>(shared_bytes + layout.choice_experts);
  shared.choice_ranks = shared_bytes + layout.choice_ranks;
  shared.token_choices = shared_bytes + layout.token_choices;
  shared.warp_z = warp_z;
  const RouteWorkspace& workspace = args.workspace;
  const unsigned blocks = gridDim.x;

  for (int tile = blockIdx.x; tile < args.num_tiles; tile += int(blocks)) route_tile<kGroup, kPerLane>(args, shared, tile);
  grid_barrier(workspace.arrivals, blocks);
  scan_tiles_and_reduce(args);
  grid_barrier(workspace.arrivals, 2 * blocks);

  // ---- Phase 2b: choice bases, block 0's outputs, final slots of this block's tiles ----
  // warp_probs (W >= 4 rows of E words) holds the per-expert totals, first-choice counts, prob sums.
  int* choice_base = shared.choice_base;
  int* slot_offset = shared.slot_offset;
  int* expert_total = reinterpret_cast<int*>(shared.warp_probs);
  int* first_choice = expert_total + num_experts;
  float* prob_sum = shared.warp_probs + 2 * num_experts;
#pragma unroll 4
  for (int column = thread; column < columns; column += threads)
    choice_base[column] = __ldcg(workspace.column_totals + column);
  if (blockIdx.x == 0)
    for (int expert = thread; expert < num_experts; expert += threads) prob_sum[expert] = __ldcg(args.prob_sums + expert);
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
  }
  __syncthreads();
  if (blockIdx.x == 0) write_layout(args, expert_total, first_choice, prob_sum);
  for (int tile = blockIdx.x; tile < args.num_tiles; tile += int(blocks)) {
#pragma unroll 4
    for (int column = thread; column < columns; column += threads)
      slot_offset[column] = __ldcg(workspace.tile_columns + int64_t(tile) * columns + column) + choice_base[column];
    __syncthreads();
    // The same index -> thread mapping as phase 1's output loop: each thread rereads its own writes.
    const int64_t tile_first_token = int64_t(tile) * tile_tokens;
    for (int index = thread; index < tile_tokens * k_max; index += threads) {
      const int tile_token = index / k_max, choice = index - tile_token * k_max;
      if (tile_first_token + tile_token >= args.num_tokens) break;
      const int64_t out = tile_first_token * k_max + index;
      const int expert = args.expert_ids[out];
      if (expert >= 0) args.slots[out] += slot_offset[choice * num_experts + expert];
    }
    __syncthreads();
  }

  // Leave the counter at zero for the next call: every block has passed both barriers once its
  // third arrival is counted, so the block that counts the last one may reset it.
  if (thread == 0 && atomicAdd(workspace.arrivals, 1u) == kArrivalsPerBlock * blocks - 1) *workspace.arrivals = 0;
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

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
  // Tile height: 512 tokens for large batches (fewer tiles); 256 or 128 for small ones, so that
  // they still spread over most SMs.
  const int num_warps = tokens >= int64_t(64) * 512 ? 16 : tokens >= int64_t(64) * 256 ? 8 : 4;
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
               prob_at = take(size_t(num_tiles) * experts * 4), z_at = take(size_t(num_tiles) * 4);
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
  args.lanes_per_item = lanes_per_item(num_tiles);
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
  args.workspace.prob_partials = reinterpret_cast<float*>(data + prob_at);
  args.workspace.z_partials = reinterpret_cast<float*>(data + z_at);

  const int threads = num_warps * 32;
  const size_t shared_bytes = RouteSmemLayout(experts, k_max, num_warps).total;
  dispatch_lane_layout(experts, [&](auto lanes) {
    using Lanes = decltype(lanes);
    auto kernel = route_forward_kernel<Lanes::group, Lanes::per_lane>;
    if (shared_bytes > 48 * 1024)
      CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)));
    // At most half of the co-resident blocks: a grid barrier must never wait for blocks that cannot be
    // scheduled because other kernels (NCCL on the communication stream, waiting for a peer) hold
    // the rest of the GPU. The tile loop is persistent, so a smaller grid only changes the schedule.
    const int resident = cooperative_grid_limit(reinterpret_cast<const void*>(kernel), threads, shared_bytes);
    const int grid = std::min(num_tiles, std::max(1, resident / 2));
    void* kernel_args[] = {&args};
    CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(unsigned(grid)),
                                           dim3(unsigned(threads)), kernel_args, shared_bytes, stream));
  });
}

}  // namespace cuda
}  // namespace switchyard
