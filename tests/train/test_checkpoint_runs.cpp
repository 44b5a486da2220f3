// Runs and their checkpoints through the trainer, one process on the CPU backend: the
// manifest records the run id (kept across resumes, also in <run_dir>/run_id), the model
// fingerprint and the plan; --resume auto skips a checkpoint of another model and starts fresh
// beside it, saving under step-N-<run id> where the names collide, and keep_last never removes
// another run's or an older version's checkpoints; --resume PATH to another model names every
// difference; a run restarted before its first checkpoint completed keeps its run id and cleans up
// after itself; extending a finished run stretches the cosine or keeps its end, and says so; the
// final line counts this process's steps apart from the run's.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/train/checkpoint.h"
#include "src/train/checkpoint_identity.h"
#include "src/train/trainer.h"
#include "tests/support/expect_error.h"

using switchyard::testing::expect_bad_input;

using namespace switchyard;
namespace fs = std::filesystem;

namespace {

std::string read_file(const fs::path& path) {
  std::ifstream stream(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(stream)), std::istreambuf_iterator<char>());
}

std::map<std::string, std::string> snapshot(const fs::path& root) {
  std::map<std::string, std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(root))
    if (entry.is_regular_file()) files[entry.path().string()] = read_file(entry.path());
  return files;
}

class CheckpointRunsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    directory_ = fs::temp_directory_path() /
                 ("switchyard_runs_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
                  "_" + std::to_string(::getpid()));
    fs::remove_all(directory_);
    fs::create_directories(directory_);
    std::mt19937_64 generator(7);
    std::vector<uint32_t> tokens;
    while (tokens.size() < 20000u) tokens.push_back(uint32_t('a' + generator() % 8));
    write_token_file((directory_ / "train.bin").string(), tokens, 256);
  }
  void TearDown() override { fs::remove_all(directory_); }

  // Checkpoints in <directory>/shared unless overridden; the run directory is <directory>/<run>.
  Config config(const std::string& run, const std::vector<std::string>& overrides = {}) const {
    const std::string yaml =
        "model: {d_model: 16, n_layers: 2, n_heads: 2, seq_len: 16, d_ff: 32, moe_every: 2, compute_dtype: fp32}\n"
        "moe: {num_experts: 4, top_k: 1, expert_d_ff: 16, renormalize_gates: false, segment_alignment: 4}\n"
        "parallel: {deterministic: true}\n"
        "optimizer: {lr: 0.01, min_lr: 0.001, warmup_steps: 2}\n"
        "training: {steps: 4, micro_batch_size: 2, seed: 5, log_every: 100, device: cpu}\n"
        "data: {path: " + (directory_ / "train.bin").string() + "}\n"
        "checkpoint: {every: 1, keep_last: 2, dir: " + (directory_ / "shared").string() + "}\n"
        "logging: {run_dir: " + (directory_ / run).string() + "}\n";
    return parse_config_string(yaml, "test.yaml", overrides);
  }

  struct Run {
    TokenFile train;
    std::ostringstream log;
    std::unique_ptr<Trainer> trainer;
    explicit Run(const Config& config) : train(config.data.path, uint32_t(config.model.vocab_size)) {
      TrainerOptions options;
      options.log = &log;
      options.write_final_weights = false;
      trainer = std::make_unique<Trainer>(config, train, nullptr, options);
    }
  };

  std::string shared() const { return (directory_ / "shared").string(); }
  std::string step_path(int64_t step) const { return (fs::path(shared()) / checkpoint_step_name(step)).string(); }
  fs::path directory_;
};

