// Training on the CPU backend: the whole transformer's gradients against float64 central finite
// differences, gradient accumulation, causality, the parameter layout and initialisation, the
// learning-rate schedule and loss scaler, and the trainer end to end (the loss falls, the same
// seed gives bit-identical losses, a non-finite gradient skips the step, the metrics and the
// final weights file are written and load back).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/model/transformer.h"
#include "src/train/loss_scaler.h"
#include "src/train/lr_schedule.h"
#include "src/train/trainer.h"
#include "src/train/weights_file.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

struct ModelCase {
  const char* name;
  NormKind norm;
  PositionKind positions;
  ExpertActivation activation;
  int moe_every;
  int experts;
  int top_k;
  double capacity_factor;
  double jitter_eps;
};

void PrintTo(const ModelCase& c, std::ostream* os) { *os << c.name; }

void make_configs(const ModelCase& c, ModelConfig& model, MoeConfig& moe) {
  model = ModelConfig();
  model.vocab_size = 13;
  model.d_model = 8;
  model.n_layers = 2;
  model.n_heads = 2;
  model.seq_len = 6;
  model.d_ff = 6;
  model.norm = c.norm;
  model.positions = c.positions;
  model.moe_every = c.moe_every;
  model.compute_dtype = DType::f32;
  model.init_std = 0.5;  // large weights: every path carries a visible gradient
  moe = MoeConfig();
  moe.num_experts = c.experts;
  moe.top_k = c.top_k;
  moe.k_min = c.top_k;
  moe.expert_d_ff = 5;
  moe.activation = c.activation;
  moe.capacity_factor = c.capacity_factor;
  moe.eval_capacity_factor = c.capacity_factor;
  moe.renormalize_gates = c.top_k > 1;
  moe.jitter_eps = c.jitter_eps;
  moe.aux_loss_weight = 0.05;  // large enough to show in the gradients
  moe.z_loss_weight = 0.01;
  moe.segment_alignment = 4;
}

struct Batch {
  HostTensor tokens, targets;
  Batch(int64_t count, int vocab, uint64_t seed) : tokens(DType::i32, {count}), targets(DType::i32, {count}) {
    std::mt19937_64 generator(seed);
    fill_uniform(tokens, generator, 0, vocab - 1);
    fill_uniform(targets, generator, 0, vocab - 1);
  }
};

// Mean token loss plus every MoE layer's aux and z loss: the function whose gradient backward
// computes for ce_grad_scale = 1 / tokens and aux_grad_scale = 1.
double total_loss(Transformer& model, const ModelParameters& parameters, const Batch& batch, int64_t sequences,
                  int64_t seq_len, uint64_t step) {
  const int64_t tokens = sequences * seq_len;
  model.forward_loss(kCpu, parameters, batch.tokens, batch.targets, sequences, seq_len, ForwardMode::training,
                     float(1.0 / double(tokens)), step);
  const TransformerStats stats = model.read_stats(kCpu);
  double loss = stats.loss_sum / double(stats.tokens);
  for (const MoeBlockStats& moe : stats.moe) loss += moe.aux_loss + moe.z_loss;
  return loss;
}

class ModelGradients : public ::testing::TestWithParam<ModelCase> {};

