// Expert-choice routing on CUDA (semantics: src/ops/moe_ops.h; CPU reference src/ops/cpu/expert_choice.cpp).
#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace cuda {

void route_expert_choice(const Tensor&, const RoutingInputs&, const RoutingParams& params, RoutingResult&, void*) {
  validate_routing_params(params);
  SY_BAD_INPUT("route: expert-choice routing is not in this build yet");
}

}  // namespace cuda
}  // namespace switchyard
