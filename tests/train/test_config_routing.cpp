// The modern routing keys of the `moe:` section (src/train/config_routing_checks.cpp, the key table
// in config_schema.cpp): defaults, each key parsed, each bad value named with its key and line, the
// combinations validate_routing_params would refuse at the first forward, expert choice's rules,
// and the resolved config (run folder, checkpoints) written and read back by parse_stored_config.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/model/moe_router.h"
#include "src/train/config.h"
#include "tests/support/expect_error.h"

using switchyard::testing::expect_bad_input;

using namespace switchyard;

namespace {

// Line numbers below refer to this text: the routing keys go after line 8 (their first line is 9).
const char* const kHead =
    "model:\n"               // 1
    "  d_model: 64\n"        // 2
    "  n_layers: 2\n"        // 3
    "  n_heads: 4\n"         // 4
    "  seq_len: 32\n"        // 5
    "moe:\n"                 // 6
    "  num_experts: 8\n"     // 7
    "  top_k: 2\n";          // 8
const char* const kTail =
    "training:\n"
    "  steps: 100\n"
    "data:\n"
    "  path: data/train.bin\n";

// The config with `moe_lines` (each "  key: value") in the moe section from line 9 on.
Config parse(const std::vector<std::string>& moe_lines, const std::vector<std::string>& overrides = {}) {
  std::string text = kHead;
  for (const std::string& line : moe_lines) text += line + "\n";
  return parse_config_string(text + kTail, "r.yaml", overrides);
}

void expect_bad(const std::vector<std::string>& moe_lines, const std::vector<std::string>& fragments) {
  expect_bad_input([&] { parse(moe_lines); }, fragments);
}

TEST(RoutingConfig, DefaultsAreTheSwitchRouter) {
  const Config config = parse({});
  const MoeConfig& moe = config.moe;
  EXPECT_EQ(moe.routing, RoutingMethod::token_choice);
  EXPECT_EQ(moe.score_function, ScoreFunction::softmax);
  EXPECT_EQ(moe.routed_scaling_factor, 1.0);
  EXPECT_EQ(moe.bias_update_rate, 0.0);
  EXPECT_FALSE(moe.uses_routing_bias());
  EXPECT_EQ(moe.seq_aux_loss_weight, 0.0);
  EXPECT_EQ(moe.global_aux_loss_weight, 0.0);
  EXPECT_EQ(moe.num_groups, 1);
  EXPECT_EQ(moe.topk_groups, 1);  // derived: num_groups
  EXPECT_EQ(moe.drop_policy, DropPolicy::position);
  // The layer's routing parameters are then exactly the Switch defaults.
  MoeLayerConfig layer;
  layer.moe = moe;
  layer.d_model = 64;
  const RoutingParams params = layer.routing_params(10, true), defaults;
  EXPECT_EQ(params.method, defaults.method);
  EXPECT_EQ(params.score_function, defaults.score_function);
  EXPECT_EQ(params.routed_scaling_factor, defaults.routed_scaling_factor);
  EXPECT_EQ(params.num_groups, defaults.num_groups);
  EXPECT_EQ(params.topk_groups, defaults.topk_groups);
  EXPECT_EQ(params.drop_policy, defaults.drop_policy);
  EXPECT_EQ(params.seq_aux_loss_weight, 0.0f);
  EXPECT_EQ(params.global_aux_loss_weight, 0.0f);
}

TEST(RoutingConfig, EachKeyIsReadAndReachesTheRoutingParameters) {
  const Config config = parse({"  routing: token_choice", "  score_function: sigmoid", "  routed_scaling_factor: 2.5",
                               "  bias_update_rate: 0.001", "  seq_aux_loss_weight: 0.0001",
                               "  global_aux_loss_weight: 0.002", "  num_groups: 4", "  topk_groups: 2",
                               "  drop_policy: probability"});
  const MoeConfig& moe = config.moe;
  EXPECT_EQ(moe.score_function, ScoreFunction::sigmoid);
  EXPECT_EQ(moe.routed_scaling_factor, 2.5);
  EXPECT_EQ(moe.bias_update_rate, 0.001);
  EXPECT_TRUE(moe.uses_routing_bias());
  EXPECT_EQ(moe.seq_aux_loss_weight, 0.0001);
  EXPECT_EQ(moe.global_aux_loss_weight, 0.002);
  EXPECT_EQ(moe.num_groups, 4);
  EXPECT_EQ(moe.topk_groups, 2);
  EXPECT_EQ(moe.drop_policy, DropPolicy::probability);

  MoeLayerConfig layer;
  layer.moe = moe;
  layer.d_model = config.model.d_model;
  layer.tokens_per_sequence = config.model.seq_len;
  EXPECT_NO_THROW(layer.validate());
  const RoutingParams params = layer.routing_params(100, true);
  EXPECT_EQ(params.method, RoutingMethod::token_choice);
  EXPECT_EQ(params.score_function, ScoreFunction::sigmoid);
  EXPECT_EQ(params.routed_scaling_factor, 2.5f);
  EXPECT_EQ(params.num_groups, 4);
  EXPECT_EQ(params.topk_groups, 2);
  EXPECT_EQ(params.drop_policy, DropPolicy::probability);
  EXPECT_EQ(params.tokens_per_sequence, 32);
  EXPECT_EQ(params.seq_aux_loss_weight, 0.0001f);
  EXPECT_EQ(params.global_aux_loss_weight, 0.002f);
  EXPECT_EQ(routing_num_sequences(params), 4);  // ceil(100 / 32)
  EXPECT_EQ(layer.max_sequences(100), 4);
  EXPECT_EQ(layer.max_sequences(96), 3);
  layer.tokens_per_sequence = 0;
  EXPECT_EQ(layer.max_sequences(100), 1);

  const Config expert_choice = parse({"  routing: expert_choice", "  global_aux_loss_weight: 0.01"});
  EXPECT_EQ(expert_choice.moe.routing, RoutingMethod::expert_choice);
  EXPECT_EQ(parse({"  num_groups: 2"}).moe.topk_groups, 2) << "topk_groups follows num_groups";
}

TEST(RoutingConfig, BadValuesNameTheKeyAndTheLine) {
  expect_bad({"  routing: token"}, {"r.yaml:9", "moe.routing = token", "one of: token_choice, expert_choice"});
  expect_bad({"  score_function: relu"}, {"r.yaml:9", "moe.score_function = relu", "one of: softmax, sigmoid"});
  expect_bad({"  routed_scaling_factor: 0"}, {"r.yaml:9", "moe.routed_scaling_factor = 0", "out of range (0, 100]"});
  expect_bad({"  routed_scaling_factor: -2"}, {"r.yaml:9", "moe.routed_scaling_factor"});
  expect_bad({"  bias_update_rate: -0.001"}, {"r.yaml:9", "moe.bias_update_rate = -0.001", "[0, 1]"});
  expect_bad({"  bias_update_rate: fast"}, {"r.yaml:9", "moe.bias_update_rate = fast", "not a number"});
  expect_bad({"  seq_aux_loss_weight: -1"}, {"r.yaml:9", "moe.seq_aux_loss_weight", "out of range"});
  expect_bad({"  global_aux_loss_weight: -0.5"}, {"r.yaml:9", "moe.global_aux_loss_weight", "out of range"});
  expect_bad({"  num_groups: 0"}, {"r.yaml:9", "moe.num_groups = 0", "[1, 1024]"});
  expect_bad({"  num_groups: 2.5"}, {"r.yaml:9", "moe.num_groups", "not an integer"});
  expect_bad({"  topk_groups: 0"}, {"r.yaml:9", "moe.topk_groups = 0"});
  expect_bad({"  drop_policy: random"}, {"r.yaml:9", "moe.drop_policy = random", "one of: position, probability"});
  // Unknown spellings get the usual hint.
  expect_bad({"  num_group: 2"}, {"r.yaml:9", "unknown key moe.num_group", "did you mean moe.num_groups?"});
  expect_bad_input([] { parse({}, {"moe.drop_policy=probabilty"}); },
                   {"--set moe.drop_policy=probabilty", "did you mean probability?"});
}

TEST(RoutingConfig, GroupsMustDivideTheExpertsAndHoldTopK) {
  expect_bad({"  num_groups: 3"}, {"r.yaml:9", "moe.num_groups = 3 does not divide moe.num_experts = 8"});
  expect_bad({"  num_groups: 16"}, {"r.yaml:9", "moe.num_groups = 16 does not divide"});
  expect_bad({"  num_groups: 4", "  topk_groups: 5"}, {"r.yaml:10", "moe.topk_groups = 5 exceeds moe.num_groups = 4"});
  // top_k 2 in one group of one expert: too few experts to choose from.
  expect_bad({"  num_groups: 8", "  topk_groups: 1"},
             {"r.yaml:10", "moe.top_k = 2 does not fit in moe.topk_groups = 1 group(s) of 1 experts"});
  // Through --set the message names the argument that set topk_groups.
  expect_bad_input([] { parse({}, {"moe.top_k=3", "moe.num_groups=8", "moe.topk_groups=2"}); },
                   {"--set moe.topk_groups=2", "moe.top_k = 3 does not fit"});
  EXPECT_NO_THROW(parse({"  num_groups: 8", "  topk_groups: 2"}));  // 2 groups of 1 expert hold top_k 2
  EXPECT_NO_THROW(parse({"  num_groups: 2", "  topk_groups: 1"}));  // one group of 4
}

TEST(RoutingConfig, ExpertChoiceRefusesWhatItHasNoMeaningFor) {
  const std::string routing = "  routing: expert_choice";
  expect_bad({routing, "  complexity: entropy", "  k_min: 1"},
             {"r.yaml:9", "moe.routing = expert_choice takes no complexity routing", "moe.complexity = entropy"});
  expect_bad({routing, "  num_groups: 2"}, {"r.yaml:9", "no group-limited routing", "moe.num_groups = 2"});
  expect_bad({routing, "  dropless: true"}, {"r.yaml:9", "needs a capacity", "moe.dropless"});
  expect_bad({routing, "  drop_policy: probability"}, {"r.yaml:9", "own drop rule", "moe.drop_policy = probability"});
  expect_bad({routing, "  seq_aux_loss_weight: 0.01"}, {"r.yaml:9", "no sequence-level loss", "moe.seq_aux_loss_weight"});
  expect_bad({routing, "  bias_update_rate: 0.001"}, {"r.yaml:9", "no router bias", "moe.bias_update_rate = 0.001"});
  // What it does take: scores, scaling, the token-level and global losses, jitter.
  EXPECT_NO_THROW(parse({routing, "  score_function: sigmoid", "  routed_scaling_factor: 2", "  jitter_eps: 0.1",
                         "  global_aux_loss_weight: 0.01"}));
}

TEST(RoutingConfig, LayerConfigRefusesTheBiasWithExpertChoice) {
  // Callers that build MoeConfig without the parser meet the same rule at the layer.
  MoeLayerConfig layer;
  layer.moe = parse({"  routing: expert_choice"}).moe;
  layer.d_model = 64;
  EXPECT_NO_THROW(layer.validate());
  layer.moe.bias_update_rate = 0.01;
  expect_bad_input([&] { layer.validate(); }, {"moe.bias_update_rate", "token_choice"});
  layer.moe.routing = RoutingMethod::token_choice;
  layer.moe.bias_update_rate = -1;
  expect_bad_input([&] { layer.validate(); }, "moe.bias_update_rate must be a non-negative number");
}

TEST(RoutingConfig, ResolvedConfigWritesEveryKeyAndReadsBackAsStored) {
  const std::vector<std::vector<std::string>> cases = {
      {"  score_function: sigmoid", "  routed_scaling_factor: 2.5", "  bias_update_rate: 0.001",
       "  seq_aux_loss_weight: 0.0001", "  num_groups: 4", "  topk_groups: 2", "  drop_policy: probability"},
      {"  routing: expert_choice", "  global_aux_loss_weight: 0.003", "  routed_scaling_factor: 0.5"},
      {}};
  for (const auto& lines : cases) {
    const Config config = parse(lines);
    const std::string yaml = config_to_yaml(config);
    for (const char* key : {"routing", "score_function", "routed_scaling_factor", "bias_update_rate",
                            "seq_aux_loss_weight", "global_aux_loss_weight", "num_groups", "topk_groups",
                            "drop_policy"})
      EXPECT_NE(yaml.find("\n  " + std::string(key) + ": "), std::string::npos) << key << " not written";
    const Config stored = parse_stored_config(yaml, "run/config.yaml");
    EXPECT_EQ(stored, config) << yaml;
    EXPECT_EQ(stored.moe.routing, config.moe.routing);
    EXPECT_EQ(stored.moe.score_function, config.moe.score_function);
    EXPECT_EQ(stored.moe.routed_scaling_factor, config.moe.routed_scaling_factor);
    EXPECT_EQ(stored.moe.bias_update_rate, config.moe.bias_update_rate);
    EXPECT_EQ(stored.moe.seq_aux_loss_weight, config.moe.seq_aux_loss_weight);
    EXPECT_EQ(stored.moe.global_aux_loss_weight, config.moe.global_aux_loss_weight);
    EXPECT_EQ(stored.moe.num_groups, config.moe.num_groups);
    EXPECT_EQ(stored.moe.topk_groups, config.moe.topk_groups);
    EXPECT_EQ(stored.moe.drop_policy, config.moe.drop_policy);
  }
  // A written config differing in one routing key is a different config.
  EXPECT_NE(parse({"  drop_policy: probability"}), parse({}));
  EXPECT_NE(parse({"  topk_groups: 1", "  num_groups: 2"}), parse({"  num_groups: 2"}));
}

}  // namespace
