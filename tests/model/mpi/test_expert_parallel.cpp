// Expert parallelism (src/model/moe_ep_layer.h, src/comm/expert_dispatch.h) and the gradient
// all-reduce (src/comm/gradient_sync.h), run under mpirun -np 2 and -np 4.
//
// The reference for every rank is the single-device MoeLayer holding all E experts, run on that
// rank's own tokens. The EP layer must reproduce its y, grad_x, grad_router and losses, and its
// local experts' gradients must equal the reference expert gradients summed over the EP group
// (every rank's tokens routed to the expert). CPU: f64, relative error <= 1e-12 (only summation
// order differs). With one GPU per rank the same scenarios run over NCCL in bf16 against the
// single-GPU layer (else skipped). ep_size: 1, 2 and the world size (at np 4, ep 2 leaves an
// expert-DP group of 2). The CPU runs take both overlap modes (parallel.ep_overlap none and
// two_part), the GPU runs too. Scenarios: top-2 renormalized swiglu with jitter, a rank whose tokens
// all pick one expert (heavy capacity drops), an expert shard nobody routes to (a rank receiving
// no tokens), entropy-complexity routing in eval mode, and chunked exchanges (a2a_chunks > 1).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "src/comm/gradient_sync.h"
#include "src/ops/ops.h"
#include "src/core/timing.h"
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
constexpr int kExperts = 8;  // divisible by every ep_size tested (1, 2, 4)

struct Scenario {
  const char* name;
  int k_max, k_min;
  bool renormalize;
  ExpertActivation activation;
  float capacity_factor;  // 0: dropless
  float jitter_eps;
  ComplexityMode complexity;
  bool training;
  int alignment, chunks;
  bool one_expert_rank;  // EP rank 0's tokens all share one direction: one expert, heavy drops
  bool idle_last_shard;  // the last EP rank's experts are never chosen: it receives no tokens
};

void PrintTo(const Scenario& scenario, std::ostream* os) { *os << scenario.name; }

const Scenario kScenarios[] = {
    {"top2_swiglu_renorm_jitter", 2, 2, true, ExpertActivation::swiglu, 1.25f, 0.1f, ComplexityMode::none, true, 4, 1,
     false, false},
    {"top1_gelu_one_expert_rank", 1, 1, false, ExpertActivation::gelu_tanh, 1.0f, 0.0f, ComplexityMode::none, true, 1,
     2, true, false},
    {"top2_swiglu_idle_shard_dropless", 2, 2, true, ExpertActivation::swiglu, 0.0f, 0.0f, ComplexityMode::none, true,
     8, 3, false, true},
    {"entropy_k1to2_gelu_eval", 2, 1, false, ExpertActivation::gelu_tanh, 0.75f, 0.0f, ComplexityMode::entropy, false,
     4, 2, false, false},
};

MoeLayerConfig make_config(const Scenario& scenario) {
  MoeLayerConfig config = ep_test_layer_config(kModel, kHidden, kExperts, scenario.k_max, scenario.activation,
                                               scenario.capacity_factor, scenario.alignment);
  config.moe.k_min = scenario.k_min;
  config.moe.complexity = scenario.complexity;
  config.moe.renormalize_gates = scenario.renormalize;
  config.moe.jitter_eps = scenario.jitter_eps;
  config.jitter_seed = 99;
  config.jitter_stream = 3;
  return config;
}

int64_t tokens_of(int world_rank) { return 17 + 5 * world_rank; }

