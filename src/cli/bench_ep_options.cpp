// The options of `switchyard bench ep` (src/cli/bench_ep_options.h).
#include "src/cli/bench_ep_options.h"

#include <cmath>
#include <sstream>

#include "src/cli/cli_args.h"
#include "src/core/error.h"

namespace switchyard::bench_ep {
namespace {

std::vector<int64_t> parse_token_list(const std::string& list) {
  std::vector<int64_t> values;
  std::stringstream stream(list);
  std::string item;
  while (std::getline(stream, item, ',')) {
    size_t consumed = 0;
    long long value = 0;
    try {
      value = std::stoll(item, &consumed);
    } catch (...) {
      consumed = 0;
    }
    if (consumed != item.size() || value < 1) SY_BAD_INPUT("bench ep: --tokens entry '", item, "' is not a positive integer");
    values.push_back(value);
  }
  SY_CHECK_INPUT(!values.empty(), "bench ep: --tokens is empty");
  return values;
}

}  // namespace

bool BenchEpOptions::wants(const char* part) const {
  return parts.find("," + std::string(part) + ",") != std::string::npos;
}

std::optional<BenchEpOptions> parse_bench_ep_options(int argc, char** argv) {
  ArgParser parser("switchyard bench ep",
                   "Expert parallelism: dispatch+combine against a raw all-to-all-v of the same bytes, and the EP\n"
                   "MoE layer forward and forward+backward. Start it under mpirun with one rank per GPU.");
  parser.add_option("device", "auto|cpu|cuda", "auto: GPUs when every rank has one (cpu: only with --quick)", "auto");
  parser.add_option("tokens", "LIST", "tokens per rank, comma-separated", "8192,65536");
  parser.add_option("d-model", "N", "model width D", "768");
  parser.add_option("d-ff", "N", "expert hidden width F", "3072");
  parser.add_option("experts-per-rank", "N", "local experts L (E = L * ep-size)", "8");
  parser.add_option("top-k", "N", "choices per token", "2");
  parser.add_option("activation", "NAME", "gelu or swiglu", "gelu");
  parser.add_option("capacity-factor", "X", "capacity factor; 0 = dropless", "1.25");
  parser.add_option("ep-size", "N", "expert-parallel group size (0 = the world size)", "0");
  parser.add_option("skew", "S",
                    "skewed load: expert e's selection key gets + S * (E-1-e)/(E-1), so the first ranks' experts "
                    "are hot (0 = balanced; with --capacity-factor 0 the load shows as imbalance, not drops)",
                    "0");
  parser.add_option("max-replicas-per-rank", "M",
                    "the layer replicates hot experts, up to M replicas per rank (parallel.max_replicas_per_rank; "
                    "timed with it, and the last plan printed; needs --a2a-chunks 1, --ep-overlap none and one "
                    "node); 0 = none",
                    "0");
  parser.add_option("replica-min-rows", "N",
                    "with --max-replicas-per-rank: a replica is made only when it takes over at least N rows "
                    "(parallel.replica_min_rows)",
                    "0");
  parser.add_option("ranks-per-node", "N",
                    "ranks per node (0 = as placed by the launcher); a group over several nodes exchanges "
                    "hierarchically: one network row per token and node, fan-out inside the node",
                    "0");
  parser.add_option("a2a-chunks", "N", "split the exchange into N chunks (<= experts per rank) to overlap the expert GEMMs",
                    "1");
  parser.add_option("ep-transport", "auto|nccl|nvlink",
                    "how rows move: nvlink (peer-mapped GPU memory, one node), nccl (all-to-all-v), auto", "auto");
  parser.add_option("ep-dispatch", "activation|fp8",
                    "what the forward dispatch sends: rows in the activation dtype, or fp8 (e4m3 + a scale per 128 "
                    "values; not with --ep-transport nvlink)",
                    "activation");
  parser.add_option("ep-overlap", "none|two_part",
                    "the layer's overlap: two_part splits its tokens in two so that one part's exchange runs while "
                    "the experts compute the other (parallel.ep_overlap)",
                    "none");
  parser.add_option("ep-sm-budget", "N",
                    "SMs the exchange may use: NCCL maxCTAs of the expert-parallel communicators and the nvlink "
                    "kernels' blocks; 0 = no limit (parallel.ep_sm_budget)",
                    "0");
  parser.add_option("only", "LIST", "comma list of parts: exchange,layer", "exchange,layer");
  parser.add_option("iters", "N", "timed iterations per measurement (median of the slowest rank)", "20");
  parser.add_option("warmup", "N", "untimed iterations first", "5");
  parser.add_option("timeout", "SECONDS", "collective timeout (a hung rank fails the run)", "300");
  parser.add_option("json", "FILE", "also write every record as JSON lines to FILE (rank 0)");
  parser.add_flag("quick", "tiny shapes (a smoke test; runs on CPU ranks too)");
  parser.add_epilog("Example:\n  mpirun -np 8 switchyard bench ep --tokens 8192,65536 --json ep.jsonl");
  if (!parser.parse(argc, argv)) return std::nullopt;

  BenchEpOptions options;
  options.quick = parser.flag("quick");
  options.device = parser.get("device");
  options.activation = parser.get("activation");
  SY_CHECK_INPUT(options.device == "auto" || options.device == "cpu" || options.device == "cuda",
                 "bench ep: --device must be auto, cpu or cuda, got '", options.device, "'");
  SY_CHECK_INPUT(options.activation == "gelu" || options.activation == "swiglu",
                 "bench ep: --activation must be gelu or swiglu");
  options.iterations = int(parser.get_int("iters"));
  options.warmup = int(parser.get_int("warmup"));
  SY_CHECK_INPUT(options.iterations >= 1 && options.warmup >= 0, "bench ep: --iters must be >= 1 and --warmup >= 0");
  options.token_counts = parse_token_list(parser.get("tokens"));
  options.d_model = parser.get_int("d-model");
  options.d_ff = parser.get_int("d-ff");
  options.experts_per_rank = parser.get_int("experts-per-rank");
  if (options.quick) {
    if (!parser.has("tokens")) options.token_counts = {64, 256};
    if (!parser.has("d-model")) options.d_model = 32;
    if (!parser.has("d-ff")) options.d_ff = 64;
    if (!parser.has("experts-per-rank")) options.experts_per_rank = 2;
  }
  options.top_k = parser.get_int("top-k");
  options.chunks = parser.get_int("a2a-chunks");
  options.capacity_factor = parser.get_double("capacity-factor");
  SY_CHECK_INPUT(options.d_model >= 1 && options.d_ff >= 1 && options.experts_per_rank >= 1 && options.top_k >= 1 &&
                     options.chunks >= 1,
                 "bench ep: --d-model, --d-ff, --experts-per-rank, --top-k and --a2a-chunks must be positive");
  SY_CHECK_INPUT(options.capacity_factor >= 0, "bench ep: --capacity-factor must be >= 0");
  options.parts = "," + parser.get("only") + ",";
  options.ep_size = parser.get_int("ep-size");
  options.ranks_per_node = parser.get_int("ranks-per-node");
  options.skew = parser.get_double("skew");
  options.max_replicas_per_rank = parser.get_int("max-replicas-per-rank");
  SY_CHECK_INPUT(options.max_replicas_per_rank >= 0, "bench ep: --max-replicas-per-rank must be >= 0");
  options.replica_min_rows = parser.get_int("replica-min-rows");
  SY_CHECK_INPUT(options.replica_min_rows >= 0 && options.replica_min_rows <= (int64_t(1) << 30),
                 "bench ep: --replica-min-rows must be in [0, 2^30], got ", options.replica_min_rows);
  SY_CHECK_INPUT(options.skew >= 0 && std::isfinite(options.skew), "bench ep: --skew must be a finite value >= 0");
  SY_CHECK_INPUT(options.ranks_per_node >= 0, "bench ep: --ranks-per-node must be >= 0, got ", options.ranks_per_node);
  options.timeout_s = parser.get_double("timeout");
  options.transport = parse_ep_transport(parser.get("ep-transport"), "bench ep: --ep-transport");
  options.dispatch = parse_ep_dispatch(parser.get("ep-dispatch"), "bench ep: --ep-dispatch");
  SY_CHECK_INPUT(options.dispatch != EpDispatch::fp8 || options.transport != EpTransport::nvlink,
                 "bench ep: --ep-dispatch fp8 needs --ep-transport nccl or auto (nvlink moves activation rows only)");
  options.overlap = parse_ep_overlap(parser.get("ep-overlap"), "bench ep: --ep-overlap");
  SY_CHECK_INPUT(options.max_replicas_per_rank == 0 || (options.chunks == 1 && options.overlap == EpOverlap::none),
                 "bench ep: --max-replicas-per-rank ", options.max_replicas_per_rank,
                 " needs --a2a-chunks 1 and --ep-overlap none (replication's current limits)");
  const int64_t sm_budget = parser.get_int("ep-sm-budget");
  SY_CHECK_INPUT(sm_budget >= 0 && sm_budget <= 1024, "bench ep: --ep-sm-budget must be in [0, 1024], got ",
                 sm_budget);
  options.sm_budget = int(sm_budget);
  if (parser.has("json")) options.json_file = parser.get("json");
  return options;
}

}  // namespace switchyard::bench_ep
