// The sequence-level balance loss on CUDA (DeepSeek-V3; src/ops/moe_ops.h, "sequence-level balance
// loss"; the CPU reference src/ops/cpu/routing.cpp defines it), run by cuda::route after its fused
// kernel when seq_aux_loss_weight > 0. Sequences are tokens_per_sequence consecutive tokens (0: the
// batch), the last possibly shorter; per sequence s with T_s tokens and C_s = sum_{t in s} k_t:
//   f_{s,e} = E count_{s,e} / C_s     (count over the choices j < k_t, before capacity)
//   P_{s,e} = sum_{t in s} q_{t,e} / T_s,  q = p = exp(z - lse) (softmax) or s' = s / sum_f s_f with
//             s = routing_sigmoid(z) (sigmoid)
//   losses[kSeqAuxLoss] = w_seq * (1/S) sum_s sum_e f_{s,e} P_{s,e};  sequence_fractions[s][e] = f_{s,e}
// Three kernels, fixed summation orders (deterministic), no atomics on floats:
//  1. sequence_chunk_kernel: one block per chunk (routing_layout::sequence_chunks: <= 64 chunks per
//     sequence, none straddling two), the row layout of the backward (routing_layout::row_lanes:
//     kGroup lanes per token, kPerLane logits each). Each lane sums q over its tokens; the warp's
//     token groups are added by an xor tree, the warps in order. Counts are shared-memory int
//     atomics (exact). Writes chunk_sums [chunk][E] and chunk_counts [chunk][E + 1] (last: sum k_t).
//  2. sequence_finalize_kernel: one block per sequence: counts and P sums over its chunks in chunk
//     order, f to sequence_fractions, term_s = sum_e f P (shared-memory tree) to terms [S].
//  3. sequence_loss_kernel: one block: losses[kSeqAuxLoss] = w_seq * sum_s terms[s] / S.
// Scratch (persistent, per stream): chunk_sums, chunk_counts, terms.
#include <cmath>
#include <cstdint>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/cuda/routing_layout.h"
#include "src/ops/cuda/routing_passes.cuh"
#include "src/ops/moe_ops.h"
#include "src/ops/routing_math.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kScratchRoutingSequences = 0x52534551;  // persistent_scratch tag ("RSEQ"; cuda_common.cuh)

struct SequenceArgs {
  const float* logits;
  const float* logsumexp;
  const int* expert_ids;
  const int* token_k;
  int64_t num_tokens;
  int num_experts, k_max;
  bool vector_loads;
  routing_layout::SequenceChunks chunks;
  float* chunk_sums;   // [num_chunks][E]
  int* chunk_counts;   // [num_chunks][E + 1]
  float* terms;        // [S]
  float* fractions;    // sequence_fractions [>= S][E]
  float* losses;
  float weight;
};

// Sum over the block in a fixed order (a shared-memory tree); every thread gets the total.
__device__ float block_sum(float value, float* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const float total = shared[0];
  __syncthreads();
  return total;
}

template <int kGroup, int kPerLane, bool kSigmoid>
__global__ void __launch_bounds__(kThreads) sequence_chunk_kernel(SequenceArgs args) {
  __shared__ float warp_sums[kWarps][kMaxRouteExperts];
  __shared__ int counts[kMaxRouteExperts + 1];
  constexpr int kTokensPerPass = 32 / kGroup;
  const int num_experts = args.num_experts, k_max = args.k_max;
  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const int group = lane / kGroup, member = lane % kGroup, first_expert = member * kPerLane;
  for (int expert = thread; expert <= num_experts; expert += kThreads) counts[expert] = 0;
  __syncthreads();

  int64_t begin = 0, end = 0;
  routing_layout::chunk_tokens(args.chunks, blockIdx.x, begin, end);
  float sums[kPerLane] = {};
  // Uniform trip count over the warp (the group sums need every lane).
  for (int64_t base = begin + int64_t(warp) * kTokensPerPass; base < end; base += int64_t(kWarps) * kTokensPerPass) {
    const int64_t token = base + group;
    const bool exists = token < end;
    float logits[kPerLane];
    load_logit_slice<kPerLane>(args.logits, args.num_tokens, num_experts, args.vector_loads,
                               exists ? token : args.num_tokens, first_expert, logits);  // -inf if not
    if constexpr (kSigmoid) {
      float scores[kPerLane], lane_sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        scores[i] = routing_sigmoid(logits[i]);  // 0 for -inf
        lane_sum += scores[i];
      }
      const float score_sum = group_sum<kGroup>(lane_sum);
      const float inverse = exists && score_sum > 0.0f ? 1.0f / score_sum : 0.0f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) sums[i] = fmaf(scores[i], inverse, sums[i]);
    } else {
      const float lse = exists ? args.logsumexp[token] : 0.0f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) sums[i] += expf(logits[i] - lse);  // 0 for -inf
    }
    if (exists && member == 0) {
      const int choices = args.token_k[token];
      atomicAdd(&counts[num_experts], choices);
      for (int choice = 0; choice < choices && choice < k_max; ++choice) {
        const int expert = args.expert_ids[token * k_max + choice];
        if (expert >= 0 && expert < num_experts) atomicAdd(&counts[expert], 1);
      }
    }
  }

  // The warp's token groups (xor tree), then the warps in order.
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
#pragma unroll
    for (int offset = kGroup; offset < 32; offset <<= 1) sums[i] += __shfl_xor_sync(kFullWarpMask, sums[i], offset);
    if (lane < kGroup && first_expert + i < num_experts) warp_sums[warp][first_expert + i] = sums[i];
  }
  __syncthreads();
  const int64_t chunk = blockIdx.x;
  for (int expert = thread; expert <= num_experts; expert += kThreads) {
    args.chunk_counts[chunk * (num_experts + 1) + expert] = counts[expert];
    if (expert == num_experts) continue;
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][expert];
    args.chunk_sums[chunk * num_experts + expert] = total;
  }
}

