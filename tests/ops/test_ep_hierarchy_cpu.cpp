// The CPU reference of the hierarchical exchange's bookkeeping (src/ops/ep_hier_ops.h) against
// definitions written out here: the stable counting sort by brute-force counting, the id map
// element by element, the node sets
// by std::set, and metadata / gate-gradient round trips through a node layout built with the
// ops themselves and permute. Outputs are poisoned before every call.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "src/ops/ops.h"
#include "tests/ops/test_ep_hierarchy_cpu.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{};

void poison(HostTensor& tensor) { std::memset(tensor.tensor().data, 0xA5, tensor.tensor().bytes()); }

TEST(EpHierarchyCpu, ChoiceLayoutIsAStableCountingSort) {
  std::mt19937_64 generator(11);
  for (const auto& [tokens, choices, slots_count] : std::vector<std::tuple<int64_t, int, int>>{
           {1, 1, 1}, {37, 2, 4}, {300, 8, 16}, {513, 6, 64}, {0, 2, 3}}) {
    SenderChoices sender = random_sender_choices(generator, tokens, choices, std::max(choices, slots_count), 0.2, 0.0);
    // ids in [0, slots_count) (or -1): fold the sender's ids.
    for (int64_t index = 0; index < tokens * choices; ++index) {
      int32_t& id = sender.ids.data<int32_t>()[index];
      if (id >= 0) id %= slots_count;
    }
    HostTensor slots(DType::i32, {tokens, choices}), counts(DType::i32, {slots_count}),
        offsets(DType::i32, {slots_count + 1}), scalars(DType::i32, {kNumRoutingScalars});
    for (HostTensor* tensor : {&slots, &counts, &offsets, &scalars}) poison(*tensor);
    ops::ep_choice_layout(kCpu, sender.ids, slots_count, slots, counts, offsets, scalars);
    std::vector<int32_t> seen(size_t(slots_count), 0);
    int64_t total = 0;
    for (int64_t index = 0; index < tokens * choices; ++index) {
      const int32_t id = sender.ids.data<int32_t>()[index];
      int32_t expected = -1;
      if (id >= 0) {
        expected = 0;  // choices with the same id strictly before, in token-major order
        for (int64_t before = 0; before < index; ++before) expected += sender.ids.data<int32_t>()[before] == id;
        ++seen[size_t(id)];
        ++total;
      }
      ASSERT_EQ(slots.data<int32_t>()[index], expected) << "choice " << index;
    }
    int32_t running = 0;
    for (int slot = 0; slot < slots_count; ++slot) {
      EXPECT_EQ(counts.data<int32_t>()[slot], seen[size_t(slot)]);
      EXPECT_EQ(offsets.data<int32_t>()[slot], running);
      running += seen[size_t(slot)];
    }
    EXPECT_EQ(offsets.data<int32_t>()[slots_count], running);
    EXPECT_EQ(scalars.data<int32_t>()[kCapacity], std::numeric_limits<int32_t>::max());
    EXPECT_EQ(scalars.data<int32_t>()[kTotalChoices], total);
    EXPECT_EQ(scalars.data<int32_t>()[kDroppedChoices], 0);
    EXPECT_EQ(scalars.data<int32_t>()[kPaddedRows], total);
  }
}

// Rows [first, first + count) of a [T, K] int32 tensor, as the EP layer's parts view the routing.
Tensor row_view(const HostTensor& tensor, int64_t first, int64_t count) {
  const int64_t choices = tensor.tensor().dim(1);
  return Tensor(tensor.data<int32_t>() + first * choices, DType::i32, DeviceKind::cpu, {count, choices});
}

TEST(EpHierarchyCpu, KeptChoicesKeepTheIdsPermuteKeepsAndNothingElse) {
  std::mt19937_64 generator(14);
  for (const auto& [tokens, choices, experts] :
       std::vector<std::tuple<int64_t, int, int>>{{1, 1, 4}, {97, 2, 8}, {300, 8, 64}, {0, 2, 8}}) {
    SenderChoices sender = random_sender_choices(generator, tokens, choices, experts, 0.2, 0.3);
    // The whole routing, and rows [tokens / 3, tokens) of it (a part's view: the full scalars).
    const std::vector<std::pair<int64_t, int64_t>> views{{0, tokens}, {tokens / 3, tokens - tokens / 3}};
    for (const auto& [first, count] : views) {
      HostTensor kept_ids(DType::i32, {count, choices});
      poison(kept_ids);
      Tensor kept_view = kept_ids.tensor();
      ops::ep_kept_choices(kCpu, row_view(sender.ids, first, count), row_view(sender.slots, first, count),
                           sender.scalars, kept_view);
      for (int64_t index = 0; index < count * choices; ++index) {
        const int64_t source = first * choices + index;
        const int32_t expected = sender_keeps(sender, source) ? sender.ids.data<int32_t>()[source] : -1;
        ASSERT_EQ(kept_ids.data<int32_t>()[index], expected) << "choice " << source;
      }
    }
  }
}

