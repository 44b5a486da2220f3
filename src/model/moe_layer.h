// The Mixture-of-Experts layer: explicit forward and backward over src/ops/ops.h (no autograd).
//
// Forward, x [T, D]:
//   x_r    = training && jitter_eps > 0 ? x * u : x     u ~ U[1-eps, 1+eps], Philox (seed, stream, step)
//   logits = x_r Wr                                      Wr [D, E], logits fp32 on CUDA
//   route(logits) -> expert ids, gates, slots, capacity, drops, layout offsets, aux / z losses
//                    (and the modern options of src/ops/moe_ops.h: score function, selection bias,
//                    groups, drop policy, sequence-level and global-batch losses, expert choice;
//                    src/model/moe_router.h)
//   X_p    = permute(x)                                  [R, D], expert-contiguous, padded segments
//   H      = X_p W1_e, A = act(H), O = A W2_e            grouped GEMMs: W1 [E, D, F] (swiglu [E, D, 2F]),
//                                                        W2 [E, F, D]; A [R, F]
//   y[t]   = sum_j gate[t, j] * O[row(t, j)]             kept choices only
// Backward (gradients are overwritten, not accumulated): through the combine (to the expert rows
// and to the gates), both grouped GEMMs and the activation, the permutation, routing (gates ->
// renormalization -> softmax, plus the aux and z losses), the router GEMM and the jitter (x_r
// depends on x through the same factors u). Choices, k_t and drops are piecewise constant.
//
// compute_mode dense runs every expert on every token (segment e holds all T tokens, padded to
// the alignment) and masks the combine by the routing: the same y and gradients as sparse at E
// times the expert FLOPs, a baseline for the benchmark. Building its row map reads the routing on
// the host (one small copy per step); sparse mode never copies to the host except to read losses.
//
// Dtypes. CPU: x, y, weights, gradients and logits all f32, or all f64 (gradient checks).
// CUDA: x, y, grad_x, weights bf16 (or f16: the activation dtype); logits, gates and losses
// fp32; weight gradients fp32.
//
// Memory: every activation and scratch buffer is sized once for max_tokens (the expert buffers by
// padded_rows_upper_bound, so the host never needs the routing counts) and reused each step;
// backward buffers are allocated on the first backward. The large ones (expert rows, hidden
// activations, backward scratch, the jittered router input) live in the layer's MoeLayerMemory
// (src/model/moe_memory.h): its own unless the constructor is given one that other layers share
// (activation recomputation); the routing results and logits always live in the layer. The caller keeps x
// alive between forward and backward (the router GEMM's weight gradient reads it when there is no
// jitter) and calls backward after the forward it belongs to.
//
// Work per pass on CUDA (sparse mode, no jitter; a cuBLASLt call counted as one kernel): forward 7
// kernels (router GEMM, routing, permute, two grouped GEMMs, activation, combine) and no host sync
// unless losses are read (with bf16 activations and an alignment that is a multiple of 128;
// otherwise the grouped GEMMs take the cuBLAS path, which reads the expert offsets on the host
// once per GEMM; a small-batch inference forward has 4, see below); backward 10
// (combine backward, two weight-gradient and two data-gradient grouped GEMMs, activation backward,
// permute backward, routing backward -- which writes dL/dlogits straight in the activation type
// the router GEMMs take --, router weight GEMM, router input GEMM accumulating into grad_x).
// Jitter adds one kernel to the forward and two to the backward (jitter, add_into).
//
// Fused activation (ops::fuses_expert_activation: bf16 on an sm_90a GPU, D and F multiples of 64,
// alignment a multiple of 128, SWITCHYARD_FUSED_ACTIVATION not 0): the activation runs in the
// epilogue of expert GEMM 1 (which writes H and A) and its backward in the epilogue of data grad 2
// (which reads H and writes dL/dH; dL/dA never reaches memory), so each pass has one kernel less,
// the stages "activation" and "activation backward" are absent (their work is inside "expert GEMM
// 1" and "data grad 2"), and the [R, F] dL/dA buffer is not allocated. Results equal the unfused
// path's. A forward with for_backward = false (inference) lets the fused GEMM skip writing H.
//
// Small-batch inference path (src/ops/small_batch_ops.h): on CUDA in sparse mode, a forward with
// for_backward = false and T <= small_batch_tokens() tokens runs router GEMM, routing and one
// small-batch op (two kernels that stream each used expert's W1 and W2 once and write y) instead of
// permute, the padded grouped GEMMs, the activation and the combine: no padding to 128-row tiles,
// 4 kernels in all, no host sync. Results equal the padded path's to bf16 accuracy (the same
// rounding points; only the summation order inside the expert products differs). After such a
// forward rows() is 0 and dispatch_map() is empty (no expert-row layout exists); routing(),
// logits() and the losses are as usual. The threshold is switches().small_batch_tokens
// (SWITCHYARD_SMALL_BATCH_TOKENS, default kDefaultSmallBatchTokens = 8; 0 turns the path off)
// read when the layer is constructed, capped by max_tokens and by 512 / k_max choices; it
// is 0 where the CUDA op does not take the layer (small_batch_supported: bf16/f16, D and F
// multiples of 8, E <= 1024). Its workspace is allocated at construction.
//
// The router (jitter, router GEMM, routing and their backward) is a MoeRouter
// (src/model/moe_router.h), the same code as the expert-parallel layer's.
//
// Stage timing: set_stage_observer() makes the layer report the start and end of each stage on
// the context's stream, so a benchmark can time every stage with device events while the layer
// runs its real sequence of ops. Forward stages: the router's ("jitter", "router GEMM",
// "routing"), then "permute" (dense mode: "dense layout"), "expert GEMM 1", "activation",
// "expert GEMM 2", "combine", "read losses"; a small-batch forward has "small-batch experts" in
// place of "permute" through "combine". Backward stages: "combine backward", "weight grad 2",
// "data grad 2", "activation backward", "weight grad 1", "data grad 1", "permute backward", then
// the router's ("routing backward", "router weight grad", "router input grad"). With the fused
// activation, "activation" and "activation backward" do not occur: that work is part of
// "expert GEMM 1" and "data grad 2".
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "src/core/device.h"
#include "src/core/switches.h"
#include "src/model/moe_router.h"
#include "src/ops/ops.h"

