// Peer-mapped memory and signal boards of the nvlink EP transport (src/comm/nvlink_exchange.h).
#include "src/comm/nvlink_exchange.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <utility>

#include "src/ops/ops.h"

#if defined(SWITCHYARD_WITH_CUDA)
#include <cuda_runtime.h>

#include "src/comm/nccl_comm.h"

#include "src/core/cuda_check.h"
#endif

namespace switchyard {

const char* ep_transport_name(EpTransport transport) {
  switch (transport) {
    case EpTransport::automatic: return "auto";
    case EpTransport::nccl: return "nccl";
    case EpTransport::nvlink: return "nvlink";
  }
  return "unknown";
}

EpTransport parse_ep_transport(const std::string& text, const std::string& where) {
  if (text == "auto") return EpTransport::automatic;
  if (text == "nccl") return EpTransport::nccl;
  if (text == "nvlink") return EpTransport::nvlink;
  SY_BAD_INPUT(where, ": unknown expert-parallel transport '", text, "' (choices: auto, nccl, nvlink)");
}

#if defined(SWITCHYARD_WITH_CUDA)

namespace {

constexpr int kHandleInts = int(sizeof(cudaIpcMemHandle_t) / sizeof(int32_t));
static_assert(sizeof(cudaIpcMemHandle_t) % sizeof(int32_t) == 0, "IPC handles are whole int32s");

uint64_t host_fingerprint() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return 0;
  uint64_t hash = 1469598103934665603ull;  // FNV-1a
  for (const char* c = name; *c; ++c) hash = (hash ^ uint64_t(static_cast<unsigned char>(*c))) * 1099511628211ull;
  return hash;
}

// The ops of src/ops/ops.h take an execution context: the CUDA one of the caller's stream.
ExecContext cuda_context(void* stream) { return ExecContext{DeviceKind::cuda, stream}; }

}  // namespace

NvlinkPeerMemory::NvlinkPeerMemory(std::shared_ptr<Communicator> group, int regions) : group_(std::move(group)) {
  ranks_ = group_->size();
  rank_ = group_->rank();
  if (auto* nccl = dynamic_cast<NcclCommunicator*>(group_.get())) timeout_seconds_ = nccl->timeout_seconds();
  regions_.resize(size_t(regions));
  CUDA_CHECK(cudaMalloc(&staging_, size_t(ranks_ + 1) * sizeof(cudaIpcMemHandle_t)));
  CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&block_counter_), sizeof(unsigned)));
  CUDA_CHECK(cudaMemset(block_counter_, 0, sizeof(unsigned)));
  CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&failure_host_), sizeof(EpWaitFailure), cudaHostAllocMapped));
  std::memset(failure_host_, 0, sizeof(EpWaitFailure));
  CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&failure_device_), failure_host_, 0));
  note_id_ = add_cuda_error_note([this] { return failure_note(); });
}

