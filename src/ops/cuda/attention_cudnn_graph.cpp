// cuDNN backend graphs of causal SDPA, forward and backward (declarations and layouts:
// src/ops/cuda/attention_cudnn_graph.h). With scale = 1 / sqrt(Dh) and M the causal mask:
//   forward   Z = scale Q K^T;  Z' = M ? Z : fill;  m = rowmax(Z');  E = exp(Z' - m);  l = rowsum(E)
//             Stats = m + log(l);  P = E / l (activation dtype);  O = P V
//   backward  softmax_sum = rowsum(dO * O) * 1;  Z = scale Q K^T - Stats;  P = exp(M ? Z : fill)
//             dV = P^T dO;  dS = scale P (dO V^T - softmax_sum);  dK = dS^T Q;  dQ = dS K
// These are the operation graphs cudnn-frontend's CompositeSDPANode / CompositeSDPABackwardNode
// emit (same ops, order, data types and virtual tensors), which cuDNN matches to its fused
// flash-attention engines; intermediates are virtual (never materialized) and fp32 unless noted.
// Version workarounds follow the frontend too: masked scores get lowest() instead of -inf before
// cuDNN 9.10; before 9.16 a backward with S % 128 != 0 also carries a padding mask with
// per-sequence lengths S (int32 device tensors, overriding the GEMM sizes), re-applied once more
// on 9.0 - 9.9. The deterministic backward writes dQ straight from the dS K GEMM, which makes
// cuDNN keep dS in its workspace instead of adding dQ into an fp32 accumulator with atomics.
#include "src/ops/cuda/attention_cudnn_graph.h"

#include <array>
#include <cmath>
#include <limits>
#include <sstream>
#include <tuple>

#include "src/core/error.h"

namespace switchyard {
namespace cuda_detail {
namespace sdpa {
namespace {

using Descriptor = cudnnBackendDescriptor_t;
using Dims = std::array<int64_t, 4>;

struct Layout {
  Dims dims, strides;
};

// Passes an attribute enumerator together with its name, for error messages.
#define SDPA_ATTR(name) name, #name

std::string last_cudnn_message() {
  char message[1024] = {0};
  cudnnGetLastErrorString(message, sizeof(message));
  return message[0] ? std::string(": ") + message : std::string();
}

enum class Storage { device, by_value, virtual_tensor };

// Creates, sets and finalizes backend descriptors, remembering the graph step under way so that a
// failure names it; every descriptor it creates ends up owned by `plan`.
class GraphBuilder {
 public:
  GraphBuilder(const GraphSpec& spec, BuiltPlan& plan) : spec_(spec), plan_(plan) {}

  void step(const std::string& name) { step_ = name; }

  Descriptor create(cudnnBackendDescriptorType_t type, const char* type_name) {
    Descriptor descriptor = nullptr;
    check(cudnnBackendCreateDescriptor(type, &descriptor), "cudnnBackendCreateDescriptor(", type_name, ")");
    plan_.descriptors.push_back(descriptor);
    return descriptor;
  }
  void set(Descriptor descriptor, cudnnBackendAttributeName_t attribute, const char* attribute_name,
           cudnnBackendAttributeType_t type, int64_t count, const void* values) {
    check(cudnnBackendSetAttribute(descriptor, attribute, type, count, values), "cudnnBackendSetAttribute(",
          attribute_name, ")");
  }
  void link(Descriptor descriptor, cudnnBackendAttributeName_t attribute, const char* attribute_name,
            Descriptor value) {
    set(descriptor, attribute, attribute_name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &value);
  }
  void finalize(Descriptor descriptor, const char* what) {
    check(cudnnBackendFinalize(descriptor), "cudnnBackendFinalize(", what, ")");
  }

