// Streaming mode on CUDA: the graph replay of MoeStreamStep must compute exactly what the same
// layer computes eagerly in inference (same kernels, same inputs: bitwise equal), for several
// token counts -- up to the layer's small-batch threshold the graph holds the small-batch expert
// op, above it the padded grouped-GEMM path -- with fresh inputs on every replay and the output
// poisoned before it; replays must not allocate;
// configurations that cannot be captured are rejected up front. Also the router running sums on
// CUDA (src/ops/cuda/router_sums.cu) against the CPU reference applied to the same routing, and
// the router statistics recorder reading them back.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "src/ops/ops.h"
#include "src/ops/router_sums.h"
#include "src/core/timing.h"
#include "src/model/moe_stream.h"
#include "src/train/router_stats.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

MoeLayerConfig stream_config(int k) {
  MoeLayerConfig config;
  config.d_model = 256;
  config.moe.expert_d_ff = 512;
  config.moe.num_experts = 8;
  config.moe.top_k = config.moe.k_min = k;
  config.moe.renormalize_gates = k > 1;
  config.moe.dropless = true;
  config.moe.segment_alignment = 128;
  return config;
}

// A device bf16 buffer of normal(0, stddev) values.
Buffer random_device(int64_t count, double stddev, uint64_t seed) {
  HostTensor host(DType::bf16, {count});
  std::mt19937_64 generator(seed);
  fill_normal(host, generator, 0.0, stddev);
  Buffer device(DeviceKind::cuda, host.tensor().bytes());
  device_copy(device.data(), DeviceKind::cuda, host.tensor().data, DeviceKind::cpu, host.tensor().bytes());
  return device;
}

std::vector<uint16_t> download_bits(const Tensor& tensor) {
  std::vector<uint16_t> bits(size_t(tensor.numel()));
  device_copy(bits.data(), DeviceKind::cpu, tensor.data, DeviceKind::cuda, tensor.bytes());
  return bits;
}

struct StreamWeights {
  Buffer router, w1, w2;
  MoeWeights weights;
  explicit StreamWeights(const MoeLayerConfig& config) {
    const int64_t d = config.d_model, f = config.moe.expert_d_ff, e = config.moe.num_experts;
    router = random_device(d * e, 1.0 / std::sqrt(double(d)), 1);
    w1 = random_device(e * d * config.w1_columns(), 1.0 / std::sqrt(double(d)), 2);
    w2 = random_device(e * f * d, 1.0 / std::sqrt(double(f)), 3);
    weights = {router.view(DType::bf16, {d, e}), w1.view(DType::bf16, {e, d, config.w1_columns()}),
               w2.view(DType::bf16, {e, f, d})};
  }
};

class MoeStreamCuda : public ::testing::TestWithParam<int> {};