TEST_P(ModelGradients, MatchFiniteDifferences) {
  const ModelCase& c = GetParam();
  ModelConfig model_config;
  MoeConfig moe_config;
  make_configs(c, model_config, moe_config);
  TransformerOptions options;
  options.device = DeviceKind::cpu;
  options.activation_dtype = DType::f64;
  options.max_batch = 2;
  options.jitter_seed = 99;
  Transformer model(model_config, moe_config, options);
  ModelParameters parameters(model.layout(), DeviceKind::cpu, DType::f64, DType::f64);
  parameters.initialize(kCpu, 7);
  const int64_t sequences = 2, seq_len = model_config.seq_len, step = 5;
  Batch batch(sequences * seq_len, model_config.vocab_size, 11);

  total_loss(model, parameters, batch, sequences, seq_len, step);
  const TransformerStats base = model.read_stats(kCpu);
  if (c.capacity_factor < 1.0) {
    int64_t dropped = 0;
    for (const MoeBlockStats& moe : base.moe) dropped += moe.dropped_choices;
    EXPECT_GT(dropped, 0) << "the case should drop choices";
  }
  model.backward(kCpu, parameters, 1.0f, false);

  const double fd_step = 1e-6;
  int checked = 0;
  for (int index = 0; index < parameters.layout().size(); ++index) {
    const ParameterSpec& spec = parameters.layout().spec(index);
    const std::vector<double> analytic = parameters.grad_values(kCpu, index);
    Tensor master = parameters.master(index);
    std::vector<double> numeric(analytic.size());
    for (int64_t element = 0; element < master.numel(); ++element) {
      double* value = master.as<double>() + element;
      const double original = *value;
      *value = original + fd_step;
      const double plus = total_loss(model, parameters, batch, sequences, seq_len, step);
      *value = original - fd_step;
      const double minus = total_loss(model, parameters, batch, sequences, seq_len, step);
      *value = original;
      numeric[size_t(element)] = (plus - minus) / (2 * fd_step);
    }
    EXPECT_LE(relative_error(analytic, numeric), 2e-6) << spec.name;
    double norm = 0;
    for (double value : numeric) norm += value * value;
    EXPECT_GT(norm, 1e-10) << spec.name << ": vacuous check (no gradient reaches it)";
    ++checked;
  }
  EXPECT_EQ(checked, parameters.layout().size());
  // The perturbations must not have moved a routing decision (counts are piecewise constant).
  total_loss(model, parameters, batch, sequences, seq_len, step);
  const TransformerStats after = model.read_stats(kCpu);
  for (size_t layer = 0; layer < base.moe.size(); ++layer)
    EXPECT_EQ(after.moe[layer].expert_counts, base.moe[layer].expert_counts);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ModelGradients,
    ::testing::Values(
        ModelCase{"layernorm_learned_gelu_top2of2", NormKind::layernorm, PositionKind::learned,
                  ExpertActivation::gelu_tanh, 2, 2, 2, 4.0, 0.0},
        ModelCase{"rmsnorm_rotary_swiglu_top1of3", NormKind::rmsnorm, PositionKind::rotary, ExpertActivation::swiglu,
                  2, 3, 1, 4.0, 0.0},
        ModelCase{"rmsnorm_rotary_gelu_all_moe_drops_jitter", NormKind::rmsnorm, PositionKind::rotary,
                  ExpertActivation::gelu_tanh, 1, 4, 2, 0.5, 0.1},
        ModelCase{"layernorm_rotary_swiglu_all_moe_top2of3", NormKind::layernorm, PositionKind::rotary,
                  ExpertActivation::swiglu, 1, 3, 2, 4.0, 0.0}),
    [](const ::testing::TestParamInfo<ModelCase>& info) { return std::string(info.param.name); });


TEST(ModelGradients, AccumulationAddsToTheGradients) {
  ModelConfig model_config;
  MoeConfig moe_config;
  make_configs({"accumulate", NormKind::layernorm, PositionKind::learned, ExpertActivation::gelu_tanh, 1, 3, 2, 4.0,
                0.0},
               model_config, moe_config);
  TransformerOptions options;
  options.activation_dtype = DType::f64;
  options.max_batch = 2;
  Transformer model(model_config, moe_config, options);
  ModelParameters parameters(model.layout(), DeviceKind::cpu, DType::f64, DType::f64);
  parameters.initialize(kCpu, 3);
  Batch first(12, model_config.vocab_size, 1), second(12, model_config.vocab_size, 2);
  auto gradients_of = [&](const Batch& batch, bool accumulate) {
    model.forward_loss(kCpu, parameters, batch.tokens, batch.targets, 2, 6, ForwardMode::training, 0.25f, 0);
    model.backward(kCpu, parameters, 0.5f, accumulate);
    std::vector<std::vector<double>> all;
    for (int index = 0; index < parameters.layout().size(); ++index) all.push_back(parameters.grad_values(kCpu, index));
    return all;
  };
  const auto only_second = gradients_of(second, false);
  gradients_of(first, false);
  const auto only_first = gradients_of(first, false);
  const auto both = gradients_of(second, true);
  for (size_t index = 0; index < both.size(); ++index) {
    std::vector<double> sum(only_first[index].size());
    for (size_t element = 0; element < sum.size(); ++element)
      sum[element] = only_first[index][element] + only_second[index][element];
    EXPECT_LE(relative_error(both[index], sum), 1e-12) << parameters.layout().spec(int(index)).name;
  }
}

