// Weights from a path (src/train/weights_source.h).
#include "src/train/weights_source.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <vector>

#include "src/core/error.h"
#include "src/train/checkpoint_format.h"
#include "src/train/config.h"
#include "src/train/token_file.h"

namespace switchyard {

const char* const kWeightsPathHelp =
    "a run folder (its newest complete checkpoint, else its final.weights), a checkpoint (step-*), "
    "a folder of checkpoints (its newest complete one) or a weights file";

namespace {

namespace fs = std::filesystem;

constexpr const char* kExpected =
    "expected a run folder (logging.run_dir of `switchyard train`), a checkpoint folder (step-*), a folder of "
    "checkpoints (checkpoint.dir) or a weights file (final.weights)";

bool is_file(const fs::path& path) {
  std::error_code status;
  return fs::is_regular_file(path, status);
}

bool is_folder(const fs::path& path) {
  std::error_code status;
  return fs::is_directory(path, status);
}

// "runs/x/" names the folder x, not an empty last component.
fs::path without_trailing_slash(const std::string& path) {
  fs::path result(path);
  if (result.filename().empty() && result.has_parent_path()) result = result.parent_path();
  return result;
}

bool starts_with_token_magic(const fs::path& path) {
  std::ifstream stream(path, std::ios::binary);
  char magic[sizeof(kTokenFileMagic)] = {};
  return stream.read(magic, sizeof(magic)) && std::memcmp(magic, kTokenFileMagic, sizeof(magic)) == 0;
}

// A folder that is (or was meant to be) one checkpoint: named step-N, or holding its files.
bool looks_like_checkpoint(const fs::path& folder) {
  int64_t step = 0;
  return parse_checkpoint_step_name(without_trailing_slash(folder.string()).filename().string(), &step) ||
         is_file(folder / kCheckpointManifestFile) || is_file(folder / kCheckpointCompleteFile);
}

bool looks_like_run_folder(const fs::path& folder) {
  return is_file(folder / "config.yaml") || is_file(folder / "metrics.jsonl") || is_file(folder / "final.weights") ||
         is_folder(folder / "checkpoints");
}

}  // namespace

PathKind kind_of_path(const std::string& path_text) {
  const fs::path path(path_text);
  std::error_code status;
  const fs::file_status file_status = fs::status(path, status);
  if (!fs::exists(file_status)) return PathKind::missing;
  if (!fs::is_directory(file_status)) {
    if (has_weights_file_magic(path.string())) return PathKind::weights_file;
    if (starts_with_token_magic(path)) return PathKind::token_file;
    return PathKind::other_file;
  }
  if (looks_like_checkpoint(path)) return PathKind::checkpoint;
  if (looks_like_run_folder(path)) return PathKind::run_folder;
  if (!list_checkpoints(path.string()).empty()) return PathKind::checkpoint_root;
  if (fs::is_empty(path, status)) return PathKind::empty_folder;
  return PathKind::other_folder;
}

namespace {

// The newest complete checkpoint over one or more checkpoint folders.
struct CheckpointSearch {
  std::string newest;  // "" when none is complete
  int64_t newest_step = -1;
  int listed = 0, complete = 0;

