// EpExchange: how the expert-parallel MoE layer's token rows reach the ranks that hold their
// experts and how the results come back -- dispatch and combine behind one interface, with the
// transport chosen inside (as DeepEP's buffer does), never by the layer.
//
// The group has P ranks; rank p holds the global experts [p*L, (p+1)*L), L = E/P. Each rank routes
// its own tokens with segment_alignment 1 (src/comm/expert_dispatch.h). A pass runs:
//
//   start_forward(x, routing, map)          after routing: this rank's rows leave for their experts'
//                                           ranks as far as the plan needs (counts, one host sync);
//                                           returns the plan of THIS rank's padded expert layout
//                                           (expert_input / expert_output rows, grown as needed)
//   dispatch(forward)                       the rows go to the expert layouts (x rows into
//                                           expert_input)
//   for each chunk c:
//     receive(pass, c)                      c's rows are in the layout, padding rows zero
//     (the layer runs the expert FFN, or its backward, on c's rows of the layout; its results go
//      to expert_output: O forward, dL/dX backward)
//     send_back(pass, c)                    c's results start back toward their tokens
//   combine(forward, y)                     y[t] = sum_j gate[t,j] * O(t,j)
//   start_backward(grad_y, grad_gates)      dL/dgates [T, K] of this rank's routing; the dL/dO
//                                           rows are readied
//   dispatch(backward), the chunks as above (dL/dO into expert_output, dL/dX back)
//   combine(backward, grad_x)               dL/dx[t] = sum_j dL/dX(t,j)
// Backward reuses its forward's plan (no count exchange). Every call is collective over the group
// in this order; everything runs on context.stream (NCCL work on the communicators' streams,
// ordered by events). `x`, `routing` and `map` must stay valid until the backward's combine.
//
// Transports (parallel.ep_transport, parallel.ranks_per_node):
//   nccl          packed all-to-all-v into a receive buffer, reordered into the padded layout on
//                 the receiver, chunked (a2a_chunks: chunk c's GEMMs overlap chunk c+1's
//                 transfer); MPI for CPU ranks;
//   nvlink        ranks of one node: the padded layout lives in peer-mapped memory; rows are
//                 written straight into the owners' layouts and the results read straight back,
//                 fused with the per-token sum (src/comm/nvlink_exchange.h); one chunk;
//   hierarchical  ranks on several nodes (src/comm/ep_exchange_hierarchical.cpp): a token's row
//                 crosses the network once per destination node, then fans out inside the node
//                 (nccl or nvlink as above); the node's partial sums cross back once;
//   auto          nvlink where every rank of the group can map its peers' memory, else nccl.
//
// FP8 dispatch (parallel.ep_dispatch fp8; the nccl transport only: with nvlink it is bad input,
// auto picks nccl; hierarchical: the node leg, when it is nccl).
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
#include <vector>

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
  int64_t max_send_rows = 0;    // the most rows one rank's routing keeps (its packed send layout)
  int64_t initial_rows = 0;     // layout rows to start with (grown on demand)
  // Ranks on several nodes: the group's ranks of this rank's node (ranks g*R .. g*R + R-1 of the
  // group, R = node_group's size) and the ranks at the same place on every node (rail_group).
  // Both null: one node.
  std::shared_ptr<Communicator> node_group, rail_group;
};

// What the last forward moved, in rows (from the host plans; no device read).
struct EpExchangeStats {
  int64_t sent_rows = 0;      // choices of this rank's tokens that left for an expert (kept choices)
  int64_t received_rows = 0;  // rows its local experts received from all ranks
  int64_t expert_rows = 0;    // the padded grouped-GEMM layout
  int64_t network_rows = 0;   // hierarchical: rows this rank sent to other nodes' relays (one per
                              // token and other destination node); 0 otherwise
};

class EpExchange {
 public:
  // Picks the transport (SY_BAD_INPUT when nvlink is asked for and impossible, or together with
  // fp8 dispatch). Collective.
  static std::unique_ptr<EpExchange> create(std::shared_ptr<Communicator> expert_parallel,
                                            const EpExchangeOptions& options);
  virtual ~EpExchange() = default;

  virtual EpTransport transport() const = 0;  // of the rows inside a node
  virtual bool hierarchical() const { return false; }
  virtual int ranks() const = 0;
  virtual int local_experts() const = 0;
  virtual int first_expert() const = 0;
  virtual int chunks() const = 0;
  virtual const ExpertExchangePlan& plan() const = 0;  // this rank's expert layout
  virtual EpDispatch dispatch_format() const = 0;
  // int32 [n_c + 1] offsets of chunk c's experts relative to its first layout row.
  virtual Tensor chunk_offsets(int chunk) const = 0;
  virtual EpExchangeStats stats() const = 0;
  // Rows the last forward sent from this rank to each global expert [E] (the one-level exchange's
  // send counts; empty for the hierarchical one, whose first leg is by node).
  virtual std::vector<int64_t> sent_rows_per_expert() const { return {}; }
  // Waits until every communicator stream is idle (before buffers that they may use are freed).
  virtual void synchronize_communicators() = 0;

  // Rows [first_row, first_row + count) of the padded expert layout, [count, D].
  virtual Tensor expert_input(int64_t first_row, int64_t count) const = 0;
  virtual Tensor expert_output(int64_t first_row, int64_t count) const = 0;

  // x [T, D]; routing (segment_alignment 1) with `params`; `map` the router's DispatchMap with
  // room for every kept choice (permute fills it).
  virtual const ExpertExchangePlan& start_forward(const ExecContext& context, const Tensor& x,
                                                  const RoutingResult& routing, const RoutingParams& params,
                                                  const DispatchMap& map) = 0;
  virtual void dispatch(const ExecContext& context, EpPass pass) = 0;
  virtual void receive(const ExecContext& context, EpPass pass, int chunk) = 0;
  virtual void send_back(const ExecContext& context, EpPass pass, int chunk) = 0;
  // `out` [T, D]: y (forward) or dL/dx (backward), overwritten.
  virtual void combine(const ExecContext& context, EpPass pass, Tensor& out) = 0;
  // grad_y [T, D]; grad_gates [T, K] of the forward's routing, overwritten.
  virtual void start_backward(const ExecContext& context, const Tensor& grad_y, Tensor& grad_gates) = 0;
};

}  // namespace switchyard
