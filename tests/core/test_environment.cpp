// The one parser of SWITCHYARD_* switches (src/core/environment.h): unset and empty take the first
// choice, a listed value its own, anything else is bad input naming the variable and the choices.
// Then the switches struct built with it (src/core/switches.h): every field's default, each valid
// value and a bad one; describe_switches; parsed once, overridden by scopes.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "src/core/environment.h"
#include "src/core/switches.h"
#include "tests/support/expect_error.h"

namespace switchyard {
namespace {

enum class Flavor { plain, fancy, odd };

constexpr const char* kVariable = "SWITCHYARD_TEST_ENVIRONMENT_CHOICE";

Flavor flavor() {
  return choice_from_environment<Flavor>(kVariable,
                                         {{"plain", Flavor::plain}, {"fancy", Flavor::fancy}, {"odd", Flavor::odd}});
}

class EnvironmentTest : public ::testing::Test {
 protected:
  void TearDown() override { unsetenv(kVariable); }
};

TEST_F(EnvironmentTest, UnsetAndEmptyTakeTheFirstChoice) {
  unsetenv(kVariable);
  EXPECT_EQ(environment_value(kVariable), nullptr);
  EXPECT_EQ(flavor(), Flavor::plain);
  setenv(kVariable, "", 1);
  EXPECT_EQ(environment_value(kVariable), nullptr);
  EXPECT_EQ(flavor(), Flavor::plain);
}

TEST_F(EnvironmentTest, EachListedValueGivesItsChoice) {
  setenv(kVariable, "fancy", 1);
  EXPECT_STREQ(environment_value(kVariable), "fancy");
  EXPECT_EQ(flavor(), Flavor::fancy);
  setenv(kVariable, "odd", 1);
  EXPECT_EQ(flavor(), Flavor::odd);
  setenv(kVariable, "plain", 1);
  EXPECT_EQ(flavor(), Flavor::plain);
}

TEST_F(EnvironmentTest, AnythingElseIsBadInputListingTheChoices) {
  for (const char* bad : {"Fancy", "fancy ", "2", "plainer"}) {
    setenv(kVariable, bad, 1);
    testing::expect_bad_input([] { flavor(); }, {kVariable, "'plain', 'fancy', 'odd'", std::string("got '") + bad + "'"});
  }
}

TEST_F(EnvironmentTest, BooleanSwitchesTakeOneAndZero) {
  auto flag = [] { return choice_from_environment<bool>(kVariable, {{"1", true}, {"0", false}}); };
  EXPECT_TRUE(flag());
  setenv(kVariable, "0", 1);
  EXPECT_FALSE(flag());
  setenv(kVariable, "1", 1);
  EXPECT_TRUE(flag());
  setenv(kVariable, "yes", 1);
  testing::expect_bad_input([&] { flag(); }, {kVariable, "'1', '0'"});
}

}  // namespace
}  // namespace switchyard

// ---- The switches struct (src/core/switches.h) -----------------------------------------------

namespace switchyard {
namespace {

const char* const kSwitchVariables[] = {"SWITCHYARD_ATTENTION",        "SWITCHYARD_GROUPED_GEMM",
                                        "SWITCHYARD_FUSED_ACTIVATION", "SWITCHYARD_SM90_GEMM",
                                        "SWITCHYARD_SM90_STORE",       "SWITCHYARD_SM90_SCHEDULE",
                                        "SWITCHYARD_SM90_MULTICAST",   "SWITCHYARD_SM90_SKIP_PADDING",
                                        "SWITCHYARD_NCCL_BLOCKING",    "SWITCHYARD_SMALL_BATCH_TOKENS"};

// The defaults are usable as constants (src/model can define its own from them).
static_assert(Switches{}.small_batch_tokens == 8, "SWITCHYARD_SMALL_BATCH_TOKENS defaults to 8");

class SwitchesTest : public ::testing::Test {
 protected:
  void SetUp() override { unset_all(); }
  void TearDown() override { unset_all(); }
  static void unset_all() {
    for (const char* variable : kSwitchVariables) unsetenv(variable);
  }