TEST(Transformer, LaterTokensDoNotChangeEarlierLogits) {
  ModelConfig model_config;
  MoeConfig moe_config;
  make_configs({"causal", NormKind::rmsnorm, PositionKind::rotary, ExpertActivation::swiglu, 1, 4, 2, 4.0, 0.0},
               model_config, moe_config);
  moe_config.dropless = true;  // capacity couples tokens; without it causality holds only per expert slot
  TransformerOptions options;
  options.activation_dtype = DType::f64;
  options.max_batch = 2;
  Transformer model(model_config, moe_config, options);
  ModelParameters parameters(model.layout(), DeviceKind::cpu, DType::f64, DType::f64);
  parameters.initialize(kCpu, 4);
  Batch batch(12, model_config.vocab_size, 5);
  const std::vector<double> before = to_vector(model.forward_logits(kCpu, parameters, batch.tokens, 2, 6));
  batch.tokens.data<int32_t>()[4] = (batch.tokens.data<int32_t>()[4] + 1) % model_config.vocab_size;  // seq 0, pos 4
  const std::vector<double> after = to_vector(model.forward_logits(kCpu, parameters, batch.tokens, 2, 6));
  const size_t vocab = size_t(model_config.vocab_size);
  for (size_t row = 0; row < 12; ++row) {
    double difference = 0;
    for (size_t column = 0; column < vocab; ++column)
      difference = std::max(difference, std::fabs(before[row * vocab + column] - after[row * vocab + column]));
    if (row >= 4 && row < 6) EXPECT_GT(difference, 1e-6) << "row " << row << " should see the change";
    else EXPECT_EQ(difference, 0.0) << "row " << row << " is before the change or in the other sequence";
  }
}

// ---- Parameters ---------------------------------------------------------------------------------

TEST(Parameters, LayoutGroupsDecayAndAlignment) {
  ModelConfig model_config;
  MoeConfig moe_config;
  make_configs({"layout", NormKind::layernorm, PositionKind::learned, ExpertActivation::gelu_tanh, 2, 4, 1, 1.0, 0.0},
               model_config, moe_config);
  const ParameterLayout layout = Transformer::build_layout(model_config, moe_config, 1, 0);
  for (const ParameterSpec& spec : layout.specs()) {
    const bool is_norm = spec.name.find("norm") != std::string::npos;
    EXPECT_EQ(spec.weight_decay, !is_norm) << spec.name;
    EXPECT_EQ(spec.offset % kParameterAlignment, 0) << spec.name;
    EXPECT_EQ(spec.group == ParameterGroup::expert, spec.name.find(".moe.w") != std::string::npos) << spec.name;
    if (spec.weight_decay) EXPECT_LE(spec.offset + spec.numel(), layout.decay_elements(spec.group)) << spec.name;
    else EXPECT_GE(spec.offset, layout.decay_elements(spec.group)) << spec.name;
  }
  // Tensors do not overlap.
  for (const ParameterSpec& a : layout.specs())
    for (const ParameterSpec& b : layout.specs())
      if (&a != &b && a.group == b.group)
        EXPECT_TRUE(a.offset + a.numel() <= b.offset || b.offset + b.numel() <= a.offset) << a.name << " " << b.name;
  EXPECT_NE(layout.find("embedding.position"), -1);
  EXPECT_NE(layout.find("blocks.1.moe.router"), -1);
  EXPECT_EQ(layout.find("blocks.0.moe.router"), -1);
  EXPECT_NE(layout.find("blocks.0.ffn.w1"), -1);
  EXPECT_NE(layout.find("final_norm.bias"), -1);
}

