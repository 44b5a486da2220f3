// ArgParser: every accepted form, every error (as SY_BAD_INPUT naming the argument), and the
// layout of --help.
#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "src/cli/cli_args.h"
#include "src/core/error.h"
#include "tests/support/expect_error.h"

using switchyard::testing::expect_bad_input;

using namespace switchyard;

namespace {

// Owns argv strings for a parse call; argv[0] is the command name.
struct Argv {
  explicit Argv(std::vector<std::string> words) : storage(std::move(words)) {
    for (std::string& word : storage) pointers.push_back(word.data());
    pointers.push_back(nullptr);
  }
  int argc() const { return int(storage.size()); }
  char** argv() { return pointers.data(); }
  std::vector<std::string> storage;
  std::vector<char*> pointers;
};

ArgParser make_parser() {
  ArgParser parser("switchyard demo", "A demo command for the tests.");
  parser.add_positional("config", "YAML config file");
  parser.add_option("steps", "N", "steps to run", "100");
  parser.add_option("lr", "RATE", "learning rate", "0.001");
  parser.add_option("name", "TEXT", "a name without default");
  parser.add_option("set", "KEY=VALUE", "override", "", /*repeatable=*/true);
  parser.add_flag("dry-run", "stop after set-up");
  return parser;
}

bool parse(ArgParser& parser, std::vector<std::string> words) {
  words.insert(words.begin(), "demo");
  Argv arguments(std::move(words));
  return parser.parse(arguments.argc(), arguments.argv());
}


}  // namespace

TEST(ArgParser, AcceptsEveryForm) {
  std::mt19937_64 generator(std::random_device{}());
  const int64_t steps = int64_t(generator() % 1000000) - 500000;
  const double lr = std::uniform_real_distribution<double>(-5, 5)(generator);
  std::ostringstream lr_text;
  lr_text.precision(17);
  lr_text << lr;
  ArgParser parser = make_parser();
  ASSERT_TRUE(parse(parser, {"--steps", std::to_string(steps), "run.yaml", "--lr=" + lr_text.str(), "--dry-run",
                             "--set", "a.b=1", "--set=c.d=x=y", "--set", "e.f=-3"}));
  EXPECT_EQ(parser.get("config"), "run.yaml");
  EXPECT_TRUE(parser.has("config"));
  EXPECT_EQ(parser.get_int("steps"), steps);
  EXPECT_EQ(parser.get_double("lr"), lr);
  EXPECT_TRUE(parser.flag("dry-run"));
  EXPECT_TRUE(parser.has("dry-run"));
  EXPECT_EQ(parser.get_all("set"), (std::vector<std::string>{"a.b=1", "c.d=x=y", "e.f=-3"}));
  EXPECT_EQ(parser.get("set"), "e.f=-3");  // the last occurrence
  EXPECT_FALSE(parser.has("name"));
  EXPECT_EQ(parser.get("name"), "");
}

TEST(ArgParser, DefaultsWhenAbsent) {
  ArgParser parser = make_parser();
  ASSERT_TRUE(parse(parser, {"c.yaml"}));
  EXPECT_FALSE(parser.has("steps"));
  EXPECT_EQ(parser.get("steps"), "100");
  EXPECT_EQ(parser.get_int("steps"), 100);
  EXPECT_DOUBLE_EQ(parser.get_double("lr"), 0.001);
  EXPECT_FALSE(parser.flag("dry-run"));
  EXPECT_TRUE(parser.get_all("set").empty());
}

TEST(ArgParser, NegativeValuesDoubleDashAndLoneDash) {
  ArgParser parser = make_parser();
  ASSERT_TRUE(parse(parser, {"--steps", "-7", "--", "--weird-name.yaml"}));
  EXPECT_EQ(parser.get_int("steps"), -7);
  EXPECT_EQ(parser.get("config"), "--weird-name.yaml");
  ArgParser stdin_parser = make_parser();
  ASSERT_TRUE(parse(stdin_parser, {"-"}));
  EXPECT_EQ(stdin_parser.get("config"), "-");
}

