// Routing balance in training on the CPU backend (src/train/trainer.h, src/model/transformer.h
// "Routing balance across a step"): AdamW leaves a zero-gradient tensor without decay bit for bit
// (which is what keeps the router bias out of the optimizer); the step metrics and the router
// statistics carry the sequence-level and global-batch losses and the router biases under the key
// names the report reads; a tiny model with aux-loss-free balancing moves each bias toward balance
// after every applied step (not after a skipped one); and a resumed run with the bias and the new
// losses repeats the straight one bit for bit.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "src/core/json.h"
#include "src/model/transformer.h"
#include "src/train/metrics.h"
#include "src/train/optimizer.h"
#include "src/train/trainer.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;
namespace fs = std::filesystem;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

// ---- AdamW and a tensor without gradient ---------------------------------------------------------

TEST(Optimizer, LeavesAZeroGradientTensorWithoutDecayBitIdentical) {
  ModelConfig model;
  model.vocab_size = 13;
  model.d_model = 8;
  model.n_layers = 2;
  model.n_heads = 2;
  model.seq_len = 6;
  model.d_ff = 6;
  MoeConfig moe;
  moe.num_experts = 4;
  moe.top_k = moe.k_min = 1;
  moe.expert_d_ff = 5;
  moe.bias_update_rate = 0.01;
  const ParameterLayout layout = Transformer::build_layout(model, moe, 1, 0);
  const int bias = layout.find("blocks.1.moe.router_bias"), norm = layout.find("blocks.1.ffn_norm.weight");
  ASSERT_GE(bias, 0);
  for (DType compute : {DType::f32, DType::bf16}) {
    ModelParameters parameters(layout, DeviceKind::cpu, DType::f32, compute);
    parameters.initialize(kCpu, 1);
    parameters.set_master_values(kCpu, bias, {0.37, -1.5e-3, 0.0, -0.0});  // -0.0 must stay -0.0
    parameters.refresh_compute_copies(kCpu);
    OptimizerConfig config;
    config.weight_decay = 0.1;
    config.lr = 0.05;
    AdamWOptimizer optimizer(parameters, config);
    const Tensor master = parameters.master(bias);
    const Tensor copy = parameters.compute(bias);
    const std::vector<char> before(static_cast<const char*>(master.data),
                                   static_cast<const char*>(master.data) + master.bytes());
    const std::vector<char> copy_before(static_cast<const char*>(copy.data),
                                        static_cast<const char*>(copy.data) + copy.bytes());
    const std::vector<double> norm_before = parameters.master_values(kCpu, norm);
    std::mt19937_64 generator(9);
    for (int step = 0; step < 5; ++step) {
      for (int group = 0; group < kNumParameterGroups; ++group) {
        Tensor gradients = parameters.grad_group(ParameterGroup(group));
        fill_normal(gradients, generator, 0, 1);  // every gradient non-zero ...
      }
      Tensor bias_gradient = parameters.grad(bias);
      ops::fill_zero(kCpu, bias_gradient);  // ... except the bias's, as backward leaves it
      optimizer.step(kCpu, 0.05, step % 2 ? 0.25 : 3.0);  // loss scale / clip factors
    }
    const std::vector<char> after(static_cast<const char*>(master.data),
                                  static_cast<const char*>(master.data) + master.bytes());
    EXPECT_TRUE(before == after) << "AdamW moved a tensor whose gradient is 0 (compute " << dtype_name(compute) << ")";
    EXPECT_NE(parameters.master_values(kCpu, norm), norm_before) << "the rest of the no-decay range moved";
    const std::vector<char> copy_after(static_cast<const char*>(copy.data),
                                       static_cast<const char*>(copy.data) + copy.bytes());
    EXPECT_TRUE(copy_before == copy_after) << "its compute copy changed";
  }
}

// ---- The metrics' keys ------------------------------------------------------------------------------

