// switchyard train CONFIG.yaml [--set k=v]... [--resume auto|PATH | --start-over] [--dry-run]
//
// Set-up, in an order that makes bad input fail fast and identically on every rank, and changes
// nothing of the run (config.yaml, metrics, checkpoints) before every input is verified:
//   1. before MPI starts (so each rank exits 2 on its own, with no collective to hang in):
//      load + validate the config, resolve the device, open and check the data files, check a
//      --resume path (its completion marker, manifest, shard files and model; the tensors'
//      checksums are verified as they load), check that the run directory holds no different run
//      and that a run from step 0 does not save among another run's checkpoints (--start-over);
//   2. bootstrap the process (MPI, local rank, GPU), check ep_size against the world size,
//      build the parallel groups, fault point "after_bootstrap"; every rank reports its device
//      and rank 0 prints the process layout (set_up_training() does 1 and 2);
//   3. the Trainer (src/train/trainer.h) is built and prepared: it resumes (--resume auto | PATH,
//      every tensor verified as it loads) and settles the run id, writing nothing;
//   4. only then rank 0 prints the resolved config and writes <logging.run_dir>/config.yaml
//      (keeping a replaced one, and with --start-over the previous run's metrics and final
//      weights, beside it), and the trainer runs the steps, evaluations, metrics, checkpoints
//      and the final weights file.
// A run ended by SIGTERM / SIGUSR1 saves a checkpoint and exits 0 (src/train/checkpoint_signals.h).
#include <mpi.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "src/comm/bootstrap.h"
#include "src/comm/parallel_layout.h"
#include "src/cli/cli_args.h"
#include "src/cli/commands.h"
#include "src/train/checkpoint_format.h"
#include "src/train/checkpoint_signals.h"
#include "src/core/device.h"
#include "src/core/error.h"
#include "src/core/mpi_check.h"
#include "src/model/transformer.h"
#include "src/train/checkpoint.h"
#include "src/train/checkpoint_identity.h"
#include "src/train/config.h"
#include "src/train/token_file.h"
#include "src/train/trainer.h"

