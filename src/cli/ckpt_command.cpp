// switchyard ckpt inspect DIR [--no-verify] [--tensors]
// switchyard ckpt export PATH --format safetensors OUT [--dtype fp32|bf16] [--optimizer] [--merge-experts]
//
// Tools for checkpoints (format: src/train/checkpoint_format.h, docs/CHECKPOINTS.md).
//   inspect  DIR is one checkpoint (a step-* directory): prints a summary of its manifest, then
//            reads every tensor and verifies its checksum. DIR is a checkpoint.dir: lists its
//            checkpoints, each complete / incomplete and verified or not. Exit 2 (the error naming
//            the file) when anything is missing, truncated, corrupt or incomplete.
//   export   writes the master weights (with --optimizer also the AdamW moments) of PATH to OUT in
//            the safetensors format, verifying each tensor it reads. PATH is found by the rule every
//            weights-reading command shares (src/train/weights_source.h): a run folder (its newest
//            complete checkpoint, else final.weights), a checkpoint, a folder of them, a weights file.
//   A path that is none of these is bad input saying what it is (src/train/weights_source.h
//   describe_path) and what was expected.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "src/cli/cli_args.h"
#include "src/cli/commands.h"
#include "src/core/error.h"
#include "src/train/checkpoint_export.h"
#include "src/train/checkpoint_format.h"
#include "src/train/config.h"
#include "src/train/weights_source.h"

namespace switchyard {
namespace {

std::string megabytes(uint64_t bytes) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(bytes < 10000000 ? 3 : 1) << double(bytes) / 1e6 << " MB";
  return out.str();
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t axis = 0; axis < shape.size(); ++axis) text += (axis ? ", " : "") + std::to_string(shape[axis]);
  return text + "]";
}

void print_model(const CheckpointManifest& manifest, const std::string& directory, std::ostream& out) {
  try {
    const Config config = parse_stored_config(manifest.config_yaml, directory + "/manifest.json (config)");
    const ModelConfig& model = config.model;
    out << "  model           d_model " << model.d_model << ", " << model.n_layers << " layers, " << model.n_heads
        << " heads, vocab " << model.vocab_size << ", seq_len " << model.seq_len << "; " << config.moe.num_experts
        << " experts (expert_d_ff " << config.moe.expert_d_ff << ", " << expert_activation_name(config.moe.activation)
        << ", top_k " << config.moe.top_k << ") in " << model.moe_block_count() << " MoE block(s)"
        << (model.dense_first_blocks > 0 ? ", first " + std::to_string(model.dense_first_blocks) + " block(s) dense"
                                         : std::string())
        << (config.moe.num_shared_experts > 0
                ? ", " + std::to_string(config.moe.num_shared_experts) + " shared expert(s) of d_ff " +
                      std::to_string(config.moe.shared_expert_d_ff)
                : std::string())
        << "\n"
        << "  run             training.steps " << config.training.steps << ", seed " << config.training.seed
        << ", data " << config.data.path << ", checkpoint.dir " << config.checkpoint.dir << "\n";
  } catch (const Error& error) {
    out << "  model           (the stored config does not load in this build: " << error.message() << ")\n";
  }
}