TEST(BalanceMetrics, JsonKeysAndProgressLine) {
  StepMetrics metrics;
  metrics.step = 4;
  metrics.total_steps = 8;
  metrics.aux_loss = 0.01;
  metrics.seq_aux_loss = 0.002;
  metrics.global_aux_loss = 0.003;
  metrics.tokens_per_expert = {{3, 5}, {4, 4}};
  std::vector<double> sums(kNumRouterSums + 2, 0.0);
  sums[kRouterForwards] = 4;
  sums[kRouterTokens] = 8;
  sums[kNumRouterSums] = 3;
  sums[kNumRouterSums + 1] = 5;
  metrics.router.push_back(derive_router_stats(0, sums.data(), 2));
  metrics.router.push_back(derive_router_stats(1, sums.data(), 2));
  const std::vector<double> bias = {-0.02, 0.01};
  attach_balance_stats(metrics.router[0], 0.008, 0.012, &bias);  // 4 forwards
  attach_balance_stats(metrics.router[1], 0.004, 0.0, nullptr);
  EXPECT_DOUBLE_EQ(metrics.router[0].seq_aux_loss, 0.002);
  EXPECT_DOUBLE_EQ(metrics.router[0].global_aux_loss, 0.003);
  EXPECT_DOUBLE_EQ(metrics.router[0].bias_std, 0.015);

  const json::Value parsed = json::parse(metrics_json(metrics), "metrics line");
  EXPECT_NEAR(parsed.number_or("seq_aux_loss", -1), 0.002, 1e-12);
  EXPECT_NEAR(parsed.number_or("global_aux_loss", -1), 0.003, 1e-12);
  EXPECT_NEAR(parsed.number_or("aux_loss", -1), 0.01, 1e-12) << "existing keys stay";
  const json::Value& biased = parsed.find("router")->elements()[0];
  EXPECT_NEAR(biased.number_or("seq_aux_loss", -1), 0.002, 1e-12);
  EXPECT_NEAR(biased.number_or("global_aux_loss", -1), 0.003, 1e-12);
  ASSERT_NE(biased.find("bias"), nullptr);
  ASSERT_EQ(biased.find("bias")->elements().size(), 2u);
  EXPECT_NEAR(biased.find("bias")->elements()[0].number_or(0), -0.02, 1e-12);
  EXPECT_NEAR(biased.number_or("bias_min", 0), -0.02, 1e-12);
  EXPECT_NEAR(biased.number_or("bias_max", 0), 0.01, 1e-12);
  EXPECT_NEAR(biased.number_or("bias_std", 0), 0.015, 1e-12);
  EXPECT_NE(biased.find("tokens_per_expert"), nullptr);
  const json::Value& plain = parsed.find("router")->elements()[1];
  EXPECT_NEAR(plain.number_or("seq_aux_loss", -1), 0.001, 1e-12);
  EXPECT_EQ(plain.find("bias"), nullptr) << "no bias keys for a layer without one";
  EXPECT_FALSE(plain.has("bias_min"));

  std::string line = format_progress_line(metrics, DeviceKind::cpu);
  EXPECT_EQ(line.find(" seq "), std::string::npos) << "shown only when its weight is > 0: " << line;
  EXPECT_EQ(line.find(" global "), std::string::npos) << line;
  EXPECT_NE(line.find("bias -0.0200..0.0100"), std::string::npos) << line;
  metrics.shows_seq_aux_loss = metrics.shows_global_aux_loss = true;
  line = format_progress_line(metrics, DeviceKind::cpu);
  EXPECT_NE(line.find("aux 0.0100 z 0.00000 seq 0.0020 global 0.0030 |"), std::string::npos) << line;
  metrics.router.clear();
  EXPECT_EQ(format_progress_line(metrics, DeviceKind::cpu).find("bias"), std::string::npos);
}

// ---- Training --------------------------------------------------------------------------------------

class BalanceTraining : public ::testing::Test {
 protected:
  void SetUp() override {
    directory_ = fs::temp_directory_path() /
                 ("switchyard_balance_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
                  "_" + std::to_string(::getpid()));
    fs::remove_all(directory_);
    fs::create_directories(directory_);
    std::mt19937_64 generator(17);
    for (const char* split : {"train", "val"}) {
      std::vector<uint32_t> tokens;  // random words over a small alphabet: learnable
      while (tokens.size() < (split[0] == 't' ? 30000u : 3000u)) {
        const int length = 2 + int(generator() % 6);
        for (int letter = 0; letter < length; ++letter) tokens.push_back(uint32_t('a' + generator() % 8));
        tokens.push_back(generator() % 5 == 0 ? '\n' : ' ');
      }
      write_token_file((directory_ / (std::string(split) + ".bin")).string(), tokens, 256);
    }
  }
  void TearDown() override { fs::remove_all(directory_); }

