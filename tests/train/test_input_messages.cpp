// Messages for inputs a new user gets wrong: a directory given as the config, a token file that
// is not there yet (the message names the prepare-data command that makes it, and for data/sotu
// the download script), a directory given as a token file, a token file too short for seq_len.
// Each is bad input (exit 2).
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/train/config.h"
#include "src/train/data_loader.h"
#include "src/train/token_file.h"
#include "tests/support/expect_error.h"

using namespace switchyard;
using switchyard::testing::expect_bad_input;
namespace fs = std::filesystem;

namespace {

class InputMessages : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string test = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    directory_ = fs::temp_directory_path() / ("switchyard_input_messages_" + test + "_" + std::to_string(::getpid()));
    fs::remove_all(directory_);
    fs::create_directories(directory_);
  }
  void TearDown() override { fs::remove_all(directory_); }
  fs::path directory_;
};

TEST_F(InputMessages, AConfigThatIsADirectorySaysSo) {
  const std::string folder = (directory_ / "adir").string();
  fs::create_directories(folder);
  expect_bad_input([&] { load_config(folder); },
                   {"config file '" + folder + "' is a directory; expected a YAML config file"});
  try {
    load_config(folder);
  } catch (const Error& error) {
    EXPECT_EQ(error.message().find("empty"), std::string::npos) << error.message();
    EXPECT_EQ(error.message().find("run folder"), std::string::npos) << error.message();
  }
  // A run folder: point at the config it holds.
  std::ofstream(fs::path(folder) / "config.yaml") << "model: {d_model: 64}\n";
  expect_bad_input([&] { load_config(folder); },
                   {"is a directory", "(a run folder? the config its run resolved is " + folder + "/config.yaml)"});
}

TEST_F(InputMessages, AMissingTrainingFileNamesTheCommandThatMakesIt) {
  const std::string train = (directory_ / "tiny" / "train.bin").string();
  const std::string folder = (directory_ / "tiny").string();
  expect_bad_input([&] { TokenFile file(train, 256); },
                   {"cannot open token file '" + train + "': No such file or directory",
                    "make it with `switchyard prepare-data --output " + folder + "/train.bin --val-output " + folder +
                        "/val.bin INPUT...`"});
  // The validation split: the same command, which writes both.
  expect_bad_input([&] { TokenFile file(folder + "/val.bin", 256); },
                   "`switchyard prepare-data --output " + folder + "/train.bin --val-output " + folder + "/val.bin");
  // Any other name: that file as --output; no mention of the sotu download.
  const std::string other = (directory_ / "corpus.tokens").string();
  try {
    TokenFile file(other, 256);
    ADD_FAILURE() << "no error";
  } catch (const Error& error) {
    EXPECT_EQ(error.exit_code(), kExitBadInput);
    EXPECT_NE(error.message().find("`switchyard prepare-data --output " + other + " INPUT...`"), std::string::npos)
        << error.message();
    EXPECT_EQ(error.message().find("get-data.sh"), std::string::npos) << error.message();
  }
}

TEST_F(InputMessages, AMissingSotuFileAlsoNamesTheDownloadScript) {
  expect_bad_input([&] { TokenFile file("data/sotu/train.bin.absent-for-this-test", 256); },
                   {"`bash launch/get-data.sh`", "prepare-data --output data/sotu/train.bin.absent-for-this-test"});
  expect_bad_input([&] { TokenFile file((directory_ / "data" / "sotu" / "val.bin").string(), 256); },
                   "`bash launch/get-data.sh`");
}

TEST_F(InputMessages, ADirectoryGivenAsATokenFileSaysSo) {
  expect_bad_input([&] { TokenFile file(directory_.string(), 256); },
                   {"token file '" + directory_.string() + "' is a directory; expected a token file written by "
                    "`switchyard prepare-data"});
}

TEST_F(InputMessages, ATokenFileTooShortForASequenceSaysWhatToChange) {
  const std::string path = (directory_ / "short.bin").string();
  write_token_file(path, std::vector<uint32_t>(10, 'a'), 256);
  const TokenFile file(path, 256);
  expect_bad_input([&] { DataLoader loader(file, 64, 1, 0, 1, 1, DataOrder::shuffled); },
                   {"holds 10 tokens; a sequence needs 65 (model.seq_len + 1)", "lower model.seq_len"});
}

}  // namespace
