// Expert parallelism with the modern routing options (src/ops/moe_ops.h, "The modern options"),
// run under mpirun -np 2 and -np 4 on CPU ranks: for ep_size 1, 2 and the world size, the
// expert-parallel layer (src/model/moe_ep_layer.h) on each rank's own tokens equals the
// single-device MoeLayer holding every expert on those tokens -- y, grad_x, grad_router, all four
// losses, drop counts, and the local experts' gradients equal to the reference's summed over the
// EP group -- for sigmoid scores with a router bias, groups (also num_groups = ep_size, one group
// per rank: device-limited routing), probability drops, the sequence-level loss, the global-batch
// loss (whose reducer sums the loads over every rank, in both layers) and expert choice.
// f64, relative error <= 1e-12 (only summation order differs). Both overlap modes (parallel.ep_overlap
// none and two_part: the routing over all of a rank's tokens, split after it). (test_expert_parallel.cpp
// has the Switch router's scenarios, and the NCCL runs.)
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "src/model/moe_ep_layer.h"
#include "src/model/moe_layer.h"
#include "tests/support/comm_test_support.h"
#include "tests/support/ep_layer_test_config.h"
#include "tests/support/expect_close.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::comm_test;
using namespace switchyard::testing;

namespace {

constexpr int64_t kModel = 8, kHidden = 6;
constexpr int kExperts = 8;  // divisible by every ep_size tested (1, 2, 4)
const ExecContext kCpu{DeviceKind::cpu, nullptr};
constexpr double kExactTolerance = 1e-12;  // f64; only the summation order differs

struct Scenario {
  const char* name;
  RoutingMethod method;
  ScoreFunction score;
  bool bias;
  int groups;  // 0: one group per EP rank (device-limited routing)
  int topk_groups;
  DropPolicy drop;
  int k;
  float capacity_factor;
  float scaling;
  float seq_weight, global_weight;
  float jitter;
  int chunks;
};

void PrintTo(const Scenario& scenario, std::ostream* os) { *os << scenario.name; }

const Scenario kScenarios[] = {
    {"sigmoid_bias_scaled", RoutingMethod::token_choice, ScoreFunction::sigmoid, true, 1, 1, DropPolicy::position, 2,
     1.25f, 2.5f, 0, 0, 0, 1},
    {"groups_4_top2", RoutingMethod::token_choice, ScoreFunction::sigmoid, false, 4, 2, DropPolicy::position, 2, 1.25f,
     1.0f, 0, 0, 0, 2},
    {"one_group_per_rank", RoutingMethod::token_choice, ScoreFunction::softmax, true, 0, 1, DropPolicy::position, 2,
     1.5f, 1.0f, 0, 0, 0, 1},
    {"probability_drops", RoutingMethod::token_choice, ScoreFunction::softmax, false, 1, 1, DropPolicy::probability, 2,
     0.75f, 1.0f, 0, 0, 0, 2},
    {"seq_loss", RoutingMethod::token_choice, ScoreFunction::sigmoid, false, 1, 1, DropPolicy::position, 2, 1.25f, 1.0f,
     0.1f, 0, 0, 1},
    {"global_loss", RoutingMethod::token_choice, ScoreFunction::softmax, false, 1, 1, DropPolicy::position, 2, 1.25f,
     1.0f, 0, 0.1f, 0, 1},
    {"everything_token_choice", RoutingMethod::token_choice, ScoreFunction::sigmoid, true, 2, 1,
     DropPolicy::probability, 2, 0.75f, 2.0f, 0.1f, 0.1f, 0.1f, 3},
    {"expert_choice", RoutingMethod::expert_choice, ScoreFunction::softmax, false, 1, 1, DropPolicy::position, 2, 1.0f,
     1.0f, 0, 0, 0, 1},
    {"expert_choice_sigmoid_global", RoutingMethod::expert_choice, ScoreFunction::sigmoid, false, 1, 1,
     DropPolicy::position, 2, 0.75f, 1.5f, 0, 0.1f, 0.05f, 2},
};

MoeLayerConfig make_config(const Scenario& scenario, int ep_size) {
  MoeLayerConfig config;
  config.d_model = kModel;
  config.tokens_per_sequence = 5;
  MoeConfig& moe = config.moe;
  moe.expert_d_ff = kHidden;
  moe.num_experts = kExperts;
  moe.top_k = moe.k_min = scenario.k;
  moe.renormalize_gates = true;
  moe.capacity_factor = moe.eval_capacity_factor = scenario.capacity_factor;
  moe.segment_alignment = 4;
  moe.aux_loss_weight = 0.05;
  moe.z_loss_weight = 0.01;
  moe.activation = ExpertActivation::swiglu;
  moe.jitter_eps = scenario.jitter;
  moe.routing = scenario.method;
  moe.score_function = scenario.score;
  moe.num_groups = scenario.groups > 0 ? scenario.groups : ep_size;
  moe.topk_groups = scenario.topk_groups;
  moe.drop_policy = scenario.drop;
  moe.routed_scaling_factor = scenario.scaling;
  moe.seq_aux_loss_weight = scenario.seq_weight;
  moe.global_aux_loss_weight = scenario.global_weight;
  config.jitter_seed = 99;
  config.jitter_stream = 3;
  return config;
}

int64_t tokens_of(int world_rank) { return 17 + 5 * world_rank; }

// The full model (every expert and the bias, identical on all ranks) and this rank's tokens.
struct HostModel : EpTestProblem {
  HostTensor bias;
  HostModel(const MoeLayerConfig& config, int world_rank, uint64_t salt)
      : EpTestProblem(config, DType::f64, world_rank, tokens_of(world_rank), salt, 1.0, 0.6, 0.6),
        bias(DType::f64, {kExperts}) {
    std::mt19937_64 shared_bias(shared_seed() ^ ((salt + 1) * 0xD1B54A32D192ED03ull));  // the same on every rank
    fill_uniform(bias, shared_bias, -0.3, 0.3);
  }
};

struct Outcome {
  std::vector<double> y, grad_x, grad_router, grad_w1, grad_w2;
  MoeLosses losses;
  MoeRoutingStats stats;
};

// One training forward and backward, the global loss's loads summed over the world by `reducer`
// into a fresh running sum. `layer` is a MoeLayer or a MoeEpLayer; `first`/`local`: its experts.
template <typename Layer>
Outcome run_layer(Layer& layer, const MoeLayerConfig& config, HostModel& model, const LoadReducer& reducer,
                  bool with_bias, int first, int local) {
  const int64_t tokens = model.x.tensor().dim(0);
  MoeWeights weights{model.router, expert_view(model.w1, first, local), expert_view(model.w2, first, local)};
  if (with_bias) weights.router_bias = &model.bias.tensor();
  HostTensor y(DType::f64, {tokens, kModel}), grad_x(DType::f64, {tokens, kModel});
  HostTensor grad_router(DType::f64, {kModel, kExperts});
  HostTensor grad_w1(DType::f64, {local, kModel, config.w1_columns()}), grad_w2(DType::f64, {local, kHidden, kModel});
  HostTensor running(DType::f64, {kExperts});
  for (int64_t e = 0; e < kExperts; ++e) set_element(running.tensor(), e, 0.0);
  for (HostTensor* output : {&y, &grad_x, &grad_router, &grad_w1, &grad_w2}) poison(output->tensor());
  MoeForwardArgs args;
  args.training = true;
  args.step = 5;
  args.load_reducer = &reducer;
  args.global_loads = &running.tensor();
  Outcome outcome;
  outcome.losses = layer.forward(kCpu, model.x, weights, args, y);
  MoeGradients gradients{grad_router, grad_w1, grad_w2};
  layer.backward(kCpu, model.grad_y, weights, 1.0f, 1.0f, grad_x, gradients);
  outcome.y = to_vector(y);
  outcome.grad_x = to_vector(grad_x);
  outcome.grad_router = to_vector(grad_router);
  outcome.grad_w1 = to_vector(grad_w1);
  outcome.grad_w2 = to_vector(grad_w2);
  outcome.stats = layer.read_routing_stats(kCpu);
  return outcome;
}

void expect_loss(const char* what, double actual, double expected) {
  EXPECT_NEAR(actual, expected, 1e-12 * std::fabs(expected) + 1e-300) << what;
}

class ExpertParallelRouting : public ::testing::TestWithParam<Scenario> {};

TEST_P(ExpertParallelRouting, CpuMatchesSingleRankReference) {
  const Scenario& scenario = GetParam();
  const ProcessContext& process = bootstrap_process(DeviceKind::cpu);
  uint64_t salt = 1;
  for (int ep_size : ep_sizes_to_test(process.world_size)) {
    for (int ranks_per_node : node_sizes_to_test(ep_size)) {  // 0: one node; else the hierarchical exchange
      SCOPED_TRACE(::testing::Message() << "ep_size " << ep_size << ", ranks_per_node " << ranks_per_node << ", seed "
                                        << shared_seed());
      const MoeLayerConfig config = make_config(scenario, ep_size);
      ParallelGroups& groups = groups_for(DeviceKind::cpu, ep_size, ranks_per_node);
      HostModel model(config, process.world_rank, salt++);
      // Loads over every rank (with or without expert parallelism each routes over all E experts).
      int reductions = 0;
      const LoadReducer reducer = [&](const ExecContext&, Tensor& loads) {
        ++reductions;
        groups.world->all_reduce_sum(loads.data, loads.numel(), loads.dtype);
      };
      const int64_t tokens = model.x.tensor().dim(0);
      MoeLayer single(config, DeviceKind::cpu, DType::f64, tokens);
      const Outcome reference = run_layer(single, config, model, reducer, scenario.bias, 0, kExperts);
      for (EpOverlap overlap : overlaps_to_test()) {
        SCOPED_TRACE(::testing::Message() << "ep_overlap " << ep_overlap_name(overlap));
        reductions = 0;
        MoeEpLayer parallel(config, groups.expert_parallel, DeviceKind::cpu, DType::f64, tokens + 3,
                            layer_options(groups, scenario.chunks, EpTransport::automatic, EpDispatch::activation,
                                          overlap));
        EXPECT_EQ(parallel.hierarchical(), ranks_per_node > 0 && ranks_per_node < ep_size);
        const int first = parallel.first_expert(), local = parallel.local_experts();
        const Outcome result = run_layer(parallel, config, model, reducer, scenario.bias, first, local);
        EXPECT_EQ(reductions, scenario.global_weight > 0 ? 1 : 0);
        if (parallel.hierarchical() && scenario.groups == 0 && ranks_per_node == 1) {
          // One group per rank = per node, topk_groups of them: a token's row crosses the network
          // at most topk_groups times (once per node, however many of its experts live there).
          EXPECT_LE(parallel.exchange_stats().network_rows, tokens * scenario.topk_groups);
          EXPECT_GT(parallel.exchange_stats().network_rows, 0);
        }

        expect_close("y", result.y, reference.y, kExactTolerance);
        expect_close("grad_x", result.grad_x, reference.grad_x, kExactTolerance);
        expect_close("grad_router", result.grad_router, reference.grad_router, kExactTolerance);
        expect_loss("aux loss", result.losses.aux_loss, reference.losses.aux_loss);
        expect_loss("z loss", result.losses.z_loss, reference.losses.z_loss);
        expect_loss("seq loss", result.losses.seq_aux_loss, reference.losses.seq_aux_loss);
        expect_loss("global loss", result.losses.global_aux_loss, reference.losses.global_aux_loss);
        EXPECT_EQ(result.stats.dropped_choices, reference.stats.dropped_choices);
        EXPECT_EQ(result.stats.total_choices, reference.stats.total_choices);
        if (scenario.seq_weight > 0) EXPECT_GT(reference.losses.seq_aux_loss, 0.0);
        if (scenario.global_weight > 0) EXPECT_GT(reference.losses.global_aux_loss, 0.0);
        if (scenario.drop == DropPolicy::probability) EXPECT_GT(reference.stats.dropped_choices, 0);

        // Expert gradients: the reference's, summed over the EP group, this rank's slice.
        std::vector<double> w1_sum = reference.grad_w1, w2_sum = reference.grad_w2;
        groups.expert_parallel->all_reduce_sum(w1_sum.data(), int64_t(w1_sum.size()), DType::f64);
        groups.expert_parallel->all_reduce_sum(w2_sum.data(), int64_t(w2_sum.size()), DType::f64);
        const int64_t w1_matrix = int64_t(w1_sum.size()) / kExperts, w2_matrix = int64_t(w2_sum.size()) / kExperts;
        expect_close("grad_w1 (local experts)", result.grad_w1,
                     std::vector<double>(w1_sum.begin() + first * w1_matrix,
                                         w1_sum.begin() + (first + local) * w1_matrix), kExactTolerance);
        expect_close("grad_w2 (local experts)", result.grad_w2,
                     std::vector<double>(w2_sum.begin() + first * w2_matrix,
                                         w2_sum.begin() + (first + local) * w2_matrix), kExactTolerance);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Scenarios, ExpertParallelRouting, ::testing::ValuesIn(kScenarios),
                         [](const ::testing::TestParamInfo<Scenario>& info) { return std::string(info.param.name); });

}  // namespace
