// ParallelLayout: the rank -> group -> expert mapping for worlds of 1, 2, 4 and 8 ranks with
// ep_size 1, 2 and 4 (the mapping bootstrap builds the communicators from: same r / ep_size = same
// expert-parallel group, same r % ep_size = same shard), and the rules with their messages.
#include <gtest/gtest.h>

#include <functional>
#include <set>
#include <string>
#include <vector>

#include "src/comm/parallel_layout.h"
#include "src/core/error.h"
#include "tests/support/expect_error.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

TEST(ParallelLayout, FourRanksTwoWayExpertParallel) {
  const ParallelLayout layout(4, 2, 8);
  EXPECT_EQ(layout.world_size(), 4);
  EXPECT_EQ(layout.ep_size(), 2);
  EXPECT_EQ(layout.expert_dp_size(), 2);
  EXPECT_EQ(layout.num_experts(), 8);
  EXPECT_EQ(layout.experts_per_rank(), 4);
  // rank: ep_group, ep_rank, expert_shard, expert_dp_group, expert_dp_rank, first_expert
  const int expected[4][6] = {{0, 0, 0, 0, 0, 0}, {0, 1, 1, 1, 0, 4}, {1, 0, 0, 0, 1, 0}, {1, 1, 1, 1, 1, 4}};
  for (int rank = 0; rank < 4; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    const RankPlacement placement = layout.placement(rank);
    EXPECT_EQ(placement.world_rank, rank);
    EXPECT_EQ(placement.ep_group, expected[rank][0]);
    EXPECT_EQ(placement.ep_rank, expected[rank][1]);
    EXPECT_EQ(placement.expert_shard, expected[rank][2]);
    EXPECT_EQ(placement.expert_dp_group, expected[rank][3]);
    EXPECT_EQ(placement.expert_dp_rank, expected[rank][4]);
    EXPECT_EQ(placement.first_expert, expected[rank][5]);
  }
  EXPECT_EQ(layout.world_rank_of(1, 0), 2);
  EXPECT_EQ(layout.shard_of_expert(3), 0);
  EXPECT_EQ(layout.shard_of_expert(4), 1);
}

TEST(ParallelLayout, MappingForEveryWorldAndEpSize) {
  const int num_experts = 16;
  for (int world_size : {1, 2, 4, 8}) {
    for (int ep_size : {1, 2, 4}) {
      if (ep_size > world_size) continue;
      SCOPED_TRACE("world " + std::to_string(world_size) + ", ep_size " + std::to_string(ep_size));
      const ParallelLayout layout(world_size, ep_size, num_experts);
      EXPECT_EQ(layout.expert_dp_size(), world_size / ep_size);
      EXPECT_EQ(layout.experts_per_rank(), num_experts / ep_size);
      std::vector<std::set<int>> experts_of_group(size_t(layout.expert_dp_size()));
      std::vector<int> dp_group_sizes(size_t(ep_size), 0);
      for (int rank = 0; rank < world_size; ++rank) {
        const RankPlacement placement = layout.placement(rank);
        // The communicators' layout (src/comm/communicator.h, bootstrap.cpp's MPI_Comm_split).
        EXPECT_EQ(placement.ep_group, rank / ep_size);
        EXPECT_EQ(placement.ep_rank, rank % ep_size);
        EXPECT_EQ(placement.expert_shard, rank % ep_size);
        EXPECT_EQ(placement.expert_dp_group, rank % ep_size);
        EXPECT_EQ(placement.expert_dp_rank, rank / ep_size);
        EXPECT_EQ(placement.first_expert, (rank % ep_size) * (num_experts / ep_size));
        EXPECT_EQ(layout.world_rank_of(placement.ep_group, placement.ep_rank), rank);
        dp_group_sizes[size_t(placement.expert_dp_group)] += 1;
        for (int expert = placement.first_expert; expert < placement.first_expert + layout.experts_per_rank();
             ++expert) {
          EXPECT_EQ(layout.shard_of_expert(expert), placement.expert_shard);
          // Disjoint shards within an expert-parallel group...
          EXPECT_TRUE(experts_of_group[size_t(placement.ep_group)].insert(expert).second) << "expert " << expert;
        }
      }
      // ... that cover all experts, each shard held by world / ep_size ranks.
      for (const std::set<int>& experts : experts_of_group) EXPECT_EQ(int(experts.size()), num_experts);
      for (int size : dp_group_sizes) EXPECT_EQ(size, world_size / ep_size);
    }
  }
}

TEST(ParallelLayout, RanksOnlyLayoutPlacesNoExperts) {
  const ParallelLayout layout(4, 2, /*num_experts=*/0);
  EXPECT_EQ(layout.experts_per_rank(), 0);
  EXPECT_EQ(layout.placement(3).first_expert, 0);
  EXPECT_EQ(layout.placement(3).ep_rank, 1);
}

