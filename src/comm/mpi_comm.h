// MpiCommunicator: the CPU backend of src/comm/communicator.h over host buffers.
//
// Every collective is posted as a non-blocking MPI call (MPI_Ialltoallv, MPI_Iallreduce, ...) and
// completed by polling MPI_Test against a deadline, so a peer that died or hangs turns into an
// Error naming the collective, the communicator and the rank instead of a silent hang.
//
// Counts and offsets are int64 elements. MPI's classic interfaces take int counts, so:
//   all_to_all_v  counts/offsets beyond the int limit: MPI_Ialltoallw with one derived datatype
//                 per peer that encodes the peer's byte offset and element count (MPI_Aint);
//   all_gather    a per-rank block beyond the limit: one derived "large contiguous" datatype;
//   all_reduce / broadcast beyond the limit: split into chunks that each fit.
// Sums: fp32/fp64/int32/int64/uint8 use MPI_SUM; bf16 and fp16 use a user-defined MPI_Op that
// adds in fp32 and rounds back to nearest even (the same rounding the GPU does).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "src/comm/communicator.h"

namespace switchyard {

class MpiCommunicator : public Communicator {
 public:
  // Wraps `comm` (takes ownership: MPI_Comm_free in the destructor). `timeout_seconds` <= 0 waits
  // forever. MPI_ERRORS_RETURN is set on `comm` so MPI_CHECK sees every failure.
  MpiCommunicator(MPI_Comm comm, std::string name, double timeout_seconds);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  DeviceKind device() const override { return DeviceKind::cpu; }
  const std::string& name() const override { return name_; }

  void all_to_all_v(const void* send, const std::vector<int64_t>& send_counts,
                    const std::vector<int64_t>& send_offsets, void* recv, const std::vector<int64_t>& recv_counts,
                    const std::vector<int64_t>& recv_offsets, DType dtype) override;
  void all_reduce_sum(void* data, int64_t count, DType dtype) override;
  void all_gather(const void* send, void* recv, int64_t count_per_rank, DType dtype) override;
  void broadcast(void* data, int64_t count, DType dtype, int root) override;
  void barrier() override;
  void synchronize() override {}  // MPI collectives complete before they return
  // Marks the communicator unusable; the error path then calls MPI_Abort, which is what really
  // stops the peers (an MPI collective cannot be cancelled).
  void abort() override;

  MPI_Comm handle() const { return comm_; }
  double timeout_seconds() const { return timeout_seconds_; }
  void set_timeout_seconds(double seconds) { timeout_seconds_ = seconds; }

 private:
  void check_usable(const char* collective) const;
  // Polls `requests` until all complete or the deadline passes (then throws, naming `collective`).
  void wait(std::vector<MPI_Request>& requests, const char* collective);

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string name_;
  double timeout_seconds_ = 0;
  int rank_ = 0, size_ = 1;
  bool aborted_ = false;
  // Requests of a collective that timed out. They cannot be freed or cancelled (MPI forbids it
  // for collectives); the destructor tests them once so a late completion is cleaned up.
  std::vector<MPI_Request> abandoned_;
};

// The MPI datatype that moves elements of `dtype` (bf16/fp16 move as MPI_UINT16_T).
MPI_Datatype mpi_datatype(DType dtype);

// Waits for `requests` with MPI_Test until done or `timeout_seconds` (<= 0: forever) elapses.
// Returns false on timeout, leaving the unfinished requests in place. Spins briefly, then yields
// the core between tests (4 ranks on 2 cores must not starve each other).
bool mpi_wait_until(std::vector<MPI_Request>& requests, double timeout_seconds);

// The one message every collective timeout uses, so scripts and people can grep for it.
std::string collective_timeout_message(const char* collective, const std::string& communicator_name,
                                       int group_rank, int group_size, double timeout_seconds);

namespace mpi_testing {
// Testing aid: element counts and offsets above `int_limit` take the large-count paths described
// at the top of this file, and derived datatypes are built from chunks of `chunk_elements`. The
// defaults are INT_MAX and 2^30; tests lower both to exercise those paths with small buffers.
void set_large_count_limits(int64_t int_limit, int64_t chunk_elements);
void reset_large_count_limits();
}  // namespace mpi_testing

}  // namespace switchyard
