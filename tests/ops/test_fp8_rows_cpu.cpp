// The CPU reference of the FP8 row packing (src/ops/fp8_rows.h, src/ops/cpu/fp8_rows.cpp).
//
// The e4m3 conversion: hand-checked codes (zeros, the largest finite value, saturation, ties to
// even in the normal and the subnormal range, the smallest subnormal and what rounds to zero, NaN),
// then every finite code: decoding is strictly increasing from 0 to 448, every value encodes to its
// own code, and around every midpoint between neighbours the encoding picks the nearer code (the
// even one on the midpoint itself) -- an exhaustive check of round-to-nearest-even derived from the
// decoding alone.
// The row ops: the record layout (codes, scales at fp8_scale_offset, zero padding) on hand-built
// rows, the special blocks (all zero, NaN, tiny magnitudes), and on fresh random rows of widths 128,
// 131, 200 and 768 (f32 and f64, magnitudes spread over 1e-3..1e3 per row) the round-trip bound
//   |x - dequantize(quantize(x))| <= 2^-4 |x| + 2^-18 amax_block  (and so <= 2^-4 amax_block):
// e4m3 keeps 4 significant bits, so rounding moves a normal value by at most 1/17 of itself, a
// subnormal one by 2^-10 times the scale amax/448 < 2^-18 amax (the header derives it). Packed
// bytes and outputs are poisoned before every call.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "src/ops/ops.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

uint8_t encode(float value) { return cpu::e4m3_rne_satfinite(value); }

float scale_of(const HostTensor& packed, int64_t row, int64_t width, int64_t block) {
  float scale;
  std::memcpy(&scale, packed.data<uint8_t>() + row * packed.tensor().dim(1) + fp8_scale_offset(width) + 4 * block, 4);
  return scale;
}

void poison_bytes(HostTensor& tensor) { std::memset(tensor.tensor().data, 0xA5, tensor.tensor().bytes()); }

TEST(Fp8RowsCpu, RecordSizes) {
  EXPECT_EQ(fp8_row_bytes(128), 144);  // 128 codes + 1 scale = 132 -> 144
  EXPECT_EQ(fp8_row_bytes(200), 208);  // 200 + 2 scales = 208
  EXPECT_EQ(fp8_row_bytes(768), 800);  // 768 + 6 scales = 792 -> 800
  EXPECT_EQ(fp8_row_bytes(131), 144);  // codes to 132 (aligned scales) + 2 scales = 140 -> 144
  EXPECT_EQ(fp8_row_bytes(7168), 7392);
  EXPECT_EQ(fp8_scale_offset(131), 132);
  EXPECT_EQ(fp8_block_count(129), 2);
}

