// switchyard bench ep, the layer part (src/cli/bench_ep_command.cpp says what is measured): the EP
// layer with random weights for this rank's shard, timed forward and forward+backward, its load and,
// with --max-replicas-per-rank M, its hot-expert replication (applied: the timings include it).
#include "src/cli/bench_ep_layer.h"

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "src/core/mpi_check.h"

namespace switchyard::bench_ep {

namespace {

// The EP layer with random weights for this rank's shard.
struct LayerBench {
  std::unique_ptr<MoeEpLayer> layer;
  Buffer x, y, grad_y, grad_x, router, w1, w2, grad_router, grad_w1, grad_w2, skew_bias;
  Tensor skew_bias_view;
  MoeWeights weights;
  MoeGradients gradients;
  Tensor x_view, y_view, grad_y_view, grad_x_view;

  LayerBench(const EpBenchSettings& settings, const ParallelGroups& groups, int64_t tokens) {
    const MoeLayerConfig& config = settings.config;
    const DType act = settings.activation_dtype;
    const DeviceKind device = settings.context.device;
    EpLayerOptions options;
    options.a2a_chunks = settings.chunks;
    options.transport = settings.transport;
    options.dispatch = settings.dispatch;
    options.overlap = settings.overlap;
    options.sm_budget = settings.sm_budget;
    options.max_replicas_per_rank = settings.max_replicas_per_rank;
    options.replica_min_rows = settings.replica_min_rows;
    options.node_group = groups.expert_parallel_node;  // null unless the group spans nodes
    options.rail_group = groups.expert_parallel_rail;
    layer = std::make_unique<MoeEpLayer>(config, groups.expert_parallel, device, act, tokens, options);
    const int64_t d = config.d_model, f = config.moe.expert_d_ff, e = config.moe.num_experts, local = layer->local_experts();
    const uint64_t seed = settings.seed + 100 * uint64_t(layer->first_expert() + 1);
    x = random_buffer(settings, act, tokens * d, 1.0f, settings.seed + 21 + uint64_t(process_rank()));
    grad_y = random_buffer(settings, act, tokens * d, 1.0f, settings.seed + 22 + uint64_t(process_rank()));
    router = random_buffer(settings, act, d * e, 1.0f / std::sqrt(float(d)), settings.seed + 23);
    w1 = random_buffer(settings, act, local * d * config.w1_columns(), 1.0f / std::sqrt(float(d)), seed + 1);
    w2 = random_buffer(settings, act, local * f * d, 1.0f / std::sqrt(float(f)), seed + 2);
    const DType grad_dtype = layer->gradient_dtype();
    y = Buffer(device, size_t(tokens * d) * dtype_size(act));
    grad_x = Buffer(device, size_t(tokens * d) * dtype_size(act));
    grad_router = Buffer(device, size_t(d * e) * dtype_size(grad_dtype));
    grad_w1 = Buffer(device, size_t(local * d * config.w1_columns()) * dtype_size(grad_dtype));
    grad_w2 = Buffer(device, size_t(local * f * d) * dtype_size(grad_dtype));
    weights = {router.view(act, {d, e}), w1.view(act, {local, d, config.w1_columns()}), w2.view(act, {local, f, d})};
    gradients = {grad_router.view(grad_dtype, {d, e}), grad_w1.view(grad_dtype, {local, d, config.w1_columns()}),
                 grad_w2.view(grad_dtype, {local, f, d})};
    if (settings.skew > 0) {  // a selection bias (keys only): hot experts without changing the gates
      std::vector<float> ramp(static_cast<size_t>(e));
      for (int64_t expert = 0; expert < e; ++expert)
        ramp[size_t(expert)] = float(settings.skew * double(e - 1 - expert) / double(std::max<int64_t>(e - 1, 1)));
      skew_bias = Buffer(device, size_t(e) * sizeof(float));
      device_copy(skew_bias.data(), device, ramp.data(), DeviceKind::cpu, ramp.size() * sizeof(float));
      skew_bias_view = skew_bias.view(DType::f32, {e});
      weights.router_bias = &skew_bias_view;
    }
    x_view = x.view(act, {tokens, d});
    y_view = y.view(act, {tokens, d});
    grad_y_view = grad_y.view(act, {tokens, d});
    grad_x_view = grad_x.view(act, {tokens, d});
  }
  void forward(const ExecContext& context, bool training) {
    MoeForwardArgs args;
    args.training = training;
    args.read_losses = false;
    layer->forward(context, x_view, weights, args, y_view);
  }
  void forward_backward(const ExecContext& context) {
    forward(context, true);
    layer->backward(context, grad_y_view, weights, 1.0f, 1.0f, grad_x_view, gradients);
  }
};

// --max-replicas-per-rank: what the layer's plan did in the last forward (the same on every rank
// of a group; rank 0 prints its group's): the busiest rank's rows without and with the replicas.
void report_replication(const BenchEpSetup& setup, const BenchEpOptions& options, const LayerTiming& timing,
                        Record& record) {
  if (!timing.replicates) return;
  const ReplicationStats& stats = timing.replication;
  if (setup.leader)
    std::printf("         replication (up to %lld per rank, applied; the last forward's plan): busiest rank %lld -> "
                "%lld rows, %lld replicas, %lld rows moved\n",
                (long long)options.max_replicas_per_rank, (long long)stats.max_load_before,
                (long long)stats.max_load_after, (long long)stats.replicas, (long long)stats.moved_rows);
  record.add("replication_max_load_before", double(stats.max_load_before));
  record.add("replication_max_load_after", double(stats.max_load_after));
  record.add("replication_replicas", double(stats.replicas));
  record.add("replication_moved_rows", double(stats.moved_rows));
}

}  // namespace

LayerTiming time_layer(BenchEpSetup& setup, int64_t tokens) {
  const EpBenchSettings& settings = setup.settings;
  Communicator& world = *setup.groups.world;
  auto wait_device = [&] { ops::synchronize(settings.context); };
  LayerBench bench(settings, setup.groups, tokens);
  const double forward_ms =
      time_slowest_median_ms(settings, world, [&] { bench.forward(settings.context, false); }, wait_device);
  const double both_ms =
      time_slowest_median_ms(settings, world, [&] { bench.forward_backward(settings.context); }, wait_device);
  const MoeExchangeStats stats = bench.layer->exchange_stats();
  const double received = global_mean(double(stats.received_rows), setup.context.world_size);
  const double network = global_mean(double(stats.network_rows), setup.context.world_size);
  LayerTiming timing;
  timing.tokens = tokens;
  timing.forward_ms = forward_ms;
  timing.both_ms = both_ms;
  timing.received_rows = received;
  timing.network_rows = network;
  timing.received_max = global_max(double(stats.received_rows));
  timing.replicates = bench.layer->replicates();
  timing.replication = bench.layer->replication_stats();  // the last forward's plan (of world rank 0's group)
  return timing;
}

void report_layer(const BenchEpSetup& setup, const BenchEpOptions& options, const LayerTiming& timing,
                  std::vector<Record>& records) {
  const double forward_ms = timing.forward_ms, both_ms = timing.both_ms;
  const int64_t tokens = timing.tokens;
  const double flops = 2.0 * double(tokens) * double(options.top_k) *
                       (double(options.d_model) * double(setup.settings.config.w1_columns()) +
                        double(options.d_ff) * double(options.d_model));
  if (setup.leader) {
    std::printf("layer    T=%-7lld forward %9.3f ms (%7.1f TFLOP/s) | forward+backward %9.3f ms (%7.1f TFLOP/s) | "
                "%.0f tokens/s per rank",
                (long long)tokens, forward_ms, flops / (forward_ms * 1e-3) / 1e12, both_ms,
                3 * flops / (both_ms * 1e-3) / 1e12, double(tokens) / (both_ms * 1e-3));
    std::printf(" | load max/mean %.2f", timing.received_max / std::max(timing.received_rows, 1.0));
    if (setup.ep_nodes > 1) std::printf(" | %.0f network rows per rank", timing.network_rows);
    std::printf("\n");
  }
  Record record = base_record(setup, options, "layer", tokens);
  record.add("fwd_ms", forward_ms);
  record.add("fwdbwd_ms", both_ms);
  record.add("fwd_expert_tflops", flops / (forward_ms * 1e-3) / 1e12);
  record.add("fwdbwd_expert_tflops", 3 * flops / (both_ms * 1e-3) / 1e12);
  record.add("received_rows_mean", timing.received_rows);
  record.add("received_rows_max", timing.received_max);
  report_replication(setup, options, timing, record);
  if (setup.ep_nodes > 1) record.add("network_rows_mean", timing.network_rows);
  records.push_back(record);
}

}  // namespace switchyard::bench_ep
