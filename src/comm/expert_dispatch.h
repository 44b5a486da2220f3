// Expert dispatch and combine over the expert-parallel communicator (design notes §3, §4).
//
// The expert_parallel group has P ranks; rank p holds the global experts [p*L, (p+1)*L), L = E/P.
// Each rank routes its own tokens over all E experts and permutes them with segment_alignment 1,
// so its send buffer is packed by global expert: the rows for (destination p, local expert l) are
// the segment of expert e = p*L + l, and the rows for destination p are one contiguous run.
// (Packed rather than padded-then-packed: no padding ever crosses the network, and no extra
// compaction pass is needed; the receiver pads once, for its own GEMM tile height.)
//
// One exchange, per layer and pass:
//   1. exchange_counts: send_counts[e] = offsets[e+1] - offsets[e] computed on the device
//      (ep_send_counts), an all-to-all of L ints per peer, then ONE copy of both count arrays to
//      the host -- the only host sync, since the payload all-to-all needs message sizes on the
//      host (NCCL). On CUDA it waits through the communicator's synchronize(), so a peer that died
//      surfaces as a timeout Error rather than a hang. The receive layout (src/ops/ep_ops.h:
//      packed starts, padded expert offsets by local expert, per-chunk offsets) is computed on the
//      device from the received counts; the host plan holds the same numbers for sizing views.
//      start_count_exchange / finish_count_exchange split it so that the sender's permute runs
//      between them, while the counts travel.
//   2. dispatch(chunk): rows of that chunk's local experts go out: an all_to_all_v whose per-peer
//      pieces are contiguous both in the send buffer ([destination][local expert]) and in the
//      receive buffer ([source][local expert]).
//   3. to_expert_layout(chunk): the receiver reorders [source][local expert] rows into its padded
//      grouped-GEMM layout by local expert (rows of one expert ordered by source rank).
//   4. the caller runs the expert FFN on the chunk's rows;
//      from_expert_layout(chunk) puts its output rows back in [source][local expert] order, and
//   5. combine(chunk) returns them: the mirror all_to_all_v, into the sender's packed layout.
// Backward reuses the plan of its forward (no count exchange): dispatch the output-row gradients,
// run the expert backward, combine the input-row gradients.
//
// Chunks (parallel.a2a_chunks = C > 1): the local experts are split into C groups; with all
// dispatches enqueued first on the communicator's stream, the expert GEMMs of chunk c (compute
// stream) overlap the transfer of chunk c+1, and the combine of chunk c overlaps the GEMMs of
// chunk c+1. C is clamped to L (a chunk is at least one expert).
//
// Streams. CPU: MpiCommunicator, host buffers, every collective blocking, so ordering is trivial.
// CUDA: NcclCommunicator, device buffers, its own stream. Before a collective the communicator's
// stream waits for an event recorded on the compute stream (the data it sends is ready); after it
// the compute stream waits for an event recorded on the communicator's stream (dispatch: one per
// chunk, wait_dispatched; combine: wait_combined). Buffers handed to dispatch / combine must stay
// untouched by the compute stream until the matching wait.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "src/comm/communicator.h"
#include "src/comm/nvlink_exchange.h"
#include "src/ops/ep_ops.h"
#include "src/core/device.h"

namespace switchyard {

// Orders work between a compute stream and a communicator's stream with CUDA events; every call
// is a no-op on the CPU (MPI collectives complete before they return).
class CommStreamEvents {
 public:
  CommStreamEvents(DeviceKind device, int slots);
  ~CommStreamEvents();
  CommStreamEvents(const CommStreamEvents&) = delete;
  CommStreamEvents& operator=(const CommStreamEvents&) = delete;
  // The communicator's stream waits for everything enqueued so far on context.stream.
  void comm_waits_for_compute(const ExecContext& context, Communicator& communicator);
  // Records event `slot` on the communicator's stream (after the collectives enqueued so far).
  void record_comm(int slot, Communicator& communicator);
  // context.stream waits for event `slot` (as last recorded by record_comm).
  void compute_waits_for_comm(const ExecContext& context, int slot);
  int slots() const { return int(events_.size()); }

