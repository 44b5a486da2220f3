// Expert-choice routing on CUDA (semantics: src/ops/moe_ops.h, "expert choice"; the CPU reference
// src/ops/cpu/expert_choice.cpp defines the outputs). fp32 logits [T, E] row-major, E <= 256.
//
// Math. Priority q[t, e] in fp32 with the shared routing math (src/ops/routing_math.h), bit for
// bit the CPU's: softmax q = routing_exp(z_e - m) / S (m = max_f z_f, S = sum over f in order),
// sigmoid q = routing_sigmoid(z_e). Keys are ordered_bits(q) (uint32, larger q -> larger key), so
// every comparison is an exact integer one. C = min(T, expert_capacity(params, T * k_max)), on the
// host. Expert e takes its C best tokens by (key high, token low): with V_e the C-th largest key
// and L_e the token after the last tied token it takes,
//   taken(e, t) = key[e][t] > V_e  or  (key[e][t] == V_e and t < L_e).
// Token t keeps its k_max best takers by (key high, expert low); gates are q (the score itself:
// p for softmax, s for sigmoid), divided by the sum over the kept ones when renormalizing (fp32,
// choice order), times routed_scaling_factor. slot(t, j) = kept tokens of e_j before t.
//
// Five kernels on the stream, no host synchronization (the scratch may grow once, which waits):
//   A score   (block of 32..256 tokens, a thread per token): the block's logit rows staged in
//             shared memory (row stride E | 1: conflict-free), max, the fixed-order softmax sum,
//             keys[e][t], logsumexp[t] = m + log S, sigmoid_sums[t] = sum_e s_e (fp32, in order).
//   B select  (a block of 1024 per expert): radix select of V_e over the expert's T keys, 8 bits a
//             pass from the top (4 passes, warp-aggregated shared histograms, a warp finds the bin),
//             then, only when the ties at V_e are not all taken, a scan in token order for L_e;
//             prob_sums[e] = sum_t q (sigmoid: q / sigmoid_sums[t]) in double, a fixed order
//             (thread-strided, then a tree).
//   C choose  (a thread per token): walks e = 0..E-1, keeps a sorted register list of K
//             (k_max rounded up to 1, 2, 4, 8) 64-bit keys (key << 32 | ~e) of its takers; writes
//             expert_ids, gates, token_k, and per warp of 32 tokens one ballot word per expert of
//             the kept bits and of the choice-0 bits.
//   D rank    (a block per expert): exclusive scan of the kept words' popcounts -> word_ranks;
//             expert_counts = kept tokens, first_choice_counts = choice-0 bits.
//   E slots   (a thread per token): slot = word_ranks[e][t / 32] + popc(kept word below bit t % 32);
//             block 0 also writes offsets (counts rounded up to the alignment), scalars (dropped
//             = E * C - sum_t k_t) and the losses (aux from first-choice counts and prob sums in
//             double; z = w_z * mean lse^2, a fixed-order double sum).
// Scratch (persistent_scratch, tag kScratchExpertChoice, 256-byte aligned pieces; every word read
// is written first by the same call, so nothing needs cleaning):
//   keys u32 [E, T] | sigmoid_sums f32 [T] | cutoffs uint2 [E] = (V_e, L_e) |
//   kept_words u32 [E, W] | first_words u32 [E, W] | word_ranks i32 [E, W],   W = ceil(T / 32)
// (about 4 E T bytes: 70 MB at T = 65536, E = 256).
// Integer outputs equal the CPU's exactly; float ones have fixed reduction orders (deterministic).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "src/ops/routing_math.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kScratchExpertChoice = 0x45434852;  // persistent_scratch tag ("ECHR"; cuda_common.cuh)
constexpr int kSelectThreads = 1024;
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr int kTokenThreads = 256;
constexpr int kRankThreads = 256;
constexpr size_t kScoreTileBytes = 48 * 1024;  // the default dynamic shared memory limit

