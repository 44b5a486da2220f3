// Saving and loading the training state (src/train/checkpoint.h).
#include "src/train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "src/comm/bootstrap.h"
#include "src/comm/parallel_layout.h"
#include "src/core/error.h"
#include "src/train/checkpoint_identity.h"

namespace switchyard {
namespace fs = std::filesystem;
namespace {

std::string checkpoint_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::bf16: return "BF16";
    default: SY_THROW("checkpoints hold fp32 / fp64 / bf16 tensors, not ", dtype_name(dtype));
  }
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t axis = 0; axis < shape.size(); ++axis) text += (axis ? ", " : "") + std::to_string(shape[axis]);
  return text + "]";
}

uint64_t align_up(uint64_t value, uint64_t alignment) { return (value + alignment - 1) / alignment * alignment; }

// Where one state of group `group` starts in device (or host) memory.
char* state_base(const ModelParameters& parameters, const AdamWOptimizer* optimizer, TensorState state,
                 ParameterGroup group) {
  switch (state) {
    case TensorState::master: return static_cast<char*>(parameters.master_group(group).data);
    case TensorState::exp_avg: return static_cast<char*>(optimizer->exp_avg(group).data);
    case TensorState::exp_avg_sq: return static_cast<char*>(optimizer->exp_avg_sq(group).data);
  }
  return nullptr;
}

// This rank's copy of `tensor` (a whole dense parameter or one local expert of a sharded one):
// the element offset inside its group's buffers. SY_CHECK when this rank does not hold it.
int64_t local_element_offset(const ParameterSpec& spec, int64_t expert) {
  if (expert < 0) return spec.offset;
  const int64_t local = expert - spec.expert_first;
  SY_CHECK(spec.is_sharded() && local >= 0 && local < spec.shape[0], "expert ", expert, " of ", spec.name,
           " is not held by this rank (it holds ", spec.expert_first, " .. ", spec.expert_first + spec.shape[0] - 1,
           ")");
  return spec.offset + local * (spec.numel() / spec.shape[0]);
}

void gather_host(const std::shared_ptr<Communicator>& communicator, const void* send, void* receive, int64_t count,
                 DType dtype) {
  const size_t bytes = size_t(count) * dtype_size(dtype), ranks = size_t(communicator->size());
  if (communicator->device() == DeviceKind::cpu) {
    communicator->all_gather(send, receive, count, dtype);
    return;
  }
  Buffer device_send(communicator->device(), bytes), device_receive(communicator->device(), bytes * ranks);
  device_copy(device_send.data(), communicator->device(), send, DeviceKind::cpu, bytes);
  communicator->all_gather(device_send.data(), device_receive.data(), count, dtype);
  communicator->synchronize();
  device_copy(receive, DeviceKind::cpu, device_receive.data(), communicator->device(), bytes * ranks);
}

bool has_peers(const ParallelGroups* groups) {
  return groups != nullptr && groups->world != nullptr && groups->world->size() > 1;
}

// Renames `path` to .trash-<run id>-<name>-<pid> (unless it is such a leftover already), then
// removes it: a crash in between leaves a name nothing mistakes for a checkpoint, and the run id
// says whose leftover it is.
void move_aside_and_remove(const fs::path& path, const std::string& run_id, std::vector<std::string>* removed) {
  std::error_code status;
  fs::path doomed = path;
  const std::string name = path.filename().string();
  if (name.rfind(".trash-", 0) != 0) {
    doomed = path.parent_path() / (".trash-" + run_id + "-" + name + "-" + std::to_string(::getpid()));
    fs::rename(path, doomed, status);
    if (status) SY_THROW("cannot move '", path.string(), "' aside to remove it: ", status.message());
  }
  fs::remove_all(doomed, status);
  if (status) SY_THROW("cannot remove '", doomed.string(), "': ", status.message());
  if (removed) removed->push_back(path.string());
}

// The run a leftover of an interrupted save or removal belongs to: the run id in its name, "" for
// the names of earlier versions; false when `name` is no such leftover.
bool parse_leftover_name(const std::string& name, std::string* run_id) {
  int64_t step = 0;
  if (parse_checkpoint_temp_name(name, &step, run_id)) return true;
  if (name.rfind(".trash-", 0) != 0) return false;
  const std::string tagged = name.substr(7);
  const bool has_id = tagged.size() > kRunIdLength && tagged[kRunIdLength] == '-' &&
                      is_run_id(tagged.substr(0, kRunIdLength));
  *run_id = has_id ? tagged.substr(0, kRunIdLength) : "";
  return true;
}