TEST_F(CheckpointRunsTest, ManifestRecordsTheRunAndTheRunIdSurvivesResumes) {
  const Config first_config = config("a");
  Run first(first_config);
  first.trainer->run();
  const std::string run_id = first.trainer->run_id();
  ASSERT_TRUE(is_run_id(run_id)) << first.log.str();
  EXPECT_EQ(read_run_directory_run_id(first_config.logging.run_dir), run_id);
  EXPECT_NE(first.log.str().find("run id " + run_id + " (a new run)"), std::string::npos) << first.log.str();
  const CheckpointManifest manifest = read_checkpoint_manifest(step_path(4));
  EXPECT_EQ(manifest.run_id, run_id);
  EXPECT_EQ(manifest.model_fingerprint, model_fingerprint(first_config));
  EXPECT_EQ(manifest.planned_steps, 4);
  EXPECT_EQ(manifest.lr_schedule_steps, 4);
  EXPECT_NE(first.log.str().find("done: step 4 (4 steps in this process, "), std::string::npos) << first.log.str();

  // Resumed (from another world of one, another ep_size would do too): the same run, the same id.
  Run second(config("a", {"training.steps=6", "checkpoint.resume=auto"}));
  second.trainer->run();
  EXPECT_EQ(second.trainer->resumed_from(), step_path(4));
  EXPECT_EQ(second.trainer->run_id(), run_id);
  EXPECT_EQ(read_checkpoint_manifest(step_path(6)).run_id, run_id);
  EXPECT_NE(second.log.str().find("run id " + run_id + " (the checkpoint's run, continued)"), std::string::npos);
  EXPECT_NE(second.log.str().find("done: step 6 (2 steps in this process, "), std::string::npos) << second.log.str();
  // keep_last 2 of the same run: steps 5 and 6 stay.
  std::vector<int64_t> steps;
  for (const CheckpointListing& item : list_checkpoints(shared())) steps.push_back(item.step);
  EXPECT_EQ(steps, (std::vector<int64_t>{5, 6}));
}

TEST_F(CheckpointRunsTest, AnotherModelIsSkippedAndItsCheckpointsSurviveKeepLast) {
  Run first(config("a"));
  first.trainer->run();  // steps 3 and 4 stay (keep_last 2)
  const auto first_files = snapshot(shared());

  // The third run: another model, --resume auto, the same folder. Nothing of it loads; it
  // starts fresh, and its steps 3 and 4 are named apart.
  const Config other_config = config("b", {"moe.num_experts=2", "checkpoint.resume=auto"});
  Run other(other_config);
  other.trainer->run();
  const std::string log = other.log.str();
  for (int64_t step : {4, 3})
    EXPECT_NE(log.find("resume: skipping " + step_path(step) +
                       ": another model (moe.num_experts is 4 there, 2 in this run); not loaded"),
              std::string::npos)
        << log;
  EXPECT_EQ(other.trainer->resumed_from(), "");
  const std::string other_id = other.trainer->run_id();
  EXPECT_NE(other_id, first.trainer->run_id());
  const std::string other_4 = (fs::path(shared()) / checkpoint_step_name(4, other_id)).string();
  EXPECT_TRUE(fs::exists(fs::path(other_4) / kCheckpointCompleteFile)) << log;
  EXPECT_EQ(read_checkpoint_manifest(other_4).run_id, other_id);
  for (const auto& [path, bytes] : first_files) {
    ASSERT_TRUE(fs::exists(path)) << path << " of the first run was removed";
    EXPECT_EQ(read_file(path), bytes) << path << " of the first run changed";
  }
  EXPECT_EQ(log.find("removed " + step_path(3)), std::string::npos);
  EXPECT_EQ(log.find("removed " + step_path(4)), std::string::npos);

  // Run again, each picks its own model's newest.
  Run again(config("b", {"moe.num_experts=2", "checkpoint.resume=auto", "training.steps=5"}));
  again.trainer->prepare();
  EXPECT_EQ(again.trainer->resumed_from(), other_4);
  Run first_again(config("a", {"checkpoint.resume=auto", "training.steps=5"}));
  first_again.trainer->prepare();
  EXPECT_EQ(first_again.trainer->resumed_from(), step_path(4));

  // --resume PATH to the other model: bad input naming every difference.
  Run wrong(config("c", {"moe.num_experts=2", "moe.expert_d_ff=8"}));
  expect_bad_input([&] { wrong.trainer->resume(step_path(4)); },
                   {"is of another model: moe.num_experts is 4 there, 2 in this run; "
                    "moe.expert_d_ff is 16 there, 8 in this run"});
}

