// The small-batch expert op on CUDA (src/ops/small_batch_ops.h) against the float64 CPU
// reference on the same bf16/fp16-representable inputs (relative error within bf16 accuracy),
// over token counts 1 to 64, K 1 to 8, E 4 to 1024, gelu and swiglu, bf16 and fp16, spread and
// single-expert routings with dropped and empty choices; outputs and workspace poisoned before
// every call, a second call on the same workspace bit-identical. Then the MoE layer: its
// small-batch inference forward against its padded forward (SWITCHYARD_SMALL_BATCH_TOKENS=0),
// which forwards take which path, and a CUDA graph of the small-batch forward replaying what the
// eager forward computes without allocating. A last test prints the latency of both paths on the
// streaming benchmark's layer (d768, F3072, 32 experts, top-1) for the record.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "src/ops/small_batch_ops.h"
#include "src/core/switches.h"
#include "src/core/timing.h"
#include "src/model/moe_layer.h"
#include "src/model/moe_stream.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

double round_value(DType dtype, double value) { return double(round_to(dtype, float(value))); }

// Host values representable in `dtype`, so both sides start from identical inputs.
void fill_representable(Tensor& tensor, std::mt19937_64& generator, double stddev, DType dtype) {
  fill_normal(tensor, generator, 0.0, stddev);
  for (int64_t index = 0; index < tensor.numel(); ++index)
    set_element(tensor, index, round_value(dtype, get_element(tensor, index)));
}

enum class Spread : uint8_t { random, one_expert, all_dropped };

// A routing made by hand on the host (gates f64 holding fp32 values): K distinct experts per token,
// ~15% empty and ~15% dropped choices, token 0 dropping everything when T > 1, and at least one
// kept choice in all (unless all_dropped). one_expert: every token's first choice is expert E-1.
struct HostRouting {
  HostTensor expert_ids, gates, slots, scalars;
  HostRouting(int64_t tokens, int k, int experts, Spread spread, std::mt19937_64& generator)
      : expert_ids(DType::i32, {tokens, k}),
        gates(DType::f64, {tokens, k}),
        slots(DType::i32, {tokens, k}),
        scalars(DType::i32, {kNumRoutingScalars}) {
    const int capacity = 3;
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    std::vector<int> order(static_cast<size_t>(experts));
    for (int64_t token = 0; token < tokens; ++token) {
      std::iota(order.begin(), order.end(), 0);
      // A partial shuffle suffices for the first k entries (E may be 1024).
      for (int choice = 0; choice < k; ++choice)
        std::swap(order[size_t(choice)], order[size_t(choice + int(unit(generator) * (experts - choice)))]);
      if (spread == Spread::one_expert) {
        auto last = std::find(order.begin(), order.end(), experts - 1);
        std::swap(order[0], *last);
      }
      for (int choice = 0; choice < k; ++choice) {
        const int64_t index = token * k + choice;
        int expert = order[size_t(choice)], slot = int(unit(generator) * capacity);
        const double draw = unit(generator);
        const bool pinned = spread == Spread::one_expert && choice == 0;
        if (draw < 0.15 && !pinned) {
          expert = -1;
          slot = -1;
        } else if (draw < 0.3 && !pinned) {
          slot = capacity + int(unit(generator) * 2);
        }
        if ((tokens > 1 && token == 0) || spread == Spread::all_dropped) slot = capacity;
        if (spread != Spread::all_dropped && token == tokens - 1 && choice == 0 && (expert < 0 || slot >= capacity)) {
          expert = order[0];
          slot = 0;
        }
        expert_ids.data<int32_t>()[index] = expert;
        slots.data<int32_t>()[index] = slot;
        gates.data<double>()[index] = expert < 0 ? 0.0 : double(float(0.05 + unit(generator)));
      }
    }
    std::fill(scalars.data<int32_t>(), scalars.data<int32_t>() + kNumRoutingScalars, 0);
    scalars.data<int32_t>()[kCapacity] = capacity;
  }
  RoutingResult host() const {
    RoutingResult routing;
    routing.expert_ids = expert_ids;
    routing.gates = gates;
    routing.slots = slots;
    routing.scalars = scalars;
    return routing;
  }
  bool token_keeps_nothing(int64_t token, int k) const {
    for (int choice = 0; choice < k; ++choice) {
      const int64_t index = token * k + choice;
      if (expert_ids.data<int32_t>()[index] >= 0 && slots.data<int32_t>()[index] >= 0 &&
          slots.data<int32_t>()[index] < scalars.data<int32_t>()[kCapacity])
        return false;
    }
    return true;
  }
};

