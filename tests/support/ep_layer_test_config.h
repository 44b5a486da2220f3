// The expert-parallel layer tests' MoE layer (tests/model/mpi): one definition of the small layer
// that the equivalence, overlap, FP8 and replication tests build their scenarios on.
#pragma once

#include <cstdint>

#include "src/model/moe_layer.h"

namespace switchyard {
namespace testing {

// d_model-wide tokens, `experts` experts of width `hidden`, top-k (gates renormalized when k > 1),
// the aux (0.05) and z (0.01) losses on; capacity_factor 0 means dropless (the capacity then 1, unused).
inline MoeLayerConfig ep_test_layer_config(int64_t d_model, int64_t hidden, int experts, int k,
                                           ExpertActivation activation, float capacity_factor, int alignment) {
  MoeLayerConfig config;
  config.d_model = d_model;
  config.moe.expert_d_ff = hidden;
  config.moe.num_experts = experts;
  config.moe.top_k = config.moe.k_min = k;
  config.moe.renormalize_gates = k > 1;
  config.moe.dropless = capacity_factor == 0.0f;
  config.moe.capacity_factor = config.moe.eval_capacity_factor = capacity_factor > 0.0f ? capacity_factor : 1.0f;
  config.moe.segment_alignment = alignment;
  config.moe.aux_loss_weight = 0.05f;
  config.moe.z_loss_weight = 0.01f;
  config.moe.activation = activation;
  return config;
}

}  // namespace testing
}  // namespace switchyard
