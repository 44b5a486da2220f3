// The on-disk checkpoint format: directory layout, manifest, shard files, completion marker,
// checksums, and the reader that verifies them. docs/CHECKPOINTS.md describes the same format
// for people and other tools.
//
// <checkpoint.dir>/
//   step-000000100/          one directory per saved step (9+ digits, so names sort by step)
//     manifest.json          written by world rank 0: everything but the tensor bytes
//     shard-00000.bin        one file per writing rank (world rank in the name)
//     shard-00001.bin
//     COMPLETE               written last: "switchyard checkpoint complete" and the XXH64 of
//                            manifest.json; a directory without a valid one is incomplete
//   step-000000100-<run id>/ the same step saved by another run, when step-000000100 is not this
//                            run's (runs sharing a folder: src/train/checkpoint_identity.h)
//   .step-000000200.<run id>.tmp/  a save in progress (renamed to step-000000200 once every file is in)
//
// Shard file: a 64-byte header (magic "SWYSHARD", uint32 format version, uint32 world rank,
// int64 step, zeros) then the tensors' raw little-endian bytes, each at a 64-byte aligned offset
// given by the manifest; the file ends right after its last tensor.
//
// Tensors are named globally. Master weights take the parameter names of src/model/transformer.h,
// except that every expert is its own tensor named by its global expert id:
//   blocks.1.moe.w1 [E, D, F]  ->  blocks.1.moe.experts.0.w1 [D, F], ..., blocks.1.moe.experts.<E-1>.w1
// AdamW moments use the same names under "optimizer.exp_avg." and "optimizer.exp_avg_sq.". So a
// checkpoint does not depend on how experts were sharded, and any world size / ep_size loads it.
//
// Checksum: XXH64 (seed 0, src/train/checkpoint_checksum.h) over each tensor's bytes, written as
// 16 lower-case hex digits ("xxh64" in the manifest).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "src/core/json.h"
#include "src/train/checkpoint_checksum.h"
#include "src/train/data_loader.h"
#include "src/train/loss_scaler.h"

namespace switchyard {

constexpr int kCheckpointFormatVersion = 1;
constexpr const char* kCheckpointFormatName = "switchyard-checkpoint";
constexpr const char* kCheckpointManifestFile = "manifest.json";
constexpr const char* kCheckpointCompleteFile = "COMPLETE";
constexpr size_t kShardHeaderBytes = 64;
constexpr size_t kShardAlignment = 64;
constexpr char kShardMagic[8] = {'S', 'W', 'Y', 'S', 'H', 'A', 'R', 'D'};

enum class TensorState : uint8_t { master = 0, exp_avg = 1, exp_avg_sq = 2 };
constexpr int kNumTensorStates = 3;
const char* tensor_state_name(TensorState state);  // "master" | "exp_avg" | "exp_avg_sq"

// "blocks.1.moe.w1", expert 3 -> "blocks.1.moe.experts.3.w1"; expert < 0 -> the parameter name.
std::string expert_tensor_name(const std::string& parameter, int64_t expert);
// The global name of one state of one parameter (or one expert of it).
std::string checkpoint_tensor_name(TensorState state, const std::string& parameter, int64_t expert);

// "F32" | "F64" | "BF16" (safetensors spelling) for a DType, and the element size of a name.
size_t checkpoint_dtype_size(const std::string& dtype);  // 0 when unknown

struct CheckpointTensor {
  std::string name;       // global name (above)
  std::string parameter;  // the model parameter it belongs to
  TensorState state = TensorState::master;
  int64_t expert = -1;    // global expert id, -1 for tensors that are not experts
  std::string dtype;      // "F32"
  std::vector<int64_t> shape;
  std::string file;       // shard file name inside the checkpoint directory
  int owner = 0;          // world rank that wrote it
  uint64_t offset = 0, bytes = 0;
  uint64_t checksum = 0;
};

struct CheckpointShardFile {
  std::string name;
  int rank = 0;
  uint64_t bytes = 0;  // exact file size
};

struct CheckpointRngState {
  uint64_t seed = 0;            // training.seed: data order, router jitter
  int64_t jitter_micro_steps = 0;  // micro-steps drawn so far: the jitter counter of the next one
};

struct CheckpointManifest {
  int format_version = kCheckpointFormatVersion;
  // Which run saved it and what model it is (src/train/checkpoint_identity.h); "" in manifests of
  // earlier versions, which the readers accept.
  std::string run_id;
  std::string model_fingerprint;
  int64_t step = 0;            // optimizer steps taken (skipped ones included)
  // training.steps of the saving run and the step its cosine ends at (they differ after a run was
  // extended with optimizer.extend_schedule = keep_end); 0 in manifests of earlier versions.
  int64_t planned_steps = 0;
  int64_t lr_schedule_steps = 0;
  int64_t tokens_seen = 0;     // training tokens consumed, all ranks
  int world_size = 1, ep_size = 1;
  std::string config_yaml;     // the resolved config of the run that saved it
  DataLoaderState train_data;  // the training data loader's position
  CheckpointRngState rng;
  int64_t optimizer_updates = 0;  // AdamW updates applied (bias correction)
  bool loss_scaling = false;
  LossScalerState loss_scaler;
  std::vector<CheckpointShardFile> files;
  std::vector<CheckpointTensor> tensors;

