// CPU reference of the fused softmax cross-entropy (contract: src/ops/model_ops.h).
//
// logits [T, V], targets int32 [T] (-1 = ignore), token_losses [T], summary [2], grad_logits [T, V]
// (optional; may be the logits' own memory). For a valid token t with target y:
//   lse = max + log sum_v exp(z_v - max),  loss_t = lse - z_y,
//   grad[t, v] = grad_scale * (exp(z_v - lse) - [v == y]).
// Ignored tokens: loss 0, gradient row 0. summary = {sum of valid losses / valid count (0 if
// none), valid count}. Math in double; the row is fully read before any gradient is written, so
// the in-place use is safe.
#include <algorithm>
#include <cmath>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace cpu {
namespace {

template <typename Real>
void cross_entropy_impl(const Tensor& logits_tensor, const Tensor& targets_tensor, double grad_scale,
                        Tensor& losses_tensor, Tensor& summary_tensor, Tensor* grad_tensor) {
  const int64_t tokens = logits_tensor.dim(0), vocab = logits_tensor.dim(1);
  const Real* logits = logits_tensor.as<Real>();
  const int32_t* targets = targets_tensor.as<int32_t>();
  Real* losses = losses_tensor.as<Real>();
  Real* grad = grad_tensor ? grad_tensor->as<Real>() : nullptr;
  double loss_sum = 0.0;
  int64_t valid = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    const Real* row = logits + t * vocab;
    const int32_t target = targets[t];
    if (target < 0) {
      losses[t] = Real(0);
      if (grad)
        for (int64_t v = 0; v < vocab; ++v) grad[t * vocab + v] = Real(0);
      continue;
    }
    double max_logit = double(row[0]);
    for (int64_t v = 1; v < vocab; ++v) max_logit = std::max(max_logit, double(row[v]));
    double sum = 0.0;
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(double(row[v]) - max_logit);
    const double logsumexp = max_logit + std::log(sum);
    const double loss = logsumexp - double(row[target]);
    losses[t] = Real(loss);
    loss_sum += loss;
    ++valid;
    if (grad) {
      for (int64_t v = 0; v < vocab; ++v) {
        const double probability = std::exp(double(row[v]) - logsumexp);
        grad[t * vocab + v] = Real(grad_scale * (probability - (v == target ? 1.0 : 0.0)));
      }
    }
  }
  Real* summary = summary_tensor.as<Real>();
  summary[kCrossEntropyMeanLoss] = Real(valid > 0 ? loss_sum / double(valid) : 0.0);
  summary[kCrossEntropyValidTokens] = Real(valid);
}

}  // namespace

void cross_entropy(const Tensor& logits, const Tensor& targets, float grad_scale, Tensor& token_losses, Tensor& summary,
                   Tensor* grad_logits) {
  const char* op = "cross_entropy";
  detail::expect_float_matrix(op, "logits", logits, 2);
  const int64_t tokens = logits.dim(0), vocab = logits.dim(1);
  SY_CHECK_INPUT(vocab >= 1, op, ": the vocabulary is empty: ", logits.describe());
  detail::expect_tensor(op, "targets", targets, DType::i32, {tokens});
  detail::expect_tensor(op, "token_losses", token_losses, logits.dtype, {tokens});
  detail::expect_tensor(op, "summary", summary, logits.dtype, {kNumCrossEntropySummary});
  if (grad_logits) detail::expect_tensor(op, "grad_logits", *grad_logits, logits.dtype, {tokens, vocab});
  SY_CHECK_INPUT(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ", grad_scale);
  const int32_t* ids = targets.as<int32_t>();
  for (int64_t t = 0; t < tokens; ++t)
    SY_CHECK_INPUT(ids[t] >= -1 && ids[t] < vocab, op, ": target ", t, " is ", ids[t], ", outside [-1, ", vocab, ")");
  detail::dispatch_float(op, logits.dtype, [&](auto tag) {
    cross_entropy_impl<decltype(tag)>(logits, targets, double(grad_scale), token_losses, summary, grad_logits);
  });
}

}  // namespace cpu
}  // namespace switchyard
