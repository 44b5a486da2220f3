// CPU reference of the token (+ learned position) embedding (contract: src/ops/model_ops.h).
//
//   forward:  out[t, :] = token_table[tokens[t], :] + position_table[t % S, :]   (sum in double)
//   backward: grad_token_table[v, :] (+)= sum_{t : tokens[t] = v} grad_out[t, :]
//             grad_position_table[p, :] (+)= sum_{t : t % S = p} grad_out[t, :]
// tokens int32 [T]; tables [V, D] and [P, D] with P >= S; out, grad_out [T, D]; T % S == 0.
// Sums run over t in increasing order in double and are rounded once per element.
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace cpu {
namespace {

using detail::expect_tensor;

void check_tokens(const char* op, const Tensor& tokens, int64_t vocab, int64_t seq_len) {
  SY_CHECK(tokens.device == DeviceKind::cpu && tokens.dtype == DType::i32 && tokens.rank == 1, op,
           ": tokens must be int32 [T] on cpu, got ", tokens.describe());
  SY_CHECK(seq_len >= 1 && tokens.dim(0) % seq_len == 0, op, ": ", tokens.dim(0), " tokens are not whole sequences of ",
           seq_len);
  const int32_t* ids = tokens.as<int32_t>();
  for (int64_t t = 0; t < tokens.dim(0); ++t)
    SY_CHECK_INPUT(ids[t] >= 0 && ids[t] < vocab, op, ": token ", t, " has id ", ids[t], " outside the vocabulary [0, ",
                   vocab, ")");
}

template <typename Real>
void forward_impl(const Tensor& tokens, const Tensor& token_table, const Tensor* position_table, int64_t seq_len,
                  Tensor& out) {
  const int64_t count = tokens.dim(0), width = token_table.dim(1);
  const int32_t* ids = tokens.as<int32_t>();
  const Real* table = token_table.as<Real>();
  const Real* positions = position_table ? position_table->as<Real>() : nullptr;
  Real* output = out.as<Real>();
  for (int64_t t = 0; t < count; ++t) {
    const Real* token_row = table + int64_t(ids[t]) * width;
    const Real* position_row = positions ? positions + (t % seq_len) * width : nullptr;
    for (int64_t column = 0; column < width; ++column) {
      double value = double(token_row[column]);
      if (position_row) value += double(position_row[column]);
      output[t * width + column] = Real(value);
    }
  }
}

template <typename Real>
void backward_impl(const Tensor& tokens, const Tensor& grad_out, int64_t seq_len, bool accumulate,
                   Tensor& grad_token_table, Tensor* grad_position_table) {
  const int64_t count = tokens.dim(0), width = grad_out.dim(1), vocab = grad_token_table.dim(0);
  const int32_t* ids = tokens.as<int32_t>();
  const Real* grad = grad_out.as<Real>();

  std::vector<double> sums(size_t(vocab * width), 0.0);
  for (int64_t t = 0; t < count; ++t)
    for (int64_t column = 0; column < width; ++column)
      sums[size_t(int64_t(ids[t]) * width + column)] += double(grad[t * width + column]);
  Real* table_grad = grad_token_table.as<Real>();
  for (int64_t index = 0; index < vocab * width; ++index)
    table_grad[index] = Real(accumulate ? double(table_grad[index]) + sums[size_t(index)] : sums[size_t(index)]);

  if (!grad_position_table) return;
  const int64_t positions = grad_position_table->dim(0);
  std::vector<double> position_sums(size_t(positions * width), 0.0);
  for (int64_t t = 0; t < count; ++t)
    for (int64_t column = 0; column < width; ++column)
      position_sums[size_t((t % seq_len) * width + column)] += double(grad[t * width + column]);
  Real* position_grad = grad_position_table->as<Real>();
  for (int64_t index = 0; index < positions * width; ++index)
    position_grad[index] =
        Real(accumulate ? double(position_grad[index]) + position_sums[size_t(index)] : position_sums[size_t(index)]);
}

}  // namespace

void embedding_forward(const Tensor& tokens, const Tensor& token_table, const Tensor* position_table, int64_t seq_len,
                       Tensor& out) {
  const char* op = "embedding_forward";
  detail::expect_float_matrix(op, "token_table", token_table, 2);
  const int64_t vocab = token_table.dim(0), width = token_table.dim(1);
  check_tokens(op, tokens, vocab, seq_len);
  if (position_table) {
    SY_CHECK(position_table->rank == 2 && position_table->dim(0) >= seq_len, op,
             ": position_table must have at least seq_len = ", seq_len, " rows, got ", position_table->describe());
    expect_tensor(op, "position_table", *position_table, token_table.dtype, {position_table->dim(0), width});
  }
  expect_tensor(op, "out", out, token_table.dtype, {tokens.dim(0), width});
  detail::dispatch_float(op, token_table.dtype, [&](auto tag) {
    forward_impl<decltype(tag)>(tokens, token_table, position_table, seq_len, out);
  });
}

void embedding_backward(const Tensor& tokens, const Tensor& grad_out, int64_t seq_len, bool accumulate,
                        Tensor& grad_token_table, Tensor* grad_position_table) {
  const char* op = "embedding_backward";
  detail::expect_float_matrix(op, "grad_token_table", grad_token_table, 2);
  const int64_t vocab = grad_token_table.dim(0), width = grad_token_table.dim(1);
  check_tokens(op, tokens, vocab, seq_len);
  expect_tensor(op, "grad_out", grad_out, grad_token_table.dtype, {tokens.dim(0), width});
  if (grad_position_table) {
    SY_CHECK(grad_position_table->rank == 2 && grad_position_table->dim(0) >= seq_len, op,
             ": grad_position_table must have at least seq_len = ", seq_len, " rows, got ",
             grad_position_table->describe());
    expect_tensor(op, "grad_position_table", *grad_position_table, grad_token_table.dtype,
                  {grad_position_table->dim(0), width});
  }
  detail::dispatch_float(op, grad_token_table.dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(tokens, grad_out, seq_len, accumulate, grad_token_table, grad_position_table);
  });
}

}  // namespace cpu
}  // namespace switchyard
