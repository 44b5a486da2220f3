// Activation recomputation with expert parallelism (src/model/transformer.h
// TransformerOptions::recompute), run under mpirun -np 2 and -np 4 on the CPU backend.
//
// Each rank trains a tiny transformer whose MoE blocks shard their experts over ep_size ranks (2
// and the world size; one node, and emulated nodes: the hierarchical exchange), on its own
// tokens, for two micro-steps (the second accumulating), with jitter, capacity drops, a shared
// expert and the global-batch loss reduced over the world. With recompute = moe and all, every MoE
// block's forward -- all-to-alls included -- runs again in backward on every rank, through one
// exchange and one set of expert buffers shared by the blocks; the loss, router statistics,
// reductions and every gradient (this rank's expert shards included) must equal recompute = none
// bit for bit.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "src/model/transformer.h"
#include "tests/support/comm_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::comm_test;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};
constexpr int64_t kBatch = 2, kSeq = 8, kTokens = kBatch * kSeq;

void make_configs(ModelConfig& model, MoeConfig& moe) {
  model = ModelConfig();
  model.vocab_size = 19;
  model.d_model = 8;
  model.n_layers = 3;  // block 0 dense, blocks 1 and 2 MoE
  model.n_heads = 2;
  model.seq_len = kSeq;
  model.d_ff = 10;
  model.moe_every = 1;
  model.dense_first_blocks = 1;
  model.compute_dtype = DType::f64;
  model.init_std = 0.5;
  moe = MoeConfig();
  moe.num_experts = 8;  // divisible by ep 2 and 4
  moe.top_k = moe.k_min = 2;
  moe.expert_d_ff = 6;
  moe.num_shared_experts = 1;
  moe.shared_expert_d_ff = 4;
  moe.activation = ExpertActivation::swiglu;
  moe.capacity_factor = 0.75;
  moe.renormalize_gates = true;
  moe.jitter_eps = 0.2;
  moe.aux_loss_weight = 0.05;
  moe.z_loss_weight = 0.01;
  moe.global_aux_loss_weight = 0.1;
  moe.segment_alignment = 4;
}

struct StepResult {
  std::vector<TransformerStats> stats;
  std::vector<std::vector<uint8_t>> gradients;
  std::vector<double> step_loads;
  int reductions = 0;
};

StepResult run_step(const ParallelGroups& groups, int ep_size, int chunks, EpOverlap overlap, RecomputeMode recompute,
                    uint64_t seed) {
  ModelConfig model_config;
  MoeConfig moe;
  make_configs(model_config, moe);
  TransformerOptions options;
  options.activation_dtype = DType::f64;
  options.max_batch = kBatch;
  options.ep_size = ep_size;
  options.ep_rank = groups.expert_parallel->rank();
  options.groups = &groups;
  options.ep = layer_options(groups, chunks, EpTransport::automatic, EpDispatch::activation, overlap);
  options.jitter_seed = 77;
  options.recompute = recompute;
  Transformer model(model_config, moe, options);
  ModelParameters parameters(model.layout(), DeviceKind::cpu, DType::f64, DType::f64);
  parameters.initialize(kCpu, 13);  // the same global experts on every layout
  for (int index = 0; index < parameters.layout().size(); ++index) {
    Tensor gradient = parameters.grad(index);
    poison(gradient);
  }
  StepResult result;
  model.set_load_reducer([&](const ExecContext&, Tensor& loads) {
    ++result.reductions;
    groups.world->all_reduce_sum(loads.data, loads.numel(), loads.dtype);
  });
  std::mt19937_64 generator(seed + 1000003 * uint64_t(groups.world->rank()));  // this rank's tokens
  model.reset_step_loads(kCpu);
  for (int micro = 0; micro < 2; ++micro) {
    HostTensor tokens(DType::i32, {kTokens}), targets(DType::i32, {kTokens});
    fill_uniform(tokens, generator, 0, model_config.vocab_size - 1);
    fill_uniform(targets, generator, 0, model_config.vocab_size - 1);
    model.forward_loss(kCpu, parameters, tokens, targets, kBatch, kSeq, ForwardMode::training,
                       float(1.0 / (2 * kTokens)), 3 + uint64_t(micro));
    model.backward(kCpu, parameters, 0.5f, micro > 0);
    result.stats.push_back(model.read_stats(kCpu));
  }
  for (int index = 0; index < parameters.layout().size(); ++index) {
    const Tensor gradient = parameters.grad(index);
    const uint8_t* bytes = static_cast<const uint8_t*>(gradient.data);
    result.gradients.emplace_back(bytes, bytes + gradient.bytes());
  }
  result.step_loads = to_vector(model.step_loads());
  return result;
}

