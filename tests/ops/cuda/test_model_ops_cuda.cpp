// CUDA dense transformer ops (src/ops/model_ops.h) against the CPU references run in float64 on the
// same (already rounded) inputs: relative error (L2) <= 1e-5 for fp32 tensors and <= 1e-2 for
// bf16 ones. AdamW must match the CPU bit for bit; the gradient reductions (embedding table,
// norm weights, attention, gradient check) must give identical bits when run twice. Shapes are
// chosen to reach the vectorized and the scalar paths, several attention passes, and both
// embedding-backward plans (one token split, several splits). Outputs are poisoned (0xFF bytes,
// NaN) before every call.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "src/ops/model_ops.h"
#include "src/core/device.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

double tolerance_for(DType dtype) { return dtype == DType::f32 ? 1e-5 : 1e-2; }

// An uninitialized f64 host tensor with the shape of `shape_of`.
HostTensor f64_like(const Tensor& shape_of) {
  const auto& dims = shape_of.shape;
  switch (shape_of.rank) {
    case 1:
      return HostTensor(DType::f64, {dims[0]});
    case 2:
      return HostTensor(DType::f64, {dims[0], dims[1]});
    case 3:
      return HostTensor(DType::f64, {dims[0], dims[1], dims[2]});
    default:
      return HostTensor(DType::f64, {dims[0], dims[1], dims[2], dims[3]});
  }
}

// f64 host tensor of random values already rounded to `dtype` (so CPU and GPU see the same inputs).
HostTensor random_input(DType dtype, std::initializer_list<int64_t> dims, std::mt19937_64& rng, double scale = 1.0) {
  HostTensor values(DType::f64, dims);
  fill_uniform(values, rng, -scale, scale);
  for (int64_t i = 0; i < values.numel(); ++i)
    values.data<double>()[i] = round_to(dtype, float(values.data<double>()[i]));
  return values;
}

double error_vs(const HostTensor& gpu, const HostTensor& cpu_reference) {
  return relative_error(to_vector(gpu), to_vector(cpu_reference));
}

// ---- Embedding ----------------------------------------------------------------------------------

struct EmbeddingCase {
  DType dtype;
  int64_t vocab, width, seq, tokens;
  bool positions;
};

class EmbeddingCuda : public ::testing::TestWithParam<EmbeddingCase> {};

