// The small-batch expert path: expert GEMM 1, activation, expert GEMM 2 and the gated combine of
// the MoE layer in one op, for inference on a few tokens (streaming: 1 to 64 tokens).
//
//   switchyard::cpu::small_batch_experts   src/ops/cpu/small_batch_experts.cpp   f32 or f64 reference
//   switchyard::cuda::small_batch_experts  src/ops/cuda/small_batch_experts.cu   bf16 / f16, two kernels
//   switchyard::ops::small_batch_experts   src/ops/ops.h                         picks the backend
//                                                                                (src/ops/dispatch_moe.cpp)
//
// Math (T tokens, K choices per token, D = d_model, F = d_ff, E experts; conventions of
// src/ops/moe_ops.h):
//   y[t] = sum over kept choices j of gate[t, j] * O(t, j),        e = expert_ids[t, j]
//   O(t, j) = round(act(round(x[t] W1[e])) W2[e])                  W1 [E, D, F] (swiglu [E, D, 2F] =
//                                                                  [gate | up] columns), W2 [E, F, D]
// A choice is kept exactly when permute would give it a row: expert_ids >= 0 and
// 0 <= slots < capacity = scalars[kCapacity] (the routing's own drop rule, read on the device);
// dropped and empty choices contribute zero and a token without kept choices gets y = 0. Only
// expert_ids, gates, slots and scalars of the RoutingResult are read. The result is what the
// padded path (permute, grouped GEMM 1, activation, grouped GEMM 2, unpermute_combine) computes,
// with the same rounding points: the pre-activation, the activated hidden and each expert output
// are rounded to the activation dtype; the gated sum over choices is formed in fp32 (double on
// the CPU) in choice order and rounded once into y. Only the summation order inside the two
// matrix products differs on CUDA (CUDA cores, fp32), so results agree to bf16 accuracy; the CPU
// reference equals the CPU padded path bit for bit.
//
// Why: for a handful of tokens the padded path pads every used expert to a 128-row GEMM tile and
// runs five kernels; here each used expert's weights are streamed from memory once, at full
// bandwidth, by two kernels and nothing is padded.
//
// CUDA design (src/ops/cuda/small_batch_experts.cu): kernel 1 over (used expert, W1 column tile)
// writes act(x W1) of the expert's choices into workspace rows [T*K, F]; kernel 2 over (used
// expert, D column tile, split of F) writes fp32 partial products [splits, T*K, D], and the block
// that completes the last contribution to a D column tile combines that tile of y (a per-tile
// arrival counter in the workspace, reset by kernel 1). Blocks find their expert on the device (the
// u-th used expert in ascending id), so the host needs no routing counts: no sync, no allocation,
// fixed launch sizes for a given token count, capturable in a CUDA graph. Deterministic: fixed
// reduction orders, no float atomics. The launch geometry depends on the shape only (not on the
// GPU), so results are the same on every GPU.
//
// Limits of the CUDA version (small_batch_supported): bf16 or f16; D and F multiples of 8 (16-byte
// weight rows; weight and workspace bases 16-byte aligned, as allocations are); T*K <= 512;
// E <= 1024; K <= 8. The CPU reference takes any shape.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "src/ops/moe_ops.h"
#include "src/core/tensor.h"