namespace switchyard {
namespace {

struct TrainOptions {
  std::string config_path;
  std::vector<std::string> overrides;  // --set section.key=value, in order
  std::string resume;                  // --resume: empty = as the config says
  bool start_over = false;             // --start-over: a new run beside another run's checkpoints
  bool dry_run = false;
  int profile_steps = 0;               // --profile-steps
};

namespace fs = std::filesystem;

bool is_rank0(const ProcessContext& process) { return process.world_rank == 0; }

DeviceKind resolve_device(const Config& config) {
  switch (config.training.device) {
    case DeviceChoice::cpu: return DeviceKind::cpu;
    case DeviceChoice::automatic: return cuda_available() ? DeviceKind::cuda : DeviceKind::cpu;
    case DeviceChoice::cuda:
      if (!cuda_available()) {
#if defined(SWITCHYARD_WITH_CUDA)
        SY_BAD_INPUT(config.source, ": training.device = cuda, but no CUDA device is visible (use cpu or auto)");
#else
        SY_BAD_INPUT(config.source, ": training.device = cuda, but this build has no CUDA backend (use cpu or auto)");
#endif
      }
      return DeviceKind::cuda;
  }
  SY_THROW("unhandled device choice");
}

TokenFile open_data(const Config& config, const std::string& path, const char* key) {
  TokenFile file(path, uint32_t(config.model.vocab_size));
  if (file.size() < int64_t(config.model.seq_len) + 1)
    SY_BAD_INPUT(config.source, ": ", key, " '", path, "' holds ", file.size(), " tokens; one sequence needs ",
                 "model.seq_len + 1 = ", config.model.seq_len + 1);
  return file;
}

std::string run_config_path(const Config& config) {
  return (fs::path(config.logging.run_dir) / "config.yaml").string();
}

// The first key whose value differs, as "moe.top_k: 2 there, 1 now"; empty if none.
// checkpoint.resume says how this process starts, not what the run is, so it is not compared.
std::string first_difference(const Config& existing, const Config& current) {
  for (const ConfigField& field : config_fields())
    if (field.path() != "checkpoint.resume" && field.get(existing) != field.get(current))
      return field.path() + ": " + field.get(existing) + " there, " + field.get(current) + " now";
  return "";
}

// Throws when the run directory already holds a different config and the run neither resumes nor
// starts over. Returns true when an existing, different config.yaml will be replaced.
bool check_run_directory(const Config& config, bool start_over) {
  const std::string path = run_config_path(config);
  std::error_code status;
  if (!fs::exists(path, status)) return false;
  std::string difference;
  try {
    difference = first_difference(parse_stored_config(read_text_file(path, "the run's config"), path), config);
  } catch (const Error& error) {
    difference = "it does not load: " + error.message();
  }
  if (difference.empty()) return false;
  if (config.checkpoint.resume != "none" || start_over) return true;
  SY_BAD_INPUT("the run directory '", config.logging.run_dir, "' holds a different run (", path, " differs: ",
               difference, "). Use another logging.run_dir, resume that run with --resume auto, or start a new run "
               "here with --start-over (the previous config.yaml, metrics and final weights are kept beside it)");
}

// --resume PATH: the checks that need no MPI and read no tensor data, so a wrong path fails fast
// on every rank with the same message.
void check_resume_path(const Config& config, const std::string& path) {
  std::error_code status;
  if (!fs::exists(path, status)) SY_BAD_INPUT("checkpoint to resume from '", path, "' does not exist");
  if (fs::is_directory(path, status) && !is_checkpoint_directory(path) && !list_checkpoints(path).empty())
    SY_BAD_INPUT("--resume '", path, "' holds checkpoints but is not one: give one of its step-* directories, or "
                 "use --resume auto with checkpoint.dir = ", path);
  const CheckpointManifest manifest = read_checkpoint_manifest(path);
  const ParameterLayout layout = Transformer::build_layout(config.model, config.moe, config.parallel.ep_size, 0);
  check_checkpoint_model(manifest, path, config, layout, DType::f32);
}

void write_text_atomically(const std::string& path, const std::string& text) {
  const std::string temp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream file(temp, std::ios::binary | std::ios::trunc);
    if (!file) SY_BAD_INPUT("cannot write '", temp, "': ", std::strerror(errno));
    file << text;
    file.flush();
    if (!file) SY_THROW("writing '", temp, "' failed: ", std::strerror(errno));
  }
  if (std::rename(temp.c_str(), path.c_str()) != 0) {
    int saved = errno;
    std::remove(temp.c_str());
    SY_THROW("renaming '", temp, "' to '", path, "' failed: ", std::strerror(saved));
  }
}

// `path` renamed to the first free <stem>.<tag>-N<extension> beside it; returns the new name.
std::string keep_beside(const std::string& path, const std::string& tag) {
  const fs::path original(path);
  std::error_code status;
  std::string kept;
  for (int index = 1; kept.empty() || fs::exists(kept, status); ++index)
    kept = (original.parent_path() / (original.stem().string() + "." + tag + "-" + std::to_string(index) +
                                      original.extension().string()))
               .string();
  fs::rename(path, kept, status);
  if (status) SY_THROW("cannot keep the previous '", path, "' as '", kept, "': ", status.message());
  return kept;
}

// Rank 0, once every input is verified: prints the resolved config and records it in the run
// directory. A replaced config.yaml is kept beside it; starting over, so are the previous run's
// metrics file and final weights (`previous_run_files`), which the new run would overwrite.
void record_config(const Config& config, bool start_over, const std::vector<std::string>& previous_run_files) {
  const std::string text = config_to_yaml(config);
  std::cout << text << std::flush;
  std::error_code status;
  fs::create_directories(config.logging.run_dir, status);
  if (status) SY_BAD_INPUT("cannot create logging.run_dir '", config.logging.run_dir, "': ", status.message());
  const std::string path = run_config_path(config);
  const char* tag = start_over ? "before-start-over" : "before-resume";
  if (start_over) {
    std::vector<std::string> files = previous_run_files;
    files.push_back(path);
    for (const std::string& file : files)
      if (fs::exists(file, status))
        std::cout << "switchyard train: starting over: the previous run's " << file << " is kept as "
                  << keep_beside(file, tag) << "\n";
  } else if (check_run_directory(config, start_over)) {  // resuming with a changed config
    std::cout << "switchyard train: the config differs from the run's previous one; that one is kept as "
              << keep_beside(path, tag) << "\n";
  }
  write_text_atomically(path, text);
  std::cout << "switchyard train: resolved config written to " << path << "\n";
}

// Every rank reports its host and device; rank 0 prints the layout of the job.
void report_layout(const Config& config, const ProcessContext& process, const ParallelLayout& layout) {
  struct RankInfo {
    int local_rank, device, gpu;
    char host[64];
  };
  RankInfo mine{process.local_rank, int(process.device), process.gpu, {0}};
  std::strncpy(mine.host, process_host().c_str(), sizeof(mine.host) - 1);
  std::vector<RankInfo> all(is_rank0(process) ? size_t(process.world_size) : 0);
  MPI_CHECK(MPI_Gather(&mine, int(sizeof(RankInfo)), MPI_BYTE, all.data(), int(sizeof(RankInfo)), MPI_BYTE, 0,
                       MPI_COMM_WORLD));
  if (!is_rank0(process)) return;
  const int experts_per_rank = layout.experts_per_rank();
  std::ostringstream out;
  out << "switchyard train: world " << process.world_size << " (" << process.launcher << "), ep_size "
      << layout.ep_size() << " x expert-data-parallel " << layout.expert_dp_size() << "; "
      << config.model.moe_block_count() << " MoE block(s) of " << config.model.n_layers << ", "
      << layout.num_experts() << " experts each, " << experts_per_rank << " per rank\n";
  if (layout.hierarchical())
    out << "  each expert-parallel group spans " << layout.ep_nodes() << " nodes of " << layout.ep_ranks_per_node()
        << " ranks: hierarchical exchange (one network row per token and node)\n";
  for (int rank = 0; rank < process.world_size; ++rank) {
    const RankInfo& info = all[size_t(rank)];
    const int first_expert = layout.placement(rank).first_expert;
    out << "  rank " << rank << ": " << info.host << " (local rank " << info.local_rank << "), "
        << (DeviceKind(info.device) == DeviceKind::cuda ? "cuda:" + std::to_string(info.gpu) : std::string("cpu"))
        << ", experts " << first_expert << "-" << first_expert + experts_per_rank - 1 << "\n";
  }
  std::cout << out.str() << std::flush;
}

TrainingSetup set_up_training(const TrainOptions& options) {
  TrainingSetup setup;
  // 1. Everything that can be wrong with the input, before MPI.
  setup.config = load_config(options.config_path, options.overrides);
  Config& config = setup.config;
  if (!options.resume.empty()) config.checkpoint.resume = options.resume;
  if (options.start_over) config.checkpoint.resume = "none";  // the flag wins over the config's resume
  const std::string& resume = config.checkpoint.resume;
  if (resume != "none" && resume != "auto") check_resume_path(config, resume);
  const DeviceKind device = resolve_device(config);
  setup.train_data = open_data(config, config.data.path, "data.path");
  if (!config.data.val_path.empty()) setup.val_data = open_data(config, config.data.val_path, "data.val_path");
  check_run_directory(config, options.start_over);
  check_fresh_start(config, options.start_over);

  // 2. Processes and groups.
  const ProcessContext& process = bootstrap_process(device);
  setup.process = &process;
  // Nodes as the launcher placed the ranks (0 when they are not contiguous blocks: one node).
  const int launcher_nodes = config.parallel.ranks_per_node > 0 ? 0 : contiguous_ranks_per_node(process);
  const ParallelLayout layout = validate_against_world(config, process.world_size, launcher_nodes);
  setup.groups =
      create_parallel_groups(process, layout, config.parallel.collective_timeout_s, config.parallel.ep_sm_budget);
  inject_fault_point("after_bootstrap");
  // Every rank reaches this barrier before any work starts: a rank that died or hangs during set-up
  // is detected here (within parallel.collective_timeout_s), not at the end of the run.
  setup.groups.world->barrier();

  report_layout(config, process, layout);
  return setup;
}

}  // namespace

