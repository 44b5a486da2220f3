// Element types and host-side conversions.
//
// bf16 and fp16 are stored as raw 16-bit patterns on the host (Bf16, Half) so that CPU code
// needs no CUDA headers; their bits are identical to __nv_bfloat16 / __half on the device.
// Conversions round to nearest even, as the hardware does.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace switchyard {

enum class DType : uint8_t { f32, bf16, f16, f64, i32, i64, u8 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
// Parses "fp32"/"float32"/"f32", "bf16"/"bfloat16", "fp16"/"float16"/"f16"; throws on others.
DType parse_dtype(const std::string& name);

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}
inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

struct Bf16 {
  uint16_t bits = 0;
  Bf16() = default;
  explicit Bf16(float value) : bits(from_float(value)) {}
  explicit operator float() const { return bits_float(uint32_t(bits) << 16); }
  static uint16_t from_float(float value) {
    uint32_t raw = float_bits(value);
    if ((raw & 0x7f800000u) == 0x7f800000u && (raw & 0x007fffffu)) return uint16_t((raw >> 16) | 0x40);  // NaN stays NaN
    uint32_t rounding = 0x7fffu + ((raw >> 16) & 1u);
    return uint16_t((raw + rounding) >> 16);
  }
};

struct Half {
  uint16_t bits = 0;
  Half() = default;
  explicit Half(float value) : bits(from_float(value)) {}
  explicit operator float() const { return to_float(bits); }
  static uint16_t from_float(float value);
  static float to_float(uint16_t bits);
};

// Rounds a float through the type and back: what a value looks like after storage in `dtype`.
float round_to(DType dtype, float value);

}  // namespace switchyard
