// The hot-expert replication plan (src/comm/replication_plan.h).
#include "src/comm/replication_plan.h"

#include <algorithm>
#include <numeric>
#include <set>

#include "src/core/error.h"

namespace switchyard {

int ReplicationPlan::destination(int source, int expert, int experts_per_rank) const {
  for (const ExpertReplica& replica : replicas)
    if (replica.expert == expert && std::binary_search(replica.sources.begin(), replica.sources.end(), source))
      return replica.host;
  return expert / experts_per_rank;
}

int64_t ReplicationPlan::moved_rows() const {
  int64_t rows = 0;
  for (const ExpertReplica& replica : replicas) rows += replica.rows;
  return rows;
}

int64_t ReplicationPlan::max_load_before() const {
  return rank_loads_before.empty() ? 0 : *std::max_element(rank_loads_before.begin(), rank_loads_before.end());
}

int64_t ReplicationPlan::max_load_after() const {
  return rank_loads_after.empty() ? 0 : *std::max_element(rank_loads_after.begin(), rank_loads_after.end());
}

ReplicationPlan plan_replication(const std::vector<std::vector<int64_t>>& loads, const ReplicationOptions& options) {
  const int ranks = int(loads.size());
  SY_CHECK(ranks >= 1, "plan_replication: no ranks");
  const int experts = int(loads[0].size());
  SY_CHECK(experts >= ranks && experts % ranks == 0, "plan_replication: ", experts, " experts over ", ranks, " ranks");
  SY_CHECK(options.max_replicas_per_rank >= 0 && options.tolerance >= 0 && options.min_rows >= 0,
           "plan_replication: bad options");
  const int per_rank = experts / ranks;
  std::vector<int64_t> expert_load(size_t(experts), 0);
  for (const std::vector<int64_t>& row : loads) {
    SY_CHECK(int(row.size()) == experts, "plan_replication: ragged loads");
    for (int expert = 0; expert < experts; ++expert) {
      SY_CHECK(row[size_t(expert)] >= 0, "plan_replication: negative load");
      expert_load[size_t(expert)] += row[size_t(expert)];
    }
  }
  ReplicationPlan plan;
  std::vector<int64_t>& rank_load = plan.rank_loads_after;
  rank_load.assign(size_t(ranks), 0);
  for (int expert = 0; expert < experts; ++expert) rank_load[size_t(expert / per_rank)] += expert_load[size_t(expert)];
  plan.rank_loads_before = rank_load;
  if (options.max_replicas_per_rank == 0 || ranks == 1) return plan;

  const double mean = double(std::accumulate(rank_load.begin(), rank_load.end(), int64_t(0))) / ranks;
  std::vector<int> hosted(size_t(ranks), 0);
  std::set<int> replicated;           // experts with a replica (one each)
  std::set<std::pair<int, int>> stuck;  // (rank, expert) pairs that could not move
  while (true) {
    const int busiest = int(std::max_element(rank_load.begin(), rank_load.end()) - rank_load.begin());
    if (double(rank_load[size_t(busiest)]) <= (1.0 + options.tolerance) * mean) break;
    // The busiest rank's most loaded expert that may still move (ties: lowest id).
    int hot = -1;
    for (int expert = busiest * per_rank; expert < (busiest + 1) * per_rank; ++expert) {
      if (replicated.count(expert) || stuck.count({busiest, expert}) || expert_load[size_t(expert)] == 0) continue;
      if (hot < 0 || expert_load[size_t(expert)] > expert_load[size_t(hot)]) hot = expert;
    }
    if (hot < 0) break;
    // The least loaded rank with room for a replica (ties: lowest index).
    int host = -1;
    for (int rank = 0; rank < ranks; ++rank) {
      if (rank == busiest || hosted[size_t(rank)] >= options.max_replicas_per_rank) continue;
      if (host < 0 || rank_load[size_t(rank)] < rank_load[size_t(host)]) host = rank;
    }
    if (host < 0) break;
    ExpertReplica replica;
    replica.expert = hot;
    replica.owner = busiest;
    replica.host = host;
    // A prefix of the expert's sources, in source order: the host's rows of the expert then come
    // before the owner's in the no-replication layout, so the owner can continue the host's partial
    // weight-gradient sum (src/model/moe_ep_layer.h, "Hot-expert replication").
    for (int source = 0; source < ranks; ++source) {
      const int64_t rows = loads[size_t(source)][size_t(hot)];
      if (rows == 0) continue;  // no rows: nothing to move, nothing to order
      if (rank_load[size_t(host)] + rows >= rank_load[size_t(busiest)]) break;  // must lower the pair's max
      replica.sources.push_back(source);
      replica.rows += rows;
      rank_load[size_t(host)] += rows;
      rank_load[size_t(busiest)] -= rows;
    }
    if (replica.sources.empty() || replica.rows < options.min_rows) {  // moves nothing, or too little to pay
      rank_load[size_t(host)] -= replica.rows;
      rank_load[size_t(busiest)] += replica.rows;
      stuck.insert({busiest, hot});
      continue;
    }
    ++hosted[size_t(host)];
    replicated.insert(hot);
    plan.replicas.push_back(std::move(replica));
  }
  return plan;
}

}  // namespace switchyard
