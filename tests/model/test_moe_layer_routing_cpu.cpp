// The MoE layer with the modern routing options (src/ops/moe_ops.h, "The modern options") on CPU:
// gradients of the whole layer against float64 central finite differences for sigmoid gates, the
// selection bias, group-limited routing, probability drops, the routed scaling factor, the
// sequence-level and global-batch losses and expert choice (sparse and dense mode); the
// global-batch loss's running sum over micro-batches and its reducer over ranks; and the layer's
// checks of the router bias. (test_moe_layer_cpu.cpp has the Switch router's cases.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "src/model/moe_layer.h"
#include "tests/support/expect_error.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};
constexpr int kExperts = 4;
constexpr int64_t kTokens = 12, kSequence = 5;  // sequences of 5, 5 and 2 tokens

struct RoutingCase {
  const char* name;
  RoutingMethod method;
  ScoreFunction score;
  bool bias;
  int groups, topk_groups;
  DropPolicy drop;
  int k;
  bool renormalize;
  float capacity_factor;  // < 1: drops (token choice)
  float scaling;
  float seq_weight, global_weight;
  float jitter;
  ExpertActivation activation;
  ExpertComputeMode mode;
};

void PrintTo(const RoutingCase& c, std::ostream* os) { *os << c.name; }

MoeLayerConfig make_config(const RoutingCase& c) {
  MoeLayerConfig config;
  config.d_model = 6;
  config.tokens_per_sequence = kSequence;
  MoeConfig& moe = config.moe;
  moe.expert_d_ff = 5;
  moe.num_experts = kExperts;
  moe.top_k = moe.k_min = c.k;
  moe.renormalize_gates = c.renormalize;
  moe.capacity_factor = c.capacity_factor;
  moe.eval_capacity_factor = 4.0;
  moe.segment_alignment = 4;
  moe.aux_loss_weight = 0.05;  // large enough that every loss term shows in the gradients
  moe.z_loss_weight = 0.01;
  moe.activation = c.activation;
  moe.jitter_eps = c.jitter;
  moe.compute_mode = c.mode;
  moe.routing = c.method;
  moe.score_function = c.score;
  moe.num_groups = c.groups;
  moe.topk_groups = c.topk_groups;
  moe.drop_policy = c.drop;
  moe.routed_scaling_factor = c.scaling;
  moe.seq_aux_loss_weight = c.seq_weight;
  moe.global_aux_loss_weight = c.global_weight;
  config.jitter_seed = 1234;
  config.jitter_stream = 7;
  return config;
}

struct LayerData {
  HostTensor x, router, w1, w2, bias, y, probe, grad_x, grad_router, grad_w1, grad_w2;
  bool has_bias;

  LayerData(const MoeLayerConfig& config, int64_t tokens, uint64_t seed, bool with_bias)
      : x(DType::f64, {tokens, config.d_model}),
        router(DType::f64, {config.d_model, kExperts}),
        w1(DType::f64, {kExperts, config.d_model, config.w1_columns()}),
        w2(DType::f64, {kExperts, config.moe.expert_d_ff, config.d_model}),
        bias(DType::f64, {kExperts}),
        y(DType::f64, {tokens, config.d_model}),
        probe(DType::f64, {tokens, config.d_model}),
        grad_x(DType::f64, {tokens, config.d_model}),
        grad_router(DType::f64, {config.d_model, kExperts}),
        grad_w1(DType::f64, {kExperts, config.d_model, config.w1_columns()}),
        grad_w2(DType::f64, {kExperts, config.moe.expert_d_ff, config.d_model}),
        has_bias(with_bias) {
    std::mt19937_64 generator(seed);
    fill_uniform(x, generator, -1, 1);
    fill_normal(router, generator, 0, 1);
    fill_normal(w1, generator, 0, 0.6);
    fill_normal(w2, generator, 0, 0.6);
    fill_uniform(probe, generator, -1, 1);
    fill_uniform(bias, generator, -0.3, 0.3);  // large enough to move choices
  }
  MoeWeights weights() {
    MoeWeights weights{router, w1, w2};
    if (has_bias) weights.router_bias = &bias.tensor();
    return weights;
  }
  MoeGradients gradients() { return {grad_router, grad_w1, grad_w2}; }
};

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Smallest gap between two numbers whose order decides something, in descending order of `values`
// (consecutive gaps among the first `count` + 1 of them; all of them when count < 0).
double descending_gaps(std::vector<double> values, int count) {
  std::sort(values.rbegin(), values.rend());
  const int last = count < 0 ? int(values.size()) - 1 : std::min(count, int(values.size()) - 1);
  double margin = INFINITY;
  for (int i = 0; i < last; ++i) margin = std::min(margin, values[size_t(i)] - values[size_t(i + 1)]);
  return margin;
}

