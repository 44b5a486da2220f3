// Multi-tensor AdamW on CUDA: one launch for every tensor (contract: src/ops/model_ops.h;
// reference: src/ops/cpu/adamw.cpp).
//
// Per element (c = adamw_coefficients(params), computed on the host):
//   g = grad * c.grad_scale
//   m = c.beta1 m + c.one_minus_beta1 g;   v = c.beta2 v + c.one_minus_beta2 (g g)
//   denom = sqrt(v) / c.sqrt_bias2 + c.eps
//   p = p * c.decay_factor (decay tensors);  p = p - (c.step_size m) / denom
//   compute_copy = round(p) to bf16 / fp16 (when present)
// Every operation is a correctly rounded fp32 intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn,
// __fsqrt_rn), which the compiler may not contract into FMAs, so the result equals the CPU
// reference's bit for bit.
//
// The tensors are cut into chunks of kChunkElements; a table of chunks (pointers already offset to
// the chunk, element count, copy dtype, decay flag) lives in device memory and block b updates
// chunk b. Bytes per element: 16 read (param, grad, m, v), 12 written (+2 for the copy): a pass over
// memory, so each thread loads its next four elements before it updates the current ones (the loads
// of one iteration overlap the arithmetic and stores of the previous), and writes its four copy
// values as one 8-byte store where the copy is 8-byte aligned. The table depends only on the tensor
// list, so it is uploaded when the list changes and reused otherwise (a training run passes the
// same list every step: one upload per run). The upload is an async copy from pageable memory,
// which the driver stages before returning.
#include <vector>

#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/model_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int64_t kChunkElements = 16384;
constexpr int kScratchAdamWTable = 0x4403;  // persistent_scratch tag (cuda_common.cuh)

enum CopyKind : int32_t { kNoCopy = 0, kCopyBf16 = 1, kCopyF16 = 2 };

struct Chunk {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* copy;
  int64_t count;
  int32_t copy_kind;
  int32_t flags;  // bit 0: weight decay, bit 1: the four fp32 arrays are 16-byte aligned, bit 2: the copy is
                  // 8-byte aligned
};
constexpr int32_t kDecayFlag = 1, kVectorFlag = 2, kVectorCopyFlag = 4;

__device__ __forceinline__ void adamw_element(float& param, float grad, float& exp_avg, float& exp_avg_sq,
                                              const AdamWCoefficients& c, bool decay) {
  const float g = __fmul_rn(grad, c.grad_scale);
  const float m = __fadd_rn(__fmul_rn(c.beta1, exp_avg), __fmul_rn(c.one_minus_beta1, g));
  const float v = __fadd_rn(__fmul_rn(c.beta2, exp_avg_sq), __fmul_rn(c.one_minus_beta2, __fmul_rn(g, g)));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), c.sqrt_bias2), c.eps);
  const float decayed = decay ? __fmul_rn(param, c.decay_factor) : param;
  param = __fsub_rn(decayed, __fdiv_rn(__fmul_rn(c.step_size, m), denom));
  exp_avg = m;
  exp_avg_sq = v;
}

__device__ __forceinline__ void store_copy(void* copy, int32_t kind, int64_t index, float value) {
  if (kind == kCopyBf16)
    static_cast<__nv_bfloat16*>(copy)[index] = __float2bfloat16_rn(value);
  else if (kind == kCopyF16)
    static_cast<__half*>(copy)[index] = __float2half_rn(value);
}

