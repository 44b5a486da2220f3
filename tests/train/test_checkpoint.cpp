// Checkpoints through the trainer, one process on the CPU backend: save + load restores every bit
// of the state; N steps straight and N/2 + save + a new process-like trainer resuming + N/2 give
// bit-identical losses and weights (with gradient accumulation, router jitter and a loss scaler
// that changes scale across the boundary); run() saves every N and at the end, keeps the newest K
// and resumes auto with its metrics file continued; damaged checkpoints (truncated, flipped byte,
// missing file, another model, incomplete, edited manifest) give a bad-input error naming the
// file and delete nothing, while auto skips them; SIGUSR1 makes run() save and stop; the
// safetensors export follows the format and holds the master weights.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "src/core/error.h"
#include "src/train/checkpoint.h"
#include "src/train/checkpoint_export.h"
#include "src/train/checkpoint_signals.h"
#include "src/train/trainer.h"
#include "src/train/weights_file.h"
#include "tests/support/expect_error.h"

using switchyard::testing::expect_bad_input;

using namespace switchyard;
namespace fs = std::filesystem;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

std::string read_file(const fs::path& path) {
  std::ifstream stream(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(stream)), std::istreambuf_iterator<char>());
}

// Every file under `root` with its contents' checksum: equal snapshots = nothing changed.
std::map<std::string, uint64_t> snapshot(const fs::path& root) {
  std::map<std::string, uint64_t> files;
  for (const auto& entry : fs::recursive_directory_iterator(root)) {
    if (!entry.is_regular_file()) continue;
    const std::string data = read_file(entry.path());
    files[entry.path().string()] = fnv1a64(data.data(), data.size());
  }
  return files;
}

// Every byte of the trainer's state that a checkpoint must restore, as host copies.
struct StateCopy {
  std::vector<std::vector<char>> buffers;
  int64_t step, tokens, updates, cursor, jitter;
  LossScalerState scaler;
  explicit StateCopy(Trainer& trainer) {
    for (int group = 0; group < kNumParameterGroups; ++group) {
      for (const Tensor& tensor : {trainer.parameters().master_group(ParameterGroup(group)),
                                   trainer.optimizer().exp_avg(ParameterGroup(group)),
                                   trainer.optimizer().exp_avg_sq(ParameterGroup(group))}) {
        const char* data = static_cast<const char*>(tensor.data);
        buffers.emplace_back(data, data + tensor.bytes());
      }
    }
    const TrainingProgress progress = trainer.progress();
    step = progress.step;
    tokens = progress.tokens_seen;
    updates = progress.optimizer_updates;
    cursor = progress.train_data.samples_consumed;
    jitter = progress.rng.jitter_micro_steps;
    scaler = progress.loss_scaler;
  }
  void expect_equal(const StateCopy& other) const {
    ASSERT_EQ(buffers.size(), other.buffers.size());
    for (size_t index = 0; index < buffers.size(); ++index)
      EXPECT_TRUE(buffers[index] == other.buffers[index]) << "buffer " << index << " (group, state) differs";
    EXPECT_EQ(step, other.step);
    EXPECT_EQ(tokens, other.tokens);
    EXPECT_EQ(updates, other.updates);
    EXPECT_EQ(cursor, other.cursor);
    EXPECT_EQ(jitter, other.jitter);
    EXPECT_EQ(scaler.scale, other.scaler.scale);
    EXPECT_EQ(scaler.good_steps, other.scaler.good_steps);
    EXPECT_EQ(scaler.total_skips, other.scaler.total_skips);
  }
};

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    directory_ = fs::temp_directory_path() /
                 ("switchyard_checkpoint_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
                  "_" + std::to_string(::getpid()));
    fs::remove_all(directory_);
    fs::create_directories(directory_);
    std::mt19937_64 generator(std::random_device{}());
    for (const char* split : {"train", "val"}) {
      // Random words over a small alphabet: learnable, fresh each run.
      std::vector<uint32_t> tokens;
      while (tokens.size() < (split[0] == 't' ? 40000u : 4000u)) {
        const int length = 2 + int(generator() % 6);
        for (int letter = 0; letter < length; ++letter) tokens.push_back(uint32_t('a' + generator() % 8));
        tokens.push_back(generator() % 5 == 0 ? '\n' : ' ');
      }
      write_token_file((directory_ / (std::string(split) + ".bin")).string(), tokens, 256);
    }
  }
  void TearDown() override { fs::remove_all(directory_); }

  Config config(const std::vector<std::string>& overrides = {}) const {
    const std::string yaml =
        "model: {d_model: 16, n_layers: 2, n_heads: 2, seq_len: 16, d_ff: 32, moe_every: 2, compute_dtype: fp32}\n"
        "moe: {num_experts: 4, top_k: 1, expert_d_ff: 16, renormalize_gates: false, segment_alignment: 4,"
        " jitter_eps: 0.05}\n"
        "parallel: {deterministic: true}\n"
        "optimizer: {lr: 0.01, warmup_steps: 3, grad_accum_steps: 2, loss_scale_init: 1024,"
        " loss_scale_growth_interval: 2}\n"
        "training: {steps: 8, micro_batch_size: 2, seed: 5, eval_every: 0, eval_batches: 1, log_every: 100,"
        " device: cpu}\n"
        "data: {path: " + (directory_ / "train.bin").string() + ", val_path: " + (directory_ / "val.bin").string() +
        "}\n"
        "checkpoint: {every: 0, keep_last: 0}\n"
        "logging: {run_dir: " + (directory_ / "run").string() + "}\n";
    return parse_config_string(yaml, "test.yaml", overrides);
  }

  // A trainer with loss scaling on (the scaler state must carry over too).
  struct Run {
    TokenFile train, val;
    std::ostringstream log;
    std::unique_ptr<Trainer> trainer;
    explicit Run(const Config& config)
        : train(config.data.path, uint32_t(config.model.vocab_size)),
          val(config.data.val_path, uint32_t(config.model.vocab_size)) {
      TrainerOptions options;
      options.force_loss_scaling = true;
      options.log = &log;
      trainer = std::make_unique<Trainer>(config, train, &val, options);
    }
  };

  // Saves a checkpoint after `steps` steps of `config` and returns its path.
  std::string make_checkpoint(const Config& config, int steps) {
    Run run(config);
    for (int step = 0; step < steps; ++step) run.trainer->train_step();
    return run.trainer->save_checkpoint().path;
  }

  fs::path directory_;
};


