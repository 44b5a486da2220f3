// Expert specialization map: which inputs each expert of each MoE layer receives.
//
// For a text (byte tokens) run through a trained model, every routed choice (token t -> expert e,
// all k_t choices of a token, before any capacity limit) is counted under three views of the token:
//   class     the byte's class: lower, upper, digit, space (space / tab), newline (\n, \r),
//             punct (printable ASCII punctuation), other (control bytes, bytes >= 128, ids >= 256)
//   position  its position in the model's sequence window, in `position_buckets` equal buckets
//   previous  the class of the byte before it in the window ("start" at position 0)
// plus the byte value itself (top bytes). The text's own distribution over the same views (each
// token once) is the baseline: share(e, c) = count(e, c) / count(e) is what fraction of expert e's
// tokens are of class c; lift(e, c) = share(e, c) / (text(c) / text) says how much more (> 1) or
// less (< 1) often e gets class c than a router that ignored the input would give it.
// The map is plain counts, so maps of several texts (or ranks) add up.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace switchyard {

enum ByteClass : int {
  kClassLower = 0,
  kClassUpper,
  kClassDigit,
  kClassSpace,
  kClassNewline,
  kClassPunct,
  kClassOther,
  kNumByteClasses
};
constexpr int kPreviousStart = kNumByteClasses;  // index of "start of window" on the previous-byte axis
constexpr int kNumPreviousClasses = kNumByteClasses + 1;

const char* byte_class_name(int byte_class);  // "lower", ..., "other"; "start" for kPreviousStart
int byte_class_of(int32_t token);             // ids >= 256 or < 0: kClassOther
std::string byte_label(int byte);             // "'a'", "' '", "'\\n'", "0xe2" for display

// Counts for one expert (or for the whole text).
struct InputProfile {
  int64_t count = 0;
  std::vector<int64_t> by_class, by_position, by_previous, by_byte;  // [classes], [buckets], [classes+1], [256]
  double position_sum = 0.0;                                         // for the mean position
  explicit InputProfile(int position_buckets = 1);
  void add(int32_t token, int32_t previous_token, int64_t position, int64_t window, int position_buckets);
  void merge(const InputProfile& other);
  double share_of_class(int byte_class) const;  // 0 when empty
  double mean_position() const;
  // The `count` most frequent bytes, most frequent first (ties: lower byte).
  std::vector<int> top_bytes(int count) const;
};

struct LayerSpecialization {
  int moe_layer = 0;
  int block = -1;                     // transformer block index (-1 unknown)
  std::vector<InputProfile> experts;  // [E]
};

class SpecializationMap {
 public:
  SpecializationMap() = default;
  // `blocks`: the transformer block of each MoE layer (its size is the number of MoE layers).
  SpecializationMap(const std::vector<int>& blocks, int num_experts, int64_t window, int position_buckets);

  // The text of one window run through the model: adds each token once to the baseline.
  void add_text(const int32_t* tokens, int64_t count);
  // One MoE layer's routing of that window: expert_ids [count, k] (-1 = empty choice), token_k
  // [count] (nullptr: all k choices count).
  void add_routing(int moe_layer, const int32_t* tokens, int64_t count, const int32_t* expert_ids, int k,
                   const int32_t* token_k);

  int num_experts() const { return num_experts_; }
  int64_t window() const { return window_; }
  int position_buckets() const { return position_buckets_; }
  const InputProfile& text() const { return text_; }
  const std::vector<LayerSpecialization>& layers() const { return layers_; }

  double lift(int moe_layer, int expert, int byte_class) const;  // NaN when undefined
  // Human-readable table, one block per layer, one row per expert.
  std::string table() const;
  // Everything as JSON (counts and derived shares / lifts), for tools and the report.
  std::string json() const;

 private:
  int num_experts_ = 0;
  int64_t window_ = 1;
  int position_buckets_ = 1;
  InputProfile text_;
  std::vector<LayerSpecialization> layers_;
};

}  // namespace switchyard
