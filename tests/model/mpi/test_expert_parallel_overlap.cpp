// The expert-parallel layer's two-part overlap (parallel.ep_overlap two_part; src/model/moe_ep_layer.h)
// at its edges, on CPU ranks under mpirun -np 2 and -np 4 (test_expert_parallel*.cpp run every
// scenario in both modes; this file takes the batches that stress the split):
//   * world rank 0 holds one token, so its part 0 is empty (T0 = T / 2 = 0): it still takes part in
//     both exchanges, sending nothing in one;
//   * world rank 1's tokens all pick one expert and the capacity keeps only the first few (position
//     drops), so its part 1 has tokens but no kept choice (checked on the routing);
//   * the same layer runs a second, larger batch (the parts' buffers grow) and a third, smaller one;
//   * chunked exchanges (a2a_chunks 3, more chunks than some ranks' experts), one node and emulated
//     nodes (the hierarchical exchange, two of them).
// Every pass must equal the single-device MoeLayer on that rank's tokens: y, grad_x, grad_router,
// losses, drops, and the local experts' gradients equal to the reference's summed over the EP
// group (f64, relative 1e-12: only the summation order differs). And the two-part layer moves the
// same rows as the one-part layer (sent and received rows summed over its parts).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "src/model/moe_ep_layer.h"
#include "src/model/moe_layer.h"
#include "tests/support/comm_test_support.h"
#include "tests/support/expect_close.h"
#include "tests/support/test_helpers.h"
#include "tests/support/ep_layer_test_config.h"

using namespace switchyard;
using namespace switchyard::comm_test;
using namespace switchyard::testing;

