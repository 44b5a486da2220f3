// Shared pieces of the CUDA kernels (included by src/ops/cuda/*.cu only).
//
// Host side: tensor checks, launch-size helpers, and per-(device, stream) resources that must not
// be created per call: a cuBLAS handle bound to a 32 MiB workspace (shared by cuBLAS and cuBLASLt
// calls on that stream; stream order makes the sharing safe), persistent scratch buffers (zeroed
// when (re)allocated; kernels that use them leave them clean) and a pinned host staging buffer.
// Everything is keyed by stream because two streams running at once must not share scratch.
// The caches are never destroyed: tearing down cuBLAS handles at exit races the driver.
//
// Device side: element conversions (bf16 / fp16 / fp32 <-> fp32), 16-byte vector loads and stores
// of a "pack" (8 bf16/fp16 or 4 fp32 elements), warp and lane-group reductions, gpu-scope
// acquire/release accesses for inter-block flags, a grid barrier for cooperative launches (with
// cooperative_grid_limit on the host), and router-row pieces (lane-group layout over a row of
// logits, ordered float keys, k_t, exp) that routing.cu and routing_backward.cu use.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "src/core/cuda_check.h"
#include "src/core/device.h"
#include "src/core/tensor.h"
#include "src/ops/cuda/routing_layout.h"
#include "src/ops/moe_ops.h"

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

// The device copy of `bytes` of host data (a table of kernel arguments, say) in the persistent
// scratch `tag` of `stream`, uploaded only when it differs from the last upload there: steady-state
// callers (the optimizer step, the gradient check) pass the same table every step. The copy is an
// async copy from pageable memory, which the driver stages before it returns. A longer table makes
// persistent_scratch reallocate, and the old upload goes with the old memory.
inline const void* cached_device_table(const void* host, size_t bytes, cudaStream_t stream, int tag) {
  struct Upload {
    std::vector<unsigned char> bytes;
    const void* address = nullptr;
  };
  static std::mutex mutex;
  static auto* uploads = new std::map<std::tuple<int, cudaStream_t, int>, Upload>();  // never destroyed
  void* table = persistent_scratch(stream, tag, bytes);
  std::lock_guard<std::mutex> lock(mutex);
  Upload& last = (*uploads)[{current_device(), stream, tag}];
  const unsigned char* data = static_cast<const unsigned char*>(host);
  const bool current = last.address == table && last.bytes.size() == bytes &&
                       std::memcmp(last.bytes.data(), data, bytes) == 0;
  if (!current) {
    CUDA_CHECK(cudaMemcpyAsync(table, host, bytes, cudaMemcpyHostToDevice, stream));
    last.bytes.assign(data, data + bytes);
    last.address = table;
  }
  return table;
}

// Blocks of `kernel` (this block size and dynamic shared memory) that the current device holds at
// once: the largest grid a cooperative launch (cudaLaunchCooperativeKernel, all blocks resident,
// so they may wait for each other in grid_barrier) accepts. Cached: the occupancy query is not free.
inline int cooperative_grid_limit(const void* kernel, int threads, size_t shared_bytes) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  const int device = current_device();
  const auto key = std::make_tuple(device, kernel, threads, shared_bytes);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = cache.find(key);
    if (found != cache.end()) return found->second;
  }
  int cooperative = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  SY_CHECK(cooperative != 0, "CUDA device ", device, " does not support cooperative launches");
  int per_multiprocessor = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel, threads, shared_bytes));
  SY_CHECK(per_multiprocessor >= 1, "a block of ", threads, " threads with ", shared_bytes,
           " bytes of shared memory does not fit on a multiprocessor");
  const int blocks = per_multiprocessor * multiprocessor_count();
  std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, blocks);
  return blocks;
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

// K rounded up to a register-array size: calls launch(std::integral_constant<int, 1, 2, 4 or 8>).
template <typename Launch>
void dispatch_choices(int64_t k_max, Launch&& launch) {
  if (k_max == 1) launch(std::integral_constant<int, 1>{});
  else if (k_max == 2) launch(std::integral_constant<int, 2>{});
  else if (k_max <= 4) launch(std::integral_constant<int, 4>{});
  else launch(std::integral_constant<int, 8>{});
}

