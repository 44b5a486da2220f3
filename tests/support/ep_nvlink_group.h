// A virtual expert-parallel group in one process, for the direct peer row moves
// (src/ops/ep_nvlink_ops.h): every rank's packed send rows, its peer_rows, and what each receiver's
// padded layout must hold, derived from the NCCL path's reference ops (an all-to-all into
// source-major packed rows, then ep_to_expert_layout; back: ep_from_expert_layout). Shared by the
// CPU test (tests/ops) and the CUDA test (tests/ops/cuda).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "src/ops/ep_nvlink_ops.h"
#include "src/ops/ep_ops.h"
#include "tests/support/ep_host_layout.h"
#include "tests/support/test_helpers.h"

namespace switchyard {
namespace testing {

using Bytes = std::vector<uint8_t>;

struct VirtualEpGroup {
  int ranks = 1, local = 1, alignment = 1;
  int64_t row_bytes = 16;
  int64_t max_rows = 0;                        // the largest padded layout (what ep_peer_rows returns)
  std::vector<int32_t> all_counts;             // [P][P*L]
  std::vector<std::vector<int32_t>> offsets;   // per rank [P*L + 1], packed send layout
  std::vector<Bytes> packed;                   // per rank, its send rows
  std::vector<std::vector<int32_t>> peer_rows; // per rank [P*L]
  // Per receiver: its layout (expert_offsets [L+1], expert_totals [L], packed_starts [P*L+1]),
  // its padded rows after the exchange, and the "expert outputs" the pulls read.
  std::vector<std::vector<int32_t>> expert_offsets, expert_totals, packed_starts;
  std::vector<Bytes> expected_padded, outputs;
  std::vector<Bytes> expected_pulled;          // per sender: its rows read back from the outputs

