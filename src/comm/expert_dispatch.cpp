// Expert dispatch and combine (src/comm/expert_dispatch.h).
#include "src/comm/expert_dispatch.h"
#include "src/comm/parallel_layout.h"
#include "src/ops/ep_nvlink_ops.h"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

#if defined(SWITCHYARD_WITH_CUDA)
#include "src/core/cuda_check.h"
#endif

namespace switchyard {

// ---- CommStreamEvents ------------------------------------------------------------------------

CommStreamEvents::CommStreamEvents(DeviceKind device, int slots) : device_(device) {
  SY_CHECK(slots >= 0, "CommStreamEvents: negative slot count ", slots);
  events_.assign(size_t(slots), nullptr);
  if (device_ != DeviceKind::cuda) return;
#if defined(SWITCHYARD_WITH_CUDA)
  auto create = [] {
    cudaEvent_t event = nullptr;
    CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    return static_cast<void*>(event);
  };
  compute_event_ = create();
  for (void*& event : events_) event = create();
#else
  SY_THROW("CommStreamEvents: this build of switchyard has no CUDA backend");
#endif
}

CommStreamEvents::~CommStreamEvents() {
#if defined(SWITCHYARD_WITH_CUDA)
  // Destroying an event that is still pending is allowed: CUDA releases it once it completes.
  if (compute_event_) cudaEventDestroy(static_cast<cudaEvent_t>(compute_event_));
  for (void* event : events_)
    if (event) cudaEventDestroy(static_cast<cudaEvent_t>(event));
#endif
}

void CommStreamEvents::comm_waits_for_compute(const ExecContext& context, Communicator& communicator) {
  if (device_ != DeviceKind::cuda) return;
#if defined(SWITCHYARD_WITH_CUDA)
  cudaEvent_t event = static_cast<cudaEvent_t>(compute_event_);
  CUDA_CHECK(cudaEventRecord(event, static_cast<cudaStream_t>(context.stream)));
  CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(communicator.stream()), event, 0));
#else
  (void)context;
  (void)communicator;
#endif
}

void CommStreamEvents::record_comm(int slot, Communicator& communicator) {
  if (device_ != DeviceKind::cuda) return;
  SY_CHECK(slot >= 0 && slot < slots(), "CommStreamEvents: slot ", slot, " of ", slots());
#if defined(SWITCHYARD_WITH_CUDA)
  CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(events_[size_t(slot)]),
                             static_cast<cudaStream_t>(communicator.stream())));
#else
  (void)communicator;
#endif
}

void CommStreamEvents::compute_waits_for_comm(const ExecContext& context, int slot) {
  if (device_ != DeviceKind::cuda) return;
  SY_CHECK(slot >= 0 && slot < slots(), "CommStreamEvents: slot ", slot, " of ", slots());
#if defined(SWITCHYARD_WITH_CUDA)
  CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(context.stream),
                                 static_cast<cudaEvent_t>(events_[size_t(slot)]), 0));
#else
  (void)context;
#endif
}

// ---- ExpertExchangePlan ----------------------------------------------------------------------

void ExpertExchangePlan::chunk_arguments(int chunk, bool dispatch, int64_t width, std::vector<int64_t>& send_counts_out,
                                         std::vector<int64_t>& send_offsets_out, std::vector<int64_t>& recv_counts_out,
                                         std::vector<int64_t>& recv_offsets_out) const {
  SY_CHECK(chunk >= 0 && chunk < chunks, "ExpertExchangePlan: chunk ", chunk, " of ", chunks);
  const int first = chunk_first_expert(chunk), end = chunk_end_expert(chunk);
  // Rows this rank sends (dispatch: to each destination's experts; combine: back to each source).
  const std::vector<int32_t>& out_counts = dispatch ? send_counts : recv_counts;
  const std::vector<int64_t>& out_starts = dispatch ? send_starts : recv_starts;
  const std::vector<int32_t>& in_counts = dispatch ? recv_counts : send_counts;
  const std::vector<int64_t>& in_starts = dispatch ? recv_starts : send_starts;
  send_counts_out.assign(size_t(ranks), 0);
  send_offsets_out.assign(size_t(ranks), 0);
  recv_counts_out.assign(size_t(ranks), 0);
  recv_offsets_out.assign(size_t(ranks), 0);
  for (int peer = 0; peer < ranks; ++peer) {
    const size_t base = size_t(peer) * size_t(local_experts);
    int64_t out_rows = 0, in_rows = 0;
    for (int expert = first; expert < end; ++expert) {
      out_rows += out_counts[base + size_t(expert)];
      in_rows += in_counts[base + size_t(expert)];
    }
    send_counts_out[size_t(peer)] = out_rows * width;
    send_offsets_out[size_t(peer)] = out_starts[base + size_t(first)] * width;
    recv_counts_out[size_t(peer)] = in_rows * width;
    recv_offsets_out[size_t(peer)] = in_starts[base + size_t(first)] * width;
  }
}