 private:
  DeviceKind device_;
  void* compute_event_ = nullptr;
  std::vector<void*> events_;
};

// The host's copy of one exchange: counts and the offsets derived from them, in rows.
struct ExpertExchangePlan {
  int ranks = 1, local_experts = 1, chunks = 1, alignment = 1;
  std::vector<int32_t> send_counts;    // [P*L] rows sent to (destination p, local expert l)
  std::vector<int32_t> recv_counts;    // [P*L] rows received from (source p) for local expert l
  std::vector<int64_t> send_starts;    // [P*L + 1] packed send-buffer prefix
  std::vector<int64_t> recv_starts;    // [P*L + 1] packed receive-buffer prefix
  std::vector<int64_t> expert_offsets; // [L + 1] padded layout by local expert
  std::vector<int> chunk_experts;      // [C + 1] first local expert of each chunk

  int64_t send_rows() const { return send_starts.empty() ? 0 : send_starts.back(); }
  int64_t recv_rows() const { return recv_starts.empty() ? 0 : recv_starts.back(); }
  int64_t expert_rows() const { return expert_offsets.empty() ? 0 : expert_offsets.back(); }
  int chunk_first_expert(int chunk) const { return chunk_experts[size_t(chunk)]; }
  int chunk_end_expert(int chunk) const { return chunk_experts[size_t(chunk) + 1]; }
  int64_t chunk_row_begin(int chunk) const { return expert_offsets[size_t(chunk_first_expert(chunk))]; }
  int64_t chunk_row_end(int chunk) const { return expert_offsets[size_t(chunk_end_expert(chunk))]; }
  // all_to_all_v arguments (elements, rows * width) for chunk `chunk`. dispatch: from the packed
  // send buffer to the packed receive buffer; otherwise (combine) the reverse.
  void chunk_arguments(int chunk, bool dispatch, int64_t width, std::vector<int64_t>& send_counts_out,
                       std::vector<int64_t>& send_offsets_out, std::vector<int64_t>& recv_counts_out,
                       std::vector<int64_t>& recv_offsets_out) const;
};

class ExpertDispatcher {
 public:
  // `expert_parallel` lives on `device` (MPI for cpu, NCCL for cuda). num_experts % size == 0.
  // `segment_alignment`: the receiver's grouped GEMM tile height. `chunks` >= 1 (clamped to L).
  // `count_peers` (the nvlink transport, src/comm/nvlink_exchange.h; CUDA): the count exchange gathers
  // every rank's [E] counts into every rank's region `count_region` of count_peers (at least P*E
  // int32) instead of an NCCL all-to-all, so that each rank also knows where its rows go in every
  // peer's layout (peer_rows) and the largest padded layout of any rank. A one-block kernel writes
  // them on the compute stream; a device-side wait on the communicator's stream precedes the one
  // host copy. count_peers must outlive the dispatcher.
  ExpertDispatcher(std::shared_ptr<Communicator> expert_parallel, DeviceKind device, int num_experts,
                   int segment_alignment, int chunks, NvlinkPeerMemory* count_peers = nullptr,
                   int count_region = -1);
  ~ExpertDispatcher();
  ExpertDispatcher(const ExpertDispatcher&) = delete;
  ExpertDispatcher& operator=(const ExpertDispatcher&) = delete;

  int ranks() const { return ranks_; }
  int rank() const { return rank_; }
  int local_experts() const { return local_experts_; }
  int first_expert() const { return rank_ * local_experts_; }  // global id of local expert 0
  int chunks() const { return chunks_; }
  Communicator& communicator() const { return *communicator_; }

