// The EP layer tests' comparison of a result with its reference: every value finite (poisoned
// outputs that an op failed to write show up as NaN) and ||actual - expected|| / ||expected|| within
// `tolerance`, both reported under `what`.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tests/support/test_helpers.h"

namespace switchyard {
namespace testing {

inline void expect_close(const std::string& what, const std::vector<double>& actual, const std::vector<double>& expected,
                         double tolerance) {
  for (double value : actual) {
    if (!std::isfinite(value)) {
      ADD_FAILURE() << what << ": non-finite value (an output left unwritten?)";
      return;
    }
  }
  EXPECT_LE(relative_error(actual, expected), tolerance) << what;
}

}  // namespace testing
}  // namespace switchyard
