// The data loader: windows and targets come from the file, every epoch is a permutation of the
// windows, ranks get disjoint samples whose union is what one rank would read, the stream is a
// function of the seed, and the position saves and restores exactly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "src/core/error.h"
#include "src/train/data_loader.h"
#include "src/train/token_file.h"

using namespace switchyard;

namespace {

class DataLoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    directory_ = std::filesystem::temp_directory_path() /
                 ("switchyard_data_loader_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
                  "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(directory_);
  }
  void TearDown() override { std::filesystem::remove_all(directory_); }

  // A file of `count` random tokens (fresh per test), opened for a 300-token vocabulary.
  TokenFile make_file(int64_t count, uint64_t seed, const std::string& name = "tokens.bin") {
    std::mt19937_64 generator(seed);
    std::uniform_int_distribution<uint32_t> token(0, 299);
    contents_.resize(size_t(count));
    for (uint32_t& value : contents_) value = token(generator);
    const std::string path = (directory_ / name).string();
    write_token_file(path, contents_, 300);
    return TokenFile(path, 300);
  }

  std::filesystem::path directory_;
  std::vector<uint32_t> contents_;
};

TEST_F(DataLoaderTest, InputsAndTargetsAreShiftedWindowsOfTheFile) {
  TokenFile file = make_file(5000, 1);
  const int64_t seq_len = 17, batch = 3;
  DataLoader loader(file, seq_len, batch, 0, 1, 42, DataOrder::shuffled);
  std::vector<int32_t> inputs, targets;
  for (int step = 0; step < 5; ++step) {
    const int64_t first_sample = loader.samples_consumed();
    inputs.assign(size_t(batch * seq_len), -7);
    targets.assign(size_t(batch * seq_len), -7);
    loader.next_batch(inputs, targets);
    for (int64_t sequence = 0; sequence < batch; ++sequence) {
      const int64_t start = loader.window_start(first_sample + sequence);
      ASSERT_GE(start, 0);
      ASSERT_LE(start + seq_len + 1, file.size());
      for (int64_t position = 0; position < seq_len; ++position) {
        const size_t index = size_t(sequence * seq_len + position);
        EXPECT_EQ(inputs[index], int32_t(contents_[size_t(start + position)]));
        EXPECT_EQ(targets[index], int32_t(contents_[size_t(start + position + 1)]));
      }
    }
  }
  EXPECT_EQ(loader.samples_consumed(), 5 * batch);
}

TEST_F(DataLoaderTest, EveryEpochVisitsEveryWindowOnceAndWithinBounds) {
  for (int64_t size : {int64_t(18), int64_t(40), int64_t(1000), int64_t(4099)}) {
    TokenFile file = make_file(size, uint64_t(size), "f" + std::to_string(size) + ".bin");
    const int64_t seq_len = 16;
    DataLoader loader(file, seq_len, 1, 0, 1, 7, DataOrder::shuffled);
    const int64_t windows = loader.windows_per_epoch();
    ASSERT_GE(windows, 1);
    for (int64_t epoch = 0; epoch < 3; ++epoch) {
      std::set<int64_t> starts;
      const int64_t shift = loader.window_start(epoch * windows) % seq_len;
      for (int64_t index = 0; index < windows; ++index) {
        const int64_t start = loader.window_start(epoch * windows + index);
        EXPECT_LE(start + seq_len + 1, size) << "size " << size;
        EXPECT_EQ(start % seq_len, shift) << "one offset per epoch";
        starts.insert(start);
      }
      EXPECT_EQ(int64_t(starts.size()), windows) << "size " << size << " epoch " << epoch;
    }
  }
}

TEST_F(DataLoaderTest, ShuffledOrderDependsOnTheSeedAndChangesBetweenEpochs) {
  TokenFile file = make_file(20000, 3);
  DataLoader first(file, 32, 4, 0, 1, 11, DataOrder::shuffled), again(file, 32, 4, 0, 1, 11, DataOrder::shuffled),
      other(file, 32, 4, 0, 1, 12, DataOrder::shuffled);
  const int64_t windows = first.windows_per_epoch();
  std::vector<int64_t> a, b, c, next_epoch;
  for (int64_t index = 0; index < windows; ++index) {
    a.push_back(first.window_start(index));
    b.push_back(again.window_start(index));
    c.push_back(other.window_start(index));
    next_epoch.push_back(first.window_start(windows + index));
  }
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(a, next_epoch);
  std::vector<int64_t> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_NE(a, sorted) << "the order should not be sequential";
}