// How far the routing of these logits is from any decision flipping (src/ops/moe_ops.h): the
// selection keys (score + bias) at the top-k boundary among the allowed experts, the group scores
// at the topk_groups boundary, and the priority scores that rank choices competing for one expert
// (probability drops) or tokens competing for one expert and experts for one token (expert choice).
double routing_margin(const Tensor& logits, const std::vector<double>& bias, const RoutingParams& params) {
  const int64_t tokens = logits.dim(0);
  const int experts = params.num_experts, group_size = experts / params.num_groups;
  const bool sigmoid_scores = params.score_function == ScoreFunction::sigmoid;
  double margin = INFINITY;
  std::vector<std::vector<double>> expert_priorities(static_cast<size_t>(experts));  // competing for an expert
  for (int64_t t = 0; t < tokens; ++t) {
    const size_t count = static_cast<size_t>(experts);
    std::vector<double> z(count), key(count), priority(count);
    double max_z = -INFINITY, denominator = 0;
    for (int e = 0; e < experts; ++e) max_z = std::max(max_z, z[size_t(e)] = get_element(logits, t * experts + e));
    for (int e = 0; e < experts; ++e) denominator += std::exp(z[size_t(e)] - max_z);
    for (int e = 0; e < experts; ++e) {
      const double score = sigmoid_scores ? sigmoid(z[size_t(e)]) : z[size_t(e)];
      key[size_t(e)] = score + (bias.empty() ? 0.0 : bias[size_t(e)]);
      priority[size_t(e)] = sigmoid_scores ? score : std::exp(z[size_t(e)] - max_z) / denominator;
    }
    if (params.method == RoutingMethod::expert_choice) {
      margin = std::min(margin, descending_gaps(priority, -1));
      for (int e = 0; e < experts; ++e) expert_priorities[size_t(e)].push_back(priority[size_t(e)]);
      continue;
    }
    std::vector<int> allowed;
    if (params.num_groups > 1 && params.topk_groups < params.num_groups) {
      const double max_key = *std::max_element(key.begin(), key.end());
      std::vector<std::pair<double, int>> groups;
      for (int g = 0; g < params.num_groups; ++g) {
        std::vector<double> members(key.begin() + g * group_size, key.begin() + (g + 1) * group_size);
        std::sort(members.rbegin(), members.rend());
        double group_score = 0;
        for (int i = 0; i < std::min(2, group_size); ++i)
          group_score += sigmoid_scores ? members[size_t(i)] : std::exp(members[size_t(i)] - max_key);
        groups.emplace_back(group_score, g);
      }
      std::sort(groups.rbegin(), groups.rend());
      margin = std::min(margin, groups[size_t(params.topk_groups - 1)].first - groups[size_t(params.topk_groups)].first);
      for (int g = 0; g < params.topk_groups; ++g)
        for (int e = 0; e < group_size; ++e) allowed.push_back(groups[size_t(g)].second * group_size + e);
    } else {
      for (int e = 0; e < experts; ++e) allowed.push_back(e);
    }
    std::vector<std::pair<double, int>> ranked;
    for (int e : allowed) ranked.emplace_back(key[size_t(e)], e);
    std::sort(ranked.rbegin(), ranked.rend());
    std::vector<double> allowed_keys;
    for (const auto& entry : ranked) allowed_keys.push_back(entry.first);
    margin = std::min(margin, descending_gaps(allowed_keys, params.k_max));
    for (int j = 0; j < params.k_max; ++j)
      expert_priorities[size_t(ranked[size_t(j)].second)].push_back(priority[size_t(ranked[size_t(j)].second)]);
  }
  const bool ranked_by_score =
      params.method == RoutingMethod::expert_choice || params.drop_policy == DropPolicy::probability;
  if (ranked_by_score)
    for (const std::vector<double>& competing : expert_priorities) margin = std::min(margin, descending_gaps(competing, -1));
  return margin;
}