// Four consecutive copy values (elements 4 * vector_index ..) as one 8-byte store.
__device__ __forceinline__ void store_copy4(void* copy, int32_t kind, int64_t vector_index, const float4& value) {
  uint2 packed;
  if (kind == kCopyBf16) {
    const __nv_bfloat162 low = __floats2bfloat162_rn(value.x, value.y), high = __floats2bfloat162_rn(value.z, value.w);
    packed.x = *reinterpret_cast<const uint32_t*>(&low);
    packed.y = *reinterpret_cast<const uint32_t*>(&high);
  } else {
    const __half2 low = __floats2half2_rn(value.x, value.y), high = __floats2half2_rn(value.z, value.w);
    packed.x = *reinterpret_cast<const uint32_t*>(&low);
    packed.y = *reinterpret_cast<const uint32_t*>(&high);
  }
  reinterpret_cast<uint2*>(copy)[vector_index] = packed;
}

__global__ void __launch_bounds__(kThreads) adamw_kernel(const Chunk* __restrict__ chunks, AdamWCoefficients c) {
  const Chunk chunk = chunks[blockIdx.x];
  const bool decay = (chunk.flags & kDecayFlag) != 0;
  int64_t start = 0;
  if (chunk.flags & kVectorFlag) {
    const int64_t vectors = chunk.count / 4;
    const float4* param_in = reinterpret_cast<const float4*>(chunk.param);
    const float4* grad_in = reinterpret_cast<const float4*>(chunk.grad);
    const float4* m_in = reinterpret_cast<const float4*>(chunk.exp_avg);
    const float4* v_in = reinterpret_cast<const float4*>(chunk.exp_avg_sq);
    const bool vector_copy = (chunk.flags & kVectorCopyFlag) != 0;
    int64_t index = threadIdx.x;
    float4 param{}, grad{}, m{}, v{};
    if (index < vectors) {
      param = param_in[index];
      grad = grad_in[index];
      m = m_in[index];
      v = v_in[index];
    }
    for (; index < vectors; index += kThreads) {
      // The next four elements' loads first (distinct arrays: no store below can change them).
      const int64_t next = index + kThreads;
      float4 next_param{}, next_grad{}, next_m{}, next_v{};
      if (next < vectors) {
        next_param = param_in[next];
        next_grad = grad_in[next];
        next_m = m_in[next];
        next_v = v_in[next];
      }
      adamw_element(param.x, grad.x, m.x, v.x, c, decay);
      adamw_element(param.y, grad.y, m.y, v.y, c, decay);
      adamw_element(param.z, grad.z, m.z, v.z, c, decay);
      adamw_element(param.w, grad.w, m.w, v.w, c, decay);
      reinterpret_cast<float4*>(chunk.param)[index] = param;
      reinterpret_cast<float4*>(chunk.exp_avg)[index] = m;
      reinterpret_cast<float4*>(chunk.exp_avg_sq)[index] = v;
      if (chunk.copy_kind != kNoCopy) {
        if (vector_copy) {
          store_copy4(chunk.copy, chunk.copy_kind, index, param);
        } else {
          store_copy(chunk.copy, chunk.copy_kind, 4 * index, param.x);
          store_copy(chunk.copy, chunk.copy_kind, 4 * index + 1, param.y);
          store_copy(chunk.copy, chunk.copy_kind, 4 * index + 2, param.z);
          store_copy(chunk.copy, chunk.copy_kind, 4 * index + 3, param.w);
        }
      }
      param = next_param;
      grad = next_grad;
      m = next_m;
      v = next_v;
    }
    start = vectors * 4;
  }
  for (int64_t index = start + threadIdx.x; index < chunk.count; index += kThreads) {
    float param = chunk.param[index], m = chunk.exp_avg[index], v = chunk.exp_avg_sq[index];
    adamw_element(param, chunk.grad[index], m, v, c, decay);
    chunk.param[index] = param;
    chunk.exp_avg[index] = m;
    chunk.exp_avg_sq[index] = v;
    if (chunk.copy_kind != kNoCopy) store_copy(chunk.copy, chunk.copy_kind, index, param);
  }
}