TEST_F(CheckpointTest, SaveAndLoadRestoreEveryBitOfTheState) {
  const Config run_config = config();
  Run first(run_config);
  for (int step = 0; step < 3; ++step) first.trainer->train_step();
  const StateCopy saved(*first.trainer);
  const CheckpointSaveResult result = first.trainer->save_checkpoint();
  EXPECT_EQ(fs::path(result.path).filename().string(), "step-000000003");
  EXPECT_TRUE(fs::exists(fs::path(result.path) / kCheckpointCompleteFile));

  // Another trainer that has moved on (different weights, moments, counters) loads it.
  Run second(run_config);
  for (int step = 0; step < 5; ++step) second.trainer->train_step();
  ASSERT_TRUE(second.trainer->resume(result.path));
  EXPECT_EQ(second.trainer->resumed_from(), result.path);
  saved.expect_equal(StateCopy(*second.trainer));
}

TEST_F(CheckpointTest, ResumedRunIsBitIdenticalToTheStraightOne) {
  const Config run_config = config({"training.steps=10"});
  std::vector<double> straight_losses, straight_norms;
  Run straight(run_config);
  for (int step = 0; step < 10; ++step) {
    const StepMetrics metrics = straight.trainer->train_step();
    straight_losses.push_back(metrics.loss);
    straight_norms.push_back(metrics.grad_norm);
  }
  const StateCopy straight_end(*straight.trainer);

  std::vector<double> losses, norms;
  std::string path;
  {
    Run before(run_config);
    for (int step = 0; step < 5; ++step) {
      const StepMetrics metrics = before.trainer->train_step();
      losses.push_back(metrics.loss);
      norms.push_back(metrics.grad_norm);
    }
    path = before.trainer->save_checkpoint().path;
  }  // the first "process" ends
  Run after(run_config);
  ASSERT_TRUE(after.trainer->resume(path));
  for (int step = 0; step < 5; ++step) {
    const StepMetrics metrics = after.trainer->train_step();
    losses.push_back(metrics.loss);
    norms.push_back(metrics.grad_norm);
  }
  EXPECT_EQ(losses, straight_losses);
  EXPECT_EQ(norms, straight_norms);
  straight_end.expect_equal(StateCopy(*after.trainer));
  EXPECT_GT(straight_end.scaler.scale, 1024.0) << "the loss scale grew during the run (its state mattered)";
}

