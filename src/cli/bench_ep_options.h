// The options of `switchyard bench ep` (src/cli/bench_ep_command.cpp): every flag, parsed and
// checked on each rank before MPI is started. What needs the world (the device under auto, the
// ep size against the world size) is settled at set-up.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "src/comm/ep_transport.h"

namespace switchyard::bench_ep {

struct BenchEpOptions {
  bool quick = false;
  std::string device = "auto";      // auto|cpu|cuda
  std::string activation = "gelu";  // gelu|swiglu
  int iterations = 20, warmup = 5;
  std::vector<int64_t> token_counts;  // tokens per rank
  int64_t d_model = 768, d_ff = 3072, experts_per_rank = 8, top_k = 2;
  int64_t chunks = 1;            // --a2a-chunks as given (the set-up caps it at experts_per_rank)
  double capacity_factor = 1.25;  // 0 = dropless
  int64_t ep_size = 0;            // 0 = the world size
  int64_t ranks_per_node = 0;     // --ranks-per-node: 0 = the bootstrap's nodes (see parallel.ranks_per_node)
  double skew = 0;                // --skew: selection bias toward low-numbered experts (0 = balanced)
  int64_t max_replicas_per_rank = 0;  // --max-replicas-per-rank: > 0 the layer replicates hot experts
  int64_t replica_min_rows = 0;       // --replica-min-rows: the fewest rows a replica must take over
  double timeout_s = 300;
  EpTransport transport = EpTransport::automatic;
  EpDispatch dispatch = EpDispatch::activation;  // --ep-dispatch (fp8: nccl only)
  EpOverlap overlap = EpOverlap::none;            // --ep-overlap (the layer part)
  int sm_budget = 0;                              // --ep-sm-budget (0: no limit)
  std::string parts = ",";                // the parts to run, comma-delimited: ",exchange,layer,"
  std::optional<std::string> json_file;  // --json (written by rank 0)

  // Whether part `part` (exchange, layer) runs.
  bool wants(const char* part) const;
};

// Parses and checks argv (SY_BAD_INPUT on a bad flag or value); nullopt when --help was printed.
std::optional<BenchEpOptions> parse_bench_ep_options(int argc, char** argv);

}  // namespace switchyard::bench_ep
