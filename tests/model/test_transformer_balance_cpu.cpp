// The transformer's routing balance across a step on the CPU backend (src/model/transformer.h,
// "Routing balance across a step"): the router bias parameters (dense, no decay, zeros, one per
// MoE block), the step loads every training forward adds, the bias update and the compute copy it
// refreshes, the global-batch loss's reducer and running sums, and the whole model's gradients
// against float64 finite differences with the modern options and a shared expert.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "src/model/transformer.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

// Three blocks: block 0 dense, blocks 1 and 2 MoE (MoE ordinals 0 and 1).
void make_configs(ModelConfig& model, MoeConfig& moe) {
  model = ModelConfig();
  model.vocab_size = 13;
  model.d_model = 8;
  model.n_layers = 3;
  model.n_heads = 2;
  model.seq_len = 6;
  model.d_ff = 6;
  model.moe_every = 1;
  model.dense_first_blocks = 1;
  model.compute_dtype = DType::f32;
  model.init_std = 0.5;
  moe = MoeConfig();
  moe.num_experts = 4;
  moe.top_k = moe.k_min = 2;
  moe.expert_d_ff = 5;
  moe.capacity_factor = moe.eval_capacity_factor = 4.0;
  moe.renormalize_gates = true;
  moe.aux_loss_weight = 0.05;
  moe.z_loss_weight = 0.01;
  moe.segment_alignment = 4;
  moe.shared_expert_d_ff = 5;
}

struct Batch {
  HostTensor tokens, targets;
  Batch(int64_t count, int vocab, uint64_t seed) : tokens(DType::i32, {count}), targets(DType::i32, {count}) {
    std::mt19937_64 generator(seed);
    fill_uniform(tokens, generator, 0, vocab - 1);
    fill_uniform(targets, generator, 0, vocab - 1);
  }
};

TransformerOptions options(DType dtype) {
  TransformerOptions result;
  result.device = DeviceKind::cpu;
  result.activation_dtype = dtype;
  result.max_batch = 2;
  result.jitter_seed = 99;
  return result;
}

TEST(RouterBiasParameters, OnePerMoeBlockDenseZeroNoDecayOnlyWithARate) {
  ModelConfig model;
  MoeConfig moe;
  make_configs(model, moe);
  ParameterLayout plain = Transformer::build_layout(model, moe, 1, 0);
  for (const ParameterSpec& spec : plain.specs()) EXPECT_EQ(spec.name.find("router_bias"), std::string::npos);
  moe.bias_update_rate = 0.001;
  for (int ep_size : {1, 2, 4}) {
    const ParameterLayout layout = Transformer::build_layout(model, moe, ep_size, ep_size - 1);
    EXPECT_EQ(layout.find("blocks.0.moe.router_bias"), -1) << "block 0 is dense";
    for (int block : {1, 2}) {
      const int index = layout.find("blocks." + std::to_string(block) + ".moe.router_bias");
      ASSERT_GE(index, 0) << "block " << block;
      const ParameterSpec& spec = layout.spec(index);
      EXPECT_EQ(spec.shape, std::vector<int64_t>{4}) << "whole on every rank: not sharded";
      EXPECT_EQ(spec.group, ParameterGroup::dense);
      EXPECT_FALSE(spec.weight_decay);
      EXPECT_EQ(spec.init, ParameterInit::zeros);
      EXPECT_FALSE(spec.is_sharded());
      EXPECT_GE(spec.offset, layout.decay_elements(ParameterGroup::dense)) << "in the no-decay range";
    }
  }
  Transformer transformer(model, moe, options(DType::f32));
  ModelParameters parameters(transformer.layout(), DeviceKind::cpu, DType::f32, DType::f32);
  parameters.initialize(kCpu, 3);
  EXPECT_TRUE(transformer.has_routing_biases());
  const std::vector<std::vector<double>> biases = transformer.routing_biases(kCpu, parameters);
  ASSERT_EQ(biases.size(), 2u);
  for (const std::vector<double>& bias : biases) EXPECT_EQ(bias, std::vector<double>(4, 0.0));
}

