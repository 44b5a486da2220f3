// Internal building blocks of the sm_90a grouped GEMM (grouped_gemm_sm90*.cu): tile geometry,
// thin wrappers over the PTX it needs (mbarrier, TMA, wgmma, setmaxnreg, named barriers), shared-memory
// matrix descriptors, the tile scheduler, and the host helpers the launchers share.
//
// Shared-memory operand layout. Every TMA box is 64 bf16 (128 bytes) wide with 128-byte swizzle, so
// each box row is one swizzle row and 8 rows form a 1024-byte swizzle atom:
//   K-major operand (A of the forward, B with trans_b): tile rows are M or N, each row holds 64 K
//     values; row r at byte 128*r. wgmma descriptor: stride (SBO) 1024 between 8-row groups; the
//     k16 slice kk starts 32*kk bytes into the row (the swizzle is applied on address bits).
//   MN-major operand (B without trans_b; A^T and G of the weight grad): 64-wide "chunks" of M or N,
//     each a 64 (K) x 64 (MN) box of 8 KiB; chunk j at byte 8192*j, K row k at 128*k inside it.
//     Descriptor: leading offset (LBO) 8192 between chunks, SBO 1024 between 8-row K groups; the
//     k16 slice kk starts 2048*kk bytes in (16 K rows).
// (PTX ISA "Shared Memory Matrix Layout": canonical K-major SW128 ((8,m),(T,2k)):((8T,SBO),(1,T)),
// MN-major SW128 ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)), T = 8 bf16.)
#pragma once

#include <cuda.h>  // CUtensorMap and its enums only: the driver entry point is fetched at run time
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "src/ops/cuda/sm90/grouped_gemm_sm90.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SY_SM90A_DEVICE_CODE 1
#endif

