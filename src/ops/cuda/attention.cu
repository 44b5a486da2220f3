// Causal multi-head self-attention core on CUDA (contract: src/ops/model_ops.h; reference:
// src/ops/cpu/attention.cpp). Two paths behind one interface:
//   * cuDNN's fused scaled-dot-product attention (src/ops/cuda/attention_cudnn.cu), taken for
//     bf16 / fp16, head_dim 64 or 128 on sm90 unless SWITCHYARD_ATTENTION=cublas (rules:
//     src/ops/cuda/attention_cudnn.h). It never materializes the [S, S] blocks.
//   * this file's cuBLAS batched GEMMs + fused causal softmax: every other case, and the fallback
//     (with a one-time warning) when a cuDNN plan does not build. Both save the same softmax_stats
//     (row logsumexp), so a forward on one path and a backward on the other agree.
//
// The cuBLAS path, per (sequence b, head h) pair, with q, k, v the [S, Dh] slices of qkv [T, 3D]
// (row stride 3D) and scale = 1 / sqrt(Dh):
//   forward   Z = scale q k^T (fp32)  ->  P = causal softmax(Z) (activation dtype), lse_i (fp32)
//             out = P v  (row stride D)
//   backward  Z again -> P from the saved lse;  dv = P^T dout;  dP = dout v^T (fp32);
//             D_i = dout_i . out_i;  dZ = P (dP - D_i) (into P's memory);
//             dq = scale dZ k;  dk = scale dZ^T q
// All GEMMs accumulate in fp32 (CUBLAS_COMPUTE_32F; no TF32 for fp32 inputs). The Z / dP block
// (fp32) and the P / dZ block (activation dtype) of `pairs_per_pass` pairs live in the caller's
// workspace (layout: attention_workspace_bytes in src/ops/model_ops.h); the pairs are processed
// pass by pass, as many per pass as the workspace holds.
//
// cuBLAS is column-major: a row-major [r, c] matrix with row stride ld is the column-major [c, r]
// matrix (its transpose) with leading dimension ld, so each row-major product C = A B is issued
// as C^T = B^T A^T. The slices of different pairs are not one stride apart (heads are Dh apart,
// sequences S * 3D), so the GEMMs use cublasGemmBatchedEx with device pointer tables, filled once
// per call by one small kernel. Only the causal half of Z is needed; the GEMMs compute all of it
// (the softmax ignores the rest), which costs FLOPs but keeps this path simple and exact.
#include <algorithm>
#include <cmath>

#include "src/ops/cuda/attention_cudnn.h"
#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Pointer tables in the workspace, each with one entry per (b, h) pair.
enum PointerTable : int {
  kTableQ = 0,
  kTableK,
  kTableV,
  kTableOut,
  kTableGradOut,
  kTableGradQ,
  kTableGradK,
  kTableGradV,
  kTableScores,
  kTableProbs,
  kNumTables
};
static_assert(kNumTables == 10, "attention_workspace_bytes (model_ops.h) reserves ten tables");

int64_t align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

struct Workspace {
  const void** tables;  // [kNumTables][pairs]
  float* row_stats;     // [pairs_per_pass, S]
  float* scores;        // [pairs_per_pass, S, S]
  void* probs;          // [pairs_per_pass, S, S] of the activation dtype
  int64_t pairs_per_pass;
};