struct Scratch {
  unsigned* keys;          // [E, T]
  float* sigmoid_sums;     // [T]
  uint2* cutoffs;          // [E]: (V_e, L_e)
  unsigned* kept_words;    // [E, W]
  unsigned* first_words;   // [E, W]
  int* word_ranks;         // [E, W]
};

struct Args {
  const float* logits;
  int64_t num_tokens, words;
  int num_experts, k_max, capacity, segment_alignment, score_stride;
  bool sigmoid, renormalize;
  float scaling, aux_loss_weight, z_loss_weight;
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
  Scratch scratch;
};

// ---- A: keys, logsumexp, sigmoid sums --------------------------------------------------------

__global__ void __launch_bounds__(256) score_kernel(Args args) {
  extern __shared__ float tile[];  // [blockDim.x][score_stride]
  const int experts = args.num_experts, stride = args.score_stride;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x;
  const int64_t left = args.num_tokens - first;
  const int rows = left < int64_t(blockDim.x) ? int(left) : int(blockDim.x);
  const float* source = args.logits + first * experts;
  for (int index = threadIdx.x; index < rows * experts; index += blockDim.x) {
    const int row = index / experts;
    tile[row * stride + (index - row * experts)] = __ldcs(source + index);  // read once
  }
  __syncthreads();
  if (int(threadIdx.x) >= rows) return;
  const int64_t token = first + threadIdx.x;
  float* row = tile + threadIdx.x * stride;
  float max_logit = row[0];
  for (int expert = 1; expert < experts; ++expert)
    if (row[expert] > max_logit) max_logit = row[expert];
  // routing_softmax_denominator's order: f = 0, 1, ..., E-1. The row is overwritten with what the
  // keys need: routing_exp(z - m) (softmax) or routing_sigmoid(z).
  float denominator = 0.0f, sigmoid_sum = 0.0f;
  for (int expert = 0; expert < experts; ++expert) {
    const float logit = row[expert], exponential = routing_exp(logit - max_logit);
    denominator += exponential;
    if (args.sigmoid) {
      const float score = routing_sigmoid(logit);
      sigmoid_sum += score;
      row[expert] = score;
    } else {
      row[expert] = exponential;
    }
  }
  args.logsumexp[token] = max_logit + logf(denominator);
  args.scratch.sigmoid_sums[token] = sigmoid_sum;
  unsigned* keys = args.scratch.keys + token;
  for (int expert = 0; expert < experts; ++expert) {
    // softmax: routing_softmax_priority(z, m, S) = routing_divide(routing_exp(z - m), S).
    const float priority = args.sigmoid ? row[expert] : routing_divide(row[expert], denominator);
    keys[int64_t(expert) * args.num_tokens] = ordered_bits(priority);
  }
}

// ---- B: each expert's cutoff (V_e, L_e) and prob sum -----------------------------------------

