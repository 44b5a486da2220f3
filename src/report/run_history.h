// A training run's history, read back from its metrics file (JSON lines, src/train/metrics.h) for
// the report: per-step curves, the expert load per MoE layer binned over the steps, and the router
// statistics and the training warnings of the metrics lines that carry them.
//
// Expert load bins: the steps 1..total_steps are cut into at most `load_bins` equal ranges; bin b
// sums tokens_per_expert over the steps in it. Memory is layers * bins * E, whatever the run length.
// A last line that does not parse (the run died while writing it) is skipped with a note; any
// other bad line is SY_BAD_INPUT naming file:line.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "src/train/router_stats.h"

namespace switchyard {

struct RouterRecord {
  int64_t step = 0;
  std::vector<RouterLayerStats> layers;
};

// A warning the trainer raised (src/train/training_monitor.h), from a metrics line's "warnings".
struct RunWarning {
  int64_t step = 0;
  std::string kind, message;
};

struct RunHistory {
  std::string path;
  int64_t total_steps = 0;  // from the last record
  // One entry per metrics line, in file order.
  std::vector<double> step, loss, lr, grad_norm, aux_loss, z_loss, dropped_fraction, tokens_per_s, step_time_s, mfu;
  std::vector<bool> skipped;
  std::vector<double> val_step, val_loss;  // lines with an evaluation
  // Expert load: load[layer][bin][expert] = routed choices summed over the bin's steps.
  int load_layers = 0, load_experts = 0;
  std::vector<int64_t> bin_first_step, bin_last_step;  // steps covered by each bin (0 when empty)
  std::vector<std::vector<std::vector<double>>> load;
  std::vector<RouterRecord> router;
  std::vector<RunWarning> warnings;  // in file order
  std::vector<std::string> notes;  // skipped lines and the like, for the report
};

RunHistory read_run_history(const std::string& metrics_path, int load_bins = 160);

// Exponential moving average with the given weight on the past (0 <= smoothing < 1), bias-corrected
// so early values are not pulled toward 0; non-finite inputs are skipped (their output repeats the
// previous value, NaN before the first finite one).
std::vector<double> exponential_moving_average(const std::vector<double>& values, double smoothing);

}  // namespace switchyard