void check_entry(const AdamWTensor& entry, size_t index) {
  const Tensor* parts[] = {&entry.param, &entry.grad, &entry.exp_avg, &entry.exp_avg_sq};
  const char* names[] = {"param", "grad", "exp_avg", "exp_avg_sq"};
  for (int part = 0; part < 4; ++part) {
    const Tensor& tensor = *parts[part];
    SY_CHECK_INPUT(tensor.device == DeviceKind::cuda && tensor.dtype == DType::f32 &&
                       tensor.numel() == entry.param.numel() && (tensor.data != nullptr || tensor.numel() == 0),
                   "adamw_step: tensor ", index, ": ", names[part], " must be an fp32 cuda tensor of ",
                   entry.param.numel(), " elements, got ", tensor.describe());
  }
  if (entry.compute_copy.data) {
    const Tensor& copy = entry.compute_copy;
    SY_CHECK_INPUT(copy.device == DeviceKind::cuda && (copy.dtype == DType::bf16 || copy.dtype == DType::f16) &&
                       copy.numel() == entry.param.numel(),
                   "adamw_step: tensor ", index, ": compute_copy must be a bf16 or fp16 cuda tensor of ",
                   entry.param.numel(), " elements, got ", copy.describe());
  }
}

std::vector<Chunk> build_chunks(const std::vector<AdamWTensor>& tensors) {
  std::vector<Chunk> chunks;
  for (const AdamWTensor& entry : tensors) {
    const int64_t count = entry.param.numel();
    const bool aligned = is_aligned(entry.param.data, 16) && is_aligned(entry.grad.data, 16) &&
                         is_aligned(entry.exp_avg.data, 16) && is_aligned(entry.exp_avg_sq.data, 16);
    const int32_t copy_kind =
        !entry.compute_copy.data ? kNoCopy : (entry.compute_copy.dtype == DType::bf16 ? kCopyBf16 : kCopyF16);
    const size_t copy_element = copy_kind == kNoCopy ? 0 : 2;
    for (int64_t start = 0; start < count; start += kChunkElements) {
      Chunk chunk{};
      chunk.param = entry.param.as<float>() + start;
      chunk.grad = entry.grad.as<float>() + start;
      chunk.exp_avg = entry.exp_avg.as<float>() + start;
      chunk.exp_avg_sq = entry.exp_avg_sq.as<float>() + start;
      chunk.copy =
          copy_kind == kNoCopy ? nullptr : static_cast<unsigned char*>(entry.compute_copy.data) + start * copy_element;
      chunk.count = std::min(kChunkElements, count - start);
      chunk.copy_kind = copy_kind;
      chunk.flags = (entry.weight_decay ? kDecayFlag : 0) | (aligned ? kVectorFlag : 0) |
                    (chunk.copy != nullptr && is_aligned(chunk.copy, 8) ? kVectorCopyFlag : 0);
      chunks.push_back(chunk);
    }
  }
  return chunks;
}

// The device copy of `chunks` for `stream` (uploaded only when it changed).
const Chunk* device_table(const std::vector<Chunk>& chunks, cudaStream_t stream) {
  const size_t bytes = chunks.size() * sizeof(Chunk);
  return static_cast<const Chunk*>(cached_device_table(chunks.data(), bytes, stream, kScratchAdamWTable));
}

}  // namespace

namespace cuda {

void adamw_step(const std::vector<AdamWTensor>& tensors, const AdamWParams& params, void* stream) {
  validate_adamw_params(params);
  for (size_t index = 0; index < tensors.size(); ++index) check_entry(tensors[index], index);
  const std::vector<Chunk> chunks = build_chunks(tensors);
  if (chunks.empty()) return;
  SY_CHECK_INPUT(chunks.size() < (size_t(1) << 31), "adamw_step: too many chunks: ", chunks.size());
  cudaStream_t cuda_stream = as_stream(stream);
  const Chunk* table = device_table(chunks, cuda_stream);
  adamw_kernel<<<unsigned(chunks.size()), kThreads, 0, cuda_stream>>>(table, adamw_coefficients(params));
  CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace switchyard