__global__ void __launch_bounds__(kThreads) sequence_finalize_kernel(SequenceArgs args) {
  __shared__ float reduce[kThreads];
  __shared__ int sequence_choices;
  const int num_experts = args.num_experts;
  const int64_t sequence = blockIdx.x, chunks = args.chunks.chunks_per_sequence;
  const int64_t first_chunk = sequence * chunks;
  const int64_t length = routing_layout::sequence_length(args.chunks, sequence);
  if (threadIdx.x < 32) {  // C_s: integer sums are exact in any order
    int partial = 0;
    for (int64_t c = threadIdx.x; c < chunks; c += 32)
      partial += args.chunk_counts[(first_chunk + c) * (num_experts + 1) + num_experts];
    partial = warp_sum(partial);
    if (threadIdx.x == 0) sequence_choices = partial;
  }
  __syncthreads();
  const int choices = sequence_choices;
  float term = 0.0f;
  for (int expert = threadIdx.x; expert < num_experts; expert += kThreads) {
    int count = 0;
    float score_sum = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) {  // chunk order
      count += args.chunk_counts[(first_chunk + c) * (num_experts + 1) + expert];
      score_sum += args.chunk_sums[(first_chunk + c) * num_experts + expert];
    }
    const float fraction = choices > 0 ? float(double(num_experts) * double(count) / double(choices)) : 0.0f;
    args.fractions[sequence * num_experts + expert] = fraction;
    if (length > 0) term += fraction * (score_sum / float(length));
  }
  const float total = block_sum(term, reduce);
  if (threadIdx.x == 0) args.terms[sequence] = total;
}

__global__ void __launch_bounds__(kThreads) sequence_loss_kernel(SequenceArgs args) {
  __shared__ float reduce[kThreads];
  const int64_t sequences = args.chunks.num_sequences;
  float partial = 0.0f;
  for (int64_t sequence = threadIdx.x; sequence < sequences; sequence += kThreads) partial += args.terms[sequence];
  const float total = block_sum(partial, reduce);
  if (threadIdx.x == 0) args.losses[kSeqAuxLoss] = args.weight * total / float(sequences);
}

size_t align_256(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

namespace cuda_detail {

void sequence_balance_loss(const Tensor& logits, const RoutingParams& params, RoutingResult& result,
                           cudaStream_t stream) {
  const int experts = params.num_experts;
  const routing_layout::SequenceChunks chunks =
      routing_layout::sequence_chunks(params.num_tokens, params.tokens_per_sequence);
  SY_CHECK(chunks.num_sequences == routing_num_sequences(params), "route: sequence count mismatch");
  SY_CHECK(chunks.num_chunks <= int64_t(INT32_MAX) && chunks.num_sequences <= int64_t(INT32_MAX),
           "route: too many sequences");
  const size_t sums_bytes = align_256(size_t(chunks.num_chunks) * experts * sizeof(float));
  const size_t counts_bytes = align_256(size_t(chunks.num_chunks) * (experts + 1) * sizeof(int));
  const size_t terms_bytes = align_256(size_t(chunks.num_sequences) * sizeof(float));
  unsigned char* scratch = static_cast<unsigned char*>(
      persistent_scratch(stream, kScratchRoutingSequences, sums_bytes + counts_bytes + terms_bytes));

  SequenceArgs args{};
  args.logits = logits.as<float>();
  args.logsumexp = result.logsumexp.as<float>();
  args.expert_ids = result.expert_ids.as<int>();
  args.token_k = result.token_k.as<int>();
  args.num_tokens = params.num_tokens;
  args.num_experts = experts;
  args.k_max = params.k_max;
  args.vector_loads = experts % 4 == 0 && is_aligned(logits.data, 16);
  args.chunks = chunks;
  args.chunk_sums = reinterpret_cast<float*>(scratch);
  args.chunk_counts = reinterpret_cast<int*>(scratch + sums_bytes);
  args.terms = reinterpret_cast<float*>(scratch + sums_bytes + counts_bytes);
  args.fractions = result.sequence_fractions.as<float>();
  args.losses = result.losses.as<float>();
  args.weight = params.seq_aux_loss_weight;

  const bool sigmoid = params.score_function == ScoreFunction::sigmoid;
  if (chunks.num_chunks > 0) {
    dispatch_lane_layout(experts, [&](auto lanes) {
      using Lanes = decltype(lanes);
      if (sigmoid)
        sequence_chunk_kernel<Lanes::group, Lanes::per_lane, true>
            <<<unsigned(chunks.num_chunks), kThreads, 0, stream>>>(args);
      else
        sequence_chunk_kernel<Lanes::group, Lanes::per_lane, false>
            <<<unsigned(chunks.num_chunks), kThreads, 0, stream>>>(args);
      CUDA_CHECK_LAUNCH();
    });
  }
  // With no tokens: one empty sequence, f = 0 and a zero loss (no chunks to read).
  sequence_finalize_kernel<<<unsigned(chunks.num_sequences), kThreads, 0, stream>>>(args);
  CUDA_CHECK_LAUNCH();
  sequence_loss_kernel<<<1, kThreads, 0, stream>>>(args);
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda_detail
}  // namespace switchyard
