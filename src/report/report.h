// The HTML report of a training run (`switchyard report RUN_DIR`): one self-contained file (inline
// CSS and SVG, no scripts, nothing fetched) with
//   - the run's shape (model and MoE settings from its config, the routing options included) and
//     headline numbers;
//   - training curves: loss (per step, faint, and its moving average) with validation loss,
//     learning rate, router aux / z losses, dropped fraction, throughput;
//   - per MoE layer, a heatmap of the expert load over training (experts x step bins, each cell
//     the expert's share of the bin's routed choices relative to an even split: 1x = balanced);
//   - when the metrics carry a router bias (aux-loss-free balancing, moe.bias_update_rate > 0):
//     its range and spread per layer over training and its value per expert at the last logged
//     step beside that window's load (src/report/router_balance.h); the sequence-level and
//     global-batch balance losses join the router-loss chart and table when logged;
//   - router statistics (load max/mean, experts used, entropy, mean gate) over training and a
//     table of the latest values, when the metrics carry them;
//   - the expert specialization map (src/report/specialization.h), when one was computed:
//     heatmaps of lift by byte class, by position in the window and by the preceding byte's
//     class, and the text table;
//   - the step time breakdown of `train --profile-steps` (the run's profile.json), when there is one.
// docs/ANALYTICS.md ("The run report") describes each section for users.
#pragma once

#include <cstdint>
#include <string>

#include "src/report/run_history.h"
#include "src/report/specialization.h"
#include "src/train/config.h"

namespace switchyard {

struct ReportInputs {
  std::string title;  // e.g. the run directory's name
  std::string run_dir;
  const Config* config = nullptr;                     // the run's resolved config (nullptr: not shown)
  const RunHistory* history = nullptr;                // required
  const SpecializationMap* specialization = nullptr;  // nullptr: the section explains why it is missing
  std::string specialization_source;                  // "the first 16384 tokens of data/val.bin"
  std::string specialization_missing_reason;
  // The step time breakdown as `train --profile-steps` prints it (format_step_profile of the run's
  // profile.json); empty: the section shows step_profile_missing_reason ("not profiled: ...").
  std::string step_profile;
  std::string step_profile_missing_reason;
};

std::string build_report_html(const ReportInputs& inputs);

// "1 MoE layer", "2 MoE layers", "0 steps": the count and the noun in the right number (plural:
// singular + "s" unless given).
std::string count_noun(int64_t count, const std::string& singular, const std::string& plural = "");

}  // namespace switchyard
