// BenchRecord (src/cli/bench_common.h): the JSON objects `bench moe|ep --json` write must parse.
#include <gtest/gtest.h>

#include <limits>
#include <random>

#include "src/cli/bench_common.h"
#include "src/core/json.h"

namespace switchyard {
namespace {

TEST(BenchRecord, WritesParsableJsonInOrderWithNullForNonFinite) {
  std::mt19937 generator(20261126);
  std::uniform_real_distribution<double> value(-1e6, 1e6);
  const double finite = value(generator);
  BenchRecord record;
  record.add("part", "routing \"quoted\"\n");
  record.add("ms", finite);
  record.add("ratio", std::numeric_limits<double>::infinity());
  record.add("missing", std::numeric_limits<double>::quiet_NaN());
  const json::Value parsed = json::parse(record.json(), "record");
  ASSERT_TRUE(parsed.is_object());
  const auto members = parsed.members();
  ASSERT_EQ(members.size(), 4u);
  EXPECT_EQ(members[0].first, "part");
  EXPECT_EQ(parsed.at("part", "record").as_string("part"), "routing \"quoted\"\n");
  EXPECT_NEAR(parsed.at("ms", "record").as_double("ms"), finite, std::abs(finite) * 1e-5);
  EXPECT_TRUE(parsed.at("ratio", "record").is_null());
  EXPECT_TRUE(parsed.at("missing", "record").is_null());
}

}  // namespace
}  // namespace switchyard
