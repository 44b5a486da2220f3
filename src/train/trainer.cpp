// The training loop (src/train/trainer.h).
#include "src/train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iterator>
#include <ostream>
#include <sstream>

#include "src/core/error.h"
#include "src/comm/parallel_layout.h"
#include "src/core/switches.h"
#include "src/core/timing.h"
#include "src/model/routing_observer.h"
#include "src/train/checkpoint_identity.h"
#include "src/train/checkpoint_signals.h"
#include "src/train/training_monitor.h"
#include "src/train/weights_file.h"

namespace switchyard {
namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The dtype activations and compute copies use. The CPU backend computes in fp32 whatever the
// config says (its ops are fp32 / fp64 references); CUDA needs bf16 or fp16.
DType resolve_compute_dtype(const Config& config, DeviceKind device) {
  if (device == DeviceKind::cpu) return DType::f32;
  SY_CHECK_INPUT(config.model.compute_dtype == DType::bf16 || config.model.compute_dtype == DType::f16,
                 config.source, ": model.compute_dtype = fp32 is not supported on CUDA (the expert GEMMs take bf16 "
                 "or fp16); use bf16, or fp16 with dynamic loss scaling");
  return config.model.compute_dtype;
}

std::string resolve_in_run_dir(const Config& config, const std::string& path) {
  const std::filesystem::path candidate(path);
  if (candidate.is_absolute()) return path;
  return (std::filesystem::path(config.logging.run_dir) / candidate).string();
}

// A resumed run's metrics file: the records of steps after `step` (written by the interrupted
// run after its checkpoint) and a torn last line are dropped, the rest is kept, and the stream
// appends after it. The file is rewritten through a temporary file, so a crash here loses nothing.
std::ofstream open_metrics_for_resume(const std::string& path, int64_t step) {
  std::string kept;
  std::ifstream existing(path, std::ios::binary);
  if (existing) {
    const std::string text((std::istreambuf_iterator<char>(existing)), std::istreambuf_iterator<char>());
    const std::string prefix = "{\"step\":";
    for (size_t start = 0; start < text.size();) {
      const size_t end = text.find('\n', start);
      if (end == std::string::npos) break;  // torn: the process died mid-line
      const std::string line = text.substr(start, end - start + 1);
      start = end + 1;
      if (line.compare(0, prefix.size(), prefix) != 0) continue;
      const long long line_step = std::strtoll(line.c_str() + prefix.size(), nullptr, 10);
      if (line_step >= 1 && line_step <= step) kept += line;
    }
  }
  write_file_atomically(path, kept);
  std::ofstream stream(path, std::ios::app);
  if (!stream) SY_BAD_INPUT("cannot append to the metrics file '", path, "'");
  return stream;
}

}  // namespace

