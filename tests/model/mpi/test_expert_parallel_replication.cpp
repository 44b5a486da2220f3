// Hot-expert replication in the expert-parallel layer (parallel.max_replicas_per_rank;
// src/model/moe_ep_layer.h, "Hot-expert replication") on CPU ranks under mpirun -np 2 and -np 4.
// A selection bias makes expert 0 hot (as bench ep --skew does for the first experts), so the plan replicates
// every pass (asserted: the test cannot pass by replicating nothing). Side by side, on the same
// tokens and weights:
//   * the layer with replication (1 and 2 slots per rank) and without: y, grad_x, grad_router and
//     the local experts' weight gradients equal BIT FOR BIT (f64 and f32 activations);
//   * and both against the single-device MoeLayer on the rank's tokens (f64, relative 1e-12; the
//     local gradients against the reference's summed over the group), as the other EP tests do;
//   * the rows each rank's experts computed are the plan's loads after replication (the busiest
//     rank's lower than without), and every rank reports the plan recomputed here from every rank's
//     rows per expert; some replicas take only part of their expert's rows (expert 0 is hotter than
//     the rest together), so owners continue their replicas' weight-gradient sums.
// Three passes on one layer (the replica buffers and the exchange grow, the plan changes); one
// node only (the hierarchical exchange, two_part and a2a_chunks > 1 are refused: checked here).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "src/comm/replication_plan.h"
#include "src/model/moe_ep_layer.h"
#include "src/model/moe_layer.h"
#include "tests/support/comm_test_support.h"
#include "tests/support/expect_close.h"
#include "tests/support/expect_error.h"
#include "tests/support/test_helpers.h"
#include "tests/support/ep_layer_test_config.h"

using namespace switchyard;
using namespace switchyard::comm_test;
using namespace switchyard::testing;

namespace {

constexpr int64_t kModel = 8, kHidden = 6;
constexpr int kExperts = 8;
const ExecContext kCpu{DeviceKind::cpu, nullptr};
constexpr double kExactTolerance = 1e-12;  // f64 against the single-device layer: summation order only

struct ReplicationScenario {
  const char* name;
  int k;
  ExpertActivation activation;
  float capacity_factor;  // 0: dropless
  int alignment;
};

void PrintTo(const ReplicationScenario& scenario, std::ostream* os) { *os << scenario.name; }

const ReplicationScenario kScenarios[] = {
    {"top1_gelu_dropless", 1, ExpertActivation::gelu_tanh, 0.0f, 1},
    {"top2_swiglu_dropless_aligned", 2, ExpertActivation::swiglu, 0.0f, 4},
    {"top1_gelu_capacity", 1, ExpertActivation::gelu_tanh, 4.0f, 2},  // expert 0 drops half its choices
};

MoeLayerConfig make_config(const ReplicationScenario& scenario) {
  return ep_test_layer_config(kModel, kHidden, kExperts, scenario.k, scenario.activation, scenario.capacity_factor,
                              scenario.alignment);
}

int64_t tokens_of(int rank, int pass) {
  const int64_t base[] = {24, 41, 13};
  return base[pass] + 5 * rank;
}
constexpr int kPasses = 3;
constexpr int64_t kMaxTokens = 41 + 5 * 3;

// Every expert's weights (identical on all ranks), a selection bias that makes the low experts hot,
// and one pass's tokens of this rank; in `dtype` (f64 or f32).
struct Problem : EpTestProblem {
  HostTensor bias;
  Problem(const MoeLayerConfig& config, DType dtype, int world_rank, int64_t tokens, uint64_t salt)
      : EpTestProblem(config, dtype, world_rank, tokens, salt, 0.5, 0.6, 0.6), bias(dtype, {kExperts}) {
    // Expert 0 far hotter than the others (most tokens' first choice): a replica of it can take only
    // part of its rows, so its owner continues the replica's sums.
    for (int expert = 0; expert < kExperts; ++expert) set_element(bias, expert, expert == 0 ? 4.0 : 0.0);
  }
};

struct Outcome {
  std::vector<double> y, grad_x, grad_router, grad_w1, grad_w2;
  MoeLosses losses;
};

// One training forward and backward of `layer` (experts [first, first + local) of the problem's),
// outputs poisoned first.
template <typename Layer>
Outcome run_pass(Layer& layer, const MoeLayerConfig& config, DType dtype, Problem& problem, int pass, int first,
                 int local) {
  const int64_t tokens = problem.x.tensor().dim(0);
  MoeWeights weights{problem.router, expert_view(problem.w1, first, local), expert_view(problem.w2, first, local)};
  weights.router_bias = &problem.bias.tensor();
  HostTensor y(dtype, {tokens, kModel}), grad_x(dtype, {tokens, kModel}), grad_router(dtype, {kModel, kExperts});
  HostTensor grad_w1(dtype, {local, kModel, config.w1_columns()}), grad_w2(dtype, {local, kHidden, kModel});
  for (HostTensor* output : {&y, &grad_x, &grad_router, &grad_w1, &grad_w2}) poison(output->tensor());
  MoeForwardArgs args;
  args.training = true;
  args.step = uint64_t(pass);
  Outcome outcome;
  outcome.losses = layer.forward(kCpu, problem.x, weights, args, y);
  MoeGradients gradients{grad_router, grad_w1, grad_w2};
  layer.backward(kCpu, problem.grad_y, weights, 1.0f, 1.0f, grad_x, gradients);
  outcome.y = to_vector(y);
  outcome.grad_x = to_vector(grad_x);
  outcome.grad_router = to_vector(grad_router);
  outcome.grad_w1 = to_vector(grad_w1);
  outcome.grad_w2 = to_vector(grad_w2);
  return outcome;
}

// Bit for bit: the same count of values, each with the same bits (NaN poison never equals).
void expect_bitwise(const std::string& what, const std::vector<double>& actual, const std::vector<double>& expected) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  int64_t differing = 0;
  size_t first = 0;
  for (size_t index = 0; index < actual.size(); ++index)
    if (std::memcmp(&actual[index], &expected[index], sizeof(double)) != 0 && differing++ == 0) first = index;
  EXPECT_EQ(differing, 0) << what << ": " << differing << " of " << actual.size() << " values differ, the first at "
                          << first << ": " << actual[first] << " vs " << expected[first];
}

