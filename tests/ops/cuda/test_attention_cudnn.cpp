// cuDNN fused attention (src/ops/cuda/attention_cudnn.cu) against the float64 CPU reference and
// the cuBLAS + softmax path, forward (out, softmax_stats) and backward (dq, dk, dv separately):
// relative L2 error <= 1e-2 for bf16, <= 5e-3 for fp16, <= 1e-5 for the fp32 stats. Shapes cover
// head_dim 64 and 128, S not a multiple of 64 (and of 128, where old cuDNN needs a padding-mask
// workaround), S = 1024 and B*H = 512. The deterministic path must give the same bits twice and
// with the internal workspace buffer instead of the caller's; the non-deterministic path runs
// with a poisoned workspace (so its dQ accumulator must be zeroed by cuDNN or by us), forced by
// the switch and chosen by a caller that allows atomics. Outputs and workspaces are poisoned (0xFF
// bytes: NaN) before every call. On an sm90 device every eligible case must build its plans: a
// failure prints the graph step, attribute and cuDNN status.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <iostream>
#include <random>
#include <vector>

#include "src/ops/cuda/attention_cudnn.h"
#include "src/ops/model_ops.h"
#include "src/core/device.h"
#include "src/core/error.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;
using cuda::AttentionPath;

namespace {

double tolerance_for(DType dtype) { return dtype == DType::f16 ? 5e-3 : 1e-2; }

// Sets the process-wide attention path (switches().attention) for one scope.
class PathGuard {
 public:
  explicit PathGuard(AttentionPath path) : scope_(with_path(path)) {}

 private:
  static Switches with_path(AttentionPath path) {
    Switches chosen = switches();
    chosen.attention = path;
    return chosen;
  }
  ScopedSwitches scope_;
};

HostTensor random_input(DType dtype, std::initializer_list<int64_t> dims, std::mt19937_64& rng, double scale) {
  HostTensor values(DType::f64, dims);
  fill_uniform(values, rng, -scale, scale);
  for (int64_t i = 0; i < values.numel(); ++i)
    values.data<double>()[i] = round_to(dtype, float(values.data<double>()[i]));
  return values;
}

// Relative L2 error of q, k or v's gradient (part 0, 1, 2 of each [3D] row).
double part_error(const std::vector<double>& got, const HostTensor& want, const AttentionShape& shape, int part) {
  const int64_t model_dim = shape.model_dim();
  std::vector<double> got_part, want_part;
  for (int64_t t = 0; t < shape.tokens(); ++t)
    for (int64_t j = part * model_dim; j < (part + 1) * model_dim; ++j) {
      got_part.push_back(got[size_t(t * 3 * model_dim + j)]);
      want_part.push_back(want.data<double>()[t * 3 * model_dim + j]);
    }
  return relative_error(got_part, want_part);
}

bool is_sm90() {
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major == 9;
}

// Inputs, the CPU reference, and device tensors for one shape.
struct Problem {
  AttentionShape shape;
  DType dtype;
  HostTensor qkv, grad_out, out_ref, stats_ref, grad_ref;
  DeviceTensor d_qkv, d_grad_out, d_out, d_stats, d_grad, d_workspace;