  Descriptor tensor(const std::string& name, int64_t uid, cudnnDataType_t type, const Layout& layout,
                    Storage storage) {
    step("tensor " + name);
    Descriptor descriptor = create(SDPA_ATTR(CUDNN_BACKEND_TENSOR_DESCRIPTOR));
    const int64_t alignment = 16;
    set(descriptor, SDPA_ATTR(CUDNN_ATTR_TENSOR_UNIQUE_ID), CUDNN_TYPE_INT64, 1, &uid);
    set(descriptor, SDPA_ATTR(CUDNN_ATTR_TENSOR_DATA_TYPE), CUDNN_TYPE_DATA_TYPE, 1, &type);
    set(descriptor, SDPA_ATTR(CUDNN_ATTR_TENSOR_DIMENSIONS), CUDNN_TYPE_INT64, 4, layout.dims.data());
    set(descriptor, SDPA_ATTR(CUDNN_ATTR_TENSOR_STRIDES), CUDNN_TYPE_INT64, 4, layout.strides.data());
    set(descriptor, SDPA_ATTR(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT), CUDNN_TYPE_INT64, 1, &alignment);
    const bool flag = true;
    if (storage == Storage::virtual_tensor)
      set(descriptor, SDPA_ATTR(CUDNN_ATTR_TENSOR_IS_VIRTUAL), CUDNN_TYPE_BOOLEAN, 1, &flag);
    if (storage == Storage::by_value)
      set(descriptor, SDPA_ATTR(CUDNN_ATTR_TENSOR_IS_BY_VALUE), CUDNN_TYPE_BOOLEAN, 1, &flag);
    finalize(descriptor, "tensor");
    return descriptor;
  }
  Descriptor intermediate(const std::string& name, cudnnDataType_t type, const Layout& layout) {
    return tensor(name, next_virtual_uid_++, type, layout, Storage::virtual_tensor);
  }

  // C = A B, fp32 accumulation; m/n/k overrides only with the padding-mask workaround.
  void matmul(const std::string& name, Descriptor a, Descriptor b, Descriptor c, Descriptor m_override = nullptr,
              Descriptor n_override = nullptr, Descriptor k_override = nullptr) {
    step("matmul " + name);
    Descriptor matmul = create(SDPA_ATTR(CUDNN_BACKEND_MATMUL_DESCRIPTOR));
    const cudnnDataType_t compute = CUDNN_DATA_FLOAT;
    set(matmul, SDPA_ATTR(CUDNN_ATTR_MATMUL_COMP_TYPE), CUDNN_TYPE_DATA_TYPE, 1, &compute);
    finalize(matmul, "matmul descriptor");
    Descriptor operation = create(SDPA_ATTR(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR));
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_MATMUL_ADESC), a);
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_MATMUL_BDESC), b);
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_MATMUL_CDESC), c);
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_MATMUL_DESC), matmul);
    if (m_override) link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC), m_override);
    if (n_override) link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC), n_override);
    if (k_override) link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC), k_override);
    finalize(operation, "matmul operation");
    operations_.push_back(operation);
  }

  // y = mode(x[, b[, t]]); `axis` only for GEN_INDEX.
  void pointwise(const std::string& name, cudnnPointwiseMode_t mode, Descriptor x, Descriptor b, Descriptor t,
                 Descriptor y, cudnnDataType_t math = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    step("pointwise " + name);
    Descriptor pointwise = create(SDPA_ATTR(CUDNN_BACKEND_POINTWISE_DESCRIPTOR));
    set(pointwise, SDPA_ATTR(CUDNN_ATTR_POINTWISE_MODE), CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    set(pointwise, SDPA_ATTR(CUDNN_ATTR_POINTWISE_MATH_PREC), CUDNN_TYPE_DATA_TYPE, 1, &math);
    if (axis >= 0) set(pointwise, SDPA_ATTR(CUDNN_ATTR_POINTWISE_AXIS), CUDNN_TYPE_INT64, 1, &axis);
    finalize(pointwise, "pointwise descriptor");
    Descriptor operation = create(SDPA_ATTR(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR));
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR), pointwise);
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_POINTWISE_XDESC), x);
    if (b) link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_POINTWISE_BDESC), b);
    if (t) link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_POINTWISE_TDESC), t);
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_POINTWISE_YDESC), y);
    finalize(operation, "pointwise operation");
    operations_.push_back(operation);
  }

  // y = reduce(x) over the axes where y has extent 1, fp32.
  void reduction(const std::string& name, cudnnReduceTensorOp_t reduce, Descriptor x, Descriptor y) {
    step("reduction " + name);
    Descriptor reduction = create(SDPA_ATTR(CUDNN_BACKEND_REDUCTION_DESCRIPTOR));
    const cudnnDataType_t compute = CUDNN_DATA_FLOAT;
    set(reduction, SDPA_ATTR(CUDNN_ATTR_REDUCTION_OPERATOR), CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &reduce);
    set(reduction, SDPA_ATTR(CUDNN_ATTR_REDUCTION_COMP_TYPE), CUDNN_TYPE_DATA_TYPE, 1, &compute);
    finalize(reduction, "reduction descriptor");
    Descriptor operation = create(SDPA_ATTR(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR));
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_REDUCTION_XDESC), x);
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_REDUCTION_YDESC), y);
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_REDUCTION_DESC), reduction);
    finalize(operation, "reduction operation");
    operations_.push_back(operation);
  }

  // y = x re-described (a transposed view, or a change of data type on the way into a GEMM).
  void reshape(const std::string& name, Descriptor x, Descriptor y) {
    step("reshape " + name);
    Descriptor operation = create(SDPA_ATTR(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR));
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_RESHAPE_XDESC), x);
    link(operation, SDPA_ATTR(CUDNN_ATTR_OPERATION_RESHAPE_YDESC), y);
    finalize(operation, "reshape operation");
    operations_.push_back(operation);
  }

  void build_plan(cudnnHandle_t handle);

 private:
  template <typename... Parts>
  void check(cudnnStatus_t status, const Parts&... call) {
    if (status == CUDNN_STATUS_SUCCESS) return;
    SY_THROW("cuDNN ", spec_.describe(), " graph, step '", step_, "': ", call..., " returned ",
             cudnnGetErrorString(status), last_cudnn_message());
  }
  bool try_plan(cudnnHandle_t handle, Descriptor config, const std::string& where, std::ostringstream& failures);
  void describe_engine(Descriptor config, const std::string& where);

  const GraphSpec& spec_;
  BuiltPlan& plan_;
  std::vector<Descriptor> operations_;
  std::string step_;
  int64_t next_virtual_uid_ = 1000;
};