namespace switchyard {
namespace cuda {
namespace sm90 {
namespace detail {

constexpr int kBlockM = 128;             // tile rows: two consumer warpgroups x wgmma m64
constexpr int kBlockK = 64;              // reduction depth of one pipeline stage
constexpr int kChunk = 64;               // width (bf16) of one TMA box = one 128-byte swizzle row
constexpr int kChunkBytes = kChunk * kBlockK * 2;     // 8 KiB: one 64 x 64 bf16 box
constexpr int kTileBytesA = kBlockM * kBlockK * 2;    // 16 KiB
constexpr int kWarpgroupThreads = 128;
constexpr int kSwizzleAtomBytes = 1024;  // 8 rows x 128 bytes
constexpr int kMaxDynamicSmem = 227 * 1024;
constexpr int kSmemAlignSlack = 1024;    // dynamic shared memory is re-aligned to 1024 in the kernel
constexpr int kRasterGroupM = 16;        // m-tiles per raster group (L2 reuse of A and B tiles)
constexpr int kMaxStages = 6;
constexpr int kConsumerWarps = 8;        // two consumer warpgroups
constexpr int kProducerRegisters = 40;   // setmaxnreg budgets: 128 x 40 + 256 x 232 <= 64K registers
constexpr int kConsumerRegisters = 232;

static_assert(kDimAlignment == kChunk, "dimension alignment is the TMA box width");
static_assert(kRowAlignment % kBlockM == 0 && kRowAlignment % kBlockK == 0, "row alignment vs tiles");

// wgmma descriptor fields of one operand layout (see the top comment).
template <bool kMNMajor>
struct OperandLayout {
  static constexpr uint32_t kSliceBytes = kMNMajor ? 16 * 128 : 16 * 2;  // advance per k16 slice
  static constexpr uint32_t kLeadingBytes = kMNMajor ? kChunkBytes : 16;  // K-major: unused ("1")
  static constexpr uint32_t kStrideBytes = kSwizzleAtomBytes;
  static constexpr int kTranspose = kMNMajor ? 1 : 0;
};

// Shared memory of the warp-specialized kernels: kStages x (A tile, B tile), an epilogue staging
// area of kStagingBytes (1024-aligned), then the mbarriers. The forward kernels stage bf16 slices
// (two warpgroups x 64 rows x kStagingPitch bytes); the weight grad's TMA-store epilogue stages the
// whole fp32 tile (kFloatTileStagingBytes).
constexpr int kStagingPitch = kChunk * 2 + 16;  // one 64-column slice of a row, padded: no bank conflicts
constexpr int kStagingBytesPerWarpgroup = 64 * kStagingPitch;
constexpr int kBf16StagingBytes = 2 * kStagingBytesPerWarpgroup;
// TMA-store forward epilogue: per warpgroup two swizzled 64 x 64 bf16 boxes (8 KiB each).
constexpr int kBf16BoxBytes = 64 * kChunk * 2;
constexpr int kBf16TmaStagingBytes = 2 * 2 * kBf16BoxBytes;
// fp32 tiles go out through TMA boxes of 64 rows x 32 columns (128 bytes, one swizzle row each).
constexpr int kFloatBoxColumns = 32;
constexpr int kFloatBoxBytes = 64 * kFloatBoxColumns * 4;  // 8 KiB
constexpr int kTmaStoreBlockN = 128;                         // tile width of the TMA-store weight grad
constexpr int kFloatTileStagingBytes = kBlockM * kTmaStoreBlockN * 4;  // 64 KiB

constexpr int min_int(int a, int b) { return a < b ? a : b; }

template <int kBlockN, int kStagingBytesValue>
struct PipelineLayout {
  static constexpr int kTileBytesB = kBlockN * kBlockK * 2;
  static constexpr int kStageBytes = kTileBytesA + kTileBytesB;
  static constexpr int kStagingBytes = kStagingBytesValue;
  static constexpr int kStages =
      min_int(kMaxStages, (kMaxDynamicSmem - kSmemAlignSlack - kStagingBytes - 2 * 8 * kMaxStages) / kStageBytes);
  static constexpr int kOffsetA = 0;
  static constexpr int kOffsetB = kStages * kTileBytesA;
  static constexpr int kOffsetStaging = kOffsetB + kStages * kTileBytesB;
  static constexpr int kOffsetFull = kOffsetStaging + kStagingBytes;
  static constexpr int kOffsetEmpty = kOffsetFull + 8 * kStages;
  static constexpr int kSmemBytes = kOffsetEmpty + 8 * kStages + kSmemAlignSlack;
  static_assert(kStages >= 3, "pipeline too shallow");
  static_assert(kSmemBytes <= kMaxDynamicSmem, "shared memory budget");
  static_assert(kTileBytesB % kSwizzleAtomBytes == 0, "tiles stay 1024-byte aligned");
  static_assert(kOffsetStaging % kSwizzleAtomBytes == 0, "swizzled staging needs 1024-byte alignment");
};

// Basic kernels: 128 x 128 tiles, a 4-stage ring, no warp specialization.
constexpr int kBasicBlockN = 128;
constexpr int kBasicStages = 4;
constexpr int kBasicTileBytesB = kBasicBlockN * kBlockK * 2;
constexpr int kBasicSmemBytes = kBasicStages * (kTileBytesA + kBasicTileBytesB) + 8 * kBasicStages + kSmemAlignSlack;

// What the forward kernel's epilogue does with the fp32 tile (grouped_gemm_sm90_epilogue.cuh).
//   store            C = tile
//   gelu, swiglu     pre = tile (unless not kept), post = act(pre)   (expert GEMM 1)
//   gelu_backward,   grad_pre = tile * act'(pre), the tile being dL/d post   (expert data grad 2)
//   swiglu_backward
enum class Epilogue : uint8_t { store, gelu, swiglu, gelu_backward, swiglu_backward };

constexpr bool is_backward_epilogue(Epilogue epilogue) {
  return epilogue == Epilogue::gelu_backward || epilogue == Epilogue::swiglu_backward;
}

// Kernel arguments besides the tensor maps. `n` is the width the tiles cover: N of C for store,
// F (the activation's width) for the others; swiglu rows of pre and grad_pre are 2F wide.
struct ForwardProblem {
  const int* expert_offsets;
  const int* row_tokens;     // Options::row_tokens (nullptr: every row computed)
  __nv_bfloat16* c;          // store: C; gelu/swiglu: pre (nullptr: not kept); *_backward: grad_pre
  __nv_bfloat16* post;       // gelu/swiglu: act(pre) [R, F]
  const __nv_bfloat16* pre;  // *_backward: the forward's pre, read by the epilogue
  int num_experts;
  int rows;      // R: allocated rows of A and C
  int n;         // see above (multiple of 64)
  int k_blocks;  // K / 64
  int n_tiles;   // ceil(n / tile columns)
};

// Tensor maps of the forward kernel (one __grid_constant__ argument). pre: the backward
// epilogues' L2 prefetch; c and post: the TMA-store epilogue's outputs (64 x 64 boxes). Maps a
// kernel does not use hold a copy of `a`.
struct ForwardMaps {
  CUtensorMap a, b, pre, c, post;
};

struct WeightGradProblem {
  const int* expert_offsets;
  const int* row_tokens;  // Options::row_tokens (nullptr: every row reduced)
  float* grad_b;
  int num_experts;
  int rows;     // R
  int m;        // rows of each dB_e (columns of A; multiple of 64)
  int n;        // columns of each dB_e (multiple of 64)
  int m_tiles;  // ceil(M / 128)
  int n_tiles;  // ceil(N / block_n)
};

// ---- Host helpers (grouped_gemm_sm90.cu) ------------------------------------------------------
// A bf16 (or fp32) tensor map with 128-byte swizzle. dims and box are innermost first; strides
// (bytes) are those of dims 1..rank-1.
CUtensorMap make_bf16_tensor_map(const void* base, int rank, const uint64_t* dims, const uint64_t* stride_bytes,
                                 const uint32_t* box);
CUtensorMap make_f32_tensor_map(const void* base, int rank, const uint64_t* dims, const uint64_t* stride_bytes,
                                const uint32_t* box);
int current_device_sm_count();
// Picks the output tile width: options.block_n when set, else 256 when N fills 256-wide tiles and
// there are enough tiles to occupy the GPU, else 128.
int choose_block_n(const Options& options, int64_t n, int64_t tiles_m_upper_bound);
// Whether a forward-kernel launch with this epilogue and reduction depth takes the pingpong
// schedule (Options::schedule; automatic: up to kPingpongMaxKBlocks k-blocks).
constexpr int kPingpongMaxKBlocks = 16;
bool uses_pingpong(const Options& options, Epilogue epilogue, int k_blocks);

// ---- Device helpers ---------------------------------------------------------------------------
#ifdef SY_SM90A_DEVICE_CODE

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Dynamic shared memory, re-aligned to the 1024 bytes the 128-byte swizzle atoms need.
__device__ __forceinline__ uint8_t* aligned_dynamic_smem(uint8_t* raw) {
  const uint32_t address = shared_address(raw);
  const uint32_t aligned = (address + kSmemAlignSlack - 1) & ~uint32_t(kSmemAlignSlack - 1);
  return raw + (aligned - address);
}

__device__ __forceinline__ void mbarrier_init(uint32_t barrier, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(barrier), "r"(arrivals) : "memory");
}

// Makes barrier initialization visible to the other threads and to the TMA (async) proxy.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t barrier, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(barrier), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(barrier) : "memory");
}

// Waits until the barrier's phase with the given parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t barrier, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n"
        ".reg .pred ready;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 ready, [%1], %2;\n"
        "selp.u32 %0, 1, 0, ready;\n"
        "}\n"
        : "=r"(done)
        : "r"(barrier), "r"(parity)
        : "memory");
  } while (!done);
}

