// Router statistics as running sums on the device: one op that adds what one MoE forward routed
// to an accumulator, so that training can log router statistics without reading anything on the
// host until a metrics line is written (src/train/router_stats.h reads and derives them).
//
// Accumulator: float64 [kNumRouterSums + E] on the routing's device. One call adds, for a routing
// result of T tokens over E experts with K choice columns (src/ops/moe_ops.h semantics):
//   [kRouterForwards]     1
//   [kRouterTokens]       T
//   [kRouterChoices]      scalars[kTotalChoices]             sum_t k_t
//   [kRouterDropped]      scalars[kDroppedChoices]
//   [kRouterKept]         #{(t, j): expert >= 0, 0 <= slot < capacity}
//   [kRouterKeptGateSum]  sum of gates over those kept choices
//   [kRouterEntropySum]   sum_t H_t, H_t = -sum_e p_te ln p_te = sum_e p_te (lse_t - l_te) (nats),
//                         p_te = exp(l_te - lse_t) from the logits and the routing's logsumexp;
//                         written as a sum of non-negative terms so no cancellation occurs
//   [kRouterAuxSum]       losses[kAuxLoss]                   (weighted, as routing computed it)
//   [kRouterZSum]         losses[kZLoss]
//   [kNumRouterSums + e]  expert_counts[e]                   choices routed to e before capacity
//
//   switchyard::cpu::accumulate_router_sums   src/ops/cpu/router_sums.cpp   f32 or f64 logits / gates /
//                                             logsumexp / losses (the reference's float type),
//                                             summed in double
//   switchyard::cuda::accumulate_router_sums  src/ops/cuda/router_sums.cu   fp32 inputs; per-token terms
//                                             are reduced in double by a grid of blocks into a fixed
//                                             partial per block, then one block adds the partials in
//                                             block order: deterministic, no atomics, two small
//                                             kernels, no host synchronization
//   switchyard::ops::accumulate_router_sums   src/ops/ops.h                 picks the backend
//                                                                           (src/ops/dispatch_moe.cpp)
#pragma once

#include <cstdint>

#include "src/ops/moe_ops.h"
#include "src/core/tensor.h"

namespace switchyard {

enum RouterSum : int {
  kRouterForwards = 0,
  kRouterTokens,
  kRouterChoices,
  kRouterDropped,
  kRouterKept,
  kRouterKeptGateSum,
  kRouterEntropySum,
  kRouterAuxSum,
  kRouterZSum,
  kNumRouterSums
};

// Doubles of CUDA scratch one call needs (per-block partials); callers keep it alive across calls
// on the same stream.
constexpr int64_t kRouterSumsScratchDoubles = 4 * 512;

// The sizes of one call: T tokens, E experts, K choice columns.
struct RouterSumsShape {
  int64_t tokens = 0, experts = 0, choices = 0;
};
// Checks what every backend relies on (SY_CHECK naming the tensor): logits [T, E]; expert_ids and
// slots int32 [T, K]; gates [T, K], logsumexp [T] and losses of the logits' float type;
// expert_counts int32 [E]; scalars int32; accumulator float64 [kNumRouterSums + E]; all on `device`.
RouterSumsShape validate_router_sums_arguments(const RoutingResult& routing, const Tensor& logits,
                                               const Tensor& accumulator, DeviceKind device);

namespace cpu {
void accumulate_router_sums(const RoutingResult& routing, const Tensor& logits, Tensor& accumulator);
}
namespace cuda {
// `scratch`: float64 [kRouterSumsScratchDoubles] on the device.
void accumulate_router_sums(const RoutingResult& routing, const Tensor& logits, Tensor& accumulator, Tensor& scratch,
                            void* stream);
}

}  // namespace switchyard
