// The small-batch expert op's CPU reference (src/ops/small_batch_ops.h) against (1) a direct
// per-token loop in double written here from the formula, on hand-made routings with dropped and
// empty choices, several shapes (T = 1 and 64, K = 1 and 8, E = 4 and 256, gelu and swiglu), and
// (2) the padded CPU path it replaces (permute, grouped GEMM, activation, grouped GEMM,
// unpermute_combine) on a real routing, bit for bit in f32 and f64. Also the host-side launch
// geometry of the CUDA version and its support rule, which need no GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "src/ops/small_batch_ops.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

struct SmallBatchCase {
  const char* name;
  int64_t tokens;
  int k;
  int experts;
  int64_t d_model, d_ff;
  ExpertActivation activation;
};

void PrintTo(const SmallBatchCase& test, std::ostream* os) { *os << test.name; }

// A routing made by hand: each token picks K distinct experts (one expert for every token when
// `one_expert`), random gates; some choices are empty (id -1, as complexity routing leaves them),
// some have slots at or past the capacity (dropped), and token 0 keeps nothing when T > 1.
struct HandRouting {
  HostTensor expert_ids, gates, slots, scalars;
  RoutingResult routing;

  HandRouting(int64_t tokens, int k, int experts, DType real, std::mt19937_64& generator, bool one_expert = false)
      : expert_ids(DType::i32, {tokens, k}),
        gates(real, {tokens, k}),
        slots(DType::i32, {tokens, k}),
        scalars(DType::i32, {kNumRoutingScalars}) {
    const int capacity = 5;
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    std::vector<int> order(static_cast<size_t>(experts));
    for (int64_t token = 0; token < tokens; ++token) {
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), generator);
      if (one_expert) std::swap(order[0], *std::find(order.begin(), order.end(), experts - 1));
      for (int choice = 0; choice < k; ++choice) {
        const int64_t index = token * k + choice;
        const double draw = unit(generator);
        int expert = order[size_t(choice)], slot = int(unit(generator) * capacity);  // kept
        if (draw < 0.15 && !(one_expert && choice == 0)) {
          expert = -1;  // empty
          slot = -1;
        } else if (draw < 0.3 && !(one_expert && choice == 0)) {
          slot = capacity + int(unit(generator) * 3);  // dropped
        }
        if (tokens > 1 && token == 0) slot = capacity;  // token 0: every choice dropped
        if (token == tokens - 1 && choice == 0 && (expert < 0 || slot >= capacity)) {  // keep one at least
          expert = order[0];
          slot = 0;
        }
        expert_ids.data<int32_t>()[index] = expert;
        slots.data<int32_t>()[index] = slot;
        set_element(gates, index, expert < 0 ? 0.0 : 0.05 + unit(generator));
      }
    }
    std::fill(scalars.data<int32_t>(), scalars.data<int32_t>() + kNumRoutingScalars, 0);
    scalars.data<int32_t>()[kCapacity] = capacity;
    routing.expert_ids = expert_ids;
    routing.gates = gates;
    routing.slots = slots;
    routing.scalars = scalars;
  }
  bool kept(int64_t index) const {
    const int32_t expert = expert_ids.data<int32_t>()[index], slot = slots.data<int32_t>()[index];
    return expert >= 0 && slot >= 0 && slot < scalars.data<int32_t>()[kCapacity];
  }
};

double activation_value(ExpertActivation activation, double gate_or_x, double up) {
  if (activation == ExpertActivation::gelu_tanh) {
    const double inner = std::sqrt(2.0 / std::acos(-1.0)) * (gate_or_x + 0.044715 * std::pow(gate_or_x, 3));
    return 0.5 * gate_or_x * (1.0 + std::tanh(inner));
  }
  return gate_or_x / (1.0 + std::exp(-gate_or_x)) * up;  // silu(gate) * up
}

