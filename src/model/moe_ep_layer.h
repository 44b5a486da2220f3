// The expert-parallel MoE layer: MoeLayer's math (src/model/moe_layer.h) with the experts sharded
// over the expert_parallel communicator (design notes §3, §4; src/comm/expert_dispatch.h).
//
// Sharding. parallel.ep_size = P ranks hold disjoint shards: rank p holds the global experts
// [p*E/P, (p+1)*E/P), L = E/P local experts, with w1 [L, D, F or 2F] and w2 [L, F, D]. The router
// Wr [D, E] is replicated. Each rank routes ITS OWN tokens over all E experts with the ordinary
// routing (capacity from its own tokens, as GShard does per group), so for every rank's tokens the
// layer computes exactly what one rank holding all E experts computes on those tokens: the same y,
// grad_x, grad_router and losses, up to floating-point summation order. The local experts'
// weight gradients sum the contributions of all P ranks' tokens routed to them (what the P
// single-rank layers would produce, summed); see src/comm/gradient_sync.h for the data-parallel step.
//
// Forward, x [T, D]:
//   x_r, logits = x_r Wr, route(logits)     as MoeLayer (jitter, complexity, capacity, losses and
//                                            every routing option: the same MoeRouter; the global-
//                                            batch loss's reducer sums over all ranks, as routing
//                                            over all E experts happens on each)
//   X_s    = permute(x)                      routing with segment_alignment 1: packed by global
//                                            expert, so rows for rank p are contiguous, no padding
//   count exchange                           device counts -> all-to-all -> one host copy
//   for each chunk c (parallel.a2a_chunks, C <= L; all dispatches enqueued first):
//     dispatch(c)                            all_to_all_v of the chunk's rows (activation dtype, or
//                                            e4m3 + scales with parallel.ep_dispatch fp8, dequantized
//                                            on arrival: src/comm/ep_exchange.h)
//     X_p    = to_expert_layout(c)           [source][local expert] -> padded layout by expert
//     H = X_p W1_l, A = act(H), O = A W2_l   grouped GEMMs over the chunk's experts
//     from_expert_layout(c), combine(c)      rows back to their source ranks
//   y[t]   = sum_j gate[t, j] * O[row(t, j)]   unpermute_combine on the source rank
// The router is a MoeRouter (src/model/moe_router.h), the same code as MoeLayer's; the rows move
// through an EpExchange (src/comm/ep_exchange.h), which picks the transport (parallel.ep_transport:
// NCCL all-to-all-v, or NVLink peer memory within a node) inside: this layer never branches on it.
// Backward mirrors it with the forward's exchange plan (no second count exchange): the combine's
// backward gives dL/dO rows and dL/dgates locally; the dL/dO rows are dispatched, the expert
// backward runs per chunk (dW2_l, dA, act', dW1_l, dX_p), the dL/dX rows are combined back and
// permute_backward sums them per token. Router backward (gates -> logits -> Wr, x) is local and
// is enqueued while the gradient rows are in flight. Gradients are overwritten (MoeGradients::
// accumulate is refused; ExpertParallelMoeBlock accumulates through a scratch).
// With fp8 dispatch the router still sees x itself; the experts see x' = dequantize(quantize(x))
// in forward and backward (dW1 reads the layout that holds x'), and dL/dx' is passed on as dL/dx
// (straight-through), so the layer computes exactly the layer on x' except for the router's
// input, within a few percent of the activation dispatch.
//
// Two-part overlap (parallel.ep_overlap two_part; src/model/moe_ep_layer_parts.cpp). The router
// routes all T tokens once (capacity, drops and losses exactly as above); the tokens are then split
// into parts [0, T0) and [T0, T), T0 = T / 2, each with its own EpExchange and expert activations.
// A part's routing is the full routing's rows with the choices that were not kept made empty
// (ops::ep_kept_choices), laid out by expert (ops::ep_choice_layout: no capacity, nothing more to
// drop), and the full routing's gate rows. The order, per pass:
//   start both parts (two count exchanges, two host syncs), dispatch both,
//   part 0's chunks (receive, experts, send back), part 1's chunks, combine both into y's rows
// (backward: start_backward of both into their rows of dL/dgates, dispatch both, the router's
// backward, the chunks part by part, combine both into grad_x's rows). On the GPU the exchanges'
// NCCL work queues on the communicator's stream, ordered by events: part 1's rows travel while
// part 0's expert GEMMs run, and part 0's results travel back while part 1's run. Part 0 writes
// the local experts' weight gradients, part 1's are added chunk by chunk through a scratch the
// size of one chunk's experts. A part may hold no token (T = 1) or no kept choice: it still takes
// part in every collective, with nothing to send. Results equal `none` up to summation order.
//
// Hot-expert replication (parallel.max_replicas_per_rank M > 0; src/model/moe_ep_replication.cpp,
// src/comm/replica_exchange.h). A skewed router makes the busiest rank every step's critical path;
// with replication some of its rows are computed on idle ranks each step, with copies of the weights:
//   after routing  every rank's rows per global expert are all-gathered (one more host sync) and
//                  every rank computes the same plan (src/comm/replication_plan.h): which hot experts
//                  get a replica on which rank, and which SOURCE ranks' rows (a prefix of the
//                  expert's sources, in source order) go to the replica;
//   the exchange   runs over P*(L+M) virtual experts (a rank's L experts, then its M replica slots):
//                  the routing's kept choices are renamed to virtual experts (ops::ep_kept_choices,
//                  then ops::ep_map_choice_ids with this rank's table; slots unchanged), so each
//                  rank's packed rows are only regrouped. The routing that the gates, losses and
//                  statistics come from is untouched;
//   weights        each replica's w1 and w2 go owner -> host before the experts run; the host runs
//                  its experts with the layer's weights and its slots with the copies;
//   backward       every rank first runs its slots' backward (their weight gradients from 0 into a
//                  buffer per slot), the partial gradients go host -> owner, then the owner runs its
//                  experts' backward continuing those sums over its own rows
//                  (ops::grouped_gemm_weight_grad with accumulate). Every collective comes in this
//                  order on every rank, so a rank with nothing to send still takes part.
// Bit-identical on the CPU: without replication an expert's rows are summed in source order; the
// replica's sources come first, so host-then-owner is that very sum. The chain is kept in f64 (the
// CPU reference's accumulator) and rounded once to the gradient dtype, so y, grad_x, grad_router
// and the local weight gradients equal those without replication bit for bit, f32 or f64 (every
// output row is the same per-row arithmetic on either rank). On CUDA the chain is fp32 and the
// continuing GEMM takes the cuBLAS loop: equal up to fp32 summation order.
// Limits (SY_BAD_INPUT): one part (ep_overlap none), one chunk (a2a_chunks 1), the one-level
// exchange. Costs per layer and forward: the count all-gather and its host sync, each replica's
// weights there and gradients back (bytes: src/comm/replica_exchange.h); memory: M slots of weights
// (activation dtype) and weight gradients (chain dtype), the virtual routing's ints, and on CPU f32
// an f64 copy of the local experts' weight gradients.
//
// Dtypes as MoeLayer: CPU f32 or f64 throughout (MpiCommunicator, host buffers); CUDA bf16/f16
// activations, fp32 logits / gates / losses / weight gradients (NcclCommunicator, device buffers).
// compute_mode dense is not supported here (SY_BAD_INPUT): it is a single-device baseline.
//
// Memory. Sender-side buffers are sized once for max_tokens. The receiver's buffers depend on
// what the other ranks route here, which only the count exchange reveals: they start at the
// balanced size and grow (by 25% headroom, after the streams are idle -- the exchange has just
// synchronized them) when a step needs more, so steady state does no allocation. Row buffers are
// reused across phases: the send buffer holds permuted x, then the returned expert outputs
// (needed by backward for the gate gradients); the receive buffer holds arriving rows, then the
// outgoing results, chunk by chunk; in backward the expert-output buffer holds the row gradients
// and the activation buffer A holds dL/dA once dW2 has read A. Two parts hold all of this twice,
// each sized for its half of the tokens, plus part 1's gradient scratch (one chunk's experts).
// The parts (exchanges, expert activations) live in the layer's MoeLayerMemory
// (src/model/moe_memory.h): its own, unless the constructor is given one that the model's other MoE
// layers share (activation recomputation: every layer's forward is repeated right before its
// backward, so one set of parts serves them all).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "src/comm/ep_exchange.h"
#include "src/core/device.h"
#include "src/model/moe_memory.h"
#include "src/model/moe_router.h"
#include "src/ops/ops.h"