  // Every spelling of `variable` gives its value in `field` (and leaves the other switches at their
  // defaults); `bad` is bad input naming the variable, the value and every choice.
  template <typename Value>
  static void expect_choices(const char* variable, Value Switches::*field,
                             std::vector<std::pair<const char*, Value>> choices, const char* bad) {
    std::string listed;
    for (const auto& [text, value] : choices) {
      setenv(variable, text, 1);
      const Switches parsed = parse_switches();
      EXPECT_EQ(parsed.*field, value) << variable << "=" << text;
      Switches expected;
      expected.*field = value;
      EXPECT_EQ(describe_switches(parsed), describe_switches(expected)) << variable << "=" << text;
      listed += std::string(listed.empty() ? "'" : ", '") + text + "'";
    }
    setenv(variable, bad, 1);
    testing::expect_bad_input([] { parse_switches(); }, {variable, listed, std::string("got '") + bad + "'"});
    unsetenv(variable);
  }
};

TEST_F(SwitchesTest, UnsetAndEmptyTakeTheDefaults) {
  const Switches defaults;
  EXPECT_EQ(defaults.attention, AttentionPath::automatic);
  EXPECT_EQ(defaults.grouped_gemm, GroupedGemmPath::automatic);
  EXPECT_TRUE(defaults.fused_activation);
  EXPECT_EQ(defaults.sm90_gemm, Sm90Variant::pipelined);
  EXPECT_EQ(defaults.sm90_store, Sm90Store::warps);
  EXPECT_EQ(defaults.sm90_schedule, Sm90Schedule::automatic);
  EXPECT_EQ(defaults.sm90_multicast, Sm90Multicast::automatic);
  EXPECT_TRUE(defaults.sm90_skip_padding);
  EXPECT_TRUE(defaults.nccl_blocking);
  EXPECT_EQ(defaults.small_batch_tokens, 8);
  EXPECT_EQ(describe_switches(parse_switches()), describe_switches(defaults));
  for (const char* variable : kSwitchVariables) setenv(variable, "", 1);
  EXPECT_EQ(describe_switches(parse_switches()), describe_switches(defaults));
}

TEST_F(SwitchesTest, Attention) {
  expect_choices<AttentionPath>("SWITCHYARD_ATTENTION", &Switches::attention,
                                {{"auto", AttentionPath::automatic},
                                 {"cudnn", AttentionPath::cudnn},
                                 {"cudnn-nondeterministic", AttentionPath::cudnn_nondeterministic},
                                 {"cublas", AttentionPath::cublas}},
                                "cuDNN");
  EXPECT_EQ(attention_path_from_text(""), AttentionPath::automatic);
  EXPECT_EQ(attention_path_from_text("cudnn-nondeterministic"), AttentionPath::cudnn_nondeterministic);
  testing::expect_bad_input([] { attention_path_from_text("fused"); }, {"SWITCHYARD_ATTENTION", "got 'fused'"});
}

TEST_F(SwitchesTest, GroupedGemm) {
  expect_choices<GroupedGemmPath>("SWITCHYARD_GROUPED_GEMM", &Switches::grouped_gemm,
                                  {{"auto", GroupedGemmPath::automatic}, {"cublas", GroupedGemmPath::cublas}}, "sm90");
}

TEST_F(SwitchesTest, FusedActivation) {
  expect_choices<bool>("SWITCHYARD_FUSED_ACTIVATION", &Switches::fused_activation, {{"1", true}, {"0", false}},
                       "off");
}

TEST_F(SwitchesTest, Sm90Gemm) {
  expect_choices<Sm90Variant>("SWITCHYARD_SM90_GEMM", &Switches::sm90_gemm,
                              {{"pipelined", Sm90Variant::pipelined}, {"basic", Sm90Variant::basic}}, "bogus");
}

TEST_F(SwitchesTest, Sm90Store) {
  expect_choices<Sm90Store>("SWITCHYARD_SM90_STORE", &Switches::sm90_store,
                            {{"warps", Sm90Store::warps}, {"tma", Sm90Store::tma}, {"direct", Sm90Store::direct}},
                            "TMA");
}

TEST_F(SwitchesTest, Sm90Schedule) {
  expect_choices<Sm90Schedule>("SWITCHYARD_SM90_SCHEDULE", &Switches::sm90_schedule,
                               {{"auto", Sm90Schedule::automatic},
                                {"cooperative", Sm90Schedule::cooperative},
                                {"pingpong", Sm90Schedule::pingpong}},
                               "ping-pong");
}

TEST_F(SwitchesTest, Sm90Multicast) {
  expect_choices<Sm90Multicast>(
      "SWITCHYARD_SM90_MULTICAST", &Switches::sm90_multicast,
      {{"auto", Sm90Multicast::automatic}, {"off", Sm90Multicast::off}, {"pair", Sm90Multicast::pair}}, "on");
}

TEST_F(SwitchesTest, Sm90SkipPadding) {
  expect_choices<bool>("SWITCHYARD_SM90_SKIP_PADDING", &Switches::sm90_skip_padding, {{"1", true}, {"0", false}},
                       "true");
}

TEST_F(SwitchesTest, NcclBlocking) {
  expect_choices<bool>("SWITCHYARD_NCCL_BLOCKING", &Switches::nccl_blocking, {{"1", true}, {"0", false}}, "2");
}

TEST_F(SwitchesTest, SmallBatchTokensIsANonNegativeInteger) {
  constexpr const char* kVariable = "SWITCHYARD_SMALL_BATCH_TOKENS";
  for (int64_t tokens : {0, 1, 8, 16, 100000}) {
    setenv(kVariable, std::to_string(tokens).c_str(), 1);
    EXPECT_EQ(parse_switches().small_batch_tokens, tokens);
  }
  for (const char* bad : {"-1", "-3", "abc", "12x", " 3", "+4", "1e3", "99999999999999999999"}) {
    setenv(kVariable, bad, 1);
    testing::expect_bad_input([] { parse_switches(); },
                              {kVariable, "non-negative integer", std::string("got '") + bad + "'"});
  }
}

TEST_F(SwitchesTest, DescribeNamesEveryVariableWithItsValue) {
  EXPECT_EQ(describe_switches(Switches{}),
            "switches: SWITCHYARD_ATTENTION=auto SWITCHYARD_GROUPED_GEMM=auto SWITCHYARD_FUSED_ACTIVATION=1 "
            "SWITCHYARD_SM90_GEMM=pipelined SWITCHYARD_SM90_STORE=warps SWITCHYARD_SM90_SCHEDULE=auto "
            "SWITCHYARD_SM90_MULTICAST=auto SWITCHYARD_SM90_SKIP_PADDING=1 SWITCHYARD_NCCL_BLOCKING=1 "
            "SWITCHYARD_SMALL_BATCH_TOKENS=8 SWITCHYARD_SHARED_EXPERT_STREAM=1");
  Switches changed;
  changed.attention = AttentionPath::cudnn_nondeterministic;
  changed.sm90_store = Sm90Store::direct;
  changed.nccl_blocking = false;
  changed.small_batch_tokens = 0;
  changed.shared_expert_stream = false;
  const std::string text = describe_switches(changed);
  for (const char* part : {"SWITCHYARD_ATTENTION=cudnn-nondeterministic", "SWITCHYARD_SM90_STORE=direct",
                           "SWITCHYARD_NCCL_BLOCKING=0", "SWITCHYARD_SMALL_BATCH_TOKENS=0",
                           "SWITCHYARD_SHARED_EXPERT_STREAM=0"})
    EXPECT_NE(text.find(part), std::string::npos) << part << " not in: " << text;
}

TEST_F(SwitchesTest, ParsedOnceThenOverriddenOnlyByScopes) {
  const Switches first = switches();
  setenv("SWITCHYARD_SM90_GEMM", first.sm90_gemm == Sm90Variant::basic ? "pipelined" : "basic", 1);
  EXPECT_EQ(switches().sm90_gemm, first.sm90_gemm) << "a later setenv must not reach switches()";
  {
    Switches outer_values = first;
    outer_values.grouped_gemm = GroupedGemmPath::cublas;
    ScopedSwitches outer(outer_values);
    EXPECT_EQ(switches().grouped_gemm, GroupedGemmPath::cublas);
    {
      Switches inner_values = switches();
      inner_values.small_batch_tokens = 0;
      ScopedSwitches inner(inner_values);
      EXPECT_EQ(switches().grouped_gemm, GroupedGemmPath::cublas);
      EXPECT_EQ(switches().small_batch_tokens, 0);
    }
    EXPECT_EQ(switches().small_batch_tokens, first.small_batch_tokens);
    EXPECT_EQ(switches().grouped_gemm, GroupedGemmPath::cublas);
  }
  EXPECT_EQ(describe_switches(switches()), describe_switches(first));
}

}  // namespace
}  // namespace switchyard
