// NcclCommunicator: NCCL communicators with host-side deadlines (see nccl_comm.h).
//
// all_to_all_v is one NCCL group of ncclSend/ncclRecv pairs (one per peer with a non-zero count),
// counts in elements (size_t, so no int limit), offsets turned into byte addresses here.
// Polling: the first polls spin (small collectives finish in microseconds), later ones yield
// the core, so waiting ranks do not starve other work on the host.
#include "src/comm/nccl_comm.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "src/comm/bootstrap.h"
#include "src/comm/mpi_comm.h"
#include "src/core/cuda_check.h"
#include "src/core/mpi_check.h"
#include "src/core/switches.h"

namespace switchyard {

namespace {
using Clock = std::chrono::steady_clock;
constexpr int64_t kSpinPolls = 2000;

ncclDataType_t nccl_datatype(DType dtype) {
  switch (dtype) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::bf16: return ncclBfloat16;
    case DType::f16: return ncclFloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
    case DType::u8: return ncclUint8;
  }
  SY_THROW("no NCCL datatype for dtype ", int(dtype));
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Host calls into a blocking communicator that may wait on peers (creation, connection set-up,
// finalize) run under this watchdog. A call still inside NCCL past its deadline cannot be unwound
// from its own thread, so the watchdog prints the error line (naming the call, the communicator
// and the rank) and ends the job: MPI_Abort when MPI runs with several ranks, else _Exit.
class HostCallWatchdog {
 public:
  static HostCallWatchdog& instance() {
    static HostCallWatchdog* watchdog = new HostCallWatchdog();  // never destroyed: the thread outlives main
    return *watchdog;
  }
  uint64_t enter(std::string what, double timeout_seconds) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!started_) {
      std::thread([this] { watch(); }).detach();
      started_ = true;
    }
    const uint64_t ticket = ++last_ticket_;
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(timeout_seconds));
    calls_[ticket] = Call{std::move(what), deadline, timeout_seconds};
    return ticket;
  }
  void leave(uint64_t ticket) {
    std::lock_guard<std::mutex> lock(mutex_);
    calls_.erase(ticket);
  }

 private:
  struct Call {
    std::string what;
    Clock::time_point deadline;
    double timeout_seconds;
  };
  void watch() {
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      std::string expired;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        const auto now = Clock::now();
        for (const auto& entry : calls_)
          if (now > entry.second.deadline) {
            expired = detail::concat(entry.second.what, " did not return within ", entry.second.timeout_seconds,
                                     " s (a peer stopped participating or died)");
            break;
          }
      }
      if (expired.empty()) continue;
      std::fprintf(stderr, "switchyard: error: [rank %d on %s] %s; ending the job\n", process_rank(),
                   process_host().c_str(), expired.c_str());
      std::fflush(stderr);
      int initialized = 0, finalized = 0, world_size = 1;
      MPI_Initialized(&initialized);
      MPI_Finalized(&finalized);
      if (initialized && !finalized) MPI_Comm_size(MPI_COMM_WORLD, &world_size);
      if (initialized && !finalized && world_size > 1) MPI_Abort(MPI_COMM_WORLD, kExitFailure);
      std::_Exit(kExitFailure);
    }
  }
  std::mutex mutex_;
  std::map<uint64_t, Call> calls_;
  uint64_t last_ticket_ = 0;
  bool started_ = false;
};

// RAII: registers a host call with the watchdog for its lifetime (no-op when timeout <= 0).
class GuardedHostCall {
 public:
  GuardedHostCall(const std::string& what, double timeout_seconds) {
    if (timeout_seconds > 0) ticket_ = HostCallWatchdog::instance().enter(what, timeout_seconds);
  }
  ~GuardedHostCall() {
    if (ticket_) HostCallWatchdog::instance().leave(ticket_);
  }
  GuardedHostCall(const GuardedHostCall&) = delete;
  GuardedHostCall& operator=(const GuardedHostCall&) = delete;