void print_summary(const CheckpointManifest& manifest, const std::string& directory, bool list_tensors,
                   std::ostream& out) {
  out << "checkpoint " << directory << "\n"
      << "  format          " << kCheckpointFormatName << " v" << manifest.format_version
      << ", checksums XXH64 per tensor\n"
      << "  step            " << manifest.step << " (" << manifest.tokens_seen << " tokens seen)\n"
      << "  saved by        " << manifest.world_size << " rank(s), ep_size " << manifest.ep_size << "\n";
  print_model(manifest, directory, out);
  out << "  data position   train: " << manifest.train_data.samples_consumed << " samples consumed (seed "
      << manifest.train_data.seed << ", file of " << manifest.train_data.token_count << " tokens, seq_len "
      << manifest.train_data.seq_len << ")\n"
      << "  rng             seed " << manifest.rng.seed << ", router-jitter counter " << manifest.rng.jitter_micro_steps
      << "\n"
      << "  optimizer       AdamW, " << manifest.optimizer_updates << " updates applied\n"
      << "  loss scaler     " << (manifest.loss_scaling ? "on" : "off") << ", scale " << manifest.loss_scaler.scale
      << ", " << manifest.loss_scaler.total_skips << " step(s) skipped in all\n";
  std::map<int, uint64_t> bytes_by_state;
  int64_t parameters = 0, expert_tensors = 0;
  std::map<std::string, int> expert_parameters;
  for (const CheckpointTensor& tensor : manifest.tensors) {
    bytes_by_state[int(tensor.state)] += tensor.bytes;
    if (tensor.state != TensorState::master) continue;
    int64_t count = 1;
    for (int64_t dim : tensor.shape) count *= dim;
    parameters += count;
    if (tensor.expert >= 0) {
      ++expert_tensors;
      expert_parameters[tensor.parameter] = std::max<int>(expert_parameters[tensor.parameter], int(tensor.expert) + 1);
    }
  }
  out << "  tensors         " << manifest.tensors.size() << " (" << std::setprecision(4) << double(parameters) / 1e6
      << "M parameters; " << expert_tensors << " expert tensors of " << expert_parameters.size()
      << " expert parameters); master " << megabytes(bytes_by_state[0]) << ", moments "
      << megabytes(bytes_by_state[1] + bytes_by_state[2]) << "\n";
  for (const CheckpointShardFile& file : manifest.files)
    out << "  file            " << file.name << "  " << megabytes(file.bytes) << " (rank " << file.rank << ")\n";
  if (list_tensors) {
    out << "  tensor list (name, dtype, shape, file @ offset, bytes, XXH64):\n";
    for (const CheckpointTensor& tensor : manifest.tensors)
      out << "    " << tensor.name << "  " << tensor.dtype << " " << shape_text(tensor.shape) << "  " << tensor.file
          << " @ " << tensor.offset << "  " << tensor.bytes << "  " << checksum_hex(tensor.checksum) << "\n";
  }
}

int inspect_one(const std::string& directory, bool verify, bool list_tensors) {
  const CheckpointManifest manifest = read_checkpoint_manifest(directory);
  print_summary(manifest, directory, list_tensors, std::cout);
  if (!verify) {
    std::cout << "checksums not verified (--no-verify); the manifest, marker and file sizes are consistent\n";
    return kExitOk;
  }
  std::cout << std::flush;
  const uint64_t bytes = verify_checkpoint_tensors(directory, manifest);
  std::cout << "verified: " << manifest.tensors.size() << " tensors, " << megabytes(bytes) << " in "
            << manifest.files.size() << " file(s): every checksum matches\n";
  return kExitOk;
}

// A checkpoint.dir: one line per checkpoint; exit 2 when any is incomplete or fails.
int inspect_root(const std::string& root, bool verify) {
  const std::vector<CheckpointListing> listing = list_checkpoints(root);
  SY_CHECK_INPUT(!listing.empty(), "'", root, "' is neither a checkpoint (no manifest.json) nor a directory of "
                 "checkpoints (no step-* directories)");
  std::cout << "checkpoint directory " << root << ": " << listing.size() << " checkpoint(s), oldest first\n";
  int problems = 0;
  for (const CheckpointListing& item : listing) {
    std::cout << "  " << item.path << "  step " << item.step << "  ";
    try {
      const CheckpointManifest manifest = read_checkpoint_manifest(item.path);
      if (verify) verify_checkpoint_tensors(item.path, manifest);
      std::cout << (verify ? "complete, verified" : "complete (checksums not verified)") << " ("
                << manifest.tokens_seen << " tokens seen, " << manifest.world_size << " rank(s), ep_size "
                << manifest.ep_size << ")\n";
    } catch (const Error& error) {
      ++problems;
      std::cout << "PROBLEM: " << error.message() << "\n";
    }
  }
  std::cout << std::flush;
  if (problems) SY_BAD_INPUT(problems, " of the ", listing.size(), " checkpoints in '", root, "' are incomplete or damaged");
  return kExitOk;
}

int command_ckpt_inspect(int argc, char** argv) {
  ArgParser parser("switchyard ckpt inspect",
                   "Summarise a checkpoint's manifest and verify every tensor's checksum; or, given a checkpoint.dir, "
                   "list its checkpoints and check each.");
  parser.add_positional("dir", "a checkpoint (step-* directory) or a directory of checkpoints");
  parser.add_flag("no-verify", "check the manifest, marker and file sizes only; do not read the tensors");
  parser.add_flag("tensors", "also list every tensor (name, dtype, shape, file, offset, bytes, checksum)");
  parser.add_epilog("Exit status: 0 when everything checks out, 2 when something is missing, truncated, corrupt or "
                    "incomplete (the message names the file).");
  if (!parser.parse(argc, argv)) return kExitOk;
  const std::string directory = parser.get("dir");
  const bool verify = !parser.flag("no-verify");
  switch (kind_of_path(directory)) {
    // A checkpoint, complete or not: the manifest reader says precisely what is missing.
    case PathKind::checkpoint: return inspect_one(directory, verify, parser.flag("tensors"));
    case PathKind::checkpoint_root: return inspect_root(directory, verify);
    case PathKind::run_folder: {
      const std::string checkpoints = (std::filesystem::path(directory) / "checkpoints").string();
      SY_BAD_INPUT(describe_path(directory), "; ckpt inspect expects a checkpoint (step-* folder) or a folder of "
                   "checkpoints: try `switchyard ckpt inspect ", checkpoints, "` (or the checkpoint.dir of its "
                   "config.yaml)");
    }
    default:
      SY_BAD_INPUT(describe_path(directory), "; ckpt inspect expects a checkpoint (step-* folder) or a folder of "
                   "checkpoints (checkpoint.dir)");
  }
}

