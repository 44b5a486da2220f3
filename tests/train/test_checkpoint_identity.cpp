// Run ids, model fingerprints and the checkpoint-folder rules (src/train/checkpoint_identity.h),
// without a trainer: the fingerprint covers exactly the architecture keys (not the parallel sizes,
// so checkpoints keep resharding); the manifest round-trips the new fields and still reads the
// older form without them; --resume auto's candidates leave out other models and incomplete ones
// and put the run directory's run first; a fresh start refuses another run's folder; the
// keep_end schedule end.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/train/checkpoint_identity.h"
#include "src/train/lr_schedule.h"
#include "tests/support/expect_error.h"

using switchyard::testing::expect_bad_input;

using namespace switchyard;
namespace fs = std::filesystem;

namespace {

const char* const kBaseYaml =
    "model: {d_model: 16, n_layers: 2, n_heads: 2, seq_len: 16, d_ff: 32, moe_every: 2, compute_dtype: fp32}\n"
    "moe: {num_experts: 4, top_k: 1, expert_d_ff: 16, renormalize_gates: false}\n"
    "training: {steps: 8, device: cpu}\n"
    "data: {path: train.bin}\n";

Config config(const std::vector<std::string>& overrides = {}) {
  return parse_config_string(kBaseYaml, "test.yaml", overrides);
}

TEST(RunIds, AreSixteenHexDigitsAndDiffer) {
  std::set<std::string> seen;
  for (int index = 0; index < 50; ++index) {
    const std::string id = new_run_id();
    EXPECT_TRUE(is_run_id(id)) << id;
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 50u);
  for (const char* bad : {"", "0123456789abcde", "0123456789abcdef0", "0123456789ABCDEF", "0123456789abcdeg"})
    EXPECT_FALSE(is_run_id(bad)) << bad;
}

TEST(ModelFingerprint, CoversTheArchitectureAndNothingElse) {
  const std::string base = model_fingerprint(config());
  EXPECT_EQ(base.size(), 16u);
  // Keys that leave every tensor as it is: parallel sizes (checkpoints reshard), precision,
  // initialisation, routing, optimizer, training length.
  for (const char* same : {"parallel.ep_size=2", "parallel.ep_size=4", "model.compute_dtype=bf16",
                           "model.init_std=0.05", "moe.top_k=2", "moe.capacity_factor=2", "optimizer.lr=0.1",
                           "training.steps=100", "model.seq_len=32"})
    EXPECT_EQ(model_fingerprint(config({same})), base) << same;
  for (const char* other : {"model.vocab_size=300", "model.d_model=32", "model.n_layers=4", "model.n_heads=4",
                            "model.d_ff=64", "model.norm=layernorm", "model.positions=learned", "model.moe_every=1",
                            "moe.num_experts=2", "moe.expert_d_ff=8", "moe.activation=swiglu"})
    EXPECT_NE(model_fingerprint(config({other})), base) << other;
  // The position table's length is part of the model only with learned positions.
  EXPECT_NE(model_fingerprint(config({"model.positions=learned", "model.seq_len=32"})),
            model_fingerprint(config({"model.positions=learned"})));
}

TEST(ModelFingerprint, SharedExpertsAndDenseFirstBlocksEnterOnlyWhereUsed) {
  // Models without them keep the fingerprint they had before the keys existed (the same text).
  const std::vector<std::string> keys = architecture_keys(config());
  EXPECT_EQ(std::count(keys.begin(), keys.end(), "model.dense_first_blocks"), 0);
  EXPECT_EQ(std::count(keys.begin(), keys.end(), "moe.num_shared_experts"), 0);
  EXPECT_EQ(model_fingerprint(config({"moe.shared_expert_d_ff=64"})), model_fingerprint(config()))
      << "a width without shared experts changes no tensor";
  const std::string shared = model_fingerprint(config({"moe.num_shared_experts=1"}));
  EXPECT_NE(shared, model_fingerprint(config()));
  EXPECT_NE(model_fingerprint(config({"moe.num_shared_experts=2"})), shared);
  EXPECT_NE(model_fingerprint(config({"moe.num_shared_experts=1", "moe.shared_expert_d_ff=8"})), shared);
  EXPECT_NE(model_fingerprint(config({"model.moe_every=1", "model.dense_first_blocks=1"})),
            model_fingerprint(config({"model.moe_every=1"})));
  // A checkpoint with shared experts, resumed without: the difference is named either way.
  const std::vector<std::string> differences =
      architecture_differences(config({"moe.num_shared_experts=2"}), config());
  ASSERT_EQ(differences.size(), 1u);
  EXPECT_EQ(differences[0], "moe.num_shared_experts is 2 there, 0 in this run");
}

TEST(ModelFingerprint, RouterBiasEntersAsAPropertyNotAsItsRate) {
  // The routing options change no tensor; the router bias (bias_update_rate > 0) adds one per block.
  const std::string base = model_fingerprint(config());
  for (const char* same : {"moe.score_function=sigmoid", "moe.num_groups=2", "moe.topk_groups=1",
                           "moe.drop_policy=probability", "moe.routed_scaling_factor=2", "moe.seq_aux_loss_weight=0.1",
                           "moe.global_aux_loss_weight=0.1", "moe.routing=expert_choice"})
    EXPECT_EQ(model_fingerprint(config({same})), base) << same;
  const std::vector<std::string> keys = architecture_keys(config());
  EXPECT_EQ(std::count(keys.begin(), keys.end(), "moe.bias_update_rate > 0"), 0) << "old fingerprints unchanged";
  const std::string biased = model_fingerprint(config({"moe.bias_update_rate=0.001"}));
  EXPECT_NE(biased, base);
  EXPECT_EQ(model_fingerprint(config({"moe.bias_update_rate=0.01"})), biased) << "the rate may change on resume";
  const std::vector<std::string> differences = architecture_differences(config({"moe.bias_update_rate=0.001"}), config());
  ASSERT_EQ(differences.size(), 1u);
  EXPECT_EQ(differences[0], "moe.bias_update_rate > 0 is true there, false in this run");
  EXPECT_TRUE(architecture_differences(config({"moe.bias_update_rate=0.001"}), config({"moe.bias_update_rate=0.5"}))
                  .empty());
}

TEST(ModelFingerprint, DifferencesNameEveryKey) {
  const std::vector<std::string> differences =
      architecture_differences(config(), config({"moe.num_experts=2", "moe.expert_d_ff=8", "parallel.ep_size=2"}));
  ASSERT_EQ(differences.size(), 2u);
  EXPECT_EQ(differences[0], "moe.num_experts is 4 there, 2 in this run");
  EXPECT_EQ(differences[1], "moe.expert_d_ff is 16 there, 8 in this run");
  EXPECT_EQ(join_differences(differences),
            "moe.num_experts is 4 there, 2 in this run; moe.expert_d_ff is 16 there, 8 in this run");
  EXPECT_TRUE(architecture_differences(config(), config({"parallel.ep_size=4", "moe.top_k=2"})).empty());
}

TEST(ModelFingerprint, CheckpointModelDifferencesUseTheFingerprintOrTheStoredConfig) {
  const Config run = config();
  const std::string stored = config_to_yaml(config({"moe.num_experts=2"}));
  // Equal fingerprints decide without reading the stored config.
  EXPECT_TRUE(checkpoint_model_differences(model_fingerprint(run), "not: [yaml", "m.json", run).empty());
  // A manifest without a fingerprint (an earlier version): its stored config decides.
  EXPECT_TRUE(checkpoint_model_differences("", config_to_yaml(config({"parallel.ep_size=2"})), "m.json", run).empty());
  EXPECT_EQ(checkpoint_model_differences("", stored, "m.json", run),
            std::vector<std::string>{"moe.num_experts is 2 there, 4 in this run"});
  // A fingerprint that differs: the stored config names what differs.
  EXPECT_EQ(checkpoint_model_differences(model_fingerprint(config({"moe.num_experts=2"})), stored, "m.json", run),
            std::vector<std::string>{"moe.num_experts is 2 there, 4 in this run"});
  expect_bad_input([&] { checkpoint_model_differences("", "model: [", "m.json", run); },
                   {"m.json", "its stored config does not load"});
}

CheckpointManifest small_manifest() {
  CheckpointManifest manifest;
  manifest.step = 4;
  manifest.config_yaml = config_to_yaml(config());
  manifest.files.push_back(CheckpointShardFile{"shard-00000.bin", 0, 64});
  return manifest;
}

TEST(ManifestIdentity, RoundTripsAndOlderManifestsStillRead) {
  CheckpointManifest manifest = small_manifest();
  manifest.run_id = "0123456789abcdef";
  manifest.model_fingerprint = model_fingerprint(config());
  manifest.planned_steps = 10;
  manifest.lr_schedule_steps = 6;
  const std::string text = manifest_to_json(manifest).dump(1);
  for (const char* key : {"\"run_id\"", "\"model_fingerprint\"", "\"planned_steps\"", "\"lr_schedule_steps\""})
    EXPECT_NE(text.find(key), std::string::npos) << key;
  const CheckpointManifest back = manifest_from_json(json::parse(text, "m"), "m");
  EXPECT_EQ(back.run_id, manifest.run_id);
  EXPECT_EQ(back.model_fingerprint, manifest.model_fingerprint);
  EXPECT_EQ(back.planned_steps, 10);
  EXPECT_EQ(back.lr_schedule_steps, 6);

  // Without them (written by an earlier version): read, with empty / zero fields.
  const std::string older = manifest_to_json(small_manifest()).dump(1);
  EXPECT_EQ(older.find("run_id"), std::string::npos);
  const CheckpointManifest old_back = manifest_from_json(json::parse(older, "m"), "m");
  EXPECT_EQ(old_back.run_id, "");
  EXPECT_EQ(old_back.model_fingerprint, "");
  EXPECT_EQ(old_back.planned_steps, 0);
  EXPECT_EQ(stored_training_steps(old_back.config_yaml, "m"), 8) << "an older manifest's plan: its config's steps";

  auto edited = [&](const std::string& from, const std::string& to) {
    std::string copy = text;
    copy.replace(copy.find(from), from.size(), to);
    return copy;
  };
  expect_bad_input([&] { manifest_from_json(json::parse(edited("0123456789abcdef", "NOT-A-RUN-ID"), "m"), "m"); },
                   {"m: run_id 'NOT-A-RUN-ID'"});
  expect_bad_input([&] { manifest_from_json(json::parse(edited("\"planned_steps\": 10", "\"planned_steps\": 0"), "m"), "m"); },
                   {"planned_steps"});
}

class CheckpointFolderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("switchyard_identity_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
             "_" + std::to_string(::getpid()));
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }
  // A step directory whose manifest says `run_id` and holds the model of `model` (no tensors: the
  // candidate list reads only the identity).
  std::string make(const std::string& name, bool complete, const std::string& run_id, const Config& model,
                   bool with_fingerprint = true) {
    const fs::path path = root_ / "ckpt" / name;
    fs::create_directories(path);
    CheckpointManifest manifest = small_manifest();
    manifest.run_id = run_id;
    if (with_fingerprint) manifest.model_fingerprint = model_fingerprint(model);
    manifest.config_yaml = config_to_yaml(model);
    std::ofstream(path / kCheckpointManifestFile) << manifest_to_json(manifest).dump(1);
    if (complete) std::ofstream(path / kCheckpointCompleteFile) << "x";
    return path.string();
  }
  std::string dir() const { return (root_ / "ckpt").string(); }
  fs::path root_;
};

