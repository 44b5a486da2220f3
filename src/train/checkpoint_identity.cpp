// Run ids, model fingerprints and the checkpoint-folder rules built on them
// (src/train/checkpoint_identity.h).
#include "src/train/checkpoint_identity.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>

#include "src/core/error.h"
#include "src/core/json.h"

namespace switchyard {
namespace fs = std::filesystem;
namespace {

const char* const kArchitectureKeys[] = {"model.vocab_size", "model.d_model",   "model.n_layers",    "model.n_heads",
                                         "model.d_ff",       "model.norm",      "model.positions",   "model.moe_every",
                                         "moe.num_experts",  "moe.expert_d_ff", "moe.activation"};

const ConfigField& field_of(const std::string& path) {
  for (const ConfigField& field : config_fields())
    if (field.path() == path) return field;
  SY_THROW("no config key ", path);
}

// Not a key but a property of one: whether the MoE blocks hold a router bias (a tensor per block).
// Its value, not bias_update_rate's, decides the tensors, so a resume may change the rate.
const char* const kRouterBiasProperty = "moe.bias_update_rate > 0";

std::string architecture_value(const Config& config, const std::string& key) {
  if (key == kRouterBiasProperty) return config.moe.uses_routing_bias() ? "true" : "false";
  return field_of(key).get(config);
}

Config parse_manifest_config(const std::string& config_yaml, const std::string& manifest_path) {
  try {
    return parse_stored_config(config_yaml, manifest_path + " (its config)");
  } catch (const Error& error) {
    SY_BAD_INPUT("checkpoint ", manifest_path, ": its stored config does not load: ", error.message());
  }
}

// manifest_to_json writes run_id and model_fingerprint among the first members, long before the
// tensor list: the first few kilobytes hold them.
constexpr size_t kManifestHeadBytes = 4096;

// The string value of the first `"key": "..."` in `head`; "" when there is none.
std::string head_string_member(const std::string& head, const std::string& key) {
  const std::string quoted = "\"" + key + "\"";
  size_t at = head.find(quoted);
  if (at == std::string::npos) return "";
  at = head.find_first_not_of(" \t\r\n", at + quoted.size());
  if (at == std::string::npos || head[at] != ':') return "";
  at = head.find_first_not_of(" \t\r\n", at + 1);
  if (at == std::string::npos || head[at] != '"') return "";
  const size_t end = head.find('"', at + 1);
  return end == std::string::npos ? "" : head.substr(at + 1, end - at - 1);
}

std::string read_small_file(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  if (!stream) return "";
  return std::string((std::istreambuf_iterator<char>(stream)), std::istreambuf_iterator<char>());
}

}  // namespace

// ---- Run ids ------------------------------------------------------------------------------------

std::string new_run_id() {
  // random_device alone may be deterministic on some platforms; the time and the pid make two
  // runs started on different hosts or moments differ anyway.
  std::random_device device;
  const uint64_t entropy = (uint64_t(device()) << 32) ^ uint64_t(device());
  const uint64_t now = uint64_t(std::chrono::system_clock::now().time_since_epoch().count());
  const uint64_t mixed[3] = {entropy, now, uint64_t(::getpid())};
  return checksum_hex(xxh64(mixed, sizeof(mixed), entropy));
}

bool is_run_id(const std::string& text) {
  return text.size() == kRunIdLength && text.find_first_not_of("0123456789abcdef") == std::string::npos;
}

std::string run_directory_run_id_path(const std::string& run_dir) { return (fs::path(run_dir) / "run_id").string(); }

std::string read_run_directory_run_id(const std::string& run_dir) {
  std::string text = read_small_file(run_directory_run_id_path(run_dir));
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return is_run_id(text) ? text : "";
}

void write_run_directory_run_id(const std::string& run_dir, const std::string& run_id) {
  SY_CHECK(is_run_id(run_id), "write_run_directory_run_id: '", run_id, "' is not a run id");
  std::error_code status;
  fs::create_directories(run_dir, status);
  if (status) SY_BAD_INPUT("cannot create logging.run_dir '", run_dir, "': ", status.message());
  write_file_atomically(run_directory_run_id_path(run_dir), run_id + "\n");
}

// ---- Models -------------------------------------------------------------------------------------

std::vector<std::string> architecture_keys(const Config& config) {
  std::vector<std::string> keys(std::begin(kArchitectureKeys), std::end(kArchitectureKeys));
  if (config.model.positions == PositionKind::learned) keys.push_back("model.seq_len");
  // Only where they are not 0, so that models without them keep their fingerprints.
  if (config.model.dense_first_blocks > 0) keys.push_back("model.dense_first_blocks");
  if (config.moe.num_shared_experts > 0) {
    keys.push_back("moe.num_shared_experts");
    keys.push_back("moe.shared_expert_d_ff");
  }
  if (config.moe.uses_routing_bias()) keys.push_back(kRouterBiasProperty);
  return keys;
}

std::string model_fingerprint(const Config& config) {
  std::string text;
  for (const std::string& key : architecture_keys(config)) text += key + "=" + architecture_value(config, key) + "\n";
  return checksum_hex(xxh64(text.data(), text.size()));
}

std::vector<std::string> architecture_differences(const Config& stored, const Config& current) {
  std::vector<std::string> keys = architecture_keys(current);
  for (const std::string& key : architecture_keys(stored))
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) keys.push_back(key);
  std::vector<std::string> differences;
  for (const std::string& key : keys) {
    const std::string there = architecture_value(stored, key), here = architecture_value(current, key);
    if (there != here) differences.push_back(key + " is " + there + " there, " + here + " in this run");
  }
  return differences;
}