// The run that wrote step directory `path` (its manifest's run id; "" when unknown or older).
std::string step_directory_run_id(const fs::path& path, int64_t step) {
  CheckpointListing item;
  item.path = path.string();
  item.step = step;
  return read_checkpoint_origin(item).run_id;
}

// The expert placement a plan follows. Its numbers come from a config already checked against the
// world, so a problem here is a bug, not an input error.
ParallelLayout planned_layout(int world_size, int ep_size, int64_t num_experts) {
  const std::string problem = ParallelLayout::problem(world_size, ep_size, int(num_experts));
  SY_CHECK(world_size >= 1 && num_experts >= 0 && problem.empty(), "plan_checkpoint: world ", world_size,
           ", ep_size ", ep_size, ": ", problem);
  return ParallelLayout(world_size, ep_size, int(num_experts));
}

}  // namespace

// ---- Plan ----------------------------------------------------------------------------------------

std::vector<CheckpointTensor> plan_checkpoint(const ParameterLayout& layout, DType master_dtype, int world_size,
                                              int ep_size, std::vector<CheckpointShardFile>* files) {
  planned_layout(world_size, ep_size, /*num_experts=*/0);  // the ranks, before any expert
  const std::string dtype = checkpoint_dtype_name(master_dtype);
  const size_t element = dtype_size(master_dtype);
  std::vector<CheckpointTensor> tensors;
  std::vector<uint64_t> load(size_t(world_size), 0);
  // Experts first: their owners are fixed, and the dense tensors then even out the bytes.
  for (int pass = 0; pass < 2; ++pass) {
    for (int state = 0; state < kNumTensorStates; ++state) {
      for (const ParameterSpec& spec : layout.specs()) {
        if (spec.is_sharded() != (pass == 0)) continue;
        const int64_t experts = spec.is_sharded() ? spec.expert_total : 1;
        const ParallelLayout expert_layout =
            planned_layout(world_size, ep_size, spec.is_sharded() ? spec.expert_total : 0);
        for (int64_t expert = 0; expert < experts; ++expert) {
          CheckpointTensor tensor;
          tensor.parameter = spec.name;
          tensor.state = TensorState(state);
          tensor.expert = spec.is_sharded() ? expert : -1;
          tensor.name = checkpoint_tensor_name(tensor.state, spec.name, tensor.expert);
          tensor.dtype = dtype;
          tensor.shape = spec.shape;
          if (spec.is_sharded()) {
            const int64_t per_rank = spec.shape[0];
            SY_CHECK(per_rank > 0 && per_rank == expert_layout.experts_per_rank(), "plan_checkpoint: ", spec.name,
                     " has ", per_rank, " experts per rank, ", spec.expert_total, " in all, ep_size ", ep_size);
            tensor.shape.erase(tensor.shape.begin());
            // Written by the holder of its shard in the first expert-parallel group.
            tensor.owner = expert_layout.world_rank_of(/*ep_group=*/0, expert_layout.shard_of_expert(int(expert)));
          }
          int64_t count = 1;
          for (int64_t dim : tensor.shape) count *= dim;
          tensor.bytes = uint64_t(count) * element;
          if (!spec.is_sharded())
            tensor.owner = int(std::min_element(load.begin(), load.end()) - load.begin());
          load[size_t(tensor.owner)] += tensor.bytes;
          tensors.push_back(std::move(tensor));
        }
      }
    }
  }
  // File order: by owner, then plan order; offsets 64-byte aligned after the header.
  std::stable_sort(tensors.begin(), tensors.end(),
                   [](const CheckpointTensor& left, const CheckpointTensor& right) { return left.owner < right.owner; });
  std::vector<uint64_t> end(size_t(world_size), kShardHeaderBytes);
  std::vector<bool> owns(size_t(world_size), false);
  for (CheckpointTensor& tensor : tensors) {
    owns[size_t(tensor.owner)] = true;
    uint64_t& position = end[size_t(tensor.owner)];
    tensor.file = shard_file_name(tensor.owner);
    tensor.offset = align_up(position, kShardAlignment);
    position = tensor.offset + tensor.bytes;
  }
  if (files) {
    files->clear();
    for (int rank = 0; rank < world_size; ++rank)
      if (owns[size_t(rank)])
        files->push_back(CheckpointShardFile{shard_file_name(rank), rank, end[size_t(rank)]});
  }
  return tensors;
}

