// switchyard::Error and the check macros every call site uses.
//
// Library code never exits: it throws an Error that carries the rank, host and file:line of the
// failure plus an exit code (2 = bad input: config, flags, data, checkpoint; 1 = anything else).
// `main` catches once, prints, aborts NCCL, then MPI_Abort (see src/comm/bootstrap.h).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace switchyard {

enum ExitCode : int { kExitOk = 0, kExitFailure = 1, kExitBadInput = 2 };

class Error : public std::runtime_error {
 public:
  Error(const std::string& message, const char* file, int line, int exit_code);
  int rank() const { return rank_; }
  const std::string& host() const { return host_; }
  const std::string& file() const { return file_; }
  int line() const { return line_; }
  int exit_code() const { return exit_code_; }
  const std::string& message() const { return message_; }  // without the location prefix

 private:
  std::string message_, host_, file_;
  int rank_, line_, exit_code_;
};

// The identity every Error is stamped with; bootstrap sets the rank once MPI is up.
void set_process_rank(int rank);
int process_rank();
const std::string& process_host();

[[noreturn]] void throw_error(const char* file, int line, int exit_code, const std::string& message);

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream stream;
  (stream << ... << args);
  return stream.str();
}
}  // namespace detail

}  // namespace switchyard

// SY_THROW("what", value, "more"): a failure of the program or the system (exit 1).
#define SY_THROW(...) \
  ::switchyard::throw_error(__FILE__, __LINE__, ::switchyard::kExitFailure, ::switchyard::detail::concat(__VA_ARGS__))
// SY_BAD_INPUT(...): the user gave something wrong (config, flag, data, checkpoint): exit 2.
#define SY_BAD_INPUT(...) \
  ::switchyard::throw_error(__FILE__, __LINE__, ::switchyard::kExitBadInput, ::switchyard::detail::concat(__VA_ARGS__))
// SY_CHECK(cond, ...): an internal invariant.
#define SY_CHECK(cond, ...)                                                   \
  do {                                                                        \
    if (!(cond)) SY_THROW("check failed: " #cond ": ", ##__VA_ARGS__);        \
  } while (0)
#define SY_CHECK_INPUT(cond, ...)                  \
  do {                                             \
    if (!(cond)) SY_BAD_INPUT(__VA_ARGS__);        \
  } while (0)
