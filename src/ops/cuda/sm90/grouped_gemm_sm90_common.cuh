// Internal building blocks of the sm_90a grouped GEMM (grouped_gemm_sm90*.cu) that host and device
// share: tile geometry, shared-memory layouts, the epilogue kinds, the kernel arguments, and the
// host helpers the launchers share. Device code only: grouped_gemm_sm90_ptx.cuh (PTX wrappers),
// grouped_gemm_sm90_pipeline.cuh (mainloops), grouped_gemm_sm90_schedule.cuh (tile scheduler).
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
  int accumulate;  // nonzero: dB_e += A_e^T G_e (every tile has one writer, so the sums stay deterministic)
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

}  // namespace detail
}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
