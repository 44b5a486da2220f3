// A small JSON reader for the files switchyard itself writes (metrics.jsonl, bench records):
// objects, arrays, strings (with \uXXXX escapes, UTF-8 out), numbers, true / false / null.
// Parse errors throw SY_BAD_INPUT naming the source and the byte offset.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace switchyard {

class JsonValue {
 public:
  enum class Kind : uint8_t { null, boolean, number, string, array, object };

  JsonValue() = default;
  static JsonValue parse(const std::string& text, const std::string& source_name);

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::null; }
  bool is_number() const { return kind_ == Kind::number; }
  bool is_array() const { return kind_ == Kind::array; }
  bool is_object() const { return kind_ == Kind::object; }

  double number() const { return number_; }  // 0 unless a number
  bool boolean() const { return boolean_; }  // false unless a boolean
  const std::string& string() const { return string_; }
  const std::vector<JsonValue>& items() const { return items_; }  // array elements
  const std::map<std::string, JsonValue>& members() const { return members_; }

  // Object member or nullptr (also when this is not an object).
  const JsonValue* find(const std::string& key) const;
  // The member as a number; `fallback` when absent, null or not a number.
  double number_or(const std::string& key, double fallback) const;
  bool has_number(const std::string& key) const;

 private:
  friend class JsonTextReader;  // the parser (json_value.cpp)
  Kind kind_ = Kind::null;
  double number_ = 0.0;
  bool boolean_ = false;
  std::string string_;
  std::vector<JsonValue> items_;
  std::map<std::string, JsonValue> members_;
};

}  // namespace switchyard
