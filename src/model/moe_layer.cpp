// The MoE layer's forward and backward (math and memory: src/model/moe_layer.h).
#include "src/model/moe_layer.h"
#include "src/model/moe_shape_checks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "src/ops/small_batch_ops.h"
#include "src/core/switches.h"

namespace switchyard {

namespace {

bool is_host_reference_dtype(DType dtype) { return dtype == DType::f32 || dtype == DType::f64; }

}  // namespace

// ---- Construction ----------------------------------------------------------------------------

MoeLayer::MoeLayer(const MoeLayerConfig& config, DeviceKind device, DType activation_dtype, int64_t max_tokens,
                   std::shared_ptr<MoeLayerMemory> memory)
    : config_(config), device_(device), activation_dtype_(activation_dtype),
      memory_(memory ? std::move(memory) : std::make_shared<MoeLayerMemory>(device)) {
  SY_CHECK(memory_->device() == device, "MoeLayer: its memory is on ", device_kind_name(memory_->device()),
           ", the layer on ", device_kind_name(device));
  config_.validate();
  SY_CHECK_INPUT(max_tokens >= 1, "MoeLayer: max_tokens must be >= 1, got ", max_tokens);
  if (device == DeviceKind::cpu) {
    SY_CHECK_INPUT(is_host_reference_dtype(activation_dtype), "MoeLayer on cpu computes in f32 or f64, not ",
                   dtype_name(activation_dtype));
    gradient_dtype_ = activation_dtype;
  } else {
    SY_CHECK_INPUT(activation_dtype == DType::bf16 || activation_dtype == DType::f16,
                   "MoeLayer on cuda takes bf16 or f16 activations, not ", dtype_name(activation_dtype));
    gradient_dtype_ = DType::f32;
  }
  max_tokens_ = max_tokens;
  const int64_t experts = config_.moe.num_experts, d_model = config_.d_model;
  if (config_.moe.compute_mode == ExpertComputeMode::dense) {
    max_rows_ = experts * round_up(max_tokens, config_.moe.segment_alignment);
  } else {
    max_rows_ = std::max(padded_rows_upper_bound(config_.routing_params(max_tokens, true)),
                         padded_rows_upper_bound(config_.routing_params(max_tokens, false)));
  }
  router_ = MoeRouter(config_, device, activation_dtype, max_tokens, config_.moe.segment_alignment, max_rows_,
                      memory_);

  const size_t activation_size = dtype_size(activation_dtype_);
  const size_t tokens = size_t(max_tokens), rows = size_t(max_rows_);
  memory_->reserve(MoeBufferSlot::permuted, rows * size_t(d_model) * activation_size);
  memory_->reserve(MoeBufferSlot::hidden_pre, rows * size_t(config_.w1_columns()) * activation_size);
  memory_->reserve(MoeBufferSlot::hidden_post, rows * size_t(config_.moe.expert_d_ff) * activation_size);
  memory_->reserve(MoeBufferSlot::expert_out, rows * size_t(d_model) * activation_size);
  if (device == DeviceKind::cuda && config_.moe.compute_mode == ExpertComputeMode::sparse) {
    const int64_t threshold = std::min({switches().small_batch_tokens, max_tokens,
                                        kSmallBatchMaxChoices / int64_t(config_.moe.top_k)});
    if (threshold >= 1 && small_batch_supported(activation_dtype_, threshold, config_.moe.top_k, config_.moe.num_experts,
                                                d_model, config_.moe.expert_d_ff)) {
      small_batch_tokens_ = threshold;
      small_batch_workspace_ =
          Buffer(device, small_batch_workspace_bytes(threshold, config_.moe.top_k, config_.moe.num_experts, d_model,
                                                     config_.moe.expert_d_ff, config_.moe.activation, activation_size));
    }
  }
  if (config_.moe.compute_mode == ExpertComputeMode::dense) {
    dense_offsets_ = Buffer(device, size_t(experts + 1) * sizeof(int32_t));
    dense_counts_ = Buffer(device, size_t(experts) * sizeof(int32_t));
    dense_scalars_ = Buffer(device, size_t(kNumRoutingScalars) * sizeof(int32_t));
    host_counts_.resize(size_t(experts));
    host_scalars_.resize(size_t(kNumRoutingScalars));
    host_expert_ids_.resize(tokens * size_t(config_.moe.top_k));
    host_slots_.resize(tokens * size_t(config_.moe.top_k));
    host_choice_rows_.resize(tokens * size_t(config_.moe.top_k));
    host_row_tokens_.resize(rows);
    host_offsets_.resize(size_t(experts + 1));
  }
}

void MoeLayer::allocate_backward_buffers() {
  if (backward_ready_) return;
  const size_t activation_size = dtype_size(activation_dtype_), rows = size_t(max_rows_);
  memory_->reserve(MoeBufferSlot::grad_rows, rows * size_t(config_.d_model) * activation_size);
  memory_->reserve(MoeBufferSlot::grad_hidden_pre, rows * size_t(config_.w1_columns()) * activation_size);
  backward_ready_ = true;
}

bool MoeLayer::takes_small_batch(int64_t tokens, const MoeForwardArgs& args) const {
  return device_ == DeviceKind::cuda && config_.moe.compute_mode == ExpertComputeMode::sparse && !args.for_backward &&
         tokens <= small_batch_tokens_;
}

bool MoeLayer::fuses_activation(const ExecContext& context) const {
  return ops::fuses_expert_activation(context, config_.moe.activation, activation_dtype_, config_.d_model,
                                      config_.moe.expert_d_ff, config_.moe.segment_alignment);
}

const Tensor* MoeLayer::padding_marks() const {
  return config_.moe.compute_mode == ExpertComputeMode::sparse ? &map_.row_tokens : nullptr;
}

Tensor MoeLayer::rows_view(const Buffer& buffer, DType dtype, int64_t rows, int64_t columns) const {
  return buffer.view(dtype, {rows, columns});
}

Tensor MoeLayer::rows_view(MoeBufferSlot slot, int64_t rows, int64_t columns) const {
  return rows_view(memory_->at(slot), activation_dtype_, rows, columns);
}

void MoeLayer::check_weights(const MoeWeights& weights, DType dtype, const char* what) const {
  expect_moe_weights("MoeLayer", config_, config_.moe.num_experts, weights, dtype, device_, what);
}

// ---- Forward ---------------------------------------------------------------------------------

MoeLosses MoeLayer::forward(const ExecContext& context, const Tensor& x, const MoeWeights& weights,
                            const MoeForwardArgs& args, Tensor& y) {
  const int64_t tokens =
      expect_moe_forward_io("MoeLayer", context, device_, x, y, config_.d_model, activation_dtype_, max_tokens_);
  const int64_t d_model = config_.d_model;
  check_weights(weights, activation_dtype_, "weights");
  has_forward_ = false;  // until this pass completes

  tokens_ = tokens;
  const RoutingResult& routing = router_.forward(context, x, weights.router, weights.router_bias, args, observer_);
  const RoutingParams& params = router_.params();

  small_batch_forward_ = takes_small_batch(tokens, args);
  if (small_batch_forward_) {
    // Experts and combine straight from the routing: no expert-row layout (rows() 0, empty map).
    rows_ = 0;
    map_ = DispatchMap{};
    expert_offsets_ = routing.expert_offsets;
    combine_routing_ = routing;
    Tensor workspace = small_batch_workspace_.view(DType::u8, {int64_t(small_batch_workspace_.bytes())});
    run_stage(context, "small-batch experts", [&] {
      ops::small_batch_experts(context, config_.moe.activation, x, routing, weights.w1, weights.w2, workspace, y);
    });
    return finish_forward(context, x, args);
  }

  // Tokens into the expert-contiguous layout.
  if (config_.moe.compute_mode == ExpertComputeMode::sparse) {
    rows_ = padded_rows_upper_bound(params);
    SY_CHECK(rows_ <= max_rows_, "MoeLayer: ", rows_, " rows exceed the ", max_rows_, " allocated");
    map_ = router_.dispatch_map(rows_);
    Tensor permuted = rows_view(MoeBufferSlot::permuted, rows_, d_model);
    run_stage(context, "permute", [&] { ops::permute(context, x, routing, params, permuted, map_); });
    expert_offsets_ = routing.expert_offsets;
    combine_routing_ = routing;
  } else {
    run_stage(context, "dense layout", [&] { build_dense_layout(context, x); });
  }

  // Experts.
  Tensor permuted = rows_view(MoeBufferSlot::permuted, rows_, d_model);
  Tensor hidden_pre = rows_view(MoeBufferSlot::hidden_pre, rows_, config_.w1_columns());
  Tensor hidden_post = rows_view(MoeBufferSlot::hidden_post, rows_, config_.moe.expert_d_ff);
  Tensor expert_out = rows_view(MoeBufferSlot::expert_out, rows_, d_model);
  const int alignment = params.segment_alignment;
  const Tensor* padding = padding_marks();
  if (fuses_activation(context)) {  // one kernel writes H and A = act(H)
    run_stage(context, "expert GEMM 1", expert_gemm_flops(1), [&] {
      ops::grouped_gemm_activation(context, config_.moe.activation, permuted, weights.w1, expert_offsets_, hidden_pre,
                                   hidden_post, args.for_backward, alignment, padding);
    });
  } else {
    run_stage(context, "expert GEMM 1", expert_gemm_flops(1), [&] {
      ops::grouped_gemm(context, permuted, weights.w1, false, expert_offsets_, hidden_pre, alignment, padding);
    });
    run_stage(context, "activation",
              [&] { ops::activation_forward(context, config_.moe.activation, hidden_pre, hidden_post); });
  }
  run_stage(context, "expert GEMM 2", expert_gemm_flops(2), [&] {
    ops::grouped_gemm(context, hidden_post, weights.w2, false, expert_offsets_, expert_out, alignment, padding);
  });
  run_stage(context, "combine", [&] { ops::unpermute_combine(context, expert_out, combine_routing_, map_, y); });
  return finish_forward(context, x, args);
}

double MoeLayer::expert_gemm_flops(int gemm) const {
  const int64_t rows = config_.moe.compute_mode == ExpertComputeMode::sparse
                           ? tokens_ * config_.moe.top_k
                           : tokens_ * config_.moe.num_experts;
  return gemm == 1 ? matmul_flops(rows, config_.d_model, config_.w1_columns())
                   : matmul_flops(rows, config_.moe.expert_d_ff, config_.d_model);
}

MoeLosses MoeLayer::finish_forward(const ExecContext& context, const Tensor& x, const MoeForwardArgs& args) {
  x_ = x;
  has_forward_ = true;
  forward_for_backward_ = args.for_backward;
  MoeLosses losses;
  if (args.read_losses) run_stage(context, "read losses", [&] { losses = read_losses(context); });
  return losses;
}

// Dense layout: segment e = rows [e * T_pad, e * T_pad + T) hold every token, the rest of the
// segment is zero padding. A choice (t, j) that routing kept maps to row e_j * T_pad + t; every
// other row is unreferenced (token -1), so the combine and its backward mask them out exactly as
// sparse mode never computes them. The combine ops get combine_routing_: the routing decisions
// with layout tensors describing this layout as padding-free (counts T_pad, capacity unlimited);
// backward clears the unreferenced gradient rows itself.
void MoeLayer::build_dense_layout(const ExecContext& context, const Tensor& x) {
  const int64_t tokens = x.dim(0), d_model = config_.d_model, experts = config_.moe.num_experts, k = config_.moe.top_k;
  const RoutingResult& routing = router_.routing();
  const int64_t padded_tokens = round_up(tokens, config_.moe.segment_alignment);
  rows_ = experts * padded_tokens;
  SY_CHECK(rows_ <= max_rows_, "MoeLayer: ", rows_, " dense rows exceed the ", max_rows_, " allocated");

  const size_t row_bytes = size_t(d_model) * dtype_size(activation_dtype_);
  char* permuted_base = static_cast<char*>(memory_->at(MoeBufferSlot::permuted).data());
  for (int64_t expert = 0; expert < experts; ++expert) {
    char* segment_base = permuted_base + size_t(expert * padded_tokens) * row_bytes;
    Tensor segment(segment_base, activation_dtype_, device_, {tokens, d_model});
    ops::copy(context, x, segment);
    if (padded_tokens > tokens) {
      Tensor padding(segment_base + size_t(tokens) * row_bytes, activation_dtype_, device_,
                     {padded_tokens - tokens, d_model});
      ops::fill_zero(context, padding);
    }
  }
  for (int64_t expert = 0; expert <= experts; ++expert) host_offsets_[size_t(expert)] = int32_t(expert * padded_tokens);
  Tensor host_offsets(host_offsets_.data(), DType::i32, DeviceKind::cpu, {experts + 1});
  expert_offsets_ = dense_offsets_.view(DType::i32, {experts + 1});
  ops::copy(context, host_offsets, expert_offsets_);
  std::fill(host_counts_.begin(), host_counts_.end(), int32_t(padded_tokens));
  Tensor host_counts(host_counts_.data(), DType::i32, DeviceKind::cpu, {experts});
  combine_routing_ = routing;
  combine_routing_.expert_offsets = expert_offsets_;
  combine_routing_.expert_counts = dense_counts_.view(DType::i32, {experts});
  combine_routing_.scalars = dense_scalars_.view(DType::i32, {kNumRoutingScalars});
  ops::copy(context, host_counts, combine_routing_.expert_counts);

  // The row map needs the routing decisions on the host (copies to the host synchronize).
  Tensor host_ids(host_expert_ids_.data(), DType::i32, DeviceKind::cpu, {tokens, k});
  Tensor host_slots(host_slots_.data(), DType::i32, DeviceKind::cpu, {tokens, k});
  int32_t scalars[kNumRoutingScalars] = {};
  Tensor host_scalars(scalars, DType::i32, DeviceKind::cpu, {kNumRoutingScalars});
  ops::copy(context, routing.expert_ids, host_ids);
  ops::copy(context, routing.slots, host_slots);
  ops::copy(context, routing.scalars, host_scalars);
  const int64_t capacity = scalars[kCapacity];
  host_scalars_[kCapacity] = std::numeric_limits<int32_t>::max();
  host_scalars_[kTotalChoices] = scalars[kTotalChoices];
  host_scalars_[kDroppedChoices] = scalars[kDroppedChoices];
  host_scalars_[kPaddedRows] = int32_t(rows_);
  Tensor host_dense_scalars(host_scalars_.data(), DType::i32, DeviceKind::cpu, {kNumRoutingScalars});
  ops::copy(context, host_dense_scalars, combine_routing_.scalars);
  std::fill(host_row_tokens_.begin(), host_row_tokens_.begin() + rows_, -1);
  for (int64_t token = 0; token < tokens; ++token) {
    for (int64_t choice = 0; choice < k; ++choice) {
      const size_t index = size_t(token * k + choice);
      const int64_t expert = host_expert_ids_[index], slot = host_slots_[index];
      const bool kept = expert >= 0 && slot >= 0 && slot < capacity;
      const int64_t row = kept ? expert * padded_tokens + token : -1;
      host_choice_rows_[index] = int32_t(row);
      if (kept) host_row_tokens_[size_t(row)] = int32_t(token);
    }
  }
  map_ = router_.dispatch_map(rows_);
  Tensor host_choice_rows(host_choice_rows_.data(), DType::i32, DeviceKind::cpu, {tokens, k});
  Tensor host_row_tokens(host_row_tokens_.data(), DType::i32, DeviceKind::cpu, {rows_});
  ops::copy(context, host_choice_rows, map_.choice_rows);
  ops::copy(context, host_row_tokens, map_.row_tokens);
}

// ---- Backward --------------------------------------------------------------------------------

void MoeLayer::backward(const ExecContext& context, const Tensor& grad_y, const MoeWeights& weights,
                        float aux_grad_scale, float z_grad_scale, Tensor& grad_x, MoeGradients& gradients) {
  SY_CHECK(has_forward_, "MoeLayer::backward: no completed forward to differentiate");
  SY_CHECK(forward_for_backward_, "MoeLayer::backward: the last forward ran with for_backward = false (inference), "
           "so it did not keep what backward needs");
  SY_CHECK(context.device == device_, "MoeLayer::backward: context is on ", device_kind_name(context.device),
           ", the layer on ", device_kind_name(device_));
  const int64_t tokens = tokens_, d_model = config_.d_model;
  expect_moe_tensor("MoeLayer", "grad_y", grad_y, activation_dtype_, device_, {tokens, d_model});
  expect_moe_tensor("MoeLayer", "grad_x", grad_x, activation_dtype_, device_, {tokens, d_model});
  check_weights(weights, activation_dtype_, "weights");
  MoeWeights gradient_view{gradients.router, gradients.w1, gradients.w2};
  check_weights(gradient_view, gradient_dtype_, "gradients");
  allocate_backward_buffers();

  const Tensor permuted = rows_view(MoeBufferSlot::permuted, rows_, d_model);
  const Tensor hidden_pre = rows_view(MoeBufferSlot::hidden_pre, rows_, config_.w1_columns());
  const Tensor hidden_post = rows_view(MoeBufferSlot::hidden_post, rows_, config_.moe.expert_d_ff);
  const Tensor expert_out = rows_view(MoeBufferSlot::expert_out, rows_, d_model);
  // grad_rows holds dL/d expert_out first, then dL/d permuted (the first is dead by then).
  Tensor grad_rows = rows_view(MoeBufferSlot::grad_rows, rows_, d_model);
  Tensor grad_hidden_pre = rows_view(MoeBufferSlot::grad_hidden_pre, rows_, config_.w1_columns());
  Tensor grad_gates = router_.grad_gates();
  const int alignment = router_.params().segment_alignment;
  const Tensor* padding = padding_marks();

  // Combine -> expert rows and gates; experts; permutation back to tokens. The combine backward
  // writes every row of grad_rows: the gradient where a kept choice refers to the row, zero where
  // none does (segment padding, and in dense mode the tokens routing did not send there).
  run_stage(context, "combine backward", [&] {
    ops::unpermute_combine_backward(context, grad_y, expert_out, combine_routing_, map_, grad_rows, grad_gates);
  });
  run_stage(context, "weight grad 2", expert_gemm_flops(2), [&] {
    ops::grouped_gemm_weight_grad(context, hidden_post, grad_rows, expert_offsets_, gradients.w2, alignment, padding,
                                  gradients.accumulate);
  });
  if (fuses_activation(context)) {
    // One kernel: dL/dH = act'(H) * (dL/dO W2^T). Its dL/dA scratch, written only were it to run
    // unfused after all, is A itself: dead once weight grad 2 has read it (the EP layer does so too).
    Tensor grad_hidden_post_scratch = rows_view(MoeBufferSlot::hidden_post, rows_, config_.moe.expert_d_ff);
    run_stage(context, "data grad 2", expert_gemm_flops(2), [&] {
      ops::grouped_gemm_activation_backward(context, config_.moe.activation, grad_rows, weights.w2, expert_offsets_,
                                            hidden_pre, grad_hidden_post_scratch, grad_hidden_pre, alignment,
                                            padding);
    });
  } else {
    memory_->reserve(MoeBufferSlot::grad_hidden_post,
                     size_t(max_rows_) * size_t(config_.moe.expert_d_ff) * dtype_size(activation_dtype_));
    Tensor grad_hidden_post = rows_view(MoeBufferSlot::grad_hidden_post, rows_, config_.moe.expert_d_ff);
    run_stage(context, "data grad 2", expert_gemm_flops(2), [&] {
      ops::grouped_gemm(context, grad_rows, weights.w2, true, expert_offsets_, grad_hidden_post, alignment, padding);
    });
    run_stage(context, "activation backward", [&] {
      ops::activation_backward(context, config_.moe.activation, hidden_pre, grad_hidden_post, grad_hidden_pre);
    });
  }
  run_stage(context, "weight grad 1", expert_gemm_flops(1), [&] {
    ops::grouped_gemm_weight_grad(context, permuted, grad_hidden_pre, expert_offsets_, gradients.w1, alignment,
                                  padding, gradients.accumulate);
  });
  run_stage(context, "data grad 1", expert_gemm_flops(1), [&] {
    ops::grouped_gemm(context, grad_hidden_pre, weights.w1, true, expert_offsets_, grad_rows, alignment, padding);
  });
  run_stage(context, "permute backward", [&] { ops::permute_backward(context, grad_rows, map_, tokens, grad_x); });

  // Gates and losses -> logits -> router weight and router input.
  router_.backward(context, aux_grad_scale, z_grad_scale, gradients.router, observer_, gradients.accumulate);
  router_.add_input_gradient(context, weights.router, grad_x, observer_);
}

}  // namespace switchyard
