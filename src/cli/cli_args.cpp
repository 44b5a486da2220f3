// ArgParser (src/cli/cli_args.h): long options, flags, positionals, aligned --help.
//
// Conventions beyond the header:
//   - a positional whose name ends in "..." (add_positional("inputs...", ...)) takes every
//     remaining positional; read them with get_all("inputs") (has/get use the bare name too);
//   - "--" ends the options: everything after it is positional;
//   - a lone "-" is a positional (conventionally stdin);
//   - a non-repeatable option given twice is an error, as is a value given to a flag.
#include "src/cli/cli_args.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <sstream>

#include "src/core/error.h"

namespace switchyard {
namespace {

constexpr size_t kHelpWidth = 100;   // wrap help text to this many columns
constexpr size_t kMaxLabelWidth = 30;  // labels longer than this put their help on the next line

bool is_variadic(const std::string& name) { return name.size() > 3 && name.compare(name.size() - 3, 3, "...") == 0; }
std::string bare_name(const std::string& name) { return is_variadic(name) ? name.substr(0, name.size() - 3) : name; }

std::string upper(std::string text) {
  for (char& character : text) character = character == '-' ? '_' : char(std::toupper(static_cast<unsigned char>(character)));
  return text;
}

// Appends `text` word-wrapped: the first line continues after `indent` columns already written,
// later lines are indented by `indent` spaces.
void append_wrapped(std::ostringstream& out, const std::string& text, size_t indent) {
  std::istringstream words(text);
  std::string word;
  size_t column = indent;
  bool first = true;
  while (words >> word) {
    if (!first && column + 1 + word.size() > kHelpWidth) {
      out << "\n" << std::string(indent, ' ');
      column = indent;
      first = true;
    }
    if (!first) {
      out << ' ';
      ++column;
    }
    out << word;
    column += word.size();
    first = false;
  }
  out << "\n";
}

// Levenshtein distance for "did you mean" on unknown options.
size_t distance(const std::string& left, const std::string& right) {
  std::vector<size_t> previous(right.size() + 1), current(right.size() + 1);
  for (size_t column = 0; column <= right.size(); ++column) previous[column] = column;
  for (size_t row = 1; row <= left.size(); ++row) {
    current[0] = row;
    for (size_t column = 1; column <= right.size(); ++column)
      current[column] = std::min({previous[column] + 1, current[column - 1] + 1,
                                  previous[column - 1] + (left[row - 1] == right[column - 1] ? 0 : 1)});
    std::swap(previous, current);
  }
  return previous[right.size()];
}

}  // namespace

ArgParser::ArgParser(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void ArgParser::add_flag(const std::string& name, const std::string& help) {
  SY_CHECK(name != "help", "--help is built in");
  Option option;
  option.name = name;
  option.help = help;
  option.is_flag = true;
  options_.push_back(option);
}

void ArgParser::add_option(const std::string& name, const std::string& value_name, const std::string& help,
                           const std::string& default_value, bool repeatable) {
  SY_CHECK(name != "help", "--help is built in");
  Option option;
  option.name = name;
  option.value_name = value_name;
  option.help = help;
  option.default_value = default_value;
  option.repeatable = repeatable;
  options_.push_back(option);
}

void ArgParser::add_positional(const std::string& name, const std::string& help, bool required) {
  SY_CHECK(positionals_.empty() || !is_variadic(positionals_.back().name),
           "positional '", name, "' after the variadic '", positionals_.back().name, "'");
  positionals_.push_back(Positional{name, help, required});
}

void ArgParser::add_epilog(const std::string& text) { epilog_ = text; }

bool ArgParser::parse(int argc, char** argv) {
  values_.clear();
  flags_.clear();
  const std::string hint = " (see '" + command_ + " --help')";
  std::vector<std::string> positional_values;
  bool options_ended = false;
  for (int index = 1; index < argc; ++index) {
    const std::string argument = argv[index];
    if (options_ended || argument == "-" || argument.empty() || argument[0] != '-') {
      positional_values.push_back(argument);
      continue;
    }
    if (argument == "--") {
      options_ended = true;
      continue;
    }
    if (argument == "-h" || argument == "--help") {
      std::cout << usage();
      return false;
    }
    if (argument.compare(0, 2, "--") != 0)
      SY_BAD_INPUT("unknown option '", argument, "' for ", command_, " (options are spelled --name)", hint);
    const size_t equals = argument.find('=');
    const std::string name = argument.substr(2, equals == std::string::npos ? std::string::npos : equals - 2);
    auto option = std::find_if(options_.begin(), options_.end(), [&](const Option& o) { return o.name == name; });
    if (option == options_.end()) {
      std::string closest;
      size_t best = std::max<size_t>(2, name.size() / 3) + 1;
      for (const Option& candidate : options_) {
        size_t d = distance(name, candidate.name);
        if (d < best) best = d, closest = candidate.name;
      }
      SY_BAD_INPUT("unknown option --", name, " for ", command_, closest.empty() ? "" : " (did you mean --" + closest + "?)",
                   hint);
    }
    if (option->is_flag) {
      if (equals != std::string::npos) SY_BAD_INPUT("--", name, " is a flag and takes no value", hint);
      flags_[name] = true;
      continue;
    }
    std::string value;
    if (equals != std::string::npos) {
      value = argument.substr(equals + 1);
    } else {
      if (index + 1 >= argc) SY_BAD_INPUT("--", name, " needs a value (", option->value_name, ")", hint);
      value = argv[++index];
      // "--output --force": the value is missing, not "--force". (A value starting with "--"
      // can still be given as --output=--odd-name.)
      if (value.compare(0, 2, "--") == 0 && value.size() > 2)
        SY_BAD_INPUT("--", name, " needs a value (", option->value_name, "), got option ", value, hint);
    }
    std::vector<std::string>& slot = values_[name];
    if (!option->repeatable && !slot.empty())
      SY_BAD_INPUT("--", name, " given twice ('", slot.front(), "' and '", value, "')", hint);
    slot.push_back(value);
  }

  size_t next = 0;
  for (const Positional& positional : positionals_) {
    const std::string name = bare_name(positional.name);
    if (is_variadic(positional.name)) {
      while (next < positional_values.size()) values_[name].push_back(positional_values[next++]);
    } else if (next < positional_values.size()) {
      values_[name].push_back(positional_values[next++]);
    }
    if (positional.required && values_[name].empty())
      SY_BAD_INPUT(command_, ": missing ", upper(name), " (", positional.help, ")", hint);
  }
  if (next < positional_values.size())
    SY_BAD_INPUT(command_, ": unexpected argument '", positional_values[next], "'", hint);
  return true;
}

namespace {
[[noreturn]] void unknown_name(const std::string& command, const std::string& name) {
  SY_THROW(command, ": the program asked for '", name, "', which was never declared");
}
}  // namespace

bool ArgParser::flag(const std::string& name) const {
  auto option = std::find_if(options_.begin(), options_.end(), [&](const Option& o) { return o.name == name; });
  if (option == options_.end() || !option->is_flag) unknown_name(command_, name);
  auto found = flags_.find(name);
  return found != flags_.end() && found->second;
}

bool ArgParser::has(const std::string& name) const {
  auto found = values_.find(name);
  if (found != values_.end() && !found->second.empty()) return true;
  auto flag_found = flags_.find(name);
  return flag_found != flags_.end() && flag_found->second;
}

std::string ArgParser::get(const std::string& name) const {
  auto found = values_.find(name);
  if (found != values_.end() && !found->second.empty()) return found->second.back();
  for (const Option& option : options_)
    if (option.name == name) return option.default_value;
  for (const Positional& positional : positionals_)
    if (bare_name(positional.name) == name) return "";
  unknown_name(command_, name);
}

int64_t ArgParser::get_int(const std::string& name) const {
  const std::string text = get(name);
  if (text.empty()) SY_BAD_INPUT(command_, ": --", name, " needs an integer value");
  errno = 0;
  char* end = nullptr;
  long long value = std::strtoll(text.c_str(), &end, 10);
  if (end != text.c_str() + text.size() || errno == ERANGE)
    SY_BAD_INPUT(command_, ": --", name, " expects an integer, got '", text, "'");
  return value;
}

double ArgParser::get_double(const std::string& name) const {
  const std::string text = get(name);
  if (text.empty()) SY_BAD_INPUT(command_, ": --", name, " needs a numeric value");
  errno = 0;
  char* end = nullptr;
  double value = std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size() || errno == ERANGE || !std::isfinite(value))
    SY_BAD_INPUT(command_, ": --", name, " expects a number, got '", text, "'");
  return value;
}

std::vector<std::string> ArgParser::get_all(const std::string& name) const {
  auto found = values_.find(name);
  if (found != values_.end()) return found->second;
  bool declared = std::any_of(options_.begin(), options_.end(), [&](const Option& o) { return o.name == name; }) ||
                  std::any_of(positionals_.begin(), positionals_.end(),
                              [&](const Positional& p) { return bare_name(p.name) == name; });
  if (!declared) unknown_name(command_, name);
  return {};
}

std::string ArgParser::usage() const {
  std::ostringstream out;
  out << "Usage: " << command_;
  if (!options_.empty()) out << " [options]";
  for (const Positional& positional : positionals_) {
    std::string label = upper(bare_name(positional.name)) + (is_variadic(positional.name) ? "..." : "");
    out << ' ' << (positional.required ? label : "[" + label + "]");
  }
  out << "\n\n";
  if (!summary_.empty()) {
    append_wrapped(out, summary_, 0);
    out << "\n";
  }

  // Labels and help texts, aligned in one column for arguments and options alike.
  std::vector<std::pair<std::string, std::string>> argument_rows, option_rows;
  for (const Positional& positional : positionals_) {
    std::string help = positional.help;
    if (!positional.required) help += " (optional)";
    argument_rows.emplace_back(upper(bare_name(positional.name)) + (is_variadic(positional.name) ? "..." : ""), help);
  }
  for (const Option& option : options_) {
    std::string label = "--" + option.name + (option.is_flag ? "" : " " + option.value_name);
    std::string help = option.help;
    if (!option.default_value.empty()) help += " (default: " + option.default_value + ")";
    if (option.repeatable) help += " (repeatable)";
    option_rows.emplace_back(label, help);
  }
  option_rows.emplace_back("-h, --help", "show this help and exit");
  size_t width = 0;
  for (const auto* rows : {&argument_rows, &option_rows})
    for (const auto& row : *rows)
      if (row.first.size() <= kMaxLabelWidth) width = std::max(width, row.first.size());
  const size_t help_column = 2 + width + 2;
  auto print_rows = [&](const char* title, const std::vector<std::pair<std::string, std::string>>& rows) {
    if (rows.empty()) return;
    out << title << ":\n";
    for (const auto& row : rows) {
      out << "  " << row.first;
      if (row.first.size() > width) {
        out << "\n" << std::string(help_column, ' ');
      } else {
        out << std::string(width - row.first.size() + 2, ' ');
      }
      append_wrapped(out, row.second, help_column);
    }
  };
  print_rows("Arguments", argument_rows);
  if (!argument_rows.empty()) out << "\n";
  print_rows("Options", option_rows);
  if (!epilog_.empty()) out << "\n" << epilog_ << (epilog_.back() == '\n' ? "" : "\n");
  return out.str();
}

}  // namespace switchyard