double layer_loss(MoeLayer& layer, LayerData& data, const MoeForwardArgs& args) {
  const MoeLosses losses = layer.forward(kCpu, data.x, data.weights(), args, data.y);
  return dot(data.y, data.probe) + losses.aux_loss + losses.z_loss + losses.seq_aux_loss + losses.global_aux_loss;
}

class RoutingOptionGradients : public ::testing::TestWithParam<RoutingCase> {};

TEST_P(RoutingOptionGradients, MatchFiniteDifferences) {
  const RoutingCase& c = GetParam();
  const MoeLayerConfig config = make_config(c);
  const MoeForwardArgs args{/*training=*/true, /*step=*/3, nullptr, true};
  MoeLayer layer(config, DeviceKind::cpu, DType::f64, 16);
  const RoutingParams params = config.routing_params(kTokens, true);

  // Inputs whose routing decisions are all at least 1e-4 from flipping (the perturbation moves
  // logits by ~1e-6), so the finite differences see one smooth piece of the function.
  std::unique_ptr<LayerData> data;
  for (uint64_t seed = 100;; ++seed) {
    data = std::make_unique<LayerData>(config, kTokens, seed, c.bias);
    layer.forward(kCpu, data->x, data->weights(), args, data->y);
    if (routing_margin(layer.logits(), c.bias ? to_vector(data->bias) : std::vector<double>{}, params) > 1e-4) break;
    ASSERT_LT(seed, 300u) << "no well-separated inputs found";
  }
  const MoeLosses losses = layer.read_losses(kCpu);
  const MoeRoutingStats stats = layer.read_routing_stats(kCpu);
  // The case exercises what it names.
  if (c.seq_weight > 0) EXPECT_GT(losses.seq_aux_loss, 0.0);
  else EXPECT_EQ(losses.seq_aux_loss, 0.0);
  if (c.global_weight > 0) EXPECT_GT(losses.global_aux_loss, 0.0);
  else EXPECT_EQ(losses.global_aux_loss, 0.0);
  if (c.method == RoutingMethod::token_choice && c.capacity_factor < 1.0f) EXPECT_GT(stats.dropped_choices, 0);
  if (c.groups > 1 && c.topk_groups < c.groups) {
    const int group_size = kExperts / c.groups;
    for (int64_t t = 0; t < kTokens; ++t) {
      std::vector<int> used;
      for (int j = 0; j < c.k; ++j) {
        const int expert = int(get_element(layer.routing().expert_ids, t * c.k + j));
        if (expert >= 0 && std::find(used.begin(), used.end(), expert / group_size) == used.end())
          used.push_back(expert / group_size);
      }
      EXPECT_LE(int(used.size()), c.topk_groups) << "token " << t << " left its groups";
    }
  }

  layer.forward(kCpu, data->x, data->weights(), args, data->y);
  for (HostTensor* tensor : {&data->grad_x, &data->grad_router, &data->grad_w1, &data->grad_w2}) poison(*tensor);
  MoeGradients gradients = data->gradients();
  layer.backward(kCpu, data->probe, data->weights(), 1.0f, 1.0f, data->grad_x, gradients);
  auto loss = [&] { return layer_loss(layer, *data, args); };
  struct Check {
    const char* name;
    HostTensor& parameter;
    HostTensor& analytic;
  } checks[] = {{"x", data->x, data->grad_x},
                {"router", data->router, data->grad_router},
                {"w1", data->w1, data->grad_w1},
                {"w2", data->w2, data->grad_w2}};
  for (Check& check : checks) {
    const std::vector<double> numeric = central_difference_gradient(loss, check.parameter, 1e-6);
    EXPECT_LE(relative_error(to_vector(check.analytic), numeric), 1e-6) << check.name;
    double norm = 0;
    for (double value : numeric) norm += value * value;
    EXPECT_GT(norm, 1e-8) << check.name << ": vacuous check";
  }
  // The perturbations moved no decision.
  const MoeRoutingStats after = layer.read_routing_stats(kCpu);
  EXPECT_EQ(after.dropped_choices, stats.dropped_choices);
  EXPECT_EQ(after.total_choices, stats.total_choices);
}