namespace switchyard {

// Default token threshold of the small-batch inference path (see the top comment; the switch
// SWITCHYARD_SMALL_BATCH_TOKENS, src/core/switches.h, overrides it).
// Measured on an H100 (d768, F3072, E32 top-1, graph replay): the small-batch path wins up to 8
// tokens (1: 36 vs 51 us, 8: 65 vs 69 us) and loses from 12 on (32: 178 vs 125 us).
constexpr int64_t kDefaultSmallBatchTokens = Switches{}.small_batch_tokens;

class MoeLayer {
 public:
  // `memory`: where the large buffers live (null: the layer's own; see the top comment).
  MoeLayer(const MoeLayerConfig& config, DeviceKind device, DType activation_dtype, int64_t max_tokens,
           std::shared_ptr<MoeLayerMemory> memory = nullptr);
  MoeLayer(const MoeLayer&) = delete;
  MoeLayer& operator=(const MoeLayer&) = delete;

  // y [T, D] = MoE(x [T, D]), T <= max_tokens. Everything runs on context.stream.
  MoeLosses forward(const ExecContext& context, const Tensor& x, const MoeWeights& weights,
                    const MoeForwardArgs& args, Tensor& y);
  // Gradients of L given grad_y = dL/dy, where L also contains aux_grad_scale * (aux_loss +
  // seq_aux_loss + global_aux_loss) + z_grad_scale * z_loss (pass 0 to leave a loss out, or the
  // loss scale under mixed precision).
  void backward(const ExecContext& context, const Tensor& grad_y, const MoeWeights& weights, float aux_grad_scale,
                float z_grad_scale, Tensor& grad_x, MoeGradients& gradients);

  const MoeLayerConfig& config() const { return config_; }
  DeviceKind device() const { return device_; }
  DType activation_dtype() const { return activation_dtype_; }
  DType float_dtype() const { return router_.float_dtype(); }  // logits, gates, losses
  DType gradient_dtype() const { return gradient_dtype_; }      // weight gradients
  int64_t max_tokens() const { return max_tokens_; }
  int64_t max_rows() const { return max_rows_; }
  const MoeLayerMemory& memory() const { return *memory_; }