 private:
  uint64_t ticket_ = 0;
};
}  // namespace

struct NcclCommunicator::State {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int* scratch = nullptr;  // one device int: the payload of barrier()
  bool aborted = false;
  bool blocking = true;
  std::string last_collective = "none";
  int64_t pending = 0;  // collectives enqueued since the last completed synchronize()

  // Releases what this process owns without waiting for peers.
  void abort_comm() noexcept {
    if (comm) ncclCommAbort(comm);  // frees the communicator; NCCL kernels see the abort flag
    comm = nullptr;
    aborted = true;
  }
};

NcclCommunicator::NcclCommunicator(MPI_Comm group, std::string name, double timeout_seconds, int max_ctas)
    : state_(std::make_unique<State>()), name_(std::move(name)), timeout_seconds_(timeout_seconds) {
  MPI_CHECK(MPI_Comm_rank(group, &rank_));
  MPI_CHECK(MPI_Comm_size(group, &size_));
  try {
    ncclUniqueId unique_id{};
    if (rank_ == 0) NCCL_CHECK(ncclGetUniqueId(&unique_id));
    std::vector<MPI_Request> requests(1, MPI_REQUEST_NULL);
    MPI_CHECK(MPI_Ibcast(&unique_id, int(sizeof(unique_id)), MPI_BYTE, 0, group, &requests[0]));
    if (!mpi_wait_until(requests, timeout_seconds_))
      SY_THROW(collective_timeout_message("broadcast (NCCL unique id)", name_, rank_, size_, timeout_seconds_));

    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    // Blocking (the default; see nccl_comm.h): collectives return once enqueued, without the
    // per-call hand-off to an NCCL thread that non-blocking communicators pay (measured on H100s:
    // a 1 MiB all-to-all 26 us instead of 100 us). Connections are made now, not at first use
    // (NCCL_RUNTIME_CONNECT=0 unless the user set it, plus the warm-up below), so later host
    // calls never wait on a peer; the calls that can (this creation, finalize) run under the
    // host-call watchdog. SWITCHYARD_NCCL_BLOCKING=0 (switches().nccl_blocking) makes them non-blocking.
    state_->blocking = switches().nccl_blocking;
    config.blocking = state_->blocking ? 1 : 0;
    if (state_->blocking) setenv("NCCL_RUNTIME_CONNECT", "0", /*overwrite=*/0);
    config.commName = name_.c_str();
    SY_CHECK_INPUT(max_ctas >= 0, "communicator '", name_, "': max CTAs must be >= 0, got ", max_ctas);
    if (max_ctas > 0) {
      // The SM budget of parallel.ep_sm_budget. minCTAs 1: a default (or NCCL_MIN_CTAS) above the
      // budget would make the config invalid.
      config.maxCTAs = std::min(max_ctas, kNcclMaxChannels);
      config.minCTAs = 1;
    }
    ncclResult_t result = ncclSuccess;
    {
      GuardedHostCall guard(detail::concat("ncclCommInitRankConfig of communicator '", name_, "' (rank ", rank_,
                                           " of ", size_, ")"),
                            timeout_seconds_);
      result = ncclCommInitRankConfig(&state_->comm, size_, unique_id, rank_, &config);
    }
    if (result != ncclSuccess && result != ncclInProgress) {
      state_->comm = nullptr;
      SY_THROW("NCCL error ", ncclGetErrorString(result), " creating communicator '", name_, "' (rank ", rank_,
               " of ", size_, "): ", ncclGetLastError(nullptr));
    }
    finish_call(ncclInProgress, "ncclCommInitRankConfig");
    CUDA_CHECK(cudaStreamCreateWithFlags(&state_->stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&state_->scratch), sizeof(int)));
    CUDA_CHECK(cudaMemset(state_->scratch, 0, sizeof(int)));
    if (state_->blocking) connect_peers();
  } catch (...) {
    state_->abort_comm();
    if (state_->scratch) cudaFree(state_->scratch);
    if (state_->stream) cudaStreamDestroy(state_->stream);
    throw;
  }
  register_for_abort(this);
}