using RM = RoutingMethod;
using SF = ScoreFunction;
using DP = DropPolicy;
constexpr auto kGelu = ExpertActivation::gelu_tanh;
constexpr auto kSwiglu = ExpertActivation::swiglu;
constexpr auto kSparse = ExpertComputeMode::sparse;
constexpr auto kDense = ExpertComputeMode::dense;

INSTANTIATE_TEST_SUITE_P(
    Cases, RoutingOptionGradients,
    ::testing::Values(
        //          name                             method  score     bias  G  TG  drop  k  renorm cf    scale seq    global jitter act      mode
        RoutingCase{"sigmoid_k2_renorm", RM::token_choice, SF::sigmoid, false, 1, 1, DP::position, 2, true, 4.0f, 1.0f,
                    0, 0, 0, kGelu, kSparse},
        RoutingCase{"sigmoid_k1_scaled", RM::token_choice, SF::sigmoid, false, 1, 1, DP::position, 1, false, 4.0f, 2.5f,
                    0, 0, 0, kSwiglu, kSparse},
        RoutingCase{"sigmoid_k2_bias_groups_scaled", RM::token_choice, SF::sigmoid, true, 2, 1, DP::position, 2, true,
                    4.0f, 2.5f, 0, 0, 0, kGelu, kSparse},
        RoutingCase{"softmax_k2_bias_drops", RM::token_choice, SF::softmax, true, 1, 1, DP::position, 2, true, 0.5f,
                    1.0f, 0, 0, 0, kSwiglu, kSparse},
        RoutingCase{"softmax_k2_groups_probability_drops", RM::token_choice, SF::softmax, false, 2, 1, DP::probability,
                    2, true, 0.5f, 1.0f, 0, 0, 0, kGelu, kSparse},
        RoutingCase{"sigmoid_k1_probability_drops", RM::token_choice, SF::sigmoid, false, 1, 1, DP::probability, 1,
                    false, 0.5f, 1.0f, 0, 0, 0, kSwiglu, kSparse},
        RoutingCase{"softmax_k2_seq_loss", RM::token_choice, SF::softmax, false, 1, 1, DP::position, 2, true, 4.0f,
                    1.0f, 0.1f, 0, 0, kGelu, kSparse},
        RoutingCase{"sigmoid_k2_seq_loss_drops", RM::token_choice, SF::sigmoid, false, 1, 1, DP::position, 2, true,
                    0.75f, 1.0f, 0.1f, 0, 0, kSwiglu, kSparse},
        RoutingCase{"softmax_k2_global_loss", RM::token_choice, SF::softmax, false, 1, 1, DP::position, 2, true, 4.0f,
                    1.0f, 0, 0.1f, 0, kGelu, kSparse},
        RoutingCase{"sigmoid_all_losses_bias_groups_jitter", RM::token_choice, SF::sigmoid, true, 2, 1,
                    DP::probability, 2, true, 0.75f, 2.0f, 0.1f, 0.1f, 0.1f, kSwiglu, kSparse},
        RoutingCase{"sigmoid_bias_seq_global_dense", RM::token_choice, SF::sigmoid, true, 1, 1, DP::position, 2, true,
                    0.75f, 1.5f, 0.1f, 0.1f, 0, kGelu, kDense},
        RoutingCase{"expert_choice_softmax_k2", RM::expert_choice, SF::softmax, false, 1, 1, DP::position, 2, true,
                    1.0f, 1.0f, 0, 0, 0, kGelu, kSparse},
        RoutingCase{"expert_choice_sigmoid_k2_global", RM::expert_choice, SF::sigmoid, false, 1, 1, DP::position, 2,
                    false, 0.75f, 2.0f, 0, 0.1f, 0, kSwiglu, kSparse},
        RoutingCase{"expert_choice_softmax_k1_dense", RM::expert_choice, SF::softmax, false, 1, 1, DP::position, 1,
                    false, 1.5f, 1.0f, 0, 0, 0, kGelu, kDense}),
    [](const ::testing::TestParamInfo<RoutingCase>& info) { return std::string(info.param.name); });

// ---- The global-batch loss's running sum and reducer -------------------------------------------

const RoutingCase kGlobalCase{"global", RM::token_choice, SF::softmax, false, 1, 1, DP::position, 2, true, 4.0f, 1.0f,
                              0, 0.1f, 0, kGelu, kSparse};

