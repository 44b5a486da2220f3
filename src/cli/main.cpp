// switchyard: the command-line entry point.
//
//   switchyard <command> [options]      (switchyard --help lists the commands)
//
// Exit codes (design-notes decision 8): 0 ok, 2 bad input (unknown command or flag, bad config,
// data or checkpoint), 1 any other failure. Everything runs inside run_guarded
// (src/comm/bootstrap.h), which prints an error once, aborts communicators and ends the MPI job.
#include <algorithm>
#include <cstring>
#include <iostream>
#include <string>

#include "src/comm/bootstrap.h"
#include "src/cli/commands.h"
#include "src/core/error.h"
#include "src/core/switches.h"

#ifndef SWITCHYARD_VERSION
#define SWITCHYARD_VERSION "0.1.0"
#endif

namespace {

struct Command {
  const char* name;
  const char* summary;
  int (*run)(int argc, char** argv);
};

const Command kCommands[] = {
    {"train", "set up and train a model from a YAML config (configs/README.md)", switchyard::command_train},
    {"prepare-data", "turn text files into byte-level token files for training", switchyard::command_prepare_data},
    {"generate", "sample text from a trained model (final weights or a checkpoint)", switchyard::command_generate},
    {"ckpt", "inspect and verify checkpoints, export them as safetensors", switchyard::command_ckpt},
    {"bench", "run a benchmark ('switchyard bench --help' lists them)", switchyard::command_bench},
    {"report", "write an HTML report of a training run (curves, expert load, specialization)",
     switchyard::command_report},
    {"specialize", "show which inputs each expert of a trained model receives", switchyard::command_specialize},
};

void print_usage(std::ostream& out) {
  out << "Usage: switchyard <command> [options]\n\n"
         "Mixture-of-Experts training on CPUs and GPUs, one process per device (mpirun or srun).\n\n"
         "Commands:\n";
  size_t width = std::strlen("help");
  for (const Command& command : kCommands) width = std::max(width, std::strlen(command.name));
  for (const Command& command : kCommands)
    out << "  " << command.name << std::string(width - std::strlen(command.name) + 2, ' ') << command.summary << "\n";
  out << "  help" << std::string(width - 4 + 2, ' ') << "show this list, or 'help COMMAND' for a command's options\n"
      << "\nOptions:\n"
         "  -h, --help     show this list\n"
         "  --version      print the version and build features\n"
         "\nRun 'switchyard COMMAND --help' for the options of a command.\n"
         "Example: mpirun -np 2 switchyard train configs/tiny-cpu.yaml --set parallel.ep_size=2\n";
}

const Command* find_command(const std::string& name) {
  for (const Command& command : kCommands)
    if (name == command.name) return &command;
  return nullptr;
}

int unknown(const std::string& what, const std::string& name) {
  std::cerr << "switchyard: unknown " << what << " '" << name << "'\n"
            << "Run 'switchyard --help' for the list of commands.\n";
  return switchyard::kExitBadInput;
}

int dispatch(int argc, char** argv) {
  if (argc < 2) {
    print_usage(std::cerr);
    return switchyard::kExitBadInput;
  }
  const std::string first = argv[1];
  if (first == "-h" || first == "--help") {
    print_usage(std::cout);
    return switchyard::kExitOk;
  }
  if (first == "help") {
    if (argc < 3) {
      print_usage(std::cout);
      return switchyard::kExitOk;
    }
    const Command* command = find_command(argv[2]);
    if (!command) return unknown("command", argv[2]);
    char help_flag[] = "--help";
    char* help_argv[] = {argv[2], help_flag, nullptr};
    return command->run(2, help_argv);
  }
  if (first == "--version") {
#if defined(SWITCHYARD_WITH_CUDA)
    const char* backends = "cpu, cuda";
#else
    const char* backends = "cpu";
#endif
    std::cout << "switchyard " << SWITCHYARD_VERSION << " (backends: " << backends << ")\n";
    return switchyard::kExitOk;
  }
  if (!first.empty() && first[0] == '-') return unknown("option", first);
  const Command* command = find_command(first);
  if (!command) return unknown("command", first);
  // The SWITCHYARD_* switches, parsed once now: a bad value ends the run here (exit 2, naming the
  // variable), not at the first kernel that reads it.
  switchyard::switches();
  return command->run(argc - 1, argv + 1);  // argv[0] becomes the command name
}

}  // namespace

int main(int argc, char** argv) {
  return switchyard::run_guarded([&] { return dispatch(argc, argv); });
}
