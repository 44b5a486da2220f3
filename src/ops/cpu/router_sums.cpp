// Router running sums: the argument checks both backends share and the CPU reference
// (contract: src/ops/router_sums.h).
#include "src/ops/router_sums.h"

#include <cmath>

#include "src/core/error.h"

namespace switchyard {

RouterSumsShape validate_router_sums_arguments(const RoutingResult& routing, const Tensor& logits,
                                               const Tensor& accumulator, DeviceKind device) {
  SY_CHECK(logits.rank == 2, "accumulate_router_sums: logits must be [T, E], got ", logits.describe());
  RouterSumsShape shape;
  shape.tokens = logits.dim(0);
  shape.experts = logits.dim(1);
  SY_CHECK(routing.expert_ids.rank == 2 && routing.expert_ids.dim(0) == shape.tokens,
           "accumulate_router_sums: expert_ids ", routing.expert_ids.describe(), " do not match logits ",
           logits.describe());
  shape.choices = routing.expert_ids.dim(1);
  auto expect = [&](const Tensor& tensor, DType dtype, int64_t count, const char* what) {
    SY_CHECK(tensor.dtype == dtype && tensor.numel() == count && tensor.device == device && tensor.data != nullptr,
             "accumulate_router_sums: ", what, " must be ", dtype_name(dtype), "[", count, "] on ",
             device_kind_name(device), ", got ", tensor.describe());
  };
  const DType float_dtype = logits.dtype;
  SY_CHECK(logits.device == device, "accumulate_router_sums: logits on ", device_kind_name(logits.device));
  expect(routing.expert_ids, DType::i32, shape.tokens * shape.choices, "expert_ids");
  expect(routing.slots, DType::i32, shape.tokens * shape.choices, "slots");
  expect(routing.gates, float_dtype, shape.tokens * shape.choices, "gates");
  expect(routing.logsumexp, float_dtype, shape.tokens, "logsumexp");
  expect(routing.expert_counts, DType::i32, shape.experts, "expert_counts");
  expect(routing.scalars, DType::i32, kNumRoutingScalars, "scalars");
  expect(routing.losses, float_dtype, kNumRoutingLosses, "losses");
  expect(accumulator, DType::f64, kNumRouterSums + shape.experts, "accumulator");
  return shape;
}

namespace {

template <typename Float>
void accumulate_host(const RoutingResult& routing, const Tensor& logits, int64_t tokens, int64_t experts,
                     int64_t choices, Tensor& accumulator) {
  const Float* logit_values = logits.as<Float>();
  const Float* logsumexp = routing.logsumexp.as<Float>();
  const Float* gates = routing.gates.as<Float>();
  const int32_t* expert_ids = routing.expert_ids.as<int32_t>();
  const int32_t* slots = routing.slots.as<int32_t>();
  const int32_t* scalars = routing.scalars.as<int32_t>();
  const int64_t capacity = scalars[kCapacity];
  double entropy = 0.0, kept = 0.0, kept_gates = 0.0;
  for (int64_t token = 0; token < tokens; ++token) {
    const double lse = double(logsumexp[token]);
    double token_entropy = 0.0;
    for (int64_t expert = 0; expert < experts; ++expert) {
      const double gap = lse - double(logit_values[token * experts + expert]);  // -ln p >= 0
      token_entropy += std::exp(-gap) * gap;
    }
    entropy += token_entropy;
    for (int64_t choice = 0; choice < choices; ++choice) {
      const int64_t index = token * choices + choice;
      if (expert_ids[index] < 0 || slots[index] < 0 || slots[index] >= capacity) continue;
      kept += 1.0;
      kept_gates += double(gates[index]);
    }
  }
  double* sums = accumulator.as<double>();
  sums[kRouterForwards] += 1.0;
  sums[kRouterTokens] += double(tokens);
  sums[kRouterChoices] += double(scalars[kTotalChoices]);
  sums[kRouterDropped] += double(scalars[kDroppedChoices]);
  sums[kRouterKept] += kept;
  sums[kRouterKeptGateSum] += kept_gates;
  sums[kRouterEntropySum] += entropy;
  sums[kRouterAuxSum] += double(routing.losses.as<Float>()[kAuxLoss]);
  sums[kRouterZSum] += double(routing.losses.as<Float>()[kZLoss]);
  const int32_t* counts = routing.expert_counts.as<int32_t>();
  for (int64_t expert = 0; expert < experts; ++expert) sums[kNumRouterSums + expert] += double(counts[expert]);
}

}  // namespace

namespace cpu {
void accumulate_router_sums(const RoutingResult& routing, const Tensor& logits, Tensor& accumulator) {
  const RouterSumsShape shape = validate_router_sums_arguments(routing, logits, accumulator, DeviceKind::cpu);
  if (logits.dtype == DType::f64)
    accumulate_host<double>(routing, logits, shape.tokens, shape.experts, shape.choices, accumulator);
  else if (logits.dtype == DType::f32)
    accumulate_host<float>(routing, logits, shape.tokens, shape.experts, shape.choices, accumulator);
  else
    SY_THROW("cpu::accumulate_router_sums: logits must be f32 or f64, got ", dtype_name(logits.dtype));
}
}  // namespace cpu

}  // namespace switchyard
