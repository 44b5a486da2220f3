// The hierarchical transport of EpExchange (src/comm/ep_exchange.h): expert parallelism over
// ranks on several nodes, where the network is the scarce link (DeepEP's normal mode, in two
// all-to-all-v legs built from the ops of src/ops/ep_hier_ops.h).
//
// The group's P = N x R ranks: rank r sits on node r / R at place r % R; node n holds the
// G = R*L experts [n*G, (n+1)*G). node_group: the R ranks of this rank's node; rail_group: the N
// ranks at this rank's place on every node. A token's row crosses the network once per node that
// holds any of its kept choices, to the rank at the sender's own place there (its "relay"); the
// relay fans it out to the node's experts through an ordinary one-level exchange over node_group
// (nccl or nvlink: the `inner` exchange), and sums the node's gate-weighted results into one
// partial row that crosses back. Per token and destination node, the network carries:
//   forward   x row (D elements) + K int32 node-local expert ids + K gates out, the partial y back;
//   backward  dL/dy row out; K dL/dgates and the partial dL/dx row back
// against one row per kept choice each way for the flat exchange (k choices on one node: k rows).
//
// Forward, on rank (n, i) with tokens x [T, D] and its routing:
//   node_ids = ep_node_choices(routing)               [T, KN]: the distinct nodes, KN = min(K, N)
//   node layout = ep_choice_layout(node_ids, N)        rows by destination node, stable
//   net_send = permute(x), meta = ep_pack_node_choices each (token, node) row and its choices there
//   rail all-to-all-v of counts, then rows and meta   -> relay rows x' [M', D], meta' [M', K]
//   routing' = ep_choice_layout(meta ids', G) + gates' the relay's tokens are the rows x'
//   inner.start_forward(x', routing')                  the node-level exchange and its plan
//   ... the layer runs the experts through inner's chunks ...
//   inner.combine -> partial [M', D] = sum over the node's choices of gate * O
//   rail all-to-all-v back; y[t] = sum of t's partial rows (permute_backward over the node layout)
// Backward mirrors it: dL/dy rows go out over the node layout; the relay's inner.start_backward
// gives dL/dgates' [M', K] (from the O rows it kept) and the node's dL/dO rows; dL/dgates' cross
// back and land in the sender's [T, K] (ep_unpack_node_gate_grads); inner's combine sums each
// relay row's dL/dX, which crosses back and sums per token.
//
// FP8 dispatch (parallel.ep_dispatch fp8) applies to the network leg, the scarce link: the forward's
// x rows cross as e4m3 records (src/ops/fp8_rows.h) and the relay dequantizes them on arrival; the
// node leg then moves the dequantized rows in the activation dtype (quantizing them again would
// add nothing but a second rounding), and everything else stays in the activation dtype.
//
// Every buffer sized by what arrives (relay rows: up to N x T) grows on demand, after waiting for
// every stream, like the one-level transports' receive buffers.
#include <algorithm>
#include <memory>

#include "src/comm/ep_exchange_transports.h"
#include "src/core/error.h"
#include "src/ops/fp8_rows.h"

namespace switchyard {
namespace {

class HierarchicalEpExchange final : public EpExchange {
 public:
  HierarchicalEpExchange(std::shared_ptr<Communicator> expert_parallel, const EpExchangeOptions& options)
      : options_(options), group_(std::move(expert_parallel)), node_(options.node_group), rail_(options.rail_group) {
    const int ranks = group_->size(), per_node = node_->size(), nodes = rail_->size();
    SY_CHECK_INPUT(per_node * nodes == ranks, "hierarchical exchange: ", nodes, " nodes x ", per_node,
                   " ranks per node do not make the expert-parallel group of ", ranks);
    SY_CHECK(rail_->rank() == group_->rank() / per_node && node_->rank() == group_->rank() % per_node,
             "hierarchical exchange: rank ", group_->rank(), " of the group is rank ", node_->rank(), " of its node and ",
             rail_->rank(), " of its rail; expected ", group_->rank() % per_node, " and ", group_->rank() / per_node);
    SY_CHECK_INPUT(options.num_experts % ranks == 0, "hierarchical exchange: ", options.num_experts,
                   " experts do not split over ", ranks, " ranks");
    experts_per_node_ = options.num_experts / nodes;
    rail_dispatcher_ = std::make_unique<ExpertDispatcher>(rail_, options.device, nodes, 1, 1);

    fp8_network_ = options.dispatch == EpDispatch::fp8;
    EpExchangeOptions inner = options;
    inner.num_experts = experts_per_node_;
    inner.dispatch = EpDispatch::activation;  // fp8 is the network leg's
    inner.node_group = nullptr;
    inner.rail_group = nullptr;
    inner_ = EpExchange::create(node_, inner);
  }

