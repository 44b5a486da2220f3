// The decoder-only transformer LM: explicit forward and backward over the backend ops
// (src/ops/ops.h) and the MoE block (src/model/moe_block.h).
//
// Model, for tokens of B sequences of S positions (T = B * S rows, D = d_model):
//   x_0   = E[token] (+ P[position] with learned positions)         E [V, D], P [S_max, D]
//   block b = 0 .. L-1 (pre-norm):
//     a   = norm1(x_b)                                                LayerNorm or RMSNorm
//     qkv = a Wqkv  (rotary on q, k)                                  Wqkv [D, 3D]
//     x'  = x_b + attention(qkv) Wo                                   causal, H heads; Wo [D, D]
//     u   = norm2(x')
//     x_{b+1} = x' + FFN_b(u)    dense: act(u W1) W2 (W1 [D, F or 2F for swiglu], W2 [F, D]),
//                                or the MoE layer when (b + 1) % moe_every == 0 and b >= dense_first_blocks
//     MoE blocks with S = moe.num_shared_experts > 0 add always-active shared experts:
//       FFN_b(u) = routed_moe(u) + sum_s act(u W1_s) W2_s        W1_s [D, Fs|2Fs], W2_s [Fs, D]
//     computed as one dense FFN of hidden width S * Fs: W1 = [W1_1 .. W1_S] side by side (for
//     swiglu: the S gate halves, then the S up halves) and W2 = the W2_s stacked, which is the same
//     sum since act acts per column. Their weights are dense parameters, replicated on every rank.
//     On CUDA they run on a second stream (SideStream, src/core/timing.h), forked once u is ready:
//     x_{b+1} = x' + shared(u) is written there while the routed layer (routing, its host syncs,
//     with EP the dispatch and combine) runs on the compute stream, which joins before adding
//     routed_moe(u). Backward likewise: the shared experts' input gradient goes to scratch on the
//     side stream and is added after the join. SWITCHYARD_SHARED_EXPERT_STREAM=0, and a profiled
//     step (--profile-steps times each stage alone), keep them in sequence on the compute stream.
//   h = norm_f(x_L);  logits = h E^T (LM head tied to the embedding);  fused softmax cross-entropy.
// Linear layers have no biases; LayerNorm has weight and bias, RMSNorm a weight.
//
// Loss and gradients. forward_loss() takes `ce_grad_scale` = dLoss/d(sum of token losses) and, when
// training, writes d/dlogits into the logits' own memory in the same fused pass; backward() then
// carries it to every parameter, with the MoE router losses entering at `aux_grad_scale`
// (= dLoss/d(aux_l) = dLoss/d(z_l) = dLoss/d(seq_l) = dLoss/d(global_l) for every MoE layer l:
// the sequence-level and global-batch balance losses join the loss exactly like aux). The trainer
// folds the loss scale, 1 / tokens and 1 / (micro-steps * ranks) into those two numbers.
//
// Routing balance across a step (driven by the trainer; src/model/transformer_balance.cpp):
//   step loads    every training forward adds each MoE block's expert_counts (this rank's tokens,
//                 before capacity) to that block's row of one fp32 [moe blocks, E] device buffer,
//                 step_loads() (one small kernel per MoE block); reset_step_loads() zeroes it.
//   router bias   with moe.bias_update_rate > 0 each MoE block has a parameter
//                 blocks.<b>.moe.router_bias [E] (aux-loss-free balancing, DeepSeek-V3): zeros at
//                 init, dense group (replicated), no weight decay and never a gradient, so AdamW
//                 leaves it bit-identical (its m and v stay 0). Routing adds it to the selection
//                 keys (the master copy). update_routing_biases() moves it by rate * sign(mean load -
//                 load) per expert from step_loads(), which the trainer has summed over all ranks.
//   global loss   with moe.global_aux_loss_weight > 0, each training forward sums its MoE blocks'
//                 counts over the ranks through the reducer set by set_load_reducer() (none: this
//                 rank only) into a per-block running sum for the step (reset by
//                 reset_step_loads()), from which the block's global-batch loss is computed
//                 (src/model/moe_router.h).
// accumulate == false overwrites the gradient buffers; true adds to them (gradient accumulation),
// in place: GEMM weight gradients through beta = 1, the norms and the MoE block through their
// accumulate flags (src/model/transformer_backward.cpp).
//
// Parameter names (src/model/parameters.h; the weights file uses them):
//   embedding.token [V, D], embedding.position [S, D] (learned positions only)
//   blocks.<b>.attn_norm.weight / .bias [D], blocks.<b>.attn.qkv [D, 3D], blocks.<b>.attn.out [D, D]
//   blocks.<b>.ffn_norm.weight / .bias [D]
//   blocks.<b>.ffn.w1 [D, F|2F], blocks.<b>.ffn.w2 [F, D]                        dense blocks
//   blocks.<b>.moe.router [D, E], blocks.<b>.moe.w1 [E, D, Fe|2Fe], blocks.<b>.moe.w2 [E, Fe, D]
//   blocks.<b>.moe.router_bias [E]                                  moe.bias_update_rate > 0 only
//   blocks.<b>.moe.shared.w1 [D, S*Fs|2*S*Fs], blocks.<b>.moe.shared.w2 [S*Fs, D]   shared experts
//   final_norm.weight / .bias [D]                                                (bias: LayerNorm only)
// Initialisation: N(0, init_std^2) for matrices and embeddings, init_std / sqrt(2 L) for the
// residual output projections (attn.out, ffn.w2, moe.w2, moe.shared.w2), ones for norm weights, zeros for biases
// (the router bias included). Weight decay applies to matrices and embeddings, not to norms and biases.
//
// Memory: every activation needed by backward is kept in buffers sized once for max_batch *
// max_seq_len tokens: per block, except those of the sublayers that options.recompute recomputes,
// which are one set shared by all blocks (TransformerOptions::recompute); backward scratch, the MoE
// layer's output rows and the attention workspace are shared between blocks. Activations are the
// compute dtype (bf16 / fp16 on CUDA; f32 or f64 on the CPU); norm statistics, attention
// statistics and losses are fp32 on CUDA (the activation dtype on the CPU reference).
// Saved bytes per block (e = activation, s = statistics element size, T tokens, D, H heads,
// LayerNorm; RMSNorm keeps no mean, so one T*s less per norm):
//   attention  T (5 D e + 2 s + H s)    norm1 out, mean, rstd; qkv (3 D); attention out; softmax stats
//   x'         T D e                    the FFN sublayer's input (mid)
//   FFN        T (D e + 2 s)            norm2 out, mean, rstd
//              + dense FFN / shared experts: T (w1 columns + hidden) e
//              + MoE layer: R (2 D + w1 columns + F) e (permuted rows, H, A, expert outputs; R the
//                padded rows) + T E s' (logits) + routing results, + T D e under jitter
// The block input x_b (T D e) is the residual stream, kept in every mode. docs/TRAINING.md
// ("Activation recomputation") has the figures for configs/bench-1gpu.yaml.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "src/comm/communicator.h"
#include "src/core/timing.h"
#include "src/model/moe_block.h"
#include "src/model/parameters.h"
#include "src/model/config.h"

