// Expert specialization map (src/report/specialization.h).
#include "src/report/specialization.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <sstream>

#include "src/core/error.h"
#include "src/core/json.h"

namespace switchyard {
namespace {

std::string json_number(double value) {
  if (!std::isfinite(value)) return "null";
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.6g", value);
  return buffer;
}

std::string json_counts(const std::vector<int64_t>& counts) {
  std::string out = "[";
  for (size_t index = 0; index < counts.size(); ++index) out += (index ? "," : "") + std::to_string(counts[index]);
  return out + "]";
}

std::string json_doubles(const std::vector<double>& values) {
  std::string out = "[";
  for (size_t index = 0; index < values.size(); ++index) out += (index ? "," : "") + json_number(values[index]);
  return out + "]";
}

// share(a)[i] / share(b)[i] for count vectors with totals; NaN where b has none.
std::vector<double> lifts(const std::vector<int64_t>& counts, int64_t total, const std::vector<int64_t>& baseline,
                          int64_t baseline_total) {
  std::vector<double> out(counts.size(), std::numeric_limits<double>::quiet_NaN());
  if (total <= 0 || baseline_total <= 0) return out;
  for (size_t index = 0; index < counts.size(); ++index) {
    if (baseline[index] <= 0) continue;
    out[index] = (double(counts[index]) / double(total)) / (double(baseline[index]) / double(baseline_total));
  }
  return out;
}

std::string percent(double fraction) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.1f%%", 100.0 * fraction);
  return buffer;
}

std::string pad(const std::string& text, size_t width, bool right_align = true) {
  if (text.size() >= width) return text;
  return right_align ? std::string(width - text.size(), ' ') + text : text + std::string(width - text.size(), ' ');
}

}  // namespace

const char* byte_class_name(int byte_class) {
  static const char* names[] = {"lower", "upper", "digit", "space", "newline", "punct", "other", "start"};
  return byte_class >= 0 && byte_class < kNumPreviousClasses ? names[byte_class] : "?";
}

int byte_class_of(int32_t token) {
  if (token < 0 || token > 255) return kClassOther;
  const int byte = token;
  if (byte >= 'a' && byte <= 'z') return kClassLower;
  if (byte >= 'A' && byte <= 'Z') return kClassUpper;
  if (byte >= '0' && byte <= '9') return kClassDigit;
  if (byte == ' ' || byte == '\t') return kClassSpace;
  if (byte == '\n' || byte == '\r') return kClassNewline;
  if (byte > ' ' && byte < 127) return kClassPunct;
  return kClassOther;
}

std::string byte_label(int byte) {
  char buffer[16];
  if (byte == '\n') return "'\\n'";
  if (byte == '\r') return "'\\r'";
  if (byte == '\t') return "'\\t'";
  if (byte >= 32 && byte < 127) {
    std::snprintf(buffer, sizeof(buffer), "'%c'", char(byte));
    return buffer;
  }
  std::snprintf(buffer, sizeof(buffer), "0x%02x", byte & 0xff);
  return buffer;
}

// ---- InputProfile ----------------------------------------------------------------------------

InputProfile::InputProfile(int position_buckets)
    : by_class(kNumByteClasses, 0),
      by_position(size_t(std::max(1, position_buckets)), 0),
      by_previous(kNumPreviousClasses, 0),
      by_byte(256, 0) {}

void InputProfile::add(int32_t token, int32_t previous_token, int64_t position, int64_t window, int position_buckets) {
  ++count;
  ++by_class[size_t(byte_class_of(token))];
  const int64_t bucket =
      std::min<int64_t>(position_buckets - 1, position * position_buckets / std::max<int64_t>(1, window));
  ++by_position[size_t(std::max<int64_t>(0, bucket))];
  ++by_previous[size_t(position == 0 ? kPreviousStart : byte_class_of(previous_token))];
  if (token >= 0 && token < 256) ++by_byte[size_t(token)];
  position_sum += double(position);
}

void InputProfile::merge(const InputProfile& other) {
  SY_CHECK(other.by_position.size() == by_position.size(), "InputProfile::merge: ", other.by_position.size(), " vs ",
           by_position.size(), " position buckets");
  count += other.count;
  position_sum += other.position_sum;
  for (size_t index = 0; index < by_class.size(); ++index) by_class[index] += other.by_class[index];
  for (size_t index = 0; index < by_position.size(); ++index) by_position[index] += other.by_position[index];
  for (size_t index = 0; index < by_previous.size(); ++index) by_previous[index] += other.by_previous[index];
  for (size_t index = 0; index < by_byte.size(); ++index) by_byte[index] += other.by_byte[index];
}

