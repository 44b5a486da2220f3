// MoE blocks for the transformer (src/model/moe_block.h).
#include "src/model/moe_block.h"

#include "src/core/error.h"
#include "src/ops/ops.h"

namespace switchyard {

LocalMoeBlock::LocalMoeBlock(const MoeLayerConfig& config, DeviceKind device, DType activation_dtype,
                             int64_t max_tokens, std::shared_ptr<MoeLayerMemory> memory)
    : layer_(config, device, activation_dtype, max_tokens, std::move(memory)) {}

void LocalMoeBlock::forward(const ExecContext& context, const Tensor& x, const MoeWeights& weights,
                            const MoeForwardArgs& args, Tensor& y) {
  MoeForwardArgs layer_args = args;
  layer_args.read_losses = false;  // read once per micro-step by read_stats, not mid-forward
  layer_.forward(context, x, weights, layer_args, y);
}

void LocalMoeBlock::backward(const ExecContext& context, const Tensor& grad_y, const MoeWeights& weights,
                             float aux_grad_scale, float z_grad_scale, Tensor& grad_x, MoeGradients& gradients) {
  layer_.backward(context, grad_y, weights, aux_grad_scale, z_grad_scale, grad_x, gradients);
}

MoeBlockStats MoeBlock::read_stats(const ExecContext& context) const {
  HostReads reads(context.device);
  MoeStatsReadout readout;
  stage_stat_reads(reads, readout);
  reads.read(context);
  return stats_from(readout);
}

namespace {

// The statistics both layers expose the same way: the router's losses and counters and the
// per-expert counts of their routing.
template <typename Layer>
void stage_layer_stat_reads(const Layer& layer, HostReads& reads, MoeStatsReadout& readout) {
  const RoutingResult& routing = layer.routing();
  SY_CHECK(routing.losses.data != nullptr, "MoeBlock: statistics read before any forward");
  reads.add(routing.losses, readout.losses.destination(layer.float_dtype()));
  reads.add(routing.scalars, Tensor(readout.scalars, DType::i32, DeviceKind::cpu, {kNumRoutingScalars}));
  const int experts = layer.config().moe.num_experts;
  readout.expert_counts.assign(size_t(experts), 0);
  reads.add(routing.expert_counts, Tensor(readout.expert_counts.data(), DType::i32, DeviceKind::cpu, {experts}));
}

template <typename Layer>
MoeBlockStats layer_stats_from(const Layer& layer, const MoeStatsReadout& readout) {
  const MoeLosses losses = readout.losses.losses(layer.float_dtype());
  const MoeRoutingStats routing = moe_routing_stats_from(readout.scalars);
  MoeBlockStats stats;
  stats.aux_loss = losses.aux_loss;
  stats.z_loss = losses.z_loss;
  stats.seq_aux_loss = losses.seq_aux_loss;
  stats.global_aux_loss = losses.global_aux_loss;
  stats.total_choices = routing.total_choices;
  stats.dropped_choices = routing.dropped_choices;
  stats.expert_counts.assign(readout.expert_counts.begin(), readout.expert_counts.end());
  return stats;
}

}  // namespace

void LocalMoeBlock::stage_stat_reads(HostReads& reads, MoeStatsReadout& readout) const {
  stage_layer_stat_reads(layer_, reads, readout);
}

MoeBlockStats LocalMoeBlock::stats_from(const MoeStatsReadout& readout) const {
  return layer_stats_from(layer_, readout);
}

ExpertParallelMoeBlock::ExpertParallelMoeBlock(const MoeLayerConfig& config,
                                               std::shared_ptr<Communicator> expert_parallel, DeviceKind device,
                                               DType activation_dtype, int64_t max_tokens,
                                               const EpLayerOptions& exchange, std::shared_ptr<MoeLayerMemory> memory)
    : layer_(config, std::move(expert_parallel), device, activation_dtype, max_tokens, exchange, std::move(memory)) {}

void ExpertParallelMoeBlock::forward(const ExecContext& context, const Tensor& x, const MoeWeights& weights,
                                     const MoeForwardArgs& args, Tensor& y) {
  MoeForwardArgs layer_args = args;
  layer_args.read_losses = false;
  layer_.forward(context, x, weights, layer_args, y);
}

void ExpertParallelMoeBlock::backward(const ExecContext& context, const Tensor& grad_y, const MoeWeights& weights,
                                      float aux_grad_scale, float z_grad_scale, Tensor& grad_x,
                                      MoeGradients& gradients) {
  if (!gradients.accumulate) {
    layer_.backward(context, grad_y, weights, aux_grad_scale, z_grad_scale, grad_x, gradients);
    return;
  }
  // The layer overwrites a scratch copy of the three gradients, which is then added.
  Tensor* targets[3] = {&gradients.router, &gradients.w1, &gradients.w2};
  size_t bytes = 0;
  for (const Tensor* target : targets) bytes += target->bytes();
  if (gradient_scratch_.bytes() < bytes) gradient_scratch_ = Buffer(context.device, bytes);
  MoeGradients scratch{gradients.router, gradients.w1, gradients.w2, /*accumulate=*/false};
  Tensor* parts[3] = {&scratch.router, &scratch.w1, &scratch.w2};
  size_t offset = 0;
  for (Tensor* part : parts) {
    part->data = static_cast<char*>(gradient_scratch_.data()) + offset;
    offset += part->bytes();
  }
  layer_.backward(context, grad_y, weights, aux_grad_scale, z_grad_scale, grad_x, scratch);
  for (int index = 0; index < 3; ++index) ops::add_into(context, *parts[index], *targets[index]);
}

void ExpertParallelMoeBlock::stage_stat_reads(HostReads& reads, MoeStatsReadout& readout) const {
  stage_layer_stat_reads(layer_, reads, readout);
}

MoeBlockStats ExpertParallelMoeBlock::stats_from(const MoeStatsReadout& readout) const {
  MoeBlockStats stats = layer_stats_from(layer_, readout);
  stats.replicates = layer_.replicates();  // host-side plan figures: no device read
  stats.replication = layer_.replication_stats();
  return stats;
}

std::unique_ptr<MoeBlock> make_moe_block(const MoeLayerConfig& config, DeviceKind device, DType activation_dtype,
                                         int64_t max_tokens, int ep_size, const ParallelGroups* groups,
                                         const EpLayerOptions& exchange, std::shared_ptr<MoeLayerMemory> memory) {
  if (ep_size == 1)
    return std::make_unique<LocalMoeBlock>(config, device, activation_dtype, max_tokens, std::move(memory));
  SY_CHECK(groups != nullptr && groups->expert_parallel != nullptr && groups->expert_parallel->size() == ep_size,
           "make_moe_block: ep_size ", ep_size, " needs an expert-parallel communicator of that size");
  SY_CHECK_INPUT(config.moe.compute_mode == ExpertComputeMode::sparse,
                 "moe.compute_mode = dense is a single-device baseline; it needs parallel.ep_size = 1");
  EpLayerOptions with_levels = exchange;  // the node levels come with the groups
  with_levels.node_group = groups->expert_parallel_node;
  with_levels.rail_group = groups->expert_parallel_rail;
  return std::make_unique<ExpertParallelMoeBlock>(config, groups->expert_parallel, device, activation_dtype,
                                                  max_tokens, with_levels, std::move(memory));
}

}  // namespace switchyard
