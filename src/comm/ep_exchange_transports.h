// The EpExchange transports (src/comm/ep_exchange.h), for EpExchange::create and each other only.
//
// PackedEpExchange: the one-level exchange that nccl and nvlink share. The sender permutes its
// token rows into a packed layout by global expert (routing with segment_alignment 1: the rows for
// each destination rank are contiguous), the transport moves packed rows to the owners' padded
// layouts and back; the returned expert outputs stay in the packed buffer for backward's gate
// gradients, and backward's dL/dO rows go out from a second packed buffer.
#pragma once

#include <memory>

#include "src/comm/ep_exchange.h"
#include "src/comm/nvlink_exchange.h"

namespace switchyard {

class PackedEpExchange : public EpExchange {
 public:
  EpDispatch dispatch_format() const override { return options_.dispatch; }
  int ranks() const override { return dispatcher_->ranks(); }
  int local_experts() const override { return dispatcher_->local_experts(); }
  int first_expert() const override { return dispatcher_->first_expert(); }
  int chunks() const override { return dispatcher_->chunks(); }
  const ExpertExchangePlan& plan() const override { return dispatcher_->plan(); }
  Tensor chunk_offsets(int chunk) const override { return dispatcher_->chunk_offsets(chunk); }
  EpExchangeStats stats() const override;
  std::vector<int64_t> sent_rows_per_expert() const override {
    return std::vector<int64_t>(plan().send_counts.begin(), plan().send_counts.end());
  }
  void synchronize_communicators() override { dispatcher_->communicator().synchronize(); }

  const ExpertExchangePlan& start_forward(const ExecContext& context, const Tensor& x, const RoutingResult& routing,
                                          const RoutingParams& params, const DispatchMap& map) override;
  void dispatch(const ExecContext& context, EpPass pass) override;
  void send_back(const ExecContext& context, EpPass pass, int chunk) override;
  void combine(const ExecContext& context, EpPass pass, Tensor& out) override;
  void start_backward(const ExecContext& context, const Tensor& grad_y, Tensor& grad_gates) override;

 protected:
  explicit PackedEpExchange(const EpExchangeOptions& options);
  // The transport's parts. `packed` [plan().send_rows(), D]: this rank's rows by global expert.
  virtual void dispatch_packed(const ExecContext& context, EpPass pass, const Tensor& packed) = 0;
  virtual void send_back_packed(const ExecContext& context, EpPass pass, int chunk, Tensor& packed) = 0;
  virtual void combine_packed(const ExecContext& context, EpPass pass, const RoutingResult& routing,
                              const DispatchMap& map, Tensor& packed, Tensor& out) = 0;
  // Makes the layout hold the plan's rows; the streams are idle or the growth synchronizes them.
  virtual void ensure_layout_capacity(const ExecContext& context) = 0;

  Tensor row_view(void* base, size_t bytes, int64_t first_row, int64_t count) const;
  int64_t row_bytes() const { return options_.row_width * int64_t(dtype_size(options_.row_dtype)); }
  // The pass's packed rows: x then O (forward), dL/dO then dL/dX (backward).
  Tensor packed_rows(EpPass pass) const;

  EpExchangeOptions options_;
  std::unique_ptr<ExpertDispatcher> dispatcher_;
  Tensor packed_offsets_;  // of the pass in flight

 private:
  // [send_capacity_, D] each (max_send_rows to start with, grown when a map needs more); the second
  // is allocated by the first backward after each growth.
  int64_t send_capacity_ = 0;
  Buffer send_rows_, grad_send_rows_;
  const RoutingResult* routing_ = nullptr;
  DispatchMap map_;  // row_tokens over the sent rows only
};

std::unique_ptr<EpExchange> make_nccl_ep_exchange(std::shared_ptr<Communicator> expert_parallel,
                                                  const EpExchangeOptions& options);
// `peers`: created by EpExchange::create over the same group, with kNvlinkExchangeRegions regions.
std::unique_ptr<EpExchange> make_nvlink_ep_exchange(std::shared_ptr<Communicator> expert_parallel,
                                                    const EpExchangeOptions& options,
                                                    std::unique_ptr<NvlinkPeerMemory> peers);
// options.node_group and rail_group set; the inner exchange (nccl or nvlink over node_group) is
// made here.
std::unique_ptr<EpExchange> make_hierarchical_ep_exchange(std::shared_ptr<Communicator> expert_parallel,
                                                          const EpExchangeOptions& options);

// The nvlink transport's peer-mapped regions: the padded expert layout's input rows (the dispatch
// writes them) and output rows (the combine reads them; backward writes the output-row gradients
// there and reads back the input-row gradients), and every rank's per-expert row counts (the
// count exchange).
constexpr int kNvlinkInputRegion = 0, kNvlinkOutputRegion = 1, kNvlinkCountRegion = 2, kNvlinkExchangeRegions = 3;

}  // namespace switchyard
