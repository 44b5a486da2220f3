// The report's views of the modern balancing options (issue #19), shown only when the run's
// metrics carry them (src/report/run_history.h), so older runs get the report they always had:
//   - router_bias_section: aux-loss-free balancing (moe.bias_update_rate > 0). Per MoE layer, the
//     router bias's smallest and largest entry and its standard deviation over the experts at each
//     logged step; the bias of every expert at the last logged step as a signed heat strip (one
//     row per layer) beside the expert load of the same window (load / even share), and a table.
//   - balance_loss_series: the sequence-level and global-batch balance losses per step, for the
//     chart of router losses.
#pragma once

#include <string>
#include <vector>

#include "src/report/run_history.h"
#include "src/report/svg_plot.h"

namespace switchyard {

// The section's HTML (no heading); a note when the history has no router bias.
std::string router_bias_section(const RunHistory& history);

// "sequence-level (balance)" and "global-batch (balance)" over the steps, each only when the
// history has it (history_has_seq_aux_loss / history_has_global_aux_loss).
std::vector<PlotSeries> balance_loss_series(const RunHistory& history);

}  // namespace switchyard
