// CPU reference ops other than routing (permute / combine, grouped GEMMs, activations, jitter,
// dense GEMM, elementwise helpers) and the ops:: dispatch, each against an independent
// computation in the test or against finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "src/ops/gemm.h"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "src/core/rng.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

// A routed batch: logits -> routing on the host, with buffers for the layout.
struct RoutedBatch {
  RoutingParams params;
  int64_t rows = 0;
  RoutingBuffers buffers;
  RoutingResult routing;
  DispatchMap map;

  RoutedBatch(int64_t tokens, int experts, int k, float capacity_factor, int alignment, DType real, uint64_t seed,
              bool skew = false) {
    params.num_tokens = tokens;
    params.num_experts = experts;
    params.k_max = k;
    params.renormalize = true;
    params.capacity_factor = capacity_factor;
    params.segment_alignment = alignment;
    rows = padded_rows_upper_bound(params);
    buffers = RoutingBuffers(DeviceKind::cpu, real, tokens, experts, k, rows);
    routing = buffers.result(tokens);
    map = buffers.map(tokens, rows);
    HostTensor logits(real, {tokens, experts});
    std::mt19937_64 generator(seed);
    fill_normal(logits, generator, 0.0, 1.5);
    if (skew)  // pile tokens onto expert 0 so it overflows
      for (int64_t t = 0; t < tokens; ++t) set_element(logits, t * experts, get_element(logits, t * experts) + 3.0);
    cpu::route(logits, nullptr, params, routing);
  }
  int capacity() const { return int(get_element(routing.scalars, kCapacity)); }
  bool kept(int64_t index) const {
    return get_element(routing.expert_ids, index) >= 0 && get_element(routing.slots, index) < capacity();
  }
  int64_t expected_row(int64_t index) const {
    const int expert = int(get_element(routing.expert_ids, index));
    return int64_t(get_element(routing.expert_offsets, expert) + get_element(routing.slots, index));
  }
};

// ---- permute and its backward ----------------------------------------------------------------

TEST(Permute, PlacesKeptChoicesAndZeroesPadding) {
  for (DType real : {DType::f32, DType::f64}) {
    RoutedBatch batch(37, 4, 2, 0.8f, 8, real, 5, /*skew=*/true);
    ASSERT_GT(get_element(batch.routing.scalars, kDroppedChoices), 0.0);
    const int64_t width = 5;
    HostTensor tokens(real, {37, width}), permuted(real, {batch.rows, width});
    std::mt19937_64 generator(1);
    fill_uniform(tokens, generator, -1, 1);
    poison(permuted);
    poison(batch.map.choice_rows);
    poison(batch.map.row_tokens);
    cpu::permute(tokens, batch.routing, batch.params, permuted, batch.map);

    std::vector<int> expected_row_tokens(size_t(batch.rows), -1);
    for (int64_t index = 0; index < 37 * 2; ++index) {
      const int64_t row = int64_t(get_element(batch.map.choice_rows, index));
      if (!batch.kept(index)) {
        EXPECT_EQ(row, -1) << "choice " << index;
        continue;
      }
      ASSERT_EQ(row, batch.expected_row(index));
      expected_row_tokens[size_t(row)] = int(index / 2);
      for (int64_t d = 0; d < width; ++d)
        EXPECT_EQ(get_element(permuted, row * width + d), get_element(tokens, (index / 2) * width + d));
    }
    for (int64_t row = 0; row < batch.rows; ++row) {
      EXPECT_EQ(get_element(batch.map.row_tokens, row), double(expected_row_tokens[size_t(row)])) << "row " << row;
      if (expected_row_tokens[size_t(row)] < 0)
        for (int64_t d = 0; d < width; ++d) EXPECT_EQ(get_element(permuted, row * width + d), 0.0) << "row " << row;
    }
  }
}

