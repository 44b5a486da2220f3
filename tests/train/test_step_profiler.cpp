// The step breakdown of `switchyard train --profile-steps` (src/train/step_profiler.h): the model
// reports every stage once per occurrence (sub-stages one level inside their stage), the stages
// cover forward and backward, each maps to its row, the sums are consistent with the step's span,
// and misuse is refused.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>
#include <string>

#include "src/core/error.h"
#include "src/core/json.h"
#include "src/model/transformer.h"
#include "src/train/step_profiler.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

// One profiled forward + backward of a 3-block model (block 0 dense, blocks 1 and 2 MoE with a
// shared expert), as step 7.
StepProfile profile_one_step(RecomputeMode recompute) {
  ModelConfig model;
  model.vocab_size = 13;
  model.d_model = 8;
  model.n_layers = 3;  // block 0 dense (dense_first_blocks), blocks 1 and 2 MoE (moe_every 1)
  model.n_heads = 2;
  model.seq_len = 6;
  model.d_ff = 6;
  model.moe_every = 1;
  model.dense_first_blocks = 1;
  model.compute_dtype = DType::f32;
  MoeConfig moe;
  moe.num_experts = 4;
  moe.top_k = moe.k_min = 2;
  moe.expert_d_ff = 5;
  moe.num_shared_experts = 1;
  moe.shared_expert_d_ff = 4;
  moe.segment_alignment = 4;
  TransformerOptions options;
  options.activation_dtype = DType::f32;
  options.max_batch = 2;
  options.recompute = recompute;
  Transformer transformer(model, moe, options);
  ModelParameters parameters(transformer.layout(), DeviceKind::cpu, DType::f32, DType::f32);
  parameters.initialize(kCpu, 3);
  HostTensor tokens(DType::i32, {12}), targets(DType::i32, {12});
  std::mt19937_64 generator(5);
  fill_uniform(tokens, generator, 0, 12);
  fill_uniform(targets, generator, 0, 12);

  StepProfiler profiler(DeviceKind::cpu, nullptr);
  profiler.begin_step();
  transformer.set_stage_observer(&profiler);
  transformer.forward_loss(kCpu, parameters, tokens, targets, 2, 6, ForwardMode::training, 1.0f, 0);
  transformer.backward(kCpu, parameters, 1.0f, false);
  transformer.set_stage_observer(nullptr);
  return profiler.end_step(7);
}

TEST(StepProfiler, TheModelsStagesCoverForwardAndBackward) {
  const StepProfile profile = profile_one_step(RecomputeMode::none);
  EXPECT_EQ(profile.step, 7);
  std::map<std::string, int> counts;
  for (const StageTime& stage : profile.stages) {
    counts[stage.stage] = stage.count;
    EXPECT_GE(stage.ms, 0.0) << stage.stage;
    EXPECT_NE(stage_category(stage.stage), "other") << stage.stage;
  }
  // 3 blocks: 1 dense FFN, 2 MoE blocks with a shared expert each; 2 norms per block + the final one;
  // forward residual work: the MoE output's add (the GEMMs add the other residuals as their
  // addends); backward: none (the norms' backward adds to the residual stream's gradient); the
  // shared experts' backward is their FFN's and the add of their input gradient (after the join).
  const std::map<std::string, int> expected = {
      {"embedding", 1},          {"norm", 7},           {"attention", 3},         {"residual", 2},
      {"dense FFN", 1},          {"MoE", 2},            {"shared experts", 2},    {"LM head", 1},
      {"loss", 1},               {"LM head backward", 1}, {"norm backward", 7},  {"attention backward", 3},
      {"dense FFN backward", 1}, {"MoE backward", 2}, {"shared experts backward", 4},
      {"embedding backward", 1}};
  EXPECT_EQ(counts, expected);
  EXPECT_LE(profile.stages_ms(), profile.device_ms + 1e-9);
  EXPECT_GE(profile.idle_ms(), -1e-9);

  ProfileFlops flops;
  flops.tokens_per_step = 12;
  flops.flops_per_token = 1000;
  flops.step_seconds = 0.5;
  const std::string table = format_step_profile({profile}, flops);
  for (const char* row : {"attention", "MoE layers", "shared experts", "dense FFNs", "norms and residuals",
                          "embedding, LM head and loss", "idle", "MFU = tokens/step x FLOP/token / step time"})
    EXPECT_NE(table.find(row), std::string::npos) << row << "\n" << table;
  const std::string text = step_profile_json({profile}, flops);
  EXPECT_NO_THROW(json::parse(text, "profile.json"));
  EXPECT_NE(text.find("\"stage\": \"MoE backward\""), std::string::npos) << text;
}

