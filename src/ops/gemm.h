// Dense GEMM, row-major: C[M, N] = alpha * op(A)[M, K] * op(B)[K, N] + beta * C.
// op(X) = X^T when trans_x. CPU: float32/float64 tensors, accumulation in double.
// CUDA: cuBLASLt; A and B bf16 or fp16 (or both fp32), C fp32, bf16 or fp16; fp32 accumulation.
// Callers use ops::gemm (src/ops/ops.h; dispatch in src/ops/dispatch_model.cpp).
#pragma once

#include "src/core/tensor.h"

namespace switchyard {
namespace cpu {
void gemm(bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b, float beta, Tensor& c);
}
namespace cuda {
void gemm(bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b, float beta, Tensor& c,
          void* stream);
}
}  // namespace switchyard
