// Hand-written sm_90a (H100/H200) grouped GEMM over the expert-contiguous layout.
//
//   forward:      C[r, :] = A[r, :] * op(B_e)        for every row r of expert e's segment
//                 A [R, K] bf16, B [E, K, N] bf16 (or [E, N, K] with trans_b: op(B_e) = B_e^T),
//                 C [R, N] bf16, fp32 accumulation.
//   weight grad:  dB_e = A_e^T * G_e                 reduction over the rows of segment e
//                 A [R, M] bf16, G [R, N] bf16, dB [E, M, N] fp32 (overwritten; empty experts -> 0).
//
// Expert e owns rows [expert_offsets[e], expert_offsets[e+1]) (int32 [E+1] on the device, never read
// by the host; expert_offsets[0] == 0). Every segment length must be a multiple of kRowAlignment, so a
// 128-row tile never straddles two experts; a kernel that meets a misaligned segment (or one past R)
// traps, which surfaces as a CUDA launch failure on the next check. R is a host-known upper bound on expert_offsets[E]: forward rows at or beyond
// expert_offsets[E] are neither read nor written.
//
// Kernels (kernels/cuda/grouped_gemm_sm90*.cu): TMA loads with 128-byte swizzle into an mbarrier
// pipeline, wgmma.mma_async m64nNk16 from shared memory (transposed operands through the
// descriptors' MN-major layout), persistent grid over (m-tile, n-tile) work that looks the expert of
// each m-tile up on the device. Two variants, for comparison and as a fallback:
//   pipelined  warp-specialized: one producer warp issues TMA, two consumer warpgroups (setmaxnreg)
//              run wgmma; 128x256 or 128x128 tiles, 4-6 stages, bf16 epilogue through shared memory
//              with 16-byte stores.
//   basic      one CTA per output tile, all warps consume, thread 0 refills a 4-stage ring.
// The environment variable SWITCHYARD_SM90_GEMM=basic|pipelined picks the default (pipelined).
#pragma once

#include <cstdint>

#include "src/core/tensor.h"

namespace switchyard {
namespace cuda {
namespace sm90 {

// Segment lengths (rows per expert) must be multiples of this.
constexpr int kRowAlignment = 128;
// K, N (forward) and M, N (weight grad) must be multiples of this.
constexpr int kDimAlignment = 64;

enum class Variant : uint8_t { pipelined, basic };

struct Options {
  Variant variant = Variant::pipelined;
  int block_n = 0;  // output tile width: 128 or 256 (pipelined only; basic uses 128); 0 = choose
};

// Options from the environment: SWITCHYARD_SM90_GEMM=basic|pipelined (unset: pipelined). Throws a
// bad-input Error for any other value.
Options default_options();

// True when the current CUDA device is compute capability 9.0 and this build carries sm_90a code.
bool device_supported();

// Whether the shapes, dtypes, devices and alignments fit these kernels (and device_supported()).
// Callers fall back to another implementation when false.
bool supported(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, const Tensor& c);
bool weight_grad_supported(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, const Tensor& grad_b);

// Asynchronous on `stream` (a cudaStream_t; nullptr = legacy default stream). Throw when not supported.
void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c,
                  void* stream);
void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c,
                  const Options& options, void* stream);
void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b,
                              void* stream);
void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b,
                              const Options& options, void* stream);

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
