#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "src/core/device.h"
#include "src/core/dtype.h"
#include "src/core/error.h"
#include "src/core/rng.h"

using namespace switchyard;

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(Bf16(1.0f).bits, 0x3f80);
  EXPECT_EQ(float(Bf16(1.0f)), 1.0f);
  // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to even (1.0).
  EXPECT_EQ(float(Bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_EQ(float(Bf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(float(Bf16(NAN))));
  EXPECT_TRUE(std::isinf(float(Bf16(INFINITY))));
}

TEST(DType, HalfMatchesIeeeOnRandomValues) {
  std::mt19937 generator(7);
  std::uniform_real_distribution<float> uniform(-70000.0f, 70000.0f);
  for (int i = 0; i < 20000; ++i) {
    float value = uniform(generator) * std::ldexp(1.0f, -int(i % 30));
    float rounded = float(Half(value));
    if (std::fabs(value) > 65504.0f + 16.0f) {
      EXPECT_TRUE(std::isinf(rounded));
      continue;
    }
    // The nearest half: relative error at most 2^-11 for normals, absolute 2^-25 for subnormals.
    EXPECT_LE(std::fabs(rounded - value), std::max(std::fabs(value) * std::ldexp(1.0f, -11), std::ldexp(1.0f, -25)))
        << value;
    EXPECT_EQ(Half(rounded).bits, Half(value).bits);  // idempotent
  }
  EXPECT_EQ(Half(65504.0f).bits, 0x7bff);
  EXPECT_EQ(Half::to_float(0x0001), std::ldexp(1.0f, -24));
}

TEST(Rng, PhiloxIsDeterministicAndUniform) {
  double sum = 0, sum_squares = 0;
  const int count = 100000;
  for (int i = 0; i < count; ++i) {
    float value = philox_uniform(1234, 3, 17, uint64_t(i));
    ASSERT_GE(value, 0.0f);
    ASSERT_LT(value, 1.0f);
    EXPECT_EQ(value, philox_uniform(1234, 3, 17, uint64_t(i)));
    sum += value;
    sum_squares += double(value) * value;
  }
  double mean = sum / count, variance = sum_squares / count - mean * mean;
  EXPECT_NEAR(mean, 0.5, 0.01);
  EXPECT_NEAR(variance, 1.0 / 12.0, 0.01);
  EXPECT_NE(philox_uniform(1234, 3, 17, 0), philox_uniform(1234, 3, 18, 0));
  EXPECT_NE(philox_uniform(1234, 3, 17, 0), philox_uniform(1235, 3, 17, 0));
  // Known-answer test from the Random123 reference (philox4x32-10, counter 0, key 0).
  PhiloxOutput known = philox4x32(0, 0, 0, 0, 0);
  EXPECT_EQ(known.value[0], 0x6627e8d5u);
  EXPECT_EQ(known.value[1], 0xe169c58du);
  EXPECT_EQ(known.value[2], 0xbc57ac4cu);
  EXPECT_EQ(known.value[3], 0x9b00dbd8u);
}

TEST(Error, CarriesLocationAndExitCode) {
  set_process_rank(3);
  try {
    SY_BAD_INPUT("key 'moe.num_experts' must be > 0");
    FAIL() << "no throw";
  } catch (const Error& error) {
    EXPECT_EQ(error.exit_code(), kExitBadInput);
    EXPECT_EQ(error.rank(), 3);
    EXPECT_NE(std::string(error.what()).find("rank 3"), std::string::npos);
    EXPECT_NE(std::string(error.what()).find("test_core.cpp"), std::string::npos);
    EXPECT_EQ(error.host(), process_host());
  }
  set_process_rank(-1);
}

TEST(Device, HostBufferCopyAndMemset) {
  Buffer buffer(DeviceKind::cpu, 1000);
  device_memset(buffer.data(), DeviceKind::cpu, 0x5a, 1000);
  EXPECT_EQ(buffer.as<unsigned char>()[999], 0x5a);
  Tensor view = buffer.view(DType::f32, {10, 25});
  EXPECT_EQ(view.numel(), 250);
  EXPECT_THROW(buffer.view(DType::f32, {10, 26}), Error);
}
