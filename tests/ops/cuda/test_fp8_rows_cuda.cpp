// The CUDA FP8 row packing (src/ops/cuda/fp8_rows.cu) against the CPU reference
// (src/ops/cpu/fp8_rows.cpp) on identical inputs: the CUDA rows (bf16, fp16 or fp32) go to the
// reference as float32 (exact), and the packed bytes must be equal, every one of them (codes,
// scales, padding; the device buffers start poisoned with 0xFF). Dequantized rows must equal the
// reference's float32 results rounded to the CUDA output dtype (round-to-nearest-even), NaN where
// the reference has NaN. Inputs: every bf16 value of magnitude below 448 (and the NaNs) in blocks
// whose scale is exactly 1, so each code is the hardware conversion itself; random rows of widths
// 128, 131, 200, 768 and 7168 with magnitudes spread over 1e-3..1e3 per row, a zero row and a
// block of magnitudes too small for a finite inverse scale.
// Without a GPU one test still runs: the reference's scalar conversions against cuda_fp8.h's host
// implementation (the software emulation of the same cvt), for every float bit pattern and every
// code.
#include <cuda_fp8.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "src/ops/ops.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

// Quantizes `host` (any dtype) on the device in `dtype` and on the CPU (float32 copy of the same
// values), then compares the packed bytes and the two dequantizations.
void expect_matches_reference(const HostTensor& host, DType dtype) {
  const int64_t rows = host.tensor().dim(0), width = host.tensor().dim(1), row_bytes = fp8_row_bytes(width);
  SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << " [" << rows << ", " << width << "]");
  HostTensor reference_rows(DType::f32, {rows, width}), reference_packed(DType::u8, {rows, row_bytes});
  copy_values(host.tensor(), reference_rows.tensor());
  std::memset(reference_packed.tensor().data, 0xA5, reference_packed.tensor().bytes());
  ops::quantize_rows_fp8(kCpu, reference_rows, reference_packed);

  DeviceTensor device_rows = to_device(host.tensor(), dtype);
  DeviceTensor device_packed(DType::u8, {rows, row_bytes});  // poisoned: 0xFF
  const ExecContext context{DeviceKind::cuda, nullptr};
  ops::quantize_rows_fp8(context, device_rows, device_packed);
  ops::synchronize(context);
  const std::vector<uint8_t> bytes = device_packed.bytes();
  int64_t mismatches = 0;
  for (int64_t index = 0; index < int64_t(bytes.size()); ++index) {
    const uint8_t expected = reference_packed.data<uint8_t>()[index];
    if (bytes[size_t(index)] != expected && ++mismatches <= 8) {
      const double input = index % row_bytes < width ? get_element(reference_rows, index / row_bytes * width +
                                                                                         index % row_bytes)
                                                     : std::nan("");
      ADD_FAILURE() << "row " << index / row_bytes << " byte " << index % row_bytes << ": cuda "
                    << int(bytes[size_t(index)]) << ", reference " << int(expected) << " (input " << input << ")";
    }
  }
  EXPECT_EQ(mismatches, 0);

  HostTensor reference_back(DType::f32, {rows, width});
  poison(reference_back);
  ops::dequantize_rows_fp8(kCpu, reference_packed, reference_back);
  DeviceTensor device_back(dtype, {rows, width});  // poisoned
  ops::dequantize_rows_fp8(context, device_packed, device_back);
  ops::synchronize(context);
  const std::vector<double> actual = device_back.values();
  mismatches = 0;
  for (int64_t index = 0; index < rows * width; ++index) {
    const float expected = round_to(dtype, reference_back.data<float>()[index]);
    const double got = actual[size_t(index)];
    const bool same = std::isnan(expected) ? std::isnan(got) : got == double(expected);
    if (!same && ++mismatches <= 8)
      ADD_FAILURE() << "dequantized element " << index << ": cuda " << got << ", reference " << expected;
  }
  EXPECT_EQ(mismatches, 0);
}

// Host only: needs no GPU. About 30 s for the 2^32 floats.
TEST(Fp8RowsCuda, ReferenceConversionsEqualCudaFp8HostConversions) {
  uint64_t mismatches = 0;
  for (uint64_t pattern = 0; pattern <= 0xFFFFFFFFull; ++pattern) {
    const float value = bits_float(uint32_t(pattern));
    const uint8_t expected = __nv_cvt_float_to_fp8(value, __NV_SATFINITE, __NV_E4M3);
    if (cpu::e4m3_rne_satfinite(value) != expected && ++mismatches <= 8)
      ADD_FAILURE() << "float bits " << std::hex << pattern << ": reference " << int(cpu::e4m3_rne_satfinite(value))
                    << ", cuda_fp8.h " << int(expected);
  }
  EXPECT_EQ(mismatches, 0u);
  for (int code = 0; code < 256; ++code) {
    const float expected = __half2float(__half(__nv_cvt_fp8_to_halfraw(uint8_t(code), __NV_E4M3)));
    const float actual = cpu::e4m3_to_float(uint8_t(code));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(actual)) << "code " << code;
    } else {
      EXPECT_EQ(actual, expected) << "code " << code;
      EXPECT_EQ(std::signbit(actual), std::signbit(expected)) << "code " << code;
    }
  }
}

TEST(Fp8RowsCuda, EveryBf16ValueConvertsAsTheReference) {
  SKIP_WITHOUT_CUDA();
  // Each row: element 0 is 448 (so inv = scale = 1), then bf16 patterns in order.
  std::vector<uint16_t> patterns;
  for (uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const float value = bits_float(bits << 16);
    if (std::isnan(value) || std::fabs(value) < 448.0f) patterns.push_back(uint16_t(bits));
  }
  const int64_t per_row = kFp8BlockElements - 1, rows = (int64_t(patterns.size()) + per_row - 1) / per_row;
  HostTensor host(DType::bf16, {rows, kFp8BlockElements});
  for (int64_t row = 0; row < rows; ++row) {
    host.data<Bf16>()[row * kFp8BlockElements] = Bf16(448.0f);
    for (int64_t column = 1; column < kFp8BlockElements; ++column) {
      const size_t index = size_t(row * per_row + column - 1);
      host.data<Bf16>()[row * kFp8BlockElements + column].bits = index < patterns.size() ? patterns[index] : 0;
    }
  }
  expect_matches_reference(host, DType::bf16);
}

TEST(Fp8RowsCuda, RandomRowsMatchReference) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 generator(std::random_device{}());
  std::uniform_real_distribution<double> exponent(-3.0, 3.0);
  for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
    for (int64_t width : {128, 131, 200, 768, 7168}) {
      const int64_t rows = width > 1000 ? 9 : 53;
      HostTensor host(DType::f32, {rows, width});
      fill_normal(host, generator, 0.0, 1.0);
      for (int64_t row = 0; row < rows; ++row) {
        const double magnitude = std::pow(10.0, exponent(generator));
        for (int64_t column = 0; column < width; ++column) {
          float& value = host.data<float>()[row * width + column];
          value = round_to(dtype, float(value * magnitude));  // the values both sides see
        }
      }
      for (int64_t column = 0; column < width; ++column) host.data<float>()[column] = 0.0f;  // a zero row
      if (dtype == DType::f32)  // a block whose inverse scale would overflow
        for (int64_t column = 0; column < std::min<int64_t>(width, kFp8BlockElements); ++column)
          host.data<float>()[width + column] = 1e-37f * float(column % 5) * (column % 2 ? -1.0f : 1.0f);
      expect_matches_reference(host, dtype);
    }
  }
}

}  // namespace
