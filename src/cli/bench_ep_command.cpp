// switchyard bench ep: expert parallelism under mpirun (one rank per GPU, or CPU ranks with --quick).
//
//   exchange   dispatch + combine of one layer's tokens: permute (packed by global expert), count
//              exchange (the one host sync), payload all_to_all_v per chunk, the receiver's
//              reorder into its padded expert layout and back, the return all_to_all_v and the
//              gated combine -- everything of the EP layer except the expert FFN -- against a raw
//              all_to_all_v moving the same rows there and back in the same run.
//              GB/s = (rows sent + rows received) * D * element size / time, the payload bytes this
//              rank puts on and takes off the network (mean over ranks). With --ep-dispatch fp8 the
//              dispatch quantizes the rows first and dequantizes each chunk on arrival (as the EP
//              layer does, src/comm/ep_exchange.h); its rows count fp8_row_bytes(D) each, and the
//              raw baseline moves the same bytes (fp8 rows out, activation rows back).
//   layer      MoeEpLayer forward and forward+backward (router, routing, exchange, expert GEMMs),
//              and the load: rows the busiest rank's experts received over the mean (--skew S
//              biases selection toward the first experts: key_e + S (E-1-e)/(E-1)).
//              With a group over several nodes (--ranks-per-node, or the launcher's placement) the
//              layer runs the hierarchical exchange and reports the rows it sent over the network
//              (one per token and destination node); the exchange part measures the one-level
//              exchange only and is skipped there.
//              With --ep-overlap two_part the layer's two-part overlap (src/model/moe_ep_layer.h).
//              With --max-replicas-per-rank M the layer replicates hot experts (up to M replicas per
//              rank, src/model/moe_ep_layer.h): timed with it, the load is the rows after replication,
//              and the last forward's plan is printed (busiest rank's rows before -> after).
//              The layer part lives in src/cli/bench_ep_layer.cpp.
// --ep-sm-budget N caps the exchange's SMs in both parts: the expert-parallel NCCL communicators
// are created with maxCTAs N, the nvlink kernels launch at most N blocks.
// Times: per iteration the slowest rank (after a barrier), median over iterations, after
// warm-up; routing from random data, so the load is about balanced (capacity drops included).
// Expert FLOPs per rank (forward): 2 * T * k * (D * F' + F * D), F' = F (gelu) or 2F (swiglu);
// forward+backward counts three times that.
// The flags: bench_ep_options.h. This file holds the exchange bench, the set-up, the helpers both
// parts share (declared in bench_ep_layer.h), the header and the records' file; each part's timing
// (a results struct; every rank) and the lines and records made from it (rank 0 prints).
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "src/comm/parallel_layout.h"
#include "src/comm/bootstrap.h"
#include "src/comm/expert_dispatch.h"
#include "src/comm/nvlink_exchange.h"
#include "src/cli/bench_common.h"
#include "src/cli/bench_ep_layer.h"
#include "src/cli/bench_ep_options.h"
#include "src/ops/ops.h"
#include "src/cli/commands.h"
#include "src/core/switches.h"
#include "src/core/device.h"
#include "src/core/mpi_check.h"
#include "src/core/timing.h"
#include "src/model/moe_ep_layer.h"