TEST(StepLoads, EveryTrainingForwardAddsEachBlocksCountsUntilReset) {
  ModelConfig model;
  MoeConfig moe;
  make_configs(model, moe);
  Transformer transformer(model, moe, options(DType::f32));
  ModelParameters parameters(transformer.layout(), DeviceKind::cpu, DType::f32, DType::f32);
  parameters.initialize(kCpu, 5);
  const Tensor loads = transformer.step_loads();
  ASSERT_EQ(loads.rank, 2);
  EXPECT_EQ(loads.dim(0), 2);
  EXPECT_EQ(loads.dim(1), 4);
  EXPECT_EQ(loads.dtype, DType::f32);
  EXPECT_EQ(to_vector(loads), std::vector<double>(8, 0.0));

  Batch first(12, model.vocab_size, 1), second(12, model.vocab_size, 2);
  std::vector<double> expected(8, 0.0);
  auto add_counts = [&] {
    const TransformerStats stats = transformer.read_stats(kCpu);
    ASSERT_EQ(stats.moe.size(), 2u);
    for (size_t block = 0; block < 2; ++block)
      for (size_t expert = 0; expert < 4; ++expert)
        expected[block * 4 + expert] += double(stats.moe[block].expert_counts[expert]);
  };
  transformer.forward_loss(kCpu, parameters, first.tokens, first.targets, 2, 6, ForwardMode::training, 0.1f, 0);
  add_counts();
  EXPECT_EQ(to_vector(transformer.step_loads()), expected);
  transformer.forward_loss(kCpu, parameters, second.tokens, second.targets, 2, 6, ForwardMode::training, 0.1f, 1);
  add_counts();
  EXPECT_EQ(to_vector(transformer.step_loads()), expected) << "the second micro-batch adds";
  double total = 0;
  for (double value : expected) total += value;
  EXPECT_EQ(total, 2 * 2 * 12 * 2) << "two forwards, two blocks, 12 tokens, top-2";
  transformer.forward_loss(kCpu, parameters, first.tokens, first.targets, 2, 6, ForwardMode::evaluation, 0.0f, 0);
  transformer.forward_logits(kCpu, parameters, first.tokens, 2, 6);
  EXPECT_EQ(to_vector(transformer.step_loads()), expected) << "evaluation and generation add nothing";
  transformer.reset_step_loads(kCpu);
  EXPECT_EQ(to_vector(transformer.step_loads()), std::vector<double>(8, 0.0));
}

TEST(RouterBiasUpdate, MovesEachBiasBySignOfTheGapToTheMeanLoad) {
  ModelConfig model;
  MoeConfig moe;
  make_configs(model, moe);
  moe.bias_update_rate = 0.25;
  Transformer transformer(model, moe, options(DType::f32));
  // bf16 compute copies (as on CUDA): the update refreshes the bias's copy.
  ModelParameters parameters(transformer.layout(), DeviceKind::cpu, DType::f32, DType::bf16);
  parameters.initialize(kCpu, 5);
  Tensor loads = transformer.step_loads();
  const std::vector<float> values = {10, 2, 4, 4,    // mean 5: -, +, +, +
                                     3, 3, 3, 3};    // balanced: no move
  for (size_t index = 0; index < values.size(); ++index) loads.as<float>()[index] = values[index];
  transformer.update_routing_biases(kCpu, parameters, 0.25f);
  std::vector<std::vector<double>> biases = transformer.routing_biases(kCpu, parameters);
  ASSERT_EQ(biases.size(), 2u);
  EXPECT_EQ(biases[0], (std::vector<double>{-0.25, 0.25, 0.25, 0.25}));
  EXPECT_EQ(biases[1], std::vector<double>(4, 0.0));
  transformer.update_routing_biases(kCpu, parameters, 0.125f);  // the loads as they stand, again
  biases = transformer.routing_biases(kCpu, parameters);
  EXPECT_EQ(biases[0], (std::vector<double>{-0.375, 0.375, 0.375, 0.375}));
  const int index = transformer.layout().find("blocks.1.moe.router_bias");
  EXPECT_EQ(to_vector(parameters.compute(index)), biases[0]) << "the bf16 compute copy follows";
  // Nothing else moved.
  ModelParameters fresh(transformer.layout(), DeviceKind::cpu, DType::f32, DType::bf16);
  fresh.initialize(kCpu, 5);
  for (int other = 0; other < transformer.layout().size(); ++other)
    if (transformer.layout().spec(other).name.find("router_bias") == std::string::npos)
      EXPECT_EQ(parameters.master_values(kCpu, other), fresh.master_values(kCpu, other))
          << transformer.layout().spec(other).name;
  // Without router biases the update is a no-op.
  MoeConfig no_bias = moe;
  no_bias.bias_update_rate = 0;
  Transformer plain(model, no_bias, options(DType::f32));
  ModelParameters plain_parameters(plain.layout(), DeviceKind::cpu, DType::f32, DType::f32);
  plain_parameters.initialize(kCpu, 5);
  EXPECT_FALSE(plain.has_routing_biases());
  EXPECT_NO_THROW(plain.update_routing_biases(kCpu, plain_parameters, 0.25f));
  EXPECT_EQ(plain.routing_biases(kCpu, plain_parameters), std::vector<std::vector<double>>(2));
}