TEST(ParallelLayout, EpSizeNotDividingTheExpertsIsBadInput) {
  expect_bad_input([] { ParallelLayout(4, 4, 6); }, {"parallel.ep_size = 4", "does not divide moe.num_experts = 6"});
  expect_bad_input([] { ParallelLayout(2, 2, 3); }, {"parallel.ep_size = 2", "moe.num_experts = 3"});
  // Known at parse time, without the world; the origin comes first.
  expect_bad_input([] { ParallelLayout::check(0, 3, 8, "x.yaml:10"); },
                   {"x.yaml:10: parallel.ep_size = 3 does not divide moe.num_experts = 8"});
  EXPECT_NO_THROW(ParallelLayout::check(0, 4, 8, "x.yaml:10"));
}

TEST(ParallelLayout, EpSizeNotDividingTheWorldIsBadInput) {
  expect_bad_input([] { ParallelLayout(3, 2, 8); },
                   {"parallel.ep_size = 2", "does not divide the world size 3", "moe.num_experts = 8"});
  expect_bad_input([] { ParallelLayout(2, 4, 8); }, {"parallel.ep_size = 4", "world size 2"});
  expect_bad_input([] { ParallelLayout(6, 4, 0); }, {"parallel.ep_size = 4", "world size 6"});
  expect_bad_input([] { ParallelLayout::check(3, 2, 8, "w.yaml"); }, {"w.yaml: parallel.ep_size = 2", "world size 3"});
}

TEST(ParallelLayout, EpSizeBelowOneIsBadInput) {
  expect_bad_input([] { ParallelLayout(4, 0, 8); }, {"parallel.ep_size = 0", "at least 1", "world size 4"});
  expect_bad_input([] { ParallelLayout::check(0, -1, 8); }, {"parallel.ep_size = -1", "at least 1"});
}

TEST(ParallelLayout, ProblemIsEmptyExactlyWhenTheLayoutExists) {
  EXPECT_EQ(ParallelLayout::problem(8, 4, 16), "");
  EXPECT_EQ(ParallelLayout::problem(0, 4, 16), "");  // world not known yet
  EXPECT_EQ(ParallelLayout::problem(8, 4, 0), "");   // no experts to place
  EXPECT_NE(ParallelLayout::problem(8, 3, 0), "");
  EXPECT_NE(ParallelLayout::problem(0, 3, 16), "");
}

TEST(ParallelLayout, OutOfRangeArgumentsAreInternalErrors) {
  const ParallelLayout layout(4, 2, 8);
  for (auto body : std::vector<std::function<void()>>{[&] { layout.placement(4); }, [&] { layout.placement(-1); },
                                                     [&] { layout.world_rank_of(2, 0); },
                                                     [&] { layout.shard_of_expert(8); },
                                                     [] { ParallelLayout(0, 1, 8); }}) {
    try {
      body();
      ADD_FAILURE() << "no error";
    } catch (const Error& error) {
      EXPECT_EQ(error.exit_code(), kExitFailure) << error.what();
    }
  }
}

TEST(ParallelLayout, NodesMakeAGroupHierarchicalOnlyWhenItSpansSeveral) {
  const ParallelLayout one_node(8, 4, 16);  // ranks_per_node 0: one node
  EXPECT_FALSE(one_node.hierarchical());
  EXPECT_EQ(one_node.ep_ranks_per_node(), 4);
  EXPECT_EQ(one_node.ep_nodes(), 1);
  const ParallelLayout inside(8, 4, 16, 8);  // a node of 8 holds both groups of 4
  EXPECT_FALSE(inside.hierarchical());
  EXPECT_EQ(inside.ep_nodes(), 1);
  const ParallelLayout spanning(8, 8, 16, 2);  // one group of 8 over 4 nodes of 2
  EXPECT_TRUE(spanning.hierarchical());
  EXPECT_EQ(spanning.ep_ranks_per_node(), 2);
  EXPECT_EQ(spanning.ep_nodes(), 4);
  const ParallelLayout two_groups(8, 4, 16, 2);  // two groups of 4, each over 2 nodes of 2
  EXPECT_TRUE(two_groups.hierarchical());
  EXPECT_EQ(two_groups.ep_nodes(), 2);
}

TEST(ParallelLayout, RanksPerNodeMustDivideOrBeAMultipleOfTheGroup) {
  EXPECT_EQ(ParallelLayout::node_problem(4, 0), "");
  EXPECT_EQ(ParallelLayout::node_problem(4, 2), "");
  EXPECT_EQ(ParallelLayout::node_problem(4, 8), "");
  EXPECT_NE(ParallelLayout::node_problem(4, 3), "");
  EXPECT_NE(ParallelLayout::node_problem(4, -1), "");
  expect_bad_input([] { ParallelLayout(12, 4, 8, 6); }, {"parallel.ranks_per_node = 6", "parallel.ep_size = 4"});
}

}  // namespace