namespace switchyard {

namespace bench_ep {

// Random inputs on the bench's device (src/cli/bench_common.h).
Buffer random_buffer(const EpBenchSettings& settings, DType dtype, int64_t count, float stddev, uint64_t seed) {
  return random_device_buffer(settings.context.device, dtype, count, stddev, seed);
}

// Per iteration: barrier, run, wait for the device; the slowest rank's time; the median (ms).
double time_slowest_median_ms(const EpBenchSettings& settings, Communicator& world, const std::function<void()>& run,
                              const std::function<void()>& wait) {
  for (int iteration = 0; iteration < settings.warmup; ++iteration) {
    run();
    wait();
  }
  std::vector<double> seconds;
  for (int iteration = 0; iteration < settings.iterations; ++iteration) {
    world.barrier();
    const double start = MPI_Wtime();
    run();
    wait();
    seconds.push_back(MPI_Wtime() - start);
  }
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, seconds.data(), int(seconds.size()), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
  return median(seconds) * 1e3;
}

double global_mean(double value, int world_size) {
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
  return value / world_size;
}

double global_max(double value) {
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
  return value;
}

// The fields every record starts with: the run's shape.
Record base_record(const BenchEpSetup& setup, const BenchEpOptions& options, const char* part, int64_t tokens) {
  Record record;
  record.add("part", part);
  record.add("backend", setup.backend);
  record.add("world_size", setup.context.world_size);
  record.add("ep_size", setup.ep_size);
  record.add("tokens_per_rank", double(tokens));
  record.add("d_model", double(options.d_model));
  record.add("d_ff", double(options.d_ff));
  record.add("experts", setup.settings.config.moe.num_experts);
  record.add("top_k", double(options.top_k));
  record.add("a2a_chunks", setup.settings.chunks);
  record.add("ep_dispatch", ep_dispatch_name(setup.settings.dispatch));
  record.add("ranks_per_node", setup.ranks_per_node);
  record.add("skew", setup.settings.skew);
  record.add("ep_nodes", setup.ep_nodes);
  record.add("ep_overlap", ep_overlap_name(setup.settings.overlap));
  record.add("ep_sm_budget", setup.settings.sm_budget);
  record.add("max_replicas_per_rank", setup.settings.max_replicas_per_rank);
  record.add("replica_min_rows", setup.settings.replica_min_rows);
  return record;
}

}  // namespace bench_ep

namespace {

using namespace bench_ep;

// Dispatch + combine of one layer without the expert FFN (the identity expert), and the raw
// all-to-all-v of the same rows.
struct ExchangeBench {
  const EpBenchSettings& settings;
  int64_t tokens;
  RoutingParams params;
  Buffer x, logits, send, received, expert_rows, y;
  Buffer send_fp8, received_fp8;  // --ep-dispatch fp8: the quantized rows on both sides
  RoutingBuffers routing_buffers;
  RoutingResult routing;
  DispatchMap map;
  std::unique_ptr<ExpertDispatcher> dispatcher;
  std::unique_ptr<NvlinkPeerMemory> peers;  // the nvlink transport: one region, the padded expert rows

  ExchangeBench(const EpBenchSettings& settings_, std::shared_ptr<Communicator> expert_parallel, int64_t tokens_)
      : settings(settings_), tokens(tokens_) {
    const MoeLayerConfig& config = settings.config;
    const DeviceKind device = settings.context.device;
    params = config.routing_params(tokens, true);
    params.segment_alignment = 1;
    const int64_t bound = padded_rows_upper_bound(params), d_model = config.d_model;
    const size_t row_bytes = size_t(d_model) * dtype_size(settings.activation_dtype);
    x = random_buffer(settings, settings.activation_dtype, tokens * d_model, 1.0f, settings.seed + 11);
    logits = random_buffer(settings, settings.float_dtype, tokens * config.moe.num_experts, 1.0f, settings.seed + 12);
    send = Buffer(device, size_t(bound) * row_bytes);
    y = Buffer(device, size_t(tokens) * row_bytes);
    routing_buffers = RoutingBuffers(device, settings.float_dtype, tokens, config.moe.num_experts, config.moe.top_k, bound);
    routing = routing_buffers.result(tokens);
    if (device == DeviceKind::cuda && settings.transport != EpTransport::nccl && !settings.fp8()) {
      std::string why;
      peers = NvlinkPeerMemory::create(expert_parallel, 2, &why);  // expert rows, counts
      SY_CHECK_INPUT(peers || settings.transport == EpTransport::automatic, "bench ep: --ep-transport nvlink: ", why);
    }
    if (peers) peers->set_max_blocks(settings.sm_budget);
    if (peers) peers->reserve(1, size_t(peers->ranks()) * size_t(config.moe.num_experts) * sizeof(int32_t));
    dispatcher = std::make_unique<ExpertDispatcher>(std::move(expert_parallel), device, config.moe.num_experts,
                                                    config.moe.segment_alignment, peers ? 1 : settings.chunks,
                                                    peers.get(), 1);
  }

  // The routing is fixed (computed once); each run moves the rows.
  void route() {
    ops::route(settings.context, logits.view(settings.float_dtype, {tokens, settings.config.moe.num_experts}), nullptr,
               params, routing);
  }