__global__ void __launch_bounds__(kSelectThreads) select_kernel(Args args) {
  __shared__ int histogram[256];
  __shared__ int warp_counts[kSelectWarps];
  __shared__ double warp_sums[kSelectWarps];
  __shared__ int found_bin, found_remaining, found_equal;
  __shared__ unsigned boundary;
  const int expert = blockIdx.x, thread = threadIdx.x, lane = thread % 32, warp = thread / 32;
  const int64_t tokens = args.num_tokens;
  const unsigned* keys = args.scratch.keys + int64_t(expert) * tokens;

  // Prob sum of the expert: thread-strided double partials, then a fixed tree.
  double prob = 0.0;
  for (int64_t token = thread; token < tokens; token += kSelectThreads) {
    const float priority = from_ordered_bits(keys[token]);
    prob += args.sigmoid ? double(priority) / double(args.scratch.sigmoid_sums[token]) : double(priority);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) prob += __shfl_xor_sync(kFullWarpMask, prob, offset);
  if (lane == 0) warp_sums[warp] = prob;

  // Radix select: after pass p, `prefix` holds the top 8(p+1) bits of V_e and `remaining` the rank
  // of V_e among the keys that share them (1 = the largest).
  unsigned prefix = 0u, mask = 0u;
  int remaining = args.capacity, equal = 0;
  for (int pass = 0; pass < 4 && args.capacity > 0; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int bin = thread; bin < 256; bin += kSelectThreads) histogram[bin] = 0;
    __syncthreads();
    for (int64_t base = 0; base < tokens; base += kSelectThreads) {
      const int64_t token = base + thread;
      int bin = 256;  // not counted
      if (token < tokens) {
        const unsigned key = keys[token];
        if ((key & mask) == prefix) bin = int((key >> shift) & 255u);
      }
      const unsigned peers = __match_any_sync(kFullWarpMask, bin);  // one atomic per bin and warp
      if (bin < 256 && lane == __ffs(peers) - 1) atomicAdd(&histogram[bin], __popc(peers));
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l holds bins [8l, 8l + 8); `above` counts the keys in the bins of higher lanes.
      int lane_count = 0;
#pragma unroll
      for (int bin = 0; bin < 8; ++bin) lane_count += histogram[lane * 8 + bin];
      int suffix = lane_count;
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_down_sync(kFullWarpMask, suffix, offset);
        if (lane + offset < 32) suffix += other;
      }
      int above = suffix - lane_count;
      if (above < remaining && remaining <= suffix) {
        for (int bin = lane * 8 + 7; bin >= lane * 8; --bin) {
          const int count = histogram[bin];
          if (above + count >= remaining) {
            found_bin = bin;
            found_remaining = remaining - above;
            found_equal = count;
            break;
          }
          above += count;
        }
      }
    }
    __syncthreads();
    prefix |= unsigned(found_bin) << shift;
    mask |= 255u << shift;
    remaining = found_remaining;
    equal = found_equal;
  }

  // L_e: T when every key equal to V_e is taken, else one past the remaining-th such token.
  if (thread == 0) boundary = unsigned(tokens);
  __syncthreads();
  if (args.capacity > 0 && remaining < equal) {
    int running = 0;  // keys equal to V_e before this chunk
    for (int64_t base = 0; base < tokens; base += kSelectThreads) {
      const int64_t token = base + thread;
      const bool tied = token < tokens && keys[token] == prefix;
      const unsigned ballot = __ballot_sync(kFullWarpMask, tied);
      if (lane == 0) warp_counts[warp] = __popc(ballot);
      __syncthreads();
      int before = 0, total = 0;
      for (int other = 0; other < kSelectWarps; ++other) {
        const int count = warp_counts[other];
        before += other < warp ? count : 0;
        total += count;
      }
      if (tied && running + before + __popc(ballot & lanemask_lt()) + 1 == remaining) boundary = unsigned(token + 1);
      running += total;
      __syncthreads();  // warp_counts is rewritten next chunk
      if (running >= remaining) break;  // the same on every thread
    }
  }
  __syncthreads();
  if (thread == 0) {
    double total = 0.0;
    for (int other = 0; other < kSelectWarps; ++other) total += warp_sums[other];
    args.prob_sums[expert] = float(total);
    args.scratch.cutoffs[expert] = args.capacity > 0 ? make_uint2(prefix, boundary) : make_uint2(0xffffffffu, 0u);
  }
}

// ---- C: each token's kept experts, gates, and the per-expert bit words -----------------------

