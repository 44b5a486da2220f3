// Data loader (src/train/data_loader.h).
#include "src/train/data_loader.h"

#include <algorithm>

#include "src/core/error.h"
#include "src/core/rng.h"

namespace switchyard {
namespace {

constexpr int kFeistelRounds = 4;
constexpr uint32_t kPermutationTag = 0x7065726d;  // "perm"
constexpr uint32_t kShiftTag = 0x73686674;        // "shft"

}  // namespace

DataLoader::DataLoader(const TokenFile& file, int64_t seq_len, int64_t micro_batch, int rank, int world,
                       uint64_t seed, DataOrder order)
    : file_(&file), seq_len_(seq_len), micro_batch_(micro_batch), rank_(rank), world_(world), seed_(seed),
      order_(order) {
  SY_CHECK(file.is_open(), "DataLoader: the token file is not open");
  SY_CHECK(seq_len >= 1 && micro_batch >= 1 && world >= 1 && rank >= 0 && rank < world,
           "DataLoader: bad sizes (seq_len ", seq_len, ", micro_batch ", micro_batch, ", rank ", rank, " of ", world,
           ")");
  const int64_t size = file.size();
  SY_CHECK_INPUT(size >= seq_len + 1, "token file '", file.path(), "' holds ", size, " tokens; a sequence needs ",
                 seq_len + 1, " (model.seq_len + 1): prepare it from more text, or lower model.seq_len");
  if (order == DataOrder::sequential) {
    windows_ = (size - 1) / seq_len;
    max_shift_ = 0;
  } else {
    windows_ = std::max<int64_t>(1, size / seq_len - 1);
    max_shift_ = std::min(seq_len - 1, size - 1 - windows_ * seq_len);
  }
  while ((int64_t(1) << (2 * half_bits_)) < windows_) ++half_bits_;
  window_.resize(size_t(seq_len + 1));
}

// A bijection of [0, 2^(2h)) (balanced Feistel network, Philox round function), walked until it
// lands in [0, N): the cycle through the domain returns to [0, N) after at most a few steps on
// average, because the domain is less than 4N.
int64_t DataLoader::permute(int64_t index, int64_t epoch) const {
  if (order_ == DataOrder::sequential || windows_ == 1) return index;
  const uint64_t mask = (uint64_t(1) << half_bits_) - 1;
  uint64_t value = uint64_t(index);
  do {
    uint64_t left = value >> half_bits_, right = value & mask;
    for (int round = 0; round < kFeistelRounds; ++round) {
      const PhiloxOutput out = philox4x32(uint32_t(right), uint32_t(right >> 32) ^ kPermutationTag, uint32_t(epoch),
                                          uint32_t(uint64_t(epoch) >> 32) ^ uint32_t(round), seed_);
      const uint64_t mixed = (uint64_t(out.value[1]) << 32 | out.value[0]) & mask;
      const uint64_t next_right = left ^ mixed;
      left = right;
      right = next_right;
    }
    value = left << half_bits_ | right;
  } while (value >= uint64_t(windows_));
  return int64_t(value);
}

int64_t DataLoader::epoch_shift(int64_t epoch) const {
  if (max_shift_ == 0) return 0;
  const PhiloxOutput out = philox4x32(kShiftTag, 0, uint32_t(epoch), uint32_t(uint64_t(epoch) >> 32), seed_);
  const uint64_t draw = uint64_t(out.value[1]) << 32 | out.value[0];
  return int64_t(draw % uint64_t(max_shift_ + 1));
}

int64_t DataLoader::window_start(int64_t sample) const {
  SY_CHECK(sample >= 0, "DataLoader: negative sample ", sample);
  const int64_t epoch = sample / windows_, index = sample % windows_;
  return epoch_shift(epoch) + permute(index, epoch) * seq_len_;
}

void DataLoader::next_batch(int32_t* inputs, int32_t* targets) {
  const int64_t first = cursor_ + int64_t(rank_) * micro_batch_;
  for (int64_t sequence = 0; sequence < micro_batch_; ++sequence) {
    const int64_t start = window_start(first + sequence);
    file_->copy_span(start, seq_len_ + 1, window_.data());
    std::copy(window_.begin(), window_.end() - 1, inputs + sequence * seq_len_);
    std::copy(window_.begin() + 1, window_.end(), targets + sequence * seq_len_);
  }
  cursor_ += int64_t(world_) * micro_batch_;
}

void DataLoader::next_batch(std::vector<int32_t>& inputs, std::vector<int32_t>& targets) {
  inputs.resize(size_t(micro_batch_ * seq_len_));
  targets.resize(size_t(micro_batch_ * seq_len_));
  next_batch(inputs.data(), targets.data());
}

DataLoaderState DataLoader::state() const {
  DataLoaderState state;
  state.samples_consumed = cursor_;
  state.seed = seed_;
  state.token_count = file_->size();
  state.seq_len = seq_len_;
  return state;
}

void DataLoader::restore(const DataLoaderState& state) {
  SY_CHECK_INPUT(state.seed == seed_, "data position: saved with seed ", state.seed, ", this run uses ", seed_);
  SY_CHECK_INPUT(state.seq_len == seq_len_, "data position: saved with seq_len ", state.seq_len, ", this run uses ",
                 seq_len_);
  SY_CHECK_INPUT(state.token_count == file_->size(), "data position: saved for a file of ", state.token_count,
                 " tokens, '", file_->path(), "' holds ", file_->size());
  SY_CHECK_INPUT(state.samples_consumed >= 0, "data position: negative cursor ", state.samples_consumed);
  cursor_ = state.samples_consumed;
}

}  // namespace switchyard
