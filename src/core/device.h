// Device abstraction: where memory lives and how to move it.
//
// CPU memory comes from aligned new; CUDA memory from a caching allocator (size-class free
// lists, never returned to the driver during a run) so the training step does no cudaMalloc
// after its first iteration. Buffer owns an allocation; Tensor views it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "src/core/tensor.h"

namespace switchyard {

// Number of visible CUDA devices; 0 when built without CUDA or when no driver/GPU is present.
int cuda_device_count();
bool cuda_available();
void cuda_set_device(int ordinal);
// The PCI bus id of CUDA device `ordinal` ("0000:1B:00.0"): what tells two processes' GPUs apart
// when each sees its own device 0.
std::string cuda_device_pci_bus_id(int ordinal);
// Whether this process may run GPU kernels that wait on other processes (NCCL collectives, the
// nvlink exchange's signals): noted by src/comm when it creates a CUDA communicator of more than
// one rank, never cleared. A kernel with grid-wide barriers (the router) then leaves SMs free for
// them, since its blocks must all be resident at once.
void note_cross_process_device_waits();
bool cross_process_device_waits();

void* device_allocate(DeviceKind device, size_t bytes);
void device_free(DeviceKind device, void* pointer, size_t bytes);
// Copies `bytes` between any two places (host<->device, device<->device); synchronous on CUDA
// with respect to the host (uses the default stream and waits).
void device_copy(void* destination, DeviceKind destination_device, const void* source,
                 DeviceKind source_device, size_t bytes);
void device_memset(void* destination, DeviceKind device, int value, size_t bytes);
void device_synchronize(DeviceKind device);

// Caching-allocator statistics (CUDA): bytes obtained from cudaMalloc and calls made.
struct AllocatorStats {
  size_t bytes_reserved = 0;
  size_t bytes_in_use = 0;
  int64_t driver_allocations = 0;
};
AllocatorStats cuda_allocator_stats();
// The current CUDA device's free and total memory (cudaMemGetInfo: every process on the device
// counts); zeros without CUDA.
struct DeviceMemoryInfo {
  size_t free_bytes = 0;
  size_t total_bytes = 0;
};
DeviceMemoryInfo cuda_memory_info();

// An owning allocation. Move-only.
class Buffer {
 public:
  Buffer() = default;
  Buffer(DeviceKind device, size_t bytes) : bytes_(bytes), device_(device) {
    pointer_ = bytes ? device_allocate(device, bytes) : nullptr;
  }
  ~Buffer() { reset(); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      reset();
      std::swap(pointer_, other.pointer_);
      std::swap(bytes_, other.bytes_);
      std::swap(device_, other.device_);
    }
    return *this;
  }
  void reset() {
    if (pointer_) device_free(device_, pointer_, bytes_);
    pointer_ = nullptr;
    bytes_ = 0;
  }
  void* data() const { return pointer_; }
  template <typename T>
  T* as() const { return static_cast<T*>(pointer_); }
  size_t bytes() const { return bytes_; }
  DeviceKind device() const { return device_; }
  Tensor view(DType dtype, std::initializer_list<int64_t> dims) const {
    Tensor tensor(pointer_, dtype, device_, dims);
    SY_CHECK(tensor.bytes() <= bytes_, "view ", tensor.describe(), " exceeds buffer of ", bytes_, " bytes");
    return tensor;
  }

 private:
  void* pointer_ = nullptr;
  size_t bytes_ = 0;
  DeviceKind device_ = DeviceKind::cpu;
};

}  // namespace switchyard
