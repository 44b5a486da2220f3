// Dynamic loss scaling (src/train/loss_scaler.h).
#include "src/train/loss_scaler.h"

#include <algorithm>
#include <cmath>

#include "src/core/error.h"

namespace switchyard {

LossScaler::LossScaler(bool enabled, double initial_scale, int64_t growth_interval, int64_t max_consecutive_skips)
    : enabled_(enabled), growth_interval_(growth_interval), max_consecutive_skips_(max_consecutive_skips) {
  SY_CHECK_INPUT(!enabled || (initial_scale > 0 && std::isfinite(initial_scale)),
                 "optimizer.loss_scale_init must be a positive number, got ", initial_scale);
  SY_CHECK_INPUT(growth_interval >= 1, "optimizer.loss_scale_growth_interval must be >= 1, got ", growth_interval);
  SY_CHECK(max_consecutive_skips >= 1, "max_consecutive_skips must be >= 1");
  state_.scale = enabled ? initial_scale : 1.0;
}

bool LossScaler::update(bool found_non_finite) {
  if (found_non_finite) {
    ++state_.consecutive_skips;
    ++state_.total_skips;
    state_.good_steps = 0;
    if (enabled_) state_.scale = std::max(kMinLossScale, state_.scale / 2);
    if (state_.consecutive_skips >= max_consecutive_skips_)
      SY_THROW("the gradients were inf or NaN in ", state_.consecutive_skips, " steps in a row",
               enabled_ ? " (the loss scale fell to " + std::to_string(state_.scale) + ")" : std::string(),
               ": training has diverged; lower optimizer.lr, raise optimizer.warmup_steps or use bf16");
    return false;
  }
  state_.consecutive_skips = 0;
  if (enabled_ && ++state_.good_steps >= growth_interval_) {
    state_.scale = std::min(kMaxLossScale, state_.scale * 2);
    state_.good_steps = 0;
  }
  return true;
}

void LossScaler::restore(const LossScalerState& state) {
  SY_CHECK_INPUT(state.scale > 0 && std::isfinite(state.scale), "loss scaler state: bad scale ", state.scale);
  state_ = state;
  if (!enabled_) state_.scale = 1.0;
}

}  // namespace switchyard