std::unique_ptr<NvlinkPeerMemory> NvlinkPeerMemory::create(std::shared_ptr<Communicator> group, int regions,
                                                           std::string* why) {
  SY_CHECK(group != nullptr && regions >= 0, "NvlinkPeerMemory: no group");
  auto refuse = [&](std::string reason) {
    if (why) *why = std::move(reason);
    return std::unique_ptr<NvlinkPeerMemory>();
  };
  if (group->device() != DeviceKind::cuda) return refuse("the group is not on CUDA");
  // Every rank takes the same branches below: the environment is the job's, the rest is gathered.
  const char* p2p_disabled = std::getenv("NCCL_P2P_DISABLE");
  if (p2p_disabled && std::string(p2p_disabled) == "1") return refuse("NCCL_P2P_DISABLE=1");

  std::unique_ptr<NvlinkPeerMemory> memory(new NvlinkPeerMemory(group, regions));
  // Same host? An all-gather of a hostname fingerprint.
  int64_t* fingerprints = static_cast<int64_t*>(memory->staging_);
  const int64_t mine = int64_t(host_fingerprint());
  CUDA_CHECK(cudaMemcpy(fingerprints + group->size(), &mine, sizeof(mine), cudaMemcpyHostToDevice));
  group->all_gather(fingerprints + group->size(), fingerprints, 1, DType::i64);
  group->synchronize();
  std::vector<int64_t> all(size_t(group->size()));
  CUDA_CHECK(cudaMemcpy(all.data(), fingerprints, all.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
  for (int64_t other : all)
    if (other != mine) return refuse("the expert-parallel ranks are not all on one host");

  // Signal boards: zeroed before anyone can map them (map_peers synchronizes the group).
  Region& board = memory->board_region_;
  board.bytes = size_t(kEpSignalKinds) * size_t(group->size()) * sizeof(unsigned long long);
  CUDA_CHECK(cudaMalloc(&board.local, board.bytes));
  CUDA_CHECK(cudaMemset(board.local, 0, board.bytes));
  CUDA_CHECK(cudaDeviceSynchronize());
  if (!memory->map_peers(board.local, board.mapped, why)) return nullptr;
  memory->upload_bases(board);
  memory->boards_.boards = reinterpret_cast<unsigned long long* const*>(board.device_bases);
  memory->boards_.num_ranks = memory->ranks_;
  memory->boards_.rank = memory->rank_;
  return memory;
}

NvlinkPeerMemory::~NvlinkPeerMemory() {
  // Best effort, never throwing: a failed job tears down through here too.
  cudaDeviceSynchronize();
  auto release = [&](Region& region) {
    for (void* mapped : region.mapped)
      if (mapped) cudaIpcCloseMemHandle(mapped);
    if (region.local) cudaFree(region.local);
    if (region.device_bases) cudaFree(region.device_bases);
  };
  for (Region& region : regions_) release(region);
  release(board_region_);
  if (staging_) cudaFree(staging_);
  if (block_counter_) cudaFree(block_counter_);
  if (note_id_ >= 0) remove_cuda_error_note(note_id_);
  if (failure_host_) cudaFreeHost(failure_host_);
}

bool NvlinkPeerMemory::map_peers(void* local, std::vector<void*>& mapped, std::string* why) {
  cudaIpcMemHandle_t handle;
  CUDA_CHECK(cudaIpcGetMemHandle(&handle, local));
  auto* handles = static_cast<cudaIpcMemHandle_t*>(staging_);
  CUDA_CHECK(cudaMemcpy(handles + ranks_, &handle, sizeof(handle), cudaMemcpyHostToDevice));
  group_->all_gather(handles + ranks_, handles, kHandleInts, DType::i32);
  group_->synchronize();
  std::vector<cudaIpcMemHandle_t> all(static_cast<size_t>(ranks_));
  CUDA_CHECK(cudaMemcpy(all.data(), handles, all.size() * sizeof(handle), cudaMemcpyDeviceToHost));

  mapped.assign(size_t(ranks_), nullptr);
  std::string failure;
  for (int peer = 0; peer < ranks_ && failure.empty(); ++peer) {
    if (peer == rank_) continue;
    const cudaError_t status =
        cudaIpcOpenMemHandle(&mapped[size_t(peer)], all[size_t(peer)], cudaIpcMemLazyEnablePeerAccess);
    if (status != cudaSuccess) {
      cudaGetLastError();  // clear it: the fallback keeps using this device
      mapped[size_t(peer)] = nullptr;
      failure = std::string("rank ") + std::to_string(rank_) + " cannot map rank " + std::to_string(peer) +
                "'s memory (" + cudaGetErrorString(status) + ")";
    }
  }
  // Everyone learns whether anyone failed (a sum of failures, one int).
  int32_t* flag = static_cast<int32_t*>(staging_);
  const int32_t failed = failure.empty() ? 0 : 1;
  CUDA_CHECK(cudaMemcpy(flag, &failed, sizeof(failed), cudaMemcpyHostToDevice));
  group_->all_reduce_sum(flag, 1, DType::i32);
  group_->synchronize();
  int32_t failures = 0;
  CUDA_CHECK(cudaMemcpy(&failures, flag, sizeof(failures), cudaMemcpyDeviceToHost));
  if (failures == 0) return true;
  unmap(mapped);
  if (why) *why = failure.empty() ? std::to_string(failures) + " rank(s) could not map their peers' memory" : failure;
  return false;
}

void NvlinkPeerMemory::unmap(std::vector<void*>& mapped) {
  for (void*& pointer : mapped) {
    if (pointer) CUDA_CHECK(cudaIpcCloseMemHandle(pointer));
    pointer = nullptr;
  }
}

void NvlinkPeerMemory::upload_bases(Region& region) {
  std::vector<void*> bases = region.mapped;
  bases[size_t(rank_)] = region.local;
  if (!region.device_bases)
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&region.device_bases), bases.size() * sizeof(void*)));
  CUDA_CHECK(cudaMemcpy(region.device_bases, bases.data(), bases.size() * sizeof(void*), cudaMemcpyHostToDevice));
}