Trainer::Trainer(const Config& config, const TokenFile& train, const TokenFile* val, const TrainerOptions& options)
    : config_(config),
      options_(options),
      compute_dtype_(resolve_compute_dtype(config, options.device)),
      schedule_(config.optimizer, config.training.steps),
      scaler_(compute_dtype_ == DType::f16 || options.force_loss_scaling,
              options.initial_loss_scale > 0 ? options.initial_loss_scale : config.optimizer.loss_scale_init,
              config.optimizer.loss_scale_growth_interval),
      train_loader_(train, config.model.seq_len, config.training.micro_batch_size, options.world_rank,
                    options.world_size, uint64_t(config.training.seed), DataOrder::shuffled) {
  const DeviceKind device = options_.device;
  const int ep_size = config.parallel.ep_size;
  SY_CHECK(options_.world_size >= 1 && options_.world_rank >= 0 && options_.world_rank < options_.world_size,
           "Trainer: rank ", options_.world_rank, " of ", options_.world_size);
  const RankPlacement placement =
      ParallelLayout(options_.world_size, ep_size, config.moe.num_experts).placement(options_.world_rank);
  if (options_.world_size > 1 || ep_size > 1)
    SY_CHECK(options_.groups.world && options_.groups.expert_parallel && options_.groups.expert_data_parallel,
             "Trainer: ", options_.world_size, " ranks need the parallel groups");
  if (ep_size > 1)
    SY_CHECK(options_.groups.expert_parallel->size() == ep_size &&
                 options_.groups.expert_parallel->rank() == placement.ep_rank,
             "Trainer: rank ", placement.ep_rank, " of ", ep_size, " in the expert-parallel layout, but rank ",
             options_.groups.expert_parallel->rank(), " of ", options_.groups.expert_parallel->size(),
             " in the expert-parallel group");
  stream_ = create_stream(device);
  context_ = ExecContext{device, stream_};
  TransformerOptions model_options;
  model_options.device = device;
  model_options.activation_dtype = compute_dtype_;
  model_options.max_batch = config.training.micro_batch_size;
  model_options.max_seq_len = config.model.seq_len;
  model_options.ep_size = ep_size;
  model_options.ep_rank = placement.ep_rank;
  model_options.groups = &options_.groups;
  model_options.ep = config.parallel.ep_layer_options();
  model_options.jitter_seed = uint64_t(config.training.seed);
  model_options.recompute = config.training.recompute;
  model_options.deterministic = config.parallel.deterministic;
  model_ = std::make_unique<Transformer>(config.model, config.moe, model_options);
  router_stats_ = std::make_unique<RouterStatsRecorder>(device, model_->moe_block_count(), config.moe.num_experts);
  SY_CHECK_INPUT(options.profile_steps >= 0, "--profile-steps must be >= 0, got ", options.profile_steps);
  if (options.profile_steps > 0) profiler_ = std::make_unique<StepProfiler>(device, context_.stream);
  parameters_ = std::make_unique<ModelParameters>(model_->layout(), device, DType::f32, compute_dtype_);
  parameters_->initialize(context_, uint64_t(config.training.seed));
  optimizer_ = std::make_unique<AdamWOptimizer>(*parameters_, config.optimizer);
  // Expert loads are summed over every rank: each routes its own tokens over all E experts, with
  // or without expert parallelism (src/model/transformer.h, "Routing balance across a step").
  world_load_reduce_ = StreamOrderedAllReduce(options_.groups.world, device);
  if (config.moe.global_aux_loss_weight > 0.0 && world_load_reduce_.reduces()) {
    const StreamOrderedAllReduce reduce = world_load_reduce_;
    model_->set_load_reducer([reduce](const ExecContext& context, Tensor& loads) { reduce(context, loads); });
  }
  router_balance_window_.assign(size_t(model_->moe_block_count()) * 2, 0.0);
  if (options_.world_size > 1) {
    GradientSyncOptions sync_options;
    sync_options.average = false;  // the backward seeds already divide by the number of ranks
    synchronizer_ = std::make_unique<GradientSynchronizer>(options_.groups, device, sync_options);
  }
  if (val != nullptr && val->is_open())
    val_loader_ = std::make_unique<DataLoader>(*val, config.model.seq_len, config.training.micro_batch_size,
                                               options_.world_rank, options_.world_size,
                                               uint64_t(config.training.seed), DataOrder::sequential);
  flops_ = estimate_flops(config.model, config.moe);
  const size_t tokens = size_t(config.training.micro_batch_size) * size_t(config.model.seq_len);
  device_inputs_ = Buffer(device, tokens * sizeof(int32_t));
  device_targets_ = Buffer(device, tokens * sizeof(int32_t));
  reduce_buffer_ = Buffer(device, 64 * sizeof(double));
  initial_scaler_state_ = scaler_.state();
}

Trainer::~Trainer() {
  // Work still queued may reference buffers about to be freed; never throw from here.
  try {
    if (stream_) {
      ops::synchronize(context_);
      destroy_stream(context_.device, stream_);
    }
  } catch (...) {
  }
}

