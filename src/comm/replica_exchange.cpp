// The collectives of hot-expert replication (src/comm/replica_exchange.h).
#include "src/comm/replica_exchange.h"

#include <algorithm>

#include "src/core/error.h"

namespace switchyard {

ReplicaExchange::ReplicaExchange(std::shared_ptr<Communicator> expert_parallel, DeviceKind device, int num_experts,
                                 int max_replicas_per_rank, int64_t min_rows)
    : communicator_(std::move(expert_parallel)), device_(device), events_(device, 1) {
  SY_CHECK(communicator_ != nullptr, "ReplicaExchange: no expert_parallel communicator");
  SY_CHECK(communicator_->device() == device, "ReplicaExchange: the communicator is on ",
           device_kind_name(communicator_->device()), ", the exchange on ", device_kind_name(device));
  ranks_ = communicator_->size();
  rank_ = communicator_->rank();
  num_experts_ = num_experts;
  SY_CHECK(num_experts >= ranks_ && num_experts % ranks_ == 0, "ReplicaExchange: ", num_experts, " experts over ",
           ranks_, " ranks");
  SY_CHECK_INPUT(max_replicas_per_rank >= 1, "ReplicaExchange: max_replicas_per_rank must be >= 1, got ",
                 max_replicas_per_rank);
  local_experts_ = num_experts / ranks_;
  slots_ = max_replicas_per_rank;
  SY_CHECK_INPUT(min_rows >= 0, "parallel.replica_min_rows must be >= 0, got ", min_rows);
  min_rows_ = min_rows;
  counts_ = Buffer(device, size_t(num_experts) * sizeof(int32_t));
  gathered_ = Buffer(device, size_t(ranks_) * size_t(num_experts) * sizeof(int32_t));
  host_gathered_.assign(size_t(ranks_) * size_t(num_experts), 0);
  loads_.assign(size_t(ranks_), std::vector<int64_t>(size_t(num_experts), 0));
  plan_ = plan_replication(loads_, plan_options());
  build_tables();
}

ReplicaExchange::~ReplicaExchange() = default;

void ReplicaExchange::check_context(const ExecContext& context) const {
  SY_CHECK(context.device == device_, "ReplicaExchange: context is on ", device_kind_name(context.device),
           ", the exchange on ", device_kind_name(device_));
}

const ReplicationPlan& ReplicaExchange::plan_step(const ExecContext& context, const Tensor& packed_offsets) {
  check_context(context);
  SY_CHECK(packed_offsets.dtype == DType::i32 && packed_offsets.numel() == num_experts_ + 1,
           "ReplicaExchange: packed offsets must be i32[", num_experts_ + 1, "], got ", packed_offsets.describe());
  Tensor counts = counts_.view(DType::i32, {num_experts_});
  ops::ep_send_counts(context, packed_offsets, counts);
  events_.comm_waits_for_compute(context, *communicator_);
  communicator_->all_gather(counts_.data(), gathered_.data(), num_experts_, DType::i32);
  communicator_->synchronize();  // the host sync: the plan needs the counts on the host
  Tensor host(host_gathered_.data(), DType::i32, DeviceKind::cpu, {int64_t(host_gathered_.size())});
  ops::copy(context, gathered_.view(DType::i32, {int64_t(host_gathered_.size())}), host);
  for (int source = 0; source < ranks_; ++source)
    for (int expert = 0; expert < num_experts_; ++expert)
      loads_[size_t(source)][size_t(expert)] = host_gathered_[size_t(source) * size_t(num_experts_) + size_t(expert)];
  plan_ = plan_replication(loads_, plan_options());
  build_tables();
  return plan_;
}

ReplicationStats ReplicaExchange::stats() const {
  ReplicationStats stats;
  stats.replicas = int64_t(plan_.replicas.size());
  stats.moved_rows = plan_.moved_rows();
  stats.max_load_before = plan_.max_load_before();
  stats.max_load_after = plan_.max_load_after();
  return stats;
}

void ReplicaExchange::build_tables() {
  const int virtual_local = virtual_local_experts();
  host_of_.assign(size_t(num_experts_), -1);
  slot_of_.assign(size_t(num_experts_), -1);
  std::vector<int> hosted_count(size_t(ranks_), 0);
  std::vector<const ExpertReplica*> by_expert(size_t(num_experts_), nullptr);
  for (const ExpertReplica& replica : plan_.replicas) {
    SY_CHECK(by_expert[size_t(replica.expert)] == nullptr, "ReplicaExchange: expert ", replica.expert,
             " has two replicas");
    by_expert[size_t(replica.expert)] = &replica;
  }
  // Slots in ascending expert id on each host: the replicas from one owner are then contiguous.
  for (int expert = 0; expert < num_experts_; ++expert) {
    const ExpertReplica* replica = by_expert[size_t(expert)];
    if (!replica) continue;
    int& used = hosted_count[size_t(replica->host)];
    SY_CHECK(used < slots_, "ReplicaExchange: rank ", replica->host, " hosts more than ", slots_, " replicas");
    host_of_[size_t(expert)] = replica->host;
    slot_of_[size_t(expert)] = used++;
  }
  expert_map_.assign(size_t(num_experts_), 0);
  hosted_experts_.clear();
  replicated_local_.clear();
  for (int expert = 0; expert < num_experts_; ++expert) {
    const int owner = expert / local_experts_, local = expert % local_experts_;
    expert_map_[size_t(expert)] = owner * virtual_local + local;
    const ExpertReplica* replica = by_expert[size_t(expert)];
    if (!replica) continue;
    if (std::binary_search(replica->sources.begin(), replica->sources.end(), rank_))
      expert_map_[size_t(expert)] = replica->host * virtual_local + local_experts_ + slot_of_[size_t(expert)];
    if (replica->host == rank_) hosted_experts_.push_back(expert);
    if (owner == rank_) replicated_local_.push_back(local);
  }
}

std::vector<int32_t> ReplicaExchange::virtual_offsets() const {
  const int virtual_count = virtual_experts();
  std::vector<int64_t> counts(size_t(virtual_count), 0);
  for (int expert = 0; expert < num_experts_; ++expert)
    counts[size_t(expert_map_[size_t(expert)])] += loads_[size_t(rank_)][size_t(expert)];
  std::vector<int32_t> offsets(size_t(virtual_count) + 1, 0);
  for (int id = 0; id < virtual_count; ++id) offsets[size_t(id) + 1] = int32_t(offsets[size_t(id)] + counts[size_t(id)]);
  return offsets;
}

std::vector<int> ReplicaExchange::replicas_between(int owner, int host) const {
  std::vector<int> experts;
  for (int expert = owner * local_experts_; expert < (owner + 1) * local_experts_; ++expert)
    if (host_of_[size_t(expert)] == host) experts.push_back(expert);
  return experts;
}

ReplicaExchange::MatrixLayout ReplicaExchange::matrix_layout(int64_t elements) const {
  MatrixLayout layout;
  layout.owner_counts.assign(size_t(ranks_), 0);
  layout.owner_offsets.assign(size_t(ranks_), 0);
  layout.host_counts.assign(size_t(ranks_), 0);
  layout.host_offsets.assign(size_t(ranks_), 0);
  // As owner: this rank's replicated matrices packed by host, hosts ascending, experts ascending.
  for (int host = 0; host < ranks_; ++host) {
    const int64_t count = int64_t(replicas_between(rank_, host).size());
    layout.owner_offsets[size_t(host)] = layout.packed * elements;
    layout.owner_counts[size_t(host)] = count * elements;
    layout.packed += count;
  }
  // As host: its slots from each owner are contiguous (ascending expert id).
  for (int slot = 0; slot < hosted(); ++slot) {
    const int owner = hosted_experts_[size_t(slot)] / local_experts_;
    if (layout.host_counts[size_t(owner)] == 0) layout.host_offsets[size_t(owner)] = int64_t(slot) * elements;
    layout.host_counts[size_t(owner)] += elements;
  }
  return layout;
}

Tensor ReplicaExchange::staging_matrices(const ExecContext& context, const Tensor& like, int64_t count) {
  const size_t matrix_bytes = size_t(like.dim(1) * like.dim(2)) * dtype_size(like.dtype);
  const size_t bytes = std::max<size_t>(size_t(count) * matrix_bytes, 1);  // none packed: nothing is read
  if (staging_.bytes() < bytes) {
    // Nothing queued may still use the old staging.
    ops::synchronize(context);
    communicator_->synchronize();
    staging_.reset();
    staging_ = Buffer(device_, bytes + bytes / 4);
  }
  return Tensor(staging_.data(), like.dtype, device_, {std::max<int64_t>(count, 1), like.dim(1), like.dim(2)});
}

namespace {

// Matrix `index` of a [n, a, b] tensor.
Tensor matrix(const Tensor& tensor, int64_t index) {
  const int64_t elements = tensor.dim(1) * tensor.dim(2);
  char* base = static_cast<char*>(tensor.data) + size_t(index) * size_t(elements) * dtype_size(tensor.dtype);
  return Tensor(base, tensor.dtype, tensor.device, {tensor.dim(1), tensor.dim(2)});
}

void check_matrices(const char* what, const Tensor& tensor, int64_t min_count, const Tensor& like, DeviceKind device) {
  SY_CHECK(tensor.rank == 3 && tensor.dim(0) >= min_count && tensor.dtype == like.dtype && tensor.device == device &&
               tensor.dim(1) == like.dim(1) && tensor.dim(2) == like.dim(2),
           "ReplicaExchange: ", what, " must be [>= ", min_count, ", ", like.dim(1), ", ", like.dim(2), "] ",
           dtype_name(like.dtype), " on ", device_kind_name(device), ", got ", tensor.describe());
}

}  // namespace

void ReplicaExchange::send_weights(const ExecContext& context, const Tensor& weights, Tensor& replica_weights) {
  check_context(context);
  SY_CHECK(weights.rank == 3 && weights.dim(0) == local_experts_ && weights.device == device_,
           "ReplicaExchange::send_weights: weights must be [", local_experts_, ", a, b] on ",
           device_kind_name(device_), ", got ", weights.describe());
  check_matrices("replica weights", replica_weights, hosted(), weights, device_);
  const MatrixLayout layout = matrix_layout(weights.dim(1) * weights.dim(2));
  const Tensor staging = staging_matrices(context, weights, layout.packed);
  int64_t at = 0;
  for (int host = 0; host < ranks_; ++host)
    for (int expert : replicas_between(rank_, host)) {
      Tensor destination = matrix(staging, at++);
      ops::copy(context, matrix(weights, expert % local_experts_), destination);
    }
  events_.comm_waits_for_compute(context, *communicator_);
  communicator_->all_to_all_v(staging_.data(), layout.owner_counts, layout.owner_offsets, replica_weights.data,
                              layout.host_counts, layout.host_offsets, weights.dtype);
  events_.record_comm(0, *communicator_);
  events_.compute_waits_for_comm(context, 0);
}

void ReplicaExchange::return_gradients(const ExecContext& context, const Tensor& replica_gradients,
                                       Tensor& owner_gradients) {
  check_context(context);
  SY_CHECK(owner_gradients.rank == 3 && owner_gradients.dim(0) == local_experts_ && owner_gradients.device == device_,
           "ReplicaExchange::return_gradients: owner gradients must be [", local_experts_, ", a, b] on ",
           device_kind_name(device_), ", got ", owner_gradients.describe());
  check_matrices("replica gradients", replica_gradients, hosted(), owner_gradients, device_);
  // The mirror of send_weights: slots go back to their owners, the owner receives by host.
  const MatrixLayout layout = matrix_layout(owner_gradients.dim(1) * owner_gradients.dim(2));
  const Tensor staging = staging_matrices(context, owner_gradients, layout.packed);
  events_.comm_waits_for_compute(context, *communicator_);
  communicator_->all_to_all_v(replica_gradients.data, layout.host_counts, layout.host_offsets, staging_.data(),
                              layout.owner_counts, layout.owner_offsets, owner_gradients.dtype);
  events_.record_comm(0, *communicator_);
  events_.compute_waits_for_comm(context, 0);
  int64_t at = 0;
  for (int host = 0; host < ranks_; ++host)
    for (int expert : replicas_between(rank_, host)) {
      Tensor destination = matrix(owner_gradients, expert % local_experts_);
      ops::copy(context, matrix(staging, at++), destination);
    }
}

}  // namespace switchyard
