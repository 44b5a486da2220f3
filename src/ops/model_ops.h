// The dense transformer ops (everything a decoder-only LM needs besides the MoE layer): one
// declaration, two backends, the same conventions as src/ops/moe_ops.h.
//
//   switchyard::cpu::NAME   src/ops/cpu/NAME.cpp   reference; f32 or f64 tensors (one float type per
//                                                  call, statistics and losses included), math in double
//   switchyard::cuda::NAME  src/ops/cuda/NAME.cu   activations bf16, fp16 or fp32; statistics, losses,
//                                                  weight gradients and optimizer state fp32; int32 ids
//   switchyard::ops::NAME   src/ops/ops.h          picks the backend from the context's device
//                                                  (src/ops/dispatch_model.cpp); what model code calls
//
// Shapes: T = B * S tokens (rows), B sequences of S positions, D = d_model = H * Dh, H heads of
// width Dh, V vocabulary entries. All tensors are row-major and contiguous.
//
// Embedding    out[t] = token_table[tokens[t]] (+ position_table[t % S]).  tokens int32 [T],
//              tables [V, D] / [P, D] (P >= S), out [T, D]. Backward: grad_table[v] = sum over
//              t with tokens[t] = v of grad_out[t] (grad_position_table[p] = sum over t % S = p),
//              summed in increasing t, overwriting or (accumulate) adding to the tables. Ids
//              outside [0, V) are bad input on CPU; on CUDA (which cannot check without a host
//              sync) their rows are zero and they add no gradient.
// LayerNorm    y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var + eps), var biased; per row of
//              x [T, D]; mean, rstd [T] saved for backward. With g = dy * w, xhat = (x - mean) rstd:
//              dx = rstd (g - mean_D(g) - xhat mean_D(g xhat)), dw = sum_t dy xhat, db = sum_t dy.
// RMSNorm      y = x * rstd * w, rstd = 1 / sqrt(mean_D(x^2) + eps);
//              dx = rstd (g - xhat mean_D(g xhat)), dw = sum_t dy xhat.
//              NormAccumulate says what backward adds to instead of overwriting: grad_x (dx added
//              to the residual stream's gradient, so the block's residual add is part of the pass,
//              one rounding) and the weight and bias gradients (micro-steps after the first); by
//              default both are overwritten. CUDA: x, y, w, b, dy, dx one activation
//              dtype; mean / rstd / dw / db fp32; dw, db reduced in a fixed order (per-chunk
//              partial sums over rows, then the chunks in order), so they are bit-reproducible.
// QKV layout   qkv [T, 3D]: each row holds q (H heads of Dh) | k (same) | v (same); that is the
//              output of one [D, 3D] projection. Attention output and its gradient: [T, D], the
//              H heads of Dh side by side (the input of the output projection).
// Rotary       GPT-NeoX half rotation of every q and k head, position p = position_offset + t % S:
//              for i < Dh/2, theta = p * base^(-2i/Dh), x1 = x[i], x2 = x[i + Dh/2]:
//              y[i] = x1 cos - x2 sin, y[i + Dh/2] = x2 cos + x1 sin. v is not rotated (copied
//              when out of place). Backward is the inverse rotation of dq, dk; dv passes through.
//              In place (same data) or out of place. Dh must be even.
// Attention    causal multi-head self-attention core per sequence b and head h:
//              z = q k^T / sqrt(Dh), P = softmax over keys j <= query i, out = P v.
//              softmax_stats [B, H, S]: the row logsumexp of z (what backward needs, and the
//              layout of cuDNN's SDPA statistics, so a fused path can replace this one).
//              Backward: dP = dout v^T, dz = P (dP - rowsum(dout * out)), dq = dz k / sqrt(Dh),
//              dk = dz^T q / sqrt(Dh), dv = P^T dout, written into grad_qkv [T, 3D] (overwritten).
//              CUDA: cuBLAS batched GEMMs (fp32 accumulation, fp32 scores) and a fused causal
//              softmax; the [S, S] score and probability blocks of `pairs_per_pass` (b, h) pairs
//              live in `workspace` (uint8, attention_workspace_bytes()); the CPU ignores it.
// Cross-entropy per token t with target y_t (-1 = ignored): loss_t = logsumexp(z_t) - z_t[y_t],
//              grad_logits[t] = grad_scale * (softmax(z_t) - onehot(y_t)), zero rows for ignored
//              tokens (the caller folds 1 / (valid tokens) and the loss scale into grad_scale).
//              summary = {mean loss over valid tokens (0 if none), valid token count}. Forward
//              and backward in one call; grad_logits may be the logits' own memory (in place) or
//              null (loss only). CUDA: logits bf16, fp16 or fp32, losses fp32; a target outside
//              [-1, V) gives a NaN loss (so it surfaces) and a zero gradient row; the CPU throws.
// AdamW        for each tensor: g = grad * grad_scale (1 / loss_scale times the clip factor);
//              m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;
//              p = p * (1 - lr wd) (tensors with decay only);
//              p = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps), bc_i = 1 - beta_i^step;
//              compute_copy = p rounded to its bf16 / fp16 type (when present).
//              Coefficients come from adamw_coefficients() (host, double, then float) and every
//              element is the same sequence of correctly rounded fp32 operations on both backends,
//              so CPU and CUDA agree bit for bit on f32 tensors. CUDA: one launch for all tensors.
// Grad check   result = {sum of squares of all elements of all tensors, number of non-finite
//              elements}; fp32 on CUDA, computed in one pass in a fixed order (deterministic).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "src/core/tensor.h"

