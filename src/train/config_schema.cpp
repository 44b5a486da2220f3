// The key table of the run configuration (see config.h) and the cross-field checks.
//
// Each entry binds a YAML key to a struct member through member pointers, with its range or
// choices and its default. Ranges are wide enough for any sensible run and narrow enough to catch
// typos (an extra zero, a negative sign); the reasons for the tighter ones are in the help text.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#include "src/comm/parallel_layout.h"
#include "src/core/error.h"
#include "src/ops/moe_ops.h"
#include "src/train/config.h"

namespace switchyard {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

// runs/<config file name without extension>; "runs/run" when the source has no usable name.
std::string default_run_dir(const std::string& source) {
  std::string stem = std::filesystem::path(source).stem().string();
  if (stem.empty() || stem == "." || stem == "..") stem = "run";
  return "runs/" + stem;
}
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// Shortest decimal text that reads back as exactly the same double (so the resolved config
// round-trips and stays readable: 0.0003, not 0.00029999999999999997).
std::string format_real(double value) {
  char buffer[64];
  if (value == std::floor(value) && std::fabs(value) < 1e15) {  // 600, not 6e+02
    std::snprintf(buffer, sizeof(buffer), "%.0f", value);
    return buffer;
  }
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buffer, sizeof(buffer), "%.*g", precision, value);
    if (std::strtod(buffer, nullptr) == value) break;
  }
  return buffer;
}

std::string format_real_digits(double value, int digits) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "%.*g", digits, value);
  return buffer;
}

// A double-quoted YAML scalar: always quoted so that paths like "yes", "~" or "1e3" stay text.
std::string quote_text(const std::string& text) {
  std::string quoted = "\"";
  for (char character : text) {
    switch (character) {
      case '"': quoted += "\\\""; break;
      case '\\': quoted += "\\\\"; break;
      case '\n': quoted += "\\n"; break;
      case '\t': quoted += "\\t"; break;
      default:
        if (static_cast<unsigned char>(character) < 0x20) {
          char escape[8];
          std::snprintf(escape, sizeof(escape), "\\x%02x", static_cast<unsigned char>(character));
          quoted += escape;
        } else {
          quoted += character;
        }
    }
  }
  return quoted + "\"";
}

ConfigField base_field(const char* section, const char* key, ConfigValueType type, const char* help,
                       std::string default_text) {
  ConfigField field;
  field.section = section;
  field.key = key;
  field.type = type;
  field.help = help;
  field.default_text = std::move(default_text);
  return field;
}

template <typename Section, typename Member>
ConfigField integer_field(const char* section, const char* key, Section Config::*part, Member Section::*member,
                          int64_t minimum, int64_t maximum, const char* help) {
  static_assert(std::is_integral_v<Member>, "integer_field needs an integral member");
  Config defaults;
  ConfigField field = base_field(section, key, ConfigValueType::integer, help,
                                 std::to_string((defaults.*part).*member));
  field.integer_min = minimum;
  field.integer_max = maximum;
  field.get = [part, member](const Config& config) { return std::to_string((config.*part).*member); };
  field.set = [part, member](Config& config, const ConfigValue& value) {
    (config.*part).*member = static_cast<Member>(value.integer);
  };
  return field;
}

template <typename Section>
ConfigField real_field(const char* section, const char* key, double Section::*member, Section Config::*part,
                       double minimum, bool minimum_open, double maximum, bool maximum_open, const char* help) {
  Config defaults;
  ConfigField field = base_field(section, key, ConfigValueType::real, help, format_real((defaults.*part).*member));
  field.real_min = minimum;
  field.real_max = maximum;
  field.real_min_open = minimum_open;
  field.real_max_open = maximum_open;
  field.get = [part, member](const Config& config) { return format_real((config.*part).*member); };
  field.set = [part, member](Config& config, const ConfigValue& value) { (config.*part).*member = value.real; };
  return field;
}

template <typename Section>
ConfigField boolean_field(const char* section, const char* key, bool Section::*member, Section Config::*part,
                          const char* help) {
  Config defaults;
  ConfigField field = base_field(section, key, ConfigValueType::boolean, help,
                                 (defaults.*part).*member ? "true" : "false");
  field.get = [part, member](const Config& config) { return std::string((config.*part).*member ? "true" : "false"); };
  field.set = [part, member](Config& config, const ConfigValue& value) { (config.*part).*member = value.boolean; };
  return field;
}

