// cuDNN backend graphs of causal scaled-dot-product attention (internal to src/ops/cuda/
// attention_cudnn.cu; built in attention_cudnn_graph.cpp). The graphs are the ones cudnn-frontend's
// composite SDPA nodes lower to, so cuDNN's fused flash-attention engines recognise them.
//
// Layouts (elements; D = H * Dh, all views into the caller's row-major tensors):
//   Q, V, dQ, dK, dV  [B, H, S, Dh]  strides {S*3D, Dh, 3D, 1}   (q | k | v packed in qkv [T, 3D])
//   K^T, V^T          [B, H, Dh, S]  strides {S*3D, Dh, 1, 3D}   (the same memory, transposed view)
//   O, dO             [B, H, S, Dh]  strides {S*D, Dh, D, 1}
//   Stats             [B, H, S, 1]   strides {H*S, S, 1, 1}      fp32 row logsumexp
// The backward also needs the row sums dO . O ("softmax_sum", fp32 [B, H, S, 1]) and, in the
// non-deterministic form, an fp32 dQ accumulator [B, H, S, Dh]; both live in the workspace.
#pragma once

#include <cudnn.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace switchyard {
namespace cuda_detail {
namespace sdpa {

enum class Direction { forward, backward };

// Everything a plan depends on (the key of the plan cache, together with device and stream).
struct GraphSpec {
  int64_t batch = 0, seq_len = 0, heads = 0, head_dim = 0;
  cudnnDataType_t io_type = CUDNN_DATA_BFLOAT16;  // Q, K, V, O, dO, dQ, dK, dV
  Direction direction = Direction::forward;
  bool deterministic = true;  // backward only: dQ from its own GEMM instead of fp32 atomics
  int64_t cudnn_version = 0;  // runtime cudnnGetVersion(): selects the version workarounds

  bool operator<(const GraphSpec& other) const;
  std::string describe() const;  // "backward bf16 B=2 S=100 H=3 Dh=64 deterministic"
};

// Unique ids of the graph's non-virtual tensors (the variant pack).
enum TensorUid : int64_t {
  kUidQ = 1,
  kUidKTransposed,
  kUidV,  // V in the forward, V^T in the backward (same memory)
  kUidO,
  kUidStats,
  kUidGradO,
  kUidGradQ,
  kUidGradK,
  kUidGradV,
  kUidScale,         // by value: 1 / sqrt(Dh)
  kUidMaskFill,      // by value: the masked score (-inf, or lowest() before cuDNN 9.10)
  kUidOne,           // by value: 1 (the dropout-free scale of softmax_sum)
  kUidSoftmaxSum,    // workspace: dO . O per row
  kUidGradQAccum,    // workspace: fp32 dQ accumulator (non-deterministic backward)
  kUidSeqLenQ,       // device int32 [B]: S (padding-mask workaround, cuDNN <= 9.15)
  kUidSeqLenKV,
};

// A finalized execution plan with everything it refers to. The descriptors are destroyed with it.
struct BuiltPlan {
  BuiltPlan() = default;
  BuiltPlan(const BuiltPlan&) = delete;
  BuiltPlan& operator=(const BuiltPlan&) = delete;
  ~BuiltPlan();

  std::vector<cudnnBackendDescriptor_t> descriptors;
  cudnnBackendDescriptor_t plan = nullptr;
  int64_t backend_workspace_bytes = 0;
  bool uses_grad_q_accumulator = false;   // kUidGradQAccum is in the graph
  bool zero_grad_q_accumulator = false;   // cuDNN < 9.6 expects it zeroed by the caller
  bool uses_sequence_lengths = false;     // kUidSeqLenQ / kUidSeqLenKV are in the graph
  // Host values of the by-value scalars; the variant pack points at these.
  float scale = 0.0f, mask_fill = 0.0f, one = 1.0f;
  std::string engine;  // "engine 8 (heuristics mode A, config 0 of 3)"
  bool engine_nondeterministic = false;  // the engine's numerical notes say so
};

// Builds the graph of `spec` on `handle` and the first plan cuDNN's heuristics offer (mode A, then
// the fallback mode) that finalizes. Throws switchyard::Error naming the graph, the step, the
// descriptor attribute, the cuDNN status and cuDNN's last error message when anything fails.
std::unique_ptr<BuiltPlan> build_attention_plan(cudnnHandle_t handle, const GraphSpec& spec);

}  // namespace sdpa
}  // namespace cuda_detail
}  // namespace switchyard
