// Reading a run's metrics file back (src/report/run_history.h).
#include "src/report/run_history.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>

#include "src/core/error.h"
#include "src/core/json.h"

namespace switchyard {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The integer after "key": in a metrics line, without parsing the whole line (-1 when absent).
int64_t quick_integer(const std::string& line, const char* key) {
  const std::string pattern = std::string("\"") + key + "\":";
  const size_t at = line.find(pattern);
  if (at == std::string::npos) return -1;
  return std::strtoll(line.c_str() + at + pattern.size(), nullptr, 10);
}

RouterLayerStats parse_router_layer(const json::Value& value) {
  RouterLayerStats stats;
  stats.moe_layer = int(value.number_or("layer", 0));
  stats.forwards = int64_t(value.number_or("forwards", 0));
  stats.tokens = int64_t(value.number_or("tokens", 0));
  stats.load_imbalance = value.number_or("load_imbalance", kNaN);
  stats.experts_used_fraction = value.number_or("experts_used", kNaN);
  stats.dropped_fraction = value.number_or("dropped_fraction", kNaN);
  stats.mean_gate = value.number_or("mean_gate", kNaN);
  stats.router_entropy = value.number_or("entropy", kNaN);
  stats.router_entropy_normalized = value.number_or("entropy_normalized", kNaN);
  stats.aux_loss = value.number_or("aux_loss", kNaN);
  stats.z_loss = value.number_or("z_loss", kNaN);
  if (const json::Value* counts = value.find("tokens_per_expert"))
    for (const json::Value& count : counts->elements()) stats.tokens_per_expert.push_back(int64_t(count.number_or(0)));
  return stats;
}

RouterLayerBalance parse_router_balance(const json::Value& value) {
  RouterLayerBalance balance;
  balance.seq_aux_loss = value.number_or("seq_aux_loss", kNaN);
  balance.global_aux_loss = value.number_or("global_aux_loss", kNaN);
  if (const json::Value* bias = value.find("bias"); bias != nullptr && bias->is_array())
    for (const json::Value& entry : bias->elements()) balance.bias.push_back(entry.number_or(kNaN));
  balance.bias_min = value.number_or("bias_min", kNaN);
  balance.bias_max = value.number_or("bias_max", kNaN);
  balance.bias_std = value.number_or("bias_std", kNaN);
  if (!balance.bias.empty() && !(std::isfinite(balance.bias_min) && std::isfinite(balance.bias_max) &&
                                  std::isfinite(balance.bias_std))) {
    double low = balance.bias[0], high = balance.bias[0], sum = 0.0, squares = 0.0;
    for (double entry : balance.bias) {
      low = std::min(low, entry);
      high = std::max(high, entry);
      sum += entry;
    }
    const double mean = sum / double(balance.bias.size());
    for (double entry : balance.bias) squares += (entry - mean) * (entry - mean);
    if (!std::isfinite(balance.bias_min)) balance.bias_min = low;
    if (!std::isfinite(balance.bias_max)) balance.bias_max = high;
    if (!std::isfinite(balance.bias_std)) balance.bias_std = std::sqrt(squares / double(balance.bias.size()));
  }
  return balance;
}

bool any_router_layer(const RunHistory& history, bool (*test)(const RouterLayerBalance&)) {
  for (const RouterRecord& record : history.router)
    for (const RouterLayerBalance& balance : record.balance)
      if (test(balance)) return true;
  return false;
}

bool nonzero(double value) { return std::isfinite(value) && value != 0.0; }

bool any_nonzero(const std::vector<double>& values) { return std::any_of(values.begin(), values.end(), nonzero); }

}  // namespace

bool history_has_router_bias(const RunHistory& history) {
  return any_router_layer(history, [](const RouterLayerBalance& balance) { return balance.has_bias(); });
}

bool history_has_seq_aux_loss(const RunHistory& history) {
  return any_nonzero(history.seq_aux_loss) ||
         any_router_layer(history, [](const RouterLayerBalance& b) { return nonzero(b.seq_aux_loss); });
}

bool history_has_replication(const RunHistory& history) {
  return std::any_of(history.ep_max_load_before.begin(), history.ep_max_load_before.end(),
                     [](double value) { return !std::isnan(value); });
}

bool history_has_global_aux_loss(const RunHistory& history) {
  return any_nonzero(history.global_aux_loss) ||
         any_router_layer(history, [](const RouterLayerBalance& b) { return nonzero(b.global_aux_loss); });
}

std::vector<double> exponential_moving_average(const std::vector<double>& values, double smoothing) {
  std::vector<double> out(values.size(), kNaN);
  double average = 0.0, weight = 0.0, last = kNaN;
  for (size_t index = 0; index < values.size(); ++index) {
    if (std::isfinite(values[index])) {
      average = smoothing * average + (1.0 - smoothing) * values[index];
      weight = smoothing * weight + (1.0 - smoothing);
      last = average / weight;
    }
    out[index] = last;
  }
  return out;
}