// The operation graph, then the first heuristics config whose plan finalizes.
void GraphBuilder::build_plan(cudnnHandle_t handle) {
  step("operation graph");
  Descriptor graph = create(SDPA_ATTR(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR));
  set(graph, SDPA_ATTR(CUDNN_ATTR_OPERATIONGRAPH_HANDLE), CUDNN_TYPE_HANDLE, 1, &handle);
  set(graph, SDPA_ATTR(CUDNN_ATTR_OPERATIONGRAPH_OPS), CUDNN_TYPE_BACKEND_DESCRIPTOR, int64_t(operations_.size()),
      operations_.data());
  finalize(graph, "operation graph");

  std::ostringstream failures;
  const std::pair<cudnnBackendHeurMode_t, const char*> modes[] = {{CUDNN_HEUR_MODE_A, "A"},
                                                                  {CUDNN_HEUR_MODE_FALLBACK, "fallback"}};
  for (const auto& [mode, mode_name] : modes) {
    step(std::string("heuristics mode ") + mode_name);
    Descriptor heuristics = create(SDPA_ATTR(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR));
    link(heuristics, SDPA_ATTR(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH), graph);
    set(heuristics, SDPA_ATTR(CUDNN_ATTR_ENGINEHEUR_MODE), CUDNN_TYPE_HEUR_MODE, 1, &mode);
    const cudnnStatus_t status = cudnnBackendFinalize(heuristics);
    if (status != CUDNN_STATUS_SUCCESS) {
      failures << "; heuristics mode " << mode_name << ": " << cudnnGetErrorString(status) << last_cudnn_message();
      continue;
    }
    int64_t count = 0;
    check(cudnnBackendGetAttribute(heuristics, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count,
                                   nullptr),
          "cudnnBackendGetAttribute(CUDNN_ATTR_ENGINEHEUR_RESULTS, count)");
    std::vector<Descriptor> configs;
    for (int64_t i = 0; i < count; ++i) configs.push_back(create(SDPA_ATTR(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR)));
    int64_t returned = 0;
    check(cudnnBackendGetAttribute(heuristics, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count,
                                   &returned, configs.data()),
          "cudnnBackendGetAttribute(CUDNN_ATTR_ENGINEHEUR_RESULTS)");
    if (returned == 0)  // cuDNN rejected every candidate engine; its log says why
      failures << "; heuristics mode " << mode_name << ": no viable engine config among " << count << " candidates";
    for (int64_t i = 0; i < returned; ++i) {
      const std::string where = std::string("heuristics mode ") + mode_name + ", config " + std::to_string(i) +
                                " of " + std::to_string(returned);
      if (try_plan(handle, configs[size_t(i)], where, failures)) return;
    }
  }
  SY_THROW("cuDNN ", spec_.describe(), " graph: no engine config gives a plan that finalizes", failures.str(),
           " (CUDNN_LOGLEVEL_DBG=2 CUDNN_LOGDEST_DBG=stderr prints cuDNN's reasons per engine)");
}