bool Trainer::has_peers(const std::shared_ptr<Communicator>& communicator) const {
  return communicator != nullptr && communicator->size() > 1;
}

void Trainer::all_reduce_host(const std::shared_ptr<Communicator>& communicator, std::vector<double>& values) {
  if (!has_peers(communicator) || values.empty()) return;
  if (communicator->device() == DeviceKind::cpu) {
    communicator->all_reduce_sum(values.data(), int64_t(values.size()), DType::f64);
    return;
  }
  // NCCL reduces device memory: stage through a device buffer (blocking copies, then the
  // communicator's stream is waited for).
  const size_t bytes = values.size() * sizeof(double);
  if (reduce_buffer_.bytes() < bytes) reduce_buffer_ = Buffer(communicator->device(), bytes);
  device_copy(reduce_buffer_.data(), communicator->device(), values.data(), DeviceKind::cpu, bytes);
  communicator->all_reduce_sum(reduce_buffer_.data(), int64_t(values.size()), DType::f64);
  communicator->synchronize();
  device_copy(values.data(), DeviceKind::cpu, reduce_buffer_.data(), communicator->device(), bytes);
}

void Trainer::upload_batch() {
  const int64_t count = int64_t(host_inputs_.size());
  Tensor host_inputs(host_inputs_.data(), DType::i32, DeviceKind::cpu, {count});
  Tensor host_targets(host_targets_.data(), DType::i32, DeviceKind::cpu, {count});
  Tensor inputs = device_inputs_.view(DType::i32, {count}), targets = device_targets_.view(DType::i32, {count});
  ops::copy(context_, host_inputs, inputs);
  ops::copy(context_, host_targets, targets);
}

