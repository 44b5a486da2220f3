// Routing of the CUDA attention core between cuDNN's fused scaled-dot-product attention
// (src/ops/cuda/attention_cudnn.cu, graphs in attention_cudnn_graph.cpp) and the cuBLAS + causal
// softmax path (src/ops/cuda/attention.cu), which stays as the fallback. Plain C++: tests and
// benchmarks include it to pick a path and to ask whether the fused one can run.
//
// The fused path takes a call when the activations are bf16 or fp16, head_dim is 64 or 128, the
// device is sm90, the cuDNN library is 9.x (not 9.10.0/9.10.1, whose SDPA has known bugs) and the
// plans for the shape build. It computes the same function as the fallback (src/ops/model_ops.h):
// out, softmax_stats (row logsumexp of the scaled scores, fp32 [B, H, S]) and grad_qkv, with fp32
// accumulation and the probabilities / dS rounded to the activation type before the second GEMMs.
//
// Path (SWITCHYARD_ATTENTION, parsed at start-up into switches().attention, src/core/switches.h;
// tests pick one with ScopedSwitches):
//   auto (default, or unset)  cuDNN where supported, else the fallback; a plan that fails to build
//                             falls back with a one-time warning per shape
//   cudnn                     cuDNN or an error (bad input if the call is outside what cuDNN
//                             supports, a failure if the plan does not build)
//   cudnn-nondeterministic    as cudnn, but the backward accumulates dQ with fp32 atomics (less
//                             workspace; run-to-run bits of dQ may differ)
//   cublas                    always the fallback
// auto and cudnn use the deterministic backward graph (dQ from its own GEMM over a dS workspace,
// no float atomics) unless the caller passes deterministic = false (training with
// parallel.deterministic: false, the default), which takes the atomic-dQ graph: about 12% less
// time in the attention backward on bench-1gpu (H100, 18.3 -> 16.1 ms per step), run-to-run bits of
// dQ may differ. parallel.deterministic: true keeps training bit-reproducible (docs/TRAINING.md).
#pragma once

#include <cstdint>
#include <string>

#include "src/ops/model_ops.h"
#include "src/core/switches.h"

namespace switchyard {
namespace cuda {

using switchyard::AttentionPath;  // automatic | cudnn | cudnn_nondeterministic | cublas

// "auto", "cudnn", "cudnn-nondeterministic", "cublas" (an empty string is auto); anything else is
// bad input naming the accepted values.
AttentionPath parse_attention_path(const std::string& text);
const char* attention_path_name(AttentionPath path);
// The process-wide path: switches().attention.
AttentionPath attention_path();

// What the fused path can do for one shape and dtype, with the backward graph of `deterministic`.
struct CudnnAttentionProbe {
  bool eligible = false;            // dtype, head_dim, device, cuDNN version and sizes allow it
  bool forward_ready = false;       // the forward plan built
  bool backward_ready = false;      // the backward plan built
  std::string reason;               // why not (empty when both are ready)
  int64_t cudnn_version = 0;        // cudnnGetVersion(), e.g. 91900
  int64_t forward_workspace_bytes = 0;   // caller workspace that avoids the internal buffer
  int64_t backward_workspace_bytes = 0;  // (backend workspace + row sums + dQ accumulator)
  std::string forward_engine, backward_engine;  // "engine 8 (heuristics mode A, config 0)" etc.
};

// Builds (or finds in the cache) both plans for `shape` / `dtype` on the current device and
// `stream` and reports the outcome; never throws for an unsupported case.
CudnnAttentionProbe probe_cudnn_attention(const AttentionShape& shape, DType dtype, bool deterministic, void* stream);

}  // namespace cuda

namespace cuda_detail {
// Entry points of src/ops/cuda/attention.cu, called after its argument checks: run the fused path
// and return true, or return false when the fallback must run (see the path rules above). The
// workspace is used when it is device memory of at least the probe's bytes (256-byte aligned);
// otherwise a buffer cached per stream is.
bool cudnn_attention_forward(const AttentionShape& shape, const Tensor& qkv, Tensor& out, Tensor& softmax_stats,
                             Tensor& workspace, void* stream);
// deterministic = false: the atomic-dQ plan unless SWITCHYARD_ATTENTION names a path (auto follows
// the caller; cudnn-nondeterministic is atomic whatever the caller asks).
bool cudnn_attention_backward(const AttentionShape& shape, const Tensor& qkv, const Tensor& out,
                              const Tensor& grad_out, const Tensor& softmax_stats, Tensor& workspace,
                              Tensor& grad_qkv, bool deterministic, void* stream);
}  // namespace cuda_detail
}  // namespace switchyard