TEST(Permute, BackwardIsTheAdjointAndSumsChoices) {
  RoutedBatch batch(50, 8, 3, 1.0f, 4, DType::f64, 7, true);
  const int64_t width = 6;
  HostTensor tokens(DType::f64, {50, width}), permuted(DType::f64, {batch.rows, width});
  HostTensor grad_permuted(DType::f64, {batch.rows, width}), grad_tokens(DType::f64, {50, width});
  std::mt19937_64 generator(2);
  fill_uniform(tokens, generator, -1, 1);
  fill_uniform(grad_permuted, generator, -1, 1);
  cpu::permute(tokens, batch.routing, batch.params, permuted, batch.map);
  poison(grad_tokens);
  cpu::permute_backward(grad_permuted, batch.map, 50, grad_tokens);
  // <permute(x), g> = <x, permute_backward(g)> for every x, g.
  EXPECT_NEAR(dot(permuted, grad_permuted), dot(tokens, grad_tokens), 1e-12);
  for (int64_t t = 0; t < 50; ++t) {
    for (int64_t d = 0; d < width; ++d) {
      double expected = 0;
      for (int j = 0; j < 3; ++j)
        if (batch.kept(t * 3 + j)) expected += get_element(grad_permuted, batch.expected_row(t * 3 + j) * width + d);
      EXPECT_NEAR(get_element(grad_tokens, t * width + d), expected, 1e-14);
    }
  }
}

// ---- unpermute_combine and its backward ------------------------------------------------------

TEST(UnpermuteCombine, WeightsKeptRowsByGates) {
  for (DType real : {DType::f32, DType::f64}) {
    RoutedBatch batch(40, 4, 2, 0.9f, 8, real, 11, true);
    const int64_t width = 7;
    HostTensor tokens(real, {40, width}), permuted(real, {batch.rows, width});
    HostTensor outputs(real, {batch.rows, width}), combined(real, {40, width});
    std::mt19937_64 generator(3);
    fill_uniform(tokens, generator, -1, 1);
    cpu::permute(tokens, batch.routing, batch.params, permuted, batch.map);
    fill_uniform(outputs, generator, -2, 2);
    poison(combined);
    cpu::unpermute_combine(outputs, batch.routing, batch.map, combined);
    for (int64_t t = 0; t < 40; ++t)
      for (int64_t d = 0; d < width; ++d) {
        double expected = 0;
        for (int j = 0; j < 2; ++j)
          if (batch.kept(t * 2 + j))
            expected += get_element(batch.routing.gates, t * 2 + j) *
                        get_element(outputs, batch.expected_row(t * 2 + j) * width + d);
        EXPECT_NEAR(get_element(combined, t * width + d), expected, real == DType::f64 ? 1e-14 : 1e-6);
      }
  }
}

TEST(UnpermuteCombine, BackwardMatchesAdjointAndGateDerivative) {
  RoutedBatch batch(45, 6, 3, 0.7f, 4, DType::f64, 13, true);
  const int64_t width = 5;
  HostTensor tokens(DType::f64, {45, width}), permuted(DType::f64, {batch.rows, width});
  HostTensor outputs(DType::f64, {batch.rows, width}), combined(DType::f64, {45, width});
  HostTensor grad_combined(DType::f64, {45, width}), grad_outputs(DType::f64, {batch.rows, width});
  HostTensor grad_gates(DType::f64, {45, 3});
  std::mt19937_64 generator(4);
  fill_uniform(tokens, generator, -1, 1);
  cpu::permute(tokens, batch.routing, batch.params, permuted, batch.map);
  fill_uniform(outputs, generator, -1, 1);
  fill_uniform(grad_combined, generator, -1, 1);
  poison(grad_outputs);
  poison(grad_gates);
  cpu::unpermute_combine_backward(grad_combined, outputs, batch.routing, batch.map, grad_outputs, grad_gates);
  cpu::unpermute_combine(outputs, batch.routing, batch.map, combined);
  // Linear in the outputs: <combine(O), G> = <O, dO>; padding rows get exactly zero.
  EXPECT_NEAR(dot(combined, grad_combined), dot(outputs, grad_outputs), 1e-12);
  for (int64_t row = 0; row < batch.rows; ++row)
    if (get_element(batch.map.row_tokens, row) < 0)
      for (int64_t d = 0; d < width; ++d) EXPECT_EQ(get_element(grad_outputs, row * width + d), 0.0);
  // Linear in each gate: d<combine, G>/d gate[t, j] by a finite difference on the gates.
  for (int64_t index = 0; index < 45 * 3; ++index) {
    const double original = get_element(batch.routing.gates, index);
    set_element(batch.routing.gates, index, original + 0.5);
    cpu::unpermute_combine(outputs, batch.routing, batch.map, combined);
    const double plus = dot(combined, grad_combined);
    set_element(batch.routing.gates, index, original - 0.5);
    cpu::unpermute_combine(outputs, batch.routing, batch.map, combined);
    const double minus = dot(combined, grad_combined);
    set_element(batch.routing.gates, index, original);
    EXPECT_NEAR(get_element(grad_gates, index), plus - minus, 1e-12) << "choice " << index;
    if (!batch.kept(index)) EXPECT_EQ(get_element(grad_gates, index), 0.0);
  }
}

