// Shared experts and dense first blocks (DeepSeek-V3 style) on the CPU backend: the whole
// transformer's gradients against float64 central finite differences with shared experts on and a
// dense first block; shared experts whose output projection is zero leave the model bit-identical
// to one without them; their parameters are dense (whole on every expert-parallel rank); the
// routing taps number the MoE blocks that remain after the dense first blocks; and the FLOPs and
// parameter estimates count the shared experts as active.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "src/model/routing_observer.h"
#include "src/model/transformer.h"
#include "src/train/metrics.h"
#include "tests/support/expect_error.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

struct SharedCase {
  const char* name;
  NormKind norm;
  PositionKind positions;
  ExpertActivation activation;
  int n_layers, moe_every, dense_first_blocks;
  int experts, top_k;
  int shared_experts, shared_d_ff;
};

void PrintTo(const SharedCase& c, std::ostream* os) { *os << c.name; }

void make_configs(const SharedCase& c, ModelConfig& model, MoeConfig& moe) {
  model = ModelConfig();
  model.vocab_size = 11;
  model.d_model = 8;
  model.n_layers = c.n_layers;
  model.n_heads = 2;
  model.seq_len = 5;
  model.d_ff = 6;
  model.norm = c.norm;
  model.positions = c.positions;
  model.moe_every = c.moe_every;
  model.dense_first_blocks = c.dense_first_blocks;
  model.compute_dtype = DType::f32;
  model.init_std = 0.5;  // large weights: every path carries a visible gradient
  moe = MoeConfig();
  moe.num_experts = c.experts;
  moe.top_k = c.top_k;
  moe.k_min = c.top_k;
  moe.expert_d_ff = 5;
  moe.num_shared_experts = c.shared_experts;
  moe.shared_expert_d_ff = c.shared_d_ff;
  moe.activation = c.activation;
  moe.capacity_factor = 4.0;
  moe.eval_capacity_factor = 4.0;
  moe.renormalize_gates = c.top_k > 1;
  moe.aux_loss_weight = 0.05;
  moe.z_loss_weight = 0.01;
  moe.segment_alignment = 4;
}

struct Batch {
  HostTensor tokens, targets;
  Batch(int64_t count, int vocab, uint64_t seed) : tokens(DType::i32, {count}), targets(DType::i32, {count}) {
    std::mt19937_64 generator(seed);
    fill_uniform(tokens, generator, 0, vocab - 1);
    fill_uniform(targets, generator, 0, vocab - 1);
  }
};

TransformerOptions f64_options() {
  TransformerOptions options;
  options.device = DeviceKind::cpu;
  options.activation_dtype = DType::f64;
  options.max_batch = 2;
  return options;
}

// Mean token loss plus every MoE layer's aux and z loss (what backward differentiates for
// ce_grad_scale = 1 / tokens and aux_grad_scale = 1).
double total_loss(Transformer& model, const ModelParameters& parameters, const Batch& batch, int64_t sequences,
                  int64_t seq_len) {
  const int64_t tokens = sequences * seq_len;
  model.forward_loss(kCpu, parameters, batch.tokens, batch.targets, sequences, seq_len, ForwardMode::training,
                     float(1.0 / double(tokens)), 0);
  const TransformerStats stats = model.read_stats(kCpu);
  double loss = stats.loss_sum / double(stats.tokens);
  for (const MoeBlockStats& moe : stats.moe) loss += moe.aux_loss + moe.z_loss;
  return loss;
}

class SharedExpertGradients : public ::testing::TestWithParam<SharedCase> {};

TEST_P(SharedExpertGradients, MatchFiniteDifferences) {
  const SharedCase& c = GetParam();
  ModelConfig model_config;
  MoeConfig moe_config;
  make_configs(c, model_config, moe_config);
  Transformer model(model_config, moe_config, f64_options());
  ModelParameters parameters(model.layout(), DeviceKind::cpu, DType::f64, DType::f64);
  parameters.initialize(kCpu, 7);
  const int64_t sequences = 2, seq_len = model_config.seq_len;
  Batch batch(sequences * seq_len, model_config.vocab_size, 11);
  EXPECT_EQ(model.moe_block_count(), model_config.moe_block_count());

  total_loss(model, parameters, batch, sequences, seq_len);
  const TransformerStats base = model.read_stats(kCpu);
  model.backward(kCpu, parameters, 1.0f, false);
  int shared_tensors = 0;
  for (int index = 0; index < parameters.layout().size(); ++index) {
    const ParameterSpec& spec = parameters.layout().spec(index);
    if (spec.name.find(".moe.shared.") != std::string::npos) ++shared_tensors;
    const std::vector<double> analytic = parameters.grad_values(kCpu, index);
    Tensor master = parameters.master(index);
    std::vector<double> numeric(analytic.size());
    const double fd_step = 1e-6;
    for (int64_t element = 0; element < master.numel(); ++element) {
      double* value = master.as<double>() + element;
      const double original = *value;
      *value = original + fd_step;
      const double plus = total_loss(model, parameters, batch, sequences, seq_len);
      *value = original - fd_step;
      const double minus = total_loss(model, parameters, batch, sequences, seq_len);
      *value = original;
      numeric[size_t(element)] = (plus - minus) / (2 * fd_step);
    }
    EXPECT_LE(relative_error(analytic, numeric), 2e-6) << spec.name;
    double norm = 0;
    for (double value : numeric) norm += value * value;
    EXPECT_GT(norm, 1e-10) << spec.name << ": vacuous check (no gradient reaches it)";
  }
  EXPECT_EQ(shared_tensors, 2 * model_config.moe_block_count());
  total_loss(model, parameters, batch, sequences, seq_len);
  const TransformerStats after = model.read_stats(kCpu);
  for (size_t layer = 0; layer < base.moe.size(); ++layer)
    EXPECT_EQ(after.moe[layer].expert_counts, base.moe[layer].expert_counts) << "a routing decision moved";
}

