// Weights from a path (src/train/weights_source.h): the one rule generate, specialize, report and
// ckpt export share. A real two-step CPU run (checkpoints at steps 1 and 2, final.weights) gives
// every kind of path: a weights file, a checkpoint folder, a folder of checkpoints, run folders
// (finished, preempted, with only final.weights, with the newest checkpoint incomplete, with its
// checkpoint.dir elsewhere, without weights), and paths that are none of them, each with the
// message that says what it is. Then: a checkpoint reads back as the same weights as
// final.weights, and both export to the same safetensors tensors.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/core/json.h"
#include "src/train/checkpoint_export.h"
#include "src/train/config.h"
#include "src/train/token_file.h"
#include "src/train/trainer.h"
#include "src/train/weights_source.h"
#include "tests/support/expect_error.h"

using namespace switchyard;
using switchyard::testing::expect_bad_input;
namespace fs = std::filesystem;

namespace {

constexpr const char* kExpected = "expected a run folder";

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream stream(path, std::ios::binary);
  stream << text;
}

std::string read_bytes(const fs::path& path) {
  std::ifstream stream(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(stream)), std::istreambuf_iterator<char>());
}

// The problem find_weights_source reports for `path` ("" when it finds weights).
std::string problem_of(const std::string& path) {
  WeightsSource source;
  std::string problem;
  return find_weights_source(path, &source, &problem) ? "" : problem;
}

class WeightsSourceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new fs::path(fs::temp_directory_path() / ("switchyard_weights_source_" + std::to_string(::getpid())));
    fs::remove_all(*root_);
    fs::create_directories(*root_);
    std::mt19937 generator(3);
    std::vector<uint32_t> tokens;
    for (int index = 0; index < 6000; ++index) tokens.push_back(uint32_t('a' + generator() % 6));
    write_token_file((*root_ / "train.bin").string(), tokens, 256);
    const Config config = run_config(*root_ / "finished", *root_ / "finished" / "checkpoints");
    TokenFile train(config.data.path, uint32_t(config.model.vocab_size));
    TrainerOptions options;
    Trainer trainer(config, train, nullptr, options);
    trainer.run();
    write_text(*root_ / "finished" / "config.yaml", config_to_yaml(config));
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
  }

  // Two steps, a checkpoint after each (all kept), final.weights at the end.
  static Config run_config(const fs::path& run_dir, const fs::path& checkpoint_dir) {
    const std::string yaml =
        "model: {d_model: 16, n_layers: 2, n_heads: 2, seq_len: 16, d_ff: 32, moe_every: 2, compute_dtype: fp32}\n"
        "moe: {num_experts: 4, top_k: 1, expert_d_ff: 16, segment_alignment: 4}\n"
        "optimizer: {warmup_steps: 1}\n"
        "training: {steps: 2, micro_batch_size: 2, eval_every: 0, log_every: 100, device: cpu}\n"
        "data: {path: " + (*root_ / "train.bin").string() + "}\n"
        "checkpoint: {every: 1, keep_last: 0, dir: " + checkpoint_dir.string() + "}\n"
        "logging: {run_dir: " + run_dir.string() + "}\n";
    return parse_config_string(yaml, "weights_source_test.yaml");
  }

  // A copy of the finished run, to damage or trim.
  static fs::path copy_of_run(const std::string& name) {
    const fs::path target = *root_ / name;
    fs::remove_all(target);
    fs::copy(*root_ / "finished", target, fs::copy_options::recursive);
    // As if it had run there: its config names its own checkpoints/.
    write_text(target / "config.yaml", config_to_yaml(run_config(target, target / "checkpoints")));
    return target;
  }

  static fs::path root() { return *root_; }
  static fs::path finished() { return *root_ / "finished"; }
  static std::string step(const fs::path& folder, int number) {
    return (folder / checkpoint_step_name(number)).string();
  }

  static fs::path* root_;
};

fs::path* WeightsSourceTest::root_ = nullptr;

TEST_F(WeightsSourceTest, AWeightsFileIsItself) {
  const std::string path = (finished() / "final.weights").string();
  EXPECT_EQ(kind_of_path(path), PathKind::weights_file);
  const WeightsSource source = resolve_weights_source(path);
  EXPECT_EQ(source.format, WeightsFormat::weights_file);
  EXPECT_EQ(source.path, path);
  EXPECT_EQ(source.picked_because, "");
}