  // One MoE block (block 1) of 4 experts, top-1, no aux loss: balance by the bias alone.
  Config config(const std::vector<std::string>& overrides = {}) const {
    const std::string yaml =
        "model: {d_model: 16, n_layers: 2, n_heads: 2, seq_len: 16, d_ff: 32, moe_every: 2, compute_dtype: fp32}\n"
        "moe: {num_experts: 4, top_k: 1, expert_d_ff: 16, renormalize_gates: false, segment_alignment: 4,"
        " aux_loss_weight: 0, bias_update_rate: 0.01}\n"
        "parallel: {deterministic: true}\n"
        "optimizer: {lr: 0.01, warmup_steps: 2}\n"
        "training: {steps: 8, micro_batch_size: 2, seed: 5, eval_every: 0, eval_batches: 1, log_every: 2,"
        " device: cpu}\n"
        "data: {path: " + (directory_ / "train.bin").string() + ", val_path: " + (directory_ / "val.bin").string() +
        "}\n"
        "checkpoint: {every: 0, keep_last: 0}\n"
        "logging: {run_dir: " + (directory_ / "run").string() + "}\n";
    return parse_config_string(yaml, "balance.yaml", overrides);
  }

  struct Run {
    TokenFile train, val;
    std::ostringstream log;
    std::unique_ptr<Trainer> trainer;
    explicit Run(const Config& config, double initial_loss_scale = 0)
        : train(config.data.path, uint32_t(config.model.vocab_size)),
          val(config.data.val_path, uint32_t(config.model.vocab_size)) {
      TrainerOptions options;
      options.force_loss_scaling = true;
      options.initial_loss_scale = initial_loss_scale;
      options.log = &log;
      trainer = std::make_unique<Trainer>(config, train, &val, options);
    }
    std::vector<double> bias(int block = 1) const {
      const int index = trainer->parameters().layout().find("blocks." + std::to_string(block) + ".moe.router_bias");
      return trainer->parameters().master_values(trainer->context(), index);
    }
  };

  fs::path directory_;
};

// The bias after one update from `loads`: b += rate * sign(mean - load), in fp32 as the op adds.
std::vector<double> updated(const std::vector<double>& bias, const std::vector<int64_t>& loads, float rate) {
  double mean = 0;
  for (int64_t load : loads) mean += double(load);
  mean /= double(loads.size());
  std::vector<double> result(bias.size());
  for (size_t e = 0; e < bias.size(); ++e) {
    const double gap = mean - double(loads[e]);
    const float step = gap > 0 ? rate : gap < 0 ? -rate : 0.0f;
    result[e] = double(float(bias[e]) + step);
  }
  return result;
}

// max_e load_e / mean_e load_e of one step's loads.
double load_imbalance(const std::vector<int64_t>& loads) {
  int64_t total = 0, largest = 0;
  for (int64_t load : loads) total += load, largest = std::max(largest, load);
  return total > 0 ? double(largest) / (double(total) / double(loads.size())) : 0.0;
}

TEST_F(BalanceTraining, BiasMovesTowardBalanceAfterEveryAppliedStep) {
  // A router that stays in use (sigmoid scores, a slow learning rate): with the bias its load
  // imbalance over 40 steps is lower than without (1.58 against 2.15 here; other seeds, rates and
  // softmax scores agree).
  const std::vector<std::string> overrides = {"training.steps=40", "optimizer.grad_accum_steps=2", "optimizer.lr=0.001",
                                        "model.init_std=0.1", "moe.score_function=sigmoid"};
  const Config run_config = config(overrides);
  auto mean_imbalance = [&](const Config& which, bool check_bias) {
    Run run(which);
    std::vector<double> bias = check_bias ? run.bias() : std::vector<double>{};
    if (check_bias) EXPECT_EQ(bias, std::vector<double>(4, 0.0));
    double sum = 0;
    for (int step = 1; step <= 40; ++step) {
      const StepMetrics metrics = run.trainer->train_step();
      EXPECT_FALSE(metrics.skipped);
      const std::vector<int64_t>& loads = metrics.tokens_per_expert[0];
      sum += load_imbalance(loads);
      if (!check_bias) continue;
      // The step's loads (both micro-batches) moved every expert's bias: down above the mean, up below.
      const std::vector<double> expected = updated(bias, loads, float(which.moe.bias_update_rate));
      bias = run.bias();
      EXPECT_EQ(bias, expected) << "step " << step;
    }
    return sum / 40.0;
  };
  Config without = run_config;
  without.moe.bias_update_rate = 0;
  const double balanced = mean_imbalance(run_config, true), unbalanced = mean_imbalance(without, false);
  EXPECT_LT(balanced, unbalanced) << "the bias did not bring the loads closer to balance";
}