// ---- Clusters of two CTAs (the weight grad's multicast pairs) ----
__device__ __forceinline__ uint32_t cluster_cta_rank() {
  uint32_t rank;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}
__device__ __forceinline__ uint32_t cluster_index() {
  uint32_t index;
  asm("mov.u32 %0, %%clusterid.x;" : "=r"(index));
  return index;
}
__device__ __forceinline__ uint32_t cluster_count() {
  uint32_t count;
  asm("mov.u32 %0, %%nclusterid.x;" : "=r"(count));
  return count;
}
// Every thread of every CTA of the cluster; orders earlier writes (barrier inits) before later
// remote accesses.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// One arrival on the mbarrier at the same shared-memory offset in CTA `cta_rank` of the cluster.
// Release at CTA scope, as CUTLASS's ClusterBarrier::arrive: the reads it orders were wgmma's,
// already complete. (.release.cluster made the weight grad 1.75x slower on an H100.)
__device__ __forceinline__ void mbarrier_arrive_cluster(uint32_t barrier, uint32_t cta_rank) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(barrier),
      "r"(cta_rank)
      : "memory");
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// TMA tile loads; coordinates are element indices, innermost first. Completion is counted in bytes
// on `barrier`.
__device__ __forceinline__ void tma_load_2d(uint32_t destination, const CUtensorMap* map, uint32_t barrier,
                                            int coord0, int coord1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          destination),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(barrier), "r"(coord0), "r"(coord1)
      : "memory");
}