// ---- grouped GEMMs ---------------------------------------------------------------------------

// Offsets with an empty expert, an unaligned segment and a tail of rows past offsets[E].
std::vector<int32_t> test_offsets() { return {0, 5, 5, 17, 18, 26}; }  // E = 5; R = 30 below

HostTensor make_offsets(const std::vector<int32_t>& values) {
  HostTensor offsets(DType::i32, {int64_t(values.size())});
  for (size_t i = 0; i < values.size(); ++i) offsets.data<int32_t>()[i] = values[i];
  return offsets;
}

TEST(GroupedGemm, MatchesPerExpertProductsAndZeroesTheTail) {
  const std::vector<int32_t> offset_values = test_offsets();
  const int64_t rows = 30, experts = 5, inner = 7, columns = 4;
  HostTensor offsets = make_offsets(offset_values);
  for (DType real : {DType::f32, DType::f64}) {
    for (bool trans_b : {false, true}) {
      HostTensor a(real, {rows, inner}), c(real, {rows, columns});
      HostTensor b = trans_b ? HostTensor(real, {experts, columns, inner}) : HostTensor(real, {experts, inner, columns});
      std::mt19937_64 generator(trans_b ? 8 : 9);
      fill_uniform(a, generator, -1, 1);
      fill_uniform(b, generator, -1, 1);
      poison(c);
      cpu::grouped_gemm(a, b, trans_b, offsets, c);
      for (int64_t e = 0; e < experts; ++e)
        for (int64_t r = offset_values[size_t(e)]; r < offset_values[size_t(e + 1)]; ++r)
          for (int64_t n = 0; n < columns; ++n) {
            double expected = 0;
            for (int64_t k = 0; k < inner; ++k)
              expected += get_element(a, r * inner + k) *
                          get_element(b, trans_b ? (e * columns + n) * inner + k : (e * inner + k) * columns + n);
            EXPECT_NEAR(get_element(c, r * columns + n), expected, real == DType::f64 ? 1e-13 : 1e-5);
          }
      for (int64_t r = offset_values.back(); r < rows; ++r)
        for (int64_t n = 0; n < columns; ++n) EXPECT_EQ(get_element(c, r * columns + n), 0.0);
    }
  }
}

TEST(GroupedGemm, WeightGradientSumsSegmentOuterProducts) {
  const std::vector<int32_t> offset_values = test_offsets();
  const int64_t rows = 30, experts = 5, left = 6, right = 3;
  HostTensor offsets = make_offsets(offset_values);
  HostTensor a(DType::f64, {rows, left}), g(DType::f64, {rows, right}), grad_b(DType::f64, {experts, left, right});
  std::mt19937_64 generator(10);
  fill_uniform(a, generator, -1, 1);
  fill_uniform(g, generator, -1, 1);
  poison(grad_b);
  cpu::grouped_gemm_weight_grad(a, g, offsets, grad_b);
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t m = 0; m < left; ++m)
      for (int64_t n = 0; n < right; ++n) {
        double expected = 0;  // expert 1 is empty: zero
        for (int64_t r = offset_values[size_t(e)]; r < offset_values[size_t(e + 1)]; ++r)
          expected += get_element(a, r * left + m) * get_element(g, r * right + n);
        EXPECT_NEAR(get_element(grad_b, (e * left + m) * right + n), expected, 1e-13);
      }
}