int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

TEST(TransformerRecomputeEp, EqualsNoRecomputationBitForBitOnEveryRank) {
  for (int ep_size : ep_sizes_to_test(world_size())) {
    if (ep_size == 1) continue;  // the single-device layer: tests/model/test_transformer_recompute_cpu.cpp
    for (int ranks_per_node : node_sizes_to_test(ep_size))
    for (int chunks : {1, 2})
    for (EpOverlap overlap : overlaps_to_test()) {  // two_part: the parts are shared by the layers too
      if (ranks_per_node > 0 && chunks > 1) continue;  // chunking is the one-node exchange's
      const ParallelGroups& groups = groups_for(DeviceKind::cpu, ep_size, ranks_per_node);
      const uint64_t seed = shared_seed() + uint64_t(ep_size * 100 + ranks_per_node * 10 + chunks);
      const StepResult none = run_step(groups, ep_size, chunks, overlap, RecomputeMode::none, seed);
      for (RecomputeMode mode : {RecomputeMode::moe, RecomputeMode::all}) {
        SCOPED_TRACE(std::string("ep_size ") + std::to_string(ep_size) + ", ranks_per_node " +
                     std::to_string(ranks_per_node) + ", a2a_chunks " + std::to_string(chunks) + ", ep_overlap " +
                     ep_overlap_name(overlap) +
                     ", recompute " + recompute_mode_name(mode) + ", rank " + std::to_string(groups.world->rank()) +
                     ", seed " + std::to_string(seed));
        const StepResult recomputed = run_step(groups, ep_size, chunks, overlap, mode, seed);
        ASSERT_EQ(recomputed.stats.size(), none.stats.size());
        for (size_t micro = 0; micro < none.stats.size(); ++micro) {
          EXPECT_EQ(recomputed.stats[micro].loss_sum, none.stats[micro].loss_sum);
          ASSERT_EQ(recomputed.stats[micro].moe.size(), 2u);
          for (size_t layer = 0; layer < 2; ++layer) {
            const MoeBlockStats &a = recomputed.stats[micro].moe[layer], &e = none.stats[micro].moe[layer];
            EXPECT_EQ(a.aux_loss, e.aux_loss);
            EXPECT_EQ(a.z_loss, e.z_loss);
            EXPECT_EQ(a.global_aux_loss, e.global_aux_loss);
            EXPECT_GT(e.global_aux_loss, 0.0);
            EXPECT_EQ(a.dropped_choices, e.dropped_choices);
            EXPECT_EQ(a.expert_counts, e.expert_counts);
          }
        }
        EXPECT_EQ(recomputed.reductions, none.reductions);
        EXPECT_EQ(none.reductions, 2 * 2);
        EXPECT_EQ(recomputed.step_loads, none.step_loads);
        ASSERT_EQ(recomputed.gradients.size(), none.gradients.size());
        for (size_t index = 0; index < none.gradients.size(); ++index)
          EXPECT_TRUE(recomputed.gradients[index] == none.gradients[index]) << "parameter " << index;
      }
    }
  }
}

}  // namespace