TEST_F(CheckpointRunsTest, OlderManifestsLoadAndAreNeverPruned) {
  const Config first_config = config("a");
  Run first(first_config);
  first.trainer->run();
  // Make steps 3 and 4 look written by an earlier version: no run id, fingerprint or plan, and no
  // <run_dir>/run_id either.
  for (int64_t step : {3, 4}) {
    const fs::path manifest_path = fs::path(step_path(step)) / kCheckpointManifestFile;
    std::string text = read_file(manifest_path);
    for (const char* key : {"run_id", "model_fingerprint", "planned_steps", "lr_schedule_steps"}) {
      const size_t at = text.find(std::string("\"") + key + "\"");
      ASSERT_NE(at, std::string::npos) << key;
      text.erase(at, text.find('\n', at) + 1 - at);
    }
    std::ofstream(manifest_path, std::ios::binary | std::ios::trunc) << text;
    write_complete_marker(step_path(step), text);
    EXPECT_EQ(read_checkpoint_manifest(step_path(step)).run_id, "");
  }
  fs::remove(run_directory_run_id_path(first_config.logging.run_dir));

  // Loads (its stored config is this model); its run goes on under a new id; keep_last 1 then
  // never removes it (nor the first run's step 3).
  Run resumed(config("a", {"checkpoint.resume=auto", "training.steps=7", "checkpoint.keep_last=1"}));
  resumed.trainer->run();
  EXPECT_EQ(resumed.trainer->resumed_from(), step_path(4)) << resumed.log.str();
  EXPECT_NE(resumed.trainer->run_id(), first.trainer->run_id());
  EXPECT_NE(resumed.log.str().find("saved by an earlier version"), std::string::npos) << resumed.log.str();
  EXPECT_TRUE(fs::exists(fs::path(step_path(4)) / kCheckpointCompleteFile));
  EXPECT_TRUE(fs::exists(fs::path(step_path(3)) / kCheckpointCompleteFile));
  EXPECT_FALSE(fs::exists(step_path(5))) << "its own older ones go";
  EXPECT_TRUE(fs::exists(step_path(7)));
  // An older manifest of another model: judged by its stored config, skipped.
  Run other(config("b", {"moe.num_experts=2", "checkpoint.resume=auto"}));
  other.trainer->prepare();
  EXPECT_NE(other.log.str().find("skipping " + step_path(4) + ": another model"), std::string::npos) << other.log.str();
  EXPECT_EQ(other.trainer->resumed_from(), "");
}

TEST_F(CheckpointRunsTest, ARunRestartedBeforeItsFirstCheckpointKeepsItsIdAndCleansUp) {
  const Config run_config = config("a", {"checkpoint.resume=auto"});
  const std::string run_id = "0123456789abcdef";
  write_run_directory_run_id(run_config.logging.run_dir, run_id);
  // What a SIGKILL during the first save leaves: a temporary directory and a step without marker.
  fs::create_directories(fs::path(shared()) / checkpoint_temp_name(2, run_id));
  fs::create_directories(step_path(1));
  std::ofstream(fs::path(step_path(1)) / kCheckpointManifestFile) << "{\"run_id\": \"" << run_id << "\"}";
  Run restarted(run_config);
  restarted.trainer->run();
  EXPECT_EQ(restarted.trainer->run_id(), run_id) << restarted.log.str();
  EXPECT_NE(restarted.log.str().find("restarted before its first checkpoint"), std::string::npos);
  EXPECT_FALSE(fs::exists(fs::path(shared()) / checkpoint_temp_name(2, run_id)));
  EXPECT_EQ(read_checkpoint_manifest(step_path(4)).run_id, run_id);
  for (const auto& entry : fs::directory_iterator(shared()))
    EXPECT_NE(entry.path().filename().string()[0], '.') << entry.path() << " left behind";

  // Once that run has a complete checkpoint, a start from step 0 is a new run.
  Run fresh(config("a", {"moe.num_experts=2", "checkpoint.resume=auto"}));
  fresh.trainer->prepare();
  EXPECT_NE(fresh.trainer->run_id(), run_id);
  Run plain(config("a"));
  plain.trainer->prepare();
  EXPECT_NE(plain.trainer->run_id(), run_id) << "no --resume: always a new run";
}

