// Training metrics (src/train/metrics.h).
#include "src/train/metrics.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "src/core/error.h"
#include "src/core/json.h"

namespace switchyard {
namespace {

std::string fixed(double value, int digits) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "%.*f", digits, value);
  return buffer;
}

// 1234567 -> "1.23M"
std::string si(double value) {
  const char* suffixes[] = {"", "k", "M", "G", "T", "P"};
  int index = 0;
  while (std::fabs(value) >= 1000 && index < 5) {
    value /= 1000;
    ++index;
  }
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), index == 0 ? "%.0f%s" : "%.3g%s", value, suffixes[index]);
  return buffer;
}

}  // namespace

FlopsEstimate estimate_flops(const ModelConfig& model, const MoeConfig& moe) {
  const double d = model.d_model, v = model.vocab_size, s = model.seq_len, layers = model.n_layers;
  const double swiglu = moe.activation == ExpertActivation::swiglu ? 2.0 : 1.0;
  const double dense_ffn = d * swiglu * model.d_ff + model.d_ff * d;
  const double expert_ffn = d * swiglu * moe.expert_d_ff + moe.expert_d_ff * d;
  const double router = d * moe.num_experts;
  // Shared experts: always active, one dense FFN of width num_shared_experts * shared_expert_d_ff.
  const double shared_ffn = d * swiglu * moe.shared_ffn_width() + moe.shared_ffn_width() * d;
  const double norm = model.norm == NormKind::layernorm ? 2 * d : d;
  FlopsEstimate estimate;
  double active = v * d, total = v * d + (model.positions == PositionKind::learned ? s * d : 0) + norm;
  double active_all = total;
  for (int block = 0; block < model.n_layers; ++block) {
    const double attention = 4 * d * d;
    const double ffn_active = model.block_is_moe(block) ? router + moe.top_k * expert_ffn + shared_ffn : dense_ffn;
    const double ffn_total = model.block_is_moe(block) ? router + moe.num_experts * expert_ffn + shared_ffn : dense_ffn;
    active += attention + ffn_active;
    total += attention + ffn_total + 2 * norm;
    active_all += attention + ffn_active + 2 * norm;
  }
  estimate.active_matmul_params = active;
  estimate.matmul_flops_per_token = 6 * active;
  estimate.attention_flops_per_token = 12 * layers * s * d;
  estimate.flops_per_token = estimate.matmul_flops_per_token + estimate.attention_flops_per_token;
  estimate.total_params = total;
  estimate.active_params = active_all;
  return estimate;
}

MetricsWriter::MetricsWriter(const std::string& path) : path_(path), stream_(path, std::ios::trunc) {
  if (!stream_) SY_BAD_INPUT("cannot write the metrics file '", path, "': ", std::strerror(errno));
}

void MetricsWriter::write(const StepMetrics& metrics) {
  stream_ << metrics_json(metrics) << '\n';
  stream_.flush();
  if (!stream_) SY_THROW("writing the metrics file '", path_, "' failed: ", std::strerror(errno));
}