std::vector<double> local_sum(Communicator& ep, std::vector<double> full, int first, int local) {
  ep.all_reduce_sum(full.data(), int64_t(full.size()), DType::f64);
  const int64_t matrix = int64_t(full.size()) / kExperts;
  return std::vector<double>(full.begin() + first * matrix, full.begin() + (first + local) * matrix);
}

// The plan every rank should have made: from every rank's rows per expert (the layer's
// sent_rows_per_expert), all-gathered here.
ReplicationPlan expected_plan(Communicator& ep, const std::vector<int64_t>& sent, int slots) {
  std::vector<double> mine(sent.begin(), sent.end()), all(sent.size() * size_t(ep.size()));
  ep.all_gather(mine.data(), all.data(), int64_t(mine.size()), DType::f64);
  std::vector<std::vector<int64_t>> loads(size_t(ep.size()));
  for (int source = 0; source < ep.size(); ++source)
    for (size_t expert = 0; expert < sent.size(); ++expert)
      loads[size_t(source)].push_back(int64_t(all[size_t(source) * sent.size() + expert]));
  ReplicationOptions options;
  options.max_replicas_per_rank = slots;
  return plan_replication(loads, options);
}

// Replicas that took only part of their expert's rows: the owner continues their sums.
int split_replicas(const ReplicationPlan& plan, Communicator& ep, const std::vector<int64_t>& sent) {
  std::vector<double> total(sent.begin(), sent.end());
  ep.all_reduce_sum(total.data(), int64_t(total.size()), DType::f64);
  int split = 0;
  for (const ExpertReplica& replica : plan.replicas) split += double(replica.rows) < total[size_t(replica.expert)];
  return split;
}

