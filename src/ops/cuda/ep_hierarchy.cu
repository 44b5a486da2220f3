// The hierarchical exchange's bookkeeping on CUDA (semantics: src/ops/ep_hier_ops.h; reference:
// src/ops/cpu/ep_hierarchy.cpp; integers equal bit for bit, gates copied unchanged).
//
// ep_choice_layout, a stable counting sort of T*K choices in three launches with no host sync:
//   1. tile_count_kernel: tiles of kTileChoices choices (token-major flat index); a block counts its
//      tile's ids in shared memory -> tile_counts [tiles, X] (persistent scratch).
//   2. tile_scan_kernel: one block; thread x walks the tiles in order, tile_counts[tile, x] becomes
//      the tile's first slot for id x, and counts[x] the total; then offsets and scalars.
//   3. tile_assign_kernel: one warp per tile walks its choices 32 at a time in order; lanes with the
//      same id (__match_any_sync) take consecutive slots by lane order, the lowest such lane bumps
//      the tile's running count in shared memory. Order within a tile is thus token-major, as the
//      reference's.
// ep_kept_choices, ep_map_choice_ids: one thread per choice.
// ep_node_choices / ep_pack_node_choices / ep_unpack_node_gate_grads: one thread per token; K <= 8,
//   so the per-token work is a few dozen integer operations.
#include <algorithm>
#include <climits>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/ep_hier_ops.h"
#include "src/ops/moe_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kTileChoices = 2048;
constexpr int kCountThreads = 256;
constexpr int kScanThreads = 512;
constexpr int kTokenThreads = 256;
constexpr int kMaxLayoutSlots = 8192;  // shared-memory counters of one tile (32 KiB)
constexpr int kScratchChoiceLayout = 0x45434c59;  // persistent_scratch tag ("ECLY")

__global__ void __launch_bounds__(kCountThreads)
tile_count_kernel(const int* ids, long long choices, int slots, int* tile_counts) {
  extern __shared__ int counts[];
  for (int slot = threadIdx.x; slot < slots; slot += blockDim.x) counts[slot] = 0;
  __syncthreads();
  const long long begin = (long long)blockIdx.x * kTileChoices;
  const long long end = min(begin + kTileChoices, choices);
  for (long long index = begin + threadIdx.x; index < end; index += blockDim.x) {
    const int id = ids[index];
    if (id >= 0) atomicAdd(&counts[id], 1);
  }
  __syncthreads();
  for (int slot = threadIdx.x; slot < slots; slot += blockDim.x)
    tile_counts[(long long)blockIdx.x * slots + slot] = counts[slot];
}

__global__ void __launch_bounds__(kScanThreads)
tile_scan_kernel(int* tile_counts, int tiles, int slots, int* counts, int* offsets, int* scalars) {
  for (int slot = threadIdx.x; slot < slots; slot += blockDim.x) {
    int running = 0;
    for (int tile = 0; tile < tiles; ++tile) {
      const int here = tile_counts[(long long)tile * slots + slot];
      tile_counts[(long long)tile * slots + slot] = running;
      running += here;
    }
    counts[slot] = running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int running = 0;
    offsets[0] = 0;
    for (int slot = 0; slot < slots; ++slot) {
      running += counts[slot];
      offsets[slot + 1] = running;
    }
    scalars[kCapacity] = INT_MAX;
    scalars[kTotalChoices] = running;
    scalars[kDroppedChoices] = 0;
    scalars[kPaddedRows] = running;
  }
}

__global__ void __launch_bounds__(32)
tile_assign_kernel(const int* ids, long long choices, int slots, const int* tile_starts, int* slot_out) {
  extern __shared__ int running[];
  for (int slot = threadIdx.x; slot < slots; slot += 32) running[slot] = tile_starts[(long long)blockIdx.x * slots + slot];
  __syncwarp();
  const long long begin = (long long)blockIdx.x * kTileChoices;
  const long long end = min(begin + kTileChoices, choices);
  const unsigned lane = threadIdx.x, lanes_below = (1u << lane) - 1u;
  for (long long base = begin; base < end; base += 32) {
    const long long index = base + lane;
    const int id = index < end ? ids[index] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, id);
    const int start = id >= 0 ? running[id] : 0;
    __syncwarp();
    if (index < end) slot_out[index] = id >= 0 ? start + __popc(peers & lanes_below) : -1;
    if (id >= 0 && (peers & lanes_below) == 0) running[id] = start + __popc(peers);
    __syncwarp();
  }
}