// ---- Collectives ---------------------------------------------------------------------------------

std::vector<std::string> all_gather_strings(const std::shared_ptr<Communicator>& communicator,
                                            const std::string& mine) {
  if (communicator == nullptr || communicator->size() <= 1) return {mine};
  const int ranks = communicator->size();
  int64_t length = int64_t(mine.size());
  std::vector<int64_t> lengths(size_t(ranks), 0);
  gather_host(communicator, &length, lengths.data(), 1, DType::i64);
  const int64_t longest = std::max<int64_t>(1, *std::max_element(lengths.begin(), lengths.end()));
  std::vector<char> send(size_t(longest), 0), receive(size_t(longest) * size_t(ranks), 0);
  std::memcpy(send.data(), mine.data(), mine.size());
  gather_host(communicator, send.data(), receive.data(), longest, DType::u8);
  std::vector<std::string> all;
  for (int rank = 0; rank < ranks; ++rank)
    all.emplace_back(receive.data() + size_t(rank) * size_t(longest), size_t(lengths[size_t(rank)]));
  return all;
}

std::string agree_on_errors(const std::shared_ptr<Communicator>& communicator, const std::string& local_message,
                            int local_exit_code, int* exit_code) {
  const std::string mine = local_message.empty() ? "" : std::to_string(local_exit_code) + ":" + local_message;
  for (const std::string& entry : all_gather_strings(communicator, mine)) {
    if (entry.empty()) continue;
    const size_t colon = entry.find(':');
    if (exit_code) *exit_code = std::atoi(entry.substr(0, colon).c_str());
    return entry.substr(colon + 1);
  }
  if (exit_code) *exit_code = kExitOk;
  return "";
}

// ---- Save ----------------------------------------------------------------------------------------

