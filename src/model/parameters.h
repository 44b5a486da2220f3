// Model parameters: named tensors laid out in a few flat buffers, one set per group.
//
// Groups: `dense` holds everything replicated on every rank (embeddings, attention, dense FFNs,
// norms, routers); `expert` holds this rank's shard of the expert FFN weights. Per group there is
// one flat buffer each of
//   master   fp32 (f64 on the CPU for gradient checks): what the optimizer updates
//   grad     same dtype as master: what backward writes and the all-reduce sums
//   compute  the compute copy (bf16 / fp16 on CUDA) that forward and backward read; when the
//            compute dtype equals the master dtype (CPU) it is the master itself
// so the optimizer and the gradient all-reduce see two big tensors, not hundreds. Inside a group
// the tensors with weight decay come first, then those without (norms, biases), so AdamW needs
// two contiguous ranges per group. Every tensor starts at a multiple of kParameterAlignment
// elements (vector loads); the gaps are zero in every buffer and stay zero (their gradient is 0).
//
// Initialisation is a function of (seed, tensor name, global element index) only, through the
// counter-based Philox generator (src/core/rng.h): the same seed gives the same weights on CPU and
// GPU, for any number of ranks, and an expert shard holds exactly the rows its global experts have
// in a single-rank model. normal: N(0, std^2) by Box-Muller; ones; zeros.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "src/ops/ops.h"
#include "src/core/device.h"

namespace switchyard {

enum class ParameterGroup : uint8_t { dense = 0, expert = 1 };
constexpr int kNumParameterGroups = 2;
const char* parameter_group_name(ParameterGroup group);

enum class ParameterInit : uint8_t { normal, ones, zeros };

constexpr int64_t kParameterAlignment = 64;  // elements

struct ParameterSpec {
  std::string name;             // "blocks.3.attn.qkv"
  std::vector<int64_t> shape;   // this rank's shape; expert tensors are [local experts, ...]
  ParameterGroup group = ParameterGroup::dense;
  ParameterInit init = ParameterInit::normal;
  double init_std = 0.02;
  bool weight_decay = true;
  // Expert tensors: this rank holds global experts [expert_first, expert_first + shape[0]) of
  // expert_total. 0 for tensors that are not sharded.
  int64_t expert_first = 0, expert_total = 0;
  int64_t offset = 0;  // elements from the start of the group's buffers (set by ParameterLayout::finalize)

  int64_t numel() const;
  bool is_sharded() const { return expert_total > 0; }
  std::vector<int64_t> global_shape() const;  // experts: [expert_total, ...]
};

class ParameterLayout {
 public:
  // Adds a tensor; returns its index (stable: finalize does not reorder). Names must be unique.
  int add(ParameterSpec spec);
  // Assigns offsets: per group, the decay tensors in the order added, then the others.
  void finalize();

  const std::vector<ParameterSpec>& specs() const { return specs_; }
  const ParameterSpec& spec(int index) const { return specs_.at(size_t(index)); }
  int size() const { return int(specs_.size()); }
  int find(const std::string& name) const;  // -1 when absent
  bool finalized() const { return finalized_; }
  // Elements of a group's buffers, and where its no-decay range starts.
  int64_t group_elements(ParameterGroup group) const { return group_elements_[int(group)]; }
  int64_t decay_elements(ParameterGroup group) const { return decay_end_[int(group)]; }
  // Parameter counts without alignment gaps (this rank's share for the expert group).
  int64_t parameter_count(ParameterGroup group) const;

 private:
  std::vector<ParameterSpec> specs_;
  int64_t group_elements_[kNumParameterGroups] = {0, 0};
  int64_t decay_end_[kNumParameterGroups] = {0, 0};
  bool finalized_ = false;
};

// A Tensor view with a shape given at run time (rank <= kMaxTensorRank).
Tensor make_tensor(void* data, DType dtype, DeviceKind device, const std::vector<int64_t>& shape);

class ModelParameters {
 public:
  // master_dtype: f32 (any device) or f64 (CPU). compute_dtype: bf16 / f16 (CUDA), or equal to
  // master_dtype (then the compute views alias the master buffer). Buffers are zeroed.
  ModelParameters(ParameterLayout layout, DeviceKind device, DType master_dtype, DType compute_dtype);
  ModelParameters(const ModelParameters&) = delete;
  ModelParameters& operator=(const ModelParameters&) = delete;

  const ParameterLayout& layout() const { return layout_; }
  DeviceKind device() const { return device_; }
  DType master_dtype() const { return master_dtype_; }
  DType grad_dtype() const { return master_dtype_; }
  DType compute_dtype() const { return compute_dtype_; }
  bool has_compute_copy() const { return compute_dtype_ != master_dtype_; }

  Tensor master(int index) const;
  Tensor grad(int index) const;
  Tensor compute(int index) const;
  // Whole-group flat views [elements], and sub-ranges [begin, end) of them.
  Tensor master_group(ParameterGroup group, int64_t begin = 0, int64_t end = -1) const;
  Tensor grad_group(ParameterGroup group, int64_t begin = 0, int64_t end = -1) const;
  Tensor compute_group(ParameterGroup group, int64_t begin = 0, int64_t end = -1) const;

  // Draws every tensor from (seed, name, global index) on the host, uploads it and refreshes the
  // compute copies, then waits for context.stream. Host work is spread over threads for large
  // models; the result does not depend on the thread count.
  void initialize(const ExecContext& context, uint64_t seed);
  // compute = round(master) for every group (after loading weights; AdamW refreshes them itself).
  void refresh_compute_copies(const ExecContext& context);
  void zero_gradients(const ExecContext& context);

  // Host fp64 values of one master tensor (this rank's shard), and the reverse, ordered on
  // context.stream; used by the weights file, tests and the gradient check. set_master_values
  // refreshes nothing: call refresh_compute_copies afterwards.
  std::vector<double> master_values(const ExecContext& context, int index) const;
  void set_master_values(const ExecContext& context, int index, const std::vector<double>& values);
  std::vector<double> grad_values(const ExecContext& context, int index) const;

 private:
  Tensor group_view(const Buffer& buffer, DType dtype, ParameterGroup group, int64_t begin, int64_t end) const;
  Tensor tensor_view(const Buffer& buffer, DType dtype, int index) const;

  ParameterLayout layout_;
  DeviceKind device_;
  DType master_dtype_, compute_dtype_;
  Buffer master_[kNumParameterGroups], grad_[kNumParameterGroups], compute_[kNumParameterGroups];
};

// The value parameter `spec` gets at global element `global_index` from `seed` (what initialize
// writes); exposed for tests.
double initial_parameter_value(const ParameterSpec& spec, uint64_t seed, int64_t global_index);

}  // namespace switchyard
