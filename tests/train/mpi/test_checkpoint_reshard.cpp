// Checkpoints across world sizes and ep_size (run under mpirun -np 2 and -np 4, CPU backend).
//
// Each scenario trains on the first S ranks with ep_size E_s, saves, then loads on the first L
// ranks with ep_size E_l (a 2-rank job saving for 4 ranks and back, experts re-split, expert
// data-parallel replicas appearing and disappearing). Checked after loading:
//   - the model computes the same logits on a fixed batch as before saving (relative 1e-5: the
//     expert-parallel exchange only reorders sums);
//   - saving again from the new layout reproduces every tensor's checksum of the original
//     checkpoint (masters and both AdamW moments are bit-identical, whatever the sharding), and
//     the step, tokens and data position carry over;
//   - training continues (a finite loss).
// Scenarios with aux-loss-free balancing carry a router bias per MoE block (dense, replicated,
// moved after every step by the loads summed over all ranks, so equal on every rank): it reshards
// like any dense tensor. They also train with the global-batch loss (loads summed over all ranks in
// every micro-step).
// And: a corrupt expert tensor that only one rank reads makes every rank fail with the same
// bad-input message for an explicit path, and makes every rank skip to the older checkpoint for
// resume auto.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "src/comm/comm_factory.h"
#include "src/core/error.h"
#include "src/train/checkpoint.h"
#include "src/train/trainer.h"
#include "tests/support/comm_test_support.h"

using namespace switchyard;
using namespace switchyard::comm_test;
namespace fs = std::filesystem;

namespace {

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// The parallel groups of the first `ranks` world ranks with `ep_size` (the layout of
// create_parallel_groups on a world of that size). Collective over MPI_COMM_WORLD.
struct SubWorld {
  bool member = false;
  int rank = 0, size = 0;
  ParallelGroups groups;
};

// Runs one rank's part of a phase: an exception (a failing load, say) becomes a test failure
// here instead of leaving the test body early, so every rank still reaches the same barriers and
// a failure never turns into a hang. (Assertions inside `body` return from `body` only.)
void member_part(const std::function<void()>& body) {
  try {
    body();
  } catch (const std::exception& error) {
    ADD_FAILURE() << "rank " << world_rank() << ": " << error.what();
  }
}

SubWorld make_sub_world(int ranks, int ep_size) {
  SubWorld sub;
  const int rank = world_rank();
  MPI_Comm world = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, rank < ranks ? 0 : MPI_UNDEFINED, rank, &world));
  if (world == MPI_COMM_NULL) return sub;
  sub.member = true;
  sub.rank = rank;
  sub.size = ranks;
  MPI_Comm expert_parallel = MPI_COMM_NULL, expert_data_parallel = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_split(world, rank / ep_size, rank, &expert_parallel));
  MPI_CHECK(MPI_Comm_split(world, rank % ep_size, rank, &expert_data_parallel));
  sub.groups.ep_size = ep_size;
  sub.groups.world = create_communicator(DeviceKind::cpu, world, "world", kTestTimeoutSeconds);
  sub.groups.expert_parallel = create_communicator(DeviceKind::cpu, expert_parallel, "expert_parallel",
                                                   kTestTimeoutSeconds);
  sub.groups.expert_data_parallel = create_communicator(DeviceKind::cpu, expert_data_parallel,
                                                        "expert_data_parallel", kTestTimeoutSeconds);
  return sub;
}

