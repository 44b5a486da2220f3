// CPU reference of the FP8 row packing (semantics and record layout: src/ops/fp8_rows.h).
//
// The e4m3 conversion works on the float's magnitude a: its quantum is 2^(e-3) for a in [2^e,
// 2^(e+1)) and 2^-9 below 2^-6 (the subnormals), so n = rint(a / quantum) (an exact division by a
// power of two, then round-half-even in the default rounding mode) counts quanta, and the code is
// ((e + 7) << 3) + n - 8 with e = max(floor(log2 a), -6). The formula carries into the exponent when
// n reaches 16, and for e = -6 it gives n itself, the subnormal codes. Magnitudes >= 448 saturate
// (those in (448, 464] would round to 448 anyway; beyond, satfinite clamps).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/fp8_rows.h"

namespace switchyard {
namespace cpu {

uint8_t e4m3_rne_satfinite(float value) {
  const uint32_t bits = float_bits(value);
  const uint32_t magnitude_bits = bits & 0x7fffffffu;
  if (magnitude_bits > 0x7f800000u) return 0x7F;  // NaN: the canonical code, sign dropped
  const uint8_t sign = uint8_t((bits >> 24) & 0x80u);
  const float magnitude = bits_float(magnitude_bits);
  if (magnitude >= kE4m3Max) return uint8_t(sign | 0x7E);
  const int exponent = magnitude < 0x1p-6f ? -6 : std::ilogb(magnitude);
  const float quanta = std::nearbyint(magnitude / std::ldexp(1.0f, exponent - 3));
  return uint8_t(sign | uint8_t(((exponent + 7) << 3) + int(quanta) - 8));
}

float e4m3_to_float(uint8_t code) {
  if ((code & 0x7F) == 0x7F) return std::numeric_limits<float>::quiet_NaN();
  const int exponent_field = (code >> 3) & 0xF, mantissa = code & 0x7;
  const float magnitude = exponent_field == 0 ? std::ldexp(float(mantissa), -9)
                                              : std::ldexp(float(8 + mantissa), exponent_field - 10);
  return (code & 0x80) ? -magnitude : magnitude;
}

namespace {

void check_packed(const char* op, const Tensor& rows, const Tensor& packed) {
  detail::expect_float_matrix(op, "rows", rows, 2);
  detail::expect_tensor(op, "packed", packed, DType::u8, {rows.dim(0), fp8_row_bytes(rows.dim(1))});
}

template <typename Real>
void quantize(const Tensor& rows, Tensor& packed) {
  const int64_t count = rows.dim(0), width = rows.dim(1), row_bytes = packed.dim(1);
  const int64_t blocks = fp8_block_count(width), scale_offset = fp8_scale_offset(width);
  for (int64_t row = 0; row < count; ++row) {
    const Real* source = rows.as<Real>() + row * width;
    uint8_t* record = packed.as<uint8_t>() + row * row_bytes;
    std::memset(record, 0, size_t(row_bytes));  // the padding bytes
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t begin = block * kFp8BlockElements, end = std::min(begin + kFp8BlockElements, width);
      float amax = 0.0f;
      for (int64_t column = begin; column < end; ++column) amax = std::fmax(amax, std::fabs(float(source[column])));
      // Single float divisions and products, each correctly rounded, as the CUDA kernel's
      // __fdiv_rn / __fmul_rn (no sum follows a product, so nothing could be contracted).
      float inv = kE4m3Max / amax, scale = amax / kE4m3Max;
      if (amax == 0.0f || std::isinf(inv)) inv = scale = 1.0f;
      for (int64_t column = begin; column < end; ++column)
        record[column] = e4m3_rne_satfinite(float(source[column]) * inv);
      std::memcpy(record + scale_offset + 4 * block, &scale, 4);
    }
  }
}

template <typename Real>
void dequantize(const Tensor& packed, Tensor& rows) {
  const int64_t count = rows.dim(0), width = rows.dim(1), row_bytes = packed.dim(1);
  const int64_t scale_offset = fp8_scale_offset(width);
  for (int64_t row = 0; row < count; ++row) {
    const uint8_t* record = packed.as<uint8_t>() + row * row_bytes;
    Real* destination = rows.as<Real>() + row * width;
    for (int64_t column = 0; column < width; ++column) {
      float scale;
      std::memcpy(&scale, record + scale_offset + 4 * (column / kFp8BlockElements), 4);
      const float value = e4m3_to_float(record[column]) * scale;
      destination[column] = Real(value);
    }
  }
}

}  // namespace

void quantize_rows_fp8(const Tensor& rows, Tensor& packed) {
  check_packed("quantize_rows_fp8", rows, packed);
  detail::dispatch_float("quantize_rows_fp8", rows.dtype, [&](auto tag) { quantize<decltype(tag)>(rows, packed); });
}

void dequantize_rows_fp8(const Tensor& packed, Tensor& rows) {
  check_packed("dequantize_rows_fp8", rows, packed);
  detail::dispatch_float("dequantize_rows_fp8", rows.dtype, [&](auto tag) { dequantize<decltype(tag)>(packed, rows); });
}

}  // namespace cpu
}  // namespace switchyard