TEST_F(CheckpointTest, ResumeWithSharedExpertsAndDenseFirstBlocksIsBitIdentical) {
  // Block 0 dense, blocks 1 and 2 MoE with two shared experts each.
  const Config run_config = config({"training.steps=6", "model.n_layers=3", "model.moe_every=1",
                                    "model.dense_first_blocks=1", "moe.num_shared_experts=2",
                                    "moe.shared_expert_d_ff=8"});
  std::vector<double> straight_losses;
  Run straight(run_config);
  for (int step = 0; step < 6; ++step) straight_losses.push_back(straight.trainer->train_step().loss);
  const StateCopy straight_end(*straight.trainer);

  std::vector<double> losses;
  std::string path;
  {
    Run before(run_config);
    for (int step = 0; step < 3; ++step) losses.push_back(before.trainer->train_step().loss);
    path = before.trainer->save_checkpoint().path;
  }
  std::ifstream manifest(fs::path(path) / "manifest.json");
  const std::string manifest_text((std::istreambuf_iterator<char>(manifest)), std::istreambuf_iterator<char>());
  EXPECT_NE(manifest_text.find("blocks.2.moe.shared.w2"), std::string::npos) << "the shared experts are saved";
  Run after(run_config);
  ASSERT_TRUE(after.trainer->resume(path));
  for (int step = 0; step < 3; ++step) losses.push_back(after.trainer->train_step().loss);
  EXPECT_EQ(losses, straight_losses);
  straight_end.expect_equal(StateCopy(*after.trainer));
}

TEST_F(CheckpointTest, RunSavesEveryNKeepsTheNewestAndResumesAuto) {
  const Config first_config = config({"training.steps=6", "checkpoint.every=2", "checkpoint.keep_last=2"});
  Run first(first_config);
  first.trainer->run();
  const std::string root = first_config.checkpoint.dir;
  std::vector<int64_t> steps;
  for (const CheckpointListing& item : list_checkpoints(root)) {
    EXPECT_TRUE(item.complete);
    steps.push_back(item.step);
  }
  EXPECT_EQ(steps, (std::vector<int64_t>{4, 6}));
  EXPECT_NE(first.log.str().find("removed " + (fs::path(root) / "step-000000002").string()), std::string::npos)
      << first.log.str();

  // More steps, auto resume: continues at 6; the metrics file goes on from line 6.
  const Config more = config({"training.steps=9", "checkpoint.every=2", "checkpoint.keep_last=2",
                              "checkpoint.resume=auto"});
  Run second(more);
  second.trainer->run();
  EXPECT_EQ(second.trainer->resumed_from(), (fs::path(root) / "step-000000006").string()) << second.log.str();
  EXPECT_EQ(second.trainer->step(), 9);
  std::ifstream metrics(second.trainer->metrics_path());
  int line_number = 0;
  for (std::string line; std::getline(metrics, line);)
    EXPECT_EQ(line.rfind("{\"step\":" + std::to_string(++line_number) + ",", 0), 0u) << line;
  EXPECT_EQ(line_number, 9);
  steps.clear();
  for (const CheckpointListing& item : list_checkpoints(root)) steps.push_back(item.step);
  EXPECT_EQ(steps, (std::vector<int64_t>{8, 9})) << "every 2 and at the end, keeping 2";
}

