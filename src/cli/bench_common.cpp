// Shared benchmark helpers (src/cli/bench_common.h).
#include "src/cli/bench_common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <thread>
#include <vector>

#include "src/core/error.h"
#include "src/core/rng.h"
#include "src/core/timing.h"
#include "src/ops/ops.h"

namespace switchyard {

// Normal values from the counter-based Philox generator (src/core/rng.h), on every host thread:
// the largest benchmark shapes (SonicMoE's d 4096, 64 experts) need ~3e9 values, which one
// std::mt19937 thread takes about a minute to draw.
Buffer random_device_buffer(DeviceKind device, DType dtype, int64_t count, float stddev, uint64_t seed) {
  SY_CHECK(dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::f16,
           "random_device_buffer: floating-point dtypes only, got ", dtype_name(dtype));
  Buffer host(DeviceKind::cpu, size_t(count) * dtype_size(dtype));
  unsigned char* bytes = static_cast<unsigned char*>(host.data());
  auto fill_range = [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      // Box-Muller over two uniforms of the stream; 1 - u lies in (0, 1], so the logarithm is finite.
      const float radius = 1.0f - philox_uniform(seed, 0, 0, uint64_t(2 * index));
      const float angle = philox_uniform(seed, 0, 0, uint64_t(2 * index + 1));
      const float value = stddev * std::sqrt(-2.0f * std::log(radius)) * std::cos(6.28318530718f * angle);
      if (dtype == DType::f32) std::memcpy(bytes + 4 * index, &value, 4);
      else {
        const uint16_t bits = dtype == DType::bf16 ? Bf16::from_float(value) : Half::from_float(value);
        std::memcpy(bytes + 2 * index, &bits, 2);
      }
    }
  };
  constexpr int64_t kValuesPerThread = int64_t(1) << 20;
  const int threads = int(std::clamp<int64_t>(count / kValuesPerThread, 1,
                                              std::max<int64_t>(1, int64_t(std::thread::hardware_concurrency()))));
  std::vector<std::thread> workers;
  const int64_t chunk = (count + threads - 1) / threads;
  for (int thread = 1; thread < threads; ++thread)
    workers.emplace_back(fill_range, std::min(count, thread * chunk), std::min(count, (thread + 1) * chunk));
  fill_range(0, std::min(count, chunk));
  for (std::thread& worker : workers) worker.join();
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

void write_bench_records(const std::string& path, const std::vector<BenchRecord>& records, const char* benchmark,
                         bool append) {
  std::ofstream out(path, append ? std::ios::app : std::ios::trunc);
  if (!out) SY_BAD_INPUT("bench ", benchmark, ": cannot write --json file '", path, "'");
  for (const BenchRecord& record : records) out << record.json() << "\n";
  out.flush();
  if (!out) SY_THROW("bench ", benchmark, ": writing --json file '", path, "' failed");
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
