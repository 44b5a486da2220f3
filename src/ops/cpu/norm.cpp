// CPU reference of LayerNorm and RMSNorm over the rows of x [T, D] (contract: src/ops/model_ops.h).
//
//   layernorm: mean = sum_j x_j / D, var = sum_j (x_j - mean)^2 / D (two passes, biased),
//              rstd = 1 / sqrt(var + eps), xhat = (x - mean) rstd, y = xhat w + b
//   rmsnorm:   rstd = 1 / sqrt(sum_j x_j^2 / D + eps), xhat = x rstd, y = xhat w
//   backward:  g = dy w; layernorm dx = rstd (g - mean_D(g) - xhat mean_D(g xhat)),
//              rmsnorm dx = rstd (g - xhat mean_D(g xhat)); dw = sum_t dy xhat, db = sum_t dy;
//              each written, or (NormAccumulate) added to its old value in double and rounded once
// Everything in double; mean and rstd [T] are stored in the tensors' float type and backward
// uses the stored values (as the CUDA backward does), so forward + backward is one consistent map.
#include <cmath>
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace cpu {
namespace {

using detail::expect_tensor;

template <typename Real>
void forward_impl(bool center, const Tensor& x_tensor, const Tensor& weight_tensor, const Tensor* bias_tensor,
                  double eps, Tensor& out_tensor, Tensor* mean_tensor, Tensor& rstd_tensor) {
  const int64_t rows = x_tensor.dim(0), width = x_tensor.dim(1);
  const Real* x = x_tensor.as<Real>();
  const Real* weight = weight_tensor.as<Real>();
  const Real* bias = bias_tensor ? bias_tensor->as<Real>() : nullptr;
  Real* out = out_tensor.as<Real>();
  for (int64_t row = 0; row < rows; ++row) {
    const Real* x_row = x + row * width;
    double mean = 0.0;
    if (center) {
      for (int64_t j = 0; j < width; ++j) mean += double(x_row[j]);
      mean /= double(width);
    }
    double second_moment = 0.0;
    for (int64_t j = 0; j < width; ++j) {
      const double centered = double(x_row[j]) - mean;
      second_moment += centered * centered;
    }
    const double rstd = 1.0 / std::sqrt(second_moment / double(width) + eps);
    const Real stored_mean = Real(mean), stored_rstd = Real(rstd);
    for (int64_t j = 0; j < width; ++j) {
      const double normalized = (double(x_row[j]) - double(stored_mean)) * double(stored_rstd);
      double value = normalized * double(weight[j]);
      if (bias) value += double(bias[j]);
      out[row * width + j] = Real(value);
    }
    if (mean_tensor) mean_tensor->as<Real>()[row] = stored_mean;
    rstd_tensor.as<Real>()[row] = stored_rstd;
  }
}

template <typename Real>
void backward_impl(bool center, const Tensor& x_tensor, const Tensor& weight_tensor, const Tensor* mean_tensor,
                   const Tensor& rstd_tensor, const Tensor& grad_out_tensor, Tensor& grad_x_tensor,
                   Tensor& grad_weight_tensor, Tensor* grad_bias_tensor, NormAccumulate accumulate) {
  const int64_t rows = x_tensor.dim(0), width = x_tensor.dim(1);
  const Real* x = x_tensor.as<Real>();
  const Real* weight = weight_tensor.as<Real>();
  const Real* grad_out = grad_out_tensor.as<Real>();
  Real* grad_x = grad_x_tensor.as<Real>();
  std::vector<double> grad_weight(size_t(width), 0.0), grad_bias(size_t(width), 0.0);
  std::vector<double> normalized(static_cast<size_t>(width));
  for (int64_t row = 0; row < rows; ++row) {
    const double mean = mean_tensor ? double(mean_tensor->as<Real>()[row]) : 0.0;
    const double rstd = double(rstd_tensor.as<Real>()[row]);
    const Real* x_row = x + row * width;
    const Real* dy_row = grad_out + row * width;
    double sum_g = 0.0, sum_g_xhat = 0.0;
    for (int64_t j = 0; j < width; ++j) {
      normalized[size_t(j)] = (double(x_row[j]) - mean) * rstd;
      const double g = double(dy_row[j]) * double(weight[j]);
      sum_g += g;
      sum_g_xhat += g * normalized[size_t(j)];
      grad_weight[size_t(j)] += double(dy_row[j]) * normalized[size_t(j)];
      grad_bias[size_t(j)] += double(dy_row[j]);
    }
    const double mean_g = center ? sum_g / double(width) : 0.0, mean_g_xhat = sum_g_xhat / double(width);
    for (int64_t j = 0; j < width; ++j) {
      const double g = double(dy_row[j]) * double(weight[j]);
      const double dx = rstd * (g - mean_g - normalized[size_t(j)] * mean_g_xhat);
      Real& out = grad_x[row * width + j];
      out = Real(accumulate.grad_x ? double(out) + dx : dx);
    }
  }
  const auto store = [&](Real& out, double sum) { out = Real(accumulate.params ? double(out) + sum : sum); };
  for (int64_t j = 0; j < width; ++j) {
    store(grad_weight_tensor.as<Real>()[j], grad_weight[size_t(j)]);
    if (grad_bias_tensor) store(grad_bias_tensor->as<Real>()[j], grad_bias[size_t(j)]);
  }
}

// x must be a float [T, D] host tensor and eps positive.
void check_rows(const char* op, const Tensor& x, float eps) {
  detail::expect_float_matrix(op, "x", x, 2);
  SY_CHECK_INPUT(eps > 0.0f && std::isfinite(eps), op, ": eps must be positive and finite, got ", eps);
}

}  // namespace

void layernorm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, Tensor& out, Tensor& mean,
                       Tensor& rstd) {
  const char* op = "layernorm_forward";
  check_rows(op, x, eps);
  const int64_t rows = x.dim(0), width = x.dim(1);
  expect_tensor(op, "weight", weight, x.dtype, {width});
  expect_tensor(op, "bias", bias, x.dtype, {width});
  expect_tensor(op, "out", out, x.dtype, {rows, width});
  expect_tensor(op, "mean", mean, x.dtype, {rows});
  expect_tensor(op, "rstd", rstd, x.dtype, {rows});
  detail::dispatch_float(op, x.dtype, [&](auto tag) {
    forward_impl<decltype(tag)>(true, x, weight, &bias, double(eps), out, &mean, rstd);
  });
}

