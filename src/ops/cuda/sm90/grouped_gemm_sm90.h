// Hand-written sm_90a (H100/H200) grouped GEMM over the expert-contiguous layout.
//
//   forward:      C[r, :] = A[r, :] * op(B_e)        for every row r of expert e's segment
//                 A [R, K] bf16, B [E, K, N] bf16 (or [E, N, K] with trans_b: op(B_e) = B_e^T),
//                 C [R, N] bf16, fp32 accumulation.
//   weight grad:  dB_e = A_e^T * G_e                 reduction over the rows of segment e
//                 A [R, M] bf16, G [R, N] bf16, dB [E, M, N] fp32 (overwritten; empty experts -> 0).
//   fused expert activation (the forward kernel with another epilogue; pipelined variant only):
//     grouped_gemm_activation:          pre = X * W1_e, post = act(pre); X [R, D], W1 [E, D, F]
//                                       (swiglu: [E, D, 2F], pre = [gate | up] [R, 2F]), post [R, F].
//                                       pre may be left unwritten (inference).
//     grouped_gemm_activation_backward: grad_pre = act'(pre) * (G * W2_e^T); G [R, D] = dL/d expert
//                                       output rows, W2 [E, F, D], pre and grad_pre [R, F] ([R, 2F]).
//     Results equal grouped_gemm followed by the activation kernels of src/ops/cuda/activation.cu
//     (the GEMM result is rounded to bf16 before the activation reads it, as the unfused path
//     stores it). swiglu keeps W1's [gate | up] layout: a tile loads gate and up columns side by
//     side (grouped_gemm_sm90_epilogue.cuh).
//
// Expert e owns rows [expert_offsets[e], expert_offsets[e+1]) (int32 [E+1] on the device, never read
// by the host; expert_offsets[0] == 0). Every segment length must be a multiple of kRowAlignment, so a
// 128-row tile never straddles two experts; a kernel that meets a misaligned segment (or one past R)
// traps, which surfaces as a CUDA launch failure on the next check. R is a host-known upper bound on
// expert_offsets[E]: forward rows at or beyond expert_offsets[E] are neither read nor written.
//
// Kernels (src/ops/cuda/sm90/grouped_gemm_sm90*.cu): TMA loads with 128-byte swizzle into an mbarrier
// pipeline, wgmma.mma_async m64nNk16 from shared memory (transposed operands through the
// descriptors' MN-major layout), persistent grid over (m-tile, n-tile) work that looks the expert of
// each m-tile up on the device. Two variants, for comparison and as a fallback:
//   pipelined  warp-specialized: one producer warp issues TMA, two consumer warpgroups (setmaxnreg)
//              run wgmma; 128x256 or 128x128 tiles, 4-6 stages, epilogue through shared memory
//              (stores below).
//   basic      one CTA per output tile, all warps consume, thread 0 refills a 4-stage ring.
// SWITCHYARD_SM90_GEMM=pipelined|basic picks the default (pipelined; src/core/switches.h).
//
// Epilogue stores (pipelined variant), Options::store:
//   direct  fragments -> shared staging -> st.global by every consumer thread (forward: 16-byte
//           stores of padded bf16 rows; weight grad: float2 straight from the fragments).
//   tma     fragments -> 128-byte-swizzled shared boxes -> TMA bulk stores issued by one thread
//           per warpgroup, drained while the consumers go on (forward: two 64 x 64 bf16 buffers
//           per warpgroup, so a slice is staged while the previous one is stored; weight grad:
//           the whole 128 x 128 fp32 tile, 64 KiB, 5 pipeline stages left, stored while the next
//           tile's mainloop runs). Writing dB (E x M x N fp32: 302 MB for E32 D768 F3072) is what
//           bounds the weight grad at short segments; with direct stores the tensor cores idle
//           while each tile drains.
//   warps   (the default) the weight grad stages its tile as tma does, but two otherwise idle warps
//           of the producer warpgroup copy it out with 16-byte st.global, so the TMA unit only
//           loads (H100, E32 D768 F3072: 144/146 vs 149/151 us at 8192 tokens, 638-640 vs
//           652-660 us at 65,536). The forward kernels store as with tma.
// SWITCHYARD_SM90_STORE=warps|tma|direct picks the default (warps; src/core/switches.h).
#pragma once

#include <cstdint>

#include "src/ops/moe_ops.h"  // ExpertActivation
#include "src/core/switches.h"
#include "src/core/tensor.h"

