// The routing's fp32 arithmetic that must give the same bits on the CPU and on CUDA, so that the
// integer routing outputs (choices, slots, drops) of the two backends are equal exactly whatever
// the score function, bias or drop policy (src/ops/moe_ops.h). Library expf / division /
// accumulation order differ between glibc and the CUDA math library by an ulp now and then, which
// near a tie flips a choice; these functions use only correctly rounded IEEE operations (fmaf,
// one rounded multiply or add per step, a division) in a fixed order, and nothing here may be
// contracted: every multiply-add is an explicit fmaf. Neither backend is built with fast math
// (no flush to zero, IEEE division), which this relies on.
//
// Accuracy: routing_exp is within 2 ulp of e^x on [-87, 88] (Cephes expf's polynomial with a
// two-part ln 2); below -87 it returns 0 and above 88 +inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SY_ROUTING_MATH __host__ __device__ __forceinline__
#else
#define SY_ROUTING_MATH inline
#endif

namespace switchyard {

SY_ROUTING_MATH float routing_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fmaf(a, b, c);
#endif
}

// A product that the compiler may not fuse with a later add (nvcc contracts a * b + c into an fma
// across inlined calls; __fmul_rn is never contracted). Host builds target x86-64 without FMA
// instructions, where GCC does not contract.
SY_ROUTING_MATH float routing_multiply(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// Correctly rounded a / b on both (nvcc's `/` is IEEE unless -prec-div=false; spelled out anyway).
SY_ROUTING_MATH float routing_divide(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

SY_ROUTING_MATH float routing_exp(float x) {
  if (!(x >= -87.0f)) return x != x ? x : 0.0f;  // NaN stays NaN
  if (x > 88.0f) return INFINITY;
  const float n = rintf(routing_multiply(x, 1.44269504088896341f));  // round(x / ln 2): one rounded multiply, exact rint
  float r = routing_fma(-n, 0.693359375f, x);        // x - n ln2 in two parts (Cody-Waite)
  r = routing_fma(n, 2.12194440e-4f, r);
  const float r2 = routing_multiply(r, r);
  float p = 1.9875691500e-4f;
  p = routing_fma(p, r, 1.3981999507e-3f);
  p = routing_fma(p, r, 8.3334519073e-3f);
  p = routing_fma(p, r, 4.1665795894e-2f);
  p = routing_fma(p, r, 1.6666665459e-1f);
  p = routing_fma(p, r, 5.0000001201e-1f);
  const float y = routing_fma(p, r2, r) + 1.0f;  // e^r
  // 2^n for n in [-126, 127] built from its bits; the product is exact unless subnormal, where
  // IEEE rounding (no flush to zero on either backend) still gives one answer.
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
#if defined(__CUDA_ARCH__)
  scale = __int_as_float(bits);
#else
  std::memcpy(&scale, &bits, sizeof(scale));
#endif
  return routing_multiply(y, scale);
}

// 1 / (1 + e^-z): the sigmoid score and key.
SY_ROUTING_MATH float routing_sigmoid(float z) { return routing_divide(1.0f, 1.0f + routing_exp(-z)); }

// The priority score of expert-choice routing and of probability drops, for one token's fp32
// logits (row of `num_experts`, stride `stride` between experts):
//   softmax: routing_exp(z_e - m) / S, m = max_f z_f, S = sum over f = 0, 1, ..., E-1 (this order)
//            of routing_exp(z_f - m)
//   sigmoid: routing_sigmoid(z_e)
// The softmax denominator for a whole row (the same for every expert of the token):
template <typename LoadLogit>
SY_ROUTING_MATH float routing_softmax_denominator(int num_experts, float max_logit, LoadLogit&& load_logit) {
  float sum = 0.0f;
  for (int expert = 0; expert < num_experts; ++expert) sum += routing_exp(load_logit(expert) - max_logit);
  return sum;
}
SY_ROUTING_MATH float routing_softmax_priority(float logit, float max_logit, float denominator) {
  return routing_divide(routing_exp(logit - max_logit), denominator);
}

}  // namespace switchyard
