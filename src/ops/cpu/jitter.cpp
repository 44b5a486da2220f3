// CPU reference of multiplicative router jitter (Switch Transformer):
//   out[i] = x[i] * factor_i,  factor_i = (1 - eps) + (2 * eps) * u_i,
//   u_i = philox_uniform(seed, stream_id, offset, i)   (src/core/rng.h; i = flat row-major index)
// The factor is evaluated in fp32 in exactly this order, as a GPU thread would, so both backends
// apply the same factor; the product is formed in double and rounded once to the output type.
// Backward is the same op applied to the gradient (d out / d x = factor), with the same
// (seed, stream_id, offset). x and out may alias.
#include "src/ops/cpu/reference_util.h"
#include "src/ops/moe_ops.h"
#include "src/core/rng.h"

namespace switchyard {
namespace cpu {
namespace {

template <typename Real>
void apply_jitter_impl(const Tensor& x_tensor, float eps, uint64_t seed, uint32_t stream_id, uint64_t offset,
                       Tensor& out_tensor) {
  const Real* x = x_tensor.as<Real>();
  Real* out = out_tensor.as<Real>();
  const float low = 1.0f - eps, span = 2.0f * eps;
  const int64_t count = x_tensor.numel();
  for (int64_t index = 0; index < count; ++index) {
    const float factor = low + span * philox_uniform(seed, stream_id, offset, uint64_t(index));
    out[index] = Real(double(x[index]) * double(factor));
  }
}

}  // namespace

void apply_jitter(const Tensor& x, float eps, uint64_t seed, uint32_t stream_id, uint64_t offset, Tensor& out) {
  const char* op = "apply_jitter";
  SY_CHECK(x.rank >= 1, op, ": x must have rank >= 1, got ", x.describe());
  detail::expect_float_matrix(op, "x", x, x.rank);
  SY_CHECK(out.device == DeviceKind::cpu && out.dtype == x.dtype && out.rank == x.rank && out.shape == x.shape, op,
           ": out must match x (", x.describe(), "), got ", out.describe());
  SY_CHECK(eps >= 0.0f && eps < 1.0f, op, ": eps must be in [0, 1), got ", eps);
  detail::dispatch_float(op, x.dtype, [&](auto tag) {
    apply_jitter_impl<decltype(tag)>(x, eps, seed, stream_id, offset, out);
  });
}

}  // namespace cpu
}  // namespace switchyard
