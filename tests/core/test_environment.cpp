// The one parser of SWITCHYARD_* switches (src/core/environment.h): unset and empty take the first
// choice, a listed value its own, anything else is bad input naming the variable and the choices.
#include <gtest/gtest.h>

#include <cstdlib>

#include "src/core/environment.h"
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
