// Parsing, validation and emission of the run configuration (the key table is config_schema.cpp).
//
// Steps: YAML text -> one entry per known key (its node and where it came from: file:line, or
// the --set argument that replaced it) -> each entry converted strictly to the key's type and
// range-checked -> derived defaults for keys not given -> cross-field checks. Unknown keys,
// duplicated keys and missing required keys stop the parse with the location.
// Conversion is strict on purpose: "64" (quoted) is text, not an integer; 64.0 is not an
// integer; yes/no/on/off/true/false are booleans, as in YAML 1.1.
#include "src/train/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "src/core/error.h"

namespace switchyard {
namespace {

// Where a key's value came from and the node holding it.
struct Entry {
  YAML::Node value;
  std::string origin;  // "configs/x.yaml:12" or "--set moe.top_k=9"
};

// Optimal-string-alignment distance: edits, with a swap of neighbours counting as one.
size_t edit_distance(const std::string& left, const std::string& right) {
  const size_t rows = left.size() + 1, columns = right.size() + 1;
  std::vector<size_t> table(rows * columns);
  auto at = [&](size_t row, size_t column) -> size_t& { return table[row * columns + column]; };
  for (size_t row = 0; row < rows; ++row) at(row, 0) = row;
  for (size_t column = 0; column < columns; ++column) at(0, column) = column;
  for (size_t row = 1; row < rows; ++row) {
    for (size_t column = 1; column < columns; ++column) {
      size_t substitution = left[row - 1] == right[column - 1] ? 0 : 1;
      size_t best = std::min({at(row - 1, column) + 1, at(row, column - 1) + 1, at(row - 1, column - 1) + substitution});
      if (row > 1 && column > 1 && left[row - 1] == right[column - 2] && left[row - 2] == right[column - 1])
        best = std::min(best, at(row - 2, column - 2) + 1);
      at(row, column) = best;
    }
  }
  return at(rows - 1, columns - 1);
}

// " (did you mean moe.top_k?)" or "". `word` is compared with `candidates[i].first` (the bare
// name), the suggestion printed is `candidates[i].second` (the full path).
std::string suggestion(const std::string& word, const std::vector<std::pair<std::string, std::string>>& candidates) {
  size_t limit = word.size() <= 3 ? 1 : std::max<size_t>(2, word.size() / 3);
  size_t best_distance = limit + 1;
  std::string best;
  for (const auto& candidate : candidates) {
    size_t distance = edit_distance(word, candidate.first);
    if (distance < best_distance) {
      best_distance = distance;
      best = candidate.second;
    }
  }
  return best.empty() ? "" : " (did you mean " + best + "?)";
}

std::vector<std::string> section_names() {
  std::vector<std::string> names;
  for (const ConfigField& field : config_fields())
    if (std::find(names.begin(), names.end(), field.section) == names.end()) names.push_back(field.section);
  return names;
}

const ConfigField* find_field(const std::string& section, const std::string& key) {
  for (const ConfigField& field : config_fields())
    if (field.section == section && field.key == key) return &field;
  return nullptr;
}

// The hint for an unknown key: close names in its own section, or the same name elsewhere.
std::string unknown_key_hint(const std::string& section, const std::string& key) {
  std::vector<std::pair<std::string, std::string>> candidates;
  for (const ConfigField& field : config_fields()) {
    if (field.section == section) candidates.emplace_back(field.key, field.path());
  }
  std::string hint = suggestion(key, candidates);
  if (!hint.empty()) return hint;
  for (const ConfigField& field : config_fields())
    if (field.key == key) return " (did you mean " + field.path() + "?)";
  return "";
}

std::string unknown_section_hint(const std::string& name) {
  std::vector<std::pair<std::string, std::string>> candidates;
  for (const std::string& section : section_names()) candidates.emplace_back(section, section);
  std::string hint = suggestion(name, candidates);
  if (!hint.empty()) return hint;
  for (const ConfigField& field : config_fields())
    if (field.key == name) return " (did you mean " + field.path() + ", inside the " + field.section + " section?)";
  std::string known;
  for (const std::string& section : section_names()) known += (known.empty() ? "" : ", ") + section;
  return " (sections are: " + known + ")";
}

std::string line_origin(const std::string& source, const YAML::Mark& mark) {
  if (mark.is_null()) return source;
  return source + ":" + std::to_string(mark.line + 1);
}

const char* node_kind(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Null: return "empty";
    case YAML::NodeType::Scalar: return "a scalar";
    default: return "undefined";
  }
}

const char* type_name(ConfigValueType type) {
  switch (type) {
    case ConfigValueType::integer: return "an integer";
    case ConfigValueType::real: return "a number";
    case ConfigValueType::boolean: return "a boolean (true or false)";
    case ConfigValueType::text: return "text";
    case ConfigValueType::choice: return "a name";
  }
  return "?";
}

bool parse_integer_text(const std::string& text, int64_t& value, bool& overflow) {
  overflow = false;
  size_t start = (!text.empty() && (text[0] == '+' || text[0] == '-')) ? 1 : 0;
  if (start == text.size()) return false;
  for (size_t index = start; index < text.size(); ++index)
    if (!std::isdigit(static_cast<unsigned char>(text[index]))) return false;
  errno = 0;
  long long parsed = std::strtoll(text.c_str(), nullptr, 10);
  if (errno == ERANGE) overflow = true;
  value = parsed;
  return true;
}

bool parse_real_text(const std::string& text, double& value) {
  if (text.empty()) return false;
  for (char character : text)
    if (!std::isdigit(static_cast<unsigned char>(character)) && !std::strchr("+-.eE", character)) return false;
  char* end = nullptr;
  errno = 0;
  value = std::strtod(text.c_str(), &end);
  return end == text.c_str() + text.size() && std::isfinite(value);
}

bool parse_boolean_text(std::string text, bool& value) {
  std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  if (text == "true" || text == "yes" || text == "on") {
    value = true;
    return true;
  }
  if (text == "false" || text == "no" || text == "off") {
    value = false;
    return true;
  }
  return false;
}

// Converts one entry to the field's type and checks its range; throws naming origin and key.
ConfigValue convert(const ConfigField& field, const Entry& entry) {
  const YAML::Node& node = entry.value;
  const std::string where = entry.origin + ": " + field.path();
  ConfigValue value;
  if (node.IsNull()) {
    if (field.type == ConfigValueType::text) return value;  // empty text: "not set"
    SY_BAD_INPUT(where, " has no value (expected ", type_name(field.type), ", ", field.range_text(), ")");
  }
  if (!node.IsScalar())
    SY_BAD_INPUT(where, " is ", node_kind(node), ", expected ", type_name(field.type), " (", field.range_text(), ")");
  const std::string& text = node.Scalar();
  const bool quoted = node.Tag() == "!";  // yaml-cpp tags quoted scalars "!", plain ones "?"
  switch (field.type) {
    case ConfigValueType::integer: {
      bool overflow = false;
      if (quoted || !parse_integer_text(text, value.integer, overflow))
        SY_BAD_INPUT(where, " = ", quoted ? "\"" + text + "\"" : text, " is not an integer");
      if (overflow || value.integer < field.integer_min || value.integer > field.integer_max)
        SY_BAD_INPUT(where, " = ", text, " is out of range ", field.range_text());
      return value;
    }
    case ConfigValueType::real: {
      if (quoted || !parse_real_text(text, value.real))
        SY_BAD_INPUT(where, " = ", quoted ? "\"" + text + "\"" : text, " is not a number");
      bool below = field.real_min_open ? value.real <= field.real_min : value.real < field.real_min;
      bool above = field.real_max_open ? value.real >= field.real_max : value.real > field.real_max;
      if (below || above) SY_BAD_INPUT(where, " = ", text, " is out of range ", field.range_text());
      return value;
    }
    case ConfigValueType::boolean:
      if (quoted || !parse_boolean_text(text, value.boolean))
        SY_BAD_INPUT(where, " = ", quoted ? "\"" + text + "\"" : text, " is not a boolean (use true or false)");
      return value;
    case ConfigValueType::choice: {
      if (std::find(field.choices.begin(), field.choices.end(), text) == field.choices.end()) {
        std::vector<std::pair<std::string, std::string>> candidates;
        for (const std::string& choice : field.choices) candidates.emplace_back(choice, choice);
        SY_BAD_INPUT(where, " = ", text, " is not ", field.range_text(), suggestion(text, candidates));
      }
      value.text = text;
      return value;
    }
    case ConfigValueType::text:
      value.text = text;
      return value;
  }
  return value;
}

// Parses YAML text; a syntax error names `source` and, for a file, the line and column.
YAML::Node load_yaml(const std::string& text, const std::string& source, bool source_is_file) {
  try {
    return YAML::Load(text);
  } catch (const YAML::Exception& error) {
    if (!source_is_file || error.mark.is_null()) SY_BAD_INPUT(source, ": YAML syntax error: ", error.msg);
    SY_BAD_INPUT(source, ":", error.mark.line + 1, ":", error.mark.column + 1, ": YAML syntax error: ", error.msg);
  }
}

// Reads every section and key of the document into `entries` (keyed by path), rejecting
// unknown and repeated names. Section origins are kept for "missing key" messages.
void collect_entries(const YAML::Node& root, const std::string& source, std::map<std::string, Entry>& entries,
                     std::map<std::string, std::string>& section_origins) {
  if (!root.IsDefined() || root.IsNull())
    SY_BAD_INPUT(source, ": the config is empty (expected sections such as model, moe, training, data)");
  if (!root.IsMap())
    SY_BAD_INPUT(line_origin(source, root.Mark()), ": the top level of the config must be a mapping of sections, "
                 "not ", node_kind(root));
  const std::vector<std::string> sections = section_names();
  for (auto section_it = root.begin(); section_it != root.end(); ++section_it) {
    const YAML::Node section_key = section_it->first;  // copies: operator-> returns a temporary
    const YAML::Node section_body = section_it->second;
    const std::string origin = line_origin(source, section_key.Mark());
    if (!section_key.IsScalar()) SY_BAD_INPUT(origin, ": a section name must be a plain name");
    const std::string& section = section_key.Scalar();
    if (std::find(sections.begin(), sections.end(), section) == sections.end())
      SY_BAD_INPUT(origin, ": unknown section ", section, unknown_section_hint(section));
    if (section_origins.count(section)) SY_BAD_INPUT(origin, ": section ", section, " appears twice (first at ",
                                                     section_origins[section], ")");
    section_origins[section] = origin;
    if (section_body.IsNull()) continue;  // "moe:" with nothing under it: all defaults
    if (!section_body.IsMap())
      SY_BAD_INPUT(origin, ": section ", section, " must be a mapping of keys, not ", node_kind(section_body));
    for (auto key_it = section_body.begin(); key_it != section_body.end(); ++key_it) {
      const YAML::Node key_node = key_it->first;
      const std::string key_origin = line_origin(source, key_node.Mark());
      if (!key_node.IsScalar()) SY_BAD_INPUT(key_origin, ": a key in section ", section, " must be a plain name");
      const std::string& key = key_node.Scalar();
      const std::string path = section + "." + key;
      if (!find_field(section, key)) SY_BAD_INPUT(key_origin, ": unknown key ", path, unknown_key_hint(section, key));
      if (entries.count(path))
        SY_BAD_INPUT(key_origin, ": ", path, " is given twice (first at ", entries[path].origin, ")");
      entries[path] = Entry{key_it->second, key_origin};
    }
  }
}

// Applies one "section.key=value" override.
void apply_override(const std::string& argument, std::map<std::string, Entry>& entries) {
  const std::string origin = "--set " + argument;
  size_t equals = argument.find('=');
  if (equals == std::string::npos || equals == 0)
    SY_BAD_INPUT(origin, ": expected section.key=value (for example --set moe.top_k=2)");
  const std::string path = argument.substr(0, equals);
  const std::string value_text = argument.substr(equals + 1);
  size_t dot = path.find('.');
  if (dot == std::string::npos || path.find('.', dot + 1) != std::string::npos)
    SY_BAD_INPUT(origin, ": '", path, "' is not a section.key path (for example moe.top_k)");
  const std::string section = path.substr(0, dot), key = path.substr(dot + 1);
  const std::vector<std::string> sections = section_names();
  if (std::find(sections.begin(), sections.end(), section) == sections.end())
    SY_BAD_INPUT(origin, ": unknown section ", section, unknown_section_hint(section));
  if (!find_field(section, key)) SY_BAD_INPUT(origin, ": unknown key ", path, unknown_key_hint(section, key));
  YAML::Node value = load_yaml(value_text, origin, /*source_is_file=*/false);
  if (!value.IsNull() && !value.IsScalar())
    SY_BAD_INPUT(origin, ": the value of ", path, " must be a single scalar, not ", node_kind(value));
  entries[path] = Entry{value, origin};
}

}  // namespace