// ---- ExpertDispatcher ------------------------------------------------------------------------

ExpertDispatcher::ExpertDispatcher(std::shared_ptr<Communicator> expert_parallel, DeviceKind device, int num_experts,
                                   int segment_alignment, int chunks, NvlinkPeerMemory* count_peers,
                                   int count_region)
    : communicator_(std::move(expert_parallel)),
      device_(device),
      count_peers_(count_peers),
      count_region_(count_region) {
  SY_CHECK(communicator_ != nullptr, "ExpertDispatcher: no expert_parallel communicator");
  SY_CHECK(communicator_->device() == device, "ExpertDispatcher: the ", communicator_->name(), " communicator is on ",
           device_kind_name(communicator_->device()), ", the layer on ", device_kind_name(device));
  ranks_ = communicator_->size();
  rank_ = communicator_->rank();
  SY_CHECK_INPUT(num_experts >= 1, "moe.num_experts must be >= 1, got ", num_experts);
  ParallelLayout::check(ranks_, ranks_, num_experts);  // the group is one expert-parallel group
  SY_CHECK_INPUT(segment_alignment >= 1, "ExpertDispatcher: segment_alignment must be >= 1, got ", segment_alignment);
  SY_CHECK_INPUT(chunks >= 1, "parallel.a2a_chunks must be >= 1, got ", chunks);
  num_experts_ = num_experts;
  local_experts_ = num_experts / ranks_;
  chunks_ = std::min(chunks, local_experts_);
  alignment_ = segment_alignment;
  events_ = std::make_unique<CommStreamEvents>(device, chunks_ + 1);

  const int64_t segments = int64_t(ranks_) * local_experts_, experts = local_experts_;
  if (gather_all_counts())
    SY_CHECK(device == DeviceKind::cuda && count_peers_->ranks() == ranks_ &&
                 count_peers_->bytes(count_region_) >= size_t(ranks_) * size_t(segments) * sizeof(int32_t),
             "ExpertDispatcher: gathering counts through peer memory needs CUDA and a count region of P*E int32");
  // Without count_peers, device: [send counts E | received counts P*L], the host copy the same.
  // With them the gathered P x E matrix lands in the count region (each rank computes its row
  // from its packed offsets) and the host copy is that matrix.
  if (!gather_all_counts()) counts_ = Buffer(device, size_t(2 * segments) * sizeof(int32_t));
  const int64_t layout_ints = (segments + 1) + experts + (experts + 1) + segments + (experts + chunks_);
  int32_t* cursor = nullptr;
  if (gather_all_counts()) {
    // The host computes the whole layout (it has every count) and copies it up in one piece:
    // [recv_counts P*L | packed_starts .. chunk_offsets | peer_rows P*L].
    direct_tables_ = Buffer(device, size_t(segments + layout_ints + segments) * sizeof(int32_t));
    cursor = direct_tables_.as<int32_t>();
  } else {
    layout_memory_ = Buffer(device, size_t(layout_ints) * sizeof(int32_t));
    cursor = layout_memory_.as<int32_t>();
  }
  auto take = [&](std::initializer_list<int64_t> dims) {
    Tensor tensor(cursor, DType::i32, device, dims);
    cursor += tensor.numel();
    return tensor;
  };
  layout_.num_ranks = ranks_;
  layout_.local_experts = local_experts_;
  layout_.chunks = chunks_;
  layout_.alignment = alignment_;
  if (gather_all_counts()) {
    layout_.recv_counts = take({int64_t(ranks_), experts});
  } else {
    layout_.recv_counts = Tensor(counts_.as<int32_t>() + segments, DType::i32, device, {int64_t(ranks_), experts});
  }
  layout_.packed_starts = take({segments + 1});
  layout_.expert_totals = take({experts});
  layout_.expert_offsets = take({experts + 1});
  layout_.segment_rows = take({int64_t(ranks_), experts});
  layout_.chunk_offsets = take({experts + chunks_});
  validate_ep_receive_layout(layout_, device);

  if (device == DeviceKind::cuda) {
#if defined(SWITCHYARD_WITH_CUDA)
    const size_t host_count_bytes = size_t(gather_all_counts() ? ranks_ * segments : 2 * segments) * sizeof(int32_t);
    CUDA_CHECK(cudaMallocHost(&host_counts_, host_count_bytes));
    if (gather_all_counts()) CUDA_CHECK(cudaMallocHost(&host_tables_, direct_tables_.bytes()));
#else
    SY_THROW("ExpertDispatcher: this build of switchyard has no CUDA backend");
#endif
  } else {
    host_counts_ = counts_.data();  // the host buffer itself: nothing to copy
    host_tables_ = direct_tables_.data();
  }
  if (gather_all_counts()) {
    // The same layout over the host staging, for ops::ep_receive_layout on a CPU context.
    host_layout_ = layout_;
    auto on_host = [&](Tensor& tensor) {
      const ptrdiff_t at = static_cast<int32_t*>(tensor.data) - direct_tables_.as<int32_t>();
      tensor.data = static_cast<int32_t*>(host_tables_) + at;
      tensor.device = DeviceKind::cpu;
    };
    for (Tensor* tensor : {&host_layout_.recv_counts, &host_layout_.packed_starts, &host_layout_.expert_totals,
                           &host_layout_.expert_offsets, &host_layout_.segment_rows, &host_layout_.chunk_offsets})
      on_host(*tensor);
    peer_rows_at_ = segments + layout_ints;
  }

  plan_.ranks = ranks_;
  plan_.local_experts = local_experts_;
  plan_.chunks = chunks_;
  plan_.alignment = alignment_;
  plan_.chunk_experts.resize(size_t(chunks_) + 1);
  for (int chunk = 0; chunk <= chunks_; ++chunk)
    plan_.chunk_experts[size_t(chunk)] = ep_chunk_first_expert(chunk, chunks_, local_experts_);
}

