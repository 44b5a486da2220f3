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