void NvlinkPeerMemory::reserve(int region_index, size_t bytes) {
  SY_CHECK(region_index >= 0 && region_index < int(regions_.size()), "NvlinkPeerMemory: region ", region_index);
  Region& region = regions_[size_t(region_index)];
  if (bytes <= region.bytes) return;
  // Nobody may still read or write the old regions: every rank finishes its device work first.
  CUDA_CHECK(cudaDeviceSynchronize());
  group_->barrier();
  unmap(region.mapped);
  group_->barrier();  // every peer has unmapped this rank's old region before it is freed
  if (region.local) CUDA_CHECK(cudaFree(region.local));
  region.local = nullptr;
  region.bytes = 0;
  CUDA_CHECK(cudaMalloc(&region.local, bytes));
  region.bytes = bytes;
  std::string why;
  SY_CHECK(map_peers(region.local, region.mapped, &why), "NvlinkPeerMemory: peers mapped once but not now: ", why);
  upload_bases(region);
}

void NvlinkPeerMemory::signal(int kind, void* stream) { ops::ep_signal_peers(cuda_context(stream), boards_, kind); }

void NvlinkPeerMemory::wait(int kind, void* stream) {
  SY_CHECK(kind >= 0 && kind < kEpSignalKinds, "NvlinkPeerMemory: signal kind ", kind);
  const int64_t timeout_ns = timeout_seconds_ > 0 ? int64_t(timeout_seconds_ * 1e9) : 0;
  ops::ep_wait_signals(cuda_context(stream), boards_, kind, ++waits_[kind], timeout_ns, failure_device_);
}

void NvlinkPeerMemory::signal_and_wait(int kind, void* stream) {
  SY_CHECK(kind >= 0 && kind < kEpSignalKinds, "NvlinkPeerMemory: signal kind ", kind);
  const int64_t timeout_ns = timeout_seconds_ > 0 ? int64_t(timeout_seconds_ * 1e9) : 0;
  ops::ep_signal_and_wait(cuda_context(stream), boards_, kind, ++waits_[kind], timeout_ns, failure_device_);
}

void NvlinkPeerMemory::push(int region, const void* packed, int64_t rows, int64_t row_bytes, int local_experts,
                            const int32_t* packed_offsets, const int32_t* peer_rows, int kind, void* stream) {
  EpPeerRows peers{ranks_, local_experts, rank_, row_bytes, packed_offsets, peer_rows, peer_bases(region), max_blocks_};
  ops::ep_push_rows(cuda_context(stream), packed, rows, peers, boards_, kind, block_counter_);
}