bool GraphBuilder::try_plan(cudnnHandle_t handle, Descriptor config, const std::string& where,
                            std::ostringstream& failures) {
  step("execution plan, " + where);
  Descriptor plan = create(SDPA_ATTR(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR));
  set(plan, SDPA_ATTR(CUDNN_ATTR_EXECUTION_PLAN_HANDLE), CUDNN_TYPE_HANDLE, 1, &handle);
  link(plan, SDPA_ATTR(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG), config);
  const cudnnStatus_t status = cudnnBackendFinalize(plan);
  if (status != CUDNN_STATUS_SUCCESS) {
    failures << "; " << where << ": " << cudnnGetErrorString(status) << last_cudnn_message();
    return false;
  }
  int64_t returned = 0;
  check(cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &returned,
                                 &plan_.backend_workspace_bytes),
        "cudnnBackendGetAttribute(CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)");
  plan_.plan = plan;
  describe_engine(config, where);
  return true;
}

// Engine id and numerical notes, for reports only: a failure here leaves "engine ?".
void GraphBuilder::describe_engine(Descriptor config, const std::string& where) {
  Descriptor engine = nullptr;
  int64_t returned = 0, index = -1;
  cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
  int64_t note_count = 0;
  const bool known =
      cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &engine) == CUDNN_STATUS_SUCCESS &&
      cudnnBackendGetAttribute(config, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &returned,
                               &engine) == CUDNN_STATUS_SUCCESS &&
      cudnnBackendGetAttribute(engine, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &returned, &index) ==
          CUDNN_STATUS_SUCCESS &&
      cudnnBackendGetAttribute(engine, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                               CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &note_count, notes) == CUDNN_STATUS_SUCCESS;
  if (engine) plan_.descriptors.push_back(engine);
  for (int64_t i = 0; known && i < note_count; ++i)
    if (notes[i] == CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC) plan_.engine_nondeterministic = true;
  plan_.engine = (known ? "engine " + std::to_string(index) : std::string("engine ?")) + " (" + where + ")" +
                 (plan_.engine_nondeterministic ? ", notes: nondeterministic" : "");
}

// Layouts of the header's table for one spec.
struct Layouts {
  Layout qkv, qkv_transposed, out, scores, scores_transposed, row, packed, scalar, per_sequence;
  explicit Layouts(const GraphSpec& s) {
    const int64_t b = s.batch, h = s.heads, n = s.seq_len, d = s.head_dim, model = h * d;
    qkv = {{b, h, n, d}, {n * 3 * model, d, 3 * model, 1}};
    qkv_transposed = {{b, h, d, n}, {n * 3 * model, d, 1, 3 * model}};
    out = {{b, h, n, d}, {n * model, d, model, 1}};
    scores = {{b, h, n, n}, {h * n * n, n * n, n, 1}};
    scores_transposed = {{b, h, n, n}, {h * n * n, n * n, 1, n}};
    row = {{b, h, n, 1}, {h * n, n, 1, 1}};
    packed = {{b, h, n, d}, {h * n * d, n * d, d, 1}};
    scalar = {{1, 1, 1, 1}, {1, 1, 1, 1}};
    per_sequence = {{b, 1, 1, 1}, {1, 1, 1, 1}};
  }
};

