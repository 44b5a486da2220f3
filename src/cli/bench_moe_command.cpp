// switchyard bench moe: times the whole MoE layer (router GEMM, routing, permute, expert GEMMs,
// combine; forward+backward includes every gradient and both losses) against a dense FFN of the
// same active size, plus the sparse-vs-dense-compute comparison, the expert GEMMs of a large
// layer, and routing alone. Medians of device-event timings after warm-up, on fresh random data.
// --breakdown times every stage of the layer's forward and backward separately (the layer reports
// its stage boundaries through MoeStageObserver, so the timed sequence is the layer's own) and
// compares the sum of the stage medians with the uninstrumented whole.
// --stream times streaming mode (src/model/moe_stream.h): a small-batch inference forward replayed
// from a CUDA graph, per step (median and p99 of device time per replay and of host latency per
// request, host buffers in and out) and in steps/s, against the same forward run eagerly.
//
// FLOP count of the expert GEMMs (forward): 2 * T * k * (D * F + F * D) (gelu) and
// 2 * T * k * (D * 2F + F * D) (swiglu); backward is twice that.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "src/cli/cli_args.h"
#include "src/cli/commands.h"
#include "src/core/device.h"
#include "src/core/timing.h"
#include "src/model/moe_layer.h"
#include "src/model/moe_stream.h"

