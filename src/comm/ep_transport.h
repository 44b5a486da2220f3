// How the expert-parallel layer moves token rows between ranks (parallel.ep_transport).
//   nccl    payload all-to-all-v over NCCL (MPI on the CPU), receiver reorders (src/comm/expert_dispatch.h)
//   nvlink  kernels write rows straight into the peers' expert layouts through peer-mapped memory
//           (src/comm/nvlink_exchange.h); CUDA ranks of one node only
//   auto    nvlink where the group allows it, else nccl
#pragma once

#include <string>

namespace switchyard {

enum class EpTransport { automatic, nccl, nvlink };
const char* ep_transport_name(EpTransport transport);
// "auto" | "nccl" | "nvlink"; SY_BAD_INPUT naming `where` and the choices otherwise.
EpTransport parse_ep_transport(const std::string& text, const std::string& where);

}  // namespace switchyard
