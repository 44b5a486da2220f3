// FP8 row packing: rows of activations stored as e4m3 bytes with one float32 scale per block of
// 128 elements, the wire format of the expert-parallel FP8 dispatch (src/comm/ep_exchange.h).
// One declaration, two backends, the conventions of src/ops/moe_ops.h:
//
//   switchyard::cpu::NAME   src/ops/cpu/fp8_rows.cpp   reference: f32 / f64 rows
//   switchyard::cuda::NAME  src/ops/cuda/fp8_rows.cu   bf16 / f16 / f32 rows; the same bytes, bit for bit
//   switchyard::ops::NAME   src/ops/ops.h              picks the backend (src/ops/dispatch_ep.cpp)
//
// Record of one row of D elements, fp8_row_bytes(D) bytes (a multiple of 16, so rows stay 16-byte
// aligned for vector copies):
//   [0, D)                          e4m3 codes, element order
//   [fp8_scale_offset(D), +4*B)     B = ceil(D / 128) float32 scales, block b = elements [128b, 128b+128)
//                                   (fp8_scale_offset(D) = D rounded up to 4, so the floats are aligned)
//   every other byte                zero
// D = 768: 768 + 24 -> 800 bytes (bf16: 1536); D = 7168: 7168 + 224 -> 7392 bytes (bf16: 14336).
//
// quantize_rows_fp8, per block, all in float32 with correctly rounded operations (no contraction):
//   x_i     = the element as float (f64 rows are rounded to float first)
//   amax    = max_i |x_i|, NaN elements ignored (fmaxf)
//   inv     = 448 / amax;  scale = amax / 448
//   if amax == 0 or inv is infinite (amax < 448 / FLT_MAX): inv = 1, scale = 1
//   code_i  = e4m3_rne_satfinite(x_i * inv)
// dequantize_rows_fp8:
//   x_i     = float(code_i) * scale (a float multiply), then rounded to the output dtype (RNE)
//
// e4m3 (OCP FP8 E4M3, what __NV_E4M3 converts to): sign, 4 exponent bits (bias 7), 3 mantissa bits;
// normals (1 + m/8) * 2^(E-7) for E in 1..15, subnormals m * 2^-9 (E = 0), largest finite 448
// (0x7E), no infinities, 0x7F / 0xFF NaN. e4m3_rne_satfinite rounds to nearest, ties to even,
// saturates finite and infinite magnitudes beyond 448 to +-448, keeps the sign of zero (-0 -> 0x80)
// and maps every NaN to 0x7F (as cvt.rn.satfinite.e4m3x2.f32 does). So an infinite input makes its
// block's codes 0x7F or zero and its scale infinite: the dequantized block is NaN, not silently finite.
//
// Error: e4m3 keeps 4 significant bits, so a normal value moves by at most half an ulp, at most
// 1/17 < 2^-4 of itself; a subnormal code by at most 2^-10. After scaling, for every element
//   |x - dequantize(quantize(x))| <= 2^-4 |x| + 2^-18 amax_block     (the 2^-18 covers 2^-10 / 448
// of the subnormal range and the float roundings of inv, the product and the scale), hence
//   |x - dequantize(quantize(x))| <= 2^-4 * amax_block,
// for blocks with amax >= 448 / FLT_MAX (about 1.3e-36); a block of only smaller values comes back
// as zeros.
#pragma once

#include <cstdint>

#include "src/core/tensor.h"

namespace switchyard {

constexpr int64_t kFp8BlockElements = 128;  // elements per scale
constexpr float kE4m3Max = 448.0f;          // largest finite e4m3 magnitude

inline int64_t fp8_block_count(int64_t width) { return (width + kFp8BlockElements - 1) / kFp8BlockElements; }
inline int64_t fp8_scale_offset(int64_t width) { return (width + 3) / 4 * 4; }
// Bytes of one packed row of `width` elements: codes, scales, zero padding to a multiple of 16.
inline int64_t fp8_row_bytes(int64_t width) {
  return (fp8_scale_offset(width) + 4 * fp8_block_count(width) + 15) / 16 * 16;
}

namespace cpu {
// rows [R, D] f32 or f64 -> packed u8 [R, fp8_row_bytes(D)].
void quantize_rows_fp8(const Tensor& rows, Tensor& packed);
// packed u8 [R, fp8_row_bytes(D)] -> rows [R, D] f32 or f64.
void dequantize_rows_fp8(const Tensor& packed, Tensor& rows);
// The scalar conversions both backends must agree on (see the top comment).
uint8_t e4m3_rne_satfinite(float value);
float e4m3_to_float(uint8_t code);  // exact; NaN for 0x7F / 0xFF
}  // namespace cpu

namespace cuda {
// rows [R, D] bf16, f16 or f32.
void quantize_rows_fp8(const Tensor& rows, Tensor& packed, void* stream);
void dequantize_rows_fp8(const Tensor& packed, Tensor& rows, void* stream);
}  // namespace cuda

}  // namespace switchyard
