// switchyard bench optimizer: the optimizer's two passes over every parameter, alone -- the
// gradient norm (with its non-finite count: one read of the fp32 gradients) and the AdamW step
// (read param, grad, m, v; write param, m, v and the bf16 compute copy) -- at a parameter count of
// choice (default: configs/bench-1gpu.yaml's 0.96B), as the trainer lays them out (one decayed
// range and one small undecayed one per parameter group). Reports ms (median), the bytes each pass
// must move and the rate, so the pass can be set against the card's memory bandwidth.
#include <algorithm>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "src/cli/bench_common.h"
#include "src/cli/cli_args.h"
#include "src/cli/commands.h"
#include "src/core/device.h"
#include "src/core/error.h"
#include "src/core/timing.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace {

struct Options {
  DeviceKind device = DeviceKind::cpu;
  int64_t parameters = 0;
  int warmup = 3, iterations = 10;
  std::string json_file;
};

std::optional<Options> parse_options(int argc, char** argv) {
  ArgParser parser("switchyard bench optimizer",
                   "Time the optimizer's passes over every parameter: the gradient norm and the AdamW step\n"
                   "(fp32 master weights, gradients and moments, bf16 compute copy), as the trainer runs them.");
  parser.add_option("device", "auto|cpu|cuda", "where to run (cpu: only with --quick)", "auto");
  parser.add_option("params", "N", "parameters (default: configs/bench-1gpu.yaml's, 960,000,000)", "960000000");
  parser.add_option("iters", "N", "timed iterations (median reported)", "10");
  parser.add_option("warmup", "N", "untimed iterations first", "3");
  parser.add_option("json", "FILE", "also write the records as JSON lines to FILE");
  parser.add_flag("quick", "1,000,000 parameters unless --params is given (a smoke test; runs on CPU too)");
  if (!parser.parse(argc, argv)) return std::nullopt;
  Options options;
  const bool quick = parser.flag("quick");
  options.device = bench_device(parser.get("device"), quick, "optimizer");
  options.parameters = parser.has("params") || !quick ? parser.get_int("params") : 1000000;
  SY_CHECK_INPUT(options.parameters >= 1000, "--params must be >= 1000, got ", options.parameters);
  options.iterations = int(parser.get_int("iters"));
  options.warmup = int(parser.get_int("warmup"));
  SY_CHECK_INPUT(options.iterations >= 1 && options.warmup >= 0, "--iters must be >= 1 and --warmup >= 0");
  if (parser.has("json")) options.json_file = parser.get("json");
  return options;
}

// `count` fp32 values: a block of normal(0, stddev) values (random_device_buffer) repeated over
// the buffer, so a billion parameters need no billion host draws.
Buffer tiled_random_buffer(DeviceKind device, int64_t count, float stddev, uint64_t seed) {
  const int64_t block = std::min<int64_t>(count, int64_t(1) << 24);
  const Buffer values = random_device_buffer(device, DType::f32, block, stddev, seed);
  Buffer buffer(device, size_t(count) * 4);
  for (int64_t at = 0; at < count; at += block) {
    const int64_t take = std::min(block, count - at);
    device_copy(static_cast<float*>(buffer.data()) + at, device, values.data(), device, size_t(take) * 4);
  }
  return buffer;
}

