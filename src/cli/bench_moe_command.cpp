// switchyard bench moe: times the whole MoE layer (router GEMM, routing, permute, expert GEMMs,
// combine; forward+backward includes every gradient and both losses) against a dense FFN of the
// same active size, plus the sparse-vs-dense-compute comparison, the expert GEMMs of a large
// layer, and routing alone. Medians of device-event timings after warm-up, on fresh random data.
// --breakdown (per-stage times) and --stream (streaming-mode latency) are in bench_moe_modes.h;
// the layer fixtures, timing and the FLOP count are in bench_moe_fixtures.h; the flags in
// bench_moe_options.h. This file holds the set-up, the shapes and timing of each part (a results
// struct per part) and the tables and records made from those results. Each part is reported as
// soon as it is timed, so a failing part leaves the tables of the earlier ones.
#include <algorithm>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "src/ops/ops.h"
#include "src/cli/bench_moe_fixtures.h"
#include "src/cli/bench_moe_modes.h"
#include "src/cli/bench_moe_options.h"
#include "src/cli/commands.h"
#include "src/core/switches.h"
#include "src/core/device.h"
#include "src/core/timing.h"
#include "src/model/moe_layer.h"

namespace switchyard {

using namespace bench_moe;

namespace {

// ---- Set-up -----------------------------------------------------------------------------------

// The settings every measurement shares, with a new stream on the chosen device (destroy_stream
// when done).
BenchSettings set_up_bench_moe(const BenchMoeOptions& options) {
  BenchSettings settings;
  settings.context.device = options.device;
  settings.activation_dtype = settings.context.device == DeviceKind::cuda ? DType::bf16 : DType::f32;
  settings.iterations = options.iterations;
  settings.warmup = options.warmup;
  settings.dropless = options.dropless;
  if (!settings.dropless) settings.capacity_factor = options.capacity_factor;
  if (settings.context.device == DeviceKind::cuda) cuda_set_device(0);
  settings.context.stream = create_stream(settings.context.device);
  return settings;
}

// ---- 1. The seed's table: MoE layer vs dense FFN of the same active size ----------------------

struct SeedTiming {
  LayerShape shape;
  double moe_forward, moe_both, dense_forward, dense_both;  // ms
};

std::vector<SeedTiming> time_seed(const BenchSettings& settings, bool quick) {
  std::vector<LayerShape> seed_shapes = {{"B1_S128", 128, 768, 3072, 32, 1},    {"B8_S256", 2048, 768, 3072, 32, 1},
                                         {"B16_S512", 8192, 768, 3072, 32, 1},  {"B32_S256", 8192, 768, 3072, 32, 1},
                                         {"B64_S128", 8192, 768, 3072, 32, 1},  {"B64_S1024", 65536, 768, 3072, 32, 1}};
  if (quick) seed_shapes = {{"quick_T64", 64, 32, 64, 4, 1}, {"quick_T200", 200, 32, 64, 8, 2}};
  std::vector<SeedTiming> rows;
  for (const LayerShape& shape : seed_shapes) {
    MoeBench moe(settings, shape, ExpertComputeMode::sparse);
    DenseFfnBench dense(settings, shape);
    const ExecContext& context = settings.context;
    double moe_forward = time_median_ms(settings, [&] { moe.forward(context, false); });
    double moe_both = time_median_ms(settings, [&] { moe.forward_backward(context); });
    double dense_forward = time_median_ms(settings, [&] { dense.forward(context); });
    double dense_both = time_median_ms(settings, [&] { dense.forward_backward(context); });
    rows.push_back({shape, moe_forward, moe_both, dense_forward, dense_both});
  }
  return rows;
}

void report_seed(const BenchSettings& settings, const std::vector<SeedTiming>& rows, std::vector<Record>& records) {
  const char* card = settings.context.device == DeviceKind::cuda ? "cuda" : "cpu";
  std::printf("\nMoE layer vs dense FFN of the same active size (%s, %s, %s), ms (median of %d)\n", card,
              dtype_name(settings.activation_dtype), settings.dropless ? "dropless" : "capacity", settings.iterations);
  std::printf("%-10s %7s %4s %2s | %9s %9s %6s | %9s %9s %6s | %12s\n", "shape", "tokens", "E", "k", "moe fwd",
              "dense fwd", "ratio", "moe f+b", "dense f+b", "ratio", "moe tok/s f+b");
  for (const SeedTiming& row : rows) {
    const LayerShape& shape = row.shape;
    const double moe_forward = row.moe_forward, moe_both = row.moe_both;
    const double dense_forward = row.dense_forward, dense_both = row.dense_both;
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

// ---- 2. Sparse vs dense-compute mode (every expert on every token, masked) --------------------

struct DenseModeTiming {
  LayerShape shape;
  double sparse_ms, dense_ms;  // forward
};

DenseModeTiming time_dense_mode(const BenchSettings& settings, bool quick) {
  LayerShape shape = quick ? LayerShape{"quick_T64", 64, 32, 64, 4, 1} : LayerShape{"B16_S512", 8192, 768, 3072, 32, 1};
  MoeBench sparse(settings, shape, ExpertComputeMode::sparse);
  MoeBench dense_mode(settings, shape, ExpertComputeMode::dense);
  double sparse_ms = time_median_ms(settings, [&] { sparse.forward(settings.context, false); });
  double dense_ms = time_median_ms(settings, [&] { dense_mode.forward(settings.context, false); });
  return {shape, sparse_ms, dense_ms};
}

void report_dense_mode(const DenseModeTiming& timing, std::vector<Record>& records) {
  const LayerShape& shape = timing.shape;
  const double sparse_ms = timing.sparse_ms, dense_ms = timing.dense_ms;
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

// ---- 3. A large layer: expert GEMM throughput, alone and inside the layer ---------------------

struct LargeLayerTiming {
  LayerShape shape;
  int64_t rows;  // of the expert GEMMs timed alone
  double gemm_ms, layer_forward, layer_both;
};

LargeLayerTiming time_large_layer(const BenchSettings& settings, bool quick) {
  LayerShape shape = quick ? LayerShape{"quick_large", 512, 64, 128, 4, 2}
                           : LayerShape{"d2048_ff8192_E8_top2", 65536, 2048, 8192, 8, 2};
  MoeBench moe(settings, shape, ExpertComputeMode::sparse);
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
  return {shape, rows, gemm_ms, layer_forward, layer_both};
}

void report_large_layer(const LargeLayerTiming& timing, std::vector<Record>& records) {
  const LayerShape& shape = timing.shape;
  const double gemm_ms = timing.gemm_ms, layer_forward = timing.layer_forward, layer_both = timing.layer_both;
  const double flops = 2.0 * double(timing.rows) * (2.0 * shape.d_model * shape.d_ff);
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

// ---- 4. Routing alone: softmax, top-k, gates, counts, slots, capacity, both loss sums ---------
// Two cases: today's Switch-style router (65,536 x 64, softmax top-2) and the fine-grained
// DeepSeek-V3 one (65,536 x 256, sigmoid top-8 with a selection bias, 8 groups of which 4 kept,
// gates scaled by 2.5), the two routing targets of the kernels issue.

struct RoutingTiming {
  std::string label;
  int64_t tokens;
  int experts, top_k;
  double single_call_ms;  // one call between two events (with the launch gap a lone call sees)
  double queued_ms;       // per call of kBackToBack enqueued back to back (the kernel's own time)
};

RoutingTiming time_routing_case(const BenchSettings& settings, const std::string& label, RoutingParams params,
                                bool with_bias) {
  params.dropless = settings.dropless;
  params.capacity_factor = settings.capacity_factor;
  const DType float_dtype = settings.context.device == DeviceKind::cuda ? DType::f32 : settings.activation_dtype;
  Buffer logits = random_buffer(settings, float_dtype, params.num_tokens * params.num_experts, 2.0f, 31);
  Buffer bias = random_buffer(settings, float_dtype, params.num_experts, 0.1f, 32);
  Tensor tlogits = logits.view(float_dtype, {params.num_tokens, params.num_experts});
  Tensor tbias = bias.view(float_dtype, {params.num_experts});
  RoutingInputs inputs;
  if (with_bias) inputs.selection_bias = &tbias;
  RoutingBuffers buffers(settings.context.device, float_dtype, params.num_tokens, params.num_experts, params.k_max,
                         padded_rows_upper_bound(params));
  RoutingResult result = buffers.result(params.num_tokens);
  // Two timings: one call between two events (includes the launch gap before the kernel starts,
  // as a lone call sees it), and the per-call time of 10 calls enqueued back to back (the kernel's
  // own time, as inside the layer, where routing is queued behind the router GEMM).
  constexpr int kBackToBack = 10;
  const double route_ms = time_median_ms(settings, [&] { ops::route(settings.context, tlogits, inputs, params, result); });
  const double queued_ms = time_median_ms(settings, [&] {
    for (int call = 0; call < kBackToBack; ++call) ops::route(settings.context, tlogits, inputs, params, result);
  }) / kBackToBack;
  return {label, params.num_tokens, params.num_experts, params.k_max, route_ms, queued_ms};
}

std::vector<RoutingTiming> time_routing(const BenchSettings& settings, bool quick) {
  RoutingParams switch_params;
  switch_params.num_tokens = quick ? 1000 : 65536;
  switch_params.num_experts = quick ? 16 : 64;
  switch_params.k_max = switch_params.k_min = 2;
  switch_params.renormalize = true;
  RoutingParams deepseek = switch_params;
  deepseek.num_experts = quick ? 32 : 256;
  deepseek.k_max = deepseek.k_min = quick ? 4 : 8;
  deepseek.score_function = ScoreFunction::sigmoid;
  deepseek.routed_scaling_factor = 2.5f;
  deepseek.num_groups = 8;
  deepseek.topk_groups = 4;
  return {time_routing_case(settings, "softmax", switch_params, false),
          time_routing_case(settings, "sigmoid+bias+8 groups (4 kept)", deepseek, true)};
}

void report_routing(const std::vector<RoutingTiming>& timings, std::vector<Record>& records) {
  for (const RoutingTiming& timing : timings) {
    const double route_ms = timing.single_call_ms, queued_ms = timing.queued_ms;
    // Bytes: logits read once; ids, gates, slots written per choice; token_k and logsumexp per token.
    const double bytes = double(timing.tokens) * (timing.experts * 4.0 + timing.top_k * 12.0 + 8.0);
    std::printf("\nRouting alone, %lld tokens x %d experts, top-%d, %s: %.1f us per call back to back (%.0f GB/s); "
                "%.1f us for one call alone\n",
                (long long)timing.tokens, timing.experts, timing.top_k, timing.label.c_str(), queued_ms * 1e3,
                bytes / (queued_ms * 1e-3) / 1e9, route_ms * 1e3);
    Record record;
    record.add("part", "routing");
    record.add("router", timing.label);
    record.add("tokens", double(timing.tokens));
    record.add("experts", timing.experts);
    record.add("top_k", timing.top_k);
    record.add("route_us", queued_ms * 1e3);
    record.add("route_gbps", bytes / (queued_ms * 1e-3) / 1e9);
    record.add("route_single_call_us", route_ms * 1e3);
    records.push_back(record);
  }
}

// ---- 5, 6. The detailed modes (bench_moe_modes.h: they time, print and record in one) ---------

void run_detailed_modes(const BenchSettings& settings, const BenchMoeOptions& options,
                        const std::vector<LayerShape>& shapes, std::vector<Record>& records) {
  // 5. Per-stage breakdown: where the layer's time goes, at the --shape shapes or the seed's.
  if (options.breakdown) {
    if (!shapes.empty()) {
      for (const LayerShape& shape : shapes) run_breakdown(settings, shape, records);
    } else {
      const LayerShape shape = options.quick ? LayerShape{"breakdown", options.breakdown_tokens, 32, 64, 4, 1}
                                             : LayerShape{"breakdown", options.breakdown_tokens, 768, 3072, 32, 1};
      run_breakdown(settings, shape, records);
    }
  }
  // 6. Streaming mode: small batches, one graph replay per step.
  if (options.stream) {
    const int64_t most = *std::max_element(options.stream_tokens.begin(), options.stream_tokens.end());
    const LayerShape shape = options.quick ? LayerShape{"stream", most, 32, 64, 4, 1}
                                           : LayerShape{"stream", most, 768, 3072, 32, 1};
    run_stream(settings, shape, options.stream_tokens, int(options.stream_steps), records);
  }
}

}  // namespace

int command_bench_moe(int argc, char** argv) {
  const std::optional<BenchMoeOptions> options = parse_bench_moe_options(argc, argv);
  if (!options) return kExitOk;  // --help
  const BenchSettings settings = set_up_bench_moe(*options);
  std::printf("%s\n", describe_switches().c_str());
  std::vector<Record> records;
  if (options->wants("seed")) report_seed(settings, time_seed(settings, options->quick), records);
  if (options->wants("dense-mode")) report_dense_mode(time_dense_mode(settings, options->quick), records);
  if (options->wants("large")) report_large_layer(time_large_layer(settings, options->quick), records);
  if (options->wants("routing")) report_routing(time_routing(settings, options->quick), records);
  std::vector<LayerShape> shapes;
  if (!options->shape_spec.empty())
    shapes = options->quick ? std::vector<LayerShape>{{"quick_shape", 256, 64, 64, 8, 2, ExpertActivation::swiglu}}
                            : parse_shape_spec(options->shape_spec);
  // --shape alone: the table of those shapes; with --breakdown: the stage breakdown at each instead.
  if (!shapes.empty() && !options->breakdown) run_shapes(settings, shapes, records);
  run_detailed_modes(settings, *options, shapes, records);
  destroy_stream(settings.context.device, settings.context.stream);
  if (options->json_file) write_bench_records(*options->json_file, records, "moe");
  return kExitOk;
}

}  // namespace switchyard