TEST_P(MoeStreamCuda, GraphReplayEqualsEagerForward) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const MoeLayerConfig config = stream_config(GetParam());
  StreamWeights weights(config);
  MoeStreamOptions options;
  options.max_tokens = 96;
  MoeStreamStep stream(config, DeviceKind::cuda, DType::bf16, weights.weights, options);
  ASSERT_TRUE(stream.uses_graph());
  const int64_t small_batch_tokens = stream.layer().small_batch_tokens();
  EXPECT_GT(small_batch_tokens, 0) << "SWITCHYARD_SMALL_BATCH_TOKENS=0 in the environment?";
  MoeLayer eager(config, DeviceKind::cuda, DType::bf16, 96);
  const ExecContext eager_context{DeviceKind::cuda, nullptr};
  Buffer eager_out(DeviceKind::cuda, size_t(96 * config.d_model) * 2);
  uint64_t seed = 100;
  for (int64_t tokens : {32, 1, 64, 8, 80, 32}) {  // 32 twice: the second replays the first graph
    for (int replay = 0; replay < 2; ++replay) {   // fresh input each replay
      Buffer x = random_device(tokens * config.d_model, 1.0, seed++);
      Tensor input = stream.input(tokens);
      device_copy(input.data, DeviceKind::cuda, x.data(), DeviceKind::cuda, input.bytes());
      Tensor output = stream.output(tokens);
      device_memset(output.data, DeviceKind::cuda, 0xFF, output.bytes());  // NaN poison
      const bool captures_now = !stream.has_graph(tokens);
      stream.run(tokens);
      stream.synchronize();
      ASSERT_TRUE(stream.has_graph(tokens));
      if (captures_now)  // the layer's path flag is that of the forward just captured
        EXPECT_EQ(stream.layer().last_forward_small_batch(), tokens <= small_batch_tokens)
            << tokens << " tokens: streaming mode must run the inference forward (for_backward = false)";

      MoeForwardArgs args;
      args.read_losses = false;
      args.for_backward = false;  // inference, as streaming mode runs it
      Tensor eager_x = x.view(DType::bf16, {tokens, config.d_model});
      Tensor eager_y = eager_out.view(DType::bf16, {tokens, config.d_model});
      eager.forward(eager_context, eager_x, weights.weights, args, eager_y);
      ops::synchronize(eager_context);
      const std::vector<uint16_t> got = download_bits(output), want = download_bits(eager_y);
      size_t differing = 0;
      for (size_t index = 0; index < got.size(); ++index) differing += got[index] != want[index];
      EXPECT_EQ(differing, 0u) << tokens << " tokens, replay " << replay;
    }
  }
  EXPECT_EQ(stream.graph_count(), 5);

  // Replays allocate nothing, and step() from host memory gives the same as run() on the buffer.
  const AllocatorStats before = cuda_allocator_stats();
  for (int replay = 0; replay < 50; ++replay) stream.run(32);
  stream.synchronize();
  EXPECT_EQ(cuda_allocator_stats().driver_allocations, before.driver_allocations);
  HostTensor host_x(DType::bf16, {32, config.d_model}), host_y(DType::bf16, {32, config.d_model});
  std::mt19937_64 generator(7);
  fill_normal(host_x, generator, 0.0, 1.0);
  poison(host_y);
  stream.step(host_x, host_y);
  const std::vector<uint16_t> direct = download_bits(stream.output(32));
  EXPECT_EQ(std::memcmp(direct.data(), host_y.tensor().data, host_y.tensor().bytes()), 0);
}

INSTANTIATE_TEST_SUITE_P(TopK, MoeStreamCuda, ::testing::Values(1, 2));

TEST(MoeStreamCudaTiming, MeasuresPositiveLatencies) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const MoeLayerConfig config = stream_config(1);
  StreamWeights weights(config);
  MoeStreamStep stream(config, DeviceKind::cuda, DType::bf16, weights.weights);
  HostTensor x(DType::bf16, {16, config.d_model}), y(DType::bf16, {16, config.d_model});
  std::mt19937_64 generator(9);
  fill_normal(x, generator, 0.0, 1.0);
  const StreamLatency latency = measure_stream_latency(stream, x, y, 3, 20);
  ASSERT_EQ(latency.step_us.size(), 20u);
  ASSERT_EQ(latency.request_us.size(), 20u);
  for (double value : latency.step_us) EXPECT_GT(value, 0.0);
  EXPECT_GT(latency.steps_per_s, 0.0);
  EXPECT_GT(latency.pipelined_steps_per_s, 0.0);
}

TEST(MoeStreamCuda, RejectsConfigurationsThatCannotBeCaptured) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  MoeLayerConfig config = stream_config(1);
  StreamWeights weights(config);
  auto expect_bad_input = [&](const MoeLayerConfig& bad, DType dtype) {
    try {
      MoeStreamStep stream(bad, DeviceKind::cuda, dtype, weights.weights);
      ADD_FAILURE() << "accepted a configuration that cannot be captured";
    } catch (const Error& error) {
      EXPECT_EQ(error.exit_code(), kExitBadInput) << error.what();
    }
  };
  MoeLayerConfig unaligned = config;
  unaligned.moe.segment_alignment = 16;
  expect_bad_input(unaligned, DType::bf16);
  MoeLayerConfig dense = config;
  dense.moe.compute_mode = ExpertComputeMode::dense;
  expect_bad_input(dense, DType::bf16);
  expect_bad_input(config, DType::f16);
  MoeStreamOptions eager;
  eager.use_graph = false;  // eager mode takes any layer configuration
  MoeStreamStep stream(unaligned, DeviceKind::cuda, DType::bf16, weights.weights, eager);
  EXPECT_FALSE(stream.uses_graph());
}

