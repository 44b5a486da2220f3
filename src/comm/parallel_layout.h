// ParallelLayout: which world rank holds which experts and sits in which parallel group, computed
// and checked in one place from (world size W, parallel.ep_size P, moe.num_experts E).
//
//   expert_parallel group g      ranks {g*P, ..., g*P + P-1}        (same r / P); rank r is its r % P
//   expert_data_parallel group s ranks {s, s + P, s + 2P, ...}      (same r % P); rank r is its r / P
//   expert shard of rank r       r % P: experts [(r % P) * E/P, (r % P + 1) * E/P)
//
// So the P ranks of an expert-parallel group hold disjoint shards covering all E experts, and the
// W / P ranks holding the same shard form that shard's expert-data-parallel group. Bootstrap
// builds the communicators from this mapping (src/comm/bootstrap.h), the model places its local
// experts by it, checkpoints name the owner of each expert by it.
//
// The rules (P >= 1, P divides E, P divides W) and their messages live here alone: the config
// checks what it knows when it is read (E and P), the world part once MPI has started.
//
// Nodes (parallel.ranks_per_node = N_r, 0: all ranks on one node). World ranks [n*N_r, (n+1)*N_r)
// share node n. An expert-parallel group inside one node (N_r a multiple of P) exchanges in one
// level; a group over several nodes (N_r < P, N_r dividing P) exchanges hierarchically
// (src/comm/ep_exchange.h): its R = N_r ranks per node form its node groups (ranks r with the same
// r / R inside the group), its ranks at the same place on every node its rail groups (same r % R).
#pragma once

#include <string>

namespace switchyard {

// Where one world rank sits in the layout.
struct RankPlacement {
  int world_rank = 0;
  int ep_group = 0;         // which expert-parallel group: r / P
  int ep_rank = 0;          // rank inside that group: r % P
  int expert_shard = 0;     // which shard of the experts it holds: r % P (= ep_rank)
  int expert_dp_group = 0;  // which expert-data-parallel group: the one of its shard, r % P
  int expert_dp_rank = 0;   // rank inside that group: r / P (= ep_group)
  int first_expert = 0;     // expert_shard * experts_per_rank: its first (global) expert index
};

class ParallelLayout {
 public:
  // Throws SY_BAD_INPUT (naming parallel.ep_size, moe.num_experts and the world size) unless the
  // rules hold. num_experts 0: a layout of ranks only, for users that place no experts
  // (collective benchmarks, group tests); experts_per_rank and first_expert are then 0.
  ParallelLayout(int world_size, int ep_size, int num_experts, int ranks_per_node = 0);

  // Why (world_size, ep_size, num_experts) has no layout, or "" when it has one. world_size 0
  // means not known yet (a config being read): only ep_size and num_experts are checked.
  // num_experts 0: none to place, as above. For SY_CHECKs of numbers already validated elsewhere.
  static std::string problem(int world_size, int ep_size, int num_experts);
  // SY_BAD_INPUT("<origin>: " + problem) when there is a problem; `origin` (a config's file:line,
  // say) may be empty.
  static void check(int world_size, int ep_size, int num_experts, const std::string& origin = "");
  // Why parallel.ranks_per_node does not fit parallel.ep_size (neither divides the other), or "".
  static std::string node_problem(int ep_size, int ranks_per_node);

  int world_size() const { return world_size_; }
  int ep_size() const { return ep_size_; }
  int expert_dp_size() const { return world_size_ / ep_size_; }  // ranks holding each shard
  int num_experts() const { return num_experts_; }
  int experts_per_rank() const { return num_experts_ / ep_size_; }
  // The expert-parallel group's ranks per node (P when the group is inside one node) and its nodes.
  int ep_ranks_per_node() const { return ranks_per_node_ > 0 && ranks_per_node_ < ep_size_ ? ranks_per_node_ : ep_size_; }
  int ep_nodes() const { return ep_size_ / ep_ranks_per_node(); }
  bool hierarchical() const { return ep_nodes() > 1; }

  // SY_CHECK: 0 <= world_rank < world_size.
  RankPlacement placement(int world_rank) const;
  // The world rank at `ep_rank` of expert-parallel group `ep_group`.
  int world_rank_of(int ep_group, int ep_rank) const;
  // The shard (= ep_rank) holding global expert `expert`.
  int shard_of_expert(int expert) const;

 private:
  int world_size_, ep_size_, num_experts_, ranks_per_node_;
};

}  // namespace switchyard