TEST(GlobalBatchLoss, TrainingForwardsReduceEachBlockAndRunUntilReset) {
  ModelConfig model;
  MoeConfig moe;
  make_configs(model, moe);
  moe.global_aux_loss_weight = 0.1;
  Transformer transformer(model, moe, options(DType::f64));
  ModelParameters parameters(transformer.layout(), DeviceKind::cpu, DType::f64, DType::f64);
  parameters.initialize(kCpu, 5);
  int reductions = 0;
  transformer.set_load_reducer([&](const ExecContext&, Tensor& loads) {
    ++reductions;
    for (int64_t e = 0; e < loads.numel(); ++e) set_element(loads, e, 2.0 * get_element(loads, e));
  });
  Batch first(12, model.vocab_size, 1), second(12, model.vocab_size, 2);
  auto global_losses = [&](const Batch& batch, ForwardMode mode) {
    transformer.forward_loss(kCpu, parameters, batch.tokens, batch.targets, 2, 6, mode, 0.1f, 0);
    std::vector<double> losses;
    for (const MoeBlockStats& block : transformer.read_stats(kCpu).moe) losses.push_back(block.global_aux_loss);
    return losses;
  };
  const std::vector<double> alone_first = global_losses(first, ForwardMode::training);
  EXPECT_EQ(reductions, 2) << "one reduction per MoE block";
  for (double loss : alone_first) EXPECT_GT(loss, 0.0);
  const std::vector<double> running_second = global_losses(second, ForwardMode::training);
  EXPECT_EQ(reductions, 4);
  global_losses(second, ForwardMode::evaluation);
  EXPECT_EQ(reductions, 4) << "evaluation forwards do not reduce";
  transformer.reset_step_loads(kCpu);
  // After a reset the first micro-batch stands alone again: the same losses as at the start.
  EXPECT_EQ(global_losses(first, ForwardMode::training), alone_first);
  transformer.reset_step_loads(kCpu);
  const std::vector<double> alone_second = global_losses(second, ForwardMode::training);
  EXPECT_NE(alone_second, running_second) << "the second micro-batch was balanced against both";
}

// ---- The whole model's gradients with the modern options and a shared expert ----------------------

double total_loss(Transformer& model, const ModelParameters& parameters, const Batch& batch) {
  model.reset_step_loads(kCpu);  // every evaluation is the step's first micro-batch
  model.forward_loss(kCpu, parameters, batch.tokens, batch.targets, 2, 6, ForwardMode::training, float(1.0 / 12.0), 5);
  const TransformerStats stats = model.read_stats(kCpu);
  double loss = stats.loss_sum / double(stats.tokens);
  for (const MoeBlockStats& moe : stats.moe) loss += moe.aux_loss + moe.z_loss + moe.seq_aux_loss + moe.global_aux_loss;
  return loss;
}

struct ModernCase {
  const char* name;
  ScoreFunction score;
  RoutingMethod method;
  double bias_rate;  // > 0: router biases, set to fixed non-zero values
  int groups, topk_groups;
  double seq_weight, global_weight;
};

