// A small JSON reader (src/analysis/json_value.h): recursive descent over the text, depth-limited.
#include "src/analysis/json_value.h"

#include <cstdlib>
#include <cstring>

#include "src/core/error.h"

namespace switchyard {

class JsonTextReader {
 public:
  JsonTextReader(const std::string& text, const std::string& source) : text_(text), source_(source) {}

  JsonValue parse_document() {
    JsonValue value = parse_value(0);
    skip_space();
    if (position_ != text_.size()) fail("unexpected text after the value");
    return value;
  }

 private:
  static constexpr int kMaxDepth = 64;

  [[noreturn]] void fail(const std::string& what) const {
    SY_BAD_INPUT(source_, ": invalid JSON at byte ", position_, ": ", what);
  }
  void skip_space() {
    while (position_ < text_.size() && std::strchr(" \t\r\n", text_[position_]) != nullptr && text_[position_] != '\0')
      ++position_;
  }
  char peek() const { return position_ < text_.size() ? text_[position_] : '\0'; }
  void expect(char wanted) {
    if (peek() != wanted) fail(std::string("expected '") + wanted + "'");
    ++position_;
  }
  bool consume_word(const char* word) {
    const size_t length = std::strlen(word);
    if (text_.compare(position_, length, word) != 0) return false;
    position_ += length;
    return true;
  }

  JsonValue parse_value(int depth) {
    if (depth > kMaxDepth) fail("nested too deeply");
    skip_space();
    JsonValue value;
    const char next = peek();
    if (next == '{') {
      value.kind_ = JsonValue::Kind::object;
      ++position_;
      skip_space();
      if (peek() == '}') {
        ++position_;
        return value;
      }
      for (;;) {
        skip_space();
        if (peek() != '"') fail("expected a member name");
        std::string key = parse_string();
        skip_space();
        expect(':');
        value.members_[key] = parse_value(depth + 1);
        skip_space();
        if (peek() == ',') {
          ++position_;
          continue;
        }
        expect('}');
        return value;
      }
    }
    if (next == '[') {
      value.kind_ = JsonValue::Kind::array;
      ++position_;
      skip_space();
      if (peek() == ']') {
        ++position_;
        return value;
      }
      for (;;) {
        value.items_.push_back(parse_value(depth + 1));
        skip_space();
        if (peek() == ',') {
          ++position_;
          continue;
        }
        expect(']');
        return value;
      }
    }
    if (next == '"') {
      value.kind_ = JsonValue::Kind::string;
      value.string_ = parse_string();
      return value;
    }
    if (consume_word("true")) {
      value.kind_ = JsonValue::Kind::boolean;
      value.boolean_ = true;
      return value;
    }
    if (consume_word("false")) {
      value.kind_ = JsonValue::Kind::boolean;
      return value;
    }
    if (consume_word("null")) return value;
    if (next == '-' || (next >= '0' && next <= '9')) {
      const char* start = text_.c_str() + position_;
      char* end = nullptr;
      value.number_ = std::strtod(start, &end);
      if (end == start) fail("bad number");
      position_ += size_t(end - start);
      value.kind_ = JsonValue::Kind::number;
      return value;
    }
    fail(next == '\0' ? "unexpected end of text" : std::string("unexpected character '") + next + "'");
  }

  static void append_utf8(std::string& out, uint32_t code) {
    if (code < 0x80) {
      out += char(code);
    } else if (code < 0x800) {
      out += char(0xC0 | (code >> 6));
      out += char(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += char(0xE0 | (code >> 12));
      out += char(0x80 | ((code >> 6) & 0x3F));
      out += char(0x80 | (code & 0x3F));
    } else {
      out += char(0xF0 | (code >> 18));
      out += char(0x80 | ((code >> 12) & 0x3F));
      out += char(0x80 | ((code >> 6) & 0x3F));
      out += char(0x80 | (code & 0x3F));
    }
  }

  uint32_t parse_hex4() {
    if (position_ + 4 > text_.size()) fail("short \\u escape");
    uint32_t code = 0;
    for (int digit = 0; digit < 4; ++digit) {
      const char c = text_[position_++];
      code <<= 4;
      if (c >= '0' && c <= '9')
        code |= uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f')
        code |= uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        code |= uint32_t(c - 'A' + 10);
      else
        fail("bad \\u escape");
    }
    return code;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    for (;;) {
      if (position_ >= text_.size()) fail("unterminated string");
      const char c = text_[position_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (position_ >= text_.size()) fail("unterminated escape");
      const char escape = text_[position_++];
      switch (escape) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          uint32_t code = parse_hex4();
          if (code >= 0xD800 && code < 0xDC00 && text_.compare(position_, 2, "\\u") == 0) {  // surrogate pair
            position_ += 2;
            const uint32_t low = parse_hex4();
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, code);
          break;
        }
        default:
          fail(std::string("bad escape '\\") + escape + "'");
      }
    }
  }

  const std::string& text_;
  const std::string& source_;
  size_t position_ = 0;
};

JsonValue JsonValue::parse(const std::string& text, const std::string& source_name) {
  JsonTextReader parser(text, source_name);
  return parser.parse_document();
}

const JsonValue* JsonValue::find(const std::string& key) const {
  if (kind_ != Kind::object) return nullptr;
  auto found = members_.find(key);
  return found == members_.end() ? nullptr : &found->second;
}

double JsonValue::number_or(const std::string& key, double fallback) const {
  const JsonValue* value = find(key);
  return value != nullptr && value->is_number() ? value->number() : fallback;
}

bool JsonValue::has_number(const std::string& key) const {
  const JsonValue* value = find(key);
  return value != nullptr && value->is_number();
}

}  // namespace switchyard
