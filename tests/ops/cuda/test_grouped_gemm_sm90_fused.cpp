// The fused activation epilogues of the sm_90a grouped GEMM (src/ops/cuda/sm90/grouped_gemm_sm90.h):
// gelu and swiglu, forward (x W1 -> pre, act(pre)) and backward (grad_out W2^T -> grad_pre), on
// the layouts of test_grouped_gemm_sm90.cpp (uneven and empty segments, padding and spare rows),
// with every pipelined kernel variant. Checked against the CPU reference ops (src/ops/moe_ops.h)
// run on the same bf16 values, and bit for bit against the unfused CUDA path (the plain kernel with
// the same tile width, then the activation kernel). Outputs are poisoned (NaN) before each call.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "src/ops/cuda/sm90/grouped_gemm_sm90.h"
#include "src/ops/moe_ops.h"
#include "src/core/device.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "tests/ops/cuda/test_grouped_gemm_sm90_helpers.h"

namespace switchyard::sm90_testing {
namespace {

struct FusedCase {
  ExpertActivation activation;
  int experts, min_kept, max_kept;
  int64_t d_model, d_ff;
  int64_t pre_width() const { return activation == ExpertActivation::swiglu ? 2 * d_ff : d_ff; }
  std::string name() const {
    return std::string(activation == ExpertActivation::swiglu ? "swiglu" : "gelu") + " E=" +
           std::to_string(experts) + " D=" + std::to_string(d_model) + " F=" + std::to_string(d_ff);
  }
};

Tensor host_tensor(std::vector<float>& values, std::initializer_list<int64_t> dims) {
  return Tensor(values.data(), DType::f32, DeviceKind::cpu, dims);
}

// A bf16 matrix on the device: uploaded from a HostMatrix, or uninitialized for outputs.
struct DeviceBf16 {
  Buffer buffer;
  Tensor tensor;
  DeviceBf16(std::initializer_list<int64_t> dims, const HostMatrix* source = nullptr) {
    Tensor shape(nullptr, DType::bf16, DeviceKind::cuda, dims);
    buffer = source ? upload(source->bits.data(), shape.bytes()) : Buffer(DeviceKind::cuda, shape.bytes());
    tensor = Tensor(buffer.data(), DType::bf16, DeviceKind::cuda, dims);
  }
  void poison() { device_memset(buffer.data(), DeviceKind::cuda, 0xFF, buffer.bytes()); }
  std::vector<uint16_t> bits() const { return download<uint16_t>(buffer, size_t(tensor.numel())); }
};

// Rows [0, valid_rows) of a bf16 result against the reference (relative to max |reference|);
// rows [valid_rows, rows) must still hold the poison (rows = valid_rows: not checked).
void expect_rows_match(const std::vector<uint16_t>& got, const std::vector<float>& want, int64_t valid_rows,
                       int64_t rows, int64_t columns, const char* what) {
  ErrorMeter meter;
  for (int64_t index = 0; index < valid_rows * columns; ++index) {
    Bf16 value;
    value.bits = got[size_t(index)];
    meter.add(float(value), want[size_t(index)]);
  }
  EXPECT_EQ(meter.non_finite, 0) << what << ": NaN/Inf (unwritten) entries below expert_offsets[E]";
  EXPECT_LE(meter.relative(), 1e-2) << what << ": max error " << meter.max_error << " vs max |ref| "
                                    << meter.max_reference;
  const int64_t touched = int64_t(std::count_if(got.begin() + valid_rows * columns, got.begin() + rows * columns,
                                                [](uint16_t bits) { return bits != kPoisonBf16; }));
  EXPECT_EQ(touched, 0) << what << ": entries written past expert_offsets[E]";
}

// The fused result must equal the unfused one exactly (same GEMM tile, same rounding, same math).
void expect_bitwise_equal(const std::vector<uint16_t>& fused, const std::vector<uint16_t>& unfused, int64_t count,
                          const char* what) {
  int64_t differing = 0;
  for (int64_t index = 0; index < count; ++index) differing += fused[size_t(index)] != unfused[size_t(index)];
  EXPECT_EQ(differing, 0) << what << ": fused and unfused results differ in " << differing << " of " << count
                          << " entries";
}

// What the environment leaves of the fusion (SWITCHYARD_FUSED_ACTIVATION, _GROUPED_GEMM, _SM90_GEMM).
bool expect_fusion() {
  auto is = [](const char* name, const char* value) {
    const char* set = std::getenv(name);
    return set != nullptr && std::string(set) == value;
  };
  return !is("SWITCHYARD_FUSED_ACTIVATION", "0") && !is("SWITCHYARD_GROUPED_GEMM", "cublas") &&
         !is("SWITCHYARD_SM90_GEMM", "basic");
}

std::vector<KernelChoice> pipelined_choices() {
  std::vector<KernelChoice> choices = kernel_choices();
  choices.erase(choices.begin());  // the basic variant has no fused epilogues
  return choices;
}

void run_fused_forward_case(const FusedCase& config, uint32_t seed) {
  std::mt19937 rng(seed);
  const SegmentLayout layout = make_layout(config.experts, config.min_kept, config.max_kept, rng);
  const int64_t rows = layout.rows, valid = layout.offsets.back(), experts = config.experts;
  const int64_t d_model = config.d_model, d_ff = config.d_ff, width = config.pre_width();
  HostMatrix x = random_matrix(size_t(rows * d_model), rng);
  zero_padding_rows(x, d_model, layout);
  HostMatrix w1 = random_matrix(size_t(experts * d_model * width), rng, 0.25f);
  std::vector<int> offsets = layout.offsets;
  std::vector<float> pre_ref(size_t(rows * width)), post_ref(size_t(rows * d_ff));
  Tensor pre_ref_tensor = host_tensor(pre_ref, {rows, width}), post_ref_tensor = host_tensor(post_ref, {rows, d_ff});
  cpu::grouped_gemm_activation(config.activation, host_tensor(x.values, {rows, d_model}),
                               host_tensor(w1.values, {experts, d_model, width}),
                               Tensor(offsets.data(), DType::i32, DeviceKind::cpu, {experts + 1}), pre_ref_tensor,
                               post_ref_tensor);

  const DeviceBf16 x_device({rows, d_model}, &x), w1_device({experts, d_model, width}, &w1);
  DeviceBf16 pre({rows, width}), post({rows, d_ff}), pre_plain({rows, width}), post_plain({rows, d_ff});
  Buffer offsets_device = upload(offsets.data(), offsets.size() * sizeof(int));
  const Tensor offsets_tensor(offsets_device.data(), DType::i32, DeviceKind::cuda, {experts + 1});
  ASSERT_TRUE(sm90::activation_supported(config.activation, x_device.tensor, w1_device.tensor, offsets_tensor,
                                         &pre.tensor, post.tensor));
  const std::vector<int> marks = padding_marks(layout);
  Buffer marks_device = upload(marks.data(), marks.size() * sizeof(int));
  for (const KernelChoice& choice :
       with_padding_marks(pipelined_choices(), static_cast<const int*>(marks_device.data()))) {
    sm90::grouped_gemm(x_device.tensor, w1_device.tensor, false, offsets_tensor, pre_plain.tensor, choice.options,
                       nullptr);
    cuda::activation_forward(config.activation, pre_plain.tensor, post_plain.tensor, nullptr);
    for (bool keep_pre : {true, false}) {
      SCOPED_TRACE(config.name() + " R=" + std::to_string(rows) + " valid=" + std::to_string(valid) +
                   " kernel=" + choice.name + (keep_pre ? " keep_pre" : " no pre"));
      pre.poison();
      post.poison();
      sm90::grouped_gemm_activation(config.activation, x_device.tensor, w1_device.tensor, offsets_tensor,
                                    keep_pre ? &pre.tensor : nullptr, post.tensor, choice.options, nullptr);
      device_synchronize(DeviceKind::cuda);
      const std::vector<uint16_t> got_pre = pre.bits(), got_post = post.bits();
      expect_rows_match(got_post, post_ref, valid, rows, d_ff, "post");
      expect_bitwise_equal(got_post, post_plain.bits(), valid * d_ff, "post");
      if (keep_pre) {
        expect_rows_match(got_pre, pre_ref, valid, rows, width, "pre");
        expect_bitwise_equal(got_pre, pre_plain.bits(), valid * width, "pre");
      } else {
        EXPECT_EQ(std::count(got_pre.begin(), got_pre.end(), kPoisonBf16), rows * width) << "pre written, not kept";
      }
    }
  }
  // The src/ops/moe_ops.h entry point, fused or not (rows past expert_offsets[E] unspecified).
  SCOPED_TRACE(config.name() + " cuda::grouped_gemm_activation");
  post.poison();
  cuda::grouped_gemm_activation(config.activation, x_device.tensor, w1_device.tensor, offsets_tensor, pre.tensor,
                                post.tensor, true, nullptr, kAlign);
  device_synchronize(DeviceKind::cuda);
  expect_rows_match(post.bits(), post_ref, valid, valid, d_ff, "post");
}

void run_fused_backward_case(const FusedCase& config, uint32_t seed) {
  std::mt19937 rng(seed);
  const SegmentLayout layout = make_layout(config.experts, config.min_kept, config.max_kept, rng);
  const int64_t rows = layout.rows, valid = layout.offsets.back(), experts = config.experts;
  const int64_t d_model = config.d_model, d_ff = config.d_ff, width = config.pre_width();
  HostMatrix grad_out = random_matrix(size_t(rows * d_model), rng);
  zero_padding_rows(grad_out, d_model, layout);  // as the combine backward leaves them
  HostMatrix w2 = random_matrix(size_t(experts * d_ff * d_model), rng, 0.25f);
  HostMatrix pre = random_matrix(size_t(rows * width), rng, 4.0f);  // covers the activations' curved range
  std::vector<int> offsets = layout.offsets;
  std::vector<float> grad_post_ref(size_t(rows * d_ff)), grad_pre_ref(size_t(rows * width));
  Tensor grad_post_ref_tensor = host_tensor(grad_post_ref, {rows, d_ff});
  Tensor grad_pre_ref_tensor = host_tensor(grad_pre_ref, {rows, width});
  cpu::grouped_gemm_activation_backward(config.activation, host_tensor(grad_out.values, {rows, d_model}),
                                        host_tensor(w2.values, {experts, d_ff, d_model}),
                                        Tensor(offsets.data(), DType::i32, DeviceKind::cpu, {experts + 1}),
                                        host_tensor(pre.values, {rows, width}), grad_post_ref_tensor,
                                        grad_pre_ref_tensor);

  const DeviceBf16 grad_out_device({rows, d_model}, &grad_out), w2_device({experts, d_ff, d_model}, &w2);
  const DeviceBf16 pre_device({rows, width}, &pre);
  DeviceBf16 grad_pre({rows, width}), grad_post_plain({rows, d_ff}), grad_pre_plain({rows, width});
  Buffer offsets_device = upload(offsets.data(), offsets.size() * sizeof(int));
  const Tensor offsets_tensor(offsets_device.data(), DType::i32, DeviceKind::cuda, {experts + 1});
  const Tensor &grad_out_tensor = grad_out_device.tensor, &w2_tensor = w2_device.tensor;
  ASSERT_TRUE(sm90::activation_backward_supported(config.activation, grad_out_tensor, w2_tensor, offsets_tensor,
                                                  pre_device.tensor, grad_pre.tensor));
  const std::vector<int> marks = padding_marks(layout);
  Buffer marks_device = upload(marks.data(), marks.size() * sizeof(int));
  for (const KernelChoice& choice :
       with_padding_marks(pipelined_choices(), static_cast<const int*>(marks_device.data()))) {
    SCOPED_TRACE(config.name() + " R=" + std::to_string(rows) + " valid=" + std::to_string(valid) +
                 " kernel=" + choice.name);
    grad_pre.poison();
    sm90::grouped_gemm_activation_backward(config.activation, grad_out_tensor, w2_tensor, offsets_tensor,
                                           pre_device.tensor, grad_pre.tensor, choice.options, nullptr);
    sm90::grouped_gemm(grad_out_tensor, w2_tensor, true, offsets_tensor, grad_post_plain.tensor, choice.options,
                       nullptr);
    cuda::activation_backward(config.activation, pre_device.tensor, grad_post_plain.tensor, grad_pre_plain.tensor,
                              nullptr);
    device_synchronize(DeviceKind::cuda);
    const std::vector<uint16_t> got = grad_pre.bits();
    expect_rows_match(got, grad_pre_ref, valid, rows, width, "grad_pre");
    expect_bitwise_equal(got, grad_pre_plain.bits(), valid * width, "grad_pre");
  }
  // The src/ops/moe_ops.h entry point: its grad_post scratch is written only when it runs unfused.
  SCOPED_TRACE(config.name() + " cuda::grouped_gemm_activation_backward");
  grad_pre.poison();
  grad_post_plain.poison();
  cuda::grouped_gemm_activation_backward(config.activation, grad_out_tensor, w2_tensor, offsets_tensor,
                                         pre_device.tensor, grad_post_plain.tensor, grad_pre.tensor, nullptr, kAlign);
  device_synchronize(DeviceKind::cuda);
  expect_rows_match(grad_pre.bits(), grad_pre_ref, valid, valid, width, "grad_pre");
  const std::vector<uint16_t> scratch = grad_post_plain.bits();
  const bool scratch_untouched = std::count(scratch.begin(), scratch.end(), kPoisonBf16) == rows * d_ff;
  EXPECT_EQ(scratch_untouched, expect_fusion()) << "grad_post scratch written iff the op ran unfused";
}

// F = 320: the last 256-wide tile is partial (for swiglu: one gate and one up chunk of two).
TEST(GroupedGemmSm90, FusedGeluForwardAndBackward) {
  SKIP_WITHOUT_SM90();
  const FusedCase config{ExpertActivation::gelu_tanh, 8, 1, 300, 256, 320};
  run_fused_forward_case(config, 41);
  run_fused_backward_case(config, 42);
}

TEST(GroupedGemmSm90, FusedSwigluForwardAndBackward) {
  SKIP_WITHOUT_SM90();
  const FusedCase config{ExpertActivation::swiglu, 8, 1, 300, 256, 320};
  run_fused_forward_case(config, 43);
  run_fused_backward_case(config, 44);
}

// More tiles than SMs: the persistent CTAs carry the pipeline (and the backward's prefetched pre
// slices) across tiles.
TEST(GroupedGemmSm90, FusedManyTilesPersistent) {
  SKIP_WITHOUT_SM90();
  for (ExpertActivation activation : {ExpertActivation::gelu_tanh, ExpertActivation::swiglu}) {
    const FusedCase config{activation, 4, 1200, 2000, 128, 768};
    run_fused_forward_case(config, 45);
    run_fused_backward_case(config, 46);
  }
}

// Fusion follows the sizes and the environment switches (src/ops/moe_ops.h).
TEST(GroupedGemmSm90, FusesExpertActivationFollowsTheSwitches) {
  SKIP_WITHOUT_SM90();
  EXPECT_EQ(cuda::fuses_expert_activation(ExpertActivation::swiglu, DType::bf16, 256, 320, kAlign), expect_fusion());
  EXPECT_FALSE(cuda::fuses_expert_activation(ExpertActivation::gelu_tanh, DType::bf16, 256, 320, 64));
  EXPECT_FALSE(cuda::fuses_expert_activation(ExpertActivation::gelu_tanh, DType::bf16, 256, 100, kAlign));
  EXPECT_FALSE(cuda::fuses_expert_activation(ExpertActivation::gelu_tanh, DType::f16, 256, 320, kAlign));
}

TEST(GroupedGemmSm90, FusedSupportedRejectsWhatTheKernelsCannotTake) {
  SKIP_WITHOUT_SM90();
  const int64_t rows = 256, d_model = 128, d_ff = 192;
  DeviceBf16 x({rows, d_model}), w1_swiglu({4, d_model, 2 * d_ff}), pre_swiglu({rows, 2 * d_ff});
  DeviceBf16 post({rows, 2 * d_ff});  // big enough for every view below
  Buffer offsets_device(DeviceKind::cuda, 5 * sizeof(int));
  const Tensor offsets(offsets_device.data(), DType::i32, DeviceKind::cuda, {5});
  auto view = [](const DeviceBf16& source, std::initializer_list<int64_t> dims, DType dtype = DType::bf16) {
    return Tensor(source.buffer.data(), dtype, DeviceKind::cuda, dims);
  };
  const Tensor w1_gelu = view(w1_swiglu, {4, d_model, d_ff}), pre_gelu = view(pre_swiglu, {rows, d_ff});
  Tensor out = view(post, {rows, d_ff});
  const ExpertActivation gelu = ExpertActivation::gelu_tanh, swiglu = ExpertActivation::swiglu;
  EXPECT_TRUE(sm90::activation_supported(gelu, x.tensor, w1_gelu, offsets, &pre_gelu, out));
  EXPECT_TRUE(sm90::activation_supported(swiglu, x.tensor, w1_swiglu.tensor, offsets, &pre_swiglu.tensor, out));
  EXPECT_TRUE(sm90::activation_supported(swiglu, x.tensor, w1_swiglu.tensor, offsets, nullptr, out));
  EXPECT_FALSE(sm90::activation_supported(swiglu, x.tensor, w1_gelu, offsets, &pre_swiglu.tensor, out));
  EXPECT_FALSE(sm90::activation_supported(swiglu, x.tensor, w1_swiglu.tensor, offsets, &pre_gelu, out));
  EXPECT_FALSE(sm90::activation_supported(gelu, x.tensor, w1_gelu, offsets, &out, out));  // pre aliases post
  const Tensor out_float = view(post, {rows, d_ff}, DType::f32);
  EXPECT_FALSE(sm90::activation_supported(gelu, x.tensor, w1_gelu, offsets, &pre_gelu, out_float));
  const Tensor pre_ragged = view(pre_swiglu, {rows, 96});  // F % 64 != 0
  EXPECT_FALSE(sm90::activation_supported(gelu, x.tensor, view(w1_swiglu, {4, d_model, 96}), offsets, &pre_ragged,
                                          view(post, {rows, 96})));
  const sm90::Options pipelined;
  EXPECT_THROW(sm90::grouped_gemm_activation(swiglu, x.tensor, w1_gelu, offsets, nullptr, out, pipelined, nullptr),
               Error);

  const Tensor w2 = view(w1_swiglu, {4, d_ff, d_model});
  Tensor grad_pre = view(post, {rows, 2 * d_ff});
  EXPECT_TRUE(sm90::activation_backward_supported(swiglu, x.tensor, w2, offsets, pre_swiglu.tensor, grad_pre));
  EXPECT_FALSE(sm90::activation_backward_supported(swiglu, x.tensor, w2, offsets, pre_swiglu.tensor,
                                                   pre_swiglu.tensor));  // grad_pre aliases pre
  EXPECT_FALSE(sm90::activation_backward_supported(gelu, x.tensor, w2, offsets, pre_swiglu.tensor, grad_pre));
  sm90::Options basic;
  basic.variant = sm90::Variant::basic;
  EXPECT_THROW(sm90::grouped_gemm_activation_backward(swiglu, x.tensor, w2, offsets, pre_swiglu.tensor, grad_pre, basic,
                                                      nullptr),
               Error);
}

}  // namespace
}  // namespace switchyard::sm90_testing