StepMetrics Trainer::train_step() {
  const double start = now_seconds();
  RoutingObserverScope routing_scope(router_stats_.get());  // the MoE layers report each training forward
  const Config& config = config_;
  const int64_t batch = config.training.micro_batch_size, seq_len = config.model.seq_len;
  const int accumulation = config.optimizer.grad_accum_steps;
  const double ranks = double(options_.world_size), loss_scale = scaler_.scale();
  const double micro_tokens = double(batch * seq_len);
  const float ce_grad_scale = float(loss_scale / (micro_tokens * accumulation * ranks));
  const float aux_grad_scale = float(loss_scale / (accumulation * ranks));
  const int moe_layers = model_->moe_block_count();
  const int experts = config.moe.num_experts;

  // Host statistics, summed over micro-steps, then over ranks:
  // [loss sum, tokens, aux, z, seq, global, dropped, routed, stop, counts per (MoE layer, expert)...,
  //  (seq, global) per MoE layer...]
  // kStop: 1 on a rank that received a preemption signal, so the sum tells every rank the same.
  // kReplicas .. kLoadAfter: hot-expert replication's plans (MoeBlockStats::replication).
  enum : size_t {
    kLossSum = 0, kTokens, kAux, kZ, kSeqAux, kGlobalAux, kDropped, kRouted, kStop,
    kReplicas, kReplicatedRows, kLoadBefore, kLoadAfter, kCounts
  };
  const size_t layer_losses = kCounts + size_t(moe_layers) * size_t(experts);
  std::vector<double> sums(layer_losses + 2 * size_t(moe_layers), 0.0);
  const Tensor inputs = device_inputs_.view(DType::i32, {batch * seq_len});
  ++steps_in_process_;
  // --profile-steps: the stages of steps 3 .. 2 + N of this process (the first two warm up).
  StepProfiler* profiler = profiler_ && steps_in_process_ > 2 &&
                                   int64_t(profiles_.size()) < options_.profile_steps
                               ? profiler_.get()
                               : nullptr;
  if (profiler) {
    profiler->begin_step();
    model_->set_stage_observer(profiler);
  }
  model_->reset_step_loads(context_);  // this step's loads and the global loss's running sums
  const Tensor targets = device_targets_.view(DType::i32, {batch * seq_len});
  for (int micro = 0; micro < accumulation; ++micro) {
    train_loader_.next_batch(host_inputs_, host_targets_);
    upload_batch();
    const uint64_t jitter_step = uint64_t(jitter_micro_steps_++);
    model_->forward_loss(context_, *parameters_, inputs, targets, batch, seq_len, ForwardMode::training,
                         ce_grad_scale, jitter_step);
    model_->backward(context_, *parameters_, aux_grad_scale, micro > 0);
    const TransformerStats stats = model_->read_stats(context_);
    sums[kLossSum] += stats.loss_sum;
    sums[kTokens] += double(stats.tokens);
    for (size_t layer = 0; layer < stats.moe.size(); ++layer) {
      const MoeBlockStats& moe = stats.moe[layer];
      sums[kAux] += moe.aux_loss;
      sums[kZ] += moe.z_loss;
      sums[kSeqAux] += moe.seq_aux_loss;
      sums[kGlobalAux] += moe.global_aux_loss;
      sums[layer_losses + 2 * layer] += moe.seq_aux_loss;
      sums[layer_losses + 2 * layer + 1] += moe.global_aux_loss;
      sums[kDropped] += double(moe.dropped_choices);
      sums[kRouted] += double(moe.total_choices);
      sums[kReplicas] += double(moe.replication.replicas);
      sums[kReplicatedRows] += double(moe.replication.moved_rows);
      sums[kLoadBefore] += double(moe.replication.max_load_before);
      sums[kLoadAfter] += double(moe.replication.max_load_after);
      for (int expert = 0; expert < experts; ++expert)
        sums[kCounts + layer * size_t(experts) + size_t(expert)] += double(moe.expert_counts[size_t(expert)]);
    }
  }

  // Gradients of the whole global batch on every rank.
  if (synchronizer_) {
    run_moe_stage(profiler, context_, "gradient sync", [&] {
      synchronizer_->all_reduce(context_, {parameters_->grad_group(ParameterGroup::dense)},
                                {parameters_->grad_group(ParameterGroup::expert)});
    });
  }
  GradientNorms norms;
  run_moe_stage(profiler, context_, "optimizer", [&] {  // its sub-stages name the two passes in the profile
    run_moe_stage(profiler, context_, "gradient norms", [&] { norms = optimizer_->gradient_norms(context_); });
  });
  std::vector<double> expert_part = {norms.squared[int(ParameterGroup::expert)],
                                     norms.non_finite[int(ParameterGroup::expert)]};
  if (config.parallel.ep_size > 1) all_reduce_host(options_.groups.expert_parallel, expert_part);
  const double squared = norms.squared[int(ParameterGroup::dense)] + expert_part[0];
  const double non_finite = norms.non_finite[int(ParameterGroup::dense)] + expert_part[1];
  const double grad_norm = std::sqrt(squared) / loss_scale;
  const bool apply = scaler_.update(non_finite > 0 || !std::isfinite(squared));
  const double lr = schedule_.at(step_ + 1);
  if (apply) {
    const double max_norm = config.optimizer.grad_clip;
    const double clip = max_norm > 0 && grad_norm > max_norm ? max_norm / (grad_norm + 1e-6) : 1.0;
    run_moe_stage(profiler, context_, "optimizer", [&] {
      run_moe_stage(profiler, context_, "AdamW", [&] { optimizer_->step(context_, lr, clip / loss_scale); });
    });
  }
  if (apply && config.moe.uses_routing_bias()) {
    // Aux-loss-free balancing: the step's loads of every rank move the router biases, the same on
    // every rank (fp32 sums of counts are exact, the update is elementwise).
    run_moe_stage(profiler, context_, "router bias update", [&] {
      Tensor loads = model_->step_loads();
      world_load_reduce_(context_, loads);
      model_->update_routing_biases(context_, *parameters_, float(config.moe.bias_update_rate));
      model_->reset_step_loads(context_);
    });
  }
  ++step_;
  // Test hook (src/comm/bootstrap.h): SWITCHYARD_INJECT_FAULT=<rank>:after_step_N:sigusr1|sigterm delivers
  // a preemption signal at a known step, for machines too fast for a signal sent from outside.
  inject_fault_point(("after_step_" + std::to_string(step_)).c_str());

  sums[kStop] = preemption_signal() != 0 ? 1.0 : 0.0;
  all_reduce_host(options_.groups.world, sums);
  stop_requested_ = sums[kStop] > 0;
  tokens_seen_ += int64_t(std::llround(sums[kTokens]));
  ops::synchronize(context_);
  const double seconds = now_seconds() - start;
  if (profiler) {
    model_->set_stage_observer(nullptr);
    profiles_.push_back(profiler->end_step(step_));
    profile_flops_.tokens_per_step += sums[kTokens];
    profile_flops_.step_seconds += seconds;
  }

  StepMetrics metrics;
  metrics.step = step_;
  metrics.total_steps = config.training.steps;
  metrics.loss = sums[kTokens] > 0 ? sums[kLossSum] / sums[kTokens] : 0.0;
  metrics.lr = lr;
  metrics.grad_norm = grad_norm;
  metrics.loss_scale = scaler_.scale();
  metrics.skipped = !apply;
  const double micro_steps = double(accumulation) * ranks;
  metrics.aux_loss = sums[kAux] / micro_steps;
  metrics.z_loss = sums[kZ] / micro_steps;
  metrics.seq_aux_loss = sums[kSeqAux] / micro_steps;
  metrics.global_aux_loss = sums[kGlobalAux] / micro_steps;
  metrics.shows_seq_aux_loss = config.moe.seq_aux_loss_weight > 0.0;
  metrics.shows_global_aux_loss = config.moe.global_aux_loss_weight > 0.0;
  for (size_t index = 0; index < router_balance_window_.size(); ++index)
    router_balance_window_[index] += sums[layer_losses + index];
  metrics.dropped_fraction = sums[kRouted] > 0 ? sums[kDropped] / sums[kRouted] : 0.0;
  metrics.has_replication = config.parallel.max_replicas_per_rank > 0 && config.parallel.ep_size > 1;
  metrics.replicated_experts = sums[kReplicas] / micro_steps;
  metrics.replicated_rows = sums[kReplicatedRows] / micro_steps;
  metrics.ep_max_load_before = sums[kLoadBefore] / micro_steps;
  metrics.ep_max_load_after = sums[kLoadAfter] / micro_steps;
  metrics.tokens = int64_t(sums[kTokens]);
  metrics.step_time_s = seconds;
  metrics.tokens_per_s = seconds > 0 ? sums[kTokens] / seconds : 0.0;
  metrics.flops_per_s = metrics.tokens_per_s * flops_.flops_per_token;
  if (options_.device == DeviceKind::cuda) {
    metrics.has_mfu = true;
    metrics.mfu = metrics.flops_per_s / (ranks * kH100DenseBf16PeakFlops);
    metrics.mfu_measured_peak = metrics.flops_per_s / (ranks * kH100MeasuredPeakFlops);
  }
  metrics.tokens_per_expert.resize(size_t(moe_layers));
  for (int layer = 0; layer < moe_layers; ++layer)
    for (int expert = 0; expert < experts; ++expert)
      metrics.tokens_per_expert[size_t(layer)].push_back(
          int64_t(std::llround(sums[kCounts + size_t(layer) * size_t(experts) + size_t(expert)])));
  return metrics;
}

