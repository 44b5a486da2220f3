// Internal to src/model/transformer*.cpp: one block's parameter indices and saved activations.
#pragma once

#include <memory>

#include "src/model/transformer.h"

namespace switchyard {

constexpr double kRotaryBase = 10000.0;
constexpr float kNormEps = 1e-5f;

struct Transformer::Block {
  int index = 0;
  bool is_moe = false;
  int moe_ordinal = 0;  // MoE blocks: the index among the MoE blocks (routing taps, router statistics)
  // Parameter indices (-1: absent).
  int attn_norm_weight = -1, attn_norm_bias = -1, qkv = -1, out = -1;
  int ffn_norm_weight = -1, ffn_norm_bias = -1;
  int router = -1, expert_w1 = -1, expert_w2 = -1;  // MoE FFN
  int router_bias = -1;                              // MoE FFN with moe.bias_update_rate > 0
  std::unique_ptr<MoeBlock> moe;
  // Dense blocks: the FFN (ffn.w1 / ffn.w2). MoE blocks: the shared experts (moe.shared.w1 /
  // .w2), absent (w1 = -1) without them.
  DenseFfn ffn;
  bool has_shared_experts() const { return is_moe && ffn.w1 >= 0; }

  // Activations of the last forward, kept for backward: the block's own (own_*), or for a
  // sublayer that options.recompute recomputes, the model's one shared set.
  AttentionActivations* attention = nullptr;
  FfnActivations* ffn_saved = nullptr;
  Buffer* mid = nullptr;  // x' = x + attention: the FFN sublayer's input
  std::unique_ptr<AttentionActivations> own_attention;
  std::unique_ptr<FfnActivations> own_ffn;
  Buffer own_mid;
};

}  // namespace switchyard
