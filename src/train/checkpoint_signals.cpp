// Preemption signal flag (src/train/checkpoint_signals.h).
#include "src/train/checkpoint_signals.h"

#include <cerrno>
#include <csignal>
#include <cstring>
#include <string>

#include "src/core/error.h"

namespace switchyard {
namespace {

volatile std::sig_atomic_t g_signal = 0;
int g_depth = 0;  // nested guards: the outermost installs and restores the handlers
struct sigaction g_previous_term, g_previous_usr1;

extern "C" void on_preemption_signal(int signal_number) {
  if (g_signal == 0) g_signal = signal_number;  // keep the first one
}

}  // namespace

PreemptionSignalGuard::PreemptionSignalGuard() {
  if (g_depth++ > 0) return;  // already installed by an enclosing guard (e.g. `train` before set-up)
  struct sigaction action;
  std::memset(&action, 0, sizeof(action));
  action.sa_handler = on_preemption_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  if (sigaction(SIGTERM, &action, &g_previous_term) != 0 || sigaction(SIGUSR1, &action, &g_previous_usr1) != 0)
    SY_THROW("cannot install the SIGTERM / SIGUSR1 handlers: ", std::strerror(errno));
}

bool preemption_signals_installed() { return g_depth > 0; }

PreemptionSignalGuard::~PreemptionSignalGuard() {
  if (--g_depth > 0) return;
  sigaction(SIGTERM, &g_previous_term, nullptr);
  sigaction(SIGUSR1, &g_previous_usr1, nullptr);
  g_signal = 0;  // handled by the run that installed the guard; the next run starts clean
}

int preemption_signal() { return int(g_signal); }

void clear_preemption_signal() { g_signal = 0; }

const char* preemption_signal_name(int signal_number) {
  switch (signal_number) {
    case SIGTERM: return "SIGTERM";
    case SIGUSR1: return "SIGUSR1";
    default: {
      static thread_local std::string text;
      text = "signal " + std::to_string(signal_number);
      return text.c_str();
    }
  }
}

}  // namespace switchyard
