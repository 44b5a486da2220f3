// MoeRouter: the router of every MoE layer (the single-device MoeLayer and the expert-parallel
// MoeEpLayer hold one each), forward and backward, written once.
//
// Forward, x [T, D], router weight Wr [D, E]:
//   x_r    = training && jitter_eps > 0 ? x * u : x     u ~ U[1-eps, 1+eps], Philox (seed, stream, step)
//   logits = x_r Wr                                      fp32 on CUDA, the reference's type on the CPU
//   route(logits, selection bias) -> expert ids, gates, slots, capacity, drops, layout offsets,
//                                        aux / z / sequence-level losses (src/ops/moe_ops.h; segment
//                                        alignment as the layer's layout needs: the GEMM tile height
//                                        for MoeLayer, 1 for the EP layer's packed rows)
//   global-batch loss (moe.global_aux_loss_weight > 0), see below
// Backward, in two parts so that the EP layer can run the first while expert rows travel:
//   backward():           dL/dgates (+ aux and z losses) -> dL/dlogits -> dL/dWr = x_r^T dL/dlogits
//   add_input_gradient(): grad_x += dL/dx_r, i.e. (dL/dlogits Wr^T), times u under jitter.
// dL/dlogits is kept in the activation type: the router GEMMs take both operands in it (cuBLASLt
// has no fp32 x bf16), and the CUDA routing backward writes that type directly (no conversion pass).
//
// The global-batch balance loss (Qwen3; Megatron-Core's global_aux_loss). On every forward that
// may be differentiated (training, or for_backward), with w = moe.global_aux_loss_weight > 0:
//   loads_m = this forward's expert_counts                          float [E]
//   loads_m = reducer(loads_m)   training forwards with MoeForwardArgs::load_reducer: the sum over
//                                the data-parallel ranks (every rank routes its own tokens over all
//                                E experts, so with expert parallelism too this is every rank)
//   running += loads_m           training forwards with MoeForwardArgs::global_loads (the caller's
//                                running sum over the step's micro-batches so far, reset per step)
//   F = running / sum(running)   (loads_m alone without a running sum) -> losses[kGlobalAuxLoss] =
//                                w * E * sum_e F_e * P_e with this batch's P (global_balance_loss)
// and backward passes F to route_backward (d global / d p[t, e] = w E F_e / T, F held constant).
// A recompute (MoeForwardArgs::recompute) gathers nothing: it recomputes the loss and F from the
// loads the forward it repeats ended up with (running, or loads_m without a running sum), kept here.
// So micro-batch m of a step is balanced against the loads of micro-batches 1..m of all ranks, as
// Megatron-Core's global_aux_loss does with its running tokens-per-expert sum. Cost: four small
// kernels on [E] (zero, accumulate, add, the loss) and the reducer's all-reduce of E floats, inside
// the "routing" stage; no host sync (the trainer's reducer orders NCCL by events).
//
// Memory: every buffer is sized once for max_tokens; backward buffers on the first backward.
// The caller keeps x alive between forward and backward (the weight gradient reads x_r = x when
// there is no jitter). The jittered input and its backward scratch live in the layer's
// MoeLayerMemory (src/model/moe_memory.h), which recomputing models share between layers.
//
// This header also holds what every MoE layer shares: its configuration, the forward arguments,
// the losses and counters read back, and the stage observer a benchmark uses to time each stage.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "src/core/device.h"
#include "src/model/config.h"
#include "src/model/moe_memory.h"
#include "src/ops/host_reads.h"
#include "src/ops/ops.h"

namespace switchyard {

// One MoE layer's configuration: the `moe:` section as configured (src/model/config.h: experts,
// top_k, capacity, losses, activation, ...) and what the model adds per layer. The routing
// parameters of the ops layer (RoutingParams) are derived from it in one place, routing_params().
struct MoeLayerConfig {
  MoeConfig moe;
  int64_t d_model = 0;
  // Tokens of one sequence (the transformer's model.seq_len) for the sequence-level loss: the T
  // rows of a forward are consecutive sequences of this many tokens. 0: the whole batch is one.
  int64_t tokens_per_sequence = 0;
  uint64_t jitter_seed = 0;    // training.seed
  uint32_t jitter_stream = 0;  // the layer's index, so layers draw independent noise

