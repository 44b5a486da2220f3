// The nvlink transport of EpExchange (src/comm/ep_exchange.h; docs/DESIGN.md, "Expert
// parallelism"): the padded expert layout's input and output rows live in peer-mapped memory
// (src/comm/nvlink_exchange.h). The count exchange gathers every rank's counts through it; the
// sender's packed rows are written straight into the owners' layouts (no receive buffer, no
// reorder, one chunk), and the results are read straight back from the owners, fused with the
// per-token sum. Backward writes the dL/dO rows into the owners' output layouts and sums dL/dx from
// their dL/dX rows the same way.
#include <algorithm>

#include "src/comm/ep_exchange_transports.h"
#include "src/core/error.h"

namespace switchyard {
namespace {

class NvlinkEpExchange final : public PackedEpExchange {
 public:
  NvlinkEpExchange(std::shared_ptr<Communicator> expert_parallel, const EpExchangeOptions& options,
                   std::unique_ptr<NvlinkPeerMemory> peers)
      : PackedEpExchange(options), peers_(std::move(peers)) {
    // EpExchange::create never picks this transport for fp8 dispatch: rows go as they are.
    SY_CHECK(options.dispatch == EpDispatch::activation, "the nvlink EP exchange has no fp8 dispatch");
    peers_->set_max_blocks(options.sm_budget);
    peers_->reserve(kNvlinkCountRegion,
                    size_t(peers_->ranks()) * size_t(options.num_experts) * sizeof(int32_t));
    // Unchunked: with no staging copy there is nothing to overlap.
    dispatcher_ = std::make_unique<ExpertDispatcher>(std::move(expert_parallel), options.device, options.num_experts,
                                                     options.segment_alignment, 1, peers_.get(), kNvlinkCountRegion);
  }

  // The dispatcher holds a pointer to peers_: it goes first.
  ~NvlinkEpExchange() override { dispatcher_.reset(); }

  EpTransport transport() const override { return EpTransport::nvlink; }

  Tensor expert_input(int64_t first_row, int64_t count) const override {
    return row_view(peers_->local(kNvlinkInputRegion), peers_->bytes(kNvlinkInputRegion), first_row, count);
  }
  Tensor expert_output(int64_t first_row, int64_t count) const override {
    return row_view(peers_->local(kNvlinkOutputRegion), peers_->bytes(kNvlinkOutputRegion), first_row, count);
  }

  void dispatch_packed(const ExecContext& context, EpPass pass, const Tensor& packed) override {
    const ExpertExchangePlan& plan = this->plan();
    const EpReceiveLayout& layout = dispatcher_->layout();
    const int64_t padding_rows = plan.expert_rows() - plan.recv_rows();
    if (pass == EpPass::forward) {
      peers_->push(kNvlinkInputRegion, packed.data, plan.send_rows(), row_bytes(), local_experts(),
                   packed_offsets_.as<int32_t>(), dispatcher_->peer_rows(), kEpRowsDispatched, context.stream);
      peers_->zero_padding(kNvlinkInputRegion, row_bytes(), layout.expert_offsets.as<int32_t>(),
                           layout.expert_totals.as<int32_t>(), local_experts(), padding_rows, context.stream);
    } else {
      // dL/dO rows into the owners' output regions (their forward results there are dead: every
      // rank pulled its rows in forward); padding rows there must read as zero.
      peers_->zero_padding(kNvlinkOutputRegion, row_bytes(), layout.expert_offsets.as<int32_t>(),
                           layout.expert_totals.as<int32_t>(), local_experts(), padding_rows, context.stream);
      peers_->push(kNvlinkOutputRegion, packed.data, plan.send_rows(), row_bytes(), local_experts(),
                   packed_offsets_.as<int32_t>(), dispatcher_->peer_rows(), kEpGradientsDispatched, context.stream);
    }
  }

  void receive(const ExecContext& context, EpPass pass, int) override {
    peers_->wait(pass == EpPass::forward ? kEpRowsDispatched : kEpGradientsDispatched, context.stream);
  }

  // The owners' results stay in their output regions until every rank pulls them in combine().
  void send_back_packed(const ExecContext&, EpPass, int, Tensor&) override {}

  void combine_packed(const ExecContext& context, EpPass pass, const RoutingResult& routing, const DispatchMap& map,
                      Tensor& packed, Tensor& out) override {
    const bool forward = pass == EpPass::forward;
    peers_->signal_and_wait(forward ? kEpOutputsReady : kEpInputGradientsReady, context.stream);
    // Forward: y[t] = sum_j gate * row, the rows kept in `packed` for the gate gradients;
    // backward: dL/dx[t] = sum_j row.
    peers_->pull_combine(kNvlinkOutputRegion, plan().send_rows(), row_bytes(), local_experts(),
                         packed_offsets_.as<int32_t>(), dispatcher_->peer_rows(), map.choice_rows.as<int32_t>(),
                         forward ? routing.gates.as<float>() : nullptr, out.dim(0), int(routing.expert_ids.dim(1)),
                         options_.row_dtype, out.data, forward ? packed.data : nullptr, context.stream);
  }

 private:
  // max_expert_rows is the same number on every rank (it comes from the gathered counts), so every
  // rank takes the same branch and the collective growth matches up.
  void ensure_layout_capacity(const ExecContext&) override {
    const int64_t needed = std::max<int64_t>(dispatcher_->max_expert_rows(), 1);
    if (needed <= capacity_rows_) return;
    capacity_rows_ = with_headroom(needed);
    const size_t bytes = size_t(capacity_rows_) * size_t(row_bytes());
    peers_->reserve(kNvlinkInputRegion, bytes);
    peers_->reserve(kNvlinkOutputRegion, bytes);
  }

  std::unique_ptr<NvlinkPeerMemory> peers_;
  int64_t capacity_rows_ = 0;
};

}  // namespace

std::unique_ptr<EpExchange> make_nvlink_ep_exchange(std::shared_ptr<Communicator> expert_parallel,
                                                    const EpExchangeOptions& options,
                                                    std::unique_ptr<NvlinkPeerMemory> peers) {
  return std::make_unique<NvlinkEpExchange>(std::move(expert_parallel), options, std::move(peers));
}

}  // namespace switchyard
