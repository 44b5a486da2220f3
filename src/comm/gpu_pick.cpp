// The GPU-pick rule (src/comm/gpu_pick.h).
#include "src/comm/gpu_pick.h"

#include "src/core/error.h"

namespace switchyard {

GpuPick pick_gpu(int local_rank, int local_size, int visible_gpus) {
  SY_CHECK(local_size >= 1 && local_rank >= 0 && local_rank < local_size && visible_gpus >= 0,
           "pick_gpu: local rank ", local_rank, " of ", local_size, ", ", visible_gpus, " visible GPU(s)");
  GpuPick pick;
  if (visible_gpus == 0) {
    pick.problem = "no CUDA device is visible";
  } else if (visible_gpus == 1) {
    pick.device = 0;
  } else if (local_size > visible_gpus) {
    pick.problem = detail::concat(local_size, " ranks run on this node but each sees ", visible_gpus,
                                  " GPUs; NCCL needs one GPU per rank: start at most ", visible_gpus,
                                  " ranks per node, give each rank its own GPU (srun --gpus-per-task=1), "
                                  "or use device: cpu");
  } else {
    pick.device = local_rank;
  }
  return pick;
}

}  // namespace switchyard
