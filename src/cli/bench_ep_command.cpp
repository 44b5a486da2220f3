// switchyard bench ep: expert parallelism under mpirun (one rank per GPU, or CPU ranks with --quick).
//
//   exchange   dispatch + combine of one layer's tokens: permute (packed by global expert), count
//              exchange (the one host sync), payload all_to_all_v per chunk, the receiver's
//              reorder into its padded expert layout and back, the return all_to_all_v and the
//              gated combine -- everything of the EP layer except the expert FFN -- against a raw
//              all_to_all_v moving the same rows there and back in the same run.
//              GB/s = (rows sent + rows received) * D * element size / time, the payload bytes this
//              rank puts on and takes off the network (mean over ranks).
//   layer      MoeEpLayer forward and forward+backward (router, routing, exchange, expert GEMMs).
// Times: per iteration the slowest rank (after a barrier), median over iterations, after
// warm-up; routing from random data, so the load is about balanced (capacity drops included).
// Expert FLOPs per rank (forward): 2 * T * k * (D * F' + F * D), F' = F (gelu) or 2F (swiglu);
// forward+backward counts three times that.
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "src/comm/bootstrap.h"
#include "src/comm/expert_dispatch.h"
#include "src/comm/nvlink_exchange.h"
#include "src/cli/bench_common.h"
#include "src/ops/ops.h"
#include "src/cli/cli_args.h"
#include "src/cli/commands.h"
#include "src/core/device.h"
#include "src/core/mpi_check.h"
#include "src/core/timing.h"
#include "src/model/moe_ep_layer.h"

namespace switchyard {
namespace {

struct EpBenchSettings {
  ExecContext context;
  DType activation_dtype = DType::bf16, float_dtype = DType::f32;
  int warmup = 5, iterations = 20;
  uint64_t seed = 1;
  MoeLayerConfig config;
  int chunks = 1;
  EpTransport transport = EpTransport::automatic;
};

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

// Dispatch + combine of one layer without the expert FFN (the identity expert), and the raw
// all-to-all-v of the same rows.
struct ExchangeBench {
  const EpBenchSettings& settings;
  int64_t tokens;
  RoutingParams params;
  Buffer x, logits, send, received, expert_rows, y;
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
    logits = random_buffer(settings, settings.float_dtype, tokens * config.num_experts, 1.0f, settings.seed + 12);
    send = Buffer(device, size_t(bound) * row_bytes);
    y = Buffer(device, size_t(tokens) * row_bytes);
    routing_buffers = RoutingBuffers(device, settings.float_dtype, tokens, config.num_experts, config.k_max, bound);
    routing = routing_buffers.result(tokens);
    if (device == DeviceKind::cuda && settings.transport != EpTransport::nccl) {
      std::string why;
      peers = NvlinkPeerMemory::create(expert_parallel, 2, &why);  // expert rows, counts
      SY_CHECK_INPUT(peers || settings.transport == EpTransport::automatic, "bench ep: --ep-transport nvlink: ", why);
    }
    if (peers) peers->reserve(1, size_t(peers->ranks()) * size_t(config.num_experts) * sizeof(int32_t));
    dispatcher = std::make_unique<ExpertDispatcher>(std::move(expert_parallel), device, config.num_experts,
                                                    config.segment_alignment, peers ? 1 : settings.chunks,
                                                    peers.get(), 1);
  }