template <int K>
__global__ void __launch_bounds__(kTokenThreads) choose_kernel(Args args) {
  __shared__ uint2 cutoffs[kMaxRouteExperts];
  const int experts = args.num_experts, k_max = args.k_max, lane = threadIdx.x % 32;
  for (int expert = threadIdx.x; expert < experts; expert += kTokenThreads) cutoffs[expert] = args.scratch.cutoffs[expert];
  __syncthreads();
  const int64_t tokens = args.num_tokens;
  const int64_t token = int64_t(blockIdx.x) * kTokenThreads + threadIdx.x;
  const int64_t word = token / 32;  // the same over the warp
  if (word >= args.words) return;   // the whole warp is past the last token
  const bool valid = token < tokens;

  // best[0..K): the takers so far, descending by (key, ~expert); 0 = empty.
  unsigned long long best[K];
#pragma unroll
  for (int j = 0; j < K; ++j) best[j] = 0ull;
  if (valid) {
    const unsigned* keys = args.scratch.keys + token;
    for (int expert = 0; expert < experts; ++expert) {
      const unsigned key = keys[int64_t(expert) * tokens];
      const uint2 cutoff = cutoffs[expert];
      if (key > cutoff.x || (key == cutoff.x && unsigned(token) < cutoff.y)) {
        unsigned long long candidate = (static_cast<unsigned long long>(key) << 32) | unsigned(~expert);
#pragma unroll
        for (int j = 0; j < K; ++j) {
          const unsigned long long kept = best[j] > candidate ? best[j] : candidate;
          candidate = best[j] > candidate ? candidate : best[j];
          best[j] = kept;
        }
      }
    }
  }
  int ids[K];
  float scores[K];
  int choices = 0;
  float kept_sum = 0.0f;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const bool used = j < k_max && best[j] != 0ull;
    ids[j] = used ? int(~unsigned(best[j] & 0xffffffffull)) : -1;
    scores[j] = used ? from_ordered_bits(unsigned(best[j] >> 32)) : 0.0f;
    choices += used ? 1 : 0;
    kept_sum += scores[j];  // choice order; empty ones add 0
  }
  if (valid) {
    args.token_k[token] = choices;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if (j >= k_max) break;
      const float gate = args.renormalize && ids[j] >= 0 ? routing_divide(scores[j], kept_sum) : scores[j];
      args.expert_ids[token * k_max + j] = ids[j];
      args.gates[token * k_max + j] = ids[j] >= 0 ? routing_multiply(gate, args.scaling) : 0.0f;
    }
  }
  // Bit t % 32 of word [e][t / 32]: t kept e (kept_words), t's choice 0 is e (first_words).
  unsigned* kept_words = args.scratch.kept_words + word;
  unsigned* first_words = args.scratch.first_words + word;
  for (int expert = 0; expert < experts; ++expert) {
    bool kept = false;
#pragma unroll
    for (int j = 0; j < K; ++j) kept |= ids[j] == expert;
    const unsigned kept_ballot = __ballot_sync(kFullWarpMask, kept);
    const unsigned first_ballot = __ballot_sync(kFullWarpMask, ids[0] == expert);
    if (lane == 0) {
      kept_words[int64_t(expert) * args.words] = kept_ballot;
      first_words[int64_t(expert) * args.words] = first_ballot;
    }
  }
}

// ---- D: per expert, ranks of the kept words and the counts -----------------------------------

__global__ void __launch_bounds__(kRankThreads) rank_kernel(Args args) {
  __shared__ int warp_totals[kRankThreads / 32];
  const int expert = blockIdx.x, thread = threadIdx.x, lane = thread % 32, warp = thread / 32;
  const int64_t words = args.words;
  const unsigned* kept_words = args.scratch.kept_words + int64_t(expert) * words;
  const unsigned* first_words = args.scratch.first_words + int64_t(expert) * words;
  int* word_ranks = args.scratch.word_ranks + int64_t(expert) * words;
  int running = 0, first_count = 0;
  for (int64_t base = 0; base < words; base += kRankThreads) {
    const int64_t word = base + thread;
    const int count = word < words ? __popc(kept_words[word]) : 0;
    first_count += word < words ? __popc(first_words[word]) : 0;
    int inclusive = count;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int other = __shfl_up_sync(kFullWarpMask, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int other = 0; other < kRankThreads / 32; ++other) {
      before += other < warp ? warp_totals[other] : 0;
      total += warp_totals[other];
    }
    if (word < words) word_ranks[word] = running + before + inclusive - count;
    running += total;
    __syncthreads();  // warp_totals is rewritten next round
  }
  first_count = warp_sum(first_count);
  if (lane == 0) warp_totals[warp] = first_count;
  __syncthreads();
  if (thread == 0) {
    int first_total = 0;
    for (int other = 0; other < kRankThreads / 32; ++other) first_total += warp_totals[other];
    args.expert_counts[expert] = running;
    args.first_choice_counts[expert] = first_total;
  }
}

