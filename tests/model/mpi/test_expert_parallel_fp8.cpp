// FP8 dispatch of the expert-parallel layer (parallel.ep_dispatch fp8; src/comm/ep_exchange.h),
// on CPU ranks (f64 activations, MPI), under mpirun -np 2 and -np 4 at ep_size 1, 2 and the world
// size, with chunked exchanges (a2a_chunks 2) and an unchunked dropless one; D = 200, so a row is a
// full 128-block and a partial one.
//
// 1. Exact: the fp8 layer computes the layer on x' = dequantize(quantize(x)) (the reference ops,
//    src/ops/fp8_rows.h), except that its router sees x. The test makes the router blind to the
//    difference: router rows of block 1 (features 128..199) are zero, and block 0 of every token
//    holds e4m3 values times a power of two with one of them 448 times it, which the quantization
//    reproduces exactly (inv and scale are powers of two). So x' = x on block 0, x' != x on block 1
//    (checked), and the single-rank MoeLayer holding all experts on x' must give the fp8 EP layer's
//    y, grad_x, losses, block-0 router gradient rows and (summed over the EP group) expert weight
//    gradients, to f64 summation order (relative 1e-12). A wrong scale, a dropped or misplaced row,
//    a chunk dequantized twice or not at all, or gradients taken at x instead of x' all fail it.
// 2. Tolerance: on fully random x (uniform in [-1, 1]) and router, the fp8 layer against the same
//    layer with the activation dispatch, relative errors ||fp8 - activation|| / ||activation||.
//    Routing is identical (the router sees x: logits, losses and routing counters equal exactly).
//    The input error: per element |x - x'| <= |x| / 17 (plus a negligible subnormal term); with
//    x * 448 / amax spread uniformly over [-448, 448], the rounding error is uniform within half an
//    ulp (32 in [256, 448), 16 below, ...), so ||x - x'|| / ||x|| ~ sqrt(E[ulp^2] / 12 / E[y^2]) =
//    sqrt(522 / 12 / 66900) ~ 0.026. The experts pass that on: about 0.026 for gelu and sqrt(2)
//    times it for swiglu, whose output multiplies two perturbed projections. Measured over 256
//    rank-runs (np 2 and 4, fresh seeds): medians 0.026-0.035; largest y 0.043, grad_x 0.039,
//    grad_w1 0.040, grad_w2 0.042, and grad_router 0.063 (its gate gradients are differences of
//    nearly equal terms under renormalized top-2). Bounds: 0.06 for y, grad_x, grad_w1, grad_w2 and
//    0.10 for grad_router, ~1.5x the largest seen; a wrong scale (factor 2: ~1) fails them, and a
//    dropped or misplaced row fails test 1 exactly.
// 3. fp8 with parallel.ep_transport nvlink is bad input naming both keys.
// Tests 1 and 2 run with both overlap modes (parallel.ep_overlap none and two_part); test 2 compares
// either against the one-part activation dispatch.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "src/model/moe_ep_layer.h"
#include "src/model/moe_layer.h"
#include "src/ops/ops.h"
#include "tests/support/comm_test_support.h"
#include "tests/support/expect_close.h"
#include "tests/support/expect_error.h"
#include "tests/support/test_helpers.h"
#include "tests/support/ep_layer_test_config.h"

using namespace switchyard;
using namespace switchyard::comm_test;
using namespace switchyard::testing;

namespace {

constexpr int64_t kModel = 200, kHidden = 24;
constexpr int kExperts = 8;
const ExecContext kCpu{DeviceKind::cpu, nullptr};

struct Fp8Scenario {
  const char* name;
  int k;
  ExpertActivation activation;
  float capacity_factor;  // 0: dropless
  int alignment, chunks;
};

void PrintTo(const Fp8Scenario& scenario, std::ostream* os) { *os << scenario.name; }

const Fp8Scenario kFp8Scenarios[] = {
    {"top2_swiglu_capacity_chunked", 2, ExpertActivation::swiglu, 1.25f, 4, 2},
    {"top1_gelu_dropless", 1, ExpertActivation::gelu_tanh, 0.0f, 1, 1},
};

MoeLayerConfig make_config(const Fp8Scenario& scenario) {
  return ep_test_layer_config(kModel, kHidden, kExperts, scenario.k, scenario.activation, scenario.capacity_factor,
                              scenario.alignment);
}

int64_t tokens_of(int world_rank) { return 61 + 7 * world_rank; }

MoeForwardArgs training_args() {
  MoeForwardArgs args;
  args.training = true;
  args.step = 3;
  return args;
}

// Every expert's weights (identical on all ranks) and this rank's tokens, f64 on the host.
struct Problem : EpTestProblem {
  Problem(const MoeLayerConfig& config, int world_rank, uint64_t salt)
      : EpTestProblem(config, DType::f64, world_rank, tokens_of(world_rank), salt, 0.3, 0.1, 0.3) {}

