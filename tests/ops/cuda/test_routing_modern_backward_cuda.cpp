// route_backward on CUDA (src/ops/cuda/routing_backward.cu) with the modern options against the
// CPU reference: sigmoid scores (renormalized or not, routed scaling), the global-batch and
// sequence-level balance losses, probability drops, E = 300 / 512, k_t = 0 (expert choice reuses
// this backward), and bf16 output with sigmoid scores. The CPU routing result is uploaded, so both
// backwards see identical routing; grad_logits must match to a relative error of 1e-5.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"
#include "tests/ops/cuda/test_routing_modern_cases.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;
using namespace switchyard::routing_modern_test;

namespace {

// ---- Backward -----------------------------------------------------------------------------------

class RouteBackwardModernCudaTest : public ::testing::TestWithParam<ModernCase> {};

// The CPU routing result goes to the device, so both backwards see identical routing; F (the
// global fractions) is a random distribution.
void compare_backward(const ModernCase& test, RoutingParams params, bool empty_tokens) {
  Inputs inputs = make_inputs(test, params, seed_of(test.name) + 1);
  const int64_t tokens = test.tokens, sequences = routing_num_sequences(params);
  RoutingInputs cpu_inputs(test.complexity == ComplexityMode::given ? &inputs.complexity.tensor() : nullptr);
  cpu_inputs.selection_bias = test.bias ? &inputs.bias.tensor() : nullptr;
  RoutingBuffers host_buffers(DeviceKind::cpu, DType::f32, tokens, test.experts, test.k_max, 0, sequences);
  RoutingResult routing = host_buffers.result(tokens);
  cpu::route(inputs.logits, cpu_inputs, params, routing);
  if (empty_tokens) {  // expert choice: every third token has no expert
    params.method = RoutingMethod::expert_choice;
    for (int64_t token = 0; token < tokens; token += 3) {
      routing.token_k.as<int32_t>()[token] = 0;
      for (int choice = 0; choice < test.k_max; ++choice) {
        routing.expert_ids.as<int32_t>()[token * test.k_max + choice] = -1;
        routing.slots.as<int32_t>()[token * test.k_max + choice] = -1;
        routing.gates.as<float>()[token * test.k_max + choice] = 0.0f;
      }
    }
  }

  std::mt19937_64 generator(seed_of(test.name) + 2);
  HostTensor grad_gates(DType::f32, {tokens, test.k_max}), fractions(DType::f32, {test.experts});
  fill_normal(grad_gates, generator, 0.0, 1.0);
  fill_uniform(fractions, generator, 0.1, 1.0);
  double total = 0.0;
  for (int e = 0; e < test.experts; ++e) total += fractions.data<float>()[e];
  for (int e = 0; e < test.experts; ++e) fractions.data<float>()[e] = float(fractions.data<float>()[e] / total);
  const Tensor* global = test.global_weight > 0.0f ? &fractions.tensor() : nullptr;
  const float aux_scale = 0.7f, z_scale = 1.3f;
  HostTensor expected(DType::f32, {tokens, test.experts});
  cpu::route_backward(inputs.logits, grad_gates, routing, params, aux_scale, z_scale, expected, global);

  RoutingBuffers device_buffers(DeviceKind::cuda, DType::f32, tokens, test.experts, test.k_max, 0, sequences);
  RoutingResult device_routing = device_buffers.result(tokens);
  std::vector<Tensor*> sources = routing_tensors(routing), destinations = routing_tensors(device_routing);
  for (size_t index = 0; index < sources.size(); ++index) upload(*sources[index], *destinations[index]);
  DeviceTensor logits = to_device(inputs.logits), device_grad_gates = to_device(grad_gates),
               device_fractions = to_device(fractions), grad_logits(DType::f32, {tokens, test.experts});
  poison_device(grad_logits);
  cuda::route_backward(logits, device_grad_gates, device_routing, params, aux_scale, z_scale, grad_logits, nullptr,
                       global ? &device_fractions.tensor() : nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_floats_close("grad_logits", expected, grad_logits);
}

TEST_P(RouteBackwardModernCudaTest, MatchesCpuReference) {
  SKIP_WITHOUT_CUDA();
  compare_backward(GetParam(), params_of(GetParam()), false);
}

std::vector<ModernCase> backward_cases() {
  using S = ScoreFunction;
  return {
      make_case("E64_sigmoid_renormalized_all_losses", 3000, 64, 4,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.scaling = 2.5f;
                  c.sequence_tokens = 700;
                  c.seq_weight = 0.01f;
                  c.global_weight = 0.02f;
                  c.capacity_factor = 0.9f;
                }),
      make_case("E64_sigmoid_plain", 2000, 64, 2,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.renormalize = false;
                  c.capacity_factor = 0.9f;
                }),
      make_case("E32_softmax_sequence_and_global", 2000, 32, 2,
                [](ModernCase& c) {
                  c.renormalize = false;
                  c.sequence_tokens = 300;
                  c.seq_weight = 0.01f;
                  c.global_weight = 0.05f;
                }),
      make_case("E256_deepseek_v3", 1500, 256, 8,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.bias = true;
                  c.groups = 8;
                  c.topk_groups = 4;
                  c.scaling = 2.5f;
                  c.global_weight = 0.001f;
                  c.seq_weight = 0.001f;
                  c.sequence_tokens = 512;
                }),
      make_case("E512_softmax_top8_sequence", 1200, 512, 8,
                [](ModernCase& c) {
                  c.seq_weight = 0.01f;
                  c.sequence_tokens = 400;
                  c.capacity_factor = 0.9f;
                }),
      make_case("E300_sigmoid_top2_global", 1500, 300, 2,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.global_weight = 0.01f;
                }),
      make_case("E6_sigmoid_top3_unaligned", 999, 6, 3,
                [](ModernCase& c) {
                  c.score = S::sigmoid;
                  c.scaling = 1.5f;
                  c.seq_weight = 0.01f;
                }),
      make_case("E16_softmax_probability_drops_scaled", 1500, 16, 4,
                [](ModernCase& c) {
                  c.drop = DropPolicy::probability;
                  c.capacity_factor = 0.7f;
                  c.scaling = 2.0f;
                }),
  };
}