// Full model (every expert, identical on all ranks) and this rank's tokens, on the host in f64.
struct HostModel : EpTestProblem {
  HostModel(const MoeLayerConfig& config, const Scenario& scenario, int world_rank, int ep_rank, int ep_size,
            uint64_t salt)
      : EpTestProblem(config, DType::f64, world_rank, tokens_of(world_rank), salt, 1.0, 0.6, 0.6) {
    const int64_t tokens = x.tensor().dim(0);
    if (scenario.one_expert_rank && ep_rank == 0) {
      // Positive multiples of one vector: every token has the same logit order.
      std::uniform_real_distribution<double> scale(0.5, 1.5);
      for (int64_t token = 0; token < tokens; ++token) {
        const double factor = scale(own);
        for (int64_t column = 0; column < kModel; ++column)
          x.data<double>()[token * kModel + column] = factor * x.data<double>()[column];
      }
    }
    if (scenario.idle_last_shard && ep_size > 1) {
      // Feature 0 is 1 for every token and pushes the last shard's logits ~40 below the others.
      for (int64_t token = 0; token < tokens; ++token) x.data<double>()[token * kModel] = 1.0;
      for (int expert = kExperts - kExperts / ep_size; expert < kExperts; ++expert)
        router.data<double>()[expert] = -40.0;
    }
  }
};

// What one scenario produced on this rank: the EP layer's results and the reference's.
struct RunResult {
  std::vector<double> y, grad_x, grad_router, grad_w1, grad_w2;
  double aux = 0, z = 0;
  MoeRoutingStats stats;
  MoeExchangeStats exchange;
};

struct Reference {
  std::vector<double> y, grad_x, grad_router, grad_w1_full, grad_w2_full;
  double aux = 0, z = 0;
  MoeRoutingStats stats;
};

MoeForwardArgs forward_args(const Scenario& scenario) {
  MoeForwardArgs args;
  args.training = scenario.training;
  args.step = 5;
  return args;
}

Reference cpu_reference(const MoeLayerConfig& config, const Scenario& scenario, HostModel& model) {
  const ExecContext cpu{DeviceKind::cpu, nullptr};
  const int64_t tokens = model.x.tensor().dim(0);
  MoeLayer layer(config, DeviceKind::cpu, DType::f64, tokens);
  HostTensor y(DType::f64, {tokens, kModel}), grad_x(DType::f64, {tokens, kModel});
  HostTensor grad_router(DType::f64, {kModel, kExperts});
  HostTensor grad_w1(DType::f64, {kExperts, kModel, config.w1_columns()}),
      grad_w2(DType::f64, {kExperts, kHidden, kModel});
  const MoeLosses losses = layer.forward(cpu, model.x, {model.router, model.w1, model.w2}, forward_args(scenario), y);
  MoeGradients gradients{grad_router, grad_w1, grad_w2};
  layer.backward(cpu, model.grad_y, {model.router, model.w1, model.w2}, 1.0f, 1.0f, grad_x, gradients);
  Reference reference{to_vector(y), to_vector(grad_x), to_vector(grad_router), to_vector(grad_w1), to_vector(grad_w2),
                      losses.aux_loss, losses.z_loss, layer.read_routing_stats(cpu)};
  return reference;
}

RunResult cpu_expert_parallel(const MoeLayerConfig& config, const Scenario& scenario, HostModel& model,
                              ParallelGroups& groups, EpOverlap overlap = EpOverlap::none) {
  const ExecContext cpu{DeviceKind::cpu, nullptr};
  const int64_t tokens = model.x.tensor().dim(0);
  MoeEpLayer layer(config, groups.expert_parallel, DeviceKind::cpu, DType::f64, tokens + 3,
                   layer_options(groups, scenario.chunks, EpTransport::automatic, EpDispatch::activation, overlap));
  EXPECT_EQ(layer.overlap(), overlap);
  const int first = layer.first_expert(), local = layer.local_experts();
  MoeWeights weights{model.router, expert_view(model.w1, first, local), expert_view(model.w2, first, local)};
  HostTensor y(DType::f64, {tokens, kModel}), grad_x(DType::f64, {tokens, kModel});
  HostTensor grad_router(DType::f64, {kModel, kExperts});
  HostTensor grad_w1(DType::f64, {local, kModel, config.w1_columns()}), grad_w2(DType::f64, {local, kHidden, kModel});
  for (HostTensor* output : {&y, &grad_x, &grad_router, &grad_w1, &grad_w2}) poison(output->tensor());
  const MoeLosses losses = layer.forward(cpu, model.x, weights, forward_args(scenario), y);
  MoeGradients gradients{grad_router, grad_w1, grad_w2};
  layer.backward(cpu, model.grad_y, weights, 1.0f, 1.0f, grad_x, gradients);
  return RunResult{to_vector(y),       to_vector(grad_x),  to_vector(grad_router),      to_vector(grad_w1),
                   to_vector(grad_w2), losses.aux_loss,    losses.z_loss,               layer.read_routing_stats(cpu),
                   layer.exchange_stats()};
}

