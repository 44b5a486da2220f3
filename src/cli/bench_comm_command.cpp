// switchyard bench comm: collective bandwidth over MPI (CPU) or NCCL (GPU), in the manner of
// nccl-tests.
//
// For each op and message size S (bytes of one rank's buffer): all_to_all sends S / n to each
// of the n ranks (all_to_all_v with equal counts); all_reduce sums S bytes in place. Each timed
// iteration starts after a barrier and is timed with MPI_Wtime (MPI) or CUDA events on the
// communicator's stream (NCCL); an iteration's time is that of the slowest rank, the reported
// time the median over iterations. algbw = S / time; busbw scales it to the bytes each link
// carries: (n-1)/n for all-to-all, 2(n-1)/n for all-reduce.
// Data is random (a hash of seed, source, destination, index) and the result of the last timed
// iteration is checked bit for bit: the receive buffer is poisoned before it, and the
// all-reduce input (small integers, so the sum is exact in every dtype) is restored before each
// iteration, untimed.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "src/comm/bootstrap.h"
#include "src/cli/cli_args.h"
#include "src/cli/commands.h"
#include "src/core/device.h"
#include "src/core/dtype.h"
#include "src/core/mpi_check.h"
#if defined(SWITCHYARD_WITH_CUDA)
#include "src/comm/nccl_comm.h"
#endif