TEST_F(WeightsSourceTest, ACheckpointFolderIsItselfWithOrWithoutATrailingSlash) {
  const std::string path = step(finished() / "checkpoints", 1);
  for (const std::string& given : {path, path + "/"}) {
    SCOPED_TRACE(given);
    EXPECT_EQ(kind_of_path(given), PathKind::checkpoint);
    const WeightsSource source = resolve_weights_source(given);
    EXPECT_EQ(source.format, WeightsFormat::checkpoint);
    EXPECT_EQ(source.path, given);
  }
}

TEST_F(WeightsSourceTest, AFolderOfCheckpointsGivesItsNewestCompleteOne) {
  const std::string folder = (finished() / "checkpoints").string();
  EXPECT_EQ(kind_of_path(folder), PathKind::checkpoint_root);
  const WeightsSource source = resolve_weights_source(folder);
  EXPECT_EQ(source.format, WeightsFormat::checkpoint);
  EXPECT_EQ(source.path, step(finished() / "checkpoints", 2));
  EXPECT_NE(source.picked_because.find("newest complete checkpoint in " + folder), std::string::npos);
}

TEST_F(WeightsSourceTest, AFinishedRunFolderGivesItsNewestCheckpoint) {
  EXPECT_EQ(kind_of_path(finished().string()), PathKind::run_folder);
  const WeightsSource source = resolve_weights_source(finished().string());
  EXPECT_EQ(source.format, WeightsFormat::checkpoint);
  EXPECT_EQ(source.path, step(finished() / "checkpoints", 2));
  EXPECT_NE(describe_weights_source(source).find("the newest complete checkpoint of run folder " + finished().string()),
            std::string::npos)
      << describe_weights_source(source);
}

TEST_F(WeightsSourceTest, APreemptedRunFolderWithoutFinalWeightsGivesItsNewestCheckpoint) {
  const fs::path run = copy_of_run("preempted");
  fs::remove(run / "final.weights");
  const WeightsSource source = resolve_weights_source(run.string());
  EXPECT_EQ(source.format, WeightsFormat::checkpoint);
  EXPECT_EQ(source.path, step(run / "checkpoints", 2));
}

TEST_F(WeightsSourceTest, AnIncompleteNewestCheckpointIsPassedOver) {
  const fs::path run = copy_of_run("incomplete_newest");
  fs::remove(fs::path(step(run / "checkpoints", 2)) / kCheckpointCompleteFile);
  EXPECT_EQ(resolve_weights_source(run.string()).path, step(run / "checkpoints", 1));
  EXPECT_EQ(resolve_weights_source((run / "checkpoints").string()).path, step(run / "checkpoints", 1));
}

TEST_F(WeightsSourceTest, ARunFolderWithoutCheckpointsGivesItsFinalWeights) {
  const fs::path run = copy_of_run("weights_only");
  fs::remove_all(run / "checkpoints");
  const WeightsSource source = resolve_weights_source(run.string());
  EXPECT_EQ(source.format, WeightsFormat::weights_file);
  EXPECT_EQ(source.path, (run / "final.weights").string());
  EXPECT_NE(source.picked_because.find("has no complete checkpoint"), std::string::npos) << source.picked_because;
}

TEST_F(WeightsSourceTest, ARunFolderFindsTheCheckpointDirItsConfigNames) {
  const fs::path run = root() / "elsewhere_run";
  const fs::path checkpoints = root() / "scratch" / "ckpt";
  fs::remove_all(run);
  fs::create_directories(run);
  fs::create_directories(checkpoints.parent_path());
  fs::copy(finished() / "checkpoints", checkpoints, fs::copy_options::recursive);
  fs::copy(finished() / "final.weights", run / "final.weights");
  write_text(run / "config.yaml", config_to_yaml(run_config(run, checkpoints)));
  const WeightsSource source = resolve_weights_source(run.string());
  EXPECT_EQ(source.format, WeightsFormat::checkpoint);
  EXPECT_EQ(source.path, step(checkpoints, 2));
}