  // Block 0 of every token exact in e4m3 at a power-of-two scale (448 * 2^k its largest magnitude);
  // router rows of block 1 zero, so the routing cannot see block 1.
  void make_router_blind_to_quantization(int world_rank) {
    std::mt19937_64 blocks(shared_seed() + 104729 * uint64_t(world_rank + 1));
    std::uniform_int_distribution<int> code(0, 0x7E), sign(0, 1), exponent(-12, -6);
    const int64_t tokens = x.tensor().dim(0);
    for (int64_t token = 0; token < tokens; ++token) {
      const double scale = std::ldexp(1.0, exponent(blocks));
      double* row = x.data<double>() + token * kModel;
      for (int64_t column = 0; column < kFp8BlockElements; ++column)
        row[column] = (sign(blocks) ? -1.0 : 1.0) * double(cpu::e4m3_to_float(uint8_t(code(blocks)))) * scale;
      row[token % kFp8BlockElements] = 448.0 * scale;
    }
    for (int64_t feature = kFp8BlockElements; feature < kModel; ++feature)
      for (int expert = 0; expert < kExperts; ++expert) router.data<double>()[feature * kExperts + expert] = 0.0;
  }
};

struct Outcome {
  std::vector<double> y, grad_x, grad_router, grad_w1, grad_w2, logits;
  double aux = 0, z = 0;
  MoeRoutingStats stats;
};

// The EP layer (this rank's expert shard) on x, forward and backward, outputs poisoned first.
Outcome run_expert_parallel(const MoeLayerConfig& config, Problem& problem, ParallelGroups& groups, int chunks,
                            EpDispatch dispatch, EpOverlap overlap = EpOverlap::none) {
  const int64_t tokens = problem.x.tensor().dim(0);
  MoeEpLayer layer(config, groups.expert_parallel, DeviceKind::cpu, DType::f64, tokens + 2,
                   layer_options(groups, chunks, EpTransport::automatic, dispatch, overlap));
  EXPECT_EQ(layer.dispatch_format(), dispatch);
  const int first = layer.first_expert(), local = layer.local_experts();
  const MoeWeights weights{problem.router, expert_view(problem.w1, first, local),
                           expert_view(problem.w2, first, local)};
  HostTensor y(DType::f64, {tokens, kModel}), grad_x(DType::f64, {tokens, kModel});
  HostTensor grad_router(DType::f64, {kModel, kExperts});
  HostTensor grad_w1(DType::f64, {local, kModel, config.w1_columns()}), grad_w2(DType::f64, {local, kHidden, kModel});
  for (HostTensor* output : {&y, &grad_x, &grad_router, &grad_w1, &grad_w2}) poison(output->tensor());
  const MoeLosses losses = layer.forward(kCpu, problem.x, weights, training_args(), y);
  MoeGradients gradients{grad_router, grad_w1, grad_w2};
  layer.backward(kCpu, problem.grad_y, weights, 1.0f, 1.0f, grad_x, gradients);
  return Outcome{to_vector(y),       to_vector(grad_x), to_vector(grad_router),     to_vector(grad_w1),
                 to_vector(grad_w2), to_vector(layer.logits()), losses.aux_loss, losses.z_loss,
                 layer.read_routing_stats(kCpu)};
}

// The single-rank layer holding every expert, on `x`; its expert gradients summed over the EP
// group and cut to the experts [first, first + local).
Outcome run_single_rank(const MoeLayerConfig& config, Problem& problem, const Tensor& x, Communicator& ep, int first,
                        int local) {
  const int64_t tokens = x.dim(0);
  MoeLayer layer(config, DeviceKind::cpu, DType::f64, tokens);
  HostTensor y(DType::f64, {tokens, kModel}), grad_x(DType::f64, {tokens, kModel});
  HostTensor grad_router(DType::f64, {kModel, kExperts});
  HostTensor grad_w1(DType::f64, {kExperts, kModel, config.w1_columns()}),
      grad_w2(DType::f64, {kExperts, kHidden, kModel});
  for (HostTensor* output : {&y, &grad_x, &grad_router, &grad_w1, &grad_w2}) poison(output->tensor());
  const MoeWeights weights{problem.router, problem.w1, problem.w2};
  const MoeLosses losses = layer.forward(kCpu, x, weights, training_args(), y);
  MoeGradients gradients{grad_router, grad_w1, grad_w2};
  layer.backward(kCpu, problem.grad_y, weights, 1.0f, 1.0f, grad_x, gradients);
  auto local_sum = [&](const HostTensor& full) {
    std::vector<double> values = to_vector(full);
    ep.all_reduce_sum(values.data(), int64_t(values.size()), DType::f64);
    const int64_t matrix = int64_t(values.size()) / kExperts;
    return std::vector<double>(values.begin() + first * matrix, values.begin() + (first + local) * matrix);
  };
  return Outcome{to_vector(y),          to_vector(grad_x),       to_vector(grad_router),
                 local_sum(grad_w1),    local_sum(grad_w2),      to_vector(layer.logits()),
                 losses.aux_loss,       losses.z_loss,           layer.read_routing_stats(kCpu)};
}

std::vector<double> first_rows(const std::vector<double>& matrix, int64_t rows, int64_t columns) {
  return std::vector<double>(matrix.begin(), matrix.begin() + rows * columns);
}

class ExpertParallelFp8 : public ::testing::TestWithParam<Fp8Scenario> {};

TEST_P(ExpertParallelFp8, EqualsTheLayerOnDequantizedInputs) {
  const Fp8Scenario& scenario = GetParam();
  const MoeLayerConfig config = make_config(scenario);
  const int world_size = bootstrap_process(DeviceKind::cpu).world_size;
  const int world_rank = bootstrap_process(DeviceKind::cpu).world_rank;
  uint64_t salt = 11;
  for (int ep_size : ep_sizes_to_test(world_size))
  for (int ranks_per_node : node_sizes_to_test(ep_size)) {  // > 0: hierarchical, fp8 on the network leg
    SCOPED_TRACE(::testing::Message() << "ep_size " << ep_size << ", ranks_per_node " << ranks_per_node << ", seed "
                                      << shared_seed());
    ParallelGroups& groups = groups_for(DeviceKind::cpu, ep_size, ranks_per_node);
    Problem problem(config, world_rank, salt++);
    problem.make_router_blind_to_quantization(world_rank);

    // x' with the reference ops; it equals x on block 0 and differs on block 1.
    const int64_t tokens = problem.x.tensor().dim(0);
    HostTensor packed(DType::u8, {tokens, fp8_row_bytes(kModel)}), dequantized(DType::f64, {tokens, kModel});
    poison(packed.tensor());
    poison(dequantized.tensor());
    ops::quantize_rows_fp8(kCpu, problem.x, packed);
    ops::dequantize_rows_fp8(kCpu, packed, dequantized);
    double block0_change = 0.0, block1_change = 0.0;
    for (int64_t index = 0; index < tokens * kModel; ++index) {
      const double change = std::fabs(problem.x.data<double>()[index] - dequantized.data<double>()[index]);
      double& target = index % kModel < kFp8BlockElements ? block0_change : block1_change;
      target = std::max(target, change);
    }
    ASSERT_EQ(block0_change, 0.0) << "block 0 is not a fixed point of the quantization: the test is broken";
    ASSERT_GT(block1_change, 1e-4) << "the quantization left block 1 unchanged: the test proves nothing";

    Communicator& ep = *groups.expert_parallel;
    const int local = kExperts / ep_size, first = ep.rank() * local;
    const Outcome reference = run_single_rank(config, problem, dequantized, ep, first, local);
    for (EpOverlap overlap : overlaps_to_test()) {
      SCOPED_TRACE(::testing::Message() << "ep_overlap " << ep_overlap_name(overlap));
      const Outcome fp8 = run_expert_parallel(config, problem, groups, scenario.chunks, EpDispatch::fp8, overlap);
      const double tolerance = 1e-12;  // f64; only the summation order differs
      expect_close("y", fp8.y, reference.y, tolerance);
      expect_close("grad_x", fp8.grad_x, reference.grad_x, tolerance);
      expect_close("grad_w1 (local experts)", fp8.grad_w1, reference.grad_w1, tolerance);
      expect_close("grad_w2 (local experts)", fp8.grad_w2, reference.grad_w2, tolerance);
      expect_close("logits", fp8.logits, reference.logits, tolerance);
      // Router gradient rows of block 0 (x_r = x = x' there; block 1's rows see x, not x').
      expect_close("grad_router (block 0 rows)", first_rows(fp8.grad_router, kFp8BlockElements, kExperts),
                      first_rows(reference.grad_router, kFp8BlockElements, kExperts), tolerance);
      EXPECT_NEAR(fp8.aux, reference.aux, tolerance * std::fabs(reference.aux)) << "aux loss";
      EXPECT_NEAR(fp8.z, reference.z, tolerance * std::fabs(reference.z)) << "z loss";
      EXPECT_EQ(fp8.stats.dropped_choices, reference.stats.dropped_choices);
      EXPECT_EQ(fp8.stats.total_choices, reference.stats.total_choices);
    }
  }
}

TEST_P(ExpertParallelFp8, WithinToleranceOfActivationDispatch) {
  const Fp8Scenario& scenario = GetParam();
  const MoeLayerConfig config = make_config(scenario);
  const int world_size = bootstrap_process(DeviceKind::cpu).world_size;
  const int world_rank = bootstrap_process(DeviceKind::cpu).world_rank;
  uint64_t salt = 23;
  for (int ep_size : ep_sizes_to_test(world_size))
  for (int ranks_per_node : node_sizes_to_test(ep_size)) {  // > 0: hierarchical, fp8 on the network leg
    SCOPED_TRACE(::testing::Message() << "ep_size " << ep_size << ", ranks_per_node " << ranks_per_node << ", seed "
                                      << shared_seed());
    ParallelGroups& groups = groups_for(DeviceKind::cpu, ep_size, ranks_per_node);
    Problem problem(config, world_rank, salt++);
    const Outcome exact = run_expert_parallel(config, problem, groups, scenario.chunks, EpDispatch::activation);
    for (EpOverlap overlap : overlaps_to_test()) {
      SCOPED_TRACE(::testing::Message() << "ep_overlap " << ep_overlap_name(overlap));
      // The two-part layer against the one-part activation dispatch: only the quantization differs.
      const Outcome fp8 = run_expert_parallel(config, problem, groups, scenario.chunks, EpDispatch::fp8, overlap);

      // The router sees x in both: identical routing.
      EXPECT_EQ(fp8.logits, exact.logits);
      EXPECT_EQ(fp8.aux, exact.aux);
      EXPECT_EQ(fp8.z, exact.z);
      EXPECT_EQ(fp8.stats.dropped_choices, exact.stats.dropped_choices);
      EXPECT_EQ(fp8.stats.total_choices, exact.stats.total_choices);

      struct Compared {
        const char* name;
        const std::vector<double>&fp8, &exact;
        double tolerance;
      };
      const Compared tensors[] = {
          {"y", fp8.y, exact.y, 0.06},
          {"grad_x", fp8.grad_x, exact.grad_x, 0.06},
          {"grad_router", fp8.grad_router, exact.grad_router, 0.10},
          {"grad_w1", fp8.grad_w1, exact.grad_w1, 0.06},
          {"grad_w2", fp8.grad_w2, exact.grad_w2, 0.06},
      };
      std::string measured;
      for (const Compared& tensor : tensors) {
        expect_close(tensor.name, tensor.fp8, tensor.exact, tensor.tolerance);
        char text[64];
        std::snprintf(text, sizeof(text), " %s %.4f", tensor.name, relative_error(tensor.fp8, tensor.exact));
        measured += text;
      }
      // The quantization did happen: y moved.
      EXPECT_GT(relative_error(fp8.y, exact.y), 1e-4) << "fp8 dispatch left y unchanged";
      if (world_rank == 0)
        std::printf("[ note     ] ep_size %d ep_overlap %s fp8 vs activation, relative:%s\n", ep_size,
                    ep_overlap_name(overlap), measured.c_str());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Scenarios, ExpertParallelFp8, ::testing::ValuesIn(kFp8Scenarios),
                         [](const ::testing::TestParamInfo<Fp8Scenario>& info) { return std::string(info.param.name); });

TEST(ExpertParallelFp8Options, NvlinkTransportIsBadInputNamingBothKeys) {
  const MoeLayerConfig config = make_config(kFp8Scenarios[0]);
  ParallelGroups& groups = groups_for(DeviceKind::cpu, bootstrap_process(DeviceKind::cpu).world_size);
  expect_bad_input(
      [&] {
        MoeEpLayer layer(config, groups.expert_parallel, DeviceKind::cpu, DType::f64, 8,
                         EpLayerOptions{1, EpTransport::nvlink, EpDispatch::fp8});
      },
      {"parallel.ep_dispatch fp8", "parallel.ep_transport"});
}

}  // namespace