// The same box into `destination` of every CTA in cta_mask (cluster ranks), each CTA's barrier at
// the offset `barrier` counting the bytes: one L2 read feeds several SMs.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t destination, const CUtensorMap* map, uint32_t barrier,
                                                      int coord0, int coord1, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%4, %5}], [%2], %3;" ::"r"(destination),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(barrier), "h"(cta_mask), "r"(coord0), "r"(coord1)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d(uint32_t destination, const CUtensorMap* map, uint32_t barrier,
                                            int coord0, int coord1, int coord2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];" ::"r"(destination),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(barrier), "r"(coord0), "r"(coord1), "r"(coord2)
      : "memory");
}

// TMA tile store from shared memory (bulk-group completion); coordinates innermost first.
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, uint32_t source, int coord0, int coord1,
                                             int coord2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(source), "r"(coord0), "r"(coord1), "r"(coord2)
               : "memory");
}

__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, uint32_t source, int coord0, int coord1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(source), "r"(coord0), "r"(coord1)
               : "memory");
}

__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Waits until all but the newest kPending committed bulk-store groups have read their
// shared-memory source (which may then be reused).
template <int kPending>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}
__device__ __forceinline__ void bulk_wait_group_read_all() { bulk_wait_group_read<0>(); }

// Waits until the committed bulk stores are complete.
__device__ __forceinline__ void bulk_wait_group_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// Orders this thread's generic-proxy shared-memory writes before later async-proxy (TMA) reads.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Pulls one box of a tensor into L2 (no shared memory, no completion to wait for).
__device__ __forceinline__ void tma_prefetch_l2_2d(const CUtensorMap* map, int coord0, int coord1) {
  asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global.tile [%0, {%1, %2}];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(coord0), "r"(coord1)
               : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accumulator reads/writes across wgmma issue and wait points.
template <int kCount>
__device__ __forceinline__ void fence_accumulators(float (&acc)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
}

// Barrier over one warpgroup (ids 1.. ; 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_barrier(int id) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "n"(kWarpgroupThreads) : "memory");
}

// A named barrier between the two consumer warpgroups, one side signalling (bar.arrive, no wait)
// and the other waiting (bar.sync): the pingpong schedule's mainloop order.
__device__ __forceinline__ void consumer_pair_signal(int id) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "n"(2 * kWarpgroupThreads) : "memory");
}
__device__ __forceinline__ void consumer_pair_wait(int id) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "n"(2 * kWarpgroupThreads) : "memory");
}

// Shared-memory matrix descriptor with 128-byte swizzle (PTX ISA "Matrix Descriptor Format").
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t address, uint32_t leading_bytes, uint32_t stride_bytes) {
  return uint64_t((address & 0x3FFFF) >> 4) | (uint64_t((leading_bytes & 0x3FFFF) >> 4) << 16) |
         (uint64_t((stride_bytes & 0x3FFFF) >> 4) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ uint32_t pack_bf16x2(float low, float high) {
  __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<uint32_t*>(&pair);
}

// D[64 x 128] += A[64 x 16] * B[16 x 128], bf16 inputs from shared memory, fp32 accumulators.
template <int kTransposeA, int kTransposeB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&acc)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred accumulate;\n"
      "setp.ne.b32 accumulate, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, accumulate, 1, 1, %67, %68;\n"
      "}\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]), "+f"(acc[7]),
        "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]), "+f"(acc[12]), "+f"(acc[13]), "+f"(acc[14]), "+f"(acc[15]),
        "+f"(acc[16]), "+f"(acc[17]), "+f"(acc[18]), "+f"(acc[19]), "+f"(acc[20]), "+f"(acc[21]), "+f"(acc[22]), "+f"(acc[23]),
        "+f"(acc[24]), "+f"(acc[25]), "+f"(acc[26]), "+f"(acc[27]), "+f"(acc[28]), "+f"(acc[29]), "+f"(acc[30]), "+f"(acc[31]),
        "+f"(acc[32]), "+f"(acc[33]), "+f"(acc[34]), "+f"(acc[35]), "+f"(acc[36]), "+f"(acc[37]), "+f"(acc[38]), "+f"(acc[39]),
        "+f"(acc[40]), "+f"(acc[41]), "+f"(acc[42]), "+f"(acc[43]), "+f"(acc[44]), "+f"(acc[45]), "+f"(acc[46]), "+f"(acc[47]),
        "+f"(acc[48]), "+f"(acc[49]), "+f"(acc[50]), "+f"(acc[51]), "+f"(acc[52]), "+f"(acc[53]), "+f"(acc[54]), "+f"(acc[55]),
        "+f"(acc[56]), "+f"(acc[57]), "+f"(acc[58]), "+f"(acc[59]), "+f"(acc[60]), "+f"(acc[61]), "+f"(acc[62]), "+f"(acc[63])
      : "l"(desc_a), "l"(desc_b), "r"(1), "n"(kTransposeA), "n"(kTransposeB));
}

