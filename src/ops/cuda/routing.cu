// Router forward on CUDA (semantics: src/ops/moe_ops.h; the CPU reference defines them). The
// backward is src/ops/cuda/routing_backward.cu.
//
// One cooperative kernel after the logits GEMM; logits fp32 [T, E] row-major, E <= 512. Tiles of
// 32 W tokens, one warp per 32 tokens (W = 16, or 8, 4, 2, 1 for smaller batches so that >= 128
// tiles spread over the SMs; at most 8 above 128 experts and in the modern variants; W depends on
// T, E and the variant only, so the float sums have one order on any GPU:
// routing_layout::forward_tile_warps). Fewer, taller tiles shorten the cross-tile phase: at 65,536
// tokens x 64 experts, W = 16 (128 tiles) took 25.8-25.9 us against 29.8-30.0 for W = 8 (256 tiles)
// on an H100. A token's row lies over kGroup lanes, kPerLane = 8 logits each (two 16-byte streaming
// loads, the next pass prefetched), which keeps blocks within 64 registers: 1024 threads per SM (16
// logits per lane above 128 experts, a whole warp per token above 256: 128 registers, 512 threads
// per SM; routing_layout::forward_lanes). The grid holds every co-resident block, or at most 3/4 of
// them in a process whose kernels may wait on other ranks (a grid barrier must never wait for a
// block that cannot be scheduled while kernels on other streams, e.g. NCCL, hold SMs: see
// launch_route_kernel); block b walks tiles b, b + grid, ...
// Variants (a template parameter, so the Switch router's code is what it was): kSwitchVariant
//   (softmax, top-k over the logits: routing_forward_tile.cuh), kSoftmaxKeyVariant (softmax with a
//   selection bias and / or group-limited routing) and kSigmoidVariant (routing_forward_modern.cuh:
//   keys from routing_math.h, the group limit through shared memory, gates from the unbiased score).
// Phase 1, per tile: softmax statistics (e_i = exp(l_i - max), p_i = e_i / sum, lse), k_t, top-k on
//   the key (ordered(key) << 32 | ~e) so ties go to the lower expert (per round a pairwise tree over
//   the lane's slice, then over the group), gates (renormalized over the k_t choices or not, times
//   routed_scaling_factor). Slots follow GShard order (all choices j before any j+1), as ranks in
//   the columns c = j E + e:
//     slot(t, j) = sum_{j'<j} C[j'][e] + (tiles before t's)[c] + (warps before, in the tile)[c]
//                  + (lanes before, in the warp)
//   The last two come from __match_any_sync and a shared-memory scan of per-warp counts; phase 1
//   writes ids, gates, k_t, lse, the partial slots (except of the block's last tile), the tile's
//   column counts [K*E] and float partials (prob sums [E] of p or s', sum of lse^2). Grid barrier.
// Phase 2a, a group of G lanes per item over the grid (G = 1..32 from the tile count): scan each
//   column over the tiles in place (counts of earlier tiles) and keep its total; sum each expert's
//   prob partials and the lse^2 partials in a fixed order (member m takes tiles m, m+G, ..., then
//   an xor tree): deterministic and independent of the grid size. Grid barrier.
// Phase 2b: every block forms choice_base[j][e] = sum_{j'<j} C[j'][e] and completes the slots of
//   its tiles: the last one from shared memory (phase 1 left its choices, ranks and warp offsets
//   there), earlier ones (only when tiles outnumber the grid) in global memory. Block 0 writes
//   counts, offsets, scalars and the aux loss (0 for the sequence and global losses). Capacity
//   depends on sum_t k_t, known only here, so slots are written unconditionally and a choice is
//   dropped when slot >= scalars[kCapacity].
// Then, on the same stream (routing_passes.cuh): probability drops re-rank the slots
// (routing_drop_priority.cu); the sequence-level loss writes sequence_fractions and
// losses[kSeqAuxLoss] (routing_sequence_loss.cu).
// Shared memory: routing_layout::forward_shared (E = 512, K = 8, W = 8: about 130 KiB, 162 KiB with
// the bias and the largest group scratch; one block per SM).
// Why this shape: the only waits are two barriers polled by one thread per block; cross-tile work is
// spread over the grid; per-token work is lean (trees, not dependent chains; one MUFU op per exp; no
// per-choice register arrays). Integer sums are exact (outputs equal the CPU reference's bit for bit);
// float sums have a fixed order. The barrier counter is per-stream scratch; the last block out resets it.
#include <algorithm>
#include <climits>
#include <cmath>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/cuda/routing_forward_args.cuh"        // arguments, scratch, shared memory
#include "src/ops/cuda/routing_forward_tile.cuh"        // phase 1
#include "src/ops/cuda/routing_forward_cross_tile.cuh"  // phase 2a, block 0's part of phase 2b
#include "src/ops/cuda/routing_passes.cuh"               // probability drops, the sequence loss
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

