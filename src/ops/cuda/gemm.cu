// Dense GEMM on CUDA through cuBLASLt (contract: src/ops/gemm.h).
//
//   C[M, N] = alpha * op(A)[M, K] * op(B)[K, N] + beta * Z, all row-major; op(X) = X^T if trans_x;
//   Z = the addend when given (C's type and shape; Lt's C operand, with our C as its D), else C.
//   A, B: bf16 or fp16 (C of the same type or fp32), or both fp32 (C fp32); fp32 accumulation.
//
// cuBLASLt is column-major. A row-major [r, c] matrix is the column-major [c, r] matrix X^T, so
// the call computes C^T = op(B)^T * op(A)^T: Lt's "A" is our B (rows N), Lt's "B" is our A, Lt's
// C/D is our C seen as a column-major [N, M] matrix with leading dimension N.
// The Lt handle (per device) and a 32 MiB workspace (per device and stream, cuda_common.cuh) are
// created once; descriptors and the heuristic's algorithm are cached per shape, transposes, types
// and pointer alignments (the heuristic's choice is only valid for the alignments it was told; C's
// is the smaller of the addend's and the output's, and the plan serves both as Lt's C and D),
// so a training step makes no heuristic query after its first iteration. cublasGemmEx, with the
// same column-major view, covers k = 0 and any shape the Lt heuristic has no algorithm for (with
// a separate addend it first copies the addend into C, since cublasGemmEx has one C).
#include <algorithm>
#include <climits>
#include <map>
#include <mutex>
#include <tuple>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/gemm.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

cudaDataType_t cuda_data_type(DType dtype) {
  switch (dtype) {
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    case DType::f32: return CUDA_R_32F;
    default: SY_BAD_INPUT("gemm: unsupported dtype ", dtype_name(dtype));
  }
}

// Largest power of two (<= 256) that divides the address: what the heuristic may assume.
int pointer_alignment(const void* pointer) {
  uintptr_t address = reinterpret_cast<uintptr_t>(pointer);
  int alignment = 256;
  while (alignment > 1 && address % uintptr_t(alignment) != 0) alignment /= 2;
  return alignment;
}

struct PlanKey {
  int device;
  int64_t m, n, k;  // Lt's dimensions (m = our N, n = our M)
  bool transpose_lt_a, transpose_lt_b;
  DType input, output;
  int align_a, align_b, align_c;
  bool operator<(const PlanKey& other) const {
    return std::tie(device, m, n, k, transpose_lt_a, transpose_lt_b, input, output, align_a, align_b, align_c) <
           std::tie(other.device, other.m, other.n, other.k, other.transpose_lt_a, other.transpose_lt_b, other.input,
                    other.output, other.align_a, other.align_b, other.align_c);
  }
};

struct Plan {
  cublasLtMatmulDesc_t operation = nullptr;
  cublasLtMatrixLayout_t layout_a = nullptr, layout_b = nullptr, layout_c = nullptr;
  cublasLtMatmulAlgo_t algorithm{};
  bool use_lt = true;  // false: cuBLASLt offered no algorithm (odd leading dimensions); use cublasGemmEx
};

struct PlanCache {
  std::mutex mutex;
  std::map<PlanKey, Plan> plans;  // never freed: descriptors are tiny and shapes are few
};

PlanCache& plan_cache() {
  static PlanCache* cache = new PlanCache();
  return *cache;
}

const Plan& plan_for(const PlanKey& key, cublasLtHandle_t handle) {
  PlanCache& cache = plan_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  auto found = cache.plans.find(key);
  if (found != cache.plans.end()) return found->second;

  Plan plan;
  const cudaDataType_t input = cuda_data_type(key.input), output = cuda_data_type(key.output);
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.operation, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = key.transpose_lt_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = key.transpose_lt_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.operation, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.operation, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  // Stored shapes (before the op): Lt A is [m, k] or, transposed, [k, m]; Lt B is [k, n] or [n, k].
  const uint64_t a_rows = key.transpose_lt_a ? key.k : key.m, a_cols = key.transpose_lt_a ? key.m : key.k;
  const uint64_t b_rows = key.transpose_lt_b ? key.n : key.k, b_cols = key.transpose_lt_b ? key.k : key.n;
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.layout_a, input, a_rows, a_cols, int64_t(a_rows)));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.layout_b, input, b_rows, b_cols, int64_t(b_rows)));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.layout_c, output, key.m, key.n, key.m));

  cublasLtMatmulPreference_t preference = nullptr;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
  const uint64_t workspace_bytes = kGemmWorkspaceBytes;
  const uint32_t align_a = uint32_t(key.align_a), align_b = uint32_t(key.align_b), align_c = uint32_t(key.align_c);
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &workspace_bytes, sizeof(workspace_bytes)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                                    sizeof(align_a)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                                    sizeof(align_b)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                                    sizeof(align_c)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                                                    sizeof(align_c)));
  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, plan.operation, plan.layout_a, plan.layout_b,
                                                         plan.layout_c, plan.layout_c, preference, 1, &result,
                                                         &returned);
  cublasLtMatmulPreferenceDestroy(preference);
  if (status == CUBLAS_STATUS_SUCCESS && returned > 0) {
    plan.algorithm = result.algo;
  } else if (status == CUBLAS_STATUS_SUCCESS || status == CUBLAS_STATUS_NOT_SUPPORTED) {
    plan.use_lt = false;
  } else {
    CUBLAS_CHECK(status);
  }
  return cache.plans.emplace(key, plan).first->second;
}

}  // namespace

