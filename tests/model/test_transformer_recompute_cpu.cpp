// Activation recomputation (src/model/transformer.h TransformerOptions::recompute) on the CPU
// backend: for every mode, two micro-steps of forward + backward (the second accumulating) give
// the loss, the router statistics and every gradient of recompute = none bit for bit, on a model
// that mixes dense and MoE blocks with router jitter, shared experts, capacity drops, the
// sequence-level and global-batch losses, and (one variant) sigmoid scores with a router bias and
// group-limited routing; in f32 and f64. The side effects of the MoE forward happen once per
// forward, not again in the recompute: the step loads, the routing taps (router statistics), the
// global-batch loss's reducer calls and running sums. The recomputed sublayers' buffers are one
// shared set: the saved-activation bytes drop by exactly (L - 1) sets.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "src/model/routing_observer.h"
#include "src/model/transformer.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};
constexpr int64_t kBatch = 2, kSeq = 8, kTokens = kBatch * kSeq;

struct Variant {
  const char* name;
  bool sigmoid_bias_groups;  // sigmoid scores, a router bias, 2 groups of which a token uses 1
  NormKind norm;
  PositionKind positions;
  ExpertActivation activation;
};

// Four blocks: 0 and 2 dense, 1 and 3 MoE (moe_every 2), each MoE block with a shared expert.
void make_configs(const Variant& variant, ModelConfig& model, MoeConfig& moe) {
  model = ModelConfig();
  model.vocab_size = 17;
  model.d_model = 8;
  model.n_layers = 4;
  model.n_heads = 2;
  model.seq_len = kSeq;
  model.d_ff = 12;
  model.moe_every = 2;
  model.norm = variant.norm;
  model.positions = variant.positions;
  model.compute_dtype = DType::f32;
  model.init_std = 0.5;
  moe = MoeConfig();
  moe.num_experts = 4;
  moe.top_k = moe.k_min = 2;
  moe.expert_d_ff = 6;
  moe.num_shared_experts = 1;
  moe.shared_expert_d_ff = 5;
  moe.activation = variant.activation;
  moe.capacity_factor = 0.75;  // some choices are dropped: the routing must repeat exactly
  moe.eval_capacity_factor = 2.0;
  moe.renormalize_gates = true;
  moe.jitter_eps = 0.2;
  moe.aux_loss_weight = 0.05;
  moe.z_loss_weight = 0.01;
  moe.seq_aux_loss_weight = 0.1;
  moe.global_aux_loss_weight = 0.1;
  moe.segment_alignment = 4;
  if (variant.sigmoid_bias_groups) {
    moe.score_function = ScoreFunction::sigmoid;
    moe.bias_update_rate = 0.001;
    moe.num_groups = 2;
    moe.topk_groups = 1;
  }
}

TransformerOptions options_for(DType dtype, RecomputeMode recompute) {
  TransformerOptions options;
  options.device = DeviceKind::cpu;
  options.activation_dtype = dtype;
  options.max_batch = kBatch;
  options.jitter_seed = 4242;
  options.recompute = recompute;
  return options;
}

// What one MoE forward told the routing tap.
struct TapEvent {
  int layer = 0;
  bool training = false;
  std::vector<double> expert_counts;
};

class RecordingObserver : public RoutingObserver {
 public:
  void on_routing(const ExecContext&, const RoutingEvent& event) override {
    events.push_back({event.moe_layer, event.training, to_vector(event.routing->expert_counts)});
  }
  std::vector<TapEvent> events;
};

bool operator==(const TapEvent& left, const TapEvent& right) {
  return left.layer == right.layer && left.training == right.training && left.expert_counts == right.expert_counts;
}

std::vector<uint8_t> bytes_of(const Tensor& tensor) {
  std::vector<uint8_t> bytes(tensor.bytes());
  std::memcpy(bytes.data(), tensor.data, bytes.size());
  return bytes;
}