double InputProfile::share_of_class(int byte_class) const {
  return count > 0 ? double(by_class[size_t(byte_class)]) / double(count) : 0.0;
}

double InputProfile::mean_position() const { return count > 0 ? position_sum / double(count) : 0.0; }

std::vector<int> InputProfile::top_bytes(int wanted) const {
  std::vector<int> order(256);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int left, int right) { return by_byte[size_t(left)] > by_byte[size_t(right)]; });
  std::vector<int> out;
  for (int byte : order) {
    if (int(out.size()) >= wanted || by_byte[size_t(byte)] == 0) break;
    out.push_back(byte);
  }
  return out;
}

// ---- SpecializationMap -----------------------------------------------------------------------

SpecializationMap::SpecializationMap(const std::vector<int>& blocks, int num_experts, int64_t window,
                                     int position_buckets)
    : num_experts_(num_experts), window_(window), position_buckets_(position_buckets), text_(position_buckets) {
  SY_CHECK(num_experts >= 1 && window >= 1 && position_buckets >= 1, "SpecializationMap: ", num_experts,
           " experts, window ", window, ", ", position_buckets, " position buckets");
  for (size_t layer = 0; layer < blocks.size(); ++layer) {
    LayerSpecialization entry;
    entry.moe_layer = int(layer);
    entry.block = blocks[layer];
    entry.experts.assign(size_t(num_experts), InputProfile(position_buckets));
    layers_.push_back(std::move(entry));
  }
}

void SpecializationMap::add_text(const int32_t* tokens, int64_t count) {
  for (int64_t index = 0; index < count; ++index) {
    const int64_t position = index % window_;
    text_.add(tokens[index], position > 0 ? tokens[index - 1] : -1, position, window_, position_buckets_);
  }
}

void SpecializationMap::add_routing(int moe_layer, const int32_t* tokens, int64_t count, const int32_t* expert_ids,
                                    int k, const int32_t* token_k) {
  SY_CHECK(moe_layer >= 0 && moe_layer < int(layers_.size()), "SpecializationMap: MoE layer ", moe_layer, " of ",
           layers_.size());
  SY_CHECK(k >= 1, "SpecializationMap: k = ", k);
  std::vector<InputProfile>& experts = layers_[size_t(moe_layer)].experts;
  for (int64_t index = 0; index < count; ++index) {
    const int64_t position = index % window_;
    const int32_t previous = position > 0 ? tokens[index - 1] : -1;
    const int choices = token_k != nullptr ? std::min(k, int(token_k[index])) : k;
    for (int choice = 0; choice < choices; ++choice) {
      const int32_t expert = expert_ids[index * k + choice];
      if (expert < 0) continue;
      SY_CHECK(expert < num_experts_, "SpecializationMap: expert id ", expert, " of ", num_experts_);
      experts[size_t(expert)].add(tokens[index], previous, position, window_, position_buckets_);
    }
  }
}

double SpecializationMap::lift(int moe_layer, int expert, int byte_class) const {
  const InputProfile& profile = layers_.at(size_t(moe_layer)).experts.at(size_t(expert));
  return lifts(profile.by_class, profile.count, text_.by_class, text_.count)[size_t(byte_class)];
}

