// CPU reference of the token <-> expert-row moves (src/ops/moe_ops.h).
//
// Layout: tokens [T, D]; the expert-contiguous buffer [R, D] gives expert e the rows
// [offsets[e], offsets[e+1]); a kept choice (t, j) (expert id >= 0, slot < capacity) lives at row
// offsets[e] + slot. Rows no choice maps to (segment padding and the tail past offsets[E]) are
// padding: zero in every output, token -1 in row_tokens.
//   permute:                    permuted[row(t, j)] = tokens[t]
//   permute_backward:           grad_tokens[t] = sum_j grad_permuted[row(t, j)]
//   unpermute_combine:          combined[t] = sum_j gate[t, j] * expert_outputs[row(t, j)]
//   unpermute_combine_backward: grad_expert_outputs[row(t, j)] = gate[t, j] * grad_combined[t],
//                               grad_gates[t, j] = <grad_combined[t], expert_outputs[row(t, j)]>
// (sums over kept choices only; dropped and empty choices contribute nothing and get zero).
#include <algorithm>
#include <vector>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace cpu {
namespace {

using detail::expect_tensor;

template <typename Real>
void permute_impl(const Tensor& tokens_tensor, const RoutingResult& routing, const RoutingParams& params,
                  Tensor& permuted_tensor, DispatchMap& map) {
  const int64_t num_tokens = params.num_tokens, width = tokens_tensor.dim(1), rows = permuted_tensor.dim(0);
  const int k_max = params.k_max, num_experts = params.num_experts;
  const Real* tokens = tokens_tensor.as<Real>();
  Real* permuted = permuted_tensor.as<Real>();
  const int32_t* expert_ids = routing.expert_ids.as<int32_t>();
  const int32_t* slots = routing.slots.as<int32_t>();
  const int32_t* offsets = routing.expert_offsets.as<int32_t>();
  const int64_t capacity = routing.scalars.as<int32_t>()[kCapacity];
  int32_t* choice_rows = map.choice_rows.as<int32_t>();
  int32_t* row_tokens = map.row_tokens.as<int32_t>();

  SY_CHECK(offsets[0] == 0 && offsets[num_experts] <= rows, "permute: the layout needs ", offsets[num_experts],
           " rows but permuted has ", rows);
  for (int expert = 0; expert < num_experts; ++expert)
    SY_CHECK(offsets[expert] <= offsets[expert + 1], "permute: expert_offsets decrease at expert ", expert);

  std::fill(permuted, permuted + rows * width, Real(0));
  std::fill(row_tokens, row_tokens + rows, -1);
  for (int64_t token = 0; token < num_tokens; ++token) {
    for (int choice = 0; choice < k_max; ++choice) {
      const int64_t index = token * k_max + choice;
      const int expert = expert_ids[index];
      const int64_t slot = slots[index];
      if (expert < 0 || slot < 0 || slot >= capacity) {
        choice_rows[index] = -1;
        continue;
      }
      SY_CHECK(expert < num_experts, "permute: expert id ", expert, " of token ", token, " is >= E");
      const int64_t row = offsets[expert] + slot;
      SY_CHECK(row < offsets[expert + 1], "permute: slot ", slot, " of token ", token, " overflows the segment of expert ",
               expert);
      std::copy(tokens + token * width, tokens + (token + 1) * width, permuted + row * width);
      row_tokens[row] = int32_t(token);
      choice_rows[index] = int32_t(row);
    }
  }
}

template <typename Real>
void permute_backward_impl(const Tensor& grad_permuted_tensor, const DispatchMap& map, int64_t num_tokens,
                           Tensor& grad_tokens_tensor) {
  const int64_t width = grad_tokens_tensor.dim(1), rows = grad_permuted_tensor.dim(0);
  const int64_t k_max = map.choice_rows.dim(1);
  const Real* grad_permuted = grad_permuted_tensor.as<Real>();
  Real* grad_tokens = grad_tokens_tensor.as<Real>();
  const int32_t* choice_rows = map.choice_rows.as<int32_t>();
  std::vector<double> sum(static_cast<size_t>(width));
  for (int64_t token = 0; token < num_tokens; ++token) {
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int64_t choice = 0; choice < k_max; ++choice) {
      const int64_t row = choice_rows[token * k_max + choice];
      if (row < 0) continue;
      SY_CHECK(row < rows, "permute_backward: choice row ", row, " >= R = ", rows);
      for (int64_t column = 0; column < width; ++column) sum[size_t(column)] += double(grad_permuted[row * width + column]);
    }
    for (int64_t column = 0; column < width; ++column) grad_tokens[token * width + column] = Real(sum[size_t(column)]);
  }
}