// Everything a training step reads from the model, after two micro-steps.
struct StepResult {
  std::vector<TransformerStats> stats;  // per micro-step
  std::vector<std::vector<uint8_t>> gradients;  // raw bytes per parameter
  std::vector<double> step_loads, global_loads_seen;
  std::vector<TapEvent> taps;
  int reductions = 0;
};

// Two micro-steps on fresh random batches (drawn from `batch_seed`), the gradients poisoned first.
StepResult run_step(const Variant& variant, DType dtype, RecomputeMode recompute, uint64_t batch_seed,
                    uint64_t jitter_step = 7) {
  ModelConfig model_config;
  MoeConfig moe;
  make_configs(variant, model_config, moe);
  Transformer model(model_config, moe, options_for(dtype, recompute));
  ModelParameters parameters(model.layout(), DeviceKind::cpu, dtype, dtype);
  parameters.initialize(kCpu, 31);
  for (int block : {1, 3}) {
    const int bias = model.layout().find("blocks." + std::to_string(block) + ".moe.router_bias");
    if (bias >= 0) parameters.set_master_values(kCpu, bias, {0.3, -0.2, 0.05 * block, -0.1});
  }
  for (int index = 0; index < parameters.layout().size(); ++index) {
    Tensor gradient = parameters.grad(index);
    poison(gradient);
  }
  StepResult result;
  // The reducer stands for the all-reduce over ranks: it doubles the loads (two equal ranks).
  model.set_load_reducer([&](const ExecContext&, Tensor& loads) {
    ++result.reductions;
    for (int64_t e = 0; e < loads.numel(); ++e) set_element(loads, e, 2.0 * get_element(loads, e));
  });
  RecordingObserver observer;
  RoutingObserverScope scope(&observer);
  std::mt19937_64 generator(batch_seed);
  model.reset_step_loads(kCpu);
  for (int micro = 0; micro < 2; ++micro) {
    HostTensor tokens(DType::i32, {kTokens}), targets(DType::i32, {kTokens});
    fill_uniform(tokens, generator, 0, model_config.vocab_size - 1);
    fill_uniform(targets, generator, 0, model_config.vocab_size - 1);
    model.forward_loss(kCpu, parameters, tokens, targets, kBatch, kSeq, ForwardMode::training,
                       float(1.0 / (2 * kTokens)), jitter_step + uint64_t(micro));
    model.backward(kCpu, parameters, 0.5f, micro > 0);
    result.stats.push_back(model.read_stats(kCpu));
  }
  for (int index = 0; index < parameters.layout().size(); ++index)
    result.gradients.push_back(bytes_of(parameters.grad(index)));
  result.step_loads = to_vector(model.step_loads());
  result.taps = observer.events;
  return result;
}

void expect_same_stats(const TransformerStats& actual, const TransformerStats& expected, const std::string& where) {
  EXPECT_EQ(actual.loss_sum, expected.loss_sum) << where;
  EXPECT_EQ(actual.tokens, expected.tokens) << where;
  ASSERT_EQ(actual.moe.size(), expected.moe.size()) << where;
  for (size_t layer = 0; layer < actual.moe.size(); ++layer) {
    const MoeBlockStats &a = actual.moe[layer], &e = expected.moe[layer];
    const std::string at = where + ", MoE layer " + std::to_string(layer);
    EXPECT_EQ(a.aux_loss, e.aux_loss) << at;
    EXPECT_EQ(a.z_loss, e.z_loss) << at;
    EXPECT_EQ(a.seq_aux_loss, e.seq_aux_loss) << at;
    EXPECT_EQ(a.global_aux_loss, e.global_aux_loss) << at;
    EXPECT_EQ(a.total_choices, e.total_choices) << at;
    EXPECT_EQ(a.dropped_choices, e.dropped_choices) << at;
    EXPECT_EQ(a.expert_counts, e.expert_counts) << at;
  }
}

struct Case {
  Variant variant;
  DType dtype;
  RecomputeMode mode;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.variant.name << "_" << dtype_name(c.dtype) << "_" << recompute_mode_name(c.mode);
}

class RecomputeEqualsNone : public ::testing::TestWithParam<Case> {};