NcclCommunicator::~NcclCommunicator() {
  unregister_for_abort(this);
  State& state = *state_;
  if (state.comm && !state.aborted) {
    bool clean = false;
    if (std::uncaught_exceptions() == 0) {  // on the error path peers may be gone: do not wait
      GuardedHostCall guard(detail::concat("ncclCommFinalize of communicator '", name_, "' (rank ", rank_, " of ",
                                           size_, ")"),
                            timeout_seconds_);
      ncclResult_t result = ncclCommFinalize(state.comm);
      const auto start = Clock::now();
      while (result == ncclInProgress) {
        if (timeout_seconds_ > 0 && seconds_since(start) > timeout_seconds_) break;
        std::this_thread::yield();
        if (ncclCommGetAsyncError(state.comm, &result) != ncclSuccess) break;
      }
      clean = result == ncclSuccess && ncclCommDestroy(state.comm) == ncclSuccess;
    }
    if (clean)
      state.comm = nullptr;
    else
      state.abort_comm();
  }
  if (state.scratch) cudaFree(state.scratch);
  if (state.stream) cudaStreamDestroy(state.stream);  // returns at once; resources freed when idle
}

// One int to and from every peer (self included) and a one-element all-reduce, under the
// watchdog: whatever connections NCCL still makes lazily (point-to-point ones) are made here,
// while every rank is known to be in this constructor.
void NcclCommunicator::connect_peers() {
  GuardedHostCall guard(detail::concat("connecting the peers of communicator '", name_, "' (rank ", rank_, " of ",
                                       size_, ")"),
                        timeout_seconds_);
  int* ints = nullptr;
  CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ints), 2 * sizeof(int) * size_t(size_)));
  try {
    CUDA_CHECK(cudaMemsetAsync(ints, 0, 2 * sizeof(int) * size_t(size_), state_->stream));
    std::vector<int64_t> counts(size_t(size_), 1), offsets(size_t(size_), 0);
    for (int peer = 0; peer < size_; ++peer) offsets[size_t(peer)] = peer;
    all_to_all_v(ints, counts, offsets, ints + size_, counts, offsets, DType::i32);
    all_reduce_sum(ints, 1, DType::i32);
    synchronize();
  } catch (...) {
    cudaFree(ints);
    throw;
  }
  CUDA_CHECK(cudaFree(ints));
}

void* NcclCommunicator::stream() const { return state_->stream; }

void NcclCommunicator::abort() { state_->abort_comm(); }

void NcclCommunicator::check_usable(const char* collective) const {
  if (state_->aborted || !state_->comm)
    SY_THROW("collective ", collective, " on communicator '", name_,
             "' refused: the communicator was aborted after an earlier failure or timeout");
}

void NcclCommunicator::fail_after_abort(const std::string& message) {
  state_->abort_comm();
  SY_THROW(message);
}

void NcclCommunicator::finish_call(int nccl_result, const char* collective) {
  ncclResult_t result = ncclResult_t(nccl_result);
  if (result == ncclSuccess) return;
  if (result != ncclInProgress)
    fail_after_abort(detail::concat("NCCL error ", ncclGetErrorString(result), " in ", collective,
                                    " on communicator '", name_, "' (rank ", rank_, " of ", size_,
                                    "): ", ncclGetLastError(state_->comm)));
  const auto start = Clock::now();
  for (int64_t poll = 0;; ++poll) {
    ncclResult_t async_state = ncclSuccess;
    ncclResult_t query = ncclCommGetAsyncError(state_->comm, &async_state);
    if (query != ncclSuccess) async_state = query;
    if (async_state == ncclSuccess) return;
    if (async_state != ncclInProgress)
      fail_after_abort(detail::concat("NCCL error ", ncclGetErrorString(async_state), " in ", collective,
                                      " on communicator '", name_, "' (rank ", rank_, " of ", size_,
                                      "): ", ncclGetLastError(state_->comm)));
    if (timeout_seconds_ > 0 && seconds_since(start) > timeout_seconds_)
      fail_after_abort(collective_timeout_message(collective, name_, rank_, size_, timeout_seconds_));
    if (poll >= kSpinPolls) std::this_thread::yield();
  }
}