TEST_P(EmbeddingCuda, MatchesCpuAndIsDeterministic) {
  SKIP_WITHOUT_CUDA();
  const EmbeddingCase c = GetParam();
  std::mt19937_64 rng(1000 + c.vocab + c.width);
  HostTensor tokens(DType::i32, {c.tokens});
  fill_uniform(tokens, rng, 0, double(c.vocab - 1));
  for (int64_t t = 0; t < c.tokens; t += 3) tokens.data<int32_t>()[t] = 1;  // a heavy id, as real text has
  HostTensor table = random_input(c.dtype, {c.vocab, c.width}, rng);
  HostTensor positions = random_input(c.dtype, {c.seq + 1, c.width}, rng);
  HostTensor grad_out = random_input(c.dtype, {c.tokens, c.width}, rng);

  HostTensor out_ref = f64_like(grad_out.tensor());
  cpu::embedding_forward(tokens, table, c.positions ? &positions.tensor() : nullptr, c.seq, out_ref);
  HostTensor grad_table_ref = f64_like(table.tensor()), grad_positions_ref = f64_like(positions.tensor());
  cpu::embedding_backward(tokens, grad_out, c.seq, false, grad_table_ref, &grad_positions_ref.tensor());

  DeviceTensor d_tokens = to_device(tokens, DType::i32), d_table = to_device(table, c.dtype);
  DeviceTensor d_positions = to_device(positions, c.dtype), d_grad_out = to_device(grad_out, c.dtype);
  DeviceTensor d_out(c.dtype, grad_out.tensor());
  cuda::embedding_forward(d_tokens, d_table, c.positions ? &d_positions.tensor() : nullptr, c.seq, d_out, nullptr);
  EXPECT_LE(error_vs(d_out.download(), out_ref), c.positions ? tolerance_for(c.dtype) : 0.0);

  DeviceTensor d_grad_table(DType::f32, table.tensor()), d_grad_positions(DType::f32, positions.tensor());
  cuda::embedding_backward(d_tokens, d_grad_out, c.seq, false, d_grad_table, &d_grad_positions.tensor(), nullptr);
  EXPECT_LE(error_vs(d_grad_table.download(), grad_table_ref), 1e-5);
  EXPECT_LE(error_vs(d_grad_positions.download(), grad_positions_ref), 1e-5);
  const std::vector<uint8_t> first_bits = d_grad_table.bytes();
  d_grad_table.poison();
  cuda::embedding_backward(d_tokens, d_grad_out, c.seq, false, d_grad_table, nullptr, nullptr);
  EXPECT_TRUE(first_bits == d_grad_table.bytes()) << "embedding backward is not bit-reproducible";

  // accumulate adds the same gradient onto what is there
  HostTensor base = random_input(DType::f32, {c.vocab, c.width}, rng);
  DeviceTensor d_accumulated = to_device(base, DType::f32);
  cuda::embedding_backward(d_tokens, d_grad_out, c.seq, true, d_accumulated, nullptr, nullptr);
  HostTensor expected = f64_like(table.tensor());
  for (int64_t i = 0; i < expected.numel(); ++i)
    expected.data<double>()[i] = base.data<double>()[i] + grad_table_ref.data<double>()[i];
  EXPECT_LE(error_vs(d_accumulated.download(), expected), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, EmbeddingCuda,
    ::testing::Values(EmbeddingCase{DType::bf16, 4096, 2048, 64, 2048, true},  // 512 blocks: one split
                      EmbeddingCase{DType::f32, 3000, 320, 64, 2048, true},    // many groups, 6 splits
                      EmbeddingCase{DType::f32, 50, 300, 128, 4096, false},    // one group, 16 splits
                      EmbeddingCase{DType::f16, 257, 72, 7, 700, true},        // scalar path
                      EmbeddingCase{DType::f32, 70, 40, 1, 1, true}));

TEST(EmbeddingCudaIds, OutOfRangeIdsGiveZeroRowsAndNoGradient) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(7);
  const int64_t vocab = 10, width = 16, tokens_count = 8;
  HostTensor tokens(DType::i32, {tokens_count});
  fill_uniform(tokens, rng, 0, vocab - 1);
  tokens.data<int32_t>()[2] = int32_t(vocab);
  tokens.data<int32_t>()[5] = -4;
  HostTensor table = random_input(DType::f32, {vocab, width}, rng);
  HostTensor grad_out = random_input(DType::f32, {tokens_count, width}, rng);
  DeviceTensor d_tokens = to_device(tokens, DType::i32), d_table = to_device(table, DType::f32);
  DeviceTensor d_out(DType::f32, grad_out.tensor()), d_grad_out = to_device(grad_out, DType::f32);
  cuda::embedding_forward(d_tokens, d_table, nullptr, tokens_count, d_out, nullptr);
  HostTensor out = d_out.download();
  for (int64_t t = 0; t < tokens_count; ++t) {  // in-range rows are table rows, out-of-range ones zero
    const int id = tokens.data<int32_t>()[t];
    const bool valid = id >= 0 && id < vocab;
    for (int64_t c = 0; c < width; ++c)
      EXPECT_EQ(out.data<float>()[t * width + c], valid ? float(table.data<double>()[id * width + c]) : 0.0f)
          << "token " << t << " (id " << id << "), column " << c;
  }
  DeviceTensor d_grad(DType::f32, table.tensor());
  cuda::embedding_backward(d_tokens, d_grad_out, tokens_count, false, d_grad, nullptr, nullptr);
  HostTensor grad = d_grad.download();
  // The reference is summed here (cpu::embedding_backward rejects out-of-range ids), so it must start
  // from zero: host tensors are uninitialized memory, and rows no token hits must stay exactly zero.
  HostTensor expected = f64_like(table.tensor());
  std::fill(expected.data<double>(), expected.data<double>() + expected.numel(), 0.0);
  for (int64_t t = 0; t < tokens_count; ++t) {
    const int id = tokens.data<int32_t>()[t];
    if (id < 0 || id >= vocab) continue;
    for (int64_t c = 0; c < width; ++c)
      expected.data<double>()[id * width + c] += grad_out.data<double>()[t * width + c];
  }
  EXPECT_LE(error_vs(grad, expected), 1e-6);
}

// ---- Norms --------------------------------------------------------------------------------------

struct NormCase {
  DType dtype;
  bool layernorm;
  int64_t rows, width;
};

class NormCuda : public ::testing::TestWithParam<NormCase> {};