// A run copied elsewhere keeps a config.yaml naming the original's checkpoint.dir: its own
// checkpoints/ come first.
TEST_F(WeightsSourceTest, ARunFolderPrefersItsOwnCheckpointsToTheOnesItsConfigNames) {
  const fs::path run = root() / "copied_run";
  fs::remove_all(run);
  fs::copy(finished(), run, fs::copy_options::recursive);
  fs::remove_all(fs::path(step(run / "checkpoints", 2)));
  EXPECT_EQ(resolve_weights_source(run.string()).path, step(run / "checkpoints", 1));
  fs::remove(fs::path(step(run / "checkpoints", 1)) / kCheckpointCompleteFile);  // none complete: the config's
  EXPECT_EQ(resolve_weights_source(run.string()).path, step(finished() / "checkpoints", 2));
}

TEST_F(WeightsSourceTest, ARunFolderWithoutWeightsSaysSo) {
  const fs::path run = root() / "no_weights";
  fs::create_directories(run);
  write_text(run / "metrics.jsonl", "{\"step\":1}\n");
  EXPECT_EQ(kind_of_path(run.string()), PathKind::run_folder);
  const std::string problem = problem_of(run.string());
  for (const std::string& fragment :
       {"'" + run.string() + "' is a run folder with no final.weights, 0 complete checkpoints in " +
            (run / "checkpoints").string(),
        std::string("it has no weights yet")})
    EXPECT_NE(problem.find(fragment), std::string::npos) << problem;
  expect_bad_input([&] { resolve_weights_source(run.string()); }, "is a run folder with no final.weights");
}

TEST_F(WeightsSourceTest, AnIncompleteCheckpointSaysItsSaveDidNotFinishAndNamesTheNewestBesideIt) {
  const fs::path run = copy_of_run("incomplete");
  const std::string checkpoint = step(run / "checkpoints", 2);
  fs::remove(fs::path(checkpoint) / kCheckpointCompleteFile);
  EXPECT_EQ(kind_of_path(checkpoint), PathKind::checkpoint);
  expect_bad_input([&] { resolve_weights_source(checkpoint); },
                   {"'" + checkpoint + "' is a checkpoint folder without COMPLETE",
                    checkpoint + "/COMPLETE is missing (the save did not finish)",
                    "the newest beside it: " + step(run / "checkpoints", 1)});
}

TEST_F(WeightsSourceTest, AFolderOfOnlyIncompleteCheckpointsSaysSo) {
  const fs::path folder = root() / "all_incomplete";
  fs::create_directories(folder / checkpoint_step_name(5));
  EXPECT_EQ(kind_of_path(folder.string()), PathKind::checkpoint_root);
  expect_bad_input([&] { resolve_weights_source(folder.string()); },
                   {"is a folder of checkpoints (checkpoint.dir) with 1 checkpoint, 0 complete",
                    "none holds a COMPLETE marker"});
}

TEST_F(WeightsSourceTest, PathsThatAreNoneOfThemSayWhatTheyAreAndWhatWasExpected) {
  const fs::path empty = root() / "empty";
  fs::create_directories(empty);
  const fs::path other = root() / "other";
  fs::create_directories(other);
  write_text(other / "notes.txt", "hello");
  const std::string text_file = (other / "notes.txt").string();
  const std::string missing = (root() / "absent").string();
  const std::string token_file = (root() / "train.bin").string();
  EXPECT_EQ(kind_of_path(empty.string()), PathKind::empty_folder);
  EXPECT_EQ(kind_of_path(other.string()), PathKind::other_folder);
  EXPECT_EQ(kind_of_path(text_file), PathKind::other_file);
  EXPECT_EQ(kind_of_path(missing), PathKind::missing);
  EXPECT_EQ(kind_of_path(token_file), PathKind::token_file);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {empty.string(), "'" + empty.string() + "' is an empty folder"},
      {other.string(), "'" + other.string() + "' is a folder but not a run folder"},
      {text_file, "'" + text_file + "' is a file but not a switchyard weights file"},
      {missing, "'" + missing + "' does not exist"},
      {token_file, "'" + token_file + "' is a token file"},
  };
  for (const auto& [path, what] : cases) {
    SCOPED_TRACE(path);
    expect_bad_input([&] { resolve_weights_source(path); }, {what, kExpected});
    EXPECT_NE(describe_path(path).find(what), std::string::npos) << describe_path(path);
  }
}

