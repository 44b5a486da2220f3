// The JSON module (src/core/json.h): exact round trips of values (64-bit integers, doubles, any
// byte string), the manifest layout of the pretty-printer (a manifest as earlier versions wrote it
// parses and dumps back byte for byte), strict rejection of malformed text with the line and column
// of the fault, strict accessors' messages, and the lenient accessors the metrics reader uses.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "src/core/error.h"
#include "src/core/json.h"
#include "tests/support/expect_error.h"

using switchyard::testing::expect_bad_input;

using namespace switchyard;

namespace {

std::mt19937_64 fresh_generator() { return std::mt19937_64(std::random_device{}()); }


TEST(Json, RoundTripsValuesExactly) {
  std::mt19937_64 generator = fresh_generator();
  json::Value root = json::Value::object();
  root.set("max_u64", json::Value::unsigned_integer(std::numeric_limits<uint64_t>::max()));
  root.set("min_i64", json::Value::integer(std::numeric_limits<int64_t>::min()));
  root.set("text", json::Value::string("line\nquote\" back\\slash \x01 tab\t caf\xc3\xa9"));
  json::Value reals = json::Value::array();
  std::vector<double> drawn;
  std::uniform_real_distribution<double> exponent(-300, 300);
  for (int index = 0; index < 64; ++index) {
    drawn.push_back(std::ldexp(std::uniform_real_distribution<double>(-1, 1)(generator), int(exponent(generator))));
    reals.push(json::Value::real(drawn.back()));
  }
  root.set("reals", reals);
  root.set("nested", json::Value::object()).set("flag", json::Value::boolean(true));
  root.set("nothing", json::Value());
  for (int indent : {0, 1, 2}) {
    const json::Value parsed = json::parse(root.dump(indent), "test");
    EXPECT_EQ(parsed.at("max_u64", "t").as_uint64("t"), std::numeric_limits<uint64_t>::max());
    EXPECT_EQ(parsed.at("min_i64", "t").as_int64("t"), std::numeric_limits<int64_t>::min());
    EXPECT_EQ(parsed.at("text", "t").as_string("t"), root.at("text", "t").as_string("t"));
    const std::vector<json::Value>& values = parsed.at("reals", "t").as_array("t");
    ASSERT_EQ(values.size(), drawn.size());
    for (size_t index = 0; index < drawn.size(); ++index) {
      EXPECT_EQ(values[index].as_double("t"), drawn[index]);
      EXPECT_EQ(values[index].number_or(0.0), drawn[index]);
    }
    EXPECT_TRUE(parsed.at("nested", "t").at("flag", "t").as_bool("t"));
    EXPECT_TRUE(parsed.at("nothing", "t").is_null());
    EXPECT_EQ(parsed.dump(), root.dump()) << "member order is kept";
  }
  EXPECT_EQ(json::parse("\"\\u00e9\\ud83d\\ude00\"", "t").as_string("t"), "\xc3\xa9\xf0\x9f\x98\x80");
}

// Every byte value, control characters and NUL included, survives quote() and parse().
TEST(Json, QuotesAnyByteStringLosslessly) {
  std::mt19937_64 generator = fresh_generator();
  std::uniform_int_distribution<int> byte(0, 255), length(1, 200);
  for (int trial = 0; trial < 50; ++trial) {
    std::string text(size_t(length(generator)), '\0');
    for (char& character : text) character = char(byte(generator));
    const std::string quoted = json::quote(text);
    for (char character : quoted) EXPECT_GE(static_cast<unsigned char>(character), 0x20) << "raw control character";
    EXPECT_EQ(json::parse(quoted, "quoted").as_string("quoted"), text);
  }
  EXPECT_EQ(json::quote("a\"b\\c\nd\re\tf\x01g"), "\"a\\\"b\\\\c\\nd\\re\\tf\\u0001g\"");
}

// A manifest as the checkpoint writer has always laid it out (dump(1) plus a newline; cut down from
// a real one: two tensors, a short config): parsing and dumping again gives the same bytes, so
// manifests written before keep both their meaning and their layout.
TEST(Json, ManifestLayoutIsStable) {
  const std::string manifest = R"({
 "format": "switchyard-checkpoint",
 "format_version": 1,
 "checksum": "xxh64",
 "step": 20,
 "tokens_seen": 20480,
 "world_size": 2,
 "ep_size": 2,
 "data_loader": {
  "train": {"samples_consumed": 320, "seed": 1234, "token_count": 94244, "seq_len": 64}
 },
 "rng": {
  "seed": 1234,
  "jitter_micro_steps": 20
 },
 "optimizer": {
  "updates": 20
 },
 "loss_scaler": {
  "enabled": false,
  "scale": 1,
  "good_steps": 0,
  "consecutive_skips": 0,
  "total_skips": 0
 },
 "files": [
  {"name": "shard-00000.bin", "rank": 0, "bytes": 873536},
  {"name": "shard-00001.bin", "rank": 1, "bytes": 902976}
 ],
 "tensors": [
  {"name": "blocks.1.moe.experts.0.w1", "parameter": "blocks.1.moe.w1", "state": "master", "expert": 0, "dtype": "F32", "shape": [64,128], "file": "shard-00000.bin", "owner": 0, "offset": 64, "bytes": 32768, "xxh64": "877538eced5db51f"},
  {"name": "optimizer.exp_avg_sq.blocks.1.attn.qkv", "parameter": "blocks.1.attn.qkv", "state": "exp_avg_sq", "expert": -1, "dtype": "F32", "shape": [64,192], "file": "shard-00001.bin", "owner": 1, "offset": 853824, "bytes": 49152, "xxh64": "8c091b7822226c00"}
 ],
 "config": "# switchyard resolved config: every key, defaults filled in (from configs/tiny-cpu.yaml).\nmodel:\n  vocab_size: 256      # token ids are 0 .. vocab_size-1 (256 = raw bytes, as prepare-data writes)\n  path: \"/data/tiny/train.bin\"    # training token file (from switchyard prepare-data)\n"
}
)";
  const json::Value parsed = json::parse(manifest, "manifest.json");
  EXPECT_EQ(parsed.dump(1) + "\n", manifest);
  EXPECT_EQ(parsed.at("tensors", "m").as_array("m")[1].at("expert", "m").as_int64("m"), -1);
  EXPECT_EQ(parsed.at("data_loader", "m").at("train", "m").at("seed", "m").as_uint64("m"), 1234u);
  EXPECT_EQ(parsed.members().front().first, "format");
  EXPECT_EQ(parsed.members().back().first, "config");
}

