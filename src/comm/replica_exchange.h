// ReplicaExchange: the collectives of hot-expert replication (issue #22 item 3) over the
// expert-parallel group, for the EP layer (src/model/moe_ep_layer.h, "Hot-expert replication").
//
// The group has P ranks with L own experts each (rank p: global experts [p*L, (p+1)*L)) and M
// replica slots each (parallel.max_replicas_per_rank). The exchange of token rows runs over
// P * (L + M) VIRTUAL experts: rank p holds the virtual experts [p*(L+M), (p+1)*(L+M)), its own
// experts first (virtual p*(L+M) + l for its local expert l), then its slots (p*(L+M) + L + j for
// slot j). Per step and layer:
//   plan_step        every rank's rows per global expert (the routing's packed offsets) are
//                    all-gathered, P x E ints (one host sync), and every rank computes the same
//                    plan (src/comm/replication_plan.h). A host's replicas take its slots in
//                    ascending expert id. From it: expert_map() (where THIS rank's rows of each
//                    global expert go: its owner's own virtual expert, or the replica's slot when
//                    this rank is one of the replica's sources) and virtual_offsets() (this rank's
//                    packed send layout by virtual expert: the same rows, in the same order within
//                    each expert, regrouped).
//   send_weights     each replicated expert's weights [a, b] go owner -> host, into the host's
//                    slot (one all-to-all-v per weight tensor; the owner packs them first).
//   return_gradients each replica's weight gradient [a, b] goes host -> owner, into the owner's
//                    buffer at the expert's local place (other experts untouched).
// Every call is collective over the group, in this order on every rank; work is ordered on
// context.stream, the NCCL calls on the communicator's stream (events as in
// src/comm/expert_dispatch.h).
//
// Bytes per replica and step: the weights once owner -> host, (D * W1 + F * D) * activation size
// (W1 = F, or 2F with swiglu), and the gradient once back, (D * W1 + F * D) * gradient-chain size
// (8 on CPU ranks, 4 on GPUs: src/model/moe_ep_layer.h says why).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "src/comm/communicator.h"
#include "src/comm/expert_dispatch.h"
#include "src/comm/replication_plan.h"
#include "src/core/device.h"
#include "src/ops/ops.h"

namespace switchyard {

// One plan for reports (the same on every rank of the group).
struct ReplicationStats {
  int64_t replicas = 0;    // experts with a replica
  int64_t moved_rows = 0;  // rows a replica computes instead of the owner
  int64_t max_load_before = 0, max_load_after = 0;  // rows of the busiest rank without / with the replicas
};

class ReplicaExchange {
 public:
  // num_experts: E, a multiple of the group's size; max_replicas_per_rank M >= 1; min_rows: the
  // plan's ReplicationOptions::min_rows (>= 0). Not collective.
  ReplicaExchange(std::shared_ptr<Communicator> expert_parallel, DeviceKind device, int num_experts,
                  int max_replicas_per_rank, int64_t min_rows = 0);
  ~ReplicaExchange();
  ReplicaExchange(const ReplicaExchange&) = delete;
  ReplicaExchange& operator=(const ReplicaExchange&) = delete;

  int ranks() const { return ranks_; }
  int rank() const { return rank_; }
  int local_experts() const { return local_experts_; }               // L
  int slots() const { return slots_; }                               // M
  int virtual_local_experts() const { return local_experts_ + slots_; }  // L + M
  int virtual_experts() const { return ranks_ * virtual_local_experts(); }

  // Collective, one host sync. `packed_offsets`: int32 [E + 1] of this rank's routing with
  // segment_alignment 1 (its rows per global expert), on the context's device.
  const ReplicationPlan& plan_step(const ExecContext& context, const Tensor& packed_offsets);
  const ReplicationPlan& plan() const { return plan_; }
  ReplicationStats stats() const;
  // Rows `source` sent to each global expert [E] in the last plan_step.
  const std::vector<int64_t>& loads_of(int source) const { return loads_[size_t(source)]; }

  // This rank's view of the current plan (host tables).
  const std::vector<int32_t>& expert_map() const { return expert_map_; }  // [E] -> virtual expert
  std::vector<int32_t> virtual_offsets() const;  // [virtual_experts() + 1], no padding
  int hosted() const { return int(hosted_experts_.size()); }  // slots [0, hosted) are in use
  const std::vector<int>& hosted_experts() const { return hosted_experts_; }  // global expert of each slot
  // Local ids of this rank's experts that have a replica, ascending.
  const std::vector<int>& replicated_local_experts() const { return replicated_local_; }

  // Collective. `weights` [L, a, b] (this rank's experts); `replica_weights` [>= hosted(), a, b] of
  // the same dtype: slot j gets hosted_experts()[j]'s matrix from its owner.
  void send_weights(const ExecContext& context, const Tensor& weights, Tensor& replica_weights);
  // Collective. `replica_gradients` [>= hosted(), a, b]: slot j's gradient goes to its owner, into
  // `owner_gradients` [L, a, b] (same dtype) at the expert's local place; the other experts' entries
  // are untouched.
  void return_gradients(const ExecContext& context, const Tensor& replica_gradients, Tensor& owner_gradients);

 private:
  void check_context(const ExecContext& context) const;
  ReplicationOptions plan_options() const {
    ReplicationOptions options;
    options.max_replicas_per_rank = slots_;
    options.min_rows = min_rows_;
    return options;
  }
  void build_tables();
  // The staging as `count` matrices shaped and typed like those of `like` [n, a, b] (the view has at
  // least one; the buffer, grown after the streams are idle, holds `count`).
  Tensor staging_matrices(const ExecContext& context, const Tensor& like, int64_t count);
  // The all-to-all-v pieces (in elements, `elements` per matrix) between the replicas' owners and
  // hosts, one per peer: as owner, this rank's replicated matrices packed by host (`packed` of them,
  // hosts ascending, experts ascending); as host, its slots by owner. send_weights sends the owner
  // side and receives the host side; return_gradients the reverse.
  struct MatrixLayout {
    std::vector<int64_t> owner_counts, owner_offsets, host_counts, host_offsets;
    int64_t packed = 0;
  };
  MatrixLayout matrix_layout(int64_t elements) const;
  // The replicas owned by `owner` and hosted by `host`, ascending by expert.
  std::vector<int> replicas_between(int owner, int host) const;

  std::shared_ptr<Communicator> communicator_;
  DeviceKind device_;
  int ranks_ = 1, rank_ = 0, num_experts_ = 0, local_experts_ = 1, slots_ = 0;
  int64_t min_rows_ = 0;
  ReplicationPlan plan_;
  std::vector<std::vector<int64_t>> loads_;  // [P][E]
  std::vector<int> host_of_, slot_of_;       // [E]: -1 when the expert has no replica
  std::vector<int32_t> expert_map_;
  std::vector<int> hosted_experts_, replicated_local_;
  Buffer counts_, gathered_, staging_;  // [E] and [P, E] int32 on the device; packed matrices
  std::vector<int32_t> host_gathered_;
  CommStreamEvents events_;  // one slot: the last collective
};

}  // namespace switchyard