  Problem(const AttentionShape& s, DType type, int64_t workspace_bytes, uint64_t seed)
      : shape(s),
        dtype(type),
        d_qkv(type, {s.tokens(), 3 * s.model_dim()}),
        d_grad_out(type, {s.tokens(), s.model_dim()}),
        d_out(type, {s.tokens(), s.model_dim()}),
        d_stats(DType::f32, {s.batch, s.heads, s.seq_len}),
        d_grad(type, {s.tokens(), 3 * s.model_dim()}),
        d_workspace(DType::u8, {std::max<int64_t>(workspace_bytes, 1)}) {
    std::mt19937_64 rng(seed);
    qkv = random_input(type, {s.tokens(), 3 * s.model_dim()}, rng, 1.5);
    grad_out = random_input(type, {s.tokens(), s.model_dim()}, rng, 1.0);
    out_ref = HostTensor(DType::f64, {s.tokens(), s.model_dim()});
    stats_ref = HostTensor(DType::f64, {s.batch, s.heads, s.seq_len});
    grad_ref = HostTensor(DType::f64, {s.tokens(), 3 * s.model_dim()});
    Tensor no_workspace;
    cpu::attention_forward(shape, qkv, out_ref, stats_ref, no_workspace);
    cpu::attention_backward(shape, qkv, out_ref, grad_out, stats_ref, no_workspace, grad_ref);
    d_qkv.upload(qkv);
    d_grad_out.upload(grad_out);
  }

  void forward(Tensor& workspace) {
    d_out.poison();
    d_stats.poison();
    d_workspace.poison();
    cuda::attention_forward(shape, d_qkv, d_out, d_stats, workspace, nullptr);
  }
  void backward(Tensor& workspace, bool deterministic = true) {
    d_grad.poison();
    d_workspace.poison();
    cuda::attention_backward(shape, d_qkv, d_out, d_grad_out, d_stats, workspace, d_grad, deterministic, nullptr);
  }
  void forward() { forward(d_workspace.tensor()); }
  void backward(bool deterministic = true) { backward(d_workspace.tensor(), deterministic); }