// The CPU backend runs the same step eagerly on its fixed buffers (no GPU needed).
TEST(MoeStreamCpu, StepEqualsTheLayerForward) {
  MoeLayerConfig config = stream_config(2);
  config.d_model = 16;
  config.moe.expert_d_ff = 24;
  config.moe.segment_alignment = 4;
  HostTensor router(DType::f32, {16, 8}), w1(DType::f32, {8, 16, 24}), w2(DType::f32, {8, 24, 16});
  std::mt19937_64 generator(21);
  fill_normal(router, generator, 0.0, 0.5);
  fill_normal(w1, generator, 0.0, 0.25);
  fill_normal(w2, generator, 0.0, 0.2);
  const MoeWeights weights{router, w1, w2};
  MoeStreamOptions options;
  options.max_tokens = 12;
  MoeStreamStep stream(config, DeviceKind::cpu, DType::f32, weights, options);
  EXPECT_FALSE(stream.uses_graph());
  MoeLayer reference(config, DeviceKind::cpu, DType::f32, 12);
  const ExecContext cpu{DeviceKind::cpu, nullptr};
  for (int64_t tokens : {12, 3, 7}) {
    HostTensor x(DType::f32, {tokens, 16}), y(DType::f32, {tokens, 16}), want(DType::f32, {tokens, 16});
    fill_uniform(x, generator, -1.0, 1.0);
    poison(y);
    stream.step(x, y);
    MoeForwardArgs args;
    args.read_losses = false;
    reference.forward(cpu, x, weights, args, want);
    EXPECT_EQ(max_abs_difference(y, want), 0.0) << tokens << " tokens";
  }
  HostTensor too_many(DType::f32, {13, 16}), out(DType::f32, {13, 16});
  EXPECT_THROW(stream.step(too_many, out), Error);
}

// ---- Router running sums on CUDA ------------------------------------------------------------

// A host copy of a device tensor (same dtype).
HostTensor to_host(const Tensor& device) {
  HostTensor host(device.dtype, {device.numel()});
  device_copy(host.tensor().data, DeviceKind::cpu, device.data, DeviceKind::cuda, device.bytes());
  Tensor& view = host.tensor();
  view.rank = device.rank;
  view.shape = device.shape;
  return host;
}

