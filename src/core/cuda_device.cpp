// CUDA half of the device abstraction: device discovery and the caching allocator.
//
// The allocator rounds requests up to a size class (512 B granularity below 1 MiB, 2 MiB above)
// and keeps freed blocks in per-class free lists. Blocks go back to the driver only at exit, so
// after the first training step every allocation is served from the cache.
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "src/core/cuda_check.h"
#include "src/core/device.h"

namespace switchyard {

int cuda_device_count_impl() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {  // no driver or no device: the CPU backend runs
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

void cuda_set_device_impl(int ordinal) { CUDA_CHECK(cudaSetDevice(ordinal)); }

std::string cuda_device_pci_bus_id_impl(int ordinal) {
  char bus_id[64] = {};
  CUDA_CHECK(cudaDeviceGetPCIBusId(bus_id, int(sizeof(bus_id)), ordinal));
  return bus_id;
}

namespace {
size_t size_class(size_t bytes) {
  constexpr size_t kSmall = 512, kLarge = size_t(2) << 20, kSmallLimit = size_t(1) << 20;
  if (bytes == 0) bytes = 1;
  if (bytes < kSmallLimit) return (bytes + kSmall - 1) / kSmall * kSmall;
  return (bytes + kLarge - 1) / kLarge * kLarge;
}

struct CachingAllocator {
  std::mutex mutex;
  std::map<size_t, std::vector<void*>> free_blocks;  // size class -> blocks
  AllocatorStats stats;

  void* allocate(size_t bytes) {
    size_t rounded = size_class(bytes);
    std::lock_guard<std::mutex> lock(mutex);
    auto it = free_blocks.find(rounded);
    if (it != free_blocks.end() && !it->second.empty()) {
      void* pointer = it->second.back();
      it->second.pop_back();
      stats.bytes_in_use += rounded;
      return pointer;
    }
    void* pointer = nullptr;
    cudaError_t status = cudaMalloc(&pointer, rounded);
    if (status != cudaSuccess) {  // release the cache once and retry before giving up
      (void)cudaGetLastError();
      release_cached_locked();
      CUDA_CHECK(cudaMalloc(&pointer, rounded));
    }
    stats.bytes_reserved += rounded;
    stats.bytes_in_use += rounded;
    stats.driver_allocations += 1;
    return pointer;
  }

  void release(void* pointer, size_t bytes) {
    size_t rounded = size_class(bytes);
    std::lock_guard<std::mutex> lock(mutex);
    free_blocks[rounded].push_back(pointer);
    stats.bytes_in_use -= rounded;
  }

  void release_cached_locked() {
    for (auto& [size, blocks] : free_blocks) {
      for (void* pointer : blocks) {
        cudaFree(pointer);
        stats.bytes_reserved -= size;
      }
      blocks.clear();
    }
  }
};

CachingAllocator& allocator() {
  static CachingAllocator* instance = new CachingAllocator();  // never destroyed: frees at exit race the driver
  return *instance;
}
}  // namespace

void* cuda_allocate(size_t bytes) { return allocator().allocate(bytes); }
void cuda_free(void* pointer, size_t bytes) { allocator().release(pointer, bytes); }
void cuda_copy(void* destination, const void* source, size_t bytes) {
  CUDA_CHECK(cudaMemcpy(destination, source, bytes, cudaMemcpyDefault));
}
void cuda_memset(void* destination, int value, size_t bytes) {
  CUDA_CHECK(cudaMemset(destination, value, bytes));
  CUDA_CHECK(cudaDeviceSynchronize());
}
void cuda_synchronize() { CUDA_CHECK(cudaDeviceSynchronize()); }
AllocatorStats cuda_allocator_stats_impl() {
  std::lock_guard<std::mutex> lock(allocator().mutex);
  return allocator().stats;
}

DeviceMemoryInfo cuda_memory_info_impl() {
  DeviceMemoryInfo info;
  CUDA_CHECK(cudaMemGetInfo(&info.free_bytes, &info.total_bytes));
  return info;
}

}  // namespace switchyard