  EpTransport transport() const override { return inner_->transport(); }
  bool hierarchical() const override { return true; }
  EpDispatch dispatch_format() const override { return options_.dispatch; }
  int ranks() const override { return group_->size(); }
  int local_experts() const override { return inner_->local_experts(); }
  int first_expert() const override { return rail_->rank() * experts_per_node_ + inner_->first_expert(); }
  int chunks() const override { return inner_->chunks(); }
  const ExpertExchangePlan& plan() const override { return inner_->plan(); }
  Tensor chunk_offsets(int chunk) const override { return inner_->chunk_offsets(chunk); }
  EpExchangeStats stats() const override {
    EpExchangeStats stats = inner_->stats();
    // Rows to this rank's own node stay here (the rail's self piece); the rest cross the network.
    const ExpertExchangePlan& rail_plan = rail_dispatcher_->plan();
    const int own_node = rail_->rank();
    stats.network_rows = rail_plan.send_rows() -
                         (rail_plan.send_counts.empty() ? 0 : int64_t(rail_plan.send_counts[size_t(own_node)]));
    return stats;
  }
  void synchronize_communicators() override {
    inner_->synchronize_communicators();
    rail_->synchronize();
  }
  Tensor expert_input(int64_t first_row, int64_t count) const override { return inner_->expert_input(first_row, count); }
  Tensor expert_output(int64_t first_row, int64_t count) const override {
    return inner_->expert_output(first_row, count);
  }

  const ExpertExchangePlan& start_forward(const ExecContext& context, const Tensor& x, const RoutingResult& routing,
                                          const RoutingParams&, const DispatchMap&) override {
    const int64_t tokens = x.dim(0), choices = routing.expert_ids.dim(1);
    const int nodes = rail_->size();
    SY_CHECK_INPUT(choices <= experts_per_node_, "hierarchical exchange: top_k ", choices, " exceeds the ",
                   experts_per_node_, " experts per node (moe.num_experts / nodes)");
    routing_ = &routing;
    tokens_ = tokens;
    choices_ = int(choices);
    node_slots_ = int(std::min<int64_t>(choices, nodes));
    gate_dtype_ = routing.gates.dtype;
    ensure_sender_capacity(context, tokens);

    // The node layout of this rank's tokens, and the count exchange over the rail.
    Tensor node_ids = sender_ints(kNodeIds, tokens * node_slots_, {tokens, node_slots_});
    ops::ep_node_choices(context, routing.expert_ids, routing.slots, routing.scalars, experts_per_node_, nodes,
                         node_ids);
    node_routing_ = node_layout_routing(tokens);
    ops::ep_choice_layout(context, node_ids, nodes, node_routing_.slots, node_routing_.expert_counts,
                          node_routing_.expert_offsets, node_routing_.scalars);
    rail_dispatcher_->start_count_exchange(context, node_routing_.expert_offsets);
    node_map_ = node_layout_map(tokens);
    Tensor net_send = rows_of(net_send_, tokens * node_slots_, x.dim(1), x.dtype);
    ops::permute(context, x, node_routing_, node_params(tokens), net_send, node_map_);
    const ExpertExchangePlan& rail_plan = rail_dispatcher_->finish_count_exchange(context);
    const int64_t sent = rail_plan.send_rows(), relay_rows = rail_plan.recv_rows();
    Tensor meta_ids = sender_ints(kMetaIds, sent * choices_, {sent, choices});
    Tensor meta_gates = floats(meta_send_gates_, sent, choices);
    ops::ep_pack_node_choices(context, routing.expert_ids, routing.gates, routing.slots, routing.scalars, node_ids,
                              node_map_.choice_rows, experts_per_node_, meta_ids, meta_gates);

    // The network leg: rows and what travels with them.
    ensure_relay_capacity(context, relay_rows);
    Tensor relay = relay_rows_view(relay_rows);
    Tensor relay_ids = relay_ints(kRelayIds, relay_rows * choices_, {relay_rows, choices});
    Tensor relay_gates = floats(relay_gates_, relay_rows, choices);
    const Tensor sent_rows = rows_of(net_send_, sent, options_.row_width, options_.row_dtype);
    Tensor relay_records;
    if (fp8_network_) {
      const int64_t record = fp8_row_bytes(options_.row_width);
      Tensor send_records = rows_of(net_send_fp8_, sent, record, DType::u8);
      relay_records = rows_of(relay_fp8_, relay_rows, record, DType::u8);
      ops::quantize_rows_fp8(context, sent_rows, send_records);
      rail_dispatcher_->dispatch(context, 0, send_records, relay_records);
    } else {
      rail_dispatcher_->dispatch(context, 0, sent_rows, relay);
    }
    rail_dispatcher_->dispatch(context, 0, meta_ids, relay_ids);
    rail_dispatcher_->dispatch(context, 0, meta_gates, relay_gates);
    rail_dispatcher_->wait_dispatched(context, 0);
    if (fp8_network_) ops::dequantize_rows_fp8(context, relay_records, relay);

    // The relay's tokens are its received rows; their routing is the node-local expert ids.
    relay_routing_ = relay_layout_routing(relay_rows, relay_ids, relay_gates);
    ops::ep_choice_layout(context, relay_ids, experts_per_node_, relay_routing_.slots, relay_routing_.expert_counts,
                          relay_routing_.expert_offsets, relay_routing_.scalars);
    return inner_->start_forward(context, relay, relay_routing_, relay_params(relay_rows), relay_map(relay_rows));
  }

