// Tensor: a non-owning view (pointer, dtype, shape, device). Row-major, contiguous.
// Ownership lives in Buffer (src/core/device.h) or in a per-step arena.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "src/core/dtype.h"
#include "src/core/error.h"

namespace switchyard {

enum class DeviceKind : uint8_t { cpu, cuda };
const char* device_kind_name(DeviceKind kind);

constexpr int kMaxTensorRank = 4;

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  DeviceKind device = DeviceKind::cpu;
  int rank = 0;
  std::array<int64_t, kMaxTensorRank> shape{};

  Tensor() = default;
  Tensor(void* data_, DType dtype_, DeviceKind device_, std::initializer_list<int64_t> dims)
      : data(data_), dtype(dtype_), device(device_) {
    SY_CHECK(dims.size() <= size_t(kMaxTensorRank), "tensor rank ", dims.size(), " > ", kMaxTensorRank);
    for (int64_t dim : dims) shape[rank++] = dim;
  }

  int64_t dim(int axis) const {
    SY_CHECK(axis >= 0 && axis < rank, "axis ", axis, " out of range for rank ", rank);
    return shape[axis];
  }
  int64_t numel() const {
    int64_t count = 1;
    for (int axis = 0; axis < rank; ++axis) count *= shape[axis];
    return count;
  }
  size_t bytes() const { return size_t(numel()) * dtype_size(dtype); }
  template <typename T>
  T* as() const { return static_cast<T*>(data); }
  bool defined() const { return data != nullptr || numel() == 0; }
  std::string describe() const;  // "bf16[4096, 768] on cuda"
};

}  // namespace switchyard
