// --breakdown and --stream of `switchyard bench moe` (src/cli/bench_moe_modes.h).
#include "src/cli/bench_moe_modes.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>

#include "src/core/timing.h"
#include "src/model/moe_stream.h"

namespace switchyard::bench_moe {
namespace {

// Device-event timing of the layer's stages: one DeviceTimer per (pass, stage), started at
// stage_begin and stopped at stage_end; collect() after each pass stores the elapsed times.
class StageTimer : public MoeStageObserver {
 public:
  explicit StageTimer(const ExecContext& context) : context_(context) {}
  void set_pass(const char* pass) { pass_ = pass; }
  void stage_begin(const ExecContext&, const char* stage) override { slot(stage).timer->start(); }
  void stage_end(const ExecContext&, const char* stage) override {
    Slot& found = slot(stage);
    found.timer->stop();
    found.pending = true;
  }
  // Waits for the recorded events of the last pass and keeps their times (discarded when !keep).
  void collect(bool keep) {
    for (Slot& entry : slots_) {
      if (!entry.pending) continue;
      const double milliseconds = entry.timer->elapsed_ms();
      if (keep) entry.samples.push_back(milliseconds);
      entry.pending = false;
    }
  }
  struct Slot {
    std::string pass, stage;
    std::unique_ptr<DeviceTimer> timer;
    std::vector<double> samples;
    bool pending = false;
  };
  const std::vector<Slot>& slots() const { return slots_; }

