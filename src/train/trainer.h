// The training loop: data -> model -> gradients -> all-reduce -> clip / loss scale -> AdamW, with
// evaluation, metrics and the final weights file.
//
// One optimizer step on every rank:
//   for m in 0 .. grad_accum_steps - 1:
//     this rank's micro-batch (src/train/data_loader.h) -> forward, fused cross-entropy -> backward
//     (the first micro-step overwrites the gradient buffers, the others add to them)
//   all-reduce: dense gradients over the world, expert gradients over expert_data_parallel (sums;
//     src/comm/gradient_sync.h)
//   global gradient norm: dense part (replicated) + expert parts summed over the expert-parallel
//     ranks, so expert shards count once each; inf / NaN anywhere -> the loss scaler skips the step
//   AdamW with lr from the schedule and grad_scale = clip / loss_scale, clip = min(1, max_norm / norm)
//   moe.bias_update_rate > 0 and the step applied (not skipped by the loss scaler): the step's expert
//     loads (Transformer::step_loads) summed over all ranks in one all-reduce move every MoE block's
//     router bias (Transformer::update_routing_biases); the loads are zeroed at every step's start
//     and after the update, so a skipped step's loads are dropped
//   moe.global_aux_loss_weight > 0: each training forward's MoE blocks sum their micro-batch's loads
//     over all ranks (Transformer::set_load_reducer, the world communicator) into a running sum for
//     the step, which their global-batch loss reads (src/model/moe_router.h)
// The objective is the mean token cross-entropy over the whole global batch plus, for every MoE
// layer, the mean over micro-steps and ranks of its aux, z, sequence-level and global-batch losses
// (the last two 0 unless their weights are set; they share aux's gradient scale). Every rank's backward is
// seeded with ce_grad_scale = loss_scale / (tokens per micro-batch * micro-steps * ranks) and
// aux_grad_scale = loss_scale / (micro-steps * ranks), so plain sums across ranks give the exact
// gradient: no division after the all-reduce.
//
// The run (run()): first prepare(), unless the caller did: resume when checkpoint.resume says so
// (auto: the newest complete checkpoint of this model in checkpoint.dir that loads and verifies on
// every rank, the run directory's own run first, skipping and reporting others; a path: that
// checkpoint or a bad-input error) and settle the run id and the learning-rate schedule, writing
// nothing, so that bad input leaves every file of the run as it was; then <run_dir>/run_id and
// steps up to training.steps; evaluation on
// data.val_path every training.eval_every steps and after the last; one JSON line per step
// (src/train/metrics.h; a resumed run keeps the file's lines up to its step and appends) and a
// progress line every training.log_every steps, both from world rank 0; a checkpoint
// (src/train/checkpoint.h) every checkpoint.every steps and after the last (every = 0: only that);
// then <run_dir>/final.weights. SIGTERM / SIGUSR1 (src/train/checkpoint_signals.h) end the run
// early: the step in progress finishes, every rank agrees through the step's statistics
// all-reduce, a checkpoint is saved and run() returns with preempted() true.
//
// Exact continuation: a checkpoint holds everything a step reads (master weights, both moments,
// the update count, loss-scaler state, the data cursor, the router-jitter counter, the step
// that drives the learning rate), so with parallel.deterministic a resumed run repeats the
// uninterrupted one bit for bit.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "src/comm/bootstrap.h"
#include "src/comm/communicator.h"
#include "src/comm/gradient_sync.h"
#include "src/model/transformer.h"
#include "src/train/checkpoint.h"
#include "src/train/config.h"
#include "src/train/data_loader.h"
#include "src/train/loss_scaler.h"
#include "src/train/lr_schedule.h"
#include "src/train/metrics.h"
#include "src/train/optimizer.h"
#include "src/train/step_profiler.h"
#include "src/train/router_stats.h"
#include "src/train/stream_all_reduce.h"
#include "src/train/token_file.h"

namespace switchyard {

// Everything the training loop starts from (set up by `switchyard train`, src/cli/train_command.cpp).
struct TrainingSetup {
  Config config;
  const ProcessContext* process = nullptr;
  ParallelGroups groups;
  TokenFile train_data;
  TokenFile val_data;  // !is_open() when data.val_path is empty
};

struct TrainerOptions {
  DeviceKind device = DeviceKind::cpu;
  int world_rank = 0, world_size = 1;
  ParallelGroups groups;           // null communicators: one process, nothing to reduce
  std::ostream* log = nullptr;     // progress and summary lines (give it on world rank 0 only)
  bool write_metrics = true;       // metrics JSONL (world rank 0)
  bool write_final_weights = true; // <run_dir>/final.weights (world rank 0 writes, all ranks gather)
  // Testing aids: a loss scale to start from (> 0 overrides optimizer.loss_scale_init and may
  // exceed its range) and loss scaling without fp16.
  double initial_loss_scale = 0;
  bool force_loss_scaling = false;
  // --profile-steps: time the stages of this many optimizer steps after two warm-up steps (src/train/step_profiler.h),
  // print the breakdown to `log` and write <run_dir>/profile.json (world rank 0). 0: off.
  int profile_steps = 0;
};

class Trainer {
 public:
  // `train` (and `val`, may be null or closed) must outlive the trainer.
  Trainer(const Config& config, const TokenFile& train, const TokenFile* val, const TrainerOptions& options);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Collective: resumes as checkpoint.resume says and settles the run's id (the checkpoint's, or a
  // new one for a run from step 0, src/train/checkpoint_identity.h) and its learning-rate schedule
  // (optimizer.extend_schedule), reporting a changed schedule. Writes no file. Once; run() calls it
  // when the caller has not.
  void prepare();
  void run();
  bool preempted() const { return preempted_; }      // run() stopped early for a signal (and saved)
  const std::string& resumed_from() const { return resumed_from_; }  // empty: started fresh
  const std::string& run_id() const { return run_id_; }  // empty until prepare(), resume() or a save
  const LrSchedule& lr_schedule() const { return schedule_; }

