// CPU reference of expert-choice routing (semantics: src/ops/moe_ops.h).
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace cpu {

void route_expert_choice(const Tensor&, const RoutingInputs&, const RoutingParams& params, RoutingResult&) {
  validate_routing_params(params);
  SY_BAD_INPUT("route: expert-choice routing is not in this build yet");
}

}  // namespace cpu
}  // namespace switchyard
