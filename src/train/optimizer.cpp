// AdamW and gradient norms over parameter groups (src/train/optimizer.h).
#include "src/train/optimizer.h"

#include "src/ops/ops.h"

namespace switchyard {

AdamWOptimizer::AdamWOptimizer(ModelParameters& parameters, const OptimizerConfig& config)
    : parameters_(parameters), config_(config) {
  const DeviceKind device = parameters.device();
  const DType dtype = parameters.master_dtype();
  for (int group = 0; group < kNumParameterGroups; ++group) {
    const size_t bytes = size_t(parameters.layout().group_elements(ParameterGroup(group))) * dtype_size(dtype);
    exp_avg_[group] = Buffer(device, bytes);
    exp_avg_sq_[group] = Buffer(device, bytes);
    if (bytes) {
      device_memset(exp_avg_[group].data(), device, 0, bytes);
      device_memset(exp_avg_sq_[group].data(), device, 0, bytes);
    }
  }
  // The result dtype: f64 on the CPU (exact sums for the f64 reference), fp32 on CUDA.
  const DType result_dtype = device == DeviceKind::cpu ? DType::f64 : DType::f32;
  norm_result_ = Buffer(device, size_t(kNumParameterGroups * kNumGradCheckResults) * dtype_size(result_dtype));
  norm_reads_ = HostReads(device);

  // Each group's decay range, then its no-decay range: four tensors, the same list every step.
  for (int group = 0; group < kNumParameterGroups; ++group) {
    const ParameterGroup which = ParameterGroup(group);
    const int64_t elements = parameters.layout().group_elements(which);
    const int64_t split = parameters.layout().decay_elements(which);
    for (bool decay : {true, false}) {
      const int64_t begin = decay ? 0 : split, end = decay ? split : elements;
      if (end == begin) continue;
      AdamWTensor entry;
      entry.param = parameters.master_group(which, begin, end);
      entry.grad = parameters.grad_group(which, begin, end);
      entry.exp_avg = make_tensor(static_cast<char*>(exp_avg_[group].data()) + size_t(begin) * dtype_size(dtype),
                                  dtype, device, {end - begin});
      entry.exp_avg_sq = make_tensor(
          static_cast<char*>(exp_avg_sq_[group].data()) + size_t(begin) * dtype_size(dtype), dtype, device,
          {end - begin});
      if (parameters.has_compute_copy()) entry.compute_copy = parameters.compute_group(which, begin, end);
      entry.weight_decay = decay;
      entries_.push_back(entry);
    }
  }
}

void AdamWOptimizer::step(const ExecContext& context, double lr, double grad_scale) {
  AdamWParams params;
  params.lr = lr;
  params.beta1 = config_.beta1;
  params.beta2 = config_.beta2;
  params.eps = config_.eps;
  params.weight_decay = config_.weight_decay;
  params.step = updates_ + 1;
  params.grad_scale = grad_scale;
  if (!entries_.empty()) ops::adamw_step(context, entries_, params);
  ++updates_;
}

GradientNorms AdamWOptimizer::gradient_norms(const ExecContext& context) {
  GradientNorms norms;
  const DeviceKind device = parameters_.device();
  const DType result_dtype = device == DeviceKind::cpu ? DType::f64 : DType::f32;
  const size_t result_bytes = size_t(kNumGradCheckResults) * dtype_size(result_dtype);
  HostFloats<kNumGradCheckResults> results[kNumParameterGroups];
  bool present[kNumParameterGroups] = {};
  norm_reads_.clear();
  for (int group = 0; group < kNumParameterGroups; ++group) {
    const ParameterGroup which = ParameterGroup(group);
    if (parameters_.layout().group_elements(which) == 0) continue;
    present[group] = true;
    Tensor result(static_cast<char*>(norm_result_.data()) + size_t(group) * result_bytes, result_dtype, device,
                  {kNumGradCheckResults});
    ops::grad_norm_and_check(context, {parameters_.grad_group(which)}, result);
    norm_reads_.add(result, results[group].destination(result_dtype));
  }
  norm_reads_.read(context);  // one wait for both groups
  for (int group = 0; group < kNumParameterGroups; ++group) {
    if (!present[group]) continue;
    norms.squared[group] = results[group].value(kGradSquaredNorm, result_dtype);
    norms.non_finite[group] = results[group].value(kGradNonFiniteCount, result_dtype);
  }
  return norms;
}

Tensor AdamWOptimizer::exp_avg(ParameterGroup group) const {
  return make_tensor(exp_avg_[int(group)].data(), parameters_.master_dtype(), parameters_.device(),
                     {parameters_.layout().group_elements(group)});
}

Tensor AdamWOptimizer::exp_avg_sq(ParameterGroup group) const {
  return make_tensor(exp_avg_sq_[int(group)].data(), parameters_.master_dtype(), parameters_.device(),
                     {parameters_.layout().group_elements(group)});
}

}  // namespace switchyard
