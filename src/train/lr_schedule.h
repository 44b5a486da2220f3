// Learning-rate schedule: linear warm-up, then cosine decay.
//
// For the optimizer step s = 1 .. N (N = training.steps, W = optimizer.warmup_steps):
//   s <= W:  lr(s) = lr * s / W                                   (reaches lr at s = W)
//   s >  W:  p = (s - W) / (N - W),  lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2
// so the last step runs at min_lr. Steps past N stay at min_lr.
//
// N is training.steps, except for a run resumed with more steps than the checkpoint's run planned
// and optimizer.extend_schedule = keep_end: then N stays where the checkpoint's schedule ended
// (resumed_schedule_end), so the learning rate does not climb back up from min_lr. With stretch
// (the default) the cosine is recomputed over the new total.
#pragma once

#include <cstdint>

#include "src/train/config.h"

namespace switchyard {

// N for a run resumed from a checkpoint whose cosine ended at `checkpoint_end`: training_steps,
// or with keep_end checkpoint_end when that is earlier. SY_BAD_INPUT when keep_end would end the
// schedule before optimizer.warmup_steps.
int64_t resumed_schedule_end(const OptimizerConfig& optimizer, int64_t training_steps, int64_t checkpoint_end);

class LrSchedule {
 public:
  LrSchedule(const OptimizerConfig& optimizer, int64_t total_steps);
  double at(int64_t step) const;  // step >= 1
  double peak() const { return peak_; }
  double floor() const { return floor_; }
  int64_t total_steps() const { return total_steps_; }  // N

 private:
  double peak_, floor_;
  int64_t warmup_steps_, total_steps_;
};

}  // namespace switchyard
