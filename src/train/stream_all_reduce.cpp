// Stream-ordered all-reduce of a device tensor (src/train/stream_all_reduce.h).
#include "src/train/stream_all_reduce.h"

#include <utility>

#include "src/core/error.h"

namespace switchyard {

StreamOrderedAllReduce::StreamOrderedAllReduce(std::shared_ptr<Communicator> communicator, DeviceKind device)
    : communicator_(std::move(communicator)) {
  if (!reduces()) return;
  SY_CHECK(communicator_->device() == device, "StreamOrderedAllReduce: the ", communicator_->name(),
           " communicator works on ", device_kind_name(communicator_->device()), ", the tensors live on ",
           device_kind_name(device));
  events_ = std::make_shared<CommStreamEvents>(device, 1);
}

void StreamOrderedAllReduce::operator()(const ExecContext& context, Tensor& tensor) const {
  if (!reduces() || tensor.numel() == 0) return;
  SY_CHECK(tensor.device == communicator_->device(), "StreamOrderedAllReduce: ", tensor.describe(), " is not on ",
           device_kind_name(communicator_->device()));
  events_->comm_waits_for_compute(context, *communicator_);
  communicator_->all_reduce_sum(tensor.data, tensor.numel(), tensor.dtype);
  events_->record_comm(0, *communicator_);
  events_->compute_waits_for_comm(context, 0);
}

}  // namespace switchyard