// accumulate: the sum starts from grad_b's values; into an f64 grad_b (f32 or f64 inputs) a chain of
// calls over consecutive row ranges of each segment equals the one call over all of them bit for
// bit -- what the EP layer's hot-expert replicas rely on.
TEST(GroupedGemm, WeightGradientAccumulatesAndChainsBitForBitIntoF64) {
  const std::vector<int32_t> offset_values = test_offsets();  // expert 1 empty
  const int64_t rows = 30, experts = 5, left = 6, right = 3;
  for (DType real : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(real));
    HostTensor a(real, {rows, left}), g(real, {rows, right});
    std::mt19937_64 generator(real == DType::f32 ? 13 : 14);
    fill_uniform(a, generator, -1, 1);
    fill_uniform(g, generator, -1, 1);
    HostTensor whole(DType::f64, {experts, left, right});
    poison(whole);
    cpu::grouped_gemm_weight_grad(a, g, make_offsets(offset_values), whole);
    // The same sums in two calls: the first rows of each segment (a third, rounded down), then the
    // rest, accumulating. Each call sees its rows as a layout of its own (offsets from 0).
    std::vector<int32_t> head_offsets{0}, tail_offsets{0};
    std::vector<int64_t> head_rows, tail_rows;
    for (int64_t e = 0; e < experts; ++e) {
      const int32_t begin = offset_values[size_t(e)], end = offset_values[size_t(e + 1)];
      const int32_t split = begin + (end - begin) / 3;
      for (int32_t r = begin; r < split; ++r) head_rows.push_back(r);
      for (int32_t r = split; r < end; ++r) tail_rows.push_back(r);
      head_offsets.push_back(int32_t(head_rows.size()));
      tail_offsets.push_back(int32_t(tail_rows.size()));
    }
    auto gather = [&](const HostTensor& source, const std::vector<int64_t>& picked, int64_t width) {
      HostTensor out(real, {std::max<int64_t>(int64_t(picked.size()), 1), width});
      for (size_t row = 0; row < picked.size(); ++row)
        for (int64_t column = 0; column < width; ++column)
          set_element(out, int64_t(row) * width + column, get_element(source, picked[row] * width + column));
      return out;
    };
    HostTensor chained(DType::f64, {experts, left, right});
    poison(chained);  // overwritten by the first call
    cpu::grouped_gemm_weight_grad(gather(a, head_rows, left), gather(g, head_rows, right), make_offsets(head_offsets),
                                  chained);
    cpu::grouped_gemm_weight_grad(gather(a, tail_rows, left), gather(g, tail_rows, right), make_offsets(tail_offsets),
                                  chained, /*accumulate=*/true);
    for (int64_t index = 0; index < experts * left * right; ++index)
      ASSERT_EQ(chained.data<double>()[index], whole.data<double>()[index]) << "element " << index;
    // Rounded once to the inputs' type, the f64 sums are what the overwriting call in that type gives.
    HostTensor direct(real, {experts, left, right});
    cpu::grouped_gemm_weight_grad(a, g, make_offsets(offset_values), direct);
    for (int64_t index = 0; index < experts * left * right; ++index)
      ASSERT_EQ(get_element(direct, index), real == DType::f32 ? double(float(whole.data<double>()[index]))
                                                               : whole.data<double>()[index]);
  }
  // accumulate adds to whatever is there: twice the same rows doubles the gradient.
  HostTensor a(DType::f64, {rows, left}), g(DType::f64, {rows, right}), twice(DType::f64, {experts, left, right});
  std::mt19937_64 generator(15);
  fill_uniform(a, generator, -1, 1);
  fill_uniform(g, generator, -1, 1);
  cpu::grouped_gemm_weight_grad(a, g, make_offsets(offset_values), twice);
  HostTensor once(DType::f64, {experts, left, right});
  copy_values(twice, once);
  cpu::grouped_gemm_weight_grad(a, g, make_offsets(offset_values), twice, /*accumulate=*/true);
  for (int64_t index = 0; index < experts * left * right; ++index)
    EXPECT_NEAR(twice.data<double>()[index], 2 * once.data<double>()[index], 1e-13);
  // f64 inputs never take an f32 gradient.
  HostTensor narrow(DType::f32, {experts, left, right});
  EXPECT_THROW(cpu::grouped_gemm_weight_grad(a, g, make_offsets(offset_values), narrow), Error);
}

