// GoogleTest check shared by the unit tests: `body` must throw a bad-input switchyard::Error
// (exit code 2) whose message contains every fragment (or the one needle).
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "src/core/error.h"

namespace switchyard {
namespace testing {

inline void expect_bad_input(const std::function<void()>& body, const std::vector<std::string>& fragments = {}) {
  try {
    body();
  } catch (const Error& error) {
    EXPECT_EQ(error.exit_code(), kExitBadInput) << error.what();
    for (const std::string& fragment : fragments)
      EXPECT_NE(error.message().find(fragment), std::string::npos)
          << "'" << fragment << "' not in: " << error.message();
    return;
  }
  ADD_FAILURE() << "no error thrown; expected a bad-input Error"
                << (fragments.empty() ? std::string() : " containing '" + fragments[0] + "'");
}

// One needle ("text"); a braced list {"a", "b"} cannot deduce Needle and takes the overload above.
template <typename Needle, typename = std::enable_if_t<std::is_convertible_v<const Needle&, std::string>>>
void expect_bad_input(const std::function<void()>& body, const Needle& needle) {
  expect_bad_input(body, std::vector<std::string>{std::string(needle)});
}

}  // namespace testing
}  // namespace switchyard