int command_ckpt_export(int argc, char** argv) {
  ArgParser parser("switchyard ckpt export",
                   "Write a model's weights (a checkpoint's, or a weights file's) to another format (safetensors: "
                   "loads with Python's safetensors package, e.g. safetensors.numpy.load_file or safe_open).");
  parser.add_positional("path", kWeightsPathHelp);
  parser.add_positional("output", "the file to write");
  parser.add_option("format", "FORMAT", "output format: safetensors", "safetensors");
  parser.add_option("dtype", "fp32|bf16", "element type of the exported tensors", "fp32");
  parser.add_flag("optimizer", "also export the AdamW moments (optimizer.exp_avg.*, optimizer.exp_avg_sq.*)");
  parser.add_flag("merge-experts", "one [E, ...] tensor per expert parameter (blocks.1.moe.w1) instead of one "
                  "tensor per expert (blocks.1.moe.experts.3.w1)");
  parser.add_epilog("Examples:\n  switchyard ckpt export runs/tiny-cpu/checkpoints/step-000000200 --format safetensors "
                    "model.safetensors\n  switchyard ckpt export runs/tiny-cpu model.safetensors   "
                    "# the run's newest complete checkpoint");
  if (!parser.parse(argc, argv)) return kExitOk;
  SY_CHECK_INPUT(parser.get("format") == "safetensors", "--format '", parser.get("format"),
                 "' is not supported; the export writes safetensors");
  SafetensorsExportOptions options;
  const std::string dtype = parser.get("dtype");
  SY_CHECK_INPUT(dtype == "fp32" || dtype == "bf16", "--dtype must be fp32 or bf16, not '", dtype, "'");
  options.dtype = dtype == "fp32" ? DType::f32 : DType::bf16;
  options.include_optimizer = parser.flag("optimizer");
  options.merge_experts = parser.flag("merge-experts");
  const WeightsSource source = resolve_weights_source(parser.get("path"));
  std::cerr << "switchyard ckpt export: " << describe_weights_source(source) << "\n";
  const SafetensorsExportResult result = export_safetensors(source, parser.get("output"), options);
  std::cout << "switchyard ckpt export: " << result.tensors << " tensors (" << dtype << ") -> " << parser.get("output")
            << " (" << megabytes(result.bytes) << ")\n";
  return kExitOk;
}

struct Subcommand {
  const char* name;
  const char* summary;
  int (*run)(int argc, char** argv);
};

const Subcommand kSubcommands[] = {
    {"inspect", "summarise a checkpoint and verify its checksums (or list a checkpoint.dir)", command_ckpt_inspect},
    {"export", "write a checkpoint's (or weights file's) weights as a safetensors file", command_ckpt_export},
};

void print_subcommands(std::ostream& out) {
  out << "Usage: switchyard ckpt <inspect|export> [options]\n\nCheckpoint tools:\n";
  for (const Subcommand& subcommand : kSubcommands)
    out << "  " << std::left << std::setw(9) << subcommand.name << subcommand.summary << "\n";
  out << "\nRun 'switchyard ckpt <tool> --help' for its options.\n";
}

}  // namespace

int command_ckpt(int argc, char** argv) {
  if (argc < 2) {
    print_subcommands(std::cerr);
    return kExitBadInput;
  }
  const std::string name = argv[1];
  if (name == "-h" || name == "--help") {
    print_subcommands(std::cout);
    return kExitOk;
  }
  for (const Subcommand& subcommand : kSubcommands)
    if (name == subcommand.name) return subcommand.run(argc - 1, argv + 1);
  SY_BAD_INPUT("unknown ckpt tool '", name, "' (inspect or export; see 'switchyard ckpt --help')");
}

}  // namespace switchyard
