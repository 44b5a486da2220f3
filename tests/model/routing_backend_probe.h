// Runs a routing configuration once through the CPU backend (forward, the global loss, backward)
// before a model or trainer test uses it, so that a refusal shows up as the op's own error. Every
// modern option (src/ops/moe_ops.h) is in the backend now, so any error is thrown on: the test
// fails. (While the options were on their own branches, a "not ... yet" refusal made the test
// skip; that exemption is gone, and the return value is always "".)
#pragma once

#include <string>

#include "src/core/error.h"
#include "src/ops/ops.h"
#include "tests/support/test_helpers.h"

namespace switchyard {
namespace testing {

// "" when the CPU backend routes (forward and backward) with `params` (num_tokens is replaced by a
// small count) and, if `with_bias`, a selection bias; else the backend's refusal.
inline std::string cpu_routing_missing(RoutingParams params, bool with_bias) {
  const ExecContext cpu{DeviceKind::cpu, nullptr};
  const int experts = params.num_experts;
  params.num_tokens = 2 * int64_t(experts);
  const int64_t tokens = params.num_tokens;
  const int64_t rows = padded_rows_upper_bound(params);
  RoutingBuffers buffers(DeviceKind::cpu, DType::f64, tokens, experts, params.k_max, rows,
                         routing_num_sequences(params));
  RoutingResult routing = buffers.result(tokens);
  HostTensor logits(DType::f64, {tokens, int64_t(experts)}), bias(DType::f64, {int64_t(experts)});
  HostTensor grad_gates(DType::f64, {tokens, int64_t(params.k_max)}), grad_logits(DType::f64, {tokens, int64_t(experts)});
  HostTensor loads(DType::f64, {int64_t(experts)}), fractions(DType::f64, {int64_t(experts)});
  for (int64_t index = 0; index < logits.numel(); ++index)
    set_element(logits.tensor(), index, 0.37 * double((index * 7) % 11) - 1.3);
  for (int64_t index = 0; index < experts; ++index) {
    set_element(bias.tensor(), index, 0.01 * double(index % 3));
    set_element(loads.tensor(), index, double(index + 1));
  }
  for (int64_t index = 0; index < grad_gates.numel(); ++index) set_element(grad_gates.tensor(), index, 0.5);
  RoutingInputs inputs;
  if (with_bias) inputs.selection_bias = &bias.tensor();
  try {
    ops::route(cpu, logits, inputs, params, routing);
    const bool global = params.global_aux_loss_weight > 0.0f;
    if (global) ops::global_balance_loss(cpu, loads, params, routing, fractions);
    ops::route_backward(cpu, logits, grad_gates, routing, params, 1.0f, 1.0f, grad_logits,
                        global ? &fractions.tensor() : nullptr);
  } catch (const Error&) {
    throw;  // a refusal is a failure of the test that needs this configuration
  }
  return "";
}

}  // namespace testing
}  // namespace switchyard
