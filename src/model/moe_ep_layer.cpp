// The expert-parallel MoE layer's forward and backward (math, memory: src/model/moe_ep_layer.h).
#include "src/model/moe_ep_layer.h"
#include "src/model/moe_shape_checks.h"

#include <algorithm>

#include "src/comm/bootstrap.h"

namespace switchyard {

namespace {

// The sender's routing: packed (segment_alignment 1), so each destination's rows are contiguous.
RoutingParams packed_params(const MoeLayerConfig& config, int64_t tokens, bool training) {
  RoutingParams params = config.routing_params(tokens, training);
  params.segment_alignment = 1;
  return params;
}

}  // namespace

// ---- Construction ----------------------------------------------------------------------------

MoeEpLayer::MoeEpLayer(const MoeLayerConfig& config, std::shared_ptr<Communicator> expert_parallel, DeviceKind device,
                       DType activation_dtype, int64_t max_tokens, const EpLayerOptions& exchange,
                       std::shared_ptr<MoeLayerMemory> memory)
    : config_(config), device_(device), activation_dtype_(activation_dtype),
      memory_(memory ? std::move(memory) : std::make_shared<MoeLayerMemory>(device)) {
  SY_CHECK(memory_->device() == device, "MoeEpLayer: its memory is on ", device_kind_name(memory_->device()),
           ", the layer on ", device_kind_name(device));
  config_.validate();
  SY_CHECK_INPUT(config_.moe.compute_mode == ExpertComputeMode::sparse,
                 "moe: compute_mode dense is a single-device baseline; expert parallelism needs sparse");
  SY_CHECK_INPUT(max_tokens >= 1, "MoeEpLayer: max_tokens must be >= 1, got ", max_tokens);
  if (device == DeviceKind::cpu) {
    SY_CHECK_INPUT(activation_dtype == DType::f32 || activation_dtype == DType::f64,
                   "MoeEpLayer on cpu computes in f32 or f64, not ", dtype_name(activation_dtype));
    gradient_dtype_ = activation_dtype;
  } else {
    SY_CHECK_INPUT(activation_dtype == DType::bf16 || activation_dtype == DType::f16,
                   "MoeEpLayer on cuda takes bf16 or f16 activations, not ", dtype_name(activation_dtype));
    gradient_dtype_ = DType::f32;
  }
  max_tokens_ = max_tokens;
  max_send_rows_ = std::max(padded_rows_upper_bound(packed_params(config_, max_tokens, true)),
                            padded_rows_upper_bound(packed_params(config_, max_tokens, false)));
  router_ = MoeRouter(config_, device, activation_dtype, max_tokens, /*segment_alignment=*/1, max_send_rows_,
                      memory_);
  if (memory_->exchange) {  // another layer of this model made it (collective: every rank does the same)
    exchange_ = memory_->exchange;
    SY_CHECK(exchange_->ranks() == expert_parallel->size() && exchange_->chunks() <= exchange.a2a_chunks,
             "MoeEpLayer: the shared exchange belongs to another group or configuration");
  } else {
    exchange_ = make_exchange(std::move(expert_parallel), exchange);
    memory_->exchange = exchange_;
  }
  // The experts' activations start at the balanced load (every rank receives what it sends).
  const int64_t rows = max_send_rows_ + int64_t(local_experts()) * (config_.moe.segment_alignment - 1);
  reserve_hidden(rows, /*with_backward=*/false);
}

std::shared_ptr<EpExchange> MoeEpLayer::make_exchange(std::shared_ptr<Communicator> expert_parallel,
                                                      const EpLayerOptions& exchange) const {
  EpExchangeOptions options;
  options.device = device_;
  options.num_experts = config_.moe.num_experts;
  options.segment_alignment = config_.moe.segment_alignment;
  options.chunks = exchange.a2a_chunks;
  options.transport = exchange.transport;
  options.dispatch = exchange.dispatch;
  options.row_dtype = activation_dtype_;
  options.row_width = config_.d_model;
  options.max_send_rows = max_send_rows_;
  options.initial_rows = max_send_rows_;  // the balanced load: every rank receives what it sends
  options.node_group = exchange.node_group;
  options.rail_group = exchange.rail_group;
  return EpExchange::create(std::move(expert_parallel), options);
}

int64_t MoeEpLayer::hidden_rows(MoeBufferSlot slot) const {
  const int64_t columns = slot == MoeBufferSlot::hidden_post ? config_.moe.expert_d_ff : config_.w1_columns();
  return int64_t(memory_->at(slot).bytes() / (size_t(columns) * dtype_size(activation_dtype_)));
}

void MoeEpLayer::reserve_hidden(int64_t rows, bool with_backward) {
  const size_t activation_size = dtype_size(activation_dtype_);
  memory_->reserve(MoeBufferSlot::hidden_pre, size_t(rows) * size_t(config_.w1_columns()) * activation_size);
  memory_->reserve(MoeBufferSlot::hidden_post, size_t(rows) * size_t(config_.moe.expert_d_ff) * activation_size);
  if (with_backward)
    memory_->reserve(MoeBufferSlot::grad_hidden_pre, size_t(rows) * size_t(config_.w1_columns()) * activation_size);
}

void MoeEpLayer::ensure_hidden_capacity(const ExecContext& context, bool with_backward) {
  const int64_t expert_rows = exchange_->plan().expert_rows();
  const bool grow = expert_rows > hidden_rows(MoeBufferSlot::hidden_pre);
  const bool grow_backward = with_backward && expert_rows > hidden_rows(MoeBufferSlot::grad_hidden_pre);
  if (!grow && !grow_backward) return;
  // The caching allocator does not track streams: nothing may still use a buffer we free.
  ops::synchronize(context);
  exchange_->synchronize_communicators();
  // Backward scratch as long as the activations: the headroom serves both.
  reserve_hidden(grow ? with_headroom(expert_rows) : hidden_rows(MoeBufferSlot::hidden_pre), with_backward);
}

Tensor MoeEpLayer::rows(const Buffer& buffer, int64_t first_row, int64_t count, int64_t columns) const {
  const size_t row_bytes = size_t(columns) * dtype_size(activation_dtype_), offset = size_t(first_row) * row_bytes;
  SY_CHECK(offset + size_t(count) * row_bytes <= buffer.bytes(), "MoeEpLayer: rows [", first_row, ", ",
           first_row + count, ") x ", columns, " exceed a buffer of ", buffer.bytes(), " bytes");
  return Tensor(static_cast<char*>(buffer.data()) + offset, activation_dtype_, device_, {count, columns});
}

// Experts [first, first + count) of a [L, a, b] weight or gradient.
Tensor MoeEpLayer::expert_slice(const Tensor& tensor, int first, int count) const {
  const int64_t matrix = tensor.dim(1) * tensor.dim(2);
  char* base = static_cast<char*>(tensor.data) + size_t(first) * size_t(matrix) * dtype_size(tensor.dtype);
  return Tensor(base, tensor.dtype, tensor.device, {int64_t(count), tensor.dim(1), tensor.dim(2)});
}

void MoeEpLayer::check_weights(const MoeWeights& weights, DType dtype, const char* what) const {
  expect_moe_weights("MoeEpLayer", config_, local_experts(), weights, dtype, device_, what);
}

// ---- Forward ---------------------------------------------------------------------------------

MoeLosses MoeEpLayer::forward(const ExecContext& context, const Tensor& x, const MoeWeights& weights,
                              const MoeForwardArgs& args, Tensor& y) {
  SY_CHECK(context.device == device_, "MoeEpLayer::forward: context is on ", device_kind_name(context.device),
           ", the layer on ", device_kind_name(device_));
  SY_CHECK(x.rank == 2, "MoeEpLayer::forward: x must be [T, D], got ", x.describe());
  const int64_t tokens = x.dim(0), d_model = config_.d_model;
  SY_CHECK(tokens >= 1 && tokens <= max_tokens_, "MoeEpLayer::forward: ", tokens, " tokens, the layer holds 1 to ",
           max_tokens_);
  expect_moe_tensor("MoeEpLayer", "x", x, activation_dtype_, device_, {tokens, d_model});
  expect_moe_tensor("MoeEpLayer", "y", y, activation_dtype_, device_, {tokens, d_model});
  check_weights(weights, activation_dtype_, "weights");
  has_forward_ = false;
  tokens_ = tokens;

  const RoutingResult& routing = router_.forward(context, x, weights.router, weights.router_bias, args);

  // The exchange permutes x into rows by expert while the counts travel (the one host sync).
  const int64_t send_bound = padded_rows_upper_bound(router_.params());
  SY_CHECK(send_bound <= max_send_rows_, "MoeEpLayer: ", send_bound, " send rows exceed the ", max_send_rows_,
           " allocated");
  exchange_->start_forward(context, x, routing, router_.params(), router_.dispatch_map(send_bound));
  ensure_hidden_capacity(context, args.training);
  inject_fault_point("ep_layer_dispatch");  // tests: a rank that stops between the counts and the rows

  exchange_->dispatch(context, EpPass::forward);
  for (int chunk = 0; chunk < exchange_->chunks(); ++chunk) {
    exchange_->receive(context, EpPass::forward, chunk);
    experts_forward(context, chunk, weights);
    exchange_->send_back(context, EpPass::forward, chunk);
  }
  exchange_->combine(context, EpPass::forward, y);
  has_forward_ = true;
  return args.read_losses ? read_losses(context) : MoeLosses{};
}

void MoeEpLayer::experts_forward(const ExecContext& context, int chunk, const MoeWeights& weights) {
  const ExpertExchangePlan& plan = exchange_->plan();
  const int first = plan.chunk_first_expert(chunk), count = plan.chunk_end_expert(chunk) - first;
  const int64_t row_begin = plan.chunk_row_begin(chunk), chunk_rows = plan.chunk_row_end(chunk) - row_begin;
  if (chunk_rows == 0) return;  // no rank routed anything to these experts
  Tensor input = exchange_->expert_input(row_begin, chunk_rows);
  Tensor hidden_pre = rows(memory_->at(MoeBufferSlot::hidden_pre), row_begin, chunk_rows, config_.w1_columns());
  Tensor hidden_post = rows(memory_->at(MoeBufferSlot::hidden_post), row_begin, chunk_rows, config_.moe.expert_d_ff);
  Tensor output = exchange_->expert_output(row_begin, chunk_rows);
  const Tensor offsets = exchange_->chunk_offsets(chunk);
  // H and A = act(H): one kernel where the activation fuses into the GEMM (ops::fuses_expert_activation).
  ops::grouped_gemm_activation(context, config_.moe.activation, input, expert_slice(weights.w1, first, count), offsets,
                               hidden_pre, hidden_post, /*keep_pre=*/true, config_.moe.segment_alignment);
  ops::grouped_gemm(context, hidden_post, expert_slice(weights.w2, first, count), false, offsets, output,
                    config_.moe.segment_alignment);
}

// ---- Backward --------------------------------------------------------------------------------

void MoeEpLayer::backward(const ExecContext& context, const Tensor& grad_y, const MoeWeights& weights,
                          float aux_grad_scale, float z_grad_scale, Tensor& grad_x, MoeGradients& gradients) {
  SY_CHECK(has_forward_, "MoeEpLayer::backward: no completed forward to differentiate (backward runs once per "
           "forward: it overwrites saved activations)");
  SY_CHECK(context.device == device_, "MoeEpLayer::backward: context is on ", device_kind_name(context.device),
           ", the layer on ", device_kind_name(device_));
  const int64_t tokens = tokens_, d_model = config_.d_model;
  expect_moe_tensor("MoeEpLayer", "grad_y", grad_y, activation_dtype_, device_, {tokens, d_model});
  expect_moe_tensor("MoeEpLayer", "grad_x", grad_x, activation_dtype_, device_, {tokens, d_model});
  check_weights(weights, activation_dtype_, "weights");
  MoeWeights gradient_view{gradients.router, gradients.w1, gradients.w2};
  check_weights(gradient_view, gradient_dtype_, "gradients");

  // A forward in eval mode may have come first and left the backward buffers short.
  ensure_hidden_capacity(context, /*with_backward=*/true);

  // The combine's backward: dL/dgates of this rank's choices, the dL/dO rows readied.
  Tensor grad_gates = router_.grad_gates();
  exchange_->start_backward(context, grad_y, grad_gates);
  exchange_->dispatch(context, EpPass::backward);
  // The router's backward needs only local data: it runs while the gradient rows travel.
  router_.backward(context, aux_grad_scale, z_grad_scale, gradients.router);
  for (int chunk = 0; chunk < exchange_->chunks(); ++chunk) {
    exchange_->receive(context, EpPass::backward, chunk);
    experts_backward(context, chunk, weights, gradients);
    exchange_->send_back(context, EpPass::backward, chunk);  // dL/dX rows
  }
  exchange_->combine(context, EpPass::backward, grad_x);
  has_forward_ = false;  // hidden_post now holds dL/dA
  router_.add_input_gradient(context, weights.router, grad_x);
}

void MoeEpLayer::experts_backward(const ExecContext& context, int chunk, const MoeWeights& weights,
                                  MoeGradients& gradients) {
  const ExpertExchangePlan& plan = exchange_->plan();
  const int first = plan.chunk_first_expert(chunk), count = plan.chunk_end_expert(chunk) - first;
  const int64_t row_begin = plan.chunk_row_begin(chunk), chunk_rows = plan.chunk_row_end(chunk) - row_begin;
  Tensor grad_w1 = expert_slice(gradients.w1, first, count), grad_w2 = expert_slice(gradients.w2, first, count);
  if (chunk_rows == 0) {  // no tokens reached these experts: their gradients are zero
    ops::fill_zero(context, grad_w1);
    ops::fill_zero(context, grad_w2);
    return;
  }
  // The exchange put dL/dO into the output rows (padding rows zero); dL/dX goes back there.
  const Tensor input = exchange_->expert_input(row_begin, chunk_rows);
  const Tensor hidden_pre = rows(memory_->at(MoeBufferSlot::hidden_pre), row_begin, chunk_rows, config_.w1_columns());
  Tensor hidden_post = rows(memory_->at(MoeBufferSlot::hidden_post), row_begin, chunk_rows, config_.moe.expert_d_ff);
  Tensor grad_expert_rows = exchange_->expert_output(row_begin, chunk_rows);
  Tensor grad_hidden_pre =
      rows(memory_->at(MoeBufferSlot::grad_hidden_pre), row_begin, chunk_rows, config_.w1_columns());
  const Tensor offsets = exchange_->chunk_offsets(chunk);
  ops::grouped_gemm_weight_grad(context, hidden_post, grad_expert_rows, offsets, grad_w2, config_.moe.segment_alignment);
  // dL/dH = act'(H) * (dL/dO W2^T), fused where possible; the unfused path puts dL/dA in A's buffer
  // (A is dead once dW2 has read it).
  Tensor& grad_hidden_post = hidden_post;
  ops::grouped_gemm_activation_backward(context, config_.moe.activation, grad_expert_rows,
                                        expert_slice(weights.w2, first, count), offsets, hidden_pre, grad_hidden_post,
                                        grad_hidden_pre, config_.moe.segment_alignment);
  ops::grouped_gemm_weight_grad(context, input, grad_hidden_pre, offsets, grad_w1, config_.moe.segment_alignment);
  ops::grouped_gemm(context, grad_hidden_pre, expert_slice(weights.w1, first, count), true, offsets, grad_expert_rows,
                    config_.moe.segment_alignment);
}

// ---- Host reads ------------------------------------------------------------------------------

MoeExchangeStats MoeEpLayer::exchange_stats() const { return exchange_->stats(); }

}  // namespace switchyard