TEST_P(NormCuda, ForwardAndBackwardMatchCpu) {
  SKIP_WITHOUT_CUDA();
  const NormCase c = GetParam();
  std::mt19937_64 rng(2000 + c.width);
  const float eps = 1e-5f;
  HostTensor x = random_input(c.dtype, {c.rows, c.width}, rng, 2.0);
  for (int64_t j = 0; j < c.width; ++j) x.data<double>()[j] = round_to(c.dtype, float(x.data<double>()[j] + 4.0));
  HostTensor weight = random_input(c.dtype, {c.width}, rng), bias = random_input(c.dtype, {c.width}, rng);
  HostTensor grad_out = random_input(c.dtype, {c.rows, c.width}, rng);
  HostTensor out_ref = f64_like(x.tensor()), mean_ref(DType::f64, {c.rows}), rstd_ref(DType::f64, {c.rows});
  HostTensor grad_x_ref = f64_like(x.tensor()), grad_w_ref(DType::f64, {c.width}), grad_b_ref(DType::f64, {c.width});
  DeviceTensor d_x = to_device(x, c.dtype), d_w = to_device(weight, c.dtype), d_b = to_device(bias, c.dtype);
  DeviceTensor d_dy = to_device(grad_out, c.dtype), d_out(c.dtype, x.tensor());
  DeviceTensor d_mean(DType::f32, mean_ref.tensor()), d_rstd(DType::f32, rstd_ref.tensor());
  DeviceTensor d_dx(c.dtype, x.tensor()), d_dw(DType::f32, weight.tensor()), d_db(DType::f32, bias.tensor());
  if (c.layernorm) {
    cpu::layernorm_forward(x, weight, bias, eps, out_ref, mean_ref, rstd_ref);
    cpu::layernorm_backward(x, weight, mean_ref, rstd_ref, grad_out, grad_x_ref, grad_w_ref, grad_b_ref);
    cuda::layernorm_forward(d_x, d_w, d_b, eps, d_out, d_mean, d_rstd, nullptr);
    cuda::layernorm_backward(d_x, d_w, d_mean, d_rstd, d_dy, d_dx, d_dw, d_db, nullptr);
    EXPECT_LE(error_vs(d_mean.download(), mean_ref), 1e-5);
    EXPECT_LE(error_vs(d_db.download(), grad_b_ref), tolerance_for(c.dtype));
  } else {
    cpu::rmsnorm_forward(x, weight, eps, out_ref, rstd_ref);
    cpu::rmsnorm_backward(x, weight, rstd_ref, grad_out, grad_x_ref, grad_w_ref);
    cuda::rmsnorm_forward(d_x, d_w, eps, d_out, d_rstd, nullptr);
    cuda::rmsnorm_backward(d_x, d_w, d_rstd, d_dy, d_dx, d_dw, nullptr);
  }
  EXPECT_LE(error_vs(d_rstd.download(), rstd_ref), 1e-5);
  EXPECT_LE(error_vs(d_out.download(), out_ref), tolerance_for(c.dtype));
  EXPECT_LE(error_vs(d_dx.download(), grad_x_ref), tolerance_for(c.dtype));
  EXPECT_LE(error_vs(d_dw.download(), grad_w_ref), tolerance_for(c.dtype));

  const std::vector<uint8_t> dw_bits = d_dw.bytes(), dx_bits = d_dx.bytes();
  d_dw.poison();
  d_dx.poison();
  if (c.layernorm)
    cuda::layernorm_backward(d_x, d_w, d_mean, d_rstd, d_dy, d_dx, d_dw, d_db, nullptr);
  else
    cuda::rmsnorm_backward(d_x, d_w, d_rstd, d_dy, d_dx, d_dw, nullptr);
  EXPECT_TRUE(dw_bits == d_dw.bytes() && dx_bits == d_dx.bytes()) << "norm backward not reproducible";
}

