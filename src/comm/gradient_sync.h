// Gradient all-reduce for data + expert parallelism (design notes §3).
//
//   dense grads  (everything replicated over the world: router, attention, norms, embeddings)
//                -> summed over the world communicator;
//   expert grads (the local experts' w1 / w2) -> summed over expert_data_parallel, the W / ep_size
//                ranks that hold the same expert shard.
// With `average`, every gradient is then divided by the world size W -- the expert ones too, not
// by their group size W / ep_size: an expert's gradient on one rank already sums the
// contributions of all ep_size ranks of its expert-parallel group (the all-to-all brought their
// tokens), so after the expert-DP sum it covers all W ranks' losses, exactly like a dense
// gradient after the world sum. Dividing both by W makes an (EP = P) x (expert-DP = W/P) run
// take the same step as W data-parallel ranks holding every expert. (Trainers that prefer to fold
// 1/W into the optimizer's grad_scale pass average = false.)
//
// Tensors are packed in order into flat buckets of up to `bucket_bytes` (one dtype per bucket; a
// tensor of at least a bucket's size is reduced in place without a copy), each bucket reduced with
// one all_reduce_sum. Two buckets alternate so that, on CUDA, packing bucket i+1 on the compute
// stream overlaps the reduction of bucket i on the communicator's stream (events order the two,
// as in src/comm/expert_dispatch.h). CPU: host tensors and MpiCommunicator, blocking. Every rank of a
// group must pass the same list of tensors (count, dtype, element count, order).
// Sums of f32 / f64 / i32 are exact when the values allow it (MPI_SUM / ncclSum); averaging
// divides on the CPU and multiplies by 1/W on CUDA (exact when W is a power of two).
// dtypes: CPU f32 or f64; CUDA f32, f64, bf16 or f16.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "src/comm/communicator.h"
#include "src/comm/expert_dispatch.h"
#include "src/ops/ops.h"
#include "src/core/device.h"

namespace switchyard {

struct GradientSyncOptions {
  int64_t bucket_bytes = int64_t(32) << 20;
  bool average = true;  // divide every gradient by the world size (see above)
};

class GradientSynchronizer {
 public:
  GradientSynchronizer(const ParallelGroups& groups, DeviceKind device, const GradientSyncOptions& options = {});
  GradientSynchronizer(const GradientSynchronizer&) = delete;
  GradientSynchronizer& operator=(const GradientSynchronizer&) = delete;

  // Enqueues the whole reduction on context.stream / the communicators' streams; on return the
  // compute stream is ordered after it (on CUDA the host does not wait; on CPU it is done).
  void all_reduce(const ExecContext& context, const std::vector<Tensor>& dense_grads,
                  const std::vector<Tensor>& expert_grads);
  const GradientSyncOptions& options() const { return options_; }

 private:
  void reduce_group(const ExecContext& context, Communicator& communicator, const std::vector<Tensor>& grads);
  void scale(const ExecContext& context, Tensor& tensor) const;

  ParallelGroups groups_;
  DeviceKind device_;
  GradientSyncOptions options_;
  double divisor_ = 1.0;
  Buffer buckets_[2];
  std::unique_ptr<CommStreamEvents> events_;  // slot per bucket buffer
};

// One-shot form: builds a GradientSynchronizer, runs it and waits for the compute stream before
// its buckets are released. Training loops keep a GradientSynchronizer instead.
void all_reduce_gradients(const ExecContext& context, const ParallelGroups& groups,
                          const std::vector<Tensor>& dense_grads, const std::vector<Tensor>& expert_grads,
                          const GradientSyncOptions& options = {});

}  // namespace switchyard