TEST_P(RecomputeEqualsNone, LossStatisticsAndGradientsBitForBit) {
  const Case& c = GetParam();
  const uint64_t batch_seed = std::random_device{}();
  SCOPED_TRACE("batch seed " + std::to_string(batch_seed));
  const StepResult none = run_step(c.variant, c.dtype, RecomputeMode::none, batch_seed);
  const StepResult recomputed = run_step(c.variant, c.dtype, c.mode, batch_seed);

  ASSERT_EQ(recomputed.stats.size(), 2u);
  for (size_t micro = 0; micro < 2; ++micro)
    expect_same_stats(recomputed.stats[micro], none.stats[micro], "micro-step " + std::to_string(micro));
  // The run is not vacuous: tokens were dropped and the global-batch loss ran.
  int64_t dropped = 0;
  for (const TransformerStats& stats : none.stats)
    for (const MoeBlockStats& block : stats.moe) {
      dropped += block.dropped_choices;
      EXPECT_GT(block.global_aux_loss, 0.0);
      EXPECT_GT(block.seq_aux_loss, 0.0);
    }
  EXPECT_GT(dropped, 0) << "capacity 0.75 should drop choices";

  ModelConfig model_config;
  MoeConfig moe;
  make_configs(c.variant, model_config, moe);
  const ParameterLayout layout = Transformer::build_layout(model_config, moe, 1, 0);
  ASSERT_EQ(recomputed.gradients.size(), none.gradients.size());
  for (size_t index = 0; index < none.gradients.size(); ++index) {
    const std::string& name = layout.spec(int(index)).name;
    EXPECT_TRUE(recomputed.gradients[index] == none.gradients[index]) << name << " differs from recompute none";
    if (name.find("router_bias") != std::string::npos) continue;  // never a gradient
    const size_t element = dtype_size(c.dtype);
    bool finite = true, nonzero = false;
    for (size_t offset = 0; offset < none.gradients[index].size(); offset += element) {
      const double value = c.dtype == DType::f64 ? *reinterpret_cast<const double*>(&none.gradients[index][offset])
                                                 : *reinterpret_cast<const float*>(&none.gradients[index][offset]);
      finite = finite && std::isfinite(value);
      nonzero = nonzero || value != 0.0;
    }
    EXPECT_TRUE(finite) << name << ": backward left the poison";
    EXPECT_TRUE(nonzero) << name << ": vacuous (no gradient reaches it)";
  }

  // Side effects once per forward: step loads, taps and reductions as without recomputation.
  EXPECT_EQ(recomputed.step_loads, none.step_loads);
  EXPECT_EQ(recomputed.reductions, none.reductions);
  EXPECT_EQ(none.reductions, 2 * 2) << "one reduction per MoE block and training forward";
  EXPECT_EQ(recomputed.taps.size(), none.taps.size());
  EXPECT_TRUE(recomputed.taps == none.taps) << "the routing taps saw something else";
  EXPECT_EQ(none.taps.size(), 2u * 2u);
}

std::vector<Case> all_cases() {
  const Variant variants[] = {
      {"softmax_layernorm_learned_gelu", false, NormKind::layernorm, PositionKind::learned,
       ExpertActivation::gelu_tanh},
      {"sigmoid_bias_groups_rmsnorm_rotary_swiglu", true, NormKind::rmsnorm, PositionKind::rotary,
       ExpertActivation::swiglu},
  };
  std::vector<Case> cases;
  for (const Variant& variant : variants)
    for (DType dtype : {DType::f32, DType::f64})
      for (RecomputeMode mode : {RecomputeMode::moe, RecomputeMode::attention, RecomputeMode::all})
        cases.push_back({variant, dtype, mode});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Modes, RecomputeEqualsNone, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(info.param.variant.name) + "_" + dtype_name(info.param.dtype) + "_" +
                                  recompute_mode_name(info.param.mode);
                         });