// Keeps scores with key <= query (row index >= column index), the rest become `fill`.
Descriptor causal_mask(GraphBuilder& g, const Layouts& l, Descriptor scores, Descriptor fill) {
  Descriptor row = g.intermediate("causal row index", CUDNN_DATA_INT32, l.scores);
  g.pointwise("causal row index", CUDNN_POINTWISE_GEN_INDEX, scores, nullptr, nullptr, row, CUDNN_DATA_FLOAT, 2);
  Descriptor column = g.intermediate("causal column index", CUDNN_DATA_INT32, l.scores);
  g.pointwise("causal column index", CUDNN_POINTWISE_GEN_INDEX, scores, nullptr, nullptr, column, CUDNN_DATA_FLOAT,
              3);
  Descriptor keep = g.intermediate("causal keep", CUDNN_DATA_BOOLEAN, l.scores);
  g.pointwise("causal row >= column", CUDNN_POINTWISE_CMP_GE, row, column, nullptr, keep, CUDNN_DATA_BOOLEAN);
  Descriptor masked = g.intermediate("causal masked scores", CUDNN_DATA_FLOAT, l.scores);
  g.pointwise("causal select", CUDNN_POINTWISE_BINARY_SELECT, scores, fill, keep, masked);
  return masked;
}

// Keeps scores with row < seq_len_q and column < seq_len_kv (all rows and columns here: the
// lengths are S; only the workaround needs it).
Descriptor padding_mask(GraphBuilder& g, const Layouts& l, Descriptor scores, Descriptor fill, Descriptor seq_len_q,
                        Descriptor seq_len_kv) {
  Descriptor row = g.intermediate("padding row index", CUDNN_DATA_INT32, l.scores);
  g.pointwise("padding row index", CUDNN_POINTWISE_GEN_INDEX, scores, nullptr, nullptr, row, CUDNN_DATA_INT32, 2);
  Descriptor column = g.intermediate("padding column index", CUDNN_DATA_INT32, l.scores);
  g.pointwise("padding column index", CUDNN_POINTWISE_GEN_INDEX, scores, nullptr, nullptr, column, CUDNN_DATA_INT32,
              3);
  Descriptor row_ok = g.intermediate("padding row < seq_len_q", CUDNN_DATA_BOOLEAN, l.scores);
  g.pointwise("padding row < seq_len_q", CUDNN_POINTWISE_CMP_LT, row, seq_len_q, nullptr, row_ok, CUDNN_DATA_BOOLEAN);
  Descriptor column_ok = g.intermediate("padding column < seq_len_kv", CUDNN_DATA_BOOLEAN, l.scores);
  g.pointwise("padding column < seq_len_kv", CUDNN_POINTWISE_CMP_LT, column, seq_len_kv, nullptr, column_ok,
              CUDNN_DATA_BOOLEAN);
  Descriptor keep = g.intermediate("padding keep", CUDNN_DATA_BOOLEAN, l.scores);
  g.pointwise("padding and", CUDNN_POINTWISE_LOGICAL_AND, row_ok, column_ok, nullptr, keep, CUDNN_DATA_BOOLEAN);
  Descriptor masked = g.intermediate("padding masked scores", CUDNN_DATA_FLOAT, l.scores);
  g.pointwise("padding select", CUDNN_POINTWISE_BINARY_SELECT, scores, fill, keep, masked);
  return masked;
}

