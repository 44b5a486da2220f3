// HostReads (src/ops/host_reads.h) on a GPU: tensors of several dtypes and odd sizes, read into
// poisoned host memory through the one staging buffer, arrive bit for bit; a second, larger set
// regrows the staging buffers.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "src/ops/host_reads.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

TEST(HostReadsCuda, ManySmallTensorsArriveBitForBit) {
  SKIP_WITHOUT_CUDA();
  const ExecContext context{DeviceKind::cuda, nullptr};
  std::mt19937_64 generator(12);
  HostReads reads(DeviceKind::cuda);
  for (int round = 0; round < 2; ++round) {  // the second round is larger: the staging regrows
    const int count = round == 0 ? 5 : 19;
    std::vector<HostTensor> sources, destinations;
    std::vector<DeviceTensor> devices;
    for (int index = 0; index < count; ++index) {
      const DType dtype = index % 3 == 0 ? DType::f32 : index % 3 == 1 ? DType::i32 : DType::f64;
      const int64_t elements = 1 + (index * 7 + round * 13) % 37;  // odd sizes: unaligned ends
      sources.emplace_back(dtype, std::initializer_list<int64_t>{elements});
      fill_uniform(sources.back(), generator, -1000, 1000);
      destinations.emplace_back(dtype, std::initializer_list<int64_t>{elements});
      poison(destinations.back());
      devices.push_back(to_device(sources.back()));
    }
    for (int index = 0; index < count; ++index) reads.add(devices[size_t(index)], destinations[size_t(index)]);
    reads.read(context);
    EXPECT_EQ(reads.pending(), 0u);
    for (int index = 0; index < count; ++index)
      EXPECT_EQ(std::memcmp(destinations[size_t(index)].tensor().data, sources[size_t(index)].tensor().data,
                            sources[size_t(index)].tensor().bytes()),
                0)
          << "round " << round << ", tensor " << index;
  }
}

}  // namespace
