// switchyard bench <name> [options]: dispatches to one benchmark; --help lists them.
#include <algorithm>
#include <cstring>
#include <iostream>
#include <string>

#include "src/cli/commands.h"
#include "src/core/error.h"

namespace switchyard {
namespace {

struct Benchmark {
  const char* name;
  const char* summary;
  int (*run)(int argc, char** argv);
};

const Benchmark kBenchmarks[] = {
    {"comm", "collective bandwidth and latency (all-to-all-v, all-reduce, ...) over MPI or NCCL", command_bench_comm},
    {"moe", "the MoE layer vs a dense FFN, sparse vs dense-compute, expert GEMM TFLOP/s, routing", command_bench_moe},
    {"ep", "expert parallelism: dispatch+combine vs raw all-to-all-v, EP layer fwd and fwd+bwd (under mpirun)",
     command_bench_ep},
    {"optimizer", "the optimizer's passes (gradient norm, AdamW) over N parameters: ms and GB/s",
     command_bench_optimizer},
    {"passes", "a step's memory-bound passes (norms, rotary, activations, residual add) alone: ms and GB/s",
     command_bench_passes},
};

void print_benchmarks(std::ostream& out) {
  out << "Usage: switchyard bench <benchmark> [options]\n\nBenchmarks:\n";
  size_t width = 0;
  for (const Benchmark& benchmark : kBenchmarks) width = std::max(width, std::strlen(benchmark.name));
  for (const Benchmark& benchmark : kBenchmarks)
    out << "  " << benchmark.name << std::string(width - std::strlen(benchmark.name) + 2, ' ') << benchmark.summary
        << "\n";
  out << "\nRun 'switchyard bench <benchmark> --help' for its options.\n";
}

}  // namespace

int command_bench(int argc, char** argv) {
  if (argc < 2) {
    print_benchmarks(std::cerr);
    return kExitBadInput;
  }
  const std::string name = argv[1];
  if (name == "-h" || name == "--help" || name == "help") {
    print_benchmarks(std::cout);
    return kExitOk;
  }
  for (const Benchmark& benchmark : kBenchmarks)
    if (name == benchmark.name) return benchmark.run(argc - 1, argv + 1);  // argv[0] becomes the benchmark name
  std::cerr << "switchyard bench: unknown benchmark '" << name << "'\n"
            << "Run 'switchyard bench --help' for the list of benchmarks.\n";
  return kExitBadInput;
}

}  // namespace switchyard