namespace switchyard {
namespace {

struct BenchResult {
  std::string op;
  int64_t bytes = 0, elements = 0;
  double median_seconds = 0, min_seconds = 0, algbw = 0, busbw = 0;
  int64_t mismatches = 0;  // summed over ranks
};

// "1K", "16M", "2G", "4096", optionally with a trailing B: binary multiples.
int64_t parse_size(const std::string& text) {
  size_t consumed = 0;
  long long number = 0;
  try {
    number = std::stoll(text, &consumed);
  } catch (...) {
    consumed = 0;
  }
  std::string suffix = text.substr(consumed);
  if (!suffix.empty() && (suffix.back() == 'B' || suffix.back() == 'b')) suffix.pop_back();
  int64_t multiplier = 1;
  if (suffix == "K" || suffix == "k") multiplier = int64_t(1) << 10;
  else if (suffix == "M" || suffix == "m") multiplier = int64_t(1) << 20;
  else if (suffix == "G" || suffix == "g") multiplier = int64_t(1) << 30;
  else if (!suffix.empty()) consumed = 0;
  if (consumed == 0 || number <= 0)
    SY_BAD_INPUT("bench comm: --sizes entry '", text, "' is not a positive size such as 4096, 1K, 16M or 1G");
  return int64_t(number) * multiplier;
}

std::vector<int64_t> parse_sizes(const std::string& list) {
  std::vector<int64_t> sizes;
  size_t start = 0;
  while (start <= list.size()) {
    size_t comma = list.find(',', start);
    if (comma == std::string::npos) comma = list.size();
    sizes.push_back(parse_size(list.substr(start, comma - start)));
    start = comma + 1;
  }
  return sizes;
}

uint64_t mix(uint64_t value) {  // splitmix64 finaliser
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

// Element `index` of the all-to-all message from `source` to `destination`: 24 random bits.
float message_value(uint64_t seed, int source, int destination, int64_t index) {
  uint64_t hash = mix(seed ^ mix((uint64_t(uint32_t(source)) << 32) | uint32_t(destination)) ^ mix(uint64_t(index)));
  return float(int32_t(hash >> 40) - (1 << 23)) * (1.0f / float(1 << 23));
}
// All-reduce input of `rank`: +-1..4, so sums over up to 32 ranks are exact even in bf16.
float reduce_value(uint64_t seed, int rank, int64_t index) {
  uint64_t hash = mix(seed ^ mix(uint64_t(rank) + 0x5bd1e995ull) ^ mix(uint64_t(index)));
  float magnitude = float(1 + (hash & 3));
  return (hash >> 2) & 1 ? magnitude : -magnitude;
}

void store(DType dtype, void* base, int64_t index, float value) {
  switch (dtype) {
    case DType::f32: static_cast<float*>(base)[index] = value; return;
    case DType::bf16: static_cast<uint16_t*>(base)[index] = Bf16(value).bits; return;
    case DType::f16: static_cast<uint16_t*>(base)[index] = Half(value).bits; return;
    default: SY_BAD_INPUT("bench comm: --dtype must be fp32, bf16 or fp16");
  }
}

bool same_element(DType dtype, const void* base, int64_t index, float expected) {
  const size_t element = dtype_size(dtype);
  unsigned char wanted[8];
  store(dtype, wanted, 0, expected);
  return std::memcmp(static_cast<const char*>(base) + size_t(index) * element, wanted, element) == 0;
}

class CommBenchmark {
 public:
  CommBenchmark(Communicator& world, DType dtype, int iterations, int warmup, uint64_t seed)
      : world_(world), dtype_(dtype), iterations_(iterations), warmup_(warmup), seed_(seed) {}

  BenchResult all_to_all(int64_t requested_bytes) {
    const int ranks = world_.size(), me = world_.rank();
    const int64_t element = int64_t(dtype_size(dtype_));
    const int64_t per_peer = std::max<int64_t>(1, requested_bytes / (element * ranks));
    const int64_t total = per_peer * ranks;
    std::vector<int64_t> counts(size_t(ranks), per_peer), offsets(size_t(ranks), 0);
    for (int peer = 0; peer < ranks; ++peer) offsets[size_t(peer)] = peer * per_peer;

    std::vector<unsigned char> host(size_t(total * element));
    for (int peer = 0; peer < ranks; ++peer)
      for (int64_t index = 0; index < per_peer; ++index)
        store(dtype_, host.data(), peer * per_peer + index, message_value(seed_, me, peer, index));
    Buffer send(world_.device(), host.size()), recv(world_.device(), host.size());
    device_copy(send.data(), send.device(), host.data(), DeviceKind::cpu, host.size());

    auto prepare = [&](int timed_iteration) {
      world_.synchronize();
      if (timed_iteration == iterations_ - 1) device_memset(recv.data(), recv.device(), 0xff, recv.bytes());
      world_.barrier();
    };
    auto run = [&] { world_.all_to_all_v(send.data(), counts, offsets, recv.data(), counts, offsets, dtype_); };
    BenchResult result = measure("all_to_all", total, prepare, run);

    device_copy(host.data(), DeviceKind::cpu, recv.data(), recv.device(), host.size());
    int64_t mismatches = 0;
    for (int source = 0; source < ranks; ++source)
      for (int64_t index = 0; index < per_peer; ++index)
        mismatches += !same_element(dtype_, host.data(), source * per_peer + index,
                                    message_value(seed_, source, me, index));
    result.mismatches = global_sum(mismatches);
    result.busbw = result.algbw * double(ranks - 1) / double(ranks);
    return result;
  }

  BenchResult all_reduce(int64_t requested_bytes) {
    const int ranks = world_.size(), me = world_.rank();
    const int64_t count = std::max<int64_t>(1, requested_bytes / int64_t(dtype_size(dtype_)));
    std::vector<unsigned char> host(size_t(count) * dtype_size(dtype_));
    for (int64_t index = 0; index < count; ++index) store(dtype_, host.data(), index, reduce_value(seed_, me, index));
    Buffer pristine(world_.device(), host.size()), data(world_.device(), host.size());
    device_copy(pristine.data(), pristine.device(), host.data(), DeviceKind::cpu, host.size());

    auto prepare = [&](int) {
      world_.synchronize();
      device_copy(data.data(), data.device(), pristine.data(), pristine.device(), data.bytes());
      world_.barrier();
    };
    auto run = [&] { world_.all_reduce_sum(data.data(), count, dtype_); };
    BenchResult result = measure("all_reduce", count, prepare, run);

    device_copy(host.data(), DeviceKind::cpu, data.data(), data.device(), host.size());
    int64_t mismatches = 0;
    for (int64_t index = 0; index < count; ++index) {
      float expected = 0;
      for (int rank = 0; rank < ranks; ++rank) expected += reduce_value(seed_, rank, index);
      mismatches += !same_element(dtype_, host.data(), index, expected);
    }
    result.mismatches = global_sum(mismatches);
    result.busbw = result.algbw * 2.0 * double(ranks - 1) / double(ranks);
    return result;
  }

 private:
  // Runs warm-up and timed iterations; per-iteration time = slowest rank; median and minimum.
  BenchResult measure(const char* op, int64_t elements, const std::function<void(int)>& prepare,
                      const std::function<void()>& run) {
    for (int iteration = 0; iteration < warmup_; ++iteration) {
      prepare(-1);
      run();
    }
    world_.synchronize();
    std::vector<double> seconds;
    if (world_.device() == DeviceKind::cuda) {
#if defined(SWITCHYARD_WITH_CUDA)
      seconds = time_stream_iterations(world_, iterations_, prepare, run);
#endif
    } else {
      for (int iteration = 0; iteration < iterations_; ++iteration) {
        prepare(iteration);
        const double start = MPI_Wtime();
        run();
        world_.synchronize();
        seconds.push_back(MPI_Wtime() - start);
      }
    }
    SY_CHECK(int(seconds.size()) == iterations_, "bench comm: missing timings");
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, seconds.data(), iterations_, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
    std::sort(seconds.begin(), seconds.end());
    BenchResult result;
    result.op = op;
    result.elements = elements;
    result.bytes = elements * int64_t(dtype_size(dtype_));
    result.median_seconds = iterations_ % 2 ? seconds[size_t(iterations_ / 2)]
                                            : 0.5 * (seconds[size_t(iterations_ / 2 - 1)] + seconds[size_t(iterations_ / 2)]);
    result.min_seconds = seconds.front();
    result.algbw = result.median_seconds > 0 ? double(result.bytes) / result.median_seconds / 1e9 : 0;
    return result;
  }

  int64_t global_sum(int64_t value) {
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD));
    return value;
  }