void NvlinkPeerMemory::all_gather_counts(int region, const int32_t* packed_offsets, int64_t segments, int kind,
                                         void* stream) {
  SY_CHECK(size_t(segments) * size_t(ranks_) * sizeof(int32_t) <= bytes(region), "NvlinkPeerMemory: all-gather of ",
           segments, " counts x ", ranks_, " ranks into a region of ", bytes(region), " bytes");
  ops::ep_all_gather_counts(cuda_context(stream), packed_offsets, segments, peer_bases(region), boards_, kind);
}

void NvlinkPeerMemory::pull_combine(int region, int64_t rows, int64_t row_bytes, int local_experts,
                                    const int32_t* packed_offsets, const int32_t* peer_rows,
                                    const int32_t* choice_rows, const float* gates, int64_t num_tokens, int k_max,
                                    DType dtype, void* tokens_out, void* keep, void* stream) {
  EpPeerRows peers{ranks_, local_experts, rank_, row_bytes, packed_offsets, peer_rows, peer_bases(region), max_blocks_};
  ops::ep_pull_combine(cuda_context(stream), peers, rows, choice_rows, gates, num_tokens, k_max, dtype, tokens_out,
                       keep);
}

void NvlinkPeerMemory::zero_padding(int region, int64_t row_bytes, const int32_t* expert_offsets,
                                    const int32_t* expert_totals, int local_experts, int64_t padding_rows,
                                    void* stream) {
  ops::ep_zero_padding_rows(cuda_context(stream), local(region), row_bytes, expert_offsets, expert_totals,
                            local_experts, padding_rows);
}

std::string NvlinkPeerMemory::failure_note() const {
  const volatile EpWaitFailure* record = failure_host_;
  if (!record || record->failed == 0) return "";
  std::ostringstream note;
  note << "expert-parallel nvlink exchange: rank " << record->rank << " waited more than " << timeout_seconds_
       << " s for rank " << record->source << "'s '" << ep_signal_kind_name(record->kind) << "' signal ("
       << record->seen << " of " << record->expected << " seen); that rank stopped participating";
  return note.str();
}

#else  // no CUDA backend

std::unique_ptr<NvlinkPeerMemory> NvlinkPeerMemory::create(std::shared_ptr<Communicator>, int, std::string* why) {
  if (why) *why = "this build of switchyard has no CUDA backend";
  return nullptr;
}
NvlinkPeerMemory::~NvlinkPeerMemory() = default;
void NvlinkPeerMemory::reserve(int, size_t) { SY_THROW("NvlinkPeerMemory: no CUDA backend"); }
void NvlinkPeerMemory::signal(int, void*) { SY_THROW("NvlinkPeerMemory: no CUDA backend"); }
void NvlinkPeerMemory::wait(int, void*) { SY_THROW("NvlinkPeerMemory: no CUDA backend"); }
void NvlinkPeerMemory::signal_and_wait(int, void*) { SY_THROW("NvlinkPeerMemory: no CUDA backend"); }
void NvlinkPeerMemory::push(int, const void*, int64_t, int64_t, int, const int32_t*, const int32_t*, int, void*) {
  SY_THROW("NvlinkPeerMemory: no CUDA backend");
}
void NvlinkPeerMemory::all_gather_counts(int, const int32_t*, int64_t, int, void*) {
  SY_THROW("NvlinkPeerMemory: no CUDA backend");
}
void NvlinkPeerMemory::pull_combine(int, int64_t, int64_t, int, const int32_t*, const int32_t*, const int32_t*,
                                    const float*, int64_t, int, DType, void*, void*, void*) {
  SY_THROW("NvlinkPeerMemory: no CUDA backend");
}
void NvlinkPeerMemory::zero_padding(int, int64_t, const int32_t*, const int32_t*, int, int64_t, void*) {
  SY_THROW("NvlinkPeerMemory: no CUDA backend");
}
std::string NvlinkPeerMemory::failure_note() const { return ""; }

#endif

}  // namespace switchyard
