// Shared by the sm_90a grouped GEMM tests (test_grouped_gemm_sm90.cpp: plain GEMMs and weight
// gradients; test_grouped_gemm_sm90_fused.cpp: fused activation epilogues): expert-contiguous
// layouts with uneven and empty segments, padding rows and spare rows past expert_offsets[E]; bf16
// host matrices with their float values; device upload and download; the kernel variants every
// case runs; and the error measure against a double-precision reference.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "src/ops/cuda/sm90/grouped_gemm_sm90.h"
#include "src/core/device.h"
#include "src/core/dtype.h"

namespace switchyard::sm90_testing {

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
inline SegmentLayout make_layout(int experts, int min_kept, int max_kept, std::mt19937& rng) {
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

inline HostMatrix random_matrix(size_t count, std::mt19937& rng, float scale = 1.0f) {
  HostMatrix matrix{std::vector<uint16_t>(count), std::vector<float>(count)};
  std::uniform_real_distribution<float> uniform(-scale, scale);
  for (size_t i = 0; i < count; ++i) matrix.set(i, uniform(rng));
  return matrix;
}

// Padding rows inside segments are zero, as permute leaves them.
inline void zero_padding_rows(HostMatrix& matrix, int64_t columns, const SegmentLayout& layout) {
  for (int expert = 0; expert < layout.experts(); ++expert) {
    for (int64_t row = layout.offsets[expert] + layout.kept[expert]; row < layout.offsets[expert + 1]; ++row) {
      for (int64_t column = 0; column < columns; ++column) matrix.set(size_t(row * columns + column), 0.0f);
    }
  }
}

inline Buffer upload(const void* data, size_t bytes) {
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

// Both epilogue stores and both schedules of the pipelined kernel (the tma weight grad always has
// 128-wide tiles: its 256-wide choice runs the direct store; the weight grad ignores the schedule).
inline std::vector<KernelChoice> kernel_choices() {
  sm90::Options basic;
  basic.variant = sm90::Variant::basic;
  std::vector<KernelChoice> choices{{basic, "basic"}};
  for (sm90::Store store : {sm90::Store::tma, sm90::Store::direct}) {
    const std::string store_name = store == sm90::Store::tma ? " tma-store" : " direct-store";
    for (int block_n : {128, 256}) {
      sm90::Options options;
      options.block_n = block_n;
      options.store = store;
      options.schedule = sm90::Schedule::cooperative;
      choices.push_back({options, "pipelined/" + std::to_string(block_n) + store_name});
    }
    sm90::Options pingpong;
    pingpong.store = store;
    pingpong.schedule = sm90::Schedule::pingpong;
    choices.push_back({pingpong, "pipelined/pingpong" + store_name});
  }
  return choices;
}

// The weight grad adds its staged stores (tma, warps) with multicast pairs forced on and off (the
// tma-store choices above run the automatic pick).
inline std::vector<KernelChoice> weight_grad_kernel_choices() {
  std::vector<KernelChoice> choices = kernel_choices();
  for (sm90::Store store : {sm90::Store::tma, sm90::Store::warps}) {
    for (sm90::Multicast multicast : {sm90::Multicast::off, sm90::Multicast::pair}) {
      sm90::Options options;
      options.block_n = 128;
      options.store = store;
      options.multicast = multicast;
      choices.push_back({options, std::string("pipelined/128 ") + (store == sm90::Store::tma ? "tma" : "warps") +
                                      "-store" + (multicast == sm90::Multicast::pair ? " multicast pairs" : "")});
    }
  }
  return choices;
}

// The layout's padding marks (sm90::Options::row_tokens): -1 on each segment's rows past its kept
// ones and on the spare rows, the row index elsewhere.
inline std::vector<int> padding_marks(const SegmentLayout& layout) {
  std::vector<int> marks(size_t(layout.rows), -1);
  for (int expert = 0; expert < layout.experts(); ++expert)
    for (int row = layout.offsets[size_t(expert)]; row < layout.offsets[size_t(expert)] + layout.kept[size_t(expert)];
         ++row)
      marks[size_t(row)] = row;
  return marks;
}

// `choices` and, after them, each pipelined one again with the padding marks `marks` (device) set:
// the kernels then skip the half tiles and k-blocks that only padding feeds, with equal results.
inline std::vector<KernelChoice> with_padding_marks(const std::vector<KernelChoice>& choices, const int* marks) {
  std::vector<KernelChoice> all = choices;
  for (const KernelChoice& choice : choices) {
    if (choice.options.variant != sm90::Variant::pipelined) continue;
    KernelChoice marked = choice;
    marked.options.row_tokens = marks;
    marked.name += " padding-marks";
    all.push_back(marked);
  }
  return all;
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

}  // namespace switchyard::sm90_testing