// A directory every rank names the same, with token files written by rank 0.
class CheckpointReshardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = fs::temp_directory_path() / ("switchyard_ckpt_mpi_" + std::to_string(shared_seed() % 1000000007) + "_" +
                                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    if (world_rank() == 0) {
      fs::remove_all(base_);
      fs::create_directories(base_);
      std::mt19937_64 generator(shared_seed());
      for (const char* split : {"train", "val"}) {
        std::vector<uint32_t> tokens;
        while (tokens.size() < 30000u) {
          const int length = 2 + int(generator() % 5);
          for (int letter = 0; letter < length; ++letter) tokens.push_back(uint32_t('a' + generator() % 10));
          tokens.push_back(' ');
        }
        write_token_file((base_ / (std::string(split) + ".bin")).string(), tokens, 256);
      }
    }
    MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
  }
  void TearDown() override {
    MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
    if (world_rank() == 0) fs::remove_all(base_);
  }

  // shared_experts: DeepSeek-V3-style blocks (block 0 dense, blocks 1 and 2 MoE with two shared
  // experts each, their dense weights replicated on every rank) instead of block 1 alone MoE.
  // router_bias: moe.bias_update_rate > 0 (a router bias per MoE block), with sigmoid scores and the
  // global-batch loss.
  Config config(int ep_size, const std::string& checkpoint_dir, bool shared_experts = false,
                bool router_bias = false) const {
    const std::string yaml =
        "model: {d_model: 16, n_layers: 2, n_heads: 2, seq_len: 16, d_ff: 32, moe_every: 2, compute_dtype: fp32}\n"
        "moe: {num_experts: 8, top_k: 2, k_min: 2, expert_d_ff: 12, activation: swiglu, segment_alignment: 4,"
        " capacity_factor: 1.5, eval_capacity_factor: 16.0, jitter_eps: 0.05}\n"
        "parallel: {deterministic: true, ep_size: " + std::to_string(ep_size) + "}\n"
        "optimizer: {lr: 0.01, warmup_steps: 2}\n"
        "training: {steps: 10, micro_batch_size: 2, seed: 11, eval_every: 0, eval_batches: 1, device: cpu}\n"
        "data: {path: " + (base_ / "train.bin").string() + ", val_path: " + (base_ / "val.bin").string() + "}\n"
        "checkpoint: {dir: " + checkpoint_dir + ", every: 0, keep_last: 0}\n"
        "logging: {run_dir: " + (base_ / "run").string() + "}\n";
    std::vector<std::string> overrides;
    if (shared_experts)
      overrides = {"model.n_layers=3", "model.moe_every=1", "model.dense_first_blocks=1", "moe.num_shared_experts=2",
                   "moe.shared_expert_d_ff=8"};
    if (router_bias)
      overrides.insert(overrides.end(),
                       {"moe.bias_update_rate=0.01", "moe.score_function=sigmoid", "moe.global_aux_loss_weight=0.01"});
    return parse_config_string(yaml, "reshard.yaml", overrides);
  }

  struct Run {
    TokenFile train, val;
    std::ostringstream log;
    std::unique_ptr<Trainer> trainer;
    Run(const Config& config, const SubWorld& sub)
        : train(config.data.path, uint32_t(config.model.vocab_size)),
          val(config.data.val_path, uint32_t(config.model.vocab_size)) {
      TrainerOptions options;
      options.world_rank = sub.rank;
      options.world_size = sub.size;
      options.groups = sub.groups;
      options.log = &log;
      trainer = std::make_unique<Trainer>(config, train, &val, options);
    }
  };

  // Logits of a fixed batch (the same tokens on every rank), on every member of the group.
  static std::vector<float> fixed_logits(Trainer& trainer) {
    const int64_t batch = 2, seq_len = 16, count = batch * seq_len;
    std::vector<int32_t> tokens(static_cast<size_t>(count));
    for (int64_t index = 0; index < count; ++index) tokens[size_t(index)] = int32_t('a' + (index * 7 + 3) % 10);
    Buffer device_tokens(DeviceKind::cpu, size_t(count) * sizeof(int32_t));
    std::copy(tokens.begin(), tokens.end(), device_tokens.as<int32_t>());
    const Tensor input = device_tokens.view(DType::i32, {count});
    const Tensor& logits =
        trainer.model().forward_logits(trainer.context(), trainer.parameters(), input, batch, seq_len);
    return std::vector<float>(logits.as<float>(), logits.as<float>() + logits.numel());
  }

  fs::path base_;
};

struct Reshard {
  int save_ranks, save_ep, load_ranks, load_ep;
  bool shared_experts = false;
  bool router_bias = false;
};

void PrintTo(const Reshard& r, std::ostream* os) {
  *os << r.save_ranks << "x ep" << r.save_ep << " -> " << r.load_ranks << "x ep" << r.load_ep
      << (r.shared_experts ? " (shared experts)" : "") << (r.router_bias ? " (router bias)" : "");
}

