// The transformer's routing balance across a step: the step's expert loads, the router biases of
// aux-loss-free balancing and the global-batch loss's running sums (src/model/transformer.h, "Routing
// balance across a step").
#include <algorithm>

#include "src/model/transformer_block.h"
#include "src/ops/ops.h"

namespace switchyard {

void Transformer::allocate_step_loads() {
  const size_t cells = size_t(std::max(1, moe_block_count())) * size_t(moe_.num_experts);
  step_loads_ = Buffer(options_.device, cells * dtype_size(DType::f32));
  device_memset(step_loads_.data(), options_.device, 0, step_loads_.bytes());
  if (moe_.global_aux_loss_weight > 0.0) {
    global_loads_ = Buffer(options_.device, cells * dtype_size(stats_dtype_));
    device_memset(global_loads_.data(), options_.device, 0, global_loads_.bytes());
  }
}

Tensor Transformer::step_loads() const {
  return step_loads_.view(DType::f32, {int64_t(moe_block_count()), int64_t(moe_.num_experts)});
}

Tensor Transformer::step_loads_row(int moe_ordinal) const {
  const int64_t experts = moe_.num_experts;
  return Tensor(step_loads_.as<float>() + size_t(moe_ordinal) * size_t(experts), DType::f32, options_.device,
                {experts});
}

Tensor Transformer::global_loads_row(int moe_ordinal) const {
  const int64_t experts = moe_.num_experts;
  char* base = static_cast<char*>(global_loads_.data());
  SY_CHECK(base != nullptr, "Transformer: no global loads without moe.global_aux_loss_weight > 0");
  return Tensor(base + size_t(moe_ordinal) * size_t(experts) * dtype_size(stats_dtype_), stats_dtype_,
                options_.device, {experts});
}

void Transformer::reset_step_loads(const ExecContext& context) {
  Tensor loads = step_loads();
  ops::fill_zero(context, loads);
  if (global_loads_.data() != nullptr) {
    Tensor running = global_loads_.view(stats_dtype_, {int64_t(moe_block_count()), int64_t(moe_.num_experts)});
    ops::fill_zero(context, running);
  }
}

void Transformer::update_routing_biases(const ExecContext& context, ModelParameters& parameters, float rate) {
  SY_CHECK(parameters.layout().size() == layout_.size(), "Transformer: parameters of a different layout");
  SY_CHECK(context.device == options_.device && parameters.device() == options_.device,
           "Transformer::update_routing_biases: context, parameters and model must share a device");
  for (const auto& block : blocks_) {
    if (!block->is_moe || block->router_bias < 0) continue;
    Tensor bias = parameters.master(block->router_bias);
    ops::update_routing_bias(context, step_loads_row(block->moe_ordinal), rate, bias);
    if (parameters.has_compute_copy()) {  // kept equal to round(master), as AdamW keeps the others
      Tensor compute = parameters.compute(block->router_bias);
      ops::convert(context, bias, compute);
    }
  }
}

std::vector<std::vector<double>> Transformer::routing_biases(const ExecContext& context,
                                                             const ModelParameters& parameters) const {
  SY_CHECK(parameters.layout().size() == layout_.size(), "Transformer: parameters of a different layout");
  std::vector<std::vector<double>> biases;
  for (const auto& block : blocks_) {
    if (!block->is_moe) continue;
    biases.push_back(block->router_bias >= 0 ? parameters.master_values(context, block->router_bias)
                                             : std::vector<double>{});
  }
  return biases;
}

}  // namespace switchyard
