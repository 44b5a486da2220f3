// The hand-written sm_90a grouped GEMM (src/ops/cuda/sm90/grouped_gemm_sm90.h) against a double-precision
// reference computed here from the same bf16 inputs. Layouts have uneven segments, empty experts
// (first, middle, last), padding rows inside segments and spare rows past expert_offsets[E] that
// hold random data the kernels must ignore. Every case runs the basic kernel and the pipelined one
// with 128- and 256-wide tiles and both epilogue stores (st.global, TMA), the weight grad also with
// its multicast pairs forced on (odd n-tile counts: an idle partner) and off; the larger cases have
// more tiles than SMs, so the persistent CTAs carry their pipeline (and the TMA stores' staging)
// across tiles. Outputs are poisoned (NaN) before each call.
// The fused activation epilogues are tested in test_grouped_gemm_sm90_fused.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "src/ops/cuda/sm90/grouped_gemm_sm90.h"
#include "src/core/device.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "tests/ops/cuda/test_grouped_gemm_sm90_helpers.h"

namespace switchyard::sm90_testing {
namespace {

// Indices to check: all of [0, count), or one random index in each run of `stride`.
std::vector<int64_t> pick_indices(int64_t count, int stride, std::mt19937& rng) {
  std::vector<int64_t> picked;
  for (int64_t start = 0; start < count; start += stride) {
    const int64_t span = std::min<int64_t>(stride, count - start);
    picked.push_back(stride == 1 ? start : start + std::uniform_int_distribution<int64_t>(0, span - 1)(rng));
  }
  return picked;
}


struct ForwardCase {
  int experts, min_kept, max_kept;
  int64_t k, n;
  int row_stride;  // 1: check every row; s: one random row per s
};

void run_forward_case(const ForwardCase& config, uint32_t seed) {
  std::mt19937 rng(seed);
  const SegmentLayout layout = make_layout(config.experts, config.min_kept, config.max_kept, rng);
  const int64_t rows = layout.rows, k = config.k, n = config.n, experts = config.experts;
  const int64_t valid_rows = layout.offsets.back();
  HostMatrix a = random_matrix(size_t(rows * k), rng);
  zero_padding_rows(a, k, layout);
  Buffer a_device = upload(a.bits.data(), a.bits.size() * 2);
  Buffer offsets_device = upload(layout.offsets.data(), layout.offsets.size() * sizeof(int));
  Buffer c_device(DeviceKind::cuda, size_t(rows * n) * 2);
  const Tensor a_tensor(a_device.data(), DType::bf16, DeviceKind::cuda, {rows, k});
  const Tensor offsets_tensor(offsets_device.data(), DType::i32, DeviceKind::cuda, {experts + 1});
  Tensor c_tensor(c_device.data(), DType::bf16, DeviceKind::cuda, {rows, n});
  const std::vector<int64_t> checked_rows = pick_indices(valid_rows, config.row_stride, rng);
  const std::vector<int> marks = padding_marks(layout);
  Buffer marks_device = upload(marks.data(), marks.size() * sizeof(int));
  const std::vector<KernelChoice> choices =
      with_padding_marks(kernel_choices(), static_cast<const int*>(marks_device.data()));

  for (bool trans_b : {false, true}) {
    HostMatrix b = random_matrix(size_t(experts * k * n), rng);  // [E, K, N], or [E, N, K] with trans_b
    Buffer b_device = upload(b.bits.data(), b.bits.size() * 2);
    const Tensor b_tensor = trans_b ? Tensor(b_device.data(), DType::bf16, DeviceKind::cuda, {experts, n, k})
                                    : Tensor(b_device.data(), DType::bf16, DeviceKind::cuda, {experts, k, n});
    ASSERT_TRUE(sm90::supported(a_tensor, b_tensor, trans_b, offsets_tensor, c_tensor));

    std::vector<double> reference(checked_rows.size() * size_t(n), 0.0);
    for (size_t i = 0; i < checked_rows.size(); ++i) {
      const int64_t row = checked_rows[i];
      const float* b_expert = b.values.data() + size_t(layout.expert_of(row)) * size_t(k * n);
      double* out = reference.data() + i * size_t(n);
      for (int64_t kk = 0; kk < k; ++kk) {
        const double a_value = a.values[size_t(row * k + kk)];
        if (a_value == 0.0) continue;
        for (int64_t column = 0; column < n; ++column) {
          out[column] += a_value * (trans_b ? b_expert[column * k + kk] : b_expert[kk * n + column]);
        }
      }
    }

    for (const KernelChoice& choice : choices) {
      std::ostringstream label;
      label << "E=" << experts << " R=" << rows << " valid=" << valid_rows << " K=" << k << " N=" << n
            << " trans_b=" << trans_b << " kernel=" << choice.name;
      SCOPED_TRACE(label.str());
      device_memset(c_device.data(), DeviceKind::cuda, 0xFF, c_device.bytes());
      sm90::grouped_gemm(a_tensor, b_tensor, trans_b, offsets_tensor, c_tensor, choice.options, nullptr);
      device_synchronize(DeviceKind::cuda);
      const std::vector<uint16_t> c = download<uint16_t>(c_device, size_t(rows * n));

      ErrorMeter meter;
      for (size_t i = 0; i < checked_rows.size(); ++i) {
        for (int64_t column = 0; column < n; ++column) {
          Bf16 got;
          got.bits = c[size_t(checked_rows[i] * n + column)];
          meter.add(float(got), reference[i * size_t(n) + column]);
        }
      }
      EXPECT_EQ(meter.non_finite, 0) << "NaN/Inf (unwritten) outputs in rows below expert_offsets[E]";
      EXPECT_LE(meter.relative(), 1e-2) << "max error " << meter.max_error << " vs max |ref| " << meter.max_reference;
      int64_t touched = 0;  // rows past expert_offsets[E] must keep their poison
      for (int64_t index = valid_rows * n; index < rows * n; ++index) touched += c[size_t(index)] != kPoisonBf16;
      EXPECT_EQ(touched, 0) << "outputs written past expert_offsets[E]";
    }
  }
}

struct WeightGradCase {
  int experts, min_kept, max_kept;
  int64_t m, n;
  int m_stride;  // 1: check every row of dB_e; s: one random row per s
};

void run_weight_grad_case(const WeightGradCase& config, uint32_t seed) {
  std::mt19937 rng(seed);
  const SegmentLayout layout = make_layout(config.experts, config.min_kept, config.max_kept, rng);
  const int64_t rows = layout.rows, m = config.m, n = config.n, experts = config.experts;
  HostMatrix a = random_matrix(size_t(rows * m), rng);
  zero_padding_rows(a, m, layout);
  HostMatrix g = random_matrix(size_t(rows * n), rng);  // padding rows random: the sum covers whole segments
  Buffer a_device = upload(a.bits.data(), a.bits.size() * 2);
  Buffer g_device = upload(g.bits.data(), g.bits.size() * 2);
  Buffer offsets_device = upload(layout.offsets.data(), layout.offsets.size() * sizeof(int));
  Buffer grad_device(DeviceKind::cuda, size_t(experts * m * n) * sizeof(float));
  const Tensor a_tensor(a_device.data(), DType::bf16, DeviceKind::cuda, {rows, m});
  const Tensor g_tensor(g_device.data(), DType::bf16, DeviceKind::cuda, {rows, n});
  const Tensor offsets_tensor(offsets_device.data(), DType::i32, DeviceKind::cuda, {experts + 1});
  Tensor grad_tensor(grad_device.data(), DType::f32, DeviceKind::cuda, {experts, m, n});
  ASSERT_TRUE(sm90::weight_grad_supported(a_tensor, g_tensor, offsets_tensor, grad_tensor));

  const std::vector<int64_t> checked_m = pick_indices(m, config.m_stride, rng);
  std::vector<double> reference(size_t(experts) * checked_m.size() * size_t(n), 0.0);
  for (int expert = 0; expert < experts; ++expert) {
    double* out_expert = reference.data() + size_t(expert) * checked_m.size() * size_t(n);
    for (int64_t row = layout.offsets[expert]; row < layout.offsets[expert + 1]; ++row) {
      const float* g_row = g.values.data() + size_t(row * n);
      for (size_t i = 0; i < checked_m.size(); ++i) {
        const double a_value = a.values[size_t(row * m + checked_m[i])];
        if (a_value == 0.0) continue;
        double* out = out_expert + i * size_t(n);
        for (int64_t column = 0; column < n; ++column) out[column] += a_value * g_row[column];
      }
    }
  }

  // Accumulating runs start from these values (dB_e += A_e^T G_e; empty experts keep them exactly).
  std::vector<float> start(size_t(experts * m * n));
  std::uniform_real_distribution<float> start_value(-1.0f, 1.0f);
  for (float& value : start) value = start_value(rng);

  const std::vector<int> marks = padding_marks(layout);
  Buffer marks_device = upload(marks.data(), marks.size() * sizeof(int));
  for (const bool accumulate : {false, true}) {
    for (KernelChoice choice :
         with_padding_marks(weight_grad_kernel_choices(), static_cast<const int*>(marks_device.data()))) {
      choice.options.accumulate = accumulate;
      std::ostringstream label;
      label << "E=" << experts << " R=" << rows << " M=" << m << " N=" << n << " kernel=" << choice.name
            << (accumulate ? " accumulate" : "");
      SCOPED_TRACE(label.str());
      if (accumulate)
        device_copy(grad_device.data(), DeviceKind::cuda, start.data(), DeviceKind::cpu, start.size() * sizeof(float));
      else
        device_memset(grad_device.data(), DeviceKind::cuda, 0xFF, grad_device.bytes());
      sm90::grouped_gemm_weight_grad(a_tensor, g_tensor, offsets_tensor, grad_tensor, choice.options, nullptr);
      device_synchronize(DeviceKind::cuda);
      const std::vector<float> grad = download<float>(grad_device, size_t(experts * m * n));

      ErrorMeter meter;
      int64_t changed_in_empty = 0;
      for (int expert = 0; expert < experts; ++expert) {
        const float* grad_expert = grad.data() + size_t(expert) * size_t(m * n);
        const float* start_expert = start.data() + size_t(expert) * size_t(m * n);
        if (layout.kept[expert] == 0) {  // dB_e must be exactly zero, or exactly its start
          for (int64_t index = 0; index < m * n; ++index)
            changed_in_empty += grad_expert[index] != (accumulate ? start_expert[index] : 0.0f);
          continue;
        }
        const double* want = reference.data() + size_t(expert) * checked_m.size() * size_t(n);
        for (size_t i = 0; i < checked_m.size(); ++i) {
          for (int64_t column = 0; column < n; ++column) {
            const int64_t index = checked_m[i] * n + column;
            meter.add(grad_expert[index], want[i * size_t(n) + column] + (accumulate ? start_expert[index] : 0.0));
          }
        }
      }
      EXPECT_EQ(changed_in_empty, 0) << "empty experts must get zero gradients (accumulating: keep their values)";
      EXPECT_EQ(meter.non_finite, 0) << "NaN/Inf (unwritten) gradient entries";
      EXPECT_LE(meter.relative(), 2e-3) << "max error " << meter.max_error << " vs max |ref| " << meter.max_reference;
    }
  }
}

TEST(GroupedGemmSm90, ForwardOneExpert) {
  SKIP_WITHOUT_SM90();
  run_forward_case({1, 900, 1000, 512, 384, 1}, 11);
}

TEST(GroupedGemmSm90, ForwardEightExpertsUnevenSegments) {
  SKIP_WITHOUT_SM90();
  run_forward_case({8, 1, 300, 256, 320, 1}, 12);
}

TEST(GroupedGemmSm90, ForwardThirtyTwoSmallExperts) {
  SKIP_WITHOUT_SM90();
  run_forward_case({32, 1, 150, 128, 192, 1}, 13);
}

// More tiles than SMs: each persistent CTA runs several tiles through one pipeline.
TEST(GroupedGemmSm90, ForwardManyTilesPersistent) {
  SKIP_WITHOUT_SM90();
  run_forward_case({8, 1500, 3000, 192, 768, 16}, 14);
}

TEST(GroupedGemmSm90, WeightGradOneExpert) {
  SKIP_WITHOUT_SM90();
  run_weight_grad_case({1, 900, 1000, 256, 384, 1}, 21);
}

TEST(GroupedGemmSm90, WeightGradEightExpertsPartialTiles) {
  SKIP_WITHOUT_SM90();
  run_weight_grad_case({8, 1, 300, 320, 320, 1}, 22);
}

TEST(GroupedGemmSm90, WeightGradThirtyTwoExpertsManyTiles) {
  SKIP_WITHOUT_SM90();
  run_weight_grad_case({32, 1, 150, 384, 512, 8}, 23);
}

// No routed rows at all: forward writes nothing, weight grad writes zeros or, accumulating, leaves dB
// as it was (also for R = 0).
TEST(GroupedGemmSm90, AllSegmentsEmpty) {
  SKIP_WITHOUT_SM90();
  std::mt19937 rng(31);
  const int64_t experts = 4, rows = 256, k = 128, n = 128;
  const std::vector<int> offsets(experts + 1, 0);
  HostMatrix a = random_matrix(size_t(rows * k), rng), b = random_matrix(size_t(experts * k * n), rng);
  HostMatrix g = random_matrix(size_t(rows * n), rng);
  Buffer a_device = upload(a.bits.data(), a.bits.size() * 2), b_device = upload(b.bits.data(), b.bits.size() * 2);
  Buffer g_device = upload(g.bits.data(), g.bits.size() * 2);
  Buffer offsets_device = upload(offsets.data(), offsets.size() * sizeof(int));
  Buffer c_device(DeviceKind::cuda, size_t(rows * n) * 2);
  Buffer grad_device(DeviceKind::cuda, size_t(experts * k * n) * sizeof(float));
  const Tensor offsets_tensor(offsets_device.data(), DType::i32, DeviceKind::cuda, {experts + 1});
  const Tensor b_tensor(b_device.data(), DType::bf16, DeviceKind::cuda, {experts, k, n});
  Tensor grad_tensor(grad_device.data(), DType::f32, DeviceKind::cuda, {experts, k, n});
  for (int64_t used_rows : {rows, int64_t(0)}) {
    const Tensor a_tensor(a_device.data(), DType::bf16, DeviceKind::cuda, {used_rows, k});
    const Tensor g_tensor(g_device.data(), DType::bf16, DeviceKind::cuda, {used_rows, n});
    Tensor c_tensor(c_device.data(), DType::bf16, DeviceKind::cuda, {used_rows, n});
    for (const KernelChoice& choice : weight_grad_kernel_choices()) {
      SCOPED_TRACE(choice.name + " rows=" + std::to_string(used_rows));
      device_memset(c_device.data(), DeviceKind::cuda, 0xFF, c_device.bytes());
      device_memset(grad_device.data(), DeviceKind::cuda, 0xFF, grad_device.bytes());
      sm90::grouped_gemm(a_tensor, b_tensor, false, offsets_tensor, c_tensor, choice.options, nullptr);
      sm90::grouped_gemm_weight_grad(a_tensor, g_tensor, offsets_tensor, grad_tensor, choice.options, nullptr);
      device_synchronize(DeviceKind::cuda);
      const std::vector<uint16_t> c = download<uint16_t>(c_device, size_t(rows * n));
      EXPECT_EQ(std::count(c.begin(), c.end(), kPoisonBf16), rows * n) << "forward wrote rows of empty segments";
      const std::vector<float> grad = download<float>(grad_device, size_t(experts * k * n));
      EXPECT_EQ(std::count(grad.begin(), grad.end(), 0.0f), experts * k * n) << "weight grad must be all zeros";
      // Accumulating adds nothing: the values stay as they were.
      KernelChoice accumulating = choice;
      accumulating.options.accumulate = true;
      const std::vector<float> start(size_t(experts * k * n), 1.5f);
      device_copy(grad_device.data(), DeviceKind::cuda, start.data(), DeviceKind::cpu, start.size() * sizeof(float));
      sm90::grouped_gemm_weight_grad(a_tensor, g_tensor, offsets_tensor, grad_tensor, accumulating.options, nullptr);
      device_synchronize(DeviceKind::cuda);
      const std::vector<float> kept = download<float>(grad_device, size_t(experts * k * n));
      EXPECT_EQ(std::count(kept.begin(), kept.end(), 1.5f), experts * k * n) << "accumulating nothing changed dB";
    }
  }
}

TEST(GroupedGemmSm90, SupportedRejectsWhatTheKernelsCannotTake) {
  SKIP_WITHOUT_SM90();
  Buffer a_device(DeviceKind::cuda, 256 * 192 * 2), b_device(DeviceKind::cuda, 4 * 192 * 256 * 2);
  Buffer c_device(DeviceKind::cuda, 256 * 256 * 4), offsets_device(DeviceKind::cuda, 5 * sizeof(int));
  const Tensor a(a_device.data(), DType::bf16, DeviceKind::cuda, {256, 192});
  const Tensor b(b_device.data(), DType::bf16, DeviceKind::cuda, {4, 192, 256});
  const Tensor b_transposed(b_device.data(), DType::bf16, DeviceKind::cuda, {4, 256, 192});
  const Tensor offsets(offsets_device.data(), DType::i32, DeviceKind::cuda, {5});
  Tensor c(c_device.data(), DType::bf16, DeviceKind::cuda, {256, 256});
  EXPECT_TRUE(sm90::supported(a, b, false, offsets, c));
  EXPECT_TRUE(sm90::supported(a, b_transposed, true, offsets, c));
  EXPECT_FALSE(sm90::supported(a, b, true, offsets, c));  // K/N swapped
  const Tensor a_ragged(a_device.data(), DType::bf16, DeviceKind::cuda, {256, 96});  // K % 64 != 0
  const Tensor b_ragged(b_device.data(), DType::bf16, DeviceKind::cuda, {4, 96, 256});
  EXPECT_FALSE(sm90::supported(a_ragged, b_ragged, false, offsets, c));
  const Tensor c_float(c_device.data(), DType::f32, DeviceKind::cuda, {256, 256});
  EXPECT_FALSE(sm90::supported(a, b, false, offsets, c_float));
  const Tensor offsets_short(offsets_device.data(), DType::i32, DeviceKind::cuda, {4});
  EXPECT_FALSE(sm90::supported(a, b, false, offsets_short, c));
  const Tensor a_misaligned(static_cast<char*>(a_device.data()) + 2, DType::bf16, DeviceKind::cuda, {256, 192});
  EXPECT_FALSE(sm90::supported(a_misaligned, b, false, offsets, c));
  EXPECT_THROW(sm90::grouped_gemm(a_ragged, b_ragged, false, offsets, c, nullptr), Error);

  Buffer grad_device(DeviceKind::cuda, 4 * 192 * 256 * sizeof(float));
  const Tensor g(c_device.data(), DType::bf16, DeviceKind::cuda, {256, 256});
  Tensor grad(grad_device.data(), DType::f32, DeviceKind::cuda, {4, 192, 256});
  EXPECT_TRUE(sm90::weight_grad_supported(a, g, offsets, grad));
  const Tensor grad_bf16(grad_device.data(), DType::bf16, DeviceKind::cuda, {4, 192, 256});
  EXPECT_FALSE(sm90::weight_grad_supported(a, g, offsets, grad_bf16));
  const Tensor g_short(c_device.data(), DType::bf16, DeviceKind::cuda, {128, 256});
  EXPECT_FALSE(sm90::weight_grad_supported(a, g_short, offsets, grad));
}

}  // namespace
}  // namespace switchyard::sm90_testing
