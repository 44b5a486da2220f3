// The shared experts' second stream (src/model/transformer.h; SWITCHYARD_SHARED_EXPERT_STREAM):
// running them beside the routed layer must change nothing but timing. Two micro-steps of forward
// and backward (the second accumulating) of a bf16 model with shared experts give the same loss,
// router statistics and gradients, byte for byte, with the side stream on and off, in every
// recompute mode that repeats the FFN sublayer or not. The batch is large enough (2048 tokens,
// width 256) for the shared experts' GEMMs to overlap the routed layer's kernels, so a missing
// wait (the side stream reading norm2's output before it is written, the compute stream adding
// the shared output or reading the scratch gradient before the side stream wrote it) shows up as
// a difference. Outputs are poisoned before each run.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "src/core/switches.h"
#include "src/core/timing.h"
#include "src/model/transformer.h"
#include "tests/support/cuda_test_support.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

constexpr int64_t kBatch = 4, kSeq = 512, kTokens = kBatch * kSeq;

// Four blocks: block 0 dense, blocks 1-3 MoE with 16 experts top-4 and one shared expert (SwiGLU).
void make_configs(ModelConfig& model, MoeConfig& moe) {
  model = ModelConfig();
  model.vocab_size = 256;
  model.d_model = 256;
  model.n_layers = 4;
  model.n_heads = 4;
  model.seq_len = kSeq;
  model.d_ff = 512;
  model.moe_every = 1;
  model.dense_first_blocks = 1;
  model.norm = NormKind::rmsnorm;
  model.positions = PositionKind::rotary;
  model.compute_dtype = DType::bf16;
  model.init_std = 0.05;
  moe = MoeConfig();
  moe.num_experts = 16;
  moe.top_k = moe.k_min = 4;
  moe.expert_d_ff = 128;
  moe.num_shared_experts = 1;
  moe.shared_expert_d_ff = 512;
  moe.activation = ExpertActivation::swiglu;
  moe.dropless = true;
  moe.renormalize_gates = true;
  moe.aux_loss_weight = 0.01;
  moe.z_loss_weight = 0.001;
  moe.segment_alignment = 128;
}

struct StepResult {
  std::vector<double> loss_sums;
  std::vector<std::vector<int64_t>> expert_counts;  // per micro-step, MoE layers concatenated
  std::vector<std::vector<uint8_t>> gradients;     // raw bytes per parameter
};

StepResult run_step(RecomputeMode recompute, bool side_stream, uint64_t batch_seed) {
  Switches values = switches();
  values.shared_expert_stream = side_stream;
  ScopedSwitches scope(values);

  ModelConfig model_config;
  MoeConfig moe;
  make_configs(model_config, moe);
  TransformerOptions options;
  options.device = DeviceKind::cuda;
  options.activation_dtype = DType::bf16;
  options.max_batch = kBatch;
  options.recompute = recompute;
  void* stream = create_stream(DeviceKind::cuda);
  const ExecContext context{DeviceKind::cuda, stream};
  StepResult result;
  {
    Transformer model(model_config, moe, options);
    ModelParameters parameters(model.layout(), DeviceKind::cuda, DType::f32, DType::bf16);
    parameters.initialize(context, 77);
    for (int index = 0; index < parameters.layout().size(); ++index) {
      Tensor gradient = parameters.grad(index);
      device_memset(gradient.data, DeviceKind::cuda, 0xFF, gradient.bytes());
    }
    std::mt19937_64 generator(batch_seed);
    model.reset_step_loads(context);
    for (int micro = 0; micro < 2; ++micro) {
      HostTensor tokens(DType::i32, {kTokens}), targets(DType::i32, {kTokens});
      fill_uniform(tokens, generator, 0, model_config.vocab_size - 1);
      fill_uniform(targets, generator, 0, model_config.vocab_size - 1);
      const DeviceTensor device_tokens = to_device(tokens), device_targets = to_device(targets);
      model.forward_loss(context, parameters, device_tokens, device_targets, kBatch, kSeq, ForwardMode::training,
                         float(1.0 / (2 * kTokens)), 5 + uint64_t(micro));
      model.backward(context, parameters, 0.5f, micro > 0);
      const TransformerStats stats = model.read_stats(context);
      result.loss_sums.push_back(stats.loss_sum);
      std::vector<int64_t> counts;
      for (const MoeBlockStats& layer : stats.moe) counts.insert(counts.end(), layer.expert_counts.begin(),
                                                                 layer.expert_counts.end());
      result.expert_counts.push_back(counts);
    }
    device_synchronize(DeviceKind::cuda);
    for (int index = 0; index < parameters.layout().size(); ++index) {
      const Tensor gradient = parameters.grad(index);
      std::vector<uint8_t> bytes(gradient.bytes());
      device_copy(bytes.data(), DeviceKind::cpu, gradient.data, DeviceKind::cuda, bytes.size());
      result.gradients.push_back(std::move(bytes));
    }
  }
  destroy_stream(DeviceKind::cuda, stream);
  return result;
}

class SharedExpertStream : public ::testing::TestWithParam<RecomputeMode> {};

TEST_P(SharedExpertStream, SideStreamChangesNothingButTiming) {
  SKIP_WITHOUT_CUDA();
  const uint64_t batch_seed = std::random_device{}();
  SCOPED_TRACE("batch seed " + std::to_string(batch_seed));
  const StepResult sequence = run_step(GetParam(), /*side_stream=*/false, batch_seed);
  const StepResult beside = run_step(GetParam(), /*side_stream=*/true, batch_seed);
  ASSERT_EQ(beside.loss_sums.size(), 2u);
  for (size_t micro = 0; micro < 2; ++micro) {
    EXPECT_TRUE(std::isfinite(sequence.loss_sums[micro])) << "micro-step " << micro;
    EXPECT_EQ(beside.loss_sums[micro], sequence.loss_sums[micro]) << "micro-step " << micro;
    EXPECT_EQ(beside.expert_counts[micro], sequence.expert_counts[micro]) << "micro-step " << micro;
  }
  ASSERT_EQ(beside.gradients.size(), sequence.gradients.size());
  int differing = 0;
  for (size_t index = 0; index < beside.gradients.size(); ++index)
    if (beside.gradients[index] != sequence.gradients[index]) ++differing;
  EXPECT_EQ(differing, 0) << differing << " of " << beside.gradients.size() << " gradients differ";
}

INSTANTIATE_TEST_SUITE_P(RecomputeModes, SharedExpertStream,
                         ::testing::Values(RecomputeMode::none, RecomputeMode::moe, RecomputeMode::all),
                         [](const ::testing::TestParamInfo<RecomputeMode>& info) {
                           return std::string(recompute_mode_name(info.param));
                         });

}  // namespace