void Trainer::attach_router_balance_stats(std::vector<RouterLayerStats>& layers) {
  const std::vector<std::vector<double>> biases =
      model_->has_routing_biases() ? model_->routing_biases(context_, *parameters_) : std::vector<std::vector<double>>{};
  for (size_t layer = 0; layer < layers.size(); ++layer) {
    const std::vector<double>* bias = layer < biases.size() ? &biases[layer] : nullptr;
    attach_balance_stats(layers[layer], router_balance_window_[2 * layer], router_balance_window_[2 * layer + 1], bias);
  }
  std::fill(router_balance_window_.begin(), router_balance_window_.end(), 0.0);
}

double Trainer::evaluate() {
  SY_CHECK(val_loader_ != nullptr, "Trainer::evaluate: no validation data (data.val_path)");
  const int64_t batch = config_.training.micro_batch_size, seq_len = config_.model.seq_len;
  const Tensor inputs = device_inputs_.view(DType::i32, {batch * seq_len});
  const Tensor targets = device_targets_.view(DType::i32, {batch * seq_len});
  val_loader_->rewind();
  std::vector<double> sums = {0.0, 0.0};
  for (int index = 0; index < config_.training.eval_batches; ++index) {
    val_loader_->next_batch(host_inputs_, host_targets_);
    upload_batch();
    model_->forward_loss(context_, *parameters_, inputs, targets, batch, seq_len, ForwardMode::evaluation, 0.0f, 0);
    const TransformerStats stats = model_->read_stats(context_);
    sums[0] += stats.loss_sum;
    sums[1] += double(stats.tokens);
  }
  all_reduce_host(options_.groups.world, sums);
  return sums[1] > 0 ? sums[0] / sums[1] : 0.0;
}