void add_forward(GraphBuilder& g, const GraphSpec& s) {
  const Layouts l(s);
  Descriptor q = g.tensor("Q", kUidQ, s.io_type, l.qkv, Storage::device);
  Descriptor k_t = g.tensor("K^T", kUidKTransposed, s.io_type, l.qkv_transposed, Storage::device);
  Descriptor v = g.tensor("V", kUidV, s.io_type, l.qkv, Storage::device);
  Descriptor o = g.tensor("O", kUidO, s.io_type, l.out, Storage::device);
  Descriptor stats = g.tensor("Stats", kUidStats, CUDNN_DATA_FLOAT, l.row, Storage::device);
  Descriptor scale = g.tensor("attn_scale", kUidScale, CUDNN_DATA_FLOAT, l.scalar, Storage::by_value);
  Descriptor fill = g.tensor("mask fill", kUidMaskFill, CUDNN_DATA_FLOAT, l.scalar, Storage::by_value);

  Descriptor products = g.intermediate("Q K^T", CUDNN_DATA_FLOAT, l.scores);
  g.matmul("bmm1 Q K^T", q, k_t, products);
  Descriptor scores = g.intermediate("scaled scores", CUDNN_DATA_FLOAT, l.scores);
  g.pointwise("attn_scale", CUDNN_POINTWISE_MUL, products, scale, nullptr, scores);
  Descriptor masked = causal_mask(g, l, scores, fill);

  Descriptor row_max = g.intermediate("softmax max", CUDNN_DATA_FLOAT, l.row);
  g.reduction("softmax max", CUDNN_REDUCE_TENSOR_MAX, masked, row_max);
  Descriptor shifted = g.intermediate("softmax shifted", CUDNN_DATA_FLOAT, l.scores);
  g.pointwise("softmax sub max", CUDNN_POINTWISE_SUB, masked, row_max, nullptr, shifted);
  Descriptor exps = g.intermediate("softmax exp", CUDNN_DATA_FLOAT, l.scores);
  g.pointwise("softmax exp", CUDNN_POINTWISE_EXP, shifted, nullptr, nullptr, exps);
  Descriptor row_sum = g.intermediate("softmax sum", CUDNN_DATA_FLOAT, l.row);
  g.reduction("softmax sum", CUDNN_REDUCE_TENSOR_ADD, exps, row_sum);
  Descriptor log_sum = g.intermediate("softmax log sum", CUDNN_DATA_FLOAT, l.row);
  g.pointwise("softmax log", CUDNN_POINTWISE_LOG, row_sum, nullptr, nullptr, log_sum);
  g.pointwise("softmax stats = max + log sum", CUDNN_POINTWISE_ADD, row_max, log_sum, nullptr, stats);
  Descriptor probabilities = g.intermediate("softmax P", s.io_type, l.scores);  // bmm2 takes P in the io type
  g.pointwise("softmax div", CUDNN_POINTWISE_DIV, exps, row_sum, nullptr, probabilities);
  g.matmul("bmm2 P V", probabilities, v, o);
}

