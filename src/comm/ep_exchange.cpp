// EpExchange: the parts common to both transports, and the choice between them
// (src/comm/ep_exchange.h).
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

void EpExchange::start_count_exchange(const ExecContext& context, const Tensor& packed_offsets) {
  packed_offsets_ = packed_offsets;
  dispatcher_->start_count_exchange(context, packed_offsets);
}

const ExpertExchangePlan& EpExchange::finish_count_exchange(const ExecContext& context) {
  const ExpertExchangePlan& plan = dispatcher_->finish_count_exchange(context);
  ensure_layout_capacity(context);
  return plan;
}

Tensor EpExchange::row_view(void* base, size_t bytes, int64_t first_row, int64_t count) const {
  const size_t offset = size_t(first_row) * size_t(row_bytes());
  SY_CHECK(offset + size_t(count) * size_t(row_bytes()) <= bytes, "EpExchange: rows [", first_row, ", ",
           first_row + count, ") x ", options_.row_width, " exceed a buffer of ", bytes, " bytes");
  return Tensor(static_cast<char*>(base) + offset, options_.row_dtype, options_.device, {count, options_.row_width});
}

}  // namespace switchyard