  // The routing is fixed (computed once); each run moves the rows.
  void route() {
    ops::route(settings.context, logits.view(settings.float_dtype, {tokens, settings.config.num_experts}), nullptr,
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
    ensure(received, plan.recv_rows());
    ensure(expert_rows, plan.expert_rows());
    Tensor send_rows = send.view(dtype, {plan.send_rows(), d_model});
    if (peers) {
      run_nvlink(plan, send_rows);
      return;
    }
    Tensor received_rows = received.view(dtype, {plan.recv_rows(), d_model});
    Tensor padded = expert_rows.view(dtype, {plan.expert_rows(), d_model});
    for (int chunk = 0; chunk < dispatcher->chunks(); ++chunk)
      dispatcher->dispatch(context, chunk, send_rows, received_rows);
    for (int chunk = 0; chunk < dispatcher->chunks(); ++chunk) {
      dispatcher->wait_dispatched(context, chunk);
      if (plan.chunk_row_end(chunk) > plan.chunk_row_begin(chunk)) {
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
                        map.choice_rows.as<int32_t>(), routing.gates.as<float>(), tokens, settings.config.k_max,
                        settings.activation_dtype, y.data(), send_rows.data, context.stream);
  }

  // The same rows there and back with plain all_to_all_v calls (the plan of the last run), one
  // message per peer: the raw baseline is never chunked.
  void run_raw() {
    const ExpertExchangePlan& plan = dispatcher->plan();
    Communicator& communicator = dispatcher->communicator();
    std::vector<int64_t> send_counts, send_offsets, recv_counts, recv_offsets;
    whole_exchange(plan, true, send_counts, send_offsets, recv_counts, recv_offsets);
    communicator.all_to_all_v(send.data(), send_counts, send_offsets, received.data(), recv_counts, recv_offsets,
                              settings.activation_dtype);
    whole_exchange(plan, false, send_counts, send_offsets, recv_counts, recv_offsets);
    communicator.all_to_all_v(received.data(), send_counts, send_offsets, send.data(), recv_counts, recv_offsets,
                              settings.activation_dtype);
  }

  // All experts' rows per peer in one message (the raw baseline is unchunked).
  void whole_exchange(const ExpertExchangePlan& plan, bool dispatch, std::vector<int64_t>& send_counts,
                      std::vector<int64_t>& send_offsets, std::vector<int64_t>& recv_counts,
                      std::vector<int64_t>& recv_offsets) const {
    const int64_t width = settings.config.d_model;
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

  void ensure(Buffer& buffer, int64_t rows) {
    const size_t bytes = size_t(std::max<int64_t>(rows, 1)) * size_t(settings.config.d_model) *
                         dtype_size(settings.activation_dtype);
    if (buffer.bytes() >= bytes) return;
    ops::synchronize(settings.context);  // the caching allocator does not track streams
    buffer.reset();
    buffer = Buffer(settings.context.device, bytes + bytes / 4);
  }
};

// The EP layer with random weights for this rank's shard.
struct LayerBench {
  std::unique_ptr<MoeEpLayer> layer;
  Buffer x, y, grad_y, grad_x, router, w1, w2, grad_router, grad_w1, grad_w2;
  MoeWeights weights;
  MoeGradients gradients;
  Tensor x_view, y_view, grad_y_view, grad_x_view;

  LayerBench(const EpBenchSettings& settings, std::shared_ptr<Communicator> expert_parallel, int64_t tokens) {
    const MoeLayerConfig& config = settings.config;
    const DType act = settings.activation_dtype;
    const DeviceKind device = settings.context.device;
    layer = std::make_unique<MoeEpLayer>(config, std::move(expert_parallel), device, act, tokens, settings.chunks,
                                         settings.transport);
    const int64_t d = config.d_model, f = config.expert_d_ff, e = config.num_experts, local = layer->local_experts();
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

using Record = BenchRecord;

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

int command_bench_ep(int argc, char** argv) {
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
  parser.add_option("a2a-chunks", "N", "split the exchange into N chunks (<= experts per rank) to overlap the expert GEMMs",
                    "1");
  parser.add_option("ep-transport", "auto|nccl|nvlink",
                    "how rows move: nvlink (peer-mapped GPU memory, one node), nccl (all-to-all-v), auto", "auto");
  parser.add_option("only", "LIST", "comma list of parts: exchange,layer", "exchange,layer");
  parser.add_option("iters", "N", "timed iterations per measurement (median of the slowest rank)", "20");
  parser.add_option("warmup", "N", "untimed iterations first", "5");
  parser.add_option("timeout", "SECONDS", "collective timeout (a hung rank fails the run)", "300");
  parser.add_option("json", "FILE", "also write every record as JSON lines to FILE (rank 0)");
  parser.add_flag("quick", "tiny shapes (a smoke test; runs on CPU ranks too)");
  parser.add_epilog("Example:\n  mpirun -np 8 switchyard bench ep --tokens 8192,65536 --json ep.jsonl");
  if (!parser.parse(argc, argv)) return kExitOk;

  const bool quick = parser.flag("quick");
  const std::string device_name = parser.get("device"), activation = parser.get("activation");
  SY_CHECK_INPUT(device_name == "auto" || device_name == "cpu" || device_name == "cuda",
                 "bench ep: --device must be auto, cpu or cuda, got '", device_name, "'");
  SY_CHECK_INPUT(activation == "gelu" || activation == "swiglu", "bench ep: --activation must be gelu or swiglu");
  EpBenchSettings settings;
  settings.iterations = int(parser.get_int("iters"));
  settings.warmup = int(parser.get_int("warmup"));
  SY_CHECK_INPUT(settings.iterations >= 1 && settings.warmup >= 0, "bench ep: --iters must be >= 1 and --warmup >= 0");
  std::vector<int64_t> token_counts = parse_token_list(parser.get("tokens"));
  int64_t d_model = parser.get_int("d-model"), d_ff = parser.get_int("d-ff");
  int64_t experts_per_rank = parser.get_int("experts-per-rank");
  if (quick) {
    if (!parser.has("tokens")) token_counts = {64, 256};
    if (!parser.has("d-model")) d_model = 32;
    if (!parser.has("d-ff")) d_ff = 64;
    if (!parser.has("experts-per-rank")) experts_per_rank = 2;
  }
  const int64_t top_k = parser.get_int("top-k"), chunks = parser.get_int("a2a-chunks");
  const double capacity_factor = parser.get_double("capacity-factor");
  SY_CHECK_INPUT(d_model >= 1 && d_ff >= 1 && experts_per_rank >= 1 && top_k >= 1 && chunks >= 1,
                 "bench ep: --d-model, --d-ff, --experts-per-rank, --top-k and --a2a-chunks must be positive");
  SY_CHECK_INPUT(capacity_factor >= 0, "bench ep: --capacity-factor must be >= 0");
  const std::string only = "," + parser.get("only") + ",";
  auto wanted = [&](const char* part) { return only.find("," + std::string(part) + ",") != std::string::npos; };

  ProcessContext context = bootstrap_process(DeviceKind::cpu);
  bool use_cuda = device_name == "cuda";
  if (device_name == "auto") {  // GPUs only when every node has one per rank (NCCL's rule)
    int enough = cuda_device_count() >= context.local_size ? 1 : 0;
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &enough, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    use_cuda = enough != 0;
  }
  SY_CHECK_INPUT(use_cuda || quick, "bench ep on the CPU backend runs only with --quick (the full shapes need GPUs)");
  if (use_cuda) context = bootstrap_process(DeviceKind::cuda);
  context.device = use_cuda ? DeviceKind::cuda : DeviceKind::cpu;
  const int ep_size = parser.get_int("ep-size") == 0 ? context.world_size : int(parser.get_int("ep-size"));
  SY_CHECK_INPUT(ep_size >= 1 && context.world_size % ep_size == 0, "bench ep: --ep-size ", ep_size,
                 " must divide the world size ", context.world_size);
  ParallelGroups groups = create_parallel_groups(context, ep_size, parser.get_double("timeout"));

  settings.context = {context.device, create_stream(context.device)};
  settings.activation_dtype = use_cuda ? DType::bf16 : DType::f32;
  settings.float_dtype = use_cuda ? DType::f32 : settings.activation_dtype;
  settings.chunks = int(std::min(chunks, experts_per_rank));  // a chunk holds at least one expert
  settings.transport = parse_ep_transport(parser.get("ep-transport"), "bench ep: --ep-transport");
  SY_CHECK_INPUT(use_cuda || settings.transport != EpTransport::nvlink,
                 "bench ep: --ep-transport nvlink needs GPUs (CPU ranks use MPI)");
  MoeLayerConfig& config = settings.config;
  config.d_model = d_model;
  config.expert_d_ff = d_ff;
  config.num_experts = int(experts_per_rank * ep_size);
  config.k_max = config.k_min = int(top_k);
  config.renormalize = top_k > 1;
  config.dropless = capacity_factor == 0;
  config.capacity_factor_train = config.capacity_factor_eval = config.dropless ? 1.0f : float(capacity_factor);
  config.activation = activation == "swiglu" ? ExpertActivation::swiglu : ExpertActivation::gelu_tanh;
  config.validate();

  const bool leader = context.world_rank == 0;
  // The transport the layers will pick (create() is collective and cheap: ask once here).
  const char* backend = "mpi";
  if (use_cuda) {
    backend = "nccl";
    if (settings.transport != EpTransport::nccl && NvlinkPeerMemory::create(groups.expert_parallel, 0, nullptr))
      backend = "nvlink";
  }
  const size_t element = dtype_size(settings.activation_dtype);
  if (leader) {
    std::ostringstream capacity;
    if (config.dropless) capacity << "dropless";
    else capacity << "capacity factor " << capacity_factor;
    std::printf("# switchyard bench ep: %d ranks, ep_size %d, backend %s, %s, D=%lld F=%lld E=%d (%lld per rank) "
                "top-%lld %s, %s, a2a_chunks %d; median of the slowest rank over %d iterations\n",
                context.world_size, ep_size, backend, dtype_name(settings.activation_dtype), (long long)d_model,
                (long long)d_ff, config.num_experts, (long long)experts_per_rank, (long long)top_k, activation.c_str(),
                capacity.str().c_str(), settings.chunks, settings.iterations);
  }
  std::vector<Record> records;
  auto base_record = [&](const char* part, int64_t tokens) {
    Record record;
    record.add("part", part);
    record.add("backend", backend);
    record.add("world_size", context.world_size);
    record.add("ep_size", ep_size);
    record.add("tokens_per_rank", double(tokens));
    record.add("d_model", double(d_model));
    record.add("d_ff", double(d_ff));
    record.add("experts", config.num_experts);
    record.add("top_k", double(top_k));
    record.add("a2a_chunks", settings.chunks);
    return record;
  };
  Communicator& world = *groups.world;
  auto wait_device = [&] { ops::synchronize(settings.context); };

  for (int64_t tokens : token_counts) {
    if (wanted("exchange")) {
      ExchangeBench bench(settings, groups.expert_parallel, tokens);
      bench.route();
      bench.run();
      wait_device();
      const double exchange_ms = time_slowest_median_ms(settings, world, [&] { bench.run(); }, wait_device);
      Communicator& communicator = bench.dispatcher->communicator();
      const double raw_ms = time_slowest_median_ms(settings, world, [&] { bench.run_raw(); },
                                                   [&] { communicator.synchronize(); });
      const ExpertExchangePlan& plan = bench.dispatcher->plan();
      const double bytes = global_mean(double(plan.send_rows() + plan.recv_rows()) * double(d_model) * double(element),
                                       context.world_size);
      if (leader)
        std::printf("exchange T=%-7lld dispatch+combine %9.3f ms %8.2f GB/s | raw all_to_all_v x2 %9.3f ms %8.2f GB/s "
                    "| overhead %.2fx\n",
                    (long long)tokens, exchange_ms, bytes / (exchange_ms * 1e-3) / 1e9, raw_ms,
                    bytes / (raw_ms * 1e-3) / 1e9, exchange_ms / raw_ms);
      Record record = base_record("exchange", tokens);
      record.add("payload_bytes_per_rank", bytes);
      record.add("dispatch_combine_ms", exchange_ms);
      record.add("dispatch_combine_gbps", bytes / (exchange_ms * 1e-3) / 1e9);
      record.add("raw_a2a_ms", raw_ms);
      record.add("raw_a2a_gbps", bytes / (raw_ms * 1e-3) / 1e9);
      records.push_back(record);
    }
    if (wanted("layer")) {
      LayerBench bench(settings, groups.expert_parallel, tokens);
      const double forward_ms =
          time_slowest_median_ms(settings, world, [&] { bench.forward(settings.context, false); }, wait_device);
      const double both_ms =
          time_slowest_median_ms(settings, world, [&] { bench.forward_backward(settings.context); }, wait_device);
      const double flops = 2.0 * double(tokens) * double(top_k) *
                           (double(d_model) * double(config.w1_columns()) + double(d_ff) * double(d_model));
      const MoeExchangeStats stats = bench.layer->exchange_stats();
      const double received = global_mean(double(stats.received_rows), context.world_size);
      if (leader)
        std::printf("layer    T=%-7lld forward %9.3f ms (%7.1f TFLOP/s) | forward+backward %9.3f ms (%7.1f TFLOP/s) | "
                    "%.0f tokens/s per rank\n",
                    (long long)tokens, forward_ms, flops / (forward_ms * 1e-3) / 1e12, both_ms,
                    3 * flops / (both_ms * 1e-3) / 1e12, double(tokens) / (both_ms * 1e-3));
      Record record = base_record("layer", tokens);
      record.add("fwd_ms", forward_ms);
      record.add("fwdbwd_ms", both_ms);
      record.add("fwd_expert_tflops", flops / (forward_ms * 1e-3) / 1e12);
      record.add("fwdbwd_expert_tflops", 3 * flops / (both_ms * 1e-3) / 1e12);
      record.add("received_rows_mean", received);
      records.push_back(record);
    }
    if (leader) std::fflush(stdout);
  }

  ops::synchronize(settings.context);
  destroy_stream(settings.context.device, settings.context.stream);
  if (leader && parser.has("json")) {
    std::ofstream out(parser.get("json"));
    if (!out) SY_BAD_INPUT("bench ep: cannot write --json file '", parser.get("json"), "'");
    for (const Record& record : records) out << record.json() << "\n";
  }
  return kExitOk;
}

}  // namespace switchyard