template <typename Real>
void unpermute_combine_impl(const Tensor& expert_outputs_tensor, const RoutingResult& routing, const DispatchMap& map,
                            Tensor& combined_tensor) {
  const int64_t num_tokens = combined_tensor.dim(0), width = combined_tensor.dim(1);
  const int64_t k_max = map.choice_rows.dim(1), rows = expert_outputs_tensor.dim(0);
  const Real* outputs = expert_outputs_tensor.as<Real>();
  const Real* gates = routing.gates.as<Real>();
  const int32_t* choice_rows = map.choice_rows.as<int32_t>();
  Real* combined = combined_tensor.as<Real>();
  std::vector<double> sum(static_cast<size_t>(width));
  for (int64_t token = 0; token < num_tokens; ++token) {
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int64_t choice = 0; choice < k_max; ++choice) {
      const int64_t index = token * k_max + choice;
      const int64_t row = choice_rows[index];
      if (row < 0) continue;
      SY_CHECK(row < rows, "unpermute_combine: choice row ", row, " >= R = ", rows);
      const double gate = double(gates[index]);
      for (int64_t column = 0; column < width; ++column) sum[size_t(column)] += gate * double(outputs[row * width + column]);
    }
    for (int64_t column = 0; column < width; ++column) combined[token * width + column] = Real(sum[size_t(column)]);
  }
}

template <typename Real>
void unpermute_combine_backward_impl(const Tensor& grad_combined_tensor, const Tensor& expert_outputs_tensor,
                                     const RoutingResult& routing, const DispatchMap& map,
                                     Tensor& grad_outputs_tensor, Tensor& grad_gates_tensor) {
  const int64_t num_tokens = grad_combined_tensor.dim(0), width = grad_combined_tensor.dim(1);
  const int64_t k_max = map.choice_rows.dim(1), rows = expert_outputs_tensor.dim(0);
  const Real* grad_combined = grad_combined_tensor.as<Real>();
  const Real* outputs = expert_outputs_tensor.as<Real>();
  const Real* gates = routing.gates.as<Real>();
  const int32_t* choice_rows = map.choice_rows.as<int32_t>();
  Real* grad_outputs = grad_outputs_tensor.as<Real>();
  Real* grad_gates = grad_gates_tensor.as<Real>();

  std::fill(grad_outputs, grad_outputs + rows * width, Real(0));
  for (int64_t token = 0; token < num_tokens; ++token) {
    const Real* grad_row = grad_combined + token * width;
    for (int64_t choice = 0; choice < k_max; ++choice) {
      const int64_t index = token * k_max + choice;
      const int64_t row = choice_rows[index];
      if (row < 0) {
        grad_gates[index] = Real(0);
        continue;
      }
      SY_CHECK(row < rows, "unpermute_combine_backward: choice row ", row, " >= R = ", rows);
      const double gate = double(gates[index]);
      double dot = 0.0;
      for (int64_t column = 0; column < width; ++column) {
        dot += double(grad_row[column]) * double(outputs[row * width + column]);
        grad_outputs[row * width + column] = Real(gate * double(grad_row[column]));
      }
      grad_gates[index] = Real(dot);
    }
  }
}

void check_choice_rows(const char* op, const DispatchMap& map, int64_t num_tokens) {
  SY_CHECK(map.choice_rows.rank == 2 && map.choice_rows.dim(0) == num_tokens, op,
           ": map.choice_rows must be int32[T=", num_tokens, ", K], got ", map.choice_rows.describe());
  expect_tensor(op, "map.choice_rows", map.choice_rows, DType::i32, {num_tokens, map.choice_rows.dim(1)});
}

}  // namespace

