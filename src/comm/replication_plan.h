// Hot-expert replication, the plan (issue #22, item 3; applied by the EP layer,
// src/model/moe_ep_layer.h): from one step's row counts, which hot experts get a replica on which
// lightly loaded rank, and which senders' rows go to the replica instead of the owner.
//
// Input: loads[s][e], the rows source rank s routes to global expert e this step (every rank's
// send counts, all-gathered: P x E ints, known to every rank, so every rank computes the same
// plan), P ranks holding L = E / P experts each (owner(e) = e / L). A rank's load is the rows its
// experts receive.
//
// Greedy and deterministic (ties go to the lowest index): while the busiest rank h is above
// (1 + tolerance) x the mean load, take h's most loaded expert e that is not yet replicated and
// the least loaded rank q that hosts fewer than max_replicas_per_rank replicas (q != h); move whole
// (source, e) segments, in source order, from h to q while each move leaves q below h's load
// before the move (so the larger of the two strictly drops), stopping at the first non-empty
// segment that does not fit. So a replica's sources are a PREFIX of the expert's non-empty sources:
// whole segments keep a row's place unchanged inside its segment, and in the owner's layout without
// replication (rows of an expert ordered by source) the replica's rows all come before the
// owner's remaining ones. The owner can then continue the replica's partial weight-gradient sum
// over its own rows, and that sum is bit-identical to the one without replication. An expert whose
// first non-empty segment does not fit, or whose replica would take fewer than min_rows rows
// (parallel.replica_min_rows: below that the weight copy costs more than the rows save), is
// skipped; the loop ends when no expert of h can move.
//
// The routing result is untouched: only the rank that computes a (source, expert) segment changes.
#pragma once

#include <cstdint>
#include <vector>

namespace switchyard {

struct ExpertReplica {
  int expert = 0;             // global expert id
  int owner = 0;              // rank holding its weights
  int host = 0;               // rank computing the moved segments with a copy of them
  std::vector<int> sources;   // source ranks whose rows for `expert` go to `host`, ascending
  int64_t rows = 0;           // rows moved
};

struct ReplicationPlan {
  std::vector<ExpertReplica> replicas;
  std::vector<int64_t> rank_loads_before, rank_loads_after;  // [P] rows each rank's experts compute
  // The rank that computes source s's rows for expert e: the owner, or a replica's host.
  int destination(int source, int expert, int experts_per_rank) const;
  int64_t moved_rows() const;
  int64_t max_load_before() const;
  int64_t max_load_after() const;
};

struct ReplicationOptions {
  int max_replicas_per_rank = 1;  // parallel.max_replicas_per_rank; 0 = off
  double tolerance = 0.05;        // stop once the busiest rank is within this of the mean
  int64_t min_rows = 0;           // parallel.replica_min_rows: a replica moving fewer rows is not made
};

// loads: [P][E] row counts (E a multiple of P). SY_CHECK on malformed input.
ReplicationPlan plan_replication(const std::vector<std::vector<int64_t>>& loads, const ReplicationOptions& options);

}  // namespace switchyard