TEST(ArgParser, VariadicPositionalTakesTheRest) {
  ArgParser parser("switchyard many", "Many inputs.");
  parser.add_option("output", "FILE", "where");
  parser.add_positional("inputs...", "files");
  Argv arguments({"many", "a", "--output", "o.bin", "b", "c"});
  ASSERT_TRUE(parser.parse(arguments.argc(), arguments.argv()));
  EXPECT_EQ(parser.get_all("inputs"), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(parser.get("output"), "o.bin");
  EXPECT_NE(parser.usage().find("INPUTS..."), std::string::npos);
  ArgParser empty("switchyard many", "Many inputs.");
  empty.add_positional("inputs...", "files");
  Argv none({"many"});
  expect_bad_input([&] { empty.parse(none.argc(), none.argv()); }, {"missing INPUTS"});
}

TEST(ArgParser, HelpPrintsUsageAndReturnsFalse) {
  for (const char* help : {"--help", "-h"}) {
    ArgParser parser = make_parser();
    ::testing::internal::CaptureStdout();
    const bool proceed = parse(parser, {"x.yaml", help, "--no-such-option"});  // help wins over later errors
    const std::string output = ::testing::internal::GetCapturedStdout();
    EXPECT_FALSE(proceed);
    EXPECT_NE(output.find("Usage: switchyard demo [options] CONFIG"), std::string::npos) << output;
    EXPECT_NE(output.find("A demo command for the tests."), std::string::npos);
  }
}

TEST(ArgParser, UsageIsAligned) {
  ArgParser parser = make_parser();
  parser.add_epilog("Example:\n  switchyard demo x.yaml");
  const std::string text = parser.usage();
  // Every row under Arguments/Options starts its help in the same column.
  std::istringstream lines(text);
  std::string line;
  std::vector<size_t> columns;
  bool in_rows = false;
  while (std::getline(lines, line)) {
    if (line == "Arguments:" || line == "Options:") {
      in_rows = true;
      continue;
    }
    if (line.empty() || line.rfind("Example", 0) == 0) {
      in_rows = false;
      continue;
    }
    if (!in_rows || line.rfind("  ", 0) != 0 || line[2] == ' ') continue;
    size_t gap = line.find("  ", 2);
    ASSERT_NE(gap, std::string::npos) << line;
    columns.push_back(line.find_first_not_of(' ', gap));
  }
  ASSERT_GE(columns.size(), 7u) << text;  // CONFIG, 5 options, --help
  for (size_t column : columns) EXPECT_EQ(column, columns.front()) << text;
  EXPECT_NE(text.find("--steps N"), std::string::npos);
  EXPECT_NE(text.find("(default: 100)"), std::string::npos);
  EXPECT_NE(text.find("(repeatable)"), std::string::npos);
  EXPECT_NE(text.find("-h, --help"), std::string::npos);
  EXPECT_NE(text.find("Example:\n  switchyard demo x.yaml"), std::string::npos);
}

TEST(ArgParser, ErrorsNameTheArgument) {
  {
    ArgParser parser = make_parser();
    expect_bad_input([&] { parse(parser, {"c.yaml", "--stpes", "3"}); }, {"--stpes", "did you mean --steps?", "--help"});
  }
  {
    ArgParser parser = make_parser();
    expect_bad_input([&] { parse(parser, {"c.yaml", "--zzzzzz"}); }, {"unknown option --zzzzzz"});
  }
  {
    ArgParser parser = make_parser();
    expect_bad_input([&] { parse(parser, {"c.yaml", "-x"}); }, {"'-x'"});
  }
  {
    ArgParser parser = make_parser();
    expect_bad_input([&] { parse(parser, {"c.yaml", "--steps"}); }, {"--steps needs a value", "N"});
  }
  {
    ArgParser parser = make_parser();
    expect_bad_input([&] { parse(parser, {"c.yaml", "--name", "--dry-run"}); }, {"--name needs a value", "--dry-run"});
  }
  {
    ArgParser parser = make_parser();
    expect_bad_input([&] { parse(parser, {"c.yaml", "--dry-run=yes"}); }, {"--dry-run", "takes no value"});
  }
  {
    ArgParser parser = make_parser();
    expect_bad_input([&] { parse(parser, {"--steps", "3"}); }, {"missing CONFIG", "YAML config file"});
  }
  {
    ArgParser parser = make_parser();
    expect_bad_input([&] { parse(parser, {"a.yaml", "b.yaml"}); }, {"unexpected argument 'b.yaml'"});
  }
  {
    ArgParser parser = make_parser();
    expect_bad_input([&] { parse(parser, {"a.yaml", "--steps", "1", "--steps=2"}); }, {"--steps given twice", "'1'", "'2'"});
  }
  {
    ArgParser parser = make_parser();
    ASSERT_TRUE(parse(parser, {"a.yaml", "--steps", "12x", "--lr", "fast"}));
    expect_bad_input([&] { parser.get_int("steps"); }, {"--steps", "integer", "12x"});
    expect_bad_input([&] { parser.get_double("lr"); }, {"--lr", "number", "fast"});
  }
  {
    ArgParser parser = make_parser();
    ASSERT_TRUE(parse(parser, {"a.yaml", "--steps", "99999999999999999999999"}));
    expect_bad_input([&] { parser.get_int("steps"); }, {"--steps", "99999999999999999999999"});
    expect_bad_input([&] { parser.get_int("name"); }, {"--name"});  // absent, no default
  }
}

TEST(ArgParser, UndeclaredNamesAreProgramErrors) {
  ArgParser parser = make_parser();
  ASSERT_TRUE(parse(parser, {"a.yaml"}));
  try {
    parser.get("nonexistent");
    ADD_FAILURE() << "no error";
  } catch (const Error& error) {
    EXPECT_EQ(error.exit_code(), kExitFailure);  // a bug in the command, not the user's fault
  }
  EXPECT_THROW(parser.flag("steps"), Error);  // an option, not a flag
}

TEST(ArgParser, ReparseStartsFresh) {
  ArgParser parser = make_parser();
  ASSERT_TRUE(parse(parser, {"a.yaml", "--set", "x.y=1", "--dry-run"}));
  ASSERT_TRUE(parse(parser, {"b.yaml"}));
  EXPECT_EQ(parser.get("config"), "b.yaml");
  EXPECT_TRUE(parser.get_all("set").empty());
  EXPECT_FALSE(parser.flag("dry-run"));
}