namespace switchyard {

struct TransformerOptions {
  DeviceKind device = DeviceKind::cpu;
  DType activation_dtype = DType::f32;  // CPU: f32 / f64; CUDA: bf16 / f16
  int64_t max_batch = 1;                // sequences per forward
  int64_t max_seq_len = 0;              // 0: model.seq_len
  int ep_size = 1;                      // expert-parallel ranks (this rank's shard: ep_rank)
  int ep_rank = 0;
  const ParallelGroups* groups = nullptr;  // needed when ep_size > 1
  EpLayerOptions ep;                    // the expert-parallel layer's exchange (parallel.*)
  uint64_t jitter_seed = 0;             // router jitter noise (training.seed)
  bool dropless = false;                // overrides moe.dropless (generation: no token is dropped)
  // Activation recomputation (training.recompute): which sublayers' activations backward recomputes
  // instead of keeping them per block.
  //   none       every block keeps all its backward reads.
  //   attention  the attention sublayer's activations -- norm1's output and statistics, qkv after
  //              rotary, the attention output and its softmax statistics -- are not kept per block:
  //              each block's backward first repeats norm1 -> qkv -> rotary -> attention from the
  //              block input x_b, which the residual stream keeps anyway.
  //   moe        the same for the FFN sublayer of every block, MoE or dense: norm2's output and
  //              statistics, the dense FFN's (and shared experts') hidden rows, and the MoE layer's
  //              expert activations (permuted rows, H, A, expert outputs, the jittered router input)
  //              are recomputed from x', which each block keeps. The repeated MoE forward routes
  //              exactly as the first did (same jitter seed, stream and step, same router bias; the
  //              routing kernels are deterministic) and has no side effects: it adds no step loads,
  //              calls no routing tap, and neither reduces nor adds the global-batch loss's loads
  //              (MoeForwardArgs::recompute); the routing results and losses it rewrites are equal
  //              to the first forward's. Expert-parallel blocks repeat their all-to-alls: every
  //              rank recomputes the same blocks in the same order, since the option is global.
  //   all        both, and x' too (from the attention recompute): a block keeps only x_b.
  // The recomputed buffers are one set shared by all blocks (the MoE layers share one
  // MoeLayerMemory: src/model/moe_memory.h), so the recomputed sublayers' activations take one
  // block's worth instead of L. The price: one more forward of the recomputed sublayers in each
  // backward (no more than the attention and FFN forward FLOPs again). Loss and gradients equal
  // those of none bit for bit: the recompute runs the same kernels on the same inputs (tested on
  // the CPU backend). CUDA graphs are not involved: only the inference MoE stream
  // (src/model/moe_stream.h) captures graphs, and it has no backward.
  RecomputeMode recompute = RecomputeMode::none;
  // parallel.deterministic: false lets the CUDA attention backward accumulate dQ with atomics
  // (faster; losses may then differ in their last bits run to run). The CPU ignores it.
  bool deterministic = true;
  int64_t attention_workspace_limit_bytes = int64_t(512) << 20;  // CUDA attention scratch cap
};

// Per-forward statistics, read to the host by read_stats().
struct TransformerStats {
  double loss_sum = 0.0;    // sum of the token cross-entropies of the last forward_loss
  int64_t tokens = 0;       // tokens that entered it
  std::vector<MoeBlockStats> moe;  // one per MoE block, in block order
};

// The bytes of the buffers that hold a training forward's activations until backward
// (Transformer::activation_memory; the formulas are in the top comment, "Memory"). Backward
// scratch, the logits, the MoE routing results, the EP exchange's rows and the attention
// workspace are not counted.
struct TransformerActivationMemory {
  int64_t per_block = 0;  // what each block keeps (its MoE layer's own memory included), summed
  int64_t shared = 0;     // the recomputed sublayers' one set for all blocks (options.recompute)
  int64_t residual = 0;   // the residual stream: every block's input and the last block's output
};

enum class ForwardMode : uint8_t { training, evaluation };

class Transformer {
 public:
  Transformer(const ModelConfig& model, const MoeConfig& moe, const TransformerOptions& options);
  ~Transformer();
  Transformer(const Transformer&) = delete;
  Transformer& operator=(const Transformer&) = delete;

