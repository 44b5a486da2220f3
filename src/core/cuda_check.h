// Check macros for CUDA runtime, cuBLAS, cuDNN and NCCL calls. Include only from CUDA-enabled
// code (files built when SWITCHYARD_WITH_CUDA is defined).
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <nccl.h>

#include "src/core/error.h"

namespace switchyard {
const char* cublas_status_name(cublasStatus_t status);
}

#define CUDA_CHECK(call)                                                                   \
  do {                                                                                     \
    cudaError_t sy_status_ = (call);                                                       \
    if (sy_status_ != cudaSuccess)                                                         \
      SY_THROW("CUDA error ", cudaGetErrorName(sy_status_), " (", cudaGetErrorString(sy_status_), \
               ") in ", #call);                                                            \
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