template <typename Section>
ConfigField text_field(const char* section, const char* key, std::string Section::*member, Section Config::*part,
                       const char* help) {
  Config defaults;
  ConfigField field = base_field(section, key, ConfigValueType::text, help, quote_text((defaults.*part).*member));
  field.get = [part, member](const Config& config) { return quote_text((config.*part).*member); };
  field.set = [part, member](Config& config, const ConfigValue& value) { (config.*part).*member = value.text; };
  return field;
}

// An enum member spelled in YAML by the names in `names` (index = enum value order given).
template <typename Section, typename Enum>
ConfigField choice_field(const char* section, const char* key, Enum Section::*member, Section Config::*part,
                         std::vector<std::pair<std::string, Enum>> names, const char* help) {
  Config defaults;
  auto name_of = [names](Enum value) {
    for (const auto& entry : names)
      if (entry.second == value) return entry.first;
    SY_THROW("enum value without a YAML name");
  };
  ConfigField field = base_field(section, key, ConfigValueType::choice, help, name_of((defaults.*part).*member));
  for (const auto& entry : names) field.choices.push_back(entry.first);
  field.get = [part, member, name_of](const Config& config) { return name_of((config.*part).*member); };
  field.set = [part, member, names](Config& config, const ConfigValue& value) {
    for (const auto& entry : names)
      if (entry.first == value.text) {
        (config.*part).*member = entry.second;
        return;
      }
    SY_THROW("choice '", value.text, "' passed the check but has no enum value");
  };
  return field;
}

ConfigField required(ConfigField field) {
  field.required = true;
  field.default_text = "(required)";
  return field;
}

ConfigField derived(ConfigField field, std::string default_text, std::function<void(Config&)> derive) {
  field.default_text = std::move(default_text);
  field.derive_default = std::move(derive);
  return field;
}

const std::vector<std::pair<std::string, DType>> kComputeDtypes = {
    {"bf16", DType::bf16}, {"fp16", DType::f16}, {"fp32", DType::f32}};