// The largest of `value` over the group, and whether every rank has the same one.
std::pair<double, bool> group_max(Communicator& ep, double value) {
  std::vector<double> all(size_t(ep.size()), 0.0);
  all[size_t(ep.rank())] = value;
  ep.all_reduce_sum(all.data(), int64_t(all.size()), DType::f64);
  const auto [low, high] = std::minmax_element(all.begin(), all.end());
  return {*high, *low == *high};
}

class ExpertParallelReplication : public ::testing::TestWithParam<ReplicationScenario> {};

TEST_P(ExpertParallelReplication, ReplicasChangeNothingButWhereRowsAreComputed) {
  const ReplicationScenario& scenario = GetParam();
  const MoeLayerConfig config = make_config(scenario);
  const ProcessContext& process = bootstrap_process(DeviceKind::cpu);
  uint64_t salt = 1;
  for (DType dtype : {DType::f64, DType::f32}) {
    for (int ep_size : ep_sizes_to_test(process.world_size)) {
      if (ep_size == 1) continue;  // nothing to replicate onto (covered below)
      for (int slots : {1, 2}) {
        SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << ", ep_size " << ep_size << ", " << slots
                                          << " slot(s), seed " << shared_seed());
        ParallelGroups& groups = groups_for(DeviceKind::cpu, ep_size);
        Communicator& ep = *groups.expert_parallel;
        EpLayerOptions plain_options = layer_options(groups), replicated_options = layer_options(groups);
        replicated_options.max_replicas_per_rank = slots;
        MoeEpLayer plain(config, groups.expert_parallel, DeviceKind::cpu, dtype, kMaxTokens, plain_options);
        MoeEpLayer replicated(config, groups.expert_parallel, DeviceKind::cpu, dtype, kMaxTokens, replicated_options);
        ASSERT_TRUE(replicated.replicates());
        ASSERT_FALSE(plain.replicates());
        const int first = replicated.first_expert(), local = replicated.local_experts();
        ASSERT_EQ(first, plain.first_expert());
        ASSERT_EQ(local, kExperts / ep_size);
        int split = 0;  // over the passes: replicas whose owner kept rows (the sums cross ranks)
        int64_t dropped = 0;
        for (int pass = 0; pass < kPasses; ++pass) {
          SCOPED_TRACE(::testing::Message() << "pass " << pass);
          const int64_t tokens = tokens_of(process.world_rank, pass);
          Problem problem(config, dtype, process.world_rank, tokens, salt++);
          const Outcome with = run_pass(replicated, config, dtype, problem, pass, first, local);
          const Outcome without = run_pass(plain, config, dtype, problem, pass, first, local);

          // The plan replicated something, the same on every rank, and lowered the busiest load.
          const ReplicationStats stats = replicated.replication_stats();
          EXPECT_GT(stats.replicas, 0);
          EXPECT_GT(stats.moved_rows, 0);
          EXPECT_LT(stats.max_load_after, stats.max_load_before);
          EXPECT_TRUE(group_max(ep, double(stats.replicas)).second) << "ranks disagree on the plan";
          EXPECT_TRUE(group_max(ep, double(stats.moved_rows)).second) << "ranks disagree on the plan";
          const ReplicationPlan plan = expected_plan(ep, plain.sent_rows_per_expert(), slots);
          EXPECT_EQ(stats.replicas, int64_t(plan.replicas.size()));
          EXPECT_EQ(stats.moved_rows, plan.moved_rows());
          EXPECT_EQ(stats.max_load_before, plan.max_load_before());
          EXPECT_EQ(stats.max_load_after, plan.max_load_after());
          split += split_replicas(plan, ep, plain.sent_rows_per_expert());
          dropped += replicated.read_routing_stats(kCpu).dropped_choices;
          // The rows each rank's experts (and slots) received: the plan's loads.
          const auto [max_with, unused_with] = group_max(ep, double(replicated.exchange_stats().received_rows));
          const auto [max_without, unused_without] = group_max(ep, double(plain.exchange_stats().received_rows));
          EXPECT_EQ(max_with, double(stats.max_load_after));
          EXPECT_EQ(max_without, double(stats.max_load_before));
          EXPECT_EQ(replicated.sent_rows_per_expert(), plain.sent_rows_per_expert());

          expect_bitwise("y", with.y, without.y);
          expect_bitwise("grad_x", with.grad_x, without.grad_x);
          expect_bitwise("grad_router", with.grad_router, without.grad_router);
          expect_bitwise("grad_w1", with.grad_w1, without.grad_w1);
          expect_bitwise("grad_w2", with.grad_w2, without.grad_w2);
          EXPECT_EQ(with.losses.aux_loss, without.losses.aux_loss);
          EXPECT_EQ(with.losses.z_loss, without.losses.z_loss);

          if (dtype == DType::f64) {  // and both are the single-device layer's
            MoeLayer single(config, DeviceKind::cpu, DType::f64, tokens);
            const Outcome reference = run_pass(single, config, dtype, problem, pass, 0, kExperts);
            expect_close("y", with.y, reference.y, kExactTolerance);
            expect_close("grad_x", with.grad_x, reference.grad_x, kExactTolerance);
            expect_close("grad_router", with.grad_router, reference.grad_router, kExactTolerance);
            expect_close("grad_w1", with.grad_w1, local_sum(ep, reference.grad_w1, first, local), kExactTolerance);
            expect_close("grad_w2", with.grad_w2, local_sum(ep, reference.grad_w2, first, local), kExactTolerance);
          }
        }
        EXPECT_GT(split, 0) << "no replica shared its expert's rows with the owner: the chained sums went untested";
        if (!config.moe.dropless) EXPECT_GT(dropped, 0) << "the capacity scenario dropped nothing";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Scenarios, ExpertParallelReplication, ::testing::ValuesIn(kScenarios),
                         [](const ::testing::TestParamInfo<ReplicationScenario>& info) {
                           return std::string(info.param.name);
                         });

// One rank holds every expert: nothing to replicate onto, the option is off.
TEST(ExpertParallelReplicationLimits, OneRankDoesNotReplicate) {
  ParallelGroups& groups = groups_for(DeviceKind::cpu, 1);
  EpLayerOptions options = layer_options(groups);
  options.max_replicas_per_rank = 2;
  MoeEpLayer layer(make_config(kScenarios[0]), groups.expert_parallel, DeviceKind::cpu, DType::f64, 8, options);
  EXPECT_FALSE(layer.replicates());
  EXPECT_EQ(layer.local_experts(), kExperts);
}

// What replication does not support yet is bad input naming the keys (every rank throws before
// any collective of the layer).
TEST(ExpertParallelReplicationLimits, UnsupportedCombinationsAreBadInput) {
  const ProcessContext& process = bootstrap_process(DeviceKind::cpu);
  const MoeLayerConfig config = make_config(kScenarios[0]);
  ParallelGroups& groups = groups_for(DeviceKind::cpu, process.world_size);
  EpLayerOptions two_part = layer_options(groups, 1, EpTransport::automatic, EpDispatch::activation,
                                          EpOverlap::two_part);
  two_part.max_replicas_per_rank = 1;
  expect_bad_input([&] { MoeEpLayer(config, groups.expert_parallel, DeviceKind::cpu, DType::f64, 8, two_part); },
                   {"parallel.max_replicas_per_rank", "parallel.ep_overlap"});
  EpLayerOptions chunked = layer_options(groups, 2);
  chunked.max_replicas_per_rank = 1;
  expect_bad_input([&] { MoeEpLayer(config, groups.expert_parallel, DeviceKind::cpu, DType::f64, 8, chunked); },
                   {"parallel.max_replicas_per_rank", "parallel.a2a_chunks"});
  ParallelGroups& nodes = groups_for(DeviceKind::cpu, process.world_size, 1);  // emulated nodes of one rank
  EpLayerOptions hierarchical = layer_options(nodes);
  hierarchical.max_replicas_per_rank = 1;
  expect_bad_input([&] { MoeEpLayer(config, nodes.expert_parallel, DeviceKind::cpu, DType::f64, 8, hierarchical); },
                   {"parallel.max_replicas_per_rank", "one-level exchange"});
}

}  // namespace