  // The parameters of this model on rank `ep_rank` of `ep_size` (finalized).
  static ParameterLayout build_layout(const ModelConfig& model, const MoeConfig& moe, int ep_size, int ep_rank);
  const ParameterLayout& layout() const { return layout_; }
  const ModelConfig& model_config() const { return model_; }
  const TransformerOptions& options() const { return options_; }
  int moe_block_count() const;

  // Forward through the LM head and the cross-entropy against `targets` (int32 [B*S], -1 =
  // ignore) for tokens (int32 [B*S]), both on the model's device. Training: also d/dlogits into
  // the logits (scaled by ce_grad_scale), for backward. `step` seeds the router jitter.
  void forward_loss(const ExecContext& context, const ModelParameters& parameters, const Tensor& tokens,
                    const Tensor& targets, int64_t batch, int64_t seq_len, ForwardMode mode, float ce_grad_scale,
                    uint64_t step);
  // Forward to the logits only ([B*S, V], the compute dtype), for generation.
  const Tensor& forward_logits(const ExecContext& context, const ModelParameters& parameters, const Tensor& tokens,
                               int64_t batch, int64_t seq_len);
  // Gradients of the last training forward_loss into parameters' gradient buffers.
  void backward(const ExecContext& context, ModelParameters& parameters, float aux_grad_scale, bool accumulate);
  // Loss sums and MoE statistics of the last forward (waits for context.stream).
  TransformerStats read_stats(const ExecContext& context) const;
  // The activation memory as allocated (sized for max_batch x max_seq_len tokens).
  TransformerActivationMemory activation_memory() const;

