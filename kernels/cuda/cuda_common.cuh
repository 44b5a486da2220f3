// Shared pieces of the CUDA kernels (included by kernels/cuda/*.cu only).
//
// Host side: tensor checks, launch-size helpers, and per-(device, stream) resources that must not
// be created per call: a cuBLAS handle bound to a 32 MiB workspace (shared by cuBLAS and cuBLASLt
// calls on that stream; stream order makes the sharing safe), persistent scratch buffers (zeroed
// when (re)allocated; kernels that use them leave them clean) and a pinned host staging buffer.
// Everything is keyed by stream because two streams running at once must not share scratch.
// The caches are never destroyed: tearing down cuBLAS handles at exit races the driver.
//
// Device side: element conversions (bf16 / fp16 / fp32 <-> fp32), 16-byte vector loads and stores
// of a "pack" (8 bf16/fp16 or 4 fp32 elements), warp and lane-group reductions, and gpu-scope
// acquire/release accesses for inter-block flags.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>

#include "src/core/cuda_check.h"
#include "src/core/device.h"
#include "src/core/tensor.h"

namespace switchyard {
namespace cuda_detail {

// ------------------------------------------------------------------------------------------------
// Host helpers
// ------------------------------------------------------------------------------------------------

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

inline int current_device() {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

inline int multiprocessor_count() {
  static std::mutex mutex;
  static std::map<int, int> counts;
  int device = current_device();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it != counts.end()) return it->second;
  int count = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  counts[device] = count;
  return count;
}

inline bool is_aligned(const void* pointer, size_t alignment) {
  return reinterpret_cast<uintptr_t>(pointer) % alignment == 0;
}

// Grid size for `work_items` items of `items_per_block`, capped (grid-stride loops cover the rest).
inline unsigned grid_for(int64_t work_items, int64_t items_per_block, int64_t max_blocks = int64_t(1) << 20) {
  int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return unsigned(blocks);
}

// `name` must be a CUDA tensor of `dtype` whose shape is exactly `dims` (-1 = any extent).
inline void check_tensor(const Tensor& tensor, const char* name, DType dtype, std::initializer_list<int64_t> dims) {
  SY_CHECK(tensor.device == DeviceKind::cuda, name, " must be on cuda, got ", tensor.describe());
  SY_CHECK(tensor.dtype == dtype, name, " must be ", dtype_name(dtype), ", got ", tensor.describe());
  SY_CHECK(tensor.rank == int(dims.size()), name, " must have rank ", dims.size(), ", got ",
                 tensor.describe());
  int axis = 0;
  for (int64_t extent : dims) {
    SY_CHECK(extent < 0 || tensor.shape[axis] == extent, name, " has shape ", tensor.describe(),
                   ", expected extent ", extent, " on axis ", axis);
    ++axis;
  }
  SY_CHECK(tensor.data != nullptr || tensor.numel() == 0, name, " has no data");
}

// Activation tensors of the CUDA backend: bf16, fp16 or fp32.
inline bool is_activation_dtype(DType dtype) {
  return dtype == DType::bf16 || dtype == DType::f16 || dtype == DType::f32;
}

// Calls functor(T{}) with T = __nv_bfloat16, __half or float (a generic lambda takes `auto tag`
// and recovers T as decltype(tag)).
template <typename Functor>
void dispatch_activation_dtype(DType dtype, const char* what, Functor&& functor) {
  switch (dtype) {
    case DType::bf16: functor(__nv_bfloat16{}); return;
    case DType::f16: functor(__half{}); return;
    case DType::f32: functor(float{}); return;
    default: SY_BAD_INPUT(what, ": unsupported dtype ", dtype_name(dtype), " (expected bf16, fp16 or fp32)");
  }
}

// ------------------------------------------------------------------------------------------------
// Per-(device, stream) resources
// ------------------------------------------------------------------------------------------------

constexpr size_t kGemmWorkspaceBytes = size_t(32) << 20;

// Tags of persistent scratch buffers (one buffer per tag per stream). Every user picks its own
// distinct value; these are routing's.
enum ScratchTag : int { kScratchRoutingControl = 0, kScratchRoutingData = 1 };

struct StreamResources {
  cublasHandle_t cublas = nullptr;
  Buffer gemm_workspace;
  std::map<int, Buffer> scratch;
  void* pinned = nullptr;
  size_t pinned_bytes = 0;
};

struct ResourceRegistry {
  std::mutex mutex;
  std::map<std::pair<int, cudaStream_t>, std::unique_ptr<StreamResources>> per_stream;
  std::map<int, cublasLtHandle_t> lt_handles;
};

inline ResourceRegistry& resource_registry() {
  static ResourceRegistry* registry = new ResourceRegistry();  // never destroyed (see top comment)
  return *registry;
}

// Resources of the current device and `stream`, created on first use; the caller holds no lock
// afterwards, so a stream must be driven by one host thread at a time (as CUDA streams are in
// practice).
inline StreamResources& stream_resources(cudaStream_t stream) {
  ResourceRegistry& registry = resource_registry();
  int device = current_device();
  std::lock_guard<std::mutex> lock(registry.mutex);
  std::unique_ptr<StreamResources>& slot = registry.per_stream[{device, stream}];
  if (!slot) slot = std::make_unique<StreamResources>();
  return *slot;
}

inline void* gemm_workspace(cudaStream_t stream) {
  StreamResources& resources = stream_resources(stream);
  if (!resources.gemm_workspace.data()) resources.gemm_workspace = Buffer(DeviceKind::cuda, kGemmWorkspaceBytes);
  return resources.gemm_workspace.data();
}

// A cuBLAS handle bound to `stream` and to the stream's GEMM workspace.
inline cublasHandle_t cublas_handle(cudaStream_t stream) {
  StreamResources& resources = stream_resources(stream);
  if (!resources.cublas) {
    void* workspace = gemm_workspace(stream);
    CUBLAS_CHECK(cublasCreate(&resources.cublas));
    CUBLAS_CHECK(cublasSetWorkspace(resources.cublas, workspace, kGemmWorkspaceBytes));
  }
  CUBLAS_CHECK(cublasSetStream(resources.cublas, stream));
  return resources.cublas;
}

inline cublasLtHandle_t cublaslt_handle() {
  ResourceRegistry& registry = resource_registry();
  int device = current_device();
  std::lock_guard<std::mutex> lock(registry.mutex);
  auto it = registry.lt_handles.find(device);
  if (it != registry.lt_handles.end()) return it->second;
  cublasLtHandle_t handle = nullptr;
  CUBLAS_CHECK(cublasLtCreate(&handle));
  registry.lt_handles[device] = handle;
  return handle;
}

// Device scratch of at least `bytes` that persists between calls on `stream`. Zero-filled when it
// is (re)allocated; users must leave it in the state they expect to find it in. Growing it waits
// for the stream, since kernels in flight may still use the old buffer.
inline void* persistent_scratch(cudaStream_t stream, int tag, size_t bytes) {
  StreamResources& resources = stream_resources(stream);
  Buffer& buffer = resources.scratch[tag];
  if (buffer.bytes() < bytes) {
    if (buffer.data()) CUDA_CHECK(cudaStreamSynchronize(stream));
    size_t grown = bytes + bytes / 2;
    buffer = Buffer();
    buffer = Buffer(DeviceKind::cuda, grown);
    CUDA_CHECK(cudaMemsetAsync(buffer.data(), 0, grown, stream));
  }
  return buffer.data();
}

// Pinned host memory of at least `bytes` for small device-to-host copies on `stream`. The caller
// synchronizes `stream` before reading it; growing it waits for the stream for the same reason.
inline void* pinned_staging(cudaStream_t stream, size_t bytes) {
  StreamResources& resources = stream_resources(stream);
  if (resources.pinned_bytes < bytes) {
    if (resources.pinned) {
      CUDA_CHECK(cudaStreamSynchronize(stream));
      CUDA_CHECK(cudaFreeHost(resources.pinned));
      resources.pinned = nullptr;
      resources.pinned_bytes = 0;
    }
    size_t grown = bytes < 4096 ? 4096 : bytes * 2;
    CUDA_CHECK(cudaMallocHost(&resources.pinned, grown));
    resources.pinned_bytes = grown;
  }
  return resources.pinned;
}

// ------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------

constexpr unsigned kFullWarpMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) { return __float2bfloat16_rn(value); }
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half_rn(value); }

