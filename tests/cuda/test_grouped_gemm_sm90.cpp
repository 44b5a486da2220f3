// The hand-written sm_90a grouped GEMM (kernels/cuda/grouped_gemm_sm90.h) against a double-precision
// reference computed here from the same bf16 inputs. Layouts have uneven segments, empty experts
// (first, middle, last), padding rows inside segments and spare rows past expert_offsets[E] that
// hold random data the kernels must ignore. Every case runs the basic kernel and the pipelined one
// with 128- and 256-wide tiles and both epilogue stores (st.global, TMA); the larger cases have
// more tiles than SMs, so the persistent CTAs carry their pipeline (and the TMA stores' staging)
// across tiles. Outputs are poisoned (NaN) before each call.
// The fused activation epilogues (gelu, swiglu; forward and backward) are checked against the CPU
// reference ops (kernels/moe_ops.h) run on the same bf16 values, and bit for bit against the
// unfused CUDA path (the plain kernel with the same tile width, then the activation kernel).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <cstdlib>

#include "kernels/cuda/grouped_gemm_sm90.h"
#include "kernels/moe_ops.h"
#include "src/core/device.h"
#include "src/core/dtype.h"
#include "src/core/error.h"

namespace {

using namespace switchyard;
namespace sm90 = switchyard::cuda::sm90;

#define SKIP_WITHOUT_SM90()                                                                    \
  do {                                                                                         \
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";                                   \
    if (!sm90::device_supported()) GTEST_SKIP() << "the sm_90a kernels need a compute capability 9.0 GPU"; \
  } while (0)

constexpr uint16_t kPoisonBf16 = 0xFFFF;  // a NaN
constexpr int kAlign = sm90::kRowAlignment;

// Expert-contiguous layout: rows with data per expert, padded offsets, allocated rows.
struct SegmentLayout {
  std::vector<int> kept;
  std::vector<int> offsets;  // E + 1
  int64_t rows = 0;          // R > offsets[E]
  int experts() const { return int(kept.size()); }
  int expert_of(int64_t row) const {
    return int(std::upper_bound(offsets.begin(), offsets.end(), int(row)) - offsets.begin()) - 1;
  }
};

// Experts 1, 4, 7, ... (and expert 0 when E >= 32) get no rows, so empty segments sit first, in the
// middle and (for E = 8 and 32) last.
SegmentLayout make_layout(int experts, int min_kept, int max_kept, std::mt19937& rng) {
  SegmentLayout layout;
  std::uniform_int_distribution<int> count(min_kept, max_kept);
  layout.offsets.push_back(0);
  for (int expert = 0; expert < experts; ++expert) {
    const bool empty = experts > 1 && (expert % 3 == 1 || (experts >= 32 && expert == 0));
    const int kept = empty ? 0 : count(rng);
    layout.kept.push_back(kept);
    layout.offsets.push_back(layout.offsets.back() + (kept + kAlign - 1) / kAlign * kAlign);
  }
  layout.rows = layout.offsets.back() + 2 * kAlign;  // spare rows the kernels must not touch
  return layout;
}

// A bf16 matrix on the host: the bits to upload and the same values as floats.
struct HostMatrix {
  std::vector<uint16_t> bits;
  std::vector<float> values;
  void set(size_t index, float value) {
    bits[index] = Bf16(value).bits;
    values[index] = float(Bf16(value));
  }
};

HostMatrix random_matrix(size_t count, std::mt19937& rng, float scale = 1.0f) {
  HostMatrix matrix{std::vector<uint16_t>(count), std::vector<float>(count)};
  std::uniform_real_distribution<float> uniform(-scale, scale);
  for (size_t i = 0; i < count; ++i) matrix.set(i, uniform(rng));
  return matrix;
}

// Padding rows inside segments are zero, as permute leaves them.
void zero_padding_rows(HostMatrix& matrix, int64_t columns, const SegmentLayout& layout) {
  for (int expert = 0; expert < layout.experts(); ++expert) {
    for (int64_t row = layout.offsets[expert] + layout.kept[expert]; row < layout.offsets[expert + 1]; ++row) {
      for (int64_t column = 0; column < columns; ++column) matrix.set(size_t(row * columns + column), 0.0f);
    }
  }
}

Buffer upload(const void* data, size_t bytes) {
  Buffer buffer(DeviceKind::cuda, bytes);
  device_copy(buffer.data(), DeviceKind::cuda, data, DeviceKind::cpu, bytes);
  return buffer;
}

template <typename T>
std::vector<T> download(const Buffer& buffer, size_t count) {
  std::vector<T> host(count);
  device_copy(host.data(), DeviceKind::cpu, buffer.data(), DeviceKind::cuda, count * sizeof(T));
  return host;
}

struct KernelChoice {
  sm90::Options options;
  std::string name;
};

// Both epilogue stores of the pipelined kernel (the tma weight grad always has 128-wide tiles: its
// 256-wide choice runs the direct store).
std::vector<KernelChoice> kernel_choices() {
  sm90::Options basic;
  basic.variant = sm90::Variant::basic;
  std::vector<KernelChoice> choices{{basic, "basic"}};
  for (sm90::Store store : {sm90::Store::tma, sm90::Store::direct}) {
    for (int block_n : {128, 256}) {
      sm90::Options options;
      options.block_n = block_n;
      options.store = store;
      choices.push_back({options, "pipelined/" + std::to_string(block_n) +
                                      (store == sm90::Store::tma ? " tma-store" : " direct-store")});
    }
  }
  return choices;
}

// Indices to check: all of [0, count), or one random index in each run of `stride`.
std::vector<int64_t> pick_indices(int64_t count, int stride, std::mt19937& rng) {
  std::vector<int64_t> picked;
  for (int64_t start = 0; start < count; start += stride) {
    const int64_t span = std::min<int64_t>(stride, count - start);
    picked.push_back(stride == 1 ? start : start + std::uniform_int_distribution<int64_t>(0, span - 1)(rng));
  }
  return picked;
}

// max |got - want| / max |want| over the checked entries; NaNs count as failures.
struct ErrorMeter {
  double max_error = 0.0, max_reference = 0.0;
  int64_t non_finite = 0;
  void add(double got, double want) {
    if (!std::isfinite(got)) {
      ++non_finite;
      return;
    }
    max_error = std::max(max_error, std::fabs(got - want));
    max_reference = std::max(max_reference, std::fabs(want));
  }
  double relative() const { return max_error / std::max(max_reference, 1e-30); }
};

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

    for (const KernelChoice& choice : kernel_choices()) {
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

  for (const KernelChoice& choice : kernel_choices()) {
    std::ostringstream label;
    label << "E=" << experts << " R=" << rows << " M=" << m << " N=" << n << " kernel=" << choice.name;
    SCOPED_TRACE(label.str());
    device_memset(grad_device.data(), DeviceKind::cuda, 0xFF, grad_device.bytes());
    sm90::grouped_gemm_weight_grad(a_tensor, g_tensor, offsets_tensor, grad_tensor, choice.options, nullptr);
    device_synchronize(DeviceKind::cuda);
    const std::vector<float> grad = download<float>(grad_device, size_t(experts * m * n));

    ErrorMeter meter;
    int64_t nonzero_in_empty = 0;
    for (int expert = 0; expert < experts; ++expert) {
      const float* grad_expert = grad.data() + size_t(expert) * size_t(m * n);
      if (layout.kept[expert] == 0) {  // whole dB_e must be exactly zero
        for (int64_t index = 0; index < m * n; ++index) nonzero_in_empty += grad_expert[index] != 0.0f;
        continue;
      }
      const double* want = reference.data() + size_t(expert) * checked_m.size() * size_t(n);
      for (size_t i = 0; i < checked_m.size(); ++i) {
        for (int64_t column = 0; column < n; ++column) {
          meter.add(grad_expert[checked_m[i] * n + column], want[i * size_t(n) + column]);
        }
      }
    }
    EXPECT_EQ(nonzero_in_empty, 0) << "empty experts must get zero gradients";
    EXPECT_EQ(meter.non_finite, 0) << "NaN/Inf (unwritten) gradient entries";
    EXPECT_LE(meter.relative(), 2e-3) << "max error " << meter.max_error << " vs max |ref| " << meter.max_reference;
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

// No routed rows at all: forward writes nothing, weight grad writes zeros (also for R = 0).
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
    for (const KernelChoice& choice : kernel_choices()) {
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

// ---- Fused activation epilogues --------------------------------------------------------------

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
  for (const KernelChoice& choice : pipelined_choices()) {
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
  // The kernels/moe_ops.h entry point, fused or not (rows past expert_offsets[E] unspecified).
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
  for (const KernelChoice& choice : pipelined_choices()) {
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
  // The kernels/moe_ops.h entry point: its grad_post scratch is written only when it runs unfused.
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

// Fusion follows the sizes and the environment switches (kernels/moe_ops.h).
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
