// The MoE layer on CPU: gradients of the whole layer against float64 central finite differences,
// the forward against a token-by-token computation written here, sparse vs dense mode, buffer
// reuse across steps, jitter and capacity behaviour, and argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <ostream>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "src/model/moe_layer.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

struct LayerCase {
  const char* name;
  ExpertActivation activation;
  int k;
  bool renormalize;
  float capacity_factor_train;  // < 1: drops
  float jitter_eps;
  ComplexityMode complexity;
  ExpertComputeMode mode;
};

void PrintTo(const LayerCase& c, std::ostream* os) { *os << c.name; }

MoeLayerConfig make_config(const LayerCase& c) {
  MoeLayerConfig config;
  config.d_model = 6;
  config.moe.expert_d_ff = 5;
  config.moe.num_experts = 4;
  config.moe.top_k = c.k;
  config.moe.k_min = 1;
  config.moe.complexity = c.complexity;
  config.moe.renormalize_gates = c.renormalize;
  config.moe.capacity_factor = c.capacity_factor_train;
  config.moe.eval_capacity_factor = 4.0f;
  config.moe.segment_alignment = 4;
  config.moe.aux_loss_weight = 0.05f;  // large enough that the loss terms show in every gradient
  config.moe.z_loss_weight = 0.01f;
  config.moe.activation = c.activation;
  config.moe.jitter_eps = c.jitter_eps;
  config.jitter_seed = 1234;
  config.jitter_stream = 7;
  config.moe.compute_mode = c.mode;
  return config;
}

// Parameters, inputs and gradient buffers of one layer, all on the host.
struct LayerData {
  MoeLayerConfig config;
  int64_t tokens;
  HostTensor x, router, w1, w2, y, probe, grad_x, grad_router, grad_w1, grad_w2;

  LayerData(const MoeLayerConfig& config_, int64_t tokens_, DType real, uint64_t seed)
      : config(config_),
        tokens(tokens_),
        x(real, {tokens_, config_.d_model}),
        router(real, {config_.d_model, config_.moe.num_experts}),
        w1(real, {config_.moe.num_experts, config_.d_model, config_.w1_columns()}),
        w2(real, {config_.moe.num_experts, config_.moe.expert_d_ff, config_.d_model}),
        y(real, {tokens_, config_.d_model}),
        probe(real, {tokens_, config_.d_model}),
        grad_x(real, {tokens_, config_.d_model}),
        grad_router(real, {config_.d_model, config_.moe.num_experts}),
        grad_w1(real, {config_.moe.num_experts, config_.d_model, config_.w1_columns()}),
        grad_w2(real, {config_.moe.num_experts, config_.moe.expert_d_ff, config_.d_model}) {
    std::mt19937_64 generator(seed);
    fill_uniform(x, generator, -1, 1);
    fill_normal(router, generator, 0, 1);
    fill_normal(w1, generator, 0, 0.6);
    fill_normal(w2, generator, 0, 0.6);
    fill_uniform(probe, generator, -1, 1);
  }
  MoeWeights weights() { return {router, w1, w2}; }
  MoeGradients gradients() { return {grad_router, grad_w1, grad_w2}; }
};

// L = <y, probe> + aux + z.
double layer_loss(MoeLayer& layer, LayerData& data, const MoeForwardArgs& args) {
  const MoeLosses losses = layer.forward(kCpu, data.x, data.weights(), args, data.y);
  return dot(data.y, data.probe) + losses.aux_loss + losses.z_loss;
}

void run_backward(MoeLayer& layer, LayerData& data, const MoeForwardArgs& args) {
  layer.forward(kCpu, data.x, data.weights(), args, data.y);
  for (Tensor* tensor : {&data.grad_x.tensor(), &data.grad_router.tensor(), &data.grad_w1.tensor(), &data.grad_w2.tensor()})
    poison(*tensor);
  MoeGradients gradients = data.gradients();
  layer.backward(kCpu, data.probe, data.weights(), 1.0f, 1.0f, data.grad_x, gradients);
}

