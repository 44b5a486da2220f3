// Training metrics: the FLOP count behind MFU, per-step records as JSON lines, and the progress
// line printed every training.log_every steps. docs/TRAINING.md states the formulas.
//
// FLOPs per token (forward + backward), counting only what a token actually runs:
//   active matmul parameters A = per block (3D^2 + D^2 attention projections, plus the dense FFN
//     D*W1 + F*D, or the MoE router D*E plus top_k experts' D*W1e + Fe*D plus the shared
//     experts' D*W1s + Fs*D with Fs = num_shared_experts * shared_expert_d_ff) + V*D for the LM
//     head (W1 = F, or 2F with swiglu). The embedding lookup, norms and activations are not counted.
//   matmuls: 6 A   (2 A forward, 4 A backward)
//   attention scores and values: 12 * L * S * D (2 matmuls of S x D per token and layer, times 6
//     for forward + backward; the causal mask's zero half is not subtracted)
// MFU = achieved FLOP/s / (ranks * peak). CUDA: peak = 989 TFLOP/s (H100 SXM dense bf16), and the
// same against 790 TFLOP/s, a measured achievable peak; CPU: achieved GFLOP/s only.
//
// Router statistics (when a step carries them, every training.log_every steps) go into the JSON
// line as "router": [{"layer", "forwards", "tokens", "load_imbalance", "experts_used",
// "dropped_fraction", "mean_gate", "entropy", "entropy_normalized", "aux_loss", "z_loss",
// "tokens_per_expert": [...], "seq_aux_loss", "global_aux_loss", and for a layer with a router bias
// "bias": [E values], "bias_min", "bias_max", "bias_std"}, ...] with "router_first_step" (the
// window's first step) and into the progress line as the worst layer's max/mean load and the mean
// normalized router entropy, labelled with their window, and the range of the router biases.
// Every line has "seq_aux_loss" and "global_aux_loss" (summed over MoE layers like "aux_loss", 0
// when their weights are 0); the progress line shows them only when their weights are > 0. docs/ANALYTICS.md defines each one. Warnings raised at a step
// (src/train/training_monitor.h) go into its line as "warnings": [{"kind", "message"}, ...].
// With hot-expert replication every line has "replicated_experts", "replicated_rows",
// "ep_max_load_before" and "ep_max_load_after" (StepMetrics says how they are summed), and the
// progress line the replicas and the busiest rank's rows before -> after.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "src/core/tensor.h"
#include "src/train/config.h"
#include "src/train/router_stats.h"

namespace switchyard {

constexpr double kH100DenseBf16PeakFlops = 989e12;
constexpr double kH100MeasuredPeakFlops = 790e12;

struct FlopsEstimate {
  double active_matmul_params = 0;      // A above
  double matmul_flops_per_token = 0;    // 6 A
  double attention_flops_per_token = 0; // 12 L S D
  double flops_per_token = 0;           // the sum
  double total_params = 0;              // every parameter of the model (all experts)
  double active_params = 0;             // parameters a token uses (embedding and norms included)
};
FlopsEstimate estimate_flops(const ModelConfig& model, const MoeConfig& moe);

// One console warning (src/train/training_monitor.h), also kept in the step's metrics line.
struct TrainingWarning {
  std::string kind;     // "loss_spike", "grad_norm_spike", "idle_experts"
  std::string message;  // one line, without the "switchyard train: warning: " prefix
};

struct StepMetrics {
  int64_t step = 0, total_steps = 0;
  double loss = 0;                 // mean cross-entropy of the step's tokens (all ranks)
  bool has_val_loss = false;
  double val_loss = 0;             // from the evaluation run at this step
  double last_val_loss = -1;       // most recent evaluation (< 0: none yet), for the progress line
  int64_t last_val_step = 0;       // the step of that evaluation (0: not known)
  double lr = 0, grad_norm = 0, loss_scale = 1;
  bool skipped = false;            // inf / NaN gradients: no update
  double aux_loss = 0, z_loss = 0; // summed over MoE layers, mean over micro-steps and ranks
  double seq_aux_loss = 0, global_aux_loss = 0;  // the same (0 when their weights are 0)
  bool shows_seq_aux_loss = false, shows_global_aux_loss = false;  // in the progress line (weights > 0)
  double dropped_fraction = 0;     // dropped / routed choices, all MoE layers
  int64_t tokens = 0;              // trained tokens this step, all ranks
  double step_time_s = 0, tokens_per_s = 0, flops_per_s = 0;
  bool has_mfu = false;            // CUDA only
  double mfu = 0, mfu_measured_peak = 0;
  double elapsed_s = 0, eta_s = 0;
  std::vector<std::vector<int64_t>> tokens_per_expert;  // [MoE layer][global expert]: routed choices
  // Hot-expert replication (parallel.max_replicas_per_rank > 0 with ep_size > 1; JSON keys when on):
  // per MoE forward, summed over MoE layers, mean over micro-steps and ranks -- replicas, rows
  // computed by a replica instead of the owner, and the busiest expert-parallel rank's rows without
  // and with the replicas.
  bool has_replication = false;
  double replicated_experts = 0, replicated_rows = 0, ep_max_load_before = 0, ep_max_load_after = 0;
  // Router statistics per MoE layer over the steps since the previous metrics line that had them
  // (src/train/router_stats.h); empty on the steps in between. JSON key "router".
  std::vector<RouterLayerStats> router;
  int64_t router_first_step = 0;   // the first step of the window `router` covers (0: not known)
  std::vector<TrainingWarning> warnings;  // JSON key "warnings" when not empty
};

// One JSON object per line, flushed after every line so a crash keeps what was written.
class MetricsWriter {
 public:
  MetricsWriter() = default;
  explicit MetricsWriter(const std::string& path);  // truncates; SY_BAD_INPUT if not writable
  bool is_open() const { return stream_.is_open(); }
  const std::string& path() const { return path_; }
  void write(const StepMetrics& metrics);

 private:
  std::string path_;
  std::ofstream stream_;
};

std::string metrics_json(const StepMetrics& metrics);
std::string router_stats_json(const RouterLayerStats& stats);  // one element of the "router" array
std::string format_progress_line(const StepMetrics& metrics, DeviceKind device);
std::string format_duration(double seconds);  // "45s", "3m05s", "2h07m"

}  // namespace switchyard