TEST_F(BalanceTraining, SkippedStepLeavesTheBiasAndDropsItsLoads) {
  const Config run_config = config({"training.steps=40"});
  // A loss scale that overflows the gradients: the first steps are skipped (test_training_cpu.cpp;
  // 2^132 / 32 tokens keeps the logits' gradient scale finite in fp32).
  Run run(run_config, std::ldexp(1.0, 132));
  StepMetrics metrics = run.trainer->train_step();
  ASSERT_TRUE(metrics.skipped);
  EXPECT_EQ(run.bias(), std::vector<double>(4, 0.0)) << "a skipped step moves no bias";
  for (int step = 2; step < 40 && metrics.skipped; ++step) metrics = run.trainer->train_step();
  ASSERT_FALSE(metrics.skipped) << "the scale never came down far enough";
  // The first applied step moved the bias by its own loads only.
  EXPECT_EQ(run.bias(), updated(std::vector<double>(4, 0.0), metrics.tokens_per_expert[0], 0.01f));
}

TEST_F(BalanceTraining, ResumeIsBitIdenticalWithBiasAndBalanceLosses) {
  const std::vector<std::string> overrides = {
      "training.steps=6", "moe.score_function=sigmoid", "moe.num_groups=2", "moe.topk_groups=1",
      "moe.seq_aux_loss_weight=0.01", "moe.global_aux_loss_weight=0.01", "moe.jitter_eps=0.05",
      "optimizer.grad_accum_steps=2", "optimizer.loss_scale_init=1024", "optimizer.loss_scale_growth_interval=2"};
  auto with = [&](const std::string& extra) {
    std::vector<std::string> all = overrides;
    all.push_back(extra);
    return config(all);
  };
  const Config run_config = config(overrides);
  std::vector<double> straight_losses;
  Run straight(run_config);
  for (int step = 0; step < 6; ++step) {
    const StepMetrics metrics = straight.trainer->train_step();
    straight_losses.push_back(metrics.loss);
    EXPECT_GT(metrics.seq_aux_loss, 0.0);
    EXPECT_GT(metrics.global_aux_loss, 0.0);
  }
  const std::vector<double> straight_bias = straight.bias();
  EXPECT_NE(straight_bias, std::vector<double>(4, 0.0)) << "the bias moved";

  std::vector<double> losses;
  std::string path;
  {
    Run before(run_config);
    for (int step = 0; step < 3; ++step) losses.push_back(before.trainer->train_step().loss);
    path = before.trainer->save_checkpoint().path;
  }
  std::ifstream manifest(fs::path(path) / "manifest.json");
  const std::string manifest_text((std::istreambuf_iterator<char>(manifest)), std::istreambuf_iterator<char>());
  EXPECT_NE(manifest_text.find("blocks.1.moe.router_bias"), std::string::npos) << "the bias is saved";
  Run after(run_config);
  ASSERT_TRUE(after.trainer->resume(path));
  for (int step = 0; step < 3; ++step) losses.push_back(after.trainer->train_step().loss);
  EXPECT_EQ(losses, straight_losses);
  EXPECT_EQ(after.bias(), straight_bias);
  for (int group = 0; group < kNumParameterGroups; ++group) {
    const Tensor left = straight.trainer->parameters().master_group(ParameterGroup(group));
    const Tensor right = after.trainer->parameters().master_group(ParameterGroup(group));
    EXPECT_EQ(0, std::memcmp(left.data, right.data, left.bytes())) << "group " << group;
  }

  // Another rate resumes the same model; no bias at all is another model, named as such.
  Run other_rate(with("moe.bias_update_rate=0.5"));
  EXPECT_TRUE(other_rate.trainer->resume(path));
  Run no_bias(with("moe.bias_update_rate=0"));
  try {
    no_bias.trainer->resume(path);
    ADD_FAILURE() << "a checkpoint with router biases loaded into a model without";
  } catch (const Error& error) {
    EXPECT_NE(error.message().find("moe.bias_update_rate > 0 is true there, false in this run"), std::string::npos)
        << error.message();
  }
}