TEST_F(CheckpointRunsTest, ExtendingAFinishedRunStretchesOrKeepsTheScheduleAndSaysSo) {
  Run first(config("a", {"training.steps=6"}));
  first.trainer->run();
  OptimizerConfig optimizer = config("a").optimizer;

  // Resuming within the original plan says nothing about the schedule.
  Run same(config("a", {"training.steps=6", "checkpoint.resume=" + step_path(5)}));
  same.trainer->prepare();
  EXPECT_EQ(same.trainer->lr_schedule().total_steps(), 6);
  EXPECT_EQ(same.log.str().find("schedule"), std::string::npos) << same.log.str();

  // stretch (the default): the cosine is recomputed over 10 steps.
  Run stretched(config("a", {"training.steps=10", "checkpoint.resume=auto", "checkpoint.every=0"}));
  stretched.trainer->prepare();
  EXPECT_EQ(stretched.trainer->step(), 6);
  EXPECT_EQ(stretched.trainer->lr_schedule().total_steps(), 10);
  EXPECT_DOUBLE_EQ(stretched.trainer->train_step().lr, LrSchedule(optimizer, 10).at(7));
  EXPECT_GT(LrSchedule(optimizer, 10).at(7), optimizer.min_lr * 2) << "the lr climbs back up";
  std::string log = stretched.log.str();
  EXPECT_NE(log.find("extending the run: the checkpoint's run planned 6 steps, training.steps is now 10; "
                     "optimizer.extend_schedule = stretch recomputes the cosine over 10 steps"),
            std::string::npos)
      << log;

  // keep_end: the old end stands, min_lr after it; the manifest records the plan and the end.
  Run kept(config("a", {"training.steps=10", "checkpoint.resume=auto", "optimizer.extend_schedule=keep_end",
                        "checkpoint.every=0"}));
  kept.trainer->prepare();
  EXPECT_EQ(kept.trainer->lr_schedule().total_steps(), 6);
  EXPECT_DOUBLE_EQ(kept.trainer->train_step().lr, optimizer.min_lr);
  log = kept.log.str();
  EXPECT_NE(log.find("optimizer.extend_schedule = keep_end keeps the old schedule's end: the cosine ends at step 6"),
            std::string::npos)
      << log;
  const std::string saved = kept.trainer->save_checkpoint().path;
  const CheckpointManifest manifest = read_checkpoint_manifest(saved);
  EXPECT_EQ(manifest.planned_steps, 10);
  EXPECT_EQ(manifest.lr_schedule_steps, 6);

  // Resumed again within the plan: the kept end carries over silently...
  Run continued(config("a", {"training.steps=10", "checkpoint.resume=" + saved,
                             "optimizer.extend_schedule=keep_end"}));
  continued.trainer->prepare();
  EXPECT_EQ(continued.trainer->lr_schedule().total_steps(), 6);
  EXPECT_DOUBLE_EQ(continued.trainer->train_step().lr, optimizer.min_lr);
  EXPECT_EQ(continued.log.str().find("learning-rate schedule"), std::string::npos) << continued.log.str();
  EXPECT_EQ(continued.log.str().find("extending"), std::string::npos) << continued.log.str();
  // ... and switching to stretch there is reported as a changed schedule.
  Run switched(config("a", {"training.steps=10", "checkpoint.resume=" + saved}));
  switched.trainer->prepare();
  EXPECT_EQ(switched.trainer->lr_schedule().total_steps(), 10);
  EXPECT_NE(switched.log.str().find("the learning-rate schedule is not the checkpoint's: its cosine ended at step 6, "
                                    "this run's ends at step 10"),
            std::string::npos)
      << switched.log.str();

}

}  // namespace