  // Step 1. `packed_offsets`: int32 [E+1] of a routing with segment_alignment 1, on `device`.
  const ExpertExchangePlan& exchange_counts(const ExecContext& context, const Tensor& packed_offsets);
  // Step 1 in two halves, so that compute enqueued in between (the sender's permute) overlaps the
  // count all-to-all and its host copy: start enqueues them after the work already on
  // context.stream; finish waits for them (the host sync) and builds the plan and the layout.
  void start_count_exchange(const ExecContext& context, const Tensor& packed_offsets);
  const ExpertExchangePlan& finish_count_exchange(const ExecContext& context);
  const ExpertExchangePlan& plan() const { return plan_; }
  // With count_peers, after finish_count_exchange: int32 [P*L] on the device, the first row
  // in rank p's padded layout of this rank's rows for p's local expert l (rank p's segment_rows[r, l]),
  // and the largest plan.expert_rows() over the group's ranks.
  const int32_t* peer_rows() const;
  int64_t max_expert_rows() const { return max_expert_rows_; }
  const EpReceiveLayout& layout() const { return layout_; }
  // int32 [n_c + 1] offsets of chunk `chunk`'s experts relative to its first padded row.
  Tensor chunk_offsets(int chunk) const;

  // Steps 2 and 5: `send_packed` [>= plan.send_rows(), D] (the sender's packed rows) and
  // `recv_packed` [>= plan.recv_rows(), D] (the receiver's [source][local expert] rows).
  void dispatch(const ExecContext& context, int chunk, const Tensor& send_packed, Tensor& recv_packed);
  void wait_dispatched(const ExecContext& context, int chunk);
  void combine(const ExecContext& context, int chunk, const Tensor& recv_packed, Tensor& send_packed);
  void wait_combined(const ExecContext& context);

  // The FP8 dispatch's receiver (src/comm/ep_exchange.h): chunk `chunk`'s rows of `recv_fp8`
  // (u8 [>= plan.recv_rows(), fp8_row_bytes(D)], what dispatch delivered) dequantized into the same
  // rows of `recv_packed` [>= plan.recv_rows(), D]. The chunk's rows from one source are contiguous:
  // one op per source that sent any (one op in all when there is one chunk). After wait_dispatched.
  void dequantize_received(const ExecContext& context, int chunk, const Tensor& recv_fp8, Tensor& recv_packed);

  // Steps 3 and 4 for chunk `chunk`: `expert_rows` [>= plan.expert_rows(), D].
  void to_expert_layout(const ExecContext& context, int chunk, const Tensor& recv_packed, Tensor& expert_rows);
  void from_expert_layout(const ExecContext& context, int chunk, const Tensor& expert_rows, Tensor& recv_packed);

 private:
  void exchange(const ExecContext& context, int chunk, bool dispatch, const Tensor& source, Tensor& destination);
  void build_peer_rows(const int32_t* all_counts);
  void upload_direct_tables(const ExecContext& context);
  void check_context(const ExecContext& context) const;
  // With peer memory, counts are all-gathered through it and the direct tables are built here.
  bool gather_all_counts() const { return count_peers_ != nullptr; }

  std::shared_ptr<Communicator> communicator_;
  DeviceKind device_;
  int ranks_ = 1, rank_ = 0, num_experts_ = 0, local_experts_ = 0, chunks_ = 1, alignment_ = 1;
  NvlinkPeerMemory* count_peers_ = nullptr;
  int count_region_ = -1;
  int64_t max_expert_rows_ = 0;
  Buffer direct_tables_;  // with count_peers: device [recv_counts | the layout | peer_rows]
  void* host_tables_ = nullptr;  // pinned staging of the same
  EpReceiveLayout host_layout_;  // layout_ over host_tables_
  int64_t peer_rows_at_ = 0;     // int32 offset of peer_rows in the tables
  bool has_plan_ = false;
  bool counts_in_flight_ = false;  // start_count_exchange ran, finish_count_exchange not yet
  ExpertExchangePlan plan_;
  // Device memory: count block [2, E] (send counts, then received counts) and the layout tensors.
  Buffer counts_, layout_memory_;
  EpReceiveLayout layout_;
  void* host_counts_ = nullptr;  // pinned on CUDA, plain on CPU: 2 * E int32
  std::vector<int32_t> host_counts_storage_;
  std::unique_ptr<CommStreamEvents> events_;  // slots: one per chunk (dispatched), then one (combined)
  std::vector<int64_t> send_counts_, send_offsets_, recv_counts_, recv_offsets_;  // scratch
};

}  // namespace switchyard
