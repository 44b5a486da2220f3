// The rank -> group -> expert mapping and its rules (parallel_layout.h).
#include "src/comm/parallel_layout.h"

#include "src/core/error.h"

namespace switchyard {

std::string ParallelLayout::problem(int world_size, int ep_size, int num_experts) {
  SY_CHECK(world_size >= 0 && num_experts >= 0, "ParallelLayout: world size ", world_size, ", num_experts ",
           num_experts);
  const bool world_known = world_size > 0;
  const std::string world_text = detail::concat("the world size ", world_size, " (the number of ranks)");
  if (ep_size < 1)
    return detail::concat("parallel.ep_size = ", ep_size, " must be at least 1",
                          world_known ? " and divide " + world_text : std::string());
  if (num_experts > 0 && num_experts % ep_size != 0)
    return detail::concat("parallel.ep_size = ", ep_size, " does not divide moe.num_experts = ", num_experts,
                          ": each of the ", ep_size, " ranks of an expert-parallel group must hold the same number "
                          "of experts");
  if (world_known && world_size % ep_size != 0) {
    const std::string holding =
        num_experts > 0 ? detail::concat(" that each hold all moe.num_experts = ", num_experts, " experts") : "";
    return detail::concat("parallel.ep_size = ", ep_size, " does not divide ", world_text,
                          ": the ranks must split into world / ep_size groups of ", ep_size, " ranks", holding,
                          "; start a multiple of ", ep_size, " ranks or change parallel.ep_size");
  }
  return "";
}

void ParallelLayout::check(int world_size, int ep_size, int num_experts, const std::string& origin) {
  const std::string reason = problem(world_size, ep_size, num_experts);
  if (!reason.empty()) SY_BAD_INPUT(origin.empty() ? reason : origin + ": " + reason);
}

std::string ParallelLayout::node_problem(int ep_size, int ranks_per_node) {
  if (ranks_per_node < 0) return detail::concat("parallel.ranks_per_node = ", ranks_per_node, " must be >= 0");
  if (ranks_per_node == 0 || ep_size < 1) return "";
  if (ranks_per_node % ep_size == 0 || ep_size % ranks_per_node == 0) return "";
  return detail::concat("parallel.ranks_per_node = ", ranks_per_node, " and parallel.ep_size = ", ep_size,
                        ": one must divide the other, so that an expert-parallel group is either inside one node "
                        "or made of whole nodes");
}

ParallelLayout::ParallelLayout(int world_size, int ep_size, int num_experts, int ranks_per_node)
    : world_size_(world_size), ep_size_(ep_size), num_experts_(num_experts), ranks_per_node_(ranks_per_node) {
  check(world_size, ep_size, num_experts);  // before the world check: ep_size 0 is the user's error
  const std::string nodes = node_problem(ep_size, ranks_per_node);
  if (!nodes.empty()) SY_BAD_INPUT(nodes);
  SY_CHECK(world_size >= 1, "ParallelLayout: world size ", world_size);
}

RankPlacement ParallelLayout::placement(int world_rank) const {
  SY_CHECK(world_rank >= 0 && world_rank < world_size_, "ParallelLayout: rank ", world_rank, " of ", world_size_);
  RankPlacement placement;
  placement.world_rank = world_rank;
  placement.ep_group = world_rank / ep_size_;
  placement.ep_rank = world_rank % ep_size_;
  placement.expert_shard = placement.ep_rank;
  placement.expert_dp_group = placement.expert_shard;
  placement.expert_dp_rank = placement.ep_group;
  placement.first_expert = placement.expert_shard * experts_per_rank();
  return placement;
}

int ParallelLayout::world_rank_of(int ep_group, int ep_rank) const {
  SY_CHECK(ep_group >= 0 && ep_group < expert_dp_size() && ep_rank >= 0 && ep_rank < ep_size_,
           "ParallelLayout: expert-parallel group ", ep_group, " rank ", ep_rank, " with world ", world_size_,
           ", ep_size ", ep_size_);
  return ep_group * ep_size_ + ep_rank;
}

int ParallelLayout::shard_of_expert(int expert) const {
  SY_CHECK(expert >= 0 && expert < num_experts_, "ParallelLayout: expert ", expert, " of ", num_experts_);
  return expert / experts_per_rank();
}

}  // namespace switchyard
