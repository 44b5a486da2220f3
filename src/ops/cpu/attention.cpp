// CPU reference of the causal multi-head self-attention core (contract: src/ops/model_ops.h).
//
// qkv [T, 3D] (row: q heads | k heads | v heads, Dh each), out and grad_out [T, D],
// softmax_stats [B, H, S], grad_qkv [T, 3D]. For sequence b, head h, query i and key j <= i:
//   z_ij = q_i . k_j / sqrt(Dh),  lse_i = log sum_{j<=i} exp(z_ij),  P_ij = exp(z_ij - lse_i),
//   out_i = sum_j P_ij v_j.
// Backward (P recomputed from the stored lse, as the CUDA path does):
//   dP_ij = dout_i . v_j,  D_i = dout_i . out_i,  dz_ij = P_ij (dP_ij - D_i),
//   dq_i = sum_j dz_ij k_j / sqrt(Dh),  dk_j = sum_{i>=j} dz_ij q_i / sqrt(Dh),  dv_j = sum_{i>=j} P_ij dout_i.
// Everything in double; the workspace is not used (it may be an empty tensor).
#include <algorithm>
#include <cmath>
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace cpu {
namespace {

using detail::expect_tensor;

void check_shape(const char* op, const AttentionShape& shape, const Tensor& qkv) {
  SY_CHECK_INPUT(shape.batch >= 0 && shape.seq_len >= 1 && shape.heads >= 1 && shape.head_dim >= 1, op,
                 ": need seq_len, heads and head_dim >= 1, got B=", shape.batch, " S=", shape.seq_len,
                 " H=", shape.heads, " Dh=", shape.head_dim);
  detail::expect_float_matrix(op, "qkv", qkv, 2);
  expect_tensor(op, "qkv", qkv, qkv.dtype, {shape.tokens(), 3 * shape.model_dim()});
}

// Views of one (b, h) pair: element d of row s of q/k/v/out.
struct PairView {
  int64_t qkv_row_width, out_row_width, q_offset, k_offset, v_offset, out_offset;
  PairView(const AttentionShape& shape, int64_t batch_index, int64_t head) {
    const int64_t model_dim = shape.model_dim();
    qkv_row_width = 3 * model_dim;
    out_row_width = model_dim;
    const int64_t first_row = batch_index * shape.seq_len;
    q_offset = first_row * qkv_row_width + head * shape.head_dim;
    k_offset = q_offset + model_dim;
    v_offset = q_offset + 2 * model_dim;
    out_offset = first_row * out_row_width + head * shape.head_dim;
  }
};

// Scaled scores z_i[0..i] of query row i, in double.
template <typename Real>
void scores_row(const Real* qkv, const PairView& view, int64_t head_dim, int64_t query, double scale,
                std::vector<double>& scores) {
  const Real* q = qkv + view.q_offset + query * view.qkv_row_width;
  for (int64_t key = 0; key <= query; ++key) {
    const Real* k = qkv + view.k_offset + key * view.qkv_row_width;
    double dot = 0.0;
    for (int64_t d = 0; d < head_dim; ++d) dot += double(q[d]) * double(k[d]);
    scores[size_t(key)] = dot * scale;
  }
}

template <typename Real>
void forward_impl(const AttentionShape& shape, const Tensor& qkv_tensor, Tensor& out_tensor, Tensor& stats_tensor) {
  const int64_t seq = shape.seq_len, head_dim = shape.head_dim;
  const double scale = 1.0 / std::sqrt(double(head_dim));
  const Real* qkv = qkv_tensor.as<Real>();
  Real* out = out_tensor.as<Real>();
  Real* stats = stats_tensor.as<Real>();
  std::vector<double> scores(static_cast<size_t>(seq)), accumulator(static_cast<size_t>(head_dim));
  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t h = 0; h < shape.heads; ++h) {
      const PairView view(shape, b, h);
      for (int64_t i = 0; i < seq; ++i) {
        scores_row(qkv, view, head_dim, i, scale, scores);
        const double max_score = *std::max_element(scores.begin(), scores.begin() + i + 1);
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(scores[size_t(j)] - max_score);
        const double logsumexp = max_score + std::log(sum);
        std::fill(accumulator.begin(), accumulator.end(), 0.0);
        for (int64_t j = 0; j <= i; ++j) {
          const double probability = std::exp(scores[size_t(j)] - logsumexp);
          const Real* v = qkv + view.v_offset + j * view.qkv_row_width;
          for (int64_t d = 0; d < head_dim; ++d) accumulator[size_t(d)] += probability * double(v[d]);
        }
        Real* out_row = out + view.out_offset + i * view.out_row_width;
        for (int64_t d = 0; d < head_dim; ++d) out_row[d] = Real(accumulator[size_t(d)]);
        stats[(b * shape.heads + h) * seq + i] = Real(logsumexp);
      }
    }
  }
}

