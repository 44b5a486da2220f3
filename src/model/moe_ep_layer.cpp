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

namespace {
// The memory's EP parts, made empty on first use (the first layer on it creates the parts).
MoeEpParts& ep_parts_of(MoeLayerMemory& memory) {
  if (!memory.ep_parts) memory.ep_parts = std::make_shared<MoeEpParts>();
  return *memory.ep_parts;
}
}  // namespace

MoeEpLayer::MoeEpLayer(const MoeLayerConfig& config, std::shared_ptr<Communicator> expert_parallel, DeviceKind device,
                       DType activation_dtype, int64_t max_tokens, const EpLayerOptions& exchange,
                       std::shared_ptr<MoeLayerMemory> memory)
    : config_(config), device_(device), activation_dtype_(activation_dtype),
      memory_(memory ? std::move(memory) : std::make_shared<MoeLayerMemory>(device)),
      parts_(ep_parts_of(*memory_).parts), ep_parts_(*memory_->ep_parts) {
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
  SY_CHECK(expert_parallel != nullptr && config_.moe.num_experts % expert_parallel->size() == 0,
           "MoeEpLayer: ", config_.moe.num_experts, " experts do not split over the expert-parallel group");
  local_experts_ = config_.moe.num_experts / expert_parallel->size();
  first_expert_ = expert_parallel->rank() * local_experts_;
  create_parts(expert_parallel, exchange);
  create_replicas(expert_parallel, exchange);
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
  const int64_t tokens =
      expect_moe_forward_io("MoeEpLayer", context, device_, x, y, config_.d_model, activation_dtype_, max_tokens_);
  check_weights(weights, activation_dtype_, "weights");
  has_forward_ = false;
  tokens_ = tokens;

  const RoutingResult& routing = router_.forward(context, x, weights.router, weights.router_bias, args, observer_);
  // Each exchange permutes its rows by expert while its counts travel (a host sync per part).
  run_stage(context, "exchange plan", [&] {
    if (replicates_)
      start_replicated(context, x, routing, weights);
    else
      start_parts(context, x, routing);
    for (Part& part : parts_) ensure_hidden_capacity(context, part, args.training);
  });
  inject_fault_point("ep_layer_dispatch");  // tests: a rank that stops between the counts and the rows

  // Every dispatch first: a part's rows travel while the experts compute the part before it.
  run_stage(context, "dispatch", [&] {
    for (Part& part : parts_) part.exchange->dispatch(context, EpPass::forward);
  });
  for (Part& part : parts_) {
    for (int chunk = 0; chunk < part.exchange->chunks(); ++chunk) {
      run_stage(context, "receive", [&] { part.exchange->receive(context, EpPass::forward, chunk); });
      run_stage(context, "experts", [&] {
        if (replicates_)
          replicated_experts_forward(context, weights);  // one part, one chunk
        else
          experts_forward(context, part, chunk, weights);
      });
      run_stage(context, "send back", [&] { part.exchange->send_back(context, EpPass::forward, chunk); });
    }
  }
  run_stage(context, "combine", [&] {
    for (Part& part : parts_) {
      Tensor part_y = token_rows(y, part.first_token, part.tokens);
      part.exchange->combine(context, EpPass::forward, part_y);
    }
  });
  has_forward_ = true;
  return args.read_losses ? read_losses(context) : MoeLosses{};
}

void MoeEpLayer::experts_forward(const ExecContext& context, Part& part, int chunk, const MoeWeights& weights) {
  const ExpertExchangePlan& plan = part.exchange->plan();
  const int first = plan.chunk_first_expert(chunk), count = plan.chunk_end_expert(chunk) - first;
  const int64_t row_begin = plan.chunk_row_begin(chunk), chunk_rows = plan.chunk_row_end(chunk) - row_begin;
  expert_rows_forward(context, part, row_begin, chunk_rows, part.exchange->chunk_offsets(chunk),
                      expert_slice(weights.w1, first, count), expert_slice(weights.w2, first, count));
}

void MoeEpLayer::expert_rows_forward(const ExecContext& context, Part& part, int64_t row_begin, int64_t rows_count,
                                     const Tensor& offsets, const Tensor& w1, const Tensor& w2) {
  if (rows_count == 0) return;  // no rank routed anything to these experts
  const EpExchange& exchange = *part.exchange;
  Tensor input = exchange.expert_input(row_begin, rows_count);
  Tensor hidden_pre = rows(part.hidden_pre, row_begin, rows_count, config_.w1_columns());
  Tensor hidden_post = rows(part.hidden_post, row_begin, rows_count, config_.moe.expert_d_ff);
  Tensor output = exchange.expert_output(row_begin, rows_count);
  // H and A = act(H): one kernel where the activation fuses into the GEMM (ops::fuses_expert_activation).
  ops::grouped_gemm_activation(context, config_.moe.activation, input, w1, offsets, hidden_pre, hidden_post,
                               /*keep_pre=*/true, config_.moe.segment_alignment);
  ops::grouped_gemm(context, hidden_post, w2, false, offsets, output, config_.moe.segment_alignment);
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
  SY_CHECK(!gradients.accumulate, "MoeEpLayer::backward overwrites the gradients (accumulate through a scratch, "
           "as ExpertParallelMoeBlock does)");

  // A forward in eval mode may have come first and left the backward buffers short.
  for (Part& part : parts_) ensure_hidden_capacity(context, part, /*with_backward=*/true);

  // The combine's backward: dL/dgates of each part's choices (its rows of grad_gates), the dL/dO
  // rows readied; then every dispatch.
  Tensor grad_gates = router_.grad_gates();
  run_stage(context, "combine backward", [&] {
    for (Part& part : parts_) {
      const Tensor part_grad_y = token_rows(grad_y, part.first_token, part.tokens);
      Tensor part_grad_gates = token_rows(grad_gates, part.first_token, part.tokens);
      part.exchange->start_backward(context, part_grad_y, part_grad_gates);
    }
  });
  run_stage(context, "dispatch", [&] {
    for (Part& part : parts_) part.exchange->dispatch(context, EpPass::backward);
  });
  // The router's backward needs only local data: it runs while the gradient rows travel.
  router_.backward(context, aux_grad_scale, z_grad_scale, gradients.router, observer_);
  for (size_t index = 0; index < parts_.size(); ++index) {
    Part& part = parts_[index];
    for (int chunk = 0; chunk < part.exchange->chunks(); ++chunk) {
      run_stage(context, "receive", [&] { part.exchange->receive(context, EpPass::backward, chunk); });
      run_stage(context, "experts", [&] {
        if (replicates_)
          replicated_experts_backward(context, weights, gradients);  // one part, one chunk
        else
          experts_backward(context, part, chunk, weights, gradients, /*accumulate=*/index > 0);
      });
      // dL/dX rows
      run_stage(context, "send back", [&] { part.exchange->send_back(context, EpPass::backward, chunk); });
    }
  }
  run_stage(context, "permute backward", [&] {
    for (Part& part : parts_) {
      Tensor part_grad_x = token_rows(grad_x, part.first_token, part.tokens);
      part.exchange->combine(context, EpPass::backward, part_grad_x);
    }
  });
  has_forward_ = false;  // hidden_post now holds dL/dA
  router_.add_input_gradient(context, weights.router, grad_x, observer_);
}