  void dispatch(const ExecContext& context, EpPass pass) override { inner_->dispatch(context, pass); }
  void receive(const ExecContext& context, EpPass pass, int chunk) override { inner_->receive(context, pass, chunk); }
  void send_back(const ExecContext& context, EpPass pass, int chunk) override {
    inner_->send_back(context, pass, chunk);
  }

  // Forward: each relay row's partial sum over the node's experts (gates applied there); backward:
  // each relay row's dL/dx over the node. Either crosses back once and sums per token.
  void combine(const ExecContext& context, EpPass pass, Tensor& out) override {
    SY_CHECK(routing_ != nullptr, "EpExchange::combine: no start_forward before it");
    const ExpertExchangePlan& rail_plan = rail_dispatcher_->plan();
    Tensor relay = relay_rows_view(rail_plan.recv_rows());
    inner_->combine(context, pass, relay);
    Tensor returned = rows_of(net_send_, rail_plan.send_rows(), options_.row_width, options_.row_dtype);
    rail_dispatcher_->combine(context, 0, relay, returned);
    rail_dispatcher_->wait_combined(context);
    ops::permute_backward(context, returned, node_map_, tokens_, out);
  }

  void start_backward(const ExecContext& context, const Tensor& grad_y, Tensor& grad_gates) override {
    SY_CHECK(routing_ != nullptr, "EpExchange::start_backward: no forward before it");
    const ExpertExchangePlan& rail_plan = rail_dispatcher_->plan();
    const int64_t sent = rail_plan.send_rows(), relay_rows = rail_plan.recv_rows();
    // dL/dy rows over the forward's node layout (permute rewrites the same map).
    Tensor net_send = rows_of(net_send_, tokens_ * node_slots_, options_.row_width, options_.row_dtype);
    ops::permute(context, grad_y, node_routing_, node_params(tokens_), net_send, node_map_);
    Tensor relay = relay_rows_view(relay_rows);
    rail_dispatcher_->dispatch(context, 0, rows_of(net_send_, sent, options_.row_width, options_.row_dtype), relay);
    rail_dispatcher_->wait_dispatched(context, 0);
    // The relay's gate gradients (from the O rows it kept) and the node's dL/dO rows.
    Tensor relay_grad_gates = floats(relay_grad_gates_, relay_rows, choices_);
    inner_->start_backward(context, relay, relay_grad_gates);
    Tensor returned_grad_gates = floats(meta_grad_gates_, sent, choices_);
    rail_dispatcher_->combine(context, 0, relay_grad_gates, returned_grad_gates);
    rail_dispatcher_->wait_combined(context);
    const Tensor node_ids = sender_ints(kNodeIds, tokens_ * node_slots_, {tokens_, node_slots_});
    ops::ep_unpack_node_gate_grads(context, returned_grad_gates, routing_->expert_ids, routing_->slots,
                                   routing_->scalars, node_ids, node_map_.choice_rows, experts_per_node_, grad_gates);
  }