// NormAccumulate on CUDA: dx added to grad_x's old values (rounded once, in fp32) and dw, db added to
// theirs, against the CPU reference from the same starting values.
TEST_P(NormCuda, AccumulateMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const NormCase c = GetParam();
  std::mt19937_64 rng(3000 + c.width);
  const float eps = 1e-5f;
  HostTensor x = random_input(c.dtype, {c.rows, c.width}, rng, 2.0);
  HostTensor weight = random_input(c.dtype, {c.width}, rng), bias = random_input(c.dtype, {c.width}, rng);
  HostTensor grad_out = random_input(c.dtype, {c.rows, c.width}, rng);
  HostTensor out_ref = f64_like(x.tensor()), mean_ref(DType::f64, {c.rows}), rstd_ref(DType::f64, {c.rows});
  HostTensor grad_x_ref = random_input(c.dtype, {c.rows, c.width}, rng);
  HostTensor grad_w_ref = random_input(DType::f32, {c.width}, rng);
  HostTensor grad_b_ref = random_input(DType::f32, {c.width}, rng);
  DeviceTensor d_x = to_device(x, c.dtype), d_w = to_device(weight, c.dtype), d_b = to_device(bias, c.dtype);
  DeviceTensor d_dy = to_device(grad_out, c.dtype), d_out(c.dtype, x.tensor());
  DeviceTensor d_mean(DType::f32, mean_ref.tensor()), d_rstd(DType::f32, rstd_ref.tensor());
  // The starting values, uploaded before the reference adds to them.
  DeviceTensor d_dx = to_device(grad_x_ref, c.dtype), d_dw = to_device(grad_w_ref, DType::f32),
               d_db = to_device(grad_b_ref, DType::f32);
  const NormAccumulate both{true, true};
  if (c.layernorm) {
    cpu::layernorm_forward(x, weight, bias, eps, out_ref, mean_ref, rstd_ref);
    cpu::layernorm_backward(x, weight, mean_ref, rstd_ref, grad_out, grad_x_ref, grad_w_ref, grad_b_ref, both);
    cuda::layernorm_forward(d_x, d_w, d_b, eps, d_out, d_mean, d_rstd, nullptr);
    cuda::layernorm_backward(d_x, d_w, d_mean, d_rstd, d_dy, d_dx, d_dw, d_db, nullptr, both);
    EXPECT_LE(error_vs(d_db.download(), grad_b_ref), tolerance_for(c.dtype));
  } else {
    cpu::rmsnorm_forward(x, weight, eps, out_ref, rstd_ref);
    cpu::rmsnorm_backward(x, weight, rstd_ref, grad_out, grad_x_ref, grad_w_ref, both);
    cuda::rmsnorm_forward(d_x, d_w, eps, d_out, d_rstd, nullptr);
    cuda::rmsnorm_backward(d_x, d_w, d_rstd, d_dy, d_dx, d_dw, nullptr, both);
  }
  EXPECT_LE(error_vs(d_dx.download(), grad_x_ref), tolerance_for(c.dtype));
  EXPECT_LE(error_vs(d_dw.download(), grad_w_ref), tolerance_for(c.dtype));
}

INSTANTIATE_TEST_SUITE_P(Shapes, NormCuda,
                         ::testing::Values(NormCase{DType::f32, true, 300, 768}, NormCase{DType::bf16, true, 300, 768},
                                           NormCase{DType::f32, false, 130, 333},
                                           NormCase{DType::bf16, false, 257, 1024},
                                           NormCase{DType::f16, true, 65, 200},
                                           NormCase{DType::bf16, true, 1000, 768}));  // 16 chunks: every final run

// ---- Rotary -------------------------------------------------------------------------------------

class RotaryCuda : public ::testing::TestWithParam<DType> {};

