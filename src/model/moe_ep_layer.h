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
//   x_r, logits = x_r Wr, route(logits)     as MoeLayer (jitter, complexity, capacity, losses)
//   X_s    = permute(x)                      routing with segment_alignment 1: packed by global
//                                            expert, so rows for rank p are contiguous, no padding
//   count exchange                           device counts -> all-to-all -> one host copy
//   for each chunk c (parallel.a2a_chunks, C <= L; all dispatches enqueued first):
//     dispatch(c)                            all_to_all_v of the chunk's rows (activation dtype)
//     X_p    = to_expert_layout(c)           [source][local expert] -> padded layout by expert
//     H = X_p W1_l, A = act(H), O = A W2_l   grouped GEMMs over the chunk's experts
//     from_expert_layout(c), combine(c)      rows back to their source ranks
//   y[t]   = sum_j gate[t, j] * O[row(t, j)]   unpermute_combine on the source rank
// With the nvlink transport (parallel.ep_transport; src/comm/nvlink_exchange.h) the padded expert
// layout's input and output rows live in peer-mapped memory: the count exchange gathers every
// rank's counts through it, the sender's packed rows are written straight into the owners'
// layouts (no receive buffer, no reorder, one chunk), and y is summed from the owners' output
// rows directly (ep_pull_combine), which are kept in the send buffer for backward; backward
// writes the dL/dO rows into the owners' output layouts and sums dL/dx from their dL/dX rows.
// Backward mirrors it with the forward's exchange plan (no second count exchange): the combine's
// backward gives dL/dO rows and dL/dgates locally; the dL/dO rows are dispatched, the expert
// backward runs per chunk (dW2_l, dA, act', dW1_l, dX_p), the dL/dX rows are combined back and
// permute_backward sums them per token. Router backward (gates -> logits -> Wr, x) is local and
// is enqueued while the gradient rows are in flight. Gradients are overwritten, not accumulated.
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
// and the activation buffer A holds dL/dA once dW2 has read A.
#pragma once

#include <cstdint>
#include <memory>

#include "src/comm/expert_dispatch.h"
#include "src/comm/nvlink_exchange.h"
#include "src/ops/ops.h"
#include "src/core/device.h"
#include "src/model/moe_layer.h"

namespace switchyard {

// What the last forward's exchange moved, in rows (from the host plan; no device read).
struct MoeExchangeStats {
  int64_t sent_rows = 0;      // rows this rank sent (kept choices of its tokens)
  int64_t received_rows = 0;  // rows its local experts received from all ranks
  int64_t expert_rows = 0;    // the padded grouped-GEMM layout
};

class MoeEpLayer {
 public:
  // `expert_parallel`: the group sharing the experts (ParallelGroups::expert_parallel), on `device`.
  // config.num_experts must be a multiple of its size. a2a_chunks >= 1 (clamped to the local
  // expert count).
  // `transport` (parallel.ep_transport): nccl, nvlink (CUDA ranks of one node: rows written into
  // the peers' expert layouts directly, src/comm/nvlink_exchange.h; SY_BAD_INPUT where that is not
  // possible), or automatic (nvlink where possible, else nccl; MPI on the CPU). Collective.
  MoeEpLayer(const MoeLayerConfig& config, std::shared_ptr<Communicator> expert_parallel, DeviceKind device,
             DType activation_dtype, int64_t max_tokens, int a2a_chunks = 1,
             EpTransport transport = EpTransport::automatic);
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
  DType float_dtype() const { return float_dtype_; }
  DType gradient_dtype() const { return gradient_dtype_; }
  int64_t max_tokens() const { return max_tokens_; }
  int ep_size() const { return dispatcher_->ranks(); }
  int local_experts() const { return dispatcher_->local_experts(); }
  int first_expert() const { return dispatcher_->first_expert(); }
  int chunks() const { return dispatcher_->chunks(); }
  // The transport in use: nccl (MPI on the CPU) or nvlink.
  EpTransport transport() const { return peers_ ? EpTransport::nvlink : EpTransport::nccl; }

  const RoutingResult& routing() const { return routing_; }
  const Tensor& logits() const { return logits_; }
  MoeLosses read_losses(const ExecContext& context) const;
  MoeRoutingStats read_routing_stats(const ExecContext& context) const;
  MoeExchangeStats exchange_stats() const;
  ExpertDispatcher& dispatcher() { return *dispatcher_; }

 private:
  void check_weights(const MoeWeights& weights, DType dtype, const char* what) const;
  // Grows the receiver-side buffers for the current plan (streams idle: right after the exchange).
  void ensure_receive_capacity(const ExecContext& context, bool with_backward);
  void experts_forward(const ExecContext& context, int chunk, const MoeWeights& weights);
  void experts_backward(const ExecContext& context, int chunk, const MoeWeights& weights, MoeGradients& gradients);
  Tensor rows(const Buffer& buffer, DType dtype, int64_t first_row, int64_t count, int64_t columns) const;
  Tensor rows(void* base, size_t bytes, DType dtype, int64_t first_row, int64_t count, int64_t columns) const;
  // The padded expert layout's input and output rows: local buffers, or (nvlink) peer-mapped regions.
  Tensor expert_rows(bool output, int64_t first_row, int64_t count) const;
  // nvlink: the collective growth of the peer-mapped regions to the largest layout of any rank.
  void ensure_peer_capacity();
  Tensor expert_slice(const Tensor& tensor, int first, int count) const;

  MoeLayerConfig config_;
  DeviceKind device_;
  DType activation_dtype_, float_dtype_, gradient_dtype_;
  int64_t max_tokens_ = 0, max_send_rows_ = 0;
  std::unique_ptr<ExpertDispatcher> dispatcher_;
  std::unique_ptr<NvlinkPeerMemory> peers_;  // the nvlink transport, or null
  int64_t peer_capacity_rows_ = 0;

  // Sender side (sized for max_tokens).
  Buffer jittered_input_, logits_buffer_, send_rows_, grad_send_rows_, grad_gates_, grad_logits_,
      grad_logits_compute_, router_grad_input_, jitter_grad_input_;
  RoutingBuffers routing_buffers_;
  // Receiver side (grown on demand): packed rows, then the padded expert layout.
  int64_t receive_capacity_ = 0, expert_capacity_ = 0, backward_expert_capacity_ = 0;
  Buffer receive_rows_, expert_input_, hidden_pre_, hidden_post_, expert_output_, grad_hidden_pre_;

  // What the last forward left for backward.
  bool has_forward_ = false, jittered_ = false;
  uint64_t step_ = 0;
  int64_t tokens_ = 0;
  RoutingParams params_;  // segment_alignment 1 (the packed send layout)
  RoutingResult routing_;
  DispatchMap map_;       // row_tokens over the sent rows only
  Tensor x_, router_input_, logits_;
};

}  // namespace switchyard
