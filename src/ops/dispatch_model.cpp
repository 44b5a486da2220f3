// Backend dispatch of the dense GEMM (src/ops/gemm.h) and the dense transformer ops
// (src/ops/model_ops.h); declared in src/ops/ops.h, rules in src/ops/dispatch.h.
#include "src/ops/dispatch.h"

namespace switchyard {
namespace ops {

using dispatch::expect_on_device;
using dispatch::is_cpu;

void gemm(const ExecContext& context, bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b,
          float beta, Tensor& c, const Tensor* addend) {
  expect_on_device(context, "gemm", {&a, &b, &c, addend});
  if (is_cpu(context)) return cpu::gemm(trans_a, trans_b, alpha, a, b, beta, c, addend);
  SY_CUDA_BACKEND("gemm", cuda::gemm(trans_a, trans_b, alpha, a, b, beta, c, addend, context.stream));
}

void embedding_forward(const ExecContext& context, const Tensor& tokens, const Tensor& token_table,
                       const Tensor* position_table, int64_t seq_len, Tensor& out) {
  expect_on_device(context, "embedding_forward", {&tokens, &token_table, position_table, &out});
  if (is_cpu(context)) return cpu::embedding_forward(tokens, token_table, position_table, seq_len, out);
  SY_CUDA_BACKEND("embedding_forward",
                  cuda::embedding_forward(tokens, token_table, position_table, seq_len, out, context.stream));
}

void embedding_backward(const ExecContext& context, const Tensor& tokens, const Tensor& grad_out, int64_t seq_len,
                        bool accumulate, Tensor& grad_token_table, Tensor* grad_position_table) {
  expect_on_device(context, "embedding_backward", {&tokens, &grad_out, &grad_token_table, grad_position_table});
  if (is_cpu(context))
    return cpu::embedding_backward(tokens, grad_out, seq_len, accumulate, grad_token_table, grad_position_table);
  SY_CUDA_BACKEND("embedding_backward", cuda::embedding_backward(tokens, grad_out, seq_len, accumulate,
                                                                 grad_token_table, grad_position_table,
                                                                 context.stream));
}

void layernorm_forward(const ExecContext& context, const Tensor& x, const Tensor& weight, const Tensor& bias,
                       float eps, Tensor& out, Tensor& mean, Tensor& rstd) {
  expect_on_device(context, "layernorm_forward", {&x, &weight, &bias, &out, &mean, &rstd});
  if (is_cpu(context)) return cpu::layernorm_forward(x, weight, bias, eps, out, mean, rstd);
  SY_CUDA_BACKEND("layernorm_forward",
                  cuda::layernorm_forward(x, weight, bias, eps, out, mean, rstd, context.stream));
}

void layernorm_backward(const ExecContext& context, const Tensor& x, const Tensor& weight, const Tensor& mean,
                        const Tensor& rstd, const Tensor& grad_out, Tensor& grad_x, Tensor& grad_weight,
                        Tensor& grad_bias, NormAccumulate accumulate) {
  expect_on_device(context, "layernorm_backward",
                   {&x, &weight, &mean, &rstd, &grad_out, &grad_x, &grad_weight, &grad_bias});
  if (is_cpu(context))
    return cpu::layernorm_backward(x, weight, mean, rstd, grad_out, grad_x, grad_weight, grad_bias, accumulate);
  SY_CUDA_BACKEND("layernorm_backward", cuda::layernorm_backward(x, weight, mean, rstd, grad_out, grad_x, grad_weight,
                                                                 grad_bias, context.stream, accumulate));
}

void rmsnorm_forward(const ExecContext& context, const Tensor& x, const Tensor& weight, float eps, Tensor& out,
                     Tensor& rstd) {
  expect_on_device(context, "rmsnorm_forward", {&x, &weight, &out, &rstd});
  if (is_cpu(context)) return cpu::rmsnorm_forward(x, weight, eps, out, rstd);
  SY_CUDA_BACKEND("rmsnorm_forward", cuda::rmsnorm_forward(x, weight, eps, out, rstd, context.stream));
}

void rmsnorm_backward(const ExecContext& context, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                      const Tensor& grad_out, Tensor& grad_x, Tensor& grad_weight, NormAccumulate accumulate) {
  expect_on_device(context, "rmsnorm_backward", {&x, &weight, &rstd, &grad_out, &grad_x, &grad_weight});
  if (is_cpu(context)) return cpu::rmsnorm_backward(x, weight, rstd, grad_out, grad_x, grad_weight, accumulate);
  SY_CUDA_BACKEND("rmsnorm_backward",
                  cuda::rmsnorm_backward(x, weight, rstd, grad_out, grad_x, grad_weight, context.stream, accumulate));
}

void rotary_forward(const ExecContext& context, const AttentionShape& shape, const Tensor& qkv, double base,
                    int64_t position_offset, Tensor& qkv_out) {
  expect_on_device(context, "rotary_forward", {&qkv, &qkv_out});
  if (is_cpu(context)) return cpu::rotary_forward(shape, qkv, base, position_offset, qkv_out);
  SY_CUDA_BACKEND("rotary_forward",
                  cuda::rotary_forward(shape, qkv, base, position_offset, qkv_out, context.stream));
}

void rotary_backward(const ExecContext& context, const AttentionShape& shape, const Tensor& grad_qkv_out,
                     double base, int64_t position_offset, Tensor& grad_qkv) {
  expect_on_device(context, "rotary_backward", {&grad_qkv_out, &grad_qkv});
  if (is_cpu(context)) return cpu::rotary_backward(shape, grad_qkv_out, base, position_offset, grad_qkv);
  SY_CUDA_BACKEND("rotary_backward",
                  cuda::rotary_backward(shape, grad_qkv_out, base, position_offset, grad_qkv, context.stream));
}

void attention_forward(const ExecContext& context, const AttentionShape& shape, const Tensor& qkv, Tensor& out,
                       Tensor& softmax_stats, Tensor& workspace) {
  expect_on_device(context, "attention_forward", {&qkv, &out, &softmax_stats});
  if (is_cpu(context)) return cpu::attention_forward(shape, qkv, out, softmax_stats, workspace);
  SY_CUDA_BACKEND("attention_forward",
                  cuda::attention_forward(shape, qkv, out, softmax_stats, workspace, context.stream));
}

void attention_backward(const ExecContext& context, const AttentionShape& shape, const Tensor& qkv,
                        const Tensor& out, const Tensor& grad_out, const Tensor& softmax_stats, Tensor& workspace,
                        Tensor& grad_qkv, bool deterministic) {
  expect_on_device(context, "attention_backward", {&qkv, &out, &grad_out, &softmax_stats, &grad_qkv});
  if (is_cpu(context))
    return cpu::attention_backward(shape, qkv, out, grad_out, softmax_stats, workspace, grad_qkv);
  SY_CUDA_BACKEND("attention_backward", cuda::attention_backward(shape, qkv, out, grad_out, softmax_stats, workspace,
                                                                 grad_qkv, deterministic, context.stream));
}

void cross_entropy(const ExecContext& context, const Tensor& logits, const Tensor& targets, float grad_scale,
                   Tensor& token_losses, Tensor& summary, Tensor* grad_logits) {
  expect_on_device(context, "cross_entropy", {&logits, &targets, &token_losses, &summary, grad_logits});
  if (is_cpu(context)) return cpu::cross_entropy(logits, targets, grad_scale, token_losses, summary, grad_logits);
  SY_CUDA_BACKEND("cross_entropy", cuda::cross_entropy(logits, targets, grad_scale, token_losses, summary,
                                                       grad_logits, context.stream));
}

void adamw_step(const ExecContext& context, const std::vector<AdamWTensor>& tensors, const AdamWParams& params) {
  for (const AdamWTensor& entry : tensors) {
    expect_on_device(context, "adamw_step", {&entry.param, &entry.grad, &entry.exp_avg, &entry.exp_avg_sq});
    if (entry.compute_copy.data) expect_on_device(context, "adamw_step", {&entry.compute_copy});
  }
  if (is_cpu(context)) return cpu::adamw_step(tensors, params);
  SY_CUDA_BACKEND("adamw_step", cuda::adamw_step(tensors, params, context.stream));
}

void grad_norm_and_check(const ExecContext& context, const std::vector<Tensor>& tensors, Tensor& result) {
  for (const Tensor& tensor : tensors) expect_on_device(context, "grad_norm_and_check", {&tensor});
  expect_on_device(context, "grad_norm_and_check", {&result});
  if (is_cpu(context)) return cpu::grad_norm_and_check(tensors, result);
  SY_CUDA_BACKEND("grad_norm_and_check", cuda::grad_norm_and_check(tensors, result, context.stream));
}

}  // namespace ops
}  // namespace switchyard