TEST(RouterSumsCuda, MatchTheCpuReferenceOnTheSameRouting) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (int k : {1, 2}) {
    MoeLayerConfig config = stream_config(k);
    config.moe.dropless = false;
    config.moe.capacity_factor = 0.9f;  // drops
    config.moe.num_experts = 24;
    StreamWeights weights(config);
    const int64_t tokens = 777;
    MoeLayer layer(config, DeviceKind::cuda, DType::bf16, tokens);
    Buffer x = random_device(tokens * config.d_model, 1.0, 50 + uint64_t(k)),
           y(DeviceKind::cuda, size_t(tokens * config.d_model) * 2);
    const ExecContext context{DeviceKind::cuda, nullptr};
    MoeForwardArgs args;
    args.training = true;
    Tensor x_view = x.view(DType::bf16, {tokens, config.d_model}),
           y_view = y.view(DType::bf16, {tokens, config.d_model});
    layer.forward(context, x_view, weights.weights, args, y_view);

    const int64_t width = kNumRouterSums + config.moe.num_experts;
    HostTensor start(DType::f64, {width});
    std::mt19937_64 generator(3);
    fill_uniform(start, generator, -2, 2);
    Buffer accumulator(DeviceKind::cuda, size_t(width) * 8),
        scratch(DeviceKind::cuda, size_t(kRouterSumsScratchDoubles) * 8);
    device_copy(accumulator.data(), DeviceKind::cuda, start.tensor().data, DeviceKind::cpu, size_t(width) * 8);
    Tensor accumulator_view = accumulator.view(DType::f64, {width});
    Tensor scratch_view = scratch.view(DType::f64, {kRouterSumsScratchDoubles});
    device_memset(scratch.data(), DeviceKind::cuda, 0xFF, scratch.bytes());  // poison the partials
    // Twice: the second call adds to the first.
    ops::accumulate_router_sums(context, layer.routing(), layer.logits(), accumulator_view, scratch_view);
    ops::accumulate_router_sums(context, layer.routing(), layer.logits(), accumulator_view, scratch_view);
    HostTensor got(DType::f64, {width});
    device_copy(got.tensor().data, DeviceKind::cpu, accumulator.data(), DeviceKind::cuda, size_t(width) * 8);

    // The CPU reference on host copies of the same routing.
    const RoutingResult& routing = layer.routing();
    HostTensor ids = to_host(routing.expert_ids), gates = to_host(routing.gates), slots = to_host(routing.slots),
               token_k = to_host(routing.token_k), lse = to_host(routing.logsumexp),
               counts = to_host(routing.expert_counts), scalars = to_host(routing.scalars),
               losses = to_host(routing.losses), logits = to_host(layer.logits());
    RoutingResult host_routing = routing;
    host_routing.expert_ids = ids;
    host_routing.gates = gates;
    host_routing.slots = slots;
    host_routing.token_k = token_k;
    host_routing.logsumexp = lse;
    host_routing.expert_counts = counts;
    host_routing.scalars = scalars;
    host_routing.losses = losses;
    HostTensor want(DType::f64, {width});
    std::memcpy(want.tensor().data, start.tensor().data, size_t(width) * 8);
    cpu::accumulate_router_sums(host_routing, logits, want);
    cpu::accumulate_router_sums(host_routing, logits, want);
    ASSERT_GT(scalars.data<int32_t>()[kDroppedChoices], 0) << "the case must drop choices";
    for (int64_t index = 0; index < width; ++index)
      EXPECT_NEAR(got.data<double>()[index], want.data<double>()[index],
                  2e-6 * std::max(1.0, std::fabs(want.data<double>()[index])))  // expf vs exp in the entropy
          << "sum " << index << ", k " << k;
  }
}

TEST(RouterStatsRecorderCuda, ReadsBackWhatWasRecorded) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  MoeLayerConfig config = stream_config(2);
  StreamWeights weights(config);
  const int64_t tokens = 300;
  MoeLayer layer(config, DeviceKind::cuda, DType::bf16, tokens);
  Buffer x = random_device(tokens * config.d_model, 1.0, 77), y(DeviceKind::cuda, size_t(tokens * config.d_model) * 2);
  void* stream = create_stream(DeviceKind::cuda);
  const ExecContext context{DeviceKind::cuda, stream};
  MoeForwardArgs args;
  args.training = true;
  Tensor x_view = x.view(DType::bf16, {tokens, config.d_model}), y_view = y.view(DType::bf16, {tokens, config.d_model});
  RouterStatsRecorder recorder(DeviceKind::cuda, 1, config.moe.num_experts);
  for (int step = 0; step < 3; ++step) {
    layer.forward(context, x_view, weights.weights, args, y_view);
    recorder.record(context, 0, layer.routing(), layer.logits());
  }
  std::vector<int32_t> counts(size_t(config.moe.num_experts));
  device_copy(counts.data(), DeviceKind::cpu, layer.routing().expert_counts.data, DeviceKind::cuda, counts.size() * 4);
  const std::vector<RouterLayerStats> stats = recorder.read_and_reset(context, nullptr);
  ASSERT_EQ(stats.size(), 1u);
  EXPECT_EQ(stats[0].forwards, 3);
  EXPECT_EQ(stats[0].tokens, 3 * tokens);
  EXPECT_EQ(stats[0].choices, 3 * tokens * 2);
  for (int expert = 0; expert < config.moe.num_experts; ++expert)
    EXPECT_EQ(stats[0].tokens_per_expert[size_t(expert)], 3 * counts[size_t(expert)]);
  EXPECT_GT(stats[0].router_entropy_normalized, 0.0);
  EXPECT_LE(stats[0].router_entropy_normalized, 1.0 + 1e-6);
  EXPECT_GT(stats[0].mean_gate, 0.0);
  EXPECT_EQ(recorder.read_and_reset(context, nullptr)[0].forwards, 0);
  destroy_stream(DeviceKind::cuda, stream);
}

}  // namespace