TEST(Json, RejectsMalformedText) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"a\": 1,}", "expected a string key"},
      {"[1, 2,]", "expected a value"},
      {"{\"a\": 1, \"a\": 2}", "duplicate key"},
      {"\"tab\there\"", "control character"},
      {"\"\\ud800x\"", "lone high surrogate"},
      {"\"\\udc00\"", "lone low surrogate"},
      {"\"\\q\"", "bad escape"},
      {"01", "unexpected text"},
      {"1.", "digit after"},
      {"1e+", "digit in the exponent"},
      {"NaN", "expected a value"},
      {"-Infinity", "expected a value"},
      {"tru", "expected 'true'"},
      {"{\"a\" 1}", "expected ':'"},
      {"[1 2]", "expected ']'"},
      {"{\"a\": 1} x", "unexpected text"},
      {"", "the end of the text"},
      {std::string(100, '['), "nested deeper"},
      {"\"open", "unterminated"},
  };
  for (const auto& [text, needle] : cases) expect_bad_input([&] { json::parse(text, "case.json"); }, needle);
  expect_bad_input([] { json::parse("[1]", "x").at("key", "where"); }, "where: expected an object");
  expect_bad_input([] { json::parse("{\"a\": 1}", "x").at("key", "where"); }, "where: missing key \"key\"");
  expect_bad_input([] { json::parse("{\"n\": -1}", "x").at("n", "x").as_uint64("the n"); }, "the n");
  expect_bad_input([] { json::parse("{\"n\": 1.5}", "x").at("n", "x").as_int64("the n"); }, "64-bit integer");
  expect_bad_input([] { json::parse("{\"n\": 1e999}", "x").at("n", "x").as_double("the n"); }, "bad number");
  expect_bad_input([] { json::parse("\"s\"", "x").as_bool("the s"); }, "the s: expected a boolean, found a string");
}

