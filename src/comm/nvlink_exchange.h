// NvlinkPeerMemory: the peer-mapped memory and signal boards behind the "nvlink" expert-parallel
// transport (parallel.ep_transport; docs/DESIGN.md, "Intranode direct-write exchange").
//
// Every rank of the expert-parallel group allocates its regions with cudaMalloc, exports them
// with cudaIpcGetMemHandle, and maps every peer's with cudaIpcOpenMemHandle; the handles travel by
// an NCCL all-gather on the group. Kernels (src/ops/ep_nvlink_ops.h) then write and read peer rows
// directly over NVLink. Ordering between ranks uses signal boards (one more mapped region per rank:
// kEpSignalKinds x P monotonically increasing uint64 counters): a sender adds 1 to
// board_p[kind][r], a waiter spins on the device until board_r[kind][s] reaches the number of
// signals of that kind this object has waited for so far (every rank runs the same sequence of
// layer calls, so the counts agree), with the group's collective timeout. A wait that times out
// traps the stream; the CUDA error that results carries a note naming the signal and the rank
// that did not send it (src/core/cuda_check.h, cuda_error_notes).
//
// Reuse of a region across calls is safe without extra barriers because every layer call starts
// with the count exchange over NCCL (src/comm/expert_dispatch.h): its all-gather cannot complete on
// any rank before every rank's compute stream has finished the previous call's kernels.
//
// Usable only where every rank of the group is on one host, NCCL_P2P_DISABLE is not 1 and every
// peer mapping succeeds (create() checks all three collectively and returns nullptr otherwise).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/comm/communicator.h"
#include "src/comm/ep_transport.h"
#include "src/ops/ep_nvlink_ops.h"
#include "src/core/device.h"

namespace switchyard {

class NvlinkPeerMemory {
 public:
  // Collective over `group` (a CUDA communicator). nullptr, with the reason in *why, when the group
  // cannot use the transport.
  static std::unique_ptr<NvlinkPeerMemory> create(std::shared_ptr<Communicator> group, int regions, std::string* why);
  ~NvlinkPeerMemory();
  NvlinkPeerMemory(const NvlinkPeerMemory&) = delete;
  NvlinkPeerMemory& operator=(const NvlinkPeerMemory&) = delete;

  int ranks() const { return ranks_; }
  int rank() const { return rank_; }
  // Collective: region `region` holds at least `bytes` on every rank afterwards (every rank passes
  // the same value; a region only grows). Growing waits for all device work, unmaps the peers' old
  // regions, reallocates and maps the new ones; contents are undefined after a growth.
  void reserve(int region, size_t bytes);
  size_t bytes(int region) const { return regions_.at(size_t(region)).bytes; }
  void* local(int region) const { return regions_.at(size_t(region)).local; }
  // Device array [P] of the region's base on every rank (this rank's own at index rank()).
  void* const* peer_bases(int region) const { return regions_.at(size_t(region)).device_bases; }

  // The most blocks a push or pull-combine launches (parallel.ep_sm_budget); 0: no cap.
  void set_max_blocks(int blocks) { max_blocks_ = blocks; }
  const EpSignalBoards& boards() const { return boards_; }
  unsigned* block_counter() const { return block_counter_; }
  EpWaitFailure* failure_record() const { return failure_device_; }
  // Enqueues on `stream`: a signal of `kind` to every peer, or the wait for one from every rank.
  void signal(int kind, void* stream);
  void wait(int kind, void* stream);
  void signal_and_wait(int kind, void* stream);  // both, in one launch
  // Pushes `rows` packed rows to the peers' region `region` (peer_rows: device [P*L]), then signals `kind`.
  void push(int region, const void* packed, int64_t rows, int64_t row_bytes, int local_experts,
            const int32_t* packed_offsets, const int32_t* peer_rows, int kind, void* stream);
  // This rank's send counts (from its packed offsets, `segments` + 1 ints) into row rank() of every
  // rank's int32 [ranks()][segments] table in region `region`, then a signal of `kind`.
  void all_gather_counts(int region, const int32_t* packed_offsets, int64_t segments, int kind, void* stream);
  // The pull fused with the token-side gather (src/ops/ep_nvlink_ops.h, ep_pull_combine).
  void pull_combine(int region, int64_t rows, int64_t row_bytes, int local_experts, const int32_t* packed_offsets,
                    const int32_t* peer_rows, const int32_t* choice_rows, const float* gates, int64_t num_tokens,
                    int k_max, DType dtype, void* tokens_out, void* keep, void* stream);
  // Zeroes the segment padding rows of this rank's region `region` (src/ops/ep_nvlink_ops.h).
  void zero_padding(int region, int64_t row_bytes, const int32_t* expert_offsets, const int32_t* expert_totals,
                    int local_experts, int64_t padding_rows, void* stream);
  // "" or a sentence naming the failed wait (for CUDA error messages).
  std::string failure_note() const;

 private:
  struct Region {
    size_t bytes = 0;
    void* local = nullptr;
    std::vector<void*> mapped;          // [P]: peers' mapped bases (nullptr at rank())
    void** device_bases = nullptr;      // device [P]
  };
  NvlinkPeerMemory(std::shared_ptr<Communicator> group, int regions);
  // Exports `local`, gathers every rank's handle, maps the peers'. False (nothing left mapped) if
  // any rank failed to map any peer.
  bool map_peers(void* local, std::vector<void*>& mapped, std::string* why);
  void unmap(std::vector<void*>& mapped);
  void upload_bases(Region& region);

  std::shared_ptr<Communicator> group_;
  int ranks_ = 1, rank_ = 0;
  double timeout_seconds_ = 0;
  std::vector<Region> regions_;
  Region board_region_;
  EpSignalBoards boards_;
  unsigned long long waits_[kEpSignalKinds] = {};
  unsigned* block_counter_ = nullptr;
  EpWaitFailure* failure_host_ = nullptr;
  EpWaitFailure* failure_device_ = nullptr;
  void* staging_ = nullptr;  // device bytes for the handle all-gather
  int note_id_ = -1;
  int max_blocks_ = 0;
};

}  // namespace switchyard
