// Backend dispatch (src/ops/ops.h): check that every tensor lives on the context's device, then
// call cpu:: or, in CUDA builds, cuda:: on the context's stream. Also the memory helpers and
// RoutingBuffers.
#include "src/ops/ops.h"

#include <initializer_list>
#include <limits>

#if defined(SWITCHYARD_WITH_CUDA)
#include "src/core/cuda_check.h"
#endif

namespace switchyard {

namespace {

void expect_on_device(const ExecContext& context, const char* op, std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* tensor : tensors) {
    SY_CHECK(tensor->device == context.device, "ops::", op, ": tensor ", tensor->describe(), " is not on ",
             device_kind_name(context.device), ", the device of the execution context");
  }
}

void expect_routing_on_device(const ExecContext& context, const char* op, const RoutingResult& routing) {
  expect_on_device(context, op,
                   {&routing.expert_ids, &routing.gates, &routing.slots, &routing.token_k, &routing.logsumexp,
                    &routing.expert_counts, &routing.first_choice_counts, &routing.prob_sums,
                    &routing.expert_offsets, &routing.scalars, &routing.losses});
}

[[noreturn]] void no_cuda_backend(const char* op) {
  SY_THROW("ops::", op, ": the context asks for CUDA but this build of switchyard has no CUDA backend");
}

bool is_cpu(const ExecContext& context) { return context.device == DeviceKind::cpu; }

#if defined(SWITCHYARD_WITH_CUDA)
cudaStream_t cuda_stream(const ExecContext& context) { return static_cast<cudaStream_t>(context.stream); }
#endif

}  // namespace

// With CUDA, `call` runs; without it, asking for CUDA is an error naming the op.
#if defined(SWITCHYARD_WITH_CUDA)
#define SY_CUDA_BACKEND(op, call) call
#else
#define SY_CUDA_BACKEND(op, call) no_cuda_backend(op)
#endif

