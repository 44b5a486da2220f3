// Dense GEMM, row-major: C[M, N] = alpha * op(A)[M, K] * op(B)[K, N] + beta * Z, where Z is
// `addend` when given (C's shape and dtype; it may be C itself), else C. op(X) = X^T when trans_x.
// With beta == 0, Z is not read. A separate addend saves a copy where the sum goes elsewhere than
// its addend (a residual: x_out = x + h W). CPU: float32/float64 tensors, accumulation in double.
// CUDA: cuBLASLt; A and B bf16 or fp16 (or both fp32), C fp32, bf16 or fp16; fp32 accumulation.
// Callers use ops::gemm (src/ops/ops.h; dispatch in src/ops/dispatch_model.cpp).
#pragma once

#include "src/core/tensor.h"

namespace switchyard {
namespace cpu {
void gemm(bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b, float beta, Tensor& c,
          const Tensor* addend = nullptr);
}
namespace cuda {
void gemm(bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b, float beta, Tensor& c,
          const Tensor* addend, void* stream);
}
}  // namespace switchyard