std::vector<double> counts_of(const MoeLayer& layer) { return to_vector(layer.routing().expert_counts); }

// w E sum_e F_e P_e with F = loads / sum(loads) and P = prob_sums / T (src/ops/moe_ops.h); w as the
// routing parameters hold it (fp32).
double expected_global_loss(const MoeLayer& layer, const std::vector<double>& loads, float weight, int64_t tokens) {
  const std::vector<double> prob_sums = to_vector(layer.routing().prob_sums);
  double total = 0, product = 0;
  for (double load : loads) total += load;
  for (size_t e = 0; e < loads.size(); ++e) product += loads[e] / total * prob_sums[e] / double(tokens);
  return double(weight) * double(loads.size()) * product;
}

TEST(GlobalBatchLoss, RunsOverTheStepsMicroBatchesSummedByTheReducer) {
  const MoeLayerConfig config = make_config(kGlobalCase);
  MoeLayer layer(config, DeviceKind::cpu, DType::f64, kTokens);
  LayerData first(config, kTokens, 1, false), second(config, kTokens, 2, false);
  HostTensor running(DType::f64, {kExperts});
  for (int64_t e = 0; e < kExperts; ++e) set_element(running.tensor(), e, 0.0);
  // Three ranks with the same tokens: the reducer triples every load.
  int reductions = 0;
  const LoadReducer reducer = [&](const ExecContext&, Tensor& loads) {
    ++reductions;
    for (int64_t e = 0; e < loads.numel(); ++e) set_element(loads, e, 3.0 * get_element(loads, e));
  };
  MoeForwardArgs args{true, 0, nullptr, true};
  args.load_reducer = &reducer;
  args.global_loads = &running.tensor();

  const double first_loss = layer.forward(kCpu, first.x, first.weights(), args, first.y).global_aux_loss;
  std::vector<double> sum = counts_of(layer);
  for (double& value : sum) value *= 3.0;
  EXPECT_EQ(reductions, 1);
  EXPECT_EQ(to_vector(running), sum);
  EXPECT_NEAR(first_loss, expected_global_loss(layer, sum, 0.1f, kTokens), 1e-12);

  const double second_loss = layer.forward(kCpu, second.x, second.weights(), args, second.y).global_aux_loss;
  const std::vector<double> counts = counts_of(layer);
  for (size_t e = 0; e < sum.size(); ++e) sum[e] += 3.0 * counts[e];
  EXPECT_EQ(reductions, 2);
  EXPECT_EQ(to_vector(running), sum) << "the running sum covers both micro-batches";
  EXPECT_NEAR(second_loss, expected_global_loss(layer, sum, 0.1f, kTokens), 1e-12);

  // Without a running sum or reducer (and in evaluation, which never reduces): this batch alone.
  MoeForwardArgs alone{true, 0, nullptr, true};
  const double alone_loss = layer.forward(kCpu, second.x, second.weights(), alone, second.y).global_aux_loss;
  EXPECT_NEAR(alone_loss, expected_global_loss(layer, counts_of(layer), 0.1f, kTokens), 1e-12);
  MoeForwardArgs evaluation = args;
  evaluation.training = false;
  layer.forward(kCpu, second.x, second.weights(), evaluation, second.y);
  EXPECT_EQ(reductions, 2) << "evaluation forwards do not reduce";
  EXPECT_EQ(to_vector(running), sum) << "nor add to the running sum";
}

TEST(GlobalBatchLoss, IsZeroAndUntouchedWithoutItsWeight) {
  RoutingCase c = kGlobalCase;
  c.global_weight = 0;
  const MoeLayerConfig config = make_config(c);
  MoeLayer layer(config, DeviceKind::cpu, DType::f64, kTokens);
  LayerData data(config, kTokens, 3, false);
  int reductions = 0;
  const LoadReducer reducer = [&](const ExecContext&, Tensor&) { ++reductions; };
  HostTensor running(DType::f64, {kExperts});
  for (int64_t e = 0; e < kExperts; ++e) set_element(running.tensor(), e, 7.0);
  MoeForwardArgs args{true, 0, nullptr, true};
  args.load_reducer = &reducer;
  args.global_loads = &running.tensor();
  EXPECT_EQ(layer.forward(kCpu, data.x, data.weights(), args, data.y).global_aux_loss, 0.0);
  EXPECT_EQ(reductions, 0);
  EXPECT_EQ(to_vector(running), std::vector<double>(kExperts, 7.0));
}

