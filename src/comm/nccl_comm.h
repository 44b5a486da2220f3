// NcclCommunicator: the CUDA backend of src/comm/communicator.h over device buffers.
//
// Built only with CUDA (nccl_comm.cpp), but this header needs no CUDA headers: CUDA and NCCL
// handles live behind a private State, the stream is exposed as void* (a cudaStream_t).
//
// The NCCL communicator is blocking by default (SWITCHYARD_NCCL_BLOCKING=0: non-blocking, where
// every call answering ncclInProgress is polled with ncclCommGetAsyncError until enqueued; that
// hand-off to an NCCL thread costs ~75 us per collective on H100s, hence the default). A blocking
// host call can only wait on peers while NCCL sets up connections, so the constructor makes them
// all (NCCL_RUNTIME_CONNECT=0 unless set by the user, and a warm-up all-to-all and all-reduce);
// creation, the warm-up and finalize run under a watchdog thread that ends the job with an error
// line naming the call, the communicator and the rank if they outlast the timeout.
// Collectives are enqueued on the communicator's own non-blocking stream and return once
// enqueued. synchronize() and barrier() wait by polling cudaStreamQuery + ncclCommGetAsyncError;
// if the work does not finish within the timeout the communicator is aborted (ncclCommAbort) and
// an Error names the collective, the communicator and the rank. Live communicators are registered
// with register_for_abort (src/comm/bootstrap.h).
#pragma once

#include <mpi.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "src/comm/communicator.h"

namespace switchyard {

class NcclCommunicator : public Communicator {
 public:
  // NCCL's channel limit (MAXCHANNELS), the largest maxCTAs a config may ask for.
  static constexpr int kNcclMaxChannels = 64;

  // Collective over the ranks of `group` (used only here, not owned): group rank 0 creates the
  // NCCL unique id, an MPI broadcast over `group` shares it, and every rank joins with
  // ncclCommInitRankConfig on the current CUDA device. `timeout_seconds` <= 0 waits forever.
  // `max_ctas` > 0: the most thread blocks (CTAs) its kernels use (ncclConfig_t::maxCTAs, capped at
  // kNcclMaxChannels), so that they leave the other SMs to compute running beside them; 0: NCCL's
  // default (NCCL_MAX_CTAS, else every channel it wants).
  NcclCommunicator(MPI_Comm group, std::string name, double timeout_seconds, int max_ctas = 0);
  // Graceful teardown (ncclCommFinalize + ncclCommDestroy under the timeout); while an
  // exception is propagating, or after a failure, it aborts instead so it never blocks on peers.
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  DeviceKind device() const override { return DeviceKind::cuda; }
  const std::string& name() const override { return name_; }

  void all_to_all_v(const void* send, const std::vector<int64_t>& send_counts,
                    const std::vector<int64_t>& send_offsets, void* recv, const std::vector<int64_t>& recv_counts,
                    const std::vector<int64_t>& recv_offsets, DType dtype) override;
  void all_reduce_sum(void* data, int64_t count, DType dtype) override;
  void all_gather(const void* send, void* recv, int64_t count_per_rank, DType dtype) override;
  void broadcast(void* data, int64_t count, DType dtype, int root) override;
  void barrier() override;  // a one-element all-reduce, then synchronize()
  void synchronize() override;
  void* stream() const override;
  void abort() override;

  double timeout_seconds() const { return timeout_seconds_; }
  void set_timeout_seconds(double seconds) { timeout_seconds_ = seconds; }

 private:
  struct State;
  void check_usable(const char* collective) const;
  // Handles an NCCL call's result: throws on failure; on ncclInProgress polls until enqueued.
  void finish_call(int nccl_result, const char* collective);
  void note_enqueued(const char* collective);
  void connect_peers();  // blocking mode: make every connection while all ranks are here
  [[noreturn]] void fail_after_abort(const std::string& message);

  std::unique_ptr<State> state_;
  std::string name_;
  double timeout_seconds_ = 0;
  int rank_ = 0, size_ = 1;
};

// Benchmark timing with CUDA events on `communicator`'s stream. For each iteration: `prepare(i)`
// runs on the host untimed (it must leave the stream idle or ordered itself), then a start event,
// `enqueue()`, and a stop event are recorded. Waits with communicator.synchronize() (so a hang
// times out) and returns each iteration's elapsed seconds.
std::vector<double> time_stream_iterations(Communicator& communicator, int iterations,
                                           const std::function<void(int)>& prepare,
                                           const std::function<void()>& enqueue);

}  // namespace switchyard