Workspace carve_workspace(const char* op, const AttentionShape& shape, DType dtype, Tensor& workspace) {
  SY_CHECK_INPUT(workspace.device == DeviceKind::cuda && workspace.data != nullptr, op,
                 ": workspace must be device memory, got ", workspace.describe());
  const int64_t available = int64_t(workspace.bytes());
  const int64_t seq = shape.seq_len, element = int64_t(dtype_size(dtype));
  const int64_t fixed = align256(kNumTables * shape.pairs() * int64_t(sizeof(void*)));
  const int64_t per_pair = seq * 4 + seq * seq * (4 + element);
  int64_t pairs = std::min(shape.pairs(), std::max<int64_t>(0, (available - fixed) / per_pair));
  while (pairs > 0 && attention_workspace_bytes(shape, dtype, pairs) > available) --pairs;
  SY_CHECK_INPUT(pairs >= 1, op, ": workspace of ", available, " bytes is too small; one pair per pass needs ",
                 attention_workspace_bytes(shape, dtype, 1), " (attention_workspace_bytes)");
  unsigned char* base = static_cast<unsigned char*>(workspace.data);
  SY_CHECK_INPUT(is_aligned(base, 256), op, ": workspace must be 256-byte aligned");
  Workspace carved;
  carved.tables = reinterpret_cast<const void**>(base);
  base += fixed;
  carved.row_stats = reinterpret_cast<float*>(base);
  base += align256(pairs * seq * 4);
  carved.scores = reinterpret_cast<float*>(base);
  base += align256(pairs * seq * seq * 4);
  carved.probs = base;
  carved.pairs_per_pass = pairs;
  return carved;
}

struct PointerBases {
  const unsigned char* qkv;
  const unsigned char* out;
  const unsigned char* grad_out;
  unsigned char* grad_qkv;
  unsigned char* scores;
  unsigned char* probs;
};

// Entry p of every table: the [S, Dh] slices of pair p = b * H + h and the score / probability
// blocks of its slot p % pairs_per_pass. Byte offsets, so one kernel serves every dtype.
__global__ void fill_tables_kernel(PointerBases bases, int64_t pairs, int64_t heads, int64_t seq_len, int64_t head_dim,
                                   int64_t element, int64_t probs_element, int64_t pairs_per_pass,
                                   const void** tables) {
  const int64_t pair = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pair >= pairs) return;
  const int64_t b = pair / heads, h = pair % heads, model_dim = heads * head_dim;
  const int64_t qkv_offset = (b * seq_len * 3 * model_dim + h * head_dim) * element;
  const int64_t out_offset = (b * seq_len * model_dim + h * head_dim) * element;
  const int64_t block = (pair % pairs_per_pass) * seq_len * seq_len;
  const void* entries[kNumTables] = {
      bases.qkv + qkv_offset,
      bases.qkv + qkv_offset + model_dim * element,
      bases.qkv + qkv_offset + 2 * model_dim * element,
      bases.out ? bases.out + out_offset : nullptr,
      bases.grad_out ? bases.grad_out + out_offset : nullptr,
      bases.grad_qkv ? bases.grad_qkv + qkv_offset : nullptr,
      bases.grad_qkv ? bases.grad_qkv + qkv_offset + model_dim * element : nullptr,
      bases.grad_qkv ? bases.grad_qkv + qkv_offset + 2 * model_dim * element : nullptr,
      bases.scores + block * 4,
      bases.probs + block * probs_element,
  };
#pragma unroll
  for (int table = 0; table < kNumTables; ++table) tables[table * pairs + pair] = entries[table];
}

// Forward softmax: one warp per query row i of a pair in the pass. Reads Z[i, 0..i], writes
// P[i, :] (zeros above the diagonal, so the P v GEMM needs no mask) and lse_i.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    causal_softmax_kernel(const float* __restrict__ scores, int64_t rows, int64_t seq_len, T* __restrict__ probs,
                          float* __restrict__ lse_out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = int64_t(gridDim.x) * kWarps;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows; row += warps_total) {
    const int64_t query = row % seq_len;
    const float* z = scores + row * seq_len;
    float running_max = -INFINITY, running_sum = 0.0f;
    for (int64_t key = lane; key <= query; key += 32) {  // online max and sum per lane
      const float value = z[key];
      const float new_max = fmaxf(running_max, value);
      running_sum = running_sum * __expf(running_max - new_max) + __expf(value - new_max);
      running_max = new_max;
    }
    const float row_max = group_max<32>(running_max);
    float scaled = running_max == -INFINITY ? 0.0f : running_sum * __expf(running_max - row_max);
    const float lse = row_max + logf(group_sum<32>(scaled));
    T* p = probs + row * seq_len;
    for (int64_t key = lane; key < seq_len; key += 32)
      p[key] = from_float<T>(key <= query ? __expf(z[key] - lse) : 0.0f);
    if (lane == 0) lse_out[row] = lse;
  }
}