// Smallest distance of any routing decision from flipping: gaps between the k+1 largest logits
// of a token and, with entropy complexity, the distance of c*(k_max-k_min)+0.5 from an integer.
double decision_margin(const MoeLayer& layer, const MoeLayerConfig& config) {
  const Tensor& logits = layer.logits();
  const int64_t tokens = logits.dim(0), experts = logits.dim(1);
  double margin = INFINITY;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<double> row(static_cast<size_t>(experts));
    for (int64_t e = 0; e < experts; ++e) row[size_t(e)] = get_element(logits, t * experts + e);
    std::vector<double> sorted = row;
    std::sort(sorted.rbegin(), sorted.rend());
    for (int i = 0; i < std::min<int>(config.moe.top_k, int(experts) - 1); ++i)
      margin = std::min(margin, sorted[size_t(i)] - sorted[size_t(i + 1)]);
    if (config.moe.complexity == ComplexityMode::entropy) {
      double max_logit = sorted[0], sum = 0, entropy = 0;
      for (double value : row) sum += std::exp(value - max_logit);
      for (double value : row) {
        const double p = std::exp(value - max_logit) / sum;
        entropy -= p > 0 ? p * std::log(p) : 0;
      }
      const double level = entropy / std::log(double(experts)) * (config.moe.top_k - config.moe.k_min) + 0.5;
      margin = std::min(margin, std::fabs(level - std::round(level)));
    }
  }
  return margin;
}

class LayerGradients : public ::testing::TestWithParam<LayerCase> {};