// Sums `values` over `communicator` (an MPI communicator of host buffers) in place.
void sum_over(Communicator& communicator, std::vector<double>& values) {
  communicator.all_reduce_sum(values.data(), int64_t(values.size()), DType::f64);
}

void check_scenario(const Scenario& scenario, const RunResult& result, const Reference& reference,
                    ParallelGroups& cpu_groups, int local, double tolerance) {
  Communicator& ep = *cpu_groups.expert_parallel;
  const int first = ep.rank() * local;
  expect_close("y", result.y, reference.y, tolerance);
  expect_close("grad_x", result.grad_x, reference.grad_x, tolerance);
  expect_close("grad_router", result.grad_router, reference.grad_router, tolerance);
  EXPECT_NEAR(result.aux, reference.aux, tolerance * std::fabs(reference.aux) + 1e-300) << "aux loss";
  EXPECT_NEAR(result.z, reference.z, tolerance * std::fabs(reference.z) + 1e-300) << "z loss";
  EXPECT_EQ(result.stats.dropped_choices, reference.stats.dropped_choices);
  EXPECT_EQ(result.stats.total_choices, reference.stats.total_choices);
  // Expert gradients: the references' full gradients summed over the EP group, this rank's slice.
  std::vector<double> w1_sum = reference.grad_w1_full, w2_sum = reference.grad_w2_full;
  sum_over(ep, w1_sum);
  sum_over(ep, w2_sum);
  const int64_t w1_matrix = int64_t(w1_sum.size()) / kExperts, w2_matrix = int64_t(w2_sum.size()) / kExperts;
  expect_close("grad_w1 (local experts)", result.grad_w1,
               std::vector<double>(w1_sum.begin() + first * w1_matrix, w1_sum.begin() + (first + local) * w1_matrix),
               tolerance);
  expect_close("grad_w2 (local experts)", result.grad_w2,
               std::vector<double>(w2_sum.begin() + first * w2_matrix, w2_sum.begin() + (first + local) * w2_matrix),
               tolerance);

  // Rows conserve over the group: everything sent is received somewhere.
  std::vector<double> rows{double(result.exchange.sent_rows), double(result.exchange.received_rows)};
  sum_over(ep, rows);
  EXPECT_EQ(rows[0], rows[1]) << "rows sent and received over the EP group differ";
  // The scenarios must exercise what they claim.
  if (scenario.one_expert_rank && ep.rank() == 0) EXPECT_GT(result.stats.dropped_choices, 0);
  if (scenario.idle_last_shard && ep.size() > 1 && ep.rank() == ep.size() - 1) {
    EXPECT_EQ(result.exchange.received_rows, 0) << "the idle shard received rows";
    EXPECT_EQ(relative_error(result.grad_w1, std::vector<double>(result.grad_w1.size(), 0.0)), 0.0);
  }
  if (!scenario.idle_last_shard) EXPECT_GT(result.exchange.received_rows, 0);
}

class ExpertParallel : public ::testing::TestWithParam<Scenario> {};