  const CheckpointTensor* find(const std::string& name) const;  // nullptr when absent
};

json::Value manifest_to_json(const CheckpointManifest& manifest);
// `source` names the file in errors. Checks the format name and version and every field's type,
// and that each tensor's byte count matches its dtype and shape and lies inside its file.
CheckpointManifest manifest_from_json(const json::Value& json, const std::string& source);

// ---- Directories ---------------------------------------------------------------------------------

std::string checkpoint_step_name(int64_t step);  // "step-000000100"
// "step-000000100-<run id>": the name a run saves step 100 under when step-000000100 is another run's.
std::string checkpoint_step_name(int64_t step, const std::string& run_id);
// Accepts both forms; *run_id (when given) gets the suffix, "" without one.
bool parse_checkpoint_step_name(const std::string& name, int64_t* step, std::string* run_id = nullptr);
// ".step-000000100.<run id>.tmp": a save in progress. Earlier versions wrote ".step-000000100.tmp"
// (parse_checkpoint_temp_name accepts both; *run_id is "" for that form).
std::string checkpoint_temp_name(int64_t step, const std::string& run_id);
bool parse_checkpoint_temp_name(const std::string& name, int64_t* step, std::string* run_id);
std::string shard_file_name(int rank);           // "shard-00003.bin"

struct CheckpointListing {
  std::string path;
  int64_t step = 0;  // step-N and step-N-<run id> both have step N (listed in that order)
  bool complete = false;  // holds a COMPLETE marker (not yet verified against the manifest)
};
// The step-* directories of a checkpoint directory, oldest first; empty when it does not exist.
std::vector<CheckpointListing> list_checkpoints(const std::string& root);
// True when `path` holds a manifest.json (a single checkpoint, as opposed to checkpoint.dir).
bool is_checkpoint_directory(const std::string& path);

// Writes the completion marker for `manifest_text` into `directory` (temporary name, fsync,
// rename, directory fsync).
void write_complete_marker(const std::string& directory, const std::string& manifest_text);

// Reads `directory`'s manifest after checking its COMPLETE marker against it, then checks that
// every shard file exists with its exact size and header. SY_BAD_INPUT naming the file for: a
// missing or mismatched marker (incomplete save), a missing / unreadable / malformed manifest, a
// missing, truncated or oversized shard file, a shard header of another rank or step.
CheckpointManifest read_checkpoint_manifest(const std::string& directory);

// Reads tensors of one checkpoint, verifying each against its checksum. Files open on first use.
class CheckpointReader {
 public:
  CheckpointReader(std::string directory, const CheckpointManifest& manifest);
  ~CheckpointReader();
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  // Reads `tensor` into `destination` (tensor.bytes bytes, host memory) and verifies it:
  // SY_BAD_INPUT naming the file and tensor on a short read or a checksum mismatch.
  void read(const CheckpointTensor& tensor, void* destination);
  const std::string& directory() const { return directory_; }

 private:
  int descriptor(const std::string& file);
  std::string directory_;
  const CheckpointManifest& manifest_;
  std::vector<std::pair<std::string, int>> open_;
};

// Writes `bytes` at the current position of `descriptor`, retrying short writes; SY_THROW naming
// `path` on failure. fsync_path() fsyncs a file or directory by path.
void write_all(int descriptor, const void* data, size_t bytes, const std::string& path);
void fsync_path(const std::string& path, bool directory);
// Writes `text` to `path` through a temporary file in the same directory, fsynced and renamed.
void write_file_atomically(const std::string& path, const std::string& text);
// The same with the content from write(descriptor, temp_path); on any failure the temporary file
// is removed and `path` left as it was. A temporary file that cannot be created is bad input when
// `user_path` (an output the user named), an internal error otherwise.
void write_file_atomically(const std::string& path, bool user_path,
                           const std::function<void(int descriptor, const std::string& temp)>& write);
std::string read_text_file(const std::string& path, const char* what);  // SY_BAD_INPUT when unreadable

}  // namespace switchyard