TEST_P(LayerGradients, MatchFiniteDifferences) {
  const LayerCase& c = GetParam();
  const MoeLayerConfig config = make_config(c);
  const int64_t tokens = 12;
  const MoeForwardArgs args{/*training=*/true, /*step=*/3, nullptr, true};
  MoeLayer layer(config, DeviceKind::cpu, DType::f64, 16);

  // Draw inputs until no routing decision sits within 1e-4 of flipping (the perturbation moves
  // logits by ~1e-6), so the finite differences see one smooth piece of the function.
  uint64_t seed = 100;
  std::unique_ptr<LayerData> data;
  for (;; ++seed) {
    data = std::make_unique<LayerData>(config, tokens, DType::f64, seed);
    layer.forward(kCpu, data->x, data->weights(), args, data->y);
    if (decision_margin(layer, config) > 1e-4) break;
    ASSERT_LT(seed, 150u) << "no well-separated inputs found";
  }
  const MoeRoutingStats stats = layer.read_routing_stats(kCpu);
  if (c.capacity_factor_train < 1.0f) EXPECT_GT(stats.dropped_choices, 0) << "the case should drop choices";
  if (c.capacity_factor_train >= 4.0f) EXPECT_EQ(stats.dropped_choices, 0);

  run_backward(layer, *data, args);
  auto loss = [&] { return layer_loss(layer, *data, args); };
  const double step = 1e-6;
  struct Check {
    const char* name;
    HostTensor& parameter;
    HostTensor& analytic;
  } checks[] = {{"x", data->x, data->grad_x},
                {"router", data->router, data->grad_router},
                {"w1", data->w1, data->grad_w1},
                {"w2", data->w2, data->grad_w2}};
  for (Check& check : checks) {
    const std::vector<double> numeric = central_difference_gradient(loss, check.parameter, step);
    const std::vector<double> analytic = to_vector(check.analytic);
    EXPECT_LE(relative_error(analytic, numeric), 1e-6) << check.name;
    double norm = 0;
    for (double value : numeric) norm += value * value;
    EXPECT_GT(norm, 1e-8) << check.name << ": vacuous check";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, LayerGradients,
    ::testing::Values(
        LayerCase{"gelu_k1", ExpertActivation::gelu_tanh, 1, false, 4.0f, 0.0f, ComplexityMode::none, ExpertComputeMode::sparse},
        LayerCase{"gelu_k2_renorm", ExpertActivation::gelu_tanh, 2, true, 4.0f, 0.0f, ComplexityMode::none,
                  ExpertComputeMode::sparse},
        LayerCase{"gelu_k2_renorm_drops", ExpertActivation::gelu_tanh, 2, true, 0.5f, 0.0f, ComplexityMode::none,
                  ExpertComputeMode::sparse},
        LayerCase{"gelu_k1_drops", ExpertActivation::gelu_tanh, 1, false, 0.5f, 0.0f, ComplexityMode::none,
                  ExpertComputeMode::sparse},
        LayerCase{"swiglu_k1", ExpertActivation::swiglu, 1, false, 4.0f, 0.0f, ComplexityMode::none,
                  ExpertComputeMode::sparse},
        LayerCase{"swiglu_k2_renorm", ExpertActivation::swiglu, 2, true, 4.0f, 0.0f, ComplexityMode::none,
                  ExpertComputeMode::sparse},
        LayerCase{"swiglu_k2_renorm_drops", ExpertActivation::swiglu, 2, true, 0.5f, 0.0f, ComplexityMode::none,
                  ExpertComputeMode::sparse},
        LayerCase{"swiglu_k1_drops", ExpertActivation::swiglu, 1, false, 0.5f, 0.0f, ComplexityMode::none,
                  ExpertComputeMode::sparse},
        LayerCase{"gelu_k2_jitter_drops", ExpertActivation::gelu_tanh, 2, true, 0.75f, 0.2f, ComplexityMode::none,
                  ExpertComputeMode::sparse},
        LayerCase{"swiglu_k3_entropy", ExpertActivation::swiglu, 3, true, 1.0f, 0.0f, ComplexityMode::entropy,
                  ExpertComputeMode::sparse},
        LayerCase{"gelu_k2_dense_drops", ExpertActivation::gelu_tanh, 2, true, 0.5f, 0.0f, ComplexityMode::none,
                  ExpertComputeMode::dense},
        LayerCase{"swiglu_k2_dense_jitter", ExpertActivation::swiglu, 2, false, 0.75f, 0.1f, ComplexityMode::none,
                  ExpertComputeMode::dense}),
    [](const ::testing::TestParamInfo<LayerCase>& info) { return std::string(info.param.name); });

// ---- Forward against an independent token-by-token computation ------------------------------

double activation_value(ExpertActivation activation, const std::vector<double>& hidden, int64_t f, int64_t width) {
  if (activation == ExpertActivation::gelu_tanh) {
    const double x = hidden[size_t(f)];
    return 0.5 * x * (1 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
  }
  const double gate = hidden[size_t(f)], up = hidden[size_t(width + f)];
  return gate / (1 + std::exp(-gate)) * up;
}

TEST(MoeLayer, ForwardMatchesTokenByTokenExperts) {
  for (ExpertActivation activation : {ExpertActivation::gelu_tanh, ExpertActivation::swiglu}) {
    LayerCase c{"forward", activation, 2, true, 0.6f, 0.0f, ComplexityMode::none, ExpertComputeMode::sparse};
    MoeLayerConfig config = make_config(c);
    config.moe.segment_alignment = 8;
    LayerData data(config, 37, DType::f64, 5);
    MoeLayer layer(config, DeviceKind::cpu, DType::f64, 40);
    poison(data.y);
    const MoeLosses losses = layer.forward(kCpu, data.x, data.weights(), {true, 0, nullptr, true}, data.y);
    ASSERT_TRUE(losses.read);
    EXPECT_EQ(losses.aux_loss, get_element(layer.losses_on_device(), kAuxLoss));
    EXPECT_GT(layer.read_routing_stats(kCpu).dropped_choices, 0);

    const RoutingResult& routing = layer.routing();
    const int capacity = int(get_element(routing.scalars, kCapacity));
    const int64_t d_model = config.d_model, width = config.moe.expert_d_ff, columns = config.w1_columns();
    for (int64_t t = 0; t < 37; ++t) {
      // Router logits are x Wr (no jitter configured).
      for (int e = 0; e < 4; ++e) {
        double logit = 0;
        for (int64_t d = 0; d < d_model; ++d) logit += get_element(data.x, t * d_model + d) * get_element(data.router, d * 4 + e);
        EXPECT_NEAR(get_element(layer.logits(), t * 4 + e), logit, 1e-13);
      }
      std::vector<double> expected(static_cast<size_t>(d_model), 0.0);
      for (int j = 0; j < 2; ++j) {
        const int expert = int(get_element(routing.expert_ids, t * 2 + j));
        if (expert < 0 || get_element(routing.slots, t * 2 + j) >= capacity) continue;
        std::vector<double> hidden(static_cast<size_t>(columns), 0.0);
        for (int64_t f = 0; f < columns; ++f)
          for (int64_t d = 0; d < d_model; ++d)
            hidden[size_t(f)] += get_element(data.x, t * d_model + d) * get_element(data.w1, (expert * d_model + d) * columns + f);
        for (int64_t d = 0; d < d_model; ++d) {
          double out = 0;
          for (int64_t f = 0; f < width; ++f)
            out += activation_value(activation, hidden, f, width) * get_element(data.w2, (expert * width + f) * d_model + d);
          expected[size_t(d)] += get_element(routing.gates, t * 2 + j) * out;
        }
      }
      for (int64_t d = 0; d < d_model; ++d) EXPECT_NEAR(get_element(data.y, t * d_model + d), expected[size_t(d)], 1e-12);
    }
  }
}

// ---- Sparse vs dense --------------------------------------------------------------------------

TEST(MoeLayer, DenseModeGivesTheSameOutputsAndGradientsAsSparse) {
  for (DType real : {DType::f32, DType::f64}) {
    for (ExpertActivation activation : {ExpertActivation::gelu_tanh, ExpertActivation::swiglu}) {
      LayerCase c{"dense", activation, 2, true, 0.6f, 0.1f, ComplexityMode::none, ExpertComputeMode::sparse};
      MoeLayerConfig sparse_config = make_config(c), dense_config = make_config(c);
      sparse_config.moe.num_experts = dense_config.moe.num_experts = 8;
      dense_config.moe.compute_mode = ExpertComputeMode::dense;
      LayerData sparse(sparse_config, 37, real, 9), dense(dense_config, 37, real, 9);
      MoeLayer sparse_layer(sparse_config, DeviceKind::cpu, real, 37), dense_layer(dense_config, DeviceKind::cpu, real, 37);
      const MoeForwardArgs args{true, 11, nullptr, true};
      run_backward(sparse_layer, sparse, args);
      run_backward(dense_layer, dense, args);
      EXPECT_GT(sparse_layer.read_routing_stats(kCpu).dropped_choices, 0);
      EXPECT_EQ(dense_layer.rows(), 8 * 40);  // every expert sees all 37 tokens, padded to 4
      const double tolerance = real == DType::f64 ? 1e-13 : 1e-5;
      EXPECT_LE(relative_error(dense.y, sparse.y), tolerance);
      EXPECT_LE(relative_error(dense.grad_x, sparse.grad_x), tolerance);
      EXPECT_LE(relative_error(dense.grad_router, sparse.grad_router), tolerance);
      EXPECT_LE(relative_error(dense.grad_w1, sparse.grad_w1), tolerance);
      EXPECT_LE(relative_error(dense.grad_w2, sparse.grad_w2), tolerance);
      EXPECT_EQ(sparse_layer.read_losses(kCpu).aux_loss, dense_layer.read_losses(kCpu).aux_loss);
    }
  }
}

// ---- Steps, buffers, jitter, capacity ---------------------------------------------------------

TEST(MoeLayer, ReusesItsBuffersAcrossStepsOfDifferentSizes) {
  LayerCase c{"reuse", ExpertActivation::swiglu, 2, true, 1.0f, 0.1f, ComplexityMode::none, ExpertComputeMode::sparse};
  const MoeLayerConfig config = make_config(c);
  MoeLayer layer(config, DeviceKind::cpu, DType::f32, 64);
  LayerData small(config, 5, DType::f32, 1), large(config, 64, DType::f32, 2);
  const MoeForwardArgs args{true, 1, nullptr, true};
  run_backward(layer, small, args);
  const void* logits = layer.logits().data;
  const void* gates = layer.routing().gates.data;
  const void* rows = layer.dispatch_map().row_tokens.data;
  run_backward(layer, large, args);
  run_backward(layer, small, args);
  EXPECT_EQ(layer.logits().data, logits);
  EXPECT_EQ(layer.routing().gates.data, gates);
  EXPECT_EQ(layer.dispatch_map().row_tokens.data, rows);
  // No state leaks from the larger step: a fresh layer computes the same small step.
  MoeLayer fresh(config, DeviceKind::cpu, DType::f32, 64);
  LayerData again(config, 5, DType::f32, 1);
  run_backward(fresh, again, args);
  EXPECT_EQ(max_abs_difference(small.y, again.y), 0.0);
  EXPECT_EQ(max_abs_difference(small.grad_x, again.grad_x), 0.0);
  EXPECT_EQ(max_abs_difference(small.grad_w1, again.grad_w1), 0.0);
}

TEST(MoeLayer, JitterDependsOnStepAndOnlyInTraining) {
  LayerCase c{"jitter", ExpertActivation::gelu_tanh, 1, false, 4.0f, 0.2f, ComplexityMode::none, ExpertComputeMode::sparse};
  const MoeLayerConfig config = make_config(c);
  MoeLayer layer(config, DeviceKind::cpu, DType::f64, 20);
  LayerData data(config, 20, DType::f64, 4);
  auto logits_for = [&](bool training, uint64_t step) {
    layer.forward(kCpu, data.x, data.weights(), {training, step, nullptr, false}, data.y);
    return to_vector(layer.logits());
  };
  const std::vector<double> eval = logits_for(false, 5), eval_other_step = logits_for(false, 6);
  const std::vector<double> train = logits_for(true, 5), train_again = logits_for(true, 5), train_next = logits_for(true, 6);
  EXPECT_EQ(eval, eval_other_step);
  EXPECT_EQ(train, train_again);
  EXPECT_NE(train, eval);
  EXPECT_NE(train, train_next);
  EXPECT_LE(relative_error(train, eval), 0.2);  // a perturbation of at most eps per input element
}

TEST(MoeLayer, TrainAndEvalUseTheirCapacityFactors) {
  LayerCase c{"capacity", ExpertActivation::gelu_tanh, 2, true, 0.5f, 0.0f, ComplexityMode::none, ExpertComputeMode::sparse};
  const MoeLayerConfig config = make_config(c);  // eval factor 4.0
  MoeLayer layer(config, DeviceKind::cpu, DType::f32, 50);
  LayerData data(config, 50, DType::f32, 6);
  const MoeLosses eval_losses = layer.forward(kCpu, data.x, data.weights(), {false, 0, nullptr, true}, data.y);
  const MoeRoutingStats eval = layer.read_routing_stats(kCpu);
  EXPECT_EQ(eval.capacity, 100);  // ceil(4.0 * 100 / 4)
  EXPECT_EQ(eval.dropped_choices, 0);
  const MoeLosses train_losses = layer.forward(kCpu, data.x, data.weights(), {true, 0, nullptr, false}, data.y);
  EXPECT_FALSE(train_losses.read);
  const MoeRoutingStats train = layer.read_routing_stats(kCpu);
  EXPECT_EQ(train.capacity, 13);  // ceil(0.5 * 100 / 4)
  EXPECT_GT(train.dropped_choices, 0);
  EXPECT_EQ(train.total_choices, 100);
  EXPECT_LE(train.padded_rows, layer.rows());
  // Drops do not change the losses (routing probabilities and first choices are the same).
  EXPECT_NEAR(layer.read_losses(kCpu).aux_loss, eval_losses.aux_loss, 1e-7);
}

TEST(MoeLayer, GivenComplexityControlsChoicesPerToken) {
  LayerCase c{"given", ExpertActivation::gelu_tanh, 4, true, 1.0f, 0.0f, ComplexityMode::given, ExpertComputeMode::sparse};
  const MoeLayerConfig config = make_config(c);
  MoeLayer layer(config, DeviceKind::cpu, DType::f32, 30);
  LayerData data(config, 30, DType::f32, 8);
  HostTensor complexity(DType::f32, {30});
  for (int64_t t = 0; t < 30; ++t) set_element(complexity, t, t < 10 ? 0.0 : 1.0);
  layer.forward(kCpu, data.x, data.weights(), {true, 0, &complexity.tensor(), true}, data.y);
  EXPECT_EQ(layer.read_routing_stats(kCpu).total_choices, 10 * 1 + 20 * 4);
  EXPECT_THROW(layer.forward(kCpu, data.x, data.weights(), {true, 0, nullptr, true}, data.y), Error);
}

TEST(MoeLayer, RejectsBadConfigsAndArguments) {
  LayerCase c{"errors", ExpertActivation::gelu_tanh, 2, true, 1.0f, 0.0f, ComplexityMode::none, ExpertComputeMode::sparse};
  MoeLayerConfig config = make_config(c);
  auto expect_bad_input = [](const MoeLayerConfig& bad, DType dtype) {
    try {
      MoeLayer layer(bad, DeviceKind::cpu, dtype, 8);
      ADD_FAILURE() << "no throw";
    } catch (const Error& error) {
      EXPECT_EQ(error.exit_code(), kExitBadInput) << error.what();
    }
  };
  MoeLayerConfig too_many_choices = config;
  too_many_choices.moe.top_k = 5;
  expect_bad_input(too_many_choices, DType::f32);
  MoeLayerConfig bad_jitter = config;
  bad_jitter.moe.jitter_eps = 1.5f;
  expect_bad_input(bad_jitter, DType::f32);
  expect_bad_input(config, DType::bf16);  // the CPU layer computes in f32 or f64

  MoeLayer layer(config, DeviceKind::cpu, DType::f32, 8);
  LayerData data(config, 8, DType::f32, 1);
  MoeGradients gradients = data.gradients();
  EXPECT_THROW(layer.backward(kCpu, data.probe, data.weights(), 1, 1, data.grad_x, gradients), Error);  // no forward
  LayerData too_many(config, 9, DType::f32, 1);
  EXPECT_THROW(layer.forward(kCpu, too_many.x, too_many.weights(), {}, too_many.y), Error);
  LayerData wrong_type(config, 8, DType::f64, 1);
  EXPECT_THROW(layer.forward(kCpu, wrong_type.x, wrong_type.weights(), {}, wrong_type.y), Error);
  MoeWeights swapped{data.router, data.w2, data.w1};
  EXPECT_THROW(layer.forward(kCpu, data.x, swapped, {}, data.y), Error);
}

}  // namespace