INSTANTIATE_TEST_SUITE_P(
    Cases, SharedExpertGradients,
    ::testing::Values(SharedCase{"rmsnorm_rotary_gelu_dense_first_two_shared", NormKind::rmsnorm,
                                 PositionKind::rotary, ExpertActivation::gelu_tanh, 3, 1, 1, 3, 2, 2, 3},
                      SharedCase{"layernorm_learned_swiglu_one_wide_shared", NormKind::layernorm,
                                 PositionKind::learned, ExpertActivation::swiglu, 2, 1, 0, 3, 1, 1, 7},
                      SharedCase{"rmsnorm_rotary_swiglu_moe_every2_three_shared", NormKind::rmsnorm,
                                 PositionKind::rotary, ExpertActivation::swiglu, 2, 2, 0, 2, 2, 3, 2}),
    [](const ::testing::TestParamInfo<SharedCase>& info) { return std::string(info.param.name); });

TEST(SharedExperts, ZeroOutputProjectionIsBitIdenticalToNone) {
  const SharedCase c{"zero", NormKind::rmsnorm, PositionKind::rotary, ExpertActivation::swiglu, 2, 1, 0, 3, 2, 2, 4};
  ModelConfig model_config;
  MoeConfig with_config, without_config;
  make_configs(c, model_config, with_config);
  without_config = with_config;
  without_config.num_shared_experts = 0;
  Transformer with(model_config, with_config, f64_options()), without(model_config, without_config, f64_options());
  ModelParameters with_parameters(with.layout(), DeviceKind::cpu, DType::f64, DType::f64);
  ModelParameters without_parameters(without.layout(), DeviceKind::cpu, DType::f64, DType::f64);
  with_parameters.initialize(kCpu, 5);
  without_parameters.initialize(kCpu, 5);
  // Without shared experts the layout is the one from before they existed: no shared tensor.
  for (int index = 0; index < without.layout().size(); ++index)
    EXPECT_EQ(without.layout().spec(index).name.find(".shared."), std::string::npos);
  EXPECT_EQ(with.layout().size(), without.layout().size() + 2 * model_config.moe_block_count());
  for (int block = 0; block < model_config.n_layers; ++block) {
    const int w2 = with.layout().find("blocks." + std::to_string(block) + ".moe.shared.w2");
    ASSERT_GE(w2, 0);
    with_parameters.set_master_values(kCpu, w2, std::vector<double>(size_t(with.layout().spec(w2).numel()), 0.0));
  }
  for (int index = 0; index < without.layout().size(); ++index)  // same names, same values (init by name)
    ASSERT_EQ(with_parameters.master_values(kCpu, with.layout().find(without.layout().spec(index).name)),
              without_parameters.master_values(kCpu, index));
  Batch batch(10, model_config.vocab_size, 3);
  const double with_loss = total_loss(with, with_parameters, batch, 2, 5);
  const double without_loss = total_loss(without, without_parameters, batch, 2, 5);
  EXPECT_EQ(with_loss, without_loss);
  with.backward(kCpu, with_parameters, 1.0f, false);
  without.backward(kCpu, without_parameters, 1.0f, false);
  for (int index = 0; index < without.layout().size(); ++index) {
    const std::string& name = without.layout().spec(index).name;
    EXPECT_EQ(with_parameters.grad_values(kCpu, with.layout().find(name)), without_parameters.grad_values(kCpu, index))
        << name;
  }
}

TEST(SharedExperts, AreDenseParametersWholeOnEveryExpertParallelRank) {
  ModelConfig model_config;
  MoeConfig moe_config;
  make_configs({"layout", NormKind::rmsnorm, PositionKind::rotary, ExpertActivation::swiglu, 2, 1, 0, 4, 2, 3, 5},
               model_config, moe_config);
  for (int rank = 0; rank < 2; ++rank) {
    const ParameterLayout layout = Transformer::build_layout(model_config, moe_config, 2, rank);
    const ParameterSpec& w1 = layout.spec(layout.find("blocks.1.moe.shared.w1"));
    const ParameterSpec& w2 = layout.spec(layout.find("blocks.1.moe.shared.w2"));
    EXPECT_EQ(w1.shape, (std::vector<int64_t>{8, 2 * 3 * 5}));  // swiglu: gate and up halves
    EXPECT_EQ(w2.shape, (std::vector<int64_t>{3 * 5, 8}));
    for (const ParameterSpec* spec : {&w1, &w2}) {
      EXPECT_EQ(spec->group, ParameterGroup::dense) << spec->name;
      EXPECT_FALSE(spec->is_sharded()) << spec->name;
      EXPECT_TRUE(spec->weight_decay) << spec->name;
    }
    EXPECT_DOUBLE_EQ(w1.init_std, model_config.init_std);
    EXPECT_DOUBLE_EQ(w2.init_std, model_config.init_std / std::sqrt(2.0 * model_config.n_layers));
    EXPECT_EQ(layout.spec(layout.find("blocks.1.moe.w1")).shape[0], 2);  // the routed experts stay sharded
  }
}