std::vector<ConfigField> build_fields() {
  using C = Config;
  std::vector<ConfigField> fields;
  auto add = [&fields](ConfigField field) { fields.push_back(std::move(field)); };

  // model
  add(integer_field("model", "vocab_size", &C::model, &ModelConfig::vocab_size, 2, kIntMax,
                    "token ids are 0 .. vocab_size-1 (256 = raw bytes, as prepare-data writes)"));
  add(required(integer_field("model", "d_model", &C::model, &ModelConfig::d_model, 8, 65536, "hidden width")));
  add(required(integer_field("model", "n_layers", &C::model, &ModelConfig::n_layers, 1, 1024, "transformer blocks")));
  add(required(integer_field("model", "n_heads", &C::model, &ModelConfig::n_heads, 1, 1024,
                             "attention heads; must divide d_model")));
  add(required(integer_field("model", "seq_len", &C::model, &ModelConfig::seq_len, 2, 1 << 20,
                             "tokens per training sequence (context length)")));
  add(derived(integer_field("model", "d_ff", &C::model, &ModelConfig::d_ff, 1, 1 << 20,
                            "hidden width of the dense FFN (blocks that are not MoE)"),
              "4 * model.d_model", [](Config& config) { config.model.d_ff = 4 * config.model.d_model; }));
  add(choice_field("model", "norm", &ModelConfig::norm, &C::model,
                   {{"layernorm", NormKind::layernorm}, {"rmsnorm", NormKind::rmsnorm}}, "normalisation before each sublayer"));
  add(choice_field("model", "positions", &ModelConfig::positions, &C::model,
                   {{"learned", PositionKind::learned}, {"rotary", PositionKind::rotary}},
                   "position encoding: learned table or rotary (needs an even head dim)"));
  add(integer_field("model", "moe_every", &C::model, &ModelConfig::moe_every, 1, 1024,
                    "block b (from 0) has an MoE FFN when (b+1) % moe_every == 0; 1 = every block"));
  add(integer_field("model", "dense_first_blocks", &C::model, &ModelConfig::dense_first_blocks, 0, 1024,
                    "blocks 0 .. N-1 have a dense FFN even where moe_every makes them MoE (at least one MoE block "
                    "must remain)"));
  add(choice_field("model", "compute_dtype", &ModelConfig::compute_dtype, &C::model, kComputeDtypes,
                   "type of activations and weight copies in GEMMs; master weights stay fp32"));
  add(real_field("model", "init_std", &ModelConfig::init_std, &C::model, 0.0, true, 1.0, false,
                 "standard deviation of the normal weight initialisation"));

  // moe
  add(required(integer_field("moe", "num_experts", &C::moe, &MoeConfig::num_experts, 1, 1024,
                             "experts per MoE layer (over all ranks)")));
  // top_k's range is the routing limit of both backends; the CUDA backend's expert limit is
  // checked in check_backend_limits (it depends on training.device).
  add(integer_field("moe", "top_k", &C::moe, &MoeConfig::top_k, 1, kMaxTopK, "experts each token is sent to"));
  add(derived(integer_field("moe", "k_min", &C::moe, &MoeConfig::k_min, 1, kMaxTopK,
                            "fewest experts a token uses under complexity routing (<= top_k)"),
              "moe.top_k", [](Config& config) { config.moe.k_min = config.moe.top_k; }));
  add(derived(integer_field("moe", "expert_d_ff", &C::moe, &MoeConfig::expert_d_ff, 1, 1 << 20,
                            "hidden width of each expert FFN"),
              "model.d_ff", [](Config& config) { config.moe.expert_d_ff = config.model.d_ff; }));
  add(integer_field("moe", "num_shared_experts", &C::moe, &MoeConfig::num_shared_experts, 0, 64,
                    "always-active shared experts of every MoE block, added to the routed output; 0 = none"));
  add(derived(integer_field("moe", "shared_expert_d_ff", &C::moe, &MoeConfig::shared_expert_d_ff, 1, 1 << 20,
                            "hidden width of each shared expert"),
              "moe.expert_d_ff", [](Config& config) { config.moe.shared_expert_d_ff = config.moe.expert_d_ff; }));
  add(choice_field("moe", "activation", &MoeConfig::activation, &C::moe,
                   {{"gelu", ExpertActivation::gelu_tanh}, {"swiglu", ExpertActivation::swiglu}},
                   "expert FFN activation (swiglu has a third weight matrix)"));
  add(real_field("moe", "capacity_factor", &MoeConfig::capacity_factor, &C::moe, 0.0, true, 64.0, false,
                 "training: expert capacity = ceil(factor * tokens * top_k / num_experts); overflow is dropped"));
  add(real_field("moe", "eval_capacity_factor", &MoeConfig::eval_capacity_factor, &C::moe, 0.0, true, 64.0, false,
                 "capacity factor during evaluation"));
  add(boolean_field("moe", "dropless", &MoeConfig::dropless, &C::moe,
                    "true: no capacity limit, no token is dropped (capacity factors ignored)"));
  add(derived(boolean_field("moe", "renormalize_gates", &MoeConfig::renormalize_gates, &C::moe,
                            "rescale the chosen gates of a token to sum to 1"),
              "true when moe.top_k > 1", [](Config& config) { config.moe.renormalize_gates = config.moe.top_k > 1; }));
  add(real_field("moe", "jitter_eps", &MoeConfig::jitter_eps, &C::moe, 0.0, false, 1.0, true,
                 "training: router input *= uniform(1-eps, 1+eps); 0 = off"));
  add(real_field("moe", "aux_loss_weight", &MoeConfig::aux_loss_weight, &C::moe, 0.0, false, 100.0, false,
                 "weight of the load-balancing loss"));
  add(real_field("moe", "z_loss_weight", &MoeConfig::z_loss_weight, &C::moe, 0.0, false, 100.0, false,
                 "weight of the router z-loss (mean squared logsumexp of router logits)"));
  add(choice_field("moe", "complexity", &MoeConfig::complexity, &C::moe,
                   {{"none", ComplexityMode::none}, {"given", ComplexityMode::given}, {"entropy", ComplexityMode::entropy}},
                   "per-token expert count between k_min and top_k: none = always top_k"));
  add(choice_field("moe", "compute_mode", &MoeConfig::compute_mode, &C::moe,
                   {{"sparse", ExpertComputeMode::sparse}, {"dense", ExpertComputeMode::dense}},
                   "sparse: experts see their routed tokens; dense: every token (slow reference)"));
  add(integer_field("moe", "segment_alignment", &C::moe, &MoeConfig::segment_alignment, 1, 4096,
                    "rows each expert's segment is padded to (GEMM tile height); a power of two"));
  // The modern routing options (src/ops/moe_ops.h, "The modern options"); the defaults are Switch.
  add(choice_field("moe", "routing", &MoeConfig::routing, &C::moe,
                   {{"token_choice", RoutingMethod::token_choice}, {"expert_choice", RoutingMethod::expert_choice}},
                   "token_choice: each token picks top_k experts; expert_choice: each expert picks its tokens "
                   "(sees the whole batch at once: leaks across positions in a causal LM)"));
  add(choice_field("moe", "score_function", &MoeConfig::score_function, &C::moe,
                   {{"softmax", ScoreFunction::softmax}, {"sigmoid", ScoreFunction::sigmoid}},
                   "router scores: softmax over the experts, or a sigmoid per expert (DeepSeek-V3)"));
  add(real_field("moe", "routed_scaling_factor", &MoeConfig::routed_scaling_factor, &C::moe, 0.0, true, 100.0, false,
                 "the routed experts' gates are multiplied by this (after renormalization)"));
  add(real_field("moe", "bias_update_rate", &MoeConfig::bias_update_rate, &C::moe, 0.0, false, 1.0, false,
                 "aux-loss-free balancing: > 0 gives each MoE block a router bias that moves by this after every "
                 "optimizer step, toward balance; 0 = off"));
  add(real_field("moe", "seq_aux_loss_weight", &MoeConfig::seq_aux_loss_weight, &C::moe, 0.0, false, 100.0, false,
                 "weight of the sequence-level balance loss (per sequence of model.seq_len tokens)"));
  add(real_field("moe", "global_aux_loss_weight", &MoeConfig::global_aux_loss_weight, &C::moe, 0.0, false, 100.0,
                 false, "weight of the global-batch balance loss (expert loads over all ranks and micro-batches)"));
  add(integer_field("moe", "num_groups", &C::moe, &MoeConfig::num_groups, 1, 1024,
                    "group-limited routing: the experts form this many groups of consecutive ids (divides "
                    "num_experts); 1 = no groups"));
  add(derived(integer_field("moe", "topk_groups", &C::moe, &MoeConfig::topk_groups, 1, 1024,
                            "groups a token may use (<= num_groups; top_k must fit in their experts)"),
              "moe.num_groups", [](Config& config) { config.moe.topk_groups = config.moe.num_groups; }));
  add(choice_field("moe", "drop_policy", &MoeConfig::drop_policy, &C::moe,
                   {{"position", DropPolicy::position}, {"probability", DropPolicy::probability}},
                   "which choices an over-full expert drops: position = the later ones (GShard order), "
                   "probability = the lowest-scored ones"));

  // parallel
  add(integer_field("parallel", "ep_size", &C::parallel, &ParallelConfig::ep_size, 1, 1024,
                    "ranks that split the experts; divides num_experts and the world size"));
  add(integer_field("parallel", "ranks_per_node", &C::parallel, &ParallelConfig::ranks_per_node, 0, 1 << 20,
                    "ranks per node; 0 = as the launcher placed them. An expert-parallel group over several nodes "
                    "exchanges hierarchically (one network row per token and node); declare a smaller value to "
                    "emulate nodes, or one >= ep_size for the one-level exchange across nodes"));
  add(integer_field("parallel", "a2a_chunks", &C::parallel, &ParallelConfig::a2a_chunks, 1, 64,
                    "pieces each all-to-all is split into to overlap it with expert compute"));
  add(choice_field("parallel", "ep_transport", &ParallelConfig::ep_transport, &C::parallel,
                   {{"auto", EpTransport::automatic}, {"nccl", EpTransport::nccl}, {"nvlink", EpTransport::nvlink}},
                   "how token rows move between expert-parallel ranks: nvlink (GPUs of one node, rows written "
                   "into the peers' memory), nccl (all-to-all), or auto (nvlink where possible)"));
  add(choice_field("parallel", "ep_dispatch", &ParallelConfig::ep_dispatch, &C::parallel,
                   {{"activation", EpDispatch::activation}, {"fp8", EpDispatch::fp8}},
                   "what the expert-parallel forward dispatch sends: token rows in the activation dtype, or fp8 "
                   "(e4m3 with a scale per 128 values, about half the bytes; nccl transport only)"));
  add(choice_field("parallel", "ep_overlap", &ParallelConfig::ep_overlap, &C::parallel,
                   {{"none", EpOverlap::none}, {"two_part", EpOverlap::two_part}},
                   "two_part: each MoE layer splits its tokens in two, so that one part's exchange runs while the "
                   "experts compute the other (DeepSeek-V3's two-micro-batch overlap); none: one exchange"));
  add(integer_field("parallel", "ep_sm_budget", &C::parallel, &ParallelConfig::ep_sm_budget, 0, 1024,
                    "SMs the expert-parallel exchange may use (NCCL maxCTAs, nvlink kernel blocks); 0 = no limit"));
  add(integer_field("parallel", "max_replicas_per_rank", &C::parallel, &ParallelConfig::max_replicas_per_rank, 0,
                    1024,
                    "hot-expert replication: each step the most loaded experts get copies on the least loaded "
                    "expert-parallel ranks, up to this many per rank (bit-identical results); 0 = off"));
  add(integer_field("parallel", "replica_min_rows", &C::parallel, &ParallelConfig::replica_min_rows, 0,
                    1 << 30,
                    "hot-expert replication: a replica is made only when it takes over at least this many rows "
                    "(its weights and gradient cross the exchange each step; docs/DESIGN.md gives the break-even)"));
  add(real_field("parallel", "collective_timeout_s", &ParallelConfig::collective_timeout_s, &C::parallel, 0.0, true,
                 86400.0, false, "a collective that takes longer aborts the run with an error"));
  add(boolean_field("parallel", "deterministic", &ParallelConfig::deterministic, &C::parallel,
                    "true: bit-identical reruns and resumes; false lets the CUDA attention backward accumulate with "
                    "atomics (faster, last bits may differ run to run)"));

  // optimizer
  add(real_field("optimizer", "lr", &OptimizerConfig::lr, &C::optimizer, 0.0, true, 10.0, false,
                 "peak learning rate (AdamW) after warm-up"));
  add(derived(real_field("optimizer", "min_lr", &OptimizerConfig::min_lr, &C::optimizer, 0.0, false, 10.0, false,
                         "learning rate at the end of the cosine decay (<= lr)"),
              "optimizer.lr / 10", [](Config& config) {
                // Rounded to 15 digits so that lr 3e-4 gives min_lr 3e-05, not 2.9999999999999997e-05.
                config.optimizer.min_lr = std::stod(format_real_digits(config.optimizer.lr / 10.0, 15));
              }));
  add(integer_field("optimizer", "warmup_steps", &C::optimizer, &OptimizerConfig::warmup_steps, 0, kInt64Max,
                    "linear warm-up from 0 to lr (<= training.steps)"));
  add(choice_field("optimizer", "extend_schedule", &OptimizerConfig::extend_schedule, &C::optimizer,
                   {{"stretch", ScheduleExtension::stretch}, {"keep_end", ScheduleExtension::keep_end}},
                   "resuming with more training.steps than the checkpoint's run planned: stretch = the cosine "
                   "is recomputed over the new total; keep_end = the old schedule's end stands (min_lr after it)"));
  add(real_field("optimizer", "weight_decay", &OptimizerConfig::weight_decay, &C::optimizer, 0.0, false, 10.0, false,
                 "decoupled weight decay (not applied to norms and biases)"));
  add(real_field("optimizer", "beta1", &OptimizerConfig::beta1, &C::optimizer, 0.0, false, 1.0, true,
                 "AdamW first-moment decay"));
  add(real_field("optimizer", "beta2", &OptimizerConfig::beta2, &C::optimizer, 0.0, false, 1.0, true,
                 "AdamW second-moment decay"));
  add(real_field("optimizer", "eps", &OptimizerConfig::eps, &C::optimizer, 0.0, true, 1.0, false,
                 "AdamW denominator epsilon"));
  add(real_field("optimizer", "grad_clip", &OptimizerConfig::grad_clip, &C::optimizer, 0.0, false, 1e6, false,
                 "clip the global gradient norm to this; 0 = off"));
  add(integer_field("optimizer", "grad_accum_steps", &C::optimizer, &OptimizerConfig::grad_accum_steps, 1, 65536,
                    "micro-steps whose gradients are summed before each optimizer step"));
  add(real_field("optimizer", "loss_scale_init", &OptimizerConfig::loss_scale_init, &C::optimizer, 1.0, false,
                 16777216.0, false, "fp16 only: initial dynamic loss scale"));
  add(integer_field("optimizer", "loss_scale_growth_interval", &C::optimizer,
                    &OptimizerConfig::loss_scale_growth_interval, 1, 1000000000,
                    "fp16 only: overflow-free steps before the loss scale doubles"));

  // training
  add(required(integer_field("training", "steps", &C::training, &TrainingConfig::steps, 1, 1000000000000LL,
                             "optimizer steps to train for")));
  add(integer_field("training", "micro_batch_size", &C::training, &TrainingConfig::micro_batch_size, 1, 65536,
                    "sequences per rank per micro-step"));
  add(integer_field("training", "seed", &C::training, &TrainingConfig::seed, 0, kInt64Max,
                    "seeds initialisation, data order, jitter (counter-based: same on CPU and GPU)"));
  add(integer_field("training", "eval_every", &C::training, &TrainingConfig::eval_every, 0, kInt64Max,
                    "evaluate on data.val_path every N steps; 0 = never"));
  add(integer_field("training", "eval_batches", &C::training, &TrainingConfig::eval_batches, 1, 1000000,
                    "micro-batches per evaluation"));
  add(integer_field("training", "log_every", &C::training, &TrainingConfig::log_every, 1, kInt64Max,
                    "print and record metrics every N steps"));
  add(choice_field("training", "device", &TrainingConfig::device, &C::training,
                   {{"auto", DeviceChoice::automatic}, {"cpu", DeviceChoice::cpu}, {"cuda", DeviceChoice::cuda}},
                   "auto = cuda when a GPU is visible, else cpu"));
  add(choice_field("training", "recompute", &TrainingConfig::recompute, &C::training,
                   {{"none", RecomputeMode::none}, {"moe", RecomputeMode::moe},
                    {"attention", RecomputeMode::attention}, {"all", RecomputeMode::all}},
                   "activation recomputation: backward repeats the forward of these sublayers instead of keeping "
                   "their activations per block (moe: every FFN sublayer, MoE or dense; all: attention and FFN); "
                   "less memory for one more forward of them"));

  // data
  add(required(text_field("data", "path", &DataConfig::path, &C::data,
                          "training token file (from switchyard prepare-data)")));
  add(text_field("data", "val_path", &DataConfig::val_path, &C::data, "validation token file; empty = none"));
  add(choice_field<DataConfig, std::string>("data", "format", &DataConfig::format, &C::data, {{"tokens", "tokens"}},
                                            "file format: tokens (switchyard token file)"));

  // checkpoint
  add(derived(text_field("checkpoint", "dir", &CheckpointConfig::dir, &C::checkpoint, "where checkpoints are written"),
              "\"<logging.run_dir>/checkpoints\"", [](Config& config) {
                // logging comes after checkpoint in the table, so run_dir may not be derived yet.
                std::string run_dir = config.logging.run_dir;
                if (run_dir.empty()) run_dir = default_run_dir(config.source);
                config.checkpoint.dir = (std::filesystem::path(run_dir) / "checkpoints").string();
              }));
  add(integer_field("checkpoint", "every", &C::checkpoint, &CheckpointConfig::every, 0, kInt64Max,
                    "save every N steps (and at the end); 0 = only at the end"));
  add(integer_field("checkpoint", "keep_last", &C::checkpoint, &CheckpointConfig::keep_last, 0, 1000000,
                    "keep this run's newest N checkpoints (another run's are never removed); 0 = keep all"));
  add(text_field("checkpoint", "resume", &CheckpointConfig::resume, &C::checkpoint,
                 "none, auto (newest complete checkpoint of this model in dir, if any) or a checkpoint path"));

  // logging
  add(derived(text_field("logging", "run_dir", &LoggingConfig::run_dir, &C::logging,
                         "holds the resolved config.yaml, the metrics and final.weights"),
              "\"runs/<config file name without .yaml>\"", [](Config& config) {
                config.logging.run_dir = default_run_dir(config.source);
              }));
  add(text_field("logging", "metrics_file", &LoggingConfig::metrics_file, &C::logging,
                 "JSON-lines metrics, relative to run_dir unless absolute"));
  return fields;
}

