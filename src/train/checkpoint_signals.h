// Preemption signals: SIGTERM and SIGUSR1 (what SLURM sends before it ends a job; see
// launch/sbatch-train.sh) ask the trainer to finish the step it is in, save a checkpoint and exit 0.
//
// The handler only sets a flag (async-signal-safe: one sig_atomic_t store). The trainer reads the
// flag after each step and folds it into the step's statistics all-reduce, so every rank sees the
// same verdict at the same step and they all save together, even when the signal reached only
// some of them or reached them at different moments.
#pragma once

namespace switchyard {

// Installs the handlers for its lifetime, then restores the previous ones and clears the flag
// (one guard at a time per process). SA_RESTART: system calls the signal interrupts are resumed.
class PreemptionSignalGuard {
 public:
  PreemptionSignalGuard();
  ~PreemptionSignalGuard();
  PreemptionSignalGuard(const PreemptionSignalGuard&) = delete;
  PreemptionSignalGuard& operator=(const PreemptionSignalGuard&) = delete;
};

// True while a guard is alive. Guards nest: `switchyard train` installs one before its set-up (so a
// signal during start-up, e.g. CUDA initialisation, is not fatal), the trainer's own is then a no-op.
bool preemption_signals_installed();
// The first signal received since the last clear (0: none).
int preemption_signal();
void clear_preemption_signal();
const char* preemption_signal_name(int signal_number);  // "SIGTERM" | "SIGUSR1" | "signal N"

}  // namespace switchyard