// One warp's weighted sum of up to kChoices rows into a token row of `width` elements:
//   out[:] = sum over c with sources[c] != nullptr, in choice order, of weights[c] * sources[c][:]
// (fp32 accumulation, one rounding). With `keep`, each source row is also copied to
// keep[keep_rows[c]]. Each lane issues the loads of every choice and kChoices x kSteps packs
// before it uses any (rows are few packs per lane, and remote rows slow to return), kSteps filling
// four packs per choice in flight up to K = 4.
template <typename T, int kElems, int kChoices>
__device__ __forceinline__ void weighted_row_gather(const T* const (&sources)[kChoices],
                                                    const float (&weights)[kChoices], int64_t width, T* out,
                                                    T* keep = nullptr, const int* keep_rows = nullptr) {
  constexpr int kSteps = kChoices >= 4 ? 1 : 4 / kChoices;
  const int lane = threadIdx.x % 32;
  for (int64_t base = int64_t(lane) * kElems; base < width; base += 32 * kElems * kSteps) {
    float values[kChoices][kSteps][kElems];
#pragma unroll
    for (int choice = 0; choice < kChoices; ++choice) {
      if (sources[choice] == nullptr) continue;
#pragma unroll
      for (int step = 0; step < kSteps; ++step) {
        const int64_t column = base + int64_t(step) * 32 * kElems;
        if (column < width) load_elems<T, kElems>(sources[choice] + column, values[choice][step]);
      }
    }
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int64_t column = base + int64_t(step) * 32 * kElems;
      if (column >= width) break;
      float sum[kElems];
#pragma unroll
      for (int i = 0; i < kElems; ++i) sum[i] = 0.0f;
#pragma unroll
      for (int choice = 0; choice < kChoices; ++choice) {  // choice order: the reference's
        if (sources[choice] == nullptr) continue;
        if (keep) store_elems<T, kElems>(keep + int64_t(keep_rows[choice]) * width + column, values[choice][step]);
#pragma unroll
        for (int i = 0; i < kElems; ++i) sum[i] = fmaf(weights[choice], values[choice][step][i], sum[i]);
      }
      store_elems<T, kElems>(out + column, sum);
    }
  }
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

