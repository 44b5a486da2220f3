// Router running sums on CUDA (contract and math: src/ops/router_sums.h).
//
// Two kernels on the caller's stream, no host synchronization, no atomics:
//   1. token_terms: a grid of up to kMaxBlocks blocks, one warp per token (warp w of block b takes
//      tokens b * warps + w, then a grid's worth further; lanes stride over the E logits, lane j
//      looks at choice column j). Each lane sums its share of the warp's tokens in double (entropy
//      terms, kept choices, their gates); the warp reduces them once, after its last token, and
//      the block in a fixed order into scratch[4 b .. 4 b + 2]. (One reduction per token instead
//      cost 30 shuffles a token.)
//   2. finish: one block adds the partials in block order and the per-layer scalars (T, choices,
//      drops, losses) and expert counts to the accumulator.
// Work is T * E exponentials; at T = 16k, E = 64 that is ~1M, a few microseconds.
#include <cuda_runtime.h>

#include <algorithm>

#include "src/ops/router_sums.h"
#include "src/core/cuda_check.h"

namespace switchyard {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBlocks = int(kRouterSumsScratchDoubles / 4);
constexpr int kTerms = 3;  // entropy, kept count, kept gate sum

struct TokenTermsArgs {
  const float* logits;
  const float* logsumexp;
  const float* gates;
  const int* expert_ids;
  const int* slots;
  const int* scalars;
  int tokens, experts, choices;
  double* partials;  // [gridDim.x][4]
};

__device__ double warp_sum(double value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

__global__ void __launch_bounds__(kThreads) token_terms_kernel(TokenTermsArgs args) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int capacity = args.scalars[kCapacity];
  double entropy = 0.0, kept = 0.0, kept_gates = 0.0;  // this lane's share of the warp's tokens
  for (int token = blockIdx.x * kWarps + warp; token < args.tokens; token += gridDim.x * kWarps) {
    const float lse = args.logsumexp[token];
    const float* row = args.logits + size_t(token) * size_t(args.experts);
    for (int expert = lane; expert < args.experts; expert += 32) {
      const float gap = lse - row[expert];  // -ln p >= 0 (up to rounding)
      entropy += double(expf(-gap) * gap);
    }
    if (lane < args.choices) {  // lane j looks at choice j (K <= 32)
      const size_t index = size_t(token) * size_t(args.choices) + size_t(lane);
      const int expert = args.expert_ids[index], slot = args.slots[index];
      if (expert >= 0 && slot >= 0 && slot < capacity) {
        kept += 1.0;
        kept_gates += double(args.gates[index]);
      }
    }
  }
  // Full-warp shuffles, after the loop (every lane reaches them).
  entropy = warp_sum(entropy);
  kept = warp_sum(kept);
  kept_gates = warp_sum(kept_gates);
  __shared__ double warp_terms[kWarps][kTerms];
  if (lane == 0) {
    warp_terms[warp][0] = entropy;
    warp_terms[warp][1] = kept;
    warp_terms[warp][2] = kept_gates;
  }
  __syncthreads();
  if (threadIdx.x < kTerms) {
    double total = 0.0;
    for (int index = 0; index < kWarps; ++index) total += warp_terms[index][threadIdx.x];
    args.partials[blockIdx.x * 4 + threadIdx.x] = total;
  }
}

__global__ void __launch_bounds__(kThreads)
    finish_kernel(const double* partials, int blocks, const int* scalars, const float* losses, const int* counts,
                  int tokens, int experts, double* accumulator) {
  if (threadIdx.x == 0) {
    double entropy = 0.0, kept = 0.0, kept_gates = 0.0;
    for (int block = 0; block < blocks; ++block) {
      entropy += partials[block * 4 + 0];
      kept += partials[block * 4 + 1];
      kept_gates += partials[block * 4 + 2];
    }
    accumulator[kRouterForwards] += 1.0;
    accumulator[kRouterTokens] += double(tokens);
    accumulator[kRouterChoices] += double(scalars[kTotalChoices]);
    accumulator[kRouterDropped] += double(scalars[kDroppedChoices]);
    accumulator[kRouterKept] += kept;
    accumulator[kRouterKeptGateSum] += kept_gates;
    accumulator[kRouterEntropySum] += entropy;
    accumulator[kRouterAuxSum] += double(losses[kAuxLoss]);
    accumulator[kRouterZSum] += double(losses[kZLoss]);
  }
  for (int expert = threadIdx.x; expert < experts; expert += blockDim.x)
    accumulator[kNumRouterSums + expert] += double(counts[expert]);
}

}  // namespace

namespace cuda {

void accumulate_router_sums(const RoutingResult& routing, const Tensor& logits, Tensor& accumulator, Tensor& scratch,
                            void* stream) {
  SY_CHECK(logits.dtype == DType::f32, "cuda::accumulate_router_sums: logits must be fp32, got ", logits.describe());
  const int tokens = int(logits.dim(0)), experts = int(logits.dim(1)), choices = int(routing.expert_ids.dim(1));
  SY_CHECK(choices <= 32, "cuda::accumulate_router_sums: at most 32 choice columns, got ", choices);
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const int blocks = std::max(1, std::min(kMaxBlocks, (tokens + kWarps - 1) / kWarps));
  TokenTermsArgs args;
  args.logits = logits.as<float>();
  args.logsumexp = routing.logsumexp.as<float>();
  args.gates = routing.gates.as<float>();
  args.expert_ids = routing.expert_ids.as<int>();
  args.slots = routing.slots.as<int>();
  args.scalars = routing.scalars.as<int>();
  args.tokens = tokens;
  args.experts = experts;
  args.choices = choices;
  args.partials = scratch.as<double>();
  token_terms_kernel<<<blocks, kThreads, 0, cuda_stream>>>(args);
  CUDA_CHECK_LAUNCH();
  finish_kernel<<<1, kThreads, 0, cuda_stream>>>(scratch.as<double>(), blocks, routing.scalars.as<int>(),
                                                 routing.losses.as<float>(), routing.expert_counts.as<int>(), tokens,
                                                 experts, accumulator.as<double>());
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
