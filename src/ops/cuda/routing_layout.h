// Layout arithmetic of the CUDA router, in plain constexpr C++ so that the kernels' host code, their
// device code and host-only tests (tests/ops/cuda/test_routing_modern_cuda.cpp checks it without a
// GPU) share one definition:
//  * the lane layouts: a token's row of E fp32 logits over `group` lanes of `per_lane` consecutive
//    experts each (group * per_lane >= E; group a power of two <= 32), for the forward kernel
//    (src/ops/cuda/routing.cu) and the row passes (backward, sequence loss);
//  * the forward kernel's tile height (W warps of 32 tokens) and the carving of its dynamic shared
//    memory (byte offsets of every array, 16-byte aligned, one allocation);
//  * the chunks of the sequence-level loss pass (src/ops/cuda/routing_sequence_loss.cu): chunks of
//    128 tokens (longer for sequences of more than 64 such chunks) that never straddle a sequence;
//  * the sort key of probability drops (src/ops/cuda/routing_drop_priority.cu): priority high to
//    low, then GShard slot low to high, as one descending integer key of 32 + slot bits.
// Included by host .cpp and by .cu files (constexpr functions run on the device with
// --expt-relaxed-constexpr, which the build passes).
#pragma once

#include <cstddef>
#include <cstdint>

