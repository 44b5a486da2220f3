// Router backward on CUDA (semantics: src/ops/moe_ops.h; the CPU reference src/ops/cpu/routing.cpp
// defines it). The forward is src/ops/cuda/routing.cu.
//
// One kernel, a row layout of the forward's kind (routing_layout::row_lanes: kGroup lanes per token,
// kPerLane logits per lane; 32 x 16 above 256 experts), scores recomputed from the fp32 logits z
// [T, E] and the saved lse. With q the balance losses' score (softmax: p; sigmoid: s' = s / sum_f s_f)
// and r the gates' score (softmax: p; sigmoid: s = sigmoid(z)), c = routed_scaling_factor:
//   dL/dq[t,e] = a * (w_aux E fc_e / T^2 + w_global E F_e / T + w_seq f_{s(t),e} / (S T_s))
//     (a = grad_aux_scale; fc the first-choice counts; F = global_fractions, when given;
//     f = sequence_fractions rows of the forward, when w_seq > 0; s(t) = t's sequence of T_s tokens)
//   gate terms of kept choices (slot < capacity), gg = c * grad_gates:
//     plain: dL/dr[e_j] += gg_j;  renormalized (N = sum_{i<k_t} r[e_i], g_j = r[e_j] / N):
//     dL/dr[e_i] += (gg_i - sum_j gg_j g_j) / N   (dropped choices still count in N; k_t = 0, which
//     expert choice gives, has no terms)
//   softmax (q = r = p):  dL/dz_e = p_e (dL/dp_e - sum_f p_f dL/dp_f) + zl_e
//   sigmoid:  dL/ds_e = dL/dr_e + (dL/dq_e - sum_f s'_f dL/dq_f) / S,  dL/dz_e = s_e (1 - s_e) dL/ds_e + zl_e
//     (s (1 - s) as s^2 e^-z for z >= 0: no cancellation)
//   zl_e = z' * w_z * 2 * lse * p_e / T, the z loss on the logits' logsumexp with either score.
// grad_logits [T, E] is fp32 as the contract says, or -- a CUDA extension the MoE layer uses --
// bf16 / fp16: the router GEMMs take their operands in the activation type, so writing that type
// here (rounded to nearest, the same bits a separate conversion would give) saves a conversion
// kernel and the fp32 round trip through memory.
#include <cmath>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/cuda/routing_layout.h"
#include "src/ops/cuda/routing_passes.cuh"
#include "src/ops/moe_ops.h"
#include "src/ops/ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kMaxChoices = kMaxTopK;  // src/ops/moe_ops.h
constexpr int kThreads = 256;

struct RouteBackwardArgs {
  const float* logits;
  const float* grad_gates;
  const int* expert_ids;
  const int* slots;
  const int* scalars;
  const int* token_k;
  const float* logsumexp;
  const int* first_choice_counts;
  const float* global_fractions;    // F [E], or nullptr (no global-batch loss term)
  const float* sequence_fractions;  // f [>= S][E], or nullptr (no sequence loss term)
  int64_t num_tokens;
  int64_t sequence_tokens;          // tokens per sequence (routing_layout::sequence_chunks)
  int num_experts;
  int k_max;
  bool renormalize;
  bool vector_loads;   // logits rows as float4
  bool vector_stores;  // grad_logits rows as 4-element vectors
  float gate_scale;            // routed_scaling_factor
  float aux_coefficient;       // grad_aux_scale * w_aux * E / T^2: dL/dq[t, e] = it * first_choice_count_e
  float global_coefficient;    // grad_aux_scale * w_global * E / T: dL/dq[t, e] += it * F_e
  float sequence_coefficient;  // grad_aux_scale * w_seq / S: dL/dq[t, e] += it * f_{s(t),e} / T_s
  float z_coefficient;         // grad_z_scale * w_z * 2 / T
  void* grad_logits;           // Out [T, E]
};

