// The expert-parallel MoE layer's forward and backward (math, memory: src/model/moe_ep_layer.h).
#include "src/model/moe_ep_layer.h"
#include "src/model/moe_shape_checks.h"

#include <algorithm>
#include <string>

#include "src/comm/bootstrap.h"

namespace switchyard {

namespace {

// The packed (segment_alignment 1) routing of the sender side.
RoutingParams packed_params(const MoeLayerConfig& config, int64_t tokens, bool training) {
  RoutingParams params = config.routing_params(tokens, training);
  params.segment_alignment = 1;
  return params;
}

int64_t with_headroom(int64_t rows) { return rows + rows / 4 + 1; }

// The nvlink transport's peer-mapped regions: the padded expert layout's input rows (the
// dispatch writes them) and output rows (the combine reads them; backward writes the output-row
// gradients there and reads back the input-row gradients).
// The third holds every rank's per-expert row counts (the count exchange).
constexpr int kInputRegion = 0, kOutputRegion = 1, kCountRegion = 2, kPeerRegions = 3;

}  // namespace

// ---- Construction ----------------------------------------------------------------------------

MoeEpLayer::MoeEpLayer(const MoeLayerConfig& config, std::shared_ptr<Communicator> expert_parallel, DeviceKind device,
                       DType activation_dtype, int64_t max_tokens, int a2a_chunks, EpTransport transport)
    : config_(config), device_(device), activation_dtype_(activation_dtype) {
  config_.validate();
  SY_CHECK_INPUT(config_.compute_mode == MoeComputeMode::sparse,
                 "moe: compute_mode dense is a single-device baseline; expert parallelism needs sparse");
  SY_CHECK_INPUT(max_tokens >= 1, "MoeEpLayer: max_tokens must be >= 1, got ", max_tokens);
  if (device == DeviceKind::cpu) {
    SY_CHECK_INPUT(activation_dtype == DType::f32 || activation_dtype == DType::f64,
                   "MoeEpLayer on cpu computes in f32 or f64, not ", dtype_name(activation_dtype));
    float_dtype_ = gradient_dtype_ = activation_dtype;
  } else {
    SY_CHECK_INPUT(activation_dtype == DType::bf16 || activation_dtype == DType::f16,
                   "MoeEpLayer on cuda takes bf16 or f16 activations, not ", dtype_name(activation_dtype));
    float_dtype_ = gradient_dtype_ = DType::f32;
  }
  max_tokens_ = max_tokens;
  SY_CHECK_INPUT(transport != EpTransport::nvlink || device == DeviceKind::cuda,
                 "parallel.ep_transport nvlink moves rows between GPUs; this run is on ", device_kind_name(device));
  SY_CHECK(expert_parallel != nullptr, "MoeEpLayer: no expert_parallel communicator");
  if (device == DeviceKind::cuda && transport != EpTransport::nccl) {
    std::string why;
    peers_ = NvlinkPeerMemory::create(expert_parallel, kPeerRegions, &why);
    SY_CHECK_INPUT(peers_ || transport == EpTransport::automatic,
                   "parallel.ep_transport nvlink is not possible for this expert-parallel group: ", why,
                   " (use nccl or auto)");
  }
  // The nvlink transport runs unchunked: with no staging copy there is nothing to overlap.
  if (peers_) peers_->reserve(kCountRegion, size_t(peers_->ranks()) * size_t(config_.num_experts) * sizeof(int32_t));
  dispatcher_ = std::make_unique<ExpertDispatcher>(std::move(expert_parallel), device, config_.num_experts,
                                                   config_.segment_alignment, peers_ ? 1 : a2a_chunks, peers_.get(),
                                                   kCountRegion);
  max_send_rows_ = std::max(padded_rows_upper_bound(packed_params(config_, max_tokens, true)),
                            padded_rows_upper_bound(packed_params(config_, max_tokens, false)));

  const size_t activation_size = dtype_size(activation_dtype_), float_size = dtype_size(float_dtype_);
  const size_t tokens = size_t(max_tokens), d_model = size_t(config_.d_model);
  if (config_.jitter_eps > 0.0f) jittered_input_ = Buffer(device, tokens * d_model * activation_size);
  logits_buffer_ = Buffer(device, tokens * size_t(config_.num_experts) * float_size);
  routing_buffers_ =
      RoutingBuffers(device, float_dtype_, max_tokens, config_.num_experts, config_.k_max, max_send_rows_);
  send_rows_ = Buffer(device, size_t(max_send_rows_) * d_model * activation_size);

  // Receiver side: the balanced load (every rank sends as much as it receives), grown on demand.
  receive_capacity_ = max_send_rows_;
  expert_capacity_ = max_send_rows_ + int64_t(local_experts()) * (config_.segment_alignment - 1);
  if (!peers_) {  // nvlink: the peer-mapped regions take these roles (sized at the first forward)
    receive_rows_ = Buffer(device, size_t(receive_capacity_) * d_model * activation_size);
    expert_input_ = Buffer(device, size_t(expert_capacity_) * d_model * activation_size);
    expert_output_ = Buffer(device, size_t(expert_capacity_) * d_model * activation_size);
  }
  hidden_pre_ = Buffer(device, size_t(expert_capacity_) * size_t(config_.w1_columns()) * activation_size);
  hidden_post_ = Buffer(device, size_t(expert_capacity_) * size_t(config_.expert_d_ff) * activation_size);
}

void MoeEpLayer::ensure_peer_capacity() {
  // max_expert_rows is the same number on every rank (it comes from the gathered counts), so every
  // rank takes the same branch and the collective growth matches up.
  const int64_t needed = std::max<int64_t>(dispatcher_->max_expert_rows(), 1);
  if (needed <= peer_capacity_rows_) return;
  peer_capacity_rows_ = with_headroom(needed);
  const size_t bytes = size_t(peer_capacity_rows_) * size_t(config_.d_model) * dtype_size(activation_dtype_);
  peers_->reserve(kInputRegion, bytes);
  peers_->reserve(kOutputRegion, bytes);
}

Tensor MoeEpLayer::expert_rows(bool output, int64_t first_row, int64_t count) const {
  const int64_t d_model = config_.d_model;
  if (peers_) {
    const int region = output ? kOutputRegion : kInputRegion;
    return rows(peers_->local(region), peers_->bytes(region), activation_dtype_, first_row, count, d_model);
  }
  return rows(output ? expert_output_ : expert_input_, activation_dtype_, first_row, count, d_model);
}

void MoeEpLayer::ensure_receive_capacity(const ExecContext& context, bool with_backward) {
  const ExpertExchangePlan& plan = dispatcher_->plan();
  const bool grow_receive = !peers_ && plan.recv_rows() > receive_capacity_;
  const bool grow_experts = plan.expert_rows() > expert_capacity_;
  const bool grow_backward = with_backward && plan.expert_rows() > backward_expert_capacity_;
  if (!grow_receive && !grow_experts && !grow_backward) return;
  // The caching allocator does not track streams: nothing may still use a buffer we free. The
  // count exchange has just waited for both streams; this makes the invariant explicit.
  ops::synchronize(context);
  dispatcher_->communicator().synchronize();
  const size_t activation_size = dtype_size(activation_dtype_), d_model = size_t(config_.d_model);
  if (grow_receive) {
    receive_capacity_ = with_headroom(plan.recv_rows());
    receive_rows_.reset();
    receive_rows_ = Buffer(device_, size_t(receive_capacity_) * d_model * activation_size);
  }
  if (grow_experts) {
    expert_capacity_ = with_headroom(plan.expert_rows());
    const size_t rows = size_t(expert_capacity_);
    for (Buffer* buffer : {&expert_input_, &hidden_pre_, &hidden_post_, &expert_output_}) buffer->reset();
    if (!peers_) {
      expert_input_ = Buffer(device_, rows * d_model * activation_size);
      expert_output_ = Buffer(device_, rows * d_model * activation_size);
    }
    hidden_pre_ = Buffer(device_, rows * size_t(config_.w1_columns()) * activation_size);
    hidden_post_ = Buffer(device_, rows * size_t(config_.expert_d_ff) * activation_size);
  }
  if (with_backward && plan.expert_rows() > backward_expert_capacity_) {
    backward_expert_capacity_ = expert_capacity_;
    grad_hidden_pre_.reset();
    grad_hidden_pre_ =
        Buffer(device_, size_t(backward_expert_capacity_) * size_t(config_.w1_columns()) * activation_size);
  }
}

Tensor MoeEpLayer::rows(const Buffer& buffer, DType dtype, int64_t first_row, int64_t count, int64_t columns) const {
  return rows(buffer.data(), buffer.bytes(), dtype, first_row, count, columns);
}

Tensor MoeEpLayer::rows(void* base, size_t bytes, DType dtype, int64_t first_row, int64_t count,
                        int64_t columns) const {
  const size_t offset = size_t(first_row) * size_t(columns) * dtype_size(dtype);
  SY_CHECK(offset + size_t(count) * size_t(columns) * dtype_size(dtype) <= bytes, "MoeEpLayer: rows [", first_row,
           ", ", first_row + count, ") x ", columns, " exceed a buffer of ", bytes, " bytes");
  return Tensor(static_cast<char*>(base) + offset, dtype, device_, {count, columns});
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

  params_ = packed_params(config_, tokens, args.training);
  jittered_ = args.training && config_.jitter_eps > 0.0f;
  step_ = args.step;
  tokens_ = tokens;

  // Router, exactly as MoeLayer: jitter only perturbs what the router sees.
  router_input_ = x;
  if (jittered_) {
    router_input_ = rows(jittered_input_, activation_dtype_, 0, tokens, d_model);
    ops::apply_jitter(context, x, config_.jitter_eps, config_.jitter_seed, config_.jitter_stream, step_,
                      router_input_);
  }
  logits_ = rows(logits_buffer_, float_dtype_, 0, tokens, config_.num_experts);
  ops::gemm(context, false, false, 1.0f, router_input_, weights.router, 0.0f, logits_);
  routing_ = routing_buffers_.result(tokens);
  ops::route(context, logits_, args.complexity, params_, routing_);

  // The count exchange (the one host sync) starts first, so that the permute into packed send
  // rows by global expert runs while the counts travel.
  const int64_t send_bound = padded_rows_upper_bound(params_);
  SY_CHECK(send_bound <= max_send_rows_, "MoeEpLayer: ", send_bound, " send rows exceed the ", max_send_rows_,
           " allocated");
  dispatcher_->start_count_exchange(context, routing_.expert_offsets);
  DispatchMap full_map = routing_buffers_.map(tokens, send_bound);
  Tensor send_all = rows(send_rows_, activation_dtype_, 0, send_bound, d_model);
  ops::permute(context, x, routing_, params_, send_all, full_map);
  const ExpertExchangePlan& plan = dispatcher_->finish_count_exchange(context);
  SY_CHECK(plan.send_rows() <= send_bound, "MoeEpLayer: the routing sends ", plan.send_rows(), " rows, more than its ",
           send_bound, " bound");
  ensure_receive_capacity(context, args.training);
  if (peers_) ensure_peer_capacity();
  inject_fault_point("ep_layer_dispatch");  // tests: a rank that stops between the counts and the rows

  map_ = routing_buffers_.map(tokens, plan.send_rows());
  Tensor send = rows(send_rows_, activation_dtype_, 0, plan.send_rows(), d_model);
  if (peers_) {
    // Rows straight into the peers' expert layouts; results read straight back into `send`.
    const int64_t row_bytes = d_model * int64_t(dtype_size(activation_dtype_));
    const EpReceiveLayout& layout = dispatcher_->layout();
    peers_->push(kInputRegion, send.data, plan.send_rows(), row_bytes, local_experts(),
                 routing_.expert_offsets.as<int32_t>(), dispatcher_->peer_rows(), kEpRowsDispatched, context.stream);
    peers_->zero_padding(kInputRegion, row_bytes, layout.expert_offsets.as<int32_t>(),
                         layout.expert_totals.as<int32_t>(), local_experts(), plan.expert_rows() - plan.recv_rows(),
                         context.stream);
    peers_->wait(kEpRowsDispatched, context.stream);
    experts_forward(context, 0, weights);
    peers_->signal_and_wait(kEpOutputsReady, context.stream);
    // The results straight from the peers into y, kept in `send` for the gate gradients.
    peers_->pull_combine(kOutputRegion, plan.send_rows(), row_bytes, local_experts(),
                         routing_.expert_offsets.as<int32_t>(), dispatcher_->peer_rows(),
                         map_.choice_rows.as<int32_t>(), routing_.gates.as<float>(), tokens, config_.k_max,
                         activation_dtype_, y.data, send.data, context.stream);
  } else {
    Tensor received = rows(receive_rows_, activation_dtype_, 0, plan.recv_rows(), d_model);
    const int chunks = dispatcher_->chunks();
    for (int chunk = 0; chunk < chunks; ++chunk) dispatcher_->dispatch(context, chunk, send, received);
    for (int chunk = 0; chunk < chunks; ++chunk) {
      dispatcher_->wait_dispatched(context, chunk);
      experts_forward(context, chunk, weights);
      // The results return into the send buffer: every dispatch ahead of this on the
      // communicator's stream has finished reading it. They stay there for backward.
      dispatcher_->combine(context, chunk, received, send);
    }
    dispatcher_->wait_combined(context);
    ops::unpermute_combine(context, send, routing_, map_, y);
  }
  x_ = x;
  has_forward_ = true;
  return args.read_losses ? read_losses(context) : MoeLosses{};
}

void MoeEpLayer::experts_forward(const ExecContext& context, int chunk, const MoeWeights& weights) {
  const ExpertExchangePlan& plan = dispatcher_->plan();
  const int first = plan.chunk_first_expert(chunk), count = plan.chunk_end_expert(chunk) - first;
  const int64_t row_begin = plan.chunk_row_begin(chunk), chunk_rows = plan.chunk_row_end(chunk) - row_begin;
  if (chunk_rows == 0) return;  // no rank routed anything to these experts
  Tensor input_all = expert_rows(false, 0, plan.expert_rows());
  Tensor output_all = expert_rows(true, 0, plan.expert_rows());
  Tensor received;
  if (!peers_) {  // nvlink: the rows are already in the padded layout
    received = rows(receive_rows_, activation_dtype_, 0, plan.recv_rows(), config_.d_model);
    dispatcher_->to_expert_layout(context, chunk, received, input_all);
  }

  Tensor input = expert_rows(false, row_begin, chunk_rows);
  Tensor hidden_pre = rows(hidden_pre_, activation_dtype_, row_begin, chunk_rows, config_.w1_columns());
  Tensor hidden_post = rows(hidden_post_, activation_dtype_, row_begin, chunk_rows, config_.expert_d_ff);
  Tensor output = expert_rows(true, row_begin, chunk_rows);
  const Tensor offsets = dispatcher_->chunk_offsets(chunk);
  // H and A = act(H): one kernel where the activation fuses into the GEMM (ops::fuses_expert_activation).
  ops::grouped_gemm_activation(context, config_.activation, input, expert_slice(weights.w1, first, count), offsets,
                               hidden_pre, hidden_post, /*keep_pre=*/true, config_.segment_alignment);
  ops::grouped_gemm(context, hidden_post, expert_slice(weights.w2, first, count), false, offsets, output,
                    config_.segment_alignment);
  if (!peers_) dispatcher_->from_expert_layout(context, chunk, output_all, received);
}

// ---- Backward --------------------------------------------------------------------------------

void MoeEpLayer::backward(const ExecContext& context, const Tensor& grad_y, const MoeWeights& weights,
                          float aux_grad_scale, float z_grad_scale, Tensor& grad_x, MoeGradients& gradients) {
  SY_CHECK(has_forward_, "MoeEpLayer::backward: no completed forward to differentiate (backward runs once per "
           "forward: it overwrites saved activations)");
  SY_CHECK(context.device == device_, "MoeEpLayer::backward: context is on ", device_kind_name(context.device),
           ", the layer on ", device_kind_name(device_));
  const int64_t tokens = tokens_, d_model = config_.d_model, experts = config_.num_experts;
  expect_moe_tensor("MoeEpLayer", "grad_y", grad_y, activation_dtype_, device_, {tokens, d_model});
  expect_moe_tensor("MoeEpLayer", "grad_x", grad_x, activation_dtype_, device_, {tokens, d_model});
  check_weights(weights, activation_dtype_, "weights");
  MoeWeights gradient_view{gradients.router, gradients.w1, gradients.w2};
  check_weights(gradient_view, gradient_dtype_, "gradients");

  // Sender-side scratch on the first backward (fresh allocations: nothing in flight can use them).
  const size_t activation_size = dtype_size(activation_dtype_), float_size = dtype_size(float_dtype_);
  const size_t max_tokens = size_t(max_tokens_);
  if (!grad_send_rows_.data()) {
    grad_send_rows_ = Buffer(device_, size_t(max_send_rows_) * size_t(d_model) * activation_size);
    grad_gates_ = Buffer(device_, max_tokens * size_t(config_.k_max) * float_size);
    grad_logits_ = Buffer(device_, max_tokens * size_t(experts) * float_size);
    if (float_dtype_ != activation_dtype_) grad_logits_compute_ = Buffer(device_, max_tokens * size_t(experts) * activation_size);
    if (config_.jitter_eps > 0.0f) {
      router_grad_input_ = Buffer(device_, max_tokens * size_t(d_model) * activation_size);
      jitter_grad_input_ = Buffer(device_, max_tokens * size_t(d_model) * activation_size);
    }
  }
  const ExpertExchangePlan& plan = dispatcher_->plan();
  if (plan.expert_rows() > backward_expert_capacity_) {  // a forward in eval mode came first
    if (grad_hidden_pre_.data()) {
      ops::synchronize(context);
      dispatcher_->communicator().synchronize();
    }
    backward_expert_capacity_ = std::max(expert_capacity_, plan.expert_rows());
    grad_hidden_pre_.reset();
    grad_hidden_pre_ =
        Buffer(device_, size_t(backward_expert_capacity_) * size_t(config_.w1_columns()) * activation_size);
  }

  // Combine backward on the source rank: dL/dO rows of the sent choices and dL/dgates.
  const Tensor returned = rows(send_rows_, activation_dtype_, 0, plan.send_rows(), d_model);
  Tensor grad_rows = rows(grad_send_rows_, activation_dtype_, 0, plan.send_rows(), d_model);
  Tensor grad_gates = rows(grad_gates_, float_dtype_, 0, tokens, config_.k_max);
  Tensor grad_logits = rows(grad_logits_, float_dtype_, 0, tokens, experts);
  ops::unpermute_combine_backward(context, grad_y, returned, routing_, map_, grad_rows, grad_gates);

  const int chunks = dispatcher_->chunks();
  const int64_t row_bytes = d_model * int64_t(dtype_size(activation_dtype_));
  Tensor received;
  if (peers_) {
    // dL/dO rows straight into the peers' output regions (their forward results there are dead:
    // every rank pulled its rows in forward); padding rows there must read as zero.
    const EpReceiveLayout& layout = dispatcher_->layout();
    peers_->zero_padding(kOutputRegion, row_bytes, layout.expert_offsets.as<int32_t>(),
                         layout.expert_totals.as<int32_t>(), local_experts(), plan.expert_rows() - plan.recv_rows(),
                         context.stream);
    peers_->push(kOutputRegion, grad_rows.data, plan.send_rows(), row_bytes, local_experts(),
                 routing_.expert_offsets.as<int32_t>(), dispatcher_->peer_rows(), kEpGradientsDispatched,
                 context.stream);
  } else {
    received = rows(receive_rows_, activation_dtype_, 0, plan.recv_rows(), d_model);
    for (int chunk = 0; chunk < chunks; ++chunk) dispatcher_->dispatch(context, chunk, grad_rows, received);
  }

  // The router's backward needs only local data: it runs while the gradient rows travel.
  ops::route_backward(context, logits_, grad_gates, routing_, params_, aux_grad_scale, z_grad_scale, grad_logits);
  Tensor grad_logits_compute = grad_logits;
  if (float_dtype_ != activation_dtype_) {
    grad_logits_compute = rows(grad_logits_compute_, activation_dtype_, 0, tokens, experts);
    ops::convert(context, grad_logits, grad_logits_compute);
  }
  ops::gemm(context, true, false, 1.0f, router_input_, grad_logits_compute, 0.0f, gradients.router);

  if (peers_) {
    peers_->wait(kEpGradientsDispatched, context.stream);
    experts_backward(context, 0, weights, gradients);
    peers_->signal_and_wait(kEpInputGradientsReady, context.stream);
    // dL/dx[t] = sum over t's kept choices of the dL/dX rows, read straight from the peers.
    peers_->pull_combine(kOutputRegion, plan.send_rows(), row_bytes, local_experts(),
                         routing_.expert_offsets.as<int32_t>(), dispatcher_->peer_rows(),
                         map_.choice_rows.as<int32_t>(), nullptr, tokens, config_.k_max, activation_dtype_, grad_x.data,
                         nullptr, context.stream);
  } else {
    for (int chunk = 0; chunk < chunks; ++chunk) {
      dispatcher_->wait_dispatched(context, chunk);
      experts_backward(context, chunk, weights, gradients);
      dispatcher_->combine(context, chunk, received, grad_rows);  // dL/dX rows, back into grad_rows
    }
    dispatcher_->wait_combined(context);
    ops::permute_backward(context, grad_rows, map_, tokens, grad_x);
  }
  has_forward_ = false;  // hidden_post now holds dL/dA

  if (!jittered_) {
    ops::gemm(context, false, true, 1.0f, grad_logits_compute, weights.router, 1.0f, grad_x);  // grad_x += G Wr^T
    return;
  }
  // x_r = x * u elementwise, so dL/dx gains u * (G Wr^T): the jitter op applied to the gradient.
  Tensor router_grad_input = rows(router_grad_input_, activation_dtype_, 0, tokens, d_model);
  Tensor jitter_grad_input = rows(jitter_grad_input_, activation_dtype_, 0, tokens, d_model);
  ops::gemm(context, false, true, 1.0f, grad_logits_compute, weights.router, 0.0f, router_grad_input);
  ops::apply_jitter(context, router_grad_input, config_.jitter_eps, config_.jitter_seed, config_.jitter_stream, step_,
                    jitter_grad_input);
  ops::add_into(context, jitter_grad_input, grad_x);
}

void MoeEpLayer::experts_backward(const ExecContext& context, int chunk, const MoeWeights& weights,
                                  MoeGradients& gradients) {
  const ExpertExchangePlan& plan = dispatcher_->plan();
  const int first = plan.chunk_first_expert(chunk), count = plan.chunk_end_expert(chunk) - first;
  const int64_t row_begin = plan.chunk_row_begin(chunk), chunk_rows = plan.chunk_row_end(chunk) - row_begin;
  Tensor grad_w1 = expert_slice(gradients.w1, first, count), grad_w2 = expert_slice(gradients.w2, first, count);
  if (chunk_rows == 0) {  // no tokens reached these experts: their gradients are zero
    ops::fill_zero(context, grad_w1);
    ops::fill_zero(context, grad_w2);
    return;
  }
  Tensor grad_rows_all = expert_rows(true, 0, plan.expert_rows());
  Tensor received;
  if (!peers_) {  // nvlink: the peers wrote dL/dO into the layout already (padding zeroed)
    received = rows(receive_rows_, activation_dtype_, 0, plan.recv_rows(), config_.d_model);
    dispatcher_->to_expert_layout(context, chunk, received, grad_rows_all);  // dL/dO, padding rows zero
  }

  const Tensor input = expert_rows(false, row_begin, chunk_rows);
  const Tensor hidden_pre = rows(hidden_pre_, activation_dtype_, row_begin, chunk_rows, config_.w1_columns());
  Tensor hidden_post = rows(hidden_post_, activation_dtype_, row_begin, chunk_rows, config_.expert_d_ff);
  Tensor grad_expert_rows = expert_rows(true, row_begin, chunk_rows);
  Tensor grad_hidden_pre = rows(grad_hidden_pre_, activation_dtype_, row_begin, chunk_rows, config_.w1_columns());
  const Tensor offsets = dispatcher_->chunk_offsets(chunk);
  ops::grouped_gemm_weight_grad(context, hidden_post, grad_expert_rows, offsets, grad_w2, config_.segment_alignment);
  // dL/dH = act'(H) * (dL/dO W2^T), fused where possible; the unfused path puts dL/dA in A's buffer
  // (A is dead once dW2 has read it).
  Tensor& grad_hidden_post = hidden_post;
  ops::grouped_gemm_activation_backward(context, config_.activation, grad_expert_rows,
                                        expert_slice(weights.w2, first, count), offsets, hidden_pre, grad_hidden_post,
                                        grad_hidden_pre, config_.segment_alignment);
  ops::grouped_gemm_weight_grad(context, input, grad_hidden_pre, offsets, grad_w1, config_.segment_alignment);
  ops::grouped_gemm(context, grad_hidden_pre, expert_slice(weights.w1, first, count), true, offsets, grad_expert_rows,
                    config_.segment_alignment);
  if (!peers_) dispatcher_->from_expert_layout(context, chunk, grad_rows_all, received);
}

// ---- Host reads ------------------------------------------------------------------------------

MoeLosses MoeEpLayer::read_losses(const ExecContext& context) const {
  return read_routing_losses(context, routing_, float_dtype_, "MoeEpLayer");
}

// padded_rows here is the packed send layout: the rows this rank sent.
MoeRoutingStats MoeEpLayer::read_routing_stats(const ExecContext& context) const {
  return read_routing_scalars(context, routing_, "MoeEpLayer");
}

MoeExchangeStats MoeEpLayer::exchange_stats() const {
  const ExpertExchangePlan& plan = dispatcher_->plan();
  MoeExchangeStats stats;
  stats.sent_rows = plan.send_rows();
  stats.received_rows = plan.recv_rows();
  stats.expert_rows = plan.expert_rows();
  return stats;
}

}  // namespace switchyard
