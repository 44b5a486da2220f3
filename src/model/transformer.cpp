// The transformer's parameters, buffers and forward pass (math: src/model/transformer.h).
// Backward lives in transformer_backward.cpp.
#include "src/model/transformer.h"
#include "src/core/switches.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "src/comm/parallel_layout.h"
#include "src/model/routing_observer.h"
#include "src/ops/ops.h"
#include "src/model/transformer_block.h"

namespace switchyard {
namespace {

MoeLayerConfig moe_layer_config(const ModelConfig& model, const MoeConfig& moe, const TransformerOptions& options,
                                int block_index) {
  MoeLayerConfig config;
  config.moe = moe;
  config.moe.dropless = moe.dropless || options.dropless;
  config.d_model = model.d_model;
  config.tokens_per_sequence = model.seq_len;  // the sequence-level loss's sequences
  config.jitter_seed = options.jitter_seed;
  config.jitter_stream = uint32_t(block_index);  // independent noise per layer
  return config;
}

int64_t activation_columns(ExpertActivation activation, int64_t width) {
  return activation == ExpertActivation::swiglu ? 2 * width : width;
}

}  // namespace

ParameterLayout Transformer::build_layout(const ModelConfig& model, const MoeConfig& moe, int ep_size, int ep_rank) {
  // The experts are placed as on the ranks of one expert-parallel group (its rank ep_rank).
  const ParallelLayout parallel(/*world_size=*/ep_size, ep_size, moe.num_experts);
  SY_CHECK(ep_rank >= 0 && ep_rank < ep_size, "build_layout: ep_rank ", ep_rank, " of ", ep_size);
  const int64_t local_experts = parallel.experts_per_rank();
  const int64_t first_expert = parallel.placement(ep_rank).first_expert;
  const int64_t d_model = model.d_model, vocab = model.vocab_size;
  const double std = model.init_std, residual_std = model.init_std / std::sqrt(2.0 * model.n_layers);
  const bool layernorm = model.norm == NormKind::layernorm;
  ParameterLayout layout;
  auto matrix = [&](const std::string& name, std::vector<int64_t> shape, double init_std) {
    ParameterSpec spec;
    spec.name = name;
    spec.shape = std::move(shape);
    spec.init_std = init_std;
    return layout.add(spec);
  };
  auto norm = [&](const std::string& prefix) {
    ParameterSpec weight;
    weight.name = prefix + ".weight";
    weight.shape = {d_model};
    weight.init = ParameterInit::ones;
    weight.weight_decay = false;
    layout.add(weight);
    if (!layernorm) return;
    ParameterSpec bias = weight;
    bias.name = prefix + ".bias";
    bias.init = ParameterInit::zeros;
    layout.add(bias);
  };
  matrix("embedding.token", {vocab, d_model}, std);
  if (model.positions == PositionKind::learned) matrix("embedding.position", {model.seq_len, d_model}, std);
  for (int block = 0; block < model.n_layers; ++block) {
    const std::string prefix = "blocks." + std::to_string(block);
    norm(prefix + ".attn_norm");
    matrix(prefix + ".attn.qkv", {d_model, 3 * d_model}, std);
    matrix(prefix + ".attn.out", {d_model, d_model}, residual_std);
    norm(prefix + ".ffn_norm");
    if (!model.block_is_moe(block)) {
      matrix(prefix + ".ffn.w1", {d_model, activation_columns(moe.activation, model.d_ff)}, std);
      matrix(prefix + ".ffn.w2", {model.d_ff, d_model}, residual_std);
      continue;
    }
    matrix(prefix + ".moe.router", {d_model, moe.num_experts}, std);
    if (moe.uses_routing_bias()) {  // aux-loss-free balancing: zeros, no gradient, no decay, replicated
      ParameterSpec bias;
      bias.name = prefix + ".moe.router_bias";
      bias.shape = {moe.num_experts};
      bias.init = ParameterInit::zeros;
      bias.weight_decay = false;
      layout.add(bias);
    }
    if (moe.num_shared_experts > 0) {  // dense (replicated, all-reduced over the world), not sharded
      matrix(prefix + ".moe.shared.w1", {d_model, activation_columns(moe.activation, moe.shared_ffn_width())}, std);
      matrix(prefix + ".moe.shared.w2", {moe.shared_ffn_width(), d_model}, residual_std);
    }
    for (int which = 1; which <= 2; ++which) {
      ParameterSpec expert;
      expert.name = prefix + ".moe.w" + std::to_string(which);
      expert.shape = which == 1 ? std::vector<int64_t>{local_experts, d_model,
                                                       activation_columns(moe.activation, moe.expert_d_ff)}
                                : std::vector<int64_t>{local_experts, moe.expert_d_ff, d_model};
      expert.group = ParameterGroup::expert;
      expert.init_std = which == 1 ? std : residual_std;
      expert.expert_first = first_expert;
      expert.expert_total = moe.num_experts;
      layout.add(expert);
    }
  }
  norm("final_norm");
  layout.finalize();
  return layout;
}

Transformer::Transformer(const ModelConfig& model, const MoeConfig& moe, const TransformerOptions& options)
    : model_(model), moe_(moe), options_(options) {
  if (options_.max_seq_len == 0) options_.max_seq_len = model.seq_len;
  const DeviceKind device = options_.device;
  const DType dtype = options_.activation_dtype;
  if (device == DeviceKind::cpu)
    SY_CHECK_INPUT(dtype == DType::f32 || dtype == DType::f64, "the CPU backend computes in fp32 or fp64, not ",
                   dtype_name(dtype));
  else
    SY_CHECK_INPUT(dtype == DType::bf16 || dtype == DType::f16, "the CUDA backend computes in bf16 or fp16, not ",
                   dtype_name(dtype), " (set model.compute_dtype to bf16 or fp16)");
  SY_CHECK_INPUT(options_.max_batch >= 1 && options_.max_seq_len >= 1 && options_.max_seq_len <= model.seq_len,
                 "Transformer: need 1 <= max_seq_len <= model.seq_len and max_batch >= 1");
  SY_CHECK_INPUT(moe.complexity != ComplexityMode::given,
                 "moe.complexity = given needs a per-token complexity signal, which token files do not carry "
                 "(use none or entropy)");
  SY_CHECK(model.d_model % model.n_heads == 0, "n_heads must divide d_model");
  SY_CHECK_INPUT(moe.num_shared_experts >= 0 && (moe.num_shared_experts == 0 || moe.shared_expert_d_ff >= 1),
                 "Transformer: moe.num_shared_experts = ", moe.num_shared_experts, " needs >= 0 and, when not 0, ",
                 "moe.shared_expert_d_ff >= 1 (got ", moe.shared_expert_d_ff, ")");
  SY_CHECK_INPUT(model.dense_first_blocks >= 0, "Transformer: model.dense_first_blocks = ", model.dense_first_blocks,
                 " must be >= 0");
  stats_dtype_ = device == DeviceKind::cpu ? dtype : DType::f32;
  max_tokens_ = options_.max_batch * options_.max_seq_len;
  layout_ = build_layout(model, moe, options_.ep_size, options_.ep_rank);

  token_embedding_ = layout_.find("embedding.token");
  position_embedding_ = layout_.find("embedding.position");
  final_norm_weight_ = layout_.find("final_norm.weight");
  final_norm_bias_ = layout_.find("final_norm.bias");

  const size_t element = dtype_size(dtype), stat = dtype_size(stats_dtype_);
  const size_t tokens = size_t(max_tokens_), width = size_t(model.d_model);
  if (recomputes_attention()) shared_attention_ = make_attention_activations();
  if (recomputes_ffn()) {  // sized for the widest dense FFN: dense blocks' and shared experts'
    const int64_t shared_width = model.moe_block_count() > 0 ? moe.shared_ffn_width() : 0;
    const int64_t dense_width = model.moe_block_count() < model.n_layers ? model.d_ff : 0;
    const int64_t hidden = std::max(shared_width, dense_width);
    shared_ffn_ = make_ffn_activations(activation_columns(moe_.activation, hidden), hidden);
    moe_memory_ = std::make_shared<MoeLayerMemory>(device);
  }
  if (options_.recompute == RecomputeMode::all) shared_mid_ = Buffer(device, tokens * width * element);
  for (int index = 0; index < model.n_layers; ++index) {
    auto block = std::make_unique<Block>();
    const std::string prefix = "blocks." + std::to_string(index);
    block->index = index;
    block->moe_ordinal = model.moe_ordinal(index);
    block->is_moe = model.block_is_moe(index);
    block->attn_norm_weight = layout_.find(prefix + ".attn_norm.weight");
    block->attn_norm_bias = layout_.find(prefix + ".attn_norm.bias");
    block->qkv = layout_.find(prefix + ".attn.qkv");
    block->out = layout_.find(prefix + ".attn.out");
    block->ffn_norm_weight = layout_.find(prefix + ".ffn_norm.weight");
    block->ffn_norm_bias = layout_.find(prefix + ".ffn_norm.bias");
    if (block->is_moe) {
      block->router = layout_.find(prefix + ".moe.router");
      block->router_bias = layout_.find(prefix + ".moe.router_bias");
      block->expert_w1 = layout_.find(prefix + ".moe.w1");
      block->expert_w2 = layout_.find(prefix + ".moe.w2");
      block->moe = make_moe_block(moe_layer_config(model, moe, options_, index), device, dtype, max_tokens_,
                                  options_.ep_size, options_.groups, options_.ep, moe_memory_);
      const ParameterSpec& shard = layout_.spec(block->expert_w1);
      SY_CHECK(block->moe->first_local_expert() == shard.expert_first && block->moe->local_experts() == shard.shape[0],
               "Transformer: the MoE layer holds experts from ", block->moe->first_local_expert(), " (",
               block->moe->local_experts(), "), the parameters from ", shard.expert_first, " (", shard.shape[0], ")");
      if (moe.num_shared_experts > 0)
        block->ffn = make_dense_ffn(layout_.find(prefix + ".moe.shared.w1"), layout_.find(prefix + ".moe.shared.w2"),
                                    moe.shared_ffn_width());
    } else {
      block->ffn = make_dense_ffn(layout_.find(prefix + ".ffn.w1"), layout_.find(prefix + ".ffn.w2"), model.d_ff);
    }
    // Saved activations: the block's own, or the shared set of a recomputed sublayer.
    if (!shared_attention_) block->own_attention = make_attention_activations();
    block->attention = shared_attention_ ? shared_attention_.get() : block->own_attention.get();
    if (!shared_ffn_) block->own_ffn = make_ffn_activations(block->ffn.w1_columns, block->ffn.hidden);
    block->ffn_saved = shared_ffn_ ? shared_ffn_.get() : block->own_ffn.get();
    if (!shared_mid_.data()) block->own_mid = Buffer(device, tokens * width * element);
    block->mid = shared_mid_.data() ? &shared_mid_ : &block->own_mid;
    blocks_.push_back(std::move(block));
  }
  if (model.moe_block_count() > 0) moe_out_ = Buffer(device, tokens * width * element);
  allocate_step_loads();
  for (int index = 0; index <= model.n_layers; ++index) residual_.emplace_back(device, tokens * width * element);
  final_norm_out_ = Buffer(device, tokens * width * element);
  final_rstd_ = Buffer(device, tokens * stat);
  if (model.norm == NormKind::layernorm) final_mean_ = Buffer(device, tokens * stat);
  logits_ = Buffer(device, tokens * size_t(model.vocab_size) * element);
  token_losses_ = Buffer(device, tokens * stat);
  loss_summary_ = Buffer(device, size_t(kNumCrossEntropySummary) * stat);
  stat_reads_ = HostReads(device);

  if (device == DeviceKind::cuda) {
    // As many (sequence, head) pairs per pass as fit under the cap, at least one.
    AttentionShape shape{options_.max_batch, options_.max_seq_len, model.n_heads, model.head_dim()};
    int64_t pairs = shape.pairs();
    while (pairs > 1 && attention_workspace_bytes(shape, dtype, pairs) > options_.attention_workspace_limit_bytes)
      pairs = (pairs + 1) / 2;
    attention_workspace_bytes_ = attention_workspace_bytes(shape, dtype, pairs);
    attention_workspace_ = Buffer(device, size_t(attention_workspace_bytes_));
  }
}

Transformer::~Transformer() = default;

Transformer::DenseFfn Transformer::make_dense_ffn(int w1, int w2, int64_t hidden) const {
  SY_CHECK(w1 >= 0 && w2 >= 0, "Transformer: a dense FFN without its w1 / w2 parameters");
  DenseFfn ffn;
  ffn.w1 = w1;
  ffn.w2 = w2;
  ffn.hidden = hidden;
  ffn.w1_columns = activation_columns(moe_.activation, hidden);
  return ffn;
}

bool Transformer::recomputes_attention() const {
  return options_.recompute == RecomputeMode::attention || options_.recompute == RecomputeMode::all;
}

bool Transformer::recomputes_ffn() const {
  return options_.recompute == RecomputeMode::moe || options_.recompute == RecomputeMode::all;
}

std::unique_ptr<Transformer::AttentionActivations> Transformer::make_attention_activations() const {
  const DeviceKind device = options_.device;
  const size_t element = dtype_size(options_.activation_dtype), stat = dtype_size(stats_dtype_);
  const size_t tokens = size_t(max_tokens_), width = size_t(model_.d_model);
  auto saved = std::make_unique<AttentionActivations>();
  saved->norm_out = Buffer(device, tokens * width * element);
  saved->norm_rstd = Buffer(device, tokens * stat);
  if (model_.norm == NormKind::layernorm) saved->norm_mean = Buffer(device, tokens * stat);
  saved->qkv_rows = Buffer(device, tokens * 3 * width * element);
  saved->attention_out = Buffer(device, tokens * width * element);
  saved->attention_stats =
      Buffer(device, size_t(options_.max_batch) * size_t(model_.n_heads) * size_t(options_.max_seq_len) * stat);
  return saved;
}

std::unique_ptr<Transformer::FfnActivations> Transformer::make_ffn_activations(int64_t w1_columns,
                                                                               int64_t hidden) const {
  const DeviceKind device = options_.device;
  const size_t element = dtype_size(options_.activation_dtype), stat = dtype_size(stats_dtype_);
  const size_t tokens = size_t(max_tokens_), width = size_t(model_.d_model);
  auto saved = std::make_unique<FfnActivations>();
  saved->norm_out = Buffer(device, tokens * width * element);
  saved->norm_rstd = Buffer(device, tokens * stat);
  if (model_.norm == NormKind::layernorm) saved->norm_mean = Buffer(device, tokens * stat);
  if (hidden > 0) {
    saved->pre = Buffer(device, tokens * size_t(w1_columns) * element);
    saved->post = Buffer(device, tokens * size_t(hidden) * element);
  }
  return saved;
}

void Transformer::dense_ffn_forward(const ExecContext& context, const ModelParameters& parameters,
                                    const DenseFfn& ffn, const FfnActivations& saved, const Tensor& input,
                                    const Tensor& residual, Tensor* out) {
  Tensor pre = rows(saved.pre, ffn.w1_columns);
  Tensor post = rows(saved.post, ffn.hidden);
  const int64_t tokens = input.dim(0), width = input.dim(1);
  stage(context, "GEMM 1", matmul_flops(tokens, width, ffn.w1_columns),
        [&] { ops::gemm(context, false, false, 1.0f, input, parameters.compute(ffn.w1), 0.0f, pre); });
  stage(context, "activation", [&] { ops::activation_forward(context, moe_.activation, pre, post); });
  if (out)
    stage(context, "GEMM 2", matmul_flops(tokens, ffn.hidden, width),
          [&] { ops::gemm(context, false, false, 1.0f, post, parameters.compute(ffn.w2), 1.0f, *out, &residual); });
}

void Transformer::set_stage_observer(MoeStageObserver* observer) {
  stage_observer_ = observer;
  for (const auto& block : blocks_)
    if (block->is_moe) block->moe->set_stage_observer(observer);
}

int Transformer::moe_block_count() const {
  int count = 0;
  for (const auto& block : blocks_) count += block->is_moe ? 1 : 0;
  return count;
}

Tensor Transformer::rows(const Buffer& buffer, int64_t columns) const {
  return buffer.view(options_.activation_dtype, {tokens_, columns});
}

Tensor Transformer::stat_rows(const Buffer& buffer) const {
  if (buffer.data() == nullptr) return Tensor(nullptr, stats_dtype_, options_.device, {0});
  return buffer.view(stats_dtype_, {tokens_});
}

void Transformer::norm_forward(const ExecContext& context, const ModelParameters& parameters, int weight, int bias,
                               const Tensor& x, Tensor& out, Tensor& mean, Tensor& rstd, const char* stage_name) {
  stage(context, stage_name, [&] {
    if (model_.norm == NormKind::layernorm) {
      ops::layernorm_forward(context, x, parameters.compute(weight), parameters.compute(bias), kNormEps, out, mean,
                             rstd);
    } else {
      ops::rmsnorm_forward(context, x, parameters.compute(weight), kNormEps, out, rstd);
    }
  });
}

void Transformer::forward_body(const ExecContext& context, const ModelParameters& parameters, const Tensor& tokens,
                               int64_t batch, int64_t seq_len, bool training, uint64_t step) {
  SY_CHECK(context.device == options_.device && parameters.device() == options_.device,
           "Transformer: context, parameters and model must share a device");
  SY_CHECK(parameters.compute_dtype() == options_.activation_dtype, "Transformer: parameters compute in ",
           dtype_name(parameters.compute_dtype()), ", the model in ", dtype_name(options_.activation_dtype));
  SY_CHECK(parameters.layout().size() == layout_.size(), "Transformer: parameters of a different layout");
  SY_CHECK(batch >= 1 && batch <= options_.max_batch && seq_len >= 1 && seq_len <= options_.max_seq_len,
           "Transformer: batch ", batch, " x seq_len ", seq_len, " exceeds the allocated ", options_.max_batch,
           " x ", options_.max_seq_len);
  SY_CHECK(tokens.dtype == DType::i32 && tokens.numel() == batch * seq_len && tokens.device == options_.device,
           "Transformer: tokens must be int32 [", batch * seq_len, "] on ", device_kind_name(options_.device),
           ", got ", tokens.describe());
  has_training_forward_ = false;
  batch_ = batch;
  seq_len_ = seq_len;
  tokens_ = batch * seq_len;
  step_ = step;
  tokens_view_ = tokens;

  Tensor x0 = rows(residual_[0], model_.d_model);
  Tensor position_table = position_embedding_ >= 0 ? parameters.compute(position_embedding_) : Tensor();
  stage(context, "embedding", [&] {
    ops::embedding_forward(context, tokens, parameters.compute(token_embedding_),
                           position_embedding_ >= 0 ? &position_table : nullptr, seq_len, x0);
  });
  for (size_t index = 0; index < blocks_.size(); ++index) {
    Tensor x = rows(residual_[index], model_.d_model);
    Tensor x_out = rows(residual_[index + 1], model_.d_model);
    forward_block(context, parameters, *blocks_[index], x, x_out, training, step);
  }
  Tensor last = rows(residual_.back(), model_.d_model);
  Tensor normed = rows(final_norm_out_, model_.d_model);
  Tensor mean = stat_rows(final_mean_), rstd = stat_rows(final_rstd_);
  norm_forward(context, parameters, final_norm_weight_, final_norm_bias_, last, normed, mean, rstd);
  logits_view_ = rows(logits_, model_.vocab_size);
  stage(context, "LM head", [&] {
    ops::gemm(context, false, true, 1.0f, normed, parameters.compute(token_embedding_), 0.0f, logits_view_);
  });
}

void Transformer::forward_block(const ExecContext& context, const ModelParameters& parameters, Block& block,
                                const Tensor& x, Tensor& x_out, bool training, uint64_t step) {
  Tensor mid = rows(*block.mid, model_.d_model);
  attention_sublayer_forward(context, parameters, block, x, &mid, false);
  ffn_sublayer_forward(context, parameters, block, mid, &x_out, training, step);
}

void Transformer::attention_sublayer_forward(const ExecContext& context, const ModelParameters& parameters,
                                             Block& block, const Tensor& x, Tensor* mid, bool recompute) {
  const int64_t width = model_.d_model;
  const AttentionActivations& saved = *block.attention;
  Tensor normed = rows(saved.norm_out, width);
  Tensor mean1 = stat_rows(saved.norm_mean), rstd1 = stat_rows(saved.norm_rstd);
  norm_forward(context, parameters, block.attn_norm_weight, block.attn_norm_bias, x, normed, mean1, rstd1,
               recompute ? "norm recompute" : "norm");
  Tensor qkv = rows(saved.qkv_rows, 3 * width);
  Tensor attention = rows(saved.attention_out, width);
  stage(context, recompute ? "attention recompute" : "attention", [&] {
    const int64_t tokens = normed.dim(0);
    stage(context, "QKV projection", matmul_flops(tokens, width, 3 * width),
          [&] { ops::gemm(context, false, false, 1.0f, normed, parameters.compute(block.qkv), 0.0f, qkv); });
    const AttentionShape shape{batch_, seq_len_, model_.n_heads, model_.head_dim()};
    if (model_.positions == PositionKind::rotary)
      stage(context, "rotary", [&] { ops::rotary_forward(context, shape, qkv, kRotaryBase, 0, qkv); });
    Tensor stats = saved.attention_stats.view(stats_dtype_, {batch_, model_.n_heads, seq_len_});
    Tensor workspace(attention_workspace_.data(), DType::u8, options_.device, {attention_workspace_bytes_});
    stage(context, "attention core", causal_attention_flops(shape),
          [&] { ops::attention_forward(context, shape, qkv, attention, stats, workspace); });
    if (!mid) return;
    stage(context, "output projection", matmul_flops(tokens, width, width), [&] {
      // mid = x + attention Wo: the residual is the GEMM's addend
      ops::gemm(context, false, false, 1.0f, attention, parameters.compute(block.out), 1.0f, *mid, &x);
    });
  });
}

void Transformer::ffn_sublayer_forward(const ExecContext& context, const ModelParameters& parameters, Block& block,
                                       const Tensor& mid, Tensor* x_out, bool training, uint64_t step) {
  const int64_t width = model_.d_model;
  const bool recompute = x_out == nullptr;
  const FfnActivations& saved = *block.ffn_saved;
  Tensor normed2 = rows(saved.norm_out, width);
  Tensor mean2 = stat_rows(saved.norm_mean), rstd2 = stat_rows(saved.norm_rstd);
  norm_forward(context, parameters, block.ffn_norm_weight, block.ffn_norm_bias, mid, normed2, mean2, rstd2,
               recompute ? "norm recompute" : "norm");
  if (!block.is_moe) {  // x_out = mid + FFN(u): the down-projection adds the residual
    stage(context, recompute ? "dense FFN recompute" : "dense FFN",
          [&] { dense_ffn_forward(context, parameters, block.ffn, saved, normed2, mid, x_out); });
    return;
  }
  MoeWeights weights{parameters.compute(block.router), parameters.compute(block.expert_w1),
                     parameters.compute(block.expert_w2)};
  // The router bias is read from the fp32 master weights, never a bf16 copy (src/model/moe_router.h).
  const Tensor router_bias = block.router_bias >= 0 ? parameters.master(block.router_bias) : Tensor();
  if (block.router_bias >= 0) weights.router_bias = &router_bias;
  MoeForwardArgs args;
  args.training = training;
  args.step = step;
  args.recompute = recompute;  // repeats the routing; gathers no loads (src/model/moe_router.h)
  Tensor global_loads;
  if (training && !recompute && moe_.global_aux_loss_weight > 0.0) {
    global_loads = global_loads_row(block.moe_ordinal);
    args.global_loads = &global_loads;
    if (load_reducer_) args.load_reducer = &load_reducer_;
  }
  // The shared experts first, on their stream: x_out = x' + shared(u) there, while the routed layer
  // runs here and writes only moe_out (src/model/transformer.h). Without them the routed layer
  // writes x_out, and the residual is added to it.
  SideStream& side = shared_expert_stream(context);
  if (block.has_shared_experts()) {
    side.fork();
    const ExecContext side_context{context.device, side.stream()};
    stage(side_context, recompute ? "shared experts recompute" : "shared experts",
          [&] { dense_ffn_forward(side_context, parameters, block.ffn, saved, normed2, mid, x_out); });
  }
  Tensor moe_out = x_out && !block.has_shared_experts() ? *x_out : rows(moe_out_, width);
  stage(context, recompute ? "MoE recompute" : "MoE", [&] {
    block.moe->forward(context, normed2, weights, args, moe_out);
    if (recompute) return;  // the step loads and the taps saw this forward the first time
    if (training) {  // this step's expert loads (the router bias update reads them)
      stage(context, "step loads", [&] {
        Tensor loads = step_loads_row(block.moe_ordinal);
        ops::accumulate_expert_load(context, block.moe->routing().expert_counts, loads);
      });
    }
    // Analysis taps (router statistics, specialization maps): a no-op unless one is installed.
    stage(context, "routing taps", [&] {
      notify_routing(context, block.moe_ordinal, training, block.moe->routing(), block.moe->router_logits());
    });
  });
  if (block.has_shared_experts()) side.join();
  if (recompute) return;
  // x_out = (x' + shared(u)) + moe_out with shared experts, moe_out + x' without.
  stage(context, "residual", [&] { ops::add_into(context, block.has_shared_experts() ? moe_out : mid, *x_out); });
}

SideStream& Transformer::shared_expert_stream(const ExecContext& context) {
  const bool active = context.device == DeviceKind::cuda && switches().shared_expert_stream && !stage_observer_;
  SideStream* side = shared_expert_stream_.get();
  if (!side || side->active() != active || side->compute_stream() != context.stream)
    shared_expert_stream_ = std::make_unique<SideStream>(context.device, context.stream, active);
  return *shared_expert_stream_;
}

void Transformer::forward_loss(const ExecContext& context, const ModelParameters& parameters, const Tensor& tokens,
                               const Tensor& targets, int64_t batch, int64_t seq_len, ForwardMode mode,
                               float ce_grad_scale, uint64_t step) {
  const bool training = mode == ForwardMode::training;
  forward_body(context, parameters, tokens, batch, seq_len, training, step);
  SY_CHECK(targets.dtype == DType::i32 && targets.numel() == tokens_ && targets.device == options_.device,
           "Transformer: targets must be int32 [", tokens_, "] on the model's device, got ", targets.describe());
  Tensor token_losses = stat_rows(token_losses_);
  Tensor summary = loss_summary_.view(stats_dtype_, {kNumCrossEntropySummary});
  Tensor target_view = make_tensor(targets.data, DType::i32, targets.device, {tokens_});
  stage(context, "loss", [&] {
    ops::cross_entropy(context, logits_view_, target_view, ce_grad_scale, token_losses, summary,
                       training ? &logits_view_ : nullptr);
  });
  has_training_forward_ = training;
}

const Tensor& Transformer::forward_logits(const ExecContext& context, const ModelParameters& parameters,
                                          const Tensor& tokens, int64_t batch, int64_t seq_len) {
  forward_body(context, parameters, tokens, batch, seq_len, false, 0);
  return logits_view_;
}

TransformerActivationMemory Transformer::activation_memory() const {
  auto attention_bytes = [](const AttentionActivations& saved) {
    return int64_t(saved.norm_out.bytes() + saved.norm_mean.bytes() + saved.norm_rstd.bytes() +
                   saved.qkv_rows.bytes() + saved.attention_out.bytes() + saved.attention_stats.bytes());
  };
  auto ffn_bytes = [](const FfnActivations& saved) {
    return int64_t(saved.norm_out.bytes() + saved.norm_mean.bytes() + saved.norm_rstd.bytes() + saved.pre.bytes() +
                   saved.post.bytes());
  };
  TransformerActivationMemory memory;
  for (const Buffer& buffer : residual_) memory.residual += int64_t(buffer.bytes());
  for (const auto& block : blocks_) {
    if (block->own_attention) memory.per_block += attention_bytes(*block->own_attention);
    if (block->own_ffn) memory.per_block += ffn_bytes(*block->own_ffn);
    memory.per_block += int64_t(block->own_mid.bytes());
    if (block->is_moe && !moe_memory_) memory.per_block += int64_t(block->moe->memory().activation_bytes());
  }
  if (shared_attention_) memory.shared += attention_bytes(*shared_attention_);
  if (shared_ffn_) memory.shared += ffn_bytes(*shared_ffn_);
  memory.shared += int64_t(shared_mid_.bytes());
  if (moe_memory_) memory.shared += int64_t(moe_memory_->activation_bytes());
  return memory;
}

TransformerStats Transformer::read_stats(const ExecContext& context) const {
  // Every statistic in one read with one wait (src/ops/host_reads.h), not a wait per tensor.
  stat_reads_.clear();
  HostFloats<kNumCrossEntropySummary> summary;
  stat_reads_.add(loss_summary_.view(stats_dtype_, {kNumCrossEntropySummary}), summary.destination(stats_dtype_));
  std::vector<MoeStatsReadout> readouts(static_cast<size_t>(moe_block_count()));  // sized first: reads point in
  size_t next = 0;
  for (const auto& block : blocks_)
    if (block->is_moe) block->moe->stage_stat_reads(stat_reads_, readouts[next++]);
  stat_reads_.read(context);

  TransformerStats stats;
  stats.tokens = int64_t(std::llround(summary.value(kCrossEntropyValidTokens, stats_dtype_)));
  stats.loss_sum = summary.value(kCrossEntropyMeanLoss, stats_dtype_) * double(stats.tokens);
  next = 0;
  for (const auto& block : blocks_)
    if (block->is_moe) stats.moe.push_back(block->moe->stats_from(readouts[next++]));
  return stats;
}

}  // namespace switchyard