TEST_P(ExpertParallel, CpuMatchesSingleRankReference) {
  const Scenario& scenario = GetParam();
  const MoeLayerConfig config = make_config(scenario);
  const int world_size = bootstrap_process(DeviceKind::cpu).world_size;
  const int world_rank = bootstrap_process(DeviceKind::cpu).world_rank;
  uint64_t salt = 1;
  for (int ep_size : ep_sizes_to_test(world_size)) {
    for (int ranks_per_node : node_sizes_to_test(ep_size)) {  // 0: one node; else the hierarchical exchange
      SCOPED_TRACE(::testing::Message() << "ep_size " << ep_size << ", ranks_per_node " << ranks_per_node
                                        << ", seed " << shared_seed());
      ParallelGroups& groups = groups_for(DeviceKind::cpu, ep_size, ranks_per_node);
      HostModel model(config, scenario, world_rank, groups.expert_parallel->rank(), ep_size, salt++);
      const Reference reference = cpu_reference(config, scenario, model);
      for (EpOverlap overlap : overlaps_to_test()) {
        SCOPED_TRACE(::testing::Message() << "ep_overlap " << ep_overlap_name(overlap));
        const RunResult result = cpu_expert_parallel(config, scenario, model, groups, overlap);
        check_scenario(scenario, result, reference, groups, kExperts / ep_size, 1e-12);
      }
    }
  }
}

// ---- The same on GPUs over NCCL, against the single-GPU layer -----------------------------------

#if defined(SWITCHYARD_WITH_CUDA)
// A device tensor of `dtype` holding a host f64 tensor's values (rounded), or poison.
struct DeviceArray {
  Buffer memory;
  Tensor tensor;
  DeviceArray(DType dtype, const Tensor& shape_of) {
    tensor = shape_of;
    tensor.dtype = dtype;
    tensor.device = DeviceKind::cuda;
    memory = Buffer(DeviceKind::cuda, tensor.bytes());
    tensor.data = memory.data();
    device_memset(tensor.data, DeviceKind::cuda, 0xFF, tensor.bytes());  // NaN in every float type
  }
  DeviceArray(DType dtype, const Tensor& source, bool upload) : DeviceArray(dtype, source) {
    if (!upload) return;
    HostTensor staged(dtype, {source.numel()});
    copy_values(source, staged.tensor());
    device_copy(tensor.data, DeviceKind::cuda, staged.tensor().data, DeviceKind::cpu, tensor.bytes());
  }
  std::vector<double> download() const {
    HostTensor host(tensor.dtype, {tensor.numel()});
    device_copy(host.tensor().data, DeviceKind::cpu, tensor.data, DeviceKind::cuda, tensor.bytes());
    return to_vector(host);
  }
};

struct GpuModel {
  DeviceArray router, w1, w2, x, grad_y;
  explicit GpuModel(HostModel& host)
      : router(DType::bf16, host.router, true), w1(DType::bf16, host.w1, true), w2(DType::bf16, host.w2, true),
        x(DType::bf16, host.x, true), grad_y(DType::bf16, host.grad_y, true) {}
};

Reference gpu_reference(const ExecContext& gpu, const MoeLayerConfig& config, const Scenario& scenario,
                        GpuModel& model) {
  const Tensor& x = model.x.tensor;
  MoeLayer layer(config, DeviceKind::cuda, DType::bf16, x.dim(0));
  DeviceArray y(DType::bf16, x), grad_x(DType::bf16, x), grad_router(DType::f32, model.router.tensor),
      grad_w1(DType::f32, model.w1.tensor), grad_w2(DType::f32, model.w2.tensor);
  const MoeWeights weights{model.router.tensor, model.w1.tensor, model.w2.tensor};
  const MoeLosses losses = layer.forward(gpu, x, weights, forward_args(scenario), y.tensor);
  MoeGradients gradients{grad_router.tensor, grad_w1.tensor, grad_w2.tensor};
  layer.backward(gpu, model.grad_y.tensor, weights, 1.0f, 1.0f, grad_x.tensor, gradients);
  ops::synchronize(gpu);
  return Reference{y.download(),       grad_x.download(), grad_router.download(), grad_w1.download(),
                   grad_w2.download(), losses.aux_loss,   losses.z_loss,          layer.read_routing_stats(gpu)};
}