CheckpointSaveResult save_checkpoint(const CheckpointContext& context, const ModelParameters& parameters,
                                     const AdamWOptimizer& optimizer, const TrainingProgress& progress) {
  SY_CHECK(context.config != nullptr, "save_checkpoint without a config");
  const Config& config = *context.config;
  const bool writer = context.world_rank == 0, peers = has_peers(context.groups);
  const int ep_size = config.parallel.ep_size;
  const std::string& run_id = progress.run_id;
  SY_CHECK(is_run_id(run_id), "save_checkpoint: '", run_id, "' is not a run id");
  const fs::path root(config.checkpoint.dir);
  const fs::path temp_path = root / checkpoint_temp_name(progress.step, run_id);
  ops::synchronize(context.exec);  // the step's updates are in memory

  std::string final_name;
  if (writer) {
    std::error_code status;
    fs::create_directories(root, status);
    if (status) SY_BAD_INPUT("cannot create checkpoint.dir '", root.string(), "': ", status.message());
    if (fs::exists(temp_path, status)) move_aside_and_remove(temp_path, run_id, nullptr);  // an interrupted save
    fs::create_directory(temp_path, status);
    if (status) SY_THROW("cannot create '", temp_path.string(), "': ", status.message());
    // step-N, unless another run's step N holds that name.
    final_name = checkpoint_step_name(progress.step);
    if (fs::exists(root / final_name, status) && step_directory_run_id(root / final_name, progress.step) != run_id)
      final_name = checkpoint_step_name(progress.step, run_id);
  }
  // Every rank learns the name; it is also the barrier after which the temporary directory exists.
  if (peers) final_name = all_gather_strings(context.groups->world, final_name)[0];
  const fs::path final_path = root / final_name;

  std::vector<CheckpointShardFile> files;
  std::vector<CheckpointTensor> tensors =
      plan_checkpoint(parameters.layout(), parameters.master_dtype(), context.world_size, ep_size, &files);
  std::string checksums;  // this rank's, 8 bytes each, in file order
  const std::string shard_path = (temp_path / shard_file_name(context.world_rank)).string();
  bool writes = false;
  for (const CheckpointTensor& tensor : tensors) writes |= tensor.owner == context.world_rank;
  if (writes) {
    const int descriptor = ::open(shard_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (descriptor < 0)
      SY_THROW("cannot create checkpoint shard '", shard_path, "': ", std::strerror(errno),
               " (with several nodes, checkpoint.dir must be on a file system they all see)");
    try {
      unsigned char header[kShardHeaderBytes] = {};
      const uint32_t version = kCheckpointFormatVersion, rank = uint32_t(context.world_rank);
      std::memcpy(header, kShardMagic, sizeof(kShardMagic));
      std::memcpy(header + 8, &version, 4);
      std::memcpy(header + 12, &rank, 4);
      std::memcpy(header + 16, &progress.step, 8);
      write_all(descriptor, header, sizeof(header), shard_path);
      uint64_t position = kShardHeaderBytes;
      std::vector<char> host;
      const size_t element = dtype_size(parameters.master_dtype());
      for (const CheckpointTensor& tensor : tensors) {
        if (tensor.owner != context.world_rank) continue;
        const int index = parameters.layout().find(tensor.parameter);
        const ParameterSpec& spec = parameters.layout().spec(index);
        const char* source = state_base(parameters, &optimizer, tensor.state, spec.group) +
                             size_t(local_element_offset(spec, tensor.expert)) * element;
        host.assign(size_t(tensor.offset - position) + size_t(tensor.bytes), 0);  // alignment padding, then data
        char* data = host.data() + (tensor.offset - position);
        if (tensor.bytes) device_copy(data, DeviceKind::cpu, source, parameters.device(), size_t(tensor.bytes));
        const uint64_t checksum = xxh64(data, size_t(tensor.bytes));
        checksums.append(reinterpret_cast<const char*>(&checksum), sizeof(checksum));
        write_all(descriptor, host.data(), host.size(), shard_path);
        position = tensor.offset + tensor.bytes;
      }
      if (::fsync(descriptor) != 0) SY_THROW("fsync of '", shard_path, "' failed: ", std::strerror(errno));
    } catch (...) {
      ::close(descriptor);
      throw;
    }
    ::close(descriptor);
    inject_fault_point("checkpoint_shard_written");
  }

  // Every rank's checksums reach rank 0 (an all-gather: it is also the point where every shard is
  // known to be on disk).
  const std::vector<std::string> all_checksums =
      peers ? all_gather_strings(context.groups->world, checksums) : std::vector<std::string>{checksums};
  CheckpointSaveResult result;
  result.path = final_path.string();
  if (writer) {
    std::vector<size_t> cursor(all_checksums.size(), 0);
    for (CheckpointTensor& tensor : tensors) {
      const std::string& source = all_checksums.at(size_t(tensor.owner));
      size_t& at = cursor[size_t(tensor.owner)];
      SY_CHECK(at + 8 <= source.size(), "save_checkpoint: rank ", tensor.owner, " sent too few checksums");
      std::memcpy(&tensor.checksum, source.data() + at, 8);
      at += 8;
    }
    CheckpointManifest manifest;
    manifest.run_id = run_id;
    manifest.model_fingerprint = model_fingerprint(config);
    manifest.planned_steps = progress.planned_steps;
    manifest.lr_schedule_steps = progress.lr_schedule_steps;
    manifest.step = progress.step;
    manifest.tokens_seen = progress.tokens_seen;
    manifest.world_size = context.world_size;
    manifest.ep_size = ep_size;
    manifest.config_yaml = config_to_yaml(config);
    manifest.train_data = progress.train_data;
    manifest.rng = progress.rng;
    manifest.optimizer_updates = progress.optimizer_updates;
    manifest.loss_scaling = progress.loss_scaling;
    manifest.loss_scaler = progress.loss_scaler;
    manifest.files = files;
    manifest.tensors = std::move(tensors);
    const std::string text = manifest_to_json(manifest).dump(1) + "\n";
    const std::string manifest_path = (temp_path / kCheckpointManifestFile).string();
    const int descriptor = ::open(manifest_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (descriptor < 0) SY_THROW("cannot create '", manifest_path, "': ", std::strerror(errno));
    try {
      write_all(descriptor, text.data(), text.size(), manifest_path);
      if (::fsync(descriptor) != 0) SY_THROW("fsync of '", manifest_path, "' failed: ", std::strerror(errno));
    } catch (...) {
      ::close(descriptor);
      throw;
    }
    ::close(descriptor);
    fsync_path(temp_path.string(), true);
    inject_fault_point("checkpoint_manifest_written");

    std::error_code status;
    if (fs::exists(final_path, status)) {
      // This run's own abandoned step N (it resumed from an older checkpoint) or its incomplete save;
      // another run's directory may have appeared since the name was chosen: never replaced.
      if (step_directory_run_id(final_path, progress.step) != run_id &&
          final_path.filename().string() == checkpoint_step_name(progress.step))
        SY_THROW("'", final_path.string(), "' appeared during the save and is another run's: not replacing it "
                 "(are two runs saving into checkpoint.dir '", root.string(), "' at once?)");
      move_aside_and_remove(final_path, run_id, nullptr);
    }
    fs::rename(temp_path, final_path, status);
    if (status) SY_THROW("renaming '", temp_path.string(), "' to '", final_path.string(), "' failed: ", status.message());
    fsync_path(root.string(), true);
    inject_fault_point("checkpoint_renamed");
    write_complete_marker(final_path.string(), text);
    inject_fault_point("checkpoint_complete");

    result.bytes = text.size();
    for (const CheckpointShardFile& file : files) result.bytes += file.bytes;
    result.removed = prune_checkpoints(root.string(), config.checkpoint.keep_last, progress.step, run_id);
  }
  if (peers) context.groups->world->barrier();
  return result;
}

std::vector<std::string> prune_checkpoints(const std::string& root, int keep_last, int64_t newest_step,
                                           const std::string& run_id) {
  SY_CHECK(is_run_id(run_id), "prune_checkpoints: '", run_id, "' is not a run id");
  std::vector<std::string> removed;
  std::error_code status;
  if (!fs::is_directory(root, status)) return removed;
  // Leftovers of this run's interrupted saves and removals, and of earlier versions' (their names
  // carry no run id); none of them can be a usable checkpoint.
  std::vector<fs::path> leftovers;
  for (const fs::directory_entry& entry : fs::directory_iterator(root, status)) {
    std::string owner;
    if (parse_leftover_name(entry.path().filename().string(), &owner) && (owner.empty() || owner == run_id))
      leftovers.push_back(entry.path());
  }
  for (const fs::path& path : leftovers) move_aside_and_remove(path, run_id, &removed);

  std::vector<CheckpointOrigin> complete;
  for (const CheckpointOrigin& origin : list_checkpoint_origins(root)) {
    if (origin.run_id != run_id) continue;       // another run's, or an earlier version's: never removed
    if (origin.step > newest_step) continue;     // a later step of an abandoned timeline: not ours to judge
    if (origin.complete) complete.push_back(origin);
    else if (origin.step < newest_step) move_aside_and_remove(origin.path, run_id, &removed);  // crash before marker
  }
  if (keep_last > 0 && complete.size() > size_t(keep_last))
    for (size_t index = 0; index + size_t(keep_last) < complete.size(); ++index)
      move_aside_and_remove(complete[index].path, run_id, &removed);
  return removed;
}

// ---- Load ----------------------------------------------------------------------------------------

void check_checkpoint_model(const CheckpointManifest& manifest, const std::string& path, const Config& config,
                            const ParameterLayout& layout, DType master_dtype) {
  const std::string manifest_path = (fs::path(path) / kCheckpointManifestFile).string();
  const std::vector<std::string> differences =
      checkpoint_model_differences(manifest.model_fingerprint, manifest.config_yaml, manifest_path, config);
  if (!differences.empty())
    SY_BAD_INPUT("checkpoint ", manifest_path, " is of another model: ", join_differences(differences));
  const std::string dtype = checkpoint_dtype_name(master_dtype);
  size_t expected = 0;
  for (const ParameterSpec& spec : layout.specs()) {
    std::vector<int64_t> shape = spec.shape;
    if (spec.is_sharded()) shape.erase(shape.begin());
    const int64_t experts = spec.is_sharded() ? spec.expert_total : 1;
    for (int state = 0; state < kNumTensorStates; ++state) {
      for (int64_t expert = 0; expert < experts; ++expert) {
        const std::string name = checkpoint_tensor_name(TensorState(state), spec.name, spec.is_sharded() ? expert : -1);
        const CheckpointTensor* tensor = manifest.find(name);
        if (tensor == nullptr)
          SY_BAD_INPUT("checkpoint ", manifest_path, " is of another model: it has no tensor ", name);
        if (tensor->shape != shape)
          SY_BAD_INPUT("checkpoint ", manifest_path, " is of another model: tensor ", name, " is ",
                       shape_text(tensor->shape), ", this model needs ", shape_text(shape));
        if (tensor->dtype != dtype)
          SY_BAD_INPUT("checkpoint ", manifest_path, ": tensor ", name, " is ", tensor->dtype, ", this run keeps ",
                       dtype, " master weights");
        ++expected;
      }
    }
  }
  if (manifest.tensors.size() != expected) {
    for (const CheckpointTensor& tensor : manifest.tensors)
      if (layout.find(tensor.parameter) < 0)
        SY_BAD_INPUT("checkpoint ", manifest_path, " is of another model: it has tensor ", tensor.name,
                     " of a parameter this model lacks");
    SY_BAD_INPUT("checkpoint ", manifest_path, " has ", manifest.tensors.size(), " tensors, this model ", expected);
  }
}

void load_checkpoint_tensors(const ExecContext& exec, const std::string& path, const CheckpointManifest& manifest,
                             ModelParameters& parameters, AdamWOptimizer* optimizer) {
  CheckpointReader reader(path, manifest);
  const ParameterLayout& layout = parameters.layout();
  const size_t element = dtype_size(parameters.master_dtype());
  const int states = optimizer ? kNumTensorStates : 1;
  std::vector<char> host;
  ops::synchronize(exec);  // nothing queued may still read or write these buffers
  for (int state = 0; state < states; ++state) {
    for (const ParameterSpec& spec : layout.specs()) {
      std::vector<int64_t> experts = {-1};  // -1: the whole (dense) tensor
      if (spec.is_sharded()) {
        experts.clear();
        for (int64_t local = 0; local < spec.shape[0]; ++local) experts.push_back(spec.expert_first + local);
      }
      for (int64_t expert : experts) {
        const std::string name = checkpoint_tensor_name(TensorState(state), spec.name, expert);
        const CheckpointTensor* tensor = manifest.find(name);
        SY_CHECK_INPUT(tensor != nullptr, "checkpoint ", path, " has no tensor ", name);
        host.resize(size_t(tensor->bytes));
        reader.read(*tensor, host.data());
        char* destination = state_base(parameters, optimizer, TensorState(state), spec.group) +
                            size_t(local_element_offset(spec, expert)) * element;
        if (tensor->bytes) device_copy(destination, parameters.device(), host.data(), DeviceKind::cpu, host.size());
      }
    }
  }
  parameters.refresh_compute_copies(exec);
  ops::synchronize(exec);
}

TrainingProgress load_checkpoint(const CheckpointContext& context, const std::string& path,
                                 ModelParameters& parameters, AdamWOptimizer* optimizer) {
  SY_CHECK(context.config != nullptr, "load_checkpoint without a config");
  const CheckpointManifest manifest = read_checkpoint_manifest(path);
  check_checkpoint_model(manifest, path, *context.config, parameters.layout(), parameters.master_dtype());
  load_checkpoint_tensors(context.exec, path, manifest, parameters, optimizer);
  TrainingProgress progress;
  progress.run_id = manifest.run_id;
  const std::string manifest_path = (fs::path(path) / kCheckpointManifestFile).string();
  // Manifests of earlier versions: the run planned its config's training.steps, and the cosine
  // always ended there.
  progress.planned_steps = manifest.planned_steps > 0 ? manifest.planned_steps
                                                      : stored_training_steps(manifest.config_yaml, manifest_path);
  progress.lr_schedule_steps = manifest.lr_schedule_steps > 0 ? manifest.lr_schedule_steps : progress.planned_steps;
  progress.step = manifest.step;
  progress.tokens_seen = manifest.tokens_seen;
  progress.rng = manifest.rng;
  progress.train_data = manifest.train_data;
  progress.optimizer_updates = manifest.optimizer_updates;
  progress.loss_scaling = manifest.loss_scaling;
  progress.loss_scaler = manifest.loss_scaler;
  return progress;
}

}  // namespace switchyard
