// Names of the model configuration's enums (src/model/config.h), as YAML spells them.
#include "src/model/config.h"

namespace switchyard {

const char* norm_kind_name(NormKind kind) { return kind == NormKind::layernorm ? "layernorm" : "rmsnorm"; }
const char* position_kind_name(PositionKind kind) { return kind == PositionKind::learned ? "learned" : "rotary"; }
const char* expert_activation_name(ExpertActivation activation) {
  return activation == ExpertActivation::gelu_tanh ? "gelu" : "swiglu";
}
const char* complexity_mode_name(ComplexityMode mode) {
  switch (mode) {
    case ComplexityMode::none: return "none";
    case ComplexityMode::given: return "given";
    case ComplexityMode::entropy: return "entropy";
  }
  return "?";
}
const char* expert_compute_mode_name(ExpertComputeMode mode) {
  return mode == ExpertComputeMode::sparse ? "sparse" : "dense";
}
const char* routing_method_name(RoutingMethod method) {
  return method == RoutingMethod::token_choice ? "token_choice" : "expert_choice";
}
const char* score_function_name(ScoreFunction function) {
  return function == ScoreFunction::softmax ? "softmax" : "sigmoid";
}
const char* drop_policy_name(DropPolicy policy) { return policy == DropPolicy::position ? "position" : "probability"; }
const char* recompute_mode_name(RecomputeMode mode) {
  switch (mode) {
    case RecomputeMode::none: return "none";
    case RecomputeMode::moe: return "moe";
    case RecomputeMode::attention: return "attention";
    case RecomputeMode::all: return "all";
  }
  return "?";
}
const char* compute_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::bf16: return "bf16";
    case DType::f16: return "fp16";
    case DType::f32: return "fp32";
    default: return "?";
  }
}

}  // namespace switchyard
