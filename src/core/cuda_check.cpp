#include "src/core/cuda_check.h"

#include <map>
#include <mutex>

namespace switchyard {

const char* cublas_status_name(cublasStatus_t status) { return cublasGetStatusName(status); }

cudaDataType_t cuda_data_type_of(DType dtype, const char* who) {
  switch (dtype) {
    case DType::f32: return CUDA_R_32F;
    case DType::f64: return CUDA_R_64F;
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    default: SY_THROW(who, ": no CUDA data type for ", dtype_name(dtype));
  }
}

cublasHandle_t thread_cublas_handle() {
  thread_local std::map<int, cublasHandle_t> handles;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  auto found = handles.find(device);
  if (found != handles.end()) return found->second;
  cublasHandle_t handle = nullptr;
  CUBLAS_CHECK(cublasCreate(&handle));
  handles[device] = handle;
  return handle;
}

namespace {
std::mutex& notes_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::map<int, std::function<std::string()>>& notes() {
  static std::map<int, std::function<std::string()>> registered;
  return registered;
}
}  // namespace

int add_cuda_error_note(std::function<std::string()> note) {
  std::lock_guard<std::mutex> lock(notes_mutex());
  static int next_id = 0;
  notes()[next_id] = std::move(note);
  return next_id++;
}

void remove_cuda_error_note(int id) {
  std::lock_guard<std::mutex> lock(notes_mutex());
  notes().erase(id);
}

std::string cuda_error_notes() noexcept {
  try {
    std::lock_guard<std::mutex> lock(notes_mutex());
    std::string text;
    for (const auto& entry : notes()) {
      std::string note = entry.second();
      if (!note.empty()) text += "; " + note;
    }
    return text;
  } catch (...) {
    return "";
  }
}

}  // namespace switchyard
