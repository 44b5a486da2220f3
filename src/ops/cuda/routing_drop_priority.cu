// Probability drops on CUDA (src/ops/moe_ops.h, "drop policy"; the CPU reference
// src/ops/cpu/routing.cpp defines them): after the fused forward kernel (src/ops/cuda/routing.cu) has
// left GShard slots, every expert's choices are ranked by their priority score from high to low,
// ties in GShard order (choice index, then token index: exactly the order of the GShard slots), and
// slot = that rank. Counts, capacity, drops (sum_e max(0, count_e - capacity)), offsets and scalars
// do not change: an expert keeps min(count_e, capacity) choices under either order.
//
// Priority of choice (t, j), expert e = expert_ids[t, j], fp32 logits z (src/ops/routing_math.h, the
// same bits as the CPU's):
//   softmax: routing_softmax_priority(z[t,e], m_t, D_t), m_t = max_f z[t,f], D_t =
//            routing_softmax_denominator (a sequential sum over f = 0, 1, ..., E-1)
//   sigmoid: routing_sigmoid(z[t,e])
// Steps (no host synchronization):
//  1. priority_keys_kernel, one thread per token: key = routing_layout::drop_sort_key(priority,
//     GShard slot) and value = t K + j of each of the token's k_t choices, stored at start_e + GShard
//     slot (start_e = sum_{f<e} count_f, scanned per block in shared memory; block 0 stores the starts).
//  2. cub::DeviceSegmentedRadixSort::SortPairsDescending over the E segments [start_e, start_{e+1})
//     on the key's 32 + drop_slot_bits(T K) bits; the keys of a segment are distinct (slots are), so
//     the order is total. (Not cub::DeviceSegmentedSort: above 500 segments it copies segment
//     counts to the host and synchronizes the stream.)
//  3. write_ranked_slots_kernel: sorted position p in segment e -> slots[value] = p - start_e.
// Scratch (persistent, per stream): keys 2 x uint64 [T*K], values 2 x int32 [T*K], starts int32
// [E + 1], CUB's temporary storage.
#include <cub/device/device_segmented_radix_sort.cuh>

#include <cstdint>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/cuda/routing_layout.h"
#include "src/ops/cuda/routing_passes.cuh"
#include "src/ops/moe_ops.h"
#include "src/ops/routing_math.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kScratchRoutingDrops = 0x52445250;  // persistent_scratch tag ("RDRP"; cuda_common.cuh)
// Entries of the start scan per thread: E + 1 <= kMaxRouteExperts + 1.
constexpr int kScanPerThread = (kMaxRouteExperts + kThreads) / kThreads;

struct DropArgs {
  const float* logits;
  const int* expert_ids;
  const int* token_k;
  const int* slots_in;  // the GShard slots (read before step 3 rewrites them)
  const int* counts;
  int64_t num_tokens;
  int num_experts, k_max;
  bool sigmoid;
  int slot_bits;  // routing_layout::drop_slot_bits(T K)
  int* starts;    // [E + 1]
  unsigned long long* keys;
  int* values;
};