  Communicator& world_;
  DType dtype_;
  int iterations_, warmup_;
  uint64_t seed_;
};

void write_json(const std::string& path, const std::vector<BenchResult>& results, const ProcessContext& context,
                const char* backend, DType dtype, int iterations, int warmup, uint64_t seed) {
  std::ofstream out(path);
  if (!out) SY_BAD_INPUT("bench comm: cannot write --json file '", path, "'");
  out << "{\n  \"benchmark\": \"comm\",\n  \"backend\": \"" << backend << "\",\n  \"world_size\": "
      << context.world_size << ",\n  \"launcher\": \"" << context.launcher << "\",\n  \"dtype\": \""
      << dtype_name(dtype) << "\",\n  \"iterations\": " << iterations << ",\n  \"warmup\": " << warmup
      << ",\n  \"seed\": " << seed << ",\n  \"results\": [\n";
  for (size_t index = 0; index < results.size(); ++index) {
    const BenchResult& result = results[index];
    char line[512];
    std::snprintf(line, sizeof(line),
                  "    {\"op\": \"%s\", \"bytes\": %lld, \"elements\": %lld, \"time_us_median\": %.3f, "
                  "\"time_us_min\": %.3f, \"algbw_GBps\": %.4f, \"busbw_GBps\": %.4f, \"verified\": %s}%s\n",
                  result.op.c_str(), static_cast<long long>(result.bytes), static_cast<long long>(result.elements),
                  result.median_seconds * 1e6, result.min_seconds * 1e6, result.algbw, result.busbw,
                  result.mismatches == 0 ? "true" : "false", index + 1 < results.size() ? "," : "");
    out << line;
  }
  out << "  ]\n}\n";
  if (!out) SY_THROW("bench comm: writing '", path, "' failed");
}

}  // namespace

