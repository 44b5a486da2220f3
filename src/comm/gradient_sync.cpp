// Gradient all-reduce for data + expert parallelism (src/comm/gradient_sync.h).
#include "src/comm/gradient_sync.h"

#include <string>

#if defined(SWITCHYARD_WITH_CUDA)
#include "src/core/cuda_check.h"
#endif

namespace switchyard {

namespace {

// A run of consecutive tensors packed into one bucket, or one large tensor reduced in place.
struct ReduceUnit {
  std::vector<size_t> tensors;
  bool in_place = false;
  DType dtype = DType::f32;
  int64_t elements = 0;
};

std::vector<ReduceUnit> plan_units(const std::vector<Tensor>& grads, int64_t bucket_bytes) {
  std::vector<ReduceUnit> units;
  ReduceUnit current;
  int64_t current_bytes = 0;
  auto flush = [&] {
    if (!current.tensors.empty()) units.push_back(current);
    current = ReduceUnit{};
    current_bytes = 0;
  };
  for (size_t index = 0; index < grads.size(); ++index) {
    const Tensor& grad = grads[index];
    const int64_t bytes = int64_t(grad.bytes());
    if (bytes == 0) continue;
    if (bytes >= bucket_bytes) {
      flush();
      ReduceUnit unit;
      unit.tensors = {index};
      unit.in_place = true;
      unit.dtype = grad.dtype;
      unit.elements = grad.numel();
      units.push_back(unit);
      continue;
    }
    if (!current.tensors.empty() && (current.dtype != grad.dtype || current_bytes + bytes > bucket_bytes)) flush();
    current.dtype = grad.dtype;
    current.tensors.push_back(index);
    current.elements += grad.numel();
    current_bytes += bytes;
  }
  flush();
  return units;
}

}  // namespace

GradientSynchronizer::GradientSynchronizer(const ParallelGroups& groups, DeviceKind device,
                                           const GradientSyncOptions& options)
    : groups_(groups), device_(device), options_(options) {
  SY_CHECK(groups_.world && groups_.expert_data_parallel, "GradientSynchronizer: the parallel groups are not set up");
  SY_CHECK(groups_.world->device() == device && groups_.expert_data_parallel->device() == device,
           "GradientSynchronizer: the communicators are not on ", device_kind_name(device));
  SY_CHECK_INPUT(options_.bucket_bytes >= 16, "gradient sync: bucket_bytes must be >= 16, got ", options_.bucket_bytes);
  divisor_ = options_.average ? double(groups_.world->size()) : 1.0;
  events_ = std::make_unique<CommStreamEvents>(device, 2);
}

void GradientSynchronizer::scale(const ExecContext& context, Tensor& tensor) const {
  if (divisor_ == 1.0 || tensor.numel() == 0) return;
  if (device_ == DeviceKind::cpu) {
    if (tensor.dtype == DType::f32) {
      float* values = tensor.as<float>();
      const float divisor = float(divisor_);
      for (int64_t index = 0; index < tensor.numel(); ++index) values[index] /= divisor;
    } else if (tensor.dtype == DType::f64) {
      double* values = tensor.as<double>();
      for (int64_t index = 0; index < tensor.numel(); ++index) values[index] /= divisor_;
    } else {
      SY_THROW("gradient sync: CPU gradients must be f32 or f64, got ", tensor.describe());
    }
    return;
  }
#if defined(SWITCHYARD_WITH_CUDA)
  cublasHandle_t handle = thread_cublas_handle();
  CUBLAS_CHECK(cublasSetStream(handle, static_cast<cudaStream_t>(context.stream)));
  CUBLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
  const bool is_double = tensor.dtype == DType::f64;
  const double factor_double = 1.0 / divisor_;
  const float factor_float = float(1.0 / divisor_);
  CUBLAS_CHECK(cublasScalEx_64(handle, tensor.numel(),
                               is_double ? static_cast<const void*>(&factor_double) : &factor_float,
                               is_double ? CUDA_R_64F : CUDA_R_32F, tensor.data, cuda_data_type_of(tensor.dtype, "gradient sync"), 1,
                               is_double ? CUDA_R_64F : CUDA_R_32F));
#else
  (void)context;
  SY_THROW("gradient sync: this build of switchyard has no CUDA backend");
#endif
}

void GradientSynchronizer::reduce_group(const ExecContext& context, Communicator& communicator,
                                        const std::vector<Tensor>& grads) {
  for (const Tensor& grad : grads) {
    SY_CHECK(grad.device == device_ && (grad.data != nullptr || grad.numel() == 0),
             "gradient sync: gradient ", grad.describe(), " is not on ", device_kind_name(device_));
    const bool supported = grad.dtype == DType::f32 || grad.dtype == DType::f64 ||
                           (device_ == DeviceKind::cuda && (grad.dtype == DType::bf16 || grad.dtype == DType::f16));
    SY_CHECK(supported, "gradient sync: unsupported gradient dtype ", grad.describe());
  }
  if (communicator.size() == 1) {  // nothing to sum; only the average remains
    for (Tensor grad : grads) scale(context, grad);
    return;
  }

  const std::vector<ReduceUnit> units = plan_units(grads, options_.bucket_bytes);
  auto data_of = [&](const ReduceUnit& unit, int slot) {
    return unit.in_place ? grads[unit.tensors[0]].data : buckets_[slot].data();
  };
  // Waits for the reduction of unit `index`, averages it and copies a bucket back out.
  auto finish = [&](size_t index) {
    const ReduceUnit& unit = units[index];
    const int slot = int(index % 2);
    events_->compute_waits_for_comm(context, slot);
    Tensor reduced(data_of(unit, slot), unit.dtype, device_, {unit.elements});
    scale(context, reduced);
    if (unit.in_place) return;
    char* cursor = static_cast<char*>(buckets_[slot].data());
    for (size_t tensor_index : unit.tensors) {
      Tensor destination = grads[tensor_index];
      Tensor source(cursor, unit.dtype, device_, {destination.numel()});
      ops::copy(context, source, destination);
      cursor += destination.bytes();
    }
  };
  for (size_t index = 0; index < units.size(); ++index) {
    const ReduceUnit& unit = units[index];
    const int slot = int(index % 2);
    if (!unit.in_place) {
      // The bucket's previous user (unit index - 2) was unpacked by finish() before this point.
      if (buckets_[slot].bytes() < size_t(options_.bucket_bytes))
        buckets_[slot] = Buffer(device_, size_t(options_.bucket_bytes));
      char* cursor = static_cast<char*>(buckets_[slot].data());
      for (size_t tensor_index : unit.tensors) {
        const Tensor& source = grads[tensor_index];
        Tensor destination(cursor, unit.dtype, device_, {source.numel()});
        ops::copy(context, source, destination);
        cursor += source.bytes();
      }
    }
    events_->comm_waits_for_compute(context, communicator);
    communicator.all_reduce_sum(data_of(unit, slot), unit.elements, unit.dtype);
    events_->record_comm(slot, communicator);
    if (index >= 1) finish(index - 1);
  }
  if (!units.empty()) finish(units.size() - 1);
}

void GradientSynchronizer::all_reduce(const ExecContext& context, const std::vector<Tensor>& dense_grads,
                                      const std::vector<Tensor>& expert_grads) {
  SY_CHECK(context.device == device_, "GradientSynchronizer: context is on ", device_kind_name(context.device),
           ", the synchronizer on ", device_kind_name(device_));
  reduce_group(context, *groups_.world, dense_grads);
  reduce_group(context, *groups_.expert_data_parallel, expert_grads);
}

void all_reduce_gradients(const ExecContext& context, const ParallelGroups& groups,
                          const std::vector<Tensor>& dense_grads, const std::vector<Tensor>& expert_grads,
                          const GradientSyncOptions& options) {
  GradientSynchronizer synchronizer(groups, context.device, options);
  synchronizer.all_reduce(context, dense_grads, expert_grads);
  // The buckets go back to the caching allocator, which does not track streams.
  ops::synchronize(context);
}

}  // namespace switchyard
