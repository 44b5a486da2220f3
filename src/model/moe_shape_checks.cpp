// Shape checks shared by the MoE layers (src/model/moe_shape_checks.h).
#include "src/model/moe_shape_checks.h"

#include <string>

#include "src/core/error.h"

namespace switchyard {

void expect_moe_tensor(const char* owner, const char* what, const Tensor& tensor, DType dtype, DeviceKind device,
                       std::initializer_list<int64_t> dims) {
  bool matches = tensor.dtype == dtype && tensor.device == device && tensor.rank == int(dims.size()) &&
                 (tensor.data != nullptr || tensor.numel() == 0);
  int axis = 0;
  for (int64_t dim : dims) matches = matches && tensor.shape[axis++] == dim;
  if (matches) return;
  std::string expected = "[";
  axis = 0;
  for (int64_t dim : dims) expected += (axis++ ? ", " : "") + std::to_string(dim);
  SY_THROW(owner, ": ", what, " must be ", dtype_name(dtype), expected, "] on ", device_kind_name(device), ", got ",
           tensor.describe());
}

int64_t expect_moe_forward_io(const char* owner, const ExecContext& context, DeviceKind device, const Tensor& x,
                              const Tensor& y, int64_t d_model, DType dtype, int64_t max_tokens) {
  SY_CHECK(context.device == device, owner, "::forward: context is on ", device_kind_name(context.device),
           ", the layer on ", device_kind_name(device));
  SY_CHECK(x.rank == 2, owner, "::forward: x must be [T, D], got ", x.describe());
  const int64_t tokens = x.dim(0);
  SY_CHECK(tokens >= 1 && tokens <= max_tokens, owner, "::forward: ", tokens, " tokens, the layer holds 1 to ",
           max_tokens);
  expect_moe_tensor(owner, "x", x, dtype, device, {tokens, d_model});
  expect_moe_tensor(owner, "y", y, dtype, device, {tokens, d_model});
  return tokens;
}

void expect_moe_weights(const char* owner, const MoeLayerConfig& config, int64_t experts_held,
                        const MoeWeights& weights, DType dtype, DeviceKind device, const char* what) {
  const int64_t d_model = config.d_model;
  const std::string prefix(what);
  expect_moe_tensor(owner, (prefix + ".router").c_str(), weights.router, dtype, device,
                    {d_model, int64_t(config.moe.num_experts)});
  expect_moe_tensor(owner, (prefix + ".w1").c_str(), weights.w1, dtype, device,
                    {experts_held, d_model, config.w1_columns()});
  expect_moe_tensor(owner, (prefix + ".w2").c_str(), weights.w2, dtype, device,
                    {experts_held, config.moe.expert_d_ff, d_model});
}

}  // namespace switchyard