TEST(Parameters, ExpertShardsHoldTheirGlobalExpertsValues) {
  ModelConfig model_config;
  MoeConfig moe_config;
  make_configs({"shards", NormKind::rmsnorm, PositionKind::rotary, ExpertActivation::swiglu, 1, 4, 1, 1.0, 0.0},
               model_config, moe_config);
  ModelParameters whole(Transformer::build_layout(model_config, moe_config, 1, 0), DeviceKind::cpu, DType::f32,
                        DType::f32);
  ModelParameters shard(Transformer::build_layout(model_config, moe_config, 2, 1), DeviceKind::cpu, DType::f32,
                        DType::f32);
  whole.initialize(kCpu, 77);
  shard.initialize(kCpu, 77);
  for (int index = 0; index < shard.layout().size(); ++index) {
    const ParameterSpec& spec = shard.layout().spec(index);
    const std::vector<double> mine = shard.master_values(kCpu, index);
    const std::vector<double> all = whole.master_values(kCpu, whole.layout().find(spec.name));
    const size_t offset = spec.is_sharded() ? size_t(2 * (spec.numel() / spec.shape[0])) : 0;  // experts 2, 3
    ASSERT_LE(offset + mine.size(), all.size()) << spec.name;
    EXPECT_TRUE(std::equal(mine.begin(), mine.end(), all.begin() + long(offset))) << spec.name;
  }
  // Normal tensors have the configured spread; norms start at one.
  const std::vector<double> qkv = whole.master_values(kCpu, whole.layout().find("blocks.0.attn.qkv"));
  double sum = 0, squares = 0;
  for (double value : qkv) sum += value, squares += value * value;
  const double mean = sum / double(qkv.size()), std = std::sqrt(squares / double(qkv.size()) - mean * mean);
  EXPECT_NEAR(std, model_config.init_std, 0.1 * model_config.init_std);
  for (double value : whole.master_values(kCpu, whole.layout().find("final_norm.weight"))) EXPECT_EQ(value, 1.0);
}

// ---- Schedule and loss scaler -------------------------------------------------------------------

TEST(LrSchedule, WarmsUpLinearlyThenDecaysToTheFloor) {
  OptimizerConfig optimizer;
  optimizer.lr = 1e-3;
  optimizer.min_lr = 1e-4;
  optimizer.warmup_steps = 10;
  const LrSchedule schedule(optimizer, 110);
  EXPECT_DOUBLE_EQ(schedule.at(1), 1e-4);
  EXPECT_DOUBLE_EQ(schedule.at(5), 5e-4);
  EXPECT_DOUBLE_EQ(schedule.at(10), 1e-3);
  EXPECT_NEAR(schedule.at(60), 5.5e-4, 1e-12);  // half-way through the cosine
  EXPECT_DOUBLE_EQ(schedule.at(110), 1e-4);
  EXPECT_DOUBLE_EQ(schedule.at(200), 1e-4);
  for (int64_t step = 11; step < 110; ++step) EXPECT_LT(schedule.at(step + 1), schedule.at(step));
  optimizer.warmup_steps = 0;
  EXPECT_LT(LrSchedule(optimizer, 100).at(1), 1e-3);
  EXPECT_GT(LrSchedule(optimizer, 100).at(1), 0.999e-3);
}