  // ---- Routing balance across a step (see the top comment) ----
  // This step's expert loads: fp32 [moe_block_count(), E] on the model's device, row = MoE ordinal.
  // Contiguous, so one all-reduce covers every block.
  Tensor step_loads() const;
  // Zeroes the step loads and the global-batch loss's running sums (the trainer: at every step's
  // start and after each bias update).
  void reset_step_loads(const ExecContext& context);
  // bias_b += rate * sign(mean_e load_{b,e} - load_{b,e}) for every MoE block b with a router bias,
  // on the master copy, from step_loads() as they stand (the trainer sums them over all ranks
  // first); the compute copy, if `parameters` has one, is refreshed. No-op without router biases.
  void update_routing_biases(const ExecContext& context, ModelParameters& parameters, float rate);
  // The router biases' current values, one vector per MoE block (empty for a block without one);
  // reads the host (waits for context.stream).
  std::vector<std::vector<double>> routing_biases(const ExecContext& context,
                                                  const ModelParameters& parameters) const;
  bool has_routing_biases() const { return moe_.uses_routing_bias(); }
  // The global-batch loss's reduction over the data-parallel ranks (src/model/moe_router.h
  // LoadReducer); an empty function: this rank's loads only. Called once per MoE block in every
  // training forward when moe.global_aux_loss_weight > 0.
  void set_load_reducer(LoadReducer reducer) { load_reducer_ = std::move(reducer); }

  // Reports the boundaries of the model's stages to `observer` (src/model/moe_router.h) from now
  // on; nullptr stops. Not owned. The stages do not overlap and cover all the model's work:
  //   forward:  "embedding", "norm", "attention", "residual", "dense FFN", "MoE", "shared experts",
  //             "LM head", "loss"
  //   backward: "LM head backward", "norm backward" (which adds to the residual stream's
  //             gradient), "attention backward", "dense FFN backward", "MoE backward",
  //             "shared experts backward", "embedding backward", and with options.recompute the
  //             repeated forward work: "norm recompute", "attention recompute", "dense FFN
  //             recompute", "MoE recompute", "shared experts recompute"
  // (norms and residual adds occur once per block and sublayer; "MoE" covers the routed layer
  // with its router and, in training, its step-load and global-loss bookkeeping). Some stages hold
  // sub-stages, one level deep (the observer sees them begin and end inside their stage):
  //   attention: "QKV projection", "rotary", "attention core", "output projection" (with its
  //              residual); backward: the same names + " backward", in reverse order
  //   dense FFN, shared experts: "GEMM 1", "activation", "GEMM 2"; backward: "weight grad 2",
  //              "data grad 2", "activation backward", "weight grad 1", "data grad 1"
  //   MoE, MoE backward: the MoE layer's own stages (src/model/moe_layer.h; the expert-parallel
  //              layer's: src/model/moe_ep_layer.h); forward then "step loads" (training) and
  //              "routing taps" (the block's bookkeeping)
  void set_stage_observer(MoeStageObserver* observer);

