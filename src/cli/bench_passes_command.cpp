// switchyard bench passes: the memory-bound passes of a training step, each alone at one micro-step's
// shape (default: configs/bench-1gpu.yaml's, 24 x 1024 tokens, d_model 768, 12 heads, d_ff 3072):
// layernorm and rmsnorm forward and backward (the backward adding into the residual stream's
// gradient, as the transformer runs it), rotary forward and backward (in place over the q and k
// thirds of qkv), the FFN activation forward and backward (gelu and swiglu) and the residual add.
// Each row gives ms (median), the bytes the pass must move at the least (every input read once,
// every output written once; the norms' per-row statistics and parameter sums included) and the
// rate, so a pass can be set against the card's memory bandwidth (about 3 TB/s on an H100): a
// pass far below it is where a kernel loses time, a pass near it can only get cheaper by fusion.
#include <cstdio>
#include <functional>
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
  int64_t tokens = 0, d_model = 0, heads = 0, d_ff = 0, seq_len = 0;
  DType dtype = DType::bf16;
  int warmup = 5, iterations = 20;
  std::string json_file;
};

std::optional<Options> parse_options(int argc, char** argv) {
  ArgParser parser("switchyard bench passes",
                   "Time the memory-bound passes of a training step alone (norms, rotary, activations, the\n"
                   "residual add) at one micro-step's shape: ms, the least bytes each must move, GB/s.");
  parser.add_option("device", "auto|cpu|cuda", "where to run (cpu: only with --quick)", "auto");
  parser.add_option("tokens", "N", "tokens per micro-step (bench-1gpu's: 24 x 1024)", "24576");
  parser.add_option("d-model", "N", "model width", "768");
  parser.add_option("heads", "N", "attention heads (rotary: head dim = d-model / heads)", "12");
  parser.add_option("d-ff", "N", "FFN width of the activation passes", "3072");
  parser.add_option("seq-len", "N", "sequence length (rotary positions; must divide --tokens)", "1024");
  parser.add_option("dtype", "bf16|fp16|fp32", "activation dtype (the CPU backend runs fp32 only)", "bf16");
  parser.add_option("iters", "N", "timed iterations (median reported)", "20");
  parser.add_option("warmup", "N", "untimed iterations first", "5");
  parser.add_option("json", "FILE", "also write the records as JSON lines to FILE");
  parser.add_flag("quick",
                  "512 tokens of width 64, 4 heads, d_ff 128, seq 128 unless given (a smoke test; runs on CPU)");
  if (!parser.parse(argc, argv)) return std::nullopt;
  Options options;
  const bool quick = parser.flag("quick");
  options.device = bench_device(parser.get("device"), quick, "passes");
  auto value = [&](const char* name, int64_t quick_value) {
    return parser.has(name) || !quick ? parser.get_int(name) : quick_value;
  };
  options.tokens = value("tokens", 512);
  options.d_model = value("d-model", 64);
  options.heads = value("heads", 4);
  options.d_ff = value("d-ff", 128);
  options.seq_len = value("seq-len", 128);
  SY_CHECK_INPUT(options.tokens >= 1 && options.d_model >= 2 && options.heads >= 1 && options.d_ff >= 1 &&
                     options.seq_len >= 1,
                 "bench passes: --tokens, --d-model, --heads, --d-ff and --seq-len must be positive (d-model >= 2)");
  SY_CHECK_INPUT(options.d_model % options.heads == 0 && (options.d_model / options.heads) % 2 == 0,
                 "bench passes: --heads (", options.heads, ") must divide --d-model (", options.d_model,
                 ") into an even head dim");
  SY_CHECK_INPUT(options.tokens % options.seq_len == 0, "bench passes: --seq-len (", options.seq_len,
                 ") must divide --tokens (", options.tokens, ")");
  options.dtype = parse_dtype(parser.get("dtype"));
  SY_CHECK_INPUT(options.dtype == DType::bf16 || options.dtype == DType::f16 || options.dtype == DType::f32,
                 "bench passes: --dtype must be bf16, fp16 or fp32");
  if (options.device == DeviceKind::cpu) {
    SY_CHECK_INPUT(!parser.has("dtype") || options.dtype == DType::f32,
                   "bench passes: the CPU backend runs fp32 activations (--dtype fp32)");
    options.dtype = DType::f32;
  }
  options.iterations = int(parser.get_int("iters"));
  options.warmup = int(parser.get_int("warmup"));
  SY_CHECK_INPUT(options.iterations >= 1 && options.warmup >= 0, "--iters must be >= 1 and --warmup >= 0");
  if (parser.has("json")) options.json_file = parser.get("json");
  return options;
}

