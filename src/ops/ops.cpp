// What src/ops/ops.h defines besides the dispatch (src/ops/dispatch_*.cpp): RoutingBuffers.
#include "src/ops/ops.h"

namespace switchyard {

RoutingBuffers::RoutingBuffers(DeviceKind device, DType float_dtype, int64_t max_tokens, int num_experts, int k_max,
                               int64_t max_rows, int64_t max_sequences)
    : device_(device), float_dtype_(float_dtype), max_tokens_(max_tokens), max_rows_(max_rows),
      max_sequences_(max_sequences), num_experts_(num_experts), k_max_(k_max) {
  SY_CHECK(max_sequences >= 1, "RoutingBuffers: max_sequences must be >= 1, got ", max_sequences);
  SY_CHECK(max_tokens >= 0 && num_experts >= 1 && k_max >= 1 && max_rows >= 0,
           "RoutingBuffers: bad sizes (max_tokens ", max_tokens, ", experts ", num_experts, ", k_max ", k_max,
           ", max_rows ", max_rows, ")");
  const size_t int_size = sizeof(int32_t), float_size = dtype_size(float_dtype);
  const size_t choices = size_t(max_tokens) * size_t(k_max);
  expert_ids_ = Buffer(device, choices * int_size);
  gates_ = Buffer(device, choices * float_size);
  slots_ = Buffer(device, choices * int_size);
  token_k_ = Buffer(device, size_t(max_tokens) * int_size);
  logsumexp_ = Buffer(device, size_t(max_tokens) * float_size);
  expert_counts_ = Buffer(device, size_t(num_experts) * int_size);
  first_choice_counts_ = Buffer(device, size_t(num_experts) * int_size);
  prob_sums_ = Buffer(device, size_t(num_experts) * float_size);
  expert_offsets_ = Buffer(device, size_t(num_experts + 1) * int_size);
  scalars_ = Buffer(device, size_t(kNumRoutingScalars) * int_size);
  losses_ = Buffer(device, size_t(kNumRoutingLosses) * float_size);
  choice_rows_ = Buffer(device, choices * int_size);
  row_tokens_ = Buffer(device, size_t(max_rows) * int_size);
  sequence_fractions_ = Buffer(device, size_t(max_sequences) * size_t(num_experts) * float_size);
}

RoutingResult RoutingBuffers::result(int64_t num_tokens) const {
  SY_CHECK(num_tokens >= 0 && num_tokens <= max_tokens_, "RoutingBuffers: ", num_tokens,
           " tokens exceed the allocated ", max_tokens_);
  RoutingResult result;
  result.expert_ids = expert_ids_.view(DType::i32, {num_tokens, k_max_});
  result.gates = gates_.view(float_dtype_, {num_tokens, k_max_});
  result.slots = slots_.view(DType::i32, {num_tokens, k_max_});
  result.token_k = token_k_.view(DType::i32, {num_tokens});
  result.logsumexp = logsumexp_.view(float_dtype_, {num_tokens});
  result.expert_counts = expert_counts_.view(DType::i32, {num_experts_});
  result.first_choice_counts = first_choice_counts_.view(DType::i32, {num_experts_});
  result.prob_sums = prob_sums_.view(float_dtype_, {num_experts_});
  result.expert_offsets = expert_offsets_.view(DType::i32, {num_experts_ + 1});
  result.scalars = scalars_.view(DType::i32, {kNumRoutingScalars});
  result.losses = losses_.view(float_dtype_, {kNumRoutingLosses});
  result.sequence_fractions = sequence_fractions_.view(float_dtype_, {max_sequences_, num_experts_});
  return result;
}

DispatchMap RoutingBuffers::map(int64_t num_tokens, int64_t rows) const {
  SY_CHECK(num_tokens >= 0 && num_tokens <= max_tokens_ && rows >= 0 && rows <= max_rows_, "RoutingBuffers: map for ",
           num_tokens, " tokens and ", rows, " rows exceeds the allocated ", max_tokens_, " and ", max_rows_);
  DispatchMap map;
  map.choice_rows = choice_rows_.view(DType::i32, {num_tokens, k_max_});
  map.row_tokens = row_tokens_.view(DType::i32, {rows});
  return map;
}

}  // namespace switchyard