TEST(LossScaler, HalvesOnOverflowAndGrowsAfterTheInterval) {
  LossScaler scaler(true, 1024.0, 3, 4);
  EXPECT_FALSE(scaler.update(true));
  EXPECT_EQ(scaler.scale(), 512.0);
  EXPECT_TRUE(scaler.update(false));
  EXPECT_TRUE(scaler.update(false));
  EXPECT_EQ(scaler.scale(), 512.0);
  EXPECT_TRUE(scaler.update(false));
  EXPECT_EQ(scaler.scale(), 1024.0);
  EXPECT_FALSE(scaler.update(true));
  EXPECT_TRUE(scaler.update(false));
  EXPECT_FALSE(scaler.update(true));  // the good-step count restarts
  EXPECT_EQ(scaler.scale(), 256.0);
  EXPECT_EQ(scaler.state().total_skips, 3);
  EXPECT_FALSE(scaler.update(true));
  EXPECT_FALSE(scaler.update(true));
  EXPECT_THROW(scaler.update(true), Error);  // the fourth skip in a row: diverged
  LossScaler capped(true, kMaxLossScale, 1);
  EXPECT_TRUE(capped.update(false));
  EXPECT_EQ(capped.scale(), kMaxLossScale);
  LossScaler disabled(false, 65536.0, 1);
  EXPECT_EQ(disabled.scale(), 1.0);
  EXPECT_FALSE(disabled.update(true));
  EXPECT_EQ(disabled.scale(), 1.0);
  EXPECT_TRUE(disabled.update(false));
  EXPECT_EQ(disabled.scale(), 1.0);
}

// ---- The trainer end to end ---------------------------------------------------------------------

// Pseudo-English sentences from a small grammar: learnable structure for a few dozen steps.
std::string generated_text(size_t bytes, uint64_t seed) {
  const char* subjects[] = {"the nation", "our people", "the congress", "every citizen", "this union", "the world"};
  const char* verbs[] = {"will build", "must defend", "has seen", "shall honor", "can restore", "will remember"};
  const char* objects[] = {"a stronger economy", "the common good", "our freedom", "new schools", "peace abroad",
                           "the future of work"};
  std::mt19937_64 generator(seed);
  std::string text;
  while (text.size() < bytes) {
    text += subjects[generator() % 6];
    text += " ";
    text += verbs[generator() % 6];
    text += " ";
    text += objects[generator() % 6];
    text += generator() % 4 == 0 ? ".\n" : ". ";
  }
  text.resize(bytes);
  return text;
}

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    directory_ = std::filesystem::temp_directory_path() /
                 ("switchyard_trainer_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
                  "_" + std::to_string(::getpid()));
    std::filesystem::create_directories(directory_);
    for (const char* split : {"train", "val"}) {
      const std::string text = generated_text(split[0] == 't' ? 60000 : 8000, split[0] == 't' ? 1 : 2);
      std::vector<uint32_t> tokens(text.begin(), text.end());
      for (uint32_t& token : tokens) token &= 0xff;
      write_token_file((directory_ / (std::string(split) + ".bin")).string(), tokens, 256);
    }
  }
  void TearDown() override { std::filesystem::remove_all(directory_); }

  Config config(const std::vector<std::string>& overrides = {}) const {
    const std::string yaml =
        "model: {d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32, d_ff: 64, moe_every: 2, compute_dtype: fp32,"
        " init_std: 0.02}\n"
        "moe: {num_experts: 4, top_k: 1, expert_d_ff: 32, renormalize_gates: false, segment_alignment: 8}\n"
        "optimizer: {lr: 0.003, warmup_steps: 5}\n"
        "training: {steps: 40, micro_batch_size: 4, seed: 3, eval_every: 20, eval_batches: 2, log_every: 10,"
        " device: cpu}\n"
        "data: {path: " + (directory_ / "train.bin").string() + ", val_path: " + (directory_ / "val.bin").string() +
        "}\n"
        "logging: {run_dir: " + (directory_ / "run").string() + "}\n";
    return parse_config_string(yaml, "test.yaml", overrides);
  }

  std::filesystem::path directory_;
};

struct OpenData {
  TokenFile train, val;
  explicit OpenData(const Config& config)
      : train(config.data.path, uint32_t(config.model.vocab_size)),
        val(config.data.val_path, uint32_t(config.model.vocab_size)) {}
};

