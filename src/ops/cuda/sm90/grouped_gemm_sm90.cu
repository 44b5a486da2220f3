// Host side of the sm_90a grouped GEMM shared by the forward and weight-grad launchers: which
// problems the kernels take, variant selection, device queries and TMA tensor-map encoding.
// The kernels: grouped_gemm_sm90_forward.cu, grouped_gemm_sm90_weight_grad.cu.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "src/ops/cuda/sm90/grouped_gemm_sm90_common.cuh"
#include "src/core/cuda_check.h"
#include "src/core/switches.h"

namespace switchyard {
namespace cuda {
namespace sm90 {
namespace detail {
namespace {

// An empty kernel whose presence in the fat binary for the current device tells that this build
// can run the sm_90a kernels there.
__global__ void sm90a_probe_kernel() {}

struct DeviceInfo {
  bool supported = false;
  int sm_count = 0;
};

DeviceInfo query_device(int device) {
  DeviceInfo info;
  int major = 0, minor = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
  cudaFuncAttributes attributes{};
  const cudaError_t status = cudaFuncGetAttributes(&attributes, sm90a_probe_kernel);
  if (status != cudaSuccess) (void)cudaGetLastError();  // no image for this device
  info.supported = major == 9 && minor == 0 && status == cudaSuccess;
  return info;
}

// Cached per device ordinal: these queries run on every launch.
const DeviceInfo* current_device_info() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  static std::mutex mutex;
  static std::unordered_map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it == cache.end()) it = cache.emplace(device, query_device(device)).first;
  return &it->second;
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max() - kBlockM;  // TMA coordinates are int32

bool is_cuda(const Tensor& tensor, DType dtype, int rank) {
  return tensor.device == DeviceKind::cuda && tensor.dtype == dtype && tensor.rank == rank;
}

bool dim_ok(int64_t value) { return value > 0 && value % kDimAlignment == 0 && value <= kMaxIndex; }

bool offsets_ok(const Tensor& expert_offsets, int64_t experts) {
  return is_cuda(expert_offsets, DType::i32, 1) && experts >= 1 && experts <= kMaxIndex &&
         expert_offsets.dim(0) == experts + 1 && expert_offsets.data != nullptr;
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult query = cudaDriverEntryPointSymbolNotFound;
    CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &query));
    SY_CHECK(query == cudaDriverEntryPointSuccess && function != nullptr,
             "the CUDA driver does not provide cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  return encoder;
}

CUtensorMap make_tensor_map(CUtensorMapDataType type, const void* base, int rank, const uint64_t* dims,
                            const uint64_t* stride_bytes, const uint32_t* box) {
  CUtensorMap map;
  std::memset(&map, 0, sizeof(map));
  const uint32_t element_strides[3] = {1, 1, 1};
  SY_CHECK(rank >= 2 && rank <= 3, "tensor map rank ", rank);
  const CUresult result = tensor_map_encoder()(
      &map, type, cuuint32_t(rank), const_cast<void*>(base),
      reinterpret_cast<const cuuint64_t*>(dims), reinterpret_cast<const cuuint64_t*>(stride_bytes),
      reinterpret_cast<const cuuint32_t*>(box), element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS) {
    SY_THROW("cuTensorMapEncodeTiled failed (CUresult ", int(result), ") for a rank-", rank,
             type == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 ? " fp32" : " bf16", " tensor with dims [",
             dims[0], ", ", dims[1], rank > 2 ? ", " : "", rank > 2 ? std::to_string(dims[2]) : std::string(),
             "] (innermost first) and box [", box[0], ", ", box[1], "]");
  }
  return map;
}

}  // namespace

CUtensorMap make_bf16_tensor_map(const void* base, int rank, const uint64_t* dims, const uint64_t* stride_bytes,
                                 const uint32_t* box) {
  return make_tensor_map(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, base, rank, dims, stride_bytes, box);
}

CUtensorMap make_f32_tensor_map(const void* base, int rank, const uint64_t* dims, const uint64_t* stride_bytes,
                                const uint32_t* box) {
  return make_tensor_map(CU_TENSOR_MAP_DATA_TYPE_FLOAT32, base, rank, dims, stride_bytes, box);
}

int current_device_sm_count() {
  const DeviceInfo* info = current_device_info();
  SY_CHECK(info != nullptr, "no current CUDA device");
  return info->sm_count;
}

int choose_block_n(const Options& options, int64_t n, int64_t tiles_m_upper_bound) {
  if (options.block_n != 0) {
    SY_CHECK_INPUT(options.block_n == 128 || options.block_n == 256,
                   "sm90 grouped GEMM: block_n must be 128 or 256, got ", options.block_n);
    return options.block_n;
  }
  const bool fills_wide_tiles = n % 256 == 0;
  const bool enough_wide_tiles = tiles_m_upper_bound * (n / 256) >= current_device_sm_count();
  return fills_wide_tiles && enough_wide_tiles ? 256 : 128;
}

bool uses_pingpong(const Options& options, Epilogue epilogue, int k_blocks) {
  if (options.schedule != Schedule::automatic) return options.schedule == Schedule::pingpong;
  // The 128 x 128 pingpong tiles run their MMAs ~20% slower than 128 x 256 cooperative ones (H100,
  // 2026-11-26: plain 8192 x 768 x 3072 GEMM 123 vs 100 us), so pingpong pays only where the hidden
  // epilogue is heavy (an activation) and long next to a short reduction: d_model 768 (12 k-blocks)
  // gained, d_model 2048 (32 k-blocks) lost. swiglu_backward would spill its second pre input.
  const bool heavy_epilogue =
      epilogue == Epilogue::gelu || epilogue == Epilogue::swiglu || epilogue == Epilogue::gelu_backward;
  return heavy_epilogue && k_blocks <= kPingpongMaxKBlocks;
}

}  // namespace detail

Options default_options() {
  const Switches& active = switches();
  Options options;
  options.variant = active.sm90_gemm;
  options.store = active.sm90_store;
  options.schedule = active.sm90_schedule;
  options.multicast = active.sm90_multicast;
  options.skip_padding = active.sm90_skip_padding;
  return options;
}

bool device_supported() {
  const detail::DeviceInfo* info = detail::current_device_info();
  return info != nullptr && info->supported;
}

bool supported(const Tensor& a, const Tensor& b, bool trans_b, const Tensor& expert_offsets, const Tensor& c) {
  using namespace detail;
  if (!is_cuda(a, DType::bf16, 2) || !is_cuda(b, DType::bf16, 3) || !is_cuda(c, DType::bf16, 2)) return false;
  const int64_t rows = a.dim(0), k = a.dim(1), n = c.dim(1), experts = b.dim(0);
  if (c.dim(0) != rows || rows > kMaxIndex || !offsets_ok(expert_offsets, experts)) return false;
  if ((trans_b ? b.dim(2) : b.dim(1)) != k || (trans_b ? b.dim(1) : b.dim(2)) != n) return false;
  if (!dim_ok(k) || !dim_ok(n)) return false;
  if (rows > 0 && (!aligned16(a.data) || !aligned16(b.data) || !aligned16(c.data))) return false;
  return device_supported();
}

bool weight_grad_supported(const Tensor& a, const Tensor& g, const Tensor& expert_offsets, const Tensor& grad_b) {
  using namespace detail;
  if (!is_cuda(a, DType::bf16, 2) || !is_cuda(g, DType::bf16, 2) || !is_cuda(grad_b, DType::f32, 3)) return false;
  const int64_t rows = a.dim(0), m = a.dim(1), n = g.dim(1), experts = grad_b.dim(0);
  if (g.dim(0) != rows || rows > kMaxIndex || !offsets_ok(expert_offsets, experts)) return false;
  if (grad_b.dim(1) != m || grad_b.dim(2) != n || !dim_ok(m) || !dim_ok(n)) return false;
  if (experts * m * n > int64_t(1) << 40) return false;
  if (!aligned16(grad_b.data) || (rows > 0 && (!aligned16(a.data) || !aligned16(g.data)))) return false;
  return device_supported();
}

namespace {

int64_t pre_width(ExpertActivation activation, int64_t width) {
  return activation == ExpertActivation::swiglu ? 2 * width : width;
}

// Sizes shared by the fused ops: D (reduction of GEMM 1, output width of GEMM 2) and F multiples of 64.
bool activation_dims_ok(ExpertActivation activation, int64_t rows, int64_t d_model, int64_t width) {
  using namespace detail;
  if (activation != ExpertActivation::gelu_tanh && activation != ExpertActivation::swiglu) return false;
  return rows <= kMaxIndex && dim_ok(d_model) && dim_ok(width) && dim_ok(pre_width(activation, width));
}

// pre (or grad_pre): bf16 [R, F] or [R, 2F] on the device, 16-byte aligned.
bool pre_ok(ExpertActivation activation, const Tensor& pre, int64_t rows, int64_t width) {
  using namespace detail;
  return is_cuda(pre, DType::bf16, 2) && pre.dim(0) == rows && pre.dim(1) == pre_width(activation, width) &&
         (rows == 0 || aligned16(pre.data));
}

}  // namespace

bool activation_supported(ExpertActivation activation, const Tensor& a, const Tensor& w1, const Tensor& expert_offsets,
                          const Tensor* pre, const Tensor& post) {
  using namespace detail;
  if (!is_cuda(a, DType::bf16, 2) || !is_cuda(w1, DType::bf16, 3) || !is_cuda(post, DType::bf16, 2)) return false;
  const int64_t rows = a.dim(0), d_model = a.dim(1), experts = w1.dim(0), width = post.dim(1);
  if (!activation_dims_ok(activation, rows, d_model, width)) return false;
  if (post.dim(0) != rows || w1.dim(1) != d_model || w1.dim(2) != pre_width(activation, width)) return false;
  if (!offsets_ok(expert_offsets, experts)) return false;
  if (pre && (!pre_ok(activation, *pre, rows, width) || (rows > 0 && pre->data == post.data))) return false;
  if (rows > 0 && (!aligned16(a.data) || !aligned16(w1.data) || !aligned16(post.data))) return false;
  return device_supported();
}

bool activation_backward_supported(ExpertActivation activation, const Tensor& grad_out, const Tensor& w2,
                                   const Tensor& expert_offsets, const Tensor& pre, const Tensor& grad_pre) {
  using namespace detail;
  if (!is_cuda(grad_out, DType::bf16, 2) || !is_cuda(w2, DType::bf16, 3)) return false;
  const int64_t rows = grad_out.dim(0), d_model = grad_out.dim(1), experts = w2.dim(0), width = w2.dim(1);
  if (!activation_dims_ok(activation, rows, d_model, width)) return false;
  if (w2.dim(2) != d_model || !offsets_ok(expert_offsets, experts)) return false;
  if (!pre_ok(activation, pre, rows, width) || !pre_ok(activation, grad_pre, rows, width)) return false;
  if (rows > 0 && (pre.data == grad_pre.data || !aligned16(grad_out.data) || !aligned16(w2.data))) return false;
  return device_supported();
}

}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