namespace switchyard {

// What the last forward's exchange moved, in rows (from the host plans; no device read).
using MoeExchangeStats = EpExchangeStats;

class MoeEpLayer {
 public:
  // `expert_parallel`: the group sharing the experts (ParallelGroups::expert_parallel), on `device`.
  // config.num_experts must be a multiple of its size. `exchange`: parallel.a2a_chunks (>= 1,
  // clamped to the local expert count), parallel.ep_transport, parallel.ep_dispatch
  // (src/comm/ep_exchange.h), parallel.ep_overlap and parallel.ep_sm_budget. Collective.
  // `memory`: see the top comment (null: the layer's own); a shared one must have been used only by
  // layers of this configuration and group.
  MoeEpLayer(const MoeLayerConfig& config, std::shared_ptr<Communicator> expert_parallel, DeviceKind device,
             DType activation_dtype, int64_t max_tokens, const EpLayerOptions& exchange = {},
             std::shared_ptr<MoeLayerMemory> memory = nullptr);
  MoeEpLayer(const MoeEpLayer&) = delete;
  MoeEpLayer& operator=(const MoeEpLayer&) = delete;

  // y [T, D] = MoE(x [T, D]), 1 <= T <= max_tokens (T may differ between ranks). weights: router
  // [D, E], w1 [L, D, F or 2F], w2 [L, F, D] (this rank's experts). Collective over the group.
  MoeLosses forward(const ExecContext& context, const Tensor& x, const MoeWeights& weights,
                    const MoeForwardArgs& args, Tensor& y);
  // Gradients as MoeLayer::backward; gradients.w1 / w2 are this rank's experts. Collective.
  void backward(const ExecContext& context, const Tensor& grad_y, const MoeWeights& weights, float aux_grad_scale,
                float z_grad_scale, Tensor& grad_x, MoeGradients& gradients);

