#include "src/core/tensor.h"

#include <sstream>

namespace switchyard {

const char* device_kind_name(DeviceKind kind) { return kind == DeviceKind::cpu ? "cpu" : "cuda"; }

std::string Tensor::describe() const {
  std::ostringstream stream;
  stream << dtype_name(dtype) << "[";
  for (int axis = 0; axis < rank; ++axis) stream << (axis ? ", " : "") << shape[axis];
  stream << "] on " << device_kind_name(device);
  return stream.str();
}

}  // namespace switchyard