TEST_F(TrainerTest, LossFallsAndEvaluationWorks) {
  const Config run = config();
  OpenData data(run);
  TrainerOptions options;
  options.write_metrics = options.write_final_weights = false;
  Trainer trainer(run, data.train, &data.val, options);
  const double initial_val = trainer.evaluate();
  EXPECT_NEAR(initial_val, std::log(256.0), 0.3) << "a fresh model predicts about uniformly";
  std::vector<double> losses;
  for (int step = 0; step < 40; ++step) {
    const StepMetrics metrics = trainer.train_step();
    ASSERT_TRUE(std::isfinite(metrics.loss));
    EXPECT_FALSE(metrics.skipped);
    EXPECT_EQ(metrics.tokens, 4 * 32);
    ASSERT_EQ(metrics.tokens_per_expert.size(), 1u);
    int64_t routed = 0;
    for (int64_t count : metrics.tokens_per_expert[0]) routed += count;
    EXPECT_EQ(routed, 4 * 32) << "top-1: one routed choice per token";
    losses.push_back(metrics.loss);
  }
  EXPECT_EQ(trainer.step(), 40);
  EXPECT_EQ(trainer.optimizer().updates(), 40);
  const double first = (losses[0] + losses[1]) / 2, last = (losses[38] + losses[39]) / 2;
  EXPECT_LT(last, first - 1.5) << "loss " << first << " -> " << last;
  EXPECT_LT(trainer.evaluate(), initial_val - 1.5);
}

TEST_F(TrainerTest, SameSeedGivesBitIdenticalLossesAndWeights) {
  const Config run = config({"training.steps=12", "parallel.deterministic=true", "moe.jitter_eps=0.05",
                             "optimizer.grad_accum_steps=2"});
  OpenData data(run);
  TrainerOptions options;
  auto train = [&](const Config& which, std::vector<double>& losses) {
    Trainer trainer(which, data.train, &data.val, options);
    for (int step = 0; step < 12; ++step) losses.push_back(trainer.train_step().loss);
    return trainer.parameters().master_values(trainer.context(), trainer.parameters().layout().find("blocks.1.moe.w1"));
  };
  std::vector<double> first, second, other;
  const std::vector<double> weights_first = train(run, first), weights_second = train(run, second);
  EXPECT_EQ(first, second);
  EXPECT_EQ(weights_first, weights_second);
  Config reseeded = run;
  reseeded.training.seed = 4;
  train(reseeded, other);
  EXPECT_NE(first, other);
}

TEST_F(TrainerTest, AccumulatedMicroBatchesMatchOneLargeBatch) {
  // Without capacity limits and router losses (which are per micro-batch) the step of 2 x 2
  // sequences equals the step of 1 x 4 sequences up to summation order.
  const std::vector<std::string> common = {"moe.dropless=true", "moe.aux_loss_weight=0", "moe.z_loss_weight=0",
                                           "training.steps=3", "optimizer.warmup_steps=1"};
  std::vector<std::string> accumulated = common, large = common;
  accumulated.insert(accumulated.end(), {"training.micro_batch_size=2", "optimizer.grad_accum_steps=2"});
  large.insert(large.end(), {"training.micro_batch_size=4", "optimizer.grad_accum_steps=1"});
  const Config accumulated_run = config(accumulated), large_run = config(large);
  OpenData data(large_run);
  TrainerOptions options;
  Trainer a(accumulated_run, data.train, &data.val, options), b(large_run, data.train, &data.val, options);
  for (int step = 0; step < 3; ++step) {
    const StepMetrics left = a.train_step(), right = b.train_step();
    EXPECT_NEAR(left.loss, right.loss, 1e-5 * right.loss) << "step " << step;
    EXPECT_NEAR(left.grad_norm, right.grad_norm, 1e-4 * right.grad_norm) << "step " << step;
  }
  for (int index = 0; index < a.parameters().layout().size(); ++index)
    EXPECT_LE(relative_error(a.parameters().master_values(a.context(), index),
                             b.parameters().master_values(b.context(), index)),
              1e-4)
        << a.parameters().layout().spec(index).name;
}