// Backward, step 1: P[i, j] = exp(Z[i, j] - lse_i) for j <= i, else 0.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    recompute_probs_kernel(const float* __restrict__ scores, const float* __restrict__ lse, int64_t rows,
                           int64_t seq_len, T* __restrict__ probs) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = int64_t(gridDim.x) * kWarps;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows; row += warps_total) {
    const int64_t query = row % seq_len;
    const float row_lse = lse[row];
    for (int64_t key = lane; key < seq_len; key += 32)
      probs[row * seq_len + key] = from_float<T>(key <= query ? __expf(scores[row * seq_len + key] - row_lse) : 0.0f);
  }
}

// Backward, step 2: D_i = dout_i . out_i for each query row of the pass's pairs (one warp per row).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_dot_kernel(const T* __restrict__ out, const T* __restrict__ grad_out, int64_t first_pair, int64_t rows,
                   int64_t seq_len, int64_t heads, int64_t head_dim, float* __restrict__ row_stats) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = int64_t(gridDim.x) * kWarps;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows; row += warps_total) {
    const int64_t pair = first_pair + row / seq_len, query = row % seq_len;
    const int64_t b = pair / heads, h = pair % heads;
    const int64_t offset = (b * seq_len + query) * heads * head_dim + h * head_dim;
    float sum = 0.0f;
    for (int64_t d = lane; d < head_dim; d += 32)
      sum = fmaf(to_float(out[offset + d]), to_float(grad_out[offset + d]), sum);
    sum = warp_sum(sum);
    if (lane == 0) row_stats[row] = sum;
  }
}

// Backward, step 3: dZ[i, j] = P[i, j] (dP[i, j] - D_i) for j <= i, else 0; written over P.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    softmax_backward_kernel(const float* __restrict__ grad_probs, const float* __restrict__ row_stats, int64_t rows,
                            int64_t seq_len, T* probs_and_grad) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = int64_t(gridDim.x) * kWarps;
  for (int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows; row += warps_total) {
    const int64_t query = row % seq_len;
    const float dot = row_stats[row];
    for (int64_t key = lane; key < seq_len; key += 32) {
      const int64_t index = row * seq_len + key;
      const float value = key <= query ? to_float(probs_and_grad[index]) * (grad_probs[index] - dot) : 0.0f;
      probs_and_grad[index] = from_float<T>(value);
    }
  }
}

cudaDataType_t data_type(DType dtype) {
  switch (dtype) {
    case DType::bf16:
      return CUDA_R_16BF;
    case DType::f16:
      return CUDA_R_16F;
    default:
      return CUDA_R_32F;
  }
}

// One batched GEMM over `count` pairs starting at `first`: C = alpha op(A) op(B), column-major
// (see the top comment for how each row-major product maps onto this).
struct BatchedGemm {
  cublasHandle_t handle;
  const void** tables;
  int64_t pairs;
  cudaDataType_t activation;

