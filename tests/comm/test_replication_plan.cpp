// The hot-expert replication plan (src/comm/replication_plan.h): hand-checked cases (the prefix
// rule among them), and on random skewed loads the properties the EP layer relies on -- every
// (source, expert) segment has exactly one destination, a replica's sources are a prefix of its
// expert's non-empty sources, loads are conserved, the busiest rank never gets busier, budgets
// hold, a replica never sits on its owner, balanced loads and a zero budget move nothing, and the
// same loads give the same plan.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "src/comm/replication_plan.h"
#include "src/core/error.h"

using namespace switchyard;

namespace {

using Loads = std::vector<std::vector<int64_t>>;

// Each rank's load recomputed from the plan's destinations.
std::vector<int64_t> loads_by_destination(const Loads& loads, const ReplicationPlan& plan) {
  const int ranks = int(loads.size()), experts = int(loads[0].size()), per_rank = experts / ranks;
  std::vector<int64_t> rank_load(size_t(ranks), 0);
  for (int source = 0; source < ranks; ++source)
    for (int expert = 0; expert < experts; ++expert)
      rank_load[size_t(plan.destination(source, expert, per_rank))] += loads[size_t(source)][size_t(expert)];
  return rank_load;
}

TEST(ReplicationPlan, HandCheckedHotExpertMovesToTheIdlestRank) {
  // 2 ranks x 2 experts; expert 0 (rank 0) gets 10 rows from each source, the rest 1 each.
  // Loads: rank 0 = 20 + 2 = 22, rank 1 = 4. Moving source 0's 10 rows of expert 0: 12 vs 14, the
  // pair's max drops from 22 to 14; source 1's 10 rows next would raise it to 24: not moved. Then
  // rank 1 (14) is the busier: its expert 2 (the lower id of two with 2 rows) moves source 0's row
  // to rank 0: 13 and 13.
  const Loads two_ranks = {{10, 1, 1, 1}, {10, 1, 1, 1}};
  ReplicationOptions options;
  const ReplicationPlan plan = plan_replication(two_ranks, options);
  ASSERT_EQ(plan.replicas.size(), 2u);
  EXPECT_EQ(plan.replicas[0].expert, 0);
  EXPECT_EQ(plan.replicas[0].owner, 0);
  EXPECT_EQ(plan.replicas[0].host, 1);
  EXPECT_EQ(plan.replicas[0].sources, std::vector<int>{0});
  EXPECT_EQ(plan.replicas[0].rows, 10);
  EXPECT_EQ(plan.rank_loads_before, (std::vector<int64_t>{22, 4}));
  EXPECT_EQ(plan.replicas[1].expert, 2);
  EXPECT_EQ(plan.replicas[1].owner, 1);
  EXPECT_EQ(plan.replicas[1].host, 0);
  EXPECT_EQ(plan.replicas[1].sources, std::vector<int>{0});
  EXPECT_EQ(plan.rank_loads_after, (std::vector<int64_t>{13, 13}));
  EXPECT_EQ(plan.moved_rows(), 11);
  EXPECT_EQ(plan.destination(0, 0, 2), 1);
  EXPECT_EQ(plan.destination(1, 0, 2), 0);
  EXPECT_EQ(plan.destination(0, 2, 2), 0);
  EXPECT_EQ(plan.destination(0, 3, 2), 1);
}

TEST(ReplicationPlan, SourcesAreAPrefixTheFirstSegmentThatDoesNotFitEndsTheReplica) {
  // 3 ranks x 1 expert. Expert 0 (rank 0) gets 4, 30 and 4 rows from sources 0, 1, 2; experts 1
  // and 2 one row from each source. Rank 0 (38) is the busiest, rank 1 (3) the idlest (tie with
  // rank 2, lower index). Source 0's 4 rows move (7 vs 34); source 1's 30 would give 37 >= 34 and
  // do not fit, so the replica ends there: source 2's 4 rows, which would fit, stay with the owner
  // (moving them would put rows behind source 1's in the owner's order on the replica).
  const Loads loads = {{4, 1, 1}, {30, 1, 1}, {4, 1, 1}};
  const ReplicationPlan plan = plan_replication(loads, ReplicationOptions{});
  ASSERT_EQ(plan.replicas.size(), 1u);
  EXPECT_EQ(plan.replicas[0].expert, 0);
  EXPECT_EQ(plan.replicas[0].host, 1);
  EXPECT_EQ(plan.replicas[0].sources, std::vector<int>{0});
  EXPECT_EQ(plan.replicas[0].rows, 4);
  EXPECT_EQ(plan.rank_loads_after, (std::vector<int64_t>{34, 7, 3}));
  EXPECT_EQ(plan.destination(2, 0, 1), 0);

  // Empty segments neither move nor end the prefix: source 0 sends nothing to expert 0, source 1's
  // 6 rows move (9 vs 6), source 2's would not fit. Then rank 1 (9) is the busiest: its expert 1
  // goes whole to rank 2 (rank 1 has used its one replica slot): 6, 6, 6.
  const ReplicationPlan skip_empty = plan_replication({{0, 1, 1}, {6, 1, 1}, {6, 1, 1}}, ReplicationOptions{});
  ASSERT_EQ(skip_empty.replicas.size(), 2u);
  EXPECT_EQ(skip_empty.replicas[0].expert, 0);
  EXPECT_EQ(skip_empty.replicas[0].host, 1);
  EXPECT_EQ(skip_empty.replicas[0].sources, (std::vector<int>{1}));
  EXPECT_EQ(skip_empty.replicas[1].expert, 1);
  EXPECT_EQ(skip_empty.replicas[1].host, 2);
  EXPECT_EQ(skip_empty.replicas[1].sources, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(skip_empty.rank_loads_after, (std::vector<int64_t>{6, 6, 6}));
}

TEST(ReplicationPlan, BalancedLoadsAndAZeroBudgetMoveNothing) {
  const Loads balanced = {{5, 5, 5, 5}, {5, 5, 5, 5}};
  EXPECT_TRUE(plan_replication(balanced, ReplicationOptions{}).replicas.empty());
  const Loads skewed = {{50, 1, 1, 1}, {50, 1, 1, 1}};
  ReplicationOptions off;
  off.max_replicas_per_rank = 0;
  const ReplicationPlan plan = plan_replication(skewed, off);
  EXPECT_TRUE(plan.replicas.empty());
  EXPECT_EQ(plan.rank_loads_after, plan.rank_loads_before);
}

// parallel.replica_min_rows: a replica that would take fewer rows is not made, and the loads it
// would have moved stay where they were.
TEST(ReplicationPlan, MinimumRowsLeavesSmallReplicasOut) {
  const Loads skewed = {{50, 1, 1, 1}, {50, 1, 1, 1}};
  const ReplicationPlan free_plan = plan_replication(skewed, ReplicationOptions{});
  ASSERT_FALSE(free_plan.replicas.empty());
  const int64_t smallest = free_plan.replicas.front().rows;
  ReplicationOptions exact;
  exact.min_rows = smallest;
  EXPECT_EQ(plan_replication(skewed, exact).replicas.size(), free_plan.replicas.size()) << "min_rows is inclusive";
  ReplicationOptions above;
  above.min_rows = smallest + 1;
  const ReplicationPlan none = plan_replication(skewed, above);
  EXPECT_TRUE(none.replicas.empty());
  EXPECT_EQ(none.rank_loads_after, none.rank_loads_before);
}

TEST(ReplicationPlan, RandomSkewedLoadsKeepEveryInvariant) {
  std::mt19937_64 generator(5);
  int improved = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int ranks = 2 + int(generator() % 7), per_rank = 1 + int(generator() % 4), experts = ranks * per_rank;
    const double skew = double(generator() % 5);
    Loads loads(static_cast<size_t>(ranks), std::vector<int64_t>(static_cast<size_t>(experts)));
    for (int source = 0; source < ranks; ++source)
      for (int expert = 0; expert < experts; ++expert)  // hot low-numbered experts, like bench ep --skew
        loads[size_t(source)][size_t(expert)] =
            int64_t(double(generator() % 20) * std::exp(skew * double(experts - 1 - expert) / double(experts)));
    ReplicationOptions options;
    options.max_replicas_per_rank = 1 + int(generator() % 3);
    options.min_rows = trial % 3 == 0 ? int64_t(generator() % 40) : 0;
    const ReplicationPlan plan = plan_replication(loads, options);
    SCOPED_TRACE(::testing::Message() << "trial " << trial << ": " << ranks << " ranks x " << per_rank);

    EXPECT_EQ(loads_by_destination(loads, plan), plan.rank_loads_after);
    int64_t before = 0, after = 0;
    for (int rank = 0; rank < ranks; ++rank) {
      before += plan.rank_loads_before[size_t(rank)];
      after += plan.rank_loads_after[size_t(rank)];
    }
    EXPECT_EQ(before, after);
    EXPECT_LE(plan.max_load_after(), plan.max_load_before());
    if (plan.max_load_after() < plan.max_load_before()) ++improved;
    std::map<int, int> hosted, replicas_of_expert;
    for (const ExpertReplica& replica : plan.replicas) {
      EXPECT_NE(replica.host, replica.owner);
      EXPECT_EQ(replica.owner, replica.expert / per_rank);
      EXPECT_TRUE(std::is_sorted(replica.sources.begin(), replica.sources.end()));
      EXPECT_FALSE(replica.sources.empty());
      // A prefix of the expert's non-empty sources: every source before the last moved one that
      // sends rows to the expert moved too.
      for (int source = 0; source < replica.sources.back(); ++source)
        if (loads[size_t(source)][size_t(replica.expert)] > 0)
          EXPECT_TRUE(std::binary_search(replica.sources.begin(), replica.sources.end(), source))
              << "expert " << replica.expert << ": source " << source << " skipped";
      int64_t rows = 0;
      for (int source : replica.sources) rows += loads[size_t(source)][size_t(replica.expert)];
      EXPECT_EQ(rows, replica.rows);
      EXPECT_GE(replica.rows, options.min_rows);
      ++hosted[replica.host];
      ++replicas_of_expert[replica.expert];
    }
    for (const auto& [host, count] : hosted) EXPECT_LE(count, options.max_replicas_per_rank) << "host " << host;
    for (const auto& [expert, count] : replicas_of_expert) EXPECT_EQ(count, 1) << "expert " << expert;
    // Deterministic: every rank computes the same plan from the same loads.
    const ReplicationPlan again = plan_replication(loads, options);
    ASSERT_EQ(again.replicas.size(), plan.replicas.size());
    for (size_t index = 0; index < plan.replicas.size(); ++index) {
      EXPECT_EQ(again.replicas[index].expert, plan.replicas[index].expert);
      EXPECT_EQ(again.replicas[index].host, plan.replicas[index].host);
      EXPECT_EQ(again.replicas[index].sources, plan.replicas[index].sources);
    }
  }
  EXPECT_GT(improved, 100) << "the skewed loads should mostly get a lower maximum";
}

TEST(ReplicationPlan, MalformedLoadsAreInternalErrors) {
  EXPECT_THROW(plan_replication({}, ReplicationOptions{}), Error);
  EXPECT_THROW(plan_replication({{1, 2, 3}, {1, 2, 3}}, ReplicationOptions{}), Error);  // 3 experts, 2 ranks
  EXPECT_THROW(plan_replication({{1, 2}, {1}}, ReplicationOptions{}), Error);
  EXPECT_THROW(plan_replication({{1, -2}, {1, 2}}, ReplicationOptions{}), Error);
}

}  // namespace
