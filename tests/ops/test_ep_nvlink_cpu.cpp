// The CPU reference of the direct peer row moves (src/ops/ep_nvlink_ops.h) against the NCCL path's
// reference ops on a virtual group (tests/support/ep_nvlink_group.h): pushing every rank's packed rows
// into its peers' padded layouts (padding then zeroed) gives exactly what the all-to-all plus
// ep_to_expert_layout gives, and pulling gives what ep_from_expert_layout plus the return
// all-to-all gives. Receive buffers start as garbage.
#include <gtest/gtest.h>

#include <cmath>
#include <tuple>

#include "tests/support/ep_nvlink_group.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

void run_cpu_group(const VirtualEpGroup& group) {
  const int ranks = group.ranks;
  std::vector<Bytes> padded(static_cast<size_t>(ranks));
  std::vector<void*> bases(static_cast<size_t>(ranks));
  for (int rank = 0; rank < ranks; ++rank) {
    padded[size_t(rank)].assign(size_t(std::max<int64_t>(group.max_rows, 1) * group.row_bytes), 0xAB);
    bases[size_t(rank)] = padded[size_t(rank)].data();
  }
  auto peers_of = [&](int rank) {
    return virtual_peer_rows(group, rank, group.offsets[size_t(rank)].data(), group.peer_rows[size_t(rank)].data(),
                             bases.data());
  };
  for (int rank = 0; rank < ranks; ++rank)
    cpu::ep_push_rows(group.packed[size_t(rank)].data(), group.rows_of(rank), peers_of(rank));
  for (int receiver = 0; receiver < ranks; ++receiver) {
    cpu::ep_zero_padding_rows(padded[size_t(receiver)].data(), group.row_bytes,
                              group.expert_offsets[size_t(receiver)].data(),
                              group.expert_totals[size_t(receiver)].data(), group.local);
    const Bytes& expected = group.expected_padded[size_t(receiver)];
    ASSERT_LE(expected.size(), padded[size_t(receiver)].size());
    EXPECT_EQ(0, std::memcmp(expected.data(), padded[size_t(receiver)].data(), expected.size()))
        << "receiver " << receiver;
  }
  // The way back, from the receivers' outputs.
  for (int receiver = 0; receiver < ranks; ++receiver)
    std::copy(group.outputs[size_t(receiver)].begin(), group.outputs[size_t(receiver)].end(),
              padded[size_t(receiver)].begin());
  std::mt19937_64 rng(uint64_t(ranks) * 31 + uint64_t(group.local));
  for (int rank = 0; rank < ranks; ++rank) {
    Bytes pulled(group.packed[size_t(rank)].size(), 0xEE);
    cpu::ep_pull_rows(pulled.data(), group.rows_of(rank), peers_of(rank));
    EXPECT_EQ(pulled, group.expected_pulled[size_t(rank)]) << "sender " << rank;
    if (group.row_bytes % 4 != 0) continue;
    // The fused pull + gather (f32 rows): y[t] = sum_j gate * row, rows also kept.
    const TokenMap map = make_token_map(group.rows_of(rank), 2, rng);
    const int64_t width = group.row_bytes / 4;
    std::vector<float> combined(size_t(map.tokens * width), -7.0f), kept(size_t(group.rows_of(rank) * width), -7.0f);
    cpu::ep_pull_combine(peers_of(rank), group.rows_of(rank), map.choice_rows.data(), map.gates.data(), map.tokens,
                         map.k, DType::f32, combined.data(), kept.data());
    const float* expected_rows = reinterpret_cast<const float*>(group.expected_pulled[size_t(rank)].data());
    EXPECT_EQ(0, std::memcmp(kept.data(), expected_rows, kept.size() * 4)) << "kept rows of sender " << rank;
    for (int64_t token = 0; token < map.tokens; ++token)
      for (int64_t column = 0; column < width; ++column) {
        float sum = 0.0f;
        for (int choice = 0; choice < map.k; ++choice) {
          const int32_t row = map.choice_rows[size_t(token * map.k + choice)];
          if (row >= 0) sum = std::fma(map.gates[size_t(token * map.k + choice)], expected_rows[row * width + column], sum);
        }
        ASSERT_EQ(combined[size_t(token * width + column)], sum) << "token " << token << " column " << column;
      }
  }
}

class EpNvlinkCpu : public ::testing::TestWithParam<std::tuple<int, int, int>> {};

TEST_P(EpNvlinkCpu, PushAndPullMatchTheAllToAllPath) {
  const auto [ranks, local, alignment] = GetParam();
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed);
    run_cpu_group(make_virtual_ep_group(ranks, local, alignment, 24, 9, seed * 7919 + uint64_t(ranks), DType::f32));
  }
}

INSTANTIATE_TEST_SUITE_P(Groups, EpNvlinkCpu,
                         ::testing::Values(std::make_tuple(1, 1, 1), std::make_tuple(1, 4, 8), std::make_tuple(2, 3, 4),
                                           std::make_tuple(3, 2, 1), std::make_tuple(4, 5, 16),
                                           std::make_tuple(8, 2, 128)));

TEST(EpNvlinkCpu, PeerRowsRejectNegativeCounts) {
  const std::vector<int32_t> counts = {1, -1, 2, 3};  // 2 ranks x 2 experts
  std::vector<int32_t> peer_rows(2);
  EXPECT_THROW(ep_peer_rows(counts.data(), 2, 1, 0, 1, peer_rows.data()), Error);
}

}  // namespace
