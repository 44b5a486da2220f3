// HostReads: many small device tensors read to the host with one wait.
//
// On CUDA every ops::copy to the host waits for the stream, so reading a step's statistics one
// tensor at a time (a micro-step's loss summary and, per MoE layer, its losses, routing counters and
// expert counts) leaves the GPU idle once per tensor while the host turns around. HostReads collects
// (device source, host destination) pairs; read() copies every source into one device staging
// buffer (device-to-device copies enqueued on the stream, no wait), the staging buffer to the host
// (the one wait), and each part to its destination. On the CPU it copies each pair directly. The
// staging buffers are kept and grown, so a training run allocates them once.
#pragma once

#include <utility>
#include <vector>

#include "src/core/device.h"
#include "src/core/error.h"
#include "src/ops/ops.h"

namespace switchyard {

// Host storage for a copy of N floats kept in `dtype` on a device: f32, or f64 where the CPU
// reference computes in double. destination(dtype) is where the copy lands (give it to HostReads
// or ops::copy); value(index, dtype) reads it back as a double.
template <int N>
struct HostFloats {
  double f64_values[N] = {};
  float f32_values[N] = {};
  Tensor destination(DType dtype) {
    SY_CHECK(dtype == DType::f32 || dtype == DType::f64, "HostFloats: f32 or f64 values, not ", dtype_name(dtype));
    void* values = dtype == DType::f64 ? static_cast<void*>(f64_values) : static_cast<void*>(f32_values);
    return Tensor(values, dtype, DeviceKind::cpu, {N});
  }
  double value(int index, DType dtype) const {
    return dtype == DType::f64 ? f64_values[index] : double(f32_values[index]);
  }
};

class HostReads {
 public:
  explicit HostReads(DeviceKind device = DeviceKind::cpu) : device_(device) {}

  // Reads `source` (on the reads' device) into `destination` (host memory of the same dtype and
  // size) at the next read(). Both must stay valid until then.
  void add(const Tensor& source, const Tensor& destination);
  // Performs the reads noted since the last read() or clear() on context.stream, waits, and
  // forgets them (also when it throws).
  void read(const ExecContext& context);
  // Forgets the noted reads: a caller that keeps a HostReads across calls starts each batch with
  // it, so that reads noted before an exception (whose host destinations may be gone) never run.
  void clear() { reads_.clear(); }
  size_t pending() const { return reads_.size(); }

 private:
  DeviceKind device_;
  std::vector<std::pair<Tensor, Tensor>> reads_;
  Buffer staging_;  // on the device
  std::vector<unsigned char> host_staging_;
};

}  // namespace switchyard