ExpertDispatcher::~ExpertDispatcher() {
#if defined(SWITCHYARD_WITH_CUDA)
  if (device_ == DeviceKind::cuda && host_counts_) cudaFreeHost(host_counts_);
  if (device_ == DeviceKind::cuda && host_tables_) cudaFreeHost(host_tables_);
#endif
}

void ExpertDispatcher::check_context(const ExecContext& context) const {
  SY_CHECK(context.device == device_, "ExpertDispatcher: context is on ", device_kind_name(context.device),
           ", the dispatcher on ", device_kind_name(device_));
}

const ExpertExchangePlan& ExpertDispatcher::exchange_counts(const ExecContext& context, const Tensor& packed_offsets) {
  start_count_exchange(context, packed_offsets);
  return finish_count_exchange(context);
}

void ExpertDispatcher::start_count_exchange(const ExecContext& context, const Tensor& packed_offsets) {
  check_context(context);
  has_plan_ = false;
  const int64_t segments = int64_t(ranks_) * local_experts_;
  if (gather_all_counts()) {
    // Every rank's E counts (from its packed offsets) into every rank's count region (compute
    // stream), then on the communicator's stream: wait for all of them, copy them to the host.
    SY_CHECK(packed_offsets.dtype == DType::i32 && packed_offsets.numel() == segments + 1,
             "ExpertDispatcher: packed offsets must be i32[", segments + 1, "], got ", packed_offsets.describe());
    count_peers_->all_gather_counts(count_region_, packed_offsets.as<int32_t>(), segments, kEpCountsGathered,
                                    context.stream);
    events_->comm_waits_for_compute(context, *communicator_);
    count_peers_->wait(kEpCountsGathered, communicator_->stream());
#if defined(SWITCHYARD_WITH_CUDA)
    CUDA_CHECK(cudaMemcpyAsync(host_counts_, count_peers_->local(count_region_),
                               size_t(ranks_ * segments) * sizeof(int32_t), cudaMemcpyDeviceToHost,
                               static_cast<cudaStream_t>(communicator_->stream())));
#endif
    counts_in_flight_ = true;
    return;
  }
  // L ints to and from every peer.
  Tensor send_counts(counts_.as<int32_t>(), DType::i32, device_, {segments});
  ops::ep_send_counts(context, packed_offsets, send_counts);
  events_->comm_waits_for_compute(context, *communicator_);
  std::vector<int64_t> counts(static_cast<size_t>(ranks_), local_experts_);
  std::vector<int64_t> offsets(static_cast<size_t>(ranks_), 0);
  for (int peer = 0; peer < ranks_; ++peer) offsets[size_t(peer)] = int64_t(peer) * local_experts_;
  communicator_->all_to_all_v(counts_.as<int32_t>(), counts, offsets, counts_.as<int32_t>() + segments, counts,
                              offsets, DType::i32);
  if (device_ == DeviceKind::cuda) {
#if defined(SWITCHYARD_WITH_CUDA)
    // The one host copy: on the communicator's stream, waited for under its timeout.
    CUDA_CHECK(cudaMemcpyAsync(host_counts_, counts_.data(), counts_.bytes(), cudaMemcpyDeviceToHost,
                               static_cast<cudaStream_t>(communicator_->stream())));
#endif
  }
  counts_in_flight_ = true;
}