int run(const Options& options) {
  const DeviceKind device = options.device;
  if (device == DeviceKind::cuda) cuda_set_device(0);
  const ExecContext context{device, create_stream(device)};
  const int64_t count = options.parameters, undecayed = std::max<int64_t>(1, count / 1000);
  // fp32 state as the trainer holds it; gradients of a plausible size, small positive v.
  Buffer param = tiled_random_buffer(device, count, 0.02f, 1);
  Buffer grad = tiled_random_buffer(device, count, 1e-3f, 2);
  Buffer exp_avg = tiled_random_buffer(device, count, 1e-4f, 3);
  Buffer exp_avg_sq(device, size_t(count) * 4);
  device_memset(exp_avg_sq.data(), device, 0, exp_avg_sq.bytes());
  // The bf16 compute copy AdamW writes in the same pass (CUDA; the CPU backend trains in f32 and
  // keeps none).
  Buffer copy(device, device == DeviceKind::cuda ? size_t(count) * 2 : 0);
  Buffer norm_result(device, size_t(kNumGradCheckResults) * 8);

  auto slice = [&](const Buffer& buffer, DType dtype, int64_t begin, int64_t end) {
    return Tensor(static_cast<char*>(buffer.data()) + size_t(begin) * dtype_size(dtype), dtype, device,
                  {end - begin});
  };
  std::vector<AdamWTensor> entries;
  for (bool decay : {true, false}) {
    const int64_t begin = decay ? 0 : count - undecayed, end = decay ? count - undecayed : count;
    AdamWTensor entry;
    entry.param = slice(param, DType::f32, begin, end);
    entry.grad = slice(grad, DType::f32, begin, end);
    entry.exp_avg = slice(exp_avg, DType::f32, begin, end);
    entry.exp_avg_sq = slice(exp_avg_sq, DType::f32, begin, end);
    if (device == DeviceKind::cuda) entry.compute_copy = slice(copy, DType::bf16, begin, end);
    entry.weight_decay = decay;
    entries.push_back(entry);
  }
  const DType result_dtype = device == DeviceKind::cpu ? DType::f64 : DType::f32;
  Tensor result = norm_result.view(result_dtype, {kNumGradCheckResults});
  const Tensor all_grads = slice(grad, DType::f32, 0, count);

  AdamWParams params;
  params.lr = 1e-6;  // repeated steps keep the values sane
  int64_t step = 0;
  const double norm_ms = median_call_ms(context, options.warmup, options.iterations,
                                        [&] { ops::grad_norm_and_check(context, {all_grads}, result); });
  const double adamw_ms = median_call_ms(context, options.warmup, options.iterations, [&] {
    params.step = ++step;
    ops::adamw_step(context, entries, params);
  });
  ops::synchronize(context);

  const double norm_bytes = 4.0 * double(count);
  const double adamw_bytes = double(count) * (16.0 + 12.0 + (device == DeviceKind::cuda ? 2.0 : 0.0));
  std::printf("Optimizer passes over %lld parameters (%s), ms (median of %d after %d warm-up)\n",
              (long long)count, device_kind_name(device), options.iterations, options.warmup);
  std::printf("  %-34s %10s %14s %10s\n", "pass", "ms", "bytes moved", "GB/s");
  auto row = [&](const char* name, double ms, double bytes) {
    std::printf("  %-34s %10.3f %14.4g %10.1f\n", name, ms, bytes, ms > 0 ? bytes / (ms * 1e-3) / 1e9 : 0.0);
  };
  row("gradient norm (read grad)", norm_ms, norm_bytes);
  row(device == DeviceKind::cuda ? "AdamW (read 16 B, write 14 B each)" : "AdamW (read 16 B, write 12 B each)",
      adamw_ms, adamw_bytes);
  row("both", norm_ms + adamw_ms, norm_bytes + adamw_bytes);
  if (!options.json_file.empty()) {
    std::vector<BenchRecord> records;
    for (int pass = 0; pass < 2; ++pass) {
      BenchRecord record;
      record.add("bench", "optimizer");
      record.add("pass", pass == 0 ? "grad_norm" : "adamw");
      record.add("device", device_kind_name(device));
      record.add("parameters", double(count));
      record.add("ms", pass == 0 ? norm_ms : adamw_ms);
      record.add("bytes", pass == 0 ? norm_bytes : adamw_bytes);
      record.add("gb_per_s", (pass == 0 ? norm_bytes / norm_ms : adamw_bytes / adamw_ms) * 1e-6);
      records.push_back(record);
    }
    write_bench_records(options.json_file, records, "optimizer", /*append=*/true);
  }
  destroy_stream(device, context.stream);
  return kExitOk;
}

}  // namespace

int command_bench_optimizer(int argc, char** argv) {
  const std::optional<Options> options = parse_options(argc, argv);
  if (!options) return kExitOk;  // --help
  return run(*options);
}

}  // namespace switchyard