 private:
  // Integer regions of the sender's and the relay's int32 buffers.
  enum SenderInts { kNodeIds, kNodeSlots, kNodeChoiceRows, kNodeRowTokens, kMetaIds, kNumSenderInts };
  enum RelayInts { kRelayIds, kRelaySlots, kRelayChoiceRows, kRelayRowTokens, kNumRelayInts };

  RoutingParams node_params(int64_t tokens) const { return choice_layout_params(tokens, rail_->size(), node_slots_); }
  RoutingParams relay_params(int64_t rows) const { return choice_layout_params(rows, experts_per_node_, choices_); }

  // The sender's node layout as a RoutingResult that permute / permute_backward read.
  RoutingResult node_layout_routing(int64_t tokens) {
    RoutingResult result;
    const int nodes = rail_->size();
    result.expert_ids = sender_ints(kNodeIds, tokens * node_slots_, {tokens, node_slots_});
    result.slots = sender_ints(kNodeSlots, tokens * node_slots_, {tokens, node_slots_});
    result.expert_counts = small_ints(0, nodes);
    result.expert_offsets = small_ints(nodes, nodes + 1);
    result.scalars = small_ints(2 * nodes + 1, kNumRoutingScalars);
    return result;
  }
  DispatchMap node_layout_map(int64_t tokens) {
    DispatchMap map;
    map.choice_rows = sender_ints(kNodeChoiceRows, tokens * node_slots_, {tokens, node_slots_});
    map.row_tokens = sender_ints(kNodeRowTokens, tokens * node_slots_, {tokens * node_slots_});
    return map;
  }
  RoutingResult relay_layout_routing(int64_t rows, const Tensor& ids, const Tensor& gates) {
    RoutingResult result;
    const int experts = experts_per_node_;
    result.expert_ids = ids;
    result.gates = gates;
    result.slots = relay_ints(kRelaySlots, rows * choices_, {rows, choices_});
    const int base = 2 * rail_->size() + 1 + kNumRoutingScalars;
    result.expert_counts = small_ints(base, experts);
    result.expert_offsets = small_ints(base + experts, experts + 1);
    result.scalars = small_ints(base + 2 * experts + 1, kNumRoutingScalars);
    return result;
  }
  DispatchMap relay_map(int64_t rows) {
    DispatchMap map;
    map.choice_rows = relay_ints(kRelayChoiceRows, rows * choices_, {rows, choices_});
    map.row_tokens = relay_ints(kRelayRowTokens, rows * choices_, {rows * choices_});
    return map;
  }

  // ---- Buffers ------------------------------------------------------------------------------

  // Waits for every stream before a buffer that queued work may use is freed.
  void quiesce(const ExecContext& context) {
    ops::synchronize(context);
    synchronize_communicators();
  }

  void ensure_sender_capacity(const ExecContext& context, int64_t tokens) {
    const int64_t rows = tokens * node_slots_;
    if (rows <= sender_rows_ && choices_ <= sender_choices_) return;
    quiesce(context);
    sender_rows_ = std::max(rows, sender_rows_);
    sender_choices_ = std::max(choices_, sender_choices_);
    const size_t ints = size_t(sender_rows_) * size_t(kNumSenderInts) * size_t(sender_choices_);
    sender_ints_ = Buffer(options_.device, ints * sizeof(int32_t));
    net_send_ = Buffer(options_.device, size_t(sender_rows_) * size_t(options_.row_width) * dtype_size(options_.row_dtype));
    if (fp8_network_)
      net_send_fp8_ = Buffer(options_.device, size_t(sender_rows_) * size_t(fp8_row_bytes(options_.row_width)));
    meta_send_gates_ = Buffer(options_.device, size_t(sender_rows_) * size_t(sender_choices_) * 8);
    meta_grad_gates_ = Buffer(options_.device, size_t(sender_rows_) * size_t(sender_choices_) * 8);
    const int experts = experts_per_node_, nodes = rail_->size();
    small_ints_ = Buffer(options_.device, size_t(2 * nodes + 1 + 2 * kNumRoutingScalars + 2 * experts + 1) * 4);
  }

