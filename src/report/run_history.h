// A training run's history, read back from its metrics file (JSON lines, src/train/metrics.h) for
// the report: per-step curves, the expert load per MoE layer binned over the steps, and the router
// statistics and the training warnings of the metrics lines that carry them.
//
// Keys of the modern routing options (issue #19) are optional, so histories written before them
// read as before: per step "seq_aux_loss" and "global_aux_loss"; per element of "router" the same
// two losses and, for layers with a router bias (moe.bias_update_rate > 0), "bias" ([E], its value
// when the line was written) with "bias_min", "bias_max", "bias_std" (computed from
// "bias" when a line has the vector without them).
//
// Expert load bins: the steps 1..total_steps are cut into at most `load_bins` equal ranges; bin b
// sums tokens_per_expert over the steps in it. Memory is layers * bins * E, whatever the run length.
// A last line that does not parse (the run died while writing it) is skipped with a note; any
// other bad line is SY_BAD_INPUT naming file:line.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "src/train/router_stats.h"

namespace switchyard {

// What a "router" element carries beyond RouterLayerStats: the balance losses and the router bias
// of aux-loss-free balancing. NaN / empty where the line has no such key (a RouterRecord built by
// hand may leave `balance` shorter than `layers`: the report treats the missing ones as empty).
struct RouterLayerBalance {
  double seq_aux_loss = std::numeric_limits<double>::quiet_NaN();
  double global_aux_loss = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> bias;  // [E]; empty: the layer has no router bias
  double bias_min = std::numeric_limits<double>::quiet_NaN();
  double bias_max = std::numeric_limits<double>::quiet_NaN();
  double bias_std = std::numeric_limits<double>::quiet_NaN();  // population standard deviation over the experts
  bool has_bias() const { return !bias.empty() || std::isfinite(bias_min); }
};

struct RouterRecord {
  int64_t step = 0;
  std::vector<RouterLayerStats> layers;
  std::vector<RouterLayerBalance> balance;  // one per element of `layers`
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
  std::vector<double> seq_aux_loss, global_aux_loss;  // NaN on lines without the key
  // Hot-expert replication (NaN on lines without the keys): replicas, rows a replica computed, and
  // the busiest expert-parallel rank's rows without and with them (summed over MoE layers).
  std::vector<double> replicated_experts, replicated_rows, ep_max_load_before, ep_max_load_after;
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

// Whether any router record carries a router bias / whether the sequence-level or global-batch
// loss is anywhere finite and not 0 (per step or per layer; the trainer writes 0 when the loss's
// weight is 0): the report shows those views only then.
bool history_has_router_bias(const RunHistory& history);
bool history_has_seq_aux_loss(const RunHistory& history);
bool history_has_replication(const RunHistory& history);  // any line with ep_max_load_before
bool history_has_global_aux_loss(const RunHistory& history);

}  // namespace switchyard