namespace ops {

void route(const ExecContext& context, const Tensor& logits, const Tensor* complexity, const RoutingParams& params,
           RoutingResult& result) {
  expect_on_device(context, "route", {&logits});
  if (complexity) expect_on_device(context, "route", {complexity});
  expect_routing_on_device(context, "route", result);
  if (is_cpu(context)) return cpu::route(logits, complexity, params, result);
  SY_CUDA_BACKEND("route", cuda::route(logits, complexity, params, result, context.stream));
}

void route_backward(const ExecContext& context, const Tensor& logits, const Tensor& grad_gates,
                    const RoutingResult& routing, const RoutingParams& params, float grad_aux_scale,
                    float grad_z_scale, Tensor& grad_logits) {
  expect_on_device(context, "route_backward", {&logits, &grad_gates, &grad_logits});
  expect_routing_on_device(context, "route_backward", routing);
  if (is_cpu(context))
    return cpu::route_backward(logits, grad_gates, routing, params, grad_aux_scale, grad_z_scale, grad_logits);
  SY_CUDA_BACKEND("route_backward", cuda::route_backward(logits, grad_gates, routing, params, grad_aux_scale,
                                                         grad_z_scale, grad_logits, context.stream));
}

void permute(const ExecContext& context, const Tensor& tokens, const RoutingResult& routing,
             const RoutingParams& params, Tensor& permuted, DispatchMap& map) {
  expect_on_device(context, "permute", {&tokens, &permuted, &map.choice_rows, &map.row_tokens});
  expect_routing_on_device(context, "permute", routing);
  if (is_cpu(context)) return cpu::permute(tokens, routing, params, permuted, map);
  SY_CUDA_BACKEND("permute", cuda::permute(tokens, routing, params, permuted, map, context.stream));
}

void permute_backward(const ExecContext& context, const Tensor& grad_permuted, const DispatchMap& map,
                      int64_t num_tokens, Tensor& grad_tokens) {
  expect_on_device(context, "permute_backward", {&grad_permuted, &map.choice_rows, &map.row_tokens, &grad_tokens});
  if (is_cpu(context)) return cpu::permute_backward(grad_permuted, map, num_tokens, grad_tokens);
  SY_CUDA_BACKEND("permute_backward",
                  cuda::permute_backward(grad_permuted, map, num_tokens, grad_tokens, context.stream));
}

void unpermute_combine(const ExecContext& context, const Tensor& expert_outputs, const RoutingResult& routing,
                       const DispatchMap& map, Tensor& combined) {
  expect_on_device(context, "unpermute_combine", {&expert_outputs, &map.choice_rows, &map.row_tokens, &combined});
  expect_routing_on_device(context, "unpermute_combine", routing);
  if (is_cpu(context)) return cpu::unpermute_combine(expert_outputs, routing, map, combined);
  SY_CUDA_BACKEND("unpermute_combine", cuda::unpermute_combine(expert_outputs, routing, map, combined, context.stream));
}

void unpermute_combine_backward(const ExecContext& context, const Tensor& grad_combined,
                                const Tensor& expert_outputs, const RoutingResult& routing, const DispatchMap& map,
                                Tensor& grad_expert_outputs, Tensor& grad_gates) {
  expect_on_device(context, "unpermute_combine_backward",
                   {&grad_combined, &expert_outputs, &map.choice_rows, &map.row_tokens, &grad_expert_outputs,
                    &grad_gates});
  expect_routing_on_device(context, "unpermute_combine_backward", routing);
  if (is_cpu(context))
    return cpu::unpermute_combine_backward(grad_combined, expert_outputs, routing, map, grad_expert_outputs,
                                           grad_gates);
  SY_CUDA_BACKEND("unpermute_combine_backward",
                  cuda::unpermute_combine_backward(grad_combined, expert_outputs, routing, map, grad_expert_outputs,
                                                   grad_gates, context.stream));
}

void grouped_gemm(const ExecContext& context, const Tensor& a, const Tensor& b, bool trans_b,
                  const Tensor& expert_offsets, Tensor& c, [[maybe_unused]] int segment_alignment,
                  [[maybe_unused]] const Tensor* row_tokens) {
  expect_on_device(context, "grouped_gemm", {&a, &b, &expert_offsets, &c});
  if (is_cpu(context)) return cpu::grouped_gemm(a, b, trans_b, expert_offsets, c);
  SY_CUDA_BACKEND("grouped_gemm",
                  cuda::grouped_gemm(a, b, trans_b, expert_offsets, c, context.stream, segment_alignment,
                                     row_tokens));
}

void grouped_gemm_weight_grad(const ExecContext& context, const Tensor& a, const Tensor& g,
                              const Tensor& expert_offsets, Tensor& grad_b, [[maybe_unused]] int segment_alignment,
                              [[maybe_unused]] const Tensor* row_tokens) {
  expect_on_device(context, "grouped_gemm_weight_grad", {&a, &g, &expert_offsets, &grad_b});
  if (is_cpu(context)) return cpu::grouped_gemm_weight_grad(a, g, expert_offsets, grad_b);
  SY_CUDA_BACKEND("grouped_gemm_weight_grad",
                  cuda::grouped_gemm_weight_grad(a, g, expert_offsets, grad_b, context.stream, segment_alignment,
                                                 row_tokens));
}

void activation_forward(const ExecContext& context, ExpertActivation activation, const Tensor& pre, Tensor& post) {
  expect_on_device(context, "activation_forward", {&pre, &post});
  if (is_cpu(context)) return cpu::activation_forward(activation, pre, post);
  SY_CUDA_BACKEND("activation_forward", cuda::activation_forward(activation, pre, post, context.stream));
}

void activation_backward(const ExecContext& context, ExpertActivation activation, const Tensor& pre,
                         const Tensor& grad_post, Tensor& grad_pre) {
  expect_on_device(context, "activation_backward", {&pre, &grad_post, &grad_pre});
  if (is_cpu(context)) return cpu::activation_backward(activation, pre, grad_post, grad_pre);
  SY_CUDA_BACKEND("activation_backward",
                  cuda::activation_backward(activation, pre, grad_post, grad_pre, context.stream));
}

// [[maybe_unused]]: builds without CUDA read these parameters on the CUDA path only.
void grouped_gemm_activation(const ExecContext& context, ExpertActivation activation, const Tensor& a,
                             const Tensor& w1, const Tensor& expert_offsets, Tensor& pre, Tensor& post,
                             [[maybe_unused]] bool keep_pre, [[maybe_unused]] int segment_alignment,
                             [[maybe_unused]] const Tensor* row_tokens) {
  expect_on_device(context, "grouped_gemm_activation", {&a, &w1, &expert_offsets, &pre, &post});
  if (is_cpu(context)) return cpu::grouped_gemm_activation(activation, a, w1, expert_offsets, pre, post);
  SY_CUDA_BACKEND("grouped_gemm_activation",
                  cuda::grouped_gemm_activation(activation, a, w1, expert_offsets, pre, post, keep_pre,
                                                context.stream, segment_alignment, row_tokens));
}

void grouped_gemm_activation_backward(const ExecContext& context, ExpertActivation activation,
                                      const Tensor& grad_out, const Tensor& w2, const Tensor& expert_offsets,
                                      const Tensor& pre, Tensor& grad_post, Tensor& grad_pre,
                                      [[maybe_unused]] int segment_alignment,
                                      [[maybe_unused]] const Tensor* row_tokens) {
  expect_on_device(context, "grouped_gemm_activation_backward",
                   {&grad_out, &w2, &expert_offsets, &pre, &grad_post, &grad_pre});
  if (is_cpu(context))
    return cpu::grouped_gemm_activation_backward(activation, grad_out, w2, expert_offsets, pre, grad_post, grad_pre);
  SY_CUDA_BACKEND("grouped_gemm_activation_backward",
                  cuda::grouped_gemm_activation_backward(activation, grad_out, w2, expert_offsets, pre, grad_post,
                                                         grad_pre, context.stream, segment_alignment, row_tokens));
}

bool fuses_expert_activation(const ExecContext& context, [[maybe_unused]] ExpertActivation activation,
                             [[maybe_unused]] DType dtype, [[maybe_unused]] int64_t d_model,
                             [[maybe_unused]] int64_t d_ff, [[maybe_unused]] int segment_alignment) {
  if (is_cpu(context)) return false;
#if defined(SWITCHYARD_WITH_CUDA)
  return cuda::fuses_expert_activation(activation, dtype, d_model, d_ff, segment_alignment);
#else
  no_cuda_backend("fuses_expert_activation");
#endif
}

void apply_jitter(const ExecContext& context, const Tensor& x, float eps, uint64_t seed, uint32_t stream_id,
                  uint64_t offset, Tensor& out) {
  expect_on_device(context, "apply_jitter", {&x, &out});
  if (is_cpu(context)) return cpu::apply_jitter(x, eps, seed, stream_id, offset, out);
  SY_CUDA_BACKEND("apply_jitter", cuda::apply_jitter(x, eps, seed, stream_id, offset, out, context.stream));
}

void gemm(const ExecContext& context, bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b,
          float beta, Tensor& c) {
  expect_on_device(context, "gemm", {&a, &b, &c});
  if (is_cpu(context)) return cpu::gemm(trans_a, trans_b, alpha, a, b, beta, c);
  SY_CUDA_BACKEND("gemm", cuda::gemm(trans_a, trans_b, alpha, a, b, beta, c, context.stream));
}

void fill_zero(const ExecContext& context, Tensor& tensor) {
  expect_on_device(context, "fill_zero", {&tensor});
  if (tensor.bytes() == 0) return;
  if (is_cpu(context)) return device_memset(tensor.data, DeviceKind::cpu, 0, tensor.bytes());
  SY_CUDA_BACKEND("fill_zero", CUDA_CHECK(cudaMemsetAsync(tensor.data, 0, tensor.bytes(), cuda_stream(context))));
}

void copy(const ExecContext& context, const Tensor& source, Tensor& destination) {
  SY_CHECK(source.dtype == destination.dtype && source.bytes() == destination.bytes(),
           "ops::copy: source ", source.describe(), " and destination ", destination.describe(),
           " differ in dtype or size");
  for (const Tensor* tensor : std::initializer_list<const Tensor*>{&source, &destination})
    SY_CHECK(tensor->device == DeviceKind::cpu || tensor->device == context.device, "ops::copy: tensor ",
             tensor->describe(), " is neither on the host nor on the context's device");
  if (source.bytes() == 0) return;
  if (source.device == DeviceKind::cpu && destination.device == DeviceKind::cpu) {
    // Host to host while device work may still write the source would race; CPU contexts have none.
    return device_copy(destination.data, DeviceKind::cpu, source.data, DeviceKind::cpu, source.bytes());
  }
#if defined(SWITCHYARD_WITH_CUDA)
  CUDA_CHECK(cudaMemcpyAsync(destination.data, source.data, source.bytes(), cudaMemcpyDefault, cuda_stream(context)));
  if (destination.device == DeviceKind::cpu) CUDA_CHECK(cudaStreamSynchronize(cuda_stream(context)));
#else
  no_cuda_backend("copy");
#endif
}

void convert(const ExecContext& context, const Tensor& source, Tensor& destination) {
  expect_on_device(context, "convert", {&source, &destination});
  SY_CHECK(source.rank == destination.rank && source.shape == destination.shape, "ops::convert: shapes differ: ",
           source.describe(), " vs ", destination.describe());
  if (source.dtype == destination.dtype) return copy(context, source, destination);
  if (is_cpu(context)) return cpu::convert(source, destination);
  // Jitter with eps = 0 multiplies by exactly 1: a plain cast, reading one type and writing another.
  SY_CUDA_BACKEND("convert", cuda::apply_jitter(source, 0.0f, 0, 0, 0, destination, context.stream));
}

void add_into(const ExecContext& context, const Tensor& addend, Tensor& accumulator) {
  expect_on_device(context, "add_into", {&addend, &accumulator});
  if (is_cpu(context)) return cpu::add_into(addend, accumulator);
#if defined(SWITCHYARD_WITH_CUDA)
  SY_CHECK(addend.dtype == accumulator.dtype && addend.numel() == accumulator.numel(), "ops::add_into: ",
           addend.describe(), " and ", accumulator.describe(), " differ in dtype or size");
  if (addend.numel() == 0) return;
  cublasHandle_t handle = thread_cublas_handle();
  CUBLAS_CHECK(cublasSetStream(handle, cuda_stream(context)));
  CUBLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
  const bool is_double = addend.dtype == DType::f64;
  const double one_double = 1.0;
  const float one_float = 1.0f;
  CUBLAS_CHECK(cublasAxpyEx_64(handle, addend.numel(), is_double ? static_cast<const void*>(&one_double) : &one_float,
                               is_double ? CUDA_R_64F : CUDA_R_32F, addend.data, cuda_data_type_of(addend.dtype, "ops::add_into"), 1,
                               accumulator.data, cuda_data_type_of(accumulator.dtype, "ops::add_into"), 1,
                               is_double ? CUDA_R_64F : CUDA_R_32F));
#else
  no_cuda_backend("add_into");
#endif
}

void synchronize(const ExecContext& context) {
  if (is_cpu(context)) return;
  SY_CUDA_BACKEND("synchronize", CUDA_CHECK(cudaStreamSynchronize(cuda_stream(context))));
}

}  // namespace ops

#undef SY_CUDA_BACKEND

// ---- RoutingBuffers ----------------------------------------------------------------------------

RoutingBuffers::RoutingBuffers(DeviceKind device, DType float_dtype, int64_t max_tokens, int num_experts, int k_max,
                               int64_t max_rows)
    : device_(device), float_dtype_(float_dtype), max_tokens_(max_tokens), max_rows_(max_rows),
      num_experts_(num_experts), k_max_(k_max) {
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
