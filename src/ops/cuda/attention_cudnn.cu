// cuDNN fused scaled-dot-product attention behind the attention ops of src/ops/model_ops.h
// (routing rules: src/ops/cuda/attention_cudnn.h; graphs: src/ops/cuda/attention_cudnn_graph.cpp).
//
// Per call: check that the call is one the fused path takes, find the plan of its shape in a cache
// keyed by (device, stream, shape, dtype, direction, determinism) — built on first use, a failed
// build remembered with its reason — then run it with a variant pack of device pointers into the
// caller's tensors. The caller's qkv [T, 3D] is read in place as strided Q / K / V views (and
// grad_qkv written the same way), so nothing is copied or transposed.
//
// Workspace, one block per call: [softmax_sum fp32 B*H*S][dQ accumulator fp32 B*H*S*Dh]
// [cuDNN's own workspace], each part 256-byte aligned; the first two only in the backward, the
// accumulator only in the non-deterministic backward. The caller's workspace holds it when large
// enough, otherwise a buffer kept per stream (cuda_common.cuh persistent_scratch) does.
// cuDNN handles are made per (device, stream) and, like the cuBLAS handles, never destroyed.
#include "src/ops/cuda/attention_cudnn.h"

#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "src/ops/cuda/attention_cudnn_graph.h"
#include "src/ops/cuda/cuda_common.cuh"

