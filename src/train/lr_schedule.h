// Learning-rate schedule: linear warm-up, then cosine decay.
//
// For the optimizer step s = 1 .. N (N = training.steps, W = optimizer.warmup_steps):
//   s <= W:  lr(s) = lr * s / W                                   (reaches lr at s = W)
//   s >  W:  p = (s - W) / (N - W),  lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2
// so the last step runs at min_lr. Steps past N (a resumed run given more steps) stay at min_lr.
#pragma once

#include <cstdint>

#include "src/train/config.h"

namespace switchyard {

class LrSchedule {
 public:
  LrSchedule(const OptimizerConfig& optimizer, int64_t total_steps);
  double at(int64_t step) const;  // step >= 1
  double peak() const { return peak_; }
  double floor() const { return floor_; }

 private:
  double peak_, floor_;
  int64_t warmup_steps_, total_steps_;
};

}  // namespace switchyard
