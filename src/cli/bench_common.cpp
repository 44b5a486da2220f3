// Shared benchmark helpers (src/cli/bench_common.h).
#include "src/cli/bench_common.h"

#include <algorithm>
#include <random>

#include "src/ops/ops.h"

namespace switchyard {

Buffer random_device_buffer(DeviceKind device, DType dtype, int64_t count, float stddev, uint64_t seed) {
  std::mt19937_64 generator(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> values(static_cast<size_t>(count));
  for (float& value : values) value = normal(generator);
  Buffer host(DeviceKind::cpu, size_t(count) * dtype_size(dtype));
  Tensor host_float(values.data(), DType::f32, DeviceKind::cpu, {count});
  Tensor host_target = host.view(dtype, {count});
  if (dtype == DType::f32) std::copy(values.begin(), values.end(), host.as<float>());
  else ops::convert(ExecContext{DeviceKind::cpu, nullptr}, host_float, host_target);
  Buffer placed(device, host.bytes());
  device_copy(placed.data(), device, host.data(), DeviceKind::cpu, host.bytes());
  return placed;
}

}  // namespace switchyard
