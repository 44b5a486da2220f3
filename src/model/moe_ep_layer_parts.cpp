// The parts of the expert-parallel layer's batch (src/model/moe_ep_layer.h, "Two-part overlap"):
// their exchanges, their routings over the router's rows, and the buffers that grow with them.
#include <algorithm>

#include "src/model/moe_ep_layer.h"

namespace switchyard {

namespace {

// Integer regions of a part's routing_ints: four of [max_tokens, K], then counts [E], offsets
// [E + 1] and scalars.
enum PartInts { kPartIds, kPartSlots, kPartChoiceRows, kPartRowTokens, kPartChoiceRegions };

}  // namespace

Tensor MoeEpLayer::token_rows(const Tensor& tensor, int64_t first, int64_t count) {
  SY_CHECK(tensor.rank == 2 && first >= 0 && count >= 0 && first + count <= tensor.dim(0), "MoeEpLayer: rows [",
           first, ", ", first + count, ") of ", tensor.describe());
  const size_t row_bytes = size_t(tensor.dim(1)) * dtype_size(tensor.dtype);
  return Tensor(static_cast<char*>(tensor.data) + size_t(first) * row_bytes, tensor.dtype, tensor.device,
                {count, tensor.dim(1)});
}

void MoeEpLayer::create_parts(const std::shared_ptr<Communicator>& expert_parallel, const EpLayerOptions& exchange) {
  SY_CHECK_INPUT(exchange.sm_budget >= 0, "parallel.ep_sm_budget must be >= 0, got ", exchange.sm_budget);
  const bool two_parts = exchange.overlap == EpOverlap::two_part;
  const int choices = config_.moe.top_k, experts = config_.moe.num_experts;
  // Replication runs the exchange over virtual experts: each rank's own, then its replica slots.
  const int replica_slots = expert_parallel->size() > 1 ? exchange.max_replicas_per_rank : 0;
  const int exchanged_experts = expert_parallel->size() * (local_experts_ + replica_slots);
  SY_CHECK_INPUT(exchange.max_replicas_per_rank >= 0, "parallel.max_replicas_per_rank must be >= 0, got ",
                 exchange.max_replicas_per_rank);
  if (replica_slots > 0) {  // the current limits of replication (src/model/moe_ep_layer.h)
    SY_CHECK_INPUT(!two_parts, "parallel.max_replicas_per_rank = ", replica_slots,
                   " needs parallel.ep_overlap = none (replication with two_part is not supported yet)");
    SY_CHECK_INPUT(exchange.a2a_chunks == 1, "parallel.max_replicas_per_rank = ", replica_slots,
                   " needs parallel.a2a_chunks = 1, got ", exchange.a2a_chunks,
                   " (replication runs the exchange in one chunk)");
    SY_CHECK_INPUT(exchange.node_group == nullptr, "parallel.max_replicas_per_rank = ", replica_slots,
                   " needs the one-level exchange; this expert-parallel group spans nodes (parallel.ranks_per_node)");
  }
  // Part 0 takes T / 2 tokens, part 1 the rest.
  std::vector<int64_t> part_max_tokens{max_tokens_};
  if (two_parts) part_max_tokens = {max_tokens_ / 2, max_tokens_ - max_tokens_ / 2};
  if (!parts_.empty()) {  // another layer on this memory made them (every rank does the same)
    SY_CHECK(parts_.size() == part_max_tokens.size() && parts_.front().max_tokens == part_max_tokens.front() &&
                 parts_.front().exchange->ranks() == expert_parallel->size() &&
                 parts_.front().exchange->chunks() <= exchange.a2a_chunks &&
                 parts_.front().exchange->local_experts() == local_experts_ + replica_slots,
             "MoeEpLayer: the shared parts belong to another group or configuration");
    return;
  }
  parts_.resize(part_max_tokens.size());
  const size_t activation_size = dtype_size(activation_dtype_);
  for (size_t index = 0; index < parts_.size(); ++index) {
    Part& part = parts_[index];
    part.max_tokens = part_max_tokens[index];
    // A part's rows are every kept choice of its tokens: the router's bound with one part, at most
    // all K choices of each token with two (and never more than the router's bound: an even load
    // is the part's share of it, what the receive buffers start at).
    const int64_t send_rows = two_parts ? part.max_tokens * choices : max_send_rows_;
    EpExchangeOptions options;
    options.device = device_;
    options.num_experts = exchanged_experts;
    options.segment_alignment = config_.moe.segment_alignment;
    options.chunks = exchange.a2a_chunks;
    options.transport = exchange.transport;
    options.dispatch = exchange.dispatch;
    options.sm_budget = exchange.sm_budget;
    options.row_dtype = activation_dtype_;
    options.row_width = config_.d_model;
    options.max_send_rows = send_rows;
    options.initial_rows = std::min(send_rows, max_send_rows_);  // balanced: every rank receives what it sends
    options.node_group = exchange.node_group;
    options.rail_group = exchange.rail_group;
    part.exchange = EpExchange::create(expert_parallel, options);

    part.hidden_capacity =
        options.initial_rows + int64_t(part.exchange->local_experts()) * (config_.moe.segment_alignment - 1);
    part.hidden_pre = Buffer(device_, size_t(part.hidden_capacity) * size_t(config_.w1_columns()) * activation_size);
    part.hidden_post =
        Buffer(device_, size_t(part.hidden_capacity) * size_t(config_.moe.expert_d_ff) * activation_size);
    if (two_parts) {
      const int64_t region = std::max<int64_t>(part.max_tokens * choices, 1);
      const int64_t ints = kPartChoiceRegions * region + experts + (experts + 1) + kNumRoutingScalars;
      part.routing_ints = Buffer(device_, size_t(ints) * sizeof(int32_t));
    }
  }
}

void MoeEpLayer::build_part_routing(const ExecContext& context, const RoutingResult& routing, Part& part) {
  const int64_t tokens = part.tokens, choices = routing.expert_ids.dim(1);
  const int experts = config_.moe.num_experts;
  const int64_t region = std::max<int64_t>(part.max_tokens * choices, 1);
  SY_CHECK(tokens * choices <= region, "MoeEpLayer: ", tokens, " tokens exceed the part's ", part.max_tokens);
  int32_t* ints = part.routing_ints.as<int32_t>();
  auto choice_region = [&](int which) {
    return Tensor(ints + which * region, DType::i32, device_, {tokens, choices});
  };
  int32_t* small = ints + kPartChoiceRegions * region;
  RoutingResult& result = part.routing;
  result.expert_ids = choice_region(kPartIds);
  result.slots = choice_region(kPartSlots);
  result.expert_counts = Tensor(small, DType::i32, device_, {experts});
  result.expert_offsets = Tensor(small + experts, DType::i32, device_, {experts + 1});
  result.scalars = Tensor(small + 2 * experts + 1, DType::i32, device_, {kNumRoutingScalars});
  result.gates = token_rows(routing.gates, part.first_token, tokens);
  part.map.choice_rows = choice_region(kPartChoiceRows);
  part.map.row_tokens = Tensor(ints + kPartRowTokens * region, DType::i32, device_, {tokens * choices});

  // The choices the full routing kept (capacity and drops were decided over all T tokens), then
  // their layout by expert.
  ops::ep_kept_choices(context, token_rows(routing.expert_ids, part.first_token, tokens),
                       token_rows(routing.slots, part.first_token, tokens), routing.scalars, result.expert_ids);
  ops::ep_choice_layout(context, result.expert_ids, experts, result.slots, result.expert_counts, result.expert_offsets,
                        result.scalars);
}

void MoeEpLayer::start_parts(const ExecContext& context, const Tensor& x, const RoutingResult& routing) {
  const int64_t tokens = x.dim(0);
  if (parts_.size() == 1) {
    Part& part = parts_.front();
    part.first_token = 0;
    part.tokens = tokens;
    const int64_t send_bound = padded_rows_upper_bound(router_.params());
    SY_CHECK(send_bound <= max_send_rows_, "MoeEpLayer: ", send_bound, " send rows exceed the ", max_send_rows_,
             " allocated");
    part.exchange->start_forward(context, x, routing, router_.params(), router_.dispatch_map(send_bound));
    return;
  }
  parts_[0].first_token = 0;
  parts_[0].tokens = tokens / 2;
  parts_[1].first_token = tokens / 2;
  parts_[1].tokens = tokens - tokens / 2;
  // Both routings first: the count exchanges then follow each other.
  for (Part& part : parts_) build_part_routing(context, routing, part);
  for (Part& part : parts_) {
    const RoutingParams params =
        choice_layout_params(part.tokens, config_.moe.num_experts, int(routing.expert_ids.dim(1)));
    part.exchange->start_forward(context, token_rows(x, part.first_token, part.tokens), part.routing, params,
                                 part.map);
  }
}

void MoeEpLayer::ensure_hidden_capacity(const ExecContext& context, Part& part, bool with_backward) {
  const int64_t expert_rows = part.exchange->plan().expert_rows();
  const bool grow = expert_rows > part.hidden_capacity;
  const bool grow_backward = with_backward && expert_rows > part.backward_hidden_capacity;
  if (!grow && !grow_backward) return;
  // The caching allocator does not track streams: nothing may still use a buffer we free.
  ops::synchronize(context);
  part.exchange->synchronize_communicators();
  const size_t activation_size = dtype_size(activation_dtype_);
  if (grow) {
    part.hidden_capacity = with_headroom(expert_rows);
    for (Buffer* buffer : {&part.hidden_pre, &part.hidden_post}) buffer->reset();
    part.hidden_pre = Buffer(device_, size_t(part.hidden_capacity) * size_t(config_.w1_columns()) * activation_size);
    part.hidden_post =
        Buffer(device_, size_t(part.hidden_capacity) * size_t(config_.moe.expert_d_ff) * activation_size);
  }
  if (grow_backward) {
    part.backward_hidden_capacity = std::max(part.hidden_capacity, expert_rows);
    part.grad_hidden_pre.reset();
    part.grad_hidden_pre =
        Buffer(device_, size_t(part.backward_hidden_capacity) * size_t(config_.w1_columns()) * activation_size);
  }
}

}  // namespace switchyard
