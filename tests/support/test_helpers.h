// Test utilities shared by the CPU and CUDA tests: owned host tensors, random fills, poison,
// element access for any dtype, error measures and central finite differences.
// Host only (no CUDA, no GoogleTest): CUDA tests copy HostTensors to the device themselves.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <random>
#include <vector>

#include "src/core/device.h"
#include "src/core/dtype.h"
#include "src/core/tensor.h"

namespace switchyard {
namespace testing {

// A host tensor that owns its memory (move-only).
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dtype, std::initializer_list<int64_t> dims) {
    tensor_ = Tensor(nullptr, dtype, DeviceKind::cpu, dims);
    buffer_ = Buffer(DeviceKind::cpu, tensor_.bytes());
    tensor_.data = buffer_.data();
  }
  Tensor& tensor() { return tensor_; }
  const Tensor& tensor() const { return tensor_; }
  operator Tensor&() { return tensor_; }
  operator const Tensor&() const { return tensor_; }
  template <typename T>
  T* data() const { return tensor_.as<T>(); }
  int64_t numel() const { return tensor_.numel(); }

 private:
  Buffer buffer_;
  Tensor tensor_;
};

inline double get_element(const Tensor& tensor, int64_t index) {
  switch (tensor.dtype) {
    case DType::f32: return tensor.as<float>()[index];
    case DType::f64: return tensor.as<double>()[index];
    case DType::bf16: return double(float(tensor.as<Bf16>()[index]));
    case DType::f16: return double(float(tensor.as<Half>()[index]));
    case DType::i32: return tensor.as<int32_t>()[index];
    case DType::i64: return double(tensor.as<int64_t>()[index]);
    case DType::u8: return tensor.as<uint8_t>()[index];
  }
  return 0.0;
}

inline void set_element(Tensor& tensor, int64_t index, double value) {
  switch (tensor.dtype) {
    case DType::f32: tensor.as<float>()[index] = float(value); return;
    case DType::f64: tensor.as<double>()[index] = value; return;
    case DType::bf16: tensor.as<Bf16>()[index] = Bf16(float(value)); return;
    case DType::f16: tensor.as<Half>()[index] = Half(float(value)); return;
    case DType::i32: tensor.as<int32_t>()[index] = int32_t(value); return;
    case DType::i64: tensor.as<int64_t>()[index] = int64_t(value); return;
    case DType::u8: tensor.as<uint8_t>()[index] = uint8_t(value); return;
  }
}

inline bool is_float_dtype(DType dtype) {
  return dtype == DType::f32 || dtype == DType::f64 || dtype == DType::bf16 || dtype == DType::f16;
}

// Uniform in [low, high) for float tensors; integers uniform in [low, high] for integer tensors.
inline void fill_uniform(Tensor& tensor, std::mt19937_64& generator, double low, double high) {
  std::uniform_real_distribution<double> real(low, high);
  std::uniform_int_distribution<int64_t> integer(int64_t(std::ceil(low)), int64_t(std::floor(high)));
  for (int64_t index = 0; index < tensor.numel(); ++index)
    set_element(tensor, index, is_float_dtype(tensor.dtype) ? real(generator) : double(integer(generator)));
}

inline void fill_normal(Tensor& tensor, std::mt19937_64& generator, double mean, double stddev) {
  std::normal_distribution<double> normal(mean, stddev);
  for (int64_t index = 0; index < tensor.numel(); ++index) set_element(tensor, index, normal(generator));
}

// Values no correct op writes: NaN for floats, 0x5EADBEEF-like garbage for integers. Poison an
// output before the call under test so that any element the op forgets to write shows up.
inline void poison(Tensor& tensor) {
  for (int64_t index = 0; index < tensor.numel(); ++index) {
    if (is_float_dtype(tensor.dtype))
      set_element(tensor, index, std::numeric_limits<double>::quiet_NaN());
    else if (tensor.dtype == DType::u8)
      set_element(tensor, index, 0xA5);
    else
      set_element(tensor, index, 1592639215.0);  // 0x5EED5EEF: far outside any index range used in tests
  }
}

