// What the backend dispatch of src/ops/ops.h shares (src/ops/dispatch_*.cpp), and the one place
// its rules are written: a tensor must live on the context's device; a CPU context runs the
// cpu:: reference; a CUDA context runs cuda:: on context.stream in builds with
// SWITCHYARD_WITH_CUDA and is an error naming the op in builds without.
// Internal to the ops layer: only src/ops/dispatch_*.cpp include it.
#pragma once

#include <initializer_list>

#include "src/ops/ops.h"
#include "src/core/error.h"

#if defined(SWITCHYARD_WITH_CUDA)
#include "src/core/cuda_check.h"
#endif

namespace switchyard {
namespace dispatch {

inline bool is_cpu(const ExecContext& context) { return context.device == DeviceKind::cpu; }

// Every non-null tensor lives on context.device (SY_CHECK naming the op and the tensor).
inline void expect_on_device(const ExecContext& context, const char* op,
                             std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* tensor : tensors) {
    if (tensor == nullptr) continue;
    SY_CHECK(tensor->device == context.device, "ops::", op, ": tensor ", tensor->describe(), " is not on ",
             device_kind_name(context.device), ", the device of the execution context");
  }
}

inline void expect_routing_on_device(const ExecContext& context, const char* op, const RoutingResult& routing) {
  expect_on_device(context, op,
                   {&routing.expert_ids, &routing.gates, &routing.slots, &routing.token_k, &routing.logsumexp,
                    &routing.expert_counts, &routing.first_choice_counts, &routing.prob_sums,
                    &routing.expert_offsets, &routing.scalars, &routing.losses});
}

[[noreturn]] inline void no_cuda_backend(const char* op) {
  SY_THROW("ops::", op, ": the context asks for CUDA but this build of switchyard has no CUDA backend");
}

// For ops that exist on CUDA only (the nvlink signals): a CPU context is a caller's mistake.
inline void expect_cuda_context(const ExecContext& context, const char* op) {
  SY_CHECK(context.device == DeviceKind::cuda, "ops::", op, ": a CUDA-only op, called on a ",
           device_kind_name(context.device), " execution context");
}

#if defined(SWITCHYARD_WITH_CUDA)
inline cudaStream_t cuda_stream(const ExecContext& context) { return static_cast<cudaStream_t>(context.stream); }
#endif

}  // namespace dispatch
}  // namespace switchyard

// The CUDA branch of an op: with CUDA, `call` runs; without it, asking for CUDA is an error
// naming the op. A macro because builds without CUDA must not see `call` at all.
#if defined(SWITCHYARD_WITH_CUDA)
#define SY_CUDA_BACKEND(op, call) call
#else
#define SY_CUDA_BACKEND(op, call) ::switchyard::dispatch::no_cuda_backend(op)
#endif
