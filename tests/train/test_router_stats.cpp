// Router statistics: the running-sums op against sums written here from the routing's outputs
// (softmax recomputed from the logits, kept choices from the dispatch map), the derived
// statistics, the recorder behind a routing observer scope, and the metrics JSON / progress line.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "src/ops/router_sums.h"
#include "src/model/routing_observer.h"
#include "src/core/json.h"
#include "src/model/moe_layer.h"
#include "src/train/metrics.h"
#include "src/train/router_stats.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

MoeLayerConfig small_config(int experts, int k, float capacity_factor) {
  MoeLayerConfig config;
  config.d_model = 8;
  config.moe.expert_d_ff = 6;
  config.moe.num_experts = experts;
  config.moe.top_k = config.moe.k_min = k;
  config.moe.renormalize_gates = k > 1;
  config.moe.capacity_factor = capacity_factor;
  config.moe.eval_capacity_factor = capacity_factor;
  config.moe.segment_alignment = 4;
  config.moe.aux_loss_weight = 0.05f;
  config.moe.z_loss_weight = 0.01f;
  return config;
}

// A CPU layer with random weights that has run one training forward on random tokens.
struct RoutedLayer {
  MoeLayerConfig config;
  MoeLayer layer;
  HostTensor x, router, w1, w2, y;
  MoeLosses losses;

  RoutedLayer(const MoeLayerConfig& config_, int64_t tokens, DType dtype, uint64_t seed)
      : config(config_),
        layer(config_, DeviceKind::cpu, dtype, tokens),
        x(dtype, {tokens, config_.d_model}),
        router(dtype, {config_.d_model, config_.moe.num_experts}),
        w1(dtype, {config_.moe.num_experts, config_.d_model, config_.w1_columns()}),
        w2(dtype, {config_.moe.num_experts, config_.moe.expert_d_ff, config_.d_model}),
        y(dtype, {tokens, config_.d_model}) {
    std::mt19937_64 generator(seed);
    fill_uniform(x, generator, -1, 1);
    fill_normal(router, generator, 0, 1.5);
    fill_normal(w1, generator, 0, 0.5);
    fill_normal(w2, generator, 0, 0.5);
    MoeForwardArgs args;
    args.training = true;
    args.step = seed;
    losses = layer.forward(kCpu, x, MoeWeights{router, w1, w2}, args, y);
  }
};

// What one forward should add, computed from first principles.
std::vector<double> expected_sums(const RoutedLayer& routed) {
  const MoeLayer& layer = routed.layer;
  const Tensor& logits = layer.logits();
  const RoutingResult& routing = layer.routing();
  const DispatchMap& map = layer.dispatch_map();
  const int64_t tokens = logits.dim(0), experts = logits.dim(1), k = routing.expert_ids.dim(1);
  std::vector<double> sums(size_t(kNumRouterSums + experts), 0.0);
  sums[kRouterForwards] = 1;
  sums[kRouterTokens] = double(tokens);
  for (int64_t token = 0; token < tokens; ++token) {
    double largest = -INFINITY, total = 0.0;
    for (int64_t e = 0; e < experts; ++e) largest = std::max(largest, get_element(logits, token * experts + e));
    for (int64_t e = 0; e < experts; ++e) total += std::exp(get_element(logits, token * experts + e) - largest);
    for (int64_t e = 0; e < experts; ++e) {
      const double p = std::exp(get_element(logits, token * experts + e) - largest) / total;
      if (p > 0) sums[kRouterEntropySum] -= p * std::log(p);
    }
    for (int64_t choice = 0; choice < k; ++choice) {
      const int64_t index = token * k + choice;
      const int expert = int(get_element(routing.expert_ids, index));
      if (expert < 0) continue;
      sums[kRouterChoices] += 1;
      sums[size_t(kNumRouterSums + expert)] += 1;
      if (get_element(map.choice_rows, index) >= 0) {
        sums[kRouterKept] += 1;
        sums[kRouterKeptGateSum] += get_element(routing.gates, index);
      } else {
        sums[kRouterDropped] += 1;
      }
    }
  }
  sums[kRouterAuxSum] = routed.losses.aux_loss;
  sums[kRouterZSum] = routed.losses.z_loss;
  return sums;
}