const ExpertExchangePlan& ExpertDispatcher::finish_count_exchange(const ExecContext& context) {
  check_context(context);
  SY_CHECK(counts_in_flight_, "ExpertDispatcher::finish_count_exchange: start_count_exchange has not run");
  counts_in_flight_ = false;
  const int64_t segments = int64_t(ranks_) * local_experts_;
  communicator_->synchronize();

  // The host plan.
  const int32_t* host = static_cast<const int32_t*>(host_counts_);
  if (gather_all_counts()) {
    // host holds [P][E]: row s is rank s's send counts by global expert; this rank's row is its own.
    const int32_t* all = host;
    plan_.send_counts.assign(all + size_t(rank_) * segments, all + size_t(rank_ + 1) * segments);
    plan_.recv_counts.resize(size_t(segments));
    for (int source = 0; source < ranks_; ++source)
      for (int expert = 0; expert < local_experts_; ++expert)
        plan_.recv_counts[size_t(source) * local_experts_ + expert] =
            all[size_t(source) * segments + size_t(rank_) * local_experts_ + expert];
    build_peer_rows(all);
  } else {
    plan_.send_counts.assign(host, host + segments);
    plan_.recv_counts.assign(host + segments, host + 2 * segments);
  }
  plan_.send_starts.assign(size_t(segments) + 1, 0);
  plan_.recv_starts.assign(size_t(segments) + 1, 0);
  for (int64_t segment = 0; segment < segments; ++segment) {
    const int32_t sent = plan_.send_counts[size_t(segment)], received = plan_.recv_counts[size_t(segment)];
    SY_CHECK(sent >= 0 && received >= 0, "ExpertDispatcher: negative row count (sent ", sent, ", received ", received,
             ") for segment ", segment);
    plan_.send_starts[size_t(segment) + 1] = plan_.send_starts[size_t(segment)] + sent;
    plan_.recv_starts[size_t(segment) + 1] = plan_.recv_starts[size_t(segment)] + received;
  }
  plan_.expert_offsets.assign(size_t(local_experts_) + 1, 0);
  for (int expert = 0; expert < local_experts_; ++expert) {
    int64_t total = 0;
    for (int peer = 0; peer < ranks_; ++peer)
      total += plan_.recv_counts[size_t(peer) * size_t(local_experts_) + size_t(expert)];
    plan_.expert_offsets[size_t(expert) + 1] = plan_.expert_offsets[size_t(expert)] + round_up(total, alignment_);
  }
  const int64_t int32_max = std::numeric_limits<int32_t>::max();
  SY_CHECK(plan_.recv_rows() <= int32_max && plan_.expert_rows() <= int32_max,
           "ExpertDispatcher: this rank would receive ", plan_.recv_rows(), " rows (", plan_.expert_rows(),
           " padded), beyond int32 row indices");

  // The device layout, from the received counts (written on the communicator's stream).
  events_->record_comm(chunks_, *communicator_);
  events_->compute_waits_for_comm(context, chunks_);
  if (gather_all_counts()) {
    // P*L integers: cheaper on the host than a kernel launch.
    ops::ep_receive_layout(ExecContext{DeviceKind::cpu, nullptr}, host_layout_);
    upload_direct_tables(context);
  } else {
    ops::ep_receive_layout(context, layout_);
  }
  has_plan_ = true;
  return plan_;
}