  void run() {
    const ExecContext& context = settings.context;
    const DType dtype = settings.activation_dtype;
    const int64_t d_model = settings.config.d_model, bound = padded_rows_upper_bound(params);
    DispatchMap full_map = routing_buffers.map(tokens, bound);
    Tensor send_all = send.view(dtype, {bound, d_model});
    dispatcher->start_count_exchange(context, routing.expert_offsets);  // as the EP layer orders it
    ops::permute(context, x.view(dtype, {tokens, d_model}), routing, params, send_all, full_map);
    const ExpertExchangePlan& plan = dispatcher->finish_count_exchange(context);
    ensure(received, plan.recv_rows(), settings.row_bytes());
    ensure(expert_rows, plan.expert_rows(), settings.row_bytes());
    Tensor send_rows = send.view(dtype, {plan.send_rows(), d_model});
    if (peers) {
      run_nvlink(plan, send_rows);
      return;
    }
    Tensor received_rows = received.view(dtype, {plan.recv_rows(), d_model});
    Tensor padded = expert_rows.view(dtype, {plan.expert_rows(), d_model});
    Tensor send_records, received_records;  // fp8: u8 [rows, fp8_row_bytes(D)]
    if (settings.fp8()) {
      const int64_t record_bytes = fp8_row_bytes(d_model);
      ensure(send_fp8, plan.send_rows(), record_bytes);
      ensure(received_fp8, plan.recv_rows(), record_bytes);
      send_records = send_fp8.view(DType::u8, {plan.send_rows(), record_bytes});
      received_records = received_fp8.view(DType::u8, {plan.recv_rows(), record_bytes});
      ops::quantize_rows_fp8(context, send_rows, send_records);
    }
    for (int chunk = 0; chunk < dispatcher->chunks(); ++chunk) {
      if (settings.fp8()) {
        dispatcher->dispatch(context, chunk, send_records, received_records);
      } else {
        dispatcher->dispatch(context, chunk, send_rows, received_rows);
      }
    }
    for (int chunk = 0; chunk < dispatcher->chunks(); ++chunk) {
      dispatcher->wait_dispatched(context, chunk);
      if (plan.chunk_row_end(chunk) > plan.chunk_row_begin(chunk)) {
        if (settings.fp8()) dispatcher->dequantize_received(context, chunk, received_records, received_rows);
        dispatcher->to_expert_layout(context, chunk, received_rows, padded);
        dispatcher->from_expert_layout(context, chunk, padded, received_rows);
      }
      dispatcher->combine(context, chunk, received_rows, send_rows);
    }
    dispatcher->wait_combined(context);
    map = routing_buffers.map(tokens, plan.send_rows());
    Tensor combined = y.view(dtype, {tokens, d_model});
    ops::unpermute_combine(context, send_rows, routing, map, combined);
  }

  // The nvlink transport as MoeEpLayer runs it, with the identity expert: rows into the peers'
  // padded layouts, a signal that the (absent) expert outputs are ready, rows read back and
  // combined in one pass (kept in the send buffer, as the layer keeps them for backward).
  void run_nvlink(const ExpertExchangePlan& plan, Tensor& send_rows) {
    const ExecContext& context = settings.context;
    const int64_t row_bytes = settings.config.d_model * int64_t(dtype_size(settings.activation_dtype));
    peers->reserve(0, size_t(std::max<int64_t>(dispatcher->max_expert_rows(), 1) * 5 / 4 + 1) * size_t(row_bytes));
    const EpReceiveLayout& layout = dispatcher->layout();
    const int32_t* offsets = routing.expert_offsets.as<int32_t>();
    const int local = dispatcher->local_experts();
    peers->push(0, send_rows.data, plan.send_rows(), row_bytes, local, offsets, dispatcher->peer_rows(),
                kEpRowsDispatched, context.stream);
    peers->zero_padding(0, row_bytes, layout.expert_offsets.as<int32_t>(), layout.expert_totals.as<int32_t>(), local,
                        plan.expert_rows() - plan.recv_rows(), context.stream);
    peers->wait(kEpRowsDispatched, context.stream);
    peers->signal_and_wait(kEpOutputsReady, context.stream);
    map = routing_buffers.map(tokens, plan.send_rows());
    peers->pull_combine(0, plan.send_rows(), row_bytes, local, offsets, dispatcher->peer_rows(),
                        map.choice_rows.as<int32_t>(), routing.gates.as<float>(), tokens, settings.config.moe.top_k,
                        settings.activation_dtype, y.data(), send_rows.data, context.stream);
  }