// The JSON lines of a run: every step has the balance losses; router statistics (every
// training.log_every steps) have them per layer, and the bias with its summary where there is one.
// *final_bias: block 1's router bias at the end, when there is one.
std::vector<json::Value> run_and_read_metrics(const Config& run_config, std::vector<double>* final_bias = nullptr) {
  TokenFile train(run_config.data.path, uint32_t(run_config.model.vocab_size));
  TokenFile val(run_config.data.val_path, uint32_t(run_config.model.vocab_size));
  std::ostringstream log;
  TrainerOptions options;
  options.log = &log;
  Trainer trainer(run_config, train, &val, options);
  trainer.run();
  const int bias = trainer.parameters().layout().find("blocks.1.moe.router_bias");
  if (final_bias != nullptr && bias >= 0) *final_bias = trainer.parameters().master_values(trainer.context(), bias);
  std::ifstream file(trainer.metrics_path());
  std::vector<json::Value> lines;
  for (std::string line; std::getline(file, line);) lines.push_back(json::parse(line, "metrics"));
  return lines;
}

TEST_F(BalanceTraining, MetricsLinesCarryTheBalanceLossesWithoutABias) {
  const std::vector<json::Value> lines = run_and_read_metrics(config({"moe.bias_update_rate=0", "training.steps=4"}));
  ASSERT_EQ(lines.size(), 4u);
  for (const json::Value& line : lines) {
    EXPECT_EQ(line.number_or("seq_aux_loss", -1), 0.0);
    EXPECT_EQ(line.number_or("global_aux_loss", -1), 0.0);
    const json::Value* router = line.find("router");
    if (router == nullptr) continue;
    for (const json::Value& layer : router->elements()) {
      EXPECT_EQ(layer.number_or("seq_aux_loss", -1), 0.0);
      EXPECT_EQ(layer.number_or("global_aux_loss", -1), 0.0);
      EXPECT_FALSE(layer.has("bias"));
    }
  }
  EXPECT_NE(lines[1].find("router"), nullptr);
}

TEST_F(BalanceTraining, MetricsLinesCarryTheBiasAndTheLosses) {
  const Config run_config = config({"training.steps=4", "moe.seq_aux_loss_weight=0.01",
                                    "moe.global_aux_loss_weight=0.01"});
  std::vector<double> final_bias;
  const std::vector<json::Value> lines = run_and_read_metrics(run_config, &final_bias);
  ASSERT_EQ(lines.size(), 4u);
  ASSERT_EQ(final_bias.size(), 4u);
  for (const json::Value& line : lines) {
    EXPECT_GT(line.number_or("seq_aux_loss", -1), 0.0);
    EXPECT_GT(line.number_or("global_aux_loss", -1), 0.0);
  }
  const json::Value* router = lines[3].find("router");
  ASSERT_NE(router, nullptr);
  ASSERT_EQ(router->elements().size(), 1u);
  const json::Value& layer = router->elements()[0];
  EXPECT_GT(layer.number_or("seq_aux_loss", -1), 0.0);
  EXPECT_GT(layer.number_or("global_aux_loss", -1), 0.0);
  ASSERT_NE(layer.find("bias"), nullptr);
  ASSERT_EQ(layer.find("bias")->elements().size(), 4u);
  // The bias as it stands after the last step, and its summary.
  double mean = 0, squares = 0;
  for (size_t e = 0; e < 4; ++e) {
    EXPECT_NEAR(layer.find("bias")->elements()[e].number_or(1), final_bias[e], 1e-9) << "expert " << e;
    mean += final_bias[e] / 4;
  }
  for (double value : final_bias) squares += (value - mean) * (value - mean) / 4;
  EXPECT_NEAR(layer.number_or("bias_min", 1), *std::min_element(final_bias.begin(), final_bias.end()), 1e-9);
  EXPECT_NEAR(layer.number_or("bias_max", 1), *std::max_element(final_bias.begin(), final_bias.end()), 1e-9);
  EXPECT_NEAR(layer.number_or("bias_std", 1), std::sqrt(squares), 1e-9);
  EXPECT_NE(final_bias, std::vector<double>(4, 0.0)) << "the bias moved";
  // The router window of step 2 had the bias of step 2 (an earlier one).
  EXPECT_NE(lines[1].find("router")->elements()[0].find("bias"), nullptr);
}

}  // namespace
