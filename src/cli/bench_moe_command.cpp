// switchyard bench moe: times the whole MoE layer (router GEMM, routing, permute, expert GEMMs,
// combine; forward+backward includes every gradient and both losses) against a dense FFN of the
// same active size, plus the sparse-vs-dense-compute comparison, the expert GEMMs of a large
// layer, and routing alone. Medians of device-event timings after warm-up, on fresh random data.
// --breakdown (per-stage times) and --stream (streaming-mode latency) are in bench_moe_modes.h;
// the layer fixtures, timing and the FLOP count are in bench_moe_fixtures.h. This file holds the
// options, the shapes of each part and the tables.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "src/ops/ops.h"
#include "src/cli/bench_moe_fixtures.h"
#include "src/cli/bench_moe_modes.h"
#include "src/cli/cli_args.h"
#include "src/cli/commands.h"
#include "src/core/device.h"
#include "src/core/timing.h"
#include "src/model/moe_layer.h"

namespace switchyard {

using namespace bench_moe;

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
    // Two timings: one call between two events (includes the launch gap before the kernel starts,
    // as a lone call sees it), and the per-call time of 10 calls enqueued back to back (the kernel's
    // own time, as inside the layer, where routing is queued behind the router GEMM).
    constexpr int kBackToBack = 10;
    const double route_ms = time_median_ms(settings, [&] { ops::route(settings.context, tlogits, nullptr, params, result); });
    const double queued_ms = time_median_ms(settings, [&] {
      for (int call = 0; call < kBackToBack; ++call) ops::route(settings.context, tlogits, nullptr, params, result);
    }) / kBackToBack;
    // Bytes: logits read once; ids, gates, slots written per choice; token_k and logsumexp per token.
    const double bytes = double(params.num_tokens) * (params.num_experts * 4.0 + params.k_max * 12.0 + 8.0);
    std::printf("\nRouting alone, %lld tokens x %d experts, top-%d: %.1f us per call back to back (%.0f GB/s); "
                "%.1f us for one call alone\n",
                (long long)params.num_tokens, params.num_experts, params.k_max, queued_ms * 1e3,
                bytes / (queued_ms * 1e-3) / 1e9, route_ms * 1e3);
    Record record;
    record.add("part", "routing");
    record.add("tokens", double(params.num_tokens));
    record.add("experts", params.num_experts);
    record.add("top_k", params.k_max);
    record.add("route_us", queued_ms * 1e3);
    record.add("route_gbps", bytes / (queued_ms * 1e-3) / 1e9);
    record.add("route_single_call_us", route_ms * 1e3);
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
