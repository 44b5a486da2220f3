// The run configuration: a YAML file (plus `--set section.key=value` overrides) parsed into typed,
// validated structs.
//
// Every key lives in one table, config_fields() (config_schema.cpp): its type, range or choices,
// default, one-line help and the accessors that read and write it. Parsing, the range checks,
// the "did you mean" hints for unknown keys, config_to_yaml() and operator== are all driven by
// that table, so a key cannot be parsed but forgotten when the resolved config is written out.
// configs/README.md documents the same keys (a unit test checks that every key appears there).
//
// Errors are SY_BAD_INPUT (exit 2) and say where the value came from:
//   configs/x.yaml:12: moe.top_k = 9 is out of range [1, 8]
//   --set moe.top_k=9: moe.top_k = 9 is out of range [1, 8]
// Relative paths in the config (data, checkpoints, run directory) are relative to the working
// directory of the process, not to the config file.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "comm/ep_transport.h"
#include "kernels/moe_ops.h"
#include "src/core/dtype.h"

namespace switchyard {

enum class NormKind : uint8_t { layernorm, rmsnorm };
enum class PositionKind : uint8_t { learned, rotary };
// ExpertActivation (gelu_tanh | swiglu) and ComplexityMode (how many experts, between k_min and
// top_k, each token uses: none = always top_k; given = a per-token complexity supplied with the
// data; entropy = from the router's own entropy) come from kernels/moe_ops.h.
// sparse: each expert sees only its routed tokens; dense: every expert runs on every token and
// the gates mask the result (a reference for the sparse path, slow).
enum class ExpertComputeMode : uint8_t { sparse, dense };
enum class DeviceChoice : uint8_t { automatic, cpu, cuda };  // "auto" in YAML

struct ModelConfig {
  int vocab_size = 256;
  int d_model = 0;   // required
  int n_layers = 0;  // required
  int n_heads = 0;   // required
  int seq_len = 0;   // required
  int d_ff = 0;      // default 4 * d_model
  NormKind norm = NormKind::rmsnorm;
  PositionKind positions = PositionKind::rotary;
  int moe_every = 1;  // block b (0-based) has an MoE FFN when (b + 1) % moe_every == 0
  DType compute_dtype = DType::bf16;
  double init_std = 0.02;

  int head_dim() const { return d_model / n_heads; }
  bool block_is_moe(int block) const { return (block + 1) % moe_every == 0; }
  int moe_block_count() const { return n_layers / moe_every; }
};

struct MoeConfig {
  int num_experts = 0;  // required
  int top_k = 2;
  int k_min = 2;        // default top_k
  int expert_d_ff = 0;  // default model.d_ff
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
};

struct ParallelConfig {
  int ep_size = 1;
  int a2a_chunks = 1;
  EpTransport ep_transport = EpTransport::automatic;
  double collective_timeout_s = 600.0;
  bool deterministic = false;
};

struct OptimizerConfig {
  double lr = 3e-4;
  double min_lr = 3e-5;  // default lr / 10
  int64_t warmup_steps = 0;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;  // 0 = off
  int grad_accum_steps = 1;
  double loss_scale_init = 65536.0;
  int64_t loss_scale_growth_interval = 2000;
};

struct TrainingConfig {
  int64_t steps = 0;  // required
  int micro_batch_size = 8;
  int64_t seed = 1234;
  int64_t eval_every = 0;  // 0 = never
  int eval_batches = 8;
  int64_t log_every = 10;
  DeviceChoice device = DeviceChoice::automatic;
};

struct DataConfig {
  std::string path;      // required: a token file written by `switchyard prepare-data`
  std::string val_path;  // empty = none
  std::string format = "tokens";
};

struct CheckpointConfig {
  std::string dir;  // default <logging.run_dir>/checkpoints
  int64_t every = 1000;  // 0 = never
  int keep_last = 3;     // 0 = keep all
  std::string resume = "none";  // none | auto | a checkpoint path
};

struct LoggingConfig {
  std::string run_dir;  // default runs/<config file name without extension>
  std::string metrics_file = "metrics.jsonl";  // relative to run_dir unless absolute
};

struct Config {
  ModelConfig model;
  MoeConfig moe;
  ParallelConfig parallel;
  OptimizerConfig optimizer;
  TrainingConfig training;
  DataConfig data;
  CheckpointConfig checkpoint;
  LoggingConfig logging;

  std::string source;  // where it was loaded from (file name), for messages; not a key
};

// Every key compares equal (the source name is ignored).
bool operator==(const Config& left, const Config& right);
inline bool operator!=(const Config& left, const Config& right) { return !(left == right); }

// Loads `path`, applies `overrides` ("section.key=value", value parsed as a YAML scalar, later
// ones win), fills defaults and validates. Throws SY_BAD_INPUT naming file:line or the --set.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// The same from text; `source_name` stands for the file name in messages and defaults.
Config parse_config_string(const std::string& yaml_text, const std::string& source_name,
                           const std::vector<std::string>& overrides = {});
// The fully resolved config: every key, each with a short comment. Parses back to an equal Config.
std::string config_to_yaml(const Config& config);
// Checks that need the world size (known only after MPI start-up): world % ep_size == 0.
void validate_against_world(const Config& config, int world_size);

// Names used in YAML for the enums (and their inverse for messages).
const char* norm_kind_name(NormKind kind);
const char* position_kind_name(PositionKind kind);
const char* expert_activation_name(ExpertActivation activation);
const char* complexity_mode_name(ComplexityMode mode);
const char* expert_compute_mode_name(ExpertComputeMode mode);
const char* device_choice_name(DeviceChoice choice);
const char* compute_dtype_name(DType dtype);  // "bf16" | "fp16" | "fp32"

// ---- The key table ---------------------------------------------------------------------------
enum class ConfigValueType : uint8_t { integer, real, boolean, text, choice };

// One parsed scalar, already checked against the field's type and range.
struct ConfigValue {
  int64_t integer = 0;
  double real = 0.0;
  bool boolean = false;
  std::string text;  // text and choice fields
};

struct ConfigField {
  std::string section, key;
  ConfigValueType type = ConfigValueType::integer;
  std::string help;          // one line, used in config_to_yaml comments
  std::string default_text;  // for documentation: "128", "4 * model.d_model", "(required)"
  bool required = false;
  // integer: inclusive [integer_min, integer_max]; real: [real_min, real_max], either end open
  // when *_open is set.
  int64_t integer_min = 0, integer_max = 0;
  double real_min = 0.0, real_max = 0.0;
  bool real_min_open = false, real_max_open = false;
  std::vector<std::string> choices;  // choice fields, in YAML spelling
  std::function<std::string(const Config&)> get;           // the value as YAML scalar text
  std::function<void(Config&, const ConfigValue&)> set;     // stores a checked value
  std::function<void(Config&)> derive_default;              // null: the struct default stands

  std::string path() const { return section + "." + key; }
  std::string range_text() const;  // "[1, 8]", "(0, 1)", "one of: gelu, swiglu", ...
};

// All keys, grouped by section in file order (model, moe, parallel, optimizer, training, data,
// checkpoint, logging). Derived defaults run after every given key is stored, in this order.
const std::vector<ConfigField>& config_fields();
// Cross-field checks that need the whole config; `where(path)` gives the location to report for
// a key (its file:line or --set; the file alone when it was not given). Throws SY_BAD_INPUT.
void check_config_consistency(const Config& config, const std::function<std::string(const std::string&)>& where);

}  // namespace switchyard