TEST(EpHierarchyCpu, KeptChoicesRejectMismatchedSlots) {
  HostTensor ids(DType::i32, {3, 2}), slots(DType::i32, {2, 2}), scalars(DType::i32, {kNumRoutingScalars}),
      kept(DType::i32, {3, 2});
  EXPECT_THROW(ops::ep_kept_choices(kCpu, ids, slots, scalars, kept), Error);
}

TEST(EpHierarchyCpu, ChoiceLayoutRejectsAnIdPastTheSlots) {
  HostTensor ids(DType::i32, {1, 2}), slots(DType::i32, {1, 2}), counts(DType::i32, {3}), offsets(DType::i32, {4}),
      scalars(DType::i32, {kNumRoutingScalars});
  ids.data<int32_t>()[0] = 0;
  ids.data<int32_t>()[1] = 3;
  EXPECT_THROW(ops::ep_choice_layout(kCpu, ids, 3, slots, counts, offsets, scalars), Error);
}

TEST(EpHierarchyCpu, MapChoiceIdsRenamesEveryChoiceThroughTheMapAndKeepsEmptyOnes) {
  std::mt19937_64 generator(16);
  for (const auto& [tokens, choices, experts] :
       std::vector<std::tuple<int64_t, int, int>>{{1, 1, 4}, {97, 2, 8}, {300, 8, 64}, {0, 2, 8}}) {
    const SenderChoices sender = random_sender_choices(generator, tokens, choices, experts, 0.2, 0.3);
    HostTensor expert_map(DType::i32, {experts}), mapped(DType::i32, {tokens, choices});
    for (int expert = 0; expert < experts; ++expert)  // any values: a virtual id per expert
      expert_map.data<int32_t>()[expert] = int32_t(generator() % 1000);
    poison(mapped);
    ops::ep_map_choice_ids(kCpu, sender.ids, expert_map, mapped);
    for (int64_t index = 0; index < tokens * choices; ++index) {
      // Dropped choices are renamed too: their slots keep them dropped.
      const int32_t id = sender.ids.data<int32_t>()[index];
      ASSERT_EQ(mapped.data<int32_t>()[index], id < 0 ? -1 : expert_map.data<int32_t>()[id]) << "choice " << index;
    }
  }
}

TEST(EpHierarchyCpu, MapChoiceIdsRejectsAnIdPastTheMap) {
  HostTensor ids(DType::i32, {1, 2}), expert_map(DType::i32, {3}), mapped(DType::i32, {1, 2});
  ids.data<int32_t>()[0] = 0;
  ids.data<int32_t>()[1] = 3;
  EXPECT_THROW(ops::ep_map_choice_ids(kCpu, ids, expert_map, mapped), Error);
}

TEST(EpHierarchyCpu, NodeChoicesAreTheDistinctNodesOfTheKeptChoices) {
  std::mt19937_64 generator(12);
  for (const auto& [experts, nodes, choices] :
       std::vector<std::tuple<int, int, int>>{{8, 2, 2}, {16, 4, 8}, {64, 8, 6}, {12, 3, 1}, {32, 2, 8}}) {
    const int64_t tokens = 257;
    const int per_node = experts / nodes, node_slots = std::min(choices, nodes);
    SenderChoices sender = random_sender_choices(generator, tokens, choices, experts, 0.15, 0.15);
    HostTensor node_ids(DType::i32, {tokens, node_slots});
    poison(node_ids);
    ops::ep_node_choices(kCpu, sender.ids, sender.slots, sender.scalars, per_node, nodes, node_ids);
    for (int64_t token = 0; token < tokens; ++token) {
      std::set<int> expected;
      for (int choice = 0; choice < choices; ++choice)
        if (sender_keeps(sender, token * choices + choice))
          expected.insert(sender.ids.data<int32_t>()[token * choices + choice] / per_node);
      std::vector<int32_t> want(expected.begin(), expected.end());
      want.resize(size_t(node_slots), -1);
      for (int slot = 0; slot < node_slots; ++slot)
        ASSERT_EQ(node_ids.data<int32_t>()[token * node_slots + slot], want[size_t(slot)])
            << "token " << token << " slot " << slot << " (E " << experts << ", nodes " << nodes << ")";
    }
  }
}