std::string describe_interval(double minimum, bool minimum_open, double maximum, bool maximum_open) {
  return std::string(minimum_open ? "(" : "[") + format_real(minimum) + ", " + format_real(maximum) +
         (maximum_open ? ")" : "]");
}

}  // namespace

std::string ConfigField::range_text() const {
  switch (type) {
    case ConfigValueType::integer:
      return "[" + std::to_string(integer_min) + ", " + std::to_string(integer_max) + "]";
    case ConfigValueType::real:
      return describe_interval(real_min, real_min_open, real_max, real_max_open);
    case ConfigValueType::boolean:
      return "true or false";
    case ConfigValueType::choice: {
      std::string text = "one of: ";
      for (size_t index = 0; index < choices.size(); ++index) text += (index ? ", " : "") + choices[index];
      return text;
    }
    case ConfigValueType::text:
      return "text";
  }
  return "";
}

const std::vector<ConfigField>& config_fields() {
  static const std::vector<ConfigField> fields = build_fields();
  return fields;
}

bool operator==(const Config& left, const Config& right) {
  for (const ConfigField& field : config_fields())
    if (field.get(left) != field.get(right)) return false;
  return true;
}

const char* device_choice_name(DeviceChoice choice) {
  switch (choice) {
    case DeviceChoice::automatic: return "auto";
    case DeviceChoice::cpu: return "cpu";
    case DeviceChoice::cuda: return "cuda";
  }
  return "?";
}