// A block of W warps (routing_layout::forward_tile_warps: 1, 2, 4, 8 or 16, chosen per call) handles
// 32 W tokens, one per lane of each warp. Launch bounds: 16 warps and 64 registers for the Switch
// kernel's 8-logit layouts, 8 warps and 128 registers otherwise.
template <int kPerLane, int kVariant>
constexpr int max_route_threads() {
  return (kVariant == routing_layout::kSwitchVariant && kPerLane <= 8 ? 16 : 8) * 32;
}
template <int kPerLane, int kVariant>
constexpr int min_route_blocks() {
  return (kVariant == routing_layout::kSwitchVariant && kPerLane <= 8 ? 1024 : 512) / max_route_threads<kPerLane, kVariant>();
}
// Arrivals at the two grid barriers plus one at the exit: the last block out sees this many.
constexpr unsigned kArrivalsPerBlock = 3;

// Calls functor(LaneLayout<...>{}) for routing_layout::forward_lanes(num_experts).
template <typename Functor>
void dispatch_route_layout(int num_experts, Functor&& functor) {
  const routing_layout::Lanes lanes = routing_layout::forward_lanes(num_experts);
  if (lanes.per_lane == 16) {
    if (lanes.group == 16) functor(LaneLayout<16, 16>{});
    else functor(LaneLayout<32, 16>{});
  } else if (lanes.group == 1) functor(LaneLayout<1, 8>{});
  else if (lanes.group == 2) functor(LaneLayout<2, 8>{});
  else if (lanes.group == 4) functor(LaneLayout<4, 8>{});
  else if (lanes.group == 8) functor(LaneLayout<8, 8>{});
  else functor(LaneLayout<16, 8>{});
}

// Calls functor(std::integral_constant<int, variant>{}).
template <typename Functor>
void dispatch_route_variant(int variant, Functor&& functor) {
  if (variant == routing_layout::kSwitchVariant) functor(std::integral_constant<int, routing_layout::kSwitchVariant>{});
  else if (variant == routing_layout::kSoftmaxKeyVariant)
    functor(std::integral_constant<int, routing_layout::kSoftmaxKeyVariant>{});
  else functor(std::integral_constant<int, routing_layout::kSigmoidVariant>{});
}

// ---- The kernel ---------------------------------------------------------------------------------

template <int kGroup, int kPerLane, int kVariant>
__global__ void __launch_bounds__(max_route_threads<kPerLane, kVariant>(), min_route_blocks<kPerLane, kVariant>())
    route_forward_kernel(RouteArgs args) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int num_experts = args.params.num_experts, k_max = args.params.k_max, columns = num_experts * k_max;
  const int threads = blockDim.x, tile_tokens = threads, thread = threadIdx.x;
  RouteShared shared(shared_bytes, args.shared_layout);
  const RouteWorkspace& workspace = args.workspace;
  const unsigned blocks = gridDim.x;
  // grid <= num_tiles, so every block has at least one tile; this is its last.
  const int last_tile = int(blockIdx.x) + (args.num_tiles - 1 - int(blockIdx.x)) / int(blocks) * int(blocks);

  if constexpr (kVariant != routing_layout::kSwitchVariant) {
    if (args.selection_bias != nullptr) {  // zero-padded to the lane layout's width
      for (int expert = thread; expert < kGroup * kPerLane; expert += threads)
        shared.bias[expert] = expert < num_experts ? args.selection_bias[expert] : 0.0f;
      __syncthreads();
    }
  }
  for (int tile = blockIdx.x; tile < args.num_tiles; tile += int(blocks))
    route_tile<kGroup, kPerLane, kVariant>(args, shared, tile, tile == last_tile);
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

