// MPI_CHECK: every MPI call goes through it (MPI_ERRORS_RETURN is set on our communicators so
// errors come back as codes instead of aborting without a message).
#pragma once

#include <mpi.h>

#include "src/core/error.h"

namespace switchyard {
std::string mpi_error_string(int code);
}

#define MPI_CHECK(call)                                                                   \
  do {                                                                                    \
    int sy_status_ = (call);                                                              \
    if (sy_status_ != MPI_SUCCESS)                                                        \
      SY_THROW("MPI error ", ::switchyard::mpi_error_string(sy_status_), " in ", #call); \
  } while (0)