namespace {

// Hot-expert replication applies to the one-level exchange with one part and one chunk
// (src/model/moe_ep_layer.h); the launcher's nodes are checked by validate_against_world.
void check_replication_consistency(const ParallelConfig& parallel,
                                   const std::function<std::string(const std::string&)>& where) {
  if (parallel.max_replicas_per_rank == 0) return;
  const std::string key = "parallel.max_replicas_per_rank";
  if (parallel.ep_overlap != EpOverlap::none)
    SY_BAD_INPUT(where(key), ": ", key, " = ", parallel.max_replicas_per_rank, " needs parallel.ep_overlap = none (",
                 "replication with two_part is not supported yet)");
  if (parallel.a2a_chunks != 1)
    SY_BAD_INPUT(where(key), ": ", key, " = ", parallel.max_replicas_per_rank, " needs parallel.a2a_chunks = 1, ",
                 "got ", parallel.a2a_chunks, " (replication runs the exchange in one chunk)");
  if (parallel.ranks_per_node > 0 && parallel.ranks_per_node < parallel.ep_size)
    SY_BAD_INPUT(where(key), ": ", key, " = ", parallel.max_replicas_per_rank, " needs the one-level exchange, but ",
                 "parallel.ranks_per_node = ", parallel.ranks_per_node, " < parallel.ep_size = ", parallel.ep_size,
                 " makes it hierarchical (replication across nodes is not supported yet)");
}

}  // namespace