inline std::vector<double> to_vector(const Tensor& tensor) {
  std::vector<double> values(static_cast<size_t>(tensor.numel()));
  for (int64_t index = 0; index < tensor.numel(); ++index) values[size_t(index)] = get_element(tensor, index);
  return values;
}

inline void copy_values(const Tensor& source, Tensor& destination) {
  for (int64_t index = 0; index < source.numel(); ++index)
    set_element(destination, index, get_element(source, index));
}

inline bool all_finite(const Tensor& tensor) {
  for (int64_t index = 0; index < tensor.numel(); ++index)
    if (!std::isfinite(get_element(tensor, index))) return false;
  return true;
}

inline double dot(const Tensor& left, const Tensor& right) {
  double sum = 0.0;
  for (int64_t index = 0; index < left.numel(); ++index) sum += get_element(left, index) * get_element(right, index);
  return sum;
}

// Experts [first, first + count) of a [E, a, b] weight or gradient (a view, no copy): the slice an
// expert-parallel rank holds of the full model.
inline Tensor expert_view(const Tensor& tensor, int first, int count) {
  const int64_t matrix = tensor.dim(1) * tensor.dim(2);
  return Tensor(static_cast<char*>(tensor.data) + size_t(first * matrix) * dtype_size(tensor.dtype), tensor.dtype,
                tensor.device, {int64_t(count), tensor.dim(1), tensor.dim(2)});
}

inline double max_abs_difference(const std::vector<double>& actual, const std::vector<double>& expected) {
  double worst = actual.size() == expected.size() ? 0.0 : std::numeric_limits<double>::infinity();
  for (size_t index = 0; index < std::min(actual.size(), expected.size()); ++index) {
    const double difference = std::fabs(actual[index] - expected[index]);
    worst = std::isnan(difference) ? std::numeric_limits<double>::infinity() : std::max(worst, difference);
  }
  return worst;
}
inline double max_abs_difference(const Tensor& actual, const Tensor& expected) {
  return max_abs_difference(to_vector(actual), to_vector(expected));
}

// ||actual - expected||_2 / ||expected||_2 (the denominator floored at `floor`); infinity on NaN
// or a size mismatch.
inline double relative_error(const std::vector<double>& actual, const std::vector<double>& expected,
                             double floor = 1e-30) {
  if (actual.size() != expected.size()) return std::numeric_limits<double>::infinity();
  double difference = 0.0, reference = 0.0;
  for (size_t index = 0; index < actual.size(); ++index) {
    difference += (actual[index] - expected[index]) * (actual[index] - expected[index]);
    reference += expected[index] * expected[index];
  }
  const double error = std::sqrt(difference) / std::max(std::sqrt(reference), floor);
  return std::isnan(error) ? std::numeric_limits<double>::infinity() : error;
}
inline double relative_error(const Tensor& actual, const Tensor& expected, double floor = 1e-30) {
  return relative_error(to_vector(actual), to_vector(expected), floor);
}

// d loss / d parameter[i] by central differences (loss(p + h) - loss(p - h)) / 2h, perturbing
// each element of `parameter` in place and restoring it exactly afterwards.
inline std::vector<double> central_difference_gradient(const std::function<double()>& loss, Tensor& parameter,
                                                       double step) {
  std::vector<double> gradient(static_cast<size_t>(parameter.numel()));
  for (int64_t index = 0; index < parameter.numel(); ++index) {
    const double original = get_element(parameter, index);
    set_element(parameter, index, original + step);
    const double plus = loss();
    set_element(parameter, index, original - step);
    const double minus = loss();
    set_element(parameter, index, original);
    gradient[size_t(index)] = (plus - minus) / (2.0 * step);
  }
  return gradient;
}

}  // namespace testing
}  // namespace switchyard