  void validate() const;  // SY_BAD_INPUT naming the field
  RoutingParams routing_params(int64_t num_tokens, bool training) const;
  // Rows of RoutingResult::sequence_fractions a forward of up to max_tokens tokens needs.
  int64_t max_sequences(int64_t max_tokens) const;
  int64_t w1_columns() const {
    return moe.activation == ExpertActivation::swiglu ? 2 * int64_t(moe.expert_d_ff) : int64_t(moe.expert_d_ff);
  }
};

// Parameters as the layer reads them (compute copies on CUDA). router [D, E], w1 [E, D, F or 2F],
// w2 [E, F, D]. router_bias: the selection bias [E] of aux-loss-free balancing (added to the
// routing keys only; src/ops/moe_ops.h), fp32 -- the master weights, never a bf16 copy -- or the
// CPU layer's float type; required when moe.bias_update_rate > 0, optional otherwise (nullptr:
// none), refused with expert choice. It has no gradient: the trainer moves it between steps.
struct MoeWeights {
  Tensor router, w1, w2;
  const Tensor* router_bias = nullptr;
};
// Weight gradients, same shapes; overwritten by backward (the router bias has none).
struct MoeGradients {
  Tensor router, w1, w2;
  // Add this backward's gradients to the tensors' values instead of overwriting them (gradient
  // accumulation over micro-steps: the GEMMs add in place, no scratch and no add pass).
  bool accumulate = false;
};

// Sums a float [E] tensor of expert loads over the data-parallel ranks, in place, ordered on
// context.stream (the global-batch loss; see the top comment). Set by whoever owns the ranks
// (the trainer); a collective: every rank's training forwards call it in the same order.
using LoadReducer = std::function<void(const ExecContext& context, Tensor& loads)>;

struct MoeForwardArgs {
  bool training = false;           // train capacity factor and jitter; eval capacity factor otherwise
  uint64_t step = 0;               // jitter RNG offset: each step draws new noise
  const Tensor* complexity = nullptr;  // [T] in [0, 1], float type of the logits; complexity = given only
  bool read_losses = true;         // copy the losses to the host (waits for the stream on CUDA)
  bool for_backward = true;        // false: no backward follows (inference); H need not be stored and
                                   // backward() refuses to run
  // The global-batch loss of training forwards (top comment): the reducer over the data-parallel
  // ranks (nullptr: this rank's loads only) and the step's running sum of reduced loads, float [E]
  // in the router's float type (nullptr: this micro-batch alone). Both unused unless
  // moe.global_aux_loss_weight > 0.
  const LoadReducer* load_reducer = nullptr;
  Tensor* global_loads = nullptr;
  // Activation recomputation (TransformerOptions::recompute): this forward repeats the layer's last
  // forward, a training one, right before its backward, with the same x, weights, training and step,
  // so the jitter noise, the routing (deterministic kernels; the same router bias and complexity)
  // and every loss come out bit for bit as they did. It has no side effects: the global-batch loss
  // is recomputed from the loads the first forward gathered (the router keeps them), so
  // load_reducer and global_loads are not touched -- no all-reduce, nothing added twice.
  bool recompute = false;
};

// The router losses of the last forward, each already weighted as it enters the training loss.
struct MoeLosses {
  double aux_loss = 0.0;         // aux_loss_weight * E * sum_e f_e P_e
  double z_loss = 0.0;           // z_loss_weight * mean_t logsumexp_t^2
  double seq_aux_loss = 0.0;     // seq_aux_loss_weight * mean_s sum_e f_{s,e} P_{s,e}
  double global_aux_loss = 0.0;  // global_aux_loss_weight * E * sum_e F_e P_e
  bool read = false;             // false when forward was asked not to read them
};

// Routing counters of the last forward, read from the device on request.
struct MoeRoutingStats {
  int64_t capacity = 0, total_choices = 0, dropped_choices = 0, padded_rows = 0;
};

// Host storage for a copy of RoutingResult::losses, in the router's float dtype (f32, or f64 on a
// CPU router of f64): destination() is where the copy lands, losses() reads it back.
struct RoutingLossesReadout : HostFloats<kNumRoutingLosses> {
  MoeLosses losses(DType float_dtype) const;
};

// The counters from the host copy of RoutingResult::scalars.
MoeRoutingStats moe_routing_stats_from(const int32_t (&scalars)[kNumRoutingScalars]);

// Receives the boundaries of a layer's stages; stage_begin is called before a stage's work is
// enqueued on context.stream and stage_end after it, with the same name (a string literal).
// Router stages: "jitter", "router GEMM", "routing" (forward); "routing backward", "router weight
// grad", "router input grad" (backward; with jitter the last includes the jitter of the gradient
// and the add into grad_x). The layers' own stages: src/model/moe_layer.h.
class MoeStageObserver {
 public:
  virtual ~MoeStageObserver() = default;
  virtual void stage_begin(const ExecContext& context, const char* stage) = 0;
  virtual void stage_end(const ExecContext& context, const char* stage) = 0;
  // The matmul FLOPs of the open stage `stage` (called before its stage_end); stages without a
  // count do not call it.
  virtual void stage_flops(const char* stage, double flops) {
    (void)stage;
    (void)flops;
  }
};

// FLOPs of C [m, n] = A [m, k] B [k, n]: one multiply-add (2 FLOPs) per (row, column, k).
inline double matmul_flops(int64_t m, int64_t k, int64_t n) { return 2.0 * double(m) * double(k) * double(n); }

// Runs work() between the observer's stage_begin and stage_end for `stage` (just work() without one).
template <typename Work>
void run_moe_stage(MoeStageObserver* observer, const ExecContext& context, const char* stage, Work&& work) {
  if (observer) observer->stage_begin(context, stage);
  work();
  if (observer) observer->stage_end(context, stage);
}

// The same for a stage whose matmul FLOPs are `flops` (the profile shows its TFLOP/s).
template <typename Work>
void run_moe_stage(MoeStageObserver* observer, const ExecContext& context, const char* stage, double flops,
                   Work&& work) {
  run_moe_stage(observer, context, stage, [&] {
    work();
    if (observer) observer->stage_flops(stage, flops);  // while the stage is open
  });
}

class MoeRouter {
 public:
  MoeRouter() = default;
  // `segment_alignment`: the layout the routing's offsets describe (config.segment_alignment, or 1
  // for a packed layout); `max_rows`: the rows of the largest dispatch map the layer asks for.
  MoeRouter(const MoeLayerConfig& config, DeviceKind device, DType activation_dtype, int64_t max_tokens,
            int segment_alignment, int64_t max_rows, std::shared_ptr<MoeLayerMemory> memory);
  MoeRouter(const MoeRouter&) = delete;
  MoeRouter& operator=(const MoeRouter&) = delete;
  MoeRouter(MoeRouter&&) = default;
  MoeRouter& operator=(MoeRouter&&) = default;