TEST_F(CheckpointFolderTest, AutoCandidatesLeaveOutOtherModelsAndPutTheRunDirectorysRunFirst) {
  const Config run = config(), other_model = config({"moe.num_experts=2"});
  const std::string ours = "0123456789abcdef", theirs = "fedcba9876543210";
  const std::string ours_2 = make(checkpoint_step_name(2), true, ours, run);
  const std::string theirs_5 = make(checkpoint_step_name(5), true, theirs, run);
  const std::string ours_5 = make(checkpoint_step_name(5, ours), true, ours, run);
  const std::string other_6 = make(checkpoint_step_name(6), true, theirs, other_model);
  const std::string legacy_7 = make(checkpoint_step_name(7), true, "", run, /*with_fingerprint=*/false);
  const std::string legacy_other_8 = make(checkpoint_step_name(8), true, "", other_model, false);
  const std::string incomplete_9 = make(checkpoint_step_name(9), false, ours, run);
  const fs::path unreadable = root_ / "ckpt" / checkpoint_step_name(10);
  fs::create_directories(unreadable);
  std::ofstream(unreadable / kCheckpointCompleteFile) << "x";  // no manifest: loading will say so

  ResumeCandidates candidates = auto_resume_candidates(dir(), run, ours);
  EXPECT_EQ(candidates.paths, (std::vector<std::string>{ours_5, ours_2, unreadable.string(), legacy_7, theirs_5}));
  ASSERT_EQ(candidates.skipped.size(), 3u);
  EXPECT_EQ(candidates.skipped[0], "skipping " + incomplete_9 + ": incomplete (no COMPLETE marker: its save did not finish)");
  EXPECT_EQ(candidates.skipped[1], "skipping " + legacy_other_8 +
                                       ": another model (moe.num_experts is 2 there, 4 in this run); not loaded");
  EXPECT_EQ(candidates.skipped[2], "skipping " + other_6 +
                                       ": another model (moe.num_experts is 2 there, 4 in this run); not loaded");
  // Without a run of its own (a new run directory): newest step first, whoever wrote it.
  candidates = auto_resume_candidates(dir(), run, "");
  EXPECT_EQ(candidates.paths, (std::vector<std::string>{unreadable.string(), legacy_7, ours_5, theirs_5, ours_2}));
  // The other model sees only its own.
  candidates = auto_resume_candidates(dir(), other_model, "");
  EXPECT_EQ(candidates.paths, (std::vector<std::string>{unreadable.string(), legacy_other_8, other_6}));

  EXPECT_TRUE(holds_checkpoint_of_run(dir(), ours));
  EXPECT_FALSE(holds_checkpoint_of_run(dir(), "00000000000000aa"));
}

