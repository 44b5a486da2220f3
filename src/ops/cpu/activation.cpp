// CPU reference of the expert activations (elementwise, computed in double).
//
//   gelu_tanh: post = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3);  pre, post [R, F]
//              d post / d x = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
//   swiglu:    pre [R, 2F] = [gate | up] (first F columns, then F columns of each row), post [R, F]
//              post = silu(gate) * up,  silu(g) = g * sigmoid(g)
//              d/d gate = grad * up * sigmoid(g) (1 + g (1 - sigmoid(g))),  d/d up = grad * silu(g)
#include <cmath>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/moe_ops.h"

namespace switchyard {
namespace cpu {
namespace {

using detail::expect_tensor;

constexpr double kSqrtTwoOverPi = 0.79788456080286535588;
constexpr double kGeluCubic = 0.044715;

double gelu_tanh(double x) {
  const double inner = kSqrtTwoOverPi * (x + kGeluCubic * x * x * x);
  return 0.5 * x * (1.0 + std::tanh(inner));
}

double gelu_tanh_derivative(double x) {
  const double inner = kSqrtTwoOverPi * (x + kGeluCubic * x * x * x);
  const double tanh_inner = std::tanh(inner);
  return 0.5 * (1.0 + tanh_inner) +
         0.5 * x * (1.0 - tanh_inner * tanh_inner) * kSqrtTwoOverPi * (1.0 + 3.0 * kGeluCubic * x * x);
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Output width F, checking pre's width against the activation.
int64_t check_activation_shapes(const char* op, ExpertActivation activation, const Tensor& pre, const Tensor& post,
                                const char* post_name) {
  detail::expect_float_matrix(op, "pre", pre, 2);
  const int64_t rows = pre.dim(0);
  int64_t width = pre.dim(1);
  if (activation == ExpertActivation::swiglu) {
    SY_CHECK(width % 2 == 0, op, ": swiglu needs pre of even width [R, 2F], got ", pre.describe());
    width /= 2;
  } else {
    SY_CHECK(activation == ExpertActivation::gelu_tanh, op, ": unknown activation ", int(activation));
  }
  expect_tensor(op, post_name, post, pre.dtype, {rows, width});
  return width;
}

template <typename Real>
void activation_forward_impl(ExpertActivation activation, const Tensor& pre_tensor, Tensor& post_tensor,
                             int64_t width) {
  const int64_t rows = pre_tensor.dim(0);
  const Real* pre = pre_tensor.as<Real>();
  Real* post = post_tensor.as<Real>();
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t column = 0; column < width; ++column) {
      if (activation == ExpertActivation::gelu_tanh) {
        post[row * width + column] = Real(gelu_tanh(double(pre[row * width + column])));
      } else {
        const double gate = double(pre[row * 2 * width + column]);
        const double up = double(pre[row * 2 * width + width + column]);
        post[row * width + column] = Real(gate * sigmoid(gate) * up);
      }
    }
  }
}

template <typename Real>
void activation_backward_impl(ExpertActivation activation, const Tensor& pre_tensor, const Tensor& grad_post_tensor,
                              Tensor& grad_pre_tensor, int64_t width) {
  const int64_t rows = pre_tensor.dim(0);
  const Real* pre = pre_tensor.as<Real>();
  const Real* grad_post = grad_post_tensor.as<Real>();
  Real* grad_pre = grad_pre_tensor.as<Real>();
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t column = 0; column < width; ++column) {
      const double grad = double(grad_post[row * width + column]);
      if (activation == ExpertActivation::gelu_tanh) {
        grad_pre[row * width + column] = Real(grad * gelu_tanh_derivative(double(pre[row * width + column])));
      } else {
        const double gate = double(pre[row * 2 * width + column]);
        const double up = double(pre[row * 2 * width + width + column]);
        const double gate_sigmoid = sigmoid(gate);
        grad_pre[row * 2 * width + column] = Real(grad * up * gate_sigmoid * (1.0 + gate * (1.0 - gate_sigmoid)));
        grad_pre[row * 2 * width + width + column] = Real(grad * gate * gate_sigmoid);
      }
    }
  }
}

}  // namespace

void activation_forward(ExpertActivation activation, const Tensor& pre, Tensor& post) {
  const int64_t width = check_activation_shapes("activation_forward", activation, pre, post, "post");
  detail::dispatch_float("activation_forward", pre.dtype, [&](auto tag) {
    activation_forward_impl<decltype(tag)>(activation, pre, post, width);
  });
}

void activation_backward(ExpertActivation activation, const Tensor& pre, const Tensor& grad_post, Tensor& grad_pre) {
  const char* op = "activation_backward";
  const int64_t width = check_activation_shapes(op, activation, pre, grad_post, "grad_post");
  expect_tensor(op, "grad_pre", grad_pre, pre.dtype, {pre.dim(0), pre.dim(1)});
  detail::dispatch_float(op, pre.dtype, [&](auto tag) {
    activation_backward_impl<decltype(tag)>(activation, pre, grad_post, grad_pre, width);
  });
}

}  // namespace cpu
}  // namespace switchyard