// A pack is 16 bytes of T: the unit of vectorized loads and stores.
template <typename T>
struct Pack {
  static constexpr int kElems = int(16 / sizeof(T));
};

// Loads kElems consecutive elements (16-byte aligned) as floats.
template <typename T>
__device__ __forceinline__ void load_pack(const T* source, float (&values)[Pack<T>::kElems]) {
  uint4 raw = *reinterpret_cast<const uint4*>(source);
  const T* elements = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Pack<T>::kElems; ++i) values[i] = to_float(elements[i]);
}

// Same, bypassing L1 and marking the lines evict-first: for data read exactly once.
template <typename T>
__device__ __forceinline__ void load_pack_streaming(const T* source, float (&values)[Pack<T>::kElems]) {
  uint4 raw = __ldcs(reinterpret_cast<const uint4*>(source));
  const T* elements = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Pack<T>::kElems; ++i) values[i] = to_float(elements[i]);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* destination, const float (&values)[Pack<T>::kElems]) {
  uint4 raw;
  T* elements = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Pack<T>::kElems; ++i) elements[i] = from_float<T>(values[i]);
  *reinterpret_cast<uint4*>(destination) = raw;
}

template <typename T>
__device__ __forceinline__ void store_zero_pack(T* destination) {
  *reinterpret_cast<uint4*>(destination) = make_uint4(0u, 0u, 0u, 0u);
}