// ---- The router bias at the layer ---------------------------------------------------------------

TEST(RouterBias, LayerChecksItsPresenceShapeAndMethod) {
  RoutingCase c = kGlobalCase;
  c.global_weight = 0;
  MoeLayerConfig config = make_config(c);
  config.moe.bias_update_rate = 0.01;
  MoeLayer layer(config, DeviceKind::cpu, DType::f64, kTokens);
  LayerData data(config, kTokens, 4, false);
  expect_bad_input([&] { layer.forward(kCpu, data.x, data.weights(), {true, 0, nullptr, true}, data.y); },
                   {"moe.bias_update_rate", "router bias", "null"});
  HostTensor short_bias(DType::f64, {kExperts - 1});
  MoeWeights weights = data.weights();
  weights.router_bias = &short_bias.tensor();
  EXPECT_THROW(layer.forward(kCpu, data.x, weights, {true, 0, nullptr, true}, data.y), Error);
  HostTensor int_bias(DType::i32, {kExperts});
  weights.router_bias = &int_bias.tensor();
  EXPECT_THROW(layer.forward(kCpu, data.x, weights, {true, 0, nullptr, true}, data.y), Error);

  RoutingCase ec = c;
  ec.method = RM::expert_choice;
  MoeLayer expert_choice(make_config(ec), DeviceKind::cpu, DType::f64, kTokens);
  LayerData biased(make_config(ec), kTokens, 4, true);
  expect_bad_input([&] { expert_choice.forward(kCpu, biased.x, biased.weights(), {true, 0, nullptr, true}, biased.y); },
                   "expert-choice routing takes none");
}

TEST(RouterBias, ZeroBiasRoutesLikeNoBias) {
  // With softmax, keys z + 0 order as z: the same routing and outputs bit for bit.
  RoutingCase c = kGlobalCase;
  c.global_weight = 0;
  const MoeLayerConfig config = make_config(c);
  MoeLayer plain(config, DeviceKind::cpu, DType::f64, kTokens), biased(config, DeviceKind::cpu, DType::f64, kTokens);
  LayerData a(config, kTokens, 5, false), b(config, kTokens, 5, true);
  for (int64_t e = 0; e < kExperts; ++e) set_element(b.bias.tensor(), e, 0.0);
  plain.forward(kCpu, a.x, a.weights(), {true, 0, nullptr, true}, a.y);
  biased.forward(kCpu, b.x, b.weights(), {true, 0, nullptr, true}, b.y);
  EXPECT_EQ(to_vector(a.y), to_vector(b.y));
  EXPECT_EQ(to_vector(plain.routing().expert_ids), to_vector(biased.routing().expert_ids));
}

TEST(RouterBias, MovesTheChoicesButNotTheGates) {
  // A bias far above the others sends every token's first choice to expert 2; with top-1 and no
  // renormalization the gate is still that expert's unbiased softmax probability.
  RoutingCase c = kGlobalCase;
  c.global_weight = 0;
  c.k = 1;
  c.renormalize = false;
  const MoeLayerConfig config = make_config(c);
  MoeLayer layer(config, DeviceKind::cpu, DType::f64, kTokens);
  LayerData data(config, kTokens, 6, true);
  for (int64_t e = 0; e < kExperts; ++e) set_element(data.bias.tensor(), e, e == 2 ? 100.0 : 0.0);
  layer.forward(kCpu, data.x, data.weights(), {false, 0, nullptr, true}, data.y);
  const Tensor& logits = layer.logits();
  for (int64_t t = 0; t < kTokens; ++t) {
    EXPECT_EQ(get_element(layer.routing().expert_ids, t), 2.0);
    double max_z = -INFINITY, sum = 0;
    for (int e = 0; e < kExperts; ++e) max_z = std::max(max_z, get_element(logits, t * kExperts + e));
    for (int e = 0; e < kExperts; ++e) sum += std::exp(get_element(logits, t * kExperts + e) - max_z);
    EXPECT_NEAR(get_element(layer.routing().gates, t), std::exp(get_element(logits, t * kExperts + 2) - max_z) / sum,
                1e-12);
  }
}

}  // namespace
