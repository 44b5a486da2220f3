// What the benchmarks (bench moe, bench ep, bench optimizer) share: the JSON record they write,
// their random input data, the --device choice and the median of timed calls.
#pragma once

#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "src/core/device.h"
#include "src/core/json.h"
#include "src/ops/ops.h"

namespace switchyard {

// `count` normal(0, stddev) values stored in `dtype` (f32, bf16 or f16) on `device`, drawn on the
// host from the Philox stream of `seed` (src/core/rng.h) over every host thread, so a seed gives
// the same data on every run and either backend.
Buffer random_device_buffer(DeviceKind device, DType dtype, int64_t count, float stddev, uint64_t seed);

// A benchmark's --device value (auto|cpu|cuda): auto takes CUDA when a device is present. Bad input
// (exit 2, naming the benchmark) for any other value, for cuda without a device, and for the CPU
// unless `quick` (the full sizes need a GPU).
DeviceKind bench_device(const std::string& value, bool quick, const char* benchmark);

// The median time in ms of `iterations` calls of fn, each timed on the context's stream (device
// events, or the host clock on CPU), after `warmup` untimed calls and a synchronize.
double median_call_ms(const ExecContext& context, int warmup, int iterations, const std::function<void()>& fn);

// One benchmark measurement as a flat JSON object (the records `bench moe|ep --json` write):
// members in the order added; numbers with 6 significant digits, and null where a value is not
// finite (a ratio over a zero time), since JSON has no inf or nan; strings quoted by json::quote.
struct BenchRecord {
  std::vector<std::pair<std::string, std::string>> fields;
  void add(const std::string& key, double value) {
    if (!std::isfinite(value)) {
      fields.emplace_back(key, "null");
      return;
    }
    std::ostringstream stream;
    stream.precision(6);
    stream << value;
    fields.emplace_back(key, stream.str());
  }
  void add(const std::string& key, const std::string& value) { fields.emplace_back(key, json::quote(value)); }
  void add(const std::string& key, const char* value) { add(key, std::string(value)); }
  std::string json() const {
    std::string out = "{";
    for (size_t index = 0; index < fields.size(); ++index)
      out += (index ? ", " : "") + json::quote(fields[index].first) + ": " + fields[index].second;
    return out + "}";
  }
};

// --json: `records` as JSON lines in `path`, replacing the file, or appended with `append` (bench
// optimizer and bench passes, whose records a measurement script gathers in one file). Bad input
// (naming `benchmark`) when the file cannot be opened; an error when a write fails.
void write_bench_records(const std::string& path, const std::vector<BenchRecord>& records, const char* benchmark,
                         bool append = false);

}  // namespace switchyard