RunHistory read_run_history(const std::string& metrics_path, int load_bins) {
  SY_CHECK(load_bins >= 1, "read_run_history: load_bins = ", load_bins);
  RunHistory history;
  history.path = metrics_path;
  std::ifstream file(metrics_path);
  if (!file) SY_BAD_INPUT("cannot read the metrics file '", metrics_path, "': ", std::strerror(errno));

  // Pass 1: the step range, so the load bins are fixed before the counts arrive.
  std::string line;
  int64_t max_step = 0, lines = 0;
  while (std::getline(file, line)) {
    if (line.empty()) continue;
    ++lines;
    max_step = std::max({max_step, quick_integer(line, "step"), quick_integer(line, "total_steps")});
  }
  SY_CHECK_INPUT(lines > 0, "the metrics file '", metrics_path, "' is empty: has the run logged a step yet?");
  const int64_t steps_per_bin = std::max<int64_t>(1, (max_step + load_bins - 1) / load_bins);
  const int64_t bins = std::max<int64_t>(1, (max_step + steps_per_bin - 1) / steps_per_bin);
  history.bin_first_step.assign(size_t(bins), 0);
  history.bin_last_step.assign(size_t(bins), 0);

  // Pass 2: everything.
  file.clear();
  file.seekg(0);
  int64_t line_number = 0, parsed = 0;
  while (std::getline(file, line)) {
    ++line_number;
    if (line.empty()) continue;
    json::Value record;
    try {
      record = json::parse(line, metrics_path, line_number);
    } catch (const Error&) {
      if (parsed + 1 == lines) {  // the last line: a run cut off mid-write
        history.notes.push_back("line " + std::to_string(line_number) + " of the metrics file is incomplete; skipped");
        break;
      }
      throw;
    }
    ++parsed;
    SY_CHECK_INPUT(record.is_object() && record.has_number("step"), metrics_path, ":", line_number,
                   ": a metrics line needs a \"step\"");
    const double step = record.number_or("step", kNaN);
    history.total_steps = int64_t(record.number_or("total_steps", double(history.total_steps)));
    history.step.push_back(step);
    history.loss.push_back(record.number_or("loss", kNaN));
    history.lr.push_back(record.number_or("lr", kNaN));
    history.grad_norm.push_back(record.number_or("grad_norm", kNaN));
    history.aux_loss.push_back(record.number_or("aux_loss", kNaN));
    history.z_loss.push_back(record.number_or("z_loss", kNaN));
    history.seq_aux_loss.push_back(record.number_or("seq_aux_loss", kNaN));
    history.global_aux_loss.push_back(record.number_or("global_aux_loss", kNaN));
    history.replicated_experts.push_back(record.number_or("replicated_experts", kNaN));
    history.replicated_rows.push_back(record.number_or("replicated_rows", kNaN));
    history.ep_max_load_before.push_back(record.number_or("ep_max_load_before", kNaN));
    history.ep_max_load_after.push_back(record.number_or("ep_max_load_after", kNaN));
    history.dropped_fraction.push_back(record.number_or("dropped_fraction", kNaN));
    history.tokens_per_s.push_back(record.number_or("tokens_per_s", kNaN));
    history.step_time_s.push_back(record.number_or("step_time_s", kNaN));
    history.mfu.push_back(record.number_or("mfu", kNaN));
    history.skipped.push_back(record.bool_or("skipped", false));
    if (record.has_number("val_loss")) {
      history.val_step.push_back(step);
      history.val_loss.push_back(record.number_or("val_loss", kNaN));
    }

    if (const json::Value* counts = record.find("tokens_per_expert"); counts != nullptr && counts->is_array()) {
      const auto& layers = counts->elements();
      if (history.load.empty() && !layers.empty()) {
        history.load_layers = int(layers.size());
        history.load_experts = int(layers[0].elements().size());
        history.load.assign(
            size_t(history.load_layers),
            std::vector<std::vector<double>>(size_t(bins), std::vector<double>(size_t(history.load_experts), 0.0)));
      }
      SY_CHECK_INPUT(int(layers.size()) == history.load_layers, metrics_path, ":", line_number, ": ", layers.size(),
                     " MoE layers in tokens_per_expert, earlier lines had ", history.load_layers);
      const int64_t integer_step = int64_t(step);
      const int64_t bin = std::clamp<int64_t>((integer_step - 1) / steps_per_bin, 0, bins - 1);
      for (size_t layer = 0; layer < layers.size(); ++layer) {
        const auto& experts = layers[layer].elements();
        SY_CHECK_INPUT(int(experts.size()) == history.load_experts, metrics_path, ":", line_number, ": layer ", layer,
                       " has ", experts.size(), " experts, earlier lines had ", history.load_experts);
        for (size_t expert = 0; expert < experts.size(); ++expert)
          history.load[layer][size_t(bin)][expert] += experts[expert].number_or(0);
      }
      if (history.bin_first_step[size_t(bin)] == 0 || integer_step < history.bin_first_step[size_t(bin)])
        history.bin_first_step[size_t(bin)] = integer_step;
      history.bin_last_step[size_t(bin)] = std::max(history.bin_last_step[size_t(bin)], integer_step);
    }
    if (const json::Value* router = record.find("router"); router != nullptr && router->is_array()) {
      RouterRecord entry;
      entry.step = int64_t(step);
      for (const json::Value& layer : router->elements()) {
        entry.layers.push_back(parse_router_layer(layer));
        entry.balance.push_back(parse_router_balance(layer));
      }
      history.router.push_back(std::move(entry));
    }
    if (const json::Value* warnings = record.find("warnings"); warnings != nullptr && warnings->is_array())
      for (const json::Value& warning : warnings->elements()) {
        const json::Value* kind = warning.find("kind");
        const json::Value* message = warning.find("message");
        if (message == nullptr || !message->is_string()) continue;
        history.warnings.push_back({int64_t(step), kind && kind->is_string() ? kind->as_string("kind") : "",
                                    message->as_string("message")});
      }
  }
  return history;
}

}  // namespace switchyard
