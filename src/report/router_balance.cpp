// The router bias and balance-loss views of the report (src/report/router_balance.h).
#include "src/report/router_balance.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "src/report/report_html.h"

namespace switchyard {
namespace {

using namespace report_html;

const RouterLayerBalance* balance_of(const RouterRecord& record, size_t layer) {
  return layer < record.balance.size() ? &record.balance[layer] : nullptr;
}

// The latest router record in which some layer has a bias vector (nullptr: none has one).
const RouterRecord* last_bias_record(const RunHistory& history) {
  for (auto record = history.router.rbegin(); record != history.router.rend(); ++record)
    for (const RouterLayerBalance& balance : record->balance)
      if (!balance.bias.empty()) return &*record;
  return nullptr;
}

std::string bias_over_training(const RunHistory& history, size_t layers) {
  struct Metric {
    const char* title;
    const char* axis;
    double RouterLayerBalance::*field;
  };
  const Metric metrics[] = {{"Router bias: largest entry", "max_e b_e", &RouterLayerBalance::bias_max},
                            {"Router bias: smallest entry", "min_e b_e", &RouterLayerBalance::bias_min},
                            {"Router bias: spread over the experts", "std_e b_e", &RouterLayerBalance::bias_std}};
  std::ostringstream out;
  out << "<div class=\"figures\">\n";
  for (const Metric& metric : metrics) {
    std::vector<PlotSeries> lines;
    for (size_t layer = 0; layer < layers; ++layer) {
      std::vector<double> x, y;
      for (const RouterRecord& record : history.router) {
        const RouterLayerBalance* balance = balance_of(record, layer);
        if (balance == nullptr || !balance->has_bias()) continue;
        x.push_back(double(record.step));
        y.push_back(balance->*metric.field);
      }
      if (x.empty()) continue;
      PlotSeries line = series("layer " + std::to_string(layer), x, y, palette_color(layer));
      line.markers = x.size() <= 60;
      lines.push_back(line);
    }
    out << line_chart(metric.title, metric.axis, lines, 560, 250, metric.field == &RouterLayerBalance::bias_std);
  }
  out << "</div>\n";
  return out.str();
}

// Rows: the layers of `record` with a bias vector; columns: experts. Bias (signed) and the load
// of the record's window relative to an even split, side by side.
std::string bias_at_last_step(const RouterRecord& record) {
  std::vector<std::vector<double>> bias_rows, load_rows;
  std::vector<std::vector<std::string>> bias_titles, load_titles;
  std::vector<std::string> row_labels;
  size_t experts = 0;
  for (const RouterLayerBalance& balance : record.balance) experts = std::max(experts, balance.bias.size());
  for (size_t layer = 0; layer < record.balance.size(); ++layer) {
    const std::vector<double>& bias = record.balance[layer].bias;
    if (bias.empty()) continue;
    const std::vector<int64_t> counts =
        layer < record.layers.size() ? record.layers[layer].tokens_per_expert : std::vector<int64_t>();
    double total = 0.0;
    for (int64_t count : counts) total += double(count);
    const double even = counts.empty() ? 0.0 : total / double(counts.size());
    std::vector<double> bias_row(experts, kNaN), load_row(experts, kNaN);
    std::vector<std::string> bias_title(experts), load_title(experts);
    for (size_t expert = 0; expert < experts; ++expert) {
      const std::string name = "layer " + std::to_string(layer) + ", expert " + std::to_string(expert);
      const bool has_load = expert < counts.size() && even > 0.0;
      if (has_load) {
        load_row[expert] = double(counts[expert]) / even;
        load_title[expert] = name + ": " + number(load_row[expert], "%.2f") + "x even (" +
                             std::to_string(counts[expert]) + " of " + number(total, "%.0f") + " choices)";
      }
      if (expert < bias.size()) {
        bias_row[expert] = bias[expert];
        bias_title[expert] = name + ": bias " + number(bias[expert], "%.4g") +
                             (has_load ? ", load " + number(load_row[expert], "%.2f") + "x even" : "");
      }
    }
    bias_rows.push_back(bias_row);
    load_rows.push_back(load_row);
    bias_titles.push_back(bias_title);
    load_titles.push_back(load_title);
    row_labels.push_back("layer " + std::to_string(layer));
  }
  std::vector<std::string> column_labels;
  for (size_t expert = 0; expert < experts; ++expert) column_labels.push_back(std::to_string(expert));
  HeatmapOptions options;
  options.x_label = "expert";
  options.row_labels = row_labels;
  options.column_labels = column_labels;
  options.max_width = 520;  // two side by side on a wide page
  options.cell_height = 22;
  options.value_format = "%.3g";
  HeatmapOptions bias_options = options, load_options = options;
  bias_options.title = "Router bias at step " + std::to_string(record.step);
  bias_options.scale = HeatmapScale::diverging_signed;
  bias_options.colorbar_label = "bias (selection key offset)";
  bias_options.cell_titles = bias_titles;
  load_options.title = "Expert load, window ending at step " + std::to_string(record.step);
  load_options.scale = HeatmapScale::diverging_ratio;
  load_options.ratio_limit = 4.0;
  load_options.colorbar_label = "load / even share";
  load_options.cell_titles = load_titles;
  return "<div class=\"figures\">\n" + figure(svg_heatmap(bias_rows, bias_options)) +
         figure(svg_heatmap(load_rows, load_options)) + "</div>\n";
}

std::string bias_table(const RouterRecord& record) {
  std::ostringstream out;
  out << "<table>\n<tr><th>layer</th><th>bias min</th><th>bias max</th><th>bias std</th>"
      << "<th>highest bias (expert)</th><th>lowest bias (expert)</th><th>load max/mean (window)</th></tr>\n";
  for (size_t layer = 0; layer < record.balance.size(); ++layer) {
    const RouterLayerBalance& balance = record.balance[layer];
    if (!balance.has_bias()) continue;
    std::string highest = "-", lowest = "-";
    if (!balance.bias.empty()) {
      const size_t high = size_t(std::max_element(balance.bias.begin(), balance.bias.end()) - balance.bias.begin());
      const size_t low = size_t(std::min_element(balance.bias.begin(), balance.bias.end()) - balance.bias.begin());
      highest = std::to_string(high);
      lowest = std::to_string(low);
    }
    const double imbalance = layer < record.layers.size() ? record.layers[layer].load_imbalance : kNaN;
    out << "<tr><td>" << layer << "</td><td>" << number(balance.bias_min) << "</td><td>" << number(balance.bias_max)
        << "</td><td>" << number(balance.bias_std) << "</td><td>" << highest << "</td><td>" << lowest << "</td><td>"
        << number(imbalance, "%.3f") << "</td></tr>\n";
  }
  out << "</table>\n";
  return out.str();
}

}  // namespace

std::string router_bias_section(const RunHistory& history) {
  std::ostringstream out;
  if (!history_has_router_bias(history)) {
    out << "<p class=\"note\">The metrics carry no router bias (it exists with moe.bias_update_rate &gt; 0).</p>\n";
    return out.str();
  }
  out << "<p class=\"note\">Aux-loss-free balancing (DeepSeek-V3): each MoE layer's router bias b (one entry per "
         "expert) is added to the key that selects the experts, never to the gates or losses. After every optimizer "
         "step each entry moves by moe.bias_update_rate toward balance: down for an expert that got more than the "
         "mean load over all ranks and micro-batches, up for one that got less. So blue (negative) marks experts "
         "the router favours by itself and the bias holds back; a spread that keeps growing means the bias is "
         "still chasing an imbalance.</p>\n";
  size_t layers = 0;
  for (const RouterRecord& record : history.router) layers = std::max(layers, record.balance.size());
  out << bias_over_training(history, layers);
  if (const RouterRecord* last = last_bias_record(history)) {
    out << "<h3>Per expert at step " << last->step << "</h3>\n" << bias_at_last_step(*last) << bias_table(*last);
  } else {
    // Only the summary numbers were logged: the table of the last record that has them.
    for (auto record = history.router.rbegin(); record != history.router.rend(); ++record)
      if (std::any_of(record->balance.begin(), record->balance.end(),
                      [](const RouterLayerBalance& balance) { return balance.has_bias(); })) {
        out << "<h3>At step " << record->step << "</h3>\n" << bias_table(*record);
        break;
      }
  }
  return out.str();
}

std::vector<PlotSeries> balance_loss_series(const RunHistory& history) {
  std::vector<PlotSeries> lines;
  if (history_has_seq_aux_loss(history))
    lines.push_back(series("sequence-level (balance)", history.step, history.seq_aux_loss, "#2ca02c"));
  if (history_has_global_aux_loss(history))
    lines.push_back(series("global-batch (balance)", history.step, history.global_aux_loss, "#17becf"));
  return lines;
}

}  // namespace switchyard
