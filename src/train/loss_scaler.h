// Dynamic loss scaling for fp16 training.
//
// The loss (and so every gradient) is multiplied by `scale` before backward so that small fp16
// gradients do not flush to zero; the optimizer divides it out again. After each step's gradients
// are complete, update(found_non_finite) decides:
//   an inf / NaN anywhere   -> skip the step (no parameter or moment changes), scale /= 2, and
//                              restart the count of good steps;
//   otherwise               -> apply the step; after growth_interval good steps in a row,
//                              scale *= 2 (at most kMaxLossScale).
// With scaling disabled (bf16, fp32) the scale stays 1, but a non-finite gradient still skips the
// step. Either way `max_consecutive_skips` skipped steps in a row mean training has diverged
// (or fp16 cannot represent it) and update() throws, instead of spinning without progress.
#pragma once

#include <cstdint>

namespace switchyard {

constexpr double kMaxLossScale = 16777216.0;  // 2^24
constexpr double kMinLossScale = 1.0 / 16777216.0;

struct LossScalerState {
  double scale = 1.0;
  int64_t good_steps = 0;         // finite steps since the last change of scale
  int64_t consecutive_skips = 0;
  int64_t total_skips = 0;
};

class LossScaler {
 public:
  LossScaler(bool enabled, double initial_scale, int64_t growth_interval, int64_t max_consecutive_skips = 50);
  bool enabled() const { return enabled_; }
  double scale() const { return state_.scale; }
  // Returns true when the step should be applied.
  bool update(bool found_non_finite);
  const LossScalerState& state() const { return state_; }
  void restore(const LossScalerState& state);

 private:
  bool enabled_;
  int64_t growth_interval_, max_consecutive_skips_;
  LossScalerState state_;
};

}  // namespace switchyard