void PrintTo(const ModernCase& c, std::ostream* os) { *os << c.name; }

class ModernModelGradients : public ::testing::TestWithParam<ModernCase> {};

TEST_P(ModernModelGradients, MatchFiniteDifferencesWithASharedExpert) {
  const ModernCase& c = GetParam();
  ModelConfig model_config;
  MoeConfig moe;
  make_configs(model_config, moe);
  moe.num_shared_experts = 1;
  moe.score_function = c.score;
  moe.routing = c.method;
  moe.bias_update_rate = c.bias_rate;
  moe.num_groups = c.groups;
  moe.topk_groups = c.topk_groups;
  moe.seq_aux_loss_weight = c.seq_weight;
  moe.global_aux_loss_weight = c.global_weight;
  if (c.method == RoutingMethod::expert_choice) moe.capacity_factor = 0.75;  // 5 of 12 tokens per expert

  Transformer model(model_config, moe, options(DType::f64));
  ModelParameters parameters(model.layout(), DeviceKind::cpu, DType::f64, DType::f64);
  parameters.initialize(kCpu, 7);
  for (int block : {1, 2}) {
    const int bias = model.layout().find("blocks." + std::to_string(block) + ".moe.router_bias");
    if (bias >= 0) parameters.set_master_values(kCpu, bias, {0.3, -0.2, 0.1 * block, -0.1});
  }
  Batch batch(12, model_config.vocab_size, 11);
  total_loss(model, parameters, batch);
  const TransformerStats base = model.read_stats(kCpu);
  model.backward(kCpu, parameters, 1.0f, false);

  const double fd_step = 1e-6;
  for (int index = 0; index < parameters.layout().size(); ++index) {
    const ParameterSpec& spec = parameters.layout().spec(index);
    const std::vector<double> analytic = parameters.grad_values(kCpu, index);
    if (spec.name.find("router_bias") != std::string::npos) {
      EXPECT_EQ(analytic, std::vector<double>(analytic.size(), 0.0)) << spec.name << " has no gradient";
      continue;
    }
    Tensor master = parameters.master(index);
    std::vector<double> numeric(analytic.size());
    for (int64_t element = 0; element < master.numel(); ++element) {
      double* value = master.as<double>() + element;
      const double original = *value;
      *value = original + fd_step;
      const double plus = total_loss(model, parameters, batch);
      *value = original - fd_step;
      const double minus = total_loss(model, parameters, batch);
      *value = original;
      numeric[size_t(element)] = (plus - minus) / (2 * fd_step);
    }
    EXPECT_LE(relative_error(analytic, numeric), 2e-6) << spec.name;
    double norm = 0;
    for (double value : numeric) norm += value * value;
    EXPECT_GT(norm, 1e-10) << spec.name << ": vacuous check (no gradient reaches it)";
  }
  // The perturbations moved no routing decision (counts are piecewise constant).
  total_loss(model, parameters, batch);
  const TransformerStats after = model.read_stats(kCpu);
  for (size_t layer_index = 0; layer_index < base.moe.size(); ++layer_index)
    EXPECT_EQ(after.moe[layer_index].expert_counts, base.moe[layer_index].expert_counts);
  for (const MoeBlockStats& block : base.moe) {
    if (c.seq_weight > 0) EXPECT_GT(block.seq_aux_loss, 0.0);
    if (c.global_weight > 0) EXPECT_GT(block.global_aux_loss, 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ModernModelGradients,
    ::testing::Values(ModernCase{"sigmoid_bias_groups_seq_global", ScoreFunction::sigmoid, RoutingMethod::token_choice,
                                 0.001, 2, 1, 0.1, 0.1},
                      ModernCase{"softmax_seq_global", ScoreFunction::softmax, RoutingMethod::token_choice, 0.0, 1, 1,
                                 0.1, 0.1},
                      ModernCase{"expert_choice_sigmoid_global", ScoreFunction::sigmoid, RoutingMethod::expert_choice,
                                 0.0, 1, 1, 0.0, 0.1}),
    [](const ::testing::TestParamInfo<ModernCase>& info) { return std::string(info.param.name); });

}  // namespace
