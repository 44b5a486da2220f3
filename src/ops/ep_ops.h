// Expert-parallel row moves: the device-side bookkeeping of the token exchange in
// src/comm/expert_dispatch.h. One declaration, two backends, the conventions of src/ops/moe_ops.h:
//
//   switchyard::cpu::NAME   src/ops/cpu/ep_permute.cpp   reference (any dtype: rows move as bytes)
//   switchyard::cuda::NAME  src/ops/cuda/ep_permute.cu   same results bit for bit, on a stream
//   switchyard::ops::NAME   src/ops/ops.h                picks the backend from the context
//                                                        (src/ops/dispatch_ep.cpp)
//
// P ranks form the expert-parallel group, each holding L = E / P consecutive global experts
// (rank p: experts [p*L, (p+1)*L)). Global expert e = p*L + l is local expert l of rank p.
//
// Sender. Routing with segment_alignment 1 makes the expert-contiguous layout packed: expert e owns
// rows [offsets[e], offsets[e+1]) with no padding, so the rows for rank p are one contiguous run.
//   ep_send_counts:  send_counts[e] = offsets[e+1] - offsets[e], int32 [E], read as [P, L]:
//                    the rows this rank sends to (destination p, its local expert l).
//
// Receiver. recv_counts [P, L] (what the count all-to-all delivered): rows from source p for local
// expert l. The payload all-to-all delivers them packed in source-major order, (p, l) ascending.
// ep_receive_layout derives, from recv_counts alone:
//   packed_starts [P*L + 1]   packed_starts[p*L + l] = sum of recv_counts over (p', l') before (p, l)
//                             in source-major order; packed_starts[P*L] = N, all received rows
//   expert_totals [L]         T_l = sum_p recv_counts[p, l]
//   expert_offsets [L + 1]    the padded grouped-GEMM layout by local expert:
//                             expert_offsets[l] = sum_{l' < l} roundup(T_l', A), A = the alignment
//   segment_rows [P, L]       first padded row of the rows from (p, l):
//                             expert_offsets[l] + sum_{p' < p} recv_counts[p', l]
//                             (within an expert, rows are ordered by source rank, then as sent)
//   chunk_offsets [L + C]     chunk c = local experts [f_c, f_{c+1}), f_c = c*L/C (C <= L); its
//                             offsets relative to its first row sit at [f_c + c, f_{c+1} + c]:
//                             chunk_offsets[f_c + c + j] = expert_offsets[f_c + j] - expert_offsets[f_c]
//                             (so chunk c's grouped GEMMs run on a view starting at row 0).
// Rows of local expert l in the padded layout: [expert_offsets[l], expert_offsets[l] + T_l) hold
// data, [expert_offsets[l] + T_l, expert_offsets[l+1]) are segment padding.
//
//   ep_to_expert_layout(packed [N, D], experts [a, b)) -> padded [R, D]:
//       for every padded row r in [expert_offsets[a], expert_offsets[b]): the i-th row of (p, l)
//       gets packed[packed_starts[p*L + l] + i]; segment padding rows get zero. Rows outside the
//       range are untouched (other chunks).
//   ep_from_expert_layout(padded [R, D], experts [a, b)) -> packed [N, D]:
//       packed[packed_starts[p*L + l] + i] = padded[segment_rows[p, l] + i] for l in [a, b), every
//       p and i < recv_counts[p, l]. Other packed rows are untouched.
// The two are inverse on data rows. `expected_rows` (the host's count of padded rows in the range,
// known from the one host copy of the counts) only sizes the CUDA launch; the kernels read the true
// range from expert_offsets on the device, so a wrong hint costs speed, never correctness.
// Counts and offsets are int32 (the layouts of src/ops/moe_ops.h are int32 too).
#pragma once

#include <cstdint>

#include "src/core/tensor.h"

namespace switchyard {

// The receive-side layout of one exchange: int32 tensors on the backend's device.
struct EpReceiveLayout {
  int num_ranks = 1;      // P
  int local_experts = 1;  // L
  int chunks = 1;         // C, 1 <= C <= L
  int alignment = 1;      // A, rows; the grouped GEMM tile height
  Tensor recv_counts;     // [P, L]  input
  Tensor packed_starts;   // [P*L + 1]
  Tensor expert_totals;   // [L]
  Tensor expert_offsets;  // [L + 1]
  Tensor segment_rows;    // [P, L]
  Tensor chunk_offsets;   // [L + C]
};

// Checks what both backends need of a layout (SY_CHECK naming the field): 1 <= P, 1 <= C <= L,
// A >= 1, every tensor int32 of the documented shape on `device`.
void validate_ep_receive_layout(const EpReceiveLayout& layout, DeviceKind device);

// First local expert of chunk `chunk` of `chunks` over `local_experts` (chunk == chunks: the end).
inline int ep_chunk_first_expert(int chunk, int chunks, int local_experts) {
  return int(int64_t(chunk) * local_experts / chunks);
}

namespace cpu {
void ep_send_counts(const Tensor& expert_offsets, Tensor& send_counts);
void ep_receive_layout(EpReceiveLayout& layout);
void ep_to_expert_layout(const Tensor& packed, const EpReceiveLayout& layout, int first_expert, int end_expert,
                         int64_t expected_rows, Tensor& padded);
void ep_from_expert_layout(const Tensor& padded, const EpReceiveLayout& layout, int first_expert, int end_expert,
                           int64_t expected_rows, Tensor& packed);
}  // namespace cpu

namespace cuda {
void ep_send_counts(const Tensor& expert_offsets, Tensor& send_counts, void* stream);
void ep_receive_layout(EpReceiveLayout& layout, void* stream);
void ep_to_expert_layout(const Tensor& packed, const EpReceiveLayout& layout, int first_expert, int end_expert,
                         int64_t expected_rows, Tensor& padded, void* stream);
void ep_from_expert_layout(const Tensor& padded, const EpReceiveLayout& layout, int first_expert, int end_expert,
                           int64_t expected_rows, Tensor& packed, void* stream);
}  // namespace cuda

}  // namespace switchyard

// Last, because ops.h includes this header for its types: callers that include only this header
// (src/comm/expert_dispatch.h) still get ExecContext and the ops:: entry points.
#include "src/ops/ops.h"
