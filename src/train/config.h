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

#include "src/comm/ep_transport.h"
#include "src/comm/parallel_layout.h"
#include "src/core/dtype.h"
#include "src/model/config.h"

namespace switchyard {

enum class DeviceChoice : uint8_t { automatic, cpu, cuda };  // "auto" in YAML

struct ParallelConfig {
  int ep_size = 1;
  int ranks_per_node = 0;  // 0: the launcher's nodes (contiguous blocks of ranks), else declared
  int a2a_chunks = 1;
  EpTransport ep_transport = EpTransport::automatic;
  EpDispatch ep_dispatch = EpDispatch::activation;
  EpOverlap ep_overlap = EpOverlap::none;
  int ep_sm_budget = 0;
  int max_replicas_per_rank = 0;  // hot-expert replica slots per rank; 0 = off
  int replica_min_rows = 0;       // the fewest rows a replica must take over to be made
  double collective_timeout_s = 600.0;
  bool deterministic = false;

  // What the expert-parallel layer takes of this section.
  EpLayerOptions ep_layer_options() const {
    EpLayerOptions options;
    options.a2a_chunks = a2a_chunks;
    options.transport = ep_transport;
    options.dispatch = ep_dispatch;
    options.overlap = ep_overlap;
    options.sm_budget = ep_sm_budget;
    options.max_replicas_per_rank = max_replicas_per_rank;
    options.replica_min_rows = replica_min_rows;
    return options;
  }
};

// What a resumed run does with the learning-rate schedule when training.steps grows past the
// checkpoint run's plan (src/train/lr_schedule.h): stretch the cosine over the new total, or keep
// the old schedule's end (min_lr from there on).
enum class ScheduleExtension : uint8_t { stretch, keep_end };

struct OptimizerConfig {
  double lr = 3e-4;
  double min_lr = 3e-5;  // default lr / 10
  int64_t warmup_steps = 0;
  ScheduleExtension extend_schedule = ScheduleExtension::stretch;
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
  // Activation recomputation (src/model/transformer.h TransformerOptions::recompute).
  RecomputeMode recompute = RecomputeMode::none;
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

#if defined(SWITCHYARD_WITH_CUDA)
inline constexpr bool kCudaBackendBuilt = true;
#else
inline constexpr bool kCudaBackendBuilt = false;
#endif

// Loads `path`, applies `overrides` ("section.key=value", value parsed as a YAML scalar, later
// ones win), fills defaults and validates. Throws SY_BAD_INPUT naming file:line or the --set.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// The same from text; `source_name` stands for the file name in messages and defaults.
// `cuda_backend_built` says which backend limits apply (check_backend_limits); tests pass true to
// check a CUDA build's limits in any build.
Config parse_config_string(const std::string& yaml_text, const std::string& source_name,
                           const std::vector<std::string>& overrides = {},
                           bool cuda_backend_built = kCudaBackendBuilt);
// A config stored with a run or in a checkpoint (what was trained): parsed and checked like any
// other, except the backend limits (check_backend_limits), which belong to starting a run on this
// build: a run trained on a CPU build may hold more experts than the CUDA router takes, and its
// checkpoints must still be readable here.
Config parse_stored_config(const std::string& yaml_text, const std::string& source_name);
// The fully resolved config: every key, each with a short comment. Parses back to an equal Config.
std::string config_to_yaml(const Config& config);
// The checks that need the world size (known only after MPI start-up): the world part of
// ParallelLayout's rules (src/comm/parallel_layout.h). Returns the run's layout.
// `ranks_per_node`: the nodes to lay the job out on (config.parallel.ranks_per_node, or for 0 what
// the bootstrap found: contiguous_ranks_per_node; 0 there means one node).
ParallelLayout validate_against_world(const Config& config, int world_size, int ranks_per_node = 0);

// Names used in YAML for the enums of this layer (the model's: src/model/config.h).
const char* device_choice_name(DeviceChoice choice);

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
// The part of those checks for the modern routing keys (config_routing_checks.cpp): groups divide
// the experts, topk_groups <= num_groups with room for top_k, and expert choice without complexity,
// groups, dropless, probability drops, the sequence-level loss or a router bias.
void check_routing_consistency(const Config& config, const std::function<std::string(const std::string&)>& where);
// Whether training.device may resolve to CUDA: auto or cuda, with the CUDA backend built.
bool device_can_be_cuda(const Config& config, bool cuda_backend_built = kCudaBackendBuilt);
// The limits of the backends the run may use (src/ops/moe_ops.h), so that a config that
// validates does not fail at its first forward: with `device_can_be_cuda`, the CUDA backend's
// (kCudaMaxExperts); the CPU backend's are the key ranges. Throws SY_BAD_INPUT like the above.
void check_backend_limits(const Config& config, const std::function<std::string(const std::string&)>& where,
                          bool device_can_be_cuda);

}  // namespace switchyard