  const MoeLayerConfig& config() const { return config_; }
  DeviceKind device() const { return device_; }
  DType activation_dtype() const { return activation_dtype_; }
  DType float_dtype() const { return router_.float_dtype(); }
  DType gradient_dtype() const { return gradient_dtype_; }
  int64_t max_tokens() const { return max_tokens_; }
  const MoeLayerMemory& memory() const { return *memory_; }
  int ep_size() const { return exchange().ranks(); }
  int local_experts() const { return local_experts_; }
  int first_expert() const { return first_expert_; }
  int chunks() const { return exchange().chunks(); }
  // Hot-expert replication is on (max_replicas_per_rank > 0 over more than one rank), and what the
  // last forward's plan did (zeros when off; the same on every rank of the group).
  bool replicates() const { return replicates_; }
  ReplicationStats replication_stats() const { return replication_stats_; }
  // The transport in use: nccl (MPI on the CPU) or nvlink.
  EpTransport transport() const { return exchange().transport(); }
  // True when the group spans nodes and the exchange is hierarchical (src/comm/ep_exchange.h).
  bool hierarchical() const { return exchange().hierarchical(); }
  // What the forward dispatch's rows cross as: the activation dtype or fp8.
  EpDispatch dispatch_format() const { return exchange().dispatch_format(); }
  EpOverlap overlap() const { return parts_.size() > 1 ? EpOverlap::two_part : EpOverlap::none; }

  const RoutingResult& routing() const { return router_.routing(); }
  const Tensor& logits() const { return router_.logits(); }
  MoeLosses read_losses(const ExecContext& context) const { return router_.read_losses(context); }
  // padded_rows here is the packed send layout: the rows this rank sent.
  MoeRoutingStats read_routing_stats(const ExecContext& context) const { return router_.read_routing_stats(context); }
  // Summed over the parts.
  MoeExchangeStats exchange_stats() const;
  // Rows the last forward sent to each global expert [E]; empty with the hierarchical exchange.
  std::vector<int64_t> sent_rows_per_expert() const;

  // Reports stage boundaries to `observer` from now on (nullptr: stop); not owned. Forward: the
  // router's ("jitter", "router GEMM", "routing"), then "exchange plan" (the count exchange and
  // the permutation by expert: a host sync per part), "dispatch", per part and chunk "receive",
  // "experts", "send back", then "combine". Backward: "combine backward", "dispatch", the router's
  // ("routing backward", "router weight grad"), per part and chunk "receive", "experts", "send
  // back", then "permute backward" (the returned rows to tokens) and "router input grad". Times are
  // the compute stream's: an exchange on another stream shows as the wait in "receive".
  void set_stage_observer(MoeStageObserver* observer) { observer_ = observer; }

 private:
  template <typename Work>
  void run_stage(const ExecContext& context, const char* stage, Work&& work) {
    run_moe_stage(observer_, context, stage, work);
  }
  using Part = MoeEpPart;  // src/model/moe_memory.h

  const EpExchange& exchange() const { return *parts_.front().exchange; }
  void check_weights(const MoeWeights& weights, DType dtype, const char* what) const;

