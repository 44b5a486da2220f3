// The options of `switchyard bench moe` (src/cli/bench_moe_command.cpp): every flag, parsed and
// checked before anything is set up.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "src/core/device.h"

namespace switchyard::bench_moe {

struct BenchMoeOptions {
  DeviceKind device = DeviceKind::cpu;  // --device, auto resolved
  bool quick = false;
  int iterations = 20, warmup = 5;
  bool dropless = true;           // --capacity-factor 0
  float capacity_factor = 1.25f;  // the factor when !dropless
  bool breakdown = false;
  int64_t breakdown_tokens = 8192;
  bool stream = false;
  std::vector<int64_t> stream_tokens;
  int64_t stream_steps = 1000;
  std::string shape_spec;                 // --shape: "sonic" or "T,d,n,E,K[,act]" (empty: not asked)
  std::string parts = ",";                // the parts to run, comma-delimited: ",seed,large,"
  std::optional<std::string> json_file;  // --json

  // Whether part `part` (seed, dense-mode, large, routing, shape) runs.
  bool wants(const char* part) const;
};

// Parses and checks argv (SY_BAD_INPUT on a bad flag or value); nullopt when --help was printed.
std::optional<BenchMoeOptions> parse_bench_moe_options(int argc, char** argv);

}  // namespace switchyard::bench_moe