template <typename Real>
void backward_impl(const AttentionShape& shape, const Tensor& qkv_tensor, const Tensor& out_tensor,
                   const Tensor& grad_out_tensor, const Tensor& stats_tensor, Tensor& grad_qkv_tensor) {
  const int64_t seq = shape.seq_len, head_dim = shape.head_dim;
  const double scale = 1.0 / std::sqrt(double(head_dim));
  const Real* qkv = qkv_tensor.as<Real>();
  const Real* out = out_tensor.as<Real>();
  const Real* grad_out = grad_out_tensor.as<Real>();
  const Real* stats = stats_tensor.as<Real>();
  Real* grad_qkv = grad_qkv_tensor.as<Real>();
  std::vector<double> scores(static_cast<size_t>(seq)), grad_q(static_cast<size_t>(head_dim));
  // dk and dv of one pair collect contributions from every later query row, so they live here.
  std::vector<double> grad_k(static_cast<size_t>(seq * head_dim)), grad_v(static_cast<size_t>(seq * head_dim));
  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t h = 0; h < shape.heads; ++h) {
      const PairView view(shape, b, h);
      std::fill(grad_k.begin(), grad_k.end(), 0.0);
      std::fill(grad_v.begin(), grad_v.end(), 0.0);
      for (int64_t i = 0; i < seq; ++i) {
        scores_row(qkv, view, head_dim, i, scale, scores);
        const double logsumexp = double(stats[(b * shape.heads + h) * seq + i]);
        const Real* dout = grad_out + view.out_offset + i * view.out_row_width;
        const Real* out_row = out + view.out_offset + i * view.out_row_width;
        double row_dot = 0.0;
        for (int64_t d = 0; d < head_dim; ++d) row_dot += double(dout[d]) * double(out_row[d]);
        std::fill(grad_q.begin(), grad_q.end(), 0.0);
        const Real* q = qkv + view.q_offset + i * view.qkv_row_width;
        for (int64_t j = 0; j <= i; ++j) {
          const double probability = std::exp(scores[size_t(j)] - logsumexp);
          const Real* k = qkv + view.k_offset + j * view.qkv_row_width;
          const Real* v = qkv + view.v_offset + j * view.qkv_row_width;
          double grad_probability = 0.0;
          for (int64_t d = 0; d < head_dim; ++d) grad_probability += double(dout[d]) * double(v[d]);
          const double grad_score = probability * (grad_probability - row_dot) * scale;
          for (int64_t d = 0; d < head_dim; ++d) {
            grad_q[size_t(d)] += grad_score * double(k[d]);
            grad_k[size_t(j * head_dim + d)] += grad_score * double(q[d]);
            grad_v[size_t(j * head_dim + d)] += probability * double(dout[d]);
          }
        }
        Real* dq = grad_qkv + view.q_offset + i * view.qkv_row_width;
        for (int64_t d = 0; d < head_dim; ++d) dq[d] = Real(grad_q[size_t(d)]);
      }
      for (int64_t j = 0; j < seq; ++j) {
        Real* dk = grad_qkv + view.k_offset + j * view.qkv_row_width;
        Real* dv = grad_qkv + view.v_offset + j * view.qkv_row_width;
        for (int64_t d = 0; d < head_dim; ++d) {
          dk[d] = Real(grad_k[size_t(j * head_dim + d)]);
          dv[d] = Real(grad_v[size_t(j * head_dim + d)]);
        }
      }
    }
  }
}

}  // namespace

void attention_forward(const AttentionShape& shape, const Tensor& qkv, Tensor& out, Tensor& softmax_stats,
                       Tensor& workspace) {
  (void)workspace;  // the reference keeps one score row at a time
  const char* op = "attention_forward";
  check_shape(op, shape, qkv);
  expect_tensor(op, "out", out, qkv.dtype, {shape.tokens(), shape.model_dim()});
  expect_tensor(op, "softmax_stats", softmax_stats, qkv.dtype, {shape.batch, shape.heads, shape.seq_len});
  detail::dispatch_float(op, qkv.dtype, [&](auto tag) { forward_impl<decltype(tag)>(shape, qkv, out, softmax_stats); });
}

void attention_backward(const AttentionShape& shape, const Tensor& qkv, const Tensor& out, const Tensor& grad_out,
                        const Tensor& softmax_stats, Tensor& workspace, Tensor& grad_qkv) {
  (void)workspace;
  const char* op = "attention_backward";
  check_shape(op, shape, qkv);
  expect_tensor(op, "out", out, qkv.dtype, {shape.tokens(), shape.model_dim()});
  expect_tensor(op, "grad_out", grad_out, qkv.dtype, {shape.tokens(), shape.model_dim()});
  expect_tensor(op, "softmax_stats", softmax_stats, qkv.dtype, {shape.batch, shape.heads, shape.seq_len});
  expect_tensor(op, "grad_qkv", grad_qkv, qkv.dtype, {shape.tokens(), 3 * shape.model_dim()});
  detail::dispatch_float(op, qkv.dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(shape, qkv, out, grad_out, softmax_stats, grad_qkv);
  });
}

}  // namespace cpu
}  // namespace switchyard