// Four consecutive Out elements in one aligned store (16 bytes of fp32, 8 of bf16 / fp16).
template <typename Out>
__device__ __forceinline__ void store_quad(Out* destination, float a, float b, float c, float d) {
  if constexpr (std::is_same<Out, float>::value) {
    *reinterpret_cast<float4*>(destination) = make_float4(a, b, c, d);
  } else {
    uint2 raw;
    Out* elements = reinterpret_cast<Out*>(&raw);
    elements[0] = from_float<Out>(a);
    elements[1] = from_float<Out>(b);
    elements[2] = from_float<Out>(c);
    elements[3] = from_float<Out>(d);
    *reinterpret_cast<uint2*>(destination) = raw;
  }
}

template <typename Out, int kGroup, int kPerLane, bool kSigmoid>
__global__ void __launch_bounds__(kThreads) route_backward_kernel(RouteBackwardArgs args) {
  constexpr int kTokensPerPass = 32 / kGroup;
  const int lane = threadIdx.x % 32, group = lane / kGroup, member = lane % kGroup;
  const int first_expert = member * kPerLane, num_experts = args.num_experts, k_max = args.k_max;
  float balance_gradient[kPerLane];  // the token-independent part of dL/dq
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int expert = first_expert + i;
    balance_gradient[i] = 0.0f;
    if (expert < num_experts) {
      balance_gradient[i] = args.aux_coefficient * float(args.first_choice_counts[expert]);
      if (args.global_fractions) balance_gradient[i] += args.global_coefficient * args.global_fractions[expert];
    }
  }

  const int capacity = args.scalars[kCapacity];
  const int64_t warps_total = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t first_token = (blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32) * kTokensPerPass;
       first_token < args.num_tokens; first_token += warps_total * kTokensPerPass) {
    const int64_t token = first_token + group;
    const bool token_exists = token < args.num_tokens;
    const int64_t safe_token = token_exists ? token : args.num_tokens - 1;
    float logits[kPerLane];
    load_logit_slice<kPerLane>(args.logits, args.num_tokens, num_experts, args.vector_loads, safe_token, first_expert,
                               logits);
    const float lse = args.logsumexp[safe_token];
    const int k_token = args.token_k[safe_token];

    // dL/dq: the constant part, plus the sequence loss's row of the token's sequence.
    float balance[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) balance[i] = balance_gradient[i];
    if (args.sequence_fractions) {
      const int64_t sequence = safe_token / args.sequence_tokens, begin = sequence * args.sequence_tokens;
      const int64_t length = args.num_tokens - begin < args.sequence_tokens ? args.num_tokens - begin
                                                                            : args.sequence_tokens;
      const float coefficient = args.sequence_coefficient / float(length);
      const float* fractions = args.sequence_fractions + sequence * num_experts;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const float fraction = first_expert + i < num_experts ? __ldg(fractions + first_expert + i) : 0.0f;
        balance[i] = fmaf(coefficient, fraction, balance[i]);
      }
    }

    // Gate terms: every lane of the group reads the token's choices (broadcast loads). Only kept
    // choices (slot < capacity) pass a gate gradient; dropped ones still count in N.
    const float* row = args.logits + safe_token * num_experts;
    int experts[kMaxChoices];
    float gate_grads[kMaxChoices], chosen_scores[kMaxChoices];
    float normalizer = 0.0f;
