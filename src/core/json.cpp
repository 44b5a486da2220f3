// JSON values, parser and writer (src/core/json.h).
#include "src/core/json.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "src/core/error.h"

namespace switchyard::json {
namespace {

constexpr int kMaxDepth = 64;

const char* kind_name(Value::Kind kind) {
  switch (kind) {
    case Value::Kind::null: return "null";
    case Value::Kind::boolean: return "a boolean";
    case Value::Kind::number: return "a number";
    case Value::Kind::string: return "a string";
    case Value::Kind::array: return "an array";
    case Value::Kind::object: return "an object";
  }
  return "?";
}

void append_utf8(std::string& out, uint32_t code_point) {
  if (code_point < 0x80) {
    out += char(code_point);
  } else if (code_point < 0x800) {
    out += char(0xC0 | (code_point >> 6));
    out += char(0x80 | (code_point & 0x3F));
  } else if (code_point < 0x10000) {
    out += char(0xE0 | (code_point >> 12));
    out += char(0x80 | ((code_point >> 6) & 0x3F));
    out += char(0x80 | (code_point & 0x3F));
  } else {
    out += char(0xF0 | (code_point >> 18));
    out += char(0x80 | ((code_point >> 12) & 0x3F));
    out += char(0x80 | ((code_point >> 6) & 0x3F));
    out += char(0x80 | (code_point & 0x3F));
  }
}

bool is_digit(char character) { return character >= '0' && character <= '9'; }

}  // namespace

// ---- Parser --------------------------------------------------------------------------------------

class Parser {
 public:
  Parser(const std::string& text, const std::string& source, int64_t first_line)
      : text_(text), source_(source), first_line_(first_line) {}

  Value parse_document() {
    skip_space();
    Value value = parse_value(0);
    skip_space();
    if (position_ != text_.size()) fail("unexpected text after the JSON value");
    return value;
  }

 private:
  // Line and column are counted only here, on the way out, so parsing itself tracks one offset.
  [[noreturn]] void fail(const std::string& what) const {
    const size_t end = std::min(position_, text_.size());
    int64_t line = first_line_;
    size_t line_start = 0;
    for (size_t index = 0; index < end; ++index) {
      if (text_[index] == '\n') {
        ++line;
        line_start = index + 1;
      }
    }
    SY_BAD_INPUT(source_, ":", line, ":", end - line_start + 1, ": invalid JSON: ", what);
  }
  bool at_end() const { return position_ >= text_.size(); }
  char peek() const { return at_end() ? '\0' : text_[position_]; }
  void skip_space() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++position_;
  }
  void expect(char wanted) {
    if (peek() != wanted) fail(std::string("expected '") + wanted + "'");
    ++position_;
  }
  void expect_word(const char* word) {
    for (const char* cursor = word; *cursor; ++cursor) {
      if (peek() != *cursor) fail(std::string("expected '") + word + "'");
      ++position_;
    }
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) fail("nested deeper than 64 levels");
    switch (peek()) {
      case '{': return parse_object(depth);
      case '[': return parse_array(depth);
      case '"': return Value::string(parse_string());
      case 't': expect_word("true"); return Value::boolean(true);
      case 'f': expect_word("false"); return Value::boolean(false);
      case 'n': expect_word("null"); return Value();
      default: return parse_number();
    }
  }

  Value parse_object(int depth) {
    expect('{');
    Value value = Value::object();
    skip_space();
    if (peek() == '}') {
      ++position_;
      return value;
    }
    for (;;) {
      skip_space();
      if (peek() != '"') fail("expected a string key");
      const size_t key_start = position_;
      std::string key = parse_string();
      if (value.has(key)) {
        position_ = key_start;  // point at the repeated key, not past it
        fail("duplicate key \"" + key + "\"");
      }
      skip_space();
      expect(':');
      skip_space();
      value.members_.emplace_back(std::move(key), parse_value(depth + 1));
      skip_space();
      if (peek() == ',') {
        ++position_;
        continue;
      }
      expect('}');
      return value;
    }
  }

  Value parse_array(int depth) {
    expect('[');
    Value value = Value::array();
    skip_space();
    if (peek() == ']') {
      ++position_;
      return value;
    }
    for (;;) {
      skip_space();
      value.elements_.push_back(parse_value(depth + 1));
      skip_space();
      if (peek() == ',') {
        ++position_;
        continue;
      }
      expect(']');
      return value;
    }
  }

  uint32_t parse_hex4() {
    uint32_t code = 0;
    for (int digit = 0; digit < 4; ++digit) {
      const char character = peek();
      uint32_t nibble;
      if (character >= '0' && character <= '9') nibble = uint32_t(character - '0');
      else if (character >= 'a' && character <= 'f') nibble = uint32_t(character - 'a' + 10);
      else if (character >= 'A' && character <= 'F') nibble = uint32_t(character - 'A' + 10);
      else fail("bad \\u escape");
      code = code * 16 + nibble;
      ++position_;
    }
    return code;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string");
      const char character = text_[position_++];
      if (character == '"') return out;
      if (static_cast<unsigned char>(character) < 0x20) {
        --position_;  // point at the character itself
        fail("control character in a string");
      }
      if (character != '\\') {
        out += character;
        continue;
      }
      if (at_end()) fail("unterminated escape");
      const char escape = text_[position_++];
      switch (escape) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t code = parse_hex4();
          if (code >= 0xD800 && code <= 0xDBFF) {  // a surrogate pair: the low half must follow
            if (peek() != '\\') fail("lone high surrogate");
            ++position_;
            if (peek() != 'u') fail("lone high surrogate");
            ++position_;
            const uint32_t low = parse_hex4();
            if (low < 0xDC00 || low > 0xDFFF) fail("bad low surrogate");
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          } else if (code >= 0xDC00 && code <= 0xDFFF) {
            fail("lone low surrogate");
          }
          append_utf8(out, code);
          break;
        }
        default: fail(std::string("bad escape '\\") + escape + "'");
      }
    }
  }

  Value parse_number() {
    const size_t start = position_;
    if (peek() == '-') ++position_;
    if (peek() == '0') {
      ++position_;
    } else if (peek() >= '1' && peek() <= '9') {
      while (is_digit(peek())) ++position_;
    } else {
      fail(at_end() ? "expected a value, found the end of the text" : "expected a value");
    }
    if (peek() == '.') {
      ++position_;
      if (!is_digit(peek())) fail("expected a digit after '.'");
      while (is_digit(peek())) ++position_;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++position_;
      if (peek() == '+' || peek() == '-') ++position_;
      if (!is_digit(peek())) fail("expected a digit in the exponent");
      while (is_digit(peek())) ++position_;
    }
    Value value;
    value.kind_ = Value::Kind::number;
    value.text_ = text_.substr(start, position_ - start);
    char* end = nullptr;
    value.number_ = std::strtod(value.text_.c_str(), &end);
    if (end == nullptr || *end != '\0') {  // only under a locale whose decimal point is not '.'
      position_ = start;
      fail("number '" + value.text_ + "' not understood by strtod");
    }
    return value;
  }

  const std::string& text_;
  const std::string& source_;
  const int64_t first_line_;
  size_t position_ = 0;
};