void check_config_consistency(const Config& config, const std::function<std::string(const std::string&)>& where) {
  const ModelConfig& model = config.model;
  const MoeConfig& moe = config.moe;
  if (model.d_model % model.n_heads != 0)
    SY_BAD_INPUT(where("model.n_heads"), ": model.n_heads = ", model.n_heads, " does not divide model.d_model = ",
                 model.d_model);
  if (model.positions == PositionKind::rotary && model.head_dim() % 2 != 0)
    SY_BAD_INPUT(where("model.positions"), ": model.positions = rotary needs an even head dimension, but d_model / "
                 "n_heads = ", model.d_model, " / ", model.n_heads, " = ", model.head_dim());
  if (model.moe_every > model.n_layers)
    SY_BAD_INPUT(where("model.moe_every"), ": model.moe_every = ", model.moe_every, " > model.n_layers = ",
                 model.n_layers, ": no block would have an MoE FFN");
  if (model.moe_block_count() == 0)
    SY_BAD_INPUT(where("model.dense_first_blocks"), ": model.dense_first_blocks = ", model.dense_first_blocks,
                 " leaves no MoE block of model.n_layers = ", model.n_layers, " with model.moe_every = ",
                 model.moe_every, " (the last MoE block is ", model.n_layers / model.moe_every * model.moe_every - 1,
                 ": dense_first_blocks must be at most that)");
  if (moe.top_k > moe.num_experts)
    SY_BAD_INPUT(where("moe.top_k"), ": moe.top_k = ", moe.top_k, " exceeds moe.num_experts = ", moe.num_experts);
  if (moe.k_min > moe.top_k)
    SY_BAD_INPUT(where("moe.k_min"), ": moe.k_min = ", moe.k_min, " exceeds moe.top_k = ", moe.top_k);
  if (moe.complexity == ComplexityMode::none && moe.k_min != moe.top_k)
    SY_BAD_INPUT(where("moe.k_min"), ": moe.k_min = ", moe.k_min, " differs from moe.top_k = ", moe.top_k,
                 " but moe.complexity = none always uses top_k experts (set moe.complexity to given or entropy)");
  if (moe.renormalize_gates && moe.top_k == 1 && moe.complexity == ComplexityMode::none)
    SY_BAD_INPUT(where("moe.renormalize_gates"), ": moe.renormalize_gates = true with moe.top_k = 1 makes every gate "
                 "1, so the router would learn nothing from the loss");
  if ((moe.segment_alignment & (moe.segment_alignment - 1)) != 0)
    SY_BAD_INPUT(where("moe.segment_alignment"), ": moe.segment_alignment = ", moe.segment_alignment,
                 " is not a power of two");
  check_routing_consistency(config, where);
  if (config.parallel.ep_dispatch == EpDispatch::fp8 && config.parallel.ep_transport == EpTransport::nvlink)
    SY_BAD_INPUT(where("parallel.ep_dispatch"), ": parallel.ep_dispatch = fp8 needs parallel.ep_transport = nccl or "
                 "auto; the nvlink transport moves rows in the activation dtype only");
  // The world size is not known yet (0): the expert part of the layout's rules.
  ParallelLayout::check(/*world_size=*/0, config.parallel.ep_size, moe.num_experts, where("parallel.ep_size"));
  const std::string nodes = ParallelLayout::node_problem(config.parallel.ep_size, config.parallel.ranks_per_node);
  if (!nodes.empty()) SY_BAD_INPUT(where("parallel.ranks_per_node"), ": ", nodes);
  if (config.parallel.ranks_per_node > 0 && config.parallel.ranks_per_node < config.parallel.ep_size) {
    const int nodes_per_group = config.parallel.ep_size / config.parallel.ranks_per_node;
    if (moe.top_k > moe.num_experts / nodes_per_group)
      SY_BAD_INPUT(where("parallel.ranks_per_node"), ": the expert-parallel group spans ", nodes_per_group,
                   " nodes of ", moe.num_experts / nodes_per_group, " experts, fewer than moe.top_k = ", moe.top_k,
                   " (the hierarchical exchange carries at most the experts of one node per row)");
  }
  check_replication_consistency(config.parallel, where);
  if (config.optimizer.min_lr > config.optimizer.lr)
    SY_BAD_INPUT(where("optimizer.min_lr"), ": optimizer.min_lr = ", format_real(config.optimizer.min_lr),
                 " exceeds optimizer.lr = ", format_real(config.optimizer.lr));
  if (config.optimizer.warmup_steps > config.training.steps)
    SY_BAD_INPUT(where("optimizer.warmup_steps"), ": optimizer.warmup_steps = ", config.optimizer.warmup_steps,
                 " exceeds training.steps = ", config.training.steps);
  if (config.data.path.empty()) SY_BAD_INPUT(where("data.path"), ": data.path is empty");
  if (config.training.eval_every > 0 && config.data.val_path.empty())
    SY_BAD_INPUT(where("training.eval_every"), ": training.eval_every = ", config.training.eval_every,
                 " needs data.val_path (a validation token file), which is not set");
  if (config.checkpoint.resume.empty())
    SY_BAD_INPUT(where("checkpoint.resume"), ": checkpoint.resume is empty (use none, auto or a path)");
  if (config.logging.run_dir.empty()) SY_BAD_INPUT(where("logging.run_dir"), ": logging.run_dir is empty");
  if (config.checkpoint.dir.empty()) SY_BAD_INPUT(where("checkpoint.dir"), ": checkpoint.dir is empty");
  if (config.logging.metrics_file.empty())
    SY_BAD_INPUT(where("logging.metrics_file"), ": logging.metrics_file is empty");
}