TEST(GroupedGemm, RejectsBadOffsetsAndShapes) {
  HostTensor a(DType::f32, {10, 4}), b(DType::f32, {2, 4, 3}), c(DType::f32, {10, 3});
  std::mt19937_64 generator(12);
  fill_uniform(a, generator, -1, 1);
  fill_uniform(b, generator, -1, 1);
  HostTensor too_many_rows = make_offsets({0, 6, 11});
  HostTensor decreasing = make_offsets({0, 6, 4});
  EXPECT_THROW(cpu::grouped_gemm(a, b, false, too_many_rows, c), Error);
  EXPECT_THROW(cpu::grouped_gemm(a, b, false, decreasing, c), Error);
  HostTensor good = make_offsets({0, 4, 10});
  EXPECT_THROW(cpu::grouped_gemm(a, b, true, good, c), Error);  // b is not [E, N, K]
  HostTensor c64(DType::f64, {10, 3});
  EXPECT_THROW(cpu::grouped_gemm(a, b, false, good, c64), Error);
  EXPECT_NO_THROW(cpu::grouped_gemm(a, b, false, good, c));
}

// ---- activations -----------------------------------------------------------------------------

TEST(Activation, GeluTanhAndSwigluMatchTheirFormulas) {
  const int64_t rows = 9, width = 8;
  std::mt19937_64 generator(14);
  HostTensor pre(DType::f64, {rows, width}), post(DType::f64, {rows, width});
  fill_uniform(pre, generator, -4, 4);
  poison(post);
  cpu::activation_forward(ExpertActivation::gelu_tanh, pre, post);
  for (int64_t i = 0; i < rows * width; ++i) {
    const double x = get_element(pre, i);
    const double expected = 0.5 * x * (1 + std::tanh(std::sqrt(2 / std::acos(-1.0)) * (x + 0.044715 * x * x * x)));
    EXPECT_NEAR(get_element(post, i), expected, 1e-15);
    EXPECT_NEAR(get_element(post, i), 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))), 2e-3);  // the exact GELU
  }
  HostTensor swiglu_pre(DType::f64, {rows, 2 * width}), swiglu_post(DType::f64, {rows, width});
  fill_uniform(swiglu_pre, generator, -4, 4);
  poison(swiglu_post);
  cpu::activation_forward(ExpertActivation::swiglu, swiglu_pre, swiglu_post);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t f = 0; f < width; ++f) {
      const double gate = get_element(swiglu_pre, r * 2 * width + f), up = get_element(swiglu_pre, r * 2 * width + width + f);
      EXPECT_NEAR(get_element(swiglu_post, r * width + f), gate / (1 + std::exp(-gate)) * up, 1e-14);
    }
}

TEST(Activation, BackwardMatchesFiniteDifferences) {
  for (ExpertActivation activation : {ExpertActivation::gelu_tanh, ExpertActivation::swiglu}) {
    const int64_t rows = 6, width = 5, pre_width = activation == ExpertActivation::swiglu ? 2 * width : width;
    std::mt19937_64 generator(15);
    HostTensor pre(DType::f64, {rows, pre_width}), post(DType::f64, {rows, width});
    HostTensor grad_post(DType::f64, {rows, width}), grad_pre(DType::f64, {rows, pre_width});
    fill_uniform(pre, generator, -3, 3);
    fill_uniform(grad_post, generator, -1, 1);
    poison(grad_pre);
    cpu::activation_backward(activation, pre, grad_post, grad_pre);
    auto objective = [&] {
      cpu::activation_forward(activation, pre, post);
      return dot(post, grad_post);
    };
    EXPECT_LE(relative_error(to_vector(grad_pre), central_difference_gradient(objective, pre, 1e-6)), 1e-8)
        << int(activation);
  }
}

// ---- jitter ----------------------------------------------------------------------------------