// The largest 32-bit value of an aligned group of kGroup lanes (one warp reduction for a whole warp).
template <int kGroup>
__device__ __forceinline__ unsigned group_max_bits(unsigned value) {
  if constexpr (kGroup == 32) {
    return __reduce_max_sync(kFullWarpMask, value);
  } else {
#pragma unroll
    for (int offset = kGroup / 2; offset > 0; offset >>= 1)
      value = max(value, __shfl_xor_sync(kFullWarpMask, value, offset));
    return value;
  }
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

// A barrier over every block of a cooperatively launched grid: each block arrives once on the
// counter, then waits until it reads `target` (n-th barrier of a kernel: n * gridDim.x, the counter
// zero at kernel start; the kernel must reset it for the next launch). One thread per block polls,
// with a short sleep, so the counter's L2 line is not flooded. The fences make each block's earlier
// global writes visible to every block after the barrier (the pattern of cooperative_groups'
// grid sync); read data that other blocks wrote with __ldcg (L2), never through a stale L1 line.
__device__ __forceinline__ void grid_barrier(unsigned* arrivals, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(arrivals, 1u);
    while (load_acquire(arrivals) < target) __nanosleep(32);
    __threadfence();
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// Router rows (routing.cu, routing_backward.cu)
// ------------------------------------------------------------------------------------------------
// A token's row of E fp32 logits is spread over a group of kGroup lanes, kPerLane logits each
// (lane m of the group holds experts [m * kPerLane, (m + 1) * kPerLane)); 32 / kGroup tokens per
// warp pass. 16 logits per lane where E allows: fewer lanes per token means fewer shuffle rounds.
// The layouts are chosen in src/ops/cuda/routing_layout.h (row_lanes, forward_lanes); above 256
// experts a token takes the whole warp (32 lanes x 16).

constexpr int kMaxRouteExperts = kCudaMaxExperts;  // src/ops/moe_ops.h: the config checks it too
static_assert(kMaxRouteExperts <= routing_layout::kMaxExperts, "the lane layouts cover 512 experts at most");

template <int kGroup, int kPerLane>
struct LaneLayout {
  static constexpr int group = kGroup;
  static constexpr int per_lane = kPerLane;
};

// Calls functor(LaneLayout<kGroup, kPerLane>{}) for routing_layout::row_lanes(num_experts)
// (kGroup * kPerLane >= E; E <= kMaxRouteExperts).
template <typename Functor>
void dispatch_lane_layout(int num_experts, Functor&& functor) {
  const routing_layout::Lanes lanes = routing_layout::row_lanes(num_experts);
  if (lanes.per_lane == 4) functor(LaneLayout<1, 4>{});
  else if (lanes.per_lane == 8) functor(LaneLayout<1, 8>{});
  else if (lanes.group == 1) functor(LaneLayout<1, 16>{});
  else if (lanes.group == 2) functor(LaneLayout<2, 16>{});
  else if (lanes.group == 4) functor(LaneLayout<4, 16>{});
  else if (lanes.group == 8) functor(LaneLayout<8, 16>{});
  else if (lanes.group == 16) functor(LaneLayout<16, 16>{});
  else functor(LaneLayout<32, 16>{});
}

// The kPerLane logits of experts [first_expert, first_expert + kPerLane) of `token`; -inf where
// the expert or the token does not exist. Read once, so streamed past L1. vector_loads: E % 4 == 0
// and a 16-byte aligned base (kPerLane is a multiple of 4).
template <int kPerLane>
__device__ __forceinline__ void load_logit_slice(const float* logits, int64_t num_tokens, int num_experts,
                                                 bool vector_loads, int64_t token, int first_expert,
                                                 float (&values)[kPerLane]) {
  if (token >= num_tokens) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) values[i] = -INFINITY;
    return;
  }
  const float* row = logits + token * num_experts;
  if (vector_loads && first_expert + kPerLane <= num_experts) {
#pragma unroll
    for (int i = 0; i < kPerLane; i += 4) {
      float4 quad = __ldcs(reinterpret_cast<const float4*>(row + first_expert + i));
      values[i] = quad.x;
      values[i + 1] = quad.y;
      values[i + 2] = quad.z;
      values[i + 3] = quad.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      values[i] = first_expert + i < num_experts ? __ldcs(row + first_expert + i) : -INFINITY;
  }
}

// Orders floats as unsigned integers (larger float -> larger key); -0 is folded into +0 first so
// that equal logits tie exactly as they do in a float comparison.
__device__ __forceinline__ unsigned ordered_bits(float value) {
  unsigned bits = __float_as_uint(value + 0.0f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float from_ordered_bits(unsigned ordered) {
  return __uint_as_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}

// k_t of a token: k_max without complexity routing, else k_min + floor(c (k_max - k_min) + 1/2).
__device__ __forceinline__ int choices_of_token(bool complexity_routing, float complexity, int k_min, int k_max) {
  if (!complexity_routing) return k_max;
  float clamped = fminf(fmaxf(complexity, 0.0f), 1.0f);  // fmaxf(NaN, 0) = 0
  return k_min + int(floorf(clamped * float(k_max - k_min) + 0.5f));
}

// exp(logit - row_max) through the MUFU exp2 unit: relative error ~1e-6 for the logit spreads of a
// router (|logit - max| < ~30), well inside the 1e-5 the outputs promise; exp(-inf) = 0.
__device__ __forceinline__ float exp_from_max(float logit, float row_max) {
  return exp2f((logit - row_max) * 1.4426950408889634f);
}

}  // namespace cuda_detail
}  // namespace switchyard