  // The same rows there and back with plain all_to_all_v calls (the plan of the last run), one
  // message per peer: the raw baseline is never chunked. With fp8 the dispatch direction moves the
  // fp8 records (as bytes), the return the activation rows.
  void run_raw() {
    const ExpertExchangePlan& plan = dispatcher->plan();
    Communicator& communicator = dispatcher->communicator();
    std::vector<int64_t> send_counts, send_offsets, recv_counts, recv_offsets;
    const int64_t d_model = settings.config.d_model;
    if (settings.fp8()) {
      whole_exchange(plan, true, fp8_row_bytes(d_model), send_counts, send_offsets, recv_counts, recv_offsets);
      communicator.all_to_all_v(send_fp8.data(), send_counts, send_offsets, received_fp8.data(), recv_counts,
                                recv_offsets, DType::u8);
    } else {
      whole_exchange(plan, true, d_model, send_counts, send_offsets, recv_counts, recv_offsets);
      communicator.all_to_all_v(send.data(), send_counts, send_offsets, received.data(), recv_counts, recv_offsets,
                                settings.activation_dtype);
    }
    whole_exchange(plan, false, d_model, send_counts, send_offsets, recv_counts, recv_offsets);
    communicator.all_to_all_v(received.data(), send_counts, send_offsets, send.data(), recv_counts, recv_offsets,
                              settings.activation_dtype);
  }

  // All experts' rows per peer in one message (the raw baseline is unchunked); `width` elements a row.
  void whole_exchange(const ExpertExchangePlan& plan, bool dispatch, int64_t width, std::vector<int64_t>& send_counts,
                      std::vector<int64_t>& send_offsets, std::vector<int64_t>& recv_counts,
                      std::vector<int64_t>& recv_offsets) const {
    for (std::vector<int64_t>* values : {&send_counts, &send_offsets, &recv_counts, &recv_offsets})
      values->assign(size_t(plan.ranks), 0);
    const std::vector<int64_t>& out = dispatch ? plan.send_starts : plan.recv_starts;
    const std::vector<int64_t>& in = dispatch ? plan.recv_starts : plan.send_starts;
    for (int peer = 0; peer < plan.ranks; ++peer) {
      const size_t first = size_t(peer) * size_t(plan.local_experts), end = first + size_t(plan.local_experts);
      send_offsets[size_t(peer)] = out[first] * width;
      send_counts[size_t(peer)] = (out[end] - out[first]) * width;
      recv_offsets[size_t(peer)] = in[first] * width;
      recv_counts[size_t(peer)] = (in[end] - in[first]) * width;
    }
  }