void NcclCommunicator::note_enqueued(const char* collective) {
  state_->last_collective = collective;
  state_->pending += 1;
}

void NcclCommunicator::synchronize() {
  check_usable("synchronize");
  State& state = *state_;
  const auto start = Clock::now();
  for (int64_t poll = 0;; ++poll) {
    cudaError_t status = cudaStreamQuery(state.stream);
    if (status == cudaSuccess) {
      state.pending = 0;
      return;
    }
    if (status != cudaErrorNotReady) {
      (void)cudaGetLastError();
      fail_after_abort(detail::concat("CUDA error ", cudaGetErrorName(status), " (", cudaGetErrorString(status),
                                      ") waiting for ", state.last_collective, " on communicator '", name_, "'"));
    }
    ncclResult_t async_state = ncclSuccess;
    ncclResult_t query = ncclCommGetAsyncError(state.comm, &async_state);
    if (query != ncclSuccess) async_state = query;
    if (async_state != ncclSuccess && async_state != ncclInProgress)
      fail_after_abort(detail::concat("NCCL error ", ncclGetErrorString(async_state), " during ",
                                      state.last_collective, " on communicator '", name_, "' (rank ", rank_,
                                      " of ", size_, "): ", ncclGetLastError(state.comm)));
    if (timeout_seconds_ > 0 && seconds_since(start) > timeout_seconds_) {
      std::string collective = state.pending > 1
                                   ? detail::concat(state.last_collective, " (the last of ", state.pending,
                                                    " pending collectives)")
                                   : state.last_collective;
      fail_after_abort(collective_timeout_message(collective.c_str(), name_, rank_, size_, timeout_seconds_));
    }
    if (poll >= kSpinPolls) std::this_thread::yield();
  }
}

void NcclCommunicator::all_to_all_v(const void* send, const std::vector<int64_t>& send_counts,
                                    const std::vector<int64_t>& send_offsets, void* recv,
                                    const std::vector<int64_t>& recv_counts,
                                    const std::vector<int64_t>& recv_offsets, DType dtype) {
  check_usable("all_to_all_v");
  SY_CHECK(int(send_counts.size()) == size_ && int(send_offsets.size()) == size_ &&
               int(recv_counts.size()) == size_ && int(recv_offsets.size()) == size_,
           "all_to_all_v: counts and offsets must have one entry per rank (", size_, ")");
  for (int peer = 0; peer < size_; ++peer) {
    SY_CHECK(send_counts[peer] >= 0 && send_offsets[peer] >= 0 && recv_counts[peer] >= 0 && recv_offsets[peer] >= 0,
             "all_to_all_v: negative count or offset for peer ", peer);
    SY_CHECK((send_counts[peer] == 0 || send) && (recv_counts[peer] == 0 || recv),
             "all_to_all_v: null buffer with a non-zero count for peer ", peer);
  }
  const ncclDataType_t type = nccl_datatype(dtype);
  const size_t element_bytes = dtype_size(dtype);
  const char* send_bytes = static_cast<const char*>(send);
  char* recv_bytes = static_cast<char*>(recv);
  NCCL_CHECK(ncclGroupStart());
  for (int peer = 0; peer < size_; ++peer) {
    if (send_counts[peer] > 0)
      NCCL_CHECK(ncclSend(send_bytes + size_t(send_offsets[peer]) * element_bytes, size_t(send_counts[peer]), type,
                          peer, state_->comm, state_->stream));
    if (recv_counts[peer] > 0)
      NCCL_CHECK(ncclRecv(recv_bytes + size_t(recv_offsets[peer]) * element_bytes, size_t(recv_counts[peer]), type,
                          peer, state_->comm, state_->stream));
  }
  finish_call(ncclGroupEnd(), "all_to_all_v");
  note_enqueued("all_to_all_v");
}