bool device_can_be_cuda(const Config& config, bool cuda_backend_built) {
  return cuda_backend_built && config.training.device != DeviceChoice::cpu;
}

void check_backend_limits(const Config& config, const std::function<std::string(const std::string&)>& where,
                          bool device_can_be_cuda) {
  if (device_can_be_cuda && config.moe.num_experts > kCudaMaxExperts)
    SY_BAD_INPUT(where("moe.num_experts"), ": moe.num_experts = ", config.moe.num_experts,
                 " exceeds the CUDA backend's limit of ", kCudaMaxExperts,
                 " experts per layer; set training.device: cpu or use fewer experts");
}

ParallelLayout validate_against_world(const Config& config, int world_size, int ranks_per_node) {
  SY_CHECK(world_size >= 1, "world size ", world_size);
  ParallelLayout::check(world_size, config.parallel.ep_size, config.moe.num_experts, config.source);
  const int declared = config.parallel.ranks_per_node > 0 ? config.parallel.ranks_per_node : ranks_per_node;
  const std::string nodes = ParallelLayout::node_problem(config.parallel.ep_size, declared);
  if (!nodes.empty()) SY_BAD_INPUT(config.source, ": ", nodes, " (the launcher placed ", ranks_per_node,
                                   " ranks per node; set parallel.ranks_per_node)");
  const ParallelLayout layout(world_size, config.parallel.ep_size, config.moe.num_experts, declared);
  if (layout.hierarchical() && config.parallel.max_replicas_per_rank > 0)
    SY_BAD_INPUT(config.source, ": parallel.max_replicas_per_rank = ", config.parallel.max_replicas_per_rank,
                 " needs the one-level exchange, but the expert-parallel group spans ", layout.ep_nodes(),
                 " nodes (the launcher placed ", ranks_per_node, " ranks per node): set parallel.ranks_per_node to a "
                 "multiple of parallel.ep_size, or parallel.max_replicas_per_rank to 0");
  if (layout.hierarchical() && config.moe.top_k > layout.num_experts() / layout.ep_nodes())
    SY_BAD_INPUT(config.source, ": the expert-parallel group spans ", layout.ep_nodes(), " nodes of ",
                 layout.num_experts() / layout.ep_nodes(), " experts, fewer than moe.top_k = ", config.moe.top_k,
                 " (set parallel.ranks_per_node to a multiple of parallel.ep_size for the one-level exchange)");
  return layout;
}

}  // namespace switchyard