INSTANTIATE_TEST_SUITE_P(Cases, RouteBackwardModernCudaTest, ::testing::ValuesIn(backward_cases()),
                         [](const ::testing::TestParamInfo<ModernCase>& info) { return info.param.name; });

// Expert choice reuses the backward: tokens no expert took (k_t = 0) get only the loss terms.
TEST(RouteBackwardModernCuda, TokensWithoutChoicesForExpertChoice) {
  SKIP_WITHOUT_CUDA();
  for (ScoreFunction score : {ScoreFunction::softmax, ScoreFunction::sigmoid}) {
    ModernCase test = make_case(score == ScoreFunction::softmax ? "ec_softmax" : "ec_sigmoid", 1200, 32, 2);
    test.score = score;
    test.global_weight = 0.01f;
    compare_backward(test, params_of(test), true);
    if (IsSkipped()) return;
  }
}

// grad_logits in bf16 with sigmoid scores: the fp32 result rounded to nearest, bit for bit.
TEST(RouteBackwardModernCuda, SigmoidBf16OutputIsTheRoundedFp32Output) {
  SKIP_WITHOUT_CUDA();
  const ModernCase test = make_case("lowp", 1500, 256, 8, [](ModernCase& c) {
    c.score = ScoreFunction::sigmoid;
    c.bias = true;
    c.groups = 8;
    c.topk_groups = 4;
    c.scaling = 2.5f;
  });
  const RoutingParams params = params_of(test);
  Inputs inputs = make_inputs(test, params, 17);
  DeviceTensor logits = to_device(inputs.logits), bias = to_device(inputs.bias);
  RoutingInputs device_inputs;
  device_inputs.selection_bias = &bias.tensor();
  RoutingBuffers buffers(DeviceKind::cuda, DType::f32, test.tokens, test.experts, test.k_max, 0);
  RoutingResult routing = buffers.result(test.tokens);
  cuda::route(logits, device_inputs, params, routing, nullptr);
  std::mt19937_64 generator(5);
  HostTensor grad_gates(DType::f32, {test.tokens, test.k_max});
  fill_normal(grad_gates, generator, 0.0, 1.0);
  DeviceTensor device_grad_gates = to_device(grad_gates);
  DeviceTensor full(DType::f32, {test.tokens, test.experts}), low(DType::bf16, {test.tokens, test.experts});
  cuda::route_backward(logits, device_grad_gates, routing, params, 0.5f, 2.0f, full, nullptr);
  cuda::route_backward(logits, device_grad_gates, routing, params, 0.5f, 2.0f, low, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  HostTensor expected = full.download(), actual = low.download();
  int64_t mismatches = 0;
  for (int64_t index = 0; index < actual.numel(); ++index)
    mismatches += actual.data<uint16_t>()[index] != Bf16(expected.data<float>()[index]).bits;
  EXPECT_EQ(mismatches, 0) << mismatches << " of " << actual.numel() << " differ";
}

}  // namespace