  void expect_forward_matches_reference(const char* label) {
    EXPECT_LE(relative_error(d_out.values(), to_vector(out_ref)), tolerance_for(dtype)) << label << ": out";
    EXPECT_LE(relative_error(d_stats.values(), to_vector(stats_ref)), 1e-5) << label << ": softmax_stats";
  }
  void expect_backward_matches_reference(const char* label) {
    const std::vector<double> grad = d_grad.values();
    const char* names[3] = {"dq", "dk", "dv"};
    for (int part = 0; part < 3; ++part)
      EXPECT_LE(part_error(grad, grad_ref, shape, part), tolerance_for(dtype)) << label << ": " << names[part];
  }
};

struct FusedCase {
  DType dtype;
  AttentionShape shape;
};

void PrintTo(const FusedCase& c, std::ostream* os) {
  *os << dtype_name(c.dtype) << " B=" << c.shape.batch << " S=" << c.shape.seq_len << " H=" << c.shape.heads
      << " Dh=" << c.shape.head_dim;
}

class AttentionCudnn : public ::testing::TestWithParam<FusedCase> {
 protected:
  // Skips off sm90; on sm90 the plans must build (a failure prints why).
  bool require_plans(bool deterministic, cuda::CudnnAttentionProbe& probe) {
    const FusedCase c = GetParam();
    probe = cuda::probe_cudnn_attention(c.shape, c.dtype, deterministic, nullptr);
    if (!is_sm90()) return false;
    EXPECT_TRUE(probe.eligible) << "cuDNN " << probe.cudnn_version << ": " << probe.reason;
    EXPECT_TRUE(probe.forward_ready && probe.backward_ready) << "cuDNN " << probe.cudnn_version << ": "
                                                             << probe.reason;
    std::cout << "[   info   ] cuDNN " << probe.cudnn_version << (deterministic ? " deterministic" : " atomic dQ")
              << ": forward " << probe.forward_engine << ", workspace " << probe.forward_workspace_bytes
              << " B; backward " << probe.backward_engine << ", workspace " << probe.backward_workspace_bytes
              << " B\n";
    return probe.eligible && probe.forward_ready && probe.backward_ready;
  }
};

TEST_P(AttentionCudnn, MatchesReferenceAndCublasAndIsDeterministic) {
  SKIP_WITHOUT_CUDA();
  const FusedCase c = GetParam();
  cuda::CudnnAttentionProbe probe;
  if (!require_plans(true, probe)) {
    if (!is_sm90()) GTEST_SKIP() << "not an sm90 device: " << probe.reason;
    return;
  }
  const int64_t cublas_bytes = attention_workspace_bytes(c.shape, c.dtype, std::min<int64_t>(c.shape.pairs(), 4));
  const int64_t workspace_bytes =
      std::max({cublas_bytes, probe.forward_workspace_bytes, probe.backward_workspace_bytes});
  Problem p(c.shape, c.dtype, workspace_bytes, 7000 + uint64_t(c.shape.seq_len * 31 + c.shape.head_dim));

  std::vector<double> fused_out, fused_grad;
  std::vector<uint8_t> out_bits, stats_bits, grad_bits;
  {
    PathGuard path(AttentionPath::cudnn);  // cuDNN or an error, never a silent fallback
    p.forward();
    p.expect_forward_matches_reference("cudnn");
    p.backward();
    p.expect_backward_matches_reference("cudnn");
    fused_out = p.d_out.values();
    fused_grad = p.d_grad.values();
    out_bits = p.d_out.bytes();
    stats_bits = p.d_stats.bytes();
    grad_bits = p.d_grad.bytes();

    p.forward();  // same bits again
    EXPECT_TRUE(out_bits == p.d_out.bytes() && stats_bits == p.d_stats.bytes()) << "forward is not reproducible";
    p.backward();
    EXPECT_TRUE(grad_bits == p.d_grad.bytes()) << "deterministic backward is not bit-reproducible";

    Tensor too_small(p.d_workspace.tensor().data, DType::u8, DeviceKind::cuda, {16});  // -> internal buffer
    p.forward(too_small);
    EXPECT_TRUE(out_bits == p.d_out.bytes()) << "forward differs with the internal workspace";
    p.backward(too_small);
    EXPECT_TRUE(grad_bits == p.d_grad.bytes()) << "backward differs with the internal workspace";
  }
  {
    PathGuard path(AttentionPath::cublas);
    p.forward();
    p.expect_forward_matches_reference("cublas");
    EXPECT_LE(relative_error(fused_out, p.d_out.values()), tolerance_for(c.dtype)) << "cudnn vs cublas: out";
    p.backward();
    p.expect_backward_matches_reference("cublas");
    const std::vector<double> cublas_grad = p.d_grad.values();
    for (int part = 0; part < 3; ++part) {
      HostTensor fused_part(DType::f64, {c.shape.tokens(), 3 * c.shape.model_dim()});
      for (size_t i = 0; i < fused_grad.size(); ++i) fused_part.data<double>()[i] = fused_grad[i];
      EXPECT_LE(part_error(cublas_grad, fused_part, c.shape, part), tolerance_for(c.dtype))
          << "cudnn vs cublas: gradient part " << part;
    }
  }
  {
    // cuDNN's out and stats feed the cuBLAS backward: the saved statistics mean the same thing.
    {
      PathGuard path(AttentionPath::cudnn);
      p.forward();
    }
    PathGuard path(AttentionPath::cublas);
    p.backward();
    p.expect_backward_matches_reference("cudnn forward + cublas backward");
  }
}

TEST_P(AttentionCudnn, NonDeterministicBackwardMatchesReference) {
  SKIP_WITHOUT_CUDA();
  const FusedCase c = GetParam();
  cuda::CudnnAttentionProbe probe;
  if (!require_plans(false, probe)) {
    if (!is_sm90()) GTEST_SKIP() << "not an sm90 device: " << probe.reason;
    return;
  }
  Problem p(c.shape, c.dtype, std::max(probe.forward_workspace_bytes, probe.backward_workspace_bytes),
            9000 + uint64_t(c.shape.seq_len));
  {
    PathGuard path(AttentionPath::cudnn_nondeterministic);
    p.forward();
    p.expect_forward_matches_reference("cudnn-nondeterministic");
    p.backward();  // the workspace (and so the dQ accumulator) is poisoned first
    p.expect_backward_matches_reference("cudnn-nondeterministic");
  }
  // The default path takes the same atomic graph when the caller allows it (training with
  // parallel.deterministic: false), and the deterministic one still serves the next call.
  PathGuard path(AttentionPath::automatic);
  p.backward(/*deterministic=*/false);
  p.expect_backward_matches_reference("auto, deterministic = false");
  p.backward(/*deterministic=*/true);
  p.expect_backward_matches_reference("auto, deterministic = true");
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionCudnn,
                         ::testing::Values(FusedCase{DType::bf16, AttentionShape{2, 256, 4, 64}},
                                           FusedCase{DType::bf16, AttentionShape{2, 100, 3, 64}},   // S % 64 != 0
                                           FusedCase{DType::f16, AttentionShape{1, 200, 2, 128}},   // Dh 128
                                           FusedCase{DType::bf16, AttentionShape{1, 1024, 2, 128}}, // long
                                           FusedCase{DType::f16, AttentionShape{2, 333, 2, 64}},
                                           FusedCase{DType::bf16, AttentionShape{3, 129, 4, 128}},
                                           FusedCase{DType::bf16, AttentionShape{32, 64, 16, 64}})); // B*H 512

// ---- Routing ------------------------------------------------------------------------------------

TEST(AttentionPathNames, ParseAndName) {
  EXPECT_EQ(cuda::parse_attention_path(""), AttentionPath::automatic);
  for (AttentionPath path : {AttentionPath::automatic, AttentionPath::cudnn, AttentionPath::cudnn_nondeterministic,
                             AttentionPath::cublas})
    EXPECT_EQ(cuda::parse_attention_path(cuda::attention_path_name(path)), path);
  try {
    cuda::parse_attention_path("cuDNN");
    ADD_FAILURE() << "an unknown SWITCHYARD_ATTENTION value was accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.exit_code(), kExitBadInput);
  }
}

TEST(AttentionCudnnRouting, ProbeNamesWhyACallIsNotEligible) {
  SKIP_WITHOUT_CUDA();
  const AttentionShape shape{1, 64, 2, 64};
  const cuda::CudnnAttentionProbe f32 = cuda::probe_cudnn_attention(shape, DType::f32, true, nullptr);
  EXPECT_FALSE(f32.eligible);
  EXPECT_NE(f32.reason.find("fp32"), std::string::npos) << f32.reason;
  const cuda::CudnnAttentionProbe narrow = cuda::probe_cudnn_attention({1, 64, 2, 32}, DType::bf16, true, nullptr);
  EXPECT_FALSE(narrow.eligible);
  EXPECT_NE(narrow.reason.find("head_dim"), std::string::npos) << narrow.reason;
}

// Calls outside the fused path: an error when cuDNN is demanded, the cuBLAS path otherwise.
TEST(AttentionCudnnRouting, UnsupportedCallsFallBackOrFailAsThePathSays) {
  SKIP_WITHOUT_CUDA();
  const AttentionShape shape{2, 80, 2, 32};  // head_dim 32: cuBLAS only
  const DType dtype = DType::bf16;
  Problem p(shape, dtype, attention_workspace_bytes(shape, dtype, 2), 4242);
  {
    PathGuard path(AttentionPath::cudnn);
    try {
      p.forward();
      ADD_FAILURE() << "SWITCHYARD_ATTENTION=cudnn ran a head_dim 32 call";
    } catch (const Error& error) {
      EXPECT_EQ(error.exit_code(), kExitBadInput);
      EXPECT_NE(std::string(error.what()).find("head_dim"), std::string::npos) << error.what();
    }
  }
  PathGuard path(AttentionPath::automatic);
  p.forward();
  p.expect_forward_matches_reference("auto (cublas)");
  p.backward();
  p.expect_backward_matches_reference("auto (cublas)");
}

}  // namespace