// Recomputation adds the repeated forward work to backward, each stage in its sublayer's row.
TEST(StepProfiler, RecomputedStagesCountAsBackwardWorkOfTheirSublayer) {
  const StepProfile profile = profile_one_step(RecomputeMode::all);
  std::map<std::string, int> recomputed;
  for (const StageTime& stage : profile.stages) {
    EXPECT_NE(stage_category(stage.stage), "other") << stage.stage;
    if (stage.stage.find(" recompute") != std::string::npos) recomputed[stage.stage] = stage.count;
  }
  const std::map<std::string, int> expected = {{"norm recompute", 6},       {"attention recompute", 3},
                                               {"dense FFN recompute", 1},  {"MoE recompute", 2},
                                               {"shared experts recompute", 2}};
  EXPECT_EQ(recomputed, expected);
  std::map<std::string, int> moe_only;
  for (const StageTime& stage : profile_one_step(RecomputeMode::moe).stages)
    if (stage.stage.find(" recompute") != std::string::npos) moe_only[stage.stage] = stage.count;
  EXPECT_EQ(moe_only, (std::map<std::string, int>{{"norm recompute", 3}, {"dense FFN recompute", 1},
                                                  {"MoE recompute", 2}, {"shared experts recompute", 2}}));
  EXPECT_EQ(stage_category("MoE recompute"), "MoE layers");
  EXPECT_EQ(stage_category("norm recompute"), "norms and residuals");
  EXPECT_TRUE(is_backward_stage("attention recompute"));
}

TEST(StepProfiler, CategoriesAndDirections) {
  EXPECT_EQ(stage_category("MoE backward"), "MoE layers");
  EXPECT_EQ(stage_category("gradient sync"), "gradient sync");
  EXPECT_EQ(stage_category("router bias update"), "optimizer");
  EXPECT_EQ(stage_category("loss"), "embedding, LM head and loss");
  EXPECT_EQ(stage_category("something new"), "other");
  EXPECT_TRUE(is_backward_stage("norm backward"));
  EXPECT_FALSE(is_backward_stage("norm"));
}

TEST(StepProfiler, RefusesDeepNestingAndStagesOutsideAStep) {
  StepProfiler profiler(DeviceKind::cpu, nullptr);
  EXPECT_THROW(profiler.stage_begin(kCpu, "norm"), Error);
  profiler.begin_step();
  profiler.stage_begin(kCpu, "MoE");
  profiler.stage_begin(kCpu, "routing");  // a sub-stage: one level is allowed
  EXPECT_THROW(profiler.stage_begin(kCpu, "norm"), Error);  // two levels are not
  EXPECT_THROW(profiler.stage_end(kCpu, "MoE"), Error);     // the sub-stage is open
  EXPECT_THROW(profiler.stage_flops("MoE", 1.0), Error);    // FLOPs go to the open (sub-)stage only
  EXPECT_THROW(profiler.end_step(1), Error);
  profiler.stage_end(kCpu, "routing");
  profiler.stage_end(kCpu, "MoE");
  EXPECT_THROW(profiler.stage_end(kCpu, "MoE"), Error);
  const StepProfile profile = profiler.end_step(1);
  ASSERT_EQ(profile.stages.size(), 1u);
  EXPECT_EQ(profile.stages[0].stage, "MoE");
  EXPECT_EQ(profile.stages[0].count, 1);
  ASSERT_EQ(profile.substages.size(), 1u);
  EXPECT_EQ(profile.substages[0].parent, "MoE");
  EXPECT_EQ(profile.substages[0].stage, "routing");
}