 private:
  struct Block;
  // What the attention sublayer's backward reads: norm1's output and statistics, qkv after rotary,
  // the attention output and its softmax statistics.
  struct AttentionActivations {
    Buffer norm_out, norm_mean, norm_rstd, qkv_rows, attention_out, attention_stats;
  };
  // What the FFN sublayer's backward reads besides its input x': norm2's output and statistics and
  // the dense FFN's pre- and post-activation rows (the MoE layer keeps its own).
  struct FfnActivations {
    Buffer norm_out, norm_mean, norm_rstd, pre, post;
  };
  // A dense FFN out += act(input W1) W2: the FFN of a dense block, or the shared experts of an MoE
  // block (all of them as one FFN of hidden width S * Fs).
  struct DenseFfn {
    int w1 = -1, w2 = -1;  // parameter indices
    int64_t hidden = 0, w1_columns = 0;  // F, and F or 2F for swiglu
  };
  DenseFfn make_dense_ffn(int w1, int w2, int64_t hidden) const;
  std::unique_ptr<AttentionActivations> make_attention_activations() const;
  // pre [tokens, w1_columns] and post [tokens, hidden] (none for 0: an MoE block without shared experts).
  std::unique_ptr<FfnActivations> make_ffn_activations(int64_t w1_columns, int64_t hidden) const;
  bool recomputes_attention() const;
  bool recomputes_ffn() const;
  // pre and post = act(input W1) into `saved`; then out = residual + post W2 unless `out` is null (a
  // recompute: backward reads pre and post only). The residual is the GEMM's addend: no copy.
  void dense_ffn_forward(const ExecContext& context, const ModelParameters& parameters, const DenseFfn& ffn,
                         const FfnActivations& saved, const Tensor& input, const Tensor& residual, Tensor* out);
  // Weight gradients of the FFN, and its input gradient written (input_grad_beta = 0) or added (1).
  void dense_ffn_backward(const ExecContext& context, ModelParameters& parameters, const DenseFfn& ffn,
                          const FfnActivations& saved, const Tensor& input, const Tensor& grad_out,
                          float input_grad_beta, Tensor& grad_input, bool accumulate);
  template <typename Work>
  void stage(const ExecContext& context, const char* name, Work&& work) const {
    run_moe_stage(stage_observer_, context, name, work);
  }
  template <typename Work>
  void stage(const ExecContext& context, const char* name, double flops, Work&& work) const {
    run_moe_stage(stage_observer_, context, name, flops, work);
  }
  // The shared experts' stream for `context`: a SideStream that overlaps its stream on CUDA, an
  // inactive one (the compute stream itself) on CPU, with the switch off, or while a stage observer
  // times each stage alone.
  SideStream& shared_expert_stream(const ExecContext& context);
  void allocate_backward_buffers();
  void forward_body(const ExecContext& context, const ModelParameters& parameters, const Tensor& tokens,
                    int64_t batch, int64_t seq_len, bool training, uint64_t step);
  void forward_block(const ExecContext& context, const ModelParameters& parameters, Block& block, const Tensor& x,
                     Tensor& x_out, bool training, uint64_t step);
  // The attention sublayer from the block input x: norm1 and attention into the block's
  // AttentionActivations and, unless `mid` is null, mid = x + attention Wo. `recompute` names the
  // stages "... recompute".
  void attention_sublayer_forward(const ExecContext& context, const ModelParameters& parameters, Block& block,
                                  const Tensor& x, Tensor* mid, bool recompute);
  // The FFN sublayer from mid: norm2 and the FFN (dense, or MoE plus shared experts) into the
  // block's saved activations, and x_out = mid + FFN(norm2(mid)). With x_out null, a recompute of
  // the last training forward at `step` (options.recompute): only what backward reads, no side effects.
  void ffn_sublayer_forward(const ExecContext& context, const ModelParameters& parameters, Block& block,
                            const Tensor& mid, Tensor* x_out, bool training, uint64_t step);
  void backward_block(const ExecContext& context, ModelParameters& parameters, Block& block, float aux_grad_scale,
                      bool accumulate, Tensor& grad_residual);
  void norm_forward(const ExecContext& context, const ModelParameters& parameters, int weight, int bias,
                    const Tensor& x, Tensor& out, Tensor& mean, Tensor& rstd, const char* stage_name = "norm");
  void norm_backward(const ExecContext& context, ModelParameters& parameters, int weight, int bias, const Tensor& x,
                     const Tensor& mean, const Tensor& rstd, const Tensor& grad_out, Tensor& grad_x,
                     bool add_to_grad_x, bool accumulate);
  void allocate_step_loads();
  Tensor step_loads_row(int moe_ordinal) const;    // fp32 [E]
  Tensor global_loads_row(int moe_ordinal) const;  // stats dtype [E]
  Tensor rows(const Buffer& buffer, int64_t columns) const;  // [tokens_, columns] activation view
  Tensor stat_rows(const Buffer& buffer) const;              // [tokens_] statistics view

