// HostReads (src/ops/host_reads.h) on the CPU: every pair arrives, the reads are forgotten after
// read(), and mismatched or misplaced tensors are refused when added.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "src/core/error.h"
#include "src/ops/host_reads.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

const ExecContext kCpu{DeviceKind::cpu, nullptr};

TEST(HostReads, EveryPairArrivesAndIsForgotten) {
  std::mt19937_64 generator(11);
  HostTensor floats(DType::f32, {5}), doubles(DType::f64, {3}), ints(DType::i32, {7});
  fill_uniform(floats, generator, -1, 1);
  fill_uniform(doubles, generator, -1, 1);
  fill_uniform(ints, generator, -100, 100);
  HostTensor float_out(DType::f32, {5}), double_out(DType::f64, {3}), int_out(DType::i32, {7});
  poison(float_out);
  poison(double_out);
  poison(int_out);
  HostReads reads(DeviceKind::cpu);
  reads.add(floats, float_out);
  reads.add(doubles, double_out);
  reads.add(ints, int_out);
  EXPECT_EQ(reads.pending(), 3u);
  reads.read(kCpu);
  EXPECT_EQ(reads.pending(), 0u);
  EXPECT_EQ(max_abs_difference(float_out, floats), 0.0);
  EXPECT_EQ(max_abs_difference(double_out, doubles), 0.0);
  EXPECT_EQ(max_abs_difference(int_out, ints), 0.0);
  reads.read(kCpu);  // nothing pending: a no-op
}

TEST(HostReads, RefusesMismatchedTensors) {
  HostTensor source(DType::f32, {4}), shorter(DType::f32, {3}), other_type(DType::i32, {4});
  HostReads reads(DeviceKind::cpu);
  EXPECT_THROW(reads.add(source, shorter), Error);
  EXPECT_THROW(reads.add(source, other_type), Error);
  HostReads cuda_reads(DeviceKind::cuda);  // a CPU tensor is not a source of CUDA reads
  EXPECT_THROW(cuda_reads.add(source, source), Error);
  EXPECT_EQ(reads.pending(), 0u);
}

// A read that throws forgets its list, and clear() forgets one that never ran: reads noted before
// an exception (their host destinations may be gone) never run later.
TEST(HostReads, NothingNotedBeforeAThrowRunsLater) {
  std::mt19937_64 generator(3);
  HostTensor source(DType::f32, {4}), destination(DType::f32, {4});
  fill_uniform(source, generator, -1, 1);
  poison(destination);
  HostReads reads(DeviceKind::cpu);
  reads.add(source, destination);
  const ExecContext wrong{DeviceKind::cuda, nullptr};
  EXPECT_THROW(reads.read(wrong), Error);
  EXPECT_EQ(reads.pending(), 0u);
  reads.add(source, destination);
  reads.clear();
  reads.read(kCpu);
  EXPECT_FALSE(all_finite(destination)) << "a cleared read ran";
}

}  // namespace
