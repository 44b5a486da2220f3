// Subcommand entry points. Each takes argv starting at its own name (argv[0] == "train"),
// parses its options with ArgParser, and returns the process exit code. Errors are thrown as
// switchyard::Error; main catches them once (see src/comm/bootstrap.h run_guarded).
#pragma once

namespace switchyard {
int command_train(int argc, char** argv);         // src/cli/train_command.cpp
int command_prepare_data(int argc, char** argv);  // src/cli/prepare_data_command.cpp
int command_generate(int argc, char** argv);      // src/cli/generate_command.cpp
int command_ckpt(int argc, char** argv);          // src/cli/ckpt_command.cpp: inspect, export
int command_bench(int argc, char** argv);         // src/cli/bench_command.cpp: dispatches to the ones below
int command_bench_comm(int argc, char** argv);    // src/cli/bench_comm_command.cpp
int command_bench_moe(int argc, char** argv);     // src/cli/bench_moe_command.cpp
int command_bench_ep(int argc, char** argv);      // src/cli/bench_ep_command.cpp
int command_bench_optimizer(int argc, char** argv);  // src/cli/bench_optimizer_command.cpp
int command_bench_passes(int argc, char** argv);     // src/cli/bench_passes_command.cpp
int command_report(int argc, char** argv);        // src/cli/report_command.cpp
int command_specialize(int argc, char** argv);    // src/cli/report_command.cpp
}  // namespace switchyard