TEST_F(DataLoaderTest, RanksReadDisjointSamplesThatTogetherMatchOneRank) {
  TokenFile file = make_file(30000, 4);
  const int64_t seq_len = 24, batch = 2;
  const int world = 3;
  std::vector<DataLoader> ranks;
  for (int rank = 0; rank < world; ++rank) ranks.emplace_back(file, seq_len, batch, rank, world, 5, DataOrder::shuffled);
  DataLoader single(file, seq_len, batch * world, 0, 1, 5, DataOrder::shuffled);
  std::vector<int32_t> inputs, targets, single_inputs, single_targets;
  for (int step = 0; step < 4; ++step) {
    single.next_batch(single_inputs, single_targets);
    std::vector<int32_t> joined;
    for (int rank = 0; rank < world; ++rank) {
      ranks[size_t(rank)].next_batch(inputs, targets);
      joined.insert(joined.end(), inputs.begin(), inputs.end());
    }
    EXPECT_EQ(joined, single_inputs) << "step " << step;
    for (const DataLoader& loader : ranks) EXPECT_EQ(loader.samples_consumed(), single.samples_consumed());
  }
}

TEST_F(DataLoaderTest, StateRestoresThePosition) {
  TokenFile file = make_file(8000, 5);
  DataLoader loader(file, 20, 3, 1, 2, 9, DataOrder::shuffled);
  std::vector<int32_t> inputs, targets;
  for (int step = 0; step < 7; ++step) loader.next_batch(inputs, targets);
  const DataLoaderState saved = loader.state();
  EXPECT_EQ(saved.samples_consumed, 7 * 3 * 2);
  std::vector<std::vector<int32_t>> expected;
  for (int step = 0; step < 5; ++step) {
    loader.next_batch(inputs, targets);
    expected.push_back(inputs);
  }
  DataLoader resumed(file, 20, 3, 1, 2, 9, DataOrder::shuffled);
  resumed.restore(saved);
  for (int step = 0; step < 5; ++step) {
    resumed.next_batch(inputs, targets);
    EXPECT_EQ(inputs, expected[size_t(step)]) << "step " << step;
  }
  // A state from another stream is refused.
  DataLoaderState wrong_seed = saved;
  wrong_seed.seed = 10;
  EXPECT_THROW(resumed.restore(wrong_seed), Error);
  DataLoaderState wrong_length = saved;
  wrong_length.seq_len = 21;
  EXPECT_THROW(resumed.restore(wrong_length), Error);
  DataLoaderState wrong_file = saved;
  wrong_file.token_count = 8001;
  EXPECT_THROW(resumed.restore(wrong_file), Error);
}

TEST_F(DataLoaderTest, SequentialOrderReadsTheFileInOrderAndRewinds) {
  TokenFile file = make_file(1000, 6);
  const int64_t seq_len = 10;
  DataLoader loader(file, seq_len, 2, 0, 1, 1, DataOrder::sequential);
  EXPECT_EQ(loader.windows_per_epoch(), (1000 - 1) / seq_len);
  for (int64_t sample = 0; sample < loader.windows_per_epoch(); ++sample)
    EXPECT_EQ(loader.window_start(sample), sample * seq_len);
  std::vector<int32_t> inputs, targets, first;
  loader.next_batch(first, targets);
  loader.next_batch(inputs, targets);
  EXPECT_NE(first, inputs);
  loader.rewind();
  loader.next_batch(inputs, targets);
  EXPECT_EQ(first, inputs);
  for (size_t index = 0; index < first.size(); ++index) EXPECT_EQ(first[index], int32_t(contents_[index]));
}

TEST_F(DataLoaderTest, TooShortFilesAreBadInput) {
  TokenFile file = make_file(10, 7);
  try {
    DataLoader loader(file, 10, 1, 0, 1, 1, DataOrder::shuffled);
    FAIL() << "a file of 10 tokens cannot hold a sequence of 10 + 1";
  } catch (const Error& error) {
    EXPECT_EQ(error.exit_code(), kExitBadInput);
  }
  DataLoader exact(file, 9, 1, 0, 1, 1, DataOrder::shuffled);  // exactly one window
  EXPECT_EQ(exact.windows_per_epoch(), 1);
  std::vector<int32_t> inputs, targets;
  exact.next_batch(inputs, targets);
  exact.next_batch(inputs, targets);  // the second epoch reuses it
  EXPECT_EQ(targets.back(), int32_t(contents_.back()));
}

}  // namespace
