// MoeLayerMemory: where an MoE layer keeps its large buffers -- the expert activations backward
// reads, the backward scratch, the router's jittered input -- and, for the expert-parallel layer,
// its exchange (src/comm/ep_exchange.h: the send and receive rows and the plan).
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

#include "src/comm/ep_exchange.h"
#include "src/core/device.h"

namespace switchyard {

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
  // jittered input): backward scratch and the exchange's rows are not counted.
  size_t activation_bytes() const {
    size_t bytes = 0;
    for (MoeBufferSlot slot : {MoeBufferSlot::permuted, MoeBufferSlot::hidden_pre, MoeBufferSlot::hidden_post,
                               MoeBufferSlot::expert_out, MoeBufferSlot::jittered_input})
      bytes += at(slot).bytes();
    return bytes;
  }

  // The expert-parallel layers' exchange: created by the first MoeEpLayer on this memory, used by
  // every later one (null until then, and always for single-device layers).
  std::shared_ptr<EpExchange> exchange;

 private:
  DeviceKind device_;
  std::array<Buffer, size_t(MoeBufferSlot::count)> buffers_;
};

}  // namespace switchyard