// Two forward+backward passes (the second reuses the buffers and, for nvlink, the signal counts),
// the second's results returned. *used: the transport the layer picked.
RunResult gpu_expert_parallel(const ExecContext& gpu, const MoeLayerConfig& config, const Scenario& scenario,
                              GpuModel& model, ParallelGroups& groups, EpTransport transport, EpOverlap overlap,
                              EpTransport* used) {
  const Tensor& x = model.x.tensor;
  MoeEpLayer layer(config, groups.expert_parallel, DeviceKind::cuda, DType::bf16, x.dim(0) + 3,
                   layer_options(groups, scenario.chunks, transport, EpDispatch::activation, overlap));
  *used = layer.transport();
  const int first = layer.first_expert(), local = layer.local_experts();
  const MoeWeights weights{model.router.tensor, expert_view(model.w1.tensor, first, local),
                           expert_view(model.w2.tensor, first, local)};
  DeviceArray y(DType::bf16, x), grad_x(DType::bf16, x), grad_router(DType::f32, model.router.tensor),
      grad_w1(DType::f32, weights.w1), grad_w2(DType::f32, weights.w2);
  MoeLosses losses;
  MoeGradients gradients{grad_router.tensor, grad_w1.tensor, grad_w2.tensor};
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1)  // poison the outputs between the passes: the second must write them all again
      for (DeviceArray* output : {&y, &grad_x, &grad_router, &grad_w1, &grad_w2})
        device_memset(output->tensor.data, DeviceKind::cuda, 0xFF, output->tensor.bytes());
    losses = layer.forward(gpu, x, weights, forward_args(scenario), y.tensor);
    layer.backward(gpu, model.grad_y.tensor, weights, 1.0f, 1.0f, grad_x.tensor, gradients);
  }
  ops::synchronize(gpu);
  return RunResult{y.download(),       grad_x.download(), grad_router.download(),          grad_w1.download(),
                   grad_w2.download(), losses.aux_loss,   losses.z_loss, layer.read_routing_stats(gpu),
                   layer.exchange_stats()};
}
#endif

TEST_P(ExpertParallel, NcclMatchesSingleGpuLayer) {
  std::string reason;
  if (!nccl_usable(&reason)) GTEST_SKIP() << reason;
#if defined(SWITCHYARD_WITH_CUDA)
  const Scenario& scenario = GetParam();
  const MoeLayerConfig config = make_config(scenario);
  const int world_size = bootstrap_process(DeviceKind::cuda).world_size;
  const int world_rank = bootstrap_process(DeviceKind::cuda).world_rank;
  uint64_t salt = 101;
  for (int ep_size : ep_sizes_to_test(world_size))
  for (int ranks_per_node : node_sizes_to_test(ep_size)) {  // > 0: the hierarchical exchange over NCCL
    SCOPED_TRACE(::testing::Message() << "ep_size " << ep_size << ", ranks_per_node " << ranks_per_node << ", seed "
                                      << shared_seed());
    ParallelGroups& gpu_groups = groups_for(DeviceKind::cuda, ep_size, ranks_per_node);
    ParallelGroups& cpu_groups = groups_for(DeviceKind::cpu, ep_size);  // same members, for host sums
    HostModel host(config, scenario, world_rank, gpu_groups.expert_parallel->rank(), ep_size, salt++);
    GpuModel model(host);
    const ExecContext gpu{DeviceKind::cuda, create_stream(DeviceKind::cuda)};
    const Reference reference = gpu_reference(gpu, config, scenario, model);
    // Both transports: NCCL, and rows written straight into peer memory where the group allows it.
    for (EpTransport transport : {EpTransport::nccl, EpTransport::automatic}) {
      for (EpOverlap overlap : overlaps_to_test()) {
        EpTransport used = EpTransport::nccl;
        const RunResult result =
            gpu_expert_parallel(gpu, config, scenario, model, gpu_groups, transport, overlap, &used);
        SCOPED_TRACE(::testing::Message() << "transport " << ep_transport_name(used) << ", ep_overlap "
                                          << ep_overlap_name(overlap));
        if (transport == EpTransport::automatic && used != EpTransport::nvlink && world_rank == 0 &&
            overlap == EpOverlap::none)
          std::printf("[ note     ] the nvlink transport is not available here; auto chose %s\n",
                      ep_transport_name(used));
        // bf16 activations; GEMMs over different row counts may round differently.
        check_scenario(scenario, result, reference, cpu_groups, kExperts / ep_size, 1e-2);
      }
    }
    destroy_stream(DeviceKind::cuda, gpu.stream);
  }
#endif
}

