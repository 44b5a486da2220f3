// EpExchange: how the expert-parallel MoE layer's token rows reach the ranks that hold their
// experts and how the results come back -- dispatch and combine behind one interface, with the
// transport chosen inside (as DeepEP's buffer does), never by the layer.
//
// The group has P ranks; rank p holds the global experts [p*L, (p+1)*L), L = E/P. Each rank routes
// its own tokens with segment_alignment 1, so its packed rows are grouped by global expert and the
// rows for each destination are contiguous (src/comm/expert_dispatch.h). A pass runs:
//
//   start_count_exchange(packed offsets)    after routing: the counts leave (the layer permutes its
//                                           rows into the packed buffer meanwhile)
//   finish_count_exchange()                 the one host sync; the plan; the padded expert layout
//                                           (expert_input / expert_output rows) made large enough
//   dispatch(pass, packed)                  every packed row goes to its expert's layout: forward
//                                           rows x into expert_input, backward rows dL/dO into
//                                           expert_output
//   for each chunk c:
//     receive(pass, c)                      c's rows are in the layout, padding rows zero
//     (the layer runs the expert FFN, or its backward, on c's rows of the layout; its results go
//      to expert_output: O forward, dL/dX backward)
//     send_back(pass, c, packed)            c's results start back toward their source ranks
//   combine(pass, routing, map, packed, out)  every result is home and summed per token: forward
//                                           out = y, y[t] = sum_j gate[t,j] * row(t,j), the rows kept
//                                           in `packed` (backward's gate gradients read them);
//                                           backward out = dL/dx, dL/dx[t] = sum_j row(t,j)
// Backward reuses its forward's plan (no count exchange). Every call is collective over the group
// in this order; everything runs on context.stream (NCCL work on the communicator's stream, ordered
// by events).
//
// Transports (parallel.ep_transport):
//   nccl    packed all-to-all-v into a receive buffer, reordered into the padded layout on the
//           receiver, chunked (a2a_chunks: chunk c's GEMMs overlap chunk c+1's transfer); MPI for
//           CPU ranks;
//   nvlink  ranks of one node: the padded layout lives in peer-mapped memory; rows are written
//           straight into the owners' layouts and the results read straight back, fused with the
//           per-token sum (src/comm/nvlink_exchange.h); one chunk;
//   auto    nvlink where every rank of the group can map its peers' memory, else nccl.
//
// FP8 dispatch (parallel.ep_dispatch fp8; nccl only: with nvlink it is bad input, auto picks nccl).
// The FORWARD dispatch quantizes the packed x rows (ops::quantize_rows_fp8, src/ops/fp8_rows.h: e4m3
// codes and a float32 scale per 128 elements, one record per row), the all-to-all-v moves those
// byte rows, and the receiver dequantizes each chunk's rows into its receive rows (activation dtype)
// before the usual reorder into the expert layout. Bytes per token row and direction:
//   activation  D * sizeof(activation)           bf16, D = 7168: 14336
//   fp8         roundup(D + 4 * ceil(D/128), 16)           D = 7168:  7392 (0.52x)
// (D = 768: 1536 vs 800.) The backward dispatch (dL/dO rows) and both combines stay in the
// activation dtype, as in DeepEP's FP8 dispatch: only the forward input rows are quantized. The
// experts see the dequantized x in forward and backward alike (the layout keeps it), so their
// weight gradients are those of the quantized inputs; dL/dx passes through the quantization
// unchanged (straight-through, as DeepSeek-V3's training with DeepEP does). Per element
// |x - x'| <= 2^-4 amax of its 128-block; the layer's outputs stay within a few percent of the
// activation dispatch (tests/model/mpi/test_expert_parallel_fp8.cpp states the bounds).
#pragma once

#include <cstdint>
#include <memory>

#include "src/comm/communicator.h"
#include "src/comm/ep_transport.h"
#include "src/comm/expert_dispatch.h"
#include "src/core/device.h"
#include "src/ops/ops.h"

