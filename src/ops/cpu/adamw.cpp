// CPU reference of the multi-tensor AdamW step (contract: src/ops/model_ops.h).
//
// Per element, with the coefficients c = adamw_coefficients(params):
//   g = grad * c.grad_scale
//   m = c.beta1 * m + c.one_minus_beta1 * g
//   v = c.beta2 * v + c.one_minus_beta2 * (g * g)
//   denom = sqrt(v) / c.sqrt_bias2 + c.eps
//   p = p * c.decay_factor                      (tensors with weight decay only)
//   p = p - (c.step_size * m) / denom
//   compute_copy = round(p)                     (bf16 / fp16, nearest even)
// f32 tensors: each line is evaluated as written, one correctly rounded fp32 operation at a
// time (the build uses no FMA contraction for C++; the CUDA kernel uses the _rn intrinsics),
// which is what makes the two backends agree bit for bit. f64 tensors: the same in double.
#include <cmath>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/model_ops.h"

namespace switchyard {

void validate_adamw_params(const AdamWParams& params) {
  SY_CHECK_INPUT(params.step >= 1, "adamw: step must be >= 1 (1-based), got ", params.step);
  SY_CHECK_INPUT(params.beta1 >= 0.0 && params.beta1 < 1.0, "adamw: beta1 must be in [0, 1), got ", params.beta1);
  SY_CHECK_INPUT(params.beta2 >= 0.0 && params.beta2 < 1.0, "adamw: beta2 must be in [0, 1), got ", params.beta2);
  SY_CHECK_INPUT(params.lr >= 0.0 && std::isfinite(params.lr), "adamw: lr must be finite and >= 0, got ", params.lr);
  SY_CHECK_INPUT(params.eps > 0.0 && std::isfinite(params.eps), "adamw: eps must be finite and > 0, got ", params.eps);
  SY_CHECK_INPUT(params.weight_decay >= 0.0 && std::isfinite(params.weight_decay),
                 "adamw: weight_decay must be finite and >= 0, got ", params.weight_decay);
  SY_CHECK_INPUT(std::isfinite(params.grad_scale), "adamw: grad_scale must be finite, got ", params.grad_scale);
}

namespace cpu {
namespace {

void check_entry(const AdamWTensor& entry, size_t index) {
  const Tensor* parts[] = {&entry.param, &entry.grad, &entry.exp_avg, &entry.exp_avg_sq};
  const char* names[] = {"param", "grad", "exp_avg", "exp_avg_sq"};
  const DType dtype = entry.param.dtype;
  for (int part = 0; part < 4; ++part) {
    const Tensor& tensor = *parts[part];
    SY_CHECK(tensor.device == DeviceKind::cpu && tensor.dtype == dtype &&
                 (dtype == DType::f32 || dtype == DType::f64) && tensor.numel() == entry.param.numel() &&
                 (tensor.data != nullptr || tensor.numel() == 0),
             "adamw_step: tensor ", index, ": ", names[part], " must be an f32 or f64 cpu tensor like param (",
             entry.param.describe(), "), got ", tensor.describe());
  }
  if (entry.compute_copy.data) {
    const Tensor& copy = entry.compute_copy;
    SY_CHECK(copy.device == DeviceKind::cpu && (copy.dtype == DType::bf16 || copy.dtype == DType::f16) &&
                 copy.numel() == entry.param.numel(),
             "adamw_step: tensor ", index, ": compute_copy must be a bf16 or f16 cpu tensor of ", entry.param.numel(),
             " elements, got ", copy.describe());
  }
}

void store_copy(const Tensor& copy, int64_t index, float value) {
  if (copy.dtype == DType::bf16)
    copy.as<Bf16>()[index] = Bf16(value);
  else
    copy.as<Half>()[index] = Half(value);
}

void step_f32(const AdamWTensor& entry, const AdamWCoefficients& c) {
  float* param = entry.param.as<float>();
  const float* grad = entry.grad.as<float>();
  float* exp_avg = entry.exp_avg.as<float>();
  float* exp_avg_sq = entry.exp_avg_sq.as<float>();
  const bool has_copy = entry.compute_copy.data != nullptr;
  for (int64_t i = 0; i < entry.param.numel(); ++i) {
    const float g = grad[i] * c.grad_scale;
    const float m = c.beta1 * exp_avg[i] + c.one_minus_beta1 * g;
    const float g_squared = g * g;
    const float v = c.beta2 * exp_avg_sq[i] + c.one_minus_beta2 * g_squared;
    const float denom = std::sqrt(v) / c.sqrt_bias2 + c.eps;
    float p = param[i];
    if (entry.weight_decay) p = p * c.decay_factor;
    const float update = (c.step_size * m) / denom;
    p = p - update;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = p;
    if (has_copy) store_copy(entry.compute_copy, i, p);
  }
}

void step_f64(const AdamWTensor& entry, const AdamWParams& params) {
  const double bias1 = 1.0 - std::pow(params.beta1, double(params.step));
  const double bias2 = 1.0 - std::pow(params.beta2, double(params.step));
  double* param = entry.param.as<double>();
  const double* grad = entry.grad.as<double>();
  double* exp_avg = entry.exp_avg.as<double>();
  double* exp_avg_sq = entry.exp_avg_sq.as<double>();
  for (int64_t i = 0; i < entry.param.numel(); ++i) {
    const double g = grad[i] * params.grad_scale;
    exp_avg[i] = params.beta1 * exp_avg[i] + (1.0 - params.beta1) * g;
    exp_avg_sq[i] = params.beta2 * exp_avg_sq[i] + (1.0 - params.beta2) * g * g;
    const double denom = std::sqrt(exp_avg_sq[i]) / std::sqrt(bias2) + params.eps;
    if (entry.weight_decay) param[i] *= 1.0 - params.lr * params.weight_decay;
    param[i] -= params.lr / bias1 * exp_avg[i] / denom;
    if (entry.compute_copy.data) store_copy(entry.compute_copy, i, float(param[i]));
  }
}

}  // namespace

void adamw_step(const std::vector<AdamWTensor>& tensors, const AdamWParams& params) {
  validate_adamw_params(params);
  for (size_t index = 0; index < tensors.size(); ++index) check_entry(tensors[index], index);
  const AdamWCoefficients coefficients = adamw_coefficients(params);
  for (const AdamWTensor& entry : tensors) {
    if (entry.param.dtype == DType::f32)
      step_f32(entry, coefficients);
    else
      step_f64(entry, params);
  }
}

}  // namespace cpu
}  // namespace switchyard