namespace switchyard {
namespace {

struct BenchSettings {
  ExecContext context;
  DType activation_dtype = DType::bf16;
  int warmup = 5, iterations = 20;
  bool dropless = true;
  float capacity_factor = 1.25f;
  uint64_t seed = 1;
};

// A device tensor of normal(0, stddev) values, generated on the host in float and stored in `dtype`.
Buffer random_buffer(const BenchSettings& settings, DType dtype, int64_t count, float stddev, uint64_t seed) {
  std::mt19937_64 generator(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> values(static_cast<size_t>(count));
  for (float& value : values) value = normal(generator);
  Buffer host(DeviceKind::cpu, size_t(count) * dtype_size(dtype));
  Tensor host_float(values.data(), DType::f32, DeviceKind::cpu, {count});
  Tensor host_target = host.view(dtype, {count});
  if (dtype == DType::f32) std::copy(values.begin(), values.end(), host.as<float>());
  else cpu::convert(host_float, host_target);
  Buffer device(settings.context.device, host.bytes());
  device_copy(device.data(), settings.context.device, host.data(), DeviceKind::cpu, host.bytes());
  return device;
}

// Median time of fn in ms (warm-up first).
double time_median_ms(const BenchSettings& settings, const std::function<void()>& fn) {
  for (int i = 0; i < settings.warmup; ++i) fn();
  ops::synchronize(settings.context);
  DeviceTimer timer(settings.context.device, settings.context.stream);
  std::vector<double> samples;
  for (int i = 0; i < settings.iterations; ++i) {
    timer.start();
    fn();
    timer.stop();
    samples.push_back(timer.elapsed_ms());
  }
  return median(samples);
}

struct LayerShape {
  std::string name;
  int64_t tokens;
  int d_model, d_ff, experts, top_k;
};

double expert_forward_flops(const LayerShape& shape) {
  return 2.0 * double(shape.tokens) * shape.top_k * (2.0 * shape.d_model * shape.d_ff);
}

// The MoE layer with random weights, ready to time.
struct MoeBench {
  MoeLayerConfig config;
  std::unique_ptr<MoeLayer> layer;
  Buffer x, y, grad_y, grad_x, router, w1, w2, grad_router, grad_w1, grad_w2;
  MoeWeights weights;
  MoeGradients gradients;
  Tensor x_view, y_view, grad_y_view, grad_x_view;

  MoeBench(const BenchSettings& settings, const LayerShape& shape, MoeComputeMode mode) {
    config.d_model = shape.d_model;
    config.expert_d_ff = shape.d_ff;
    config.num_experts = shape.experts;
    config.k_max = config.k_min = shape.top_k;
    config.renormalize = shape.top_k > 1;
    config.dropless = settings.dropless;
    config.capacity_factor_train = config.capacity_factor_eval = settings.capacity_factor;
    config.compute_mode = mode;
    const DType act = settings.activation_dtype;
    layer = std::make_unique<MoeLayer>(config, settings.context.device, act, shape.tokens);
    const int64_t tokens = shape.tokens, d = shape.d_model, f = shape.d_ff, e = shape.experts;
    x = random_buffer(settings, act, tokens * d, 1.0f, settings.seed + 1);
    grad_y = random_buffer(settings, act, tokens * d, 1.0f, settings.seed + 2);
    router = random_buffer(settings, act, d * e, 1.0f / std::sqrt(float(d)), settings.seed + 3);
    w1 = random_buffer(settings, act, e * d * config.w1_columns(), 1.0f / std::sqrt(float(d)), settings.seed + 4);
    w2 = random_buffer(settings, act, e * f * d, 1.0f / std::sqrt(float(f)), settings.seed + 5);
    const DeviceKind device = settings.context.device;
    y = Buffer(device, size_t(tokens * d) * dtype_size(act));
    grad_x = Buffer(device, size_t(tokens * d) * dtype_size(act));
    const DType grad_dtype = layer->gradient_dtype();
    grad_router = Buffer(device, size_t(d * e) * dtype_size(grad_dtype));
    grad_w1 = Buffer(device, size_t(e * d * config.w1_columns()) * dtype_size(grad_dtype));
    grad_w2 = Buffer(device, size_t(e * f * d) * dtype_size(grad_dtype));
    weights = {router.view(act, {d, e}), w1.view(act, {e, d, config.w1_columns()}), w2.view(act, {e, f, d})};
    gradients = {grad_router.view(grad_dtype, {d, e}), grad_w1.view(grad_dtype, {e, d, config.w1_columns()}),
                 grad_w2.view(grad_dtype, {e, f, d})};
    x_view = x.view(act, {tokens, d});
    y_view = y.view(act, {tokens, d});
    grad_y_view = grad_y.view(act, {tokens, d});
    grad_x_view = grad_x.view(act, {tokens, d});
  }

  void forward(const ExecContext& context, bool training) {
    MoeForwardArgs args;
    args.training = training;
    args.read_losses = false;
    layer->forward(context, x_view, weights, args, y_view);
  }
  void forward_backward(const ExecContext& context) {
    forward(context, true);
    layer->backward(context, grad_y_view, weights, 1.0f, 1.0f, grad_x_view, gradients);
  }
};

// y = gelu(x W1) W2 with the same active size as the MoE layer (T*k rows), through the same gemm op.
struct DenseFfnBench {
  Buffer x, w1, w2, hidden, activated, y, grad_y, grad_activated, grad_hidden, grad_x, grad_w1, grad_w2;
  Tensor tx, tw1, tw2, th, ta, ty, tgy, tga, tgh, tgx, tgw1, tgw2;

  DenseFfnBench(const BenchSettings& settings, const LayerShape& shape) {
    const DType act = settings.activation_dtype;
    const DType grad_dtype = settings.context.device == DeviceKind::cuda ? DType::f32 : act;
    const int64_t rows = shape.tokens * shape.top_k, d = shape.d_model, f = shape.d_ff;
    const DeviceKind device = settings.context.device;
    auto buffer = [&](Buffer& storage, Tensor& view, DType dtype, int64_t r, int64_t c) {
      storage = Buffer(device, size_t(r * c) * dtype_size(dtype));
      view = storage.view(dtype, {r, c});
    };
    x = random_buffer(settings, act, rows * d, 1.0f, settings.seed + 11);
    tx = x.view(act, {rows, d});
    w1 = random_buffer(settings, act, d * f, 1.0f / std::sqrt(float(d)), settings.seed + 12);
    tw1 = w1.view(act, {d, f});
    w2 = random_buffer(settings, act, f * d, 1.0f / std::sqrt(float(f)), settings.seed + 13);
    tw2 = w2.view(act, {f, d});
    grad_y = random_buffer(settings, act, rows * d, 1.0f, settings.seed + 14);
    tgy = grad_y.view(act, {rows, d});
    buffer(hidden, th, act, rows, f);
    buffer(activated, ta, act, rows, f);
    buffer(y, ty, act, rows, d);
    buffer(grad_activated, tga, act, rows, f);
    buffer(grad_hidden, tgh, act, rows, f);
    buffer(grad_x, tgx, act, rows, d);
    buffer(grad_w1, tgw1, grad_dtype, d, f);
    buffer(grad_w2, tgw2, grad_dtype, f, d);
  }
  void forward(const ExecContext& context) {
    ops::gemm(context, false, false, 1.0f, tx, tw1, 0.0f, th);
    ops::activation_forward(context, ExpertActivation::gelu_tanh, th, ta);
    ops::gemm(context, false, false, 1.0f, ta, tw2, 0.0f, ty);
  }
  void forward_backward(const ExecContext& context) {
    forward(context);
    ops::gemm(context, false, true, 1.0f, tgy, tw2, 0.0f, tga);   // dA = dY W2^T
    ops::gemm(context, true, false, 1.0f, ta, tgy, 0.0f, tgw2);   // dW2 = A^T dY
    ops::activation_backward(context, ExpertActivation::gelu_tanh, th, tga, tgh);
    ops::gemm(context, false, true, 1.0f, tgh, tw1, 0.0f, tgx);   // dX = dH W1^T
    ops::gemm(context, true, false, 1.0f, tx, tgh, 0.0f, tgw1);   // dW1 = X^T dH
  }
};

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

struct Record {
  std::vector<std::pair<std::string, std::string>> fields;
  void add(const std::string& key, double value) {
    std::ostringstream stream;
    stream.precision(6);
    stream << value;
    fields.emplace_back(key, stream.str());
  }
  void add(const std::string& key, const std::string& value) { fields.emplace_back(key, "\"" + value + "\""); }
  std::string json() const {
    std::string out = "{";
    for (size_t i = 0; i < fields.size(); ++i)
      out += (i ? ", \"" : "\"") + fields[i].first + "\": " + fields[i].second;
    return out + "}";
  }
};

// Times each stage of the layer (training forward, then backward) with device events, and the
// uninstrumented layer and the dense FFN of the same active size for comparison.
void run_breakdown(const BenchSettings& settings, const LayerShape& shape, std::vector<Record>& records) {
  const ExecContext& context = settings.context;
  MoeBench moe(settings, shape, MoeComputeMode::sparse);
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

  std::printf("\nStage breakdown, %lld tokens, d%d ff%d E%d top-%d (%s, %s), us (median of %d, %s)\n",
              (long long)shape.tokens, shape.d_model, shape.d_ff, shape.experts, shape.top_k,
              context.device == DeviceKind::cuda ? "cuda" : "cpu", dtype_name(settings.activation_dtype),
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
  config.expert_d_ff = shape.d_ff;
  config.num_experts = shape.experts;
  config.k_max = config.k_min = shape.top_k;
  config.renormalize = shape.top_k > 1;
  config.dropless = true;  // serving: no token is dropped, as with the anchors
  config.segment_alignment = context.device == DeviceKind::cuda ? 128 : 16;
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

}  // namespace

int command_bench_moe(int argc, char** argv) {
  ArgParser parser("switchyard bench moe",
                   "Time the MoE layer against a dense FFN of the same active size, sparse against\n"
                   "dense-compute mode, the expert GEMMs of a large layer, and routing alone.");
  parser.add_option("device", "auto|cpu|cuda", "where to run (cpu: only with --quick)", "auto");
  parser.add_option("iters", "N", "timed iterations per measurement (median reported)", "20");
  parser.add_option("warmup", "N", "untimed iterations first", "5");
  parser.add_option("capacity-factor", "X", "capacity factor; 0 = dropless (the default, like the anchors)", "0");
  parser.add_option("json", "FILE", "also write every record as JSON lines to FILE");
  parser.add_option("only", "LIST", "comma list of parts: seed,dense-mode,large,routing", "seed,dense-mode,large,routing");
  parser.add_flag("quick", "tiny shapes (a smoke test; runs on CPU too)");
  parser.add_flag("breakdown", "time each stage of the layer's forward and backward (alone, unless --only is given)");
  parser.add_option("breakdown-tokens", "N", "tokens of the --breakdown shape (d768 ff3072 E32 top-1)", "8192");
  parser.add_flag("stream", "streaming mode: small-batch forward replayed from a CUDA graph (alone, unless --only)");
  parser.add_option("stream-tokens", "LIST", "token counts of --stream (d768 ff3072 E32 top-1)", "1,8,32,64");
  parser.add_option("stream-steps", "N", "timed steps per --stream token count", "1000");
  if (!parser.parse(argc, argv)) return kExitOk;

  BenchSettings settings;
  const std::string device = parser.get("device");
  if (device == "auto") settings.context.device = cuda_available() ? DeviceKind::cuda : DeviceKind::cpu;
  else if (device == "cpu") settings.context.device = DeviceKind::cpu;
  else if (device == "cuda") settings.context.device = DeviceKind::cuda;
  else SY_BAD_INPUT("--device must be auto, cpu or cuda, not '", device, "'");
  if (settings.context.device == DeviceKind::cuda && !cuda_available()) SY_BAD_INPUT("--device cuda: no CUDA device");
  const bool quick = parser.flag("quick");
  if (settings.context.device == DeviceKind::cpu && !quick)
    SY_BAD_INPUT("bench moe on the CPU backend runs only with --quick (the full shapes need a GPU)");
  settings.activation_dtype = settings.context.device == DeviceKind::cuda ? DType::bf16 : DType::f32;
  settings.iterations = int(parser.get_int("iters"));
  settings.warmup = int(parser.get_int("warmup"));
  SY_CHECK_INPUT(settings.iterations >= 1 && settings.warmup >= 0, "--iters must be >= 1 and --warmup >= 0");
  const double capacity_factor = parser.get_double("capacity-factor");
  SY_CHECK_INPUT(capacity_factor >= 0, "--capacity-factor must be >= 0");
  settings.dropless = capacity_factor == 0;
  if (!settings.dropless) settings.capacity_factor = float(capacity_factor);
  const bool breakdown = parser.flag("breakdown");
  const int64_t breakdown_tokens = parser.has("breakdown-tokens") ? parser.get_int("breakdown-tokens") : quick ? 64 : 8192;
  SY_CHECK_INPUT(breakdown_tokens >= 1, "--breakdown-tokens must be >= 1");
  const bool stream = parser.flag("stream");
  std::vector<int64_t> stream_tokens;
  std::stringstream token_list(parser.get("stream-tokens"));
  for (std::string item; std::getline(token_list, item, ',');) {
    char* rest = nullptr;
    const long long value = std::strtoll(item.c_str(), &rest, 10);
    SY_CHECK_INPUT(!item.empty() && rest && *rest == '\0' && value >= 1 && value <= 4096,
                   "--stream-tokens: '", item, "' is not a token count in [1, 4096]");
    stream_tokens.push_back(value);
  }
  const int64_t stream_steps = parser.get_int("stream-steps");
  SY_CHECK_INPUT(stream_steps >= 1, "--stream-steps must be >= 1");
  // --breakdown or --stream alone runs only that; with --only it joins the parts named there.
  const bool alone = (breakdown || stream) && !parser.has("only");
  const std::string only = "," + std::string(alone ? "" : parser.get("only")) + ",";
  auto wanted = [&](const char* part) { return only.find("," + std::string(part) + ",") != std::string::npos; };
  if (settings.context.device == DeviceKind::cuda) cuda_set_device(0);
  settings.context.stream = create_stream(settings.context.device);

  std::vector<Record> records;
  const char* card = settings.context.device == DeviceKind::cuda ? "cuda" : "cpu";

  // 1. The seed's table: MoE layer vs dense FFN of the same active size.
  std::vector<LayerShape> seed_shapes = {{"B1_S128", 128, 768, 3072, 32, 1},    {"B8_S256", 2048, 768, 3072, 32, 1},
                                         {"B16_S512", 8192, 768, 3072, 32, 1},  {"B32_S256", 8192, 768, 3072, 32, 1},
                                         {"B64_S128", 8192, 768, 3072, 32, 1},  {"B64_S1024", 65536, 768, 3072, 32, 1}};
  if (quick) seed_shapes = {{"quick_T64", 64, 32, 64, 4, 1}, {"quick_T200", 200, 32, 64, 8, 2}};
  if (wanted("seed")) {
    std::printf("\nMoE layer vs dense FFN of the same active size (%s, %s, %s), ms (median of %d)\n", card,
                dtype_name(settings.activation_dtype), settings.dropless ? "dropless" : "capacity", settings.iterations);
    std::printf("%-10s %7s %4s %2s | %9s %9s %6s | %9s %9s %6s | %12s\n", "shape", "tokens", "E", "k", "moe fwd",
                "dense fwd", "ratio", "moe f+b", "dense f+b", "ratio", "moe tok/s f+b");
    for (const LayerShape& shape : seed_shapes) {
      MoeBench moe(settings, shape, MoeComputeMode::sparse);
      DenseFfnBench dense(settings, shape);
      const ExecContext& context = settings.context;
      double moe_forward = time_median_ms(settings, [&] { moe.forward(context, false); });
      double moe_both = time_median_ms(settings, [&] { moe.forward_backward(context); });
      double dense_forward = time_median_ms(settings, [&] { dense.forward(context); });
      double dense_both = time_median_ms(settings, [&] { dense.forward_backward(context); });
      std::printf("%-10s %7lld %4d %2d | %9.3f %9.3f %6.2f | %9.3f %9.3f %6.2f | %12.0f\n", shape.name.c_str(),
                  (long long)shape.tokens, shape.experts, shape.top_k, moe_forward, dense_forward,
                  moe_forward / dense_forward, moe_both, dense_both, moe_both / dense_both,
                  double(shape.tokens) / (moe_both * 1e-3));
      Record record;
      record.add("part", "seed");
      record.add("shape", shape.name);
      record.add("tokens", double(shape.tokens));
      record.add("d_model", shape.d_model);
      record.add("d_ff", shape.d_ff);
      record.add("experts", shape.experts);
      record.add("top_k", shape.top_k);
      record.add("moe_fwd_ms", moe_forward);
      record.add("moe_fwdbwd_ms", moe_both);
      record.add("dense_fwd_ms", dense_forward);
      record.add("dense_fwdbwd_ms", dense_both);
      record.add("moe_fwd_tflops", expert_forward_flops(shape) / (moe_forward * 1e-3) / 1e12);
      records.push_back(record);
    }
  }

  // 2. Sparse vs dense-compute mode (every expert on every token, masked).
  if (wanted("dense-mode")) {
    LayerShape shape = quick ? LayerShape{"quick_T64", 64, 32, 64, 4, 1} : LayerShape{"B16_S512", 8192, 768, 3072, 32, 1};
    MoeBench sparse(settings, shape, MoeComputeMode::sparse);
    MoeBench dense_mode(settings, shape, MoeComputeMode::dense);
    double sparse_ms = time_median_ms(settings, [&] { sparse.forward(settings.context, false); });
    double dense_ms = time_median_ms(settings, [&] { dense_mode.forward(settings.context, false); });
    std::printf("\nSparse vs dense-compute mode, %s (%lld tokens, E=%d, top-%d), forward: sparse %.3f ms, dense-compute "
                "%.3f ms, speed-up %.2fx\n",
                shape.name.c_str(), (long long)shape.tokens, shape.experts, shape.top_k, sparse_ms, dense_ms,
                dense_ms / sparse_ms);
    Record record;
    record.add("part", "dense-mode");
    record.add("shape", shape.name);
    record.add("sparse_fwd_ms", sparse_ms);
    record.add("dense_compute_fwd_ms", dense_ms);
    record.add("speedup", dense_ms / sparse_ms);
    records.push_back(record);
  }

  // 3. A large layer: expert GEMM throughput, alone and inside the layer.
  if (wanted("large")) {
    LayerShape shape = quick ? LayerShape{"quick_large", 512, 64, 128, 4, 2}
                             : LayerShape{"d2048_ff8192_E8_top2", 65536, 2048, 8192, 8, 2};
    MoeBench moe(settings, shape, MoeComputeMode::sparse);
    const ExecContext& context = settings.context;
    double layer_forward = time_median_ms(settings, [&] { moe.forward(context, false); });
    double layer_both = time_median_ms(settings, [&] { moe.forward_backward(context); });
    // The expert GEMMs alone, on a balanced layout of the same size (T*k/E rows per expert).
    const int64_t rows_per_expert = round_up(shape.tokens * shape.top_k / shape.experts, 128);
    const int64_t rows = rows_per_expert * shape.experts;
    const DType act = settings.activation_dtype;
    Buffer a = random_buffer(settings, act, rows * shape.d_model, 1.0f, 21);
    Buffer hidden(context.device, size_t(rows * shape.d_ff) * dtype_size(act));
    Buffer out(context.device, size_t(rows * shape.d_model) * dtype_size(act));
    std::vector<int32_t> offsets(size_t(shape.experts + 1));
    for (int e = 0; e <= shape.experts; ++e) offsets[size_t(e)] = int32_t(e * rows_per_expert);
    Buffer device_offsets(context.device, offsets.size() * 4);
    device_copy(device_offsets.data(), context.device, offsets.data(), DeviceKind::cpu, offsets.size() * 4);
    Tensor ta = a.view(act, {rows, shape.d_model}), th = hidden.view(act, {rows, shape.d_ff}),
           to = out.view(act, {rows, shape.d_model});
    Tensor toffsets = device_offsets.view(DType::i32, {shape.experts + 1});
    Tensor w1 = moe.weights.w1, w2 = moe.weights.w2;
    double gemm_ms = time_median_ms(settings, [&] {
      ops::grouped_gemm(context, ta, w1, false, toffsets, th);
      ops::grouped_gemm(context, th, w2, false, toffsets, to);
    });
    const double flops = 2.0 * double(rows) * (2.0 * shape.d_model * shape.d_ff);
    std::printf("\nLarge layer %s, %lld tokens: expert GEMMs alone %.3f ms = %.1f TFLOP/s; layer forward %.3f ms "
                "(%.1f TFLOP/s of expert work), forward+backward %.3f ms (%.1f TFLOP/s)\n",
                shape.name.c_str(), (long long)shape.tokens, gemm_ms, flops / (gemm_ms * 1e-3) / 1e12, layer_forward,
                expert_forward_flops(shape) / (layer_forward * 1e-3) / 1e12, layer_both,
                3 * expert_forward_flops(shape) / (layer_both * 1e-3) / 1e12);
    Record record;
    record.add("part", "large");
    record.add("shape", shape.name);
    record.add("tokens", double(shape.tokens));
    record.add("expert_gemm_ms", gemm_ms);
    record.add("expert_gemm_tflops", flops / (gemm_ms * 1e-3) / 1e12);
    record.add("layer_fwd_ms", layer_forward);
    record.add("layer_fwd_tflops", expert_forward_flops(shape) / (layer_forward * 1e-3) / 1e12);
    record.add("layer_fwdbwd_ms", layer_both);
    records.push_back(record);
  }

  // 4. Routing alone: softmax, top-k, gates, counts, slots, capacity, both loss sums.
  if (wanted("routing")) {
    RoutingParams params;
    params.num_tokens = quick ? 1000 : 65536;
    params.num_experts = quick ? 16 : 64;
    params.k_max = params.k_min = 2;
    params.renormalize = true;
    params.dropless = settings.dropless;
    params.capacity_factor = settings.capacity_factor;
    const DType float_dtype = settings.context.device == DeviceKind::cuda ? DType::f32 : settings.activation_dtype;
    Buffer logits = random_buffer(settings, float_dtype, params.num_tokens * params.num_experts, 2.0f, 31);
    Tensor tlogits = logits.view(float_dtype, {params.num_tokens, params.num_experts});
    RoutingBuffers buffers(settings.context.device, float_dtype, params.num_tokens, params.num_experts, params.k_max,
                           padded_rows_upper_bound(params));
    RoutingResult result = buffers.result(params.num_tokens);
    double route_ms = time_median_ms(settings, [&] { ops::route(settings.context, tlogits, nullptr, params, result); });
    // Bytes: logits read once; ids, gates, slots written per choice; token_k and logsumexp per token.
    const double bytes = double(params.num_tokens) * (params.num_experts * 4.0 + params.k_max * 12.0 + 8.0);
    std::printf("\nRouting alone, %lld tokens x %d experts, top-%d: %.1f us, %.0f GB/s\n", (long long)params.num_tokens,
                params.num_experts, params.k_max, route_ms * 1e3, bytes / (route_ms * 1e-3) / 1e9);
    Record record;
    record.add("part", "routing");
    record.add("tokens", double(params.num_tokens));
    record.add("experts", params.num_experts);
    record.add("top_k", params.k_max);
    record.add("route_us", route_ms * 1e3);
    record.add("route_gbps", bytes / (route_ms * 1e-3) / 1e9);
    records.push_back(record);
  }

  // 5. Per-stage breakdown of one shape: where the layer's time goes.
  if (breakdown) {
    const LayerShape shape = quick ? LayerShape{"breakdown", breakdown_tokens, 32, 64, 4, 1}
                                   : LayerShape{"breakdown", breakdown_tokens, 768, 3072, 32, 1};
    run_breakdown(settings, shape, records);
  }

  // 6. Streaming mode: small batches, one graph replay per step.
  if (stream) {
    const int64_t most = *std::max_element(stream_tokens.begin(), stream_tokens.end());
    const LayerShape shape =
        quick ? LayerShape{"stream", most, 32, 64, 4, 1} : LayerShape{"stream", most, 768, 3072, 32, 1};
    run_stream(settings, shape, stream_tokens, int(stream_steps), records);
  }

  destroy_stream(settings.context.device, settings.context.stream);
  if (parser.has("json")) {
    std::ofstream out(parser.get("json"));
    if (!out) SY_BAD_INPUT("cannot write --json file '", parser.get("json"), "'");
    for (const Record& record : records) out << record.json() << "\n";
  }
  return kExitOk;
}

}  // namespace switchyard