// peer_rows and the largest layout of any rank (src/ops/ep_nvlink_ops.h, ep_peer_rows), staged
// with this rank's received counts for one copy to the device.
void ExpertDispatcher::build_peer_rows(const int32_t* all_counts) {
  int32_t* tables = static_cast<int32_t*>(host_tables_);
  std::copy(plan_.recv_counts.begin(), plan_.recv_counts.end(), tables);  // host_layout_.recv_counts
  max_expert_rows_ = ep_peer_rows(all_counts, ranks_, local_experts_, rank_, alignment_, tables + peer_rows_at_);
}

void ExpertDispatcher::upload_direct_tables(const ExecContext& context) {
  if (device_ == DeviceKind::cuda) {
#if defined(SWITCHYARD_WITH_CUDA)
    // The pinned staging is rewritten only after the next count exchange's host sync, which comes
    // after this copy in stream order (the exchange waits for the compute stream first).
    CUDA_CHECK(cudaMemcpyAsync(direct_tables_.data(), host_tables_, direct_tables_.bytes(), cudaMemcpyHostToDevice,
                               static_cast<cudaStream_t>(context.stream)));
#endif
  }
  // On the CPU host_tables_ is direct_tables_ itself.
  (void)context;
}

const int32_t* ExpertDispatcher::peer_rows() const {
  SY_CHECK(gather_all_counts() && has_plan_, "ExpertDispatcher::peer_rows: needs gather_all_counts and a plan");
  return direct_tables_.as<int32_t>() + peer_rows_at_;
}

Tensor ExpertDispatcher::chunk_offsets(int chunk) const {
  SY_CHECK(chunk >= 0 && chunk < chunks_, "ExpertDispatcher: chunk ", chunk, " of ", chunks_);
  const int first = plan_.chunk_first_expert(chunk), end = plan_.chunk_end_expert(chunk);
  return Tensor(layout_.chunk_offsets.as<int32_t>() + first + chunk, DType::i32, device_, {int64_t(end - first) + 1});
}

void ExpertDispatcher::exchange(const ExecContext& context, int chunk, bool dispatch, const Tensor& source,
                                Tensor& destination) {
  const char* what = dispatch ? "ExpertDispatcher::dispatch" : "ExpertDispatcher::combine";
  check_context(context);
  SY_CHECK(has_plan_, what, ": exchange_counts has not run");
  SY_CHECK(source.rank == 2 && destination.rank == 2 && source.dtype == destination.dtype &&
               source.dim(1) == destination.dim(1) && source.device == device_ && destination.device == device_,
           what, ": source and destination must be [rows, D] of one dtype on ", device_kind_name(device_), ", got ",
           source.describe(), " and ", destination.describe());
  const int64_t source_rows = dispatch ? plan_.send_rows() : plan_.recv_rows();
  const int64_t destination_rows = dispatch ? plan_.recv_rows() : plan_.send_rows();
  SY_CHECK(source.dim(0) >= source_rows && destination.dim(0) >= destination_rows, what, ": the plan moves ",
           source_rows, " rows into ", destination_rows, ", the tensors have ", source.dim(0), " and ",
           destination.dim(0));
  plan_.chunk_arguments(chunk, dispatch, source.dim(1), send_counts_, send_offsets_, recv_counts_, recv_offsets_);
  events_->comm_waits_for_compute(context, *communicator_);
  communicator_->all_to_all_v(source.data, send_counts_, send_offsets_, destination.data, recv_counts_, recv_offsets_,
                              source.dtype);
  events_->record_comm(dispatch ? chunk : chunks_, *communicator_);
}

void ExpertDispatcher::dispatch(const ExecContext& context, int chunk, const Tensor& send_packed, Tensor& recv_packed) {
  exchange(context, chunk, true, send_packed, recv_packed);
}

void ExpertDispatcher::combine(const ExecContext& context, int chunk, const Tensor& recv_packed, Tensor& send_packed) {
  exchange(context, chunk, false, recv_packed, send_packed);
}

void ExpertDispatcher::wait_dispatched(const ExecContext& context, int chunk) {
  check_context(context);
  SY_CHECK(chunk >= 0 && chunk < chunks_, "ExpertDispatcher::wait_dispatched: chunk ", chunk, " of ", chunks_);
  events_->compute_waits_for_comm(context, chunk);
}

void ExpertDispatcher::wait_combined(const ExecContext& context) {
  check_context(context);
  events_->compute_waits_for_comm(context, chunks_);
}