void MoeEpLayer::experts_backward(const ExecContext& context, Part& part, int chunk, const MoeWeights& weights,
                                  MoeGradients& gradients, bool accumulate) {
  const ExpertExchangePlan& plan = part.exchange->plan();
  const int first = plan.chunk_first_expert(chunk), count = plan.chunk_end_expert(chunk) - first;
  const int64_t row_begin = plan.chunk_row_begin(chunk), chunk_rows = plan.chunk_row_end(chunk) - row_begin;
  Tensor grad_w1 = expert_slice(gradients.w1, first, count), grad_w2 = expert_slice(gradients.w2, first, count);
  expert_rows_backward(context, part, row_begin, chunk_rows, part.exchange->chunk_offsets(chunk),
                       expert_slice(weights.w1, first, count), expert_slice(weights.w2, first, count), grad_w1,
                       grad_w2, /*continue_sums=*/accumulate);
}

void MoeEpLayer::expert_rows_backward(const ExecContext& context, Part& part, int64_t row_begin, int64_t rows_count,
                                      const Tensor& offsets, const Tensor& w1, const Tensor& w2, Tensor& grad_w1,
                                      Tensor& grad_w2, bool continue_sums) {
  if (rows_count == 0) {  // no tokens reached these experts: they add nothing
    if (!continue_sums) {
      ops::fill_zero(context, grad_w1);
      ops::fill_zero(context, grad_w2);
    }
    return;
  }
  const EpExchange& exchange = *part.exchange;
  // The exchange put dL/dO into the output rows (padding rows zero); dL/dX goes back there.
  const Tensor input = exchange.expert_input(row_begin, rows_count);
  const Tensor hidden_pre = rows(part.hidden_pre, row_begin, rows_count, config_.w1_columns());
  Tensor hidden_post = rows(part.hidden_post, row_begin, rows_count, config_.moe.expert_d_ff);
  Tensor grad_expert_rows = exchange.expert_output(row_begin, rows_count);
  Tensor grad_hidden_pre = rows(part.grad_hidden_pre, row_begin, rows_count, config_.w1_columns());
  const int alignment = config_.moe.segment_alignment;
  ops::grouped_gemm_weight_grad(context, hidden_post, grad_expert_rows, offsets, grad_w2, alignment, nullptr,
                                continue_sums);
  // dL/dH = act'(H) * (dL/dO W2^T), fused where possible; the unfused path puts dL/dA in A's buffer
  // (A is dead once dW2 has read it).
  Tensor& grad_hidden_post = hidden_post;
  ops::grouped_gemm_activation_backward(context, config_.moe.activation, grad_expert_rows, w2, offsets, hidden_pre,
                                        grad_hidden_post, grad_hidden_pre, alignment);
  ops::grouped_gemm_weight_grad(context, input, grad_hidden_pre, offsets, grad_w1, alignment, nullptr, continue_sums);
  ops::grouped_gemm(context, grad_hidden_pre, w1, true, offsets, grad_expert_rows, alignment);
}

// ---- Host reads ------------------------------------------------------------------------------

MoeExchangeStats MoeEpLayer::exchange_stats() const {
  MoeExchangeStats total;
  for (const Part& part : parts_) {
    const EpExchangeStats stats = part.exchange->stats();
    total.sent_rows += stats.sent_rows;
    total.received_rows += stats.received_rows;
    total.expert_rows += stats.expert_rows;
    total.network_rows += stats.network_rows;
  }
  return total;
}

std::vector<int64_t> MoeEpLayer::sent_rows_per_expert() const {
  if (replicates_) return replicated_sent_rows_;  // the exchange's counts are by virtual expert
  std::vector<int64_t> total;
  for (const Part& part : parts_) {
    const std::vector<int64_t> rows = part.exchange->sent_rows_per_expert();
    if (rows.empty()) return {};  // the hierarchical exchange: by node first
    total.resize(rows.size(), 0);
    for (size_t expert = 0; expert < rows.size(); ++expert) total[expert] += rows[expert];
  }
  return total;
}

}  // namespace switchyard
