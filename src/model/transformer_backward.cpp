// The transformer's backward pass (math: src/model/transformer.h).
//
// grad_residual carries dL/dx_b down the blocks: it enters block b as dL/dx_{b+1}; the FFN's
// input gradient goes through norm2's backward, which adds it (dL/dx'), then the attention's input
// gradient through norm1's backward, which adds it (dL/dx_b). When accumulating (micro-steps after
// the first) every weight gradient is added in place: GEMMs with beta = 1, the norms and the MoE
// block with their accumulate flags. With options.recompute, a block's backward first
// repeats the recomputed sublayers' forward into the shared buffers (attention from x_b, which
// in mode all also gives x'; the FFN from x'), then runs as without.
#include <algorithm>

#include "src/ops/ops.h"
#include "src/model/transformer_block.h"

namespace switchyard {

void Transformer::allocate_backward_buffers() {
  if (backward_ready_) return;
  const DeviceKind device = options_.device;
  const size_t element = dtype_size(options_.activation_dtype), tokens = size_t(max_tokens_);
  const size_t width = size_t(model_.d_model);
  grad_residual_ = Buffer(device, tokens * width * element);
  grad_a_ = Buffer(device, tokens * width * element);
  grad_b_ = Buffer(device, tokens * width * element);
  grad_qkv_ = Buffer(device, tokens * 3 * width * element);
  grad_attention_ = Buffer(device, tokens * width * element);
  int64_t ffn_w1_columns = 0, ffn_hidden = 0;  // the widest dense FFN (dense blocks, shared experts)
  for (const auto& block : blocks_) {
    ffn_w1_columns = std::max(ffn_w1_columns, block->ffn.w1_columns);
    ffn_hidden = std::max(ffn_hidden, block->ffn.hidden);
  }
  if (ffn_hidden > 0) {
    grad_ffn_pre_ = Buffer(device, tokens * size_t(ffn_w1_columns) * element);
    grad_ffn_post_ = Buffer(device, tokens * size_t(ffn_hidden) * element);
  }
  backward_ready_ = true;
}

void Transformer::dense_ffn_backward(const ExecContext& context, ModelParameters& parameters, const DenseFfn& ffn,
                                     const FfnActivations& saved, const Tensor& input, const Tensor& grad_out,
                                     float input_grad_beta, Tensor& grad_input, bool accumulate) {
  const float beta = accumulate ? 1.0f : 0.0f;
  const Tensor pre = rows(saved.pre, ffn.w1_columns);
  const Tensor post = rows(saved.post, ffn.hidden);
  Tensor grad_pre = rows(grad_ffn_pre_, ffn.w1_columns);
  Tensor grad_post = rows(grad_ffn_post_, ffn.hidden);
  Tensor grad_w2 = parameters.grad(ffn.w2), grad_w1 = parameters.grad(ffn.w1);
  const int64_t tokens = input.dim(0), width = input.dim(1);
  const double flops_1 = matmul_flops(tokens, width, ffn.w1_columns), flops_2 = matmul_flops(tokens, ffn.hidden, width);
  stage(context, "weight grad 2", flops_2,
        [&] { ops::gemm(context, true, false, 1.0f, post, grad_out, beta, grad_w2); });
  stage(context, "data grad 2", flops_2,
        [&] { ops::gemm(context, false, true, 1.0f, grad_out, parameters.compute(ffn.w2), 0.0f, grad_post); });
  stage(context, "activation backward",
        [&] { ops::activation_backward(context, moe_.activation, pre, grad_post, grad_pre); });
  stage(context, "weight grad 1", flops_1,
        [&] { ops::gemm(context, true, false, 1.0f, input, grad_pre, beta, grad_w1); });
  stage(context, "data grad 1", flops_1, [&] {
    ops::gemm(context, false, true, 1.0f, grad_pre, parameters.compute(ffn.w1), input_grad_beta, grad_input);
  });
}

void Transformer::norm_backward(const ExecContext& context, ModelParameters& parameters, int weight, int bias,
                                const Tensor& x, const Tensor& mean, const Tensor& rstd, const Tensor& grad_out,
                                Tensor& grad_x, bool add_to_grad_x, bool accumulate) {
  stage(context, "norm backward", [&] {
    Tensor grad_weight = parameters.grad(weight);
    const Tensor weight_values = parameters.compute(weight);
    // The op adds dx to the residual stream's gradient and the parameter gradients to the
    // micro-steps' sums itself: no scratch, no separate add passes.
    const NormAccumulate mode{add_to_grad_x, accumulate};
    if (model_.norm == NormKind::layernorm) {
      Tensor grad_bias = parameters.grad(bias);
      ops::layernorm_backward(context, x, weight_values, mean, rstd, grad_out, grad_x, grad_weight, grad_bias, mode);
    } else {
      ops::rmsnorm_backward(context, x, weight_values, rstd, grad_out, grad_x, grad_weight, mode);
    }
  });
}

void Transformer::backward(const ExecContext& context, ModelParameters& parameters, float aux_grad_scale,
                           bool accumulate) {
  SY_CHECK(has_training_forward_, "Transformer::backward: no training forward_loss to differentiate");
  SY_CHECK(parameters.grad_dtype() == (options_.device == DeviceKind::cpu ? options_.activation_dtype : DType::f32),
           "Transformer::backward: gradients must be ", options_.device == DeviceKind::cpu ? "the activation dtype"
                                                                                          : "fp32");
  allocate_backward_buffers();
  const int64_t width = model_.d_model;
  const float beta = accumulate ? 1.0f : 0.0f;

  // LM head (tied): logits = h E^T, so dE (+)= dlogits^T h and dh = dlogits E.
  const Tensor& grad_logits = logits_view_;
  Tensor normed = rows(final_norm_out_, width);
  Tensor grad_embedding = parameters.grad(token_embedding_);
  Tensor grad_normed = rows(grad_a_, width);
  stage(context, "LM head backward", [&] {
    ops::gemm(context, true, false, 1.0f, grad_logits, normed, beta, grad_embedding);
    ops::gemm(context, false, false, 1.0f, grad_logits, parameters.compute(token_embedding_), 0.0f, grad_normed);
  });
  Tensor grad_residual = rows(grad_residual_, width);
  Tensor last = rows(residual_.back(), width);
  norm_backward(context, parameters, final_norm_weight_, final_norm_bias_, last, stat_rows(final_mean_),
                stat_rows(final_rstd_), grad_normed, grad_residual, false, accumulate);

  for (size_t index = blocks_.size(); index-- > 0;)
    backward_block(context, parameters, *blocks_[index], aux_grad_scale, accumulate, grad_residual);

  // Embedding: the head already wrote (or added to) dE, so the lookup's gradient is always added.
  stage(context, "embedding backward", [&] {
    Tensor grad_position;
    if (position_embedding_ >= 0) {
      grad_position = parameters.grad(position_embedding_);
      if (!accumulate) ops::fill_zero(context, grad_position);
    }
    ops::embedding_backward(context, tokens_view_, grad_residual, seq_len_, true, grad_embedding,
                            position_embedding_ >= 0 ? &grad_position : nullptr);
  });
}

void Transformer::backward_block(const ExecContext& context, ModelParameters& parameters, Block& block,
                                 float aux_grad_scale, bool accumulate, Tensor& grad_residual) {
  const int64_t width = model_.d_model;
  const float beta = accumulate ? 1.0f : 0.0f;
  const Tensor x = rows(residual_[size_t(block.index)], width);
  Tensor mid = rows(*block.mid, width);
  // Recomputation: the attention first, as in mode all it gives x' (the FFN's input).
  if (recomputes_attention())
    attention_sublayer_forward(context, parameters, block, x, options_.recompute == RecomputeMode::all ? &mid : nullptr,
                               true);
  if (recomputes_ffn()) ffn_sublayer_forward(context, parameters, block, mid, nullptr, true, step_);

  const AttentionActivations& attention_saved = *block.attention;
  const FfnActivations& ffn_saved = *block.ffn_saved;
  Tensor normed2 = rows(ffn_saved.norm_out, width);
  Tensor grad_normed2 = rows(grad_a_, width);

  // FFN sublayer: x_out = x' + FFN(u), u = norm2(x'); grad_residual = dL/dx_out.
  if (!block.is_moe) {
    stage(context, "dense FFN backward", [&] {
      dense_ffn_backward(context, parameters, block.ffn, ffn_saved, normed2, grad_residual, 0.0f, grad_normed2,
                         accumulate);
    });
  } else {
    MoeWeights weights{parameters.compute(block.router), parameters.compute(block.expert_w1),
                       parameters.compute(block.expert_w2)};
    MoeGradients gradients{parameters.grad(block.router), parameters.grad(block.expert_w1),
                           parameters.grad(block.expert_w2), accumulate};
    // The shared experts' backward on their stream, beside the routed layer's: their input
    // gradient goes to grad_b_ (free scratch) and is added after the join.
    SideStream& side = shared_expert_stream(context);
    Tensor grad_shared_input = rows(grad_b_, width);
    if (block.has_shared_experts()) {
      side.fork();
      const ExecContext side_context{context.device, side.stream()};
      stage(side_context, "shared experts backward", [&] {
        dense_ffn_backward(side_context, parameters, block.ffn, ffn_saved, normed2, grad_residual, 0.0f,
                           grad_shared_input, accumulate);
      });
    }
    stage(context, "MoE backward", [&] {
      block.moe->backward(context, grad_residual, weights, aux_grad_scale, aux_grad_scale, grad_normed2, gradients);
    });
    if (block.has_shared_experts()) {
      side.join();
      stage(context, "shared experts backward", [&] { ops::add_into(context, grad_shared_input, grad_normed2); });
    }
  }
  // grad_residual += norm2's input gradient: now dL/dx'.
  norm_backward(context, parameters, block.ffn_norm_weight, block.ffn_norm_bias, mid, stat_rows(ffn_saved.norm_mean),
                stat_rows(ffn_saved.norm_rstd), grad_normed2, grad_residual, true, accumulate);

  // Attention sublayer: x' = x + attention(rotary(norm1(x) Wqkv)) Wo.
  Tensor grad_normed1 = rows(grad_a_, width);
  stage(context, "attention backward", [&] {
    const Tensor attention = rows(attention_saved.attention_out, width);
    Tensor grad_out_weight = parameters.grad(block.out);
    Tensor grad_attention = rows(grad_attention_, width);
    const int64_t tokens = attention.dim(0);
    stage(context, "output projection backward", 2 * matmul_flops(tokens, width, width), [&] {
      ops::gemm(context, true, false, 1.0f, attention, grad_residual, beta, grad_out_weight);
      ops::gemm(context, false, true, 1.0f, grad_residual, parameters.compute(block.out), 0.0f, grad_attention);
    });
    const AttentionShape shape{batch_, seq_len_, model_.n_heads, model_.head_dim()};
    const Tensor qkv = rows(attention_saved.qkv_rows, 3 * width);
    const Tensor stats = attention_saved.attention_stats.view(stats_dtype_, {batch_, model_.n_heads, seq_len_});
    Tensor workspace(attention_workspace_.data(), DType::u8, options_.device, {attention_workspace_bytes_});
    Tensor grad_qkv = rows(grad_qkv_, 3 * width);
    stage(context, "attention core backward", 2 * causal_attention_flops(shape), [&] {
      ops::attention_backward(context, shape, qkv, attention, grad_attention, stats, workspace, grad_qkv,
                              options_.deterministic);
    });
    if (model_.positions == PositionKind::rotary)
      stage(context, "rotary backward",
            [&] { ops::rotary_backward(context, shape, grad_qkv, kRotaryBase, 0, grad_qkv); });
    const Tensor normed1 = rows(attention_saved.norm_out, width);
    Tensor grad_qkv_weight = parameters.grad(block.qkv);
    stage(context, "QKV projection backward", 2 * matmul_flops(tokens, width, 3 * width), [&] {
      ops::gemm(context, true, false, 1.0f, normed1, grad_qkv, beta, grad_qkv_weight);
      ops::gemm(context, false, true, 1.0f, grad_qkv, parameters.compute(block.qkv), 0.0f, grad_normed1);
    });
  });
  norm_backward(context, parameters, block.attn_norm_weight, block.attn_norm_bias, x,
                stat_rows(attention_saved.norm_mean), stat_rows(attention_saved.norm_rstd), grad_normed1,
                grad_residual, true, accumulate);  // grad_residual += norm1's input gradient: now dL/dx_b
}

}  // namespace switchyard