struct OpCase {
  const char* name;
  int64_t tokens;
  int k, experts;
  int64_t d_model, d_ff;
  ExpertActivation activation;
  DType dtype;
  Spread spread;
};

void PrintTo(const OpCase& test, std::ostream* os) { *os << test.name; }

class SmallBatchExpertsCuda : public ::testing::TestWithParam<OpCase> {};

TEST_P(SmallBatchExpertsCuda, MatchesTheCpuReference) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const OpCase& test = GetParam();
  const int64_t tokens = test.tokens, d = test.d_model, f = test.d_ff;
  const int64_t columns = test.activation == ExpertActivation::swiglu ? 2 * f : f;
  std::mt19937_64 generator(uint64_t(tokens * 7919 + test.k * 131 + test.experts) ^ uint64_t(d * f));
  HostTensor x(DType::f64, {tokens, d}), w1(DType::f64, {test.experts, d, columns}),
      w2(DType::f64, {test.experts, f, d});
  fill_representable(x, generator, 1.0, test.dtype);
  fill_representable(w1, generator, 1.0 / std::sqrt(double(d)), test.dtype);
  fill_representable(w2, generator, 1.0 / std::sqrt(double(f)), test.dtype);
  HostRouting routing(tokens, test.k, test.experts, test.spread, generator);

  HostTensor want(DType::f64, {tokens, d});
  cpu::small_batch_experts(test.activation, x, routing.host(), w1, w2, want);

  DeviceTensor device_x = to_device(x, test.dtype), device_w1 = to_device(w1, test.dtype),
               device_w2 = to_device(w2, test.dtype), device_y(test.dtype, {tokens, d});
  DeviceTensor ids = to_device(routing.expert_ids, DType::i32), slots = to_device(routing.slots, DType::i32),
               gates = to_device(routing.gates, DType::f32), scalars = to_device(routing.scalars, DType::i32);
  RoutingResult device_routing;
  device_routing.expert_ids = ids.tensor();
  device_routing.slots = slots.tensor();
  device_routing.gates = gates.tensor();
  device_routing.scalars = scalars.tensor();
  const size_t bytes = small_batch_geometry(tokens, test.k, test.experts, d, f, test.activation, 2).workspace_bytes;
  DeviceTensor workspace(DType::u8, {int64_t(bytes)});

  const ExecContext context{DeviceKind::cuda, create_stream(DeviceKind::cuda)};
  std::vector<HostTensor> results;
  for (int call = 0; call < 2; ++call) {  // the second call reuses the workspace the first left behind
    if (call == 0) device_memset(workspace.tensor().data, DeviceKind::cuda, 0xFF, bytes);  // counters -1, NaN rows
    device_memset(device_y.tensor().data, DeviceKind::cuda, 0xFF, device_y.tensor().bytes());  // NaN
    ops::small_batch_experts(context, test.activation, device_x.tensor(), device_routing, device_w1.tensor(),
                             device_w2.tensor(), workspace.tensor(), device_y.tensor());
    ops::synchronize(context);
    results.push_back(device_y.download());
  }
  destroy_stream(DeviceKind::cuda, context.stream);

  const HostTensor& got = results[0];
  EXPECT_TRUE(all_finite(got)) << "an output element was not written";
  EXPECT_LE(relative_error(got, want), 1e-2) << "max abs difference " << max_abs_difference(got, want);
  for (int64_t token = 0; token < tokens; ++token) {
    if (!routing.token_keeps_nothing(token, test.k)) continue;
    for (int64_t column = 0; column < d; ++column)
      ASSERT_EQ(get_element(got, token * d + column), 0.0) << "token " << token << " kept nothing";
  }
  EXPECT_EQ(std::memcmp(results[0].tensor().data, results[1].tensor().data, results[0].tensor().bytes()), 0)
      << "a second call gave different bits";
  double largest = 0.0;
  for (int64_t index = 0; index < want.numel(); ++index)
    largest = std::max(largest, std::fabs(get_element(want, index)));
  EXPECT_EQ(largest > 0.0, test.spread != Spread::all_dropped) << "a case that keeps choices must produce output";
}

