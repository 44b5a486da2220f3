// Device streams and timers for benchmarks: CUDA events on a stream, or the host clock on CPU.
#pragma once

#include <vector>

#include "src/core/tensor.h"

namespace switchyard {

// A new non-blocking CUDA stream (nullptr on CPU); destroy with destroy_stream.
void* create_stream(DeviceKind device);
void destroy_stream(DeviceKind device, void* stream);

// A second stream for work that may overlap the compute stream's (the shared experts beside the
// routed layer). fork() makes it wait for everything enqueued so far on the compute stream; join()
// makes the compute stream wait for everything enqueued on it since. Inactive (CPU, or not asked
// for): stream() is the compute stream itself and fork/join do nothing, so callers write one path.
class SideStream {
 public:
  SideStream() = default;
  SideStream(DeviceKind device, void* compute_stream, bool active);
  ~SideStream();
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  bool active() const { return stream_ != nullptr; }
  void* stream() const { return active() ? stream_ : compute_stream_; }
  void* compute_stream() const { return compute_stream_; }
  void fork();
  void join();

 private:
  DeviceKind device_ = DeviceKind::cpu;
  void* compute_stream_ = nullptr;
  void* stream_ = nullptr;
  void* fork_event_ = nullptr;
  void* join_event_ = nullptr;
};

// Times a region of work enqueued on `stream`: start(), enqueue, stop(), then elapsed_ms() waits
// for the stop event. On CPU it reads a steady clock (ops are synchronous there).
class DeviceTimer {
 public:
  DeviceTimer(DeviceKind device, void* stream);
  ~DeviceTimer();
  DeviceTimer(const DeviceTimer&) = delete;
  DeviceTimer& operator=(const DeviceTimer&) = delete;
  void start();
  void stop();
  double elapsed_ms();

 private:
  DeviceKind device_;
  void* stream_;
  void* start_event_ = nullptr;
  void* stop_event_ = nullptr;
  double host_start_ms_ = 0, host_stop_ms_ = 0;
};

// Marks points in the work enqueued on `stream` and reads their times afterwards: CUDA events
// recorded on the stream (kept and reused across clear(), so a profiled step creates none after
// the first), or the host clock on CPU. times_ms() waits for the last mark and returns every
// mark's time in ms after mark 0.
class EventTimeline {
 public:
  EventTimeline(DeviceKind device, void* stream);
  ~EventTimeline();
  EventTimeline(const EventTimeline&) = delete;
  EventTimeline& operator=(const EventTimeline&) = delete;
  int mark();  // index of the new mark
  int size() const { return marks_; }
  std::vector<double> times_ms();
  void clear() { marks_ = 0; }

 private:
  DeviceKind device_;
  void* stream_;
  int marks_ = 0;
  std::vector<void*> events_;
  std::vector<double> host_ms_;
};

double median(std::vector<double> values);
double percentile(std::vector<double> values, double fraction);  // fraction in [0, 1]

}  // namespace switchyard
