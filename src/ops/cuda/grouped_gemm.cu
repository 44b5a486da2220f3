// Grouped expert GEMMs over the padded expert-contiguous layout, cuBLAS path
// (semantics: src/ops/moe_ops.h and src/ops/cpu/grouped_gemm.cpp).
//
//   grouped_gemm:             C[r, :] = A[r, :] * op(B_e) for r in [offsets[e], offsets[e+1]);
//                             A [R, Kdim], B [E, Kdim, N] (trans_b: [E, N, Kdim]), C [R, N];
//                             rows at or past offsets[E] are written as zero.
//   grouped_gemm_weight_grad: dB_e = A_e^T G_e over the rows of segment e; A [R, M], G [R, N],
//                             dB [E, M, N], overwritten (experts without rows get dB_e = 0); with
//                             accumulate dB_e += A_e^T G_e (experts without rows keep dB_e; the
//                             sm_90a kernel adds in its epilogue, the cuBLAS loop uses beta 1).
// A, B, G bf16 or fp16; C / dB of that type or fp32; fp32 accumulation. Row-major throughout.
//
// The offsets live on the device; this path copies them to pinned host memory (one small
// cudaMemcpyAsync and a stream sync: the only host sync in the MoE layer) and issues one
// cublasGemmEx per non-empty expert. Column-major view as in gemm.cu: a row-major [r, c] matrix is
// the column-major [c, r] matrix X^T, so C_e^T = op(B_e)^T A_e^T and dB_e^T = G_e^T A_e.
// This is the fallback; src/ops/cuda/sm90/grouped_gemm_sm90.* is the hand-written sm_90a kernel for the
// shapes it supports.
//
//   grouped_gemm_activation(_backward): expert GEMM 1 + activation and data grad 2 + activation
//                             backward, one sm_90a kernel each with the activation in the epilogue
//                             when fuses_expert_activation(); else grouped_gemm + activation kernel.
//                             SWITCHYARD_FUSED_ACTIVATION=0 forces the unfused pair (to compare).
#include <algorithm>
#include <vector>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/cuda/sm90/grouped_gemm_sm90.h"
#include "src/ops/moe_ops.h"
#include "src/core/switches.h"

