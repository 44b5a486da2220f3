// The passes of cuda::route that run after its fused kernel (src/ops/cuda/routing.cu), each in its
// own translation unit; semantics in src/ops/moe_ops.h:
//   rank_slots_by_priority  src/ops/cuda/routing_drop_priority.cu   drop_policy = probability: each
//                           expert's choices ranked by priority score, slots rewritten
//   sequence_balance_loss   src/ops/cuda/routing_sequence_loss.cu   seq_aux_loss_weight > 0:
//                           sequence_fractions rows [0, S) and losses[kSeqAuxLoss]
// Both read what the fused kernel wrote (expert_ids, slots, token_k, logsumexp, expert_counts) on
// the same stream and launch without a host synchronization.
#pragma once

#include <cuda_runtime.h>

#include "src/core/tensor.h"
#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/moe_ops.h"

namespace switchyard {
namespace cuda_detail {

// RoutingResult::sequence_fractions must be fp32 [>= S, E] on CUDA (S = routing_num_sequences).
inline void check_sequence_fractions(const Tensor& fractions, const RoutingParams& params, const char* op) {
  const int64_t sequences = routing_num_sequences(params);
  SY_CHECK(fractions.device == DeviceKind::cuda && fractions.dtype == DType::f32 && fractions.rank == 2 &&
               fractions.shape[0] >= sequences && fractions.shape[1] == params.num_experts,
           op, ": sequence_fractions must be fp32 [>= ", sequences, ", ", params.num_experts, "] on cuda, got ",
           fractions.describe());
  SY_CHECK(fractions.data != nullptr, op, ": sequence_fractions has no data");
}

void rank_slots_by_priority(const Tensor& logits, const RoutingParams& params, RoutingResult& result,
                            cudaStream_t stream);
void sequence_balance_loss(const Tensor& logits, const RoutingParams& params, RoutingResult& result,
                           cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace switchyard
