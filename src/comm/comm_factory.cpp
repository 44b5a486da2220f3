// create_communicator: picks the backend (see comm_factory.h).
#include "src/comm/comm_factory.h"

#include "src/comm/mpi_comm.h"
#include "src/core/device.h"
#include "src/core/mpi_check.h"
#if defined(SWITCHYARD_WITH_CUDA)
#include "src/comm/nccl_comm.h"
#endif

namespace switchyard {

std::shared_ptr<Communicator> create_communicator(DeviceKind device, MPI_Comm group, const std::string& name,
                                                  double timeout_seconds, int max_ctas) {
  if (device == DeviceKind::cpu) {
    try {
      return std::make_shared<MpiCommunicator>(group, name, timeout_seconds);
    } catch (...) {
      MPI_Comm_free(&group);
      throw;
    }
  }
#if defined(SWITCHYARD_WITH_CUDA)
  // The MPI communicator is only needed to share the NCCL unique id; free it either way.
  struct FreeGroup {
    MPI_Comm* comm;
    ~FreeGroup() {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (!finalized) MPI_Comm_free(comm);
    }
  } free_group{&group};
  int group_size = 0;
  MPI_CHECK(MPI_Comm_size(group, &group_size));
  // Its kernels (and the nvlink exchange's, over this group) may wait on the other ranks' GPUs.
  if (group_size > 1) note_cross_process_device_waits();
  return std::make_shared<NcclCommunicator>(group, name, timeout_seconds, max_ctas);
#else
  (void)max_ctas;
  MPI_Comm_free(&group);
  SY_BAD_INPUT("communicator '", name, "' needs CUDA, but this build of switchyard has no CUDA backend");
#endif
}

}  // namespace switchyard