void add_backward(GraphBuilder& g, const GraphSpec& s, BuiltPlan& plan) {
  const Layouts l(s);
  Descriptor q = g.tensor("Q", kUidQ, s.io_type, l.qkv, Storage::device);
  Descriptor k_t = g.tensor("K^T", kUidKTransposed, s.io_type, l.qkv_transposed, Storage::device);
  Descriptor v_t = g.tensor("V^T", kUidV, s.io_type, l.qkv_transposed, Storage::device);
  Descriptor o = g.tensor("O", kUidO, s.io_type, l.out, Storage::device);
  Descriptor d_o = g.tensor("dO", kUidGradO, s.io_type, l.out, Storage::device);
  Descriptor stats = g.tensor("Stats", kUidStats, CUDNN_DATA_FLOAT, l.row, Storage::device);
  Descriptor d_q = g.tensor("dQ", kUidGradQ, s.io_type, l.qkv, Storage::device);
  Descriptor d_k = g.tensor("dK", kUidGradK, s.io_type, l.qkv, Storage::device);
  Descriptor d_v = g.tensor("dV", kUidGradV, s.io_type, l.qkv, Storage::device);
  Descriptor scale = g.tensor("attn_scale", kUidScale, CUDNN_DATA_FLOAT, l.scalar, Storage::by_value);
  Descriptor fill = g.tensor("mask fill", kUidMaskFill, CUDNN_DATA_FLOAT, l.scalar, Storage::by_value);
  Descriptor one = g.tensor("one", kUidOne, CUDNN_DATA_FLOAT, l.scalar, Storage::by_value);
  Descriptor seq_q = nullptr, seq_kv = nullptr;
  if (plan.uses_sequence_lengths) {
    seq_q = g.tensor("seq_len_q", kUidSeqLenQ, CUDNN_DATA_INT32, l.per_sequence, Storage::device);
    seq_kv = g.tensor("seq_len_kv", kUidSeqLenKV, CUDNN_DATA_INT32, l.per_sequence, Storage::device);
  }

  // softmax_sum = rowsum(dO * O) * 1 (the frontend's virtual product has these odd strides too)
  Descriptor product = g.intermediate("dO * O", CUDNN_DATA_FLOAT,
                                      {{s.batch, s.heads, s.seq_len, s.head_dim},
                                       {s.heads * s.seq_len * s.head_dim, s.seq_len * s.head_dim,
                                        s.heads * s.head_dim, 1}});
  g.pointwise("dO * O", CUDNN_POINTWISE_MUL, d_o, o, nullptr, product);
  Descriptor row_dot = g.intermediate("rowsum dO * O", CUDNN_DATA_FLOAT, l.row);
  g.reduction("rowsum dO * O", CUDNN_REDUCE_TENSOR_ADD, product, row_dot);
  Descriptor softmax_sum = g.tensor("softmax_sum", kUidSoftmaxSum, CUDNN_DATA_FLOAT, l.row, Storage::device);
  g.pointwise("softmax_sum scale", CUDNN_POINTWISE_MUL, row_dot, one, nullptr, softmax_sum);

  // P = exp(mask(scale Q K^T - Stats))
  Descriptor products = g.intermediate("Q K^T", CUDNN_DATA_FLOAT, l.scores);
  g.matmul("Q K^T", q, k_t, products, seq_q, seq_kv);
  Descriptor scores = g.intermediate("scaled scores", CUDNN_DATA_FLOAT, l.scores);
  g.pointwise("attn_scale", CUDNN_POINTWISE_MUL, products, scale, nullptr, scores);
  Descriptor centered = g.intermediate("scores - Stats", CUDNN_DATA_FLOAT, l.scores);
  g.pointwise("sub Stats", CUDNN_POINTWISE_SUB, scores, stats, nullptr, centered);
  if (plan.uses_sequence_lengths) {
    centered = padding_mask(g, l, centered, fill, seq_q, seq_kv);
    if (s.cudnn_version >= 90000 && s.cudnn_version < 91000)  // the frontend re-applies it on 9.0 - 9.9
      centered = padding_mask(g, l, centered, fill, seq_q, seq_kv);
  }
  Descriptor masked = causal_mask(g, l, centered, fill);
  Descriptor probabilities = g.intermediate("P", CUDNN_DATA_FLOAT, l.scores);
  g.pointwise("exp", CUDNN_POINTWISE_EXP, masked, nullptr, nullptr, probabilities);

  // dV = P^T dO
  Descriptor probabilities_t = g.intermediate("P^T", s.io_type, l.scores_transposed);
  g.reshape("P^T", probabilities, probabilities_t);
  g.matmul("dV = P^T dO", probabilities_t, d_o, d_v, seq_kv, nullptr, seq_q);

  // dS = scale P (dO V^T - softmax_sum);  dK = dS^T Q
  Descriptor grad_p = g.intermediate("dP = dO V^T", CUDNN_DATA_FLOAT, l.scores);
  g.matmul("dP = dO V^T", d_o, v_t, grad_p, seq_q, seq_kv);
  Descriptor centered_grad = g.intermediate("dP - softmax_sum", CUDNN_DATA_FLOAT, l.scores);
  g.pointwise("dP - softmax_sum", CUDNN_POINTWISE_SUB, grad_p, softmax_sum, nullptr, centered_grad);
  Descriptor weighted = g.intermediate("P (dP - softmax_sum)", CUDNN_DATA_FLOAT, l.scores);
  g.pointwise("mul P", CUDNN_POINTWISE_MUL, centered_grad, probabilities, nullptr, weighted);
  Descriptor grad_s = g.intermediate("dS", CUDNN_DATA_FLOAT, l.scores);
  g.pointwise("dS attn_scale", CUDNN_POINTWISE_MUL, weighted, scale, nullptr, grad_s);
  Descriptor grad_s_t = g.intermediate("dS^T", s.io_type, l.scores_transposed);
  g.reshape("dS^T", grad_s, grad_s_t);
  g.matmul("dK = dS^T Q", grad_s_t, q, d_k, seq_kv, nullptr, seq_q);

  // dQ = dS K (K re-described from K^T)
  Descriptor k = g.intermediate("K", CUDNN_DATA_FLOAT, l.qkv);
  g.reshape("K", k_t, k);
  if (s.deterministic) {
    g.matmul("dQ = dS K", grad_s, k, d_q, seq_q, nullptr, seq_kv);
  } else {
    Descriptor accumulator = g.tensor("dQ accumulator", kUidGradQAccum, CUDNN_DATA_FLOAT, l.packed, Storage::device);
    g.matmul("dQ = dS K", grad_s, k, accumulator, seq_q, nullptr, seq_kv);
    g.pointwise("dQ from accumulator", CUDNN_POINTWISE_IDENTITY, accumulator, nullptr, nullptr, d_q);
  }
}

