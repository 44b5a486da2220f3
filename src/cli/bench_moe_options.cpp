// The options of `switchyard bench moe` (src/cli/bench_moe_options.h).
#include "src/cli/bench_moe_options.h"

#include <cstdlib>
#include <sstream>

#include "src/cli/bench_moe_modes.h"
#include "src/cli/cli_args.h"
#include "src/core/error.h"

namespace switchyard::bench_moe {

bool BenchMoeOptions::wants(const char* part) const {
  return parts.find("," + std::string(part) + ",") != std::string::npos;
}

std::optional<BenchMoeOptions> parse_bench_moe_options(int argc, char** argv) {
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
  parser.add_option("breakdown-tokens", "N",
                    "tokens of the --breakdown shape (d768 ff3072 E32 top-1; with --shape, its shapes instead)", "8192");
  parser.add_flag("stream", "streaming mode: small-batch forward replayed from a CUDA graph (alone, unless --only)");
  parser.add_option("stream-tokens", "LIST", "token counts of --stream (d768 ff3072 E32 top-1)", "1,8,32,64");
  parser.add_option("stream-steps", "N", "timed steps per --stream token count", "1000");
  parser.add_option("shape", "SPEC",
                    "the layer at T,d,n,E,K[,act] (act swiglu|gelu, default swiglu) or 'sonic' (SonicMoE's five\n"
                    "H100 shapes): fwd/bwd TFLOP/s, memory kept for backward, ratio to dense (alone, unless --only);\n"
                    "with --breakdown, the stage breakdown at each of these shapes instead");
  if (!parser.parse(argc, argv)) return std::nullopt;

  BenchMoeOptions options;
  options.quick = parser.flag("quick");
  options.device = bench_device(parser.get("device"), options.quick, "moe");
  options.iterations = int(parser.get_int("iters"));
  options.warmup = int(parser.get_int("warmup"));
  SY_CHECK_INPUT(options.iterations >= 1 && options.warmup >= 0, "--iters must be >= 1 and --warmup >= 0");
  const double capacity_factor = parser.get_double("capacity-factor");
  SY_CHECK_INPUT(capacity_factor >= 0, "--capacity-factor must be >= 0");
  options.dropless = capacity_factor == 0;
  if (!options.dropless) options.capacity_factor = float(capacity_factor);
  options.breakdown = parser.flag("breakdown");
  options.breakdown_tokens =
      parser.has("breakdown-tokens") ? parser.get_int("breakdown-tokens") : options.quick ? 64 : 8192;
  SY_CHECK_INPUT(options.breakdown_tokens >= 1, "--breakdown-tokens must be >= 1");
  options.stream = parser.flag("stream");
  std::stringstream token_list(parser.get("stream-tokens"));
  for (std::string item; std::getline(token_list, item, ',');) {
    char* rest = nullptr;
    const long long value = std::strtoll(item.c_str(), &rest, 10);
    SY_CHECK_INPUT(!item.empty() && rest && *rest == '\0' && value >= 1 && value <= 4096,
                   "--stream-tokens: '", item, "' is not a token count in [1, 4096]");
    options.stream_tokens.push_back(value);
  }
  options.stream_steps = parser.get_int("stream-steps");
  SY_CHECK_INPUT(options.stream_steps >= 1, "--stream-steps must be >= 1");
  if (parser.has("shape")) {
    options.shape_spec = parser.get("shape");
    SY_CHECK_INPUT(!options.shape_spec.empty(), "--shape needs T,d,n,E,K[,act] or 'sonic'");
    parse_shape_spec(options.shape_spec);  // a bad spec fails here, before any set-up
    SY_CHECK_INPUT(!parser.has("breakdown-tokens"),
                   "--breakdown-tokens and --shape both name the breakdown's shape: give one (T is --shape's first field)");
  }
  // --breakdown, --stream or --shape alone runs only that; with --only it joins the parts named there.
  const bool alone = (options.breakdown || options.stream || !options.shape_spec.empty()) && !parser.has("only");
  options.parts = "," + std::string(alone ? "" : parser.get("only")) + ",";
  if (parser.has("json")) options.json_file = parser.get("json");
  return options;
}

}  // namespace switchyard::bench_moe