// Head dims 64 and 128 take the packed kernel with its (cos, sin) table, 12 (six pairs: no whole
// 16-byte pack) the scalar one; the offsets grow past the table's first 1024 positions, so the
// table is rebuilt between calls on the same stream, and Dh changes between shapes.
TEST_P(RotaryCuda, ForwardAndBackwardMatchCpuInAndOutOfPlace) {
  SKIP_WITHOUT_CUDA();
  const DType dtype = GetParam();
  std::mt19937_64 rng(3000);
  struct Case {
    AttentionShape shape;
    int64_t offset;
  };
  const Case cases[] = {{{2, 96, 3, 64}, 0},
                        {{2, 96, 3, 64}, 3000},  // large angles: the double-precision angle matters
                        {{1, 40, 2, 12}, 3000},
                        {{2, 33, 2, 128}, 5000}};
  for (const Case& c : cases) {
    const AttentionShape& shape = c.shape;
    SCOPED_TRACE(::testing::Message() << "S=" << shape.seq_len << " H=" << shape.heads << " Dh=" << shape.head_dim
                                    << " offset=" << c.offset);
    HostTensor qkv = random_input(dtype, {shape.tokens(), 3 * shape.model_dim()}, rng);
    HostTensor out_ref = f64_like(qkv.tensor()), back_ref = f64_like(qkv.tensor());
    cpu::rotary_forward(shape, qkv, 10000.0, c.offset, out_ref);
    cpu::rotary_backward(shape, qkv, 10000.0, c.offset, back_ref);
    DeviceTensor d_qkv = to_device(qkv, dtype), d_out(dtype, qkv.tensor());
    d_out.poison();
    cuda::rotary_forward(shape, d_qkv, 10000.0, c.offset, d_out, nullptr);
    EXPECT_LE(error_vs(d_out.download(), out_ref), tolerance_for(dtype) / 4);
    d_out.poison();
    cuda::rotary_backward(shape, d_qkv, 10000.0, c.offset, d_out, nullptr);
    EXPECT_LE(error_vs(d_out.download(), back_ref), tolerance_for(dtype) / 4);
    cuda::rotary_forward(shape, d_qkv, 10000.0, c.offset, d_qkv, nullptr);  // in place
    EXPECT_LE(error_vs(d_qkv.download(), out_ref), tolerance_for(dtype) / 4);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RotaryCuda, ::testing::Values(DType::f32, DType::bf16, DType::f16));

// ---- Attention ----------------------------------------------------------------------------------

struct AttentionCase {
  DType dtype;
  AttentionShape shape;
  int64_t pairs_per_pass;
};

class AttentionCuda : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionCuda, ForwardAndBackwardMatchCpu) {
  SKIP_WITHOUT_CUDA();
  const AttentionCase c = GetParam();
  const AttentionShape& shape = c.shape;
  std::mt19937_64 rng(4000 + shape.seq_len);
  const int64_t tokens = shape.tokens(), d_model = shape.model_dim();
  HostTensor qkv = random_input(c.dtype, {tokens, 3 * d_model}, rng, 1.5);
  HostTensor grad_out = random_input(c.dtype, {tokens, d_model}, rng);
  HostTensor out_ref(DType::f64, {tokens, d_model}), stats_ref(DType::f64, {shape.batch, shape.heads, shape.seq_len});
  HostTensor grad_ref = f64_like(qkv.tensor());
  Tensor no_workspace;
  cpu::attention_forward(shape, qkv, out_ref, stats_ref, no_workspace);
  cpu::attention_backward(shape, qkv, out_ref, grad_out, stats_ref, no_workspace, grad_ref);

  DeviceTensor d_workspace(DType::u8, {attention_workspace_bytes(shape, c.dtype, c.pairs_per_pass)});
  DeviceTensor d_qkv = to_device(qkv, c.dtype), d_dout = to_device(grad_out, c.dtype), d_out(c.dtype, out_ref.tensor());
  DeviceTensor d_stats(DType::f32, stats_ref.tensor()), d_grad(c.dtype, qkv.tensor());
  cuda::attention_forward(shape, d_qkv, d_out, d_stats, d_workspace, nullptr);
  EXPECT_LE(error_vs(d_out.download(), out_ref), tolerance_for(c.dtype));
  EXPECT_LE(error_vs(d_stats.download(), stats_ref), 1e-5);
  cuda::attention_backward(shape, d_qkv, d_out, d_dout, d_stats, d_workspace, d_grad, true, nullptr);
  HostTensor grad = d_grad.download();
  EXPECT_LE(error_vs(grad, grad_ref), tolerance_for(c.dtype));
  // each third separately, so a wrong dk or dv cannot hide behind a large dq
  for (int part = 0; part < 3; ++part) {
    std::vector<double> got, want;
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t j = part * d_model; j < (part + 1) * d_model; ++j) {
        got.push_back(get_element(grad, t * 3 * d_model + j));
        want.push_back(grad_ref.data<double>()[t * 3 * d_model + j]);
      }
    EXPECT_LE(relative_error(got, want), tolerance_for(c.dtype)) << "part " << part;
  }
  const std::vector<uint8_t> bits = d_grad.bytes();
  d_grad.poison();
  cuda::attention_backward(shape, d_qkv, d_out, d_dout, d_stats, d_workspace, d_grad, true, nullptr);
  EXPECT_TRUE(bits == d_grad.bytes()) << "attention backward is not bit-reproducible";
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionCuda,
                         ::testing::Values(AttentionCase{DType::f32, AttentionShape{2, 77, 3, 32}, 6},  // one pass
                                           AttentionCase{DType::f32, AttentionShape{2, 64, 3, 16},
                                                         4},  // two passes, last partial
                                           AttentionCase{DType::bf16, AttentionShape{2, 128, 4, 64}, 3},
                                           AttentionCase{DType::f16, AttentionShape{1, 33, 2, 8}, 1}));

