// Router statistics per MoE layer for the training log, kept on the device between log lines.
//
// RouterStatsRecorder observes every training forward of the MoE layers (it is a RoutingObserver,
// src/model/routing_observer.h) and adds each one's routing to a float64 accumulator on the
// device (src/ops/router_sums.h): two small kernels per layer and forward, no host copy and no
// synchronization. read_and_reset() -- called when a metrics line is written, every
// training.log_every steps -- sums the accumulators over the ranks, copies them to the host once,
// zeroes them, and derives per layer, over the forwards since the previous read:
//   tokens_per_expert      choices routed to each global expert before capacity (summed)
//   load_imbalance         max_e count_e / mean_e count_e      (1 = perfectly even; E = all on one)
//   experts_used_fraction  #{e : count_e > 0} / E
//   dropped_fraction       dropped choices / routed choices   (capacity overflow)
//   mean_gate              mean gate value of the kept choices
//   router_entropy         mean over tokens of -sum_e p_e ln p_e (nats); normalized: / ln E in [0, 1]
//   aux_loss, z_loss       mean per forward, weighted as they enter the loss
// and, added by the trainer (attach_balance_stats; the device sums have no slot for them):
//   seq_aux_loss, global_aux_loss   mean per forward of the sequence-level and global-batch losses,
//                                   weighted (0 when their weights are 0)
//   bias, bias_min/max/std          the layer's router bias at the time of the read (layers with
//                                   one: moe.bias_update_rate > 0); std is the population std
// Evaluation forwards are not recorded (their capacity factor differs and they are not training).
#pragma once

#include <cstdint>
#include <vector>

#include "src/comm/communicator.h"
#include "src/ops/ops.h"
#include "src/ops/router_sums.h"
#include "src/model/routing_observer.h"
#include "src/core/device.h"

namespace switchyard {

struct RouterLayerStats {
  int moe_layer = 0;
  int64_t forwards = 0;  // recorded forwards (summed over ranks)
  int64_t tokens = 0, choices = 0, dropped = 0, kept = 0;
  std::vector<int64_t> tokens_per_expert;
  double load_imbalance = 0.0;
  double experts_used_fraction = 0.0;
  double dropped_fraction = 0.0;
  double mean_gate = 0.0;
  double router_entropy = 0.0;
  double router_entropy_normalized = 0.0;
  double aux_loss = 0.0, z_loss = 0.0;
  double seq_aux_loss = 0.0, global_aux_loss = 0.0;
  bool has_bias = false;
  std::vector<double> bias;  // [E] when has_bias
  double bias_min = 0.0, bias_max = 0.0, bias_std = 0.0;
};

// Derives the statistics from one layer's sums (the accumulator layout of router_sums.h).
RouterLayerStats derive_router_stats(int moe_layer, const double* sums, int num_experts);
// Adds what the trainer keeps on the host: the window's sums of the layer's sequence-level and
// global-batch losses over every recorded forward of every rank (divided by stats.forwards), and
// its router bias (nullptr or empty: none).
void attach_balance_stats(RouterLayerStats& stats, double seq_aux_loss_sum, double global_aux_loss_sum,
                          const std::vector<double>* bias);

class RouterStatsRecorder : public RoutingObserver {
 public:
  RouterStatsRecorder(DeviceKind device, int moe_layers, int num_experts);
  RouterStatsRecorder(const RouterStatsRecorder&) = delete;
  RouterStatsRecorder& operator=(const RouterStatsRecorder&) = delete;

  // Training forwards only; checks the layer index and the expert count.
  void on_routing(const ExecContext& context, const RoutingEvent& event) override;
  // Adds one forward of MoE layer `moe_layer` (enqueued on context.stream).
  void record(const ExecContext& context, int moe_layer, const RoutingResult& routing, const Tensor& logits);
  // Statistics since the last read, summed over `world` when it has more than one rank (a
  // collective: every rank must call it at the same step), then zeroes the sums. Waits for
  // context.stream. Layers without a recorded forward report zeros with forwards = 0.
  std::vector<RouterLayerStats> read_and_reset(const ExecContext& context, Communicator* world);

  int moe_layers() const { return moe_layers_; }
  int num_experts() const { return num_experts_; }
  int64_t pending_forwards() const { return pending_forwards_; }  // this rank, since the last read

 private:
  int64_t layer_stride() const { return kNumRouterSums + num_experts_; }

  DeviceKind device_;
  int moe_layers_ = 0, num_experts_ = 0;
  Buffer sums_;     // f64 [moe_layers][kNumRouterSums + E] on device_
  Buffer scratch_;  // f64 [kRouterSumsScratchDoubles] (CUDA per-block partials)
  std::vector<double> host_sums_;
  int64_t pending_forwards_ = 0;
};

// Whether read_and_reset is due after optimizer step `step` (1-based): every `log_every` steps
// and at the last step. The same on every rank, so the collective read lines up.
bool router_stats_due(int64_t step, int64_t log_every, int64_t total_steps);

}  // namespace switchyard
