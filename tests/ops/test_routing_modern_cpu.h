// Helpers shared by the tests of the modern routing options of the CPU reference
// (tests/ops/test_routing_modern_cpu.cpp, test_routing_modern_cases_cpu.cpp,
// test_routing_modern_backward_cpu.cpp).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <random>
#include <vector>

#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "tests/support/test_helpers.h"

namespace switchyard {
namespace testing {
namespace routing_modern {

// ---- Running the reference ------------------------------------------------------------------

struct HostRouting {
  RoutingBuffers buffers;
  RoutingResult result;
  HostRouting(const RoutingParams& params, DType real)
      : buffers(DeviceKind::cpu, real, params.num_tokens, params.num_experts, params.k_max,
                padded_rows_upper_bound(params), routing_num_sequences(params)),
        result(buffers.result(params.num_tokens)) {
    for (Tensor* tensor : {&result.expert_ids, &result.gates, &result.slots, &result.token_k, &result.logsumexp,
                           &result.expert_counts, &result.first_choice_counts, &result.prob_sums,
                           &result.expert_offsets, &result.scalars, &result.losses, &result.sequence_fractions})
      poison(*tensor);
  }
};

inline std::vector<int> to_ints(const Tensor& tensor) {
  std::vector<int> values;
  for (double value : to_vector(tensor)) values.push_back(int(value));
  return values;
}

inline HostTensor make_tensor(DType real, std::initializer_list<int64_t> shape, const std::vector<double>& values) {
  HostTensor tensor(real, shape);
  for (size_t index = 0; index < values.size(); ++index) set_element(tensor, int64_t(index), values[index]);
  return tensor;
}

inline RoutingParams make_params(int64_t tokens, int experts, int k, ScoreFunction function = ScoreFunction::softmax) {
  RoutingParams params;
  params.num_tokens = tokens;
  params.num_experts = experts;
  params.k_max = k;
  params.k_min = 1;
  params.score_function = function;
  params.capacity_factor = 1.25f;
  params.segment_alignment = 1;
  params.aux_loss_weight = 0.01f;
  params.z_loss_weight = 0.001f;
  return params;
}

inline std::vector<double> random_values(size_t count, uint64_t seed, double stddev = 2.0) {
  std::mt19937_64 generator(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  std::vector<double> values(count);
  for (double& value : values) value = normal(generator);
  return values;
}

// One route() call with fresh poisoned outputs.
struct Routed {
  HostRouting routing;
  Routed(const RoutingParams& params, const HostTensor& logits, const Tensor* bias = nullptr,
         const Tensor* complexity = nullptr)
      : routing(params, logits.tensor().dtype) {
    RoutingInputs inputs(complexity);
    inputs.selection_bias = bias;
    cpu::route(logits.tensor(), inputs, params, routing.result);
  }
  const RoutingResult& operator*() const { return routing.result; }
  const RoutingResult* operator->() const { return &routing.result; }
};

inline void expect_same_integers(const RoutingResult& actual, const RoutingResult& expected) {
  EXPECT_EQ(to_ints(actual.expert_ids), to_ints(expected.expert_ids));
  EXPECT_EQ(to_ints(actual.slots), to_ints(expected.slots));
  EXPECT_EQ(to_ints(actual.token_k), to_ints(expected.token_k));
  EXPECT_EQ(to_ints(actual.expert_counts), to_ints(expected.expert_counts));
  EXPECT_EQ(to_ints(actual.first_choice_counts), to_ints(expected.first_choice_counts));
  EXPECT_EQ(to_ints(actual.expert_offsets), to_ints(expected.expert_offsets));
  EXPECT_EQ(to_ints(actual.scalars), to_ints(expected.scalars));
}

inline constexpr ScoreFunction kSoftmax = ScoreFunction::softmax;
inline constexpr ScoreFunction kSigmoid = ScoreFunction::sigmoid;
inline constexpr DropPolicy kPosition = DropPolicy::position;
inline constexpr DropPolicy kProbability = DropPolicy::probability;
inline constexpr ComplexityMode kNone = ComplexityMode::none;

}  // namespace routing_modern
}  // namespace testing
}  // namespace switchyard