Value parse(const std::string& text, const std::string& source, int64_t first_line) {
  return Parser(text, source, first_line).parse_document();
}

// ---- Construction --------------------------------------------------------------------------------

Value Value::boolean(bool value) {
  Value result;
  result.kind_ = Kind::boolean;
  result.bool_ = value;
  return result;
}

Value Value::integer(int64_t value) {
  Value result;
  result.kind_ = Kind::number;
  result.text_ = std::to_string(value);
  result.number_ = double(value);
  return result;
}

Value Value::unsigned_integer(uint64_t value) {
  Value result;
  result.kind_ = Kind::number;
  result.text_ = std::to_string(value);
  result.number_ = double(value);
  return result;
}

Value Value::real(double value) {
  SY_CHECK(std::isfinite(value), "JSON has no representation for ", value);
  char buffer[40];
  std::snprintf(buffer, sizeof(buffer), "%.17g", value);
  Value result;
  result.kind_ = Kind::number;
  result.text_ = buffer;
  result.number_ = value;  // %.17g round-trips, so the text denotes exactly this
  return result;
}

Value Value::string(std::string value) {
  Value result;
  result.kind_ = Kind::string;
  result.text_ = std::move(value);
  return result;
}

Value Value::array() {
  Value result;
  result.kind_ = Kind::array;
  return result;
}

Value Value::object() {
  Value result;
  result.kind_ = Kind::object;
  return result;
}

// ---- Strict access -------------------------------------------------------------------------------

bool Value::as_bool(const std::string& where) const {
  if (kind_ != Kind::boolean) SY_BAD_INPUT(where, ": expected a boolean, found ", kind_name(kind_));
  return bool_;
}

int64_t Value::as_int64(const std::string& where) const {
  if (kind_ != Kind::number) SY_BAD_INPUT(where, ": expected an integer, found ", kind_name(kind_));
  errno = 0;
  char* end = nullptr;
  const long long value = std::strtoll(text_.c_str(), &end, 10);
  if (errno != 0 || end == nullptr || *end != '\0')
    SY_BAD_INPUT(where, ": expected a 64-bit integer, found ", text_);
  return int64_t(value);
}

uint64_t Value::as_uint64(const std::string& where) const {
  if (kind_ != Kind::number || text_.empty() || text_[0] == '-')
    SY_BAD_INPUT(where, ": expected a non-negative integer, found ", kind_ == Kind::number ? text_ : kind_name(kind_));
  errno = 0;
  char* end = nullptr;
  const unsigned long long value = std::strtoull(text_.c_str(), &end, 10);
  if (errno != 0 || end == nullptr || *end != '\0')
    SY_BAD_INPUT(where, ": expected a 64-bit unsigned integer, found ", text_);
  return uint64_t(value);
}