// ---- E: slots; block 0 writes the layout, scalars and losses ---------------------------------

__global__ void __launch_bounds__(kTokenThreads) slot_kernel(Args args) {
  __shared__ double warp_sums[kTokenThreads / 32];
  const int k_max = args.k_max;
  const int64_t tokens = args.num_tokens, words = args.words;
  const int64_t token = int64_t(blockIdx.x) * kTokenThreads + threadIdx.x;
  if (token < tokens) {
    const int64_t word = token / 32;
    const unsigned below = (1u << (token % 32)) - 1u;
    for (int j = 0; j < k_max; ++j) {
      const int expert = args.expert_ids[token * k_max + j];
      int slot = -1;
      if (expert >= 0) {
        const int64_t at = int64_t(expert) * words + word;
        slot = args.scratch.word_ranks[at] + __popc(args.scratch.kept_words[at] & below);
      }
      args.slots[token * k_max + j] = slot;
    }
  }
  if (blockIdx.x != 0) return;

  // z loss: sum of lse^2 in a fixed order (thread-strided, then a tree).
  const int thread = threadIdx.x, lane = thread % 32, warp = thread / 32;
  double squares = 0.0;
  for (int64_t index = thread; index < tokens; index += kTokenThreads) {
    const double lse = double(args.logsumexp[index]);
    squares += lse * lse;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) squares += __shfl_xor_sync(kFullWarpMask, squares, offset);
  if (lane == 0) warp_sums[warp] = squares;
  __syncthreads();
  if (thread != 0) return;
  double sum_squares = 0.0;
  for (int other = 0; other < kTokenThreads / 32; ++other) sum_squares += warp_sums[other];
  const int experts = args.num_experts;
  int64_t offset = 0, total_choices = 0;
  double balance = 0.0;
  args.expert_offsets[0] = 0;
  for (int expert = 0; expert < experts; ++expert) {
    const int64_t count = args.expert_counts[expert], alignment = args.segment_alignment;
    total_choices += count;
    offset += (count + alignment - 1) / alignment * alignment;
    args.expert_offsets[expert + 1] = int(offset);
    balance += double(args.first_choice_counts[expert]) * double(args.prob_sums[expert]);
  }
  args.scalars[kCapacity] = args.capacity;
  args.scalars[kTotalChoices] = int(total_choices);
  args.scalars[kDroppedChoices] = int(int64_t(experts) * args.capacity - total_choices);
  args.scalars[kPaddedRows] = int(offset);
  const double token_count = double(tokens);
  args.losses[kAuxLoss] =
      tokens ? float(double(args.aux_loss_weight) * experts * balance / (token_count * token_count)) : 0.0f;
  args.losses[kZLoss] = tokens ? float(double(args.z_loss_weight) * sum_squares / token_count) : 0.0f;
  args.losses[kSeqAuxLoss] = 0.0f;
  args.losses[kGlobalAuxLoss] = 0.0f;
}

// Tokens per block of the score kernel: the most (256 down to 32) whose rows fit the tile.
int score_tile_tokens(int stride) {
  int tokens = 256;
  while (tokens > 32 && size_t(tokens) * size_t(stride) * sizeof(float) > kScoreTileBytes) tokens /= 2;
  return tokens;
}

}  // namespace

