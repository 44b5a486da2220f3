#include "src/core/cuda_check.h"

namespace switchyard {
const char* cublas_status_name(cublasStatus_t status) { return cublasGetStatusName(status); }
}  // namespace switchyard
