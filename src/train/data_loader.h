// DataLoader: deterministic streams of training sequences from a memory-mapped token file.
//
// The file (src/train/token_file.h) is cut into windows of seq_len + 1 tokens; a sample is one
// window: inputs = its first seq_len tokens, targets = the same shifted by one. Samples are
// numbered globally, 0, 1, 2, ...: in micro-step m every data-parallel rank r of `world` takes
// the micro_batch samples starting at cursor + r * micro_batch, then the cursor advances by
// world * micro_batch. So ranks never share a sample, the stream depends only on (seed, file,
// seq_len), and the position is one number: the cursor (samples consumed by all ranks).
//
// Order. Sample i belongs to epoch e = i / N (N windows per epoch) and is window pi_e(i mod N).
//   shuffled    pi_e is a pseudo-random permutation of [0, N): a 4-round Feistel network keyed by
//               Philox(seed, e) with cycle walking, so it needs no table and any sample is found
//               in O(1). Each epoch also draws a start offset in [0, seq_len), so window
//               boundaries move between epochs; N = floor(size / seq_len) - 1 leaves room for it.
//   sequential  pi_e(j) = j, offset 0, N = floor((size - 1) / seq_len) (validation: the same
//               batches at every evaluation after rewind()).
// state()/restore() save and reload the cursor (with the seed and file size, checked on restore).
#pragma once

#include <cstdint>
#include <vector>

#include "src/train/token_file.h"

namespace switchyard {

enum class DataOrder : uint8_t { shuffled, sequential };

struct DataLoaderState {
  int64_t samples_consumed = 0;  // the cursor
  uint64_t seed = 0;
  int64_t token_count = 0;       // of the file it was taken from
  int64_t seq_len = 0;
};

class DataLoader {
 public:
  // `file` must outlive the loader. SY_BAD_INPUT when the file holds fewer than seq_len + 1 tokens.
  DataLoader(const TokenFile& file, int64_t seq_len, int64_t micro_batch, int rank, int world, uint64_t seed,
             DataOrder order);

  // This rank's next micro-batch: inputs and targets [micro_batch * seq_len] each, row-major by
  // sequence. Advances the cursor by world * micro_batch.
  void next_batch(int32_t* inputs, int32_t* targets);
  void next_batch(std::vector<int32_t>& inputs, std::vector<int32_t>& targets);

  int64_t windows_per_epoch() const { return windows_; }
  int64_t epoch() const { return cursor_ / windows_; }           // of the next sample
  int64_t samples_consumed() const { return cursor_; }
  int64_t window_start(int64_t sample) const;                     // token offset of global sample i
  int64_t seq_len() const { return seq_len_; }
  int64_t micro_batch() const { return micro_batch_; }

  DataLoaderState state() const;
  // SY_BAD_INPUT when the state belongs to another seed, seq_len or file size.
  void restore(const DataLoaderState& state);
  void rewind() { cursor_ = 0; }

 private:
  int64_t permute(int64_t index, int64_t epoch) const;
  int64_t epoch_shift(int64_t epoch) const;

  const TokenFile* file_;
  int64_t seq_len_, micro_batch_;
  int rank_, world_;
  uint64_t seed_;
  DataOrder order_;
  int64_t windows_ = 0, max_shift_ = 0;
  int half_bits_ = 0;  // Feistel half width: 2 * half_bits_ >= bits of windows_
  int64_t cursor_ = 0;
  std::vector<int32_t> window_;
};

}  // namespace switchyard
