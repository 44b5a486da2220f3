// Cross-field checks of the modern routing keys of the `moe:` section (src/ops/moe_ops.h, "The
// modern options"): the rules validate_routing_params (src/ops/moe_ops.cpp) enforces at the first
// forward, checked when the config is read so that the message names the keys and where they were
// given, plus the one rule of the model layer: the router bias (aux-loss-free balancing) belongs
// to token choice.
#include <initializer_list>
#include <string>

#include "src/core/error.h"
#include "src/train/config.h"

namespace switchyard {
namespace {

// The location of the first of `paths` that was given (where() returns the file alone for a key
// that was not): a derived key's message points at the key the user wrote.
std::string first_given(const Config& config, const std::function<std::string(const std::string&)>& where,
                        std::initializer_list<const char*> paths) {
  for (const char* path : paths) {
    const std::string origin = where(path);
    if (origin != config.source) return origin;
  }
  return where(*paths.begin());
}

}  // namespace

void check_routing_consistency(const Config& config, const std::function<std::string(const std::string&)>& where) {
  const MoeConfig& moe = config.moe;
  if (moe.num_experts % moe.num_groups != 0)
    SY_BAD_INPUT(where("moe.num_groups"), ": moe.num_groups = ", moe.num_groups, " does not divide moe.num_experts = ",
                 moe.num_experts, " (groups are equal runs of consecutive experts)");
  if (moe.topk_groups > moe.num_groups)
    SY_BAD_INPUT(first_given(config, where, {"moe.topk_groups", "moe.num_groups"}), ": moe.topk_groups = ",
                 moe.topk_groups, " exceeds moe.num_groups = ", moe.num_groups);
  const int group_size = moe.num_experts / moe.num_groups;
  if (moe.top_k > moe.topk_groups * group_size)
    SY_BAD_INPUT(first_given(config, where, {"moe.topk_groups", "moe.num_groups", "moe.top_k"}), ": moe.top_k = ",
                 moe.top_k, " does not fit in moe.topk_groups = ", moe.topk_groups, " group(s) of ", group_size,
                 " experts (moe.num_experts / moe.num_groups = ", moe.num_experts, " / ", moe.num_groups, ")");
  if (moe.routing != RoutingMethod::expert_choice) return;
  // Expert choice: each expert takes its highest-scored tokens up to its capacity.
  const std::string at = where("moe.routing");
  if (moe.complexity != ComplexityMode::none)
    SY_BAD_INPUT(at, ": moe.routing = expert_choice takes no complexity routing (moe.complexity = ",
                 complexity_mode_name(moe.complexity), "): each expert picks its tokens, not the other way round");
  if (moe.num_groups != 1)
    SY_BAD_INPUT(at, ": moe.routing = expert_choice takes no group-limited routing (moe.num_groups = ",
                 moe.num_groups, ", must be 1)");
  if (moe.dropless)
    SY_BAD_INPUT(at, ": moe.routing = expert_choice needs a capacity (moe.dropless = true is not defined for it; "
                 "moe.capacity_factor sets it)");
  if (moe.drop_policy != DropPolicy::position)
    SY_BAD_INPUT(at, ": moe.routing = expert_choice has its own drop rule (moe.drop_policy = ",
                 drop_policy_name(moe.drop_policy), ", must be position)");
  if (moe.seq_aux_loss_weight > 0.0)
    SY_BAD_INPUT(at, ": moe.routing = expert_choice is balanced by construction; it takes no sequence-level loss "
                 "(moe.seq_aux_loss_weight = ", moe.seq_aux_loss_weight, ", must be 0)");
  if (moe.bias_update_rate > 0.0)
    SY_BAD_INPUT(at, ": moe.routing = expert_choice takes no router bias (moe.bias_update_rate = ",
                 moe.bias_update_rate, ", must be 0: aux-loss-free balancing steers the tokens' choices)");
}

}  // namespace switchyard
