// Where one optimizer step goes: `switchyard train --profile-steps N` (docs/TRAINING.md, "Step
// time breakdown").
//
// StepProfiler observes the stages of a step -- the model's (src/model/transformer.h
// set_stage_observer: embedding, norms, attention, residual adds, dense FFNs, MoE layers, shared
// experts, LM head, loss, and each one's backward) and the trainer's ("gradient sync",
// "optimizer", "router bias update") -- by marking the context's stream at each boundary
// (EventTimeline: CUDA events, or the host clock on CPU). After the step it sums each stage's
// device time. The stages do not overlap, so their sum plus the gaps between them is the step's
// device time from its first mark to its last; the gaps ("idle") are time the GPU had no work from
// these stages queued: host work such as reading the losses, launch latency, and waits on other
// ranks. A stage may hold sub-stages, one level deep (the attention's QKV projection, rotary, core
// and output projection; the MoE layer's own stages: router GEMM, routing, permute, expert GEMMs,
// ...; the optimizer's gradient norms and AdamW): they are timed the same way and listed under
// their stage, whose time alone enters the rows. Recording events costs a few microseconds per
// stage; the step being profiled is otherwise the same step.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "src/core/timing.h"
#include "src/model/moe_router.h"
#include "src/ops/ops.h"

namespace switchyard {

// The row a stage is counted in: "attention", "MoE layers", "shared experts", "dense FFNs",
// "norms and residuals", "embedding, LM head and loss", "gradient sync", "optimizer" (the
// optimizer and the router bias update); "other" for names it does not know.
std::string stage_category(const std::string& stage);
// Whether a stage is backward work: its name ends in " backward", or in " recompute" (the forward
// work that activation recomputation repeats inside backward, counted in its sublayer's row).
bool is_backward_stage(const std::string& stage);

struct StageTime {
  std::string stage;
  double ms = 0.0;  // summed over its occurrences in the step
  int count = 0;
  std::string parent;  // the stage it ran inside ("" for a stage of its own)
  double flops = 0.0;  // matmul FLOPs its occurrences reported (MoeStageObserver::stage_flops); 0: none
};

struct StepProfile {
  int64_t step = 0;
  double device_ms = 0.0;  // first mark to last: the step's span on the device timeline
  std::vector<StageTime> stages;     // in the order each first ended; they do not overlap
  std::vector<StageTime> substages;  // (parent, stage) pairs in the order each first ended
  double stages_ms() const;
  double idle_ms() const { return device_ms - stages_ms(); }
};

class StepProfiler : public MoeStageObserver {
 public:
  StepProfiler(DeviceKind device, void* stream);
  void begin_step();
  // Marks the end, waits for the device and returns the step's stage times.
  StepProfile end_step(int64_t step);
  void stage_begin(const ExecContext& context, const char* stage) override;
  void stage_end(const ExecContext& context, const char* stage) override;
  void stage_flops(const char* stage, double flops) override;

 private:
  struct Interval {
    const char* stage;
    const char* parent;  // nullptr: a stage of its own
    int begin, end;
    double flops;
  };
  struct Open {
    const char* stage;
    int mark;
    double flops;
  };
  EventTimeline timeline_;
  std::vector<Interval> intervals_;
  Open open_[2] = {};  // the open stage and its open sub-stage
  int depth_ = 0;
  bool in_step_ = false;
};

// What a step's FLOP rate was made of (the MFU formula, docs/TRAINING.md "MFU").
struct ProfileFlops {
  double tokens_per_step = 0, flops_per_token = 0, step_seconds = 0, peak_flops = 0;  // peak 0: no MFU (CPU)
};

// The table of the profiled steps (the mean of each row over them, forward / backward / total ms
// and share of the step) with the MFU formula's parts, then the sub-stages of each stage that has
// them (mean ms and calls per step, the TFLOP/s of those that report their matmul FLOPs, and what
// of the stage no sub-stage covers); and the same as one JSON object.
std::string format_step_profile(const std::vector<StepProfile>& profiles, const ProfileFlops& flops);
std::string step_profile_json(const std::vector<StepProfile>& profiles, const ProfileFlops& flops);
// The inverse, for profile.json read back (`switchyard report`): the steps and the MFU parts.
// SY_BAD_INPUT naming `source` and the field when the text is not such a profile.
std::vector<StepProfile> parse_step_profile_json(const std::string& text, const std::string& source,
                                                 ProfileFlops& flops);

}  // namespace switchyard
