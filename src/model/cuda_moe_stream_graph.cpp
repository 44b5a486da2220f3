// The CUDA graph calls of streaming mode (declared in src/model/moe_stream.h; CUDA builds only).
//
// Capture runs in thread-local mode: other threads' CUDA calls are not affected, and a call on this
// thread that is illegal during capture (a synchronize, a synchronous copy) fails at once with
// cudaErrorStreamCaptureUnsupported / ...Invalidated, which the layer's CUDA_CHECKs turn into an
// Error that MoeStreamStep reports with the stage it happened in.
#include <cuda_runtime.h>

#include "src/core/cuda_check.h"
#include "src/model/moe_stream.h"

namespace switchyard {
namespace stream_graph {

void begin_capture(void* stream) {
  CUDA_CHECK(cudaStreamBeginCapture(static_cast<cudaStream_t>(stream), cudaStreamCaptureModeThreadLocal));
}

void* end_capture_and_instantiate(void* stream) {
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamEndCapture(static_cast<cudaStream_t>(stream), &graph));
  SY_CHECK(graph != nullptr, "cudaStreamEndCapture returned no graph");
  cudaGraphExec_t exec = nullptr;
  const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
  // The executable graph keeps what it needs; the template graph can go either way.
  const cudaError_t destroy_status = cudaGraphDestroy(graph);
  CUDA_CHECK(status);
  CUDA_CHECK(destroy_status);
  return exec;
}

void abandon_capture(void* stream) noexcept {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return;
  }
  if (status != cudaStreamCaptureStatusNone) {
    cudaGraph_t graph = nullptr;
    (void)cudaStreamEndCapture(static_cast<cudaStream_t>(stream), &graph);  // fails when invalidated: fine
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
  }
  (void)cudaGetLastError();  // clear the (non-sticky) error the failed capture left behind
}

std::string capture_problem(void* stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t error = cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status);
  if (error != cudaSuccess) return std::string("cudaStreamIsCapturing: ") + cudaGetErrorName(error);
  if (status == cudaStreamCaptureStatusInvalidated)
    return "the capture was invalidated (an operation not allowed in a graph)";
  if (status == cudaStreamCaptureStatusNone) return "the stream left capture mode";
  return "";
}

void launch(void* graph_exec, void* stream) {
  CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph_exec), static_cast<cudaStream_t>(stream)));
}

void destroy(void* graph_exec) noexcept {
  if (graph_exec != nullptr) (void)cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(graph_exec));
}

}  // namespace stream_graph
}  // namespace switchyard
