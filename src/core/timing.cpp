#include "src/core/timing.h"

#include <algorithm>
#include <chrono>

#include "src/core/error.h"

namespace switchyard {

#if defined(SWITCHYARD_WITH_CUDA)
// src/core/cuda_timing.cpp
void* cuda_create_stream();
void cuda_destroy_stream(void* stream);
void* cuda_create_event();
void cuda_destroy_event(void* event);
void cuda_record_event(void* event, void* stream);
void* cuda_create_sync_event();
void cuda_stream_wait_event(void* stream, void* event);
void cuda_release_stream(void* stream);
double cuda_event_elapsed_ms(void* start, void* stop);
#endif

namespace {
double host_now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

void* create_stream(DeviceKind device) {
#if defined(SWITCHYARD_WITH_CUDA)
  if (device == DeviceKind::cuda) return cuda_create_stream();
#endif
  (void)device;
  return nullptr;
}

void destroy_stream(DeviceKind device, void* stream) {
#if defined(SWITCHYARD_WITH_CUDA)
  if (device == DeviceKind::cuda && stream) cuda_destroy_stream(stream);
#endif
  (void)device;
  (void)stream;
}

SideStream::SideStream(DeviceKind device, void* compute_stream, bool active)
    : device_(device), compute_stream_(compute_stream) {
  if (!active || device != DeviceKind::cuda) return;
#if defined(SWITCHYARD_WITH_CUDA)
  stream_ = cuda_create_stream();
  fork_event_ = cuda_create_sync_event();
  join_event_ = cuda_create_sync_event();
#endif
}

SideStream::~SideStream() {
#if defined(SWITCHYARD_WITH_CUDA)
  if (fork_event_) cuda_destroy_event(fork_event_);
  if (join_event_) cuda_destroy_event(join_event_);
  if (stream_) cuda_release_stream(stream_);  // a destructor must not throw
#endif
}

void SideStream::fork() {
  if (!active()) return;
#if defined(SWITCHYARD_WITH_CUDA)
  cuda_record_event(fork_event_, compute_stream_);
  cuda_stream_wait_event(stream_, fork_event_);
#endif
}

void SideStream::join() {
  if (!active()) return;
#if defined(SWITCHYARD_WITH_CUDA)
  cuda_record_event(join_event_, stream_);
  cuda_stream_wait_event(compute_stream_, join_event_);
#endif
}

DeviceTimer::DeviceTimer(DeviceKind device, void* stream) : device_(device), stream_(stream) {
#if defined(SWITCHYARD_WITH_CUDA)
  if (device_ == DeviceKind::cuda) {
    start_event_ = cuda_create_event();
    stop_event_ = cuda_create_event();
  }
#endif
}

DeviceTimer::~DeviceTimer() {
#if defined(SWITCHYARD_WITH_CUDA)
  if (start_event_) cuda_destroy_event(start_event_);
  if (stop_event_) cuda_destroy_event(stop_event_);
#endif
}

void DeviceTimer::start() {
#if defined(SWITCHYARD_WITH_CUDA)
  if (device_ == DeviceKind::cuda) return cuda_record_event(start_event_, stream_);
#endif
  host_start_ms_ = host_now_ms();
}

void DeviceTimer::stop() {
#if defined(SWITCHYARD_WITH_CUDA)
  if (device_ == DeviceKind::cuda) return cuda_record_event(stop_event_, stream_);
#endif
  host_stop_ms_ = host_now_ms();
}

double DeviceTimer::elapsed_ms() {
#if defined(SWITCHYARD_WITH_CUDA)
  if (device_ == DeviceKind::cuda) return cuda_event_elapsed_ms(start_event_, stop_event_);
#endif
  return host_stop_ms_ - host_start_ms_;
}

EventTimeline::EventTimeline(DeviceKind device, void* stream) : device_(device), stream_(stream) {}

EventTimeline::~EventTimeline() {
#if defined(SWITCHYARD_WITH_CUDA)
  for (void* event : events_) cuda_destroy_event(event);
#endif
}

int EventTimeline::mark() {
  const int index = marks_++;
#if defined(SWITCHYARD_WITH_CUDA)
  if (device_ == DeviceKind::cuda) {
    if (size_t(index) == events_.size()) events_.push_back(cuda_create_event());
    cuda_record_event(events_[size_t(index)], stream_);
    return index;
  }
#endif
  if (size_t(index) == host_ms_.size()) host_ms_.push_back(0.0);
  host_ms_[size_t(index)] = host_now_ms();
  return index;
}

std::vector<double> EventTimeline::times_ms() {
  std::vector<double> times(size_t(marks_), 0.0);
  for (int index = 1; index < marks_; ++index) {
#if defined(SWITCHYARD_WITH_CUDA)
    if (device_ == DeviceKind::cuda) {
      times[size_t(index)] = cuda_event_elapsed_ms(events_[0], events_[size_t(index)]);
      continue;
    }
#endif
    times[size_t(index)] = host_ms_[size_t(index)] - host_ms_[0];
  }
  return times;
}

double percentile(std::vector<double> values, double fraction) {
  SY_CHECK(!values.empty(), "percentile of no values");
  std::sort(values.begin(), values.end());
  size_t index = size_t(std::min(1.0, std::max(0.0, fraction)) * double(values.size() - 1) + 0.5);
  return values[index];
}

double median(std::vector<double> values) { return percentile(std::move(values), 0.5); }

}  // namespace switchyard