namespace switchyard {

struct AttentionShape {
  int64_t batch = 0;
  int64_t seq_len = 0;
  int64_t heads = 0;
  int64_t head_dim = 0;
  int64_t tokens() const { return batch * seq_len; }
  int64_t model_dim() const { return heads * head_dim; }
  int64_t pairs() const { return batch * heads; }  // (sequence, head) pairs
};

// Matmul FLOPs of the causal attention core's forward as the fused kernels execute it: q k^T and
// P v, 2 S^2 Dh FLOPs each per (sequence, head), halved by the mask. (Its backward is counted as
// twice this, the model-FLOPs convention, though it recomputes P.)
inline double causal_attention_flops(const AttentionShape& shape) {
  return 2.0 * double(shape.pairs()) * double(shape.seq_len) * double(shape.seq_len) * double(shape.head_dim);
}

// Bytes of CUDA attention workspace for `pairs_per_pass` (b, h) pairs per pass (1 .. B*H), for
// activations of `dtype`: per pair an fp32 [S, S] score block, a [S, S] probability block in
// `dtype` and an fp32 [S] row statistic; plus ten device pointer tables of B*H entries each.
// More pairs per pass means fewer GEMM launches; a larger workspace than this is fine.
inline int64_t attention_workspace_bytes(const AttentionShape& shape, DType dtype, int64_t pairs_per_pass) {
  auto align = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  const int64_t seq = shape.seq_len, element = dtype == DType::f32 ? 4 : 2;
  return align(10 * shape.pairs() * int64_t(sizeof(void*))) + align(pairs_per_pass * seq * 4) +
         align(pairs_per_pass * seq * seq * 4) + align(pairs_per_pass * seq * seq * element);
}

enum CrossEntropySummary : int { kCrossEntropyMeanLoss = 0, kCrossEntropyValidTokens = 1, kNumCrossEntropySummary = 2 };
enum GradCheckResult : int { kGradSquaredNorm = 0, kGradNonFiniteCount = 1, kNumGradCheckResults = 2 };

// One tensor of the optimizer: fp32 master `param`, fp32 `grad` and moments (same element count),
// and an optional compute copy (bf16 or fp16, same element count; data == nullptr: none).
struct AdamWTensor {
  Tensor param, grad, exp_avg, exp_avg_sq;
  Tensor compute_copy;
  bool weight_decay = true;  // false for norms, biases, ... as the caller decides
};

struct AdamWParams {
  double lr = 3e-4;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  int64_t step = 1;         // 1-based: the step being taken (bias correction)
  double grad_scale = 1.0;  // multiplies every gradient element
};

// The per-step scalars of AdamW, computed once on the host so both backends use the same floats.
struct AdamWCoefficients {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;   // lr / (1 - beta1^step)
  float sqrt_bias2;  // sqrt(1 - beta2^step)
  float eps;
  float decay_factor;  // 1 - lr * weight_decay
  float grad_scale;
};

inline AdamWCoefficients adamw_coefficients(const AdamWParams& params) {
  const double bias1 = 1.0 - std::pow(params.beta1, double(params.step));
  const double bias2 = 1.0 - std::pow(params.beta2, double(params.step));
  AdamWCoefficients c;
  c.beta1 = float(params.beta1);
  c.one_minus_beta1 = float(1.0 - params.beta1);
  c.beta2 = float(params.beta2);
  c.one_minus_beta2 = float(1.0 - params.beta2);
  c.step_size = float(params.lr / bias1);
  c.sqrt_bias2 = float(std::sqrt(bias2));
  c.eps = float(params.eps);
  c.decay_factor = float(1.0 - params.lr * params.weight_decay);
  c.grad_scale = float(params.grad_scale);
  return c;
}

// Checks shared by both backends (SY_BAD_INPUT naming the field): step >= 1, 0 <= beta < 1,
// lr >= 0, eps > 0, weight_decay >= 0, finite grad_scale.
void validate_adamw_params(const AdamWParams& params);

// What a norm backward adds to instead of overwriting (see LayerNorm above).
struct NormAccumulate {
  bool grad_x = false;  // grad_x += dx
  bool params = false;  // grad_weight += dw, grad_bias += db
};

namespace cpu {
void embedding_forward(const Tensor& tokens, const Tensor& token_table, const Tensor* position_table, int64_t seq_len,
                       Tensor& out);
void embedding_backward(const Tensor& tokens, const Tensor& grad_out, int64_t seq_len, bool accumulate,
                        Tensor& grad_token_table, Tensor* grad_position_table);

void layernorm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, Tensor& out, Tensor& mean,
                       Tensor& rstd);
void layernorm_backward(const Tensor& x, const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                        const Tensor& grad_out, Tensor& grad_x, Tensor& grad_weight, Tensor& grad_bias,
                        NormAccumulate accumulate = {});
void rmsnorm_forward(const Tensor& x, const Tensor& weight, float eps, Tensor& out, Tensor& rstd);
void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& grad_out, Tensor& grad_x,
                      Tensor& grad_weight, NormAccumulate accumulate = {});