namespace switchyard {
namespace {

using namespace cuda_detail;
using sdpa::BuiltPlan;
using sdpa::Direction;
using sdpa::GraphSpec;

constexpr int kScratchCudnnAttention = 0x53445041;  // persistent_scratch tag ("SDPA")

int64_t align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

// ---- Path -----------------------------------------------------------------------------------

bool path_requires_cudnn(AttentionPath path) {
  return path == AttentionPath::cudnn || path == AttentionPath::cudnn_nondeterministic;
}

// ---- Handles and plans ----------------------------------------------------------------------

struct PlanEntry {
  cudnnHandle_t handle = nullptr;
  std::unique_ptr<BuiltPlan> plan;  // null when the build failed
  std::string failure;              // why it failed
  Buffer sequence_lengths;          // int32 [B] twice (q, kv), all S, when the graph takes them
  bool warned = false;
};

using PlanKey = std::tuple<int, cudaStream_t, GraphSpec>;

struct Registry {
  std::mutex mutex;
  std::map<std::pair<int, cudaStream_t>, cudnnHandle_t> handles;
  std::map<PlanKey, std::unique_ptr<PlanEntry>> plans;
  std::map<int, int> compute_major;
};

Registry& registry() {
  static Registry* instance = new Registry();  // never destroyed (see cuda_common.cuh)
  return *instance;
}

// Caller holds the registry lock.
cudnnHandle_t handle_for(Registry& r, int device, cudaStream_t stream) {
  cudnnHandle_t& handle = r.handles[{device, stream}];
  if (!handle) {
    cudnnHandle_t created = nullptr;
    CUDNN_CHECK(cudnnCreate(&created));
    CUDNN_CHECK(cudnnSetStream(created, stream));
    handle = created;
  }
  return handle;
}

int compute_major(int device) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto found = r.compute_major.find(device);
  if (found != r.compute_major.end()) return found->second;
  int major = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  r.compute_major[device] = major;
  return major;
}

// The plan of `spec` on the current device and `stream`, built on first use.
PlanEntry& plan_for(const GraphSpec& spec, cudaStream_t stream) {
  const int device = current_device();
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::unique_ptr<PlanEntry>& slot = r.plans[PlanKey{device, stream, spec}];
  if (slot) return *slot;
  auto entry = std::make_unique<PlanEntry>();
  try {
    entry->handle = handle_for(r, device, stream);
    entry->plan = sdpa::build_attention_plan(entry->handle, spec);
    if (entry->plan->uses_sequence_lengths) {  // q lengths, then kv lengths at a 256-byte offset
      const int64_t half = align256(spec.batch * int64_t(sizeof(int32_t)));
      std::vector<int32_t> lengths(size_t(2 * half) / sizeof(int32_t), int32_t(spec.seq_len));
      entry->sequence_lengths = Buffer(DeviceKind::cuda, size_t(2 * half));
      device_copy(entry->sequence_lengths.data(), DeviceKind::cuda, lengths.data(), DeviceKind::cpu, size_t(2 * half));
    }
  } catch (const Error& error) {
    entry->plan.reset();
    entry->failure = error.message();
  }
  slot = std::move(entry);
  return *slot;
}

void warn_once(PlanEntry& entry, const GraphSpec& spec) {
  {
    std::lock_guard<std::mutex> lock(registry().mutex);
    if (entry.warned) return;
    entry.warned = true;
  }
  std::fprintf(stderr,
               "switchyard: warning (rank %d on %s): cuDNN fused attention is unavailable for %s, using the "
               "cuBLAS + softmax path (SWITCHYARD_ATTENTION=cublas skips cuDNN, =cudnn makes this an error): %s\n",
               process_rank(), process_host().c_str(), spec.describe().c_str(), entry.failure.c_str());
}

// ---- Eligibility ----------------------------------------------------------------------------

// Why the fused path cannot take calls of this shape and dtype ("" when it can).
std::string ineligibility(const AttentionShape& shape, DType dtype) {
  if (dtype != DType::bf16 && dtype != DType::f16)
    return std::string("activations are ") + dtype_name(dtype) + " (cuDNN SDPA takes bf16 or fp16)";
  if (shape.head_dim != 64 && shape.head_dim != 128)
    return "head_dim " + std::to_string(shape.head_dim) + " (the fused path takes 64 or 128)";
  const int64_t version = int64_t(cudnnGetVersion());
  if (version < 90000) return "cuDNN " + std::to_string(version) + " is older than 9.0";
  if (version == 91000 || version == 91001) return "cuDNN 9.10.0 / 9.10.1 SDPA has known bugs (use 9.10.2+)";
  const int device = current_device();
  const int major = compute_major(device);
  if (major != 9)
    return "device " + std::to_string(device) + " is sm" + std::to_string(major) + "x (the fused path runs on sm90)";
  if (shape.seq_len < 2 && version < 91000) return "S = 1 with a causal mask needs cuDNN 9.10+";
  return "";
}

std::string misalignment(std::initializer_list<std::pair<const char*, const Tensor*>> tensors) {
  for (const auto& [name, tensor] : tensors)
    if (!is_aligned(tensor->data, 16)) return std::string(name) + " is not 16-byte aligned";
  return "";
}

GraphSpec make_spec(const AttentionShape& shape, DType dtype, Direction direction, bool deterministic) {
  GraphSpec spec;
  spec.batch = shape.batch;
  spec.seq_len = shape.seq_len;
  spec.heads = shape.heads;
  spec.head_dim = shape.head_dim;
  spec.io_type = dtype == DType::f16 ? CUDNN_DATA_HALF : CUDNN_DATA_BFLOAT16;
  spec.direction = direction;
  spec.deterministic = direction == Direction::forward || deterministic;  // forward plans are shared
  spec.cudnn_version = int64_t(cudnnGetVersion());
  return spec;
}

// The plan for this call, or null when the fallback must run (throws when the path demands cuDNN).
PlanEntry* select_plan(const char* op, const AttentionShape& shape, DType dtype, Direction direction,
                       std::initializer_list<std::pair<const char*, const Tensor*>> tensors, cudaStream_t stream,
                       GraphSpec& spec, bool deterministic = true) {
  const AttentionPath path = cuda::attention_path();
  if (path == AttentionPath::cublas) return nullptr;
  std::string reason = ineligibility(shape, dtype);
  if (reason.empty()) reason = misalignment(tensors);
  if (!reason.empty()) {
    if (path_requires_cudnn(path))
      SY_BAD_INPUT(op, ": SWITCHYARD_ATTENTION=", cuda::attention_path_name(path),
                   " but cuDNN fused attention cannot take this call: ", reason);
    return nullptr;
  }
  // The caller's choice (parallel.deterministic) unless the switch forces the atomic-dQ backward.
  spec = make_spec(shape, dtype, direction, deterministic && path != AttentionPath::cudnn_nondeterministic);
  PlanEntry& entry = plan_for(spec, stream);
  if (!entry.plan) {
    if (path_requires_cudnn(path))
      SY_THROW(op, ": SWITCHYARD_ATTENTION=", cuda::attention_path_name(path), " but the cuDNN plan for ",
               spec.describe(), " did not build: ", entry.failure);
    warn_once(entry, spec);
    return nullptr;
  }
  return &entry;
}

// ---- Workspace and execution ----------------------------------------------------------------

struct WorkspaceLayout {
  int64_t softmax_sum = 0, grad_q_accumulator = 0, backend = 0, total = 0;
};

WorkspaceLayout layout_of(const GraphSpec& spec, const BuiltPlan& plan) {
  WorkspaceLayout layout;
  int64_t offset = 0;
  if (spec.direction == Direction::backward) {
    layout.softmax_sum = offset;
    offset += align256(spec.batch * spec.heads * spec.seq_len * 4);
    if (plan.uses_grad_q_accumulator) {
      layout.grad_q_accumulator = offset;
      offset += align256(spec.batch * spec.heads * spec.seq_len * spec.head_dim * 4);
    }
  }
  layout.backend = offset;
  layout.total = offset + align256(plan.backend_workspace_bytes);
  return layout;
}

unsigned char* workspace_base(Tensor& workspace, int64_t bytes, cudaStream_t stream) {
  if (bytes == 0) return nullptr;
  if (workspace.device == DeviceKind::cuda && workspace.data != nullptr && int64_t(workspace.bytes()) >= bytes &&
      is_aligned(workspace.data, 256))
    return static_cast<unsigned char*>(workspace.data);
  return static_cast<unsigned char*>(persistent_scratch(stream, kScratchCudnnAttention, size_t(bytes)));
}

void check_variant_pack(cudnnStatus_t status, const GraphSpec& spec, const char* what) {
  if (status != CUDNN_STATUS_SUCCESS)
    SY_THROW("cuDNN ", spec.describe(), ": ", what, " returned ", cudnnGetErrorString(status));
}

// One execution of `entry`'s plan with these tensors (uids[i] at pointers[i]) and workspace.
void execute(const PlanEntry& entry, const GraphSpec& spec, const std::vector<int64_t>& uids,
             const std::vector<void*>& pointers, void* workspace) {
  cudnnBackendDescriptor_t pack = nullptr;
  CUDNN_CHECK(cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack));
  struct Destroy {
    cudnnBackendDescriptor_t descriptor;
    ~Destroy() { cudnnBackendDestroyDescriptor(descriptor); }
  } destroy{pack};
  check_variant_pack(cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64,
                                              int64_t(uids.size()), uids.data()),
                     spec, "cudnnBackendSetAttribute(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS)");
  check_variant_pack(cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                                              int64_t(pointers.size()), pointers.data()),
                     spec, "cudnnBackendSetAttribute(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS)");
  check_variant_pack(
      cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace), spec,
      "cudnnBackendSetAttribute(CUDNN_ATTR_VARIANT_PACK_WORKSPACE)");
  check_variant_pack(cudnnBackendFinalize(pack), spec, "cudnnBackendFinalize(variant pack)");
  check_variant_pack(cudnnBackendExecute(entry.handle, entry.plan->plan, pack), spec, "cudnnBackendExecute");
}