#pragma unroll
    for (int choice = 0; choice < kMaxChoices; ++choice) {
      const bool active = choice < k_token && choice < k_max;
      experts[choice] = active ? args.expert_ids[safe_token * k_max + choice] : -1;
      const int slot = active ? args.slots[safe_token * k_max + choice] : -1;
      const bool kept = experts[choice] >= 0 && slot >= 0 && slot < capacity;
      gate_grads[choice] = kept ? args.gate_scale * args.grad_gates[safe_token * k_max + choice] : 0.0f;
      chosen_scores[choice] = 0.0f;
      if (args.renormalize && experts[choice] >= 0) {
        const float logit = row[experts[choice]];
        chosen_scores[choice] = kSigmoid ? 1.0f / (1.0f + expf(-logit)) : expf(logit - lse);
      }
      normalizer += chosen_scores[choice];
    }
    if (args.renormalize && normalizer > 0.0f) {
      float weighted = 0.0f;  // sum_j gg_j g_j
#pragma unroll
      for (int choice = 0; choice < kMaxChoices; ++choice)
        weighted += gate_grads[choice] * (chosen_scores[choice] / normalizer);
#pragma unroll
      for (int choice = 0; choice < kMaxChoices; ++choice)
        gate_grads[choice] = (gate_grads[choice] - weighted) / normalizer;
    }

    float grads[kPerLane];
    if constexpr (kSigmoid) {
      // s, s (1 - s), S = sum s and sum_f s_f dL/dq_f; then dL/ds and dL/dz.
      float slopes[kPerLane], lane_sum = 0.0f, lane_dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const float exp_minus = expf(-logits[i]);  // +inf past the row (logit -inf): s = 0, slope 0
        const float score = 1.0f / (1.0f + exp_minus);
        slopes[i] = logits[i] >= 0.0f ? score * (score * exp_minus) : score * (1.0f - score);
        lane_sum += score;
        lane_dot += score * balance[i];
      }
      const float score_sum = group_sum<kGroup>(lane_sum);
      const float inverse = score_sum > 0.0f ? 1.0f / score_sum : 0.0f;
      const float shift = group_sum<kGroup>(lane_dot) * inverse;  // sum_f s'_f dL/dq_f
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) balance[i] = (balance[i] - shift) * inverse;  // -> dL/ds from q
#pragma unroll
      for (int choice = 0; choice < kMaxChoices; ++choice) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
          balance[i] += first_expert + i == experts[choice] ? gate_grads[choice] : 0.0f;  // no dynamic index
      }
      const float z_factor = args.z_coefficient * lse;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) grads[i] = fmaf(slopes[i], balance[i], z_factor * expf(logits[i] - lse));
    } else {
#pragma unroll
      for (int choice = 0; choice < kMaxChoices; ++choice) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
          balance[i] += first_expert + i == experts[choice] ? gate_grads[choice] : 0.0f;  // no dynamic index
      }
      float probs[kPerLane], local_dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        probs[i] = expf(logits[i] - lse);
        local_dot += probs[i] * balance[i];
      }
      const float shift = group_sum<kGroup>(local_dot) - args.z_coefficient * lse;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) grads[i] = probs[i] * (balance[i] - shift);
    }

    if (!token_exists) continue;
    Out* out = static_cast<Out*>(args.grad_logits) + token * num_experts;
    if (args.vector_stores && first_expert + kPerLane <= num_experts) {
#pragma unroll
      for (int i = 0; i < kPerLane; i += 4)
        store_quad<Out>(out + first_expert + i, grads[i], grads[i + 1], grads[i + 2], grads[i + 3]);
    } else {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
        if (first_expert + i < num_experts) out[first_expert + i] = from_float<Out>(grads[i]);
    }
  }
}

}  // namespace

