// Parameter layout, flat storage and deterministic initialisation (src/model/parameters.h).
#include "src/model/parameters.h"

#include <algorithm>
#include <cmath>
#include <thread>
#include <unordered_set>

#include "src/core/rng.h"

namespace switchyard {
namespace {

constexpr uint64_t kInitOffset = 0x696e6974ull;  // "init": the Philox offset of initial values
constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr int64_t kElementsPerThread = int64_t(1) << 20;

// FNV-1a of the name: the Philox stream of a tensor, so tensors draw independent values and adding
// a tensor does not shift the values of the others.
uint32_t name_stream(const std::string& name) {
  uint32_t hash = 2166136261u;
  for (unsigned char character : name) {
    hash ^= character;
    hash *= 16777619u;
  }
  return hash;
}

int64_t product(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return count;
}

template <typename Real>
void fill_host(const ParameterSpec& spec, uint64_t seed, Real* out) {
  const int64_t count = spec.numel();
  const int64_t per_expert = spec.is_sharded() && spec.shape[0] > 0 ? count / spec.shape[0] : 0;
  const int64_t base = spec.is_sharded() ? spec.expert_first * per_expert : 0;
  const int threads = int(std::clamp<int64_t>(count / kElementsPerThread, 1,
                                              std::max<int64_t>(1, std::thread::hardware_concurrency())));
  auto fill_range = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = Real(initial_parameter_value(spec, seed, base + i));
  };
  if (threads == 1) return fill_range(0, count);
  std::vector<std::thread> workers;
  const int64_t chunk = (count + threads - 1) / threads;
  for (int thread = 0; thread < threads; ++thread) {
    const int64_t begin = std::min(count, thread * chunk), end = std::min(count, begin + chunk);
    workers.emplace_back(fill_range, begin, end);
  }
  for (std::thread& worker : workers) worker.join();
}

}  // namespace

const char* parameter_group_name(ParameterGroup group) { return group == ParameterGroup::dense ? "dense" : "expert"; }

int64_t ParameterSpec::numel() const { return product(shape); }

std::vector<int64_t> ParameterSpec::global_shape() const {
  std::vector<int64_t> global = shape;
  if (is_sharded()) global[0] = expert_total;
  return global;
}

double initial_parameter_value(const ParameterSpec& spec, uint64_t seed, int64_t global_index) {
  switch (spec.init) {
    case ParameterInit::ones: return 1.0;
    case ParameterInit::zeros: return 0.0;
    case ParameterInit::normal: {
      const uint32_t stream = name_stream(spec.name);
      const uint64_t index = uint64_t(global_index) * 2;
      // 1 - u lies in (0, 1], so the logarithm is finite.
      const double radius_uniform = 1.0 - double(philox_uniform(seed, stream, kInitOffset, index));
      const double angle_uniform = double(philox_uniform(seed, stream, kInitOffset, index + 1));
      return spec.init_std * std::sqrt(-2.0 * std::log(radius_uniform)) * std::cos(kTwoPi * angle_uniform);
    }
  }
  SY_THROW("unknown parameter init kind");
}

// ---- ParameterLayout ---------------------------------------------------------------------------

int ParameterLayout::add(ParameterSpec spec) {
  SY_CHECK(!finalized_, "ParameterLayout::add after finalize");
  SY_CHECK(!spec.name.empty() && find(spec.name) < 0, "ParameterLayout: duplicate or empty name '", spec.name, "'");
  SY_CHECK(!spec.shape.empty() && spec.shape.size() <= size_t(kMaxTensorRank), "ParameterLayout: ", spec.name,
           " has rank ", spec.shape.size());
  for (int64_t dim : spec.shape) SY_CHECK(dim >= 0, "ParameterLayout: ", spec.name, " has a negative dimension");
  SY_CHECK(!spec.is_sharded() || (spec.expert_first >= 0 && spec.expert_first + spec.shape[0] <= spec.expert_total),
           "ParameterLayout: ", spec.name, ": experts [", spec.expert_first, ", ", spec.expert_first + spec.shape[0],
           ") outside the ", spec.expert_total, " experts");
  specs_.push_back(std::move(spec));
  return int(specs_.size()) - 1;
}