namespace {

constexpr int64_t kModel = 8, kHidden = 6;
constexpr int kExperts = 8;
const ExecContext kCpu{DeviceKind::cpu, nullptr};
constexpr double kExactTolerance = 1e-12;  // f64; only the summation order differs

struct OverlapScenario {
  const char* name;
  int k;
  ExpertActivation activation;
  float capacity_factor;  // 0: dropless
  int alignment, chunks;
};

void PrintTo(const OverlapScenario& scenario, std::ostream* os) { *os << scenario.name; }

const OverlapScenario kOverlapScenarios[] = {
    {"top1_gelu_capacity", 1, ExpertActivation::gelu_tanh, 1.0f, 2, 1},
    {"top2_swiglu_capacity_chunked", 2, ExpertActivation::swiglu, 1.0f, 4, 3},
    {"top2_gelu_dropless_chunked", 2, ExpertActivation::gelu_tanh, 0.0f, 1, 2},
};

MoeLayerConfig make_config(const OverlapScenario& scenario) {
  return ep_test_layer_config(kModel, kHidden, kExperts, scenario.k, scenario.activation, scenario.capacity_factor,
                              scenario.alignment);
}

// Tokens of world rank `rank` in pass `pass`: rank 0 always one; the others vary with the pass
// (the second pass is the largest, so the parts' buffers grow).
int64_t tokens_of(int rank, int pass) {
  if (rank == 0) return 1;
  const int64_t base[] = {12, 29, 7};
  return base[pass] + 3 * rank;
}
constexpr int kPasses = 3;
constexpr int64_t kMaxTokens = 29 + 3 * 3;  // the largest batch at np 4

// Every expert's weights (identical on all ranks) and one pass's tokens of this rank.
struct Problem : EpTestProblem {
  Problem(const MoeLayerConfig& config, int world_rank, int64_t tokens, uint64_t salt)
      : EpTestProblem(config, DType::f64, world_rank, tokens, salt, 1.0, 0.6, 0.6) {
    if (world_rank == 1) {
      // Positive multiples of one vector: every token ranks the experts alike, so with a capacity
      // the first tokens fill their experts and the later ones (part 1) are all dropped.
      std::uniform_real_distribution<double> scale(0.5, 1.5);
      for (int64_t token = 0; token < tokens; ++token) {
        const double factor = scale(own);
        for (int64_t column = 0; column < kModel; ++column)
          x.data<double>()[token * kModel + column] = factor * x.data<double>()[column];
      }
    }
  }
};

struct Outcome {
  std::vector<double> y, grad_x, grad_router, grad_w1, grad_w2;
  MoeLosses losses;
  MoeRoutingStats stats;
};

MoeForwardArgs training_args(int pass) {
  MoeForwardArgs args;
  args.training = true;
  args.step = uint64_t(pass);
  return args;
}

// One forward and backward of `layer` (a MoeLayer or a MoeEpLayer holding experts [first, first +
// local)), outputs poisoned first.
template <typename Layer>
Outcome run_pass(Layer& layer, const MoeLayerConfig& config, Problem& problem, int pass, int first, int local) {
  const int64_t tokens = problem.x.tensor().dim(0);
  const MoeWeights weights{problem.router, expert_view(problem.w1, first, local), expert_view(problem.w2, first, local)};
  HostTensor y(DType::f64, {tokens, kModel}), grad_x(DType::f64, {tokens, kModel});
  HostTensor grad_router(DType::f64, {kModel, kExperts});
  HostTensor grad_w1(DType::f64, {local, kModel, config.w1_columns()}), grad_w2(DType::f64, {local, kHidden, kModel});
  for (HostTensor* output : {&y, &grad_x, &grad_router, &grad_w1, &grad_w2}) poison(output->tensor());
  Outcome outcome;
  outcome.losses = layer.forward(kCpu, problem.x, weights, training_args(pass), y);
  MoeGradients gradients{grad_router, grad_w1, grad_w2};
  layer.backward(kCpu, problem.grad_y, weights, 1.0f, 1.0f, grad_x, gradients);
  outcome.y = to_vector(y);
  outcome.grad_x = to_vector(grad_x);
  outcome.grad_router = to_vector(grad_router);
  outcome.grad_w1 = to_vector(grad_w1);
  outcome.grad_w2 = to_vector(grad_w2);
  outcome.stats = layer.read_routing_stats(kCpu);
  return outcome;
}

// The reference's gradient of every expert summed over the EP group, cut to [first, first + local).
std::vector<double> local_sum(Communicator& ep, std::vector<double> full, int first, int local) {
  ep.all_reduce_sum(full.data(), int64_t(full.size()), DType::f64);
  const int64_t matrix = int64_t(full.size()) / kExperts;
  return std::vector<double>(full.begin() + first * matrix, full.begin() + (first + local) * matrix);
}

// Whether any choice of tokens [first, end) of the layer's last routing was kept.
bool keeps_any(const RoutingResult& routing, int64_t first, int64_t end) {
  const int64_t choices = routing.expert_ids.dim(1);
  const int32_t capacity = routing.scalars.as<int32_t>()[kCapacity];
  for (int64_t index = first * choices; index < end * choices; ++index) {
    const int32_t id = routing.expert_ids.as<int32_t>()[index], slot = routing.slots.as<int32_t>()[index];
    if (id >= 0 && slot >= 0 && slot < capacity) return true;
  }
  return false;
}

class ExpertParallelOverlap : public ::testing::TestWithParam<OverlapScenario> {};

TEST_P(ExpertParallelOverlap, TwoPartsEqualTheSingleRankLayerAtTheEdges) {
  const OverlapScenario& scenario = GetParam();
  const MoeLayerConfig config = make_config(scenario);
  const ProcessContext& process = bootstrap_process(DeviceKind::cpu);
  uint64_t salt = 1;
  for (int ep_size : ep_sizes_to_test(process.world_size)) {
    for (int ranks_per_node : node_sizes_to_test(ep_size)) {
      SCOPED_TRACE(::testing::Message() << "ep_size " << ep_size << ", ranks_per_node " << ranks_per_node << ", seed "
                                        << shared_seed());
      ParallelGroups& groups = groups_for(DeviceKind::cpu, ep_size, ranks_per_node);
      Communicator& ep = *groups.expert_parallel;
      // Both modes side by side, one layer each for all the passes.
      MoeEpLayer one_part(config, groups.expert_parallel, DeviceKind::cpu, DType::f64, kMaxTokens,
                          layer_options(groups, scenario.chunks));
      MoeEpLayer two_parts(config, groups.expert_parallel, DeviceKind::cpu, DType::f64, kMaxTokens,
                           layer_options(groups, scenario.chunks, EpTransport::automatic, EpDispatch::activation,
                                         EpOverlap::two_part));
      ASSERT_EQ(two_parts.overlap(), EpOverlap::two_part);
      const int first = two_parts.first_expert(), local = two_parts.local_experts();
      for (int pass = 0; pass < kPasses; ++pass) {
        SCOPED_TRACE(::testing::Message() << "pass " << pass);
        const int64_t tokens = tokens_of(process.world_rank, pass);
        Problem problem(config, process.world_rank, tokens, salt++);
        MoeLayer single(config, DeviceKind::cpu, DType::f64, tokens);
        const Outcome reference = run_pass(single, config, problem, pass, 0, kExperts);
        const Outcome result = run_pass(two_parts, config, problem, pass, first, local);
        const Outcome one = run_pass(one_part, config, problem, pass, first, local);

        expect_close("y", result.y, reference.y, kExactTolerance);
        expect_close("grad_x", result.grad_x, reference.grad_x, kExactTolerance);
        expect_close("grad_router", result.grad_router, reference.grad_router, kExactTolerance);
        EXPECT_NEAR(result.losses.aux_loss, reference.losses.aux_loss, 1e-12 * std::fabs(reference.losses.aux_loss));
        EXPECT_NEAR(result.losses.z_loss, reference.losses.z_loss, 1e-12 * std::fabs(reference.losses.z_loss));
        EXPECT_EQ(result.stats.dropped_choices, reference.stats.dropped_choices);
        EXPECT_EQ(result.stats.total_choices, reference.stats.total_choices);
        expect_close("grad_w1 (local experts)", result.grad_w1, local_sum(ep, reference.grad_w1, first, local), kExactTolerance);
        expect_close("grad_w2 (local experts)", result.grad_w2, local_sum(ep, reference.grad_w2, first, local), kExactTolerance);

        // The same rows cross, split over two exchanges.
        const MoeExchangeStats split = two_parts.exchange_stats(), whole = one_part.exchange_stats();
        EXPECT_EQ(split.sent_rows, whole.sent_rows);
        EXPECT_EQ(split.received_rows, whole.received_rows);
        expect_close("y (one part)", one.y, reference.y, kExactTolerance);

        // The batches must be the edges they claim.
        if (process.world_rank == 1 && scenario.capacity_factor > 0.0f) {
          EXPECT_TRUE(keeps_any(two_parts.routing(), 0, tokens / 2)) << "part 0 kept nothing";
          EXPECT_FALSE(keeps_any(two_parts.routing(), tokens / 2, tokens))
              << "part 1 of world rank 1 kept a choice: the all-dropped part is not tested";
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Scenarios, ExpertParallelOverlap, ::testing::ValuesIn(kOverlapScenarios),
                         [](const ::testing::TestParamInfo<OverlapScenario>& info) {
                           return std::string(info.param.name);
                         });

}  // namespace
