// The CUDA bookkeeping of the hierarchical exchange and of the EP layer's two-part overlap and
// hot-expert replicas (src/ops/cuda/ep_hierarchy.cu) against the CPU reference (src/ops/cpu/ep_hierarchy.cpp) on
// identical random sender routings: every integer equal, every gate moved bit for bit. Sizes cover
// one tile and many (the counting sort's tiles of 2048 choices), empty choices and drops; device
// outputs start poisoned.
#include <gtest/gtest.h>

#include <random>
#include <tuple>
#include <vector>

#include "src/ops/ops.h"
#include "tests/ops/test_ep_hierarchy_cpu.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{};
const ExecContext kCuda{DeviceKind::cuda, nullptr};

void expect_same_bytes(const HostTensor& host, const DeviceTensor& device, const char* what) {
  const std::vector<uint8_t> device_bytes = device.bytes();
  ASSERT_EQ(device_bytes.size(), host.tensor().bytes()) << what;
  const uint8_t* host_bytes = static_cast<const uint8_t*>(host.tensor().data);
  for (size_t byte = 0; byte < device_bytes.size(); ++byte)
    ASSERT_EQ(device_bytes[byte], host_bytes[byte]) << what << ": byte " << byte;
}

TEST(EpHierarchyCuda, ChoiceLayoutMatchesTheReference) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 generator(21);
  for (const auto& [tokens, choices, slot_count] : std::vector<std::tuple<int64_t, int, int>>{
           {1, 1, 1}, {100, 2, 8}, {5000, 8, 64}, {65536, 2, 4}, {20000, 6, 256}, {0, 2, 3}}) {
    SenderChoices sender = random_sender_choices(generator, tokens, choices, std::max(choices, slot_count), 0.1, 0.0);
    for (int64_t index = 0; index < tokens * choices; ++index) {
      int32_t& id = sender.ids.data<int32_t>()[index];
      if (id >= 0) id %= slot_count;
    }
    HostTensor slots(DType::i32, {tokens, choices}), counts(DType::i32, {slot_count}),
        offsets(DType::i32, {slot_count + 1}), scalars(DType::i32, {kNumRoutingScalars});
    ops::ep_choice_layout(kCpu, sender.ids, slot_count, slots, counts, offsets, scalars);
    DeviceTensor ids = to_device(sender.ids);
    DeviceTensor device_slots(DType::i32, {tokens, choices}), device_counts(DType::i32, {slot_count}),
        device_offsets(DType::i32, {slot_count + 1}), device_scalars(DType::i32, {kNumRoutingScalars});
    ops::ep_choice_layout(kCuda, ids, slot_count, device_slots, device_counts, device_offsets, device_scalars);
    ops::synchronize(kCuda);
    expect_same_bytes(slots, device_slots, "slots");
    expect_same_bytes(counts, device_counts, "counts");
    expect_same_bytes(offsets, device_offsets, "offsets");
    expect_same_bytes(scalars, device_scalars, "scalars");
  }
}

TEST(EpHierarchyCuda, KeptChoicesMatchTheReference) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 generator(23);
  for (const auto& [tokens, choices, experts] :
       std::vector<std::tuple<int64_t, int, int>>{{1, 1, 4}, {3000, 8, 64}, {70000, 2, 256}, {0, 2, 8}}) {
    SenderChoices sender = random_sender_choices(generator, tokens, choices, experts, 0.1, 0.2);
    HostTensor kept(DType::i32, {tokens, choices});
    ops::ep_kept_choices(kCpu, sender.ids, sender.slots, sender.scalars, kept);
    DeviceTensor ids = to_device(sender.ids), slots = to_device(sender.slots), scalars = to_device(sender.scalars);
    DeviceTensor device_kept(DType::i32, {tokens, choices});
    ops::ep_kept_choices(kCuda, ids, slots, scalars, device_kept);
    ops::synchronize(kCuda);
    expect_same_bytes(kept, device_kept, "kept_ids");
  }
}