// The q, k, v (or dq, dk, dv) views of a packed [T, 3D] tensor.
std::vector<void*> thirds(const Tensor& packed, const AttentionShape& shape) {
  unsigned char* base = static_cast<unsigned char*>(const_cast<void*>(packed.data));
  const int64_t third = shape.model_dim() * int64_t(dtype_size(packed.dtype));
  return {base, base + third, base + 2 * third};
}

}  // namespace

namespace cuda {

AttentionPath parse_attention_path(const std::string& text) { return attention_path_from_text(text); }

const char* attention_path_name(AttentionPath path) { return switch_text(path); }

AttentionPath attention_path() { return switches().attention; }

CudnnAttentionProbe probe_cudnn_attention(const AttentionShape& shape, DType dtype, bool deterministic,
                                          void* stream) {
  CudnnAttentionProbe probe;
  probe.cudnn_version = int64_t(cudnnGetVersion());
  probe.reason = ineligibility(shape, dtype);
  if (!probe.reason.empty()) return probe;
  probe.eligible = true;
  const cudaStream_t cuda_stream = as_stream(stream);
  const GraphSpec forward = make_spec(shape, dtype, Direction::forward, deterministic);
  const GraphSpec backward = make_spec(shape, dtype, Direction::backward, deterministic);
  const PlanEntry& forward_entry = plan_for(forward, cuda_stream);
  const PlanEntry& backward_entry = plan_for(backward, cuda_stream);
  probe.forward_ready = forward_entry.plan != nullptr;
  probe.backward_ready = backward_entry.plan != nullptr;
  if (probe.forward_ready) {
    probe.forward_workspace_bytes = layout_of(forward, *forward_entry.plan).total;
    probe.forward_engine = forward_entry.plan->engine;
  }
  if (probe.backward_ready) {
    probe.backward_workspace_bytes = layout_of(backward, *backward_entry.plan).total;
    probe.backward_engine = backward_entry.plan->engine;
  }
  if (!probe.forward_ready) probe.reason = "forward: " + forward_entry.failure;
  if (!probe.backward_ready)
    probe.reason += (probe.reason.empty() ? "" : "; ") + ("backward: " + backward_entry.failure);
  return probe;
}

}  // namespace cuda

