// MoeLayerMemory: where an MoE layer keeps its large buffers -- the expert activations backward
// reads, the backward scratch, the router's jittered input -- and, for the expert-parallel layer,
// its exchange (src/comm/ep_exchange.h: the send and receive rows and the plan).
//
// The expert-parallel layer keeps its exchanges and expert activations per part
// (parallel.ep_overlap: one part, or two that split the tokens): MoeEpParts, held here so that
// they are shared with the rest.
//
// By default each layer creates its own, so every layer keeps what its backward needs until that
// backward runs. With activation recomputation (TransformerOptions::recompute moe or all), the
// transformer repeats each MoE block's forward right before that block's backward, so no layer
// needs its activations past its own forward-then-backward: the model hands ONE MoeLayerMemory to
// all its MoE blocks, and their buffers become one set, the size of one layer's, instead of one per
// layer. The routing results (expert ids, gates, counts, losses, logits: small next to the expert
// rows) stay per layer, since the step's statistics read them after backward.
//
// The layers that share one memory must run their forward and backward one layer at a time, each
// backward right after its own forward (which is what recomputation does), on one stream.
// Buffers grow only where no queued work can still use them: at construction, or where the layer
// has synchronized its streams first (the EP layer's receiver-side growth); layers sharing a memory
// have one configuration, so the first layer's sizes fit the others.
#pragma once

#include <array>
#include <cstddef>
#include <memory>
#include <vector>

#include "src/comm/ep_exchange.h"
#include "src/comm/replica_exchange.h"
#include "src/core/device.h"

namespace switchyard {

// One part of an expert-parallel layer's batch: tokens [first_token, first_token + tokens) of the
// last forward with their own exchange and expert activations (src/model/moe_ep_layer.h).
struct MoeEpPart {
  int64_t max_tokens = 0;
  int64_t first_token = 0, tokens = 0;
  std::unique_ptr<EpExchange> exchange;
  // The experts' activations over the part's padded layout (grown on demand).
  int64_t hidden_capacity = 0, backward_hidden_capacity = 0;
  Buffer hidden_pre, hidden_post, grad_hidden_pre;
  // Two parts: the part's own routing (its kept choices, by expert) and row map, over
  // routing_ints (ids, slots, choice rows, row tokens: max_tokens * K each; counts, offsets,
  // scalars). One part uses the router's.
  Buffer routing_ints;
  RoutingResult routing;
  DispatchMap map;
};

// Hot-expert replication (src/model/moe_ep_layer.h, "Hot-expert replication"): the collectives
// and this rank's replica buffers. Empty (no exchange) without replication.
struct MoeEpReplicas {
  std::unique_ptr<ReplicaExchange> exchange;
  // The part's routing by virtual expert over routing_ints: the kept choices' virtual ids [max_tokens,
  // K], then the step's tables (expert map [E], counts [E'], offsets [E' + 1]) and the slots'
  // layout offsets [M + 1]; host_tables stages the tables for their upload.
  Buffer routing_ints;
  std::vector<int32_t> host_tables;
  RoutingResult routing;
  Tensor slot_offsets;  // int32 [hosted + 1]: the hosted slots' rows from the first slot's row
  // Grown to the slots in use: their w1 [n, D, F or 2F] then w2 [n, F, D] (activation dtype), and
  // their weight gradients in the chain dtype (MoeEpLayer: f64 on the CPU, the gradient dtype on CUDA).
  int weight_slots = 0, gradient_slots = 0;
  Buffer weights, gradients;
  // The local experts' gradients in the chain dtype when it is wider than the gradient dtype (CPU f32).
  Buffer owner_gradients;
};

// An expert-parallel layer's parts and its replicas.
struct MoeEpParts {
  std::vector<MoeEpPart> parts;  // built once: the exchanges keep pointers to a part's routing
  MoeEpReplicas replicas;
  size_t activation_bytes() const {  // H and A of every part
    size_t bytes = 0;
    for (const MoeEpPart& part : parts) bytes += part.hidden_pre.bytes() + part.hidden_post.bytes();
    return bytes;
  }
};

enum class MoeBufferSlot : uint8_t {
  permuted,          // MoeLayer: x rows in the expert layout [R, D]
  hidden_pre,        // MoeLayer / MoeEpLayer: H = X W1 [R, F or 2F]
  hidden_post,       // A = act(H) [R, F]
  expert_out,        // MoeLayer: O = A W2 [R, D]
  grad_rows,         // MoeLayer backward scratch [R, D]
  grad_hidden_pre,   // backward scratch [R, F or 2F]
  grad_hidden_post,  // MoeLayer backward scratch (unfused activation) [R, F]
  jittered_input,    // MoeRouter: x * u under jitter [T, D]
  jitter_grad_input, // MoeRouter backward scratch under jitter [T, D]
  count
};

class MoeLayerMemory {
 public:
  explicit MoeLayerMemory(DeviceKind device) : device_(device) {}
  MoeLayerMemory(const MoeLayerMemory&) = delete;
  MoeLayerMemory& operator=(const MoeLayerMemory&) = delete;

  // The slot's buffer, reallocated to `bytes` first when it is shorter (its contents are then lost,
  // and the caller must know that no queued work still uses the old one).
  Buffer& reserve(MoeBufferSlot slot, size_t bytes) {
    Buffer& buffer = buffers_[size_t(slot)];
    if (buffer.bytes() < bytes) {
      buffer.reset();
      buffer = Buffer(device_, bytes);
    }
    return buffer;
  }
  Buffer& at(MoeBufferSlot slot) { return buffers_[size_t(slot)]; }
  const Buffer& at(MoeBufferSlot slot) const { return buffers_[size_t(slot)]; }
  DeviceKind device() const { return device_; }
  // Bytes of the forward activations that backward reads (permuted rows, H, A, expert outputs, the
  // jittered input; the EP parts' H and A): backward scratch and the exchange's rows are not counted.
  size_t activation_bytes() const {
    size_t bytes = ep_parts ? ep_parts->activation_bytes() : 0;
    for (MoeBufferSlot slot : {MoeBufferSlot::permuted, MoeBufferSlot::hidden_pre, MoeBufferSlot::hidden_post,
                               MoeBufferSlot::expert_out, MoeBufferSlot::jittered_input})
      bytes += at(slot).bytes();
    return bytes;
  }

  // The expert-parallel layers' parts (exchanges and expert activations): created by the first
  // MoeEpLayer on this memory, used by every later one (null until then, and always for
  // single-device layers).
  std::shared_ptr<MoeEpParts> ep_parts;

 private:
  DeviceKind device_;
  std::array<Buffer, size_t(MoeBufferSlot::count)> buffers_;
};

}  // namespace switchyard
