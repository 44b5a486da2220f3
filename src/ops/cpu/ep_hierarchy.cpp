// CPU reference of the hierarchical exchange's bookkeeping (semantics: src/ops/ep_hier_ops.h).
#include <algorithm>
#include <limits>
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/ep_hier_ops.h"
#include "src/ops/moe_ops.h"

namespace switchyard {
namespace cpu {

using detail::expect_tensor;

namespace {

// [T, K] int32 choices on the host; returns T.
int64_t expect_choices(const char* op, const char* name, const Tensor& tensor) {
  SY_CHECK(tensor.device == DeviceKind::cpu && tensor.dtype == DType::i32 && tensor.rank == 2 &&
               (tensor.data != nullptr || tensor.numel() == 0),
           op, ": ", name, " must be i32 [T, K] on cpu, got ", tensor.describe());
  return tensor.dim(0);
}

// The sender's choices and which of them permute keeps (id >= 0, 0 <= slot < capacity).
struct Choices {
  const int32_t* ids;
  const int32_t* slots;
  int64_t capacity;
  Choices(const char* op, const Tensor& ids_tensor, const Tensor& slots_tensor, const Tensor& scalars_tensor) {
    expect_tensor(op, "slots", slots_tensor, DType::i32, {ids_tensor.dim(0), ids_tensor.dim(1)});
    expect_tensor(op, "scalars", scalars_tensor, DType::i32, {kNumRoutingScalars});
    ids = ids_tensor.as<int32_t>();
    slots = slots_tensor.as<int32_t>();
    capacity = scalars_tensor.as<int32_t>()[kCapacity];
  }
  bool kept(int64_t index) const { return ids[index] >= 0 && slots[index] >= 0 && slots[index] < capacity; }
  // The node of choice `index` when it is kept, else -1.
  int kept_node(int64_t index, int experts_per_node) const {
    return kept(index) ? ids[index] / experts_per_node : -1;
  }
};

// Where token `token`'s row for node `node` went in the node layout (node_ids lists its nodes).
int32_t node_row(const int32_t* node_ids, const int32_t* node_rows, int64_t token, int64_t node_slots, int node) {
  for (int64_t slot = 0; slot < node_slots; ++slot)
    if (node_ids[token * node_slots + slot] == node) return node_rows[token * node_slots + slot];
  return -1;
}

}  // namespace

void ep_kept_choices(const Tensor& ids_tensor, const Tensor& slots_tensor, const Tensor& scalars_tensor,
                     Tensor& kept_ids_tensor) {
  const char* op = "ep_kept_choices";
  const int64_t tokens = expect_choices(op, "ids", ids_tensor), choices = ids_tensor.dim(1);
  const Choices sender(op, ids_tensor, slots_tensor, scalars_tensor);
  expect_tensor(op, "kept_ids", kept_ids_tensor, DType::i32, {tokens, choices});
  int32_t* kept_ids = kept_ids_tensor.as<int32_t>();
  for (int64_t index = 0; index < tokens * choices; ++index)
    kept_ids[index] = sender.kept(index) ? sender.ids[index] : -1;
}

void ep_map_choice_ids(const Tensor& ids_tensor, const Tensor& expert_map_tensor, Tensor& mapped_ids_tensor) {
  const char* op = "ep_map_choice_ids";
  const int64_t tokens = expect_choices(op, "ids", ids_tensor), choices = ids_tensor.dim(1);
  SY_CHECK(expert_map_tensor.rank == 1 && expert_map_tensor.dim(0) >= 1, op, ": expert_map must be i32 [X], got ",
           expert_map_tensor.describe());
  const int64_t experts = expert_map_tensor.dim(0);
  expect_tensor(op, "expert_map", expert_map_tensor, DType::i32, {experts});
  expect_tensor(op, "mapped_ids", mapped_ids_tensor, DType::i32, {tokens, choices});
  const int32_t* ids = ids_tensor.as<int32_t>();
  const int32_t* expert_map = expert_map_tensor.as<int32_t>();
  int32_t* mapped = mapped_ids_tensor.as<int32_t>();
  for (int64_t index = 0; index < tokens * choices; ++index) {
    const int32_t id = ids[index];
    SY_CHECK(id < experts, op, ": id ", id, " at token ", index / choices, " choice ", index % choices, " is >= ",
             experts);
    mapped[index] = id >= 0 ? expert_map[id] : -1;
  }
}

void ep_choice_layout(const Tensor& ids_tensor, int num_slots, Tensor& slots_tensor, Tensor& counts_tensor,
                      Tensor& offsets_tensor, Tensor& scalars_tensor) {
  const char* op = "ep_choice_layout";
  const int64_t tokens = expect_choices(op, "ids", ids_tensor), choices = ids_tensor.dim(1);
  SY_CHECK(num_slots >= 1, op, ": num_slots must be >= 1, got ", num_slots);
  expect_tensor(op, "slots", slots_tensor, DType::i32, {tokens, choices});
  expect_tensor(op, "counts", counts_tensor, DType::i32, {num_slots});
  expect_tensor(op, "offsets", offsets_tensor, DType::i32, {num_slots + 1});
  expect_tensor(op, "scalars", scalars_tensor, DType::i32, {kNumRoutingScalars});
  const int32_t* ids = ids_tensor.as<int32_t>();
  int32_t* slots = slots_tensor.as<int32_t>();
  int32_t* counts = counts_tensor.as<int32_t>();
  int32_t* offsets = offsets_tensor.as<int32_t>();
  std::fill(counts, counts + num_slots, 0);
  int64_t total = 0;
  for (int64_t index = 0; index < tokens * choices; ++index) {
    const int32_t id = ids[index];
    SY_CHECK(id < num_slots, op, ": id ", id, " at token ", index / choices, " choice ", index % choices, " is >= ",
             num_slots);
    if (id < 0) {
      slots[index] = -1;
      continue;
    }
    slots[index] = counts[id]++;
    ++total;
  }
  offsets[0] = 0;
  for (int slot = 0; slot < num_slots; ++slot) offsets[slot + 1] = offsets[slot] + counts[slot];
  int32_t* scalars = scalars_tensor.as<int32_t>();
  scalars[kCapacity] = std::numeric_limits<int32_t>::max();
  scalars[kTotalChoices] = int32_t(total);
  scalars[kDroppedChoices] = 0;
  scalars[kPaddedRows] = int32_t(total);
}

void ep_node_choices(const Tensor& ids_tensor, const Tensor& slots_tensor, const Tensor& scalars_tensor, int experts_per_node, int num_nodes,
                     Tensor& node_ids_tensor) {
  const char* op = "ep_node_choices";
  const int64_t tokens = expect_choices(op, "ids", ids_tensor), choices = ids_tensor.dim(1);
  const int64_t node_slots = std::min<int64_t>(choices, num_nodes);
  SY_CHECK(experts_per_node >= 1 && num_nodes >= 1, op, ": experts_per_node and num_nodes must be >= 1, got ",
           experts_per_node, " and ", num_nodes);
  const Choices kept(op, ids_tensor, slots_tensor, scalars_tensor);
  expect_tensor(op, "node_ids", node_ids_tensor, DType::i32, {tokens, node_slots});
  const int32_t* ids = ids_tensor.as<int32_t>();
  int32_t* node_ids = node_ids_tensor.as<int32_t>();
  std::vector<int> nodes;
  for (int64_t token = 0; token < tokens; ++token) {
    nodes.clear();
    for (int64_t choice = 0; choice < choices; ++choice) {
      const int node = kept.kept_node(token * choices + choice, experts_per_node);
      if (node < 0) continue;
      SY_CHECK(node < num_nodes, op, ": expert ", ids[token * choices + choice], " of token ", token,
               " is on node ", node, " of ", num_nodes);
      if (std::find(nodes.begin(), nodes.end(), node) == nodes.end()) nodes.push_back(node);
    }
    std::sort(nodes.begin(), nodes.end());
    for (int64_t slot = 0; slot < node_slots; ++slot)
      node_ids[token * node_slots + slot] = slot < int64_t(nodes.size()) ? nodes[size_t(slot)] : -1;
  }
}

void ep_pack_node_choices(const Tensor& ids_tensor, const Tensor& gates_tensor, const Tensor& slots_tensor, const Tensor& scalars_tensor,
                          const Tensor& node_ids_tensor, const Tensor& node_rows_tensor, int experts_per_node,
                          Tensor& meta_ids_tensor, Tensor& meta_gates_tensor) {
  const char* op = "ep_pack_node_choices";
  const int64_t tokens = expect_choices(op, "ids", ids_tensor), choices = ids_tensor.dim(1);
  const int64_t node_slots = node_ids_tensor.rank == 2 ? node_ids_tensor.dim(1) : 0;
  const int64_t rows = meta_ids_tensor.rank == 2 ? meta_ids_tensor.dim(0) : 0;
  const Choices kept(op, ids_tensor, slots_tensor, scalars_tensor);
  expect_tensor(op, "node_ids", node_ids_tensor, DType::i32, {tokens, node_slots});
  expect_tensor(op, "node_rows", node_rows_tensor, DType::i32, {tokens, node_slots});
  expect_tensor(op, "meta_ids", meta_ids_tensor, DType::i32, {rows, choices});
  expect_tensor(op, "gates", gates_tensor, gates_tensor.dtype, {tokens, choices});
  expect_tensor(op, "meta_gates", meta_gates_tensor, gates_tensor.dtype, {rows, choices});
  const int32_t* ids = ids_tensor.as<int32_t>();
  const int32_t* node_ids = node_ids_tensor.as<int32_t>();
  const int32_t* node_rows = node_rows_tensor.as<int32_t>();
  int32_t* meta_ids = meta_ids_tensor.as<int32_t>();
  detail::dispatch_float(op, gates_tensor.dtype, [&](auto zero) {
    using Real = decltype(zero);
    const Real* gates = gates_tensor.as<Real>();
    Real* meta_gates = meta_gates_tensor.as<Real>();
    for (int64_t token = 0; token < tokens; ++token) {
      for (int64_t slot = 0; slot < node_slots; ++slot) {
        const int node = node_ids[token * node_slots + slot];
        const int64_t row = node_rows[token * node_slots + slot];
        if (node < 0 || row < 0) continue;
        SY_CHECK(row < rows, op, ": node row ", row, " of token ", token, " is >= ", rows);
        for (int64_t choice = 0; choice < choices; ++choice) {
          const int64_t index = token * choices + choice;
          const bool here = kept.kept_node(index, experts_per_node) == node;
          meta_ids[row * choices + choice] = here ? ids[index] - node * experts_per_node : -1;
          meta_gates[row * choices + choice] = here ? gates[index] : Real(0);
        }
      }
    }
  });
}

void ep_unpack_node_gate_grads(const Tensor& meta_grad_tensor, const Tensor& ids_tensor,
                               const Tensor& slots_tensor, const Tensor& scalars_tensor, const Tensor& node_ids_tensor,
                               const Tensor& node_rows_tensor, int experts_per_node, Tensor& grad_gates_tensor) {
  const char* op = "ep_unpack_node_gate_grads";
  const int64_t tokens = expect_choices(op, "ids", ids_tensor), choices = ids_tensor.dim(1);
  const int64_t node_slots = node_ids_tensor.rank == 2 ? node_ids_tensor.dim(1) : 0;
  const int64_t rows = meta_grad_tensor.rank == 2 ? meta_grad_tensor.dim(0) : 0;
  const Choices kept(op, ids_tensor, slots_tensor, scalars_tensor);
  expect_tensor(op, "node_ids", node_ids_tensor, DType::i32, {tokens, node_slots});
  expect_tensor(op, "node_rows", node_rows_tensor, DType::i32, {tokens, node_slots});
  expect_tensor(op, "meta_grad_gates", meta_grad_tensor, meta_grad_tensor.dtype, {rows, choices});
  expect_tensor(op, "grad_gates", grad_gates_tensor, meta_grad_tensor.dtype, {tokens, choices});
  const int32_t* node_ids = node_ids_tensor.as<int32_t>();
  const int32_t* node_rows = node_rows_tensor.as<int32_t>();
  detail::dispatch_float(op, meta_grad_tensor.dtype, [&](auto zero) {
    using Real = decltype(zero);
    const Real* meta_grad = meta_grad_tensor.as<Real>();
    Real* grad_gates = grad_gates_tensor.as<Real>();
    for (int64_t token = 0; token < tokens; ++token) {
      for (int64_t choice = 0; choice < choices; ++choice) {
        const int64_t index = token * choices + choice;
        const int node = kept.kept_node(index, experts_per_node);
        const int64_t row = node < 0 ? -1 : node_row(node_ids, node_rows, token, node_slots, node);
        SY_CHECK(row < rows, op, ": node row ", row, " of token ", token, " is >= ", rows);
        grad_gates[index] = row < 0 ? Real(0) : meta_grad[row * choices + choice];
      }
    }
  });
}

}  // namespace cpu
}  // namespace switchyard