  void ensure(Buffer& buffer, int64_t rows, int64_t row_bytes) {
    const size_t bytes = size_t(std::max<int64_t>(rows, 1)) * size_t(row_bytes);
    if (buffer.bytes() >= bytes) return;
    ops::synchronize(settings.context);  // the caching allocator does not track streams
    buffer.reset();
    buffer = Buffer(settings.context.device, bytes + bytes / 4);
  }
};

// ---- Set-up -----------------------------------------------------------------------------------

// Starts MPI (and the GPUs under --device cuda, or auto when every rank has one), forms the
// groups and fills in the layer's configuration. The benches keep a reference to setup.settings,
// so the setup stays where it is until they are gone.
void set_up_bench_ep(const BenchEpOptions& options, BenchEpSetup& setup) {
  ProcessContext& context = setup.context;
  context = bootstrap_process(DeviceKind::cpu);
  bool use_cuda = options.device == "cuda";
  if (options.device == "auto") {  // GPUs only when every node has one per rank (NCCL's rule)
    int enough = cuda_device_count() >= context.local_size ? 1 : 0;
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &enough, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    use_cuda = enough != 0;
  }
  SY_CHECK_INPUT(use_cuda || options.quick, "bench ep on the CPU backend runs only with --quick (the full shapes need GPUs)");
  if (use_cuda) context = bootstrap_process(DeviceKind::cuda);
  context.device = use_cuda ? DeviceKind::cuda : DeviceKind::cpu;
  const int ep_size = options.ep_size == 0 ? context.world_size : int(options.ep_size);
  // The same rules as a training run's parallel.ep_size (--ep-size plays its part here).
  const int ranks_per_node =
      options.ranks_per_node > 0 ? int(options.ranks_per_node) : contiguous_ranks_per_node(context);
  const ParallelLayout layout(context.world_size, ep_size, int(options.experts_per_rank) * ep_size, ranks_per_node);
  setup.ep_size = ep_size;
  setup.ranks_per_node = layout.ep_ranks_per_node();
  setup.ep_nodes = layout.ep_nodes();
  setup.groups = create_parallel_groups(context, layout, options.timeout_s, options.sm_budget);

  EpBenchSettings& settings = setup.settings;
  settings.iterations = options.iterations;
  settings.warmup = options.warmup;
  settings.context = {context.device, create_stream(context.device)};
  settings.activation_dtype = use_cuda ? DType::bf16 : DType::f32;
  settings.float_dtype = use_cuda ? DType::f32 : settings.activation_dtype;
  settings.chunks = int(std::min(options.chunks, options.experts_per_rank));  // a chunk holds at least one expert
  settings.transport = options.transport;
  settings.dispatch = options.dispatch;
  settings.skew = options.skew;
  settings.overlap = options.overlap;
  settings.sm_budget = options.sm_budget;
  settings.max_replicas_per_rank = int(options.max_replicas_per_rank);
  settings.replica_min_rows = int(options.replica_min_rows);
  SY_CHECK_INPUT(settings.max_replicas_per_rank == 0 || setup.ep_nodes == 1,
                 "bench ep: --max-replicas-per-rank needs the one-level exchange, but the expert-parallel group spans ",
                 setup.ep_nodes, " nodes (--ranks-per-node, or the launcher's placement)");
  SY_CHECK_INPUT(use_cuda || settings.transport != EpTransport::nvlink,
                 "bench ep: --ep-transport nvlink needs GPUs (CPU ranks use MPI)");
  MoeLayerConfig& config = settings.config;
  config.d_model = options.d_model;
  config.moe.expert_d_ff = options.d_ff;
  config.moe.num_experts = int(options.experts_per_rank * ep_size);
  config.moe.top_k = config.moe.k_min = int(options.top_k);
  config.moe.renormalize_gates = options.top_k > 1;
  config.moe.dropless = options.capacity_factor == 0;
  config.moe.capacity_factor = config.moe.eval_capacity_factor = config.moe.dropless ? 1.0f : float(options.capacity_factor);
  config.moe.activation = options.activation == "swiglu" ? ExpertActivation::swiglu : ExpertActivation::gelu_tanh;
  config.validate();

  setup.leader = context.world_rank == 0;
  // The transport the layers will pick (create() is collective and cheap: ask once here).
  if (use_cuda) {
    setup.backend = "nccl";
    if (settings.transport != EpTransport::nccl && !settings.fp8() &&
        NvlinkPeerMemory::create(setup.groups.expert_parallel, 0, nullptr))
      setup.backend = "nvlink";
  }
}

// ---- Timing (every rank) ----------------------------------------------------------------------

struct ExchangeTiming {
  int64_t tokens;
  double exchange_ms, raw_ms;  // dispatch + combine; the raw all_to_all_v there and back
  double bytes;                // payload bytes a rank sends and receives (mean over ranks)
};

ExchangeTiming time_exchange(BenchEpSetup& setup, int64_t tokens) {
  const EpBenchSettings& settings = setup.settings;
  Communicator& world = *setup.groups.world;
  auto wait_device = [&] { ops::synchronize(settings.context); };
  ExchangeBench bench(settings, setup.groups.expert_parallel, tokens);
  bench.route();
  bench.run();
  wait_device();
  const double exchange_ms = time_slowest_median_ms(settings, world, [&] { bench.run(); }, wait_device);
  Communicator& communicator = bench.dispatcher->communicator();
  const double raw_ms = time_slowest_median_ms(settings, world, [&] { bench.run_raw(); },
                                               [&] { communicator.synchronize(); });
  // Put on the network: the dispatch's rows out (fp8 records or activation rows), the combine's back.
  const ExpertExchangePlan& plan = bench.dispatcher->plan();
  const double bytes = global_mean(double(plan.send_rows()) * double(settings.dispatch_row_bytes()) +
                                       double(plan.recv_rows()) * double(settings.row_bytes()),
                                   setup.context.world_size);
  return {tokens, exchange_ms, raw_ms, bytes};
}

// ---- Report (rank 0 prints; the records are kept on every rank, rank 0 writes them) -----------

void report_header(const BenchEpSetup& setup, const BenchEpOptions& options) {
  if (!setup.leader) return;
  const EpBenchSettings& settings = setup.settings;
  std::ostringstream capacity;
  if (settings.config.moe.dropless) capacity << "dropless";
  else capacity << "capacity factor " << options.capacity_factor;
  std::printf("# switchyard bench ep: %d ranks, ep_size %d, backend %s, %s, dispatch %s, D=%lld F=%lld E=%d "
              "(%lld per rank) top-%lld %s, %s, a2a_chunks %d, ep_overlap %s, ep_sm_budget %d; median of the slowest "
              "rank over %d iterations\n",
              setup.context.world_size, setup.ep_size, setup.backend, dtype_name(settings.activation_dtype),
              ep_dispatch_name(settings.dispatch),
              (long long)options.d_model, (long long)options.d_ff, settings.config.moe.num_experts,
              (long long)options.experts_per_rank, (long long)options.top_k, options.activation.c_str(),
              capacity.str().c_str(), settings.chunks, ep_overlap_name(settings.overlap), settings.sm_budget,
              settings.iterations);
  if (settings.skew > 0)
    std::printf("# skew %g: expert e's selection key + %g * (E-1-e)/(E-1) (the first ranks' experts are hot)\n",
                settings.skew, settings.skew);
  if (setup.ep_nodes > 1)
    std::printf("# the group spans %d nodes of %d ranks: hierarchical exchange (the exchange part is the one-level "
                "exchange and is skipped)\n",
                setup.ep_nodes, setup.ranks_per_node);
  std::printf("# %s\n", describe_switches().c_str());
}

void report_exchange(const BenchEpSetup& setup, const BenchEpOptions& options, const ExchangeTiming& timing,
                     std::vector<Record>& records) {
  const double exchange_ms = timing.exchange_ms, raw_ms = timing.raw_ms, bytes = timing.bytes;
  if (setup.leader)
    std::printf("exchange T=%-7lld dispatch+combine %9.3f ms %8.2f GB/s | raw all_to_all_v x2 %9.3f ms %8.2f GB/s "
                "| overhead %.2fx\n",
                (long long)timing.tokens, exchange_ms, bytes / (exchange_ms * 1e-3) / 1e9, raw_ms,
                bytes / (raw_ms * 1e-3) / 1e9, exchange_ms / raw_ms);
  Record record = base_record(setup, options, "exchange", timing.tokens);
  record.add("payload_bytes_per_rank", bytes);
  record.add("dispatch_combine_ms", exchange_ms);
  record.add("dispatch_combine_gbps", bytes / (exchange_ms * 1e-3) / 1e9);
  record.add("raw_a2a_ms", raw_ms);
  record.add("raw_a2a_gbps", bytes / (raw_ms * 1e-3) / 1e9);
  records.push_back(record);
}

}  // namespace

int command_bench_ep(int argc, char** argv) {
  const std::optional<BenchEpOptions> options = parse_bench_ep_options(argc, argv);
  if (!options) return kExitOk;  // --help
  BenchEpSetup setup;
  set_up_bench_ep(*options, setup);
  report_header(setup, *options);
  std::vector<Record> records;
  for (int64_t tokens : options->token_counts) {
    if (options->wants("exchange") && setup.ep_nodes == 1) report_exchange(setup, *options, time_exchange(setup, tokens), records);
    if (options->wants("layer")) report_layer(setup, *options, time_layer(setup, tokens), records);
    if (setup.leader) std::fflush(stdout);
  }
  ops::synchronize(setup.settings.context);
  destroy_stream(setup.settings.context.device, setup.settings.context.stream);
  if (setup.leader && options->json_file) write_bench_records(*options->json_file, records, "ep");  // rank 0 only
  return kExitOk;
}

}  // namespace switchyard