// D[64 x 256] += A[64 x 16] * B[16 x 256], bf16 inputs from shared memory, fp32 accumulators.
template <int kTransposeA, int kTransposeB>
__device__ __forceinline__ void wgmma_m64n256k16(float (&acc)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred accumulate;\n"
      "setp.ne.b32 accumulate, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, accumulate, 1, 1, %131, %132;\n"
      "}\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]), "+f"(acc[7]),
        "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]), "+f"(acc[12]), "+f"(acc[13]), "+f"(acc[14]), "+f"(acc[15]),
        "+f"(acc[16]), "+f"(acc[17]), "+f"(acc[18]), "+f"(acc[19]), "+f"(acc[20]), "+f"(acc[21]), "+f"(acc[22]), "+f"(acc[23]),
        "+f"(acc[24]), "+f"(acc[25]), "+f"(acc[26]), "+f"(acc[27]), "+f"(acc[28]), "+f"(acc[29]), "+f"(acc[30]), "+f"(acc[31]),
        "+f"(acc[32]), "+f"(acc[33]), "+f"(acc[34]), "+f"(acc[35]), "+f"(acc[36]), "+f"(acc[37]), "+f"(acc[38]), "+f"(acc[39]),
        "+f"(acc[40]), "+f"(acc[41]), "+f"(acc[42]), "+f"(acc[43]), "+f"(acc[44]), "+f"(acc[45]), "+f"(acc[46]), "+f"(acc[47]),
        "+f"(acc[48]), "+f"(acc[49]), "+f"(acc[50]), "+f"(acc[51]), "+f"(acc[52]), "+f"(acc[53]), "+f"(acc[54]), "+f"(acc[55]),
        "+f"(acc[56]), "+f"(acc[57]), "+f"(acc[58]), "+f"(acc[59]), "+f"(acc[60]), "+f"(acc[61]), "+f"(acc[62]), "+f"(acc[63]),
        "+f"(acc[64]), "+f"(acc[65]), "+f"(acc[66]), "+f"(acc[67]), "+f"(acc[68]), "+f"(acc[69]), "+f"(acc[70]), "+f"(acc[71]),
        "+f"(acc[72]), "+f"(acc[73]), "+f"(acc[74]), "+f"(acc[75]), "+f"(acc[76]), "+f"(acc[77]), "+f"(acc[78]), "+f"(acc[79]),
        "+f"(acc[80]), "+f"(acc[81]), "+f"(acc[82]), "+f"(acc[83]), "+f"(acc[84]), "+f"(acc[85]), "+f"(acc[86]), "+f"(acc[87]),
        "+f"(acc[88]), "+f"(acc[89]), "+f"(acc[90]), "+f"(acc[91]), "+f"(acc[92]), "+f"(acc[93]), "+f"(acc[94]), "+f"(acc[95]),
        "+f"(acc[96]), "+f"(acc[97]), "+f"(acc[98]), "+f"(acc[99]), "+f"(acc[100]), "+f"(acc[101]), "+f"(acc[102]), "+f"(acc[103]),
        "+f"(acc[104]), "+f"(acc[105]), "+f"(acc[106]), "+f"(acc[107]), "+f"(acc[108]), "+f"(acc[109]), "+f"(acc[110]), "+f"(acc[111]),
        "+f"(acc[112]), "+f"(acc[113]), "+f"(acc[114]), "+f"(acc[115]), "+f"(acc[116]), "+f"(acc[117]), "+f"(acc[118]), "+f"(acc[119]),
        "+f"(acc[120]), "+f"(acc[121]), "+f"(acc[122]), "+f"(acc[123]), "+f"(acc[124]), "+f"(acc[125]), "+f"(acc[126]), "+f"(acc[127])
      : "l"(desc_a), "l"(desc_b), "r"(1), "n"(kTransposeA), "n"(kTransposeB));
}