TEST(SharedExperts, TransformerRefusesAZeroWidth) {
  ModelConfig model_config;
  MoeConfig moe_config;
  make_configs({"zero_width", NormKind::rmsnorm, PositionKind::rotary, ExpertActivation::gelu_tanh, 2, 1, 0, 2, 1, 1, 0},
               model_config, moe_config);
  expect_bad_input([&] { Transformer model(model_config, moe_config, f64_options()); },
                   {"moe.num_shared_experts = 1", "moe.shared_expert_d_ff >= 1", "got 0"});
}

struct LayerRecorder : RoutingObserver {
  std::vector<int> layers;
  void on_routing(const ExecContext&, const RoutingEvent& event) override { layers.push_back(event.moe_layer); }
};

TEST(DenseFirstBlocks, RoutingTapsNumberTheRemainingMoeBlocks) {
  ModelConfig model_config;
  MoeConfig moe_config;
  // 4 blocks, moe_every 1, the first 2 dense: MoE blocks 2 and 3 are MoE layers 0 and 1.
  make_configs({"taps", NormKind::rmsnorm, PositionKind::rotary, ExpertActivation::gelu_tanh, 4, 1, 2, 2, 1, 1, 3},
               model_config, moe_config);
  moe_config.renormalize_gates = false;
  EXPECT_EQ(model_config.moe_block_count(), 2);
  EXPECT_EQ(model_config.moe_ordinal(2), 0);
  EXPECT_EQ(model_config.moe_ordinal(3), 1);
  Transformer model(model_config, moe_config, f64_options());
  EXPECT_EQ(model.moe_block_count(), 2);
  EXPECT_GE(model.layout().find("blocks.1.ffn.w1"), 0);
  EXPECT_LT(model.layout().find("blocks.1.moe.router"), 0);
  EXPECT_GE(model.layout().find("blocks.2.moe.router"), 0);
  ModelParameters parameters(model.layout(), DeviceKind::cpu, DType::f64, DType::f64);
  parameters.initialize(kCpu, 1);
  Batch batch(10, model_config.vocab_size, 2);
  LayerRecorder recorder;
  {
    RoutingObserverScope scope(&recorder);
    total_loss(model, parameters, batch, 2, 5);
  }
  EXPECT_EQ(recorder.layers, (std::vector<int>{0, 1}));
  EXPECT_EQ(model.read_stats(kCpu).moe.size(), 2u);

  // moe_every 2 of 6 blocks with 2 dense first blocks: blocks 3 and 5 are MoE layers 0 and 1.
  model_config.n_layers = 6;
  model_config.moe_every = 2;
  EXPECT_FALSE(model_config.block_is_moe(1));
  EXPECT_TRUE(model_config.block_is_moe(3));
  EXPECT_EQ(model_config.moe_ordinal(3), 0);
  EXPECT_EQ(model_config.moe_ordinal(5), 1);
  EXPECT_EQ(model_config.moe_block_count(), 2);
}

TEST(SharedExperts, FlopsCountThemAsActiveInEveryMoeBlock) {
  ModelConfig model_config;
  MoeConfig moe_config;
  make_configs({"flops", NormKind::rmsnorm, PositionKind::rotary, ExpertActivation::swiglu, 4, 1, 1, 4, 2, 0, 5},
               model_config, moe_config);
  const FlopsEstimate without = estimate_flops(model_config, moe_config);
  moe_config.num_shared_experts = 2;
  moe_config.shared_expert_d_ff = 5;
  const FlopsEstimate with = estimate_flops(model_config, moe_config);
  const double d = model_config.d_model, width = 2 * 5;
  const double per_block = d * 2 * width + width * d;  // swiglu W1 [D, 2W] and W2 [W, D]
  const double moe_blocks = 3;                          // blocks 1, 2, 3
  EXPECT_DOUBLE_EQ(with.active_matmul_params - without.active_matmul_params, moe_blocks * per_block);
  EXPECT_DOUBLE_EQ(with.total_params - without.total_params, moe_blocks * per_block);
  EXPECT_DOUBLE_EQ(with.matmul_flops_per_token - without.matmul_flops_per_token, 6 * moe_blocks * per_block);
  // A dense first block costs d_ff instead of the routed experts.
  model_config.dense_first_blocks = 2;
  const FlopsEstimate fewer = estimate_flops(model_config, moe_config);
  EXPECT_LT(fewer.total_params, with.total_params);
}

}  // namespace
