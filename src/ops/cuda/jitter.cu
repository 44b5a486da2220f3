// Multiplicative router jitter on CUDA (semantics: src/ops/moe_ops.h and src/ops/cpu/jitter.cpp):
//   out[i] = x[i] * factor_i,  factor_i = (1 - eps) + (2 eps) * philox_uniform(seed, stream_id, offset, i)
// over the flat row-major index i. philox_uniform (src/core/rng.h) draws four uniforms per Philox
// call, for the indices 4m .. 4m+3, so each thread handles such a quad with one call and uses all
// four words. The factor is formed with explicitly rounded fp32 operations (no FMA contraction), in
// the order the CPU reference uses, so both backends apply bit-identical factors.
// x and out may have different dtypes (bf16, fp16, fp32): with eps = 0 the factor is exactly 1 and
// the op is a dtype conversion (ops::convert relies on that); that case skips Philox. x and out may
// alias when their dtypes match.
#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/moe_ops.h"
#include "src/core/rng.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kQuad = 4;

template <typename T>
struct QuadVector;  // the type of 4 consecutive elements, for one aligned access
template <>
struct QuadVector<float> {
  using type = float4;
};
template <>
struct QuadVector<__nv_bfloat16> {
  using type = uint2;
};
template <>
struct QuadVector<__half> {
  using type = uint2;
};

template <typename In, typename Out, bool kJitter>
__global__ void __launch_bounds__(kThreads)
    jitter_kernel(const In* x, int64_t count, bool vector_access, float low, float span, uint64_t seed,
                  uint32_t stream_id, uint64_t offset, Out* out) {
  const int64_t quads = (count + kQuad - 1) / kQuad;
  for (int64_t quad = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; quad < quads;
       quad += int64_t(gridDim.x) * blockDim.x) {
    const int64_t first = quad * kQuad;
    const bool whole = vector_access && first + kQuad <= count;
    float values[kQuad];
    if (whole) {
      typename QuadVector<In>::type raw = *reinterpret_cast<const typename QuadVector<In>::type*>(x + first);
      const In* elements = reinterpret_cast<const In*>(&raw);
#pragma unroll
      for (int i = 0; i < kQuad; ++i) values[i] = to_float(elements[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kQuad; ++i) values[i] = first + i < count ? to_float(x[first + i]) : 0.0f;
    }
    if constexpr (kJitter) {
      // The counter of philox_uniform(seed, stream_id, offset, index) for index = first .. first+3.
      const uint64_t index = uint64_t(first);
      const PhiloxOutput random = philox4x32(uint32_t(index >> 2), uint32_t(index >> 34),
                                             uint32_t(offset) ^ stream_id, uint32_t(offset >> 32), seed);
#pragma unroll
      for (int i = 0; i < kQuad; ++i) {
        const float factor = __fadd_rn(low, __fmul_rn(span, uint_to_unit_float(random.value[i])));
        values[i] = __fmul_rn(values[i], factor);
      }
    }
    if (whole) {
      typename QuadVector<Out>::type raw;
      Out* elements = reinterpret_cast<Out*>(&raw);
#pragma unroll
      for (int i = 0; i < kQuad; ++i) elements[i] = from_float<Out>(values[i]);
      *reinterpret_cast<typename QuadVector<Out>::type*>(out + first) = raw;
    } else {
#pragma unroll
      for (int i = 0; i < kQuad; ++i)
        if (first + i < count) out[first + i] = from_float<Out>(values[i]);
    }
  }
}

}  // namespace

namespace cuda {

void apply_jitter(const Tensor& x, float eps, uint64_t seed, uint32_t stream_id, uint64_t offset, Tensor& out,
                  void* stream) {
  const char* op = "apply_jitter";
  SY_CHECK(x.device == DeviceKind::cuda && out.device == DeviceKind::cuda, op, ": x and out must be on cuda, got ",
                 x.describe(), " and ", out.describe());
  SY_CHECK(x.rank == out.rank && x.shape == out.shape, op, ": out must have the shape of x (", x.describe(),
                 "), got ", out.describe());
  SY_CHECK_INPUT(eps >= 0.0f && eps < 1.0f, op, ": eps must be in [0, 1), got ", eps);
  SY_CHECK(x.data != out.data || x.dtype == out.dtype, op, ": in-place use needs one dtype, got ",
                 x.describe(), " and ", out.describe());
  const int64_t count = x.numel();
  if (count == 0) return;
  SY_CHECK(x.data != nullptr && out.data != nullptr, op, ": x or out has no data");
  const bool jitter = eps != 0.0f;
  const float low = 1.0f - eps, span = 2.0f * eps;  // as the CPU reference forms them
  const bool vector_access = is_aligned(x.data, kQuad * dtype_size(x.dtype)) &&
                             is_aligned(out.data, kQuad * dtype_size(out.dtype));
  const unsigned blocks = grid_for((count + kQuad - 1) / kQuad, kThreads, int64_t(multiprocessor_count()) * 16);
  cudaStream_t cuda_stream = as_stream(stream);
  dispatch_activation_dtype(x.dtype, op, [&](auto in_tag) {
    using In = decltype(in_tag);
    dispatch_activation_dtype(out.dtype, op, [&](auto out_tag) {
      using Out = decltype(out_tag);
      if (jitter)
        jitter_kernel<In, Out, true><<<blocks, kThreads, 0, cuda_stream>>>(
            x.as<In>(), count, vector_access, low, span, seed, stream_id, offset, out.as<Out>());
      else
        jitter_kernel<In, Out, false><<<blocks, kThreads, 0, cuda_stream>>>(
            x.as<In>(), count, vector_access, low, span, seed, stream_id, offset, out.as<Out>());
      CUDA_CHECK_LAUNCH();
    });
  });
}

}  // namespace cuda
}  // namespace switchyard