INSTANTIATE_TEST_SUITE_P(
    Cases, SmallBatchExpertsCuda,
    ::testing::Values(
        // One token, one expert: its weights are split over many blocks (F splits in kernel 2).
        OpCase{"T1_K1_E32_gelu_D640_F1024", 1, 1, 32, 640, 1024, ExpertActivation::gelu_tanh, DType::bf16,
               Spread::random},
        OpCase{"T1_K8_E256_swiglu", 1, 8, 256, 128, 256, ExpertActivation::swiglu, DType::bf16, Spread::random},
        OpCase{"T64_K1_E4_gelu_drops", 64, 1, 4, 256, 512, ExpertActivation::gelu_tanh, DType::bf16, Spread::random},
        // All 64 tokens on one expert: 8 groups of 8 choices re-reading the tiles.
        OpCase{"T64_K1_E8_swiglu_one_expert_f16", 64, 1, 8, 256, 512, ExpertActivation::swiglu, DType::f16,
               Spread::one_expert},
        OpCase{"T64_K8_E256_gelu_512_choices", 64, 8, 256, 64, 128, ExpertActivation::gelu_tanh, DType::bf16,
               Spread::random},
        OpCase{"T64_K8_E32_swiglu_one_expert", 64, 8, 32, 64, 64, ExpertActivation::swiglu, DType::bf16,
               Spread::one_expert},
        // Partial tiles (D = 40, F = 24), three row chunks (D = 1096), the largest expert set.
        OpCase{"T33_K2_E16_swiglu_D40_F24", 33, 2, 16, 40, 24, ExpertActivation::swiglu, DType::bf16, Spread::random},
        OpCase{"T3_K4_E8_gelu_D1096_F40", 3, 4, 8, 1096, 40, ExpertActivation::gelu_tanh, DType::f16, Spread::random},
        OpCase{"T5_K2_E1024_gelu", 5, 2, 1024, 64, 64, ExpertActivation::gelu_tanh, DType::bf16, Spread::random},
        OpCase{"T9_K2_E8_all_dropped", 9, 2, 8, 64, 64, ExpertActivation::swiglu, DType::bf16, Spread::all_dropped}),
    [](const ::testing::TestParamInfo<OpCase>& info) { return std::string(info.param.name); });

TEST(SmallBatchExpertsCudaChecks, RejectsWhatItCannotRun) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 generator(3);
  HostRouting routing(2, 1, 4, Spread::random, generator);
  DeviceTensor ids = to_device(routing.expert_ids, DType::i32), slots = to_device(routing.slots, DType::i32),
               gates = to_device(routing.gates, DType::f32), scalars = to_device(routing.scalars, DType::i32);
  RoutingResult device_routing;
  device_routing.expert_ids = ids.tensor();
  device_routing.slots = slots.tensor();
  device_routing.gates = gates.tensor();
  device_routing.scalars = scalars.tensor();
  const ExecContext context{DeviceKind::cuda, nullptr};
  auto run = [&](int64_t d, int64_t f, size_t workspace_bytes) {
    DeviceTensor x(DType::bf16, {2, d}), y(DType::bf16, {2, d}), w1(DType::bf16, {4, d, f}), w2(DType::bf16, {4, f, d});
    DeviceTensor workspace(DType::u8, {int64_t(workspace_bytes)});
    ops::small_batch_experts(context, ExpertActivation::gelu_tanh, x.tensor(), device_routing, w1.tensor(), w2.tensor(),
                             workspace.tensor(), y.tensor());
    ops::synchronize(context);
  };
  const size_t enough = small_batch_geometry(2, 1, 4, 64, 64, ExpertActivation::gelu_tanh, 2).workspace_bytes;
  EXPECT_NO_THROW(run(64, 64, enough));
  EXPECT_THROW(run(64, 64, enough - 1), Error);                 // workspace too small
  EXPECT_THROW(run(60, 64, enough), Error);                     // D % 8
  EXPECT_THROW(run(64, 60, enough), Error);                     // F % 8
}

