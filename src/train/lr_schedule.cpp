// Learning-rate schedule (src/train/lr_schedule.h).
#include "src/train/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include "src/core/error.h"

namespace switchyard {

LrSchedule::LrSchedule(const OptimizerConfig& optimizer, int64_t total_steps)
    : peak_(optimizer.lr), floor_(optimizer.min_lr), warmup_steps_(optimizer.warmup_steps), total_steps_(total_steps) {
  SY_CHECK_INPUT(total_steps >= 1, "training.steps must be >= 1, got ", total_steps);
  SY_CHECK_INPUT(warmup_steps_ >= 0 && warmup_steps_ <= total_steps, "optimizer.warmup_steps = ", warmup_steps_,
                 " must lie in [0, training.steps = ", total_steps, "]");
  SY_CHECK_INPUT(floor_ >= 0 && floor_ <= peak_, "optimizer.min_lr = ", floor_, " must lie in [0, lr = ", peak_, "]");
}

int64_t resumed_schedule_end(const OptimizerConfig& optimizer, int64_t training_steps, int64_t checkpoint_end) {
  if (optimizer.extend_schedule != ScheduleExtension::keep_end || checkpoint_end >= training_steps)
    return training_steps;
  SY_CHECK_INPUT(optimizer.warmup_steps <= checkpoint_end, "optimizer.extend_schedule = keep_end keeps the "
                 "checkpoint's learning-rate schedule, which ends at step ", checkpoint_end, ", but optimizer.warmup_steps = ",
                 optimizer.warmup_steps, " ends later: lower warmup_steps or use extend_schedule = stretch");
  return checkpoint_end;
}

double LrSchedule::at(int64_t step) const {
  SY_CHECK(step >= 1, "LrSchedule: steps count from 1, got ", step);
  if (step <= warmup_steps_) return peak_ * double(step) / double(warmup_steps_);
  if (total_steps_ == warmup_steps_) return peak_;  // no decay phase
  const double progress =
      std::min(1.0, double(step - warmup_steps_) / double(total_steps_ - warmup_steps_));
  return floor_ + (peak_ - floor_) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

}  // namespace switchyard