void ParameterLayout::finalize() {
  SY_CHECK(!finalized_, "ParameterLayout::finalize called twice");
  for (int group = 0; group < kNumParameterGroups; ++group) {
    int64_t offset = 0;
    for (bool decay : {true, false}) {
      for (ParameterSpec& spec : specs_) {
        if (int(spec.group) != group || spec.weight_decay != decay) continue;
        spec.offset = offset;
        offset = round_up(offset + spec.numel(), kParameterAlignment);
      }
      if (decay) decay_end_[group] = offset;
    }
    group_elements_[group] = offset;
  }
  finalized_ = true;
}

int ParameterLayout::find(const std::string& name) const {
  for (size_t index = 0; index < specs_.size(); ++index)
    if (specs_[index].name == name) return int(index);
  return -1;
}

int64_t ParameterLayout::parameter_count(ParameterGroup group) const {
  int64_t count = 0;
  for (const ParameterSpec& spec : specs_)
    if (spec.group == group) count += spec.numel();
  return count;
}

Tensor make_tensor(void* data, DType dtype, DeviceKind device, const std::vector<int64_t>& shape) {
  SY_CHECK(shape.size() <= size_t(kMaxTensorRank), "make_tensor: rank ", shape.size(), " > ", kMaxTensorRank);
  Tensor tensor;
  tensor.data = data;
  tensor.dtype = dtype;
  tensor.device = device;
  tensor.rank = int(shape.size());
  for (size_t axis = 0; axis < shape.size(); ++axis) tensor.shape[axis] = shape[axis];
  return tensor;
}

// ---- ModelParameters -----------------------------------------------------------------------------

ModelParameters::ModelParameters(ParameterLayout layout, DeviceKind device, DType master_dtype, DType compute_dtype)
    : layout_(std::move(layout)), device_(device), master_dtype_(master_dtype), compute_dtype_(compute_dtype) {
  if (!layout_.finalized()) layout_.finalize();
  SY_CHECK(master_dtype == DType::f32 || (master_dtype == DType::f64 && device == DeviceKind::cpu),
           "ModelParameters: master weights are f32 (or f64 on the CPU), not ", dtype_name(master_dtype));
  SY_CHECK(compute_dtype == master_dtype || compute_dtype == DType::bf16 || compute_dtype == DType::f16,
           "ModelParameters: compute dtype ", dtype_name(compute_dtype), " with master ", dtype_name(master_dtype));
  for (int group = 0; group < kNumParameterGroups; ++group) {
    const size_t elements = size_t(layout_.group_elements(ParameterGroup(group)));
    master_[group] = Buffer(device, elements * dtype_size(master_dtype));
    grad_[group] = Buffer(device, elements * dtype_size(master_dtype));
    if (has_compute_copy()) compute_[group] = Buffer(device, elements * dtype_size(compute_dtype));
    // The alignment gaps must read as zero forever; zeroing everything once covers them.
    for (Buffer* buffer : {&master_[group], &grad_[group], &compute_[group]})
      if (buffer->bytes()) device_memset(buffer->data(), device, 0, buffer->bytes());
  }
}

Tensor ModelParameters::group_view(const Buffer& buffer, DType dtype, ParameterGroup group, int64_t begin,
                                   int64_t end) const {
  const int64_t elements = layout_.group_elements(group);
  if (end < 0) end = elements;
  SY_CHECK(begin >= 0 && begin <= end && end <= elements, "ModelParameters: range [", begin, ", ", end,
           ") outside the ", elements, " elements of group ", parameter_group_name(group));
  void* base = buffer.data() ? static_cast<char*>(buffer.data()) + size_t(begin) * dtype_size(dtype) : nullptr;
  return make_tensor(base, dtype, device_, {end - begin});
}

Tensor ModelParameters::tensor_view(const Buffer& buffer, DType dtype, int index) const {
  const ParameterSpec& spec = layout_.spec(index);
  void* base = buffer.data() ? static_cast<char*>(buffer.data()) + size_t(spec.offset) * dtype_size(dtype) : nullptr;
  return make_tensor(base, dtype, device_, spec.shape);
}