int command_train(int argc, char** argv) {
  ArgParser parser("switchyard train",
                   "Train a Mixture-of-Experts language model described by a YAML config (keys: configs/README.md). "
                   "Run one process per device: mpirun -np N switchyard train ... (or srun).");
  parser.add_positional("config", "YAML config file");
  parser.add_option("set", "KEY=VALUE", "override a config key, e.g. --set moe.top_k=2", "", /*repeatable=*/true);
  parser.add_option("resume", "auto|PATH", "resume from the newest complete and valid checkpoint of this model in "
                    "checkpoint.dir (auto; none there: start fresh) or from the checkpoint directory PATH");
  parser.add_flag("start-over", "start a new run from step 0 although checkpoint.dir holds another run's checkpoints "
                  "(otherwise refused): it gets its own run id and saves beside them, deleting none; the run "
                  "directory's previous config.yaml, metrics and final.weights are kept as *.before-start-over-N.*");
  parser.add_flag("dry-run", "validate the config and data, start the processes and groups, then exit");
  parser.add_option("profile-steps", "N", "time where N optimizer steps go (after two warm-up steps): attention, MoE, "
                    "dense FFNs, norms, embedding and loss, gradient sync, optimizer, idle gaps, then the stages "
                    "within them (QKV projection, attention core, the MoE layer's routing and expert GEMMs, AdamW, "
                    "...), the matmul ones with their TFLOP/s; printed and written to <run_dir>/profile.json", "0");
  parser.add_epilog("Examples:\n"
                    "  switchyard train configs/tiny-cpu.yaml --set training.steps=50\n"
                    "  mpirun -np 2 switchyard train configs/tiny-cpu.yaml --set parallel.ep_size=2 --dry-run\n"
                    "  switchyard train configs/tiny-cpu.yaml --resume auto    (continue after a crash or preemption)\n"
                    "  switchyard train configs/tiny-cpu.yaml --set logging.run_dir=runs/b   (a second run, own folder)\n"
                    "SIGTERM or SIGUSR1 finishes the current step, saves a checkpoint and exits 0.");
  if (!parser.parse(argc, argv)) return kExitOk;

  TrainOptions options;
  options.config_path = parser.get("config");
  options.overrides = parser.get_all("set");
  options.resume = parser.get("resume");
  if (parser.has("resume") && options.resume.empty()) SY_BAD_INPUT("--resume needs auto or a checkpoint path");
  options.start_over = parser.flag("start-over");
  if (options.start_over && parser.has("resume"))
    SY_BAD_INPUT("--start-over starts a new run from step 0 and --resume continues one: give only one of them");
  options.dry_run = parser.flag("dry-run");
  {
    const std::string text = parser.get("profile-steps");
    char* rest = nullptr;
    const long long value = std::strtoll(text.c_str(), &rest, 10);
    SY_CHECK_INPUT(!text.empty() && rest && *rest == '\0' && value >= 0 && value <= 1000,
                   "--profile-steps must be a step count in [0, 1000], got '", text, "'");
    options.profile_steps = int(value);
  }

  // Catch SIGTERM / SIGUSR1 from here on, before the (possibly slow) set-up and CUDA start-up: a
  // preemption signal that arrives early must not kill the process; the trainer saves and stops.
  std::unique_ptr<PreemptionSignalGuard> signal_guard;
  if (!options.dry_run) signal_guard = std::make_unique<PreemptionSignalGuard>();
  TrainingSetup setup = set_up_training(options);
  const bool rank0 = is_rank0(*setup.process);
  if (options.dry_run) {
    // No checkpoint is loaded, so only a plain fresh start, which replaces nothing, records its config.
    if (rank0 && setup.config.checkpoint.resume == "none" && !options.start_over) {
      record_config(setup.config, false, {});
    } else if (rank0) {
      std::cout << config_to_yaml(setup.config)
                << "switchyard train: dry run: config.yaml not written (a dry run loads no checkpoint and moves "
                   "nothing aside)\n";
    }
    if (rank0) std::cout << "switchyard train: dry run: set-up complete, not training\n";
    return kExitOk;
  }
  TrainerOptions trainer_options;
  trainer_options.device = setup.process->device;
  trainer_options.world_rank = setup.process->world_rank;
  trainer_options.world_size = setup.process->world_size;
  trainer_options.profile_steps = options.profile_steps;
  trainer_options.groups = setup.groups;
  trainer_options.log = is_rank0(*setup.process) ? &std::cout : nullptr;
  Trainer trainer(setup.config, setup.train_data, setup.val_data.is_open() ? &setup.val_data : nullptr,
                  trainer_options);
  trainer.prepare();  // 3. resume: every input verified, nothing written yet
  // 4. Record the config; a failure on rank 0 reaches every rank, which would otherwise wait in the
  // first step's collectives.
  std::string message;
  int exit_code = kExitOk;
  if (rank0) {
    try {
      record_config(setup.config, options.start_over, {trainer.metrics_path(), trainer.final_weights_path()});
    } catch (const Error& error) {
      message = error.message();
      exit_code = error.exit_code();
    }
  }
  int agreed_code = kExitOk;
  const std::string agreed = agree_on_errors(setup.groups.world, message, exit_code, &agreed_code);
  if (!agreed.empty()) throw_error(__FILE__, __LINE__, agreed_code, agreed);
  trainer.run();
  return kExitOk;
}

}  // namespace switchyard
