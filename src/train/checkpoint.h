// Saving and loading the training state (format: src/train/checkpoint_format.h).
//
// Save (collective, every rank of the world calls it at the same step):
//   1. rank 0 creates <dir>/.step-N.<run id>.tmp (removing a leftover of an interrupted save) and
//      picks the name: step-N, or step-N-<run id> when step-N is another run's; every rank learns it
//   2. every rank that owns tensors writes its shard file there and fsyncs it. Owners: each
//      expert tensor is written by the rank holding that expert in expert-data-parallel replica 0
//      (world ranks 0 .. ep_size-1); dense tensors (replicated everywhere) are spread over all
//      ranks, each to the rank with the fewest bytes so far, so the writing is split evenly
//   3. the per-tensor checksums are all-gathered; rank 0 writes manifest.json and fsyncs it and
//      the directory, renames the temporary directory to its name (an older directory of that name,
//      this run's abandoned timeline, is moved aside first), fsyncs <dir>, then writes the COMPLETE
//      marker: until that exists the checkpoint does not count
//   4. rank 0 prunes (keep_last), touching only what this run wrote (its run id in the manifest or
//      the name): of its complete checkpoints up to step N the newest keep_last stay; older ones,
//      its incomplete step-* directories older than N and leftovers of its interrupted saves or
//      removals (and such leftovers of earlier versions, which carry no run id) are removed (each
//      first renamed to .trash-<run id>-*, so a crash mid-removal never leaves something that looks
//      like a checkpoint); later steps (an abandoned timeline) and other runs' checkpoints are
//      left alone. Then a final barrier, so a save has returned on every rank only when complete.
// Fault points for the crash tests (src/comm/bootstrap.h inject_fault_point): checkpoint_shard_written
// (every writing rank), checkpoint_manifest_written, checkpoint_renamed, checkpoint_complete
// (rank 0).
//
// Load (each rank independently; the trainer makes the ranks agree on the outcome): reads and
// checks the manifest (src/train/checkpoint_format.h), checks that it describes this model, then
// reads what this rank holds: every dense tensor and the experts of its own shard, whatever
// world size and ep_size saved them, verifying each tensor's checksum, into the master weights
// and, given an optimizer, the AdamW moments; finally refreshes the compute copies.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/comm/communicator.h"
#include "src/model/parameters.h"
#include "src/train/checkpoint_format.h"
#include "src/train/config.h"
#include "src/train/optimizer.h"

namespace switchyard {

// The scalar training state a checkpoint carries besides the tensors.
struct TrainingProgress {
  std::string run_id;              // the run's id (src/train/checkpoint_identity.h)
  int64_t planned_steps = 0;       // training.steps of the run
  int64_t lr_schedule_steps = 0;   // the step its cosine ends at
  int64_t step = 0;
  int64_t tokens_seen = 0;
  CheckpointRngState rng;
  DataLoaderState train_data;
  int64_t optimizer_updates = 0;
  bool loss_scaling = false;
  LossScalerState loss_scaler;
};

struct CheckpointContext {
  const Config* config = nullptr;  // checkpoint.dir / keep_last, and the config stored in the manifest
  ExecContext exec;
  const ParallelGroups* groups = nullptr;  // null (or null world) for one process
  int world_rank = 0, world_size = 1;
};

// The tensors of a checkpoint of `layout` saved by `world_size` ranks with `ep_size`: names,
// shapes, owners, files and offsets (checksums zero), in file order; `files` gets the shard files.
// Every rank computes the same plan from its own layout (only expert_first differs between ranks).
std::vector<CheckpointTensor> plan_checkpoint(const ParameterLayout& layout, DType master_dtype, int world_size,
                                              int ep_size, std::vector<CheckpointShardFile>* files);

struct CheckpointSaveResult {
  std::string path;                  // <dir>/step-N
  uint64_t bytes = 0;                // manifest and shard files together
  std::vector<std::string> removed;  // what pruning removed (rank 0; empty elsewhere)
};

// Collective save of step progress.step, as run progress.run_id (the same on every rank).
CheckpointSaveResult save_checkpoint(const CheckpointContext& context, const ModelParameters& parameters,
                            const AdamWOptimizer& optimizer, const TrainingProgress& progress);

// Checks that `manifest` (read from `path`) describes the model `config` builds: its model
// fingerprint, or else the architecture keys of its stored config, must be this model's
// (src/train/checkpoint_identity.h), and every parameter of `layout` must be present with its
// global shape and the master dtype, with no parameters of another model. SY_BAD_INPUT naming the
// manifest and every differing key (or the first differing tensor).
void check_checkpoint_model(const CheckpointManifest& manifest, const std::string& path, const Config& config,
                            const ParameterLayout& layout, DType master_dtype);

// Loads `path` into `parameters` (and the moments of `optimizer` when not null) on this rank and
// returns the progress stored with it (an older manifest's planned and schedule steps come from its
// stored config; its run id stays ""). SY_BAD_INPUT naming the file on any problem; on failure the
// parameters and moments may be partly overwritten.
TrainingProgress load_checkpoint(const CheckpointContext& context, const std::string& path,
                                 ModelParameters& parameters, AdamWOptimizer* optimizer);

// The tensor part of load_checkpoint for an already read and checked manifest (generate uses it).
void load_checkpoint_tensors(const ExecContext& exec, const std::string& path, const CheckpointManifest& manifest,
                             ModelParameters& parameters, AdamWOptimizer* optimizer);

// The pruning of step 4 above for run `run_id`; returns the paths removed. Safe to call on a
// missing directory.
std::vector<std::string> prune_checkpoints(const std::string& root, int keep_last, int64_t newest_step,
                                           const std::string& run_id);

// Host-side collectives over `communicator` (staging through device memory for NCCL; null or a
// single rank: the identity): every rank's string, in rank order.
std::vector<std::string> all_gather_strings(const std::shared_ptr<Communicator>& communicator,
                                            const std::string& mine);

// Makes every rank agree on the outcome of a step each rank did on its own: returns the first
// (lowest rank's) non-empty error message and sets *exit_code to its exit code; "" when every
// rank succeeded.
std::string agree_on_errors(const std::shared_ptr<Communicator>& communicator, const std::string& local_message,
                            int local_exit_code, int* exit_code);

}  // namespace switchyard
