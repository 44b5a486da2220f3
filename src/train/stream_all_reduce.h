// Sums a device tensor over a communicator in the order of the compute stream, for the small
// reductions inside a training step that feed later work on that stream (the expert loads of the
// global-batch loss and of the router-bias update, src/model/transformer.h):
//   CUDA: the communicator's stream waits for context.stream, NCCL sums in place, context.stream
//         waits for the communicator (events; the host never waits);
//   CPU:  MPI sums the host buffer in place (blocking).
// A communicator of one rank (or none) leaves the tensor as it is. Sums of small integers held in
// fp32 (expert counts below 2^24) are exact, so the result is the same in any reduction order.
#pragma once

#include <memory>

#include "src/comm/communicator.h"
#include "src/comm/expert_dispatch.h"
#include "src/ops/ops.h"

namespace switchyard {

class StreamOrderedAllReduce {
 public:
  StreamOrderedAllReduce() = default;
  StreamOrderedAllReduce(std::shared_ptr<Communicator> communicator, DeviceKind device);
  // Collective over the communicator: every rank calls it in the same order with the same shape.
  void operator()(const ExecContext& context, Tensor& tensor) const;
  bool reduces() const { return communicator_ != nullptr && communicator_->size() > 1; }

 private:
  std::shared_ptr<Communicator> communicator_;
  std::shared_ptr<CommStreamEvents> events_;  // shared: copies (in a std::function) use one event
};

}  // namespace switchyard
