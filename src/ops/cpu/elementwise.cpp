// CPU reference of the elementwise helpers (contract: src/ops/elementwise_ops.h).
#include "src/ops/elementwise_ops.h"

namespace switchyard {
namespace cpu {
namespace {

double load(const Tensor& tensor, int64_t index) {
  switch (tensor.dtype) {
    case DType::f32: return double(tensor.as<float>()[index]);
    case DType::f64: return tensor.as<double>()[index];
    case DType::bf16: return double(float(tensor.as<Bf16>()[index]));
    case DType::f16: return double(float(tensor.as<Half>()[index]));
    default: SY_THROW("elementwise: unsupported dtype ", dtype_name(tensor.dtype));
  }
}

void store(Tensor& tensor, int64_t index, double value) {
  switch (tensor.dtype) {
    case DType::f32: tensor.as<float>()[index] = float(value); return;
    case DType::f64: tensor.as<double>()[index] = value; return;
    // Via float: one rounding to float, then round-to-nearest-even to 16 bits, like a device cast.
    case DType::bf16: tensor.as<Bf16>()[index] = Bf16(float(value)); return;
    case DType::f16: tensor.as<Half>()[index] = Half(float(value)); return;
    default: SY_THROW("elementwise: unsupported dtype ", dtype_name(tensor.dtype));
  }
}

bool is_float(DType dtype) {
  return dtype == DType::f32 || dtype == DType::f64 || dtype == DType::bf16 || dtype == DType::f16;
}

void check_pair(const char* op, const Tensor& input, const Tensor& output) {
  SY_CHECK(input.device == DeviceKind::cpu && output.device == DeviceKind::cpu, op, ": tensors must be on cpu, got ",
           input.describe(), " and ", output.describe());
  SY_CHECK(is_float(input.dtype) && is_float(output.dtype), op, ": float tensors only, got ", input.describe(),
           " and ", output.describe());
  SY_CHECK(input.numel() == output.numel(), op, ": element counts differ: ", input.describe(), " vs ",
           output.describe());
}

}  // namespace

void convert(const Tensor& source, Tensor& destination) {
  check_pair("convert", source, destination);
  const int64_t count = source.numel();
  for (int64_t index = 0; index < count; ++index) store(destination, index, load(source, index));
}

void add_into(const Tensor& addend, Tensor& accumulator) {
  check_pair("add_into", addend, accumulator);
  SY_CHECK(addend.dtype == accumulator.dtype, "add_into: dtypes differ: ", addend.describe(), " vs ",
           accumulator.describe());
  const int64_t count = addend.numel();
  if (addend.dtype == DType::f32) {
    const float* in = addend.as<float>();
    float* out = accumulator.as<float>();
    for (int64_t index = 0; index < count; ++index) out[index] = float(double(out[index]) + double(in[index]));
    return;
  }
  for (int64_t index = 0; index < count; ++index)
    store(accumulator, index, load(accumulator, index) + load(addend, index));
}

}  // namespace cpu
}  // namespace switchyard
