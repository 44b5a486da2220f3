// switchyard's one JSON module: a value type, a strict parser and a writer. Checkpoint manifests
// (src/train/checkpoint_format.h), the safetensors header (src/train/checkpoint_export.h) and the
// metrics lines the report reads back (src/report/run_history.h) all go through it.
//
// Values: null, bool, number, string, array, object. Numbers keep their text, so integers of up to
// 64 bits round-trip exactly (as_int64 / as_uint64 parse the text), and the double the text denotes
// (strtod, kept at construction so repeated reads are cheap). Objects keep their keys in insertion
// order: the writer emits them in that order; lookups are linear, which suits the few dozen keys of
// a manifest object or a metrics line.
//
// The parser accepts RFC 8259 JSON only: no comments, no trailing commas, no NaN / Infinity, no
// duplicate keys, no raw control characters in strings; \uXXXX escapes (surrogate pairs joined)
// become UTF-8. Nesting deeper than 64 levels is rejected (a manifest is three levels deep).
// Parse errors are SY_BAD_INPUT "<source>:<line>:<column>: invalid JSON: <what>" (both 1-based,
// the column in bytes), as compilers report positions.
//
// Two ways to read a parsed value:
//   strict  (as_*, at): throw SY_BAD_INPUT "<where>: expected ..., found ..." on a wrong kind, a
//           missing key or an out-of-range integer; for files whose shape is a contract (manifests).
//   lenient (find, number_or, bool_or, has_number): absent keys, nulls and wrong kinds give the
//           fallback; for records whose fields come and go (metrics lines, where non-finite numbers
//           are written as null).
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
  bool is_bool() const { return kind_ == Kind::boolean; }
  bool is_number() const { return kind_ == Kind::number; }
  bool is_string() const { return kind_ == Kind::string; }
  bool is_array() const { return kind_ == Kind::array; }
  bool is_object() const { return kind_ == Kind::object; }

  // Strict accessors: SY_BAD_INPUT("<where>: ...") when the kind or range is wrong; `where` names
  // the value in messages ("manifest.json: step").
  bool as_bool(const std::string& where) const;
  int64_t as_int64(const std::string& where) const;
  uint64_t as_uint64(const std::string& where) const;
  double as_double(const std::string& where) const;  // finite only
  const std::string& as_string(const std::string& where) const;
  const std::vector<Value>& as_array(const std::string& where) const;

  // Lenient accessors: never throw.
  double number_or(double fallback) const;  // this value as a number, `fallback` unless a number
  const Value* find(const std::string& key) const;  // the member, nullptr if absent or not an object
  double number_or(const std::string& key, double fallback) const;  // the member as a number
  bool bool_or(const std::string& key, bool fallback) const;        // the member as a boolean
  bool has_number(const std::string& key) const;

  // Objects (members() and elements() are empty for other kinds).
  bool has(const std::string& key) const;
  const Value& at(const std::string& key, const std::string& where) const;  // SY_BAD_INPUT if absent
  Value& set(const std::string& key, Value value);                      // replaces or appends
  const std::vector<std::pair<std::string, Value>>& members() const { return members_; }
  // Arrays.
  Value& push(Value value);
  const std::vector<Value>& elements() const { return elements_; }

  // Compact text (no spaces); `indent` > 0 pretty-prints the top two object levels and arrays of
  // objects, keeping deeper objects and arrays of scalars on one line.
  std::string dump(int indent = 0) const;

 private:
  friend class Parser;  // json.cpp
  void dump_to(std::string& out, int indent, int depth) const;

  Kind kind_ = Kind::null;
  bool bool_ = false;
  double number_ = 0.0;  // the value of a number's text
  std::string text_;     // number text or string value
  std::vector<Value> elements_;
  std::vector<std::pair<std::string, Value>> members_;
};

// Parses `text` (the whole of it, surrounding whitespace allowed). `source` names it in errors;
// `first_line` is the line number of text's first line there (for one record of a JSON-lines file).
Value parse(const std::string& text, const std::string& source, int64_t first_line = 1);
// `value` as a JSON string literal, quotes included (control characters other than \n \r \t as
// \u00XX; other bytes, UTF-8 included, pass through).
std::string quote(const std::string& value);
// A number for a JSON writer: %.9g (enough for the float32-accurate metrics written with it), or
// null for inf / NaN, which JSON cannot hold.
std::string number(double value);

}  // namespace switchyard::json