TEST(Fp8RowsCpu, HandCheckedCodes) {
  EXPECT_EQ(encode(0.0f), 0x00);
  EXPECT_EQ(encode(-0.0f), 0x80);
  EXPECT_EQ(encode(1.0f), 0x38);       // exponent field 7, mantissa 0
  EXPECT_EQ(encode(-1.5f), 0xBC);      // sign, exponent 7, mantissa 4
  EXPECT_EQ(encode(448.0f), 0x7E);     // the largest finite: exponent 15, mantissa 6
  EXPECT_EQ(encode(-448.0f), 0xFE);
  EXPECT_EQ(encode(449.0f), 0x7E);     // saturation
  EXPECT_EQ(encode(464.0f), 0x7E);     // the midpoint to the NaN pattern: saturates, never NaN
  EXPECT_EQ(encode(1e30f), 0x7E);
  EXPECT_EQ(encode(-std::numeric_limits<float>::infinity()), 0xFE);
  EXPECT_EQ(encode(416.0f), 0x7D);     // 416 = 1.625 * 2^8
  EXPECT_EQ(encode(17.0f), 0x58);      // halfway 16 (m 0) and 18 (m 1): the even mantissa, 16
  EXPECT_EQ(encode(19.0f), 0x5A);      // halfway 18 (m 1) and 20 (m 2): 20
  EXPECT_EQ(encode(-19.0f), 0xDA);
  EXPECT_EQ(encode(std::nextafter(17.0f, 20.0f)), 0x59);  // just above the midpoint: up
  EXPECT_EQ(encode(0x1p-9f), 0x01);    // the smallest subnormal
  EXPECT_EQ(encode(7 * 0x1p-9f), 0x07);  // the largest subnormal
  EXPECT_EQ(encode(0x1p-6f), 0x08);    // the smallest normal
  EXPECT_EQ(encode(15 * 0x1p-10f), 0x08);  // halfway 7 and 8 quanta: 8, into the normal range
  EXPECT_EQ(encode(3 * 0x1p-10f), 0x02);   // halfway 1 and 2 quanta: 2
  EXPECT_EQ(encode(0x1p-10f), 0x00);   // half the smallest subnormal: ties to 0
  EXPECT_EQ(encode(-0x1p-10f), 0x80);
  EXPECT_EQ(encode(std::nextafter(0x1p-10f, 1.0f)), 0x01);
  EXPECT_EQ(encode(0.9f * 0x1p-10f), 0x00);
  EXPECT_EQ(encode(1e-40f), 0x00);     // a float subnormal
  EXPECT_EQ(encode(std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(encode(-std::numeric_limits<float>::quiet_NaN()), 0x7F);

  EXPECT_EQ(cpu::e4m3_to_float(0x01), 0x1p-9f);
  EXPECT_EQ(cpu::e4m3_to_float(0x08), 0x1p-6f);
  EXPECT_EQ(cpu::e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(cpu::e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(cpu::e4m3_to_float(0xFE), -448.0f);
  EXPECT_TRUE(std::signbit(cpu::e4m3_to_float(0x80)));
  EXPECT_TRUE(std::isnan(cpu::e4m3_to_float(0x7F)));
  EXPECT_TRUE(std::isnan(cpu::e4m3_to_float(0xFF)));
}

// Every finite positive code c < 0x7E and its successor: the decoded values increase; each value
// encodes to its code (and its negation to the code with the sign bit); on the midpoint the even
// code wins; a float step below or above it goes to the nearer neighbour.
TEST(Fp8RowsCpu, EveryCodeRoundsToNearestEven) {
  EXPECT_EQ(cpu::e4m3_to_float(0x00), 0.0f);
  for (int code = 0; code <= 0x7E; ++code) {
    const float value = cpu::e4m3_to_float(uint8_t(code));
    EXPECT_EQ(encode(value), code) << "code " << code;
    EXPECT_EQ(encode(-value), code | 0x80) << "code " << code;
    if (code == 0x7E) break;
    const float next = cpu::e4m3_to_float(uint8_t(code + 1));
    ASSERT_LT(value, next) << "decoding is not increasing at code " << code;
    const float middle = 0.5f * (value + next);  // exact: neighbours share a quantum
    const int even = (code % 2 == 0) ? code : code + 1;
    EXPECT_EQ(encode(middle), even) << "midpoint above code " << code;
    EXPECT_EQ(encode(std::nextafter(middle, 0.0f)), code) << "below the midpoint above code " << code;
    EXPECT_EQ(encode(std::nextafter(middle, 1000.0f)), code + 1) << "above the midpoint above code " << code;
  }
}

// A row of width 131 (scales at byte 132, two padding bytes before them): block 0 holds 448 so
// its scale is exactly 1 and the codes are the conversions themselves; block 1 has amax 3.5, so
// inv = 128 and the scale 2^-7, both exact.
TEST(Fp8RowsCpu, RecordLayout) {
  const int64_t width = 131;
  HostTensor rows(DType::f32, {2, width}), packed(DType::u8, {2, fp8_row_bytes(width)});
  for (int64_t column = 0; column < width; ++column) rows.data<float>()[column] = 0.25f;
  float* row0 = rows.data<float>();
  row0[0] = 448.0f;
  row0[1] = 17.0f;
  row0[2] = -0x1p-9f;
  row0[3] = 0x1p-10f;
  row0[128] = 3.5f;
  row0[129] = -1.75f;     // * 128 = -224: exponent 7, mantissa 6 -> 0xF6
  row0[130] = 0.00390625f;  // * 128 = 0.5 -> 0x30
  for (int64_t column = 0; column < width; ++column) rows.data<float>()[width + column] = 0.0f;  // all zero
  poison_bytes(packed);
  ops::quantize_rows_fp8(kCpu, rows, packed);

  const uint8_t* record = packed.data<uint8_t>();
  EXPECT_EQ(record[0], 0x7E);
  EXPECT_EQ(record[1], 0x58);
  EXPECT_EQ(record[2], 0x81);
  EXPECT_EQ(record[3], 0x00);
  EXPECT_EQ(record[4], encode(0.25f));
  EXPECT_EQ(record[128], 0x7E);
  EXPECT_EQ(record[129], 0xF6);
  EXPECT_EQ(record[130], 0x30);
  EXPECT_EQ(record[131], 0);  // padding before the scales
  EXPECT_EQ(scale_of(packed, 0, width, 0), 1.0f);
  EXPECT_EQ(scale_of(packed, 0, width, 1), 0x1p-7f);
  for (int64_t byte = fp8_scale_offset(width) + 8; byte < fp8_row_bytes(width); ++byte)
    EXPECT_EQ(record[byte], 0) << "padding byte " << byte;
  // The zero row: every code 0, scales 1, padding 0.
  const uint8_t* zero_record = record + fp8_row_bytes(width);
  for (int64_t column = 0; column < width; ++column) EXPECT_EQ(zero_record[column], 0) << column;
  EXPECT_EQ(scale_of(packed, 1, width, 0), 1.0f);
  EXPECT_EQ(scale_of(packed, 1, width, 1), 1.0f);

  HostTensor back(DType::f32, {2, width});
  poison(back);
  ops::dequantize_rows_fp8(kCpu, packed, back);
  EXPECT_EQ(back.data<float>()[0], 448.0f);
  EXPECT_EQ(back.data<float>()[1], 16.0f);
  EXPECT_EQ(back.data<float>()[2], -0x1p-9f);
  EXPECT_EQ(back.data<float>()[3], 0.0f);
  EXPECT_EQ(back.data<float>()[128], 3.5f);
  EXPECT_EQ(back.data<float>()[129], -1.75f);
  EXPECT_EQ(back.data<float>()[130], 0.00390625f);
  for (int64_t column = 0; column < width; ++column) EXPECT_EQ(back.data<float>()[width + column], 0.0f);
}

// NaN is ignored by amax and stays NaN; a block below 448 / FLT_MAX gets scale 1 (its codes
// underflow to zeros) instead of an infinite inverse that would turn zeros into NaN.
TEST(Fp8RowsCpu, SpecialBlocks) {
  const int64_t width = 256;
  HostTensor rows(DType::f32, {1, width}), packed(DType::u8, {1, fp8_row_bytes(width)});
  std::mt19937_64 generator(std::random_device{}());
  fill_uniform(rows, generator, -2.0, 2.0);
  rows.data<float>()[5] = std::numeric_limits<float>::quiet_NaN();
  rows.data<float>()[6] = 3.0f;  // amax of block 0
  for (int64_t column = 128; column < width; ++column) rows.data<float>()[column] = 1e-37f * float(column % 3);
  poison_bytes(packed);
  ops::quantize_rows_fp8(kCpu, rows, packed);
  EXPECT_EQ(packed.data<uint8_t>()[5], 0x7F);
  EXPECT_EQ(packed.data<uint8_t>()[6], 0x7E);
  EXPECT_EQ(scale_of(packed, 0, width, 0), 3.0f / 448.0f);
  EXPECT_EQ(scale_of(packed, 0, width, 1), 1.0f);
  for (int64_t column = 128; column < width; ++column) EXPECT_EQ(packed.data<uint8_t>()[column], 0) << column;

  HostTensor back(DType::f32, {1, width});
  poison(back);
  ops::dequantize_rows_fp8(kCpu, packed, back);
  EXPECT_TRUE(std::isnan(back.data<float>()[5]));
  EXPECT_EQ(back.data<float>()[6], 3.0f);
  for (int64_t column = 128; column < width; ++column) EXPECT_EQ(back.data<float>()[column], 0.0f) << column;
}

template <typename Real>
void check_round_trip(int64_t rows_count, int64_t width, std::mt19937_64& generator) {
  SCOPED_TRACE(::testing::Message() << dtype_name(std::is_same_v<Real, float> ? DType::f32 : DType::f64) << " width "
                                    << width);
  const DType dtype = std::is_same_v<Real, float> ? DType::f32 : DType::f64;
  HostTensor rows(dtype, {rows_count, width}), packed(DType::u8, {rows_count, fp8_row_bytes(width)});
  HostTensor back(dtype, {rows_count, width});
  fill_normal(rows, generator, 0.0, 1.0);
  std::uniform_real_distribution<double> exponent(-3.0, 3.0);
  for (int64_t row = 0; row < rows_count; ++row) {
    const double magnitude = std::pow(10.0, exponent(generator));
    for (int64_t column = 0; column < width; ++column) rows.data<Real>()[row * width + column] *= Real(magnitude);
  }
  poison_bytes(packed);
  poison(back);
  ops::quantize_rows_fp8(kCpu, rows, packed);
  ops::dequantize_rows_fp8(kCpu, packed, back);

  int failures = 0;
  for (int64_t row = 0; row < rows_count && failures < 10; ++row) {
    const Real* source = rows.data<Real>() + row * width;
    const Real* result = back.data<Real>() + row * width;
    const uint8_t* record = packed.data<uint8_t>() + row * fp8_row_bytes(width);
    for (int64_t byte = width; byte < fp8_row_bytes(width); ++byte) {
      const int64_t scales = fp8_scale_offset(width);
      const bool in_scales = byte >= scales && byte < scales + 4 * fp8_block_count(width);
      if (!in_scales && record[byte] != 0) ++failures, ADD_FAILURE() << "row " << row << " padding byte " << byte;
    }
    for (int64_t block = 0; block < fp8_block_count(width); ++block) {
      const int64_t begin = block * kFp8BlockElements, end = std::min(begin + kFp8BlockElements, width);
      double amax = 0.0;
      for (int64_t column = begin; column < end; ++column)
        amax = std::max(amax, std::fabs(double(float(source[column]))));
      const double scale = scale_of(packed, row, width, block);
      if (std::fabs(scale - amax / 448.0) > scale * 0x1p-23)
        ++failures, ADD_FAILURE() << "row " << row << " block " << block << ": scale " << scale << ", amax " << amax;
      for (int64_t column = begin; column < end; ++column) {
        const double value = double(source[column]), error = std::fabs(value - double(result[column]));
        if (!(error <= 0x1p-4 * std::fabs(value) + 0x1p-18 * amax) || !(error <= 0x1p-4 * amax))
          ++failures, ADD_FAILURE() << "row " << row << " column " << column << ": " << value << " came back as "
                                    << result[column] << " (block amax " << amax << ")";
      }
    }
  }
}

TEST(Fp8RowsCpu, RoundTripWithinBound) {
  std::mt19937_64 generator(std::random_device{}());
  for (int64_t width : {128, 131, 200, 768}) {
    check_round_trip<float>(37, width, generator);
    check_round_trip<double>(11, width, generator);
  }
  check_round_trip<float>(0, 200, generator);  // no rows: nothing to do, no error
}

TEST(Fp8RowsCpu, RejectsMismatchedShapes) {
  HostTensor rows(DType::f32, {3, 200}), wrong_width(DType::u8, {3, 200}), wrong_rows(DType::u8, {2, 208});
  HostTensor bf16_rows(DType::bf16, {3, 200}), packed(DType::u8, {3, 208});
  std::mt19937_64 generator(3);
  fill_uniform(rows, generator, -1.0, 1.0);
  EXPECT_THROW(ops::quantize_rows_fp8(kCpu, rows, wrong_width), Error);
  EXPECT_THROW(ops::quantize_rows_fp8(kCpu, rows, wrong_rows), Error);
  EXPECT_THROW(ops::dequantize_rows_fp8(kCpu, wrong_width, rows), Error);
  EXPECT_THROW(ops::quantize_rows_fp8(kCpu, bf16_rows, packed), Error);  // the reference is f32 / f64
}

}  // namespace