namespace switchyard {
namespace cuda {
namespace sm90 {

// Segment lengths (rows per expert) must be multiples of this.
constexpr int kRowAlignment = 128;
// K, N (forward) and M, N (weight grad) must be multiples of this.
constexpr int kDimAlignment = 64;

// The enums of Options are those of the SWITCHYARD_SM90_* switches (src/core/switches.h), which
// pick default_options(); what their values do is told above and below.
using Variant = Sm90Variant;  // pipelined | basic
using Store = Sm90Store;      // tma | direct | warps

// Work split of the pipelined forward kernels between the two consumer warpgroups:
//   cooperative  both compute halves (64 rows each) of one 128 x block_n tile, then both run its
//                epilogue: the tensor cores idle during the epilogue.
//   pingpong     each computes whole 128 x 128 tiles, alternating, so one warpgroup's epilogue
//                runs under the other's MMAs. Pays where the epilogue is heavy (the fused
//                activations) and the reduction short.
//   automatic    pingpong for the fused activation epilogues (except swiglu_backward, which would
//                spill) over short reductions (K <= 1024), cooperative otherwise.
using Schedule = Sm90Schedule;

// Weight grad (staged stores: tma or warps): CTAs in clusters of two that compute neighbouring n-tiles of the
// same (expert, m-tile) and share the A^T tile, each loading half of it by TMA multicast into both
// (a quarter less L2 -> SM traffic, which bounds the fp32 weight grad at short segments).
//   automatic  pairs where the n-tiles pair up evenly; off: one CTA per tile; pair: always (an odd
//              last n-tile's partner CTA computes nothing it stores).
using Multicast = Sm90Multicast;

struct Options {
  Variant variant = Variant::pipelined;
  int block_n = 0;  // output tile width: 128 or 256 (cooperative only; basic and pingpong use 128); 0 = choose
  // Pipelined epilogues. The staged (tma, warps) weight grad has 128-wide tiles: a block_n of 256
  // selects direct there.
  Store store = Store::warps;
  Schedule schedule = Schedule::automatic;  // forward kernels only (the weight grad is cooperative)
  Multicast multicast = Multicast::automatic;  // weight grad with staged stores (tma, warps) only
  // Optional int32 [R] on the device, the MoE layout's row -> token map (DispatchMap::row_tokens):
  // -1 marks a padding row, and padding rows are a segment's last rows. The pipelined kernels then
  // take padding rows of A as zero and skip what only they feed: a 64-row half tile whose first row
  // is padding issues no MMA (its outputs are those of zero rows: 0, act(0)), and the weight grad
  // stops each segment's reduction after its last 64-row block holding a real row. (With 128-row
  // segments, up to a quarter of the rows are padding.) nullptr: every row is computed.
  const int* row_tokens = nullptr;
  // Whether callers that have padding marks pass them (SWITCHYARD_SM90_SKIP_PADDING=1|0).
  bool skip_padding = true;
  // Weight grad only: dB += A^T G instead of dB = A^T G (gradient accumulation in place).
  bool accumulate = false;
};

// Options from the switches (src/core/switches.h, parsed at start-up): variant, store, schedule,
// multicast and skip_padding from SWITCHYARD_SM90_GEMM, _STORE, _SCHEDULE, _MULTICAST and
// _SKIP_PADDING; the rest as Options{}. Cheap: a few field reads per call.
Options default_options();

// True when the current CUDA device is compute capability 9.0 and this build carries sm_90a code.
bool device_supported();

// Whether the shapes, dtypes, devices and alignments fit these kernels (and device_supported()).
// Callers fall back to another implementation when false.
bool supported(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, const Tensor& c);
bool weight_grad_supported(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, const Tensor& grad_b);
// pre == nullptr: pre is not kept. pre must not alias post (backward: grad_pre must not alias pre).
bool activation_supported(ExpertActivation activation, const Tensor& a, const Tensor& w1, const Tensor& expert_offsets,
                          const Tensor* pre, const Tensor& post);
bool activation_backward_supported(ExpertActivation activation, const Tensor& grad_out, const Tensor& w2,
                                   const Tensor& expert_offsets, const Tensor& pre, const Tensor& grad_pre);

// Asynchronous on `stream` (a cudaStream_t; nullptr = legacy default stream). Throw when not supported.
void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c,
                  void* stream);
void grouped_gemm(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, Tensor& c,
                  const Options& options, void* stream);
void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b,
                              void* stream);
void grouped_gemm_weight_grad(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, Tensor& grad_b,
                              const Options& options, void* stream);
// Fused activation epilogues; throw for Variant::basic. Rows at or beyond expert_offsets[E] of
// pre, post and grad_pre are not written.
void grouped_gemm_activation(ExpertActivation activation, const Tensor& a, const Tensor& w1,
                             const Tensor& expert_offsets, Tensor* pre, Tensor& post, const Options& options,
                             void* stream);
void grouped_gemm_activation_backward(ExpertActivation activation, const Tensor& grad_out, const Tensor& w2,
                                      const Tensor& expert_offsets, const Tensor& pre, Tensor& grad_pre,
                                      const Options& options, void* stream);

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
