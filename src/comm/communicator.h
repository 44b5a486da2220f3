// Communicator: the collectives switchyard needs, over MPI (host buffers, the CPU backend) or
// NCCL (device buffers, enqueued on the communicator's own CUDA stream).
//
// Counts and offsets are in elements of `dtype`. Collectives are blocking on the host for MPI;
// for NCCL they are enqueued on stream() and complete in stream order (call synchronize() or make
// another stream wait on an event to consume results). Every call is checked; a collective that
// does not finish within the configured timeout aborts the communicator and throws, naming the
// collective and the rank.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/core/tensor.h"

namespace switchyard {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual DeviceKind device() const = 0;   // where buffers passed to it must live
  virtual const std::string& name() const = 0;  // "world", "expert_parallel", "expert_data_parallel"

  virtual void all_to_all_v(const void* send, const std::vector<int64_t>& send_counts,
                            const std::vector<int64_t>& send_offsets, void* recv,
                            const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_offsets,
                            DType dtype) = 0;
  virtual void all_reduce_sum(void* data, int64_t count, DType dtype) = 0;  // in place
  virtual void all_gather(const void* send, void* recv, int64_t count_per_rank, DType dtype) = 0;
  virtual void broadcast(void* data, int64_t count, DType dtype, int root) = 0;
  virtual void barrier() = 0;
  virtual void synchronize() = 0;  // host waits until every enqueued collective is done
  virtual void* stream() const { return nullptr; }  // cudaStream_t for NCCL
  virtual void abort() = 0;  // tear down without waiting for peers (error path)
};

// The process's communicators (design-notes decision 3): world; expert_parallel, the ep_size
// ranks holding disjoint expert shards (ranks r with the same r / ep_size); expert_data_parallel,
// the world/ep_size ranks holding the same shard (same r % ep_size). The mapping and its rules:
// ParallelLayout (src/comm/parallel_layout.h).
struct ParallelGroups {
  int ep_size = 1;
  std::shared_ptr<Communicator> world;
  std::shared_ptr<Communicator> expert_parallel;
  std::shared_ptr<Communicator> expert_data_parallel;
  // An expert-parallel group over several nodes (ParallelLayout::hierarchical): its ranks on this
  // rank's node, and its ranks at this rank's place on every node. Null inside one node.
  std::shared_ptr<Communicator> expert_parallel_node, expert_parallel_rail;
};

}  // namespace switchyard