// starts[i] = sum_{f<i} counts[f] for i in [0, E] (E + 1 <= kThreads * kScanPerThread), in shared memory.
__device__ void scan_counts(const int* counts, int num_experts, int* starts) {
  __shared__ int warp_totals[kThreads / 32];
  const int thread = threadIdx.x, lane = thread % 32, warp = thread / 32;
  int local[kScanPerThread], thread_sum = 0;
#pragma unroll
  for (int q = 0; q < kScanPerThread; ++q) {
    const int index = thread * kScanPerThread + q;
    local[q] = index < num_experts ? counts[index] : 0;
    thread_sum += local[q];
  }
  int inclusive = thread_sum;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(kFullWarpMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int running = inclusive - thread_sum;
  for (int w = 0; w < warp; ++w) running += warp_totals[w];
#pragma unroll
  for (int q = 0; q < kScanPerThread; ++q) {
    const int index = thread * kScanPerThread + q;
    if (index <= num_experts) starts[index] = running;
    running += local[q];
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) priority_keys_kernel(DropArgs args) {
  __shared__ int starts[kMaxRouteExperts + 1];
  scan_counts(args.counts, args.num_experts, starts);
  if (blockIdx.x == 0)
    for (int index = threadIdx.x; index <= args.num_experts; index += kThreads) args.starts[index] = starts[index];
  const int num_experts = args.num_experts, k_max = args.k_max;
  for (int64_t token = int64_t(blockIdx.x) * kThreads + threadIdx.x; token < args.num_tokens;
       token += int64_t(gridDim.x) * kThreads) {
    const int choices = args.token_k[token];
    if (choices <= 0) continue;
    const float* row = args.logits + token * num_experts;
    float max_logit = 0.0f, denominator = 1.0f;
    if (!args.sigmoid) {
      max_logit = -INFINITY;
      for (int expert = 0; expert < num_experts; ++expert) max_logit = fmaxf(max_logit, __ldg(row + expert));
      denominator = routing_softmax_denominator(num_experts, max_logit, [row](int expert) { return __ldg(row + expert); });
    }
    for (int choice = 0; choice < choices && choice < k_max; ++choice) {
      const int64_t index = token * k_max + choice;
      const int expert = args.expert_ids[index], gshard_slot = args.slots_in[index];
      if (expert < 0 || expert >= num_experts) continue;
      const float logit = __ldg(row + expert);
      const float priority =
          args.sigmoid ? routing_sigmoid(logit) : routing_softmax_priority(logit, max_logit, denominator);
      const int position = starts[expert] + gshard_slot;
      args.keys[position] = routing_layout::drop_sort_key(__float_as_uint(priority), gshard_slot, args.slot_bits);
      args.values[position] = int(index);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    write_ranked_slots_kernel(const int* starts, const int* sorted_values, const int* expert_ids, int num_experts,
                              int64_t capacity_items, int* slots) {
  const int total = starts[num_experts];
  for (int64_t position = int64_t(blockIdx.x) * kThreads + threadIdx.x; position < capacity_items && position < total;
       position += int64_t(gridDim.x) * kThreads) {
    const int index = sorted_values[position];
    slots[index] = int(position) - starts[expert_ids[index]];
  }
}

size_t align_256(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

namespace cuda_detail {

void rank_slots_by_priority(const Tensor& logits, const RoutingParams& params, RoutingResult& result,
                            cudaStream_t stream) {
  const int64_t tokens = params.num_tokens, items = tokens * params.k_max;
  const int experts = params.num_experts;
  if (tokens == 0) return;

  // Scratch: keys (in, out), values (in, out), starts, then CUB's temporary storage.
  unsigned long long* null_keys = nullptr;
  int* null_values = nullptr;
  int* null_offsets = nullptr;
  size_t cub_bytes = 0;
  const int slot_bits = routing_layout::drop_slot_bits(items), end_bit = 32 + slot_bits;
  CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(nullptr, cub_bytes, null_keys, null_keys, null_values,
                                                               null_values, int(items), experts, null_offsets,
                                                               null_offsets + 1, 0, end_bit, stream));
  const size_t key_bytes = align_256(size_t(items) * sizeof(unsigned long long));
  const size_t value_bytes = align_256(size_t(items) * sizeof(int));
  const size_t start_bytes = align_256(size_t(experts + 1) * sizeof(int));
  unsigned char* scratch = static_cast<unsigned char*>(persistent_scratch(
      stream, kScratchRoutingDrops, 2 * key_bytes + 2 * value_bytes + start_bytes + align_256(cub_bytes)));
  auto* keys_in = reinterpret_cast<unsigned long long*>(scratch);
  auto* keys_out = reinterpret_cast<unsigned long long*>(scratch + key_bytes);
  int* values_in = reinterpret_cast<int*>(scratch + 2 * key_bytes);
  int* values_out = reinterpret_cast<int*>(scratch + 2 * key_bytes + value_bytes);
  int* starts = reinterpret_cast<int*>(scratch + 2 * key_bytes + 2 * value_bytes);
  void* cub_storage = scratch + 2 * key_bytes + 2 * value_bytes + start_bytes;

  DropArgs args{};
  args.logits = logits.as<float>();
  args.expert_ids = result.expert_ids.as<int>();
  args.token_k = result.token_k.as<int>();
  args.slots_in = result.slots.as<int>();
  args.counts = result.expert_counts.as<int>();
  args.num_tokens = tokens;
  args.num_experts = experts;
  args.k_max = params.k_max;
  args.sigmoid = params.score_function == ScoreFunction::sigmoid;
  args.slot_bits = slot_bits;
  args.starts = starts;
  args.keys = keys_in;
  args.values = values_in;
  const unsigned token_blocks = grid_for(tokens, kThreads, int64_t(multiprocessor_count()) * 16);
  priority_keys_kernel<<<token_blocks, kThreads, 0, stream>>>(args);
  CUDA_CHECK_LAUNCH();

  CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(cub_storage, cub_bytes, keys_in, keys_out, values_in,
                                                               values_out, int(items), experts, starts, starts + 1, 0,
                                                               end_bit, stream));

  const unsigned item_blocks = grid_for(items, kThreads, int64_t(multiprocessor_count()) * 16);
  write_ranked_slots_kernel<<<item_blocks, kThreads, 0, stream>>>(starts, values_out, result.expert_ids.as<int>(),
                                                                  experts, items, result.slots.as<int>());
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda_detail
}  // namespace switchyard
