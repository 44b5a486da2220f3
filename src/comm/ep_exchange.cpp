// EpExchange: the choice of transport, and PackedEpExchange, the part the nccl and nvlink
// transports share (src/comm/ep_exchange.h, src/comm/ep_exchange_transports.h).
#include "src/comm/ep_exchange.h"

#include <string>

#include "src/comm/ep_exchange_transports.h"
#include "src/core/error.h"

namespace switchyard {

const char* ep_dispatch_name(EpDispatch dispatch) {
  switch (dispatch) {
    case EpDispatch::activation: return "activation";
    case EpDispatch::fp8: return "fp8";
  }
  return "unknown";
}

EpDispatch parse_ep_dispatch(const std::string& text, const std::string& where) {
  if (text == "activation") return EpDispatch::activation;
  if (text == "fp8") return EpDispatch::fp8;
  SY_BAD_INPUT(where, ": unknown expert-parallel dispatch format '", text, "' (choices: activation, fp8)");
}

std::unique_ptr<EpExchange> EpExchange::create(std::shared_ptr<Communicator> expert_parallel,
                                               const EpExchangeOptions& options) {
  SY_CHECK(expert_parallel != nullptr, "EpExchange: no expert_parallel communicator");
  SY_CHECK((options.node_group == nullptr) == (options.rail_group == nullptr),
           "EpExchange: node_group and rail_group come together");
  // Across nodes fp8 is the network leg's, whatever moves the rows inside a node.
  if (options.node_group) return make_hierarchical_ep_exchange(std::move(expert_parallel), options);
  const bool fp8 = options.dispatch == EpDispatch::fp8;
  SY_CHECK_INPUT(!fp8 || options.transport != EpTransport::nvlink,
                 "parallel.ep_dispatch fp8 needs parallel.ep_transport nccl or auto: the nvlink transport moves "
                 "rows in the activation dtype only");
  SY_CHECK_INPUT(options.transport != EpTransport::nvlink || options.device == DeviceKind::cuda,
                 "parallel.ep_transport nvlink moves rows between GPUs; this run is on ",
                 device_kind_name(options.device));
  // fp8 under auto: nccl, the transport that has it.
  if (options.device == DeviceKind::cuda && options.transport != EpTransport::nccl && !fp8) {
    std::string why;
    std::unique_ptr<NvlinkPeerMemory> peers = NvlinkPeerMemory::create(expert_parallel, kNvlinkExchangeRegions, &why);
    if (peers) return make_nvlink_ep_exchange(std::move(expert_parallel), options, std::move(peers));
    SY_CHECK_INPUT(options.transport == EpTransport::automatic,
                   "parallel.ep_transport nvlink is not possible for this expert-parallel group: ", why,
                   " (use nccl or auto)");
  }
  return make_nccl_ep_exchange(std::move(expert_parallel), options);
}

PackedEpExchange::PackedEpExchange(const EpExchangeOptions& options) : options_(options) {
  SY_CHECK(options.max_send_rows >= 0 && options.row_width >= 1, "EpExchange: max_send_rows ", options.max_send_rows,
           " and row_width ", options.row_width, " must be >= 0 and >= 1");
  send_capacity_ = std::max<int64_t>(options.max_send_rows, 1);
  send_rows_ = Buffer(options.device, size_t(send_capacity_) * size_t(row_bytes()));
}

EpExchangeStats PackedEpExchange::stats() const {
  EpExchangeStats stats;
  stats.sent_rows = plan().send_rows();
  stats.received_rows = plan().recv_rows();
  stats.expert_rows = plan().expert_rows();
  return stats;
}

const ExpertExchangePlan& PackedEpExchange::start_forward(const ExecContext& context, const Tensor& x,
                                                          const RoutingResult& routing, const RoutingParams& params,
                                                          const DispatchMap& map) {
  const int64_t bound = map.row_tokens.rank == 1 ? map.row_tokens.dim(0) : -1;
  SY_CHECK(bound >= 0, "EpExchange: the map has no row_tokens");
  if (bound > send_capacity_) {
    // A relay of the hierarchical exchange sends what arrived; a layer's own routing never grows
    // past max_send_rows. Nothing queued may still use the old buffers.
    ops::synchronize(context);
    synchronize_communicators();
    send_capacity_ = with_headroom(bound);
    send_rows_.reset();
    grad_send_rows_.reset();
    send_rows_ = Buffer(options_.device, size_t(send_capacity_) * size_t(row_bytes()));
  }
  routing_ = &routing;
  packed_offsets_ = routing.expert_offsets;
  // The counts leave first, so that the permute into packed rows runs while they travel.
  dispatcher_->start_count_exchange(context, routing.expert_offsets);
  DispatchMap full_map = map;
  Tensor send_all = row_view(send_rows_.data(), send_rows_.bytes(), 0, bound);
  ops::permute(context, x, routing, params, send_all, full_map);
  const ExpertExchangePlan& plan = dispatcher_->finish_count_exchange(context);
  SY_CHECK(plan.send_rows() <= bound, "EpExchange: the routing sends ", plan.send_rows(), " rows, more than its ", bound,
           " bound");
  ensure_layout_capacity(context);
  map_ = full_map;
  map_.row_tokens = Tensor(map.row_tokens.data, DType::i32, map.row_tokens.device, {plan.send_rows()});
  return plan;
}

Tensor PackedEpExchange::packed_rows(EpPass pass) const {
  const Buffer& buffer = pass == EpPass::forward ? send_rows_ : grad_send_rows_;
  return row_view(buffer.data(), buffer.bytes(), 0, plan().send_rows());
}

void PackedEpExchange::dispatch(const ExecContext& context, EpPass pass) {
  SY_CHECK(routing_ != nullptr, "EpExchange::dispatch: no start_forward before it");
  dispatch_packed(context, pass, packed_rows(pass));
}

void PackedEpExchange::send_back(const ExecContext& context, EpPass pass, int chunk) {
  Tensor packed = packed_rows(pass);
  send_back_packed(context, pass, chunk, packed);
}

void PackedEpExchange::combine(const ExecContext& context, EpPass pass, Tensor& out) {
  Tensor packed = packed_rows(pass);
  combine_packed(context, pass, *routing_, map_, packed, out);
}

void PackedEpExchange::start_backward(const ExecContext& context, const Tensor& grad_y, Tensor& grad_gates) {
  SY_CHECK(routing_ != nullptr, "EpExchange::start_backward: no forward before it");
  // A fresh allocation on the first backward: nothing in flight can use it.
  if (!grad_send_rows_.data()) grad_send_rows_ = Buffer(options_.device, send_rows_.bytes());
  Tensor grad_rows = packed_rows(EpPass::backward);
  ops::unpermute_combine_backward(context, grad_y, packed_rows(EpPass::forward), *routing_, map_, grad_rows,
                                  grad_gates);
}

Tensor PackedEpExchange::row_view(void* base, size_t bytes, int64_t first_row, int64_t count) const {
  const size_t offset = size_t(first_row) * size_t(row_bytes());
  SY_CHECK(offset + size_t(count) * size_t(row_bytes()) <= bytes, "EpExchange: rows [", first_row, ", ",
           first_row + count, ") x ", options_.row_width, " exceed a buffer of ", bytes, " bytes");
  return Tensor(static_cast<char*>(base) + offset, options_.row_dtype, options_.device, {count, options_.row_width});
}

}  // namespace switchyard
