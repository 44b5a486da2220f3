// MoeBlock: what the transformer needs from an MoE FFN, so that the single-device layer
// (src/model/moe_layer.h) and the expert-parallel one plug into the model the same way.
//
// Weights: router [D, E] (replicated), w1 [E_local, D, F or 2F], w2 [E_local, F, D] for the
// experts this rank holds (all E with ep_size 1). Gradients have the same shapes and are
// overwritten by backward, or added to with MoeGradients::accumulate; the router bias
// (MoeWeights::router_bias, with moe.bias_update_rate > 0) has none. Statistics describe the last
// forward on this rank's tokens (read with the model's other statistics in one HostReads): the
// router losses (already weighted: aux, z, sequence-level, global-batch) and, per global expert,
// how many choices were routed to it before capacity (its "tokens per expert"), with the dropped
// and total choice counts, and for an expert-parallel layer with hot-expert replication what its
// plan replicated.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "src/comm/communicator.h"
#include "src/model/moe_ep_layer.h"
#include "src/model/moe_layer.h"
#include "src/ops/host_reads.h"

namespace switchyard {

struct MoeBlockStats {
  double aux_loss = 0.0;
  double z_loss = 0.0;
  double seq_aux_loss = 0.0;     // 0 unless moe.seq_aux_loss_weight > 0
  double global_aux_loss = 0.0;  // 0 unless moe.global_aux_loss_weight > 0
  int64_t total_choices = 0;
  int64_t dropped_choices = 0;
  std::vector<int64_t> expert_counts;  // [E], global expert ids
  // Hot-expert replication (parallel.max_replicas_per_rank; src/model/moe_ep_layer.h): whether the
  // layer replicates, and its plan for the last forward (the same on every rank of the group).
  bool replicates = false;
  ReplicationStats replication;
};

// Host storage of one block's statistics while a batched read (HostReads) is in flight; it must
// not move until the read is done.
struct MoeStatsReadout {
  RoutingLossesReadout losses;
  int32_t scalars[kNumRoutingScalars] = {};
  std::vector<int32_t> expert_counts;  // [E]
};

class MoeBlock {
 public:
  virtual ~MoeBlock() = default;
  // y [T, D] = MoE(x [T, D]); x stays alive until the matching backward. args.recompute repeats
  // the last forward without side effects (src/model/moe_router.h MoeForwardArgs).
  virtual void forward(const ExecContext& context, const Tensor& x, const MoeWeights& weights,
                       const MoeForwardArgs& args, Tensor& y) = 0;
  // aux / z scales: d(total loss) / d(aux loss) and / d(z loss), loss scale included; the aux scale
  // applies to the sequence-level and global-batch losses too.
  virtual void backward(const ExecContext& context, const Tensor& grad_y, const MoeWeights& weights,
                        float aux_grad_scale, float z_grad_scale, Tensor& grad_x, MoeGradients& gradients) = 0;
  // Reads the statistics of the last forward to the host (waits for context.stream).
  MoeBlockStats read_stats(const ExecContext& context) const;
  // The same in two halves, so that a caller reads every block's statistics with one wait
  // (src/ops/host_reads.h): stage_stat_reads notes this block's reads into `readout`, stats_from
  // makes the statistics once `reads` has read them.
  virtual void stage_stat_reads(HostReads& reads, MoeStatsReadout& readout) const = 0;
  virtual MoeBlockStats stats_from(const MoeStatsReadout& readout) const = 0;
  virtual int local_experts() const = 0;
  virtual int first_local_expert() const = 0;
  // The last forward's routing and router logits (device tensors), for analysis taps
  // (src/model/routing_observer.h).
  virtual const RoutingResult& routing() const = 0;
  virtual const Tensor& router_logits() const = 0;
  // Where the layer's large buffers live (src/model/moe_memory.h).
  virtual const MoeLayerMemory& memory() const = 0;
  // Reports the layer's own stages to `observer` from now on (nullptr: stop); not owned.
  virtual void set_stage_observer(MoeStageObserver* observer) = 0;
};

// The single-device layer: every expert lives here (ep_size 1).
class LocalMoeBlock : public MoeBlock {
 public:
  LocalMoeBlock(const MoeLayerConfig& config, DeviceKind device, DType activation_dtype, int64_t max_tokens,
                std::shared_ptr<MoeLayerMemory> memory = nullptr);
  void forward(const ExecContext& context, const Tensor& x, const MoeWeights& weights, const MoeForwardArgs& args,
               Tensor& y) override;
  void backward(const ExecContext& context, const Tensor& grad_y, const MoeWeights& weights, float aux_grad_scale,
                float z_grad_scale, Tensor& grad_x, MoeGradients& gradients) override;
  void stage_stat_reads(HostReads& reads, MoeStatsReadout& readout) const override;
  MoeBlockStats stats_from(const MoeStatsReadout& readout) const override;
  int local_experts() const override { return layer_.config().moe.num_experts; }
  int first_local_expert() const override { return 0; }
  const RoutingResult& routing() const override { return layer_.routing(); }
  const Tensor& router_logits() const override { return layer_.logits(); }
  const MoeLayerMemory& memory() const override { return layer_.memory(); }
  void set_stage_observer(MoeStageObserver* observer) override { layer_.set_stage_observer(observer); }