template <int kBlockN, int kTransposeA, int kTransposeB>
__device__ __forceinline__ void wgmma_tile(float (&acc)[kBlockN / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(kBlockN == 128 || kBlockN == 256, "tile width");
  if constexpr (kBlockN == 128) {
    wgmma_m64n128k16<kTransposeA, kTransposeB>(acc, desc_a, desc_b);
  } else {
    wgmma_m64n256k16<kTransposeA, kTransposeB>(acc, desc_a, desc_b);
  }
}

// One stage of MMA for one consumer warpgroup: D[64 x kBlockN] += A[64 x 64] * B[64 x kBlockN] as four
// k16 wgmma instructions. `a_address`/`b_address` are the shared addresses of this warpgroup's
// operand tiles in the stage.
template <int kBlockN, bool kAMNMajor, bool kBMNMajor>
__device__ __forceinline__ void mma_stage(float (&acc)[kBlockN / 2], uint32_t a_address, uint32_t b_address) {
  using LayoutA = OperandLayout<kAMNMajor>;
  using LayoutB = OperandLayout<kBMNMajor>;
  const uint64_t desc_a = smem_descriptor(a_address, LayoutA::kLeadingBytes, LayoutA::kStrideBytes);
  const uint64_t desc_b = smem_descriptor(b_address, LayoutB::kLeadingBytes, LayoutB::kStrideBytes);
#pragma unroll
  for (int slice = 0; slice < kBlockK / 16; ++slice) {
    // The start address sits in the descriptor's low bits (16-byte units); no carry out of 14 bits.
    wgmma_tile<kBlockN, LayoutA::kTranspose, LayoutB::kTranspose>(acc, desc_a + ((slice * LayoutA::kSliceBytes) >> 4),
                                                                   desc_b + ((slice * LayoutB::kSliceBytes) >> 4));
  }
}

// Ring position shared by producer and consumers: stage index and the parity of its current use.
struct PipelineState {
  int stage = 0;
  uint32_t phase = 0;
  template <int kStages>
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

// Shared memory of a warp-specialized kernel: 1024-aligned base and its barrier rings.
struct PipelineSmem {
  uint8_t* base;
  uint32_t address;  // shared-space address of base
  uint32_t full_barriers;
  uint32_t empty_barriers;
};

// Aligns the dynamic shared memory and initializes the full (1 arrival + TMA bytes) and empty (one
// arrival per consumer warp that reads the stage: all of them, or one warpgroup's in the pingpong
// schedule) barriers of every stage. Called by the whole CTA.
template <class Layout>
__device__ __forceinline__ PipelineSmem setup_pipeline(uint8_t* dynamic_smem, int stage_readers = kConsumerWarps) {
  PipelineSmem smem;
  smem.base = aligned_dynamic_smem(dynamic_smem);
  smem.address = shared_address(smem.base);
  smem.full_barriers = smem.address + Layout::kOffsetFull;
  smem.empty_barriers = smem.address + Layout::kOffsetEmpty;
  if (threadIdx.x == 0) {
    for (int stage = 0; stage < Layout::kStages; ++stage) {
      mbarrier_init(smem.full_barriers + 8 * stage, 1);
      mbarrier_init(smem.empty_barriers + 8 * stage, stage_readers);
    }
    fence_barrier_init();
  }
  __syncthreads();
  return smem;
}

// The basic kernels' whole mainloop for one tile: two warpgroups each consume every stage (this
// one reads its A rows at a_tiles + a_offset); thread 0 primes the ring and refills a stage once the
// CTA is done with it. load_stage(k_block, stage) issues expect-tx and the TMA loads of a k-block
// into a stage, completing on full_barriers + 8 * stage.
template <int kBlockN, bool kAMNMajor, bool kBMNMajor, int kStages, class LoadStage>
__device__ __forceinline__ void basic_mainloop(float (&acc)[kBlockN / 2], int k_blocks, uint32_t a_tiles,
                                               uint32_t a_offset, uint32_t b_tiles, uint32_t full_barriers,
                                               const LoadStage& load_stage) {
  constexpr uint32_t kStageBytesB = kBlockN * kBlockK * 2;
  if (threadIdx.x == 0) {
    for (int stage = 0; stage < kStages; ++stage) mbarrier_init(full_barriers + 8 * stage, 1);
    fence_barrier_init();
    for (int k_block = 0; k_block < min(kStages, k_blocks); ++k_block) load_stage(k_block, k_block);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) acc[i] = 0.0f;
  for (int k_block = 0; k_block < k_blocks; ++k_block) {
    const int stage = k_block % kStages;
    mbarrier_wait(full_barriers + 8 * stage, (k_block / kStages) & 1);
    fence_accumulators(acc);
    wgmma_fence();
    mma_stage<kBlockN, kAMNMajor, kBMNMajor>(acc, a_tiles + stage * kTileBytesA + a_offset,
                                             b_tiles + stage * kStageBytesB);
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(acc);
    __syncthreads();  // every warpgroup is done with this stage
    if (threadIdx.x == 0 && k_block + kStages < k_blocks) load_stage(k_block + kStages, stage);
  }
}

// Consumer side of the warp-specialized pipeline for one tile: waits for each stage, issues its
// wgmmas (issue_stage(a_stage, b_stage): the stage's A and B tile addresses), and hands a stage back
// to the producer (one arrival per consumer warp) as soon as the MMAs reading it are complete. One
// wgmma group stays in flight across stages. fence() pins the accumulators around the async MMAs.
// On return all MMAs of the tile are complete. peer_cta >= 0: the stages also hold data multicast by
// that CTA of the cluster, whose producer must see them released too.
template <int kStages, class IssueStage, class Fence>
__device__ __forceinline__ void consume_stages(int k_blocks, uint32_t a_tiles, uint32_t a_stage_bytes,
                                               uint32_t b_tiles, uint32_t b_stage_bytes, uint32_t full_barriers,
                                               uint32_t empty_barriers, PipelineState& state, bool signalling_lane,
                                               const IssueStage& issue_stage, const Fence& fence, int peer_cta = -1) {
  auto release = [&](int stage) {
    mbarrier_arrive(empty_barriers + 8 * stage);
    if (peer_cta >= 0) mbarrier_arrive_cluster(empty_barriers + 8 * stage, uint32_t(peer_cta));
  };
  int in_flight_stage = -1;
  for (int k_block = 0; k_block < k_blocks; ++k_block) {
    mbarrier_wait(full_barriers + 8 * state.stage, state.phase);
    fence();
    wgmma_fence();
    issue_stage(a_tiles + state.stage * a_stage_bytes, b_tiles + state.stage * b_stage_bytes);
    wgmma_commit();
    wgmma_wait<1>();  // the previous stage's group is done
    if (in_flight_stage >= 0 && signalling_lane) release(in_flight_stage);
    in_flight_stage = state.stage;
    state.advance<kStages>();
  }
  wgmma_wait<0>();
  fence();
  if (in_flight_stage >= 0 && signalling_lane) release(in_flight_stage);
}

// One warpgroup's 64 x kBlockN accumulator tile (cooperative schedule, weight grad).
template <int kBlockN, bool kAMNMajor, bool kBMNMajor, int kStages>
__device__ __forceinline__ void consume_k_blocks(float (&acc)[kBlockN / 2], int k_blocks, uint32_t a_tiles,
                                                 uint32_t a_stage_bytes, uint32_t b_tiles, uint32_t b_stage_bytes,
                                                 uint32_t full_barriers, uint32_t empty_barriers,
                                                 PipelineState& state, bool signalling_lane, int peer_cta = -1) {
  consume_stages<kStages>(
      k_blocks, a_tiles, a_stage_bytes, b_tiles, b_stage_bytes, full_barriers, empty_barriers, state, signalling_lane,
      [&](uint32_t a_stage, uint32_t b_stage) { mma_stage<kBlockN, kAMNMajor, kBMNMajor>(acc, a_stage, b_stage); },
      [&] { fence_accumulators(acc); }, peer_cta);
}

// The stages of k_blocks k-blocks, waited for and released without any MMA: the consumer's rows
// are all padding (zero), so its accumulators stay 0. A separate path, not a condition around the
// MMA issue: a wgmma under a runtime branch makes ptxas serialize every wgmma of the kernel.
template <int kStages>
__device__ __forceinline__ void drain_k_blocks(int k_blocks, uint32_t full_barriers, uint32_t empty_barriers,
                                               PipelineState& state, bool signalling_lane) {
  for (int k_block = 0; k_block < k_blocks; ++k_block) {
    mbarrier_wait(full_barriers + 8 * state.stage, state.phase);
    if (signalling_lane) mbarrier_arrive(empty_barriers + 8 * state.stage);
    state.advance<kStages>();
  }
}

// A warpgroup that computes a whole 128-row tile (pingpong schedule): per stage one wgmma group
// with rows [0, 64) of the A tile into acc_top and rows [64, 128) into acc_bottom, same B.
template <int kBlockN, bool kAMNMajor, bool kBMNMajor, int kStages>
__device__ __forceinline__ void consume_k_blocks_whole_tile(float (&acc_top)[kBlockN / 2],
                                                            float (&acc_bottom)[kBlockN / 2], int k_blocks,
                                                            uint32_t a_tiles, uint32_t a_stage_bytes, uint32_t b_tiles,
                                                            uint32_t b_stage_bytes, uint32_t full_barriers,
                                                            uint32_t empty_barriers, PipelineState& state,
                                                            bool signalling_lane) {
  static_assert(!kAMNMajor, "the row halves of a K-major A tile are 64 rows x 128 bytes apart");
  consume_stages<kStages>(
      k_blocks, a_tiles, a_stage_bytes, b_tiles, b_stage_bytes, full_barriers, empty_barriers, state, signalling_lane,
      [&](uint32_t a_stage, uint32_t b_stage) {
        mma_stage<kBlockN, kAMNMajor, kBMNMajor>(acc_top, a_stage, b_stage);
        mma_stage<kBlockN, kAMNMajor, kBMNMajor>(acc_bottom, a_stage + kTileBytesA / 2, b_stage);
      },
      [&] {
        fence_accumulators(acc_top);
        fence_accumulators(acc_bottom);
      });
}

// The expert owning `row`: the largest e < E with offsets[e] <= row (empty experts share offsets).
__device__ __forceinline__ int expert_of_row(const int* offsets, int num_experts, int row) {
  int low = 0, high = num_experts - 1;
  while (low < high) {
    const int middle = (low + high + 1) >> 1;
    if (__ldg(offsets + middle) <= row) {
      low = middle;
    } else {
      high = middle - 1;
    }
  }
  return low;
}

// Segments must be whole stages/tiles: a violated layout contract is a bug upstream, so stop loudly
// (an illegal-instruction trap; compute-sanitizer shows this line). No printf here: a function call
// in the kernel would make ptxas serialize the wgmma pipeline.
__device__ __forceinline__ void check_segment(const int* offsets, int expert, int alignment, int rows) {
  const int begin = __ldg(offsets + expert), end = __ldg(offsets + expert + 1);
  if (begin % alignment != 0 || end % alignment != 0 || begin < 0 || end < begin || end > rows) __trap();
}

// The k-blocks (64 rows each) of a weight-grad segment from `begin` that hold any real row: the
// trailing all-padding ones dropped (padding is under one segment alignment: 0 or 1 of them at 128).
__device__ __forceinline__ int real_k_blocks(const int* row_tokens, int begin, int k_blocks) {
  if (row_tokens == nullptr) return k_blocks;
  while (k_blocks > 0 && __ldg(row_tokens + begin + (k_blocks - 1) * kBlockK) < 0) --k_blocks;
  return k_blocks;
}

struct TileCoord {
  int m;
  int n;
};

// Grouped raster: runs of kRasterGroupM m-tiles sweep the n-tiles together, so concurrently running
// CTAs share A row blocks and B column blocks in L2.
__device__ __forceinline__ TileCoord raster_tile(int tile, int m_tiles, int n_tiles) {
  const int tiles_per_group = kRasterGroupM * n_tiles;
  const int group = tile / tiles_per_group;
  const int first_m = group * kRasterGroupM;
  const int group_m = min(kRasterGroupM, m_tiles - first_m);
  const int local = tile - group * tiles_per_group;
  return TileCoord{first_m + local % group_m, local / group_m};
}

#endif  // SY_SM90A_DEVICE_CODE

}  // namespace detail
}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