  int64_t experts() const { return int64_t(ranks) * local; }
  int64_t rows_of(int rank) const { return offsets[size_t(rank)].back(); }
};

// Rank `rank`'s EpPeerRows over tables the caller placed (host or device pointers).
inline EpPeerRows virtual_peer_rows(const VirtualEpGroup& group, int rank, const int32_t* packed_offsets,
                                    const int32_t* peer_rows, void* const* peer_bases) {
  EpPeerRows peers;
  peers.num_ranks = group.ranks;
  peers.local_experts = group.local;
  peers.rank = rank;
  peers.row_bytes = group.row_bytes;
  peers.packed_offsets = packed_offsets;
  peers.peer_rows = peer_rows;
  peers.peer_bases = peer_bases;
  return peers;
}

// A token map over `rows` packed rows: each row is the choice (t, j) of exactly one token, in a
// random order; the other choices are -1 (dropped or unused). choice_rows [T][k], gates [T][k].
struct TokenMap {
  int64_t tokens = 0;
  int k = 1;
  std::vector<int32_t> choice_rows;
  std::vector<float> gates;
};

inline TokenMap make_token_map(int64_t rows, int k, std::mt19937_64& rng) {
  TokenMap map;
  map.k = k;
  map.tokens = rows / k + 3;
  map.choice_rows.assign(size_t(map.tokens * k), -1);
  std::vector<int64_t> slots(size_t(map.tokens * k));
  for (size_t slot = 0; slot < slots.size(); ++slot) slots[slot] = int64_t(slot);
  std::shuffle(slots.begin(), slots.end(), rng);
  for (int64_t row = 0; row < rows; ++row) map.choice_rows[size_t(slots[size_t(row)])] = int32_t(row);
  std::uniform_real_distribution<float> gate(0.05f, 1.0f);
  map.gates.resize(map.choice_rows.size());
  for (float& value : map.gates) value = gate(rng);
  return map;
}

// Rows of finite numbers in [-1, 1): f32, or bf16 (a float's top half), so the combine tests can
// sum them; any other dtype gets random bytes.
inline Bytes random_bytes(std::mt19937_64& rng, int64_t count, DType dtype = DType::u8) {
  Bytes bytes(static_cast<size_t>(count));
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  if (dtype == DType::f32 && count % 4 == 0) {
    for (int64_t at = 0; at < count; at += 4) {
      const float value = uniform(rng);
      std::memcpy(bytes.data() + at, &value, 4);
    }
  } else if (dtype == DType::bf16 && count % 2 == 0) {
    for (int64_t at = 0; at < count; at += 2) {
      const float value = uniform(rng);
      uint32_t bits = 0;
      std::memcpy(&bits, &value, 4);
      const uint16_t top = uint16_t(bits >> 16);
      std::memcpy(bytes.data() + at, &top, 2);
    }
  } else {
    for (uint8_t& byte : bytes) byte = uint8_t(rng() & 0xFF);
  }
  return bytes;
}

// Counts in [0, max_count], with whole empty ranks/experts now and then.
// Row data: numbers of `dtype` (f32 or bf16; see random_bytes) or random bytes (u8).
inline VirtualEpGroup make_virtual_ep_group(int ranks, int local, int alignment, int64_t row_bytes, int max_count,
                                            uint64_t seed, DType dtype = DType::u8) {
  VirtualEpGroup group;
  group.ranks = ranks;
  group.local = local;
  group.alignment = alignment;
  group.row_bytes = row_bytes;
  std::mt19937_64 rng(seed);
  const int64_t experts = group.experts();
  group.all_counts.assign(size_t(ranks * experts), 0);
  for (int source = 0; source < ranks; ++source)
    for (int64_t expert = 0; expert < experts; ++expert) {
      const bool empty = rng() % 5 == 0 || (source == ranks - 1 && ranks > 1 && expert % 2 == 0);
      group.all_counts[size_t(source * experts + expert)] = empty ? 0 : int32_t(rng() % uint64_t(max_count + 1));
    }
  for (int rank = 0; rank < ranks; ++rank) {
    std::vector<int32_t> offsets(size_t(experts) + 1, 0);
    for (int64_t expert = 0; expert < experts; ++expert)
      offsets[size_t(expert) + 1] = offsets[size_t(expert)] + group.all_counts[size_t(rank * experts + expert)];
    group.offsets.push_back(offsets);
    group.packed.push_back(random_bytes(rng, int64_t(offsets.back()) * row_bytes, dtype));
    std::vector<int32_t> peer_rows(size_t(experts), -1);
    const int64_t largest = ep_peer_rows(group.all_counts.data(), ranks, local, rank, alignment, peer_rows.data());
    if (rank == 0) group.max_rows = largest;
    group.peer_rows.push_back(peer_rows);
  }

  // Receiver p through the NCCL path's reference ops.
  group.expected_pulled.assign(size_t(ranks), Bytes());
  for (int rank = 0; rank < ranks; ++rank)
    group.expected_pulled[size_t(rank)].assign(group.packed[size_t(rank)].size(), 0);
  for (int receiver = 0; receiver < ranks; ++receiver) {
    std::vector<int32_t> receiver_counts(size_t(ranks * local));
    for (int source = 0; source < ranks; ++source)
      for (int expert = 0; expert < local; ++expert)
        receiver_counts[size_t(source * local + expert)] =
            group.all_counts[size_t(source * experts + receiver * local + expert)];
    HostLayout host_layout(ranks, local, 1, alignment, receiver_counts);
    EpReceiveLayout& layout = host_layout.layout;
    const HostTensor &packed_starts = host_layout.packed_starts, &expert_totals = host_layout.expert_totals,
                     &expert_offsets = host_layout.expert_offsets;
    cpu::ep_receive_layout(layout);
    const int64_t received = packed_starts.data<int32_t>()[experts];
    const int64_t padded_rows = expert_offsets.data<int32_t>()[local];
    // The all-to-all's result: source-major, each source's rows for this receiver's experts.
    Bytes received_rows;
    for (int source = 0; source < ranks; ++source) {
      const std::vector<int32_t>& offsets = group.offsets[size_t(source)];
      const size_t begin = size_t(offsets[size_t(receiver * local)]) * size_t(row_bytes);
      const size_t end = size_t(offsets[size_t(receiver * local + local)]) * size_t(row_bytes);
      received_rows.insert(received_rows.end(), group.packed[size_t(source)].begin() + long(begin),
                           group.packed[size_t(source)].begin() + long(end));
    }
    Bytes padded(size_t(std::max<int64_t>(padded_rows, 1) * row_bytes), 0xCD);
    Tensor packed_view(received_rows.data(), DType::u8, DeviceKind::cpu, {received, row_bytes});
    Tensor padded_view(padded.data(), DType::u8, DeviceKind::cpu, {padded_rows, row_bytes});
    cpu::ep_to_expert_layout(packed_view, layout, 0, local, padded_rows, padded_view);
    padded.resize(size_t(padded_rows * row_bytes));
    group.expected_padded.push_back(padded);

    // The way back: outputs in the padded layout -> source-major packed -> each sender's rows.
    Bytes outputs = random_bytes(rng, padded_rows * row_bytes, dtype);
    Bytes returned(size_t(std::max<int64_t>(received, 1) * row_bytes), 0);
    Tensor outputs_view(outputs.data(), DType::u8, DeviceKind::cpu, {padded_rows, row_bytes});
    Tensor returned_view(returned.data(), DType::u8, DeviceKind::cpu, {received, row_bytes});
    cpu::ep_from_expert_layout(outputs_view, layout, 0, local, padded_rows, returned_view);
    for (int source = 0; source < ranks; ++source)
      for (int expert = 0; expert < local; ++expert) {
        const int64_t global = int64_t(receiver) * local + expert;
        const int64_t count = group.all_counts[size_t(source * experts + global)];
        const int64_t from = packed_starts.data<int32_t>()[source * local + expert];
        const int64_t to = group.offsets[size_t(source)][size_t(global)];
        std::memcpy(group.expected_pulled[size_t(source)].data() + to * row_bytes, returned.data() + from * row_bytes,
                    size_t(count * row_bytes));
      }
    group.outputs.push_back(outputs);
    group.expert_offsets.emplace_back(expert_offsets.data<int32_t>(), expert_offsets.data<int32_t>() + local + 1);
    group.expert_totals.emplace_back(expert_totals.data<int32_t>(), expert_totals.data<int32_t>() + local);
    group.packed_starts.emplace_back(packed_starts.data<int32_t>(), packed_starts.data<int32_t>() + experts + 1);
  }
  return group;
}

}  // namespace testing
}  // namespace switchyard