// The node of choice `index` when permute keeps it (id >= 0, 0 <= slot < capacity), else -1.
__device__ __forceinline__ int kept_node(const int* ids, const int* slots, const int* scalars, long long index,
                                         int per_node) {
  const int slot = slots[index];
  return (ids[index] >= 0 && slot >= 0 && slot < scalars[kCapacity]) ? ids[index] / per_node : -1;
}

__global__ void __launch_bounds__(kTokenThreads)
kept_choices_kernel(const int* ids, const int* slots, const int* scalars, long long choices, int* kept_ids) {
  const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= choices) return;
  const int slot = slots[index];
  kept_ids[index] = (ids[index] >= 0 && slot >= 0 && slot < scalars[kCapacity]) ? ids[index] : -1;
}

// An id past the map (which the reference rejects) maps to -1: the choice is then dropped.
__global__ void __launch_bounds__(kTokenThreads)
map_choice_ids_kernel(const int* ids, const int* expert_map, int experts, long long choices, int* mapped) {
  const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= choices) return;
  const int id = ids[index];
  mapped[index] = (id >= 0 && id < experts) ? expert_map[id] : -1;
}

__global__ void __launch_bounds__(kTokenThreads)
node_choices_kernel(const int* ids, const int* slots, const int* scalars, long long tokens, int choices, int per_node,
                    int node_slots, int* node_ids) {
  const long long token = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (token >= tokens) return;
  int nodes[kMaxTopK];
  int found = 0;
  for (int choice = 0; choice < choices; ++choice) {
    const int node = kept_node(ids, slots, scalars, token * choices + choice, per_node);
    if (node < 0) continue;
    bool seen = false;
    for (int i = 0; i < found; ++i) seen = seen || nodes[i] == node;
    if (seen) continue;
    int at = found++;  // insertion sort: ascending
    while (at > 0 && nodes[at - 1] > node) {
      nodes[at] = nodes[at - 1];
      --at;
    }
    nodes[at] = node;
  }
  for (int slot = 0; slot < node_slots; ++slot) node_ids[token * node_slots + slot] = slot < found ? nodes[slot] : -1;
}

__global__ void __launch_bounds__(kTokenThreads)
pack_node_choices_kernel(const int* ids, const float* gates, const int* slots, const int* scalars, const int* node_ids,
                         const int* node_rows, long long tokens, int choices, int node_slots, int per_node,
                         int* meta_ids, float* meta_gates) {
  const long long token = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (token >= tokens) return;
  for (int slot = 0; slot < node_slots; ++slot) {
    const int node = node_ids[token * node_slots + slot];
    const long long row = node_rows[token * node_slots + slot];
    if (node < 0 || row < 0) continue;
    for (int choice = 0; choice < choices; ++choice) {
      const long long index = token * choices + choice;
      const bool here = kept_node(ids, slots, scalars, index, per_node) == node;
      meta_ids[row * choices + choice] = here ? ids[index] - node * per_node : -1;
      meta_gates[row * choices + choice] = here ? gates[index] : 0.0f;
    }
  }
}

__global__ void __launch_bounds__(kTokenThreads)
unpack_gate_grads_kernel(const float* meta_grad, const int* ids, const int* slots, const int* scalars, const int* node_ids,
                         const int* node_rows, long long tokens, int choices, int node_slots, int per_node,
                         float* grad_gates) {
  const long long token = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (token >= tokens) return;
  for (int choice = 0; choice < choices; ++choice) {
    const long long index = token * choices + choice;
    const int node = kept_node(ids, slots, scalars, index, per_node);
    long long row = -1;
    for (int slot = 0; slot < node_slots && node >= 0; ++slot)
      if (node_ids[token * node_slots + slot] == node) row = node_rows[token * node_slots + slot];
    grad_gates[index] = row < 0 ? 0.0f : meta_grad[row * choices + choice];
  }
}

int token_blocks(long long tokens) { return int((tokens + kTokenThreads - 1) / kTokenThreads); }

// [T, K] int32 choices on the GPU with 1 <= K <= kMaxTopK; returns T.
int64_t check_choices(const Tensor& tensor, const char* op, const char* name) {
  SY_CHECK(tensor.device == DeviceKind::cuda && tensor.dtype == DType::i32 && tensor.rank == 2 &&
               tensor.dim(1) >= 1 && tensor.dim(1) <= kMaxTopK,
           op, ": ", name, " must be i32 [T, K <= ", kMaxTopK, "] on cuda, got ", tensor.describe());
  return tensor.dim(0);
}

}  // namespace

