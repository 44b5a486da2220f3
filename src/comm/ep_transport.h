// How the expert-parallel layer moves token rows between ranks.
//
// parallel.ep_transport, the path:
//   nccl    payload all-to-all-v over NCCL (MPI on the CPU), receiver reorders (src/comm/expert_dispatch.h)
//   nvlink  kernels write rows straight into the peers' expert layouts through peer-mapped memory
//           (src/comm/nvlink_exchange.h); CUDA ranks of one node only
//   auto    nvlink where the group allows it, else nccl
// parallel.ep_dispatch, what the forward dispatch's rows are on the wire (src/comm/ep_exchange.h):
//   activation  the activation dtype (bf16 on CUDA)
//   fp8         e4m3 with a float32 scale per 128 elements (src/ops/fp8_rows.h); nccl only
// parallel.ep_overlap, what the exchange overlaps with (src/model/moe_ep_layer.h):
//   none      the chunks of one exchange (parallel.a2a_chunks) overlap the experts of the others
//   two_part  the layer's tokens in two parts with an exchange each: one part's rows travel while
//             the experts compute the other's (DeepSeek-V3's two-micro-batch overlap, in a layer)
// parallel.ep_sm_budget, the SMs the exchange may occupy while experts compute: 0 = no limit;
// else the expert-parallel NCCL communicators' maxCTAs and the nvlink kernels' grid cap.
// parallel.max_replicas_per_rank, hot-expert replication (src/model/moe_ep_layer.h): each step the
// most loaded experts get copies on the least loaded ranks, up to this many per rank; 0 = off.
#pragma once

#include <memory>
#include <string>

namespace switchyard {

class Communicator;

enum class EpTransport { automatic, nccl, nvlink };
const char* ep_transport_name(EpTransport transport);
// "auto" | "nccl" | "nvlink"; SY_BAD_INPUT naming `where` and the choices otherwise.
EpTransport parse_ep_transport(const std::string& text, const std::string& where);

enum class EpDispatch { activation, fp8 };
const char* ep_dispatch_name(EpDispatch dispatch);
// "activation" | "fp8"; SY_BAD_INPUT naming `where` and the choices otherwise.
EpDispatch parse_ep_dispatch(const std::string& text, const std::string& where);

enum class EpOverlap { none, two_part };
const char* ep_overlap_name(EpOverlap overlap);
// "none" | "two_part"; SY_BAD_INPUT naming `where` and the choices otherwise.
EpOverlap parse_ep_overlap(const std::string& text, const std::string& where);

// The expert-parallel layer's exchange settings from the configuration (parallel.a2a_chunks,
// parallel.ep_transport, parallel.ep_dispatch, parallel.ep_overlap, parallel.ep_sm_budget,
// parallel.max_replicas_per_rank),
// passed as one value from the trainer down to the layer (src/model/moe_ep_layer.h) and its
// EpExchange (src/comm/ep_exchange.h).
struct EpLayerOptions {
  int a2a_chunks = 1;  // >= 1, clamped to the local expert count
  EpTransport transport = EpTransport::automatic;
  EpDispatch dispatch = EpDispatch::activation;
  // A group over several nodes (ParallelGroups::expert_parallel_node / _rail, from
  // parallel.ranks_per_node): the hierarchical exchange. Null: one node.
  std::shared_ptr<Communicator> node_group, rail_group;
  EpOverlap overlap = EpOverlap::none;
  // The nvlink kernels' grid cap (>= 0, 0 = none). The NCCL communicators take theirs when they
  // are created (create_parallel_groups, src/comm/bootstrap.h).
  int sm_budget = 0;
  // Hot-expert replica slots per rank (>= 0, 0 = off). Needs the one-level exchange, one part and
  // one chunk (SY_BAD_INPUT otherwise).
  int max_replicas_per_rank = 0;
  // The fewest rows a replica must take over to be made (>= 0; src/comm/replication_plan.h).
  int replica_min_rows = 0;
};

}  // namespace switchyard
