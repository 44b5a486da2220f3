// CPU reference of the gradient check (contract: src/ops/model_ops.h):
//   result[kGradSquaredNorm]     = sum over all tensors and elements of x^2 (double, in order)
//   result[kGradNonFiniteCount]  = number of elements that are inf or NaN
// A non-finite element makes the squared norm non-finite too; the count tells the dynamic loss
// scaler to skip the step without relying on that. Tensors f32 or f64 (any mix); result [2] of
// f32 or f64.
#include <cmath>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace cpu {
namespace {

template <typename Real>
void accumulate(const Tensor& tensor, double& squared_sum, int64_t& non_finite) {
  const Real* values = tensor.as<Real>();
  for (int64_t i = 0; i < tensor.numel(); ++i) {
    const double value = double(values[i]);
    squared_sum += value * value;
    if (!std::isfinite(value)) ++non_finite;
  }
}

}  // namespace

void grad_norm_and_check(const std::vector<Tensor>& tensors, Tensor& result) {
  const char* op = "grad_norm_and_check";
  SY_CHECK(result.device == DeviceKind::cpu && (result.dtype == DType::f32 || result.dtype == DType::f64) &&
               result.numel() == kNumGradCheckResults && result.data != nullptr,
           op, ": result must be an f32 or f64 cpu tensor of ", int(kNumGradCheckResults), " elements, got ",
           result.describe());
  double squared_sum = 0.0;
  int64_t non_finite = 0;
  for (size_t index = 0; index < tensors.size(); ++index) {
    const Tensor& tensor = tensors[index];
    SY_CHECK(tensor.device == DeviceKind::cpu && (tensor.data != nullptr || tensor.numel() == 0), op, ": tensor ",
             index, " must be a cpu tensor with data, got ", tensor.describe());
    detail::dispatch_float(op, tensor.dtype,
                           [&](auto tag) { accumulate<decltype(tag)>(tensor, squared_sum, non_finite); });
  }
  detail::dispatch_float(op, result.dtype, [&](auto tag) {
    using Real = decltype(tag);
    result.as<Real>()[kGradSquaredNorm] = Real(squared_sum);
    result.as<Real>()[kGradNonFiniteCount] = Real(non_finite);
  });
}

}  // namespace cpu
}  // namespace switchyard