// ---- the MoE layer ----------------------------------------------------------------------------

// Sets the small-batch threshold (SWITCHYARD_SMALL_BATCH_TOKENS, src/core/switches.h) for one
// scope; nullopt: its default.
class ScopedSmallBatchTokens {
 public:
  explicit ScopedSmallBatchTokens(std::optional<int64_t> tokens) : scope_(with_tokens(tokens)) {}

 private:
  static Switches with_tokens(std::optional<int64_t> tokens) {
    Switches values = switches();
    values.small_batch_tokens = tokens.value_or(Switches{}.small_batch_tokens);
    return values;
  }
  ScopedSwitches scope_;
};

MoeLayerConfig layer_config(ExpertActivation activation, int k, bool dropless) {
  MoeLayerConfig config;
  config.d_model = 256;
  config.moe.expert_d_ff = 512;
  config.moe.num_experts = 16;
  config.moe.top_k = config.moe.k_min = k;
  config.moe.renormalize_gates = k > 1;
  config.moe.dropless = dropless;
  config.moe.eval_capacity_factor = 0.75f;  // drops when not dropless
  config.moe.segment_alignment = 128;
  config.moe.activation = activation;
  return config;
}

struct LayerWeights {
  DeviceTensor router, w1, w2;
  MoeWeights weights;
  LayerWeights(const MoeLayerConfig& config, uint64_t seed)
      : router(DType::bf16, {config.d_model, config.moe.num_experts}),
        w1(DType::bf16, {config.moe.num_experts, config.d_model, config.w1_columns()}),
        w2(DType::bf16, {config.moe.num_experts, config.moe.expert_d_ff, config.d_model}) {
    std::mt19937_64 generator(seed);
    for (DeviceTensor* target : {&router, &w1, &w2}) {
      HostTensor host(DType::f64, {target->tensor().numel()});
      const double fan_in = target == &w2 ? double(config.moe.expert_d_ff) : double(config.d_model);
      fill_representable(host, generator, 1.0 / std::sqrt(fan_in), DType::bf16);
      target->upload(host);
    }
    weights = {router.tensor(), w1.tensor(), w2.tensor()};
  }
};

class StageRecorder : public MoeStageObserver {
 public:
  void stage_begin(const ExecContext&, const char* stage) override { stages.emplace_back(stage); }
  void stage_end(const ExecContext&, const char*) override {}
  bool saw(const std::string& stage) const { return std::find(stages.begin(), stages.end(), stage) != stages.end(); }
  std::vector<std::string> stages;
};

struct LayerCase {
  const char* name;
  ExpertActivation activation;
  int k;
  bool dropless;
};

void PrintTo(const LayerCase& test, std::ostream* os) { *os << test.name; }

class MoeLayerSmallBatchCuda : public ::testing::TestWithParam<LayerCase> {};