void NcclCommunicator::all_reduce_sum(void* data, int64_t count, DType dtype) {
  check_usable("all_reduce_sum");
  SY_CHECK(count >= 0 && (count == 0 || data), "all_reduce_sum: bad buffer");
  if (count == 0) return;
  finish_call(ncclAllReduce(data, data, size_t(count), nccl_datatype(dtype), ncclSum, state_->comm, state_->stream),
              "all_reduce_sum");
  note_enqueued("all_reduce_sum");
}

void NcclCommunicator::all_gather(const void* send, void* recv, int64_t count_per_rank, DType dtype) {
  check_usable("all_gather");
  SY_CHECK(count_per_rank >= 0 && (count_per_rank == 0 || (send && recv)), "all_gather: bad buffers");
  if (count_per_rank == 0) return;
  finish_call(ncclAllGather(send, recv, size_t(count_per_rank), nccl_datatype(dtype), state_->comm, state_->stream),
              "all_gather");
  note_enqueued("all_gather");
}

void NcclCommunicator::broadcast(void* data, int64_t count, DType dtype, int root) {
  check_usable("broadcast");
  SY_CHECK(root >= 0 && root < size_, "broadcast: root ", root, " outside communicator '", name_, "' of size ",
           size_);
  SY_CHECK(count >= 0 && (count == 0 || data), "broadcast: bad buffer");
  if (count == 0) return;
  finish_call(ncclBroadcast(data, data, size_t(count), nccl_datatype(dtype), root, state_->comm, state_->stream),
              "broadcast");
  note_enqueued("broadcast");
}

void NcclCommunicator::barrier() {
  check_usable("barrier");
  finish_call(ncclAllReduce(state_->scratch, state_->scratch, 1, ncclInt32, ncclSum, state_->comm, state_->stream),
              "barrier");
  note_enqueued("barrier");
  synchronize();
}

std::vector<double> time_stream_iterations(Communicator& communicator, int iterations,
                                           const std::function<void(int)>& prepare,
                                           const std::function<void()>& enqueue) {
  SY_CHECK(communicator.device() == DeviceKind::cuda && communicator.stream(),
           "time_stream_iterations needs a CUDA communicator");
  cudaStream_t stream = static_cast<cudaStream_t>(communicator.stream());
  std::vector<cudaEvent_t> starts(size_t(iterations), nullptr), stops(size_t(iterations), nullptr);
  auto destroy_events = [&] {
    for (cudaEvent_t event : starts)
      if (event) cudaEventDestroy(event);
    for (cudaEvent_t event : stops)
      if (event) cudaEventDestroy(event);
  };
  std::vector<double> seconds(size_t(iterations), 0.0);
  try {
    for (int iteration = 0; iteration < iterations; ++iteration) {
      CUDA_CHECK(cudaEventCreate(&starts[size_t(iteration)]));
      CUDA_CHECK(cudaEventCreate(&stops[size_t(iteration)]));
    }
    for (int iteration = 0; iteration < iterations; ++iteration) {
      if (prepare) prepare(iteration);
      CUDA_CHECK(cudaEventRecord(starts[size_t(iteration)], stream));
      enqueue();
      CUDA_CHECK(cudaEventRecord(stops[size_t(iteration)], stream));
    }
    communicator.synchronize();
    for (int iteration = 0; iteration < iterations; ++iteration) {
      float milliseconds = 0;
      CUDA_CHECK(cudaEventElapsedTime(&milliseconds, starts[size_t(iteration)], stops[size_t(iteration)]));
      seconds[size_t(iteration)] = double(milliseconds) * 1e-3;
    }
  } catch (...) {
    destroy_events();
    throw;
  }
  destroy_events();
  return seconds;
}

}  // namespace switchyard
