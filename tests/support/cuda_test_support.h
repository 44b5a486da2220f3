// What the CUDA test files share: SKIP_WITHOUT_CUDA() and DeviceTensor, a CUDA tensor that owns
// its memory, for tests that compare CUDA ops with the CPU reference, with upload (converting host
// values to its dtype) and download.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "src/core/device.h"
#include "src/core/error.h"
#include "src/core/tensor.h"
#include "tests/support/test_helpers.h"

// Skips the test, with the reason, on a machine without a CUDA device (CI).
#define SKIP_WITHOUT_CUDA()                                  \
  do {                                                       \
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

namespace switchyard {
namespace testing {

// New memory is poisoned (0xFF bytes: NaN for floats, -1 for integers), so an output the op
// under test fails to write cannot pass by accident. At least 16 bytes are allocated, so even an
// empty tensor has a valid device pointer.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  DeviceTensor(DType dtype, std::initializer_list<int64_t> dims) : tensor_(nullptr, dtype, DeviceKind::cuda, dims) {
    allocate();
  }
  // The shape of `shape_of` (any device, any dtype) with `dtype`.
  DeviceTensor(DType dtype, const Tensor& shape_of) : tensor_(shape_of) {
    tensor_.dtype = dtype;
    tensor_.device = DeviceKind::cuda;
    allocate();
  }

  Tensor& tensor() { return tensor_; }
  const Tensor& tensor() const { return tensor_; }
  operator Tensor&() { return tensor_; }
  operator const Tensor&() const { return tensor_; }
  // The same memory under another dtype and shape (no larger than the allocation).
  Tensor view(DType dtype, std::initializer_list<int64_t> dims) const { return buffer_.view(dtype, dims); }

  void poison() { device_memset(buffer_.data(), DeviceKind::cuda, 0xFF, buffer_.bytes()); }

  // Host values, converted to this tensor's dtype when theirs differs (bytes copied as they are
  // when it matches). Element counts must agree; shapes need not.
  void upload(const Tensor& host) {
    SY_CHECK(host.numel() == tensor_.numel(), "upload of ", host.describe(), " into ", tensor_.describe());
    if (host.dtype == tensor_.dtype) {
      device_copy(tensor_.data, DeviceKind::cuda, host.data, DeviceKind::cpu, tensor_.bytes());
      return;
    }
    HostTensor converted(tensor_.dtype, {tensor_.numel()});
    copy_values(host, converted.tensor());
    device_copy(tensor_.data, DeviceKind::cuda, converted.tensor().data, DeviceKind::cpu, tensor_.bytes());
  }
  // The values in this tensor's dtype, as a flat host tensor.
  HostTensor download() const {
    HostTensor host(tensor_.dtype, {tensor_.numel()});
    device_copy(host.tensor().data, DeviceKind::cpu, tensor_.data, DeviceKind::cuda, tensor_.bytes());
    return host;
  }
  std::vector<uint8_t> bytes() const {
    std::vector<uint8_t> host(tensor_.bytes());
    device_copy(host.data(), DeviceKind::cpu, tensor_.data, DeviceKind::cuda, host.size());
    return host;
  }
  // Values as doubles, whatever the dtype.
  std::vector<double> values() const { return to_vector(download()); }

 private:
  void allocate() {
    buffer_ = Buffer(DeviceKind::cuda, std::max<size_t>(tensor_.bytes(), 16));
    tensor_.data = buffer_.data();
    poison();
  }

  Buffer buffer_;
  Tensor tensor_;
};

// A device copy of a host tensor with its shape, its values converted to `dtype`.
inline DeviceTensor to_device(const Tensor& host, DType dtype) {
  DeviceTensor device(dtype, host);
  device.upload(host);
  return device;
}

// A device copy of a host tensor with its shape and dtype.
inline DeviceTensor to_device(const Tensor& host) { return to_device(host, host.dtype); }

}  // namespace testing
}  // namespace switchyard
