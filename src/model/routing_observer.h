// A tap on the MoE layers' routing decisions, for statistics and analysis.
//
// Model code calls notify_routing() once per MoE layer forward, right after the layer's work is
// enqueued, with the layer's routing result and router logits (device tensors, valid until that
// layer's next forward). Whoever wants to see them installs an observer for a scope on the calling
// thread:
//
//   RouterStatsRecorder recorder(...);           // src/train/router_stats.h
//   RoutingObserverScope scope(&recorder);       // every MoE forward on this thread now reports to it
//   model.forward_loss(...);
//
// With no observer installed, notify_routing() is a thread-local pointer test: the hot path pays
// nothing. Observers must not synchronize the stream unless they are analysis tools that accept it
// (RouterStatsRecorder only enqueues device work; SpecializationCollector copies to the host).
// The pointer is thread-local so a model on another thread (or a test) never reports into a scope
// it did not open; scopes nest (the inner one wins until it closes).
#pragma once

#include "src/ops/ops.h"

namespace switchyard {

// What one MoE layer's forward routed.
struct RoutingEvent {
  int moe_layer = 0;                       // position among the model's MoE blocks (0-based, block order)
  bool training = false;                   // a training forward (train capacity factor, jitter) or not
  const RoutingResult* routing = nullptr;  // expert ids, gates, slots, counts, scalars, losses
  const Tensor* logits = nullptr;          // router logits [T, E], the routing's float type
};

class RoutingObserver {
 public:
  virtual ~RoutingObserver() = default;
  // Called on the thread that runs the forward, after the layer's work is enqueued on context.stream.
  virtual void on_routing(const ExecContext& context, const RoutingEvent& event) = 0;
};

// Installs `observer` for the lifetime of the scope on this thread (nullptr: none).
class RoutingObserverScope {
 public:
  explicit RoutingObserverScope(RoutingObserver* observer);
  ~RoutingObserverScope();
  RoutingObserverScope(const RoutingObserverScope&) = delete;
  RoutingObserverScope& operator=(const RoutingObserverScope&) = delete;

 private:
  RoutingObserver* previous_;
};

// The observer of this thread's innermost scope, or nullptr.
RoutingObserver* current_routing_observer();

// For model code: reports one MoE layer's forward to the current observer, if any.
void notify_routing(const ExecContext& context, int moe_layer, bool training, const RoutingResult& routing,
                    const Tensor& logits);

}  // namespace switchyard