// kElems consecutive elements as floats: a 16-byte pack (kElems == Pack<T>::kElems, aligned) or
// a single element (kElems == 1, the path for rows whose width or alignment rules out packs).
template <typename T, int kElems>
__device__ __forceinline__ void load_elems(const T* source, float (&values)[kElems]) {
  if constexpr (kElems == Pack<T>::kElems) {
    load_pack(source, values);
  } else {
    static_assert(kElems == 1, "load_elems: a pack or one element");
    values[0] = to_float(*source);
  }
}

template <typename T, int kElems>
__device__ __forceinline__ void store_elems(T* destination, const float (&values)[kElems]) {
  if constexpr (kElems == Pack<T>::kElems) {
    store_pack(destination, values);
  } else {
    static_assert(kElems == 1, "store_elems: a pack or one element");
    *destination = from_float<T>(values[0]);
  }
}

// Calls functor(std::integral_constant<int, N>{}) with N = Pack<T>::kElems when `vectorizable`,
// else N = 1.
template <typename T, typename Functor>
void dispatch_elems(bool vectorizable, Functor&& functor) {
  if (vectorizable) functor(std::integral_constant<int, Pack<T>::kElems>{});
  else functor(std::integral_constant<int, 1>{});
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullWarpMask, value, offset);
  return value;
}

__device__ __forceinline__ int warp_sum(int value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullWarpMask, value, offset);
  return value;
}

// Reductions within aligned groups of kGroup lanes (a power of two <= 32); every lane of the
// group gets the result. The xor pattern is fixed, so the float sum is deterministic.
template <int kGroup>
__device__ __forceinline__ float group_sum(float value) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullWarpMask, value, offset);
  return value;
}

template <int kGroup>
__device__ __forceinline__ float group_max(float value) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset >>= 1)
    value = fmaxf(value, __shfl_xor_sync(kFullWarpMask, value, offset));
  return value;
}

template <int kGroup>
__device__ __forceinline__ unsigned long long group_max(unsigned long long value) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset >>= 1) {
    unsigned long long other = __shfl_xor_sync(kFullWarpMask, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned mask;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
  return mask;
}

// gpu-scope acquire load / release store, for flags that publish data written by other blocks.
__device__ __forceinline__ unsigned load_acquire(const unsigned* address) {
  unsigned value;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void store_release(unsigned* address, unsigned value) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(address), "r"(value) : "memory");
}

}  // namespace cuda_detail
}  // namespace switchyard