class CheckpointReshard : public CheckpointReshardTest, public ::testing::WithParamInterface<Reshard> {};

TEST_P(CheckpointReshard, SameOutputsAndBitIdenticalStateAfterLoading) {
  const Reshard scenario = GetParam();
  if (std::max(scenario.save_ranks, scenario.load_ranks) > world_size())
    GTEST_SKIP() << "needs " << std::max(scenario.save_ranks, scenario.load_ranks) << " ranks";
  const std::string save_dir = (base_ / "save").string(), load_dir = (base_ / "load").string();
  const int rank = world_rank();

  // Save on the first save_ranks ranks.
  std::vector<float> reference;
  TrainingProgress saved{};
  {
    const SubWorld sub = make_sub_world(scenario.save_ranks, scenario.save_ep);
    if (sub.member) member_part([&] {
      Run run(config(scenario.save_ep, save_dir, scenario.shared_experts, scenario.router_bias), sub);
      for (int step = 0; step < 3; ++step) EXPECT_TRUE(std::isfinite(run.trainer->train_step().loss));
      reference = fixed_logits(*run.trainer);
      saved = run.trainer->progress();
      if (scenario.router_bias) {
        const int bias = run.trainer->parameters().layout().find("blocks.1.moe.router_bias");
        ASSERT_GE(bias, 0);
        const std::vector<double> values = run.trainer->parameters().master_values(run.trainer->context(), bias);
        EXPECT_NE(values, std::vector<double>(values.size(), 0.0)) << "the router bias moved before the save";
        std::vector<double> every(values.size() * size_t(sub.size));
        sub.groups.world->all_gather(values.data(), every.data(), int64_t(values.size()), DType::f64);
        for (int other = 0; other < sub.size; ++other)
          EXPECT_EQ(std::vector<double>(every.begin() + other * int64_t(values.size()),
                                        every.begin() + (other + 1) * int64_t(values.size())),
                    values)
              << "rank " << other << "'s router bias differs from rank " << sub.rank << "'s";
      }
      run.trainer->save_checkpoint();
    });
  }
  int64_t reference_size = int64_t(reference.size());
  MPI_CHECK(MPI_Bcast(&reference_size, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
  reference.resize(size_t(reference_size));
  MPI_CHECK(MPI_Bcast(reference.data(), int(reference_size), MPI_FLOAT, 0, MPI_COMM_WORLD));
  MPI_CHECK(MPI_Bcast(&saved.tokens_seen, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
  MPI_CHECK(MPI_Bcast(&saved.train_data.samples_consumed, 1, MPI_INT64_T, 0, MPI_COMM_WORLD));
  const std::string checkpoint = (fs::path(save_dir) / checkpoint_step_name(3)).string();

  // Load on the first load_ranks ranks with another ep_size.
  {
    const SubWorld sub = make_sub_world(scenario.load_ranks, scenario.load_ep);
    if (sub.member) member_part([&] {
      Run run(config(scenario.load_ep, load_dir, scenario.shared_experts, scenario.router_bias), sub);
      ASSERT_TRUE(run.trainer->resume(checkpoint)) << run.log.str();  // agreed: the same on every rank
      EXPECT_EQ(run.trainer->step(), 3);
      EXPECT_EQ(run.trainer->tokens_seen(), saved.tokens_seen);
      EXPECT_EQ(run.trainer->progress().train_data.samples_consumed, saved.train_data.samples_consumed);
      const std::vector<float> logits = fixed_logits(*run.trainer);
      ASSERT_EQ(logits.size(), reference.size());  // the same on every rank
      double worst = 0, scale = 0;
      for (size_t index = 0; index < logits.size(); ++index) {
        worst = std::max(worst, std::fabs(double(logits[index]) - double(reference[index])));
        scale = std::max(scale, std::fabs(double(reference[index])));
      }
      EXPECT_LE(worst, 1e-5 * scale) << "rank " << rank << ": logits differ by " << worst << " (largest " << scale
                                     << ")";
      run.trainer->save_checkpoint();
      if (sub.rank == 0) {
        const CheckpointManifest original = read_checkpoint_manifest(checkpoint);
        const CheckpointManifest again = read_checkpoint_manifest((fs::path(load_dir) / checkpoint_step_name(3)).string());
        EXPECT_EQ(again.world_size, scenario.load_ranks);
        EXPECT_EQ(again.ep_size, scenario.load_ep);
        EXPECT_EQ(again.tensors.size(), original.tensors.size());
        for (const CheckpointTensor& tensor : original.tensors) {
          const CheckpointTensor* other = again.find(tensor.name);
          EXPECT_NE(other, nullptr) << tensor.name;
          if (other) EXPECT_EQ(other->checksum, tensor.checksum) << tensor.name << " changed through the reshard";
        }
        EXPECT_EQ(again.optimizer_updates, original.optimizer_updates);
        EXPECT_EQ(again.rng.jitter_micro_steps, original.rng.jitter_micro_steps);
      }
      EXPECT_TRUE(std::isfinite(run.trainer->train_step().loss));
    });
  }
  MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
}

INSTANTIATE_TEST_SUITE_P(Ranks, CheckpointReshard,
                         ::testing::Values(Reshard{2, 2, 1, 1}, Reshard{2, 2, 2, 1}, Reshard{1, 1, 2, 2},
                                           Reshard{2, 2, 4, 4}, Reshard{2, 2, 4, 2}, Reshard{4, 4, 2, 2},
                                           Reshard{4, 2, 2, 1}, Reshard{4, 4, 1, 1}, Reshard{2, 2, 1, 1, true},
                                           Reshard{1, 1, 2, 2, true}, Reshard{4, 4, 1, 1, true},
                                           Reshard{2, 2, 1, 1, false, true}, Reshard{1, 1, 2, 2, false, true},
                                           Reshard{4, 4, 2, 1, false, true}, Reshard{2, 1, 4, 4, true, true}));

TEST_F(CheckpointReshardTest, CorruptExpertReadByOneRankFailsOrIsSkippedEverywhere) {
  const int ranks = world_size();
  const std::string dir = (base_ / "corrupt").string();
  const SubWorld sub = make_sub_world(ranks, ranks);
  const Config run_config = config(ranks, dir);
  std::string older, newer;
  member_part([&] {
    Run run(run_config, sub);
    run.trainer->train_step();
    older = run.trainer->save_checkpoint().path;
    run.trainer->train_step();
    newer = run.trainer->save_checkpoint().path;
  });
  ASSERT_FALSE(newer.empty());  // every rank failed alike (the save is collective)
  // Flip a byte of the last expert's weights: only the last rank reads them.
  const std::string victim = expert_tensor_name("blocks.1.moe.w2", 7);
  const CheckpointManifest manifest = read_checkpoint_manifest(newer);
  const CheckpointTensor* tensor = manifest.find(victim);
  ASSERT_NE(tensor, nullptr);
  const fs::path shard = fs::path(newer) / tensor->file;
  if (world_rank() == 0) {
    std::fstream file(shard, std::ios::in | std::ios::out | std::ios::binary);
    char byte = 0;
    file.seekg(std::streamoff(tensor->offset + tensor->bytes / 2));
    file.read(&byte, 1);
    byte = char(byte ^ 0x40);
    file.seekp(std::streamoff(tensor->offset + tensor->bytes / 2));
    file.write(&byte, 1);
  }
  MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));

  {
    Run run(run_config, sub);
    try {
      run.trainer->resume(newer);
      ADD_FAILURE() << "rank " << world_rank() << " loaded a checkpoint that is corrupt on rank " << ranks - 1;
    } catch (const Error& error) {
      EXPECT_EQ(error.exit_code(), kExitBadInput);
      EXPECT_NE(error.message().find("checkpoint shard " + shard.string() + " is corrupt: tensor " + victim),
                std::string::npos)
          << "rank " << world_rank() << ": " << error.message();
    }
  }
  member_part([&] {
    Run run(run_config, sub);
    EXPECT_TRUE(run.trainer->resume("auto"));
    EXPECT_EQ(run.trainer->resumed_from(), older) << "rank " << world_rank();
    EXPECT_EQ(run.trainer->step(), 1);
    if (world_rank() == 0) EXPECT_NE(run.log.str().find("skipping " + newer), std::string::npos) << run.log.str();
  });
}

}  // namespace
