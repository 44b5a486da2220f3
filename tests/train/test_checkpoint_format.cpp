// The checkpoint format without a trainer: XXH64 and FNV-1a 64, tensor and directory names, the
// manifest's JSON round trip and its validation, the save plan (every tensor exactly once, experts
// at their owners, aligned non-overlapping offsets, balanced dense bytes, the same plan on every
// rank) and pruning. The JSON module itself is tested in test_json.cpp.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/core/json.h"
#include "src/model/transformer.h"
#include "src/train/checkpoint.h"
#include "src/train/checkpoint_format.h"
#include "tests/support/expect_error.h"

using switchyard::testing::expect_bad_input;

using namespace switchyard;

namespace {

std::mt19937_64 fresh_generator() { return std::mt19937_64(std::random_device{}()); }


TEST(CheckpointChecksum, Xxh64MatchesTheReferenceVectors) {
  EXPECT_EQ(xxh64("", 0), 0xEF46DB3751D8E999ull);
  EXPECT_EQ(xxh64("a", 1), 0xD24EC4F1A98C6E5Bull);
  EXPECT_EQ(xxh64("abc", 3), 0x44BC2CF5AD770999ull);
  // xxHash's own sanity check (xxhsum.c): a 101-byte buffer from a multiplicative generator, so
  // 32-byte stripes, the 8-, 4- and 1-byte tails and a non-zero seed are all exercised.
  uint8_t sanity[101];
  uint32_t generator = 2654435761u;
  for (uint8_t& byte : sanity) {
    byte = uint8_t(generator >> 24);
    generator *= generator;
  }
  const uint64_t prime = 2654435761u;
  EXPECT_EQ(xxh64(nullptr, 0, prime), 0xAC75FDA2929B17EFull);
  EXPECT_EQ(xxh64(sanity, 1), 0x4FCE394CC88952D8ull);
  EXPECT_EQ(xxh64(sanity, 1, prime), 0x739840CB819FA723ull);
  EXPECT_EQ(xxh64(sanity, 14), 0xCFFA8DB881BC3A3Dull);
  EXPECT_EQ(xxh64(sanity, 14, prime), 0x5B9611585EFCC9CBull);
  EXPECT_EQ(xxh64(sanity, 101), 0x0EAB543384F878ADull);
  EXPECT_EQ(xxh64(sanity, 101, prime), 0xCAA65939306F1E21ull);

  std::mt19937_64 generator64 = fresh_generator();
  std::vector<uint8_t> data(10000 + generator64() % 100);
  for (uint8_t& byte : data) byte = uint8_t(generator64());
  const uint64_t whole = xxh64(data.data(), data.size());
  std::vector<uint8_t> shifted(data.size() + 3);
  std::memcpy(shifted.data() + 3, data.data(), data.size());
  EXPECT_EQ(xxh64(shifted.data() + 3, data.size()), whole) << "alignment does not matter";
  data[generator64() % data.size()] ^= uint8_t(1u << (generator64() % 8));
  EXPECT_NE(xxh64(data.data(), data.size()), whole) << "one flipped bit changes the checksum";
  uint64_t parsed = 0;
  EXPECT_TRUE(parse_checksum_hex(checksum_hex(whole), &parsed));
  EXPECT_EQ(parsed, whole);
  EXPECT_FALSE(parse_checksum_hex("0123456789ABCDEF", &parsed)) << "lower case only";
  EXPECT_FALSE(parse_checksum_hex("0123", &parsed));
}

TEST(CheckpointChecksum, Fnv1a64MatchesTheReferenceVectorsAndIsIncremental) {
  EXPECT_EQ(fnv1a64("", 0), 0xcbf29ce484222325ull);
  EXPECT_EQ(fnv1a64("a", 1), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(fnv1a64("foobar", 6), 0x85944171f73967e8ull);
  std::mt19937_64 generator = fresh_generator();
  std::vector<uint8_t> data(5000);
  for (uint8_t& byte : data) byte = uint8_t(generator());
  Fnv1a64 pieces;
  for (size_t start = 0; start < data.size();) {
    const size_t length = std::min<size_t>(data.size() - start, generator() % 997);
    pieces.update(data.data() + start, length);
    start += length;
  }
  EXPECT_EQ(pieces.value(), fnv1a64(data.data(), data.size()));
}

TEST(CheckpointNames, AreGlobalAndParseBack) {
  EXPECT_EQ(expert_tensor_name("blocks.1.moe.w1", 3), "blocks.1.moe.experts.3.w1");
  EXPECT_EQ(expert_tensor_name("blocks.1.moe.w1", -1), "blocks.1.moe.w1");
  EXPECT_EQ(checkpoint_tensor_name(TensorState::exp_avg_sq, "blocks.1.moe.w2", 0),
            "optimizer.exp_avg_sq.blocks.1.moe.experts.0.w2");
  EXPECT_EQ(checkpoint_tensor_name(TensorState::master, "embedding.token", -1), "embedding.token");
  int64_t step = -1;
  EXPECT_TRUE(parse_checkpoint_step_name(checkpoint_step_name(123456789012), &step));
  EXPECT_EQ(step, 123456789012);
  EXPECT_EQ(checkpoint_step_name(42), "step-000000042");
  for (const char* bad : {"step-", "step-12a", "steps-12", ".step-000000001.tmp", "step--1"})
    EXPECT_FALSE(parse_checkpoint_step_name(bad, &step)) << bad;
  EXPECT_EQ(shard_file_name(7), "shard-00007.bin");

  // Another run's step: the run id as a suffix; temporary directories carry it too.
  const std::string run_id = "0123456789abcdef";
  std::string parsed_id = "unset";
  EXPECT_EQ(checkpoint_step_name(42, run_id), "step-000000042-0123456789abcdef");
  EXPECT_TRUE(parse_checkpoint_step_name(checkpoint_step_name(42, run_id), &step, &parsed_id));
  EXPECT_EQ(step, 42);
  EXPECT_EQ(parsed_id, run_id);
  EXPECT_TRUE(parse_checkpoint_step_name(checkpoint_step_name(43), &step, &parsed_id));
  EXPECT_EQ(step, 43);
  EXPECT_EQ(parsed_id, "");
  for (const char* bad : {"step-000000042-0123456789ABCDEF", "step-000000042-0123", "step-000000042-",
                          "step-000000042-0123456789abcdef-1"})
    EXPECT_FALSE(parse_checkpoint_step_name(bad, &step)) << bad;
  EXPECT_EQ(checkpoint_temp_name(7, run_id), ".step-000000007.0123456789abcdef.tmp");
  EXPECT_TRUE(parse_checkpoint_temp_name(checkpoint_temp_name(7, run_id), &step, &parsed_id));
  EXPECT_EQ(step, 7);
  EXPECT_EQ(parsed_id, run_id);
  EXPECT_TRUE(parse_checkpoint_temp_name(".step-000000008.tmp", &step, &parsed_id)) << "an earlier version's";
  EXPECT_EQ(step, 8);
  EXPECT_EQ(parsed_id, "");
  for (const char* bad : {"step-000000008.tmp", ".step-000000008.x.tmp", ".step-000000008-0123456789abcdef.tmp"})
    EXPECT_FALSE(parse_checkpoint_temp_name(bad, &step, &parsed_id)) << bad;
}

ParameterLayout tiny_layout(int ep_size, int ep_rank, int experts = 8) {
  ModelConfig model;
  model.vocab_size = 50;
  model.d_model = 16;
  model.n_layers = 4;
  model.n_heads = 2;
  model.seq_len = 8;
  model.d_ff = 24;
  model.moe_every = 2;
  model.compute_dtype = DType::f32;
  MoeConfig moe;
  moe.num_experts = experts;
  moe.top_k = 1;
  moe.k_min = 1;
  moe.expert_d_ff = 12;
  return Transformer::build_layout(model, moe, ep_size, ep_rank);
}

TEST(CheckpointPlan, CoversEveryTensorOnceWithExpertsAtTheirOwners) {
  for (const auto& [world, ep] : std::vector<std::pair<int, int>>{{1, 1}, {2, 2}, {4, 2}, {4, 4}, {8, 8}, {8, 2}}) {
    SCOPED_TRACE("world " + std::to_string(world) + ", ep_size " + std::to_string(ep));
    const ParameterLayout layout = tiny_layout(ep, 0);
    std::vector<CheckpointShardFile> files;
    const std::vector<CheckpointTensor> plan = plan_checkpoint(layout, DType::f32, world, ep, &files);
    // Every rank's layout gives the same plan.
    for (int rank = 1; rank < ep; ++rank) {
      std::vector<CheckpointShardFile> other_files;
      const std::vector<CheckpointTensor> other = plan_checkpoint(tiny_layout(ep, rank), DType::f32, world, ep,
                                                                  &other_files);
      ASSERT_EQ(other.size(), plan.size());
      for (size_t index = 0; index < plan.size(); ++index) {
        EXPECT_EQ(other[index].name, plan[index].name);
        EXPECT_EQ(other[index].owner, plan[index].owner);
        EXPECT_EQ(other[index].offset, plan[index].offset);
      }
    }
    std::set<std::string> names;
    std::map<std::string, std::vector<std::pair<uint64_t, uint64_t>>> ranges;
    std::vector<uint64_t> dense_bytes(size_t(world), 0);
    uint64_t largest_dense = 0;
    for (const CheckpointTensor& tensor : plan) {
      EXPECT_TRUE(names.insert(tensor.name).second) << tensor.name << " twice";
      EXPECT_EQ(tensor.file, shard_file_name(tensor.owner));
      EXPECT_EQ(tensor.offset % kShardAlignment, 0u);
      EXPECT_GE(tensor.offset, kShardHeaderBytes);
      ranges[tensor.file].emplace_back(tensor.offset, tensor.offset + tensor.bytes);
      const ParameterSpec& spec = layout.spec(layout.find(tensor.parameter));
      if (spec.is_sharded()) {
        EXPECT_EQ(tensor.owner, int(tensor.expert / (spec.expert_total / ep))) << tensor.name;
        EXPECT_LT(tensor.owner, ep) << "experts are written by expert-data-parallel replica 0";
      } else {
        dense_bytes[size_t(tensor.owner)] += tensor.bytes;
        largest_dense = std::max(largest_dense, tensor.bytes);
      }
    }
    size_t expected = 0;
    for (const ParameterSpec& spec : layout.specs()) expected += 3 * size_t(spec.is_sharded() ? spec.expert_total : 1);
    EXPECT_EQ(plan.size(), expected);
    for (auto& [file, list] : ranges) {
      std::sort(list.begin(), list.end());
      for (size_t index = 1; index < list.size(); ++index) EXPECT_LE(list[index - 1].second, list[index].first) << file;
      const auto listed = std::find_if(files.begin(), files.end(),
                                       [&](const CheckpointShardFile& entry) { return entry.name == file; });
      ASSERT_NE(listed, files.end()) << file;
      EXPECT_EQ(listed->bytes, list.back().second) << "the file ends with its last tensor";
    }
    EXPECT_EQ(files.size(), ranges.size());
    if (world > ep) {  // ranks without experts take the dense tensors: every rank writes something
      EXPECT_EQ(int(files.size()), world);
    }
    (void)largest_dense;
  }
}

TEST(CheckpointManifestJson, RoundTripsAndValidates) {
  std::mt19937_64 generator = fresh_generator();
  std::vector<CheckpointShardFile> files;
  CheckpointManifest manifest;
  manifest.tensors = plan_checkpoint(tiny_layout(2, 0), DType::f32, 4, 2, &files);
  manifest.files = files;
  for (CheckpointTensor& tensor : manifest.tensors) tensor.checksum = generator();
  manifest.step = int64_t(generator() % 100000);
  manifest.tokens_seen = int64_t(generator() >> 2);
  manifest.world_size = 4;
  manifest.ep_size = 2;
  manifest.config_yaml = "model:\n  d_model: 16   # \"quoted\"\n";
  manifest.train_data = {int64_t(generator() % 9999), generator(), int64_t(generator() % 99999), 8};
  manifest.rng = {generator(), int64_t(generator() % 12345)};
  manifest.optimizer_updates = int64_t(generator() % 777);
  manifest.loss_scaling = true;
  manifest.loss_scaler = {std::ldexp(1.0, int(generator() % 40) - 20), 3, 1, 9};
  const std::string text = manifest_to_json(manifest).dump(1);
  const CheckpointManifest back = manifest_from_json(json::parse(text, "m.json"), "m.json");
  EXPECT_EQ(back.step, manifest.step);
  EXPECT_EQ(back.tokens_seen, manifest.tokens_seen);
  EXPECT_EQ(back.config_yaml, manifest.config_yaml);
  EXPECT_EQ(back.train_data.samples_consumed, manifest.train_data.samples_consumed);
  EXPECT_EQ(back.train_data.seed, manifest.train_data.seed);
  EXPECT_EQ(back.rng.seed, manifest.rng.seed);
  EXPECT_EQ(back.rng.jitter_micro_steps, manifest.rng.jitter_micro_steps);
  EXPECT_EQ(back.optimizer_updates, manifest.optimizer_updates);
  EXPECT_EQ(back.loss_scaler.scale, manifest.loss_scaler.scale);
  EXPECT_EQ(back.loss_scaler.total_skips, 9);
  ASSERT_EQ(back.tensors.size(), manifest.tensors.size());
  for (size_t index = 0; index < back.tensors.size(); ++index) {
    EXPECT_EQ(back.tensors[index].name, manifest.tensors[index].name);
    EXPECT_EQ(back.tensors[index].checksum, manifest.tensors[index].checksum);
    EXPECT_EQ(back.tensors[index].shape, manifest.tensors[index].shape);
    EXPECT_EQ(back.tensors[index].offset, manifest.tensors[index].offset);
  }

  // Damaged manifests: each edit of one field must be caught, naming the problem.
  auto edited = [&](const std::string& from, const std::string& to) {
    std::string copy = text;
    const size_t at = copy.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return copy.replace(at, from.size(), to);
  };
  const CheckpointTensor& first = manifest.tensors.front();
  expect_bad_input([&] { manifest_from_json(json::parse(edited("\"format_version\": 1", "\"format_version\": 9"), "m"), "m"); },
                   "format version 9");
  expect_bad_input([&] { manifest_from_json(json::parse(edited("\"dtype\": \"F32\"", "\"dtype\": \"Q7\""), "m"), "m"); },
                   "unknown dtype");
  expect_bad_input([&] {
    manifest_from_json(json::parse(edited("\"bytes\": " + std::to_string(first.bytes), "\"bytes\": 12"), "m"), "m");
  }, "do not match its dtype and shape");
  expect_bad_input([&] {
    manifest_from_json(json::parse(edited("\"offset\": " + std::to_string(first.offset), "\"offset\": 999999999"), "m"), "m");
  }, "lie outside");
  expect_bad_input([&] {
    manifest_from_json(json::parse(edited("\"name\": \"" + first.name + "\"", "\"name\": \"other\""), "m"), "m");
  }, "does not match parameter");
  expect_bad_input([&] {
    manifest_from_json(json::parse(edited("\"name\": \"" + files.front().name + "\"", "\"name\": \"../escape\""), "m"), "m");
  }, "bad or repeated file name");
}

class PruneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::temp_directory_path() / ("switchyard_prune_" + std::to_string(::getpid()));
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  // A step directory whose manifest names `run_id` ("": a manifest of an earlier version, none).
  void make(const std::string& name, bool complete, const std::string& run_id = kRun) {
    std::filesystem::create_directories(root_ / name);
    std::ofstream(root_ / name / "manifest.json") << (run_id.empty() ? "{}" : "{\"run_id\": \"" + run_id + "\"}");
    if (complete) std::ofstream(root_ / name / kCheckpointCompleteFile) << "x";
  }
  static constexpr const char* kRun = "0123456789abcdef";    // the pruning run
  static constexpr const char* kOther = "fedcba9876543210";  // another run sharing the folder
  bool exists(const std::string& name) const { return std::filesystem::exists(root_ / name); }
  std::filesystem::path root_;
};

TEST_F(PruneTest, KeepsTheNewestCompleteAndLeavesLaterStepsAlone) {
  make(checkpoint_step_name(1), true);
  make(checkpoint_step_name(2), false);  // a crash between rename and marker
  make(checkpoint_step_name(3), true);
  make(checkpoint_step_name(4), true);
  make(checkpoint_step_name(9), false);  // an abandoned run's later step: not ours to judge
  make(checkpoint_step_name(10), true);
  make(checkpoint_temp_name(5, kRun), false);  // an interrupted save
  make(".trash-step-000000007-123", false);
  make("notes", false);                  // not a checkpoint: untouched
  const std::vector<std::string> removed = prune_checkpoints(root_.string(), 2, 4, kRun);
  EXPECT_FALSE(exists(checkpoint_step_name(1)));
  EXPECT_FALSE(exists(checkpoint_step_name(2)));
  EXPECT_TRUE(exists(checkpoint_step_name(3)));
  EXPECT_TRUE(exists(checkpoint_step_name(4)));
  EXPECT_TRUE(exists(checkpoint_step_name(9)));
  EXPECT_TRUE(exists(checkpoint_step_name(10)));
  EXPECT_FALSE(exists(checkpoint_temp_name(5, kRun)));
  EXPECT_FALSE(exists(".trash-step-000000007-123"));
  EXPECT_TRUE(exists("notes"));
  EXPECT_EQ(removed.size(), 4u);
  for (const auto& entry : std::filesystem::directory_iterator(root_))
    EXPECT_NE(entry.path().filename().string().rfind(".trash-", 0), 0u) << "nothing left half-removed";
  // keep_last 0 keeps every complete checkpoint.
  make(checkpoint_step_name(1), true);
  prune_checkpoints(root_.string(), 0, 4, kRun);
  EXPECT_TRUE(exists(checkpoint_step_name(1)));
  EXPECT_TRUE(prune_checkpoints((root_ / "absent").string(), 1, 4, kRun).empty());
}

TEST_F(PruneTest, RemovesOnlyWhatThisRunWrote) {
  make(checkpoint_step_name(1), true, kOther);
  make(checkpoint_step_name(2), true, "");     // an earlier version's: no run id
  make(checkpoint_step_name(3), false, kOther);  // another run's interrupted save
  make(checkpoint_step_name(3, kRun), true);     // ours, named apart from the other run's step 3
  make(checkpoint_step_name(4), true);
  make(checkpoint_step_name(5), false);          // ours, interrupted
  make(checkpoint_step_name(6), true);
  make(checkpoint_step_name(6, kOther), true, kOther);
  make(checkpoint_temp_name(7, kOther), false);  // another run's save in progress
  make(checkpoint_temp_name(7, kRun), false);
  make(".step-000000008.tmp", false);            // an earlier version's leftover
  make(std::string(".trash-") + kOther + "-step-000000009-12", false);
  make(std::string(".trash-") + kRun + "-step-000000009-12", false);
  const std::vector<std::string> removed = prune_checkpoints(root_.string(), 1, 6, kRun);
  for (const std::string& gone : {checkpoint_step_name(3, kRun), checkpoint_step_name(4), checkpoint_step_name(5),
                                  checkpoint_temp_name(7, kRun), std::string(".step-000000008.tmp"),
                                  std::string(".trash-") + kRun + "-step-000000009-12"})
    EXPECT_FALSE(exists(gone)) << gone;
  for (const std::string& kept : {checkpoint_step_name(1), checkpoint_step_name(2), checkpoint_step_name(3),
                                  checkpoint_step_name(6), checkpoint_step_name(6, kOther),
                                  checkpoint_temp_name(7, kOther), std::string(".trash-") + kOther + "-step-000000009-12"})
    EXPECT_TRUE(exists(kept)) << kept;
  EXPECT_EQ(removed.size(), 6u);
  // With keep_last 1 another run's newest would be its step 6: still untouched by this run's saves.
  prune_checkpoints(root_.string(), 1, 7, kRun);
  EXPECT_TRUE(exists(checkpoint_step_name(6, kOther)));
  EXPECT_TRUE(exists(checkpoint_step_name(1)));
}

}  // namespace