  void run(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, PointerTable a, int64_t lda,
           PointerTable b, int64_t ldb, PointerTable c, cudaDataType_t c_type, int64_t ldc, int64_t first,
           int64_t count) const {
    const float beta = 0.0f;
    CUBLAS_CHECK(cublasGemmBatchedEx(handle, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                     int(m), int(n), int(k), &alpha, tables + a * pairs + first, activation, int(lda),
                                     tables + b * pairs + first, activation, int(ldb), &beta,
                                     const_cast<void* const*>(tables + c * pairs + first), c_type, int(ldc), int(count),
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
};

unsigned row_blocks(int64_t rows) { return grid_for(rows, kWarps, int64_t(multiprocessor_count()) * 32); }

void check_common(const char* op, const AttentionShape& shape, const Tensor& qkv) {
  SY_CHECK_INPUT(shape.batch >= 0 && shape.seq_len >= 1 && shape.heads >= 1 && shape.head_dim >= 1, op,
                 ": need seq_len, heads and head_dim >= 1, got B=", shape.batch, " S=", shape.seq_len,
                 " H=", shape.heads, " Dh=", shape.head_dim);
  SY_CHECK_INPUT(shape.seq_len * shape.seq_len < (int64_t(1) << 31) && 3 * shape.model_dim() < (int64_t(1) << 31), op,
                 ": shape exceeds the int32 sizes cuBLAS takes");
  SY_CHECK_INPUT(is_activation_dtype(qkv.dtype), op, ": qkv must be bf16/fp16/fp32, got ", qkv.describe());
  check_tensor(qkv, op, qkv.dtype, {shape.tokens(), 3 * shape.model_dim()});
}

void fill_tables(const AttentionShape& shape, DType dtype, const Workspace& workspace, const PointerBases& bases,
                 cudaStream_t stream) {
  const int64_t pairs = shape.pairs(), element = int64_t(dtype_size(dtype));
  fill_tables_kernel<<<grid_for(pairs, 128), 128, 0, stream>>>(bases, pairs, shape.heads, shape.seq_len, shape.head_dim,
                                                               element, element, workspace.pairs_per_pass,
                                                               workspace.tables);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

namespace cuda {

void attention_forward(const AttentionShape& shape, const Tensor& qkv, Tensor& out, Tensor& softmax_stats,
                       Tensor& workspace, void* stream) {
  const char* op = "attention_forward";
  check_common(op, shape, qkv);
  check_tensor(out, "attention_forward: out", qkv.dtype, {shape.tokens(), shape.model_dim()});
  check_tensor(softmax_stats, "attention_forward: softmax_stats", DType::f32,
               {shape.batch, shape.heads, shape.seq_len});
  if (shape.pairs() == 0) return;
  if (cuda_detail::cudnn_attention_forward(shape, qkv, out, softmax_stats, workspace, stream)) return;
  cudaStream_t cuda_stream = as_stream(stream);
  const Workspace space = carve_workspace(op, shape, qkv.dtype, workspace);
  PointerBases bases{
      static_cast<const unsigned char*>(qkv.data),    static_cast<const unsigned char*>(out.data), nullptr, nullptr,
      reinterpret_cast<unsigned char*>(space.scores), static_cast<unsigned char*>(space.probs)};
  fill_tables(shape, qkv.dtype, space, bases, cuda_stream);

  const int64_t seq = shape.seq_len, head_dim = shape.head_dim, model_dim = shape.model_dim();
  const float scale = float(1.0 / std::sqrt(double(head_dim)));
  const BatchedGemm gemm{cublas_handle(cuda_stream), space.tables, shape.pairs(), data_type(qkv.dtype)};
  dispatch_activation_dtype(qkv.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t first = 0; first < shape.pairs(); first += space.pairs_per_pass) {
      const int64_t count = std::min(space.pairs_per_pass, shape.pairs() - first);
      // Z^T = k q^T (column-major [S keys, S queries]) = row-major Z [query, key]
      gemm.run(true, false, seq, seq, head_dim, scale, kTableK, 3 * model_dim, kTableQ, 3 * model_dim, kTableScores,
               CUDA_R_32F, seq, first, count);
      const int64_t rows = count * seq;
      causal_softmax_kernel<T><<<row_blocks(rows), kThreads, 0, cuda_stream>>>(
          space.scores, rows, seq, static_cast<T*>(space.probs), softmax_stats.as<float>() + first * seq);
      CUDA_CHECK_LAUNCH();
      // out^T = v^T P^T
      gemm.run(false, false, head_dim, seq, seq, 1.0f, kTableV, 3 * model_dim, kTableProbs, seq, kTableOut,
               data_type(qkv.dtype), model_dim, first, count);
    }
  });
}

void attention_backward(const AttentionShape& shape, const Tensor& qkv, const Tensor& out, const Tensor& grad_out,
                        const Tensor& softmax_stats, Tensor& workspace, Tensor& grad_qkv, bool deterministic,
                        void* stream) {
  const char* op = "attention_backward";
  check_common(op, shape, qkv);
  check_tensor(out, "attention_backward: out", qkv.dtype, {shape.tokens(), shape.model_dim()});
  check_tensor(grad_out, "attention_backward: grad_out", qkv.dtype, {shape.tokens(), shape.model_dim()});
  check_tensor(softmax_stats, "attention_backward: softmax_stats", DType::f32,
               {shape.batch, shape.heads, shape.seq_len});
  check_tensor(grad_qkv, "attention_backward: grad_qkv", qkv.dtype, {shape.tokens(), 3 * shape.model_dim()});
  if (shape.pairs() == 0) return;
  if (cuda_detail::cudnn_attention_backward(shape, qkv, out, grad_out, softmax_stats, workspace, grad_qkv,
                                            deterministic, stream))
    return;
  cudaStream_t cuda_stream = as_stream(stream);
  const Workspace space = carve_workspace(op, shape, qkv.dtype, workspace);
  PointerBases bases{static_cast<const unsigned char*>(qkv.data),      static_cast<const unsigned char*>(out.data),
                     static_cast<const unsigned char*>(grad_out.data), static_cast<unsigned char*>(grad_qkv.data),
                     reinterpret_cast<unsigned char*>(space.scores),   static_cast<unsigned char*>(space.probs)};
  fill_tables(shape, qkv.dtype, space, bases, cuda_stream);

  const int64_t seq = shape.seq_len, head_dim = shape.head_dim, model_dim = shape.model_dim();
  const float scale = float(1.0 / std::sqrt(double(head_dim)));
  const cudaDataType_t activation = data_type(qkv.dtype);
  const BatchedGemm gemm{cublas_handle(cuda_stream), space.tables, shape.pairs(), activation};
  dispatch_activation_dtype(qkv.dtype, op, [&](auto tag) {
    using T = decltype(tag);
    T* probs = static_cast<T*>(space.probs);
    for (int64_t first = 0; first < shape.pairs(); first += space.pairs_per_pass) {
      const int64_t count = std::min(space.pairs_per_pass, shape.pairs() - first);
      const int64_t rows = count * seq;
      gemm.run(true, false, seq, seq, head_dim, scale, kTableK, 3 * model_dim, kTableQ, 3 * model_dim, kTableScores,
               CUDA_R_32F, seq, first, count);
      recompute_probs_kernel<T><<<row_blocks(rows), kThreads, 0, cuda_stream>>>(
          space.scores, softmax_stats.as<float>() + first * seq, rows, seq, probs);
      CUDA_CHECK_LAUNCH();
      row_dot_kernel<T><<<row_blocks(rows), kThreads, 0, cuda_stream>>>(out.as<T>(), grad_out.as<T>(), first, rows, seq,
                                                                        shape.heads, head_dim, space.row_stats);
      CUDA_CHECK_LAUNCH();
      // dv^T = dout^T P   (P stored as P^T column-major, hence op T)
      gemm.run(false, true, head_dim, seq, seq, 1.0f, kTableGradOut, model_dim, kTableProbs, seq, kTableGradV,
               activation, 3 * model_dim, first, count);
      // dP^T = v dout^T  (column-major [keys, queries] = row-major dP [query, key]), fp32 over Z
      gemm.run(true, false, seq, seq, head_dim, 1.0f, kTableV, 3 * model_dim, kTableGradOut, model_dim, kTableScores,
               CUDA_R_32F, seq, first, count);
      softmax_backward_kernel<T>
          <<<row_blocks(rows), kThreads, 0, cuda_stream>>>(space.scores, space.row_stats, rows, seq, probs);
      CUDA_CHECK_LAUNCH();
      // dq^T = scale k^T dZ^T;  dk^T = scale q^T dZ
      gemm.run(false, false, head_dim, seq, seq, scale, kTableK, 3 * model_dim, kTableProbs, seq, kTableGradQ,
               activation, 3 * model_dim, first, count);
      gemm.run(false, true, head_dim, seq, seq, scale, kTableQ, 3 * model_dim, kTableProbs, seq, kTableGradK,
               activation, 3 * model_dim, first, count);
    }
  });
}

}  // namespace cuda
}  // namespace switchyard
