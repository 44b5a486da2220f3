#include "src/core/error.h"

#include <unistd.h>

#include <atomic>

namespace switchyard {
namespace {
std::atomic<int> g_rank{-1};  // -1 until bootstrap knows it

std::string read_host_name() {
  char buffer[256] = {0};
  if (gethostname(buffer, sizeof(buffer) - 1) != 0) return "unknown-host";
  return buffer;
}
}  // namespace

void set_process_rank(int rank) { g_rank.store(rank); }
int process_rank() { return g_rank.load(); }
const std::string& process_host() {
  static const std::string host = read_host_name();
  return host;
}

static std::string format_location(const std::string& message, int rank, const std::string& host,
                                   const char* file, int line) {
  std::ostringstream stream;
  stream << "[rank " << (rank < 0 ? std::string("?") : std::to_string(rank)) << " on " << host << ", " << file
         << ":" << line << "] " << message;
  return stream.str();
}

Error::Error(const std::string& message, const char* file, int line, int exit_code)
    : std::runtime_error(format_location(message, process_rank(), process_host(), file, line)),
      message_(message),
      host_(process_host()),
      file_(file),
      rank_(process_rank()),
      line_(line),
      exit_code_(exit_code) {}

void throw_error(const char* file, int line, int exit_code, const std::string& message) {
  throw Error(message, file, line, exit_code);
}

}  // namespace switchyard