TEST(Jitter, MultipliesByPhiloxFactorsInRange) {
  const float eps = 0.05f;
  HostTensor x(DType::f32, {13, 11}), out(DType::f32, {13, 11}), again(DType::f32, {13, 11});
  HostTensor x64(DType::f64, {13, 11}), out64(DType::f64, {13, 11});
  std::mt19937_64 generator(16);
  fill_uniform(x, generator, 0.5, 2.0);
  copy_values(x, x64);
  poison(out);
  cpu::apply_jitter(x, eps, 99, 3, 7, out);
  cpu::apply_jitter(x64, eps, 99, 3, 7, out64);
  cpu::apply_jitter(x, eps, 99, 3, 8, again);  // the next step draws different noise
  int differ = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double factor = get_element(out64, i) / get_element(x64, i);
    EXPECT_GE(factor, 1.0 - eps - 1e-7);
    EXPECT_LE(factor, 1.0 + eps + 1e-7);
    const float expected_factor = (1.0f - eps) + (2.0f * eps) * philox_uniform(99, 3, 7, uint64_t(i));
    EXPECT_EQ(get_element(out, i), double(float(get_element(x, i)) * expected_factor));
    EXPECT_NEAR(factor, double(expected_factor), 1e-15);
    differ += get_element(again, i) != get_element(out, i);
  }
  EXPECT_GT(differ, x.numel() / 2);
  // eps = 0 is the identity; in place is allowed.
  HostTensor copy(DType::f32, {13, 11});
  copy_values(x, copy);
  cpu::apply_jitter(copy, 0.0f, 1, 2, 3, copy);
  EXPECT_EQ(max_abs_difference(copy, x), 0.0);
}

// ---- dense GEMM ------------------------------------------------------------------------------

TEST(Gemm, AllTransposesWithAlphaAndBeta) {
  const int64_t m = 7, n = 5, k = 9;
  std::mt19937_64 generator(17);
  for (DType real : {DType::f32, DType::f64}) {
    for (int variant = 0; variant < 4; ++variant) {
      const bool trans_a = variant & 1, trans_b = variant & 2;
      HostTensor a = trans_a ? HostTensor(real, {k, m}) : HostTensor(real, {m, k});
      HostTensor b = trans_b ? HostTensor(real, {n, k}) : HostTensor(real, {k, n});
      HostTensor c(real, {m, n}), c_before(real, {m, n});
      fill_uniform(a, generator, -1, 1);
      fill_uniform(b, generator, -1, 1);
      fill_uniform(c, generator, -1, 1);
      copy_values(c, c_before);
      cpu::gemm(trans_a, trans_b, 0.75f, a, b, -0.5f, c);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double sum = 0;
          for (int64_t p = 0; p < k; ++p)
            sum += get_element(a, trans_a ? p * m + i : i * k + p) * get_element(b, trans_b ? j * k + p : p * n + j);
          EXPECT_NEAR(get_element(c, i * n + j), 0.75 * sum - 0.5 * get_element(c_before, i * n + j),
                      real == DType::f64 ? 1e-14 : 1e-5);
        }
      poison(c);  // beta = 0 must not read C
      cpu::gemm(trans_a, trans_b, 1.0f, a, b, 0.0f, c);
      EXPECT_TRUE(all_finite(c));
    }
  }
  HostTensor a(DType::f32, {3, 4}), b(DType::f32, {5, 2}), c(DType::f32, {3, 2});
  EXPECT_THROW(cpu::gemm(false, false, 1, a, b, 0, c), Error);
}

// A separate addend: C = alpha AB + beta Z equals copying Z into C and adding in place; Z is left
// alone, C's old values are not read, and beta = 0 reads no addend.
TEST(Gemm, SeparateAddendEqualsTheInPlaceSum) {
  const int64_t m = 6, n = 7, k = 5;
  std::mt19937_64 generator(18);
  for (DType real : {DType::f32, DType::f64}) {
    HostTensor a(real, {m, k}), b(real, {k, n}), addend(real, {m, n}), addend_before(real, {m, n});
    HostTensor in_place(real, {m, n}), separate(real, {m, n});
    fill_uniform(a, generator, -1, 1);
    fill_uniform(b, generator, -1, 1);
    fill_uniform(addend, generator, -1, 1);
    copy_values(addend, addend_before);
    copy_values(addend, in_place);
    cpu::gemm(false, false, 0.5f, a, b, 1.0f, in_place);
    poison(separate);
    cpu::gemm(false, false, 0.5f, a, b, 1.0f, separate, &addend.tensor());
    EXPECT_EQ(max_abs_difference(separate, in_place), 0.0);
    EXPECT_EQ(max_abs_difference(addend, addend_before), 0.0);
    poison(addend);
    cpu::gemm(false, false, 0.5f, a, b, 0.0f, separate, &addend.tensor());
    EXPECT_TRUE(all_finite(separate));
  }
  HostTensor a(DType::f32, {2, 3}), b(DType::f32, {3, 4}), c(DType::f32, {2, 4}), wrong(DType::f32, {4, 2});
  EXPECT_THROW(cpu::gemm(false, false, 1, a, b, 1, c, &wrong.tensor()), Error);
}