TEST_P(MoeLayerSmallBatchCuda, InferenceForwardEqualsThePaddedForward) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const LayerCase& test = GetParam();
  const MoeLayerConfig config = layer_config(test.activation, test.k, test.dropless);
  LayerWeights weights(config, 11 + uint64_t(test.k));
  const int64_t max_tokens = 96, d = config.d_model;
  std::unique_ptr<MoeLayer> small, padded;
  {
    ScopedSmallBatchTokens unset(std::nullopt);
    small = std::make_unique<MoeLayer>(config, DeviceKind::cuda, DType::bf16, max_tokens);
  }
  {
    ScopedSmallBatchTokens off(0);
    padded = std::make_unique<MoeLayer>(config, DeviceKind::cuda, DType::bf16, max_tokens);
  }
  EXPECT_EQ(small->small_batch_tokens(), kDefaultSmallBatchTokens);
  EXPECT_EQ(padded->small_batch_tokens(), 0);
  StageRecorder small_stages, padded_stages;
  small->set_stage_observer(&small_stages);
  padded->set_stage_observer(&padded_stages);

  const ExecContext context{DeviceKind::cuda, nullptr};
  uint64_t seed = 500;
  for (int64_t tokens : {int64_t(1), int64_t(5), int64_t(64), int64_t(80)}) {
    for (bool for_backward : {false, true}) {
      HostTensor host_x(DType::f64, {tokens, d});
      std::mt19937_64 generator(seed++);
      fill_representable(host_x, generator, 1.0, DType::bf16);
      DeviceTensor x = to_device(host_x, DType::bf16), y_small(DType::bf16, {tokens, d}),
                   y_padded(DType::bf16, {tokens, d});
      device_memset(y_small.tensor().data, DeviceKind::cuda, 0xFF, y_small.tensor().bytes());
      device_memset(y_padded.tensor().data, DeviceKind::cuda, 0xFF, y_padded.tensor().bytes());
      MoeForwardArgs args;
      args.for_backward = for_backward;
      args.read_losses = true;
      small_stages.stages.clear();
      const MoeLosses small_losses = small->forward(context, x.tensor(), weights.weights, args, y_small.tensor());
      const MoeLosses padded_losses = padded->forward(context, x.tensor(), weights.weights, args, y_padded.tensor());
      ops::synchronize(context);
      const bool expect_small = !for_backward && tokens <= kDefaultSmallBatchTokens;
      const std::string where = std::to_string(tokens) + " tokens, for_backward " + std::to_string(for_backward);
      EXPECT_EQ(small->last_forward_small_batch(), expect_small) << where;
      EXPECT_FALSE(padded->last_forward_small_batch()) << where;
      EXPECT_EQ(small_stages.saw("small-batch experts"), expect_small) << where;
      EXPECT_EQ(small_stages.saw("permute"), !expect_small) << where;
      EXPECT_EQ(small->rows(), expect_small ? 0 : padded->rows()) << where;

      // Same routing on both (same kernels on the same logits), losses included.
      EXPECT_EQ(small_losses.aux_loss, padded_losses.aux_loss) << where;
      EXPECT_EQ(small_losses.z_loss, padded_losses.z_loss) << where;
      HostTensor ids_small_host(DType::i32, {tokens * config.moe.top_k}),
          ids_padded_host(DType::i32, {tokens * config.moe.top_k});
      device_copy(ids_small_host.tensor().data, DeviceKind::cpu, small->routing().expert_ids.data, DeviceKind::cuda,
                  ids_small_host.tensor().bytes());
      device_copy(ids_padded_host.tensor().data, DeviceKind::cpu, padded->routing().expert_ids.data, DeviceKind::cuda,
                  ids_padded_host.tensor().bytes());
      EXPECT_EQ(std::memcmp(ids_small_host.tensor().data, ids_padded_host.tensor().data,
                            ids_small_host.tensor().bytes()),
                0)
          << where;

      const HostTensor got = y_small.download(), want = y_padded.download();
      EXPECT_TRUE(all_finite(got)) << where;
      if (expect_small) {
        EXPECT_LE(relative_error(got, want), 1e-2) << where;
      } else {
        EXPECT_EQ(std::memcmp(got.tensor().data, want.tensor().data, got.tensor().bytes()), 0) << where;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, MoeLayerSmallBatchCuda,
                         ::testing::Values(LayerCase{"gelu_top1_drops", ExpertActivation::gelu_tanh, 1, false},
                                           LayerCase{"swiglu_top2_dropless", ExpertActivation::swiglu, 2, true},
                                           LayerCase{"gelu_top8_drops", ExpertActivation::gelu_tanh, 8, false}),
                         [](const ::testing::TestParamInfo<LayerCase>& info) { return std::string(info.param.name); });

TEST(MoeLayerSmallBatchCudaEnvironment, ThresholdComesFromTheSwitches) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  MoeLayerConfig config = layer_config(ExpertActivation::gelu_tanh, 2, true);
  {
    ScopedSmallBatchTokens set(16);
    EXPECT_EQ(MoeLayer(config, DeviceKind::cuda, DType::bf16, 96).small_batch_tokens(), 16);
    EXPECT_EQ(MoeLayer(config, DeviceKind::cuda, DType::bf16, 8).small_batch_tokens(), 8);  // capped by max_tokens
  }
  {
    ScopedSmallBatchTokens set(100000);
    EXPECT_EQ(MoeLayer(config, DeviceKind::cuda, DType::bf16, 1000).small_batch_tokens(),
              kSmallBatchMaxChoices / config.moe.top_k);  // capped by the op's 512 choices
  }
  // Bad values of the variable are rejected where the switches are parsed
  // (SwitchesTest.SmallBatchTokensIsANonNegativeInteger).
  ScopedSmallBatchTokens unset(std::nullopt);
  MoeLayerConfig odd = config;
  odd.d_model = 60;  // not a multiple of 8: the op does not take it, the layer keeps the padded path
  EXPECT_EQ(MoeLayer(odd, DeviceKind::cuda, DType::bf16, 96).small_batch_tokens(), 0);
  MoeLayerConfig dense = config;
  dense.moe.compute_mode = ExpertComputeMode::dense;
  EXPECT_EQ(MoeLayer(dense, DeviceKind::cuda, DType::bf16, 96).small_batch_tokens(), 0);
  EXPECT_EQ(MoeLayer(config, DeviceKind::cpu, DType::f32, 96).small_batch_tokens(), 0);
}

// The small-batch forward captured into a CUDA graph replays the eager forward bit for bit with
// fresh inputs, allocates nothing, and needs no 128-row alignment (no grouped GEMM runs).
TEST(MoeLayerSmallBatchCudaGraph, CapturedForwardReplaysTheEagerForward) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (int alignment : {128, 16}) {
    MoeLayerConfig config = layer_config(ExpertActivation::swiglu, 2, false);
    config.moe.segment_alignment = alignment;
    LayerWeights weights(config, 77);
    ScopedSmallBatchTokens set(64);  // 24 tokens take the path
    MoeLayer layer(config, DeviceKind::cuda, DType::bf16, 64);
    const int64_t tokens = 24, d = config.d_model;
    void* stream = create_stream(DeviceKind::cuda);
    const ExecContext context{DeviceKind::cuda, stream};
    DeviceTensor x(DType::bf16, {tokens, d}), y(DType::bf16, {tokens, d}), eager_y(DType::bf16, {tokens, d});
    MoeForwardArgs args;
    args.for_backward = false;
    args.read_losses = false;
    layer.forward(context, x.tensor(), weights.weights, args, y.tensor());  // warm-up outside the capture
    ops::synchronize(context);
    const AllocatorStats before = cuda_allocator_stats();
    stream_graph::begin_capture(stream);
    layer.forward(context, x.tensor(), weights.weights, args, y.tensor());
    void* graph = stream_graph::end_capture_and_instantiate(stream);
    EXPECT_TRUE(layer.last_forward_small_batch());
    EXPECT_EQ(cuda_allocator_stats().driver_allocations, before.driver_allocations);
    for (int replay = 0; replay < 3; ++replay) {
      HostTensor host_x(DType::f64, {tokens, d});
      std::mt19937_64 generator(900 + uint64_t(replay) + uint64_t(alignment));
      fill_representable(host_x, generator, 1.0, DType::bf16);
      DeviceTensor fresh = to_device(host_x, DType::bf16);
      device_copy(x.tensor().data, DeviceKind::cuda, fresh.tensor().data, DeviceKind::cuda, x.tensor().bytes());
      device_memset(y.tensor().data, DeviceKind::cuda, 0xFF, y.tensor().bytes());
      stream_graph::launch(graph, stream);
      ops::synchronize(context);
      layer.forward(context, x.tensor(), weights.weights, args, eager_y.tensor());
      ops::synchronize(context);
      const HostTensor got = y.download(), want = eager_y.download();
      EXPECT_TRUE(all_finite(got));
      EXPECT_EQ(std::memcmp(got.tensor().data, want.tensor().data, got.tensor().bytes()), 0)
          << "alignment " << alignment << ", replay " << replay;
    }
    stream_graph::destroy(graph);
    destroy_stream(DeviceKind::cuda, stream);
  }
}

