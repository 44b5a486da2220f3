// The HTML run report (src/report/report.h).
#include "src/report/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

#include "src/report/report_html.h"
#include "src/report/router_balance.h"
#include "src/report/svg_plot.h"
#include "src/core/error.h"
#include "src/train/metrics.h"

namespace switchyard {
namespace {

using namespace report_html;

const char* kStyle = R"(<style>
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; color: #222; max-width: 1180px; margin: 24px auto;
       padding: 0 16px; line-height: 1.45; }
h1 { font-size: 24px; margin-bottom: 2px; } h2 { font-size: 19px; margin-top: 34px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.subtitle { color: #666; margin-top: 0; } .note { color: #555; font-size: 13px; max-width: 900px; }
.figures { display: flex; flex-wrap: wrap; gap: 10px; } figure { margin: 0; min-width: 0; max-width: 100%; }
figure svg { display: block; max-width: 100%; height: auto; }
.warnings { border-left: 4px solid #d62728; background: #fdf3f3; padding: 6px 12px; font-size: 13px; }
.warnings ul { margin: 4px 0; padding-left: 20px; } .table-scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 14px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td.left, th.left { text-align: left; } code, pre { font-family: "DejaVu Sans Mono", Menlo, monospace; font-size: 12px; }
pre { background: #f8f8f8; padding: 8px; overflow-x: auto; } details { margin: 8px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 130px; }
.card .value { font-size: 20px; font-weight: bold; } .card .label { font-size: 12px; color: #666; }
</style>)";

// ---- Sections --------------------------------------------------------------------------------

std::string summary_section(const ReportInputs& inputs) {
  const RunHistory& history = *inputs.history;
  std::ostringstream out;
  out << "<div class=\"cards\">\n";
  const double last_step = history.step.empty() ? 0.0 : history.step.back();
  out << card(number(last_step, "%.0f") + " / " + std::to_string(history.total_steps), "steps logged / planned");
  const std::vector<double> smooth = exponential_moving_average(history.loss, 0.9);
  if (!smooth.empty()) out << card(number(smooth.back()), "final loss (moving average)");
  if (!history.val_loss.empty()) {
    const size_t best =
        size_t(std::min_element(history.val_loss.begin(), history.val_loss.end()) - history.val_loss.begin());
    out << card(number(history.val_loss[best]),
                "best validation loss (step " + number(history.val_step[best], "%.0f") + ")");
    out << card(number(history.val_loss.back()), "last validation loss");
  }
  out << card(number(median_of(history.tokens_per_s), "%.4g"), "median tokens/s");
  out << card(number(1e3 * median_of(history.step_time_s), "%.4g") + " ms", "median step time");
  if (any_finite(history.mfu))
    out << card(number(100.0 * median_of(history.mfu), "%.1f") + "%", "median MFU (989 TFLOP/s)");
  const int64_t skipped = std::count(history.skipped.begin(), history.skipped.end(), true);
  if (skipped > 0) out << card(std::to_string(skipped), "skipped steps (inf/NaN gradients)");
  out << "</div>\n";
  for (const std::string& note : history.notes) out << "<p class=\"note\">Note: " << escape(note) << "</p>\n";
  if (!history.warnings.empty()) {
    // The trainer's console warnings (docs/TRAINING.md, "Warnings"), as they were printed.
    constexpr size_t kShown = 20;
    out << "<div class=\"warnings\"><strong>" << escape(count_noun(int64_t(history.warnings.size()), "warning"))
        << " during training</strong>\n<ul>\n";
    for (size_t index = 0; index < history.warnings.size() && index < kShown; ++index)
      out << "<li>step " << history.warnings[index].step << ": " << escape(history.warnings[index].message)
          << "</li>\n";
    if (history.warnings.size() > kShown)
      out << "<li>... and " << history.warnings.size() - kShown << " more in the metrics file</li>\n";
    out << "</ul></div>\n";
  }
  return out.str();
}

// "token choice, sigmoid scores x 2.5, top-4 of 8 groups, capacity factor 1.25 (probability drops),
// aux weight 0, seq aux weight 0.0001, bias rate 0.001, z weight 0.001, jitter 0": the options that
// are not Switch's defaults, and the weights always.
std::string routing_summary(const MoeConfig& moe) {
  const int topk_groups = moe.topk_groups > 0 ? moe.topk_groups : moe.num_groups;
  std::string text = std::string(moe.routing == RoutingMethod::expert_choice ? "expert choice" : "token choice") +
                     ", " + score_function_name(moe.score_function) + " scores";
  if (moe.routed_scaling_factor != 1.0) text += " x " + number(moe.routed_scaling_factor, "%.3g");
  if (moe.num_groups > 1)
    text += ", top-" + std::to_string(topk_groups) + " of " + count_noun(moe.num_groups, "group");
  text += moe.dropless ? std::string(", dropless") : ", capacity factor " + number(moe.capacity_factor, "%.3g");
  if (!moe.dropless && moe.drop_policy == DropPolicy::probability) text += " (probability drops)";
  text += ", aux weight " + number(moe.aux_loss_weight, "%.3g");
  if (moe.seq_aux_loss_weight > 0) text += ", seq aux weight " + number(moe.seq_aux_loss_weight, "%.3g");
  if (moe.global_aux_loss_weight > 0) text += ", global aux weight " + number(moe.global_aux_loss_weight, "%.3g");
  if (moe.bias_update_rate > 0) text += ", bias rate " + number(moe.bias_update_rate, "%.3g");
  return text + ", z weight " + number(moe.z_loss_weight, "%.3g") + ", jitter " + number(moe.jitter_eps, "%.3g");
}

std::string config_section(const Config& config) {
  const FlopsEstimate flops = estimate_flops(config.model, config.moe);
  const ModelConfig& model = config.model;
  const MoeConfig& moe = config.moe;
  std::vector<std::pair<std::string, std::string>> rows = {
      {"parameters (total / active per token)",
       number(flops.total_params / 1e6, "%.4g") + "M / " + number(flops.active_params / 1e6, "%.4g") + "M"},
      {"model", "d_model " + std::to_string(model.d_model) + ", " + count_noun(model.n_layers, "block") + ", " +
                    count_noun(model.n_heads, "head") + ", seq_len " + std::to_string(model.seq_len) +
                    ", vocabulary " + std::to_string(model.vocab_size)},
      {"MoE", count_noun(model.moe_block_count(), "MoE layer") + " (" +
                  (model.moe_every == 1 ? std::string("every block") : "every " + count_noun(model.moe_every, "block")) +
                  (model.dense_first_blocks > 0
                       ? ", first " + count_noun(model.dense_first_blocks, "block") + " dense"
                       : std::string()) +
                  "), " + count_noun(moe.num_experts, "expert") + ", top-" + std::to_string(moe.top_k) +
                  ", expert d_ff " + std::to_string(moe.expert_d_ff) + ", " + expert_activation_name(moe.activation) +
                  (moe.num_shared_experts > 0 ? ", " + count_noun(moe.num_shared_experts, "shared expert") +
                                                    " of d_ff " + std::to_string(moe.shared_expert_d_ff)
                                              : std::string())},
      {"routing", routing_summary(moe)},
      {"training", count_noun(config.training.steps, "step") + ", micro-batch " +
                       std::to_string(config.training.micro_batch_size) + " x " +
                       count_noun(config.optimizer.grad_accum_steps, "accumulation step") + ", lr " +
                       number(config.optimizer.lr, "%.3g") + ", compute " + compute_dtype_name(model.compute_dtype)},
      {"parallel", "ep_size " + std::to_string(config.parallel.ep_size)},
      {"data", config.data.path + (config.data.val_path.empty() ? "" : " (validation: " + config.data.val_path + ")")}};
  std::ostringstream out;
  out << "<table>\n";
  for (const auto& row : rows)
    out << "<tr><th class=\"left\">" << escape(row.first) << "</th><td class=\"left\">" << escape(row.second)
        << "</td></tr>\n";
  out << "</table>\n";
  return out.str();
}

std::string curves_section(const RunHistory& history) {
  std::ostringstream out;
  out << "<div class=\"figures\">\n";
  PlotSeries raw = series("loss", history.step, history.loss, "#9ecae1");
  raw.width = 1.0;
  std::vector<PlotSeries> loss_lines = {
      raw, series("loss (moving average)", history.step, exponential_moving_average(history.loss, 0.9), "#1f77b4")};
  if (!history.val_loss.empty()) {
    PlotSeries validation = series("validation loss", history.val_step, history.val_loss, "#d62728");
    validation.markers = true;
    loss_lines.push_back(validation);
  }
  out << line_chart("Loss", "cross-entropy (nats)", loss_lines, 960, 320);
  out << line_chart("Learning rate", "lr", {series("lr", history.step, history.lr)}, 560, 250, true);
  out << line_chart("Gradient norm (before clipping)", "norm", {series("grad norm", history.step, history.grad_norm)},
                    560, 250, true);
  std::vector<PlotSeries> router_losses = {series("aux (load balance)", history.step, history.aux_loss, "#ff7f0e"),
                                           series("z (logit size)", history.step, history.z_loss, "#9467bd")};
  for (const PlotSeries& line : balance_loss_series(history)) router_losses.push_back(line);
  out << line_chart("Router losses (weighted, summed over MoE layers)", "loss", router_losses, 560, 250, true);
  std::vector<double> dropped_percent;
  for (double value : history.dropped_fraction) dropped_percent.push_back(100.0 * value);
  out << line_chart("Dropped choices (capacity overflow)", "% of routed choices",
                    {series("dropped", history.step, dropped_percent, "#8c564b")}, 560, 250, true, 100.0);
  out << line_chart("Throughput", "tokens / s", {series("tokens/s", history.step, history.tokens_per_s, "#2ca02c")},
                    560, 250, true);
  if (history_has_replication(history)) {  // parallel.max_replicas_per_rank > 0
    out << line_chart("Hot-expert replication: the busiest EP rank", "rows (summed over MoE layers)",
                      {series("without replicas", history.step, history.ep_max_load_before, "#d62728"),
                       series("with replicas", history.step, history.ep_max_load_after, "#2ca02c"),
                       series("rows computed by replicas", history.step, history.replicated_rows, "#7f7f7f")},
                      560, 250, true);
    out << line_chart("Hot-expert replicas", "replicas (summed over MoE layers)",
                      {series("replicas", history.step, history.replicated_experts, "#9467bd")}, 560, 250, true);
  }
  out << "</div>\n";
  return out.str();
}

std::string load_section(const RunHistory& history) {
  std::ostringstream out;
  if (history.load.empty()) {
    out << "<p class=\"note\">The metrics carry no per-expert token counts.</p>\n";
    return out.str();
  }
  out << "<p class=\"note\">Each column covers a range of steps; each cell is the expert's share of that range's "
         "routed choices relative to an even split (1x: balanced; red: overloaded; blue: underused; grey: no steps). "
         "Hover a cell for its numbers.</p>\n";
  const size_t bins = history.bin_first_step.size();
  std::vector<std::string> column_labels;
  for (size_t bin = 0; bin < bins; ++bin)
    column_labels.push_back(history.bin_first_step[bin] ? std::to_string(history.bin_first_step[bin]) : "");
  std::vector<PlotSeries> imbalance_lines;
  for (int layer = 0; layer < history.load_layers; ++layer) {
    const int experts = history.load_experts;
    std::vector<std::vector<double>> values(static_cast<size_t>(experts), std::vector<double>(bins, kNaN));
    std::vector<std::vector<std::string>> titles(static_cast<size_t>(experts), std::vector<std::string>(bins));
    std::vector<double> imbalance_x, imbalance_y;
    for (size_t bin = 0; bin < bins; ++bin) {
      const std::vector<double>& counts = history.load[size_t(layer)][bin];
      double total = 0.0, largest = 0.0;
      for (double count : counts) {
        total += count;
        largest = std::max(largest, count);
      }
      if (history.bin_first_step[bin] == 0 || total <= 0.0) continue;
      const double even = total / double(experts);
      imbalance_x.push_back(0.5 * double(history.bin_first_step[bin] + history.bin_last_step[bin]));
      imbalance_y.push_back(largest / even);
      for (int expert = 0; expert < experts; ++expert) {
        const double ratio = counts[size_t(expert)] / even;
        values[size_t(expert)][bin] = ratio;
        titles[size_t(expert)][bin] =
            "expert " + std::to_string(expert) + ", steps " + std::to_string(history.bin_first_step[bin]) + "-" +
            std::to_string(history.bin_last_step[bin]) + ": " + number(ratio, "%.2f") + "x even (" +
            number(100.0 * counts[size_t(expert)] / total, "%.1f") + "% of " + number(total, "%.0f") + " choices)";
      }
    }
    std::vector<std::string> row_labels;
    for (int expert = 0; expert < experts; ++expert) row_labels.push_back("expert " + std::to_string(expert));
    HeatmapOptions options;
    options.title = "MoE layer " + std::to_string(layer) + ": expert load over training";
    options.x_label = "first step of each column";
    options.row_labels = row_labels;
    options.column_labels = column_labels;
    options.scale = HeatmapScale::diverging_ratio;
    options.ratio_limit = 4.0;
    options.colorbar_label = "load / even share";
    options.cell_titles = titles;
    options.max_width = 760;  // with labels and colour bar about 900 px: unscaled in most windows
    out << figure(svg_heatmap(values, options));
    imbalance_lines.push_back(series("layer " + std::to_string(layer), imbalance_x, imbalance_y));
  }
  out << "<div class=\"figures\">\n"
      << line_chart("Load max/mean per step range (from the per-step counts)", "max / mean", imbalance_lines, 560, 260,
                    true);
  out << "</div>\n";
  return out.str();
}

std::string router_section(const RunHistory& history) {
  std::ostringstream out;
  if (history.router.empty()) {
    out << "<p class=\"note\">The metrics carry no router statistics (they are written every training.log_every "
           "steps by runs that record them; see docs/ANALYTICS.md).</p>\n";
    return out.str();
  }
  size_t layers = 0;
  for (const RouterRecord& record : history.router) layers = std::max(layers, record.layers.size());
  struct Metric {
    const char* title;
    const char* axis;
    double RouterLayerStats::*field;
    double scale, ceiling;  // ceiling: the largest possible value (NaN: unbounded)
  };
  const Metric metrics[] = {
      {"Router entropy (normalized by ln E)", "entropy / ln E", &RouterLayerStats::router_entropy_normalized, 1.0, 1.0},
      {"Mean gate of kept choices", "gate", &RouterLayerStats::mean_gate, 1.0, 1.0},
      {"Load max/mean per logged window", "max / mean", &RouterLayerStats::load_imbalance, 1.0, kNaN},
      {"Experts used", "% of experts", &RouterLayerStats::experts_used_fraction, 100.0, 100.0}};
  out << "<div class=\"figures\">\n";
  for (const Metric& metric : metrics) {
    std::vector<PlotSeries> lines;
    for (size_t layer = 0; layer < layers; ++layer) {
      std::vector<double> x, y;
      for (const RouterRecord& record : history.router) {
        if (layer >= record.layers.size() || record.layers[layer].forwards == 0) continue;
        x.push_back(double(record.step));
        y.push_back(metric.scale * (record.layers[layer].*metric.field));
      }
      PlotSeries line = series("layer " + std::to_string(layer), x, y);
      line.markers = x.size() <= 60;
      lines.push_back(line);
    }
    out << line_chart(metric.title, metric.axis, lines, 560, 250, true, metric.ceiling);
  }
  out << "</div>\n";
  const RouterRecord& last = history.router.back();
  // The balance losses of the modern options get a column where the metrics carry them.
  const bool seq = history_has_seq_aux_loss(history), global = history_has_global_aux_loss(history);
  out << "<h3>Latest window (ending at step " << last.step << ")</h3>\n<table>\n<tr><th>layer</th><th>forwards</th>"
      << "<th>tokens</th><th>load max/mean</th><th>experts used</th><th>dropped</th><th>mean gate</th>"
      << "<th>entropy (nats)</th><th>entropy / ln E</th><th>aux loss</th><th>z loss</th>"
      << (seq ? "<th>seq aux loss</th>" : "") << (global ? "<th>global aux loss</th>" : "") << "</tr>\n";
  for (size_t index = 0; index < last.layers.size(); ++index) {
    const RouterLayerStats& layer = last.layers[index];
    const RouterLayerBalance balance = index < last.balance.size() ? last.balance[index] : RouterLayerBalance();
    out << "<tr><td>" << layer.moe_layer << "</td><td>" << layer.forwards << "</td><td>" << layer.tokens << "</td><td>"
        << number(layer.load_imbalance, "%.3f") << "</td><td>" << number(100.0 * layer.experts_used_fraction, "%.1f")
        << "%</td><td>" << number(100.0 * layer.dropped_fraction, "%.2f") << "%</td><td>"
        << number(layer.mean_gate, "%.3f") << "</td><td>" << number(layer.router_entropy, "%.3f") << "</td><td>"
        << number(layer.router_entropy_normalized, "%.3f") << "</td><td>" << number(layer.aux_loss, "%.4g")
        << "</td><td>" << number(layer.z_loss, "%.4g") << "</td>"
        << (seq ? "<td>" + number(balance.seq_aux_loss, "%.4g") + "</td>" : "")
        << (global ? "<td>" + number(balance.global_aux_loss, "%.4g") + "</td>" : "") << "</tr>\n";
  }
  out << "</table>\n";
  return out.str();
}

// One lift heatmap: experts x the categories of one view.
std::string lift_heatmap(const SpecializationMap& map, const LayerSpecialization& layer, const std::string& title,
                         const std::vector<std::string>& categories, const std::vector<int64_t> InputProfile::*view,
                         const std::string& x_label) {
  const InputProfile& text = map.text();
  const std::vector<int64_t>& baseline = text.*view;
  int64_t routed = 0;
  for (const InputProfile& expert : layer.experts) routed += expert.count;
  std::vector<std::vector<double>> values;
  std::vector<std::vector<std::string>> titles;
  std::vector<std::string> row_labels;
  for (size_t expert = 0; expert < layer.experts.size(); ++expert) {
    const InputProfile& profile = layer.experts[expert];
    const std::vector<int64_t>& counts = profile.*view;
    std::vector<double> row(categories.size(), kNaN);
    std::vector<std::string> row_titles(categories.size());
    for (size_t category = 0; category < categories.size(); ++category) {
      if (profile.count <= 0 || baseline[category] <= 0 || text.count <= 0) {
        row_titles[category] = "expert " + std::to_string(expert) + ", " + categories[category] + ": no lift (" +
                               (profile.count <= 0 ? "the expert received no tokens)"
                                                   : "the text has no " + categories[category] + " tokens)");
        continue;
      }
      const double share = double(counts[category]) / double(profile.count);
      const double text_share = double(baseline[category]) / double(text.count);
      row[category] = share / text_share;
      row_titles[category] = "expert " + std::to_string(expert) + ", " + categories[category] + ": " +
                             number(row[category], "%.2f") + "x (" + number(100.0 * share, "%.1f") +
                             "% of its tokens, " + number(100.0 * text_share, "%.1f") + "% of the text)";
    }
    values.push_back(row);
    titles.push_back(row_titles);
    row_labels.push_back("expert " + std::to_string(expert) + " (" +
                         number(routed > 0 ? 100.0 * double(profile.count) / double(routed) : 0.0, "%.0f") + "%)");
  }
  HeatmapOptions options;
  options.title = title;
  options.x_label = x_label;
  options.row_labels = row_labels;
  options.column_labels = categories;
  options.scale = HeatmapScale::diverging_ratio;
  options.ratio_limit = 4.0;
  options.colorbar_label = "lift vs the text";
  options.value_format = "%.2f";
  options.annotate = true;
  options.cell_titles = titles;
  options.max_width = 360;  // two of these side by side on a page
  return figure(svg_heatmap(values, options));
}

std::string specialization_section(const ReportInputs& inputs) {
  std::ostringstream out;
  if (inputs.specialization == nullptr) {
    out << "<p class=\"note\">Not computed: " << escape(inputs.specialization_missing_reason) << "</p>\n";
    return out.str();
  }
  const SpecializationMap& map = *inputs.specialization;
  out << "<p class=\"note\">Which inputs each expert receives, from " << escape(inputs.specialization_source)
      << " run through the final weights (dropless routing, every choice of a token counted). A cell is the lift: the "
         "share of the expert's tokens in that category divided by the category's share of the text (1x: no "
         "preference; red: the expert gets more of it; blue: less). Row labels give each expert's share of the "
         "routed choices.</p>\n";
  out << "<p class=\"note\">Byte classes: lower and upper (ASCII letters), digit, space (space and tab), newline, "
         "punct (ASCII punctuation), other (control bytes and bytes 128-255: the pieces of non-ASCII UTF-8 "
         "characters such as accented letters or curly quotes); start: the token opens the window. A grey cell has "
         "no lift: the text has no token of that kind to compare with, or the expert received no tokens.";
  std::string absent;
  for (int byte_class = 0; byte_class < kNumByteClasses; ++byte_class)
    if (map.text().by_class[size_t(byte_class)] == 0)
      absent += std::string(absent.empty() ? "" : ", ") + byte_class_name(byte_class);
  if (!absent.empty()) out << " This text has no " << escape(absent) << " bytes, hence the grey columns.";
  out << "</p>\n";
  std::vector<std::string> classes, previous, positions;
  for (int byte_class = 0; byte_class < kNumByteClasses; ++byte_class) classes.push_back(byte_class_name(byte_class));
  for (int byte_class = 0; byte_class < kNumPreviousClasses; ++byte_class)
    previous.push_back(byte_class_name(byte_class));
  for (int bucket = 0; bucket < map.position_buckets(); ++bucket) {
    const int64_t first = bucket * map.window() / map.position_buckets();
    const int64_t last = (bucket + 1) * map.window() / map.position_buckets() - 1;
    positions.push_back(std::to_string(first) + "-" + std::to_string(last));
  }
  for (const LayerSpecialization& layer : map.layers()) {
    out << "<h3>MoE layer " << layer.moe_layer
        << (layer.block >= 0 ? " (block " + std::to_string(layer.block) + ")" : "")
        << "</h3>\n<div class=\"figures\">\n";
    out << lift_heatmap(map, layer, "By byte class", classes, &InputProfile::by_class, "class of the token");
    out << lift_heatmap(map, layer, "By preceding byte", previous, &InputProfile::by_previous,
                        "class of the byte before it");
    out << lift_heatmap(map, layer, "By position in the window", positions, &InputProfile::by_position,
                        "position (token index in the sequence)");
    out << "</div>\n<table>\n<tr><th>expert</th><th>share</th><th class=\"left\">most frequent bytes</th>"
           "<th>mean position</th></tr>\n";
    int64_t routed = 0;
    for (const InputProfile& expert : layer.experts) routed += expert.count;
    for (size_t expert = 0; expert < layer.experts.size(); ++expert) {
      const InputProfile& profile = layer.experts[expert];
      std::string bytes;
      for (int byte : profile.top_bytes(8)) {
        const double share = profile.count ? 100.0 * double(profile.by_byte[size_t(byte)]) / double(profile.count) : 0;
        bytes += byte_label(byte) + " " + number(share, "%.0f") + "%  ";
      }
      out << "<tr><td>" << expert << "</td><td>"
          << number(routed > 0 ? 100.0 * double(profile.count) / double(routed) : 0.0, "%.1f")
          << "%</td><td class=\"left\"><code>" << escape(bytes) << "</code></td><td>"
          << number(profile.mean_position(), "%.1f") << "</td></tr>\n";
    }
    out << "</table>\n";
  }
  out << "<details><summary>The same as a text table</summary>\n<pre>" << escape(map.table()) << "</pre></details>\n";
  return out.str();
}

}  // namespace

std::string count_noun(int64_t count, const std::string& singular, const std::string& plural) {
  return std::to_string(count) + " " + (count == 1 ? singular : plural.empty() ? singular + "s" : plural);
}

std::string build_report_html(const ReportInputs& inputs) {
  SY_CHECK(inputs.history != nullptr, "build_report_html: no run history");
  std::ostringstream out;
  out << "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>" << escape(inputs.title)
      << " - switchyard report</title>\n"
      << kStyle << "\n</head>\n<body>\n";
  out << "<h1>" << escape(inputs.title) << "</h1>\n<p class=\"subtitle\">switchyard training report for <code>"
      << escape(inputs.run_dir) << "</code> (metrics: <code>" << escape(inputs.history->path) << "</code>)</p>\n";
  out << summary_section(inputs);
  if (inputs.config != nullptr) out << "<h2>Run</h2>\n" << config_section(*inputs.config);
  out << "<h2>Training curves</h2>\n" << curves_section(*inputs.history);
  out << "<h2>Expert load</h2>\n" << load_section(*inputs.history);
  if (history_has_router_bias(*inputs.history))
    out << "<h2>Router bias (aux-loss-free balancing)</h2>\n" << router_bias_section(*inputs.history);
  out << "<h2>Router statistics</h2>\n" << router_section(*inputs.history);
  out << "<h2>Expert specialization</h2>\n" << specialization_section(inputs);
  out << "<h2>Step time breakdown</h2>\n";
  if (inputs.step_profile.empty())
    out << "<p class=\"note\">" << escape(inputs.step_profile_missing_reason) << "</p>\n";
  else
    out << "<p class=\"note\">Device time per optimizer step by part and by stage, from <code>profile.json</code> "
           "(docs/TRAINING.md, \"Step time breakdown\").</p>\n<pre>"
        << escape(inputs.step_profile) << "</pre>\n";
  out << "<p class=\"note\">Written by <code>switchyard report</code>; docs/ANALYTICS.md explains every number.</p>\n"
      << "</body>\n</html>\n";
  return out.str();
}

}  // namespace switchyard