// ---- elementwise helpers and dispatch ----------------------------------------------------------

TEST(Ops, ConvertAndAddInto) {
  HostTensor source(DType::f32, {4, 8}), half(DType::bf16, {4, 8}), back(DType::f32, {4, 8});
  std::mt19937_64 generator(18);
  fill_uniform(source, generator, -3, 3);
  poison(half);
  ops::convert(kCpu, source, half);
  ops::convert(kCpu, half, back);
  for (int64_t i = 0; i < source.numel(); ++i) {
    EXPECT_EQ(get_element(half, i), double(float(Bf16(float(get_element(source, i))))));
    EXPECT_LE(std::fabs(get_element(back, i) - get_element(source, i)), std::fabs(get_element(source, i)) / 256.0);
  }
  HostTensor accumulator(DType::f64, {32}), addend(DType::f64, {32}), expected(DType::f64, {32});
  fill_uniform(accumulator, generator, -1, 1);
  fill_uniform(addend, generator, -1, 1);
  for (int64_t i = 0; i < 32; ++i) set_element(expected, i, get_element(accumulator, i) + get_element(addend, i));
  ops::add_into(kCpu, addend, accumulator);
  EXPECT_EQ(max_abs_difference(accumulator, expected), 0.0);
  HostTensor wrong(DType::f32, {32});
  EXPECT_THROW(ops::add_into(kCpu, wrong, accumulator), Error);
}

TEST(Ops, DispatchChecksDevicesAndMatchesTheReference) {
  RoutedBatch batch(20, 4, 2, 1.0f, 4, DType::f32, 19);
  HostTensor tokens(DType::f32, {20, 3}), via_ops(DType::f32, {batch.rows, 3}), direct(DType::f32, {batch.rows, 3});
  std::mt19937_64 generator(20);
  fill_uniform(tokens, generator, -1, 1);
  ops::permute(kCpu, tokens, batch.routing, batch.params, via_ops, batch.map);
  cpu::permute(tokens, batch.routing, batch.params, direct, batch.map);
  EXPECT_EQ(max_abs_difference(via_ops, direct), 0.0);

  Tensor on_gpu = tokens.tensor();
  on_gpu.device = DeviceKind::cuda;  // a view that claims device memory
  EXPECT_THROW(ops::permute(kCpu, on_gpu, batch.routing, batch.params, via_ops, batch.map), Error);
#if !defined(SWITCHYARD_WITH_CUDA)
  const ExecContext cuda_context{DeviceKind::cuda, nullptr};
  Tensor a = on_gpu, c = on_gpu;
  EXPECT_THROW(ops::gemm(cuda_context, false, true, 1.0f, a, a, 0.0f, c), Error);
#endif
}

TEST(Ops, RoutingBuffersHandOutPrefixViewsOfFixedMemory) {
  RoutingBuffers buffers(DeviceKind::cpu, DType::f32, 100, 8, 2, 256);
  RoutingResult small = buffers.result(10), large = buffers.result(100);
  EXPECT_EQ(small.gates.data, large.gates.data);
  EXPECT_EQ(small.gates.dim(0), 10);
  EXPECT_EQ(large.expert_ids.dim(1), 2);
  EXPECT_EQ(large.expert_offsets.dim(0), 9);
  DispatchMap map = buffers.map(50, 200);
  EXPECT_EQ(map.row_tokens.dim(0), 200);
  EXPECT_THROW(buffers.result(101), Error);
  EXPECT_THROW(buffers.map(10, 257), Error);
}

}  // namespace
