// The MoE router's forward and backward, the layer configuration's rules, and the host reads of
// the routing's losses and counters (src/model/moe_router.h).
#include "src/model/moe_router.h"

#include <cmath>

#include "src/core/error.h"

namespace switchyard {

// ---- MoeLayerConfig --------------------------------------------------------------------------

void MoeLayerConfig::validate() const {
  SY_CHECK_INPUT(d_model >= 1, "moe: d_model must be >= 1, got ", d_model);
  SY_CHECK_INPUT(moe.expert_d_ff >= 1, "moe.expert_d_ff must be >= 1, got ", moe.expert_d_ff);
  SY_CHECK_INPUT(!moe.dropless || (moe.capacity_factor >= 0 && moe.eval_capacity_factor >= 0),
                 "moe: capacity factors must not be negative");
  if (!moe.dropless) {
    SY_CHECK_INPUT(moe.capacity_factor > 0 && std::isfinite(moe.capacity_factor),
                   "moe.capacity_factor must be a positive number, got ", moe.capacity_factor);
    SY_CHECK_INPUT(moe.eval_capacity_factor > 0 && std::isfinite(moe.eval_capacity_factor),
                   "moe.eval_capacity_factor must be a positive number, got ", moe.eval_capacity_factor);
  }
  SY_CHECK_INPUT(moe.jitter_eps >= 0.0 && moe.jitter_eps < 1.0, "moe.jitter_eps must be in [0, 1), got ",
                 moe.jitter_eps);
  SY_CHECK_INPUT(moe.aux_loss_weight >= 0.0 && std::isfinite(moe.aux_loss_weight),
                 "moe.aux_loss_weight must be a non-negative number, got ", moe.aux_loss_weight);
  SY_CHECK_INPUT(moe.z_loss_weight >= 0.0 && std::isfinite(moe.z_loss_weight),
                 "moe.z_loss_weight must be a non-negative number, got ", moe.z_loss_weight);
  SY_CHECK_INPUT(moe.activation == ExpertActivation::gelu_tanh || moe.activation == ExpertActivation::swiglu,
                 "moe: unknown activation");
  SY_CHECK_INPUT(moe.compute_mode == ExpertComputeMode::sparse || moe.compute_mode == ExpertComputeMode::dense,
                 "moe: unknown compute mode");
  SY_CHECK_INPUT(moe.bias_update_rate >= 0.0 && std::isfinite(moe.bias_update_rate),
                 "moe.bias_update_rate must be a non-negative number, got ", moe.bias_update_rate);
  SY_CHECK_INPUT(!(moe.uses_routing_bias() && moe.routing == RoutingMethod::expert_choice),
                 "moe.bias_update_rate = ", moe.bias_update_rate, " needs moe.routing = token_choice: the router "
                 "bias steers the tokens' choices, expert choice has none");
  SY_CHECK_INPUT(tokens_per_sequence >= 0, "moe: tokens_per_sequence must be >= 0, got ", tokens_per_sequence);
  validate_routing_params(routing_params(1, true));  // experts, k, k_min, alignment
  validate_routing_params(routing_params(1, false));
}

RoutingParams MoeLayerConfig::routing_params(int64_t num_tokens, bool training) const {
  RoutingParams params;
  params.num_tokens = num_tokens;
  params.num_experts = moe.num_experts;
  params.k_max = moe.top_k;
  params.k_min = moe.k_min;
  params.complexity = moe.complexity;
  params.renormalize = moe.renormalize_gates;
  params.dropless = moe.dropless;
  params.capacity_factor = float(training ? moe.capacity_factor : moe.eval_capacity_factor);
  params.segment_alignment = moe.segment_alignment;
  params.aux_loss_weight = float(moe.aux_loss_weight);
  params.z_loss_weight = float(moe.z_loss_weight);
  params.method = moe.routing;
  params.score_function = moe.score_function;
  params.routed_scaling_factor = float(moe.routed_scaling_factor);
  params.num_groups = moe.num_groups;
  params.topk_groups = moe.topk_groups > 0 ? moe.topk_groups : moe.num_groups;  // 0: MoeConfig's "default"
  params.drop_policy = moe.drop_policy;
  params.tokens_per_sequence = tokens_per_sequence;
  params.seq_aux_loss_weight = float(moe.seq_aux_loss_weight);
  params.global_aux_loss_weight = float(moe.global_aux_loss_weight);
  return params;
}

int64_t MoeLayerConfig::max_sequences(int64_t max_tokens) const {
  RoutingParams params;
  params.num_tokens = max_tokens;
  params.tokens_per_sequence = tokens_per_sequence;
  return routing_num_sequences(params);
}

// ---- MoeRouter -------------------------------------------------------------------------------

MoeRouter::MoeRouter(const MoeLayerConfig& config, DeviceKind device, DType activation_dtype, int64_t max_tokens,
                     int segment_alignment, int64_t max_rows, std::shared_ptr<MoeLayerMemory> memory)
    : config_(config), device_(device), activation_dtype_(activation_dtype), max_tokens_(max_tokens),
      segment_alignment_(segment_alignment), memory_(std::move(memory)) {
  SY_CHECK(max_tokens >= 1 && segment_alignment >= 1, "MoeRouter: bad sizes (max_tokens ", max_tokens,
           ", segment_alignment ", segment_alignment, ")");
  SY_CHECK(memory_ != nullptr && memory_->device() == device, "MoeRouter: needs a MoeLayerMemory on ",
           device_kind_name(device));
  // Router logits, gates and losses: fp32 on CUDA, the reference's float type on the CPU.
  float_dtype_ = device == DeviceKind::cpu ? activation_dtype : DType::f32;
  const size_t tokens = size_t(max_tokens);
  if (config_.moe.jitter_eps > 0.0f)
    memory_->reserve(MoeBufferSlot::jittered_input, tokens * size_t(config_.d_model) * dtype_size(activation_dtype));
  logits_buffer_ = Buffer(device, tokens * size_t(config_.moe.num_experts) * dtype_size(float_dtype_));
  buffers_ = RoutingBuffers(device, float_dtype_, max_tokens, config_.moe.num_experts, config_.moe.top_k, max_rows,
                            config_.max_sequences(max_tokens));
  if (config_.moe.global_aux_loss_weight > 0.0) {
    const size_t bytes = size_t(config_.moe.num_experts) * dtype_size(float_dtype_);
    balance_loads_ = Buffer(device, bytes);
    global_fractions_ = Buffer(device, bytes);
  }
}

void MoeRouter::check_selection_bias(const Tensor* bias) const {
  const int64_t experts = config_.moe.num_experts;
  SY_CHECK_INPUT(bias != nullptr || !config_.moe.uses_routing_bias(), "MoeRouter: moe.bias_update_rate = ",
                 config_.moe.bias_update_rate, " routes with a router bias, but the weights hold none "
                 "(MoeWeights::router_bias is null)");
  if (bias == nullptr) return;
  SY_CHECK_INPUT(config_.moe.routing == RoutingMethod::token_choice,
                 "MoeRouter: a router bias was given, but expert-choice routing takes none");
  const bool dtype_ok = bias->dtype == DType::f32 || (device_ == DeviceKind::cpu && bias->dtype == DType::f64);
  SY_CHECK(dtype_ok && bias->device == device_ && bias->rank == 1 && bias->dim(0) == experts && bias->data != nullptr,
           "MoeRouter: the router bias must be ", device_ == DeviceKind::cpu ? "f32 or f64" : "f32 (the master copy)",
           " [", experts, "] on ", device_kind_name(device_), ", got ", bias->describe());
}

Tensor MoeRouter::rows(const Buffer& buffer, DType dtype, int64_t columns) const {
  return buffer.view(dtype, {tokens_, columns});
}

const RoutingResult& MoeRouter::forward(const ExecContext& context, const Tensor& x, const Tensor& router_weight,
                                        const Tensor* selection_bias, const MoeForwardArgs& args,
                                        MoeStageObserver* observer) {
  const int64_t tokens = x.dim(0);
  SY_CHECK(tokens >= 1 && tokens <= max_tokens_, "MoeRouter: ", tokens, " tokens, the router holds 1 to ",
           max_tokens_);
  check_selection_bias(selection_bias);
  if (args.recompute) check_recompute(tokens, args);
  has_global_fractions_ = false;
  tokens_ = tokens;
  step_ = args.step;
  training_ = args.training;
  jittered_ = args.training && config_.moe.jitter_eps > 0.0f;
  params_ = config_.routing_params(tokens, args.training);
  params_.segment_alignment = segment_alignment_;

  // Jitter only perturbs what the router sees; the experts get x itself.
  router_input_ = x;
  if (jittered_) {
    router_input_ = rows(memory_->at(MoeBufferSlot::jittered_input), activation_dtype_, config_.d_model);
    run_moe_stage(observer, context, "jitter", [&] {
      ops::apply_jitter(context, x, config_.moe.jitter_eps, config_.jitter_seed, config_.jitter_stream, step_,
                        router_input_);
    });
  }
  logits_ = rows(logits_buffer_, float_dtype_, config_.moe.num_experts);
  const double router_flops = matmul_flops(tokens, config_.d_model, config_.moe.num_experts);
  run_moe_stage(observer, context, "router GEMM", router_flops,
                [&] { ops::gemm(context, false, false, 1.0f, router_input_, router_weight, 0.0f, logits_); });
  routing_ = buffers_.result(tokens);
  RoutingInputs inputs(args.complexity);
  inputs.selection_bias = selection_bias;
  run_moe_stage(observer, context, "routing", [&] {
    ops::route(context, logits_, inputs, params_, routing_);
    if (params_.global_aux_loss_weight > 0.0f && (args.training || args.for_backward))
      global_balance_loss(context, args);
  });
  return routing_;
}

void MoeRouter::check_recompute(int64_t tokens, const MoeForwardArgs& args) const {
  SY_CHECK(args.training && training_ && tokens == tokens_ && args.step == step_ &&
               routing_.expert_ids.data != nullptr,
           "MoeRouter: a recompute repeats the last forward, a training one of as many tokens at the same step "
           "(last: ", training_ ? "training" : "not training", ", ", tokens_, " tokens, step ", step_,
           "; asked: ", args.training ? "training" : "not training", ", ", tokens, " tokens, step ", args.step, ")");
}

void MoeRouter::global_balance_loss(const ExecContext& context, const MoeForwardArgs& args) {
  const int64_t experts = config_.moe.num_experts;
  // `loads` ends up holding the loads the loss is computed from, which a recompute reuses as they
  // are: gathering them again would reduce over the ranks and add to the running sum twice.
  Tensor loads = balance_loads_.view(float_dtype_, {experts});
  if (!args.recompute) {
    ops::fill_zero(context, loads);
    ops::accumulate_expert_load(context, routing_.expert_counts, loads);
    if (args.training && args.load_reducer != nullptr && *args.load_reducer) (*args.load_reducer)(context, loads);
    if (args.training && args.global_loads != nullptr) {
      Tensor& running = *args.global_loads;
      SY_CHECK(running.dtype == float_dtype_ && running.numel() == experts && running.device == device_,
               "MoeRouter: the running global loads must be ", dtype_name(float_dtype_), " [", experts, "] on ",
               device_kind_name(device_), ", got ", running.describe());
      ops::add_into(context, loads, running);
      ops::copy(context, running, loads);
    }
  }
  Tensor fractions = global_fractions_.view(float_dtype_, {experts});
  ops::global_balance_loss(context, loads, params_, routing_, fractions);
  has_global_fractions_ = true;
}

void MoeRouter::allocate_backward_buffers() {
  if (backward_ready_) return;
  const size_t tokens = size_t(max_tokens_);
  grad_gates_ = Buffer(device_, tokens * size_t(config_.moe.top_k) * dtype_size(float_dtype_));
  grad_logits_ = Buffer(device_, tokens * size_t(config_.moe.num_experts) * dtype_size(activation_dtype_));
  if (config_.moe.jitter_eps > 0.0f)
    memory_->reserve(MoeBufferSlot::jitter_grad_input,
                     tokens * size_t(config_.d_model) * dtype_size(activation_dtype_));
  backward_ready_ = true;
}

Tensor MoeRouter::grad_gates() {
  allocate_backward_buffers();
  return rows(grad_gates_, float_dtype_, config_.moe.top_k);
}

void MoeRouter::backward(const ExecContext& context, float aux_grad_scale, float z_grad_scale,
                         Tensor& grad_router_weight, MoeStageObserver* observer, bool accumulate) {
  SY_CHECK(routing_.expert_ids.data != nullptr, "MoeRouter::backward: no forward has run");
  allocate_backward_buffers();
  const Tensor grad_gates = rows(grad_gates_, float_dtype_, config_.moe.top_k);
  grad_logits_view_ = rows(grad_logits_, activation_dtype_, config_.moe.num_experts);
  SY_CHECK(params_.global_aux_loss_weight == 0.0f || has_global_fractions_,
           "MoeRouter::backward: the global-batch loss of the last forward was not computed (a pure inference "
           "forward: training = false and for_backward = false)");
  const Tensor fractions = has_global_fractions_ ? global_fractions_.view(float_dtype_, {config_.moe.num_experts})
                                                 : Tensor();
  run_moe_stage(observer, context, "routing backward", [&] {
    ops::route_backward(context, logits_, grad_gates, routing_, params_, aux_grad_scale, z_grad_scale,
                        grad_logits_view_, has_global_fractions_ ? &fractions : nullptr);
  });
  const double router_flops = matmul_flops(tokens_, config_.d_model, config_.moe.num_experts);
  run_moe_stage(observer, context, "router weight grad", router_flops, [&] {
    ops::gemm(context, true, false, 1.0f, router_input_, grad_logits_view_, accumulate ? 1.0f : 0.0f,
              grad_router_weight);
  });
}

void MoeRouter::add_input_gradient(const ExecContext& context, const Tensor& router_weight, Tensor& grad_x,
                                   MoeStageObserver* observer) {
  SY_CHECK(grad_logits_view_.data != nullptr, "MoeRouter::add_input_gradient: backward() has not run");
  const double flops = matmul_flops(tokens_, config_.moe.num_experts, config_.d_model);
  run_moe_stage(observer, context, "router input grad", flops, [&] {
    if (!jittered_) {
      ops::gemm(context, false, true, 1.0f, grad_logits_view_, router_weight, 1.0f, grad_x);  // grad_x += G Wr^T
      return;
    }
    // x_r = x * u elementwise, so dL/dx gains u * (G Wr^T): the same jitter op applied to the
    // gradient (in place: both backends allow it), then added to grad_x.
    Tensor router_grad_input = rows(memory_->at(MoeBufferSlot::jitter_grad_input), activation_dtype_, config_.d_model);
    ops::gemm(context, false, true, 1.0f, grad_logits_view_, router_weight, 0.0f, router_grad_input);
    ops::apply_jitter(context, router_grad_input, config_.moe.jitter_eps, config_.jitter_seed, config_.jitter_stream,
                      step_, router_grad_input);
    ops::add_into(context, router_grad_input, grad_x);
  });
}

// ---- Host reads ------------------------------------------------------------------------------

MoeLosses RoutingLossesReadout::losses(DType float_dtype) const {
  MoeLosses losses;
  losses.aux_loss = value(kAuxLoss, float_dtype);
  losses.z_loss = value(kZLoss, float_dtype);
  losses.seq_aux_loss = value(kSeqAuxLoss, float_dtype);
  losses.global_aux_loss = value(kGlobalAuxLoss, float_dtype);
  losses.read = true;
  return losses;
}

MoeRoutingStats moe_routing_stats_from(const int32_t (&scalars)[kNumRoutingScalars]) {
  MoeRoutingStats stats;
  stats.capacity = scalars[kCapacity];
  stats.total_choices = scalars[kTotalChoices];
  stats.dropped_choices = scalars[kDroppedChoices];
  stats.padded_rows = scalars[kPaddedRows];
  return stats;
}

MoeLosses MoeRouter::read_losses(const ExecContext& context) const {
  SY_CHECK(routing_.losses.data != nullptr, "MoeRouter::read_losses: no forward has run");
  RoutingLossesReadout readout;
  Tensor host = readout.destination(float_dtype_);
  ops::copy(context, routing_.losses, host);
  return readout.losses(float_dtype_);
}

MoeRoutingStats MoeRouter::read_routing_stats(const ExecContext& context) const {
  SY_CHECK(routing_.scalars.data != nullptr, "MoeRouter::read_routing_stats: no forward has run");
  int32_t scalars[kNumRoutingScalars] = {};
  Tensor host(scalars, DType::i32, DeviceKind::cpu, {kNumRoutingScalars});
  ops::copy(context, routing_.scalars, host);
  return moe_routing_stats_from(scalars);
}

}  // namespace switchyard
