// Elementwise memory helpers the model needs next to the MoE ops; callers use ops::convert and
// ops::add_into (src/ops/ops.h).
//   convert:  destination[i] = source[i] in destination's float type (f32, f64, bf16, f16;
//             rounding to nearest even, as the hardware does)
//   add_into: accumulator[i] += addend[i] (same float type)
// Tensors are contiguous; only element counts must match (shapes are views of the same data).
//
//   switchyard::cpu::NAME   src/ops/cpu/elementwise.cpp   reference; add_into sums in double and
//                                                         rounds once
//   CUDA                    src/ops/dispatch_memory.cpp   convert: cuda::apply_jitter with eps = 0
//                                                         (an exact multiply by 1); add_into:
//                                                         cublasAxpyEx, fp32 math (f64 in f64)
#pragma once

#include "src/core/tensor.h"

namespace switchyard {
namespace cpu {
// dtype conversion between any two of f32, f64, bf16, f16 (same element count).
void convert(const Tensor& source, Tensor& destination);
// accumulator += addend, same float dtype and element count (f32, f64, bf16, f16; math in double).
void add_into(const Tensor& addend, Tensor& accumulator);
}  // namespace cpu
}  // namespace switchyard