TEST_F(CheckpointTest, AutoSkipsIncompleteAndCorruptCheckpointsAndDeletesNothing) {
  const Config run_config = config({"checkpoint.resume=auto"});
  Run saver(run_config);
  std::vector<std::string> paths;
  for (int step = 0; step < 3; ++step) {
    saver.trainer->train_step();
    paths.push_back(saver.trainer->save_checkpoint().path);
  }
  const StateCopy at_step_one = [&] {
    Run probe(run_config);
    probe.trainer->resume(paths[0]);
    return StateCopy(*probe.trainer);
  }();
  // Newest: one flipped byte in a tensor; the middle one: its completion marker is gone.
  const fs::path shard = fs::path(paths[2]) / shard_file_name(0);
  const CheckpointManifest newest = read_checkpoint_manifest(paths[2]);
  const CheckpointTensor& middle = newest.tensors[newest.tensors.size() / 2];
  std::string bytes = read_file(shard);
  bytes[size_t(middle.offset + middle.bytes / 2)] ^= 0x10;
  std::ofstream(shard, std::ios::binary | std::ios::trunc) << bytes;
  fs::remove(fs::path(paths[1]) / kCheckpointCompleteFile);
  const auto before = snapshot(run_config.checkpoint.dir);

  Run resumer(run_config);
  ASSERT_TRUE(resumer.trainer->resume("auto"));
  EXPECT_EQ(resumer.trainer->resumed_from(), paths[0]);
  at_step_one.expect_equal(StateCopy(*resumer.trainer));
  const std::string log = resumer.log.str();
  EXPECT_NE(log.find("skipping " + paths[2] + ": checkpoint shard " + shard.string() + " is corrupt"), std::string::npos)
      << log;
  EXPECT_NE(log.find("skipping " + paths[1] + ": incomplete"), std::string::npos) << log;
  EXPECT_EQ(snapshot(run_config.checkpoint.dir), before) << "resuming deletes or changes nothing";

  // Nothing usable at all: a fresh start, identical to a trainer that never tried.
  fs::remove(fs::path(paths[0]) / kCheckpointCompleteFile);
  Run fresh(run_config), untouched(run_config);
  EXPECT_FALSE(fresh.trainer->resume("auto"));
  StateCopy(*untouched.trainer).expect_equal(StateCopy(*fresh.trainer));
}

TEST_F(CheckpointTest, DamagedCheckpointsAreBadInputNamingTheFile) {
  const Config run_config = config();
  const std::string pristine = make_checkpoint(run_config, 2);
  const fs::path shard = fs::path(pristine) / shard_file_name(0);
  const fs::path manifest = fs::path(pristine) / kCheckpointManifestFile;
  const CheckpointManifest parsed = read_checkpoint_manifest(pristine);
  const CheckpointTensor& victim = *parsed.find("optimizer.exp_avg.blocks.1.moe.experts.2.w1");

  struct Damage {
    const char* name;
    std::function<void(const fs::path& checkpoint)> apply;
    std::vector<std::string> needles;  // relative to the damaged copy
  };
  const std::vector<Damage> damages = {
      {"truncated shard", [](const fs::path& c) { fs::resize_file(c / shard_file_name(0), fs::file_size(c / shard_file_name(0)) - 100); },
       {shard_file_name(0), "truncated"}},
      {"flipped byte", [&](const fs::path& c) {
         std::fstream file(c / shard_file_name(0), std::ios::in | std::ios::out | std::ios::binary);
         file.seekp(std::streamoff(victim.offset + victim.bytes / 3));
         char byte = 0;
         file.seekg(std::streamoff(victim.offset + victim.bytes / 3));
         file.read(&byte, 1);
         byte = char(byte ^ 0x01);
         file.seekp(std::streamoff(victim.offset + victim.bytes / 3));
         file.write(&byte, 1);
       }, {shard_file_name(0), "corrupt", victim.name}},
      {"missing shard", [](const fs::path& c) { fs::remove(c / shard_file_name(0)); }, {shard_file_name(0), "missing"}},
      {"missing manifest", [](const fs::path& c) { fs::remove(c / kCheckpointManifestFile); }, {"manifest.json", "missing"}},
      {"incomplete", [](const fs::path& c) { fs::remove(c / kCheckpointCompleteFile); }, {"COMPLETE", "incomplete"}},
      {"edited manifest", [](const fs::path& c) {
         std::string text = read_file(c / kCheckpointManifestFile);
         text.replace(text.find("\"step\": 2"), 9, "\"step\": 3");
         std::ofstream(c / kCheckpointManifestFile, std::ios::binary | std::ios::trunc) << text;
       }, {"manifest.json", "does not match its completion marker"}},
  };
  for (const Damage& damage : damages) {
    SCOPED_TRACE(damage.name);
    const fs::path copy = directory_ / (std::string("damaged_") + std::to_string(&damage - damages.data()));
    fs::copy(pristine, copy);
    damage.apply(copy);
    const auto before = snapshot(copy);
    Run victim_run(run_config);
    std::vector<std::string> needles;
    for (const std::string& needle : damage.needles)
      needles.push_back(needle.find('.') != std::string::npos && needle != victim.name ? (copy / needle).string() : needle);
    expect_bad_input([&] { victim_run.trainer->resume(copy.string()); }, needles);
    expect_bad_input([&] {
      const CheckpointManifest checked = read_checkpoint_manifest(copy.string());
      verify_checkpoint_tensors(copy.string(), checked);
    }, needles);
    EXPECT_EQ(snapshot(copy), before) << "nothing deleted or changed";
  }

  // A checkpoint of another model: structural keys and tensor shapes are compared.
  Run other_heads(config({"model.n_heads=4"}));
  expect_bad_input([&] { other_heads.trainer->resume(pristine); }, {manifest.string(), "another model", "model.n_heads"});
  Run other_width(config({"model.d_model=24"}));
  expect_bad_input([&] { other_width.trainer->resume(pristine); }, {manifest.string(), "model.d_model is 16"});
  Run other_seed(config({"training.seed=6"}));
  expect_bad_input([&] { other_seed.trainer->resume(pristine); }, {pristine, "training.seed"});
  EXPECT_NO_THROW(Run(run_config).trainer->resume(pristine)) << "the pristine original still loads";
}