// y from the formula of src/ops/small_batch_ops.h, in double (the f64 reference rounds nothing).
std::vector<double> direct_formula(const SmallBatchCase& test, const Tensor& x, const HandRouting& hand,
                                   const Tensor& w1, const Tensor& w2) {
  const int64_t d = test.d_model, f = test.d_ff;
  const int64_t columns = test.activation == ExpertActivation::swiglu ? 2 * f : f;
  std::vector<double> y(static_cast<size_t>(test.tokens * d), 0.0), pre(static_cast<size_t>(columns)),
      hidden(static_cast<size_t>(f));
  for (int64_t token = 0; token < test.tokens; ++token) {
    for (int choice = 0; choice < test.k; ++choice) {
      const int64_t index = token * test.k + choice;
      if (!hand.kept(index)) continue;
      const int64_t expert = hand.expert_ids.data<int32_t>()[index];
      for (int64_t column = 0; column < columns; ++column) {
        double sum = 0.0;
        for (int64_t inner = 0; inner < d; ++inner)
          sum += get_element(x, token * d + inner) * get_element(w1, (expert * d + inner) * columns + column);
        pre[size_t(column)] = sum;
      }
      for (int64_t column = 0; column < f; ++column)
        hidden[size_t(column)] = test.activation == ExpertActivation::swiglu
                                     ? activation_value(test.activation, pre[size_t(column)], pre[size_t(f + column)])
                                     : activation_value(test.activation, pre[size_t(column)], 0.0);
      const double gate = get_element(hand.gates, index);
      for (int64_t column = 0; column < d; ++column) {
        double sum = 0.0;
        for (int64_t inner = 0; inner < f; ++inner)
          sum += hidden[size_t(inner)] * get_element(w2, (expert * f + inner) * d + column);
        y[size_t(token * d + column)] += gate * sum;
      }
    }
  }
  return y;
}

class SmallBatchReference : public ::testing::TestWithParam<SmallBatchCase> {};