// The equality above must be able to fail: a different jitter step changes the gradients (so the
// recompute's reuse of the forward's step is what makes them equal).
TEST(RecomputeEqualsNone, DetectsADifferentJitterStep) {
  const Variant variant{"softmax", false, NormKind::rmsnorm, PositionKind::rotary, ExpertActivation::gelu_tanh};
  const StepResult first = run_step(variant, DType::f64, RecomputeMode::none, 5, 7);
  const StepResult shifted = run_step(variant, DType::f64, RecomputeMode::none, 5, 8);
  ModelConfig model_config;
  MoeConfig moe;
  make_configs(variant, model_config, moe);
  const ParameterLayout layout = Transformer::build_layout(model_config, moe, 1, 0);
  EXPECT_FALSE(first.gradients[size_t(layout.find("blocks.1.moe.router"))] ==
               shifted.gradients[size_t(layout.find("blocks.1.moe.router"))]);
}

// ---- Memory: the recomputed sublayers keep one set for all blocks ------------------------------

TEST(RecomputeMemory, SavedActivationsDropByAllButOneSet) {
  const Variant variant{"layernorm", false, NormKind::layernorm, PositionKind::rotary, ExpertActivation::swiglu};
  ModelConfig model_config;
  MoeConfig moe;
  make_configs(variant, model_config, moe);
  const DType dtype = DType::f32;
  const int64_t e = 4, s = 4, T = kTokens, D = model_config.d_model, H = model_config.n_heads;
  // Per block (src/model/transformer.h, "Memory"): attention, x', norm2, and the dense FFN or the
  // shared experts (swiglu: 2 F columns before the activation, F after).
  const int64_t attention = T * (5 * D * e + 2 * s + H * s);
  const int64_t mid = T * D * e;
  const int64_t norm2 = T * (D * e + 2 * s);
  const int64_t dense = T * (2 * model_config.d_ff + model_config.d_ff) * e;
  const int64_t shared = T * (2 * moe.shared_ffn_width() + moe.shared_ffn_width()) * e;
  // The MoE layer: R padded rows of permuted x, H (2 F), A (F) and expert outputs; the jittered
  // router input. R = the larger of the training and evaluation bounds (padded_rows_upper_bound):
  // (T k + E (alignment - 1)) rounded down to the alignment = 44, capped with drops at
  // E * round_up(capacity, alignment): training 4 * 8 = 32 (capacity 6), evaluation 4 * 16 = 64.
  const int64_t rows = 44;
  const int64_t moe_layer = rows * (2 * D + 2 * moe.expert_d_ff + moe.expert_d_ff) * e + T * D * e;
  const int64_t residual = (model_config.n_layers + 1) * T * D * e;

  auto memory = [&](RecomputeMode mode) {
    return Transformer(model_config, moe, options_for(dtype, mode)).activation_memory();
  };
  const TransformerActivationMemory none = memory(RecomputeMode::none);
  EXPECT_EQ(none.residual, residual);
  EXPECT_EQ(none.shared, 0);
  EXPECT_EQ(none.per_block, 4 * (attention + mid + norm2) + 2 * dense + 2 * (shared + moe_layer));

  const TransformerActivationMemory attention_only = memory(RecomputeMode::attention);
  EXPECT_EQ(attention_only.shared, attention);
  EXPECT_EQ(attention_only.per_block, none.per_block - 4 * attention);

  // moe: one norm2 set, one FFN set as wide as the widest (the dense FFN), one MoE layer memory.
  const TransformerActivationMemory ffn_only = memory(RecomputeMode::moe);
  EXPECT_EQ(ffn_only.shared, norm2 + std::max(dense, shared) + moe_layer);
  EXPECT_EQ(ffn_only.per_block, 4 * (attention + mid));

  const TransformerActivationMemory everything = memory(RecomputeMode::all);
  EXPECT_EQ(everything.per_block, 0);
  EXPECT_EQ(everything.shared, attention + mid + norm2 + std::max(dense, shared) + moe_layer);
  EXPECT_EQ(everything.residual, residual);
  EXPECT_LT(everything.per_block + everything.shared, none.per_block / 2) << "4 blocks keep what 1 did";
}

}  // namespace