// The source's node layout as the hierarchical exchange builds it: node ids, their stable
// layout, and permute's map.
struct NodeLayout {
  HostTensor node_ids, node_slots, node_counts, node_offsets, node_scalars, choice_rows, row_tokens;
  int64_t rows = 0;
  NodeLayout(const SenderChoices& sender, int per_node, int nodes) {
    const int64_t tokens = sender.tokens;
    const int node_slots_count = std::min(sender.choices, nodes);
    node_ids = HostTensor(DType::i32, {tokens, node_slots_count});
    node_slots = HostTensor(DType::i32, {tokens, node_slots_count});
    node_counts = HostTensor(DType::i32, {nodes});
    node_offsets = HostTensor(DType::i32, {nodes + 1});
    node_scalars = HostTensor(DType::i32, {kNumRoutingScalars});
    ops::ep_node_choices(kCpu, sender.ids, sender.slots, sender.scalars, per_node, nodes, node_ids);
    ops::ep_choice_layout(kCpu, node_ids, nodes, node_slots, node_counts, node_offsets, node_scalars);
    rows = node_offsets.data<int32_t>()[nodes];
    choice_rows = HostTensor(DType::i32, {tokens, node_slots_count});
    row_tokens = HostTensor(DType::i32, {std::max<int64_t>(rows, 1)});
    // permute's map: row = offsets[node] + slot (what permute computes; a zero-width row move).
    for (int64_t index = 0; index < tokens * node_slots_count; ++index) {
      const int node = node_ids.data<int32_t>()[index];
      choice_rows.data<int32_t>()[index] =
          node < 0 ? -1 : node_offsets.data<int32_t>()[node] + node_slots.data<int32_t>()[index];
    }
  }
};

TEST(EpHierarchyCpu, PackAndUnpackCarryEachKeptChoiceToItsNodeRowAndBack) {
  std::mt19937_64 generator(13);
  for (const auto& [experts, nodes, choices] :
       std::vector<std::tuple<int, int, int>>{{8, 2, 2}, {16, 4, 8}, {64, 8, 6}, {32, 2, 8}}) {
    const int64_t tokens = 191;
    const int per_node = experts / nodes;
    SenderChoices sender = random_sender_choices(generator, tokens, choices, experts, 0.1, 0.2);
    NodeLayout layout(sender, per_node, nodes);
    const int node_slots = int(layout.node_ids.tensor().dim(1));
    HostTensor meta_ids(DType::i32, {layout.rows, choices}), meta_gates(DType::f32, {layout.rows, choices});
    poison(meta_ids);
    poison(meta_gates);
    ops::ep_pack_node_choices(kCpu, sender.ids, sender.gates, sender.slots, sender.scalars, layout.node_ids,
                              layout.choice_rows, per_node, meta_ids, meta_gates);
    std::vector<bool> row_written(size_t(layout.rows), false);
    for (int64_t token = 0; token < tokens; ++token) {
      for (int slot = 0; slot < node_slots; ++slot) {
        const int node = layout.node_ids.data<int32_t>()[token * node_slots + slot];
        const int32_t row = layout.choice_rows.data<int32_t>()[token * node_slots + slot];
        if (node < 0) continue;
        row_written[size_t(row)] = true;
        for (int choice = 0; choice < choices; ++choice) {
          const int64_t index = token * choices + choice;
          const int32_t id = sender.ids.data<int32_t>()[index];
          const bool here = sender_keeps(sender, index) && id / per_node == node;
          ASSERT_EQ(meta_ids.data<int32_t>()[row * choices + choice], here ? id - node * per_node : -1);
          ASSERT_EQ(meta_gates.data<float>()[row * choices + choice], here ? sender.gates.data<float>()[index] : 0.0f);
        }
      }
    }
    for (int64_t row = 0; row < layout.rows; ++row) EXPECT_TRUE(row_written[size_t(row)]) << "row " << row;

    // Gate gradients come back from the same rows: fresh values, each kept choice reads its own.
    HostTensor meta_grad(DType::f32, {layout.rows, choices}), grad_gates(DType::f32, {tokens, choices});
    fill_uniform(meta_grad, generator, -1.0, 1.0);
    poison(grad_gates);
    ops::ep_unpack_node_gate_grads(kCpu, meta_grad, sender.ids, sender.slots, sender.scalars, layout.node_ids,
                                   layout.choice_rows, per_node, grad_gates);
    for (int64_t token = 0; token < tokens; ++token) {
      for (int choice = 0; choice < choices; ++choice) {
        const int64_t index = token * choices + choice;
        float expected = 0.0f;
        if (sender_keeps(sender, index)) {
          const int node = sender.ids.data<int32_t>()[index] / per_node;
          for (int slot = 0; slot < node_slots; ++slot)
            if (layout.node_ids.data<int32_t>()[token * node_slots + slot] == node)
              expected = meta_grad.data<float>()[layout.choice_rows.data<int32_t>()[token * node_slots + slot] * choices +
                                                 choice];
        }
        ASSERT_EQ(grad_gates.data<float>()[index], expected) << "token " << token << " choice " << choice;
      }
    }
  }
}

}  // namespace