void permute(const Tensor& tokens, const RoutingResult& routing, const RoutingParams& params, Tensor& permuted,
             DispatchMap& map) {
  validate_routing_params(params);
  detail::expect_float_matrix("permute", "tokens", tokens, 2);
  const DType real = tokens.dtype;
  const int64_t tokens_count = params.num_tokens, width = tokens.dim(1), k = params.k_max;
  SY_CHECK(permuted.rank == 2, "permute: permuted must be [R, D], got ", permuted.describe());
  const int64_t rows = permuted.dim(0);
  expect_tensor("permute", "tokens", tokens, real, {tokens_count, width});
  expect_tensor("permute", "permuted", permuted, real, {rows, width});
  expect_tensor("permute", "expert_ids", routing.expert_ids, DType::i32, {tokens_count, k});
  expect_tensor("permute", "slots", routing.slots, DType::i32, {tokens_count, k});
  expect_tensor("permute", "expert_offsets", routing.expert_offsets, DType::i32, {params.num_experts + 1});
  expect_tensor("permute", "scalars", routing.scalars, DType::i32, {kNumRoutingScalars});
  expect_tensor("permute", "map.choice_rows", map.choice_rows, DType::i32, {tokens_count, k});
  expect_tensor("permute", "map.row_tokens", map.row_tokens, DType::i32, {rows});
  detail::dispatch_float("permute", real, [&](auto tag) {
    permute_impl<decltype(tag)>(tokens, routing, params, permuted, map);
  });
}

void permute_backward(const Tensor& grad_permuted, const DispatchMap& map, int64_t num_tokens, Tensor& grad_tokens) {
  detail::expect_float_matrix("permute_backward", "grad_permuted", grad_permuted, 2);
  const DType real = grad_permuted.dtype;
  expect_tensor("permute_backward", "grad_tokens", grad_tokens, real, {num_tokens, grad_permuted.dim(1)});
  check_choice_rows("permute_backward", map, num_tokens);
  detail::dispatch_float("permute_backward", real, [&](auto tag) {
    permute_backward_impl<decltype(tag)>(grad_permuted, map, num_tokens, grad_tokens);
  });
}

void unpermute_combine(const Tensor& expert_outputs, const RoutingResult& routing, const DispatchMap& map,
                       Tensor& combined) {
  detail::expect_float_matrix("unpermute_combine", "expert_outputs", expert_outputs, 2);
  detail::expect_float_matrix("unpermute_combine", "combined", combined, 2);
  const DType real = expert_outputs.dtype;
  const int64_t num_tokens = combined.dim(0);
  check_choice_rows("unpermute_combine", map, num_tokens);
  const int64_t k = map.choice_rows.dim(1);
  expect_tensor("unpermute_combine", "combined", combined, real, {num_tokens, expert_outputs.dim(1)});
  expect_tensor("unpermute_combine", "gates", routing.gates, real, {num_tokens, k});
  detail::dispatch_float("unpermute_combine", real, [&](auto tag) {
    unpermute_combine_impl<decltype(tag)>(expert_outputs, routing, map, combined);
  });
}

void unpermute_combine_backward(const Tensor& grad_combined, const Tensor& expert_outputs,
                                const RoutingResult& routing, const DispatchMap& map, Tensor& grad_expert_outputs,
                                Tensor& grad_gates) {
  const char* op = "unpermute_combine_backward";
  detail::expect_float_matrix(op, "expert_outputs", expert_outputs, 2);
  detail::expect_float_matrix(op, "grad_combined", grad_combined, 2);
  const DType real = expert_outputs.dtype;
  const int64_t num_tokens = grad_combined.dim(0), width = expert_outputs.dim(1), rows = expert_outputs.dim(0);
  check_choice_rows(op, map, num_tokens);
  const int64_t k = map.choice_rows.dim(1);
  expect_tensor(op, "grad_combined", grad_combined, real, {num_tokens, width});
  expect_tensor(op, "grad_expert_outputs", grad_expert_outputs, real, {rows, width});
  expect_tensor(op, "gates", routing.gates, real, {num_tokens, k});
  expect_tensor(op, "grad_gates", grad_gates, real, {num_tokens, k});
  detail::dispatch_float(op, real, [&](auto tag) {
    unpermute_combine_backward_impl<decltype(tag)>(grad_combined, expert_outputs, routing, map, grad_expert_outputs,
                                                   grad_gates);
  });
}

}  // namespace cpu
}  // namespace switchyard
