// Streaming mode: a low-latency MoE layer forward for small batches (1 to 64 tokens), replayed
// from a CUDA graph.
//
// MoeStreamStep owns a MoeLayer (src/model/moe_layer.h), its own stream, and fixed device buffers
// for the input x [max_tokens, D] and the output y [max_tokens, D]. For each token count T it
// serves, it runs the layer's inference forward once eagerly (warm-up: the layer's scratch,
// cuBLASLt plans and kernel attributes are created then), captures the same forward on its stream
// into a CUDA graph (cudaStreamBeginCapture / EndCapture / GraphInstantiate) and from then on
// replays that graph, one launch with no host work between kernels. The forward is an inference
// one (for_backward = false), so for T <= layer().small_batch_tokens() (8 unless
// SWITCHYARD_SMALL_BATCH_TOKENS says otherwise) the graph holds router GEMM, routing and the
// small-batch expert op (src/ops/small_batch_ops.h: each used expert's weights streamed once, no
// padding to GEMM tiles, 4 kernels in all); larger T take router GEMM, routing, permute, the
// grouped expert GEMMs, activation and combine. The graph bakes in every address it touches:
// the weights passed at construction (which must stay where they are), the fixed input/output
// buffers and the layer's own buffers. So callers write tokens into input(T) (or let step() copy
// them there) and read output(T) after run(T).
//
// Nothing inside the captured forward may synchronize or allocate. The small-batch path never
// does (its workspace is the layer's, allocated at construction). The padded path qualifies on
// CUDA when activations are bf16, segment_alignment is a multiple of 128 and
// the GPU is sm_90 (the hand-written grouped GEMMs read the expert offsets on the device; the
// cuBLAS fallback reads them on the host, which a capture cannot do), read_losses is off, and
// compute_mode is sparse (dense mode builds its row map on the host). The constructor rejects the
// configurations known to break capture; a capture that fails anyway is reported with the layer
// stage that was being enqueued (the layer's MoeStageObserver) and the CUDA error. The capture
// also checks that the caching allocator made no driver allocation while capturing.
//
// On the CPU backend (and with use_graph = false) run() calls the layer's forward directly on the
// same fixed buffers: same results, no graph. That is the eager baseline the benchmark compares.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "src/model/moe_layer.h"

namespace switchyard {

struct MoeStreamOptions {
  int64_t max_tokens = 64;
  bool use_graph = true;  // CUDA only: capture and replay (false: eager forward every step)
};

class MoeStreamStep {
 public:
  // `weights` (router [D, E], w1, w2 in the activation dtype, on `device`) must outlive the step
  // and keep their addresses.
  MoeStreamStep(const MoeLayerConfig& config, DeviceKind device, DType activation_dtype, const MoeWeights& weights,
                const MoeStreamOptions& options = MoeStreamOptions());
  ~MoeStreamStep();
  MoeStreamStep(const MoeStreamStep&) = delete;
  MoeStreamStep& operator=(const MoeStreamStep&) = delete;

  // The fixed buffers, as [tokens, D] views (1 <= tokens <= max_tokens).
  Tensor input(int64_t tokens) const;
  Tensor output(int64_t tokens) const;
  // y = MoE(x) for the first `tokens` rows of input() into output(), enqueued on context().stream;
  // the first call for a token count warms up and captures (it synchronizes), later ones replay.
  void run(int64_t tokens);
  // Copies x ([T, D], host or device memory) into input(T), runs, copies output(T) into y (host or
  // device). A host y is complete on return; a device y is ordered on context().stream.
  void step(const Tensor& x, Tensor& y);
  // Captures the graph for `tokens` now (run() would do it on first use).
  void prepare(int64_t tokens);
  void synchronize() const;

  const ExecContext& context() const { return context_; }
  MoeLayer& layer() { return layer_; }
  int64_t max_tokens() const { return max_tokens_; }
  bool uses_graph() const { return use_graph_; }
  bool has_graph(int64_t tokens) const { return graphs_.count(tokens) != 0; }
  int64_t graph_count() const { return int64_t(graphs_.size()); }

 private:
  void forward(int64_t tokens);  // the layer's inference forward on the fixed buffers
  void capture(int64_t tokens);

  MoeLayer layer_;
  MoeWeights weights_;
  DeviceKind device_;
  DType activation_dtype_;
  int64_t max_tokens_;
  bool use_graph_;
  ExecContext context_;
  Buffer input_, output_;
  std::map<int64_t, void*> graphs_;  // token count -> cudaGraphExec_t
};

// Timings of a MoeStreamStep at one token count, in microseconds (for benchmarks).
struct StreamLatency {
  std::vector<double> step_us;         // each run(): device events on its stream (host clock on CPU)
  std::vector<double> request_us;      // each step(x, y) with host x and y: copy in, run, copy out, wait
  double steps_per_s = 0.0;            // requests one at a time (the request loop)
  double pipelined_steps_per_s = 0.0;  // run() back to back with one wait at the end
};
// `warmup` untimed steps, then `steps` timed ones of each kind; x and y: [T, D] host tensors.
StreamLatency measure_stream_latency(MoeStreamStep& step, const Tensor& x, Tensor& y, int warmup, int steps);

// The CUDA graph calls streaming mode needs; defined in src/model/cuda_moe_stream_graph.cpp (CUDA
// builds only). Every call is checked; errors throw switchyard::Error.
namespace stream_graph {
void begin_capture(void* stream);                 // thread-local capture mode
void* end_capture_and_instantiate(void* stream);  // returns a cudaGraphExec_t
void abandon_capture(void* stream) noexcept;      // leaves capture mode after a failure, drops the graph
std::string capture_problem(void* stream);        // "" while the capture is healthy, else what broke it
void launch(void* graph_exec, void* stream);
void destroy(void* graph_exec) noexcept;
}  // namespace stream_graph

}  // namespace switchyard