TEST_F(CheckpointTest, PreemptionSignalSavesAndStopsTheRun) {
  const Config run_config = config({"training.steps=100000", "training.log_every=1"});
  Run run(run_config);
  std::atomic<bool> done{false};
  std::thread sender([&] {
    // After a few steps have been logged, signal the process as SLURM would.
    while (!done && std::count(std::istreambuf_iterator<char>(std::ifstream(run.trainer->metrics_path()).rdbuf()),
                               std::istreambuf_iterator<char>(), '\n') < 3)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (!done) ::kill(::getpid(), SIGUSR1);
  });
  run.trainer->run();
  done = true;
  sender.join();
  EXPECT_TRUE(run.trainer->preempted());
  EXPECT_GE(run.trainer->step(), 3);
  EXPECT_LT(run.trainer->step(), 100000);
  const fs::path saved = fs::path(run_config.checkpoint.dir) / checkpoint_step_name(run.trainer->step());
  EXPECT_TRUE(fs::exists(saved / kCheckpointCompleteFile)) << run.log.str();
  EXPECT_FALSE(fs::exists(run.trainer->final_weights_path())) << "a preempted run is not finished";
  EXPECT_NE(run.log.str().find("SIGUSR1 received"), std::string::npos) << run.log.str();
  EXPECT_EQ(preemption_signal(), 0) << "run() does not leave a signal pending for the next one";
}

TEST(CheckpointSignals, GuardRestoresThePreviousHandler) {
  static volatile std::sig_atomic_t seen = 0;
  struct sigaction custom {}, previous {};
  custom.sa_handler = [](int) { seen = 1; };
  sigemptyset(&custom.sa_mask);
  ASSERT_EQ(sigaction(SIGUSR1, &custom, &previous), 0);
  {
    PreemptionSignalGuard guard;
    clear_preemption_signal();
    std::raise(SIGUSR1);
    EXPECT_EQ(preemption_signal(), SIGUSR1);
    std::raise(SIGTERM);
    EXPECT_EQ(preemption_signal(), SIGUSR1) << "the first signal is kept";
    EXPECT_EQ(seen, 0);
  }
  clear_preemption_signal();
  std::raise(SIGUSR1);
  EXPECT_EQ(seen, 1) << "the previous handler is back";
  EXPECT_EQ(preemption_signal(), 0);
  sigaction(SIGUSR1, &previous, nullptr);
}

