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
  // Parameter indices (-1: absent).
  int attn_norm_weight = -1, attn_norm_bias = -1, qkv = -1, out = -1;
  int ffn_norm_weight = -1, ffn_norm_bias = -1;
  int ffn_w1 = -1, ffn_w2 = -1;                     // dense FFN
  int router = -1, expert_w1 = -1, expert_w2 = -1;  // MoE FFN
  std::unique_ptr<MoeBlock> moe;

  // Activations of the last forward, kept for backward.
  Buffer norm1_out, norm1_mean, norm1_rstd, qkv_rows, attention_out, attention_stats, mid;
  Buffer norm2_out, norm2_mean, norm2_rstd, ffn_pre, ffn_post, moe_out;
};

}  // namespace switchyard
