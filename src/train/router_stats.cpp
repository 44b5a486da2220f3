// Router statistics for the training log (src/train/router_stats.h).
#include "src/train/router_stats.h"

#include <algorithm>
#include <cmath>

#include "src/core/error.h"

namespace switchyard {

RouterLayerStats derive_router_stats(int moe_layer, const double* sums, int num_experts) {
  RouterLayerStats stats;
  stats.moe_layer = moe_layer;
  stats.forwards = std::llround(sums[kRouterForwards]);
  stats.tokens = std::llround(sums[kRouterTokens]);
  stats.choices = std::llround(sums[kRouterChoices]);
  stats.dropped = std::llround(sums[kRouterDropped]);
  stats.kept = std::llround(sums[kRouterKept]);
  stats.tokens_per_expert.resize(size_t(num_experts));
  double total = 0.0, largest = 0.0;
  int used = 0;
  for (int expert = 0; expert < num_experts; ++expert) {
    const double count = sums[kNumRouterSums + expert];
    stats.tokens_per_expert[size_t(expert)] = std::llround(count);
    total += count;
    largest = std::max(largest, count);
    used += count > 0.0 ? 1 : 0;
  }
  // With nothing routed the layer is neither balanced nor unbalanced: report 0, not 1 or NaN.
  stats.load_imbalance = total > 0.0 ? largest / (total / double(num_experts)) : 0.0;
  stats.experts_used_fraction = num_experts > 0 ? double(used) / double(num_experts) : 0.0;
  stats.dropped_fraction = sums[kRouterChoices] > 0.0 ? sums[kRouterDropped] / sums[kRouterChoices] : 0.0;
  stats.mean_gate = sums[kRouterKept] > 0.0 ? sums[kRouterKeptGateSum] / sums[kRouterKept] : 0.0;
  stats.router_entropy = sums[kRouterTokens] > 0.0 ? sums[kRouterEntropySum] / sums[kRouterTokens] : 0.0;
  stats.router_entropy_normalized = num_experts > 1 ? stats.router_entropy / std::log(double(num_experts)) : 0.0;
  stats.aux_loss = sums[kRouterForwards] > 0.0 ? sums[kRouterAuxSum] / sums[kRouterForwards] : 0.0;
  stats.z_loss = sums[kRouterForwards] > 0.0 ? sums[kRouterZSum] / sums[kRouterForwards] : 0.0;
  return stats;
}

void attach_balance_stats(RouterLayerStats& stats, double seq_aux_loss_sum, double global_aux_loss_sum,
                          const std::vector<double>* bias) {
  stats.seq_aux_loss = stats.forwards > 0 ? seq_aux_loss_sum / double(stats.forwards) : 0.0;
  stats.global_aux_loss = stats.forwards > 0 ? global_aux_loss_sum / double(stats.forwards) : 0.0;
  stats.has_bias = bias != nullptr && !bias->empty();
  if (!stats.has_bias) return;
  stats.bias = *bias;
  stats.bias_min = *std::min_element(bias->begin(), bias->end());
  stats.bias_max = *std::max_element(bias->begin(), bias->end());
  double mean = 0.0, squares = 0.0;
  for (double value : *bias) mean += value;
  mean /= double(bias->size());
  for (double value : *bias) squares += (value - mean) * (value - mean);
  stats.bias_std = std::sqrt(squares / double(bias->size()));
}

RouterStatsRecorder::RouterStatsRecorder(DeviceKind device, int moe_layers, int num_experts)
    : device_(device), moe_layers_(moe_layers), num_experts_(num_experts) {
  SY_CHECK(moe_layers >= 0 && num_experts >= 1, "RouterStatsRecorder: ", moe_layers, " layers, ", num_experts,
           " experts");
  const size_t doubles = size_t(std::max(1, moe_layers)) * size_t(layer_stride());
  sums_ = Buffer(device, doubles * sizeof(double));
  device_memset(sums_.data(), device, 0, sums_.bytes());
  if (device == DeviceKind::cuda) scratch_ = Buffer(device, size_t(kRouterSumsScratchDoubles) * sizeof(double));
  host_sums_.assign(doubles, 0.0);
}

void RouterStatsRecorder::on_routing(const ExecContext& context, const RoutingEvent& event) {
  if (!event.training) return;
  record(context, event.moe_layer, *event.routing, *event.logits);
}

void RouterStatsRecorder::record(const ExecContext& context, int moe_layer, const RoutingResult& routing,
                                 const Tensor& logits) {
  SY_CHECK(context.device == device_, "RouterStatsRecorder: context on ", device_kind_name(context.device),
           ", sums on ", device_kind_name(device_));
  SY_CHECK(moe_layer >= 0 && moe_layer < moe_layers_, "RouterStatsRecorder: MoE layer ", moe_layer, " of ",
           moe_layers_);
  SY_CHECK(logits.rank == 2 && logits.dim(1) == num_experts_, "RouterStatsRecorder: logits ", logits.describe(),
           " for ", num_experts_, " experts");
  Tensor layer_sums(sums_.as<double>() + size_t(moe_layer) * size_t(layer_stride()), DType::f64, device_,
                    {layer_stride()});
  Tensor scratch = device_ == DeviceKind::cuda ? scratch_.view(DType::f64, {kRouterSumsScratchDoubles}) : Tensor();
  ops::accumulate_router_sums(context, routing, logits, layer_sums, scratch);
  ++pending_forwards_;
}

std::vector<RouterLayerStats> RouterStatsRecorder::read_and_reset(const ExecContext& context, Communicator* world) {
  SY_CHECK(context.device == device_, "RouterStatsRecorder: context on ", device_kind_name(context.device),
           ", sums on ", device_kind_name(device_));
  const int64_t doubles = int64_t(moe_layers_) * layer_stride();
  std::vector<RouterLayerStats> layers;
  if (doubles == 0) return layers;
  ops::synchronize(context);  // the sums are complete (and NCCL's stream may read them)
  if (world != nullptr && world->size() > 1) {
    SY_CHECK(world->device() == device_, "RouterStatsRecorder: the ", world->name(), " communicator works on ",
             device_kind_name(world->device()), ", the sums live on ", device_kind_name(device_));
    world->all_reduce_sum(sums_.data(), doubles, DType::f64);
    world->synchronize();
  }
  Tensor device_sums = sums_.view(DType::f64, {doubles});
  Tensor host(host_sums_.data(), DType::f64, DeviceKind::cpu, {doubles});
  ops::copy(context, device_sums, host);
  ops::fill_zero(context, device_sums);
  pending_forwards_ = 0;
  for (int layer = 0; layer < moe_layers_; ++layer)
    layers.push_back(
        derive_router_stats(layer, host_sums_.data() + size_t(layer) * size_t(layer_stride()), num_experts_));
  return layers;
}

bool router_stats_due(int64_t step, int64_t log_every, int64_t total_steps) {
  return (log_every > 0 && step % log_every == 0) || step == total_steps;
}

}  // namespace switchyard