// The cooperative launch. A grid barrier must never wait for blocks that cannot be scheduled
// because other kernels (NCCL on the communication stream, waiting for a peer) hold part of the
// GPU: in a process that may run such kernels (cross_process_device_waits: a CUDA communicator of
// more than one rank exists) the grid takes at most 3/4 of the co-resident blocks (half where only
// one block fits per SM). Otherwise every kernel that could hold SMs finishes on its own (the shared
// experts' GEMMs on the side stream), so the grid may take them all: one wave of tiles where the
// 3/4 cap would make two (65,536 x 256 experts: 256 tiles against a cap of 198 blocks). The tile
// loop is persistent, so the grid size only changes the schedule, never a result.
template <int kGroup, int kPerLane, int kVariant>
void launch_route_kernel(RouteArgs& args, int tile_tokens, size_t shared_bytes, cudaStream_t stream) {
  auto kernel = route_forward_kernel<kGroup, kPerLane, kVariant>;
  if (shared_bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)));
  const int resident = cooperative_grid_limit(reinterpret_cast<const void*>(kernel), tile_tokens, shared_bytes);
  const int cap = !cross_process_device_waits()              ? resident
                  : resident >= 2 * multiprocessor_count() ? resident / 4 * 3
                                                           : resident / 2;
  const int grid = std::min(args.num_tiles, std::max(1, cap));
  void* kernel_args[] = {&args};
  CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(unsigned(grid)),
                                         dim3(unsigned(tile_tokens)), kernel_args, shared_bytes, stream));
}

}  // namespace

namespace cuda {

void route(const Tensor& logits, const RoutingInputs& inputs, const RoutingParams& params, RoutingResult& result,
           void* stream_handle) {
  validate_routing_params(params);  // the rules both backends share (src/ops/ops.h)
  const Tensor* complexity = inputs.complexity;
  SY_CHECK_INPUT(params.method == RoutingMethod::token_choice,
                 "route: expert-choice routing goes through route_expert_choice (ops::route picks it)");
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
  const float* bias_data = nullptr;
  if (inputs.selection_bias != nullptr) {
    check_tensor(*inputs.selection_bias, "route: selection_bias", DType::f32, {experts});
    bias_data = inputs.selection_bias->as<float>();
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
  if (params.seq_aux_loss_weight > 0.0f) check_sequence_fractions(result.sequence_fractions, params, "route");

  // The kernel variant: the Switch router unless a modern option changes the keys or the scores.
  const bool grouped = params.num_groups > 1 && params.topk_groups < params.num_groups;
  const int variant = params.score_function == ScoreFunction::sigmoid ? routing_layout::kSigmoidVariant
                      : (bias_data != nullptr || grouped)             ? routing_layout::kSoftmaxKeyVariant
                                                                      : routing_layout::kSwitchVariant;

  cudaStream_t stream = as_stream(stream_handle);
  // Tile height 32 W: the most warps that leave >= kTargetTiles tiles (a function of T, E and the
  // variant: see the top comment).
  const int num_warps = routing_layout::forward_tile_warps(tokens, experts, variant);
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
  args.selection_bias = bias_data;
  args.grouped = grouped;
  args.group_size = experts / params.num_groups;
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

  // The group limit in registers when every group covers a power-of-two run of whole lane slices
  // (e.g. E = 256, 8 groups: 2 lanes of 16 experts per group), through shared memory otherwise.
  const routing_layout::Lanes lanes = routing_layout::forward_lanes(experts);
  const int lanes_per_group = args.group_size % lanes.per_lane == 0 ? args.group_size / lanes.per_lane : 0;
  args.lanes_per_group =
      grouped && lanes_per_group > 0 && lanes_per_group <= lanes.group && (lanes_per_group & (lanes_per_group - 1)) == 0
          ? lanes_per_group
          : 0;
  args.group_floats = grouped && args.lanes_per_group == 0
                          ? routing_layout::group_scratch_floats_per_warp(experts, params.num_groups)
                          : 0;
  args.shared_layout = routing_layout::forward_shared(
      experts, k_max, num_warps, bias_data != nullptr ? routing_layout::bias_floats(experts) : 0, args.group_floats);
  const size_t shared_bytes = args.shared_layout.bytes;
  SY_CHECK(shared_bytes <= routing_layout::kMaxSharedBytes, "route: ", shared_bytes,
           " bytes of shared memory for E = ", experts, ", K = ", k_max);
  dispatch_route_layout(experts, [&](auto lanes) {
    using Lanes = decltype(lanes);
    dispatch_route_variant(variant, [&](auto variant_tag) {
      launch_route_kernel<Lanes::group, Lanes::per_lane, decltype(variant_tag)::value>(args, tile_tokens, shared_bytes,
                                                                                      stream);
    });
  });

  // The passes after the kernel (src/ops/cuda/routing_passes.cuh).
  if (params.drop_policy == DropPolicy::probability) rank_slots_by_priority(logits, params, result, stream);
  if (params.seq_aux_loss_weight > 0.0f) sequence_balance_loss(logits, params, result, stream);
}

}  // namespace cuda
}  // namespace switchyard