TEST_F(TrainerTest, NonFiniteGradientsSkipTheStepAndHalveTheScale) {
  const Config run = config({"training.steps=40"});
  OpenData data(run);
  TrainerOptions options;
  options.force_loss_scaling = true;
  // The logits' gradient is scale / 128 tokens = 2^127 times (p - onehot): finite, but the sums
  // over tokens in the embedding's gradient overflow fp32.
  options.initial_loss_scale = std::ldexp(1.0, 134);
  Trainer trainer(run, data.train, &data.val, options);
  const int qkv = trainer.parameters().layout().find("blocks.0.attn.qkv");
  const std::vector<double> before = trainer.parameters().master_values(trainer.context(), qkv);
  StepMetrics metrics = trainer.train_step();
  EXPECT_TRUE(metrics.skipped);
  EXPECT_EQ(metrics.loss_scale, std::ldexp(1.0, 133));
  EXPECT_EQ(trainer.parameters().master_values(trainer.context(), qkv), before) << "a skipped step changes nothing";
  EXPECT_EQ(trainer.optimizer().updates(), 0);
  metrics = trainer.train_step();
  EXPECT_TRUE(metrics.skipped);
  int applied_at = -1;
  for (int step = 2; step < 40 && applied_at < 0; ++step)
    if (!trainer.train_step().skipped) applied_at = step;
  ASSERT_GE(applied_at, 0) << "the scale never came down far enough";
  EXPECT_EQ(trainer.loss_scaler().scale(), std::ldexp(1.0, 134 - applied_at));
  EXPECT_EQ(trainer.optimizer().updates(), 1);
  EXPECT_NE(trainer.parameters().master_values(trainer.context(), qkv), before);
}

TEST_F(TrainerTest, RunWritesMetricsAndWeightsThatLoadBack) {
  const Config run = config({"training.steps=6", "training.eval_every=3", "training.log_every=2"});
  OpenData data(run);
  std::ostringstream log;
  TrainerOptions options;
  options.log = &log;
  Trainer trainer(run, data.train, &data.val, options);
  trainer.run();
  EXPECT_NE(log.str().find("step 6/6"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("GFLOP/s"), std::string::npos) << log.str();

  std::ifstream metrics(trainer.metrics_path());
  std::vector<std::string> lines;
  for (std::string line; std::getline(metrics, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 6u);
  for (size_t index = 0; index < lines.size(); ++index) {
    EXPECT_EQ(lines[index].find("{\"step\":" + std::to_string(index + 1) + ","), 0u) << lines[index];
    EXPECT_NE(lines[index].find("\"tokens_per_expert\":[["), std::string::npos) << lines[index];
    EXPECT_EQ(lines[index].find("\"val_loss\"") != std::string::npos, index == 2 || index == 5) << lines[index];
  }

  const WeightsFile file = read_weights_file(trainer.final_weights_path());
  EXPECT_EQ(parse_config_string(file.config_yaml, "weights"), run);
  ModelParameters loaded(trainer.model().layout(), DeviceKind::cpu, DType::f32, DType::f32);
  load_weights(kCpu, file, loaded);
  for (int index = 0; index < loaded.layout().size(); ++index)
    EXPECT_EQ(loaded.master_values(kCpu, index), trainer.parameters().master_values(kCpu, index))
        << loaded.layout().spec(index).name;

  // Corruption is detected.
  std::fstream corrupt(trainer.final_weights_path(), std::ios::in | std::ios::out | std::ios::binary);
  corrupt.seekp(-5, std::ios::end);
  corrupt.put('\x7f');
  corrupt.close();
  EXPECT_THROW(read_weights_file(trainer.final_weights_path()), Error);
  std::filesystem::resize_file(trainer.final_weights_path(), 100);
  EXPECT_THROW(read_weights_file(trainer.final_weights_path()), Error);
}

}  // namespace