TEST(AttentionCudaWorkspace, RejectsATooSmallWorkspace) {
  SKIP_WITHOUT_CUDA();
  const AttentionShape shape{1, 16, 2, 8};
  DeviceTensor workspace(DType::u8, {attention_workspace_bytes(shape, DType::f32, 1) - 256});
  DeviceTensor qkv(DType::f32, {16, 48}), out(DType::f32, {16, 16}), stats(DType::f32, {1, 2, 16});
  EXPECT_THROW(cuda::attention_forward(shape, qkv, out, stats, workspace, nullptr), Error);
}

// ---- Cross-entropy ------------------------------------------------------------------------------

struct CrossEntropyCase {
  DType dtype;
  int64_t tokens, vocab;
  bool in_place;
};

class CrossEntropyCuda : public ::testing::TestWithParam<CrossEntropyCase> {};

TEST_P(CrossEntropyCuda, MatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const CrossEntropyCase c = GetParam();
  std::mt19937_64 rng(5000 + c.vocab);
  HostTensor logits = random_input(c.dtype, {c.tokens, c.vocab}, rng, 4.0);
  HostTensor targets(DType::i32, {c.tokens});
  fill_uniform(targets, rng, 0, double(c.vocab - 1));
  for (int64_t t = 0; t < c.tokens; t += 5) targets.data<int32_t>()[t] = -1;
  const float grad_scale = 1.0f / float(c.tokens);
  HostTensor losses_ref(DType::f64, {c.tokens}), summary_ref(DType::f64, {kNumCrossEntropySummary});
  HostTensor grad_ref = f64_like(logits.tensor());
  cpu::cross_entropy(logits, targets, grad_scale, losses_ref, summary_ref, &grad_ref.tensor());

  DeviceTensor d_logits = to_device(logits, c.dtype), d_targets = to_device(targets, DType::i32);
  DeviceTensor d_losses(DType::f32, losses_ref.tensor()), d_summary(DType::f32, summary_ref.tensor());
  DeviceTensor d_grad(c.dtype, logits.tensor());
  Tensor& grad_target = c.in_place ? d_logits.tensor() : d_grad.tensor();
  cuda::cross_entropy(d_logits, d_targets, grad_scale, d_losses, d_summary, &grad_target, nullptr);
  EXPECT_LE(error_vs(d_losses.download(), losses_ref), 1e-5);
  HostTensor summary = d_summary.download();
  EXPECT_NEAR(summary.data<float>()[kCrossEntropyMeanLoss], summary_ref.data<double>()[kCrossEntropyMeanLoss],
              1e-5 * summary_ref.data<double>()[kCrossEntropyMeanLoss]);
  EXPECT_EQ(summary.data<float>()[kCrossEntropyValidTokens],
            float(summary_ref.data<double>()[kCrossEntropyValidTokens]));
  EXPECT_LE(error_vs((c.in_place ? d_logits : d_grad).download(), grad_ref), tolerance_for(c.dtype));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CrossEntropyCuda,
                         ::testing::Values(CrossEntropyCase{DType::f32, 97, 1000, false},
                                           CrossEntropyCase{DType::bf16, 64, 4096, true},
                                           CrossEntropyCase{DType::f32, 10, 37, true},
                                           CrossEntropyCase{DType::f16, 33, 515, false}));

TEST(CrossEntropyCudaTargets, BadTargetGivesNanLossAndZeroGradient) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(55);
  HostTensor logits = random_input(DType::f32, {3, 8}, rng);
  HostTensor targets(DType::i32, {3});
  targets.data<int32_t>()[0] = 2;
  targets.data<int32_t>()[1] = 8;  // == V: invalid
  targets.data<int32_t>()[2] = -1;
  DeviceTensor d_logits = to_device(logits, DType::f32), d_targets = to_device(targets, DType::i32);
  DeviceTensor d_losses(DType::f32, {3}), d_summary(DType::f32, {kNumCrossEntropySummary});
  DeviceTensor d_grad(DType::f32, logits.tensor());
  cuda::cross_entropy(d_logits, d_targets, 1.0f, d_losses, d_summary, &d_grad.tensor(), nullptr);
  HostTensor losses = d_losses.download(), grad = d_grad.download(), summary = d_summary.download();
  EXPECT_TRUE(std::isfinite(losses.data<float>()[0]));
  EXPECT_TRUE(std::isnan(losses.data<float>()[1]));
  EXPECT_EQ(losses.data<float>()[2], 0.0f);
  for (int v = 0; v < 8; ++v) {
    EXPECT_EQ(grad.data<float>()[8 + v], 0.0f);
    EXPECT_EQ(grad.data<float>()[16 + v], 0.0f);
  }
  EXPECT_TRUE(std::isnan(summary.data<float>()[kCrossEntropyMeanLoss]));
}