  void ensure_relay_capacity(const ExecContext& context, int64_t rows) {
    rows = std::max<int64_t>(rows, 1);
    if (rows <= relay_capacity_ && choices_ <= relay_choices_) return;
    quiesce(context);
    relay_capacity_ = with_headroom(std::max(rows, relay_capacity_));
    relay_choices_ = std::max(choices_, relay_choices_);
    const size_t ints = size_t(relay_capacity_) * size_t(kNumRelayInts) * size_t(relay_choices_);
    relay_ints_ = Buffer(options_.device, ints * sizeof(int32_t));
    relay_rows_ =
        Buffer(options_.device, size_t(relay_capacity_) * size_t(options_.row_width) * dtype_size(options_.row_dtype));
    relay_gates_ = Buffer(options_.device, size_t(relay_capacity_) * size_t(relay_choices_) * 8);
    if (fp8_network_)
      relay_fp8_ = Buffer(options_.device, size_t(relay_capacity_) * size_t(fp8_row_bytes(options_.row_width)));
    relay_grad_gates_ = Buffer(options_.device, size_t(relay_capacity_) * size_t(relay_choices_) * 8);
  }

  // Region `region` of an int32 buffer split into equal regions of `region_ints`.
  static Tensor ints_in(const Buffer& buffer, int region, int64_t region_ints, int64_t count,
                        std::initializer_list<int64_t> dims, DeviceKind device) {
    SY_CHECK(count <= region_ints, "hierarchical exchange: ", count, " ints exceed a region of ", region_ints);
    return Tensor(buffer.as<int32_t>() + size_t(region) * size_t(region_ints), DType::i32, device, dims);
  }
  Tensor sender_ints(int region, int64_t count, std::initializer_list<int64_t> dims) const {
    return ints_in(sender_ints_, region, sender_rows_ * sender_choices_, count, dims, options_.device);
  }
  Tensor relay_ints(int region, int64_t count, std::initializer_list<int64_t> dims) const {
    return ints_in(relay_ints_, region, relay_capacity_ * relay_choices_, count, dims, options_.device);
  }
  Tensor small_ints(int first, int64_t count) const {
    return Tensor(small_ints_.as<int32_t>() + first, DType::i32, options_.device, {count});
  }
  Tensor floats(const Buffer& buffer, int64_t rows, int64_t columns) const {
    SY_CHECK(size_t(rows * columns) * dtype_size(gate_dtype_) <= buffer.bytes(), "hierarchical exchange: ", rows,
             " x ", columns, " gates exceed their buffer");
    return Tensor(buffer.data(), gate_dtype_, options_.device, {rows, columns});
  }
  Tensor rows_of(const Buffer& buffer, int64_t rows, int64_t width, DType dtype) const {
    SY_CHECK(size_t(rows * width) * dtype_size(dtype) <= buffer.bytes(), "hierarchical exchange: ", rows,
             " rows exceed their buffer");
    return Tensor(buffer.data(), dtype, options_.device, {rows, width});
  }
  Tensor relay_rows_view(int64_t rows) const {
    return rows_of(relay_rows_, rows, options_.row_width, options_.row_dtype);
  }

  EpExchangeOptions options_;
  std::shared_ptr<Communicator> group_, node_, rail_;
  int experts_per_node_ = 0;
  bool fp8_network_ = false;  // the forward's x rows cross the network as fp8 records
  std::unique_ptr<ExpertDispatcher> rail_dispatcher_;  // N "experts": one per node, L = 1
  std::unique_ptr<EpExchange> inner_;                  // over node_group, the node's G experts

  // The pass in flight.
  const RoutingResult* routing_ = nullptr;
  int64_t tokens_ = 0;
  int choices_ = 0, node_slots_ = 0;
  DType gate_dtype_ = DType::f32;
  RoutingResult node_routing_, relay_routing_;
  DispatchMap node_map_;

  // Sender: node layout integers, rows to the network, metadata and returned gate gradients.
  int64_t sender_rows_ = 0;
  int sender_choices_ = 0;
  Buffer sender_ints_, net_send_, net_send_fp8_, meta_send_gates_, meta_grad_gates_, small_ints_;
  // Relay: received rows (x', then partial y; dL/dy', then partial dL/dx) and metadata.
  int64_t relay_capacity_ = 0;
  int relay_choices_ = 0;
  Buffer relay_ints_, relay_rows_, relay_fp8_, relay_gates_, relay_grad_gates_;
};

}  // namespace

std::unique_ptr<EpExchange> make_hierarchical_ep_exchange(std::shared_ptr<Communicator> expert_parallel,
                                                          const EpExchangeOptions& options) {
  return std::make_unique<HierarchicalEpExchange>(std::move(expert_parallel), options);
}

}  // namespace switchyard
