// The nccl transport of EpExchange (src/comm/ep_exchange.h): packed all-to-all-v of each chunk's
// rows into a receive buffer ([source][local expert]), reordered into the padded layout by local
// expert on the receiver; results reordered back and returned by the mirror all-to-all-v.
// MPI_Alltoallv on CPU ranks. Buffers start at the balanced load and grow on demand.
// FP8 dispatch (forward only): the packed rows are quantized into byte rows, which cross, and each
// chunk's arrivals are dequantized into the receive rows before the reorder; the receive rows then
// serve as in the activation dispatch (the results' way back).
#include <algorithm>

#include "src/comm/ep_exchange_transports.h"
#include "src/core/error.h"

namespace switchyard {
namespace {

class NcclEpExchange final : public PackedEpExchange {
 public:
  NcclEpExchange(std::shared_ptr<Communicator> expert_parallel, const EpExchangeOptions& options)
      : PackedEpExchange(options) {
    dispatcher_ = std::make_unique<ExpertDispatcher>(std::move(expert_parallel), options.device, options.num_experts,
                                                     options.segment_alignment, options.chunks);
    receive_capacity_ = options.initial_rows;
    layout_capacity_ = options.initial_rows + int64_t(local_experts()) * (options.segment_alignment - 1);
    allocate(receive_rows_, receive_capacity_);
    allocate(expert_input_, layout_capacity_);
    allocate(expert_output_, layout_capacity_);
    if (fp8()) {
      fp8_send_capacity_ = options.initial_rows;
      allocate_fp8(fp8_send_, fp8_send_capacity_);
      allocate_fp8(fp8_receive_, receive_capacity_);
    }
  }

  EpTransport transport() const override { return EpTransport::nccl; }

  Tensor expert_input(int64_t first_row, int64_t count) const override {
    return row_view(expert_input_.data(), expert_input_.bytes(), first_row, count);
  }
  Tensor expert_output(int64_t first_row, int64_t count) const override {
    return row_view(expert_output_.data(), expert_output_.bytes(), first_row, count);
  }

  void dispatch_packed(const ExecContext& context, EpPass pass, const Tensor& packed) override {
    if (quantizes(pass)) {
      const int64_t rows = plan().send_rows();
      SY_CHECK(packed.rank == 2 && packed.dim(0) >= rows, "EpExchange::dispatch: the plan sends ", rows,
               " rows, packed is ", packed.describe());
      const Tensor send_rows(packed.data, packed.dtype, packed.device, {rows, packed.dim(1)});
      Tensor send_fp8 = fp8_rows(fp8_send_, rows);
      ops::quantize_rows_fp8(context, send_rows, send_fp8);
      Tensor received_fp8 = fp8_rows(fp8_receive_, plan().recv_rows());
      for (int chunk = 0; chunk < chunks(); ++chunk) dispatcher_->dispatch(context, chunk, send_fp8, received_fp8);
      return;
    }
    Tensor received = received_rows();
    for (int chunk = 0; chunk < chunks(); ++chunk) dispatcher_->dispatch(context, chunk, packed, received);
  }

  void receive(const ExecContext& context, EpPass pass, int chunk) override {
    dispatcher_->wait_dispatched(context, chunk);
    if (chunk_rows(chunk) == 0) return;  // no rank routed anything to these experts
    if (quantizes(pass)) {
      Tensor received = received_rows();
      dispatcher_->dequantize_received(context, chunk, fp8_rows(fp8_receive_, plan().recv_rows()), received);
    }
    Tensor layout = layout_rows(pass);
    dispatcher_->to_expert_layout(context, chunk, received_rows(), layout);
  }

  // Both passes return the output rows: O forward, dL/dX backward.
  void send_back_packed(const ExecContext& context, EpPass, int chunk, Tensor& packed) override {
    Tensor received = received_rows();
    if (chunk_rows(chunk) > 0)
      dispatcher_->from_expert_layout(context, chunk, expert_output(0, plan().expert_rows()), received);
    // Every dispatch ahead of this on the communicator's stream has finished reading `packed`.
    dispatcher_->combine(context, chunk, received, packed);
  }

