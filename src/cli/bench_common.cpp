// Shared benchmark helpers (src/cli/bench_common.h).
#include "src/cli/bench_common.h"

#include <algorithm>
#include <random>
#include <vector>

#include "src/core/error.h"
#include "src/core/timing.h"
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

DeviceKind bench_device(const std::string& value, bool quick, const char* benchmark) {
  DeviceKind device = DeviceKind::cpu;
  if (value == "auto") device = cuda_available() ? DeviceKind::cuda : DeviceKind::cpu;
  else if (value == "cuda") device = DeviceKind::cuda;
  else if (value != "cpu") SY_BAD_INPUT("--device must be auto, cpu or cuda, not '", value, "'");
  if (device == DeviceKind::cuda && !cuda_available()) SY_BAD_INPUT("--device cuda: no CUDA device");
  if (device == DeviceKind::cpu && !quick)
    SY_BAD_INPUT("bench ", benchmark, " on the CPU backend runs only with --quick (the full sizes need a GPU)");
  return device;
}

double median_call_ms(const ExecContext& context, int warmup, int iterations, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  ops::synchronize(context);
  DeviceTimer timer(context.device, context.stream);
  std::vector<double> samples;
  for (int i = 0; i < iterations; ++i) {
    timer.start();
    fn();
    timer.stop();
    samples.push_back(timer.elapsed_ms());
  }
  return median(samples);
}

}  // namespace switchyard
