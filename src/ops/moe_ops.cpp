// Host-side rules shared by both backends: routing parameter validation and the worst-case size
// of the padded expert-contiguous layout (src/ops/moe_ops.h).
//
// Bound: expert e keeps kept_e = min(count_e, capacity) rows, rounded up to the alignment A.
// With N = num_tokens * k_max choices at most (complexity routing only lowers it):
//   sum_e roundup(kept_e, A) <= N + min(E, N) * (A - 1), and it is a multiple of A;
//   sum_e roundup(kept_e, A) <= E * roundup(capacity(N), A)   (capacity grows with N).
// The smaller of the two is the bound; it needs nothing the host does not already know.
#include <algorithm>
#include <limits>
#include <utility>

#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {

namespace {
int64_t unchecked_padded_rows_upper_bound(const RoutingParams& params) {
  const int64_t max_choices = params.num_tokens * params.k_max;
  if (max_choices == 0) return 0;
  const int64_t alignment = params.segment_alignment;
  const int64_t experts = params.num_experts;
  const int64_t nonempty_experts = std::min(experts, max_choices);
  int64_t bound = (max_choices + nonempty_experts * (alignment - 1)) / alignment * alignment;
  if (!params.dropless) {
    const int64_t capacity = expert_capacity(params, max_choices);
    bound = std::min(bound, experts * round_up(capacity, alignment));
  }
  return bound;
}
}  // namespace

void validate_routing_params(const RoutingParams& params) {
  SY_CHECK_INPUT(params.num_tokens >= 0, "routing: num_tokens must be >= 0, got ", params.num_tokens);
  SY_CHECK_INPUT(params.num_experts >= 1, "routing: num_experts must be >= 1, got ", params.num_experts);
  SY_CHECK_INPUT(params.k_max >= 1 && params.k_max <= kMaxTopK, "routing: k_max must be in [1, ", kMaxTopK, "], got ",
                 params.k_max);
  SY_CHECK_INPUT(params.k_max <= params.num_experts, "routing: k_max (", params.k_max,
                 ") must not exceed num_experts (", params.num_experts, ")");
  if (params.complexity != ComplexityMode::none)
    SY_CHECK_INPUT(params.k_min >= 1 && params.k_min <= params.k_max, "routing: k_min must be in [1, k_max=",
                   params.k_max, "] with complexity routing, got ", params.k_min);
  if (!params.dropless)
    SY_CHECK_INPUT(params.capacity_factor > 0.0f && std::isfinite(params.capacity_factor),
                   "routing: capacity_factor must be a positive number, got ", params.capacity_factor);
  SY_CHECK_INPUT(params.segment_alignment >= 1, "routing: segment_alignment must be >= 1, got ",
                 params.segment_alignment);
  const int64_t int32_max = std::numeric_limits<int32_t>::max();
  SY_CHECK_INPUT(params.num_tokens <= int32_max / params.k_max, "routing: num_tokens * k_max (", params.num_tokens,
                 " * ", params.k_max, ") does not fit int32 indices");
  // Without capacity the padding term alone may overflow int32 for huge E * alignment.
  SY_CHECK_INPUT(int64_t(params.num_experts) * params.segment_alignment <= int32_max,
                 "routing: num_experts * segment_alignment does not fit int32");
  SY_CHECK_INPUT(unchecked_padded_rows_upper_bound(params) <= int32_max,
                 "routing: the padded expert layout would exceed int32 rows");
  SY_CHECK_INPUT(params.routed_scaling_factor > 0.0f && std::isfinite(params.routed_scaling_factor),
                 "routing: routed_scaling_factor must be a positive number, got ", params.routed_scaling_factor);
  SY_CHECK_INPUT(params.num_groups >= 1 && params.num_experts % params.num_groups == 0,
                 "routing: num_groups (", params.num_groups, ") must be >= 1 and divide num_experts (",
                 params.num_experts, ")");
  SY_CHECK_INPUT(params.topk_groups >= 1 && params.topk_groups <= params.num_groups, "routing: topk_groups (",
                 params.topk_groups, ") must be in [1, num_groups=", params.num_groups, "]");
  SY_CHECK_INPUT(params.k_max <= params.topk_groups * (params.num_experts / params.num_groups), "routing: k_max (",
                 params.k_max, ") exceeds the experts of topk_groups groups (", params.topk_groups, " x ",
                 params.num_experts / params.num_groups, ")");
  SY_CHECK_INPUT(params.tokens_per_sequence >= 0, "routing: tokens_per_sequence must be >= 0, got ",
                 params.tokens_per_sequence);
  for (const auto& [name, weight] : {std::pair<const char*, float>{"aux_loss_weight", params.aux_loss_weight},
                                     {"z_loss_weight", params.z_loss_weight},
                                     {"seq_aux_loss_weight", params.seq_aux_loss_weight},
                                     {"global_aux_loss_weight", params.global_aux_loss_weight}})
    SY_CHECK_INPUT(weight >= 0.0f && std::isfinite(weight), "routing: ", name, " must be >= 0, got ", weight);
  if (params.method == RoutingMethod::expert_choice) {
    SY_CHECK_INPUT(params.complexity == ComplexityMode::none,
                   "routing: expert choice takes no complexity routing (each expert picks its tokens)");
    SY_CHECK_INPUT(params.num_groups == 1, "routing: expert choice takes no group-limited routing");
    SY_CHECK_INPUT(!params.dropless, "routing: expert choice needs a capacity (dropless is not defined for it)");
    SY_CHECK_INPUT(params.drop_policy == DropPolicy::position,
                   "routing: expert choice has its own drop rule (drop_policy must be position)");
    SY_CHECK_INPUT(params.seq_aux_loss_weight == 0.0f,
                   "routing: expert choice is balanced by construction; it takes no sequence-level loss");
  }
}

int64_t padded_rows_upper_bound(const RoutingParams& params) {
  validate_routing_params(params);
  return unchecked_padded_rows_upper_bound(params);
}

}  // namespace switchyard
