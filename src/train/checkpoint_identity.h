// Which run wrote a checkpoint and which model it holds, and the rules that keep runs sharing a
// checkpoint folder apart (docs/CHECKPOINTS.md, "Runs and checkpoint folders"):
//   - a run id is made when a run starts from step 0 and kept across resumes; every manifest
//     records it, with a fingerprint of the model's architecture (the keys that decide tensor
//     shapes, not the parallel sizes: checkpoints reshard across world and ep sizes);
//   - --resume auto tries only checkpoints of this model, those of the run directory's own run
//     (<logging.run_dir>/run_id) first; checkpoints of another model are reported and skipped;
//   - keep_last and the clean-up after interrupted saves remove only what this run wrote;
//   - manifests of earlier versions (no run id, no fingerprint) are judged by their stored config
//     and count as another run's: nothing removes them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "src/train/checkpoint_format.h"
#include "src/train/config.h"

namespace switchyard {

// ---- Run ids ------------------------------------------------------------------------------------

constexpr size_t kRunIdLength = 16;
// A new run id: 16 lower-case hex digits from the system's randomness, the time and the process.
std::string new_run_id();
bool is_run_id(const std::string& text);

// <run_dir>/run_id: the id of the run that last started in this run directory (its checkpoints
// come first for --resume auto). read_run_directory_run_id returns "" when there is none.
std::string run_directory_run_id_path(const std::string& run_dir);
std::string read_run_directory_run_id(const std::string& run_dir);
void write_run_directory_run_id(const std::string& run_dir, const std::string& run_id);

// ---- Models -------------------------------------------------------------------------------------

// The architecture keys of `config` in a fixed order: model.vocab_size, d_model, n_layers, n_heads,
// d_ff, norm, positions, moe_every, moe.num_experts, expert_d_ff, activation, and model.seq_len
// with learned positions (the position table's length), model.dense_first_blocks when not 0, and
// moe.num_shared_experts and shared_expert_d_ff when there are shared experts, and
// "moe.bias_update_rate > 0" (= true) when the MoE blocks hold a router bias: a property, not a
// key, so that the rate itself may change across a resume.
std::vector<std::string> architecture_keys(const Config& config);
// XXH64 (16 hex digits) of "key=value\n" over architecture_keys: equal for configs whose models
// have the same tensors; compute dtype, init, routing and parallel sizes do not enter it.
std::string model_fingerprint(const Config& config);
// "moe.num_experts is 4 there, 3 in this run" for each architecture key where `stored` (a
// checkpoint's config) differs from `current`; empty when they describe the same model.
std::vector<std::string> architecture_differences(const Config& stored, const Config& current);
// How the model of a checkpoint (its fingerprint, "" for an older manifest, and its stored config)
// differs from `config`: empty when the fingerprints are equal or the stored config's architecture
// keys are. SY_BAD_INPUT naming `manifest_path` when the stored config must be read and does not load.
std::vector<std::string> checkpoint_model_differences(const std::string& fingerprint, const std::string& config_yaml,
                                                      const std::string& manifest_path, const Config& config);
std::string join_differences(const std::vector<std::string>& differences);  // "a; b; c"

// training.steps of a checkpoint's stored config (for manifests that predate planned_steps).
int64_t stored_training_steps(const std::string& config_yaml, const std::string& manifest_path);

// ---- Checkpoint folders -------------------------------------------------------------------------

// A step directory with what its manifest.json says about its origin, read from the start of the
// file only (manifest_to_json writes run_id and model_fingerprint before the tensor list, so a
// folder of large manifests is cheap to survey), without checking the marker or the shards.
struct CheckpointOrigin {
  std::string path;
  int64_t step = 0;
  bool complete = false;          // holds a COMPLETE marker
  bool has_manifest = false;      // manifest.json exists and could be read
  std::string run_id;             // "" for a manifest of an earlier version (or unreadable)
  std::string model_fingerprint;  // "" likewise
};
CheckpointOrigin read_checkpoint_origin(const CheckpointListing& item);
// Every step directory of `root`, oldest first (list_checkpoints), with its origin.
std::vector<CheckpointOrigin> list_checkpoint_origins(const std::string& root);
// How the model of the checkpoint at `origin` differs from `config` (checkpoint_model_differences;
// the stored config is read only when the fingerprints differ). SY_BAD_INPUT when the manifest or
// its stored config does not read.
std::vector<std::string> origin_model_differences(const CheckpointOrigin& origin, const Config& config);

// What --resume auto tries, in order, and what it leaves out (one line each, "skipping PATH: why"):
// complete checkpoints of this model, those of `preferred_run_id` (the run directory's run) first,
// each group newest step first. Incomplete ones and those of another model are left out; one whose
// manifest or stored config cannot be read stays in (loading it reports why it fails).
struct ResumeCandidates {
  std::vector<std::string> paths;
  std::vector<std::string> skipped;
};
ResumeCandidates auto_resume_candidates(const std::string& root, const Config& config,
                                        const std::string& preferred_run_id);

// Whether `root` holds a complete checkpoint written by run `run_id`.
bool holds_checkpoint_of_run(const std::string& root, const std::string& run_id);

// A run starting from step 0 (no --resume) must not save among another run's checkpoints unless it
// is told to (--start-over): SY_BAD_INPUT naming checkpoint.dir, what it holds and the ways out.
void check_fresh_start(const Config& config, bool start_over);

}  // namespace switchyard