double Value::as_double(const std::string& where) const {
  if (kind_ != Kind::number) SY_BAD_INPUT(where, ": expected a number, found ", kind_name(kind_));
  if (!std::isfinite(number_)) SY_BAD_INPUT(where, ": bad number ", text_);  // e.g. 1e999
  return number_;
}

const std::string& Value::as_string(const std::string& where) const {
  if (kind_ != Kind::string) SY_BAD_INPUT(where, ": expected a string, found ", kind_name(kind_));
  return text_;
}

const std::vector<Value>& Value::as_array(const std::string& where) const {
  if (kind_ != Kind::array) SY_BAD_INPUT(where, ": expected an array, found ", kind_name(kind_));
  return elements_;
}

const Value& Value::at(const std::string& key, const std::string& where) const {
  if (kind_ != Kind::object) SY_BAD_INPUT(where, ": expected an object, found ", kind_name(kind_));
  if (const Value* member = find(key)) return *member;
  SY_BAD_INPUT(where, ": missing key \"", key, "\"");
}

// ---- Lenient access ------------------------------------------------------------------------------

double Value::number_or(double fallback) const { return kind_ == Kind::number ? number_ : fallback; }

const Value* Value::find(const std::string& key) const {
  for (const auto& member : members_)  // empty unless an object
    if (member.first == key) return &member.second;
  return nullptr;
}

double Value::number_or(const std::string& key, double fallback) const {
  const Value* member = find(key);
  return member != nullptr ? member->number_or(fallback) : fallback;
}

bool Value::bool_or(const std::string& key, bool fallback) const {
  const Value* member = find(key);
  return member != nullptr && member->kind_ == Kind::boolean ? member->bool_ : fallback;
}

bool Value::has_number(const std::string& key) const {
  const Value* member = find(key);
  return member != nullptr && member->kind_ == Kind::number;
}

// ---- Building ------------------------------------------------------------------------------------

bool Value::has(const std::string& key) const { return find(key) != nullptr; }

Value& Value::set(const std::string& key, Value value) {
  SY_CHECK(kind_ == Kind::object, "Value::set on ", kind_name(kind_));
  for (auto& member : members_) {
    if (member.first == key) {
      member.second = std::move(value);
      return member.second;
    }
  }
  members_.emplace_back(key, std::move(value));
  return members_.back().second;
}

Value& Value::push(Value value) {
  SY_CHECK(kind_ == Kind::array, "Value::push on ", kind_name(kind_));
  elements_.push_back(std::move(value));
  return elements_.back();
}

// ---- Writer --------------------------------------------------------------------------------------

std::string number(double value) {
  if (!std::isfinite(value)) return "null";
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.9g", value);
  return buffer;
}

std::string quote(const std::string& value) {
  std::string out = "\"";
  for (const char character : value) {
    switch (character) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(character) < 0x20) {
          char buffer[8];
          std::snprintf(buffer, sizeof(buffer), "\\u%04x", unsigned(static_cast<unsigned char>(character)));
          out += buffer;
        } else {
          out += character;  // UTF-8 passes through unchanged
        }
    }
  }
  return out + "\"";
}

std::string Value::dump(int indent) const {
  std::string out;
  dump_to(out, indent, 0);
  return out;
}

void Value::dump_to(std::string& out, int indent, int depth) const {
  // Pretty-printing breaks lines only around object members and arrays of objects, so shapes and
  // other short arrays stay on one line.
  auto newline = [&](int level) {
    if (indent <= 0) return;
    out += '\n';
    out.append(size_t(indent) * size_t(level), ' ');
  };
  switch (kind_) {
    case Kind::null: out += "null"; return;
    case Kind::boolean: out += bool_ ? "true" : "false"; return;
    case Kind::number: out += text_; return;
    case Kind::string: out += quote(text_); return;
    case Kind::array: {
      bool break_lines = false;
      for (const Value& element : elements_) break_lines |= element.kind_ == Kind::object;
      out += '[';
      for (size_t index = 0; index < elements_.size(); ++index) {
        if (index) out += indent > 0 && !break_lines ? ", " : ",";
        if (break_lines) newline(depth + 1);
        elements_[index].dump_to(out, break_lines ? indent : 0, depth + 1);
      }
      if (break_lines && !elements_.empty()) newline(depth);
      out += ']';
      return;
    }
    case Kind::object: {
      out += '{';
      const bool nested = indent > 0 && depth < 2;  // deeper objects (tensor entries) stay on one line
      for (size_t index = 0; index < members_.size(); ++index) {
        if (index) out += nested || indent <= 0 ? "," : ", ";
        if (nested) newline(depth + 1);
        out += quote(members_[index].first);
        out += indent > 0 ? ": " : ":";
        members_[index].second.dump_to(out, nested ? indent : 0, depth + 1);
      }
      if (nested && !members_.empty()) newline(depth);
      out += '}';
      return;
    }
  }
}

}  // namespace switchyard::json