const char* type_name(cudnnDataType_t type) {
  switch (type) {
    case CUDNN_DATA_BFLOAT16: return "bf16";
    case CUDNN_DATA_HALF: return "fp16";
    case CUDNN_DATA_FLOAT: return "fp32";
    default: return "other";
  }
}

}  // namespace

bool GraphSpec::operator<(const GraphSpec& other) const {
  auto tie = [](const GraphSpec& s) {
    return std::make_tuple(s.batch, s.seq_len, s.heads, s.head_dim, int(s.io_type), int(s.direction),
                           s.deterministic, s.cudnn_version);
  };
  return tie(*this) < tie(other);
}

std::string GraphSpec::describe() const {
  std::ostringstream text;
  text << (direction == Direction::forward ? "forward " : "backward ") << type_name(io_type) << " B=" << batch
       << " S=" << seq_len << " H=" << heads << " Dh=" << head_dim;
  if (direction == Direction::backward) text << (deterministic ? " deterministic" : " non-deterministic");
  return text.str();
}

BuiltPlan::~BuiltPlan() {
  for (auto it = descriptors.rbegin(); it != descriptors.rend(); ++it) cudnnBackendDestroyDescriptor(*it);
}

std::unique_ptr<BuiltPlan> build_attention_plan(cudnnHandle_t handle, const GraphSpec& spec) {
  auto plan = std::make_unique<BuiltPlan>();
  plan->scale = float(1.0 / std::sqrt(double(spec.head_dim)));
  plan->mask_fill = spec.cudnn_version < 91000 ? std::numeric_limits<float>::lowest()
                                               : -std::numeric_limits<float>::infinity();
  plan->one = 1.0f;
  if (spec.direction == Direction::backward) {
    plan->uses_grad_q_accumulator = !spec.deterministic;
    plan->zero_grad_q_accumulator = plan->uses_grad_q_accumulator && spec.cudnn_version < 90600;
    plan->uses_sequence_lengths = spec.seq_len % 128 != 0 && spec.cudnn_version <= 91500;
  }
  GraphBuilder builder(spec, *plan);
  if (spec.direction == Direction::forward) add_forward(builder, spec);
  else add_backward(builder, spec, *plan);
  builder.build_plan(handle);
  return plan;
}

}  // namespace sdpa
}  // namespace cuda_detail
}  // namespace switchyard
