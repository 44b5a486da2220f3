// Backend dispatch for the dense transformer ops of src/ops/model_ops.h, in the style of
// src/ops/ops.h: model code calls model_dispatch::NAME(context, ...) and never names a backend.
//
// Each function checks that its tensors live on context.device and calls cpu::NAME or (builds
// with SWITCHYARD_WITH_CUDA) cuda::NAME on context.stream. The math, shapes and dtypes are those
// of src/ops/model_ops.h. (src/ops/ops.h is expected to grow ops:: wrappers for these ops; when it
// does, these become one-line forwards or go away.)
#pragma once

#include <vector>

#include "src/ops/model_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace model_dispatch {

void embedding_forward(const ExecContext& context, const Tensor& tokens, const Tensor& token_table,
                       const Tensor* position_table, int64_t seq_len, Tensor& out);
void embedding_backward(const ExecContext& context, const Tensor& tokens, const Tensor& grad_out, int64_t seq_len,
                        bool accumulate, Tensor& grad_token_table, Tensor* grad_position_table);

void layernorm_forward(const ExecContext& context, const Tensor& x, const Tensor& weight, const Tensor& bias,
                       float eps, Tensor& out, Tensor& mean, Tensor& rstd);
void layernorm_backward(const ExecContext& context, const Tensor& x, const Tensor& weight, const Tensor& mean,
                        const Tensor& rstd, const Tensor& grad_out, Tensor& grad_x, Tensor& grad_weight,
                        Tensor& grad_bias);
void rmsnorm_forward(const ExecContext& context, const Tensor& x, const Tensor& weight, float eps, Tensor& out,
                     Tensor& rstd);
void rmsnorm_backward(const ExecContext& context, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                      const Tensor& grad_out, Tensor& grad_x, Tensor& grad_weight);

void rotary_forward(const ExecContext& context, const AttentionShape& shape, const Tensor& qkv, double base,
                    int64_t position_offset, Tensor& qkv_out);
void rotary_backward(const ExecContext& context, const AttentionShape& shape, const Tensor& grad_qkv_out,
                     double base, int64_t position_offset, Tensor& grad_qkv);

void attention_forward(const ExecContext& context, const AttentionShape& shape, const Tensor& qkv, Tensor& out,
                       Tensor& softmax_stats, Tensor& workspace);
void attention_backward(const ExecContext& context, const AttentionShape& shape, const Tensor& qkv,
                        const Tensor& out, const Tensor& grad_out, const Tensor& softmax_stats, Tensor& workspace,
                        Tensor& grad_qkv);

void cross_entropy(const ExecContext& context, const Tensor& logits, const Tensor& targets, float grad_scale,
                   Tensor& token_losses, Tensor& summary, Tensor* grad_logits);

void adamw_step(const ExecContext& context, const std::vector<AdamWTensor>& tensors, const AdamWParams& params);
void grad_norm_and_check(const ExecContext& context, const std::vector<Tensor>& tensors, Tensor& result);

}  // namespace model_dispatch
}  // namespace switchyard