// The sub-stages: the attention's and the FFNs' pieces, the MoE layer's own stages under "MoE" and
// "MoE backward", each inside its stage's time, and listed in the table and the JSON.
TEST(StepProfiler, SubStagesBreakTheStagesDown) {
  const StepProfile profile = profile_one_step(RecomputeMode::none);
  std::map<std::pair<std::string, std::string>, int> counts;
  std::map<std::string, double> substage_sums;
  for (const StageTime& substage : profile.substages) {
    counts[{substage.parent, substage.stage}] = substage.count;
    substage_sums[substage.parent] += substage.ms;
    EXPECT_GE(substage.ms, 0.0);
  }
  for (const StageTime& stage : profile.stages)
    if (substage_sums.count(stage.stage)) EXPECT_LE(substage_sums[stage.stage], stage.ms + 1e-9) << stage.stage;
  // 3 blocks: every attention has its four pieces (rotary: the model's default positions).
  for (const char* piece : {"QKV projection", "attention core", "output projection"})
    EXPECT_EQ((counts[{"attention", piece}]), 3) << piece;
  for (const char* piece : {"QKV projection backward", "attention core backward", "output projection backward"})
    EXPECT_EQ((counts[{"attention backward", piece}]), 3) << piece;
  // The dense FFN (block 0) and the two shared experts.
  EXPECT_EQ((counts[{"dense FFN", "GEMM 1"}]), 1);
  EXPECT_EQ((counts[{"dense FFN", "GEMM 2"}]), 1);
  EXPECT_EQ((counts[{"shared experts", "activation"}]), 2);
  EXPECT_EQ((counts[{"dense FFN backward", "weight grad 1"}]), 1);
  EXPECT_EQ((counts[{"shared experts backward", "data grad 1"}]), 2);
  // The MoE layer's own stages, two MoE blocks.
  for (const char* piece : {"router GEMM", "routing", "permute", "expert GEMM 1", "expert GEMM 2", "combine"})
    EXPECT_EQ((counts[{"MoE", piece}]), 2) << piece;
  for (const char* piece : {"combine backward", "weight grad 2", "data grad 1", "permute backward", "routing backward",
                            "router weight grad", "router input grad"})
    EXPECT_EQ((counts[{"MoE backward", piece}]), 2) << piece;

  const std::string table = format_step_profile({profile}, ProfileFlops{});
  for (const char* text : {"within the stages", "attention core backward", "expert GEMM 1", "(in no sub-stage)"})
    EXPECT_NE(table.find(text), std::string::npos) << text << "\n" << table;
  const std::string text = step_profile_json({profile}, ProfileFlops{});
  EXPECT_NO_THROW(json::parse(text, "profile.json"));
  EXPECT_NE(text.find("\"parent\": \"MoE backward\", \"stage\": \"weight grad 2\""), std::string::npos) << text;
}