// Latency of the layer's inference forward as a CUDA graph on the streaming benchmark's layer,
// small-batch path against the padded path, printed for the record (the assertions only check
// that both ran). Weights repeat a 1M-element random block: timing does not depend on values.
TEST(MoeLayerSmallBatchCudaTiming, PrintsGraphLatencyOfBothPaths) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  MoeLayerConfig config;
  config.d_model = 768;
  config.moe.expert_d_ff = 3072;
  config.moe.num_experts = 32;
  config.moe.top_k = config.moe.k_min = 1;
  config.moe.renormalize_gates = false;
  config.moe.dropless = true;
  config.moe.segment_alignment = 128;
  HostTensor block(DType::bf16, {int64_t(1) << 20});
  std::mt19937_64 generator(1234);
  fill_normal(block, generator, 0.0, 0.03);
  auto filled = [&](std::initializer_list<int64_t> dims) {
    DeviceTensor tensor(DType::bf16, dims);
    const size_t bytes = tensor.tensor().bytes(), block_bytes = block.tensor().bytes();
    for (size_t offset = 0; offset < bytes; offset += block_bytes)
      device_copy(static_cast<char*>(tensor.tensor().data) + offset, DeviceKind::cuda, block.tensor().data,
                  DeviceKind::cpu, std::min(block_bytes, bytes - offset));
    return tensor;
  };
  DeviceTensor router = filled({768, 32}), w1 = filled({32, 768, 3072}), w2 = filled({32, 3072, 768});
  const MoeWeights weights{router.tensor(), w1.tensor(), w2.tensor()};
  const DeviceTensor x = filled({64, 768});
  DeviceTensor y(DType::bf16, {64, 768});
  void* stream = create_stream(DeviceKind::cuda);
  const ExecContext context{DeviceKind::cuda, stream};
  for (int64_t setting : {int64_t(64), int64_t(0)}) {
    ScopedSmallBatchTokens set(setting);
    MoeLayer layer(config, DeviceKind::cuda, DType::bf16, 64);
    for (int64_t tokens : {int64_t(1), int64_t(8), int64_t(32), int64_t(64)}) {
      Tensor x_view = x.view(DType::bf16, {tokens, 768}), y_view = y.view(DType::bf16, {tokens, 768});
      MoeForwardArgs args;
      args.for_backward = false;
      args.read_losses = false;
      layer.forward(context, x_view, weights, args, y_view);
      ops::synchronize(context);
      stream_graph::begin_capture(stream);
      layer.forward(context, x_view, weights, args, y_view);
      void* graph = stream_graph::end_capture_and_instantiate(stream);
      for (int warmup = 0; warmup < 5; ++warmup) stream_graph::launch(graph, stream);
      DeviceTimer timer(DeviceKind::cuda, stream);
      std::vector<double> microseconds;
      for (int step = 0; step < 50; ++step) {
        timer.start();
        stream_graph::launch(graph, stream);
        timer.stop();
        microseconds.push_back(timer.elapsed_ms() * 1e3);
      }
      stream_graph::destroy(graph);
      const double typical = median(microseconds);
      EXPECT_GT(typical, 0.0);
      std::cout << "[ timing ] d768 F3072 E32 top-1, " << tokens << " tokens, "
                << (setting == 0 ? "padded path     " : "small-batch path") << ": median "
                << typical << " us over 50 graph replays" << std::endl;
    }
  }
  destroy_stream(DeviceKind::cuda, stream);
}

}  // namespace