namespace cuda {

void gemm(bool trans_a, bool trans_b, float alpha, const Tensor& a, const Tensor& b, float beta, Tensor& c,
          const Tensor* addend, void* stream) {
  SY_CHECK(a.rank == 2 && b.rank == 2 && c.rank == 2, "gemm: a, b and c must be matrices, got ", a.describe(),
                 ", ", b.describe(), ", ", c.describe());
  const int64_t rows = trans_a ? a.dim(1) : a.dim(0), inner = trans_a ? a.dim(0) : a.dim(1);
  const int64_t columns = trans_b ? b.dim(0) : b.dim(1), inner_b = trans_b ? b.dim(1) : b.dim(0);
  SY_CHECK(inner == inner_b, "gemm: inner dimensions differ: op(a) ", a.describe(), (trans_a ? " (T)" : ""),
                 ", op(b) ", b.describe(), (trans_b ? " (T)" : ""));
  SY_CHECK(a.dtype == b.dtype, "gemm: a and b must have one dtype, got ", a.describe(), " and ", b.describe());
  const DType input = a.dtype, output = c.dtype;
  const bool supported = (input == DType::f32 && output == DType::f32) ||
                         ((input == DType::bf16 || input == DType::f16) && (output == input || output == DType::f32));
  SY_CHECK_INPUT(supported, "gemm: unsupported types ", dtype_name(input), " x ", dtype_name(input), " -> ",
                 dtype_name(output), " (bf16/fp16 inputs give the same type or fp32; fp32 inputs give fp32)");
  check_tensor(a, "gemm: a", input, {a.dim(0), a.dim(1)});
  check_tensor(b, "gemm: b", input, {b.dim(0), b.dim(1)});
  check_tensor(c, "gemm: c", output, {rows, columns});
  if (addend != nullptr) check_tensor(*addend, "gemm: addend", output, {rows, columns});
  if (rows == 0 || columns == 0) return;
  // Z: what beta scales (not read when beta is 0).
  const void* addend_data = addend != nullptr && beta != 0.0f ? addend->data : c.data;

  cudaStream_t cuda_stream = as_stream(stream);
  // The same product through cublasGemmEx (column-major view as above), for what Lt does not take:
  // k = 0 (C = beta C) and shapes its heuristic has no algorithm for.
  auto gemm_ex = [&]() {
    SY_CHECK(rows <= INT32_MAX && columns <= INT32_MAX && inner <= INT32_MAX, "gemm: dimensions exceed int32");
    if (addend_data != c.data)
      CUDA_CHECK(cudaMemcpyAsync(c.data, addend_data, size_t(rows * columns) * dtype_size(output),
                                 cudaMemcpyDeviceToDevice, cuda_stream));
    const int m = int(columns), n = int(rows), k = int(inner);
    CUBLAS_CHECK(cublasGemmEx(cublas_handle(cuda_stream), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                              trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k, &alpha, b.data, cuda_data_type(input),
                              std::max(1, trans_b ? k : m), a.data, cuda_data_type(input), std::max(1, trans_a ? n : k),
                              &beta, c.data, cuda_data_type(output), m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  };
  if (inner == 0) {
    gemm_ex();
    return;
  }

  PlanKey key{};
  key.device = current_device();
  key.m = columns;
  key.n = rows;
  key.k = inner;
  key.transpose_lt_a = trans_b;  // see the top comment
  key.transpose_lt_b = trans_a;
  key.input = input;
  key.output = output;
  key.align_a = pointer_alignment(b.data);
  key.align_b = pointer_alignment(a.data);
  key.align_c = std::min(pointer_alignment(c.data), pointer_alignment(addend_data));
  cublasLtHandle_t handle = cublaslt_handle();
  const Plan& plan = plan_for(key, handle);
  if (!plan.use_lt) {
    gemm_ex();
    return;
  }
  CUBLAS_CHECK(cublasLtMatmul(handle, plan.operation, &alpha, b.data, plan.layout_a, a.data, plan.layout_b, &beta,
                              addend_data, plan.layout_c, c.data, plan.layout_c, &plan.algorithm,
                              gemm_workspace(cuda_stream), kGemmWorkspaceBytes, cuda_stream));
}

}  // namespace cuda
}  // namespace switchyard