namespace switchyard {
namespace routing_layout {

// Experts per layer the CUDA router takes (kMaxRouteExperts, kCudaMaxExperts): 32 lanes x 16.
constexpr int kMaxExperts = 512;
// H100's largest dynamic shared memory per block (227 KiB).
constexpr size_t kMaxSharedBytes = 227 * 1024;

struct Lanes {
  int group = 1, per_lane = 8;
};

// Forward: 8 logits per lane up to 128 experts (<= 64 registers in the Switch kernel), 16 above; 32
// lanes per token above 256 experts.
constexpr Lanes forward_lanes(int num_experts) {
  if (num_experts <= 8) return {1, 8};
  if (num_experts <= 16) return {2, 8};
  if (num_experts <= 32) return {4, 8};
  if (num_experts <= 64) return {8, 8};
  if (num_experts <= 128) return {16, 8};
  if (num_experts <= 256) return {16, 16};
  return {32, 16};
}

// Row passes (backward, sequence loss): 16 logits per lane where E allows.
constexpr Lanes row_lanes(int num_experts) {
  if (num_experts <= 4) return {1, 4};
  if (num_experts <= 8) return {1, 8};
  if (num_experts <= 16) return {1, 16};
  if (num_experts <= 32) return {2, 16};
  if (num_experts <= 64) return {4, 16};
  if (num_experts <= 128) return {8, 16};
  if (num_experts <= 256) return {16, 16};
  return {32, 16};
}

// The forward kernel's variants: the Switch router (softmax, top-k over the logits), softmax with
// keys that are not the logits (selection bias and / or group-limited routing), sigmoid scores.
enum ForwardVariant : int { kSwitchVariant = 0, kSoftmaxKeyVariant = 1, kSigmoidVariant = 2 };

// Warps per tile at most: 16 for the Switch kernel's 8-logit layouts (<= 64 registers), 8 for the
// 16-logit layouts and every other variant (<= 128 registers).
constexpr int forward_max_warps(int num_experts, int variant) {
  return variant == kSwitchVariant && forward_lanes(num_experts).per_lane <= 8 ? 16 : 8;
}

// The smallest batch that gets W warps per tile is W * 32 * kTargetTiles tokens (H100: 132 SMs).
constexpr int64_t kTargetTiles = 128;

// W for a call: the most warps that still leave >= kTargetTiles tiles (a function of T, E and the
// variant only, so the float sums have one order on any GPU).
constexpr int forward_tile_warps(int64_t num_tokens, int num_experts, int variant) {
  int warps = forward_max_warps(num_experts, variant);
  while (warps > 1 && num_tokens < int64_t(warps) * 32 * kTargetTiles) warps /= 2;
  return warps;
}

// Floats of group-limited routing scratch per warp: for each token of a pass (32 / group tokens),
// its E keys, then its group scores (the keys' slots then hold the kept-group flags).
constexpr int group_scratch_floats_per_warp(int num_experts, int num_groups) {
  return (32 / forward_lanes(num_experts).group) * (num_experts + num_groups);
}

// Bias floats in shared memory: padded to the lane layout's width (zeros past E), so a lane reads
// its slice without a bound check.
constexpr int bias_floats(int num_experts) {
  return forward_lanes(num_experts).group * forward_lanes(num_experts).per_lane;
}

constexpr size_t round_up_16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// The next array of `count` items at `at` (16-byte aligned); advances `at`.
constexpr size_t take_shared(size_t& at, size_t count, size_t item_bytes) {
  const size_t offset = at;
  at += round_up_16(count * item_bytes);
  return offset;
}

// Byte offsets of the forward kernel's shared arrays (4-byte items first). Sizes, with the tile of
// 32 W tokens and the K*E columns (choice j, expert e) -> j E + e:
//   choice_base, tile_offset  int [K*E]       (phase 2b)
//   warp_floats               float [max(W,3)][E+1]
//   choice_gates              float [tile][K]
//   token_lse, token_norm     float [tile]
//   bias                      float [bias_floats(E)] or nothing
//   group_scratch             float [W][group_scratch_floats_per_warp] or nothing
//   warp_counts               uint16 [W][K*E]
//   choice_experts            int16 [tile][K]
//   choice_ranks              uint8 [tile][K]
//   token_choices             uint8 [tile]
struct ForwardShared {
  size_t choice_base = 0, tile_offset = 0, warp_floats = 0, choice_gates = 0, token_lse = 0, token_norm = 0,
         bias = 0, group_scratch = 0, warp_counts = 0, choice_experts = 0, choice_ranks = 0, token_choices = 0,
         bytes = 0;
};

// bias_count / group_floats: 0 when the call has no bias / no group limit.
constexpr ForwardShared forward_shared(int num_experts, int k_max, int num_warps, int bias_count, int group_floats) {
  ForwardShared layout;
  const size_t tile = size_t(num_warps) * 32, columns = size_t(num_experts) * size_t(k_max), choices = tile * k_max;
  size_t at = 0;
  layout.choice_base = take_shared(at, columns, 4);
  layout.tile_offset = take_shared(at, columns, 4);
  layout.warp_floats = take_shared(at, size_t(num_warps > 3 ? num_warps : 3) * size_t(num_experts + 1), 4);
  layout.choice_gates = take_shared(at, choices, 4);
  layout.token_lse = take_shared(at, tile, 4);
  layout.token_norm = take_shared(at, tile, 4);
  layout.bias = take_shared(at, size_t(bias_count), 4);
  layout.group_scratch = take_shared(at, size_t(num_warps) * size_t(group_floats), 4);
  layout.warp_counts = take_shared(at, size_t(num_warps) * columns, 2);
  layout.choice_experts = take_shared(at, choices, 2);
  layout.choice_ranks = take_shared(at, choices, 1);
  layout.token_choices = take_shared(at, tile, 1);
  layout.bytes = at;
  return layout;
}

// ---- Sequence-level loss: chunks of tokens within one sequence --------------------------------

// Chunks are kSequenceChunkTokens tokens, or longer (multiples of it) so that a sequence has at
// most kMaxChunksPerSequence of them (its per-expert sums then add <= 64 partials).
constexpr int64_t kSequenceChunkTokens = 128;
constexpr int64_t kMaxChunksPerSequence = 64;

struct SequenceChunks {
  int64_t tokens = 0;               // T
  int64_t sequence_tokens = 1;      // tokens per sequence (the last may have fewer)
  int64_t num_sequences = 1;        // routing_num_sequences(params)
  int64_t chunk_tokens = kSequenceChunkTokens;
  int64_t chunks_per_sequence = 0;  // chunks of a full sequence
  int64_t num_chunks = 0;           // num_sequences * chunks_per_sequence (some of the last may be empty)
};

constexpr SequenceChunks sequence_chunks(int64_t num_tokens, int64_t tokens_per_sequence) {
  SequenceChunks chunks;
  chunks.tokens = num_tokens > 0 ? num_tokens : 0;
  if (chunks.tokens == 0) return chunks;  // one (empty) sequence, no chunks
  chunks.sequence_tokens = tokens_per_sequence > 0 && tokens_per_sequence < chunks.tokens ? tokens_per_sequence
                                                                                          : chunks.tokens;
  chunks.num_sequences = (chunks.tokens + chunks.sequence_tokens - 1) / chunks.sequence_tokens;
  const int64_t spread = (chunks.sequence_tokens + kMaxChunksPerSequence - 1) / kMaxChunksPerSequence;
  chunks.chunk_tokens = (spread + kSequenceChunkTokens - 1) / kSequenceChunkTokens * kSequenceChunkTokens;
  chunks.chunks_per_sequence = (chunks.sequence_tokens + chunks.chunk_tokens - 1) / chunks.chunk_tokens;
  chunks.num_chunks = chunks.num_sequences * chunks.chunks_per_sequence;
  return chunks;
}

// Tokens of sequence s: T_s.
constexpr int64_t sequence_length(const SequenceChunks& chunks, int64_t sequence) {
  const int64_t begin = sequence * chunks.sequence_tokens, rest = chunks.tokens - begin;
  return rest < chunks.sequence_tokens ? (rest > 0 ? rest : 0) : chunks.sequence_tokens;
}

// Tokens [begin, end) of chunk c (empty past the end of a short last sequence).
constexpr void chunk_tokens(const SequenceChunks& chunks, int64_t chunk, int64_t& begin, int64_t& end) {
  const int64_t sequence = chunk / chunks.chunks_per_sequence, local = chunk - sequence * chunks.chunks_per_sequence;
  const int64_t sequence_begin = sequence * chunks.sequence_tokens;
  const int64_t sequence_end = sequence_begin + sequence_length(chunks, sequence);
  begin = sequence_begin + local * chunks.chunk_tokens;
  end = begin + chunks.chunk_tokens < sequence_end ? begin + chunks.chunk_tokens : sequence_end;
  if (begin > end) begin = end;
}

// ---- Probability drops: one descending sort key per choice ------------------------------------

// Raw fp32 bits -> unsigned with the float order (-0 folded into +0, so equal floats give equal keys).
constexpr uint32_t ordered_float_bits(uint32_t bits) {
  if (bits == 0x80000000u) bits = 0u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Bits of the slot part of a drop key: the smallest b with 2^b >= items (every slot < items = T K),
// at least 1 and at most 31 (T K fits int32).
constexpr int drop_slot_bits(int64_t items) {
  int bits = 1;
  while (bits < 31 && (int64_t(1) << bits) < items) ++bits;
  return bits;
}

// Sorted high to low: priority high to low, then GShard slot low to high (slots of one expert are
// distinct, so the keys of a segment are too). The key has 32 + slot_bits significant bits (the
// radix sort's end bit).
constexpr uint64_t drop_sort_key(uint32_t priority_bits, int32_t gshard_slot, int slot_bits) {
  const uint64_t slot_mask = (uint64_t(1) << slot_bits) - 1;
  return (uint64_t(ordered_float_bits(priority_bits)) << slot_bits) | (slot_mask - uint64_t(uint32_t(gshard_slot)));
}

}  // namespace routing_layout
}  // namespace switchyard