std::string metrics_json(const StepMetrics& m) {
  std::ostringstream out;
  out << "{\"step\":" << m.step << ",\"total_steps\":" << m.total_steps << ",\"loss\":" << json::number(m.loss);
  if (m.has_val_loss) out << ",\"val_loss\":" << json::number(m.val_loss);
  out << ",\"lr\":" << json::number(m.lr) << ",\"grad_norm\":" << json::number(m.grad_norm)
      << ",\"loss_scale\":" << json::number(m.loss_scale) << ",\"skipped\":" << (m.skipped ? "true" : "false")
      << ",\"aux_loss\":" << json::number(m.aux_loss) << ",\"z_loss\":" << json::number(m.z_loss)
      << ",\"seq_aux_loss\":" << json::number(m.seq_aux_loss)
      << ",\"global_aux_loss\":" << json::number(m.global_aux_loss) << ",\"dropped_fraction\":" << json::number(m.dropped_fraction) << ",\"tokens\":" << m.tokens
      << ",\"step_time_s\":" << json::number(m.step_time_s) << ",\"tokens_per_s\":" << json::number(m.tokens_per_s)
      << ",\"flops_per_s\":" << json::number(m.flops_per_s);
  if (m.has_mfu)
    out << ",\"mfu\":" << json::number(m.mfu) << ",\"mfu_measured_peak\":" << json::number(m.mfu_measured_peak);
  out << ",\"elapsed_s\":" << json::number(m.elapsed_s) << ",\"eta_s\":" << json::number(m.eta_s)
      << ",\"tokens_per_expert\":[";
  for (size_t layer = 0; layer < m.tokens_per_expert.size(); ++layer) {
    out << (layer ? ",[" : "[");
    for (size_t expert = 0; expert < m.tokens_per_expert[layer].size(); ++expert)
      out << (expert ? "," : "") << m.tokens_per_expert[layer][expert];
    out << "]";
  }
  out << "]";
  if (m.has_replication)
    out << ",\"replicated_experts\":" << json::number(m.replicated_experts)
        << ",\"replicated_rows\":" << json::number(m.replicated_rows)
        << ",\"ep_max_load_before\":" << json::number(m.ep_max_load_before)
        << ",\"ep_max_load_after\":" << json::number(m.ep_max_load_after);
  if (!m.router.empty()) {
    out << ",\"router\":[";
    for (size_t layer = 0; layer < m.router.size(); ++layer)
      out << (layer ? "," : "") << router_stats_json(m.router[layer]);
    out << "]";
    if (m.router_first_step > 0) out << ",\"router_first_step\":" << m.router_first_step;
  }
  if (!m.warnings.empty()) {
    out << ",\"warnings\":[";
    for (size_t index = 0; index < m.warnings.size(); ++index)
      out << (index ? "," : "") << "{\"kind\":" << json::quote(m.warnings[index].kind)
          << ",\"message\":" << json::quote(m.warnings[index].message) << "}";
    out << "]";
  }
  out << "}";
  return out.str();
}

std::string router_stats_json(const RouterLayerStats& stats) {
  std::ostringstream out;
  out << "{\"layer\":" << stats.moe_layer << ",\"forwards\":" << stats.forwards << ",\"tokens\":" << stats.tokens
      << ",\"load_imbalance\":" << json::number(stats.load_imbalance)
      << ",\"experts_used\":" << json::number(stats.experts_used_fraction)
      << ",\"dropped_fraction\":" << json::number(stats.dropped_fraction)
      << ",\"mean_gate\":" << json::number(stats.mean_gate) << ",\"entropy\":" << json::number(stats.router_entropy)
      << ",\"entropy_normalized\":" << json::number(stats.router_entropy_normalized)
      << ",\"aux_loss\":" << json::number(stats.aux_loss) << ",\"z_loss\":" << json::number(stats.z_loss)
      << ",\"tokens_per_expert\":[";
  for (size_t expert = 0; expert < stats.tokens_per_expert.size(); ++expert)
    out << (expert ? "," : "") << stats.tokens_per_expert[expert];
  out << "],\"seq_aux_loss\":" << json::number(stats.seq_aux_loss)
      << ",\"global_aux_loss\":" << json::number(stats.global_aux_loss);
  if (stats.has_bias) {
    out << ",\"bias\":[";
    for (size_t expert = 0; expert < stats.bias.size(); ++expert)
      out << (expert ? "," : "") << json::number(stats.bias[expert]);
    out << "],\"bias_min\":" << json::number(stats.bias_min) << ",\"bias_max\":" << json::number(stats.bias_max)
        << ",\"bias_std\":" << json::number(stats.bias_std);
  }
  out << "}";
  return out.str();
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t total = int64_t(std::llround(seconds));
  char buffer[32];
  if (total < 60) std::snprintf(buffer, sizeof(buffer), "%llds", (long long)total);
  else if (total < 3600) std::snprintf(buffer, sizeof(buffer), "%lldm%02llds", (long long)(total / 60), (long long)(total % 60));
  else std::snprintf(buffer, sizeof(buffer), "%lldh%02lldm", (long long)(total / 3600), (long long)(total % 3600 / 60));
  return buffer;
}