namespace cuda {

void ep_choice_layout(const Tensor& ids, int num_slots, Tensor& slots, Tensor& counts, Tensor& offsets,
                      Tensor& scalars, void* stream_handle) {
  const int64_t tokens = check_choices(ids, "ep_choice_layout", "ids"), choices_per_token = ids.dim(1);
  SY_CHECK(num_slots >= 1 && num_slots <= kMaxLayoutSlots, "ep_choice_layout: num_slots must be in [1, ",
           kMaxLayoutSlots, "], got ", num_slots);
  check_tensor(slots, "ep_choice_layout: slots", DType::i32, {tokens, choices_per_token});
  check_tensor(counts, "ep_choice_layout: counts", DType::i32, {num_slots});
  check_tensor(offsets, "ep_choice_layout: offsets", DType::i32, {num_slots + 1});
  check_tensor(scalars, "ep_choice_layout: scalars", DType::i32, {kNumRoutingScalars});
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const long long choices = tokens * choices_per_token;
  const int tiles = int(std::max<long long>(1, (choices + kTileChoices - 1) / kTileChoices));
  int* tile_counts = static_cast<int*>(
      persistent_scratch(stream, kScratchChoiceLayout, size_t(tiles) * size_t(num_slots) * sizeof(int)));
  const size_t shared = size_t(num_slots) * sizeof(int);
  tile_count_kernel<<<tiles, kCountThreads, shared, stream>>>(ids.as<int>(), choices, num_slots, tile_counts);
  CUDA_CHECK_LAUNCH();
  tile_scan_kernel<<<1, kScanThreads, 0, stream>>>(tile_counts, tiles, num_slots, counts.as<int>(),
                                                   offsets.as<int>(), scalars.as<int>());
  CUDA_CHECK_LAUNCH();
  if (choices == 0) return;
  tile_assign_kernel<<<tiles, 32, shared, stream>>>(ids.as<int>(), choices, num_slots, tile_counts, slots.as<int>());
  CUDA_CHECK_LAUNCH();
}

void ep_kept_choices(const Tensor& ids, const Tensor& slots, const Tensor& scalars, Tensor& kept_ids,
                     void* stream_handle) {
  const int64_t tokens = check_choices(ids, "ep_kept_choices", "ids");
  const int choices = int(ids.dim(1));
  check_tensor(slots, "ep_kept_choices: slots", DType::i32, {tokens, choices});
  check_tensor(scalars, "ep_kept_choices: scalars", DType::i32, {kNumRoutingScalars});
  check_tensor(kept_ids, "ep_kept_choices: kept_ids", DType::i32, {tokens, choices});
  const long long count = (long long)tokens * choices;
  if (count == 0) return;
  kept_choices_kernel<<<token_blocks(count), kTokenThreads, 0, static_cast<cudaStream_t>(stream_handle)>>>(
      ids.as<int>(), slots.as<int>(), scalars.as<int>(), count, kept_ids.as<int>());
  CUDA_CHECK_LAUNCH();
}

void ep_map_choice_ids(const Tensor& ids, const Tensor& expert_map, Tensor& mapped_ids, void* stream_handle) {
  const int64_t tokens = check_choices(ids, "ep_map_choice_ids", "ids");
  const int choices = int(ids.dim(1));
  SY_CHECK(expert_map.rank == 1 && expert_map.dim(0) >= 1, "ep_map_choice_ids: expert_map must be i32 [X], got ",
           expert_map.describe());
  const int experts = int(expert_map.dim(0));
  check_tensor(expert_map, "ep_map_choice_ids: expert_map", DType::i32, {experts});
  check_tensor(mapped_ids, "ep_map_choice_ids: mapped_ids", DType::i32, {tokens, choices});
  const long long count = (long long)tokens * choices;
  if (count == 0) return;
  map_choice_ids_kernel<<<token_blocks(count), kTokenThreads, 0, static_cast<cudaStream_t>(stream_handle)>>>(
      ids.as<int>(), expert_map.as<int>(), experts, count, mapped_ids.as<int>());
  CUDA_CHECK_LAUNCH();
}

void ep_node_choices(const Tensor& ids, const Tensor& slots, const Tensor& scalars, int experts_per_node, int num_nodes,
                     Tensor& node_ids, void* stream_handle) {
  const int64_t tokens = check_choices(ids, "ep_node_choices", "ids");
  const int choices = int(ids.dim(1)), node_slots = std::min(choices, num_nodes);
  SY_CHECK(experts_per_node >= 1 && num_nodes >= 1, "ep_node_choices: experts_per_node and num_nodes must be >= 1");
  check_tensor(slots, "ep_node_choices: slots", DType::i32, {tokens, choices});
  check_tensor(scalars, "ep_node_choices: scalars", DType::i32, {kNumRoutingScalars});
  check_tensor(node_ids, "ep_node_choices: node_ids", DType::i32, {tokens, node_slots});
  if (tokens == 0) return;
  node_choices_kernel<<<token_blocks(tokens), kTokenThreads, 0, static_cast<cudaStream_t>(stream_handle)>>>(
      ids.as<int>(), slots.as<int>(), scalars.as<int>(), tokens, choices, experts_per_node, node_slots, node_ids.as<int>());
  CUDA_CHECK_LAUNCH();
}

void ep_pack_node_choices(const Tensor& ids, const Tensor& gates, const Tensor& slots, const Tensor& scalars, const Tensor& node_ids,
                          const Tensor& node_rows, int experts_per_node, Tensor& meta_ids, Tensor& meta_gates,
                          void* stream_handle) {
  const char* op = "ep_pack_node_choices";
  const int64_t tokens = check_choices(ids, op, "ids");
  const int choices = int(ids.dim(1));
  const int node_slots = node_ids.rank == 2 ? int(node_ids.dim(1)) : 0;
  const int64_t rows = meta_ids.rank == 2 ? meta_ids.dim(0) : 0;
  check_tensor(gates, "ep_pack_node_choices: gates", DType::f32, {tokens, choices});
  check_tensor(slots, "ep_pack_node_choices: slots", DType::i32, {tokens, choices});
  check_tensor(scalars, "ep_pack_node_choices: scalars", DType::i32, {kNumRoutingScalars});
  check_tensor(node_ids, "ep_pack_node_choices: node_ids", DType::i32, {tokens, node_slots});
  check_tensor(node_rows, "ep_pack_node_choices: node_rows", DType::i32, {tokens, node_slots});
  check_tensor(meta_ids, "ep_pack_node_choices: meta_ids", DType::i32, {rows, choices});
  check_tensor(meta_gates, "ep_pack_node_choices: meta_gates", DType::f32, {rows, choices});
  if (tokens == 0) return;
  pack_node_choices_kernel<<<token_blocks(tokens), kTokenThreads, 0, static_cast<cudaStream_t>(stream_handle)>>>(
      ids.as<int>(), gates.as<float>(), slots.as<int>(), scalars.as<int>(), node_ids.as<int>(), node_rows.as<int>(), tokens,
      choices, node_slots, experts_per_node, meta_ids.as<int>(), meta_gates.as<float>());
  CUDA_CHECK_LAUNCH();
}

void ep_unpack_node_gate_grads(const Tensor& meta_grad_gates, const Tensor& ids, const Tensor& slots, const Tensor& scalars,
                               const Tensor& node_ids, const Tensor& node_rows, int experts_per_node,
                               Tensor& grad_gates, void* stream_handle) {
  const char* op = "ep_unpack_node_gate_grads";
  const int64_t tokens = check_choices(ids, op, "ids");
  const int choices = int(ids.dim(1));
  const int node_slots = node_ids.rank == 2 ? int(node_ids.dim(1)) : 0;
  const int64_t rows = meta_grad_gates.rank == 2 ? meta_grad_gates.dim(0) : 0;
  check_tensor(meta_grad_gates, "ep_unpack_node_gate_grads: meta_grad_gates", DType::f32, {rows, choices});
  check_tensor(slots, "ep_unpack_node_gate_grads: slots", DType::i32, {tokens, choices});
  check_tensor(scalars, "ep_unpack_node_gate_grads: scalars", DType::i32, {kNumRoutingScalars});
  check_tensor(node_ids, "ep_unpack_node_gate_grads: node_ids", DType::i32, {tokens, node_slots});
  check_tensor(node_rows, "ep_unpack_node_gate_grads: node_rows", DType::i32, {tokens, node_slots});
  check_tensor(grad_gates, "ep_unpack_node_gate_grads: grad_gates", DType::f32, {tokens, choices});
  if (tokens == 0) return;
  unpack_gate_grads_kernel<<<token_blocks(tokens), kTokenThreads, 0, static_cast<cudaStream_t>(stream_handle)>>>(
      meta_grad_gates.as<float>(), ids.as<int>(), slots.as<int>(), scalars.as<int>(), node_ids.as<int>(), node_rows.as<int>(),
      tokens, choices, node_slots, experts_per_node, grad_gates.as<float>());
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