  // State of the last forward, on the device.
  const RoutingResult& routing() const { return router_.routing(); }
  const DispatchMap& dispatch_map() const { return map_; }
  const Tensor& logits() const { return router_.logits(); }
  const Tensor& losses_on_device() const { return router_.routing().losses; }
  int64_t rows() const { return rows_; }
  // Largest token count the small-batch inference path takes (0: never), and whether the last
  // forward took it.
  int64_t small_batch_tokens() const { return small_batch_tokens_; }
  bool last_forward_small_batch() const { return small_batch_forward_; }
  MoeLosses read_losses(const ExecContext& context) const { return router_.read_losses(context); }
  MoeRoutingStats read_routing_stats(const ExecContext& context) const { return router_.read_routing_stats(context); }

  // Reports stage boundaries to `observer` from now on (nullptr: stop). Not owned.
  void set_stage_observer(MoeStageObserver* observer) { observer_ = observer; }

 private:
  template <typename Work>
  void run_stage(const ExecContext& context, const char* stage, Work&& work) {
    run_moe_stage(observer_, context, stage, work);
  }
  template <typename Work>
  void run_stage(const ExecContext& context, const char* stage, double flops, Work&& work) {
    run_moe_stage(observer_, context, stage, flops, work);
  }
  // Matmul FLOPs of expert GEMM `gemm` (1 or 2), and of each of its two backward GEMMs, in the last
  // forward: over its T * top_k routed choices in sparse mode (segment padding and dropped choices
  // not counted; an upper bound under complexity routing), over every token per expert in dense mode.
  double expert_gemm_flops(int gemm) const;
  void check_weights(const MoeWeights& weights, DType dtype, const char* what) const;
  void build_dense_layout(const ExecContext& context, const Tensor& x);
  // Whether this forward takes the small-batch path (CUDA, sparse, inference, few tokens).
  bool takes_small_batch(int64_t tokens, const MoeForwardArgs& args) const;
  // The end of every forward: remember x, mark the pass complete, read the losses if asked.
  MoeLosses finish_forward(const ExecContext& context, const Tensor& x, const MoeForwardArgs& args);
  void allocate_backward_buffers();
  // Whether the expert activation runs fused into the grouped GEMMs (ops::fuses_expert_activation).
  bool fuses_activation(const ExecContext& context) const;
  // The expert GEMMs' padding marks (sparse mode: map_.row_tokens, whose -1 rows end each segment
  // and are zero in every A operand: permute and the combine backward zero them, and the GEMMs map
  // zero rows to zero rows); nullptr in dense mode, where unrouted rows hold tokens.
  const Tensor* padding_marks() const;
  Tensor rows_view(const Buffer& buffer, DType dtype, int64_t rows, int64_t columns) const;
  Tensor rows_view(MoeBufferSlot slot, int64_t rows, int64_t columns) const;  // activation dtype

  MoeLayerConfig config_;
  DeviceKind device_;
  DType activation_dtype_, gradient_dtype_;
  int64_t max_tokens_ = 0, max_rows_ = 0;
  std::shared_ptr<MoeLayerMemory> memory_;  // forward activations and backward scratch
  MoeRouter router_;

  // Small-batch path: its token threshold and workspace (sized at construction).
  int64_t small_batch_tokens_ = 0;
  Buffer small_batch_workspace_;
  // Dense mode: the layout tensors the combine ops see (offsets e * T_pad, counts T_pad, unlimited
  // capacity), so a backend that derives padding rows from the layout finds none to clear.
  Buffer dense_offsets_, dense_counts_, dense_scalars_;
  // Backward scratch is allocated by the first backward (grad_hidden_post only for the unfused
  // activation).
  bool backward_ready_ = false;
  MoeStageObserver* observer_ = nullptr;
  // Host staging for the dense row map.
  std::vector<int32_t> host_expert_ids_, host_slots_, host_choice_rows_, host_row_tokens_, host_offsets_,
      host_counts_, host_scalars_;

  // What the last forward left for backward.
  bool has_forward_ = false;
  bool forward_for_backward_ = false;  // the last forward's MoeForwardArgs::for_backward
  bool small_batch_forward_ = false;
  int64_t tokens_ = 0, rows_ = 0;
  RoutingResult combine_routing_;  // the routing (sparse) or the routing with the dense layout tensors
  DispatchMap map_;
  Tensor x_, expert_offsets_;
};

}  // namespace switchyard
