#include "src/core/cuda_check.h"

#include <map>
#include <mutex>

namespace switchyard {

const char* cublas_status_name(cublasStatus_t status) { return cublasGetStatusName(status); }

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