std::vector<std::string> checkpoint_model_differences(const std::string& fingerprint, const std::string& config_yaml,
                                                      const std::string& manifest_path, const Config& config) {
  if (!fingerprint.empty() && fingerprint == model_fingerprint(config)) return {};
  // An older manifest (no fingerprint), or one whose fingerprint covers other keys: the stored
  // config decides.
  return architecture_differences(parse_manifest_config(config_yaml, manifest_path), config);
}

std::string join_differences(const std::vector<std::string>& differences) {
  std::string text;
  for (const std::string& difference : differences) text += (text.empty() ? "" : "; ") + difference;
  return text;
}

int64_t stored_training_steps(const std::string& config_yaml, const std::string& manifest_path) {
  return parse_manifest_config(config_yaml, manifest_path).training.steps;
}

// ---- Checkpoint folders -------------------------------------------------------------------------

CheckpointOrigin read_checkpoint_origin(const CheckpointListing& item) {
  CheckpointOrigin origin;
  origin.path = item.path;
  origin.step = item.step;
  origin.complete = item.complete;
  std::ifstream stream(fs::path(item.path) / kCheckpointManifestFile, std::ios::binary);
  if (!stream) return origin;
  std::string head(kManifestHeadBytes, '\0');
  stream.read(head.data(), std::streamsize(head.size()));
  head.resize(size_t(stream.gcount()));
  origin.has_manifest = true;
  origin.run_id = head_string_member(head, "run_id");
  origin.model_fingerprint = head_string_member(head, "model_fingerprint");
  // Only run ids and fingerprints of the right form count; anything else is an unknown origin.
  if (!is_run_id(origin.run_id)) origin.run_id.clear();
  if (!is_run_id(origin.model_fingerprint)) origin.model_fingerprint.clear();
  return origin;
}

std::vector<std::string> origin_model_differences(const CheckpointOrigin& origin, const Config& config) {
  const std::string manifest_path = (fs::path(origin.path) / kCheckpointManifestFile).string();
  if (!origin.model_fingerprint.empty() && origin.model_fingerprint == model_fingerprint(config)) return {};
  const json::Value manifest = json::parse(read_text_file(manifest_path, "checkpoint manifest"), manifest_path);
  const json::Value* stored = manifest.find("config");
  if (stored == nullptr || !stored->is_string()) SY_BAD_INPUT("checkpoint ", manifest_path, " holds no config");
  return checkpoint_model_differences(origin.model_fingerprint, stored->as_string(manifest_path), manifest_path,
                                      config);
}

std::vector<CheckpointOrigin> list_checkpoint_origins(const std::string& root) {
  std::vector<CheckpointOrigin> origins;
  for (const CheckpointListing& item : list_checkpoints(root)) origins.push_back(read_checkpoint_origin(item));
  return origins;
}

ResumeCandidates auto_resume_candidates(const std::string& root, const Config& config,
                                        const std::string& preferred_run_id) {
  ResumeCandidates result;
  std::vector<std::string> preferred, others;
  const std::vector<CheckpointOrigin> origins = list_checkpoint_origins(root);
  for (auto origin = origins.rbegin(); origin != origins.rend(); ++origin) {
    if (!origin->complete) {
      result.skipped.push_back("skipping " + origin->path +
                               ": incomplete (no COMPLETE marker: its save did not finish)");
      continue;
    }
    std::vector<std::string> differences;
    try {
      differences = origin_model_differences(*origin, config);
    } catch (const Error&) {
      // The manifest or its stored config does not read: left in, so that loading reports why.
    }
    if (!differences.empty()) {
      result.skipped.push_back("skipping " + origin->path + ": another model (" + join_differences(differences) +
                               "); not loaded");
      continue;
    }
    const bool ours = !preferred_run_id.empty() && origin->run_id == preferred_run_id;
    (ours ? preferred : others).push_back(origin->path);
  }
  result.paths = preferred;
  result.paths.insert(result.paths.end(), others.begin(), others.end());
  return result;
}

bool holds_checkpoint_of_run(const std::string& root, const std::string& run_id) {
  for (const CheckpointOrigin& origin : list_checkpoint_origins(root))
    if (origin.complete && origin.run_id == run_id) return true;
  return false;
}

void check_fresh_start(const Config& config, bool start_over) {
  if (config.checkpoint.resume != "none" || start_over) return;
  const std::vector<CheckpointOrigin> origins = list_checkpoint_origins(config.checkpoint.dir);
  if (origins.empty()) return;
  const CheckpointOrigin& newest = origins.back();
  const bool derived_dir =
      fs::path(config.checkpoint.dir) == fs::path(config.logging.run_dir) / "checkpoints";
  SY_BAD_INPUT("checkpoint.dir '", config.checkpoint.dir, "' already holds ", origins.size(),
               " checkpoint(s) of another run (the newest: ", newest.path,
               newest.run_id.empty() ? std::string(", written by an earlier version")
                                     : ", run id " + newest.run_id,
               "), and this run starts from step 0. To continue that run, add --resume auto; to keep this run "
               "apart, give it its own folder with ",
               derived_dir ? "--set logging.run_dir=... (checkpoint.dir follows it)" : "--set checkpoint.dir=...",
               "; to start a new run beside those checkpoints (none is deleted), add --start-over");
}

}  // namespace switchyard