TEST_F(CheckpointTest, SafetensorsExportFollowsTheFormat) {
  const Config run_config = config();
  Run run(run_config);
  for (int step = 0; step < 2; ++step) run.trainer->train_step();
  const std::string path = run.trainer->save_checkpoint().path;
  const ParameterLayout& layout = run.trainer->parameters().layout();
  for (const bool bf16 : {false, true}) {
    for (const bool merge : {false, true}) {
      SCOPED_TRACE(std::string(bf16 ? "bf16" : "fp32") + (merge ? ", merged experts" : ""));
      SafetensorsExportOptions options;
      options.dtype = bf16 ? DType::bf16 : DType::f32;
      options.merge_experts = merge;
      options.include_optimizer = merge;
      const fs::path output = directory_ / "model.safetensors";
      const SafetensorsExportResult result = export_safetensors(path, output.string(), options);
      const std::string file = read_file(output);
      ASSERT_EQ(file.size(), result.bytes);
      uint64_t header_bytes = 0;
      std::memcpy(&header_bytes, file.data(), 8);
      ASSERT_LE(8 + header_bytes, file.size());
      EXPECT_EQ((8 + header_bytes) % 8, 0u) << "the data starts 8-byte aligned";
      const std::string header_text = file.substr(8, header_bytes);
      EXPECT_EQ(header_text.front(), '{');
      const json::Value header = json::parse(header_text, "header");  // trailing spaces are allowed JSON whitespace
      uint64_t expected_begin = 0;
      int tensors = 0;
      for (const auto& [name, entry] : header.members()) {
        if (name == "__metadata__") {
          for (const auto& [key, value] : entry.members()) EXPECT_EQ(value.kind(), json::Value::Kind::string) << key;
          EXPECT_EQ(entry.at("switchyard_step", "m").as_string("m"), "2");
          continue;
        }
        ++tensors;
        EXPECT_EQ(entry.at("dtype", name).as_string(name), bf16 ? "BF16" : "F32");
        const std::vector<json::Value>& offsets = entry.at("data_offsets", name).as_array(name);
        ASSERT_EQ(offsets.size(), 2u);
        const uint64_t begin = offsets[0].as_uint64(name), end = offsets[1].as_uint64(name);
        EXPECT_EQ(begin, expected_begin) << name << ": tensors follow each other without gaps";
        int64_t count = 1;
        std::vector<int64_t> shape;
        for (const json::Value& dim : entry.at("shape", name).as_array(name)) shape.push_back(dim.as_int64(name));
        for (int64_t dim : shape) count *= dim;
        EXPECT_EQ(end - begin, uint64_t(count) * (bf16 ? 2 : 4)) << name;
        expected_begin = end;
        // Master weights match the model (merged: the whole [E, ...] parameter; else one expert).
        if (name.rfind("optimizer.", 0) == 0) continue;
        std::string parameter = name;
        int64_t expert = -1;
        const size_t marker = name.find(".experts.");
        if (marker != std::string::npos) {
          const size_t id_end = name.find('.', marker + 9);
          expert = std::stoll(name.substr(marker + 9, id_end - marker - 9));
          parameter = name.substr(0, marker) + name.substr(id_end);
        }
        const int index = layout.find(parameter);
        ASSERT_GE(index, 0) << name;
        const std::vector<double> values = run.trainer->parameters().master_values(kCpu, index);
        const size_t first = expert >= 0 ? size_t(expert) * size_t(count) : 0;
        ASSERT_LE(first + size_t(count), values.size()) << name;
        const char* data = file.data() + 8 + header_bytes + begin;
        for (int64_t element = 0; element < count; element += 7) {
          float stored;
          if (bf16) {
            uint16_t bits;
            std::memcpy(&bits, data + 2 * element, 2);
            stored = bits_float(uint32_t(bits) << 16);
            EXPECT_EQ(stored, round_to(DType::bf16, float(values[first + size_t(element)]))) << name;
          } else {
            std::memcpy(&stored, data + 4 * element, 4);
            EXPECT_EQ(stored, float(values[first + size_t(element)])) << name;
          }
        }
      }
      EXPECT_EQ(8 + header_bytes + expected_begin, file.size()) << "the data ends with the file";
      EXPECT_EQ(tensors, result.tensors);
      const size_t masters = merge ? size_t(layout.size()) : read_checkpoint_manifest(path).tensors.size() / 3;
      EXPECT_EQ(size_t(tensors), merge ? 3 * masters : masters);
    }
  }
}

}  // namespace
