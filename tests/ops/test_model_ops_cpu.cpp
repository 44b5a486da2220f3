// CPU references of the dense transformer ops (src/ops/model_ops.h): every backward against float64
// central finite differences of a random linear functional of the forward output
// (loss = sum(out * weights), so d loss / d out = weights), forwards against independent brute-force
// formulas written here, and AdamW / the gradient check against direct evaluations of their
// formulas. Inputs are fresh random values; outputs are poisoned (NaN) before each call.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "src/ops/model_ops.h"
#include "tests/support/test_helpers.h"
#include "tests/support/expect_error.h"

using switchyard::testing::expect_bad_input;

using namespace switchyard;
using namespace switchyard::testing;

namespace {

constexpr double kStep = 1e-6;
constexpr double kGradientTolerance = 1e-6;

// relative_error of a tensor against a vector (the helpers take two of a kind)
double error_vs(const Tensor& actual, const std::vector<double>& expected) {
  return relative_error(to_vector(actual), expected);
}

HostTensor random_tensor(DType dtype, std::initializer_list<int64_t> dims, std::mt19937_64& rng, double scale = 1.0) {
  HostTensor tensor(dtype, dims);
  fill_uniform(tensor, rng, -scale, scale);
  return tensor;
}

HostTensor poisoned(DType dtype, std::initializer_list<int64_t> dims) {
  HostTensor tensor(dtype, dims);
  poison(tensor);
  return tensor;
}

HostTensor random_tokens(int64_t count, int vocab, std::mt19937_64& rng) {
  HostTensor tokens(DType::i32, {count});
  fill_uniform(tokens, rng, 0, vocab - 1);
  return tokens;
}


// ---- Embedding ----------------------------------------------------------------------------------

TEST(EmbeddingCpu, ForwardGathersTokenAndPositionRows) {
  std::mt19937_64 rng(11);
  const int vocab = 7, width = 5, seq = 3, tokens_count = 6;
  HostTensor tokens = random_tokens(tokens_count, vocab, rng);
  HostTensor table = random_tensor(DType::f64, {vocab, width}, rng);
  HostTensor positions = random_tensor(DType::f64, {seq + 2, width}, rng);
  HostTensor out = poisoned(DType::f64, {tokens_count, width});
  cpu::embedding_forward(tokens, table, &positions.tensor(), seq, out);
  for (int t = 0; t < tokens_count; ++t)
    for (int c = 0; c < width; ++c)
      EXPECT_EQ(out.data<double>()[t * width + c], table.data<double>()[tokens.data<int32_t>()[t] * width + c] +
                                                       positions.data<double>()[(t % seq) * width + c]);
  HostTensor plain = poisoned(DType::f64, {tokens_count, width});
  cpu::embedding_forward(tokens, table, nullptr, seq, plain);
  EXPECT_EQ(plain.data<double>()[width + 1], table.data<double>()[tokens.data<int32_t>()[1] * width + 1]);
}

TEST(EmbeddingCpu, BackwardMatchesFiniteDifferencesAndAccumulates) {
  std::mt19937_64 rng(12);
  const int vocab = 6, width = 4, seq = 4, tokens_count = 12;  // more tokens than ids: repeats
  HostTensor tokens = random_tokens(tokens_count, vocab, rng);
  tokens.data<int32_t>()[5] = tokens.data<int32_t>()[2];
  HostTensor table = random_tensor(DType::f64, {vocab, width}, rng);
  HostTensor positions = random_tensor(DType::f64, {seq, width}, rng);
  HostTensor weights = random_tensor(DType::f64, {tokens_count, width}, rng);
  HostTensor out(DType::f64, {tokens_count, width});
  auto loss = [&] {
    cpu::embedding_forward(tokens, table, &positions.tensor(), seq, out);
    return dot(out, weights);
  };
  HostTensor grad_table = poisoned(DType::f64, {vocab, width});
  HostTensor grad_positions = poisoned(DType::f64, {seq, width});
  cpu::embedding_backward(tokens, weights, seq, false, grad_table, &grad_positions.tensor());
  EXPECT_LE(error_vs(grad_table, central_difference_gradient(loss, table, kStep)), kGradientTolerance);
  EXPECT_LE(error_vs(grad_positions, central_difference_gradient(loss, positions, kStep)), kGradientTolerance);

  // accumulate adds onto what is there
  HostTensor accumulated = random_tensor(DType::f64, {vocab, width}, rng);
  std::vector<double> expected = to_vector(accumulated);
  for (int64_t i = 0; i < grad_table.numel(); ++i) expected[size_t(i)] += grad_table.data<double>()[i];
  cpu::embedding_backward(tokens, weights, seq, true, accumulated, nullptr);
  EXPECT_LE(max_abs_difference(to_vector(accumulated), expected), 1e-12);
}

TEST(EmbeddingCpu, RejectsIdsOutsideTheVocabulary) {
  std::mt19937_64 rng(13);
  HostTensor tokens = random_tokens(4, 5, rng);
  tokens.data<int32_t>()[3] = 5;
  HostTensor table = random_tensor(DType::f32, {5, 3}, rng);
  HostTensor out(DType::f32, {4, 3});
  expect_bad_input([&] { cpu::embedding_forward(tokens, table, nullptr, 4, out); });
  tokens.data<int32_t>()[3] = -1;
  expect_bad_input([&] { cpu::embedding_backward(tokens, out, 4, false, table, nullptr); });
}

// ---- Norms --------------------------------------------------------------------------------------

class NormCpu : public ::testing::TestWithParam<bool> {};  // true: layernorm, false: rmsnorm

TEST_P(NormCpu, ForwardMatchesFormulaAndBackwardMatchesFiniteDifferences) {
  const bool layernorm = GetParam();
  std::mt19937_64 rng(layernorm ? 21 : 22);
  const int rows = 5, width = 7;
  const float eps = 1e-5f;
  HostTensor x = random_tensor(DType::f64, {rows, width}, rng, 2.0);
  for (int j = 0; j < width; ++j) x.data<double>()[j] += 3.0;  // a row with a large mean
  HostTensor weight = random_tensor(DType::f64, {width}, rng);
  HostTensor bias = random_tensor(DType::f64, {width}, rng);
  HostTensor weights = random_tensor(DType::f64, {rows, width}, rng);
  HostTensor out = poisoned(DType::f64, {rows, width});
  HostTensor mean = poisoned(DType::f64, {rows}), rstd = poisoned(DType::f64, {rows});
  auto forward = [&] {
    if (layernorm)
      cpu::layernorm_forward(x, weight, bias, eps, out, mean, rstd);
    else
      cpu::rmsnorm_forward(x, weight, eps, out, rstd);
  };
  forward();
  for (int r = 0; r < rows; ++r) {  // brute force
    const double* row = x.data<double>() + r * width;
    double mu = 0, second = 0;
    for (int j = 0; j < width; ++j) mu += row[j] / width;
    if (!layernorm) mu = 0;
    for (int j = 0; j < width; ++j) second += (row[j] - mu) * (row[j] - mu) / width;
    const double inverse = 1.0 / std::sqrt(second + double(eps));
    EXPECT_NEAR(rstd.data<double>()[r], inverse, 1e-12 * inverse);
    for (int j = 0; j < width; ++j) {
      const double expected =
          (row[j] - mu) * inverse * weight.data<double>()[j] + (layernorm ? bias.data<double>()[j] : 0);
      EXPECT_NEAR(out.data<double>()[r * width + j], expected, 1e-12);
    }
  }

  auto loss = [&] {
    forward();
    return dot(out, weights);
  };
  forward();
  HostTensor grad_x = poisoned(DType::f64, {rows, width});
  HostTensor grad_weight = poisoned(DType::f64, {width}), grad_bias = poisoned(DType::f64, {width});
  if (layernorm)
    cpu::layernorm_backward(x, weight, mean, rstd, weights, grad_x, grad_weight, grad_bias);
  else
    cpu::rmsnorm_backward(x, weight, rstd, weights, grad_x, grad_weight);
  EXPECT_LE(error_vs(grad_x, central_difference_gradient(loss, x, kStep)), kGradientTolerance);
  EXPECT_LE(error_vs(grad_weight, central_difference_gradient(loss, weight, kStep)), kGradientTolerance);
  if (layernorm) EXPECT_LE(error_vs(grad_bias, central_difference_gradient(loss, bias, kStep)), kGradientTolerance);
}

// NormAccumulate: dx added to grad_x's old value (the residual stream's gradient), dw and db added
// to theirs; each flag alone leaves the other output overwritten.
TEST_P(NormCpu, AccumulateAddsToTheOldValues) {
  const bool layernorm = GetParam();
  std::mt19937_64 rng(layernorm ? 23 : 24);
  const int rows = 6, width = 9;
  HostTensor x = random_tensor(DType::f64, {rows, width}, rng, 2.0);
  HostTensor weight = random_tensor(DType::f64, {width}, rng), bias = random_tensor(DType::f64, {width}, rng);
  HostTensor grad_out = random_tensor(DType::f64, {rows, width}, rng);
  HostTensor out(DType::f64, {rows, width}), mean(DType::f64, {rows}), rstd(DType::f64, {rows});
  if (layernorm)
    cpu::layernorm_forward(x, weight, bias, 1e-5f, out, mean, rstd);
  else
    cpu::rmsnorm_forward(x, weight, 1e-5f, out, rstd);
  auto backward = [&](NormAccumulate mode, HostTensor& grad_x, HostTensor& grad_weight, HostTensor& grad_bias) {
    if (layernorm)
      cpu::layernorm_backward(x, weight, mean, rstd, grad_out, grad_x, grad_weight, grad_bias, mode);
    else
      cpu::rmsnorm_backward(x, weight, rstd, grad_out, grad_x, grad_weight, mode);
  };
  HostTensor fresh_x = poisoned(DType::f64, {rows, width});
  HostTensor fresh_w = poisoned(DType::f64, {width}), fresh_b = poisoned(DType::f64, {width});
  backward({}, fresh_x, fresh_w, fresh_b);
  for (const NormAccumulate mode : {NormAccumulate{true, false}, NormAccumulate{false, true}, NormAccumulate{true, true}}) {
    HostTensor old_x = random_tensor(DType::f64, {rows, width}, rng);
    HostTensor old_w = random_tensor(DType::f64, {width}, rng), old_b = random_tensor(DType::f64, {width}, rng);
    HostTensor grad_x = poisoned(DType::f64, {rows, width});
    HostTensor grad_w = poisoned(DType::f64, {width}), grad_b = poisoned(DType::f64, {width});
    const auto start_from = [](HostTensor& target, const HostTensor& values) {
      std::copy(values.data<double>(), values.data<double>() + values.numel(), target.data<double>());
    };
    if (mode.grad_x) start_from(grad_x, old_x);
    if (mode.params) start_from(grad_w, old_w), start_from(grad_b, old_b);
    backward(mode, grad_x, grad_w, grad_b);
    for (int64_t i = 0; i < int64_t(rows) * width; ++i)
      EXPECT_NEAR(grad_x.data<double>()[i], (mode.grad_x ? old_x.data<double>()[i] : 0.0) + fresh_x.data<double>()[i],
                  1e-12) << i;
    for (int j = 0; j < width; ++j) {
      EXPECT_NEAR(grad_w.data<double>()[j], (mode.params ? old_w.data<double>()[j] : 0.0) + fresh_w.data<double>()[j],
                  1e-12) << j;
      if (layernorm)
        EXPECT_NEAR(grad_b.data<double>()[j],
                    (mode.params ? old_b.data<double>()[j] : 0.0) + fresh_b.data<double>()[j], 1e-12) << j;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(LayerAndRms, NormCpu, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "layernorm" : "rmsnorm";
                         });

// ---- Rotary -------------------------------------------------------------------------------------

TEST(RotaryCpu, ForwardIsTheNeoxRotationAndBackwardInvertsIt) {
  std::mt19937_64 rng(31);
  const AttentionShape shape{2, 5, 3, 6};
  const int64_t tokens = shape.tokens(), width = 3 * shape.model_dim(), offset = 7;
  HostTensor qkv = random_tensor(DType::f64, {tokens, width}, rng);
  HostTensor rotated = poisoned(DType::f64, {tokens, width});
  cpu::rotary_forward(shape, qkv, 10000.0, offset, rotated);
  const int64_t half = shape.head_dim / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const double position = double(offset + t % shape.seq_len);
    for (int64_t column = 0; column < width; ++column) {
      const double* in = qkv.data<double>() + t * width;
      double expected = in[column];
      if (column < 2 * shape.model_dim()) {  // q or k: the complex product (x1 + i x2) e^{i theta}
        const int64_t head_start = column / shape.head_dim * shape.head_dim, i = column % shape.head_dim % half;
        const double theta = position / std::pow(10000.0, double(2 * i) / double(shape.head_dim));
        const double x1 = in[head_start + i], x2 = in[head_start + i + half];
        expected = column % shape.head_dim < half ? x1 * std::cos(theta) - x2 * std::sin(theta)
                                                  : x2 * std::cos(theta) + x1 * std::sin(theta);
      }
      EXPECT_NEAR(rotated.data<double>()[t * width + column], expected, 1e-12) << t << ", " << column;
    }
  }
  HostTensor restored = poisoned(DType::f64, {tokens, width});
  cpu::rotary_backward(shape, rotated, 10000.0, offset, restored);  // the inverse rotation
  EXPECT_LE(max_abs_difference(restored, qkv), 1e-12);
  HostTensor in_place(DType::f64, {tokens, width});
  copy_values(qkv, in_place);
  cpu::rotary_forward(shape, in_place, 10000.0, offset, in_place);
  EXPECT_EQ(max_abs_difference(in_place, rotated), 0.0);
}

TEST(RotaryCpu, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(32);
  const AttentionShape shape{1, 4, 2, 4};
  const int64_t tokens = shape.tokens(), width = 3 * shape.model_dim();
  HostTensor qkv = random_tensor(DType::f64, {tokens, width}, rng);
  HostTensor weights = random_tensor(DType::f64, {tokens, width}, rng);
  HostTensor out(DType::f64, {tokens, width});
  auto loss = [&] {
    cpu::rotary_forward(shape, qkv, 500.0, 3, out);
    return dot(out, weights);
  };
  HostTensor grad = poisoned(DType::f64, {tokens, width});
  cpu::rotary_backward(shape, weights, 500.0, 3, grad);
  EXPECT_LE(error_vs(grad, central_difference_gradient(loss, qkv, kStep)), kGradientTolerance);
}

// ---- Attention ----------------------------------------------------------------------------------

// Brute-force causal attention with a -inf mask over the full score matrix, in long double.
void naive_attention(const AttentionShape& shape, const std::vector<double>& qkv, std::vector<double>& out,
                     std::vector<double>& lse) {
  const int64_t d_model = shape.model_dim(), row = 3 * d_model, s_len = shape.seq_len, dh = shape.head_dim;
  out.assign(size_t(shape.tokens() * d_model), 0.0);
  lse.assign(size_t(shape.pairs() * s_len), 0.0);
  for (int64_t b = 0; b < shape.batch; ++b)
    for (int64_t h = 0; h < shape.heads; ++h)
      for (int64_t i = 0; i < s_len; ++i) {
        std::vector<long double> z(size_t(s_len), -std::numeric_limits<long double>::infinity());
        long double total = 0;
        for (int64_t j = 0; j < s_len; ++j) {
          if (j > i) continue;
          long double sum = 0;
          for (int64_t d = 0; d < dh; ++d)
            sum += (long double)qkv[size_t((b * s_len + i) * row + h * dh + d)] *
                   qkv[size_t((b * s_len + j) * row + d_model + h * dh + d)];
          z[size_t(j)] = sum / std::sqrt((long double)dh);
          total += std::exp(z[size_t(j)]);
        }
        lse[size_t((b * shape.heads + h) * s_len + i)] = double(std::log(total));
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t d = 0; d < dh; ++d)
            out[size_t((b * s_len + i) * d_model + h * dh + d)] +=
                double(std::exp(z[size_t(j)]) / total * qkv[size_t((b * s_len + j) * row + 2 * d_model + h * dh + d)]);
      }
}

TEST(AttentionCpu, ForwardMatchesBruteForceAndBackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(41);
  const AttentionShape shape{2, 5, 2, 4};
  const int64_t tokens = shape.tokens(), d_model = shape.model_dim();
  HostTensor qkv = random_tensor(DType::f64, {tokens, 3 * d_model}, rng, 1.5);
  HostTensor out = poisoned(DType::f64, {tokens, d_model});
  HostTensor stats = poisoned(DType::f64, {shape.batch, shape.heads, shape.seq_len});
  Tensor no_workspace;
  cpu::attention_forward(shape, qkv, out, stats, no_workspace);
  std::vector<double> expected_out, expected_lse;
  naive_attention(shape, to_vector(qkv), expected_out, expected_lse);
  EXPECT_LE(relative_error(to_vector(out), expected_out), 1e-13);
  EXPECT_LE(relative_error(to_vector(stats), expected_lse), 1e-13);

  HostTensor weights = random_tensor(DType::f64, {tokens, d_model}, rng);
  HostTensor scratch_out(DType::f64, {tokens, d_model}),
      scratch_stats(DType::f64, {shape.batch, shape.heads, shape.seq_len});
  auto loss = [&] {
    cpu::attention_forward(shape, qkv, scratch_out, scratch_stats, no_workspace);
    return dot(scratch_out, weights);
  };
  HostTensor grad_qkv = poisoned(DType::f64, {tokens, 3 * d_model});
  cpu::attention_backward(shape, qkv, out, weights, stats, no_workspace, grad_qkv);
  const std::vector<double> numeric = central_difference_gradient(loss, qkv, kStep);
  EXPECT_LE(relative_error(to_vector(grad_qkv), numeric), kGradientTolerance);
  // causality: changing the last key and value of sequence 0 leaves its earlier outputs unchanged
  for (int64_t column = d_model; column < 3 * d_model; ++column)
    qkv.data<double>()[(shape.seq_len - 1) * 3 * d_model + column] += 0.5;
  cpu::attention_forward(shape, qkv, scratch_out, scratch_stats, no_workspace);
  for (int64_t i = 0; i < (shape.seq_len - 1) * d_model; ++i)
    ASSERT_EQ(scratch_out.data<double>()[i], out.data<double>()[i]) << i;
  EXPECT_NE(scratch_out.data<double>()[(shape.seq_len - 1) * d_model],
            out.data<double>()[(shape.seq_len - 1) * d_model]);
}

// ---- Cross-entropy ------------------------------------------------------------------------------

TEST(CrossEntropyCpu, LossesMeanAndGradientMatchFiniteDifferences) {
  std::mt19937_64 rng(51);
  const int tokens = 6, vocab = 9;
  HostTensor logits = random_tensor(DType::f64, {tokens, vocab}, rng, 3.0);
  HostTensor targets = random_tokens(tokens, vocab, rng);
  targets.data<int32_t>()[2] = -1;  // ignored
  const float grad_scale = 0.37f;
  HostTensor losses = poisoned(DType::f64, {tokens}), summary = poisoned(DType::f64, {kNumCrossEntropySummary});
  HostTensor grad = poisoned(DType::f64, {tokens, vocab});
  cpu::cross_entropy(logits, targets, grad_scale, losses, summary, &grad.tensor());

  double total = 0;
  for (int t = 0; t < tokens; ++t) {
    const int target = targets.data<int32_t>()[t];
    const double* row = logits.data<double>() + t * vocab;
    long double sum = 0;
    for (int v = 0; v < vocab; ++v) sum += std::exp((long double)row[v]);
    const double expected = target < 0 ? 0.0 : double(std::log(sum) - row[target]);
    EXPECT_NEAR(losses.data<double>()[t], expected, 1e-12);
    total += expected;
  }
  EXPECT_NEAR(summary.data<double>()[kCrossEntropyMeanLoss], total / (tokens - 1), 1e-12);
  EXPECT_EQ(summary.data<double>()[kCrossEntropyValidTokens], tokens - 1);
  for (int v = 0; v < vocab; ++v) EXPECT_EQ(grad.data<double>()[2 * vocab + v], 0.0);

  HostTensor scratch_losses(DType::f64, {tokens}), scratch_summary(DType::f64, {kNumCrossEntropySummary});
  auto loss = [&] {
    cpu::cross_entropy(logits, targets, 1.0f, scratch_losses, scratch_summary, nullptr);
    double sum = 0;
    for (int t = 0; t < tokens; ++t) sum += scratch_losses.data<double>()[t];
    return sum * double(grad_scale);
  };
  EXPECT_LE(error_vs(grad, central_difference_gradient(loss, logits, kStep)), kGradientTolerance);

  // in place: the gradient overwrites the logits
  HostTensor in_place(DType::f64, {tokens, vocab});
  copy_values(logits, in_place);
  cpu::cross_entropy(in_place, targets, grad_scale, scratch_losses, scratch_summary, &in_place.tensor());
  EXPECT_LE(max_abs_difference(in_place, grad), 1e-15);
  EXPECT_LE(max_abs_difference(scratch_losses, losses), 1e-15);

  targets.data<int32_t>()[0] = vocab;
  expect_bad_input([&] { cpu::cross_entropy(logits, targets, 1.0f, losses, summary, nullptr); });
}

TEST(CrossEntropyCpu, AllIgnoredGivesZeroMean) {
  std::mt19937_64 rng(52);
  HostTensor logits = random_tensor(DType::f32, {3, 4}, rng);
  HostTensor targets(DType::i32, {3});
  for (int t = 0; t < 3; ++t) targets.data<int32_t>()[t] = -1;
  HostTensor losses = poisoned(DType::f32, {3}), summary = poisoned(DType::f32, {kNumCrossEntropySummary});
  cpu::cross_entropy(logits, targets, 1.0f, losses, summary, nullptr);
  EXPECT_EQ(summary.data<float>()[kCrossEntropyMeanLoss], 0.0f);
  EXPECT_EQ(summary.data<float>()[kCrossEntropyValidTokens], 0.0f);
}

// ---- AdamW --------------------------------------------------------------------------------------

struct AdamWState {
  HostTensor param, grad, m, v, copy;
  AdamWState(DType dtype, int64_t count, std::mt19937_64& rng)
      : param(dtype, {count}), grad(dtype, {count}), m(dtype, {count}), v(dtype, {count}), copy(DType::bf16, {count}) {
    fill_uniform(param, rng, -1, 1);
    fill_uniform(grad, rng, -2, 2);
    fill_uniform(m, rng, -0.1, 0.1);
    fill_uniform(v, rng, 0.0, 0.05);
    poison(copy);
  }
  AdamWTensor entry(bool decay) {
    AdamWTensor e{param, grad, m, v, copy, decay};
    return e;
  }
};

TEST(AdamWCpu, MatchesTheFormulaInDoubleForF32AndF64) {
  std::mt19937_64 rng(61);
  AdamWParams params;
  params.lr = 1e-2;
  params.weight_decay = 0.1;
  params.step = 3;
  params.grad_scale = 0.25;
  for (DType dtype : {DType::f32, DType::f64}) {
    AdamWState decayed(dtype, 300, rng), plain(dtype, 17, rng);
    std::vector<double> p0[2] = {to_vector(decayed.param), to_vector(plain.param)};
    std::vector<double> g0[2] = {to_vector(decayed.grad), to_vector(plain.grad)};
    std::vector<double> m0[2] = {to_vector(decayed.m), to_vector(plain.m)};
    std::vector<double> v0[2] = {to_vector(decayed.v), to_vector(plain.v)};
    cpu::adamw_step({decayed.entry(true), plain.entry(false)}, params);
    AdamWState* states[2] = {&decayed, &plain};
    for (int which = 0; which < 2; ++which) {
      std::vector<double> p = p0[which], m = m0[which], v = v0[which];
      for (size_t i = 0; i < p.size(); ++i) {
        const double g = g0[which][i] * params.grad_scale;
        m[i] = params.beta1 * m[i] + (1 - params.beta1) * g;
        v[i] = params.beta2 * v[i] + (1 - params.beta2) * g * g;
        const double bc1 = 1 - std::pow(params.beta1, 3.0), bc2 = 1 - std::pow(params.beta2, 3.0);
        if (which == 0) p[i] *= 1 - params.lr * params.weight_decay;
        p[i] -= params.lr / bc1 * m[i] / (std::sqrt(v[i] / bc2) + params.eps);
      }
      const double tolerance = dtype == DType::f32 ? 2e-6 : 1e-14;
      EXPECT_LE(relative_error(to_vector(states[which]->param), p), tolerance) << dtype_name(dtype);
      EXPECT_LE(relative_error(to_vector(states[which]->m), m), tolerance);
      EXPECT_LE(relative_error(to_vector(states[which]->v), v), tolerance);
      for (int64_t i = 0; i < states[which]->param.numel(); ++i)
        ASSERT_EQ(get_element(states[which]->copy, i),
                  double(float(Bf16(float(get_element(states[which]->param, i))))));
    }
  }
  params.beta2 = 1.0;
  std::mt19937_64 rng2(62);
  AdamWState bad(DType::f32, 4, rng2);
  expect_bad_input([&] { cpu::adamw_step({bad.entry(true)}, params); });
}

// ---- Gradient norm and non-finite check ---------------------------------------------------------

TEST(GradCheckCpu, SumsSquaresAndCountsNonFinite) {
  std::mt19937_64 rng(71);
  HostTensor a = random_tensor(DType::f32, {33}, rng), b = random_tensor(DType::f64, {4, 5}, rng);
  HostTensor result = poisoned(DType::f64, {kNumGradCheckResults});
  cpu::grad_norm_and_check({a, b}, result);
  double expected = 0;
  for (double value : to_vector(a)) expected += value * value;
  for (double value : to_vector(b)) expected += value * value;
  EXPECT_NEAR(result.data<double>()[kGradSquaredNorm], expected, 1e-12 * expected);
  EXPECT_EQ(result.data<double>()[kGradNonFiniteCount], 0.0);
  a.data<float>()[5] = std::numeric_limits<float>::infinity();
  b.data<double>()[7] = std::numeric_limits<double>::quiet_NaN();
  cpu::grad_norm_and_check({a, b}, result);
  EXPECT_EQ(result.data<double>()[kGradNonFiniteCount], 2.0);
  EXPECT_FALSE(std::isfinite(result.data<double>()[kGradSquaredNorm]));
}

}  // namespace