TEST_P(SmallBatchReference, MatchesTheDirectFormulaInF64) {
  const SmallBatchCase& test = GetParam();
  const int64_t columns = test.activation == ExpertActivation::swiglu ? 2 * test.d_ff : test.d_ff;
  for (bool one_expert : {false, true}) {  // spread over experts; every token on one expert
    std::mt19937_64 generator(uint64_t(test.tokens * 131 + test.k * 17 + test.experts) + (one_expert ? 7 : 0));
    HostTensor x(DType::f64, {test.tokens, test.d_model}), y(DType::f64, {test.tokens, test.d_model});
    HostTensor w1(DType::f64, {test.experts, test.d_model, columns}),
        w2(DType::f64, {test.experts, test.d_ff, test.d_model});
    fill_uniform(x, generator, -1.0, 1.0);
    fill_normal(w1, generator, 0.0, 1.0 / std::sqrt(double(test.d_model)));
    fill_normal(w2, generator, 0.0, 1.0 / std::sqrt(double(test.d_ff)));
    HandRouting hand(test.tokens, test.k, test.experts, DType::f64, generator, one_expert);
    poison(y);
    HostTensor no_workspace;
    ops::small_batch_experts(kCpu, test.activation, x, hand.routing, w1, w2, no_workspace, y);

    const std::vector<double> want = direct_formula(test, x, hand, w1, w2);
    const std::vector<double> got = to_vector(y);
    EXPECT_LE(max_abs_difference(got, want), 1e-12) << (one_expert ? "one expert" : "spread");
    if (test.tokens > 1)  // token 0 kept nothing: exactly zero
      for (int64_t column = 0; column < test.d_model; ++column) ASSERT_EQ(got[size_t(column)], 0.0);
    double norm = 0.0;
    for (double value : want) norm += value * value;
    EXPECT_GT(norm, 0.0) << "the case must keep some choices";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SmallBatchReference,
    ::testing::Values(SmallBatchCase{"T1_K1_E4_gelu", 1, 1, 4, 24, 40, ExpertActivation::gelu_tanh},
                      SmallBatchCase{"T1_K8_E256_swiglu", 1, 8, 256, 16, 24, ExpertActivation::swiglu},
                      SmallBatchCase{"T64_K1_E4_gelu", 64, 1, 4, 16, 24, ExpertActivation::gelu_tanh},
                      SmallBatchCase{"T64_K8_E256_swiglu", 64, 8, 256, 8, 16, ExpertActivation::swiglu},
                      SmallBatchCase{"T7_K2_E4_swiglu_odd_sizes", 7, 2, 4, 13, 11, ExpertActivation::swiglu},
                      SmallBatchCase{"T33_K8_E8_gelu", 33, 8, 8, 16, 8, ExpertActivation::gelu_tanh}),
    [](const ::testing::TestParamInfo<SmallBatchCase>& info) { return std::string(info.param.name); });

// The padded CPU path on a real routing (capacity drops, renormalized top-k), step by step.
void padded_path(ExpertActivation activation, const Tensor& x, const RoutingParams& params,
                 const RoutingResult& routing, DispatchMap& map, const Tensor& w1, const Tensor& w2, int64_t rows,
                 Tensor& y) {
  const DType real = x.dtype;
  const int64_t d = x.dim(1), f = w2.dim(1), columns = w1.dim(2);
  HostTensor permuted(real, {rows, d}), pre(real, {rows, columns}), post(real, {rows, f}), out(real, {rows, d});
  ops::permute(kCpu, x, routing, params, permuted, map);
  ops::grouped_gemm(kCpu, permuted, w1, false, routing.expert_offsets, pre);
  ops::activation_forward(kCpu, activation, pre, post);
  ops::grouped_gemm(kCpu, post, w2, false, routing.expert_offsets, out);
  ops::unpermute_combine(kCpu, out, routing, map, y);
}

TEST(SmallBatchReferenceVsPaddedPath, EqualBitForBitInF32AndF64) {
  for (DType real : {DType::f32, DType::f64}) {
    for (ExpertActivation activation : {ExpertActivation::gelu_tanh, ExpertActivation::swiglu}) {
      for (int k : {1, 2, 8}) {
        const int64_t tokens = 37, d = 24, f = 40;
        const int experts = 8;
        RoutingParams params;
        params.num_tokens = tokens;
        params.num_experts = experts;
        params.k_max = k;
        params.renormalize = k > 1;
        params.capacity_factor = 0.8f;  // drops
        params.segment_alignment = 4;
        const int64_t rows = padded_rows_upper_bound(params);
        RoutingBuffers buffers(DeviceKind::cpu, real, tokens, experts, k, rows);
        RoutingResult routing = buffers.result(tokens);
        DispatchMap map = buffers.map(tokens, rows);
        std::mt19937_64 generator(uint64_t(k) * 1000 + uint64_t(activation) * 10 + uint64_t(real));
        HostTensor logits(real, {tokens, experts});
        fill_normal(logits, generator, 0.0, 1.5);
        ops::route(kCpu, logits, nullptr, params, routing);
        ASSERT_GT(get_element(routing.scalars, kDroppedChoices), 0) << "the case must drop choices";

        const int64_t columns = activation == ExpertActivation::swiglu ? 2 * f : f;
        HostTensor x(real, {tokens, d}), w1(real, {experts, d, columns}), w2(real, {experts, f, d});
        fill_uniform(x, generator, -1.0, 1.0);
        fill_normal(w1, generator, 0.0, 0.3);
        fill_normal(w2, generator, 0.0, 0.2);
        HostTensor want(real, {tokens, d}), got(real, {tokens, d});
        padded_path(activation, x, params, routing, map, w1, w2, rows, want);
        poison(got);
        HostTensor no_workspace;
        ops::small_batch_experts(kCpu, activation, x, routing, w1, w2, no_workspace, got);
        EXPECT_EQ(std::memcmp(got.tensor().data, want.tensor().data, want.tensor().bytes()), 0)
            << dtype_name(real) << ", activation " << int(activation) << ", k " << k
            << ": max difference " << max_abs_difference(got, want);
      }
    }
  }
}

TEST(SmallBatchReferenceChecks, RejectsMismatchedTensors) {
  std::mt19937_64 generator(5);
  HandRouting hand(3, 2, 4, DType::f32, generator);
  HostTensor x(DType::f32, {3, 8}), y(DType::f32, {3, 8}), w1(DType::f32, {4, 8, 32}), w2(DType::f32, {4, 16, 8});
  HostTensor w1_gelu(DType::f32, {4, 8, 16}), y_f64(DType::f64, {3, 8}), y_short(DType::f32, {2, 8});
  fill_uniform(x, generator, -1, 1);
  fill_uniform(w1, generator, -1, 1);
  fill_uniform(w2, generator, -1, 1);
  EXPECT_NO_THROW(cpu::small_batch_experts(ExpertActivation::swiglu, x, hand.routing, w1, w2, y));
  EXPECT_THROW(cpu::small_batch_experts(ExpertActivation::gelu_tanh, x, hand.routing, w1, w2, y), Error);  // 2F
  EXPECT_THROW(cpu::small_batch_experts(ExpertActivation::swiglu, x, hand.routing, w1_gelu, w2, y), Error);
  EXPECT_THROW(cpu::small_batch_experts(ExpertActivation::swiglu, x, hand.routing, w1, w2, y_f64), Error);
  EXPECT_THROW(cpu::small_batch_experts(ExpertActivation::swiglu, x, hand.routing, w1, w2, y_short), Error);
  hand.expert_ids.data<int32_t>()[0] = 4;  // E = 4: out of range
  hand.slots.data<int32_t>()[0] = 0;
  EXPECT_THROW(cpu::small_batch_experts(ExpertActivation::swiglu, x, hand.routing, w1, w2, y), Error);
  Tensor device_x = x.tensor();
  device_x.device = DeviceKind::cuda;  // never dereferenced: the dispatch refuses it first
  HostTensor no_workspace;
  EXPECT_THROW(
      ops::small_batch_experts(kCpu, ExpertActivation::swiglu, device_x, hand.routing, w1, w2, no_workspace, y),
      Error);
}

// ---- the CUDA version's host-side geometry (no GPU needed) ----------------------------------

TEST(SmallBatchGeometry, CoversTheProblemWithAlignedDisjointWorkspaceRegions) {
  for (ExpertActivation activation : {ExpertActivation::gelu_tanh, ExpertActivation::swiglu}) {
    for (int64_t tokens : {int64_t(1), int64_t(2), int64_t(7), int64_t(32), int64_t(64)}) {
      for (int k : {1, 2, 8}) {
        for (int experts : {8, 32, 256}) {
          if (k > experts) continue;
          for (auto dims : {std::pair<int64_t, int64_t>{768, 3072}, {64, 128}, {40, 24}, {4096, 1024}}) {
            const int64_t d = dims.first, f = dims.second;
            const SmallBatchGeometry g = small_batch_geometry(tokens, k, experts, d, f, activation, 2);
            const std::string where = std::to_string(tokens) + " tokens, k " + std::to_string(k) + ", E " +
                                      std::to_string(experts) + ", D " + std::to_string(d) + ", F " + std::to_string(f);
            EXPECT_EQ(g.choices, tokens * k) << where;
            EXPECT_EQ(g.expert_bound, std::min<int64_t>(experts, tokens * k)) << where;
            EXPECT_GE(g.w1_tiles * g.w1_tile_columns, f) << where;
            EXPECT_LT((g.w1_tiles - 1) * g.w1_tile_columns, f) << where;
            EXPECT_GE(g.d_tiles * 32, d) << where;
            EXPECT_LT((g.d_tiles - 1) * 32, d) << where;
            // F splits: multiples of 8 rows, every split non-empty, together exactly F.
            EXPECT_EQ(g.split_rows % 8, 0) << where;
            EXPECT_GE(g.f_splits * g.split_rows, f) << where;
            EXPECT_LT((g.f_splits - 1) * g.split_rows, f) << where;
            // Blocks share their items evenly and cover them all.
            for (auto [items, blocks] : {std::pair<int64_t, int64_t>{g.w1_tiles, g.w1_blocks_per_expert},
                                         {g.d_tiles * g.f_splits, g.w2_blocks_per_expert}}) {
              ASSERT_GE(blocks, 1) << where;
              EXPECT_LE(blocks, items) << where;
              const int64_t per_block = (items + blocks - 1) / blocks;
              EXPECT_LT((blocks - 1) * per_block, items) << where << ": a block with nothing to do";
            }
            EXPECT_LE(g.expert_bound * std::max(g.w1_blocks_per_expert, g.w2_blocks_per_expert),
                      std::max<int64_t>(kSmallBatchTargetBlocks, g.expert_bound) * 2)
                << where;
            // Counters | hidden [N, F] | partial [S, N, D], 256-byte aligned, in that order.
            EXPECT_EQ(g.counters_offset, 0u);
            EXPECT_EQ(g.hidden_offset % kSmallBatchWorkspaceAlignment, 0u);
            EXPECT_EQ(g.partial_offset % kSmallBatchWorkspaceAlignment, 0u);
            EXPECT_GE(g.hidden_offset, size_t(g.d_tiles) * 4);
            EXPECT_GE(g.partial_offset, g.hidden_offset + size_t(tokens * k * f) * 2);
            EXPECT_EQ(g.workspace_bytes, g.partial_offset + size_t(g.f_splits * tokens * k * d) * 4);
          }
        }
      }
    }
  }
  // One token of the streaming benchmark's layer: one expert fills the GPU through F splits.
  const SmallBatchGeometry one = small_batch_geometry(1, 1, 32, 768, 3072, ExpertActivation::gelu_tanh, 2);
  EXPECT_EQ(one.expert_bound, 1);
  EXPECT_GT(one.f_splits, 1);
  EXPECT_GE(one.d_tiles * one.f_splits, 200);
}

TEST(SmallBatchGeometry, WorkspaceServesEveryTokenCountUpToTheMaximum) {
  for (ExpertActivation activation : {ExpertActivation::gelu_tanh, ExpertActivation::swiglu}) {
    const size_t bytes = small_batch_workspace_bytes(64, 2, 32, 768, 3072, activation, 2);
    size_t largest = 0;
    for (int64_t tokens = 1; tokens <= 64; ++tokens) {
      const size_t need = small_batch_geometry(tokens, 2, 32, 768, 3072, activation, 2).workspace_bytes;
      EXPECT_LE(need, bytes) << tokens << " tokens";
      largest = std::max(largest, need);
    }
    EXPECT_EQ(bytes, largest);
  }
}

TEST(SmallBatchGeometry, SupportRule) {
  EXPECT_TRUE(small_batch_supported(DType::bf16, 64, 8, 256, 768, 3072));
  EXPECT_TRUE(small_batch_supported(DType::f16, 1, 1, 1024, 8, 8));
  EXPECT_FALSE(small_batch_supported(DType::f32, 1, 1, 8, 768, 3072));    // CUDA op: bf16 / f16 only
  EXPECT_FALSE(small_batch_supported(DType::bf16, 65, 8, 256, 768, 3072));  // 520 choices
  EXPECT_TRUE(small_batch_supported(DType::bf16, 512, 1, 8, 768, 3072));
  EXPECT_FALSE(small_batch_supported(DType::bf16, 1, 1, 1025, 768, 3072));  // E
  EXPECT_FALSE(small_batch_supported(DType::bf16, 1, 1, 8, 764, 3072));     // D % 8
  EXPECT_FALSE(small_batch_supported(DType::bf16, 1, 1, 8, 768, 3076));     // F % 8
  EXPECT_FALSE(small_batch_supported(DType::bf16, 0, 1, 8, 768, 3072));
  EXPECT_FALSE(small_batch_supported(DType::bf16, 1, 9, 16, 768, 3072));
}

}  // namespace
