// Which GPU a rank uses, decided from numbers alone so that it is testable without a GPU
// (bootstrap_process, src/comm/bootstrap.h, applies it).
//
//   - A rank that sees exactly one GPU uses it (device 0), whatever its local rank: the launcher
//     gave each task its own GPU (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per rank).
//   - A rank that sees several uses GPU local_rank; NCCL needs one GPU per rank, so more ranks on
//     the node than visible GPUs is an error.
//   - No visible GPU is an error.
// Ranks that each see one GPU but share the same one (mpirun -np 2 on a one-GPU machine) cannot be
// told apart from these numbers: bootstrap_process then compares the picked GPUs' PCI bus ids
// across the node's ranks and refuses a shared one.
#pragma once

#include <string>

namespace switchyard {

struct GpuPick {
  int device = -1;      // CUDA ordinal, -1 when `problem` is set
  std::string problem;  // why no GPU can be picked (empty on success); the caller adds the host
};

GpuPick pick_gpu(int local_rank, int local_size, int visible_gpus);

}  // namespace switchyard