  // Collective: saves the current state as <checkpoint.dir>/step-<step()>.
  CheckpointSaveResult save_checkpoint();
  // Collective: loads `target` ("auto" or a checkpoint path, as checkpoint.resume) into this
  // trainer, with the checkpoint's run id and schedule. auto: tries the complete checkpoints of this
  // model in checkpoint.dir (src/train/checkpoint_identity.h auto_resume_candidates), reporting
  // and skipping others and any that fails on some rank; false (fresh state) when none loads. A
  // path: SY_BAD_INPUT with the (first failing rank's) message when it does not load on every rank.
  bool resume(const std::string& target);
  // The scalar state a checkpoint records.
  TrainingProgress progress() const;
  int64_t tokens_seen() const { return tokens_seen_; }
  // One optimizer step; the returned metrics lack val_loss, elapsed and ETA (run() fills them).
  StepMetrics train_step();
  // Mean validation loss over training.eval_batches micro-batches on every rank (the same batches
  // each time). Collective: every rank must call it.
  double evaluate();

  int64_t step() const { return step_; }  // optimizer steps taken (skipped ones included)
  const ExecContext& context() const { return context_; }
  Transformer& model() { return *model_; }
  ModelParameters& parameters() { return *parameters_; }
  AdamWOptimizer& optimizer() { return *optimizer_; }
  LossScaler& loss_scaler() { return scaler_; }
  DataLoader& train_loader() { return train_loader_; }
  const FlopsEstimate& flops() const { return flops_; }
  std::string final_weights_path() const;
  std::string metrics_path() const;

 private:
  // Sums `values` over `communicator` (no-op when it is null or of size 1).
  void all_reduce_host(const std::shared_ptr<Communicator>& communicator, std::vector<double>& values);
  void upload_batch();
  // Prints and writes the step profile once its steps are done (or the run ends); no-op otherwise.
  void finish_profile(bool run_ended);
  bool has_peers(const std::shared_ptr<Communicator>& communicator) const;
  CheckpointContext checkpoint_context() const;
  void apply_progress(const TrainingProgress& progress, const std::string& path);
  void reset_to_initial_state();
  void report_schedule_change(const TrainingProgress& loaded);
  void settle_fresh_run_id(bool automatic);
  void share_run_id();  // every rank takes world rank 0's run_id_ (collective)
  void log_line(const std::string& text) const;
  void log_memory() const;
  // The router statistics the device sums lack: the window's sequence-level and global-batch losses
  // (router_balance_window_, then zeroed) and the router biases.
  void attach_router_balance_stats(std::vector<RouterLayerStats>& layers);

  Config config_;
  TrainerOptions options_;
  ExecContext context_;
  void* stream_ = nullptr;
  DType compute_dtype_;
  std::unique_ptr<Transformer> model_;
  std::unique_ptr<RouterStatsRecorder> router_stats_;  // device-side router sums between metrics lines
  std::unique_ptr<StepProfiler> profiler_;             // --profile-steps only
  std::vector<StepProfile> profiles_;
  ProfileFlops profile_flops_;                         // summed over the profiled steps
  int64_t steps_in_process_ = 0;                       // train_step calls of this process
  std::unique_ptr<ModelParameters> parameters_;
  std::unique_ptr<AdamWOptimizer> optimizer_;
  std::unique_ptr<GradientSynchronizer> synchronizer_;
  LrSchedule schedule_;
  LossScaler scaler_;
  DataLoader train_loader_;
  std::unique_ptr<DataLoader> val_loader_;
  FlopsEstimate flops_;
  int64_t step_ = 0;
  int64_t tokens_seen_ = 0;
  int64_t jitter_micro_steps_ = 0;  // micro-steps run so far: the router-jitter counter
  bool stop_requested_ = false;     // some rank got a preemption signal (agreed in train_step)
  bool preempted_ = false;
  int64_t last_saved_step_ = -1;    // the step of the checkpoint saved or resumed last
  std::string resumed_from_;
  std::string run_id_;
  bool prepared_ = false;
  LossScalerState initial_scaler_state_;
  std::vector<int32_t> host_inputs_, host_targets_;
  Buffer device_inputs_, device_targets_;
  Buffer reduce_buffer_;  // device staging for host-value all-reduces over NCCL
  StreamOrderedAllReduce world_load_reduce_;  // expert loads over all ranks (no-op on one rank)
  // Per MoE layer, (sequence-level, global-batch) loss sums over every forward of every rank since
  // the last metrics line with router statistics.
  std::vector<double> router_balance_window_;
};

}  // namespace switchyard
