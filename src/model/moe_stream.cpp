// Streaming mode: the MoE layer forward captured in a CUDA graph (src/model/moe_stream.h).
#include "src/model/moe_stream.h"

#include <chrono>
#include <string>

#include "src/core/error.h"
#include "src/core/timing.h"

namespace switchyard {
namespace {

// Remembers which layer stage is being enqueued while a capture runs, and the first stage after
// which the capture was found broken (a stage that synchronized, or an illegal call).
class CaptureTracker : public MoeStageObserver {
 public:
  explicit CaptureTracker(void* stream) : stream_(stream) {}
  void stage_begin(const ExecContext&, const char* stage) override { current_ = stage; }
  void stage_end(const ExecContext&, const char* stage) override {
#if defined(SWITCHYARD_WITH_CUDA)
    if (broken_stage_.empty()) {
      std::string problem = stream_graph::capture_problem(stream_);
      if (!problem.empty()) {
        broken_stage_ = stage;
        problem_ = problem;
      }
    }
#else
    (void)stage;
#endif
  }
  const std::string& current() const { return current_; }
  const std::string& broken_stage() const { return broken_stage_; }
  const std::string& problem() const { return problem_; }

 private:
  void* stream_;
  std::string current_ = "(before the first stage)", broken_stage_, problem_;
};

#if defined(SWITCHYARD_WITH_CUDA)
const char* kCaptureHint =
    " (streaming mode needs a forward that neither synchronizes nor allocates: bf16 activations, "
    "segment_alignment a multiple of 128 on an sm_90 GPU so the grouped GEMMs take the device-offset path, "
    "sparse compute mode; see src/model/moe_stream.h)";
#endif

}  // namespace

MoeStreamStep::MoeStreamStep(const MoeLayerConfig& config, DeviceKind device, DType activation_dtype,
                             const MoeWeights& weights, const MoeStreamOptions& options)
    : layer_(config, device, activation_dtype, options.max_tokens),
      weights_(weights),
      device_(device),
      activation_dtype_(activation_dtype),
      max_tokens_(options.max_tokens),
      use_graph_(options.use_graph && device == DeviceKind::cuda) {
  SY_CHECK_INPUT(config.moe.complexity != ComplexityMode::given,
                 "streaming mode: complexity = given needs a per-token input the stream does not take");
  if (use_graph_) {
    SY_CHECK_INPUT(activation_dtype == DType::bf16, "streaming mode's CUDA graph needs bf16 activations (the sm_90 ",
                   "grouped GEMM path); got ", dtype_name(activation_dtype), ". Use use_graph = false to run eagerly");
    SY_CHECK_INPUT(config.moe.segment_alignment % 128 == 0, "streaming mode's CUDA graph needs segment_alignment to be a ",
                   "multiple of 128 (got ", config.moe.segment_alignment,
                   "): other alignments take the cuBLAS grouped GEMM, which reads the expert offsets on the host");
    SY_CHECK_INPUT(config.moe.compute_mode == ExpertComputeMode::sparse,
                   "streaming mode's CUDA graph needs compute_mode sparse (dense mode builds its rows on the host)");
  }
  const int64_t d_model = config.d_model;
  const size_t bytes = size_t(max_tokens_ * d_model) * dtype_size(activation_dtype);
  input_ = Buffer(device, bytes);
  output_ = Buffer(device, bytes);
  // Defined contents before the first step (a caller may run() before writing every row).
  device_memset(input_.data(), device, 0, bytes);
  device_memset(output_.data(), device, 0, bytes);
  context_ = ExecContext{device, create_stream(device)};
}

MoeStreamStep::~MoeStreamStep() {
  // Never throw from here: work may still be queued; wait for it, then release the graphs.
  try {
    synchronize();
  } catch (...) {
  }
#if defined(SWITCHYARD_WITH_CUDA)
  for (auto& entry : graphs_) stream_graph::destroy(entry.second);
#endif
  graphs_.clear();
  try {
    destroy_stream(device_, context_.stream);
  } catch (...) {
  }
}

Tensor MoeStreamStep::input(int64_t tokens) const {
  SY_CHECK(tokens >= 1 && tokens <= max_tokens_, "MoeStreamStep: ", tokens, " tokens, the step holds 1 to ",
           max_tokens_);
  return input_.view(activation_dtype_, {tokens, layer_.config().d_model});
}

Tensor MoeStreamStep::output(int64_t tokens) const {
  SY_CHECK(tokens >= 1 && tokens <= max_tokens_, "MoeStreamStep: ", tokens, " tokens, the step holds 1 to ",
           max_tokens_);
  return output_.view(activation_dtype_, {tokens, layer_.config().d_model});
}

void MoeStreamStep::forward(int64_t tokens) {
  MoeForwardArgs args;
  args.training = false;     // inference: eval capacity factor, no jitter
  args.read_losses = false;  // reading them would synchronize
  args.for_backward = false;  // inference: no activations kept, and the small-batch path may run
  Tensor x = input(tokens), y = output(tokens);
  layer_.forward(context_, x, weights_, args, y);
}

void MoeStreamStep::prepare(int64_t tokens) {
  SY_CHECK(tokens >= 1 && tokens <= max_tokens_, "MoeStreamStep: ", tokens, " tokens, the step holds 1 to ",
           max_tokens_);
  if (use_graph_ && !has_graph(tokens)) capture(tokens);
}

void MoeStreamStep::run(int64_t tokens) {
  prepare(tokens);
  if (!use_graph_) {
    forward(tokens);
    return;
  }
#if defined(SWITCHYARD_WITH_CUDA)
  stream_graph::launch(graphs_.at(tokens), context_.stream);
#endif
}

void MoeStreamStep::step(const Tensor& x, Tensor& y) {
  SY_CHECK(x.rank == 2 && y.rank == 2 && x.dim(0) == y.dim(0), "MoeStreamStep::step: x ", x.describe(), " and y ",
           y.describe(), " must both be [T, D]");
  const int64_t tokens = x.dim(0);
  Tensor staged_input = input(tokens);
  ops::copy(context_, x, staged_input);
  run(tokens);
  ops::copy(context_, output(tokens), y);
}

void MoeStreamStep::synchronize() const { ops::synchronize(context_); }

void MoeStreamStep::capture(int64_t tokens) {
#if defined(SWITCHYARD_WITH_CUDA)
  // Warm-up on this very stream: per-stream scratch, cuBLASLt plans and kernel attributes are
  // created here, outside the capture.
  forward(tokens);
  synchronize();
  const AllocatorStats before = cuda_allocator_stats();
  CaptureTracker tracker(context_.stream);
  layer_.set_stage_observer(&tracker);
  stream_graph::begin_capture(context_.stream);
  try {
    forward(tokens);
  } catch (const Error& error) {
    layer_.set_stage_observer(nullptr);
    stream_graph::abandon_capture(context_.stream);
    SY_THROW("streaming mode: capturing the MoE layer forward for ", tokens, " tokens failed in stage '",
             tracker.current(), "': ", error.message(), kCaptureHint);
  } catch (...) {
    layer_.set_stage_observer(nullptr);
    stream_graph::abandon_capture(context_.stream);
    throw;
  }
  layer_.set_stage_observer(nullptr);
  if (!tracker.broken_stage().empty()) {
    stream_graph::abandon_capture(context_.stream);
    SY_THROW("streaming mode: the capture of the MoE layer forward for ", tokens, " tokens broke in stage '",
             tracker.broken_stage(), "': ", tracker.problem(), kCaptureHint);
  }
  void* graph = nullptr;
  try {
    graph = stream_graph::end_capture_and_instantiate(context_.stream);
  } catch (const Error& error) {
    SY_THROW("streaming mode: ending the capture of the MoE layer forward for ", tokens,
             " tokens failed: ", error.message(), kCaptureHint);
  }
  const AllocatorStats after = cuda_allocator_stats();
  if (after.driver_allocations != before.driver_allocations) {
    stream_graph::destroy(graph);
    SY_THROW("streaming mode: the MoE layer forward allocated device memory (",
             after.driver_allocations - before.driver_allocations, " cudaMalloc calls) while being captured for ",
             tokens, " tokens; a graph must not capture allocations", kCaptureHint);
  }
  graphs_[tokens] = graph;
#else
  (void)tokens;
  SY_THROW("MoeStreamStep: CUDA graphs need a CUDA build");
#endif
}

StreamLatency measure_stream_latency(MoeStreamStep& step, const Tensor& x, Tensor& y, int warmup, int steps) {
  SY_CHECK(x.device == DeviceKind::cpu && y.device == DeviceKind::cpu && x.rank == 2, "measure_stream_latency: x ",
           x.describe(), " and y ", y.describe(), " must be [T, D] host tensors");
  SY_CHECK(warmup >= 0 && steps >= 1, "measure_stream_latency: warmup ", warmup, ", steps ", steps);
  using Clock = std::chrono::steady_clock;
  const int64_t tokens = x.dim(0);
  StreamLatency latency;
  for (int index = 0; index < warmup; ++index) step.step(x, y);
  DeviceTimer timer(step.context().device, step.context().stream);
  for (int index = 0; index < steps; ++index) {
    timer.start();
    step.run(tokens);
    timer.stop();
    latency.step_us.push_back(timer.elapsed_ms() * 1e3);
  }
  const Clock::time_point loop_start = Clock::now();
  for (int index = 0; index < steps; ++index) {
    const Clock::time_point start = Clock::now();
    step.step(x, y);
    latency.request_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - start).count());
  }
  latency.steps_per_s = steps / std::chrono::duration<double>(Clock::now() - loop_start).count();
  const Clock::time_point pipelined_start = Clock::now();
  for (int index = 0; index < steps; ++index) step.run(tokens);
  step.synchronize();
  latency.pipelined_steps_per_s = steps / std::chrono::duration<double>(Clock::now() - pipelined_start).count();
  return latency;
}

}  // namespace switchyard