Config parse_stored_config(const std::string& yaml_text, const std::string& source_name) {
  return parse_config_string(yaml_text, source_name, {}, /*cuda_backend_built=*/false);
}

Config parse_config_string(const std::string& yaml_text, const std::string& source_name,
                           const std::vector<std::string>& overrides, bool cuda_backend_built) {
  YAML::Node root = load_yaml(yaml_text, source_name, /*source_is_file=*/true);
  std::map<std::string, Entry> entries;
  std::map<std::string, std::string> section_origins;
  collect_entries(root, source_name, entries, section_origins);
  for (const std::string& argument : overrides) apply_override(argument, entries);

  Config config;
  config.source = source_name;
  // Given keys first, so that derived defaults see every given value.
  for (const ConfigField& field : config_fields()) {
    auto entry = entries.find(field.path());
    if (entry != entries.end()) {
      field.set(config, convert(field, entry->second));
    } else if (field.required) {
      auto section = section_origins.find(field.section);
      std::string where = section != section_origins.end() ? section->second : source_name;
      SY_BAD_INPUT(where, ": ", field.path(), " is required but not given (", type_name(field.type), ", ",
                   field.range_text(), ": ", field.help, ")");
    }
  }
  for (const ConfigField& field : config_fields())
    if (!entries.count(field.path()) && field.derive_default) field.derive_default(config);

  const auto where = [&](const std::string& path) {
    auto entry = entries.find(path);
    return entry != entries.end() ? entry->second.origin : source_name;
  };
  check_config_consistency(config, where);
  check_backend_limits(config, where, device_can_be_cuda(config, cuda_backend_built));
  return config;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code status;
  if (std::filesystem::is_directory(path, status)) {
    // Reading a directory "succeeds" with no bytes, which would pass for an empty config.
    const std::filesystem::path inside = std::filesystem::path(path) / "config.yaml";
    SY_BAD_INPUT("config file '", path, "' is a directory; expected a YAML config file such as "
                 "configs/tiny-cpu.yaml",
                 std::filesystem::is_regular_file(inside, status)
                     ? " (a run folder? the config its run resolved is " + inside.string() + ")"
                     : "");
  }
  std::ifstream file(path, std::ios::binary);
  if (!file) SY_BAD_INPUT("cannot read config file '", path, "': ", std::strerror(errno));
  std::ostringstream text;
  text << file.rdbuf();
  if (file.bad()) SY_BAD_INPUT("cannot read config file '", path, "': ", std::strerror(errno));
  return parse_config_string(text.str(), path, overrides);
}

std::string config_to_yaml(const Config& config) {
  std::ostringstream out;
  out << "# switchyard resolved config: every key, defaults filled in";
  if (!config.source.empty() && config.source.find('\n') == std::string::npos) out << " (from " << config.source << ")";
  out << ".\n";
  const std::vector<ConfigField>& fields = config_fields();
  for (size_t begin = 0; begin < fields.size();) {
    size_t end = begin;
    size_t width = 0;
    std::vector<std::string> lines;
    while (end < fields.size() && fields[end].section == fields[begin].section) {
      lines.push_back("  " + fields[end].key + ": " + fields[end].get(config));
      width = std::max(width, lines.back().size());
      ++end;
    }
    width = std::min<size_t>(width, 48);  // long paths do not push every comment far right
    out << (begin ? "\n" : "") << fields[begin].section << ":\n";
    for (size_t index = begin; index < end; ++index) {
      const std::string& line = lines[index - begin];
      out << line << std::string(line.size() < width ? width - line.size() : 0, ' ') << "  # " << fields[index].help
          << "\n";
    }
    begin = end;
  }
  return out.str();
}

}  // namespace switchyard
