// The memory helpers of src/ops/ops.h (fill_zero, copy, convert, add_into, synchronize), ordered
// on context.stream like the ops; CPU references in src/ops/elementwise_ops.h, rules in
// src/ops/dispatch.h.
#include "src/ops/dispatch.h"

#include <initializer_list>

namespace switchyard {
namespace ops {

using dispatch::expect_on_device;
using dispatch::is_cpu;
#if defined(SWITCHYARD_WITH_CUDA)
using dispatch::cuda_stream;
#endif

void fill_zero(const ExecContext& context, Tensor& tensor) {
  expect_on_device(context, "fill_zero", {&tensor});
  if (tensor.bytes() == 0) return;
  if (is_cpu(context)) return device_memset(tensor.data, DeviceKind::cpu, 0, tensor.bytes());
  SY_CUDA_BACKEND("fill_zero", CUDA_CHECK(cudaMemsetAsync(tensor.data, 0, tensor.bytes(), cuda_stream(context))));
}

void copy(const ExecContext& context, const Tensor& source, Tensor& destination) {
  SY_CHECK(source.dtype == destination.dtype && source.bytes() == destination.bytes(),
           "ops::copy: source ", source.describe(), " and destination ", destination.describe(),
           " differ in dtype or size");
  for (const Tensor* tensor : std::initializer_list<const Tensor*>{&source, &destination})
    SY_CHECK(tensor->device == DeviceKind::cpu || tensor->device == context.device, "ops::copy: tensor ",
             tensor->describe(), " is neither on the host nor on the context's device");
  if (source.bytes() == 0) return;
  if (source.device == DeviceKind::cpu && destination.device == DeviceKind::cpu) {
    // Host to host while device work may still write the source would race; CPU contexts have none.
    return device_copy(destination.data, DeviceKind::cpu, source.data, DeviceKind::cpu, source.bytes());
  }
#if defined(SWITCHYARD_WITH_CUDA)
  CUDA_CHECK(cudaMemcpyAsync(destination.data, source.data, source.bytes(), cudaMemcpyDefault, cuda_stream(context)));
  if (destination.device == DeviceKind::cpu) CUDA_CHECK(cudaStreamSynchronize(cuda_stream(context)));
#else
  dispatch::no_cuda_backend("copy");
#endif
}

void convert(const ExecContext& context, const Tensor& source, Tensor& destination) {
  expect_on_device(context, "convert", {&source, &destination});
  SY_CHECK(source.rank == destination.rank && source.shape == destination.shape, "ops::convert: shapes differ: ",
           source.describe(), " vs ", destination.describe());
  if (source.dtype == destination.dtype) return copy(context, source, destination);
  if (is_cpu(context)) return cpu::convert(source, destination);
  // Jitter with eps = 0 multiplies by exactly 1: a plain cast, reading one type and writing another.
  SY_CUDA_BACKEND("convert", cuda::apply_jitter(source, 0.0f, 0, 0, 0, destination, context.stream));
}

void add_into(const ExecContext& context, const Tensor& addend, Tensor& accumulator) {
  expect_on_device(context, "add_into", {&addend, &accumulator});
  if (is_cpu(context)) return cpu::add_into(addend, accumulator);
#if defined(SWITCHYARD_WITH_CUDA)
  SY_CHECK(addend.dtype == accumulator.dtype && addend.numel() == accumulator.numel(), "ops::add_into: ",
           addend.describe(), " and ", accumulator.describe(), " differ in dtype or size");
  if (addend.numel() == 0) return;
  cublasHandle_t handle = thread_cublas_handle();
  CUBLAS_CHECK(cublasSetStream(handle, cuda_stream(context)));
  CUBLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
  const bool is_double = addend.dtype == DType::f64;
  const double one_double = 1.0;
  const float one_float = 1.0f;
  CUBLAS_CHECK(cublasAxpyEx_64(handle, addend.numel(), is_double ? static_cast<const void*>(&one_double) : &one_float,
                               is_double ? CUDA_R_64F : CUDA_R_32F, addend.data, cuda_data_type_of(addend.dtype, "ops::add_into"), 1,
                               accumulator.data, cuda_data_type_of(accumulator.dtype, "ops::add_into"), 1,
                               is_double ? CUDA_R_64F : CUDA_R_32F));
#else
  dispatch::no_cuda_backend("add_into");
#endif
}

void synchronize(const ExecContext& context) {
  if (is_cpu(context)) return;
  SY_CUDA_BACKEND("synchronize", CUDA_CHECK(cudaStreamSynchronize(cuda_stream(context))));
}

}  // namespace ops
}  // namespace switchyard
