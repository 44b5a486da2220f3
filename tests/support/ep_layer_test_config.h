// The expert-parallel layer tests' MoE layer (tests/model/mpi): one definition of the small layer
// that the equivalence, overlap, FP8 and replication tests build their scenarios on.
#pragma once

#include <cstdint>
#include <random>

#include "src/model/moe_layer.h"
#include "tests/support/comm_test_support.h"
#include "tests/support/test_helpers.h"

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

// One rank's share of an EP layer test, in `dtype` on the host: every expert's weights, the same on
// all ranks (router ~ N(0, router_std), w1 ~ N(0, w1_std), w2 ~ N(0, w2_std), drawn in that order from
// shared_seed() and `salt`), and this rank's tokens x and output gradient grad_y [tokens, d_model],
// uniform in [-1, 1), from `own`, which the test may go on drawing from.
struct EpTestProblem {
  HostTensor router, w1, w2, x, grad_y;
  std::mt19937_64 own;
  EpTestProblem(const MoeLayerConfig& config, DType dtype, int world_rank, int64_t tokens, uint64_t salt,
                double router_std, double w1_std, double w2_std)
      : router(dtype, {config.d_model, config.moe.num_experts}),
        w1(dtype, {config.moe.num_experts, config.d_model, config.w1_columns()}),
        w2(dtype, {config.moe.num_experts, config.moe.expert_d_ff, config.d_model}),
        x(dtype, {tokens, config.d_model}),
        grad_y(dtype, {tokens, config.d_model}),
        own(comm_test::shared_seed() + 7919 * uint64_t(world_rank + 1) + salt) {
    std::mt19937_64 shared(comm_test::shared_seed() ^ (salt * 0x9E3779B97F4A7C15ull));
    fill_normal(router, shared, 0, router_std);
    fill_normal(w1, shared, 0, w1_std);
    fill_normal(w2, shared, 0, w2_std);
    fill_uniform(x, own, -1, 1);
    fill_uniform(grad_y, own, -1, 1);
  }
};

}  // namespace testing
}  // namespace switchyard
