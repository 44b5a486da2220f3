#pragma once
// The parser of SWITCHYARD_* environment variables, so every variable treats unset and empty
// alike and a bad value is bad input naming the variable and its choices. The switches
// themselves are parsed once, at start-up, into one struct (src/core/switches.h); only that file
// (and the per-call test hook SWITCHYARD_INJECT_FAULT, src/comm/bootstrap.cpp) reads them here.
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>

#include "src/core/error.h"

namespace switchyard {

// The value of environment variable `name`, or nullptr when it is unset or empty.
const char* environment_value(const char* name);

// The value `text` (set and non-empty) names among `choices` (a range of (text, value) pairs) for
// variable `name`; anything else throws bad input (exit 2) naming the variable, the choices and
// the text.
template <typename Value, typename Choices>
Value choice_from_text(const char* name, const char* text, const Choices& choices) {
  std::string names;
  for (const auto& [choice_name, choice] : choices) {
    if (std::strcmp(text, choice_name) == 0) return choice;
    names += names.empty() ? "'" : ", '";
    names += std::string(choice_name) + "'";
  }
  SY_BAD_INPUT(name, " must be one of ", names, ", got '", text, "'");
}

// The value of `name` among `choices` (text, value; the first is the default, taken when unset or
// empty); anything else throws bad input (exit 2) listing the choices.
template <typename Value>
Value choice_from_environment(const char* name, std::initializer_list<std::pair<const char*, Value>> choices) {
  const char* value = environment_value(name);
  if (value == nullptr) return choices.begin()->second;
  return choice_from_text<Value>(name, value, choices);
}

}  // namespace switchyard
