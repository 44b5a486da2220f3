// AdamW over the model's parameter groups (src/model/parameters.h), and the gradient check
// that drives clipping and the loss scaler.
//
// Per group the optimizer owns two moment buffers (exp_avg, exp_avg_sq) shaped like the group's
// flat master buffer, in the master dtype (fp32; f64 on the CPU reference). One step is one call
// of the fused multi-tensor AdamW op (src/ops/model_ops.h) over four tensors: each group's
// weight-decay range and its no-decay range (norms, biases). The op also refreshes the bf16 /
// fp16 compute copies, so no separate conversion pass runs.
//
// Gradient norms: the squared L2 norm and the non-finite count of each group's gradients, from
// the deterministic grad_norm_and_check op, both groups' results read to the host with one wait;
// the trainer combines them across ranks (the dense group is replicated, the expert group is
// sharded over the expert-parallel ranks).
#pragma once

#include <cstdint>
#include <vector>

#include "src/ops/host_reads.h"
#include "src/ops/model_ops.h"
#include "src/model/parameters.h"
#include "src/train/config.h"

namespace switchyard {

struct GradientNorms {
  double squared[kNumParameterGroups] = {0, 0};     // sum of squares of the group's gradients
  double non_finite[kNumParameterGroups] = {0, 0};  // inf / NaN elements
};

class AdamWOptimizer {
 public:
  AdamWOptimizer(ModelParameters& parameters, const OptimizerConfig& config);
  AdamWOptimizer(const AdamWOptimizer&) = delete;
  AdamWOptimizer& operator=(const AdamWOptimizer&) = delete;

  // One update with learning rate `lr`, every gradient multiplied by `grad_scale` (1 / loss
  // scale times the clip factor). Bias correction uses the number of updates taken so far + 1.
  void step(const ExecContext& context, double lr, double grad_scale);
  int64_t updates() const { return updates_; }
  void set_updates(int64_t updates) { updates_ = updates; }

  // This rank's gradient norms (waits for context.stream).
  GradientNorms gradient_norms(const ExecContext& context);

  Tensor exp_avg(ParameterGroup group) const;
  Tensor exp_avg_sq(ParameterGroup group) const;

 private:
  ModelParameters& parameters_;
  OptimizerConfig config_;
  int64_t updates_ = 0;
  Buffer exp_avg_[kNumParameterGroups], exp_avg_sq_[kNumParameterGroups];
  Buffer norm_result_;  // [2] per group, group after group, on the device
  HostReads norm_reads_;  // both groups' results in one read
  std::vector<AdamWTensor> entries_;
};

}  // namespace switchyard
