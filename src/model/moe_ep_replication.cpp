// Hot-expert replication in the expert-parallel layer (src/model/moe_ep_layer.h, "Hot-expert
// replication"; the collectives: src/comm/replica_exchange.h).
#include <algorithm>

#include "src/model/moe_ep_layer.h"

namespace switchyard {

namespace {

// Grows a buffer of per-slot matrices (w1 [n, D, F or 2F] then w2 [n, F, D]) to `needed` slots (at
// least one, so that views never point at nothing). Nothing queued may still use the old one.
void grow_slot_buffer(const ExecContext& context, EpExchange& exchange, Buffer& buffer, int& capacity, int needed,
                      size_t bytes_per_slot, DeviceKind device) {
  needed = std::max(needed, 1);
  if (capacity >= needed && buffer.data() != nullptr) return;
  ops::synchronize(context);
  exchange.synchronize_communicators();
  buffer.reset();
  buffer = Buffer(device, size_t(needed) * bytes_per_slot);
  capacity = needed;
}

}  // namespace

void MoeEpLayer::create_replicas(const std::shared_ptr<Communicator>& expert_parallel, const EpLayerOptions& exchange) {
  const int slots = expert_parallel->size() > 1 ? exchange.max_replicas_per_rank : 0;
  replicates_ = slots > 0;
  if (!replicates_) return;
  // The CPU reference sums weight gradients in double: an f64 chain carries its partial sums exactly
  // (bit-identical results); CUDA's GEMMs accumulate in fp32, the gradient dtype.
  chain_dtype_ = device_ == DeviceKind::cpu ? DType::f64 : gradient_dtype_;
  MoeEpReplicas& replicas = ep_parts_.replicas;
  if (replicas.exchange) {  // another layer on this memory made them (every rank does the same)
    SY_CHECK(replicas.exchange->slots() == slots && replicas.exchange->ranks() == expert_parallel->size(),
             "MoeEpLayer: the shared replicas belong to another group or configuration");
    return;
  }
  replicas.exchange = std::make_unique<ReplicaExchange>(expert_parallel, device_, config_.moe.num_experts, slots,
                                                        exchange.replica_min_rows);
  const int64_t experts = config_.moe.num_experts, virtual_experts = replicas.exchange->virtual_experts();
  const int64_t choices = std::max<int64_t>(max_tokens_ * config_.moe.top_k, 1);
  // The step's tables: expert map [E], counts [E'], offsets [E' + 1]; then the slots' offsets [M + 1].
  const int64_t tables = experts + virtual_experts + (virtual_experts + 1) + (slots + 1);
  replicas.routing_ints = Buffer(device_, size_t(choices + tables) * sizeof(int32_t));
  replicas.host_tables.assign(size_t(tables), 0);
}

void MoeEpLayer::start_replicated(const ExecContext& context, const Tensor& x, const RoutingResult& routing,
                                  const MoeWeights& weights) {
  MoeEpReplicas& replicas = ep_parts_.replicas;
  ReplicaExchange& replica_exchange = *replicas.exchange;
  replica_exchange.plan_step(context, routing.expert_offsets);  // collective, a host sync
  replication_stats_ = replica_exchange.stats();
  replicated_sent_rows_ = replica_exchange.loads_of(replica_exchange.rank());
  build_replica_routing(context, routing);

  Part& part = parts_.front();
  part.first_token = 0;
  part.tokens = x.dim(0);
  const int64_t send_bound = padded_rows_upper_bound(router_.params());
  SY_CHECK(send_bound <= max_send_rows_, "MoeEpLayer: ", send_bound, " send rows exceed the ", max_send_rows_,
           " allocated");
  const RoutingParams params =
      choice_layout_params(part.tokens, replica_exchange.virtual_experts(), int(routing.expert_ids.dim(1)));
  part.exchange->start_forward(context, x, replicas.routing, params, router_.dispatch_map(send_bound));
  prepare_replica_slots(context);

  // The replicas' weights, owner -> host, before any expert runs (two collectives).
  const int hosted = replica_exchange.hosted();
  Tensor replica_w1 = slot_matrices(replicas.weights, replicas.weight_slots, activation_dtype_, false, hosted);
  Tensor replica_w2 = slot_matrices(replicas.weights, replicas.weight_slots, activation_dtype_, true, hosted);
  replica_exchange.send_weights(context, weights.w1, replica_w1);
  replica_exchange.send_weights(context, weights.w2, replica_w2);
}

void MoeEpLayer::build_replica_routing(const ExecContext& context, const RoutingResult& routing) {
  MoeEpReplicas& replicas = ep_parts_.replicas;
  const ReplicaExchange& replica_exchange = *replicas.exchange;
  const int64_t experts = config_.moe.num_experts, virtual_experts = replica_exchange.virtual_experts();
  const int64_t tokens = routing.expert_ids.dim(0), choices = routing.expert_ids.dim(1);
  const int64_t region = std::max<int64_t>(max_tokens_ * config_.moe.top_k, 1);
  SY_CHECK(tokens * choices <= region, "MoeEpLayer: ", tokens, " x ", choices, " choices exceed the replicas' ",
           region);
  int32_t* ints = replicas.routing_ints.as<int32_t>();
  int32_t* tables = ints + region;

  // This rank's table (global expert -> virtual expert) and its packed layout by virtual expert:
  // the same rows, regrouped.
  std::vector<int32_t>& host = replicas.host_tables;
  const std::vector<int32_t>& expert_map = replica_exchange.expert_map();
  const std::vector<int32_t> offsets = replica_exchange.virtual_offsets();
  std::copy(expert_map.begin(), expert_map.end(), host.begin());
  for (int64_t id = 0; id < virtual_experts; ++id)
    host[size_t(experts + id)] = offsets[size_t(id) + 1] - offsets[size_t(id)];
  std::copy(offsets.begin(), offsets.end(), host.begin() + experts + virtual_experts);
  const int64_t uploaded = experts + 2 * virtual_experts + 1;
  const Tensor host_view(host.data(), DType::i32, DeviceKind::cpu, {uploaded});
  Tensor device_view(tables, DType::i32, device_, {uploaded});
  ops::copy(context, host_view, device_view);

  RoutingResult& result = replicas.routing;
  result = routing;  // the router's gates, slots and scalars
  result.expert_ids = Tensor(ints, DType::i32, device_, {tokens, choices});
  result.expert_counts = Tensor(tables + experts, DType::i32, device_, {virtual_experts});
  result.expert_offsets = Tensor(tables + experts + virtual_experts, DType::i32, device_, {virtual_experts + 1});
  const Tensor expert_map_view(tables, DType::i32, device_, {experts});
  // The kept choices, renamed in place to their virtual experts; their slots stay the router's.
  ops::ep_kept_choices(context, routing.expert_ids, routing.slots, routing.scalars, result.expert_ids);
  ops::ep_map_choice_ids(context, result.expert_ids, expert_map_view, result.expert_ids);
}

void MoeEpLayer::prepare_replica_slots(const ExecContext& context) {
  MoeEpReplicas& replicas = ep_parts_.replicas;
  const ReplicaExchange& replica_exchange = *replicas.exchange;
  EpExchange& exchange = *parts_.front().exchange;
  const ExpertExchangePlan& plan = exchange.plan();
  const int hosted = replica_exchange.hosted(), slots = replica_exchange.slots();
  SY_CHECK(plan.local_experts == local_experts_ + slots, "MoeEpLayer: the exchange holds ", plan.local_experts,
           " virtual experts per rank, expected ", local_experts_ + slots);
  const int64_t first_slot_row = plan.expert_offsets[size_t(local_experts_)];
  // Every rank knows the plan: the slots it does not use receive nothing.
  SY_CHECK(plan.expert_offsets[size_t(local_experts_ + hosted)] == plan.expert_rows(), "MoeEpLayer: rows arrived for ",
           "a replica slot this rank does not host");
  std::vector<int32_t> slot_offsets(size_t(hosted) + 1);
  for (int slot = 0; slot <= hosted; ++slot)
    slot_offsets[size_t(slot)] = int32_t(plan.expert_offsets[size_t(local_experts_ + slot)] - first_slot_row);
  const int64_t region = std::max<int64_t>(max_tokens_ * config_.moe.top_k, 1);
  const int64_t experts = config_.moe.num_experts, virtual_experts = replica_exchange.virtual_experts();
  int32_t* at = replicas.routing_ints.as<int32_t>() + region + experts + 2 * virtual_experts + 1;
  replicas.slot_offsets = Tensor(at, DType::i32, device_, {int64_t(hosted) + 1});
  ops::copy(context, Tensor(slot_offsets.data(), DType::i32, DeviceKind::cpu, {int64_t(hosted) + 1}),
            replicas.slot_offsets);
  const size_t matrices = size_t(config_.d_model) * size_t(config_.w1_columns()) +
                          size_t(config_.moe.expert_d_ff) * size_t(config_.d_model);
  grow_slot_buffer(context, exchange, replicas.weights, replicas.weight_slots, hosted,
                   matrices * dtype_size(activation_dtype_), device_);
}

Tensor MoeEpLayer::slot_matrices(const Buffer& buffer, int capacity, DType dtype, bool second, int slots) const {
  SY_CHECK(slots <= capacity, "MoeEpLayer: ", slots, " replica slots, room for ", capacity);
  const int64_t d_model = config_.d_model, d_ff = config_.moe.expert_d_ff, w1_columns = config_.w1_columns();
  char* base = static_cast<char*>(buffer.data());
  if (!second) return Tensor(base, dtype, device_, {int64_t(slots), d_model, w1_columns});
  base += size_t(capacity) * size_t(d_model * w1_columns) * dtype_size(dtype);
  return Tensor(base, dtype, device_, {int64_t(slots), d_ff, d_model});
}

Tensor MoeEpLayer::owner_chain(const Tensor& gradient, bool second) {
  if (chain_dtype_ == gradient_dtype_) return gradient;
  // CPU f32: the f64 chain (CPU contexts queue nothing, so growing needs no synchronization).
  MoeEpReplicas& replicas = ep_parts_.replicas;
  const size_t w1_bytes = size_t(local_experts_) * size_t(config_.d_model * config_.w1_columns()) * dtype_size(chain_dtype_);
  const size_t bytes = w1_bytes + size_t(local_experts_) * size_t(config_.moe.expert_d_ff * config_.d_model) *
                                      dtype_size(chain_dtype_);
  SY_CHECK(device_ == DeviceKind::cpu, "MoeEpLayer: a chain wider than the gradients is the CPU's");
  if (replicas.owner_gradients.bytes() < bytes) {
    replicas.owner_gradients.reset();
    replicas.owner_gradients = Buffer(device_, bytes);
  }
  char* base = static_cast<char*>(replicas.owner_gradients.data()) + (second ? w1_bytes : 0);
  return Tensor(base, chain_dtype_, device_, {gradient.dim(0), gradient.dim(1), gradient.dim(2)});
}

void MoeEpLayer::replicated_experts_forward(const ExecContext& context, const MoeWeights& weights) {
  Part& part = parts_.front();
  const ExpertExchangePlan& plan = part.exchange->plan();
  const MoeEpReplicas& replicas = ep_parts_.replicas;
  const int hosted = replicas.exchange->hosted();
  const int64_t own_rows = plan.expert_offsets[size_t(local_experts_)];
  // One chunk: the own experts' offsets are the first L + 1 of the chunk's (which start at row 0).
  const Tensor own_offsets(part.exchange->chunk_offsets(0).data, DType::i32, device_, {int64_t(local_experts_) + 1});
  expert_rows_forward(context, part, 0, own_rows, own_offsets, weights.w1, weights.w2);
  expert_rows_forward(context, part, own_rows, plan.expert_rows() - own_rows, replicas.slot_offsets,
                      slot_matrices(replicas.weights, replicas.weight_slots, activation_dtype_, false, hosted),
                      slot_matrices(replicas.weights, replicas.weight_slots, activation_dtype_, true, hosted));
}

void MoeEpLayer::replicated_experts_backward(const ExecContext& context, const MoeWeights& weights,
                                             MoeGradients& gradients) {
  Part& part = parts_.front();
  const ExpertExchangePlan& plan = part.exchange->plan();
  MoeEpReplicas& replicas = ep_parts_.replicas;
  ReplicaExchange& replica_exchange = *replicas.exchange;
  const int hosted = replica_exchange.hosted();
  const int64_t own_rows = plan.expert_offsets[size_t(local_experts_)];
  const size_t matrices = size_t(config_.d_model) * size_t(config_.w1_columns()) +
                          size_t(config_.moe.expert_d_ff) * size_t(config_.d_model);
  grow_slot_buffer(context, *part.exchange, replicas.gradients, replicas.gradient_slots, hosted,
                   matrices * dtype_size(chain_dtype_), device_);

  // 1. The slots: their rows' weight gradients from 0 (the first sources of each replicated expert).
  Tensor slot_grad_w1 = slot_matrices(replicas.gradients, replicas.gradient_slots, chain_dtype_, false, hosted);
  Tensor slot_grad_w2 = slot_matrices(replicas.gradients, replicas.gradient_slots, chain_dtype_, true, hosted);
  expert_rows_backward(context, part, own_rows, plan.expert_rows() - own_rows, replicas.slot_offsets,
                       slot_matrices(replicas.weights, replicas.weight_slots, activation_dtype_, false, hosted),
                       slot_matrices(replicas.weights, replicas.weight_slots, activation_dtype_, true, hosted), slot_grad_w1, slot_grad_w2,
                       /*continue_sums=*/false);
  // 2. The partial sums to their owners (collective), at their experts' places in the chain; the
  //    other experts start from zero there.
  const bool continue_sums = !replica_exchange.replicated_local_experts().empty();
  Tensor chain_w1 = owner_chain(gradients.w1, false), chain_w2 = owner_chain(gradients.w2, true);
  if (continue_sums) {
    ops::fill_zero(context, chain_w1);
    ops::fill_zero(context, chain_w2);
  }
  replica_exchange.return_gradients(context, slot_grad_w1, chain_w1);
  replica_exchange.return_gradients(context, slot_grad_w2, chain_w2);
  // 3. The own experts, continuing those sums over this rank's rows (the later sources), rounded
  //    once to the gradient dtype where the chain is wider.
  const Tensor own_offsets(part.exchange->chunk_offsets(0).data, DType::i32, device_, {int64_t(local_experts_) + 1});
  Tensor& target_w1 = continue_sums ? chain_w1 : gradients.w1;
  Tensor& target_w2 = continue_sums ? chain_w2 : gradients.w2;
  expert_rows_backward(context, part, 0, own_rows, own_offsets, weights.w1, weights.w2, target_w1, target_w2,
                       continue_sums);
  if (continue_sums && chain_dtype_ != gradient_dtype_) {
    ops::convert(context, chain_w1, gradients.w1);
    ops::convert(context, chain_w2, gradients.w2);
  }
}

}  // namespace switchyard
