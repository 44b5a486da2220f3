// The trainer's checkpoint side (src/train/trainer.h): saving, resuming, and settling the run's
// identity and learning-rate schedule before anything of the run is written.
#include <chrono>
#include <iomanip>
#include <sstream>

#include "src/core/error.h"
#include "src/train/checkpoint_identity.h"
#include "src/train/trainer.h"

namespace switchyard {
namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The learning rate at `step` of a cosine ending at `end`, as text; "?" when this run's optimizer
// keys cannot describe that schedule (a warm-up longer than it).
std::string lr_text(const OptimizerConfig& optimizer, int64_t end, int64_t step) {
  try {
    std::ostringstream text;
    text << std::setprecision(4) << LrSchedule(optimizer, end).at(step);
    return text.str();
  } catch (const Error&) {
    return "?";
  }
}

}  // namespace

CheckpointContext Trainer::checkpoint_context() const {
  CheckpointContext context;
  context.config = &config_;
  context.exec = context_;
  context.groups = &options_.groups;
  context.world_rank = options_.world_rank;
  context.world_size = options_.world_size;
  return context;
}

TrainingProgress Trainer::progress() const {
  TrainingProgress progress;
  progress.run_id = run_id_;
  progress.planned_steps = config_.training.steps;
  progress.lr_schedule_steps = schedule_.total_steps();
  progress.step = step_;
  progress.tokens_seen = tokens_seen_;
  progress.rng.seed = uint64_t(config_.training.seed);
  progress.rng.jitter_micro_steps = jitter_micro_steps_;
  progress.train_data = train_loader_.state();
  progress.optimizer_updates = optimizer_->updates();
  progress.loss_scaling = scaler_.enabled();
  progress.loss_scaler = scaler_.state();
  return progress;
}

void Trainer::share_run_id() {
  if (has_peers(options_.groups.world)) run_id_ = all_gather_strings(options_.groups.world, run_id_)[0];
}

CheckpointSaveResult Trainer::save_checkpoint() {
  if (run_id_.empty()) {  // saving without prepare() or resume(): a run of its own
    if (options_.world_rank == 0) run_id_ = new_run_id();
    share_run_id();
  }
  const double start = now_seconds();
  CheckpointSaveResult result = switchyard::save_checkpoint(checkpoint_context(), *parameters_, *optimizer_, progress());
  last_saved_step_ = step_;
  if (options_.log) {
    std::ostringstream line;
    line << "checkpoint " << result.path << " saved (" << std::setprecision(3) << double(result.bytes) / 1e6
         << " MB in " << now_seconds() - start << " s)";
    for (const std::string& removed : result.removed) line << "; removed " << removed;
    log_line(line.str());
  }
  return result;
}

void Trainer::apply_progress(const TrainingProgress& progress, const std::string& path) {
  if (progress.rng.seed != uint64_t(config_.training.seed))
    SY_BAD_INPUT("checkpoint ", path, " was saved with training.seed = ", progress.rng.seed, ", this run has ",
                 config_.training.seed, " (the data order and router noise would not continue)");
  try {
    train_loader_.restore(progress.train_data);
  } catch (const Error& error) {
    SY_BAD_INPUT("checkpoint ", path, ": ", error.message(), " (", config_.data.path, ")");
  }
  schedule_ = LrSchedule(config_.optimizer,
                         resumed_schedule_end(config_.optimizer, config_.training.steps, progress.lr_schedule_steps));
  optimizer_->set_updates(progress.optimizer_updates);
  // The scaler's state carries over only between runs that both scale (fp16, or both not).
  if (progress.loss_scaling == scaler_.enabled()) scaler_.restore(progress.loss_scaler);
  else scaler_.restore(initial_scaler_state_);
  step_ = progress.step;
  tokens_seen_ = progress.tokens_seen;
  jitter_micro_steps_ = progress.rng.jitter_micro_steps;
  run_id_ = progress.run_id;
}

void Trainer::reset_to_initial_state() {
  parameters_->initialize(context_, uint64_t(config_.training.seed));
  for (int group = 0; group < kNumParameterGroups; ++group) {
    for (const Tensor& moment : {optimizer_->exp_avg(ParameterGroup(group)), optimizer_->exp_avg_sq(ParameterGroup(group))})
      if (moment.bytes()) device_memset(moment.data, moment.device, 0, moment.bytes());
  }
  optimizer_->set_updates(0);
  scaler_.restore(initial_scaler_state_);
  train_loader_.rewind();
  step_ = tokens_seen_ = jitter_micro_steps_ = 0;
}