std::string format_progress_line(const StepMetrics& m, DeviceKind device) {
  std::ostringstream out;
  // Figures without a label are this step's; the others name their step or window, since the
  // router statistics cover several steps and the validation loss is from the last evaluation.
  out << "step " << m.step << "/" << m.total_steps << " | loss " << fixed(m.loss, 4) << " | val ";
  if (m.last_val_loss < 0) out << "-";
  else out << fixed(m.last_val_loss, 4);
  if (m.last_val_loss >= 0 && m.last_val_step > 0 && m.last_val_step != m.step) out << " (step " << m.last_val_step << ")";
  out << " | aux " << fixed(m.aux_loss, 4) << " z " << fixed(m.z_loss, 5);
  if (m.shows_seq_aux_loss) out << " seq " << fixed(m.seq_aux_loss, 4);
  if (m.shows_global_aux_loss) out << " global " << fixed(m.global_aux_loss, 4);
  out << " | dropped "
      << fixed(100 * m.dropped_fraction, 2) << "% (step) | " << si(m.tokens_per_s) << " tok/s | ";
  if (device == DeviceKind::cuda && m.has_mfu)
    out << "MFU " << fixed(100 * m.mfu, 1) << "% (" << fixed(100 * m.mfu_measured_peak, 1) << "% of 790 TFLOP/s)";
  else
    out << fixed(m.flops_per_s / 1e9, 2) << " GFLOP/s";
  char lr[32];
  std::snprintf(lr, sizeof(lr), "%.3g", m.lr);
  out << " | lr " << lr;
  if (m.has_replication)  // this step's plans: replicas and the busiest rank's rows without -> with them
    out << " | replicas " << fixed(m.replicated_experts, 1) << " (" << si(m.replicated_rows) << " rows), max rank load "
        << si(m.ep_max_load_before) << " -> " << si(m.ep_max_load_after);
  if (!m.router.empty()) {
    // The worst layer's balance and the mean confidence: the two numbers that flag a collapsing router.
    double worst_imbalance = 0.0, entropy = 0.0;
    for (const RouterLayerStats& layer : m.router) {
      worst_imbalance = std::max(worst_imbalance, layer.load_imbalance);
      entropy += layer.router_entropy_normalized;
    }
    out << " | load max/mean " << fixed(worst_imbalance, 2) << " H " << fixed(entropy / double(m.router.size()), 2);
    // Router biases (aux-loss-free balancing): their range over every layer.
    bool any_bias = false;
    double bias_min = 0.0, bias_max = 0.0;
    for (const RouterLayerStats& layer : m.router) {
      if (!layer.has_bias) continue;
      bias_min = any_bias ? std::min(bias_min, layer.bias_min) : layer.bias_min;
      bias_max = any_bias ? std::max(bias_max, layer.bias_max) : layer.bias_max;
      any_bias = true;
    }
    if (any_bias) out << " bias " << fixed(bias_min, 4) << ".." << fixed(bias_max, 4);
    if (m.router_first_step <= 0) out << " (logged window)";
    else if (m.router_first_step == m.step) out << " (step)";
    else out << " (steps " << m.router_first_step << "-" << m.step << ")";
  }
  out << " | ETA " << format_duration(m.eta_s);
  if (m.skipped) out << " | step skipped (inf/NaN gradients, loss scale now " << json::number(m.loss_scale) << ")";
  return out.str();
}

}  // namespace switchyard
