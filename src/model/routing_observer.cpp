// The routing tap (src/model/routing_observer.h).
#include "src/model/routing_observer.h"

namespace switchyard {
namespace {
thread_local RoutingObserver* current_observer = nullptr;
}  // namespace

RoutingObserverScope::RoutingObserverScope(RoutingObserver* observer) : previous_(current_observer) {
  current_observer = observer;
}

RoutingObserverScope::~RoutingObserverScope() { current_observer = previous_; }

RoutingObserver* current_routing_observer() { return current_observer; }

void notify_routing(const ExecContext& context, int moe_layer, bool training, const RoutingResult& routing,
                    const Tensor& logits) {
  RoutingObserver* observer = current_observer;
  if (observer == nullptr) return;
  RoutingEvent event;
  event.moe_layer = moe_layer;
  event.training = training;
  event.routing = &routing;
  event.logits = &logits;
  observer->on_routing(context, event);
}

}  // namespace switchyard
