// CUDA half of src/core/timing.h.
#include "src/core/cuda_check.h"

namespace switchyard {

void* cuda_create_stream() {
  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return stream;
}
void cuda_destroy_stream(void* stream) { CUDA_CHECK(cudaStreamDestroy(static_cast<cudaStream_t>(stream))); }
void* cuda_create_event() {
  cudaEvent_t event = nullptr;
  CUDA_CHECK(cudaEventCreate(&event));
  return event;
}
void cuda_destroy_event(void* event) { cudaEventDestroy(static_cast<cudaEvent_t>(event)); }
void* cuda_create_sync_event() {  // for ordering only: no timing, cheaper to record and wait on
  cudaEvent_t event = nullptr;
  CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  return event;
}
void cuda_stream_wait_event(void* stream, void* event) {
  CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0));
}
void cuda_release_stream(void* stream) { cudaStreamDestroy(static_cast<cudaStream_t>(stream)); }
void cuda_record_event(void* event, void* stream) {
  CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)));
}
double cuda_event_elapsed_ms(void* start, void* stop) {
  CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(stop)));
  float milliseconds = 0;
  CUDA_CHECK(cudaEventElapsedTime(&milliseconds, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(stop)));
  return milliseconds;
}

}  // namespace switchyard