// The checkpoint after the last step and final.weights hold the same weights, bit for bit.
TEST_F(WeightsSourceTest, ACheckpointReadsBackAsTheSameWeightsAsFinalWeights) {
  const WeightsFile from_checkpoint = read_weights_source(resolve_weights_source(finished().string()));
  const WeightsFile from_file = read_weights_source(resolve_weights_source((finished() / "final.weights").string()));
  EXPECT_EQ(from_checkpoint.config_yaml, from_file.config_yaml);
  ASSERT_EQ(from_checkpoint.tensors.size(), from_file.tensors.size());
  bool saw_experts = false;
  for (const WeightsTensor& tensor : from_file.tensors) {
    SCOPED_TRACE(tensor.name);
    const WeightsTensor* other = from_checkpoint.find(tensor.name);
    ASSERT_NE(other, nullptr);
    EXPECT_EQ(other->shape, tensor.shape);
    ASSERT_EQ(other->values.size(), tensor.values.size());
    EXPECT_EQ(std::memcmp(other->values.data(), tensor.values.data(), tensor.values.size() * sizeof(float)), 0);
    saw_experts = saw_experts || (tensor.shape.size() == 3 && tensor.shape[0] == 4);
  }
  EXPECT_TRUE(saw_experts) << "no [E, ...] expert tensor was compared";
  // The older checkpoint holds other weights: the comparison above can fail.
  const WeightsFile older = read_weights_source(resolve_weights_source(step(finished() / "checkpoints", 1)));
  bool differs = false;
  for (const WeightsTensor& tensor : from_file.tensors)
    differs = differs || older.find(tensor.name)->values != tensor.values;
  EXPECT_TRUE(differs);
}

// name -> (shape, bytes) of a safetensors file.
std::map<std::string, std::pair<std::string, std::string>> safetensors_tensors(const fs::path& path,
                                                                               json::Value* metadata) {
  const std::string bytes = read_bytes(path);
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, bytes.data(), sizeof(header_bytes));
  const json::Value header = json::parse(bytes.substr(8, size_t(header_bytes)), path.string());
  const std::string data = bytes.substr(8 + size_t(header_bytes));
  std::map<std::string, std::pair<std::string, std::string>> tensors;
  for (const auto& [name, entry] : header.members()) {
    if (name == "__metadata__") {
      *metadata = entry;
      continue;
    }
    const std::vector<json::Value>& offsets = entry.at("data_offsets", name).as_array(name);
    const uint64_t begin = offsets.at(0).as_uint64(name), end = offsets.at(1).as_uint64(name);
    tensors[name] = {entry.at("shape", name).dump(), data.substr(size_t(begin), size_t(end - begin))};
  }
  return tensors;
}

TEST_F(WeightsSourceTest, AWeightsFileExportsTheSameTensorsAsTheCheckpoint) {
  for (bool merge : {false, true}) {
    SCOPED_TRACE(merge ? "merged experts" : "one tensor per expert");
    SafetensorsExportOptions options;
    options.merge_experts = merge;
    const fs::path from_checkpoint = root() / "from_checkpoint.safetensors";
    const fs::path from_file = root() / "from_file.safetensors";
    export_safetensors(resolve_weights_source(finished().string()), from_checkpoint.string(), options);
    export_safetensors(resolve_weights_source((finished() / "final.weights").string()), from_file.string(), options);
    json::Value checkpoint_metadata, file_metadata;
    const auto expected = safetensors_tensors(from_checkpoint, &checkpoint_metadata);
    const auto actual = safetensors_tensors(from_file, &file_metadata);
    EXPECT_EQ(actual, expected);
    EXPECT_EQ(expected.count(merge ? "blocks.1.moe.w1" : "blocks.1.moe.experts.3.w1"), 1u);
    EXPECT_EQ(file_metadata.at("switchyard_config", "file").as_string("file"),
              checkpoint_metadata.at("switchyard_config", "checkpoint").as_string("checkpoint"));
    EXPECT_EQ(file_metadata.find("switchyard_step"), nullptr);  // a weights file records no step
  }
}

TEST_F(WeightsSourceTest, AWeightsFileHasNoOptimizerStateToExport) {
  SafetensorsExportOptions options;
  options.include_optimizer = true;
  const std::string path = (finished() / "final.weights").string();
  const std::string output = (root() / "x.safetensors").string();
  expect_bad_input([&] { export_safetensors(resolve_weights_source(path), output, options); },
                   {"'" + path + "' is a weights file: it holds no optimizer state", "give a checkpoint"});
  EXPECT_FALSE(fs::exists(root() / "x.safetensors"));
}

}  // namespace
