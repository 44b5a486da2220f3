// A small JSON value with a strict parser and a writer: what checkpoint manifests
// (src/train/checkpoint_format.h) and the safetensors header (src/train/checkpoint_export.h) need.
//
// Values: null, bool, number, string, array, object. Numbers keep their text, so integers of up to
// 64 bits round-trip exactly (as_int64 / as_uint64 parse the text; as_double converts). Objects
// keep their keys in insertion order (the writer emits them in that order; lookups are linear,
// which is fine for the few keys a manifest object has). The parser accepts RFC 8259 JSON only:
// no comments, no trailing commas, no NaN; \uXXXX escapes (with surrogate pairs) become UTF-8.
// Errors are SY_BAD_INPUT naming the source and the byte offset. Nesting deeper than 64 levels is
// rejected (a manifest is three levels deep). Its own namespace, json::, keeps it apart from the
// read-only switchyard::JsonValue of src/analysis.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace switchyard::json {

class Value {
 public:
  enum class Kind : uint8_t { null, boolean, number, string, array, object };

  Value() = default;  // null
  static Value boolean(bool value);
  static Value integer(int64_t value);
  static Value unsigned_integer(uint64_t value);
  static Value real(double value);  // shortest text that round-trips (%.17g); finite only
  static Value string(std::string value);
  static Value array();
  static Value object();

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::null; }

  // Accessors throw SY_BAD_INPUT("<where>: ...") when the kind or range is wrong; `where` names
  // the value in messages ("manifest.json: step").
  bool as_bool(const std::string& where) const;
  int64_t as_int64(const std::string& where) const;
  uint64_t as_uint64(const std::string& where) const;
  double as_double(const std::string& where) const;
  const std::string& as_string(const std::string& where) const;
  const std::vector<Value>& as_array(const std::string& where) const;

  // Objects.
  bool has(const std::string& key) const;
  const Value& at(const std::string& key, const std::string& where) const;  // SY_BAD_INPUT if absent
  Value& set(const std::string& key, Value value);                      // replaces or appends
  const std::vector<std::pair<std::string, Value>>& members() const { return members_; }
  // Arrays.
  Value& push(Value value);
  const std::vector<Value>& elements() const { return elements_; }

  // Compact text (no spaces); `indent` > 0 pretty-prints objects and arrays of objects.
  std::string dump(int indent = 0) const;

 private:
  friend class Parser;
  void dump_to(std::string& out, int indent, int depth) const;

  Kind kind_ = Kind::null;
  bool bool_ = false;
  std::string text_;  // number text or string value
  std::vector<Value> elements_;
  std::vector<std::pair<std::string, Value>> members_;
};

// Parses `text` (the whole of it, surrounding whitespace allowed). `source` names it in errors.
Value parse(const std::string& text, const std::string& source);
// `value` as a JSON string literal, quotes included (control characters as \uXXXX).
std::string quote(const std::string& value);

}  // namespace switchyard::json