void layernorm_backward(const Tensor& x, const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                        const Tensor& grad_out, Tensor& grad_x, Tensor& grad_weight, Tensor& grad_bias,
                        NormAccumulate accumulate) {
  const char* op = "layernorm_backward";
  detail::expect_float_matrix(op, "x", x, 2);
  const int64_t rows = x.dim(0), width = x.dim(1);
  expect_tensor(op, "weight", weight, x.dtype, {width});
  expect_tensor(op, "mean", mean, x.dtype, {rows});
  expect_tensor(op, "rstd", rstd, x.dtype, {rows});
  expect_tensor(op, "grad_out", grad_out, x.dtype, {rows, width});
  expect_tensor(op, "grad_x", grad_x, x.dtype, {rows, width});
  expect_tensor(op, "grad_weight", grad_weight, x.dtype, {width});
  expect_tensor(op, "grad_bias", grad_bias, x.dtype, {width});
  detail::dispatch_float(op, x.dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(true, x, weight, &mean, rstd, grad_out, grad_x, grad_weight, &grad_bias, accumulate);
  });
}

void rmsnorm_forward(const Tensor& x, const Tensor& weight, float eps, Tensor& out, Tensor& rstd) {
  const char* op = "rmsnorm_forward";
  check_rows(op, x, eps);
  const int64_t rows = x.dim(0), width = x.dim(1);
  expect_tensor(op, "weight", weight, x.dtype, {width});
  expect_tensor(op, "out", out, x.dtype, {rows, width});
  expect_tensor(op, "rstd", rstd, x.dtype, {rows});
  detail::dispatch_float(op, x.dtype, [&](auto tag) {
    forward_impl<decltype(tag)>(false, x, weight, nullptr, double(eps), out, nullptr, rstd);
  });
}

void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& grad_out, Tensor& grad_x,
                      Tensor& grad_weight, NormAccumulate accumulate) {
  const char* op = "rmsnorm_backward";
  detail::expect_float_matrix(op, "x", x, 2);
  const int64_t rows = x.dim(0), width = x.dim(1);
  expect_tensor(op, "weight", weight, x.dtype, {width});
  expect_tensor(op, "rstd", rstd, x.dtype, {rows});
  expect_tensor(op, "grad_out", grad_out, x.dtype, {rows, width});
  expect_tensor(op, "grad_x", grad_x, x.dtype, {rows, width});
  expect_tensor(op, "grad_weight", grad_weight, x.dtype, {width});
  detail::dispatch_float(op, x.dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(false, x, weight, nullptr, rstd, grad_out, grad_x, grad_weight, nullptr, accumulate);
  });
}

}  // namespace cpu
}  // namespace switchyard