std::string Trainer::final_weights_path() const {
  return (std::filesystem::path(config_.logging.run_dir) / "final.weights").string();
}

std::string Trainer::metrics_path() const { return resolve_in_run_dir(config_, config_.logging.metrics_file); }

void Trainer::finish_profile(bool run_ended) {
  if (!profiler_ || profiles_.empty()) return;
  if (!run_ended && int64_t(profiles_.size()) < options_.profile_steps) return;
  ProfileFlops flops = profile_flops_;
  const double steps = double(profiles_.size());
  flops.tokens_per_step /= steps;  // means over the profiled steps
  flops.step_seconds /= steps;
  flops.flops_per_token = flops_.flops_per_token;
  flops.peak_flops = options_.device == DeviceKind::cuda ? kH100DenseBf16PeakFlops * options_.world_size : 0.0;
  if (options_.log) {
    *options_.log << "switchyard train: " << format_step_profile(profiles_, flops);
    if (int64_t(profiles_.size()) < options_.profile_steps)
      *options_.log << "switchyard train: --profile-steps " << options_.profile_steps << ": the run had only "
                    << profiles_.size() << " step(s) after the two warm-up steps\n";
    options_.log->flush();
  }
  if (options_.world_rank == 0) {
    const std::string path = (std::filesystem::path(config_.logging.run_dir) / "profile.json").string();
    std::ofstream out(path);
    out << step_profile_json(profiles_, flops) << "\n";
    if (!out) SY_THROW("writing the step profile '", path, "' failed");
    log_line("step profile -> " + path);
  }
  profiler_.reset();  // done: later steps run without marks
}

// Once, after the first step (every buffer exists by then, the backward's included): what this
// rank's device holds, measured (the allocator's bytes, cudaMemGetInfo), beside the saved
// activations computed from the shapes.
void Trainer::log_memory() const {
  if (options_.device != DeviceKind::cuda) return;
  const AllocatorStats allocator = cuda_allocator_stats();
  const DeviceMemoryInfo device = cuda_memory_info();
  const TransformerActivationMemory activations = model_->activation_memory();
  auto gib = [](double bytes) {
    std::ostringstream text;
    text << std::fixed << std::setprecision(1) << bytes / double(1ull << 30) << " GiB";
    return text.str();
  };
  log_line("device memory after the first step: " + gib(double(allocator.bytes_reserved)) + " held by switchyard (" +
           gib(double(allocator.bytes_in_use)) + " in use, of which saved activations " +
           gib(double(activations.per_block + activations.shared + activations.residual)) + "); the device has " +
           gib(double(device.free_bytes)) + " free of " + gib(double(device.total_bytes)));
}

