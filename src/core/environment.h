#pragma once
// SWITCHYARD_* switches read from the environment: one parser, so every variable treats unset and
// empty alike and a bad value is bad input naming the variable and its choices.
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>

#include "src/core/error.h"

namespace switchyard {

// The value of environment variable `name`, or nullptr when it is unset or empty.
const char* environment_value(const char* name);

// The value of `name` among `choices` (text, value; the first is the default, taken when unset or
// empty); anything else throws bad input (exit 2) listing the choices.
template <typename Value>
Value choice_from_environment(const char* name, std::initializer_list<std::pair<const char*, Value>> choices) {
  const char* value = environment_value(name);
  if (value == nullptr) return choices.begin()->second;
  std::string names;
  for (const auto& [choice_name, choice] : choices) {
    if (std::strcmp(value, choice_name) == 0) return choice;
    names += names.empty() ? "'" : ", '";
    names += std::string(choice_name) + "'";
  }
  SY_BAD_INPUT(name, " must be one of ", names, ", got '", value, "'");
}

}  // namespace switchyard