// The matmul FLOPs the stages report: 2 m k n per GEMM at the model's shapes (T = 12 tokens,
// D = 8, 2 heads of 4, S = 6), the attention core's causal half, the experts over T * top_k
// choices; backward GEMM pairs twice their forward; stages without a count report none. The table
// shows their TFLOP/s, the JSON their FLOPs.
TEST(StepProfiler, SubStagesReportTheirMatmulFlops) {
  const StepProfile profile = profile_one_step(RecomputeMode::none);
  std::map<std::pair<std::string, std::string>, double> flops;
  for (const StageTime& substage : profile.substages) flops[{substage.parent, substage.stage}] = substage.flops;
  for (const StageTime& stage : profile.stages) EXPECT_EQ(stage.flops, 0.0) << stage.stage;
  const double tokens = 12, width = 8, per_layer_core = 2.0 * (2 * 2) * 6 * 6 * 4;
  EXPECT_EQ((flops[{"attention", "QKV projection"}]), 3 * 2 * tokens * width * 3 * width);
  EXPECT_EQ((flops[{"attention", "attention core"}]), 3 * per_layer_core);
  EXPECT_EQ((flops[{"attention", "output projection"}]), 3 * 2 * tokens * width * width);
  EXPECT_EQ((flops[{"attention backward", "attention core backward"}]), 3 * 2 * per_layer_core);
  EXPECT_EQ((flops[{"attention backward", "QKV projection backward"}]), 3 * 2 * 2 * tokens * width * 3 * width);
  EXPECT_EQ((flops[{"attention", "rotary"}]), 0.0);
  const bool swiglu = MoeConfig{}.activation == ExpertActivation::swiglu;
  const double expert_w1 = swiglu ? 10 : 5, dense_w1 = swiglu ? 12 : 6, shared_w1 = swiglu ? 8 : 4;
  const double choices = tokens * 2;  // top-2
  EXPECT_EQ((flops[{"MoE", "router GEMM"}]), 2 * 2 * tokens * width * 4);
  EXPECT_EQ((flops[{"MoE", "expert GEMM 1"}]), 2 * 2 * choices * width * expert_w1);
  EXPECT_EQ((flops[{"MoE", "expert GEMM 2"}]), 2 * 2 * choices * 5 * width);
  EXPECT_EQ((flops[{"MoE backward", "weight grad 1"}]), 2 * 2 * choices * width * expert_w1);
  EXPECT_EQ((flops[{"MoE backward", "data grad 2"}]), 2 * 2 * choices * 5 * width);
  EXPECT_EQ((flops[{"MoE backward", "router input grad"}]), 2 * 2 * tokens * 4 * width);
  EXPECT_EQ((flops[{"MoE", "routing"}]), 0.0);
  EXPECT_EQ((flops[{"dense FFN", "GEMM 1"}]), 2 * tokens * width * dense_w1);
  EXPECT_EQ((flops[{"dense FFN backward", "data grad 2"}]), 2 * tokens * 6 * width);
  EXPECT_EQ((flops[{"shared experts", "GEMM 1"}]), 2 * 2 * tokens * width * shared_w1);

  const std::string table = format_step_profile({profile}, ProfileFlops{});
  EXPECT_NE(table.find("TFLOP/s"), std::string::npos) << table;
  const std::string text = step_profile_json({profile}, ProfileFlops{});
  EXPECT_NE(text.find("\"stage\": \"expert GEMM 1\", \"ms\": "), std::string::npos) << text;
  EXPECT_NE(text.find("\"flops\": "), std::string::npos) << text;
}

// profile.json read back (`switchyard report`): the same steps, stages, sub-stages and FLOPs, so
// the same table; text that is not a profile is refused naming the file and the field.
TEST(StepProfiler, ProfileJsonReadsBackToTheSameTable) {
  const StepProfile profile = profile_one_step(RecomputeMode::none);
  ProfileFlops flops;
  flops.tokens_per_step = 12;
  flops.flops_per_token = 3.5e6;
  flops.step_seconds = 0.25;
  flops.peak_flops = 989e12;
  const std::string text = step_profile_json({profile, profile}, flops);
  ProfileFlops read_flops;
  const std::vector<StepProfile> read = parse_step_profile_json(text, "profile.json", read_flops);
  ASSERT_EQ(read.size(), 2u);
  EXPECT_EQ(read[0].stages.size(), profile.stages.size());
  EXPECT_EQ(read[0].substages.size(), profile.substages.size());
  EXPECT_EQ(read_flops.peak_flops, flops.peak_flops);
  EXPECT_EQ(format_step_profile(read, read_flops), format_step_profile({profile, profile}, flops));
  try {
    parse_step_profile_json("{\"tokens_per_step\": 1, \"flops_per_token\": 1, \"step_seconds\": 1, "
                            "\"peak_flops\": 0, \"steps\": [{\"step\": 1}]}",
                            "runs/x/profile.json", read_flops);
    FAIL() << "a step without device_ms was accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("runs/x/profile.json"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("device_ms"), std::string::npos) << error.what();
  }
  EXPECT_THROW(parse_step_profile_json("not json", "p.json", read_flops), Error);
}

}  // namespace
