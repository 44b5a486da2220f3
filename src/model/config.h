// The model's configuration: the architecture keys of the `model:` and `moe:` sections of a run
// config (src/train/config.h parses, defaults and validates them; configs/README.md documents
// them). They live in the model layer because they define what the model is: the transformer,
// its MoE blocks and the checkpoint's tensor shapes are built from them alone.
#pragma once

#include <cstdint>

#include "src/core/dtype.h"
#include "src/ops/moe_ops.h"

namespace switchyard {

enum class NormKind : uint8_t { layernorm, rmsnorm };
enum class PositionKind : uint8_t { learned, rotary };
// ExpertActivation (gelu_tanh | swiglu) and ComplexityMode (how many experts, between k_min and
// top_k, each token uses: none = always top_k; given = a per-token complexity supplied with the
// data; entropy = from the router's own entropy) come from src/ops/moe_ops.h.
// sparse: each expert sees only its routed tokens; dense: every expert runs on every token and
// the gates mask the result (a reference for the sparse path, slow).
enum class ExpertComputeMode : uint8_t { sparse, dense };
// Activation recomputation (training.recompute): which sublayers' activations backward recomputes
// instead of keeping them per block. moe: the FFN sublayer (MoE or dense); attention: the attention
// sublayer; all: both. Semantics and memory: TransformerOptions::recompute (src/model/transformer.h).
enum class RecomputeMode : uint8_t { none, moe, attention, all };

struct ModelConfig {
  int vocab_size = 256;
  int d_model = 0;   // required
  int n_layers = 0;  // required
  int n_heads = 0;   // required
  int seq_len = 0;   // required
  int d_ff = 0;      // default 4 * d_model
  NormKind norm = NormKind::rmsnorm;
  PositionKind positions = PositionKind::rotary;
  int moe_every = 1;  // block b (0-based) has an MoE FFN when (b + 1) % moe_every == 0 ...
  int dense_first_blocks = 0;  // ... and b >= dense_first_blocks (DeepSeek-V3 keeps its first 3 dense)
  DType compute_dtype = DType::bf16;
  double init_std = 0.02;

  int head_dim() const { return d_model / n_heads; }
  bool block_is_moe(int block) const { return block >= dense_first_blocks && (block + 1) % moe_every == 0; }
  int moe_block_count() const { return moe_ordinal(n_layers); }
  // The MoE blocks before `block` (for an MoE block: its index among the MoE blocks, from 0; the
  // layer index of router statistics and routing taps).
  int moe_ordinal(int block) const {
    int count = 0;
    for (int earlier = 0; earlier < block; ++earlier) count += block_is_moe(earlier) ? 1 : 0;
    return count;
  }
};

struct MoeConfig {
  int num_experts = 0;  // required
  int top_k = 2;
  int k_min = 2;        // default top_k
  int expert_d_ff = 0;  // default model.d_ff
  // Always-active shared experts of every MoE block (DeepSeek-V3): y = routed(u) + sum_s FFN_s(u),
  // each a dense FFN of width shared_expert_d_ff with the experts' activation. They run as one FFN
  // of width num_shared_experts * shared_expert_d_ff, which is the same function (see
  // src/model/transformer.h).
  int num_shared_experts = 0;
  int shared_expert_d_ff = 0;  // default expert_d_ff
  int shared_ffn_width() const { return num_shared_experts * shared_expert_d_ff; }
  ExpertActivation activation = ExpertActivation::gelu_tanh;
  double capacity_factor = 1.25;
  double eval_capacity_factor = 2.0;
  bool dropless = false;
  bool renormalize_gates = true;  // default: top_k > 1
  double jitter_eps = 0.0;
  double aux_loss_weight = 1e-2;
  double z_loss_weight = 1e-3;
  ComplexityMode complexity = ComplexityMode::none;
  ExpertComputeMode compute_mode = ExpertComputeMode::sparse;
  int segment_alignment = 128;
  // The modern routing options (src/ops/moe_ops.h has their semantics; the defaults are Switch).
  RoutingMethod routing = RoutingMethod::token_choice;      // token_choice | expert_choice
  ScoreFunction score_function = ScoreFunction::softmax;    // softmax | sigmoid
  double routed_scaling_factor = 1.0;
  // > 0: aux-loss-free balancing (DeepSeek-V3). Each MoE block gets a router bias [E] (training
  // state, fp32, in the dense parameter group without gradient or decay) that moves by this much
  // after every optimizer step, toward balance, from the step's load over all ranks.
  double bias_update_rate = 0.0;
  double seq_aux_loss_weight = 0.0;     // sequence-level balance loss (sequences of model.seq_len)
  double global_aux_loss_weight = 0.0;  // global-batch balance loss (loads over ranks and micro-batches)
  int num_groups = 1;                   // group-limited routing: experts in num_groups groups ...
  int topk_groups = 0;                  // ... of which a token may use this many (default num_groups)
  DropPolicy drop_policy = DropPolicy::position;  // position | probability
  bool uses_routing_bias() const { return bias_update_rate > 0.0; }
};

// Names used in YAML for the enums (and their inverse for messages).
const char* norm_kind_name(NormKind kind);
const char* position_kind_name(PositionKind kind);
const char* expert_activation_name(ExpertActivation activation);
const char* complexity_mode_name(ComplexityMode mode);
const char* expert_compute_mode_name(ExpertComputeMode mode);
const char* routing_method_name(RoutingMethod method);   // "token_choice" | "expert_choice"
const char* score_function_name(ScoreFunction function);  // "softmax" | "sigmoid"
const char* drop_policy_name(DropPolicy policy);          // "position" | "probability"
const char* compute_dtype_name(DType dtype);  // "bf16" | "fp16" | "fp32"
const char* recompute_mode_name(RecomputeMode mode);  // "none" | "moe" | "attention" | "all"

}  // namespace switchyard