 private:
  MoeLayer layer_;
};

// Experts sharded over the expert_parallel communicator (src/model/moe_ep_layer.h). forward and
// backward are collectives over that group: every rank of it must call them in the same order.
class ExpertParallelMoeBlock : public MoeBlock {
 public:
  ExpertParallelMoeBlock(const MoeLayerConfig& config, std::shared_ptr<Communicator> expert_parallel,
                         DeviceKind device, DType activation_dtype, int64_t max_tokens,
                         const EpLayerOptions& exchange, std::shared_ptr<MoeLayerMemory> memory = nullptr);
  void forward(const ExecContext& context, const Tensor& x, const MoeWeights& weights, const MoeForwardArgs& args,
               Tensor& y) override;
  // MoeGradients::accumulate goes through a scratch that is then added: the layer overwrites, so
  // that its sums are the same with and without hot-expert replication (whose owners' chains start
  // from the returned partial sums), accumulating or not.
  void backward(const ExecContext& context, const Tensor& grad_y, const MoeWeights& weights, float aux_grad_scale,
                float z_grad_scale, Tensor& grad_x, MoeGradients& gradients) override;
  void stage_stat_reads(HostReads& reads, MoeStatsReadout& readout) const override;
  MoeBlockStats stats_from(const MoeStatsReadout& readout) const override;
  int local_experts() const override { return layer_.local_experts(); }
  int first_local_expert() const override { return layer_.first_expert(); }
  const RoutingResult& routing() const override { return layer_.routing(); }
  const Tensor& router_logits() const override { return layer_.logits(); }
  const MoeLayerMemory& memory() const override { return layer_.memory(); }
  void set_stage_observer(MoeStageObserver* observer) override { layer_.set_stage_observer(observer); }

 private:
  MoeEpLayer layer_;
  Buffer gradient_scratch_;  // the three gradients side by side, for accumulating backwards
};

// The block for a run with `ep_size` expert-parallel ranks: LocalMoeBlock when ep_size is 1,
// otherwise ExpertParallelMoeBlock over groups->expert_parallel. `memory`: where the layer's large
// buffers live (src/model/moe_memory.h; null: its own), one for all the blocks of a model that
// recomputes its MoE forwards.
std::unique_ptr<MoeBlock> make_moe_block(const MoeLayerConfig& config, DeviceKind device, DType activation_dtype,
                                         int64_t max_tokens, int ep_size, const ParallelGroups* groups,
                                         const EpLayerOptions& exchange = {},
                                         std::shared_ptr<MoeLayerMemory> memory = nullptr);

}  // namespace switchyard