namespace switchyard {

constexpr int64_t kSmallBatchMaxChoices = 512;  // T * K on CUDA
constexpr int kSmallBatchMaxExperts = 1024;     // E on CUDA: a 1024-bit set of used experts per block
constexpr int64_t kSmallBatchPackElements = 8;  // 16 bytes of bf16 / f16
// CUDA launch geometry: a weight tile is 4 packs of every row it covers (kernel 1 gelu: 32
// output columns; swiglu: 16 gate + the 16 matching up columns; kernel 2: 32 columns of D). About
// 256 blocks (2 resident per H100 multiprocessor, one wave) keep ~8 MB of loads in flight, more
// than HBM needs to stream at full speed; a split of F keeps >= 256 rows so each thread still has
// several rows to load.
constexpr int64_t kSmallBatchTargetBlocks = 256;
constexpr int64_t kSmallBatchMinSplitRows = 256;
constexpr size_t kSmallBatchWorkspaceAlignment = 256;

// How the CUDA version lays out one call (host arithmetic on the shape alone).
struct SmallBatchGeometry {
  int64_t choices = 0;               // N = T * K: rows of the hidden and partial workspace
  int64_t expert_bound = 0;          // min(E, N): used experts at most (grid rows)
  int64_t w1_tile_columns = 0;       // output columns of one kernel 1 tile (32 gelu, 16 swiglu)
  int64_t w1_tiles = 0;              // tiles of one expert's activation output (F columns)
  int64_t w1_blocks_per_expert = 0;  // kernel 1 blocks per used expert (each loops over tiles)
  int64_t d_tiles = 0;               // 32-column tiles of D
  int64_t f_splits = 0, split_rows = 0;  // W2 rows (F) in f_splits ranges of split_rows
  int64_t w2_blocks_per_expert = 0;  // kernel 2 blocks per used expert, each loops over (tile, split)
  size_t counters_offset = 0, hidden_offset = 0, partial_offset = 0, workspace_bytes = 0;
};

namespace small_batch_detail {
inline int64_t ceil_div(int64_t value, int64_t divisor) { return (value + divisor - 1) / divisor; }
inline size_t align_bytes(size_t value) {
  return (value + kSmallBatchWorkspaceAlignment - 1) / kSmallBatchWorkspaceAlignment * kSmallBatchWorkspaceAlignment;
}
// Blocks that share `items` work items evenly when about `wanted` blocks are wanted.
inline int64_t balanced_blocks(int64_t items, int64_t wanted) {
  const int64_t per_block = ceil_div(items, std::max<int64_t>(1, std::min(items, wanted)));
  return ceil_div(items, per_block);
}
}  // namespace small_batch_detail

// Geometry for `tokens` tokens (>= 1) of a layer; activation_bytes: 2 (bf16 / f16).
inline SmallBatchGeometry small_batch_geometry(int64_t tokens, int k, int num_experts, int64_t d_model,
                                               int64_t d_ff, ExpertActivation activation, size_t activation_bytes) {
  using namespace small_batch_detail;
  SmallBatchGeometry geometry;
  geometry.choices = tokens * k;
  geometry.expert_bound = std::max<int64_t>(1, std::min<int64_t>(num_experts, geometry.choices));
  const int64_t wanted_per_expert = ceil_div(kSmallBatchTargetBlocks, geometry.expert_bound);
  geometry.w1_tile_columns = activation == ExpertActivation::swiglu ? 16 : 32;
  geometry.w1_tiles = ceil_div(d_ff, geometry.w1_tile_columns);
  geometry.w1_blocks_per_expert = balanced_blocks(geometry.w1_tiles, wanted_per_expert);
  geometry.d_tiles = ceil_div(d_model, 32);
  const int64_t most_splits = std::max<int64_t>(1, d_ff / kSmallBatchMinSplitRows);
  const int64_t splits = std::min(most_splits, std::max<int64_t>(1, ceil_div(wanted_per_expert, geometry.d_tiles)));
  geometry.split_rows = ceil_div(ceil_div(d_ff, splits), kSmallBatchPackElements) * kSmallBatchPackElements;
  geometry.f_splits = ceil_div(d_ff, geometry.split_rows);
  geometry.w2_blocks_per_expert = balanced_blocks(geometry.d_tiles * geometry.f_splits, wanted_per_expert);
  geometry.counters_offset = 0;
  geometry.hidden_offset = align_bytes(size_t(geometry.d_tiles) * sizeof(int32_t));
  geometry.partial_offset =
      geometry.hidden_offset + align_bytes(size_t(geometry.choices) * size_t(d_ff) * activation_bytes);
  geometry.workspace_bytes =
      geometry.partial_offset + size_t(geometry.f_splits) * size_t(geometry.choices) * size_t(d_model) * sizeof(float);
  return geometry;
}

// Workspace bytes that serve every token count 1..max_tokens (the CUDA version's scratch).
inline size_t small_batch_workspace_bytes(int64_t max_tokens, int k, int num_experts, int64_t d_model, int64_t d_ff,
                                          ExpertActivation activation, size_t activation_bytes) {
  size_t bytes = 0;
  for (int64_t tokens = 1; tokens <= max_tokens; ++tokens)
    bytes = std::max(bytes, small_batch_geometry(tokens, k, num_experts, d_model, d_ff, activation, activation_bytes)
                                .workspace_bytes);
  return bytes;
}

// Whether the CUDA version takes this problem (the limits in the top comment).
inline bool small_batch_supported(DType dtype, int64_t tokens, int k, int num_experts, int64_t d_model, int64_t d_ff) {
  return (dtype == DType::bf16 || dtype == DType::f16) && tokens >= 1 && k >= 1 && k <= 8 &&
         tokens * k <= kSmallBatchMaxChoices && num_experts >= 1 && num_experts <= kSmallBatchMaxExperts &&
         d_model >= 1 && d_ff >= 1 && d_model % kSmallBatchPackElements == 0 && d_ff % kSmallBatchPackElements == 0;
}

namespace cpu {
// x [T, D], w1 [E, D, F or 2F], w2 [E, F, D], y [T, D] and routing.gates [T, K]: all f32 or all f64.
void small_batch_experts(ExpertActivation activation, const Tensor& x, const RoutingResult& routing, const Tensor& w1,
                         const Tensor& w2, Tensor& y);
}  // namespace cpu

namespace cuda {
// x, w1, w2, y bf16 or f16 (one dtype); routing.gates fp32; `workspace` any dtype on the device with
// at least small_batch_geometry(...).workspace_bytes bytes (its contents need not be initialized
// and are clobbered). Enqueued on `stream`; no host sync, no allocation.
void small_batch_experts(ExpertActivation activation, const Tensor& x, const RoutingResult& routing, const Tensor& w1,
                         const Tensor& w2, Tensor& workspace, Tensor& y, void* stream);
}  // namespace cuda

}  // namespace switchyard

// Last, because ops.h includes this header for its types: callers that include only this header
// still get ExecContext and ops::small_batch_experts.
#include "src/ops/ops.h"
