// CPU half of the device abstraction; CUDA calls are forwarded to cuda_device.cpp when built.
#include "src/core/device.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>

namespace switchyard {

#if defined(SWITCHYARD_WITH_CUDA)
// Implemented in src/core/cuda_device.cpp.
int cuda_device_count_impl();
void cuda_set_device_impl(int ordinal);
std::string cuda_device_pci_bus_id_impl(int ordinal);
void* cuda_allocate(size_t bytes);
void cuda_free(void* pointer, size_t bytes);
void cuda_copy(void* destination, const void* source, size_t bytes);
void cuda_memset(void* destination, int value, size_t bytes);
void cuda_synchronize();
AllocatorStats cuda_allocator_stats_impl();
DeviceMemoryInfo cuda_memory_info_impl();
#endif

namespace {
constexpr size_t kHostAlignment = 64;
[[noreturn, maybe_unused]] void no_cuda() { SY_THROW("this build of switchyard has no CUDA backend"); }
}  // namespace

int cuda_device_count() {
#if defined(SWITCHYARD_WITH_CUDA)
  static const int count = cuda_device_count_impl();
  return count;
#else
  return 0;
#endif
}
bool cuda_available() { return cuda_device_count() > 0; }

namespace {
std::atomic<bool> cross_process_waits{false};
}  // namespace
void note_cross_process_device_waits() { cross_process_waits.store(true); }
bool cross_process_device_waits() { return cross_process_waits.load(); }

void cuda_set_device(int ordinal) {
#if defined(SWITCHYARD_WITH_CUDA)
  cuda_set_device_impl(ordinal);
#else
  (void)ordinal;
  no_cuda();
#endif
}

std::string cuda_device_pci_bus_id(int ordinal) {
#if defined(SWITCHYARD_WITH_CUDA)
  return cuda_device_pci_bus_id_impl(ordinal);
#else
  (void)ordinal;
  no_cuda();
#endif
}

void* device_allocate(DeviceKind device, size_t bytes) {
  if (device == DeviceKind::cpu) {
    size_t rounded = (bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
    void* pointer = std::aligned_alloc(kHostAlignment, rounded ? rounded : kHostAlignment);
    if (!pointer) SY_THROW("host allocation of ", bytes, " bytes failed");
    return pointer;
  }
#if defined(SWITCHYARD_WITH_CUDA)
  return cuda_allocate(bytes);
#else
  no_cuda();
#endif
}

void device_free(DeviceKind device, void* pointer, size_t bytes) {
  if (device == DeviceKind::cpu) {
    std::free(pointer);
    return;
  }
#if defined(SWITCHYARD_WITH_CUDA)
  cuda_free(pointer, bytes);
#else
  (void)pointer;
  (void)bytes;
#endif
}

void device_copy(void* destination, DeviceKind destination_device, const void* source,
                 DeviceKind source_device, size_t bytes) {
  if (bytes == 0) return;
  if (destination_device == DeviceKind::cpu && source_device == DeviceKind::cpu) {
    std::memcpy(destination, source, bytes);
    return;
  }
#if defined(SWITCHYARD_WITH_CUDA)
  cuda_copy(destination, source, bytes);  // cudaMemcpyDefault: unified addressing knows the direction
#else
  no_cuda();
#endif
}

void device_memset(void* destination, DeviceKind device, int value, size_t bytes) {
  if (device == DeviceKind::cpu) {
    std::memset(destination, value, bytes);
    return;
  }
#if defined(SWITCHYARD_WITH_CUDA)
  cuda_memset(destination, value, bytes);
#else
  no_cuda();
#endif
}

void device_synchronize(DeviceKind device) {
#if defined(SWITCHYARD_WITH_CUDA)
  if (device == DeviceKind::cuda) cuda_synchronize();
#else
  (void)device;
#endif
}

AllocatorStats cuda_allocator_stats() {
#if defined(SWITCHYARD_WITH_CUDA)
  return cuda_allocator_stats_impl();
#else
  return {};
#endif
}

DeviceMemoryInfo cuda_memory_info() {
#if defined(SWITCHYARD_WITH_CUDA)
  return cuda_memory_info_impl();
#else
  return {};
#endif
}

}  // namespace switchyard