INSTANTIATE_TEST_SUITE_P(Scenarios, ExpertParallel, ::testing::ValuesIn(kScenarios),
                         [](const ::testing::TestParamInfo<Scenario>& info) { return std::string(info.param.name); });

// ---- Gradient all-reduce ---------------------------------------------------------------------

// Small integers, distinct per (rank, tensor, element), so every sum is exact in f32 and f64.
double gradient_value(int rank, int tensor, int64_t index) {
  const double magnitude = double((rank + 1) * 64 + tensor * 7 + index % 13);
  return index % 2 ? -magnitude : magnitude;
}

struct GradientSet {
  std::vector<HostTensor> tensors;
  std::vector<Tensor> views() {
    std::vector<Tensor> result;
    for (HostTensor& tensor : tensors) result.push_back(tensor.tensor());
    return result;
  }
};

// Mixed dtypes and sizes: with a 256-byte bucket some tensors share buckets, some fill one alone
// (reduced in place), and dtype changes split buckets.
GradientSet make_gradients(const std::vector<std::pair<DType, int64_t>>& shapes, int rank, int salt) {
  GradientSet set;
  for (size_t tensor = 0; tensor < shapes.size(); ++tensor) {
    set.tensors.emplace_back(shapes[tensor].first, std::initializer_list<int64_t>{shapes[tensor].second});
    for (int64_t index = 0; index < shapes[tensor].second; ++index)
      set_element(set.tensors.back(), index, gradient_value(rank, int(tensor) + salt, index));
  }
  return set;
}

void expect_reduced(const char* what, GradientSet& set, const std::vector<int>& ranks, int salt, int world_size,
                    bool average) {
  for (size_t tensor = 0; tensor < set.tensors.size(); ++tensor) {
    const Tensor& view = set.tensors[tensor].tensor();
    int64_t mismatches = 0;
    for (int64_t index = 0; index < view.numel(); ++index) {
      double sum = 0;
      for (int rank : ranks) sum += gradient_value(rank, int(tensor) + salt, index);
      double expected = sum;
      if (average)
        expected = view.dtype == DType::f32 ? double(float(sum) / float(world_size)) : sum / double(world_size);
      mismatches += get_element(view, index) != expected;
    }
    EXPECT_EQ(mismatches, 0) << what << " tensor " << tensor << " (" << view.describe() << ")";
  }
}