int command_bench_comm(int argc, char** argv) {
  ArgParser parser("switchyard bench comm",
                   "Measure collective time and bandwidth (all-to-all-v, all-reduce) over MPI on the CPU or NCCL "
                   "on GPUs, like nccl-tests. Start it under mpirun or srun with the ranks to measure.");
  parser.add_option("sizes", "LIST", "message sizes per rank in bytes, comma-separated, K/M/G = 2^10/2^20/2^30",
                    "1K,1M,16M,256M");
  parser.add_option("iters", "N", "timed iterations per size", "20");
  parser.add_option("warmup", "N", "untimed warm-up iterations per size", "5");
  parser.add_option("op", "OP", "all_to_all, all_reduce or all", "all");
  parser.add_option("device", "DEVICE", "auto (GPUs when every rank has one), cpu (MPI) or cuda (NCCL)", "auto");
  parser.add_option("dtype", "TYPE", "element type: fp32, bf16 or fp16", "fp32");
  parser.add_option("timeout", "SECONDS", "collective timeout (a hung rank fails the run)", "300");
  parser.add_option("json", "FILE", "also write the results as JSON (rank 0)");
  parser.add_epilog("Example:\n  mpirun -np 8 switchyard bench comm --sizes 1M,64M,256M --op all_to_all --json a2a.json");
  if (!parser.parse(argc, argv)) return kExitOk;

  const std::vector<int64_t> sizes = parse_sizes(parser.get("sizes"));
  const int64_t iterations = parser.get_int("iters"), warmup = parser.get_int("warmup");
  SY_CHECK_INPUT(iterations >= 1 && iterations <= 100000, "bench comm: --iters must be 1..100000, got ", iterations);
  SY_CHECK_INPUT(warmup >= 0 && warmup <= 100000, "bench comm: --warmup must be 0..100000, got ", warmup);
  const std::string op = parser.get("op"), device_name = parser.get("device");
  SY_CHECK_INPUT(op == "all_to_all" || op == "all_reduce" || op == "all", "bench comm: --op must be all_to_all, "
                 "all_reduce or all, got '", op, "'");
  SY_CHECK_INPUT(device_name == "auto" || device_name == "cpu" || device_name == "cuda",
                 "bench comm: --device must be auto, cpu or cuda, got '", device_name, "'");
  const DType dtype = parse_dtype(parser.get("dtype"));
  const double timeout_seconds = parser.get_double("timeout");

  ProcessContext context = bootstrap_process(DeviceKind::cpu);
  bool use_cuda = device_name == "cuda";
  if (device_name == "auto") {  // GPUs only when every node has one per rank (NCCL's rule)
    int enough = cuda_device_count() >= context.local_size ? 1 : 0;
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &enough, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    use_cuda = enough != 0;
  }
  if (use_cuda) context = bootstrap_process(DeviceKind::cuda);
  context.device = use_cuda ? DeviceKind::cuda : DeviceKind::cpu;
  ParallelGroups groups = create_parallel_groups(context, 1, timeout_seconds);
  Communicator& world = *groups.world;
  const char* backend = use_cuda ? "nccl" : "mpi";

  uint64_t seed = 0;
  if (context.world_rank == 0) seed = (uint64_t(std::random_device{}()) << 32) | std::random_device{}();
  MPI_CHECK(MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD));

  const bool leader = context.world_rank == 0;
  if (leader) {
    std::printf("# switchyard bench comm: %d ranks (%s), backend %s on %s, dtype %s, %lld iterations after %lld "
                "warm-up, seed %llu\n",
                context.world_size, context.launcher.c_str(), backend, use_cuda ? "cuda" : "cpu", dtype_name(dtype),
                static_cast<long long>(iterations), static_cast<long long>(warmup),
                static_cast<unsigned long long>(seed));
    std::printf("# time: median over iterations of the slowest rank; bytes: one rank's buffer; busbw = algbw * "
                "(n-1)/n (all_to_all), 2(n-1)/n (all_reduce)\n");
    std::printf("# %-11s %12s %12s %12s %12s %12s %12s  %s\n", "op", "bytes", "elements", "time_us", "min_us",
                "algbw_GB/s", "busbw_GB/s", "check");
    std::fflush(stdout);
  }

  CommBenchmark benchmark(world, dtype, int(iterations), int(warmup), seed);
  std::vector<BenchResult> results;
  int64_t failed = 0;
  for (const char* name : {"all_to_all", "all_reduce"}) {
    if (op != "all" && op != name) continue;
    for (int64_t bytes : sizes) {
      BenchResult result =
          std::string(name) == "all_to_all" ? benchmark.all_to_all(bytes) : benchmark.all_reduce(bytes);
      failed += result.mismatches != 0;
      if (leader) {
        const std::string check = result.mismatches == 0 ? "ok" : "FAILED (" + std::to_string(result.mismatches) +
                                                                       " wrong elements)";
        std::printf("  %-11s %12lld %12lld %12.2f %12.2f %12.3f %12.3f  %s\n", result.op.c_str(),
                    static_cast<long long>(result.bytes), static_cast<long long>(result.elements),
                    result.median_seconds * 1e6, result.min_seconds * 1e6, result.algbw, result.busbw,
                    check.c_str());
        std::fflush(stdout);
      }
      results.push_back(result);
    }
  }
  if (leader && parser.has("json"))
    write_json(parser.get("json"), results, context, backend, dtype, int(iterations), int(warmup), seed);
  if (failed && leader)
    std::fprintf(stderr, "switchyard bench comm: %lld result(s) failed verification\n", static_cast<long long>(failed));
  return failed ? kExitFailure : kExitOk;
}

}  // namespace switchyard