namespace cuda {

void route_expert_choice(const Tensor& logits, const RoutingInputs& inputs, const RoutingParams& params,
                         RoutingResult& result, void* stream_handle) {
  validate_routing_params(params);
  SY_CHECK_INPUT(params.method == RoutingMethod::expert_choice,
                 "route_expert_choice: params.method must be expert_choice");
  SY_CHECK_INPUT(inputs.selection_bias == nullptr,
                 "route: expert choice takes no selection bias (each expert picks by the unbiased score)");
  SY_CHECK_INPUT(params.num_experts <= kMaxRouteExperts, "routing on CUDA supports up to ", kMaxRouteExperts,
                 " experts, got ", params.num_experts);
  const int64_t tokens = params.num_tokens;
  const int experts = params.num_experts, k_max = params.k_max;
  check_tensor(logits, "route: logits", DType::f32, {tokens, experts});
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
  const int64_t words = (tokens + 31) / 32;
  size_t bytes = 0;
  auto take = [&](size_t size) {
    const size_t at = bytes;
    bytes += (size + 255) / 256 * 256;
    return at;
  };
  const size_t keys_at = take(size_t(experts) * size_t(tokens) * 4), sums_at = take(size_t(tokens) * 4),
               cutoffs_at = take(size_t(experts) * 8), kept_at = take(size_t(experts) * size_t(words) * 4),
               first_at = take(size_t(experts) * size_t(words) * 4), ranks_at = take(size_t(experts) * size_t(words) * 4);
  unsigned char* scratch = static_cast<unsigned char*>(persistent_scratch(stream, kScratchExpertChoice, bytes));

  Args args{};
  args.logits = logits.as<float>();
  args.num_tokens = tokens;
  args.words = words;
  args.num_experts = experts;
  args.k_max = k_max;
  args.capacity = tokens == 0 ? 0 : int(std::min<int64_t>(tokens, expert_capacity(params, tokens * k_max)));
  args.segment_alignment = params.segment_alignment;
  args.score_stride = experts | 1;
  args.sigmoid = params.score_function == ScoreFunction::sigmoid;
  args.renormalize = params.renormalize;
  args.scaling = params.routed_scaling_factor;
  args.aux_loss_weight = params.aux_loss_weight;
  args.z_loss_weight = params.z_loss_weight;
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
  args.scratch.keys = reinterpret_cast<unsigned*>(scratch + keys_at);
  args.scratch.sigmoid_sums = reinterpret_cast<float*>(scratch + sums_at);
  args.scratch.cutoffs = reinterpret_cast<uint2*>(scratch + cutoffs_at);
  args.scratch.kept_words = reinterpret_cast<unsigned*>(scratch + kept_at);
  args.scratch.first_words = reinterpret_cast<unsigned*>(scratch + first_at);
  args.scratch.word_ranks = reinterpret_cast<int*>(scratch + ranks_at);

  const int64_t token_blocks = (tokens + kTokenThreads - 1) / kTokenThreads;
  SY_CHECK(token_blocks < int64_t(INT_MAX), "route: too many tokens");
  if (tokens > 0) {
    const int tile_tokens = score_tile_tokens(args.score_stride);
    const size_t tile_bytes = size_t(tile_tokens) * size_t(args.score_stride) * sizeof(float);
    const int64_t score_blocks = (tokens + tile_tokens - 1) / tile_tokens;
    score_kernel<<<unsigned(score_blocks), unsigned(tile_tokens), tile_bytes, stream>>>(args);
    CUDA_CHECK_LAUNCH();
  }
  select_kernel<<<unsigned(experts), kSelectThreads, 0, stream>>>(args);
  CUDA_CHECK_LAUNCH();
  if (tokens > 0) {
    dispatch_choices(k_max, [&](auto choices) {
      choose_kernel<decltype(choices)::value><<<unsigned(token_blocks), kTokenThreads, 0, stream>>>(args);
    });
    CUDA_CHECK_LAUNCH();
  }
  rank_kernel<<<unsigned(experts), kRankThreads, 0, stream>>>(args);
  CUDA_CHECK_LAUNCH();
  slot_kernel<<<unsigned(std::max<int64_t>(1, token_blocks)), kTokenThreads, 0, stream>>>(args);
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
