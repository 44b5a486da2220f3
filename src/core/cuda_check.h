// Check macros for CUDA runtime, cuBLAS, cuDNN and NCCL calls. Include only from CUDA-enabled
// code (files built when SWITCHYARD_WITH_CUDA is defined).
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <nccl.h>

#include <functional>
#include <string>

#include "src/core/dtype.h"
#include "src/core/error.h"

namespace switchyard {
const char* cublas_status_name(cublasStatus_t status);
// One cuBLAS handle per (thread, current device), created on first use, for the small level-1
// calls made from host code (add_into, gradient scaling); the kernels' GEMMs use per-stream handles
// (src/ops/cuda/cuda_common.cuh). Never destroyed: destruction at thread exit may run after the
// CUDA context is gone.
cublasHandle_t thread_cublas_handle();
// The CUDA data type of f32, f64, bf16 or f16 (others: SY_THROW naming `who`).
cudaDataType_t cuda_data_type_of(DType dtype, const char* who);
// Notes appended to every CUDA error message: a component whose device-side failure makes CUDA
// calls fail (a trap in a wait kernel, say) registers a function returning "" or a sentence that
// explains it. add returns an id for remove; both thread-safe.
int add_cuda_error_note(std::function<std::string()> note);
void remove_cuda_error_note(int id);
std::string cuda_error_notes() noexcept;  // "; note; note" or ""
}

#define CUDA_CHECK(call)                                                                   \
  do {                                                                                     \
    cudaError_t sy_status_ = (call);                                                       \
    if (sy_status_ != cudaSuccess)                                                         \
      SY_THROW("CUDA error ", cudaGetErrorName(sy_status_), " (", cudaGetErrorString(sy_status_), \
               ") in ", #call, ::switchyard::cuda_error_notes());                          \
  } while (0)
// After a kernel launch: launch-configuration errors surface here, execution errors later.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
#define CUBLAS_CHECK(call)                                                                 \
  do {                                                                                     \
    cublasStatus_t sy_status_ = (call);                                                    \
    if (sy_status_ != CUBLAS_STATUS_SUCCESS)                                               \
      SY_THROW("cuBLAS error ", ::switchyard::cublas_status_name(sy_status_), " in ", #call); \
  } while (0)
#define CUDNN_CHECK(call)                                                                  \
  do {                                                                                     \
    cudnnStatus_t sy_status_ = (call);                                                     \
    if (sy_status_ != CUDNN_STATUS_SUCCESS)                                                \
      SY_THROW("cuDNN error ", cudnnGetErrorString(sy_status_), " in ", #call);           \
  } while (0)
#define NCCL_CHECK(call)                                                                   \
  do {                                                                                     \
    ncclResult_t sy_status_ = (call);                                                      \
    if (sy_status_ != ncclSuccess && sy_status_ != ncclInProgress)                         \
      SY_THROW("NCCL error ", ncclGetErrorString(sy_status_), " in ", #call);             \
  } while (0)
