// EpReceiveLayout over host tensors owned by the struct (src/ops/ep_ops.h), for the CPU and CUDA
// tests of the expert-parallel row moves: recv_counts filled from `counts`, the outputs poisoned.
#pragma once

#include <algorithm>
#include <vector>

#include "src/ops/ep_ops.h"
#include "tests/support/test_helpers.h"

namespace switchyard {
namespace testing {

struct HostLayout {
  HostTensor recv_counts, packed_starts, expert_totals, expert_offsets, segment_rows, chunk_offsets;
  EpReceiveLayout layout;

  HostLayout(int ranks, int experts, int chunks, int alignment, const std::vector<int32_t>& counts)
      : recv_counts(DType::i32, {ranks, experts}),
        packed_starts(DType::i32, {int64_t(ranks) * experts + 1}),
        expert_totals(DType::i32, {experts}),
        expert_offsets(DType::i32, {experts + 1}),
        segment_rows(DType::i32, {ranks, experts}),
        chunk_offsets(DType::i32, {experts + chunks}) {
    layout.num_ranks = ranks;
    layout.local_experts = experts;
    layout.chunks = chunks;
    layout.alignment = alignment;
    layout.recv_counts = recv_counts;
    layout.packed_starts = packed_starts;
    layout.expert_totals = expert_totals;
    layout.expert_offsets = expert_offsets;
    layout.segment_rows = segment_rows;
    layout.chunk_offsets = chunk_offsets;
    std::copy(counts.begin(), counts.end(), recv_counts.data<int32_t>());
    for (HostTensor* output : {&packed_starts, &expert_totals, &expert_offsets, &segment_rows, &chunk_offsets})
      poison(output->tensor());
  }
};

}  // namespace testing
}  // namespace switchyard
