#include "src/core/dtype.h"

#include <cmath>

#include "src/core/error.h"

namespace switchyard {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::f16: return 2;
    case DType::f64: return 8;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
  }
  SY_THROW("unknown dtype ", int(dtype));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "fp32";
    case DType::bf16: return "bf16";
    case DType::f16: return "fp16";
    case DType::f64: return "fp64";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
  }
  return "unknown";
}

DType parse_dtype(const std::string& name) {
  if (name == "fp32" || name == "float32" || name == "f32") return DType::f32;
  if (name == "bf16" || name == "bfloat16") return DType::bf16;
  if (name == "fp16" || name == "float16" || name == "f16") return DType::f16;
  SY_BAD_INPUT("unknown dtype '", name, "' (expected fp32, bf16 or fp16)");
}

// IEEE binary16 <-> binary32 with round-to-nearest-even, subnormals, inf and NaN.
uint16_t Half::from_float(float value) {
  uint32_t raw = float_bits(value);
  uint32_t sign = (raw >> 16) & 0x8000u;
  uint32_t exponent = (raw >> 23) & 0xffu;
  uint32_t mantissa = raw & 0x7fffffu;
  if (exponent == 0xffu) return uint16_t(sign | 0x7c00u | (mantissa ? 0x200u : 0u));
  int32_t half_exponent = int32_t(exponent) - 127 + 15;
  if (half_exponent >= 0x1f) return uint16_t(sign | 0x7c00u);  // overflow to inf
  if (half_exponent <= 0) {                                      // subnormal or zero
    if (half_exponent < -10) return uint16_t(sign);
    mantissa |= 0x800000u;
    uint32_t shift = uint32_t(14 - half_exponent);
    uint32_t half_mantissa = mantissa >> shift;
    uint32_t remainder = mantissa & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1);
    if (remainder > halfway || (remainder == halfway && (half_mantissa & 1u))) ++half_mantissa;
    return uint16_t(sign | half_mantissa);
  }
  uint32_t half = sign | (uint32_t(half_exponent) << 10) | (mantissa >> 13);
  uint32_t remainder = mantissa & 0x1fffu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (half & 1u))) ++half;  // may carry into exponent: correct
  return uint16_t(half);
}

float Half::to_float(uint16_t bits) {
  uint32_t sign = uint32_t(bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu;
  uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    float magnitude = std::ldexp(float(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent - 15 + 127) << 23) | (mantissa << 13));
}

float round_to(DType dtype, float value) {
  switch (dtype) {
    case DType::bf16: return float(Bf16(value));
    case DType::f16: return float(Half(value));
    default: return value;
  }
}

}  // namespace switchyard