  void look_in(const std::string& root) {
    for (const CheckpointListing& item : list_checkpoints(root)) {
      ++listed;
      if (!item.complete) continue;
      ++complete;
      if (item.step > newest_step) {
        newest_step = item.step;
        newest = item.path;
      }
    }
  }
};

// Where a run folder's checkpoints are: RUN/checkpoints (the default checkpoint.dir), then the
// checkpoint.dir its resolved config.yaml names, when that is another existing folder. The run's
// own folder comes first so that a run copied elsewhere does not reach back into the original.
std::vector<std::string> run_checkpoint_folders(const fs::path& run) {
  std::vector<std::string> folders{(run / "checkpoints").string()};
  const fs::path config_path = run / "config.yaml";
  if (!is_file(config_path)) return folders;
  std::string configured;
  try {
    const std::string yaml = read_text_file(config_path.string(), "run config");
    configured = parse_stored_config(yaml, config_path.string()).checkpoint.dir;
  } catch (const Error&) {
    return folders;  // a config this build cannot read names no other folder; RUN/checkpoints still counts
  }
  std::error_code status;
  if (configured.empty() || !is_folder(configured)) return folders;
  if (fs::weakly_canonical(configured, status) != fs::weakly_canonical(folders[0], status))
    folders.push_back(configured);
  return folders;
}

std::string count_text(int count, const char* noun) {
  return std::to_string(count) + " " + noun + (count == 1 ? "" : "s");
}

// What `path` is, for messages; `search` holds what a run folder or checkpoint.dir contains.
std::string what_path_is(const std::string& path, PathKind kind, const CheckpointSearch& search,
                         const std::vector<std::string>& folders) {
  const std::string named = "'" + path + "'";
  switch (kind) {
    case PathKind::missing: return named + " does not exist";
    case PathKind::weights_file: return named + " is a weights file";
    case PathKind::token_file:
      return named + " is a token file (training data written by prepare-data), not weights";
    case PathKind::other_file:
      return named + " is a file but not a switchyard weights file (it does not start with SWYWGHTS)";
    case PathKind::checkpoint: {
      const std::string marker = (fs::path(path) / kCheckpointCompleteFile).string();
      if (!is_file(marker))
        return named + " is a checkpoint folder without COMPLETE: " + marker + " is missing (the save did not finish)";
      return named + " is a checkpoint folder";
    }
    case PathKind::checkpoint_root:
      return named + " is a folder of checkpoints (checkpoint.dir) with " + count_text(search.listed, "checkpoint") +
             ", " + std::to_string(search.complete) + " complete";
    case PathKind::run_folder: {
      std::string where;
      for (const std::string& folder : folders) where += (where.empty() ? "" : " or ") + folder;
      const bool has_final_weights = is_file(fs::path(path) / "final.weights");
      return named + " is a run folder with " + (has_final_weights ? "" : "no final.weights, ") +
             count_text(search.complete, "complete checkpoint") + " in " + where +
             (search.listed > search.complete
                  ? " (and " + count_text(search.listed - search.complete, "incomplete one") + ")"
                  : "");
    }
    case PathKind::empty_folder: return named + " is an empty folder";
    case PathKind::other_folder:
      return named + " is a folder but not a run folder (no config.yaml, metrics.jsonl, final.weights or "
                     "checkpoints/ in it), not a checkpoint (no manifest.json) and not a folder of checkpoints "
                     "(no step-* folders)";
  }
  return named;
}

struct Survey {
  PathKind kind = PathKind::missing;
  CheckpointSearch search;
  std::vector<std::string> folders;  // run folder: where its checkpoints were looked for
};

Survey survey(const std::string& path) {
  Survey result;
  result.kind = kind_of_path(path);
  if (result.kind == PathKind::checkpoint_root) {
    result.search.look_in(path);
  } else if (result.kind == PathKind::run_folder) {
    // The first folder with a complete checkpoint: RUN/checkpoints, then the config's checkpoint.dir.
    result.folders = run_checkpoint_folders(path);
    for (const std::string& folder : result.folders)
      if (result.search.newest.empty()) result.search.look_in(folder);
  } else if (result.kind == PathKind::checkpoint) {
    // Beside an incomplete checkpoint: what to use instead.
    result.search.look_in(without_trailing_slash(path).parent_path().string());
  }
  return result;
}

}  // namespace

std::string describe_path(const std::string& path) {
  const Survey facts = survey(path);
  return what_path_is(path, facts.kind, facts.search, facts.folders);
}

bool find_weights_source(const std::string& path, WeightsSource* source, std::string* problem) {
  const Survey facts = survey(path);
  const std::string what = what_path_is(path, facts.kind, facts.search, facts.folders);
  *source = WeightsSource();
  switch (facts.kind) {
    case PathKind::weights_file:
      source->format = WeightsFormat::weights_file;
      source->path = path;
      return true;
    case PathKind::checkpoint:
      if (!is_file(fs::path(path) / kCheckpointCompleteFile)) {
        *problem = what + "; give a complete checkpoint" +
                   (facts.search.newest.empty() ? "" : " (the newest beside it: " + facts.search.newest + ")");
        return false;
      }
      source->format = WeightsFormat::checkpoint;
      source->path = path;
      return true;
    case PathKind::checkpoint_root:
      if (facts.search.newest.empty()) {
        *problem = what + ": none holds a COMPLETE marker, so none has weights to read";
        return false;
      }
      source->format = WeightsFormat::checkpoint;
      source->path = facts.search.newest;
      source->picked_because = "the newest complete checkpoint in " + path;
      return true;
    case PathKind::run_folder: {
      if (!facts.search.newest.empty()) {
        source->format = WeightsFormat::checkpoint;
        source->path = facts.search.newest;
        source->picked_because = "the newest complete checkpoint of run folder " + path;
        return true;
      }
      const std::string weights = (fs::path(path) / "final.weights").string();
      if (is_file(weights)) {
        source->format = WeightsFormat::weights_file;
        source->path = weights;
        source->picked_because = "the final weights of run folder " + path + ", which has no complete checkpoint";
        return true;
      }
      *problem = what + ": it has no weights yet (a run writes a checkpoint every checkpoint.every steps, at a "
                        "preemption signal and at the end, final.weights at the end); if its checkpoint.dir is "
                        "elsewhere, give that folder";
      return false;
    }
    default:
      *problem = what + "; " + kExpected;
      return false;
  }
}

WeightsSource resolve_weights_source(const std::string& path) {
  WeightsSource source;
  std::string problem;
  if (!find_weights_source(path, &source, &problem)) SY_BAD_INPUT(problem);
  return source;
}

std::string describe_weights_source(const WeightsSource& source) {
  return "weights from " + source.path +
         (source.picked_because.empty() ? std::string() : " (" + source.picked_because + ")");
}

namespace {

// A checkpoint's master weights in weights-file form (experts stacked back into [E, ...]).
WeightsFile read_checkpoint_weights(const std::string& directory) {
  const CheckpointManifest manifest = read_checkpoint_manifest(directory);
  const std::string manifest_path = (fs::path(directory) / kCheckpointManifestFile).string();
  // Each parameter's master tensors, in the manifest's order (experts: any order; sorted below).
  std::vector<std::string> order;
  std::map<std::string, std::vector<const CheckpointTensor*>> parts;
  for (const CheckpointTensor& tensor : manifest.tensors) {
    if (tensor.state != TensorState::master) continue;
    if (tensor.dtype != "F32")
      SY_BAD_INPUT("checkpoint ", manifest_path, ": tensor ", tensor.name, " is ", tensor.dtype,
                   "; weights are read as F32 (a checkpoint of fp64 masters loads only with train --resume)");
    auto& list = parts[tensor.parameter];
    if (list.empty()) order.push_back(tensor.parameter);
    list.push_back(&tensor);
  }
  WeightsFile weights;
  weights.config_yaml = manifest.config_yaml;
  CheckpointReader reader(directory, manifest);
  for (const std::string& parameter : order) {
    std::vector<const CheckpointTensor*>& list = parts[parameter];
    std::sort(list.begin(), list.end(),
              [](const CheckpointTensor* left, const CheckpointTensor* right) { return left->expert < right->expert; });
    const bool experts = list.front()->expert >= 0;
    for (size_t index = 0; index < list.size(); ++index) {
      const CheckpointTensor& part = *list[index];
      if (experts ? part.expert != int64_t(index) || part.shape != list.front()->shape : list.size() != 1)
        SY_BAD_INPUT("checkpoint ", manifest_path, ": the master tensors of ", parameter,
                     " are not one tensor or experts 0 .. E-1 of one shape (at ", part.name, ")");
    }
    WeightsTensor tensor;
    tensor.name = parameter;
    tensor.shape = list.front()->shape;
    if (experts) tensor.shape.insert(tensor.shape.begin(), int64_t(list.size()));
    const size_t part_values = size_t(list.front()->bytes / sizeof(float));
    tensor.values.resize(part_values * list.size());
    for (size_t index = 0; index < list.size(); ++index)
      reader.read(*list[index], tensor.values.data() + index * part_values);
    weights.tensors.push_back(std::move(tensor));
  }
  return weights;
}

}  // namespace

WeightsFile read_weights_source(const WeightsSource& source) {
  if (source.format == WeightsFormat::weights_file) return read_weights_file(source.path);
  return read_checkpoint_weights(source.path);
}

}  // namespace switchyard
