// Training warnings (src/train/training_monitor.h).
#include "src/train/training_monitor.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>

#include "src/core/error.h"

namespace switchyard {
namespace {

double median_of(std::vector<double> values) {
  if (values.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(values.begin(), values.end());
  const size_t middle = values.size() / 2;
  return values.size() % 2 ? values[middle] : 0.5 * (values[middle - 1] + values[middle]);
}

std::string number(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.4g", value);
  return buffer;
}

std::string ratio_text(double ratio) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), ratio < 10 ? "%.1fx" : "%.0fx", ratio);
  return buffer;
}

std::string spikes_text(int64_t count) { return std::to_string(count) + (count == 1 ? " spike" : " spikes"); }

}  // namespace

TrainingMonitor::TrainingMonitor(const MonitorRules& rules) : rules_(rules) {
  SY_CHECK(rules.window >= 1 && rules.warmup >= 1 && rules.warmup <= rules.window && rules.idle_steps >= 1 &&
               rules.quiet_steps >= 0 && rules.loss_jump > 1.0 && rules.grad_norm_jump > 1.0 && rules.top_k >= 1 &&
               rules.collapse_share > 0.0 && rules.collapse_share <= 1.0 && rules.collapse_steps >= 1 &&
               rules.collapse_steps <= rules.collapse_window,
           "TrainingMonitor: window ", rules.window, ", warm-up ", rules.warmup, ", idle steps ", rules.idle_steps,
           ", quiet steps ", rules.quiet_steps, ", jumps ", rules.loss_jump, " and ", rules.grad_norm_jump,
           ", top_k ", rules.top_k, ", collapse ", rules.collapse_share, " at ", rules.collapse_steps, " of ",
           rules.collapse_window);
  loss_.kind = "loss_spike";
  loss_.label = "loss";
  loss_.jump = rules.loss_jump;
  grad_norm_.kind = "grad_norm_spike";
  grad_norm_.label = "grad norm";
  grad_norm_.jump = rules.grad_norm_jump;
}

std::vector<TrainingWarning> TrainingMonitor::observe(const StepMetrics& metrics) {
  std::vector<TrainingWarning> warnings;
  check_spike(loss_, metrics.step, metrics.loss, warnings);
  // A skipped step's norm is inf / NaN by definition (or meaningless): the scaler reports those.
  if (!metrics.skipped) check_spike(grad_norm_, metrics.step, metrics.grad_norm, warnings);
  if (layers_.size() < metrics.tokens_per_expert.size()) layers_.resize(metrics.tokens_per_expert.size());
  for (size_t layer = 0; layer < metrics.tokens_per_expert.size(); ++layer) {
    const std::vector<int64_t>& counts = metrics.tokens_per_expert[layer];
    int64_t total = 0;
    for (int64_t count : counts) total += count;
    if (total <= 0) continue;  // the layer routed nothing this step: no evidence either way
    check_collapse(int(layer), metrics.step, counts, total, warnings);
    check_idle_experts(int(layer), metrics.step, counts, warnings);
  }
  return warnings;
}

void TrainingMonitor::check_spike(SpikeTracker& tracker, int64_t step, double value,
                                  std::vector<TrainingWarning>& out) {
  if (!std::isfinite(value)) return;
  std::string message;
  double warned_ratio = 0;
  if (int(tracker.recent.size()) >= rules_.warmup) {
    const double median = median_of(std::vector<double>(tracker.recent.begin(), tracker.recent.end()));
    const double ratio = median > 0 ? value / median : 0.0;
    if (ratio > tracker.jump) {
      // A much larger spike than the one just told is news even within the quiet period.
      if (step >= tracker.quiet_until || ratio >= 2.0 * tracker.last_warned_ratio) {
        message = std::string(tracker.label) + " " + number(value) + " at step " + std::to_string(step) + " is " +
                  ratio_text(ratio) + " the median " + number(median) + " of the last " +
                  std::to_string(tracker.recent.size()) + " steps";
        warned_ratio = ratio;
      } else {
        ++tracker.suppressed;
        if (ratio > tracker.largest_ratio) {
          tracker.largest_ratio = ratio;
          tracker.largest_value = value;
          tracker.largest_step = step;
        }
      }
    }
  }
  // Spikes held back: told with this step's spike, or alone once the quiet period is over.
  if (tracker.suppressed > 0 && (!message.empty() || step >= tracker.quiet_until)) {
    const std::string held = spikes_text(tracker.suppressed) + " after the warning at step " +
                             std::to_string(tracker.last_warned_step) + " (largest " +
                             number(tracker.largest_value) + " at step " + std::to_string(tracker.largest_step) +
                             ", " + ratio_text(tracker.largest_ratio) + " its median)";
    message = message.empty() ? std::string(tracker.label) + ": " + held : message + "; and " + held;
    tracker.suppressed = 0;
    tracker.largest_ratio = 0;
  }
  if (!message.empty()) {
    out.push_back({tracker.kind, message});
    tracker.last_warned_step = step;
    if (warned_ratio > 0) tracker.last_warned_ratio = warned_ratio;  // a summary keeps the spike it follows
    tracker.quiet_until = step + rules_.quiet_steps;
  }
  tracker.recent.push_back(value);
  if (int(tracker.recent.size()) > rules_.window) tracker.recent.pop_front();
}

