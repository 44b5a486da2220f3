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
}

int64_t padded_rows_upper_bound(const RoutingParams& params) {
  validate_routing_params(params);
  return unchecked_padded_rows_upper_bound(params);
}

}  // namespace switchyard