namespace switchyard {
namespace {

// The sm_90a kernels need 128-row segments; SWITCHYARD_GROUPED_GEMM=cublas (switches().grouped_gemm)
// forces the cuBLAS loop (for comparison in benchmarks).
bool use_sm90(int segment_alignment) {
  return switches().grouped_gemm == GroupedGemmPath::automatic && segment_alignment > 0 &&
         segment_alignment % cuda::sm90::kRowAlignment == 0;
}

// Whether the fused epilogues may run for this alignment (the problem itself is checked by the
// sm90 *_supported functions). SWITCHYARD_FUSED_ACTIVATION=0 (switches().fused_activation) keeps
// the separate activation kernels.
bool fusion_enabled(int segment_alignment) {
  return switches().fused_activation && use_sm90(segment_alignment) &&
         cuda::sm90::default_options().variant == cuda::sm90::Variant::pipelined;
}

using namespace cuda_detail;

cudaDataType_t cuda_data_type(DType dtype) {
  switch (dtype) {
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    case DType::f32: return CUDA_R_32F;
    default: SY_BAD_INPUT("grouped_gemm: unsupported dtype ", dtype_name(dtype));
  }
}

void check_types(const char* op, DType input, DType output) {
  SY_CHECK_INPUT(input == DType::bf16 || input == DType::f16, op, ": inputs must be bf16 or fp16, got ",
                 dtype_name(input));
  SY_CHECK_INPUT(output == input || output == DType::f32, op, ": output must be ", dtype_name(input),
                 " or fp32, got ", dtype_name(output));
}

// The expert offsets on the host; checks offsets[0] == 0, non-decreasing, offsets[E] <= rows.
std::vector<int32_t> host_offsets(const char* op, const Tensor& expert_offsets, int64_t num_experts, int64_t rows,
                                  cudaStream_t stream) {
  check_tensor(expert_offsets, op, DType::i32, {num_experts + 1});
  const size_t bytes = size_t(num_experts + 1) * sizeof(int32_t);
  int32_t* staging = static_cast<int32_t*>(pinned_staging(stream, bytes));
  CUDA_CHECK(cudaMemcpyAsync(staging, expert_offsets.data, bytes, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<int32_t> offsets(staging, staging + num_experts + 1);
  SY_CHECK(offsets[0] == 0, op, ": expert_offsets[0] must be 0, got ", offsets[0]);
  for (int64_t expert = 0; expert < num_experts; ++expert)
    SY_CHECK(offsets[size_t(expert)] <= offsets[size_t(expert) + 1], op, ": expert_offsets decrease at expert ",
             expert);
  SY_CHECK(offsets[size_t(num_experts)] <= rows, op, ": the layout needs ", offsets[size_t(num_experts)],
           " rows, the operands have ", rows);
  return offsets;
}

// The sm_90a kernels' options from the switches, with the layout's padding marks (if any).
cuda::sm90::Options sm90_options(const Tensor* row_tokens, int64_t rows) {
  cuda::sm90::Options options = cuda::sm90::default_options();
  if (row_tokens != nullptr && options.skip_padding) {
    check_tensor(*row_tokens, "grouped_gemm: row_tokens", DType::i32, {rows});
    SY_CHECK(row_tokens->device == DeviceKind::cuda, "grouped_gemm: row_tokens must be on the GPU");
    options.row_tokens = row_tokens->as<const int>();
  }
  return options;
}

int checked_int(int64_t value, const char* what) {
  SY_CHECK(value <= int64_t(INT32_MAX), "grouped_gemm: ", what, " = ", value, " exceeds the cuBLAS int range");
  return int(value);
}

}  // namespace

namespace cuda {

void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c,
                  void* stream, int segment_alignment, const Tensor* row_tokens) {
  const char* op = "grouped_gemm";
  SY_CHECK(a.rank == 2 && b.rank == 3 && c.rank == 2, op, ": expected a [R, Kdim], b [E, ., .], c [R, N], got ",
                 a.describe(), ", ", b.describe(), ", ", c.describe());
  check_types(op, a.dtype, c.dtype);
  const int64_t rows = a.dim(0), inner = a.dim(1), num_experts = b.dim(0);
  const int64_t columns = trans_b ? b.dim(1) : b.dim(2);
  check_tensor(a, "grouped_gemm: a", a.dtype, {rows, inner});
  if (trans_b)
    check_tensor(b, "grouped_gemm: b (trans_b: [E, N, Kdim])", a.dtype, {num_experts, columns, inner});
  else
    check_tensor(b, "grouped_gemm: b ([E, Kdim, N])", a.dtype, {num_experts, inner, columns});
  check_tensor(c, "grouped_gemm: c", c.dtype, {rows, columns});
  if (use_sm90(segment_alignment) && sm90::supported(a, b, trans_b, expert_offsets, c))
    return sm90::grouped_gemm(a, b, trans_b, expert_offsets, c, sm90_options(row_tokens, rows), stream);
  cudaStream_t cuda_stream = as_stream(stream);
  const std::vector<int32_t> offsets =
      host_offsets("grouped_gemm: expert_offsets", expert_offsets, num_experts, rows, cuda_stream);
  if (columns == 0) return;

  const int n = checked_int(columns, "N"), k = checked_int(inner, "Kdim");
  const cudaDataType_t input_type = cuda_data_type(a.dtype), output_type = cuda_data_type(c.dtype);
  const size_t input_size = dtype_size(a.dtype), output_size = dtype_size(c.dtype);
  const float alpha = 1.0f, beta = 0.0f;
  cublasHandle_t handle = cublas_handle(cuda_stream);
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    const int64_t first = offsets[size_t(expert)], segment_rows = offsets[size_t(expert) + 1] - first;
    if (segment_rows == 0) continue;
    const char* b_expert = static_cast<const char*>(b.data) + size_t(expert) * size_t(inner * columns) * input_size;
    const char* a_segment = static_cast<const char*>(a.data) + size_t(first * inner) * input_size;
    char* c_segment = static_cast<char*>(c.data) + size_t(first * columns) * output_size;
    // C_e^T [N, m] = op(B_e)^T [N, Kdim] * A_e^T [Kdim, m]
    CUBLAS_CHECK(cublasGemmEx(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, n,
                              checked_int(segment_rows, "segment rows"), k, &alpha, b_expert, input_type,
                              trans_b ? std::max(k, 1) : n, a_segment, input_type, std::max(k, 1), &beta, c_segment,
                              output_type, n,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  const int64_t used_rows = offsets[size_t(num_experts)];
  if (used_rows < rows)
    CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(c.data) + size_t(used_rows * columns) * output_size, 0,
                               size_t((rows - used_rows) * columns) * output_size, cuda_stream));
}

void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b,
                              void* stream, int segment_alignment, const Tensor* row_tokens, bool accumulate) {
  const char* op = "grouped_gemm_weight_grad";
  SY_CHECK(a.rank == 2 && g.rank == 2 && grad_b.rank == 3, op,
                 ": expected a [R, M], g [R, N], grad_b [E, M, N], got ", a.describe(), ", ", g.describe(), ", ",
                 grad_b.describe());
  check_types(op, a.dtype, grad_b.dtype);
  const int64_t rows = a.dim(0), left = a.dim(1), right = g.dim(1), num_experts = grad_b.dim(0);
  check_tensor(a, "grouped_gemm_weight_grad: a", a.dtype, {rows, left});
  check_tensor(g, "grouped_gemm_weight_grad: g", a.dtype, {rows, right});
  check_tensor(grad_b, "grouped_gemm_weight_grad: grad_b", grad_b.dtype, {num_experts, left, right});
  if (use_sm90(segment_alignment) && sm90::weight_grad_supported(a, g, expert_offsets, grad_b)) {
    sm90::Options options = sm90_options(row_tokens, rows);
    options.accumulate = accumulate;
    // Accumulating, the TMA unit reduce-adds the tiles: the storer warps' read-add-write stalls
    // on each load (profiled: bench-1gpu's MoE backward 33.5 -> 46.2 ms through them). The direct
    // store (SWITCHYARD_SM90_STORE=direct) reduce-adds from registers (red.global.add): kept, for
    // comparison with its wider 128 x 256 tiles.
    if (accumulate && options.store == sm90::Store::warps) options.store = sm90::Store::tma;
    return sm90::grouped_gemm_weight_grad(a, g, expert_offsets, grad_b, options, stream);
  }
  cudaStream_t cuda_stream = as_stream(stream);
  const std::vector<int32_t> offsets =
      host_offsets("grouped_gemm_weight_grad: expert_offsets", expert_offsets, num_experts, rows, cuda_stream);
  if (left == 0 || right == 0) return;

  const int m = checked_int(left, "M"), n = checked_int(right, "N");
  const cudaDataType_t input_type = cuda_data_type(a.dtype), output_type = cuda_data_type(grad_b.dtype);
  const size_t input_size = dtype_size(a.dtype), output_size = dtype_size(grad_b.dtype);
  const size_t expert_bytes = size_t(left * right) * output_size;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  cublasHandle_t handle = cublas_handle(cuda_stream);
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    const int64_t first = offsets[size_t(expert)], segment_rows = offsets[size_t(expert) + 1] - first;
    char* grad_expert = static_cast<char*>(grad_b.data) + size_t(expert) * expert_bytes;
    if (segment_rows == 0) {
      if (!accumulate) CUDA_CHECK(cudaMemsetAsync(grad_expert, 0, expert_bytes, cuda_stream));
      continue;
    }
    const char* a_segment = static_cast<const char*>(a.data) + size_t(first * left) * input_size;
    const char* g_segment = static_cast<const char*>(g.data) + size_t(first * right) * input_size;
    // dB_e^T [N, M] = G_e^T [N, m] * A_e [m, M]
    CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, n, m, checked_int(segment_rows, "segment rows"),
                              &alpha, g_segment, input_type, n, a_segment, input_type, m, &beta, grad_expert,
                              output_type, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

void grouped_gemm_activation(ExpertActivation activation, const Tensor& a, const Tensor& w1,
                             const Tensor& expert_offsets, Tensor& pre, Tensor& post, bool keep_pre, void* stream,
                             int segment_alignment, const Tensor* row_tokens) {
  // pre is checked even when not kept: the unfused path needs it.
  if (fusion_enabled(segment_alignment) && sm90::activation_supported(activation, a, w1, expert_offsets, &pre, post))
    return sm90::grouped_gemm_activation(activation, a, w1, expert_offsets, keep_pre ? &pre : nullptr, post,
                                         sm90_options(row_tokens, a.dim(0)), stream);
  grouped_gemm(a, w1, false, expert_offsets, pre, stream, segment_alignment, row_tokens);
  activation_forward(activation, pre, post, stream);
}

void grouped_gemm_activation_backward(ExpertActivation activation, const Tensor& grad_out, const Tensor& w2,
                                      const Tensor& expert_offsets, const Tensor& pre, Tensor& grad_post,
                                      Tensor& grad_pre, void* stream, int segment_alignment,
                                      const Tensor* row_tokens) {
  // grad_post is checked even though the fused kernel does not touch it: the unfused path needs it.
  if (fusion_enabled(segment_alignment) && grad_post.rank == 2 && grad_out.rank == 2 && w2.rank == 3 &&
      grad_post.dim(0) == grad_out.dim(0) && grad_post.dim(1) == w2.dim(1) &&
      sm90::activation_backward_supported(activation, grad_out, w2, expert_offsets, pre, grad_pre))
    return sm90::grouped_gemm_activation_backward(activation, grad_out, w2, expert_offsets, pre, grad_pre,
                                                  sm90_options(row_tokens, grad_out.dim(0)), stream);
  grouped_gemm(grad_out, w2, true, expert_offsets, grad_post, stream, segment_alignment, row_tokens);
  activation_backward(activation, pre, grad_post, grad_pre, stream);
}

bool fuses_expert_activation(ExpertActivation activation, DType dtype, int64_t d_model, int64_t d_ff,
                             int segment_alignment) {
  const bool known = activation == ExpertActivation::gelu_tanh || activation == ExpertActivation::swiglu;
  const bool sizes = d_model > 0 && d_ff > 0 && d_model % sm90::kDimAlignment == 0 &&
                     d_ff % sm90::kDimAlignment == 0;
  return known && sizes && dtype == DType::bf16 && fusion_enabled(segment_alignment) && sm90::device_supported();
}

}  // namespace cuda
}  // namespace switchyard