// ---- AdamW --------------------------------------------------------------------------------------

TEST(AdamWCuda, MatchesCpuBitForBitOverSteps) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(6000);
  // sizes: tiny, odd, just over a chunk, several chunks; the odd offset makes one tensor unaligned
  // (tensor 2's fp32 arrays, tensor 4's copy)
  const std::vector<int64_t> sizes = {1, 17, 16384 + 5, 40000, 1000};
  const std::vector<DType> copies = {DType::bf16, DType::f16, DType::bf16, DType::u8 /* none */, DType::bf16};
  struct Slot {
    HostTensor host[4];  // param, grad, m, v as f32
    HostTensor copy;
    std::vector<DeviceTensor> device;
    Tensor device_views[5];
  };
  std::vector<Slot> slots(sizes.size());
  std::vector<AdamWTensor> cpu_list, cuda_list;
  for (size_t i = 0; i < sizes.size(); ++i) {
    Slot& slot = slots[i];
    const int64_t count = sizes[i], pad = i == 2 ? 1 : 0;  // tensor 2 starts one element into its buffer
    for (int part = 0; part < 4; ++part) {
      slot.host[part] = HostTensor(DType::f32, {count});
      fill_uniform(slot.host[part], rng, part == 3 ? 0.0 : -1.0, part == 3 ? 0.01 : 1.0);
    }
    slot.copy = HostTensor(copies[i] == DType::u8 ? DType::bf16 : copies[i], {count});
    poison(slot.copy);
    for (int part = 0; part < 4; ++part) {
      slot.device.push_back(DeviceTensor(DType::f32, {count + pad}));
      Tensor view = slot.device.back().tensor();
      view.data = static_cast<float*>(view.data) + pad;
      view.shape[0] = count;
      device_copy(view.data, DeviceKind::cuda, slot.host[part].tensor().data, DeviceKind::cpu, size_t(count) * 4);
      slot.device_views[part] = view;
    }
    // tensor 4's copy starts one element into its buffer: 2-byte aligned, so its fp32 arrays take the
    // 16-byte loads while its copy takes one store per element (the others: one 8-byte store per 4)
    const int64_t copy_pad = i == 4 ? 1 : 0;
    slot.device.push_back(DeviceTensor(slot.copy.tensor().dtype, {count + copy_pad}));
    Tensor copy_view = slot.device.back().tensor();
    copy_view.data = static_cast<uint16_t*>(copy_view.data) + copy_pad;
    copy_view.shape[0] = count;
    slot.device_views[4] = copy_view;
    AdamWTensor cpu_entry{slot.host[0], slot.host[1], slot.host[2], slot.host[3], Tensor(), i % 2 == 0};
    AdamWTensor cuda_entry{
        slot.device_views[0], slot.device_views[1], slot.device_views[2], slot.device_views[3], Tensor(), i % 2 == 0};
    if (copies[i] != DType::u8) {
      cpu_entry.compute_copy = slot.copy.tensor();
      cuda_entry.compute_copy = slot.device_views[4];
    }
    cpu_list.push_back(cpu_entry);
    cuda_list.push_back(cuda_entry);
  }
  AdamWParams params;
  params.lr = 3e-3;
  params.weight_decay = 0.1;
  for (int64_t step = 1; step <= 3; ++step) {
    params.step = step;
    params.grad_scale = 1.0 / (65536.0 * step);
    for (size_t i = 0; i < slots.size(); ++i) {  // fresh gradients every step, same on both sides
      fill_uniform(slots[i].host[1], rng, -65536.0, 65536.0);
      device_copy(slots[i].device_views[1].data, DeviceKind::cuda, slots[i].host[1].tensor().data, DeviceKind::cpu,
                  size_t(sizes[i]) * 4);
    }
    // the last step drops a tensor: the device table must be rebuilt, not reused
    std::vector<AdamWTensor> cpu_step = cpu_list, cuda_step = cuda_list;
    if (step == 3) {
      cpu_step.pop_back();
      cuda_step.pop_back();
    }
    cpu::adamw_step(cpu_step, params);
    cuda::adamw_step(cuda_step, params, nullptr);
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    for (int part : {0, 2, 3}) {
      std::vector<float> got(size_t(sizes[i]));
      device_copy(got.data(), DeviceKind::cpu, slots[i].device_views[part].data, DeviceKind::cuda, got.size() * 4);
      int64_t different = 0;
      double worst = 0;
      for (int64_t e = 0; e < sizes[i]; ++e) {
        const float want = slots[i].host[part].data<float>()[e];
        if (std::memcmp(&got[size_t(e)], &want, 4) != 0) ++different;
        worst = std::max(worst, std::fabs(double(got[size_t(e)]) - want) / std::max(1e-30, std::fabs(double(want))));
      }
      EXPECT_LE(worst, 1e-6) << "tensor " << i << " part " << part;
      EXPECT_EQ(different, 0) << "tensor " << i << " part " << part << " differs in bits from the CPU";
    }
    if (copies[i] != DType::u8) {
      std::vector<uint16_t> got(size_t(sizes[i]));
      device_copy(got.data(), DeviceKind::cpu, slots[i].device_views[4].data, DeviceKind::cuda, got.size() * 2);
      EXPECT_EQ(std::memcmp(got.data(), slots[i].copy.tensor().data, got.size() * 2), 0) << "copy " << i;
    }
  }
}

