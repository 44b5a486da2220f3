// switchyard bench ep: what the exchange part (src/cli/bench_ep_command.cpp) and the layer part
// (src/cli/bench_ep_layer.cpp) share -- the settings, the set-up's results, the timing and
// reduction helpers and the records' common fields -- and the layer part's entry points.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "src/cli/bench_common.h"
#include "src/cli/bench_ep_options.h"
#include "src/comm/bootstrap.h"
#include "src/comm/communicator.h"
#include "src/core/device.h"
#include "src/model/moe_ep_layer.h"
#include "src/ops/ops.h"

namespace switchyard::bench_ep {

struct EpBenchSettings {
  ExecContext context;
  DType activation_dtype = DType::bf16, float_dtype = DType::f32;
  int warmup = 5, iterations = 20;
  uint64_t seed = 1;
  MoeLayerConfig config;
  int chunks = 1;
  EpTransport transport = EpTransport::automatic;
  EpDispatch dispatch = EpDispatch::activation;
  double skew = 0;  // --skew: selection bias ramp over the experts
  EpOverlap overlap = EpOverlap::none;  // the layer's
  int sm_budget = 0;
  int max_replicas_per_rank = 0;  // the layer's hot-expert replicas (--max-replicas-per-rank)
  int replica_min_rows = 0;       // --replica-min-rows
  bool fp8() const { return dispatch == EpDispatch::fp8; }
  int64_t row_bytes() const { return config.d_model * int64_t(dtype_size(activation_dtype)); }
  // Bytes of one row in the forward dispatch: fp8 records or activation rows.
  int64_t dispatch_row_bytes() const { return fp8() ? fp8_row_bytes(config.d_model) : row_bytes(); }
};

// The process, its groups and the settings every measurement shares (after the set-up every rank
// runs the same measurements; rank 0 prints and writes the records).
struct BenchEpSetup {
  ProcessContext context;
  int ep_size = 1;
  int ranks_per_node = 0, ep_nodes = 1;  // the group's ranks per node and nodes (> 1: hierarchical)
  ParallelGroups groups;
  EpBenchSettings settings;
  const char* backend = "mpi";  // the transport the layers will pick: mpi, nccl or nvlink
  bool leader = false;
};

using Record = BenchRecord;

// Random inputs on the bench's device (src/cli/bench_common.h).
Buffer random_buffer(const EpBenchSettings& settings, DType dtype, int64_t count, float stddev, uint64_t seed);
// Per iteration: barrier, run, wait for the device; the slowest rank's time; the median (ms).
double time_slowest_median_ms(const EpBenchSettings& settings, Communicator& world, const std::function<void()>& run,
                              const std::function<void()>& wait);
double global_mean(double value, int world_size);
double global_max(double value);
// The fields every record starts with: the run's shape.
Record base_record(const BenchEpSetup& setup, const BenchEpOptions& options, const char* part, int64_t tokens);

// ---- The layer part (src/cli/bench_ep_layer.cpp) ----

struct LayerTiming {
  int64_t tokens = 0;
  double forward_ms = 0, both_ms = 0;  // forward; forward+backward
  double received_rows = 0;    // rows a rank's experts (and replica slots) received (mean over ranks)
  double network_rows = 0;     // hierarchical: rows a rank sent to other nodes' relays (mean over ranks)
  double received_max = 0;     // rows the busiest rank's experts (and replica slots) received
  bool replicates = false;     // --max-replicas-per-rank: the layer's last plan
  ReplicationStats replication;
};

// The layer's forward and forward+backward, timed (every rank).
LayerTiming time_layer(BenchEpSetup& setup, int64_t tokens);
// Rank 0 prints the line; every rank keeps the record.
void report_layer(const BenchEpSetup& setup, const BenchEpOptions& options, const LayerTiming& timing,
                  std::vector<Record>& records);

}  // namespace switchyard::bench_ep
