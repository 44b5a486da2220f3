// StepProfiler and its table (src/train/step_profiler.h).
#include "src/train/step_profiler.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "src/core/error.h"
#include "src/core/json.h"

namespace switchyard {

namespace {

// The rows of the table, in print order.
const char* const kCategories[] = {"attention",         "MoE layers",    "shared experts",
                                   "dense FFNs",        "norms and residuals", "embedding, LM head and loss",
                                   "gradient sync",     "optimizer",     "other"};

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The stage's part without " backward" or " recompute" ("MoE recompute" counts as "MoE").
std::string base_name(const std::string& stage) {
  for (const std::string suffix : {" backward", " recompute"})
    if (ends_with(stage, suffix)) return stage.substr(0, stage.size() - suffix.size());
  return stage;
}

struct CategoryTime {
  double forward_ms = 0, backward_ms = 0;
};

// Mean over the profiles of each category's forward and backward time.
std::map<std::string, CategoryTime> mean_categories(const std::vector<StepProfile>& profiles) {
  std::map<std::string, CategoryTime> categories;
  for (const StepProfile& profile : profiles)
    for (const StageTime& stage : profile.stages) {
      CategoryTime& time = categories[stage_category(stage.stage)];
      (is_backward_stage(stage.stage) ? time.backward_ms : time.forward_ms) += stage.ms / double(profiles.size());
    }
  return categories;
}

double mean_of(const std::vector<StepProfile>& profiles, double (*field)(const StepProfile&)) {
  double sum = 0;
  for (const StepProfile& profile : profiles) sum += field(profile);
  return profiles.empty() ? 0.0 : sum / double(profiles.size());
}

struct MeanStage {
  std::string parent, stage;
  double ms = 0, calls = 0, flops = 0;  // per step
};

// Mean per step of each (parent, stage) of `list` over the profiles, in order of first appearance.
std::vector<MeanStage> mean_stages(const std::vector<StepProfile>& profiles,
                                   std::vector<StageTime> StepProfile::*list) {
  std::vector<MeanStage> means;
  std::map<std::pair<std::string, std::string>, size_t> index;
  const double steps = double(profiles.size());
  for (const StepProfile& profile : profiles)
    for (const StageTime& time : profile.*list) {
      auto [at, added] = index.emplace(std::make_pair(time.parent, time.stage), means.size());
      if (added) means.push_back({time.parent, time.stage});
      means[at->second].ms += time.ms / steps;
      means[at->second].calls += double(time.count) / steps;
      means[at->second].flops += time.flops / steps;
    }
  return means;
}

// The sub-stages under each stage that has them, stages in the order they first ended, with the
// part of the stage that no sub-stage covers (host work inside it, small kernels between them).
void format_substages(const std::vector<StepProfile>& profiles, std::ostringstream& out) {
  const std::vector<MeanStage> substages = mean_stages(profiles, &StepProfile::substages);
  if (substages.empty()) return;
  char line[200];
  std::snprintf(line, sizeof(line), "  within the stages (mean per step; TFLOP/s of the matmul FLOPs):\n"
                "  %-26s %-28s %10s %8s %9s\n", "stage", "sub-stage", "ms", "calls", "TFLOP/s");
  out << line;
  for (const MeanStage& stage : mean_stages(profiles, &StepProfile::stages)) {
    double covered = 0;
    bool any = false;
    for (const MeanStage& substage : substages) {
      if (substage.parent != stage.stage) continue;
      std::snprintf(line, sizeof(line), "  %-26s %-28s %10.3f %8.1f", any ? "" : stage.stage.c_str(),
                    substage.stage.c_str(), substage.ms, substage.calls);
      out << line;
      if (substage.flops > 0 && substage.ms > 0) {
        std::snprintf(line, sizeof(line), " %9.4g", substage.flops / (substage.ms * 1e-3) / 1e12);
        out << line;
      }
      out << "\n";
      covered += substage.ms;
      any = true;
    }
    if (!any) continue;
    std::snprintf(line, sizeof(line), "  %-26s %-28s %10.3f\n", "", "(in no sub-stage)", stage.ms - covered);
    out << line;
  }
}

}  // namespace

bool is_backward_stage(const std::string& stage) {
  return ends_with(stage, " backward") || ends_with(stage, " recompute");
}

std::string stage_category(const std::string& stage) {
  const std::string base = base_name(stage);
  if (base == "attention") return "attention";
  if (base == "MoE") return "MoE layers";
  if (base == "shared experts") return "shared experts";
  if (base == "dense FFN") return "dense FFNs";
  if (base == "norm" || base == "residual") return "norms and residuals";
  if (base == "embedding" || base == "LM head" || base == "loss") return "embedding, LM head and loss";
  if (base == "gradient sync") return "gradient sync";
  if (base == "optimizer" || base == "router bias update") return "optimizer";
  return "other";
}

double StepProfile::stages_ms() const {
  double sum = 0;
  for (const StageTime& stage : stages) sum += stage.ms;
  return sum;
}

StepProfiler::StepProfiler(DeviceKind device, void* stream) : timeline_(device, stream) {}

void StepProfiler::begin_step() {
  SY_CHECK(!in_step_, "StepProfiler: begin_step twice");
  timeline_.clear();
  intervals_.clear();
  in_step_ = true;
  timeline_.mark();
}

void StepProfiler::stage_begin(const ExecContext&, const char* stage) {
  SY_CHECK(in_step_, "StepProfiler: stage '", stage, "' outside a profiled step");
  SY_CHECK(depth_ < 2, "StepProfiler: stage '", stage, "' begins inside '", open_[1].stage, "', itself inside '",
           open_[0].stage, "' (a stage holds sub-stages one level deep)");
  open_[depth_++] = {stage, timeline_.mark(), 0.0};
}

void StepProfiler::stage_flops(const char* stage, double flops) {
  SY_CHECK(depth_ > 0 && std::string(open_[depth_ - 1].stage) == stage, "StepProfiler: FLOPs for stage '", stage,
           "' but '", depth_ > 0 ? open_[depth_ - 1].stage : "none", "' is open");
  open_[depth_ - 1].flops += flops;
}

void StepProfiler::stage_end(const ExecContext&, const char* stage) {
  SY_CHECK(depth_ > 0 && std::string(open_[depth_ - 1].stage) == stage, "StepProfiler: stage '", stage,
           "' ends but '", depth_ > 0 ? open_[depth_ - 1].stage : "none", "' is open");
  --depth_;
  intervals_.push_back({open_[depth_].stage, depth_ == 1 ? open_[0].stage : nullptr, open_[depth_].mark,
                        timeline_.mark(), open_[depth_].flops});
}

StepProfile StepProfiler::end_step(int64_t step) {
  SY_CHECK(in_step_ && depth_ == 0, "StepProfiler: end_step without a complete step");
  const int last = timeline_.mark();
  in_step_ = false;
  const std::vector<double> times = timeline_.times_ms();
  StepProfile profile;
  profile.step = step;
  profile.device_ms = times[size_t(last)];
  std::map<std::pair<std::string, std::string>, size_t> index;  // (parent, stage) -> position
  for (const Interval& interval : intervals_) {
    const std::string parent = interval.parent ? interval.parent : "";
    std::vector<StageTime>& list = interval.parent ? profile.substages : profile.stages;
    auto [at, added] = index.emplace(std::make_pair(parent, std::string(interval.stage)), list.size());
    if (added) list.push_back({interval.stage, 0.0, 0, parent});
    StageTime& time = list[at->second];
    time.ms += times[size_t(interval.end)] - times[size_t(interval.begin)];
    time.flops += interval.flops;
    ++time.count;
  }
  return profile;
}

std::string format_step_profile(const std::vector<StepProfile>& profiles, const ProfileFlops& flops) {
  std::ostringstream out;
  if (profiles.empty()) return "step profile: no step was profiled\n";
  const auto categories = mean_categories(profiles);
  const double device_ms = mean_of(profiles, [](const StepProfile& p) { return p.device_ms; });
  const double idle_ms = mean_of(profiles, [](const StepProfile& p) { return p.idle_ms(); });
  char line[200];
  std::snprintf(line, sizeof(line), "step profile: mean of %zu step(s) (steps %lld..%lld), device time per step\n",
                profiles.size(), (long long)profiles.front().step, (long long)profiles.back().step);
  out << line;
  std::snprintf(line, sizeof(line), "  %-28s %10s %10s %10s %7s\n", "part", "fwd ms", "bwd ms", "total ms", "share");
  out << line;
  auto row = [&](const std::string& name, double forward_ms, double backward_ms) {
    const double total = forward_ms + backward_ms;
    std::snprintf(line, sizeof(line), "  %-28s %10.3f %10.3f %10.3f %6.1f%%\n", name.c_str(), forward_ms, backward_ms,
                  total, device_ms > 0 ? 100.0 * total / device_ms : 0.0);
    out << line;
  };
  for (const char* category : kCategories) {
    const auto found = categories.find(category);
    if (found != categories.end()) row(category, found->second.forward_ms, found->second.backward_ms);
  }
  row("idle (no stage queued)", idle_ms, 0.0);
  std::snprintf(line, sizeof(line), "  %-28s %10s %10s %10.3f %6.1f%%\n", "step (first to last mark)", "", "",
                device_ms, 100.0);
  out << line;
  if (flops.step_seconds > 0) {
    const double achieved = flops.tokens_per_step * flops.flops_per_token / flops.step_seconds;
    std::snprintf(line, sizeof(line),
                  "  MFU = tokens/step x FLOP/token / step time / peak = %.0f x %.4g / %.4f s", flops.tokens_per_step,
                  flops.flops_per_token, flops.step_seconds);
    out << line;
    if (flops.peak_flops > 0) {
      std::snprintf(line, sizeof(line), " / %.0f TFLOP/s = %.1f%% (%.1f TFLOP/s achieved)\n", flops.peak_flops / 1e12,
                    100.0 * achieved / flops.peak_flops, achieved / 1e12);
    } else {
      std::snprintf(line, sizeof(line), " = %.3g FLOP/s (no peak on this backend)\n", achieved);
    }
    out << line;
  }
  format_substages(profiles, out);
  return out.str();
}

std::string step_profile_json(const std::vector<StepProfile>& profiles, const ProfileFlops& flops) {
  std::ostringstream out;
  out << "{\"tokens_per_step\": " << json::number(flops.tokens_per_step)
      << ", \"flops_per_token\": " << json::number(flops.flops_per_token)
      << ", \"step_seconds\": " << json::number(flops.step_seconds)
      << ", \"peak_flops\": " << json::number(flops.peak_flops) << ", \"steps\": [";
  for (size_t index = 0; index < profiles.size(); ++index) {
    const StepProfile& profile = profiles[index];
    out << (index ? ", " : "") << "{\"step\": " << profile.step << ", \"device_ms\": " << json::number(profile.device_ms)
        << ", \"idle_ms\": " << json::number(profile.idle_ms()) << ", \"stages\": [";
    for (size_t stage = 0; stage < profile.stages.size(); ++stage) {
      const StageTime& time = profile.stages[stage];
      out << (stage ? ", " : "") << "{\"stage\": " << json::quote(time.stage)
          << ", \"category\": " << json::quote(stage_category(time.stage)) << ", \"ms\": " << json::number(time.ms)
          << ", \"count\": " << time.count << "}";
    }
    out << "], \"substages\": [";
    for (size_t stage = 0; stage < profile.substages.size(); ++stage) {
      const StageTime& time = profile.substages[stage];
      out << (stage ? ", " : "") << "{\"parent\": " << json::quote(time.parent)
          << ", \"stage\": " << json::quote(time.stage) << ", \"ms\": " << json::number(time.ms)
          << ", \"count\": " << time.count << ", \"flops\": " << json::number(time.flops) << "}";
    }
    out << "]}";
  }
  out << "]}";
  return out.str();
}

std::vector<StepProfile> parse_step_profile_json(const std::string& text, const std::string& source,
                                                 ProfileFlops& flops) {
  const json::Value root = json::parse(text, source);
  flops.tokens_per_step = root.at("tokens_per_step", source).as_double(source + ": tokens_per_step");
  flops.flops_per_token = root.at("flops_per_token", source).as_double(source + ": flops_per_token");
  flops.step_seconds = root.at("step_seconds", source).as_double(source + ": step_seconds");
  flops.peak_flops = root.at("peak_flops", source).as_double(source + ": peak_flops");
  std::vector<StepProfile> profiles;
  for (const json::Value& step : root.at("steps", source).as_array(source + ": steps")) {
    const std::string where = source + ": step " + std::to_string(profiles.size());
    StepProfile profile;
    profile.step = step.at("step", where).as_int64(where + ": step");
    profile.device_ms = step.at("device_ms", where).as_double(where + ": device_ms");
    auto read_times = [&](const char* key, bool substages, std::vector<StageTime>& list) {
      for (const json::Value& entry : step.at(key, where).as_array(where + ": " + key)) {
        const std::string at = where + ": " + key + "[" + std::to_string(list.size()) + "]";
        StageTime time;
        time.stage = entry.at("stage", at).as_string(at + ": stage");
        time.ms = entry.at("ms", at).as_double(at + ": ms");
        time.count = int(entry.at("count", at).as_int64(at + ": count"));
        if (substages) time.parent = entry.at("parent", at).as_string(at + ": parent");
        time.flops = entry.number_or("flops", 0.0);  // absent in profiles written before it was counted
        list.push_back(time);
      }
    };
    read_times("stages", false, profile.stages);
    if (step.has("substages")) read_times("substages", true, profile.substages);
    profiles.push_back(profile);
  }
  return profiles;
}

}  // namespace switchyard
