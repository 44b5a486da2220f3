// Expert activations on CUDA (semantics: src/ops/moe_ops.h and src/ops/cpu/activation.cpp).
//
//   gelu_tanh: pre, post [R, F]. post = 0.5 x (1 + tanh u) = x * sigmoid(2u),
//              u = sqrt(2/pi) (x + 0.044715 x^3);
//              d post / d x = s + 2 x s (1 - s) u'(x),  s = sigmoid(2u),  u' = sqrt(2/pi)(1 + 3*0.044715 x^2)
//              (the same as 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u', since tanh u = 2s - 1).
//   swiglu:    pre [R, 2F] = [gate | up] per row, post [R, F]: post = silu(g) * up, silu(g) = g sigmoid(g);
//              d/d gate = grad * up * s (1 + g (1 - s)),  d/d up = grad * silu(g),  s = sigmoid(g).
// Row-major; bf16, fp16 or fp32 storage with fp32 math. Memory-bound, so: 16-byte packs, a
// grid-stride loop, and sigmoid from the fast exp2-based __expf (relative error ~1e-6, far below
// bf16 resolution). gelu is treated as a flat array; swiglu walks rows so that the gate and up
// halves of a row are addressed without divisions.
#include "src/ops/cuda/cuda_common.cuh"
#include "src/ops/moe_ops.h"

namespace switchyard {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr float kSqrtTwoOverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

// 1 / (1 + exp(-z)); the argument of exp is clamped so 1 + exp stays finite for __fdividef.
__device__ __forceinline__ float fast_sigmoid(float z) {
  return __fdividef(1.0f, 1.0f + __expf(fminf(-z, 80.0f)));
}

__device__ __forceinline__ float gelu_tanh(float x) {
  const float inner = kSqrtTwoOverPi * fmaf(kGeluCubic * x, x * x, x);
  return x * fast_sigmoid(2.0f * inner);
}

__device__ __forceinline__ float gelu_tanh_derivative(float x) {
  const float inner = kSqrtTwoOverPi * fmaf(kGeluCubic * x, x * x, x);
  const float s = fast_sigmoid(2.0f * inner);
  const float inner_derivative = kSqrtTwoOverPi * fmaf(3.0f * kGeluCubic * x, x, 1.0f);
  return fmaf(2.0f * x * s * (1.0f - s), inner_derivative, s);
}

template <typename T, int kElems>
__global__ void __launch_bounds__(kThreads) gelu_forward_kernel(const T* pre, int64_t count, T* post) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * kElems;
  for (int64_t index = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kElems; index < count; index += stride) {
    float values[kElems];
    load_elems<T, kElems>(pre + index, values);
#pragma unroll
    for (int i = 0; i < kElems; ++i) values[i] = gelu_tanh(values[i]);
    store_elems<T, kElems>(post + index, values);
  }
}

template <typename T, int kElems>
__global__ void __launch_bounds__(kThreads)
    gelu_backward_kernel(const T* pre, const T* grad_post, int64_t count, T* grad_pre) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * kElems;
  for (int64_t index = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kElems; index < count; index += stride) {
    float values[kElems], grads[kElems];
    load_elems<T, kElems>(pre + index, values);
    load_elems<T, kElems>(grad_post + index, grads);
#pragma unroll
    for (int i = 0; i < kElems; ++i) grads[i] *= gelu_tanh_derivative(values[i]);
    store_elems<T, kElems>(grad_pre + index, grads);
  }
}

// Blocks stride over rows, threads over the row's columns.
template <typename T, int kElems>
__global__ void __launch_bounds__(kThreads) swiglu_forward_kernel(const T* pre, int64_t rows, int64_t width, T* post) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* gate_row = pre + row * 2 * width;
    const T* up_row = gate_row + width;
    T* out_row = post + row * width;
    for (int64_t column = int64_t(threadIdx.x) * kElems; column < width; column += int64_t(blockDim.x) * kElems) {
      float gate[kElems], up[kElems];
      load_elems<T, kElems>(gate_row + column, gate);
      load_elems<T, kElems>(up_row + column, up);
#pragma unroll
      for (int i = 0; i < kElems; ++i) gate[i] = gate[i] * fast_sigmoid(gate[i]) * up[i];
      store_elems<T, kElems>(out_row + column, gate);
    }
  }
}

template <typename T, int kElems>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const T* pre, const T* grad_post, int64_t rows, int64_t width, T* grad_pre) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* gate_row = pre + row * 2 * width;
    const T* up_row = gate_row + width;
    const T* grad_row = grad_post + row * width;
    T* grad_gate_row = grad_pre + row * 2 * width;
    T* grad_up_row = grad_gate_row + width;
    for (int64_t column = int64_t(threadIdx.x) * kElems; column < width; column += int64_t(blockDim.x) * kElems) {
      float gate[kElems], up[kElems], grad[kElems], grad_gate[kElems], grad_up[kElems];
      load_elems<T, kElems>(gate_row + column, gate);
      load_elems<T, kElems>(up_row + column, up);
      load_elems<T, kElems>(grad_row + column, grad);
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        const float s = fast_sigmoid(gate[i]);
        grad_gate[i] = grad[i] * up[i] * s * fmaf(gate[i], 1.0f - s, 1.0f);
        grad_up[i] = grad[i] * gate[i] * s;
      }
      store_elems<T, kElems>(grad_gate_row + column, grad_gate);
      store_elems<T, kElems>(grad_up_row + column, grad_up);
    }
  }
}