// ---- Gradient norm and non-finite check ---------------------------------------------------------

TEST(GradCheckCuda, MatchesCpuCountsNonFiniteAndIsDeterministic) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(7000);
  const std::vector<std::pair<DType, int64_t>> specs = {
      {DType::f32, 100000}, {DType::bf16, 16384 * 2 + 3}, {DType::f16, 77}, {DType::f32, 1}};
  std::vector<HostTensor> hosts;
  std::vector<DeviceTensor> devices;
  std::vector<Tensor> host_views, device_views;
  for (const auto& spec : specs) {
    HostTensor values = random_input(spec.first, {spec.second}, rng, 3.0);
    devices.push_back(to_device(values, spec.first));
    hosts.push_back(std::move(values));
  }
  for (auto& host : hosts) host_views.push_back(host.tensor());
  for (auto& device : devices) device_views.push_back(device.tensor());
  HostTensor result_ref(DType::f64, {kNumGradCheckResults});
  cpu::grad_norm_and_check(host_views, result_ref);
  DeviceTensor d_result(DType::f32, {kNumGradCheckResults});
  cuda::grad_norm_and_check(device_views, d_result, nullptr);
  HostTensor result = d_result.download();
  EXPECT_NEAR(result.data<float>()[kGradSquaredNorm], result_ref.data<double>()[kGradSquaredNorm],
              1e-5 * result_ref.data<double>()[kGradSquaredNorm]);
  EXPECT_EQ(result.data<float>()[kGradNonFiniteCount], 0.0f);
  const std::vector<uint8_t> bits = d_result.bytes();
  d_result.poison();
  cuda::grad_norm_and_check(device_views, d_result, nullptr);
  EXPECT_TRUE(bits == d_result.bytes());

  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  device_copy(static_cast<float*>(device_views[0].data) + 999, DeviceKind::cuda, &inf, DeviceKind::cpu, 4);
  device_copy(static_cast<float*>(device_views[3].data), DeviceKind::cuda, &nan, DeviceKind::cpu, 4);
  const uint16_t bf16_nan = 0x7fc0;
  device_copy(static_cast<uint16_t*>(device_views[1].data) + 16384 * 2 + 1, DeviceKind::cuda, &bf16_nan,
              DeviceKind::cpu, 2);
  cuda::grad_norm_and_check(device_views, d_result, nullptr);
  result = d_result.download();
  EXPECT_EQ(result.data<float>()[kGradNonFiniteCount], 3.0f);
  EXPECT_FALSE(std::isfinite(result.data<float>()[kGradSquaredNorm]));
  cuda::grad_norm_and_check({}, d_result, nullptr);  // an empty list: zero and zero
  result = d_result.download();
  EXPECT_EQ(result.data<float>()[kGradSquaredNorm], 0.0f);
  EXPECT_EQ(result.data<float>()[kGradNonFiniteCount], 0.0f);
}

}  // namespace
