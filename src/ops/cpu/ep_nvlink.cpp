// CPU reference of the direct peer row moves (semantics: src/ops/ep_nvlink_ops.h). It walks the
// packed segments expert by expert; the CUDA kernels map each packed row to its expert by binary
// search instead, and must write the same bytes.
#include <algorithm>
#include <cmath>
#include <vector>
#include <cstdint>
#include <cstring>

#include "src/ops/ep_nvlink_ops.h"
#include "src/core/error.h"

namespace switchyard {

const char* ep_signal_kind_name(int kind) {
  switch (kind) {
    case kEpRowsDispatched: return "dispatch";
    case kEpOutputsReady: return "expert outputs";
    case kEpGradientsDispatched: return "gradient dispatch";
    case kEpInputGradientsReady: return "input gradients";
    case kEpCountsGathered: return "row counts";
    default: return "unknown";
  }
}

int64_t ep_peer_rows(const int32_t* all_counts, int num_ranks, int local_experts, int rank, int alignment,
                     int32_t* peer_rows) {
  SY_CHECK(num_ranks >= 1 && local_experts >= 1 && rank >= 0 && rank < num_ranks && alignment >= 1,
           "ep_peer_rows: bad geometry (P ", num_ranks, ", L ", local_experts, ", rank ", rank, ", alignment ",
           alignment, ")");
  const int64_t experts = int64_t(num_ranks) * local_experts;
  int64_t largest = 0;
  for (int peer = 0; peer < num_ranks; ++peer) {
    int64_t expert_start = 0;
    for (int expert = 0; expert < local_experts; ++expert) {
      const int64_t column = int64_t(peer) * local_experts + expert;
      int64_t before = 0, total = 0;
      for (int source = 0; source < num_ranks; ++source) {
        const int32_t count = all_counts[source * experts + column];
        SY_CHECK(count >= 0, "ep_peer_rows: rank ", source, " reports ", count, " rows for expert ", column);
        if (source < rank) before += count;
        total += count;
      }
      SY_CHECK(expert_start + before <= INT32_MAX, "ep_peer_rows: row ", expert_start + before, " beyond int32");
      peer_rows[column] = int32_t(expert_start + before);
      expert_start += (total + alignment - 1) / alignment * alignment;
    }
    largest = std::max(largest, expert_start);
  }
  return largest;
}

namespace cpu {
namespace {

template <bool kPush>
void move_rows(void* packed, int64_t rows, const EpPeerRows& peers) {
  const int experts = peers.num_ranks * peers.local_experts;
  SY_CHECK(peers.packed_offsets[0] == 0 && peers.packed_offsets[experts] == rows, "ep peer rows: packed offsets cover [",
           peers.packed_offsets[0], ", ", peers.packed_offsets[experts], "), the buffer holds ", rows, " rows");
  const size_t row_bytes = size_t(peers.row_bytes);
  for (int expert = 0; expert < experts; ++expert) {
    const int peer = expert / peers.local_experts;
    const int64_t first = peers.packed_offsets[expert], count = peers.packed_offsets[expert + 1] - first;
    SY_CHECK(count >= 0, "ep peer rows: negative segment for expert ", expert);
    if (count == 0) continue;
    char* local = static_cast<char*>(packed) + size_t(first) * row_bytes;
    char* remote = static_cast<char*>(peers.peer_bases[peer]) + size_t(peers.peer_rows[expert]) * row_bytes;
    if (kPush) std::memcpy(remote, local, size_t(count) * row_bytes);
    else std::memcpy(local, remote, size_t(count) * row_bytes);
  }
}

}  // namespace

void ep_push_rows(const void* packed, int64_t rows, const EpPeerRows& peers) {
  move_rows<true>(const_cast<void*>(packed), rows, peers);
}

void ep_pull_rows(void* packed, int64_t rows, const EpPeerRows& peers) { move_rows<false>(packed, rows, peers); }

namespace {
template <typename T>
void pull_combine(const EpPeerRows& peers, int64_t rows, const int32_t* choice_rows, const float* gates,
                  int64_t num_tokens, int k_max, T* tokens_out, T* keep) {
  const int64_t width = peers.row_bytes / int64_t(sizeof(T));
  const int experts = peers.num_ranks * peers.local_experts;
  std::vector<T> sum(static_cast<size_t>(width));
  for (int64_t token = 0; token < num_tokens; ++token) {
    std::fill(sum.begin(), sum.end(), T(0));
    for (int choice = 0; choice < k_max; ++choice) {
      const int32_t row = choice_rows[token * k_max + choice];
      if (row < 0 || row >= rows) continue;
      const int32_t* upper = std::upper_bound(peers.packed_offsets, peers.packed_offsets + experts + 1, row);
      const int expert = int(upper - peers.packed_offsets) - 1;
      const int peer = expert / peers.local_experts;
      const int64_t remote_row = int64_t(peers.peer_rows[expert]) + row - peers.packed_offsets[expert];
      const T* remote = static_cast<const T*>(peers.peer_bases[peer]) + remote_row * width;
      const T weight = gates ? T(gates[token * k_max + choice]) : T(1);
      if (keep) std::copy(remote, remote + width, keep + int64_t(row) * width);
      for (int64_t column = 0; column < width; ++column) sum[size_t(column)] = std::fma(weight, remote[column], sum[size_t(column)]);
    }
    std::copy(sum.begin(), sum.end(), tokens_out + token * width);
  }
}
}  // namespace

void ep_pull_combine(const EpPeerRows& peers, int64_t rows, const int32_t* choice_rows, const float* gates,
                     int64_t num_tokens, int k_max, DType dtype, void* tokens_out, void* keep) {
  SY_CHECK(k_max >= 1, "ep_pull_combine: K must be >= 1, got ", k_max);
  if (dtype == DType::f32)
    return pull_combine(peers, rows, choice_rows, gates, num_tokens, k_max, static_cast<float*>(tokens_out),
                        static_cast<float*>(keep));
  SY_CHECK(dtype == DType::f64, "ep_pull_combine (cpu): dtype ", dtype_name(dtype), " is not f32 or f64");
  pull_combine(peers, rows, choice_rows, gates, num_tokens, k_max, static_cast<double*>(tokens_out),
               static_cast<double*>(keep));
}

void ep_zero_padding_rows(void* padded, int64_t row_bytes, const int32_t* expert_offsets, const int32_t* expert_totals,
                          int local_experts) {
  for (int expert = 0; expert < local_experts; ++expert) {
    const int64_t first = int64_t(expert_offsets[expert]) + expert_totals[expert], end = expert_offsets[expert + 1];
    if (end > first)
      std::memset(static_cast<char*>(padded) + size_t(first) * size_t(row_bytes), 0, size_t(end - first) * size_t(row_bytes));
  }
}

}  // namespace cpu
}  // namespace switchyard