struct Pass {
  std::string name;
  double bytes = 0;
  std::function<void()> run;
};

int run(const Options& options) {
  const DeviceKind device = options.device;
  if (device == DeviceKind::cuda) cuda_set_device(0);
  const ExecContext context{device, create_stream(device)};
  const DType dtype = options.dtype;
  const double element = double(dtype_size(dtype));
  const int64_t tokens = options.tokens, width = options.d_model, hidden = options.d_ff;
  const double rows = double(tokens);

  // Inputs drawn once (fresh random values); outputs and gradients get their own buffers.
  std::vector<Buffer> buffers;
  auto random_tensor = [&](DType type, int64_t rows_count, int64_t columns, float stddev, uint64_t seed) {
    buffers.push_back(random_device_buffer(device, type, rows_count * columns, stddev, seed));
    return Tensor(buffers.back().data(), type, device, {rows_count, columns});
  };
  auto random_vector = [&](DType type, int64_t count, float stddev, uint64_t seed) {
    buffers.push_back(random_device_buffer(device, type, count, stddev, seed));
    return Tensor(buffers.back().data(), type, device, {count});
  };
  const Tensor x = random_tensor(dtype, tokens, width, 1.0f, 1);
  const Tensor grad_out = random_tensor(dtype, tokens, width, 1.0f, 2);
  const Tensor weight = random_vector(dtype, width, 0.1f, 3);
  const Tensor bias = random_vector(dtype, width, 0.1f, 4);
  Tensor out = random_tensor(dtype, tokens, width, 1.0f, 5);
  Tensor grad_x = random_tensor(dtype, tokens, width, 1e-3f, 6);
  Tensor mean = random_vector(DType::f32, tokens, 1.0f, 7);
  Tensor rstd = random_vector(DType::f32, tokens, 1.0f, 8);
  Tensor grad_weight = random_vector(DType::f32, width, 1.0f, 9);
  Tensor grad_bias = random_vector(DType::f32, width, 1.0f, 10);
  Tensor qkv = random_tensor(dtype, tokens, 3 * width, 1.0f, 11);
  const Tensor pre = random_tensor(dtype, tokens, 2 * hidden, 1.0f, 12);  // swiglu's [gate, up]; gelu uses [T, F]
  const Tensor grad_post = random_tensor(dtype, tokens, hidden, 1.0f, 13);
  Tensor post = random_tensor(dtype, tokens, hidden, 1.0f, 14);
  Tensor grad_pre = random_tensor(dtype, tokens, 2 * hidden, 1.0f, 15);
  const Tensor gelu_pre(pre.data, dtype, device, {tokens, hidden}), swiglu_pre = pre;
  Tensor gelu_grad_pre(grad_pre.data, dtype, device, {tokens, hidden});
  ops::layernorm_forward(context, x, weight, bias, 1e-5f, out, mean, rstd);  // real statistics for the backward

  const AttentionShape shape{tokens / options.seq_len, options.seq_len, options.heads, width / options.heads};
  const double activation_rows = rows * element, stats = rows * 4.0, params = double(width) * 4.0;
  std::vector<Pass> passes = {
      {"layernorm forward", activation_rows * 2 * width + 2 * stats,
       [&] { ops::layernorm_forward(context, x, weight, bias, 1e-5f, out, mean, rstd); }},
      {"layernorm backward (dx added)", activation_rows * 4 * width + 2 * stats + 2 * params,
       [&] {
         ops::layernorm_backward(context, x, weight, mean, rstd, grad_out, grad_x, grad_weight, grad_bias,
                                 NormAccumulate{true, false});
       }},
      {"rmsnorm forward", activation_rows * 2 * width + stats,
       [&] { ops::rmsnorm_forward(context, x, weight, 1e-5f, out, rstd); }},
      {"rmsnorm backward (dx added)", activation_rows * 4 * width + stats + params,
       [&] {
         ops::rmsnorm_backward(context, x, weight, rstd, grad_out, grad_x, grad_weight, NormAccumulate{true, false});
       }},
      {"rotary forward (q, k in place)", activation_rows * 4 * width,
       [&] { ops::rotary_forward(context, shape, qkv, 10000.0, 0, qkv); }},
      {"rotary backward (in place)", activation_rows * 4 * width,
       [&] { ops::rotary_backward(context, shape, qkv, 10000.0, 0, qkv); }},
      {"gelu forward [T, F]", activation_rows * 2 * hidden,
       [&] { ops::activation_forward(context, ExpertActivation::gelu_tanh, gelu_pre, post); }},
      {"gelu backward", activation_rows * 3 * hidden,
       [&] { ops::activation_backward(context, ExpertActivation::gelu_tanh, gelu_pre, grad_post, gelu_grad_pre); }},
      {"swiglu forward [T, 2F] -> [T, F]", activation_rows * 3 * hidden,
       [&] { ops::activation_forward(context, ExpertActivation::swiglu, swiglu_pre, post); }},
      {"swiglu backward", activation_rows * 5 * hidden,
       [&] { ops::activation_backward(context, ExpertActivation::swiglu, swiglu_pre, grad_post, grad_pre); }},
      {"residual add (b += a)", activation_rows * 3 * width, [&] { ops::add_into(context, x, out); }},
  };

  std::printf("Memory-bound passes at %lld tokens, d_model %lld, %lld heads, d_ff %lld (%s, %s), ms (median of %d "
              "after %d warm-up)\n",
              (long long)tokens, (long long)width, (long long)options.heads, (long long)hidden,
              device_kind_name(device), dtype_name(dtype), options.iterations, options.warmup);
  std::printf("  %-34s %10s %14s %10s\n", "pass", "ms", "least bytes", "GB/s");
  std::vector<BenchRecord> records;
  for (const Pass& pass : passes) {
    const double ms = median_call_ms(context, options.warmup, options.iterations, pass.run);
    const double rate = ms > 0 ? pass.bytes / (ms * 1e-3) / 1e9 : 0.0;
    std::printf("  %-34s %10.4f %14.4g %10.1f\n", pass.name.c_str(), ms, pass.bytes, rate);
    std::fflush(stdout);
    BenchRecord record;
    record.add("bench", "passes");
    record.add("pass", pass.name);
    record.add("device", device_kind_name(device));
    record.add("dtype", dtype_name(dtype));
    record.add("tokens", double(tokens));
    record.add("d_model", double(width));
    record.add("d_ff", double(hidden));
    record.add("ms", ms);
    record.add("bytes", pass.bytes);
    record.add("gb_per_s", rate);
    records.push_back(record);
  }
  ops::synchronize(context);
  if (!options.json_file.empty()) write_bench_records(options.json_file, records, "passes", /*append=*/true);
  destroy_stream(device, context.stream);
  return kExitOk;
}

}  // namespace

int command_bench_passes(int argc, char** argv) {
  const std::optional<Options> options = parse_options(argc, argv);
  if (!options) return kExitOk;  // --help
  return run(*options);
}

}  // namespace switchyard