void TrainingMonitor::check_collapse(int layer, int64_t step, const std::vector<int64_t>& counts, int64_t total,
                                     std::vector<TrainingWarning>& out) {
  // With no more experts than choices per token every step would look collapsed.
  if (int(counts.size()) <= rules_.top_k) return;
  LayerTracker& tracker = layers_[size_t(layer)];
  std::vector<int> order(counts.size());
  for (size_t expert = 0; expert < counts.size(); ++expert) order[expert] = int(expert);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return counts[size_t(a)] > counts[size_t(b)]; });
  order.resize(size_t(rules_.top_k));
  int64_t busiest_sum = 0;
  for (int expert : order) busiest_sum += counts[size_t(expert)];
  const bool collapsed = double(busiest_sum) >= rules_.collapse_share * double(total);
  tracker.busiest.push_back(collapsed ? order : std::vector<int>());
  if (int(tracker.busiest.size()) > rules_.collapse_window) tracker.busiest.pop_front();
  const int collapsed_steps = int(std::count_if(tracker.busiest.begin(), tracker.busiest.end(),
                                                [](const std::vector<int>& experts) { return !experts.empty(); }));
  if (tracker.in_collapse) {
    if (2 * collapsed_steps <= rules_.collapse_window) tracker.in_collapse = false;  // over: may be told again
    return;
  }
  if (collapsed_steps < rules_.collapse_steps || step < tracker.collapse_quiet_until) return;
  std::vector<int> experts;  // every expert among the busiest at a collapsed step of the window
  for (const std::vector<int>& busiest : tracker.busiest)
    for (int expert : busiest)
      if (std::find(experts.begin(), experts.end(), expert) == experts.end()) experts.push_back(expert);
  std::sort(experts.begin(), experts.end());
  std::string list;
  for (size_t index = 0; index < experts.size(); ++index)
    list += (index == 0 ? "" : index + 1 == experts.size() ? " and " : ", ") + std::to_string(experts[index]);
  const std::string which = int(experts.size()) == rules_.top_k
                                ? (experts.size() == 1 ? "expert " : "experts ") + list + " every time"
                                : "busiest: experts " + list + " in turn";
  const std::string who = rules_.top_k == 1 ? "one expert" : "the " + std::to_string(rules_.top_k) + " busiest experts";
  const int64_t first_step = step - int64_t(tracker.busiest.size()) + 1;
  out.push_back({"routing_collapse", "MoE layer " + std::to_string(layer) + ": at " + std::to_string(collapsed_steps) +
                                         " of the " + std::to_string(tracker.busiest.size()) + " steps " +
                                         std::to_string(first_step) + "-" + std::to_string(step) + " " + who +
                                         " took at least " +
                                         std::to_string(int(std::lround(100.0 * rules_.collapse_share))) +
                                         "% of the routed choices (" + which + "): router collapse"});
  tracker.in_collapse = true;
  tracker.collapse_quiet_until = step + rules_.quiet_steps;
}

void TrainingMonitor::check_idle_experts(int layer, int64_t step, const std::vector<int64_t>& counts,
                                         std::vector<TrainingWarning>& out) {
  LayerTracker& tracker = layers_[size_t(layer)];
  if (tracker.idle_run.size() != counts.size()) {
    tracker.idle_run.assign(counts.size(), 0);
    tracker.reported.assign(counts.size(), false);
  }
  std::vector<size_t> idle;
  bool any_new = false;
  int64_t shortest_run = std::numeric_limits<int64_t>::max();
  for (size_t expert = 0; expert < counts.size(); ++expert) {
    if (counts[expert] > 0) {
      tracker.idle_run[expert] = 0;
      tracker.reported[expert] = false;  // back in use: name it again if it goes idle again
      continue;
    }
    if (++tracker.idle_run[expert] < rules_.idle_steps) continue;
    idle.push_back(expert);
    any_new = any_new || !tracker.reported[expert];
    shortest_run = std::min(shortest_run, tracker.idle_run[expert]);
  }
  if (!any_new || step < tracker.idle_quiet_until) return;
  std::string list;
  for (size_t index = 0; index < idle.size(); ++index) {
    list += (index == 0 ? "" : index + 1 == idle.size() ? " and " : ", ") + std::to_string(idle[index]);
    tracker.reported[idle[index]] = true;
  }
  const std::string noun = idle.size() == 1 ? "expert " : "experts ";
  out.push_back({"idle_experts", "MoE layer " + std::to_string(layer) + ": " + noun + list + " (" +
                                     std::to_string(idle.size()) + " of " + std::to_string(counts.size()) +
                                     ") received no tokens in the last " + std::to_string(shortest_run) +
                                     " steps (" + std::to_string(step - shortest_run + 1) + "-" +
                                     std::to_string(step) + ")"});
  tracker.idle_quiet_until = step + rules_.quiet_steps;
}

}  // namespace switchyard