  ModelConfig model_;
  MoeConfig moe_;
  TransformerOptions options_;
  ParameterLayout layout_;
  DType stats_dtype_;  // fp32 on CUDA, the activation dtype on the CPU
  int64_t max_tokens_ = 0;

  int token_embedding_ = -1, position_embedding_ = -1, final_norm_weight_ = -1, final_norm_bias_ = -1;
  std::vector<std::unique_ptr<Block>> blocks_;

  // The recomputed sublayers' saved activations, one set for all blocks (null without recomputation;
  // the MoE layers' share moe_memory_), and x' in mode all.
  std::unique_ptr<AttentionActivations> shared_attention_;
  std::unique_ptr<FfnActivations> shared_ffn_;
  std::shared_ptr<MoeLayerMemory> moe_memory_;
  Buffer shared_mid_;

  // Forward state.
  int64_t batch_ = 0, seq_len_ = 0, tokens_ = 0;
  uint64_t step_ = 0;  // the last forward's (the router jitter's step; a recompute repeats it)
  bool has_training_forward_ = false;
  Tensor tokens_view_;
  std::vector<Buffer> residual_;  // L + 1 buffers [T, D]: block inputs and the last block's output
  Buffer final_norm_out_, final_mean_, final_rstd_, logits_, token_losses_, loss_summary_;
  mutable HostReads stat_reads_;  // read_stats' batched read (its staging buffers persist)
  Buffer moe_out_;  // an MoE layer's output rows before the residual add, with shared experts or in a
                    // recompute (backward never reads them)
  Tensor logits_view_;
  Buffer attention_workspace_;
  int64_t attention_workspace_bytes_ = 0;
  // Routing balance: this step's expert loads (fp32) and the global-batch loss's running sums (the
  // stats dtype), each [moe blocks, E]; the reducer over the ranks.
  Buffer step_loads_, global_loads_;
  LoadReducer load_reducer_;
  MoeStageObserver* stage_observer_ = nullptr;
  // The shared experts' stream (made on first use for the compute stream it overlaps).
  std::unique_ptr<SideStream> shared_expert_stream_;

  // Backward scratch, shared by the blocks (allocated by the first backward).
  bool backward_ready_ = false;
  Buffer grad_residual_, grad_a_, grad_b_, grad_qkv_, grad_attention_, grad_ffn_pre_, grad_ffn_post_;
};

}  // namespace switchyard