class RouterSumsCpu : public ::testing::TestWithParam<DType> {};

TEST_P(RouterSumsCpu, AddOneForwardToTheAccumulator) {
  const DType dtype = GetParam();
  for (int k : {1, 2}) {
    RoutedLayer routed(small_config(5, k, 0.8f), 37, dtype, 11 + uint64_t(k));  // capacity 0.8: drops
    const std::vector<double> expected = expected_sums(routed);
    ASSERT_GT(expected[kRouterDropped], 0) << "the case must exercise drops";
    // The op adds: start from random values and compare the difference.
    HostTensor accumulator(DType::f64, {kNumRouterSums + 5});
    std::mt19937_64 generator(99);
    fill_uniform(accumulator, generator, -3, 3);
    const std::vector<double> before = to_vector(accumulator);
    cpu::accumulate_router_sums(routed.layer.routing(), routed.layer.logits(), accumulator);
    const std::vector<double> after = to_vector(accumulator);
    const double tolerance = dtype == DType::f64 ? 1e-10 : 2e-4;
    for (size_t index = 0; index < expected.size(); ++index)
      EXPECT_NEAR(after[index] - before[index], expected[index], tolerance * std::max(1.0, std::fabs(expected[index])))
          << "sum " << index << ", k " << k;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RouterSumsCpu, ::testing::Values(DType::f32, DType::f64));

TEST(RouterSumsCpu, RejectsMismatchedShapes) {
  RoutedLayer routed(small_config(4, 1, 2.0f), 9, DType::f32, 3);
  HostTensor wrong(DType::f64, {kNumRouterSums + 3});
  EXPECT_THROW(cpu::accumulate_router_sums(routed.layer.routing(), routed.layer.logits(), wrong), Error);
  HostTensor wrong_type(DType::f32, {kNumRouterSums + 4});
  EXPECT_THROW(cpu::accumulate_router_sums(routed.layer.routing(), routed.layer.logits(), wrong_type), Error);
}

TEST(RouterStats, DeriveFromSums) {
  std::vector<double> sums(kNumRouterSums + 4, 0.0);
  sums[kRouterForwards] = 2;
  sums[kRouterTokens] = 100;
  sums[kRouterChoices] = 200;
  sums[kRouterDropped] = 10;
  sums[kRouterKept] = 190;
  sums[kRouterKeptGateSum] = 95;
  sums[kRouterEntropySum] = 100 * 0.5 * std::log(4.0);
  sums[kRouterAuxSum] = 0.03;
  sums[kRouterZSum] = 0.004;
  const double counts[] = {120, 80, 0, 0};
  for (int expert = 0; expert < 4; ++expert) sums[size_t(kNumRouterSums + expert)] = counts[expert];
  const RouterLayerStats stats = derive_router_stats(3, sums.data(), 4);
  EXPECT_EQ(stats.moe_layer, 3);
  EXPECT_EQ(stats.forwards, 2);
  EXPECT_EQ(stats.tokens, 100);
  EXPECT_EQ(stats.tokens_per_expert, (std::vector<int64_t>{120, 80, 0, 0}));
  EXPECT_DOUBLE_EQ(stats.load_imbalance, 120.0 / 50.0);
  EXPECT_DOUBLE_EQ(stats.experts_used_fraction, 0.5);
  EXPECT_DOUBLE_EQ(stats.dropped_fraction, 0.05);
  EXPECT_DOUBLE_EQ(stats.mean_gate, 0.5);
  EXPECT_NEAR(stats.router_entropy, 0.5 * std::log(4.0), 1e-12);
  EXPECT_NEAR(stats.router_entropy_normalized, 0.5, 1e-12);
  EXPECT_DOUBLE_EQ(stats.aux_loss, 0.015);
  EXPECT_DOUBLE_EQ(stats.z_loss, 0.002);

  const std::vector<double> nothing(kNumRouterSums + 4, 0.0);
  const RouterLayerStats empty = derive_router_stats(0, nothing.data(), 4);
  for (double value : {empty.load_imbalance, empty.experts_used_fraction, empty.dropped_fraction, empty.mean_gate,
                       empty.router_entropy, empty.aux_loss, empty.z_loss})
    EXPECT_EQ(value, 0.0);
}

// Reports a routing to the current observer the way the model does.
void report(const RoutedLayer& routed, int moe_layer, bool training) {
  notify_routing(kCpu, moe_layer, training, routed.layer.routing(), routed.layer.logits());
}

TEST(RouterStatsRecorder, RecordsTrainingForwardsInScopeAndResets) {
  RoutedLayer first(small_config(6, 2, 1.0f), 24, DType::f32, 5), second(small_config(6, 2, 1.0f), 24, DType::f32, 6),
      third(small_config(6, 2, 1.0f), 17, DType::f32, 7);
  RouterStatsRecorder recorder(DeviceKind::cpu, 2, 6);
  report(first, 0, true);  // no scope open: nobody listens
  {
    RoutingObserverScope scope(&recorder);
    EXPECT_EQ(current_routing_observer(), &recorder);
    report(first, 0, true);
    report(second, 0, true);
    report(third, 1, true);
    report(third, 0, false);                      // evaluation forwards are not recorded
    EXPECT_THROW(report(third, 2, true), Error);  // a layer the recorder does not have
  }
  EXPECT_EQ(current_routing_observer(), nullptr);
  report(second, 1, true);  // scope closed
  EXPECT_EQ(recorder.pending_forwards(), 3);

  std::vector<double> layer0 = expected_sums(first), from_second = expected_sums(second);
  for (size_t index = 0; index < layer0.size(); ++index) layer0[index] += from_second[index];
  const std::vector<double> layer1 = expected_sums(third);
  const std::vector<RouterLayerStats> stats = recorder.read_and_reset(kCpu, nullptr);
  ASSERT_EQ(stats.size(), 2u);
  const RouterLayerStats want0 = derive_router_stats(0, layer0.data(), 6),
                         want1 = derive_router_stats(1, layer1.data(), 6);
  EXPECT_EQ(stats[0].forwards, 2);
  EXPECT_EQ(stats[1].forwards, 1);
  EXPECT_EQ(stats[0].tokens_per_expert, want0.tokens_per_expert);
  EXPECT_EQ(stats[1].tokens_per_expert, want1.tokens_per_expert);
  EXPECT_EQ(stats[0].dropped, want0.dropped);
  EXPECT_NEAR(stats[0].router_entropy, want0.router_entropy, 1e-5);
  EXPECT_NEAR(stats[1].mean_gate, want1.mean_gate, 1e-6);
  EXPECT_NEAR(stats[0].load_imbalance, want0.load_imbalance, 1e-12);
  EXPECT_NEAR(stats[1].aux_loss, want1.aux_loss, 1e-7);
  EXPECT_GT(stats[0].router_entropy_normalized, 0.0);
  EXPECT_LE(stats[0].router_entropy_normalized, 1.0);

  const std::vector<RouterLayerStats> again = recorder.read_and_reset(kCpu, nullptr);
  EXPECT_EQ(again[0].forwards, 0);
  EXPECT_EQ(again[1].tokens, 0);
  EXPECT_EQ(recorder.pending_forwards(), 0);
}

TEST(RoutingObserverScope, NestsAndRestores) {
  RouterStatsRecorder outer(DeviceKind::cpu, 1, 4), inner(DeviceKind::cpu, 1, 4);
  RoutedLayer routed(small_config(4, 1, 2.0f), 10, DType::f32, 8);
  {
    RoutingObserverScope outer_scope(&outer);
    {
      RoutingObserverScope inner_scope(&inner);
      report(routed, 0, true);
    }
    report(routed, 0, true);
    report(routed, 0, true);
  }
  EXPECT_EQ(inner.pending_forwards(), 1);
  EXPECT_EQ(outer.pending_forwards(), 2);
}

TEST(RouterStats, DueEveryLogIntervalAndAtTheEnd) {
  EXPECT_FALSE(router_stats_due(1, 10, 95));
  EXPECT_TRUE(router_stats_due(10, 10, 95));
  EXPECT_FALSE(router_stats_due(11, 10, 95));
  EXPECT_TRUE(router_stats_due(95, 10, 95));
}

TEST(RouterStats, MetricsJsonAndProgressLine) {
  StepMetrics metrics;
  metrics.step = 20;
  metrics.total_steps = 40;
  metrics.loss = 2.5;
  metrics.tokens_per_expert = {{3, 4}};
  const std::string plain = metrics_json(metrics);
  EXPECT_EQ(plain.find("\"router\""), std::string::npos);
  EXPECT_EQ(format_progress_line(metrics, DeviceKind::cpu).find("load max/mean"), std::string::npos);

  std::vector<double> sums(kNumRouterSums + 2, 0.0);
  sums[kRouterForwards] = 1;
  sums[kRouterTokens] = 7;
  sums[kRouterChoices] = 7;
  sums[kRouterKept] = 7;
  sums[kRouterKeptGateSum] = 4.2;
  sums[kRouterEntropySum] = 7 * 0.25 * std::log(2.0);
  sums[kNumRouterSums] = 5;
  sums[kNumRouterSums + 1] = 2;
  metrics.router.push_back(derive_router_stats(0, sums.data(), 2));
  const json::Value parsed = json::parse(metrics_json(metrics), "metrics line");
  const json::Value* router = parsed.find("router");
  ASSERT_NE(router, nullptr);
  ASSERT_EQ(router->elements().size(), 1u);
  const json::Value& layer = router->elements()[0];
  EXPECT_NEAR(layer.number_or("load_imbalance", 0), 5.0 / 3.5, 1e-8);  // 9 significant digits
  EXPECT_NEAR(layer.number_or("mean_gate", 0), 0.6, 1e-8);
  EXPECT_NEAR(layer.number_or("entropy_normalized", 0), 0.25, 1e-8);
  EXPECT_EQ(layer.find("tokens_per_expert")->elements().size(), 2u);
  const std::string line = format_progress_line(metrics, DeviceKind::cpu);
  EXPECT_NE(line.find("load max/mean 1.43"), std::string::npos) << line;
  EXPECT_NE(line.find("H 0.25"), std::string::npos) << line;
}

// Hot-expert replication's per-step fields: in the line only when the run replicates.
TEST(RouterStats, ReplicationFieldsInTheMetricsLineAndProgressLine) {
  StepMetrics metrics;
  metrics.step = 3;
  metrics.total_steps = 10;
  metrics.tokens_per_expert = {{3, 4}};
  for (const char* key : {"replicated_experts", "replicated_rows", "ep_max_load_before", "ep_max_load_after"})
    EXPECT_EQ(metrics_json(metrics).find(key), std::string::npos) << key;
  EXPECT_EQ(format_progress_line(metrics, DeviceKind::cpu).find("replicas"), std::string::npos);
  metrics.has_replication = true;
  metrics.replicated_experts = 1.5;
  metrics.replicated_rows = 2100;
  metrics.ep_max_load_before = 9400;
  metrics.ep_max_load_after = 6200;
  const json::Value parsed = json::parse(metrics_json(metrics), "metrics line");
  EXPECT_EQ(parsed.number_or("replicated_experts", 0), 1.5);
  EXPECT_EQ(parsed.number_or("replicated_rows", 0), 2100);
  EXPECT_EQ(parsed.number_or("ep_max_load_before", 0), 9400);
  EXPECT_EQ(parsed.number_or("ep_max_load_after", 0), 6200);
  const std::string line = format_progress_line(metrics, DeviceKind::cpu);
  EXPECT_NE(line.find("replicas 1.5 (2.1k rows), max rank load 9.4k -> 6.2k"), std::string::npos) << line;
}

}  // namespace