// The fault's line and column (1-based, bytes) for errors at random places in multi-line text, and
// shifted by first_line for one record of a JSON-lines file.
TEST(Json, ErrorsNameLineAndColumn) {
  std::mt19937_64 generator = fresh_generator();
  std::uniform_int_distribution<int> lines(0, 20), spaces(0, 30);
  for (int trial = 0; trial < 20; ++trial) {
    // Members one per line, then a member whose value is a bad token at a known place.
    const int members = lines(generator), indent = spaces(generator);
    std::string text = "{\n";
    for (int member = 0; member < members; ++member)
      text += "  \"key" + std::to_string(member) + "\": " + std::to_string(member * 7) + ",\n";
    text += std::string(size_t(indent), ' ') + "\"bad\": @}\n";
    const int64_t line = 2 + members, column = indent + 8;  // '@' after `"bad": `
    const std::string where = ":" + std::to_string(line) + ":" + std::to_string(column);
    expect_bad_input([&] { json::parse(text, "doc.json"); }, "doc.json" + where + ": invalid JSON: expected a value");
    const int64_t first_line = 1 + lines(generator) * 1000;
    expect_bad_input([&] { json::parse(text, "doc.jsonl", first_line); },
                     "doc.jsonl:" + std::to_string(line + first_line - 1) + ":" + std::to_string(column) + ": ");
  }
  // Errors inside strings point at the offending character; a repeated key at the key.
  expect_bad_input([] { json::parse("{\"a\": \"x\ty\"}", "s"); }, "s:1:9: invalid JSON: control character");
  expect_bad_input([] { json::parse("{\"a\": 1,\n \"a\": 2}", "s"); }, "s:2:2: invalid JSON: duplicate key \"a\"");
  expect_bad_input([] { json::parse("[1,\n2,\n", "s"); }, "s:3:1: invalid JSON: expected a value");
}

// Metrics lines as the trainer writes them: missing keys, nulls (non-finite values) and other
// kinds give the fallback instead of an error.
TEST(Json, ReadsMetricsLinesLeniently) {
  std::mt19937_64 generator = fresh_generator();
  const double loss = std::uniform_real_distribution<double>(0.5, 9.0)(generator);
  const int64_t step = std::uniform_int_distribution<int64_t>(1, 1 << 20)(generator);
  const std::string line = "{\"step\":" + std::to_string(step) + ",\"loss\":" + json::Value::real(loss).dump() +
                           ",\"grad_norm\":null,\"skipped\":true,\"lr\":\"x\",\"b\":[true,false,null,-3],"
                           "\"c\":{\"d\":\"x\\\"y\\\\n\\u00e9\\n\"},\"e\":[]}";
  const json::Value value = json::parse(line, "metrics.jsonl", 7);
  ASSERT_TRUE(value.is_object());
  EXPECT_TRUE(value.has_number("step"));
  EXPECT_EQ(value.number_or("step", -1), double(step));
  EXPECT_EQ(value.number_or("loss", -1), loss);
  EXPECT_EQ(value.number_or("grad_norm", -1), -1) << "null gives the fallback";
  EXPECT_FALSE(value.has_number("grad_norm"));
  EXPECT_EQ(value.number_or("lr", -2), -2) << "a string gives the fallback";
  EXPECT_EQ(value.number_or("missing", 7.0), 7.0);
  EXPECT_TRUE(value.bool_or("skipped", false));
  EXPECT_FALSE(value.bool_or("loss", false));
  EXPECT_TRUE(value.bool_or("missing", true));
  const json::Value* items = value.find("b");
  ASSERT_NE(items, nullptr);
  ASSERT_EQ(items->elements().size(), 4u);
  EXPECT_TRUE(items->elements()[0].as_bool("b[0]"));
  EXPECT_TRUE(items->elements()[2].is_null());
  EXPECT_EQ(items->elements()[2].number_or(5.0), 5.0);
  EXPECT_EQ(items->elements()[3].number_or(0.0), -3.0);
  EXPECT_EQ(items->find("x"), nullptr) << "find on an array";
  EXPECT_TRUE(items->members().empty());
  EXPECT_EQ(value.find("c")->find("d")->as_string("d"), "x\"y\\n\xC3\xA9\n");
  EXPECT_TRUE(value.find("e")->elements().empty());
  EXPECT_TRUE(value.find("c")->elements().empty()) << "elements of an object";
}

TEST(Json, BuildsValues) {
  json::Value object = json::Value::object();
  object.set("a", json::Value::integer(1));
  object.set("b", json::Value::integer(2));
  object.set("a", json::Value::string("replaced"));  // keeps its place
  EXPECT_EQ(object.dump(), "{\"a\":\"replaced\",\"b\":2}");
  json::Value array = json::Value::array();
  array.push(json::Value::integer(-4));
  array.push(json::Value::boolean(false));
  EXPECT_EQ(array.dump(2), "[-4, false]") << "arrays of scalars stay on one line";
  EXPECT_THROW(array.set("k", json::Value()), Error);
  EXPECT_THROW(object.push(json::Value()), Error);
  EXPECT_THROW(json::Value::real(std::numeric_limits<double>::infinity()), Error);
}

}  // namespace
