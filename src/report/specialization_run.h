// Builds an expert specialization map (src/report/specialization.h) by running a trained model
// over a text: the model is rebuilt from the config inside its weights file (as `switchyard
// generate` does, every expert on one device, dropless routing so capacity drops nothing), the
// text is cut into windows of model.seq_len tokens (batches of `batch` windows; a shorter tail
// window runs alone) and every MoE layer's routing of every window is copied to the host through
// a RoutingObserver (src/model/routing_observer.h) and counted.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "src/model/routing_observer.h"
#include "src/report/specialization.h"
#include "src/train/weights_file.h"

namespace switchyard {

struct SpecializationOptions {
  DeviceKind device = DeviceKind::cpu;
  int64_t max_tokens = 16384;  // of the text, from its start
  int64_t batch = 8;           // windows per forward
  int position_buckets = 8;
};

// Tokens of an analysis text: a token file (starts with the SWYTOKNS magic) as stored, any other
// file as its bytes (needs a byte-level model: vocab_size >= 256). At most max_tokens from the start.
std::vector<int32_t> load_analysis_tokens(const std::string& path, int vocab_size, int64_t max_tokens);

// Copies each MoE layer's expert ids and k_t to the host as forwards report them (synchronizes the
// stream: for analysis only, never in training).
class RoutingCapture : public RoutingObserver {
 public:
  explicit RoutingCapture(int moe_layers);
  void on_routing(const ExecContext& context, const RoutingEvent& event) override;
  // Forget what was captured (before the next forward).
  void clear();
  bool captured(int moe_layer) const;
  const std::vector<int32_t>& expert_ids(int moe_layer) const;  // [T * k]
  const std::vector<int32_t>& token_k(int moe_layer) const;     // [T]
  int k(int moe_layer) const;
  int64_t events() const { return events_; }

 private:
  struct Layer {
    bool captured = false;
    int k = 0;
    std::vector<int32_t> expert_ids, token_k;
  };
  std::vector<Layer> layers_;
  int64_t events_ = 0;
};

// The map of `tokens` under the weights in `weights` (whose path is `source` in messages).
SpecializationMap run_specialization(const WeightsFile& weights, const std::string& source,
                                     const std::vector<int32_t>& tokens, const SpecializationOptions& options);

}  // namespace switchyard
