// Creating one communicator on either backend from an MPI communicator of its ranks. Kept apart
// from bootstrap.cpp so that only this file knows whether the NCCL backend was built.
#pragma once

#include <mpi.h>

#include <memory>
#include <string>

#include "src/comm/communicator.h"

namespace switchyard {

// Collective over the ranks of `group`. cpu: an MpiCommunicator that takes ownership of `group`.
// cuda: an NcclCommunicator bootstrapped over `group` (MPI broadcast of the NCCL unique id),
// after which `group` is freed. Throws when cuda is asked of a build without the CUDA backend.
// `max_ctas` > 0: the NCCL communicator's maxCTAs (NcclCommunicator); 0: NCCL's default.
std::shared_ptr<Communicator> create_communicator(DeviceKind device, MPI_Comm group, const std::string& name,
                                                  double timeout_seconds, int max_ctas = 0);

}  // namespace switchyard