TEST_F(CheckpointFolderTest, FreshStartRefusesAnotherRunsFolder) {
  Config run = config({"logging.run_dir=" + (root_ / "run").string(), "checkpoint.dir=" + dir()});
  EXPECT_NO_THROW(check_fresh_start(run, false)) << "no folder yet";
  fs::create_directories(dir());
  EXPECT_NO_THROW(check_fresh_start(run, false)) << "an empty folder";
  const std::string newest = make(checkpoint_step_name(3), true, "fedcba9876543210", run);
  make(checkpoint_step_name(2), true, "fedcba9876543210", run);
  expect_bad_input([&] { check_fresh_start(run, false); },
                   {"checkpoint.dir '" + dir() + "' already holds 2 checkpoint(s) of another run",
                    newest, "run id fedcba9876543210", "--resume auto", "--set checkpoint.dir=", "--start-over"});
  EXPECT_NO_THROW(check_fresh_start(run, true)) << "--start-over";
  run.checkpoint.resume = "auto";
  EXPECT_NO_THROW(check_fresh_start(run, false)) << "resuming";
  // With the default folder the way out is another run directory.
  Config derived = config({"logging.run_dir=" + root_.string()});
  fs::rename(dir(), root_ / "checkpoints");
  expect_bad_input([&] { check_fresh_start(derived, false); }, {"--set logging.run_dir=", "checkpoint.dir follows it"});
}