  void combine_packed(const ExecContext& context, EpPass pass, const RoutingResult& routing, const DispatchMap& map,
                      Tensor& packed, Tensor& out) override {
    dispatcher_->wait_combined(context);
    if (pass == EpPass::forward) {
      ops::unpermute_combine(context, packed, routing, map, out);
    } else {
      ops::permute_backward(context, packed, map, out.dim(0), out);
    }
  }

 private:
  void ensure_layout_capacity(const ExecContext& context) override {
    const ExpertExchangePlan& plan = this->plan();
    const bool grow_receive = plan.recv_rows() > receive_capacity_;
    const bool grow_layout = plan.expert_rows() > layout_capacity_;
    const bool grow_fp8_send = fp8() && plan.send_rows() > fp8_send_capacity_;
    if (!grow_receive && !grow_layout && !grow_fp8_send) return;
    // The caching allocator does not track streams: nothing may still use a buffer we free. The
    // count exchange has just waited for both streams; this makes the invariant explicit.
    ops::synchronize(context);
    dispatcher_->communicator().synchronize();
    if (grow_receive) {
      receive_capacity_ = with_headroom(plan.recv_rows());
      allocate(receive_rows_, receive_capacity_);
      if (fp8()) allocate_fp8(fp8_receive_, receive_capacity_);
    }
    if (grow_fp8_send) {
      fp8_send_capacity_ = with_headroom(plan.send_rows());
      allocate_fp8(fp8_send_, fp8_send_capacity_);
    }
    if (grow_layout) {
      layout_capacity_ = with_headroom(plan.expert_rows());
      allocate(expert_input_, layout_capacity_);
      allocate(expert_output_, layout_capacity_);
    }
  }

  void allocate(Buffer& buffer, int64_t rows) {
    buffer.reset();
    buffer = Buffer(options_.device, size_t(rows) * size_t(row_bytes()));
  }
  void allocate_fp8(Buffer& buffer, int64_t rows) {
    buffer.reset();
    buffer = Buffer(options_.device, size_t(rows) * size_t(fp8_row_bytes(options_.row_width)));
  }
  bool fp8() const { return options_.dispatch == EpDispatch::fp8; }
  // Whether this pass's dispatch crosses as FP8: the forward x rows only.
  bool quantizes(EpPass pass) const { return fp8() && pass == EpPass::forward; }
  // The first `rows` packed FP8 rows of `buffer`, u8 [rows, fp8_row_bytes(D)].
  Tensor fp8_rows(const Buffer& buffer, int64_t rows) const {
    const int64_t width = fp8_row_bytes(options_.row_width);
    SY_CHECK(size_t(rows) * size_t(width) <= buffer.bytes(), "EpExchange: ", rows, " FP8 rows exceed a buffer of ",
             buffer.bytes(), " bytes");
    return Tensor(buffer.data(), DType::u8, options_.device, {rows, width});
  }
  int64_t chunk_rows(int chunk) const { return plan().chunk_row_end(chunk) - plan().chunk_row_begin(chunk); }
  Tensor received_rows() const { return row_view(receive_rows_.data(), receive_rows_.bytes(), 0, plan().recv_rows()); }
  // Where a pass's arriving rows go: x rows to the input rows, dL/dO rows to the output rows.
  Tensor layout_rows(EpPass pass) const {
    return pass == EpPass::forward ? expert_input(0, plan().expert_rows()) : expert_output(0, plan().expert_rows());
  }

  int64_t receive_capacity_ = 0, layout_capacity_ = 0;
  Buffer receive_rows_, expert_input_, expert_output_;
  // FP8 dispatch: the quantized send rows and the arriving quantized rows (receive_capacity_ rows).
  int64_t fp8_send_capacity_ = 0;
  Buffer fp8_send_, fp8_receive_;
};

}  // namespace

std::unique_ptr<EpExchange> make_nccl_ep_exchange(std::shared_ptr<Communicator> expert_parallel,
                                                  const EpExchangeOptions& options) {
  return std::make_unique<NcclEpExchange>(std::move(expert_parallel), options);
}

}  // namespace switchyard
