// The CUDA router's layout arithmetic (src/ops/cuda/routing_layout.h), checked on the host without a
// GPU: lane layouts for every E <= 512, the forward kernel's shared memory (fits an H100 block for
// every E, K and variant; arrays aligned and disjoint), the chunks of the sequence-loss pass, and
// the sort keys of probability drops.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <random>
#include <vector>

#include "src/ops/cuda/routing_layout.h"
#include "src/ops/moe_ops.h"

using namespace switchyard;

namespace {

namespace layout = switchyard::routing_layout;

TEST(RouteModernLayout, LaneLayoutsCoverEveryExpertCount) {
  EXPECT_EQ(kCudaMaxExperts, layout::kMaxExperts);
  for (int experts = 1; experts <= layout::kMaxExperts; ++experts) {
    for (const layout::Lanes lanes : {layout::forward_lanes(experts), layout::row_lanes(experts)}) {
      EXPECT_GE(lanes.group * lanes.per_lane, experts) << experts;
      EXPECT_TRUE(lanes.group >= 1 && lanes.group <= 32 && (lanes.group & (lanes.group - 1)) == 0) << experts;
      EXPECT_EQ(lanes.per_lane % 4, 0) << experts;  // float4 loads
    }
  }
  EXPECT_EQ(layout::forward_lanes(512).group, 32);
  EXPECT_EQ(layout::row_lanes(257).group, 32);
}

// The forward kernel's shared memory fits an H100 block for every E <= 512, K <= 8 and variant,
// with the bias and the largest group scratch (one-expert groups); arrays are 16-byte aligned and
// in order without overlap.
TEST(RouteModernLayout, ForwardSharedMemoryFits) {
  size_t largest = 0;
  for (int experts = 1; experts <= layout::kMaxExperts; ++experts) {
    for (int k = 1; k <= std::min(kMaxTopK, experts); ++k) {
      for (int variant : {layout::kSwitchVariant, layout::kSoftmaxKeyVariant, layout::kSigmoidVariant}) {
        const int warps = layout::forward_max_warps(experts, variant);
        const bool modern = variant != layout::kSwitchVariant;
        const int groups = modern ? layout::group_scratch_floats_per_warp(experts, experts) : 0;
        const layout::ForwardShared shared =
            layout::forward_shared(experts, k, warps, modern ? layout::bias_floats(experts) : 0, groups);
        largest = std::max(largest, shared.bytes);
        ASSERT_LE(shared.bytes, layout::kMaxSharedBytes) << "E " << experts << " K " << k << " variant " << variant;
        const size_t offsets[] = {shared.choice_base, shared.tile_offset,    shared.warp_floats,  shared.choice_gates,
                                  shared.token_lse,   shared.token_norm,     shared.bias,         shared.group_scratch,
                                  shared.warp_counts, shared.choice_experts, shared.choice_ranks, shared.token_choices,
                                  shared.bytes};
        for (size_t index = 0; index + 1 < std::size(offsets); ++index) {
          EXPECT_EQ(offsets[index] % 16, 0u);
          EXPECT_LE(offsets[index], offsets[index + 1]);
        }
        // Phase 2b reuses warp_floats for 3 rows of E + 1 words.
        EXPECT_GE(shared.choice_gates - shared.warp_floats, size_t(3) * (experts + 1) * 4);
        EXPECT_GE(shared.warp_counts - shared.group_scratch, size_t(warps) * groups * 4);
        EXPECT_GE(shared.bytes - shared.token_choices, size_t(warps) * 32);
      }
    }
  }
  std::printf("largest forward shared memory: %zu bytes\n", largest);
  EXPECT_LE(layout::forward_tile_warps(1 << 20, 512, layout::kSwitchVariant), 8);
  EXPECT_EQ(layout::forward_tile_warps(1 << 20, 64, layout::kSwitchVariant), 16);
  EXPECT_EQ(layout::forward_tile_warps(1 << 20, 64, layout::kSigmoidVariant), 8);
  EXPECT_EQ(layout::forward_tile_warps(100, 64, layout::kSwitchVariant), 1);
}

// Chunks of the sequence loss cover every token once, never straddle sequences, and number at most
// kMaxChunksPerSequence per sequence; the sequence count is routing_num_sequences.
TEST(RouteModernLayout, SequenceChunksPartitionTheTokens) {
  for (int64_t tokens : {0, 1, 127, 128, 129, 700, 2000, 8192, 20000, 100003}) {
    for (int64_t per_sequence : {0, 1, 5, 128, 300, 512, 4096, 9000, 200000}) {
      RoutingParams params;
      params.num_tokens = tokens;
      params.tokens_per_sequence = per_sequence;
      const layout::SequenceChunks chunks = layout::sequence_chunks(tokens, per_sequence);
      ASSERT_EQ(chunks.num_sequences, routing_num_sequences(params)) << tokens << " " << per_sequence;
      EXPECT_LE(chunks.chunks_per_sequence, layout::kMaxChunksPerSequence);
      int64_t covered = 0, lengths = 0;
      for (int64_t s = 0; s < chunks.num_sequences; ++s) lengths += layout::sequence_length(chunks, s);
      EXPECT_EQ(lengths, tokens);
      for (int64_t chunk = 0; chunk < chunks.num_chunks; ++chunk) {
        int64_t begin = 0, end = 0;
        layout::chunk_tokens(chunks, chunk, begin, end);
        const int64_t sequence = chunk / chunks.chunks_per_sequence;
        ASSERT_LE(begin, end);
        EXPECT_LE(end - begin, chunks.chunk_tokens);
        if (begin < end) {
          ASSERT_EQ(begin, covered) << "chunks must tile the tokens in order";
          EXPECT_EQ(begin / chunks.sequence_tokens, sequence);
          EXPECT_EQ((end - 1) / chunks.sequence_tokens, sequence);
        }
        covered = std::max(covered, end);
      }
      EXPECT_EQ(covered, tokens);
    }
  }
}

// Sorting drop keys high to low orders by priority high to low, then GShard slot low to high,
// with -0 and +0 equal.
TEST(RouteModernLayout, DropKeysOrderByPriorityThenSlot) {
  std::mt19937_64 generator(11);
  std::uniform_int_distribution<int> pick(0, 7);
  const float values[] = {0.0f, -0.0f, 1e-30f, 0.125f, 0.5f, 0.5f, 0.75f, 1.0f};
  struct Item {
    float priority;
    int slot;
    uint64_t key;
  };
  std::vector<Item> items;
  for (int slot = 0; slot < 2000; ++slot) {
    const float priority = values[pick(generator)];
    uint32_t bits;
    std::memcpy(&bits, &priority, sizeof(bits));
    items.push_back({priority, slot, layout::drop_sort_key(bits, slot, layout::drop_slot_bits(2000))});
  }
  for (const Item& item : items) EXPECT_LT(item.key, uint64_t(1) << (32 + layout::drop_slot_bits(2000)));
  EXPECT_EQ(layout::drop_slot_bits(1), 1);
  EXPECT_EQ(layout::drop_slot_bits(2), 1);
  EXPECT_EQ(layout::drop_slot_bits(3), 2);
  EXPECT_EQ(layout::drop_slot_bits(int64_t(1) << 20), 20);
  EXPECT_EQ(layout::drop_slot_bits((int64_t(1) << 20) + 1), 21);
  EXPECT_EQ(layout::drop_slot_bits(INT32_MAX), 31);
  std::vector<Item> by_key = items, by_rule = items;
  std::sort(by_key.begin(), by_key.end(), [](const Item& a, const Item& b) { return a.key > b.key; });
  std::sort(by_rule.begin(), by_rule.end(), [](const Item& a, const Item& b) {
    return a.priority > b.priority || (a.priority == b.priority && a.slot < b.slot);
  });
  for (size_t index = 0; index < items.size(); ++index) ASSERT_EQ(by_key[index].slot, by_rule[index].slot) << index;
}

}  // namespace