namespace cuda_detail {

bool cudnn_attention_forward(const AttentionShape& shape, const Tensor& qkv, Tensor& out, Tensor& softmax_stats,
                             Tensor& workspace, void* stream) {
  const cudaStream_t cuda_stream = as_stream(stream);
  GraphSpec spec;
  const PlanEntry* entry = select_plan("attention_forward", shape, qkv.dtype, Direction::forward,
                                       {{"qkv", &qkv}, {"out", &out}, {"softmax_stats", &softmax_stats}},
                                       cuda_stream, spec);
  if (!entry) return false;
  const BuiltPlan& plan = *entry->plan;
  const WorkspaceLayout layout = layout_of(spec, plan);
  unsigned char* base = workspace_base(workspace, layout.total, cuda_stream);
  const std::vector<void*> qkv_views = thirds(qkv, shape);
  const std::vector<int64_t> uids = {sdpa::kUidQ,     sdpa::kUidKTransposed, sdpa::kUidV,       sdpa::kUidO,
                                     sdpa::kUidStats, sdpa::kUidScale,       sdpa::kUidMaskFill};
  const std::vector<void*> pointers = {qkv_views[0],       qkv_views[1],
                                       qkv_views[2],       out.data,
                                       softmax_stats.data, const_cast<float*>(&plan.scale),
                                       const_cast<float*>(&plan.mask_fill)};
  execute(*entry, spec, uids, pointers, base ? base + layout.backend : nullptr);
  return true;
}

bool cudnn_attention_backward(const AttentionShape& shape, const Tensor& qkv, const Tensor& out,
                              const Tensor& grad_out, const Tensor& softmax_stats, Tensor& workspace,
                              Tensor& grad_qkv, bool deterministic, void* stream) {
  const cudaStream_t cuda_stream = as_stream(stream);
  GraphSpec spec;
  const PlanEntry* entry =
      select_plan("attention_backward", shape, qkv.dtype, Direction::backward,
                  {{"qkv", &qkv}, {"out", &out}, {"grad_out", &grad_out}, {"softmax_stats", &softmax_stats},
                   {"grad_qkv", &grad_qkv}},
                  cuda_stream, spec, deterministic);
  if (!entry) return false;
  const BuiltPlan& plan = *entry->plan;
  const WorkspaceLayout layout = layout_of(spec, plan);
  unsigned char* base = workspace_base(workspace, layout.total, cuda_stream);
  const std::vector<void*> qkv_views = thirds(qkv, shape), grad_views = thirds(grad_qkv, shape);
  std::vector<int64_t> uids = {sdpa::kUidQ,     sdpa::kUidKTransposed, sdpa::kUidV,     sdpa::kUidO,
                               sdpa::kUidGradO, sdpa::kUidStats,       sdpa::kUidGradQ, sdpa::kUidGradK,
                               sdpa::kUidGradV, sdpa::kUidScale,       sdpa::kUidMaskFill, sdpa::kUidOne,
                               sdpa::kUidSoftmaxSum};
  std::vector<void*> pointers = {qkv_views[0],
                                 qkv_views[1],
                                 qkv_views[2],
                                 out.data,
                                 grad_out.data,
                                 softmax_stats.data,
                                 grad_views[0],
                                 grad_views[1],
                                 grad_views[2],
                                 const_cast<float*>(&plan.scale),
                                 const_cast<float*>(&plan.mask_fill),
                                 const_cast<float*>(&plan.one),
                                 base + layout.softmax_sum};
  if (plan.uses_grad_q_accumulator) {
    void* accumulator = base + layout.grad_q_accumulator;
    if (plan.zero_grad_q_accumulator)
      CUDA_CHECK(cudaMemsetAsync(accumulator, 0, size_t(spec.batch * spec.heads * spec.seq_len * spec.head_dim * 4),
                                 cuda_stream));
    uids.push_back(sdpa::kUidGradQAccum);
    pointers.push_back(accumulator);
  }
  if (plan.uses_sequence_lengths) {
    unsigned char* lengths = entry->sequence_lengths.as<unsigned char>();
    uids.push_back(sdpa::kUidSeqLenQ);
    pointers.push_back(lengths);
    uids.push_back(sdpa::kUidSeqLenKV);
    pointers.push_back(lengths + align256(spec.batch * int64_t(sizeof(int32_t))));
  }
  execute(*entry, spec, uids, pointers, base + layout.backend);
  return true;
}

}  // namespace cuda_detail
}  // namespace switchyard