namespace cuda {

void route_backward(const Tensor& logits, const Tensor& grad_gates, const RoutingResult& routing,
                    const RoutingParams& params, float grad_aux_scale, float grad_z_scale, Tensor& grad_logits,
                    void* stream_handle, const Tensor* global_fractions) {
  validate_routing_params(params);  // the rules both backends share (src/ops/ops.h)
  SY_CHECK_INPUT(params.global_aux_loss_weight == 0.0f || global_fractions != nullptr,
                 "route_backward: global_aux_loss_weight > 0 needs global_fractions (global_balance_loss)");
  SY_CHECK_INPUT(params.num_experts <= kMaxRouteExperts, "routing on CUDA supports up to ", kMaxRouteExperts,
                 " experts, got ", params.num_experts);
  const int64_t tokens = params.num_tokens;
  const int experts = params.num_experts, k_max = params.k_max;
  check_tensor(logits, "route_backward: logits", DType::f32, {tokens, experts});
  check_tensor(grad_gates, "route_backward: grad_gates", DType::f32, {tokens, k_max});
  check_tensor(routing.expert_ids, "route_backward: expert_ids", DType::i32, {tokens, k_max});
  check_tensor(routing.slots, "route_backward: slots", DType::i32, {tokens, k_max});
  check_tensor(routing.scalars, "route_backward: scalars", DType::i32, {kNumRoutingScalars});
  check_tensor(routing.token_k, "route_backward: token_k", DType::i32, {tokens});
  check_tensor(routing.logsumexp, "route_backward: logsumexp", DType::f32, {tokens});
  check_tensor(routing.first_choice_counts, "route_backward: first_choice_counts", DType::i32, {experts});
  SY_CHECK(grad_logits.dtype == DType::f32 || grad_logits.dtype == DType::bf16 || grad_logits.dtype == DType::f16,
           "route_backward: grad_logits must be fp32, bf16 or fp16, got ", grad_logits.describe());
  check_tensor(grad_logits, "route_backward: grad_logits", grad_logits.dtype, {tokens, experts});
  if (global_fractions != nullptr)
    check_tensor(*global_fractions, "route_backward: global_fractions", DType::f32, {experts});
  const bool sequence_loss = params.seq_aux_loss_weight > 0.0f;
  if (sequence_loss) check_sequence_fractions(routing.sequence_fractions, params, "route_backward");
  if (tokens == 0) return;

  RouteBackwardArgs args{};
  args.logits = logits.as<float>();
  args.grad_gates = grad_gates.as<float>();
  args.expert_ids = routing.expert_ids.as<int>();
  args.slots = routing.slots.as<int>();
  args.scalars = routing.scalars.as<int>();
  args.token_k = routing.token_k.as<int>();
  args.logsumexp = routing.logsumexp.as<float>();
  args.first_choice_counts = routing.first_choice_counts.as<int>();
  args.num_tokens = tokens;
  args.num_experts = experts;
  args.k_max = k_max;
  args.renormalize = params.renormalize;
  args.vector_loads = experts % 4 == 0 && is_aligned(logits.data, 16);
  args.vector_stores = experts % 4 == 0 && is_aligned(grad_logits.data, 4 * dtype_size(grad_logits.dtype));
  const double token_count = double(tokens);
  args.aux_coefficient =
      float(double(grad_aux_scale) * params.aux_loss_weight * experts / (token_count * token_count));
  args.z_coefficient = float(double(grad_z_scale) * params.z_loss_weight * 2.0 / token_count);
  args.gate_scale = params.routed_scaling_factor;
  if (params.global_aux_loss_weight > 0.0f) {
    args.global_fractions = global_fractions->as<float>();
    args.global_coefficient = float(double(grad_aux_scale) * params.global_aux_loss_weight * experts / token_count);
  }
  if (sequence_loss) {
    const routing_layout::SequenceChunks chunks = routing_layout::sequence_chunks(tokens, params.tokens_per_sequence);
    args.sequence_fractions = routing.sequence_fractions.as<float>();
    args.sequence_tokens = chunks.sequence_tokens;
    args.sequence_coefficient =
        float(double(grad_aux_scale) * params.seq_aux_loss_weight / double(chunks.num_sequences));
  }
  args.grad_logits = grad_logits.data;

  cudaStream_t stream = as_stream(stream_handle);
  dispatch_activation_dtype(grad_logits.dtype, "route_backward: grad_logits", [&](auto tag) {
    using Out = decltype(tag);
    dispatch_lane_layout(experts, [&](auto lanes) {
      using Lanes = decltype(lanes);
      constexpr int kTokensPerBlock = (kThreads / 32) * (32 / Lanes::group);
      const unsigned blocks = grid_for(tokens, kTokensPerBlock, int64_t(multiprocessor_count()) * 16);
      if (params.score_function == ScoreFunction::sigmoid)
        route_backward_kernel<Out, Lanes::group, Lanes::per_lane, true><<<blocks, kThreads, 0, stream>>>(args);
      else
        route_backward_kernel<Out, Lanes::group, Lanes::per_lane, false><<<blocks, kThreads, 0, stream>>>(args);
      CUDA_CHECK_LAUNCH();
    });
  });
}

}  // namespace cuda
}  // namespace switchyard
