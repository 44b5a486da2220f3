// Console warnings about a run going wrong, from numbers the trainer already has each step
// (src/train/metrics.h). docs/TRAINING.md ("Warnings") states the rules for users.
//
//   loss spike       the step's loss is more than `loss_jump` times the median of the previous
//                    `window` steps' losses (1.5: 50% above it), once `warmup` steps are in the window
//   grad norm spike  the same for the gradient norm with `grad_norm_jump` (3x); skipped steps
//                    (inf / NaN gradients) are left out, the loss scaler already reports them
//   routing collapse at `collapse_steps` of the last `collapse_window` steps a MoE layer's top_k
//                    busiest experts took at least `collapse_share` of its routed choices (top-1:
//                    one expert got nearly every token), whichever experts they were: a router
//                    that throws every token at one expert, a different one from step to step,
//                    looks balanced over a logging window but not step by step
//   idle experts     an expert of a MoE layer received no routed choice for `idle_steps`
//                    consecutive steps (a dead expert); one line per layer names its experts
//
// Rate limiting: after a warning of one kind (per MoE layer for the router kinds) the next waits
// `quiet_steps` steps. A spike whose ratio to its median is at least twice that of the one last
// told is told at once; the others in between are counted and told with the next warning of
// their kind, or alone at the first step after the quiet period. A collapse is told once while it
// lasts (it ends when at most half the window's steps are collapsed); an idle expert is named once
// while it stays idle, and again if it goes idle again after receiving tokens.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "src/train/metrics.h"

namespace switchyard {

struct MonitorRules {
  int window = 20;              // steps whose median is the reference
  int warmup = 10;              // values needed in the window before spikes are judged
  double loss_jump = 1.5;       // loss spike: loss > loss_jump x median
  double grad_norm_jump = 3.0;  // grad norm spike: norm > grad_norm_jump x median
  int top_k = 1;                // experts per token (moe.top_k)
  double collapse_share = 0.9;  // a step is collapsed when the top_k busiest experts take this share
  int collapse_window = 10, collapse_steps = 8;  // ... at collapse_steps of the last collapse_window
  int idle_steps = 20;          // an expert without tokens this many steps in a row is idle
  int quiet_steps = 20;         // steps between two warnings of the same kind (and layer)
};

class TrainingMonitor {
 public:
  explicit TrainingMonitor(const MonitorRules& rules = MonitorRules());

  // Feeds one step (its step, loss, grad_norm, skipped and tokens_per_expert) and returns the
  // warnings it raises, usually none. Steps must come in increasing order.
  std::vector<TrainingWarning> observe(const StepMetrics& metrics);

  const MonitorRules& rules() const { return rules_; }

 private:
  // The recent values of one quantity and its rate limiter.
  struct SpikeTracker {
    const char* kind;   // "loss_spike", "grad_norm_spike"
    const char* label;  // "loss", "grad norm"
    double jump;
    std::deque<double> recent;
    int64_t quiet_until = 0;  // no warning before this step
    int64_t last_warned_step = 0;
    double last_warned_ratio = 0;
    int64_t suppressed = 0;   // spikes since last_warned_step that were not shown
    double largest_ratio = 0, largest_value = 0;
    int64_t largest_step = 0;
  };
  struct LayerTracker {
    std::vector<int64_t> idle_run;  // consecutive steps without a choice, per expert
    std::vector<bool> reported;     // named in a warning and idle since
    int64_t idle_quiet_until = 0;
    std::deque<std::vector<int>> busiest;  // per recent step: its top_k experts if collapsed, else none
    bool in_collapse = false;       // warned about, and not over yet
    int64_t collapse_quiet_until = 0;
  };

  void check_spike(SpikeTracker& tracker, int64_t step, double value, std::vector<TrainingWarning>& out);
  void check_collapse(int layer, int64_t step, const std::vector<int64_t>& counts, int64_t total,
                      std::vector<TrainingWarning>& out);
  void check_idle_experts(int layer, int64_t step, const std::vector<int64_t>& counts,
                          std::vector<TrainingWarning>& out);

  MonitorRules rules_;
  SpikeTracker loss_, grad_norm_;
  std::vector<LayerTracker> layers_;
};

}  // namespace switchyard