void Trainer::log_line(const std::string& text) const {
  if (!options_.log) return;
  *options_.log << "switchyard train: " << text << "\n";
  options_.log->flush();
}

void Trainer::run() {
  const Config& config = config_;
  std::ostream* log = options_.log;
  const bool writer = options_.world_rank == 0;
  const bool signals_were_installed = preemption_signals_installed();
  PreemptionSignalGuard signal_guard;
  // A signal that arrived during set-up (under an enclosing guard) is kept: the run saves after its
  // first step and stops.
  if (!signals_were_installed) clear_preemption_signal();
  prepare();  // resumes and settles the run id; writes nothing
  if (writer) write_run_directory_run_id(config.logging.run_dir, run_id_);

  MetricsWriter metrics_writer;
  std::ofstream resumed_metrics;
  if (writer && options_.write_metrics) {
    std::error_code status;
    std::filesystem::create_directories(std::filesystem::path(metrics_path()).parent_path(), status);
    if (resumed_from_.empty()) metrics_writer = MetricsWriter(metrics_path());
    else resumed_metrics = open_metrics_for_resume(metrics_path(), step_);
  }
  auto write_metrics = [&](const StepMetrics& metrics) {
    if (metrics_writer.is_open()) metrics_writer.write(metrics);
    if (resumed_metrics.is_open()) {
      resumed_metrics << metrics_json(metrics) << '\n';
      resumed_metrics.flush();
      if (!resumed_metrics) SY_THROW("writing the metrics file '", metrics_path(), "' failed");
    }
  };
  const int64_t tokens_per_step = int64_t(config.training.micro_batch_size) * config.model.seq_len *
                                  config.optimizer.grad_accum_steps * options_.world_size;
  if (log) {
    *log << "switchyard train: " << std::setprecision(4) << flops_.total_params / 1e6 << "M parameters ("
         << flops_.active_params / 1e6 << "M active per token), " << flops_.flops_per_token / 1e6
         << " MFLOP per token (6 x active matmul params + attention), " << tokens_per_step << " tokens per step, "
         << config.training.steps << " steps on " << options_.world_size << " " << device_kind_name(options_.device)
         << " rank(s) in " << compute_dtype_name(compute_dtype_) << "\n";
    if (options_.device == DeviceKind::cpu && config.model.compute_dtype != DType::f32)
      *log << "switchyard train: model.compute_dtype = " << compute_dtype_name(config.model.compute_dtype)
           << " applies to CUDA; the CPU backend computes in fp32\n";
    if (config.moe.routing == RoutingMethod::expert_choice)
      *log << "switchyard train: moe.routing = expert_choice: each expert picks among all tokens of a "
              "micro-batch, so a token's routing depends on later positions and other sequences (it leaks "
              "across positions in this causal LM); meant for routing research, not for sampling\n";
    *log << "switchyard train: " << describe_switches()
         << (options_.device == DeviceKind::cpu ? " (CUDA only: the CPU backend uses none)" : "") << "\n";
    *log << "switchyard train: checkpoints "
         << (config.checkpoint.every > 0 ? "every " + std::to_string(config.checkpoint.every) + " steps and " : "")
         << "at the end -> " << config.checkpoint.dir << " (keeping "
         << (config.checkpoint.keep_last > 0 ? "the newest " + std::to_string(config.checkpoint.keep_last)
                                             : std::string("all"))
         << ")\n";
    if (writer && options_.write_metrics) *log << "switchyard train: metrics -> " << metrics_path() << "\n";
    log->flush();
  }

  const double run_start = now_seconds();
  double timed_seconds = 0.0;  // steps after this process's first (which includes allocation and warm-up)
  int64_t steps_here = 0;
  double last_val_loss = -1.0;
  int64_t last_val_step = 0, router_window_start = step_ + 1;
  MonitorRules monitor_rules;
  monitor_rules.top_k = config.moe.top_k;
  TrainingMonitor monitor(monitor_rules);  // loss / grad-norm spikes, router collapse -> warnings
  const int64_t every = config.checkpoint.every;
  if (step_ >= config.training.steps && step_ > 0)
    log_line("the checkpoint is at step " + std::to_string(step_) + ", training.steps is " +
             std::to_string(config.training.steps) + ": nothing left to train");
  while (step_ < config.training.steps) {
    StepMetrics metrics = train_step();
    finish_profile(false);
    ++steps_here;
    if (steps_here > 1) timed_seconds += metrics.step_time_s;
    const bool evaluate_now = val_loader_ && ((config.training.eval_every > 0 &&
                                               metrics.step % config.training.eval_every == 0) ||
                                              metrics.step == config.training.steps);
    if (evaluate_now) {
      metrics.has_val_loss = true;
      metrics.val_loss = evaluate();
      last_val_loss = metrics.val_loss;
      last_val_step = metrics.step;
    }
    metrics.last_val_loss = last_val_loss;
    metrics.last_val_step = last_val_step;
    metrics.elapsed_s = now_seconds() - run_start;
    const double per_step = steps_here > 1 ? timed_seconds / double(steps_here - 1) : metrics.step_time_s;
    metrics.eta_s = per_step * double(config.training.steps - metrics.step);
    if (router_stats_due(metrics.step, config.training.log_every, config.training.steps)) {
      metrics.router = router_stats_->read_and_reset(context_, options_.groups.world.get());  // collective
      attach_router_balance_stats(metrics.router);
      metrics.router_first_step = router_window_start;
      router_window_start = metrics.step + 1;
    }
    metrics.warnings = monitor.observe(metrics);
    write_metrics(metrics);
    if (log && (metrics.step % config.training.log_every == 0 || steps_here == 1 ||
                metrics.step == config.training.steps || metrics.skipped)) {
      *log << format_progress_line(metrics, options_.device) << "\n";
      log->flush();
    }
    for (const TrainingWarning& warning : metrics.warnings) log_line("warning: " + warning.message);
    if (steps_here == 1) log_memory();
    if (every > 0 && step_ % every == 0) save_checkpoint();
    if (stop_requested_) {
      const int signal_number = preemption_signal();
      log_line(std::string(signal_number ? preemption_signal_name(signal_number) : "a preemption signal") +
               " received (on this or another rank): stopping after step " + std::to_string(step_));
      if (last_saved_step_ != step_) save_checkpoint();
      preempted_ = true;
      break;
    }
  }
  finish_profile(true);
  if (!preempted_ && last_saved_step_ != step_) save_checkpoint();
  if (preempted_) {
    log_line("preempted at step " + std::to_string(step_) + " of " + std::to_string(config.training.steps) + " (" +
             std::to_string(steps_here) + " steps in this process, " + format_duration(now_seconds() - run_start) +
             "); continue with --resume auto");
    return;
  }
  if (options_.write_final_weights) {
    save_final_weights(context_, final_weights_path(), config_to_yaml(config), *parameters_, &options_.groups,
                       writer);
  }
  if (log) {
    // The run's step and this process's share of it differ after a resume.
    *log << "switchyard train: done: step " << step_ << " (" << steps_here << " steps in this process, "
         << format_duration(now_seconds() - run_start) << ")";
    if (scaler_.state().total_skips > 0) *log << ", " << scaler_.state().total_skips << " step(s) skipped";
    if (options_.write_final_weights) *log << "; weights -> " << final_weights_path();
    *log << "\n";
    log->flush();
  }
}

}  // namespace switchyard