TEST_F(CheckpointFolderTest, RunDirectoryRunId) {
  const std::string run_dir = (root_ / "run").string();
  EXPECT_EQ(read_run_directory_run_id(run_dir), "");
  write_run_directory_run_id(run_dir, "0123456789abcdef");
  EXPECT_EQ(read_run_directory_run_id(run_dir), "0123456789abcdef");
  std::ofstream(run_directory_run_id_path(run_dir)) << "garbage\n";
  EXPECT_EQ(read_run_directory_run_id(run_dir), "") << "not a run id: none";
}

TEST(ResumedScheduleEnd, StretchOrKeepTheEnd) {
  OptimizerConfig optimizer;
  optimizer.warmup_steps = 2;
  EXPECT_EQ(resumed_schedule_end(optimizer, 20, 10), 20) << "stretch: the new total";
  EXPECT_EQ(resumed_schedule_end(optimizer, 5, 10), 5) << "fewer steps: the new total";
  optimizer.extend_schedule = ScheduleExtension::keep_end;
  EXPECT_EQ(resumed_schedule_end(optimizer, 20, 10), 10) << "keep_end: the old end";
  EXPECT_EQ(resumed_schedule_end(optimizer, 5, 10), 5) << "keep_end, fewer steps: the new total";
  EXPECT_EQ(resumed_schedule_end(optimizer, 10, 10), 10);
  const LrSchedule kept(optimizer, 10);
  EXPECT_EQ(kept.at(11), kept.floor()) << "past the kept end: min_lr";
  EXPECT_EQ(kept.at(20), kept.floor());
  optimizer.warmup_steps = 12;
  expect_bad_input([&] { resumed_schedule_end(optimizer, 20, 10); },
                   {"optimizer.extend_schedule = keep_end", "ends at step 10", "optimizer.warmup_steps = 12"});
}

}  // namespace