 private:
  Slot& slot(const char* stage) {
    for (Slot& entry : slots_)
      if (entry.pass == pass_ && entry.stage == stage) return entry;
    slots_.push_back(Slot{pass_, stage, std::make_unique<DeviceTimer>(context_.device, context_.stream), {}, false});
    return slots_.back();
  }
  ExecContext context_;
  std::string pass_ = "forward";
  std::vector<Slot> slots_;  // first-seen order, which is the layer's order
};

}  // namespace

// Times each stage of the layer (training forward, then backward) with device events, and the
// uninstrumented layer and the dense FFN of the same active size for comparison.
void run_breakdown(const BenchSettings& settings, const LayerShape& shape, std::vector<Record>& records) {
  const ExecContext& context = settings.context;
  MoeBench moe(settings, shape, ExpertComputeMode::sparse);
  DenseFfnBench dense(settings, shape);
  const double whole_forward = time_median_ms(settings, [&] { moe.forward(context, true); });
  const double whole_both = time_median_ms(settings, [&] { moe.forward_backward(context); });
  const double dense_forward = time_median_ms(settings, [&] { dense.forward(context); });
  const double dense_both = time_median_ms(settings, [&] { dense.forward_backward(context); });

  StageTimer timer(context);
  moe.layer->set_stage_observer(&timer);
  for (int iteration = 0; iteration < settings.warmup + settings.iterations; ++iteration) {
    timer.set_pass("forward");
    moe.forward(context, true);
    timer.set_pass("backward");
    moe.layer->backward(context, moe.grad_y_view, moe.weights, 1.0f, 1.0f, moe.grad_x_view, moe.gradients);
    timer.collect(iteration >= settings.warmup);
  }
  moe.layer->set_stage_observer(nullptr);
  // The rows the expert GEMMs really cover (segments padded to the alignment) and the FLOPs of each
  // GEMM stage over them, so the table shows how fast each grouped GEMM runs on its actual work.
  const MoeRoutingStats stats = moe.layer->read_routing_stats(context);
  const double padded = double(stats.padded_rows), d_model = shape.d_model, d_ff = shape.d_ff;
  const double w1_columns = double(moe.config.w1_columns());
  auto stage_flops = [&](const std::string& stage) -> double {
    if (stage == "expert GEMM 1" || stage == "weight grad 1" || stage == "data grad 1")
      return 2.0 * padded * d_model * w1_columns;
    if (stage == "expert GEMM 2" || stage == "weight grad 2" || stage == "data grad 2") return 2.0 * padded * d_ff * d_model;
    return 0.0;
  };

  char label[96];  // T,d,n,E,K,act: tells the records of several shapes apart
  std::snprintf(label, sizeof(label), "%lld,%d,%d,%d,%d,%s", (long long)shape.tokens, shape.d_model, shape.d_ff,
                shape.experts, shape.top_k, expert_activation_name(shape.activation));
  std::printf("\nStage breakdown, %lld tokens, d%d ff%d E%d top-%d %s (%s, %s), us (median of %d, %s)\n",
              (long long)shape.tokens, shape.d_model, shape.d_ff, shape.experts, shape.top_k,
              expert_activation_name(shape.activation), context.device == DeviceKind::cuda ? "cuda" : "cpu", dtype_name(settings.activation_dtype),
              settings.iterations, context.device == DeviceKind::cuda ? "device events" : "host clock");
  std::printf("expert rows: %lld padded rows hold %lld choices (%.2fx); buffers sized for %lld rows\n",
              (long long)stats.padded_rows, (long long)stats.total_choices,
              stats.total_choices > 0 ? padded / double(stats.total_choices) : 0.0, (long long)moe.layer->rows());
  std::printf("%-9s %-22s %10s %7s %9s\n", "pass", "stage", "us", "share", "TFLOP/s");
  double pass_sums[2] = {0.0, 0.0};
  for (const StageTimer::Slot& slot : timer.slots()) pass_sums[slot.pass == "forward" ? 0 : 1] += median(slot.samples);
  for (const StageTimer::Slot& slot : timer.slots()) {
    const double microseconds = median(slot.samples) * 1e3;
    const double pass_sum = pass_sums[slot.pass == "forward" ? 0 : 1] * 1e3;
    const double flops = stage_flops(slot.stage);
    std::printf("%-9s %-22s %10.1f %6.1f%% ", slot.pass.c_str(), slot.stage.c_str(), microseconds,
                pass_sum > 0 ? 100.0 * microseconds / pass_sum : 0.0);
    if (flops > 0 && microseconds > 0) std::printf("%9.1f\n", flops / (microseconds * 1e-6) / 1e12);
    else std::printf("%9s\n", "");
    Record record;
    record.add("part", "breakdown");
    record.add("shape", label);
    record.add("tokens", double(shape.tokens));
    record.add("pass", slot.pass);
    record.add("stage", slot.stage);
    record.add("us", microseconds);
    if (flops > 0 && microseconds > 0) record.add("tflops", flops / (microseconds * 1e-6) / 1e12);
    records.push_back(record);
  }
  const double whole_backward = whole_both - whole_forward;
  std::printf("sum of stages: forward %.1f us (whole %.1f), backward %.1f us (whole f+b minus fwd %.1f), "
              "f+b %.1f us (whole %.1f)\n",
              pass_sums[0] * 1e3, whole_forward * 1e3, pass_sums[1] * 1e3, whole_backward * 1e3,
              (pass_sums[0] + pass_sums[1]) * 1e3, whole_both * 1e3);
  std::printf("dense FFN of the same active size: forward %.1f us, f+b %.1f us; MoE/dense: forward %.2fx, f+b %.2fx\n",
              dense_forward * 1e3, dense_both * 1e3, whole_forward / dense_forward, whole_both / dense_both);
  Record summary;
  summary.add("part", "breakdown-total");
  summary.add("shape", label);
  summary.add("tokens", double(shape.tokens));
  summary.add("stages_fwd_us", pass_sums[0] * 1e3);
  summary.add("stages_bwd_us", pass_sums[1] * 1e3);
  summary.add("whole_fwd_us", whole_forward * 1e3);
  summary.add("whole_fwdbwd_us", whole_both * 1e3);
  summary.add("dense_fwd_us", dense_forward * 1e3);
  summary.add("dense_fwdbwd_us", dense_both * 1e3);
  summary.add("padded_rows", padded);
  summary.add("total_choices", double(stats.total_choices));
  records.push_back(summary);
}

// Streaming mode: the layer's inference forward for a few tokens, eagerly and replayed from a CUDA
// graph (MoeStreamStep), timed by measure_stream_latency; the graph's output must match the eager one.
void run_stream(const BenchSettings& settings, const LayerShape& shape, const std::vector<int64_t>& token_counts,
                int steps, std::vector<Record>& records) {
  const ExecContext& context = settings.context;
  MoeLayerConfig config;
  config.d_model = shape.d_model;
  config.moe.expert_d_ff = shape.d_ff;
  config.moe.num_experts = shape.experts;
  config.moe.top_k = config.moe.k_min = shape.top_k;
  config.moe.renormalize_gates = shape.top_k > 1;
  config.moe.dropless = true;  // serving: no token is dropped, as with the anchors
  config.moe.segment_alignment = context.device == DeviceKind::cuda ? 128 : 16;
  // Random weights as MoeBench draws them (no gradient buffers: inference only).
  const DType act = settings.activation_dtype;
  const int64_t d = shape.d_model, f = shape.d_ff, e = shape.experts;
  Buffer router = random_buffer(settings, act, d * e, 1.0f / std::sqrt(float(d)), settings.seed + 3);
  Buffer w1 = random_buffer(settings, act, e * d * config.w1_columns(), 1.0f / std::sqrt(float(d)), settings.seed + 4);
  Buffer w2 = random_buffer(settings, act, e * f * d, 1.0f / std::sqrt(float(f)), settings.seed + 5);
  const MoeWeights weights{router.view(act, {d, e}), w1.view(act, {e, d, config.w1_columns()}), w2.view(act, {e, f, d})};
  const int64_t max_tokens = shape.tokens;  // the largest of token_counts
  MoeStreamOptions graph_options, eager_options;
  graph_options.max_tokens = eager_options.max_tokens = max_tokens;
  eager_options.use_graph = false;
  MoeStreamStep graph(config, context.device, act, weights, graph_options);
  MoeStreamStep eager(config, context.device, act, weights, eager_options);
  const bool uses_graph = graph.uses_graph();
  std::printf("\nStreaming mode, d%d ff%d E%d top-%d (%s, %s, %s), %d steps per size; us\n", shape.d_model,
              shape.d_ff, shape.experts, shape.top_k, context.device == DeviceKind::cuda ? "cuda" : "cpu",
              dtype_name(settings.activation_dtype), uses_graph ? "CUDA graph" : "eager: no graph on this backend",
              steps);
  std::printf("%6s | %9s %9s | %11s %11s | %10s %10s | %9s %9s | %s\n", "tokens", "step p50", "step p99",
              "request p50", "request p99", "steps/s", "pipelined", "eager p50", "eager p99", "graph vs eager output");
  const size_t element = dtype_size(settings.activation_dtype);
  for (int64_t tokens : token_counts) {
    const int64_t count = tokens * shape.d_model;
    Buffer input =
        random_buffer(settings, settings.activation_dtype, count, 1.0f, settings.seed + 40 + uint64_t(tokens));
    Buffer host_in(DeviceKind::cpu, size_t(count) * element), host_out(DeviceKind::cpu, size_t(count) * element),
        host_eager(DeviceKind::cpu, size_t(count) * element);
    device_copy(host_in.data(), DeviceKind::cpu, input.data(), context.device, host_in.bytes());
    Tensor x = host_in.view(settings.activation_dtype, {tokens, shape.d_model});
    Tensor y = host_out.view(settings.activation_dtype, {tokens, shape.d_model});
    Tensor y_eager = host_eager.view(settings.activation_dtype, {tokens, shape.d_model});
    graph.step(x, y);  // warm-up and capture
    eager.step(x, y_eager);
    double max_difference = 0.0;  // the graph must compute what the eager forward computes
    for (int64_t index = 0; index < count; ++index) {
      auto value = [&](const Tensor& tensor) {
        return settings.activation_dtype == DType::f32 ? double(tensor.as<float>()[index])
                                                       : double(float(tensor.as<Bf16>()[index]));
      };
      max_difference = std::max(max_difference, std::fabs(value(y) - value(y_eager)));
    }
    const StreamLatency timed = measure_stream_latency(graph, x, y, settings.warmup, steps);
    const StreamLatency eager_timed = measure_stream_latency(eager, x, y_eager, settings.warmup, steps);
    const std::vector<double>& graph_us = timed.step_us;
    const std::vector<double>& request_us = timed.request_us;
    const std::vector<double>& eager_us = eager_timed.step_us;
    const double steps_per_s = timed.steps_per_s, pipelined_per_s = timed.pipelined_steps_per_s;
    std::printf("%6lld | %9.1f %9.1f | %11.1f %11.1f | %10.0f %10.0f | %9.1f %9.1f | max |diff| %.3g\n",
                (long long)tokens, median(graph_us), percentile(graph_us, 0.99), median(request_us),
                percentile(request_us, 0.99), steps_per_s, pipelined_per_s, median(eager_us),
                percentile(eager_us, 0.99), max_difference);
    Record record;
    record.add("part", "stream");
    record.add("tokens", double(tokens));
    record.add("graph", uses_graph ? "cuda-graph" : "eager");
    const std::pair<const char*, double> values[] = {
        {"step_us_p50", median(graph_us)},       {"step_us_p99", percentile(graph_us, 0.99)},
        {"request_us_p50", median(request_us)},  {"request_us_p99", percentile(request_us, 0.99)},
        {"steps_per_s", steps_per_s},            {"pipelined_steps_per_s", pipelined_per_s},
        {"eager_us_p50", median(eager_us)},      {"eager_us_p99", percentile(eager_us, 0.99)},
        {"max_abs_diff_vs_eager", max_difference}};
    for (const auto& [key, value] : values) record.add(key, value);
    records.push_back(record);
  }
}

}  // namespace switchyard::bench_moe