TEST(EpHierarchyCuda, MapChoiceIdsMatchesTheReference) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 generator(24);
  for (const auto& [tokens, choices, experts] :
       std::vector<std::tuple<int64_t, int, int>>{{1, 1, 4}, {3000, 8, 64}, {70000, 2, 256}, {0, 2, 8}}) {
    SenderChoices sender = random_sender_choices(generator, tokens, choices, experts, 0.1, 0.2);
    HostTensor expert_map(DType::i32, {experts}), mapped(DType::i32, {tokens, choices});
    for (int expert = 0; expert < experts; ++expert) expert_map.data<int32_t>()[expert] = int32_t(generator() % 1000);
    ops::ep_map_choice_ids(kCpu, sender.ids, expert_map, mapped);
    DeviceTensor ids = to_device(sender.ids), device_map = to_device(expert_map);
    DeviceTensor device_mapped(DType::i32, {tokens, choices});
    ops::ep_map_choice_ids(kCuda, ids, device_map, device_mapped);
    ops::synchronize(kCuda);
    expect_same_bytes(mapped, device_mapped, "mapped_ids");
  }
}

TEST(EpHierarchyCuda, NodeChoicesPackAndUnpackMatchTheReference) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 generator(22);
  for (const auto& [experts, nodes, choices] :
       std::vector<std::tuple<int, int, int>>{{8, 2, 2}, {64, 8, 8}, {256, 4, 8}, {16, 16, 6}}) {
    const int64_t tokens = 3000;
    const int per_node = experts / nodes, node_slots = std::min(choices, nodes);
    SenderChoices sender = random_sender_choices(generator, tokens, choices, experts, 0.1, 0.2);
    DeviceTensor ids = to_device(sender.ids), slots = to_device(sender.slots), scalars = to_device(sender.scalars),
                 gates = to_device(sender.gates);

    HostTensor node_ids(DType::i32, {tokens, node_slots});
    ops::ep_node_choices(kCpu, sender.ids, sender.slots, sender.scalars, per_node, nodes, node_ids);
    DeviceTensor device_node_ids(DType::i32, {tokens, node_slots});
    ops::ep_node_choices(kCuda, ids, slots, scalars, per_node, nodes, device_node_ids);
    ops::synchronize(kCuda);
    expect_same_bytes(node_ids, device_node_ids, "node_ids");

    // A node layout (from the reference) to pack into: rows by node, stable.
    HostTensor node_slot_of(DType::i32, {tokens, node_slots}), node_counts(DType::i32, {nodes}),
        node_offsets(DType::i32, {nodes + 1}), node_scalars(DType::i32, {kNumRoutingScalars});
    ops::ep_choice_layout(kCpu, node_ids, nodes, node_slot_of, node_counts, node_offsets, node_scalars);
    const int64_t rows = node_offsets.data<int32_t>()[nodes];
    HostTensor node_rows(DType::i32, {tokens, node_slots});
    for (int64_t index = 0; index < tokens * node_slots; ++index) {
      const int node = node_ids.data<int32_t>()[index];
      node_rows.data<int32_t>()[index] =
          node < 0 ? -1 : node_offsets.data<int32_t>()[node] + node_slot_of.data<int32_t>()[index];
    }
    DeviceTensor device_node_rows = to_device(node_rows);

    HostTensor meta_ids(DType::i32, {rows, choices}), meta_gates(DType::f32, {rows, choices});
    ops::ep_pack_node_choices(kCpu, sender.ids, sender.gates, sender.slots, sender.scalars, node_ids, node_rows,
                              per_node, meta_ids, meta_gates);
    DeviceTensor device_meta_ids(DType::i32, {rows, choices}), device_meta_gates(DType::f32, {rows, choices});
    ops::ep_pack_node_choices(kCuda, ids, gates, slots, scalars, device_node_ids, device_node_rows, per_node,
                              device_meta_ids, device_meta_gates);
    ops::synchronize(kCuda);
    expect_same_bytes(meta_ids, device_meta_ids, "meta_ids");
    expect_same_bytes(meta_gates, device_meta_gates, "meta_gates");

    HostTensor meta_grad(DType::f32, {rows, choices}), grad_gates(DType::f32, {tokens, choices});
    fill_uniform(meta_grad, generator, -1.0, 1.0);
    ops::ep_unpack_node_gate_grads(kCpu, meta_grad, sender.ids, sender.slots, sender.scalars, node_ids, node_rows,
                                   per_node, grad_gates);
    DeviceTensor device_meta_grad = to_device(meta_grad), device_grad_gates(DType::f32, {tokens, choices});
    ops::ep_unpack_node_gate_grads(kCuda, device_meta_grad, ids, slots, scalars, device_node_ids, device_node_rows,
                                   per_node, device_grad_gates);
    ops::synchronize(kCuda);
    expect_same_bytes(grad_gates, device_grad_gates, "grad_gates");
  }
}

}  // namespace