// A resumed run whose schedule is not the checkpoint's: the learning rate jumps at the first step,
// which the user should hear about before it happens (docs/CHECKPOINTS.md, "Extending a run").
void Trainer::report_schedule_change(const TrainingProgress& loaded) {
  const int64_t total = config_.training.steps, end = schedule_.total_steps();
  const int64_t planned = loaded.planned_steps, old_end = loaded.lr_schedule_steps;
  if (step_ >= total || (total <= planned && end == old_end)) return;
  const OptimizerConfig& optimizer = config_.optimizer;
  const std::string now = "step " + std::to_string(step_ + 1);
  const std::string before = step_ >= 1 ? lr_text(optimizer, old_end, step_) + " at step " + std::to_string(step_)
                                        : std::string("the start");
  std::ostringstream line;
  if (total > planned) {
    line << "extending the run: the checkpoint's run planned " << planned << " steps, training.steps is now " << total
         << "; ";
    if (end == total)
      line << "optimizer.extend_schedule = stretch recomputes the cosine over " << total
           << " steps: the learning rate goes from " << before << " to " << lr_text(optimizer, end, step_ + 1) << " at "
           << now << " (keep_end would keep the old schedule's end, step " << old_end << ", and min_lr "
           << optimizer.min_lr << " after it)";
    else
      line << "optimizer.extend_schedule = keep_end keeps the old schedule's end: the cosine ends at step " << end
           << " and the learning rate stays at min_lr " << optimizer.min_lr << " after it (stretch would recompute "
           << "the cosine over " << total << " steps: " << lr_text(optimizer, total, step_ + 1) << " at " << now << ")";
  } else {
    line << "the learning-rate schedule is not the checkpoint's: its cosine ended at step " << old_end
         << ", this run's ends at step " << end << " (training.steps " << total << ", the checkpoint's run planned "
         << planned << "): the learning rate goes from " << before << " to " << lr_text(optimizer, end, step_ + 1)
         << " at " << now;
  }
  log_line(line.str());
}

bool Trainer::resume(const std::string& target) {
  const bool automatic = target == "auto";
  const bool peers = has_peers(options_.groups.world);
  // World rank 0 decides what to try (one view of the file system), every rank learns the list.
  std::string list;
  if (options_.world_rank == 0) {
    if (!automatic) {
      list = target;
    } else {
      const ResumeCandidates candidates = auto_resume_candidates(
          config_.checkpoint.dir, config_, read_run_directory_run_id(config_.logging.run_dir));
      for (const std::string& skipped : candidates.skipped) log_line("resume: " + skipped);
      for (const std::string& path : candidates.paths) list += (list.empty() ? "" : "\n") + path;
    }
  }
  if (peers) list = all_gather_strings(options_.groups.world, list)[0];
  std::vector<std::string> candidates;
  for (size_t start = 0; start < list.size();) {
    const size_t end = std::min(list.find('\n', start), list.size());
    candidates.push_back(list.substr(start, end - start));
    start = end + 1;
  }

  const std::string run_id_before = run_id_;
  const LrSchedule schedule_before = schedule_;
  bool touched = false;
  for (const std::string& candidate : candidates) {
    std::string message;
    int exit_code = kExitOk;
    TrainingProgress loaded;
    try {
      touched = true;
      loaded = load_checkpoint(checkpoint_context(), candidate, *parameters_, optimizer_.get());
      apply_progress(loaded, candidate);
    } catch (const Error& error) {
      message = error.message();
      exit_code = error.exit_code();
    }
    int agreed_code = kExitOk;
    const std::string agreed = agree_on_errors(peers ? options_.groups.world : nullptr, message, exit_code, &agreed_code);
    if (agreed.empty()) {
      resumed_from_ = candidate;
      last_saved_step_ = step_;
      log_line("resumed from " + candidate + " at step " + std::to_string(step_) + " (" +
               std::to_string(tokens_seen_) + " tokens seen)");
      report_schedule_change(loaded);
      return true;
    }
    run_id_ = run_id_before;
    schedule_ = schedule_before;
    // Only a bad checkpoint is skipped; any other failure (a bug, the system) ends the run rather
    // than quietly starting over from step 0.
    if (!automatic || agreed_code != kExitBadInput) throw_error(__FILE__, __LINE__, agreed_code, agreed);
    log_line("resume: skipping " + candidate + ": " + agreed);
  }
  if (touched) reset_to_initial_state();
  log_line("resume: no usable checkpoint in " + config_.checkpoint.dir + "; starting from step 0");
  return false;
}

void Trainer::settle_fresh_run_id(bool automatic) {
  std::string how = "a new run";
  if (options_.world_rank == 0) {
    // --resume auto finding nothing in the run directory's own run, which never completed a
    // checkpoint (stopped during its first save): the same run restarting, which may clean up what
    // its interrupted save left. Any other start from step 0 is a new run.
    const std::string previous = automatic ? read_run_directory_run_id(config_.logging.run_dir) : "";
    if (!previous.empty() && !holds_checkpoint_of_run(config_.checkpoint.dir, previous)) {
      run_id_ = previous;
      how = "the run directory's run, restarted before its first checkpoint";
    } else {
      run_id_ = new_run_id();
    }
  }
  share_run_id();
  log_line("run id " + run_id_ + " (" + how + ")");
}

void Trainer::prepare() {
  if (prepared_) return;
  prepared_ = true;
  const std::string& target = config_.checkpoint.resume;
  if (target == "none" || !resume(target)) {
    settle_fresh_run_id(target == "auto");
  } else if (run_id_.empty()) {
    // A checkpoint of an earlier version, which recorded no run id: its run goes on under a new one
    // (so that keep_last never removes those older checkpoints).
    if (options_.world_rank == 0) run_id_ = new_run_id();
    share_run_id();
    log_line("run id " + run_id_ + " (new: the checkpoint was saved by an earlier version, which recorded none)");
  } else {
    log_line("run id " + run_id_ + " (the checkpoint's run, continued)");
  }
}

}  // namespace switchyard