  // ---- The parts (src/model/moe_ep_layer_parts.cpp) ----
  // One or two parts, each with an exchange over `expert_parallel`. Collective.
  void create_parts(const std::shared_ptr<Communicator>& expert_parallel, const EpLayerOptions& exchange);
  // Splits the forward's tokens over the parts and starts each part's exchange (its count
  // exchange: a host sync each).
  void start_parts(const ExecContext& context, const Tensor& x, const RoutingResult& routing);
  // Two parts: the part's routing over its rows of `routing`.
  void build_part_routing(const ExecContext& context, const RoutingResult& routing, Part& part);
  // Grows a part's expert activations for its current plan (streams idle: right after the exchange).
  void ensure_hidden_capacity(const ExecContext& context, Part& part, bool with_backward);
  void experts_forward(const ExecContext& context, Part& part, int chunk, const MoeWeights& weights);
  // `accumulate` (part 1 of two): add the gradients of the chunk's experts to `gradients` instead of
  // overwriting (in place: the weight-gradient GEMMs continue the sums).
  void experts_backward(const ExecContext& context, Part& part, int chunk, const MoeWeights& weights,
                        MoeGradients& gradients, bool accumulate);
  // The experts [n] of rows [row_begin, row_begin + rows) of the part's layout: `offsets` int32 [n + 1]
  // from row_begin, w1 [n, D, F or 2F], w2 [n, F, D].
  void expert_rows_forward(const ExecContext& context, Part& part, int64_t row_begin, int64_t rows,
                           const Tensor& offsets, const Tensor& w1, const Tensor& w2);
  // Their backward: dL/dX into the layout's output rows; weight gradients [n, ...] written, or with
  // `continue_sums` added to what they hold by the weight-gradient GEMMs themselves.
  void expert_rows_backward(const ExecContext& context, Part& part, int64_t row_begin, int64_t rows,
                            const Tensor& offsets, const Tensor& w1, const Tensor& w2, Tensor& grad_w1,
                            Tensor& grad_w2, bool continue_sums);

  // ---- Hot-expert replication (src/model/moe_ep_replication.cpp) ----
  void create_replicas(const std::shared_ptr<Communicator>& expert_parallel, const EpLayerOptions& exchange);
  // The plan, the virtual routing, the part's exchange started over it, the replicas' weights sent.
  void start_replicated(const ExecContext& context, const Tensor& x, const RoutingResult& routing,
                        const MoeWeights& weights);
  void build_replica_routing(const ExecContext& context, const RoutingResult& routing);
  // The slots' layout offsets (after the exchange's plan) and buffers for the slots in use.
  void prepare_replica_slots(const ExecContext& context);
  void replicated_experts_forward(const ExecContext& context, const MoeWeights& weights);
  void replicated_experts_backward(const ExecContext& context, const MoeWeights& weights, MoeGradients& gradients);
  // The first `slots` replica slots' w1 (or, `second`, w2) [slots, ...] in a buffer of per-slot
  // matrices with room for `capacity` slots: the replicas' weights or their gradients.
  Tensor slot_matrices(const Buffer& buffer, int capacity, DType dtype, bool second, int slots) const;
  // The local experts' gradients in the chain dtype: the gradients themselves, or the f64 scratch.
  Tensor owner_chain(const Tensor& gradient, bool second);
  Tensor rows(const Buffer& buffer, int64_t first_row, int64_t count, int64_t columns) const;
  // Rows [first, first + count) of a row-major [T, C] tensor (contiguous: a view).
  static Tensor token_rows(const Tensor& tensor, int64_t first, int64_t count);
  Tensor expert_slice(const Tensor& tensor, int first, int count) const;

  MoeLayerConfig config_;
  DeviceKind device_;
  DType activation_dtype_, gradient_dtype_;
  int64_t max_tokens_ = 0, max_send_rows_ = 0;
  std::shared_ptr<MoeLayerMemory> memory_;  // the parts live in memory_->ep_parts
  MoeRouter router_;  // routing with segment alignment 1: the packed send layout
  std::vector<Part>& parts_;  // memory_->ep_parts->parts
  MoeEpParts& ep_parts_;      // memory_->ep_parts

  int local_experts_ = 1, first_expert_ = 0;  // this rank's experts (not the exchange's virtual ones)
  bool replicates_ = false;
  DType chain_dtype_ = DType::f32;  // replication: the weight-gradient sums across ranks (see the top)
  ReplicationStats replication_stats_;
  std::vector<int64_t> replicated_sent_rows_;  // replication: rows the last forward sent per global expert

  MoeStageObserver* observer_ = nullptr;

  // What the last forward left for backward.
  bool has_forward_ = false;
  int64_t tokens_ = 0;
};

}  // namespace switchyard