  // Routes x [T, D] (1 <= T <= max_tokens) with router weight [D, E] and the optional selection
  // bias [E] (MoeWeights::router_bias); the result stays valid until the next forward. With
  // moe.global_aux_loss_weight > 0 it also computes the global-batch loss (top comment).
  // args.recompute: see MoeForwardArgs (refused unless the last forward was a training one of as
  // many tokens at the same step).
  const RoutingResult& forward(const ExecContext& context, const Tensor& x, const Tensor& router_weight,
                               const Tensor* selection_bias, const MoeForwardArgs& args,
                               MoeStageObserver* observer = nullptr);
  // grad_gates() [T, k_max] (written by the layer's combine backward) and the two loss scales ->
  // dL/dlogits -> gradient of the router weight (overwritten, or added to with accumulate).
  // aux_grad_scale scales the three balance losses (aux, sequence-level, global-batch),
  // z_grad_scale the z loss.
  void backward(const ExecContext& context, float aux_grad_scale, float z_grad_scale, Tensor& grad_router_weight,
                MoeStageObserver* observer = nullptr, bool accumulate = false);
  // grad_x [T, D] += the router's share of dL/dx; after backward().
  void add_input_gradient(const ExecContext& context, const Tensor& router_weight, Tensor& grad_x,
                          MoeStageObserver* observer = nullptr);

  // The routing parameters of the last forward (its token count, capacity factor, alignment).
  const RoutingParams& params() const { return params_; }
  const RoutingResult& routing() const { return routing_; }
  const Tensor& logits() const { return logits_; }
  // Row map views over the routing's memory (RoutingBuffers::map) for the last forward's tokens.
  DispatchMap dispatch_map(int64_t rows) const { return buffers_.map(tokens_, rows); }
  // dL/dgates of the last forward's tokens, float type; the layer's combine backward writes it.
  Tensor grad_gates();
  DType float_dtype() const { return float_dtype_; }
  MoeLosses read_losses(const ExecContext& context) const;
  MoeRoutingStats read_routing_stats(const ExecContext& context) const;

 private:
  Tensor rows(const Buffer& buffer, DType dtype, int64_t columns) const;  // [tokens_, columns]
  void allocate_backward_buffers();
  void check_recompute(int64_t tokens, const MoeForwardArgs& args) const;
  void check_selection_bias(const Tensor* selection_bias) const;
  // The global-batch loss of the forward that just routed (top comment).
  void global_balance_loss(const ExecContext& context, const MoeForwardArgs& args);

  MoeLayerConfig config_;
  DeviceKind device_ = DeviceKind::cpu;
  DType activation_dtype_ = DType::f32, float_dtype_ = DType::f32;
  int64_t max_tokens_ = 0;
  int segment_alignment_ = 1;
  std::shared_ptr<MoeLayerMemory> memory_;  // the jittered input and its gradient scratch
  Buffer logits_buffer_;
  RoutingBuffers buffers_;
  bool backward_ready_ = false;
  Buffer grad_gates_, grad_logits_;
  // The global-batch loss (moe.global_aux_loss_weight > 0): the loads the last training forward's
  // loss was computed from (this micro-batch's, reduced, or the running sum they were added to;
  // a recompute reuses them) and F [E].
  Buffer balance_loads_, global_fractions_;

  // What the last forward left for backward.
  int64_t tokens_ = 0;
  uint64_t step_ = 0;
  bool training_ = false;  // the last forward was a training one
  bool jittered_ = false;
  bool has_global_fractions_ = false;  // the last forward computed F (backward passes it)
  RoutingParams params_;
  RoutingResult routing_;
  Tensor router_input_, logits_, grad_logits_view_;
};

}  // namespace switchyard