TEST(GradientSync, ExactSumsOverWorldAndExpertDataParallelGroups) {
  const ProcessContext& context = bootstrap_process(DeviceKind::cpu);
  const ExecContext cpu{DeviceKind::cpu, nullptr};
  const std::vector<std::pair<DType, int64_t>> dense_shapes{
      {DType::f32, 5}, {DType::f32, 300}, {DType::f32, 17}, {DType::f64, 40}, {DType::f64, 3}, {DType::f32, 9}};
  const std::vector<std::pair<DType, int64_t>> expert_shapes{{DType::f32, 64}, {DType::f32, 9}, {DType::f64, 7}};
  for (int ep_size : ep_sizes_to_test(context.world_size)) {
    ParallelGroups& groups = groups_for(DeviceKind::cpu, ep_size);
    std::vector<int> world, shard;  // the world; the ranks holding this rank's expert shard
    for (int rank = 0; rank < context.world_size; ++rank) {
      world.push_back(rank);
      if (rank % ep_size == context.world_rank % ep_size) shard.push_back(rank);
    }
    for (bool average : {false, true}) {
      for (int64_t bucket_bytes : {int64_t(256), int64_t(32) << 20}) {
        SCOPED_TRACE(::testing::Message() << "ep_size " << ep_size << ", average " << average << ", bucket "
                                          << bucket_bytes);
        GradientSet dense = make_gradients(dense_shapes, context.world_rank, 0);
        GradientSet expert = make_gradients(expert_shapes, context.world_rank, 50);
        GradientSyncOptions options;
        options.bucket_bytes = bucket_bytes;
        options.average = average;
        all_reduce_gradients(cpu, groups, dense.views(), expert.views(), options);
        expect_reduced("dense", dense, world, 0, context.world_size, average);
        expect_reduced("expert", expert, shard, 50, context.world_size, average);
      }
    }
  }
}

// An EP x expert-DP step (EP layer + gradient sync, averaged) equals W data-parallel ranks each
// holding every expert: the world average of the single-rank reference gradients.
TEST(GradientSync, ExpertParallelStepMatchesDataParallelAverage) {
  const ProcessContext& context = bootstrap_process(DeviceKind::cpu);
  const Scenario& scenario = kScenarios[0];
  const MoeLayerConfig config = make_config(scenario);
  const ExecContext cpu{DeviceKind::cpu, nullptr};
  for (int ep_size : ep_sizes_to_test(context.world_size)) {
    SCOPED_TRACE(::testing::Message() << "ep_size " << ep_size << ", seed " << shared_seed());
    ParallelGroups& groups = groups_for(DeviceKind::cpu, ep_size);
    HostModel model(config, scenario, context.world_rank, groups.expert_parallel->rank(), ep_size, 500);
    Reference reference = cpu_reference(config, scenario, model);
    RunResult result = cpu_expert_parallel(config, scenario, model, groups);
    const int local = kExperts / ep_size, first = groups.expert_parallel->rank() * local;
    Tensor router(result.grad_router.data(), DType::f64, DeviceKind::cpu, {int64_t(result.grad_router.size())});
    Tensor w1(result.grad_w1.data(), DType::f64, DeviceKind::cpu, {int64_t(result.grad_w1.size())});
    Tensor w2(result.grad_w2.data(), DType::f64, DeviceKind::cpu, {int64_t(result.grad_w2.size())});
    all_reduce_gradients(cpu, groups, {router}, {w1, w2});

    for (std::vector<double>* full : {&reference.grad_router, &reference.grad_w1_full, &reference.grad_w2_full}) {
      sum_over(*groups.world, *full);
      for (double& value : *full) value /= double(context.world_size);
    }
    const int64_t w1_matrix = int64_t(reference.grad_w1_full.size()) / kExperts;
    const int64_t w2_matrix = int64_t(reference.grad_w2_full.size()) / kExperts;
    expect_close("grad_router", result.grad_router, reference.grad_router, 1e-12);
    expect_close("grad_w1", result.grad_w1,
                 std::vector<double>(reference.grad_w1_full.begin() + first * w1_matrix,
                                     reference.grad_w1_full.begin() + (first + local) * w1_matrix),
                 1e-12);
    expect_close("grad_w2", result.grad_w2,
                 std::vector<double>(reference.grad_w2_full.begin() + first * w2_matrix,
                                     reference.grad_w2_full.begin() + (first + local) * w2_matrix),
                 1e-12);
  }
}

}  // namespace
