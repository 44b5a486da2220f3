// "Weights from a path": the one rule by which every command that reads a trained model's weights
// (generate, specialize, report, ckpt export) turns the path a user gives into weights.
//
//   a weights file (final.weights, src/train/weights_file.h)    -> that file
//   a checkpoint folder (step-N, src/train/checkpoint_format.h) -> that checkpoint; it must be
//                                                                  complete (hold COMPLETE)
//   a folder of checkpoints (a checkpoint.dir of step-* folders) -> its newest complete checkpoint
//   a run folder (logging.run_dir: config.yaml, metrics.jsonl, final.weights or checkpoints/)
//       -> its newest complete checkpoint (highest step) in RUN/checkpoints, else in the
//          checkpoint.dir RUN/config.yaml names; RUN/final.weights only when there is none.
//          A finished run saves a checkpoint after its last step, so that checkpoint holds the
//          same weights as final.weights; a preempted run has only checkpoints.
// Anything else is bad input, with a message saying what the path is and what was expected.
#pragma once

#include <string>

#include "src/train/weights_file.h"

namespace switchyard {

// The rule above in a few words, for the commands' --help.
extern const char* const kWeightsPathHelp;

enum class WeightsFormat { weights_file, checkpoint };

struct WeightsSource {
  WeightsFormat format = WeightsFormat::weights_file;
  std::string path;         // the weights file or the checkpoint folder
  std::string picked_because;  // how it was picked from a folder ("the newest complete checkpoint of run
                              // folder runs/x"); "" when the path itself was given
};

// What a path is, as far as weights are concerned (the table above; checked in this order).
enum class PathKind {
  missing,
  weights_file,     // starts with SWYWGHTS
  token_file,       // starts with SWYTOKNS (training data)
  other_file,
  checkpoint,       // named step-N, or holding manifest.json or COMPLETE (complete or not)
  run_folder,       // holding config.yaml, metrics.jsonl, final.weights or checkpoints/
  checkpoint_root,  // holding step-* folders
  empty_folder,
  other_folder
};
PathKind kind_of_path(const std::string& path);

// What `path` is, in words for messages: "'runs/x' is a run folder with no final.weights and no
// complete checkpoint", "'a.txt' is a file, not a weights file (it does not start with SWYWGHTS)".
std::string describe_path(const std::string& path);

// The rule above: true and *source when `path` leads to weights; false and *problem (what the
// path is and what was expected) when it does not.
bool find_weights_source(const std::string& path, WeightsSource* source, std::string* problem);

// The same; SY_BAD_INPUT with the problem when `path` leads to no weights.
WeightsSource resolve_weights_source(const std::string& path);

// One line for stderr: "weights from runs/x/checkpoints/step-000000200 (the newest complete
// checkpoint of runs/x)".
std::string describe_weights_source(const WeightsSource& source);

// The model's weights from `source` with the config that built them: a weights file as it is; a
// checkpoint's master weights (verified against their checksums) with every expert parameter's
// experts stacked back into one [E, ...] tensor under the parameter's name, as in a weights file.
WeightsFile read_weights_source(const WeightsSource& source);

}  // namespace switchyard