std::string SpecializationMap::table() const {
  std::ostringstream out;
  for (const LayerSpecialization& layer : layers_) {
    int64_t routed = 0;
    for (const InputProfile& expert : layer.experts) routed += expert.count;
    out << "MoE layer " << layer.moe_layer;
    if (layer.block >= 0) out << " (block " << layer.block << ")";
    out << ": " << num_experts_ << " experts, " << text_.count << " tokens, " << routed
        << " routed choices. Class columns: lift = share of the expert's tokens in the class / share in the text.\n";
    out << pad("expert", 7, false) << pad("tokens", 8);
    for (int byte_class = 0; byte_class < kNumByteClasses; ++byte_class) out << pad(byte_class_name(byte_class), 8);
    out << pad("mean pos", 10) << "  " << pad("top bytes", 26, false) << "  most over-represented preceding class\n";
    // The text's own row: shares instead of lifts.
    out << pad("text", 7, false) << pad("100%", 8);
    for (int byte_class = 0; byte_class < kNumByteClasses; ++byte_class)
      out << pad(percent(text_.share_of_class(byte_class)), 8);
    out << pad(json_number(std::round(text_.mean_position() * 10) / 10), 10) << "  ";
    std::string bytes;
    for (int byte : text_.top_bytes(5)) bytes += byte_label(byte) + " ";
    out << pad(bytes, 26, false) << "\n";
    for (int expert = 0; expert < num_experts_; ++expert) {
      const InputProfile& profile = layer.experts[size_t(expert)];
      out << pad(std::to_string(expert), 7, false)
          << pad(routed > 0 ? percent(double(profile.count) / double(routed)) : "-", 8);
      const std::vector<double> class_lifts = lifts(profile.by_class, profile.count, text_.by_class, text_.count);
      for (int byte_class = 0; byte_class < kNumByteClasses; ++byte_class) {
        const double value = class_lifts[size_t(byte_class)];
        char buffer[32];
        if (std::isfinite(value))
          std::snprintf(buffer, sizeof(buffer), "%.2fx", value);
        else
          std::snprintf(buffer, sizeof(buffer), "-");
        out << pad(buffer, 8);
      }
      char mean[32];
      std::snprintf(mean, sizeof(mean), "%.1f", profile.mean_position());
      out << pad(profile.count > 0 ? mean : "-", 10) << "  ";
      bytes.clear();
      for (int byte : profile.top_bytes(5)) bytes += byte_label(byte) + " ";
      out << pad(bytes, 26, false) << "  ";
      const std::vector<double> previous_lifts =
          lifts(profile.by_previous, profile.count, text_.by_previous, text_.count);
      int best = -1;
      for (int index = 0; index < kNumPreviousClasses; ++index)
        if (std::isfinite(previous_lifts[size_t(index)]) &&
            (best < 0 || previous_lifts[size_t(index)] > previous_lifts[size_t(best)]))
          best = index;
      if (best >= 0 && profile.count > 0) {
        char buffer[64];
        std::snprintf(buffer, sizeof(buffer), "after %s %.2fx (%s of its tokens)", byte_class_name(best),
                      previous_lifts[size_t(best)],
                      percent(double(profile.by_previous[size_t(best)]) / double(profile.count)).c_str());
        out << buffer;
      } else {
        out << "-";
      }
      out << "\n";
    }
    out << "\n";
  }
  return out.str();
}

std::string SpecializationMap::json() const {
  auto profile_json = [&](const InputProfile& profile, bool with_lifts) {
    std::ostringstream out;
    out << "{\"count\":" << profile.count << ",\"mean_position\":" << json_number(profile.mean_position())
        << ",\"by_class\":" << json_counts(profile.by_class) << ",\"by_position\":" << json_counts(profile.by_position)
        << ",\"by_previous\":" << json_counts(profile.by_previous) << ",\"by_byte\":" << json_counts(profile.by_byte);
    if (with_lifts) {
      out << ",\"lift_by_class\":" << json_doubles(lifts(profile.by_class, profile.count, text_.by_class, text_.count))
          << ",\"lift_by_position\":"
          << json_doubles(lifts(profile.by_position, profile.count, text_.by_position, text_.count))
          << ",\"lift_by_previous\":"
          << json_doubles(lifts(profile.by_previous, profile.count, text_.by_previous, text_.count));
    }
    out << ",\"top_bytes\":[";
    const std::vector<int> top = profile.top_bytes(8);
    for (size_t index = 0; index < top.size(); ++index) out << (index ? "," : "") << top[index];
    out << "]}";
    return out.str();
  };
  std::ostringstream out;
  out << "{\"num_experts\":" << num_experts_ << ",\"window\":" << window_
      << ",\"position_buckets\":" << position_buckets_ << ",\"classes\":[";
  for (int byte_class = 0; byte_class < kNumByteClasses; ++byte_class)
    out << (byte_class ? "," : "") << json::quote(byte_class_name(byte_class));
  out << "],\"previous_classes\":[";
  for (int byte_class = 0; byte_class < kNumPreviousClasses; ++byte_class)
    out << (byte_class ? "," : "") << json::quote(byte_class_name(byte_class));
  out << "],\"text\":" << profile_json(text_, false) << ",\"layers\":[";
  for (size_t layer = 0; layer < layers_.size(); ++layer) {
    out << (layer ? "," : "") << "{\"moe_layer\":" << layers_[layer].moe_layer << ",\"block\":" << layers_[layer].block
        << ",\"experts\":[";
    for (size_t expert = 0; expert < layers_[layer].experts.size(); ++expert)
      out << (expert ? "," : "") << profile_json(layers_[layer].experts[expert], true);
    out << "]}";
  }
  out << "]}";
  return out.str();
}

}  // namespace switchyard