namespace switchyard {

enum class EpPass : uint8_t { forward, backward };

// How far the receiver-side buffers grow when a step needs more rows than they hold (the exchange's
// layout and the EP layer's expert activations alike): a quarter more, so that growth stops once
// the load settles.
inline int64_t with_headroom(int64_t rows) { return rows + rows / 4 + 1; }

struct EpExchangeOptions {
  DeviceKind device = DeviceKind::cpu;
  int num_experts = 0;          // E, a multiple of the group's size
  int segment_alignment = 1;    // the receiver's grouped-GEMM tile height
  int chunks = 1;               // parallel.a2a_chunks (nccl; clamped to L)
  EpTransport transport = EpTransport::automatic;
  EpDispatch dispatch = EpDispatch::activation;  // parallel.ep_dispatch (fp8: nccl only)
  DType row_dtype = DType::f32; // the rows' type (the activation dtype)
  int64_t row_width = 0;        // D
  int64_t initial_rows = 0;     // layout rows to start with (grown on demand)
};

class EpExchange {
 public:
  // Picks the transport (SY_BAD_INPUT when nvlink is asked for and impossible, or together with
  // fp8 dispatch). Collective.
  static std::unique_ptr<EpExchange> create(std::shared_ptr<Communicator> expert_parallel,
                                            const EpExchangeOptions& options);
  virtual ~EpExchange() = default;

  virtual EpTransport transport() const = 0;  // nccl (MPI on the CPU) or nvlink
  EpDispatch dispatch_format() const { return options_.dispatch; }
  ExpertDispatcher& dispatcher() { return *dispatcher_; }
  int ranks() const { return dispatcher_->ranks(); }
  int local_experts() const { return dispatcher_->local_experts(); }
  int first_expert() const { return dispatcher_->first_expert(); }
  int chunks() const { return dispatcher_->chunks(); }
  const ExpertExchangePlan& plan() const { return dispatcher_->plan(); }
  // int32 [n_c + 1] offsets of chunk c's experts relative to its first layout row.
  Tensor chunk_offsets(int chunk) const { return dispatcher_->chunk_offsets(chunk); }

  // `packed_offsets`: int32 [E+1] of the packed routing, on the device; valid for the whole pass.
  void start_count_exchange(const ExecContext& context, const Tensor& packed_offsets);
  const ExpertExchangePlan& finish_count_exchange(const ExecContext& context);

  // Rows [first_row, first_row + count) of the padded expert layout, [count, D].
  virtual Tensor expert_input(int64_t first_row, int64_t count) const = 0;
  virtual Tensor expert_output(int64_t first_row, int64_t count) const = 0;

  // `packed` [plan().send_rows(), D]: this rank's rows, by global expert.
  virtual void dispatch(const ExecContext& context, EpPass pass, const Tensor& packed) = 0;
  virtual void receive(const ExecContext& context, EpPass pass, int chunk) = 0;
  virtual void send_back(const ExecContext& context, EpPass pass, int chunk, Tensor& packed) = 0;
  // `out` [T, D]: y (forward) or dL/dx (backward), overwritten.
  virtual void combine(const ExecContext& context, EpPass pass, const RoutingResult& routing, const DispatchMap& map,
                       Tensor& packed, Tensor& out) = 0;

 protected:
  explicit EpExchange(const EpExchangeOptions& options) : options_(options) {}
  // Makes the layout hold the plan's rows; the streams are idle or the growth synchronizes them.
  virtual void ensure_layout_capacity(const ExecContext& context) = 0;
  Tensor row_view(void* base, size_t bytes, int64_t first_row, int64_t count) const;
  int64_t row_bytes() const { return options_.row_width * int64_t(dtype_size(options_.row_dtype)); }

  EpExchangeOptions options_;
  std::unique_ptr<ExpertDispatcher> dispatcher_;
  Tensor packed_offsets_;  // of the pass in flight
};

}  // namespace switchyard