Tensor ModelParameters::master(int index) const {
  return tensor_view(master_[int(layout_.spec(index).group)], master_dtype_, index);
}
Tensor ModelParameters::grad(int index) const {
  return tensor_view(grad_[int(layout_.spec(index).group)], master_dtype_, index);
}
Tensor ModelParameters::compute(int index) const {
  const int group = int(layout_.spec(index).group);
  return has_compute_copy() ? tensor_view(compute_[group], compute_dtype_, index)
                            : tensor_view(master_[group], master_dtype_, index);
}
Tensor ModelParameters::master_group(ParameterGroup group, int64_t begin, int64_t end) const {
  return group_view(master_[int(group)], master_dtype_, group, begin, end);
}
Tensor ModelParameters::grad_group(ParameterGroup group, int64_t begin, int64_t end) const {
  return group_view(grad_[int(group)], master_dtype_, group, begin, end);
}
Tensor ModelParameters::compute_group(ParameterGroup group, int64_t begin, int64_t end) const {
  return has_compute_copy() ? group_view(compute_[int(group)], compute_dtype_, group, begin, end)
                            : group_view(master_[int(group)], master_dtype_, group, begin, end);
}

void ModelParameters::initialize(const ExecContext& context, uint64_t seed) {
  for (int index = 0; index < layout_.size(); ++index) {
    const ParameterSpec& spec = layout_.spec(index);
    Tensor destination = master(index);
    if (spec.numel() == 0) continue;
    Buffer host(DeviceKind::cpu, destination.bytes());
    if (master_dtype_ == DType::f64)
      fill_host(spec, seed, host.as<double>());
    else
      fill_host(spec, seed, host.as<float>());
    Tensor host_view = make_tensor(host.data(), master_dtype_, DeviceKind::cpu, {destination.numel()});
    Tensor flat = make_tensor(destination.data, master_dtype_, device_, {destination.numel()});
    ops::copy(context, host_view, flat);
    ops::synchronize(context);  // before `host` is freed
  }
  refresh_compute_copies(context);
  ops::synchronize(context);
}

void ModelParameters::refresh_compute_copies(const ExecContext& context) {
  if (!has_compute_copy()) return;
  for (int group = 0; group < kNumParameterGroups; ++group) {
    if (layout_.group_elements(ParameterGroup(group)) == 0) continue;
    Tensor source = master_group(ParameterGroup(group));
    Tensor destination = compute_group(ParameterGroup(group));
    ops::convert(context, source, destination);
  }
}

void ModelParameters::zero_gradients(const ExecContext& context) {
  for (int group = 0; group < kNumParameterGroups; ++group) {
    Tensor gradient = grad_group(ParameterGroup(group));
    ops::fill_zero(context, gradient);
  }
}

namespace {

std::vector<double> read_values(const Tensor& tensor, const ExecContext& context) {
  std::vector<double> values(size_t(tensor.numel()));
  if (tensor.numel() == 0) return values;
  Buffer host(DeviceKind::cpu, tensor.bytes());
  Tensor host_view = make_tensor(host.data(), tensor.dtype, DeviceKind::cpu, {tensor.numel()});
  Tensor flat = make_tensor(tensor.data, tensor.dtype, tensor.device, {tensor.numel()});
  ops::copy(context, flat, host_view);
  for (size_t i = 0; i < values.size(); ++i)
    values[i] = tensor.dtype == DType::f64 ? host.as<double>()[i] : double(host.as<float>()[i]);
  return values;
}

}  // namespace

std::vector<double> ModelParameters::master_values(const ExecContext& context, int index) const {
  return read_values(master(index), context);
}

std::vector<double> ModelParameters::grad_values(const ExecContext& context, int index) const {
  return read_values(grad(index), context);
}

void ModelParameters::set_master_values(const ExecContext& context, int index, const std::vector<double>& values) {
  Tensor destination = master(index);
  SY_CHECK(int64_t(values.size()) == destination.numel(), "set_master_values: ", values.size(), " values for ",
           layout_.spec(index).name, " of ", destination.numel(), " elements");
  if (values.empty()) return;
  Buffer host(DeviceKind::cpu, destination.bytes());
  for (size_t i = 0; i < values.size(); ++i) {
    if (master_dtype_ == DType::f64) host.as<double>()[i] = values[i];
    else host.as<float>()[i] = float(values[i]);
  }
  Tensor host_view = make_tensor(host.data(), master_dtype_, DeviceKind::cpu, {destination.numel()});
  Tensor flat = make_tensor(destination.data, master_dtype_, device_, {destination.numel()});
  ops::copy(context, host_view, flat);
  // The host buffer dies here: the copy must be complete (pageable async copies are staged, but
  // waiting makes that independent of the driver's staging rules).
  ops::synchronize(context);
}

}  // namespace switchyard
