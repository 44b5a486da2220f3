#include "src/core/mpi_check.h"

namespace switchyard {
std::string mpi_error_string(int code) {
  char buffer[MPI_MAX_ERROR_STRING] = {0};
  int length = 0;
  if (MPI_Error_string(code, buffer, &length) != MPI_SUCCESS) return "code " + std::to_string(code);
  return std::string(buffer, length);
}
}  // namespace switchyard