void rotary_forward(const AttentionShape& shape, const Tensor& qkv, double base, int64_t position_offset,
                    Tensor& qkv_out);
void rotary_backward(const AttentionShape& shape, const Tensor& grad_qkv_out, double base, int64_t position_offset,
                     Tensor& grad_qkv);

void attention_forward(const AttentionShape& shape, const Tensor& qkv, Tensor& out, Tensor& softmax_stats,
                       Tensor& workspace);
void attention_backward(const AttentionShape& shape, const Tensor& qkv, const Tensor& out, const Tensor& grad_out,
                        const Tensor& softmax_stats, Tensor& workspace, Tensor& grad_qkv);

void cross_entropy(const Tensor& logits, const Tensor& targets, float grad_scale, Tensor& token_losses, Tensor& summary,
                   Tensor* grad_logits);

// f32 tensors (the fp32 math of the top comment) or f64 tensors (the same formulas in double).
void adamw_step(const std::vector<AdamWTensor>& tensors, const AdamWParams& params);

// f32 or f64 gradients; result [2] of f32 or f64.
void grad_norm_and_check(const std::vector<Tensor>& tensors, Tensor& result);
}  // namespace cpu

namespace cuda {
void embedding_forward(const Tensor& tokens, const Tensor& token_table, const Tensor* position_table, int64_t seq_len,
                       Tensor& out, void* stream);
void embedding_backward(const Tensor& tokens, const Tensor& grad_out, int64_t seq_len, bool accumulate,
                        Tensor& grad_token_table, Tensor* grad_position_table, void* stream);

void layernorm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, Tensor& out, Tensor& mean,
                       Tensor& rstd, void* stream);
void layernorm_backward(const Tensor& x, const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                        const Tensor& grad_out, Tensor& grad_x, Tensor& grad_weight, Tensor& grad_bias, void* stream,
                        NormAccumulate accumulate = {});
void rmsnorm_forward(const Tensor& x, const Tensor& weight, float eps, Tensor& out, Tensor& rstd, void* stream);
void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& grad_out, Tensor& grad_x,
                      Tensor& grad_weight, void* stream, NormAccumulate accumulate = {});

void rotary_forward(const AttentionShape& shape, const Tensor& qkv, double base, int64_t position_offset,
                    Tensor& qkv_out, void* stream);
void rotary_backward(const AttentionShape& shape, const Tensor& grad_qkv_out, double base, int64_t position_offset,
                     Tensor& grad_qkv, void* stream);

void attention_forward(const AttentionShape& shape, const Tensor& qkv, Tensor& out, Tensor& softmax_stats,
                       Tensor& workspace, void* stream);
void attention_backward(const AttentionShape& shape, const Tensor& qkv, const Tensor& out, const Tensor& grad_out,
                        const Tensor& softmax_stats, Tensor& workspace, Tensor& grad_qkv, bool deterministic,
                        void* stream);

void cross_entropy(const Tensor& logits, const Tensor& targets, float grad_scale, Tensor& token_losses, Tensor& summary,
                   Tensor* grad_logits, void* stream);

void adamw_step(const std::vector<AdamWTensor>& tensors, const AdamWParams& params, void* stream);

// f32, bf16 or f16 gradients; result fp32 [2].
void grad_norm_and_check(const std::vector<Tensor>& tensors, Tensor& result, void* stream);
}  // namespace cuda

}  // namespace switchyard