// Output width F of the activation; checks shapes and dtypes of pre and `other` ([R, F]).
int64_t check_shapes(const char* op, ExpertActivation activation, const Tensor& pre, const Tensor& other,
                     const char* other_name) {
  SY_CHECK(pre.rank == 2 && is_activation_dtype(pre.dtype), op,
                 ": pre must be a bf16/fp16/fp32 [R, F] tensor, got ", pre.describe());
  check_tensor(pre, op, pre.dtype, {pre.dim(0), pre.dim(1)});
  int64_t width = pre.dim(1);
  if (activation == ExpertActivation::swiglu) {
    SY_CHECK(width % 2 == 0, op, ": swiglu needs pre of even width [R, 2F], got ", pre.describe());
    width /= 2;
  } else {
    SY_CHECK_INPUT(activation == ExpertActivation::gelu_tanh, op, ": unknown activation ", int(activation));
  }
  check_tensor(other, other_name, pre.dtype, {pre.dim(0), width});
  return width;
}

template <typename T>
bool packs_fit(int64_t width, std::initializer_list<const void*> pointers) {
  if (width % Pack<T>::kElems != 0) return false;
  for (const void* pointer : pointers)
    if (!is_aligned(pointer, 16)) return false;
  return true;
}

unsigned elementwise_grid(int64_t work_items, int items_per_thread) {
  return grid_for(work_items, int64_t(kThreads) * items_per_thread, int64_t(multiprocessor_count()) * 16);
}

}  // namespace

namespace cuda {

void activation_forward(ExpertActivation activation, const Tensor& pre, Tensor& post, void* stream) {
  const int64_t width = check_shapes("activation_forward", activation, pre, post, "activation_forward: post");
  const int64_t rows = pre.dim(0);
  if (rows == 0 || width == 0) return;
  cudaStream_t cuda_stream = as_stream(stream);
  dispatch_activation_dtype(pre.dtype, "activation_forward", [&](auto tag) {
    using T = decltype(tag);
    const T* input = pre.as<T>();
    T* output = post.as<T>();
    if (activation == ExpertActivation::gelu_tanh) {
      const int64_t count = rows * width;
      dispatch_elems<T>(packs_fit<T>(count, {input, output}), [&](auto elems) {
        constexpr int kElems = decltype(elems)::value;
        gelu_forward_kernel<T, kElems><<<elementwise_grid(count, kElems), kThreads, 0, cuda_stream>>>(input, count,
                                                                                                     output);
        CUDA_CHECK_LAUNCH();
      });
    } else {
      dispatch_elems<T>(packs_fit<T>(width, {input, output}), [&](auto elems) {
        constexpr int kElems = decltype(elems)::value;
        const unsigned blocks = grid_for(rows, 1, int64_t(multiprocessor_count()) * 16);
        swiglu_forward_kernel<T, kElems><<<blocks, kThreads, 0, cuda_stream>>>(input, rows, width, output);
        CUDA_CHECK_LAUNCH();
      });
    }
  });
}

void activation_backward(ExpertActivation activation, const Tensor& pre, const Tensor& grad_post, Tensor& grad_pre,
                         void* stream) {
  const int64_t width =
      check_shapes("activation_backward", activation, pre, grad_post, "activation_backward: grad_post");
  check_tensor(grad_pre, "activation_backward: grad_pre", pre.dtype, {pre.dim(0), pre.dim(1)});
  const int64_t rows = pre.dim(0);
  if (rows == 0 || width == 0) return;
  cudaStream_t cuda_stream = as_stream(stream);
  dispatch_activation_dtype(pre.dtype, "activation_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* input = pre.as<T>();
    const T* grad = grad_post.as<T>();
    T* output = grad_pre.as<T>();
    if (activation == ExpertActivation::gelu_tanh) {
      const int64_t count = rows * width;
      dispatch_elems<T>(packs_fit<T>(count, {input, grad, output}), [&](auto elems) {
        constexpr int kElems = decltype(elems)::value;
        gelu_backward_kernel<T, kElems><<<elementwise_grid(count, kElems), kThreads, 0, cuda_stream>>>(
            input, grad, count, output);
        CUDA_CHECK_LAUNCH();
      });
    } else {
      dispatch_elems<T>(packs_fit<T>(width, {input, grad, output}), [&](auto elems) {
        constexpr int kElems = decltype(elems)::value;
        const unsigned blocks = grid_for(rows, 1, int64_t(multiprocessor_count()) * 16);
        swiglu_backward_kernel<T, kElems><<<blocks, kThreads, 0, cuda_stream>>>(input, grad, rows, width, output);
        CUDA_CHECK_LAUNCH();
      });
    }
  });
}

}  // namespace cuda
}  // namespace switchyard