void ExpertDispatcher::dequantize_received(const ExecContext& context, int chunk, const Tensor& recv_fp8,
                                           Tensor& recv_packed) {
  check_context(context);
  SY_CHECK(has_plan_, "ExpertDispatcher::dequantize_received: exchange_counts has not run");
  SY_CHECK(chunk >= 0 && chunk < chunks_, "ExpertDispatcher::dequantize_received: chunk ", chunk, " of ", chunks_);
  SY_CHECK(recv_fp8.rank == 2 && recv_packed.rank == 2 && recv_fp8.dtype == DType::u8 &&
               recv_fp8.dim(0) >= plan_.recv_rows() && recv_packed.dim(0) >= plan_.recv_rows(),
           "ExpertDispatcher::dequantize_received: need ", plan_.recv_rows(), " u8 and ", plan_.recv_rows(),
           " activation rows, got ", recv_fp8.describe(), " and ", recv_packed.describe());
  auto dequantize = [&](int64_t begin, int64_t end) {
    if (end <= begin) return;
    const size_t fp8_bytes = size_t(recv_fp8.dim(1));
    const size_t row_bytes = size_t(recv_packed.dim(1)) * dtype_size(recv_packed.dtype);
    const Tensor source(static_cast<char*>(recv_fp8.data) + size_t(begin) * fp8_bytes, DType::u8, device_,
                        {end - begin, recv_fp8.dim(1)});
    Tensor destination(static_cast<char*>(recv_packed.data) + size_t(begin) * row_bytes, recv_packed.dtype, device_,
                       {end - begin, recv_packed.dim(1)});
    ops::dequantize_rows_fp8(context, source, destination);
  };
  if (chunks_ == 1) return dequantize(0, plan_.recv_rows());
  const int first = plan_.chunk_first_expert(chunk), end = plan_.chunk_end_expert(chunk);
  for (int source = 0; source < ranks_; ++source) {
    const size_t base = size_t(source) * size_t(local_experts_);
    dequantize(plan_.recv_starts[base + size_t(first)], plan_.recv_starts[base + size_t(end)]);
  }
}

void ExpertDispatcher::to_expert_layout(const ExecContext& context, int chunk, const Tensor& recv_packed,
                                        Tensor& expert_rows) {
  check_context(context);
  SY_CHECK(has_plan_, "ExpertDispatcher::to_expert_layout: exchange_counts has not run");
  SY_CHECK(chunk >= 0 && chunk < chunks_, "ExpertDispatcher::to_expert_layout: chunk ", chunk, " of ", chunks_);
  SY_CHECK(recv_packed.rank == 2 && expert_rows.rank == 2 && recv_packed.dim(0) >= plan_.recv_rows() &&
               expert_rows.dim(0) >= plan_.expert_rows(),
           "ExpertDispatcher::to_expert_layout: need ", plan_.recv_rows(), " packed and ", plan_.expert_rows(),
           " expert rows, got ", recv_packed.describe(), " and ", expert_rows.describe());
  ops::ep_to_expert_layout(context, recv_packed, layout_, plan_.chunk_first_expert(chunk), plan_.chunk_end_expert(chunk),
                           plan_.chunk_row_end(chunk) - plan_.chunk_row_begin(chunk), expert_rows);
}

void ExpertDispatcher::from_expert_layout(const ExecContext& context, int chunk, const Tensor& expert_rows,
                                          Tensor& recv_packed) {
  check_context(context);
  SY_CHECK(has_plan_, "ExpertDispatcher::from_expert_layout: exchange_counts has not run");
  SY_CHECK(chunk >= 0 && chunk < chunks_, "ExpertDispatcher::from_expert_layout: chunk ", chunk, " of ", chunks_);
  SY_CHECK(recv_packed.rank == 2 && expert_rows.rank == 2 && recv_packed.dim(0) >= plan_.recv_rows() &&
               expert_rows.dim(0) >= plan_.expert_rows(),
           "ExpertDispatcher::from_expert_layout: need ", plan_.recv_rows(), " packed and ", plan_.expert_rows(),
           " expert rows, got ", recv_packed.describe(), " and ", expert_rows.describe());
  ops::ep_from_expert_layout(context, expert_rows, layout_, plan_.chunk_first_expert(chunk),
                             plan_.chunk_end_expert(chunk), plan_.chunk_row_end(chunk) - plan_.chunk_row_begin(chunk),
                             recv_packed);
}

}  // namespace switchyard
