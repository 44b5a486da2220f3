// The CUDA expert-parallel layout ops (kernels/cuda/ep_permute.cu) against the CPU reference
// (kernels/cpu/ep_permute.cpp) on identical inputs. Everything is integer arithmetic or zeroing,
// so results must match bit for bit: the layout integers, the zeroed padding rows and every row
// the ops must leave alone (random bytes on both sides before each call). Widths cover the 16-,
// 4-, 2- and 1-byte store paths; shapes cover many ranks, many experts and empty segments.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/ep_ops.h"
#include "src/core/device.h"
#include "tests/unit/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

#define SKIP_WITHOUT_CUDA()                                  \
  do {                                                       \
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

// Raw bytes of a tensor on either side.
std::vector<unsigned char> bytes_of(const Tensor& tensor) {
  std::vector<unsigned char> bytes(tensor.bytes());
  if (!bytes.empty()) device_copy(bytes.data(), DeviceKind::cpu, tensor.data, tensor.device, bytes.size());
  return bytes;
}

// The same layout twice: host tensors for the reference, device tensors for CUDA.
struct LayoutPair {
  int ranks, experts, chunks, alignment;
  Buffer host_memory, device_memory;
  EpReceiveLayout host, device;

  LayoutPair(int ranks_, int experts_, int chunks_, int alignment_, const std::vector<int32_t>& counts)
      : ranks(ranks_), experts(experts_), chunks(chunks_), alignment(alignment_) {
    const int64_t segments = int64_t(ranks) * experts;
    const int64_t ints = segments + experts + (experts + 1) + (experts + chunks);
    host_memory = Buffer(DeviceKind::cpu, size_t(ints) * 4);
    device_memory = Buffer(DeviceKind::cuda, size_t(ints) * 4);
    std::memset(host_memory.data(), 0xA5, host_memory.bytes());  // poison: no output may keep it
    device_memset(device_memory.data(), DeviceKind::cuda, 0xA5, device_memory.bytes());
    host = make(host_memory, DeviceKind::cpu);
    device = make(device_memory, DeviceKind::cuda);
    std::memcpy(host.recv_counts.data, counts.data(), counts.size() * 4);
    device_copy(device.recv_counts.data, DeviceKind::cuda, counts.data(), DeviceKind::cpu, counts.size() * 4);
  }
  EpReceiveLayout make(const Buffer& memory, DeviceKind kind) const {
    int32_t* cursor = memory.as<int32_t>();
    auto take = [&](std::initializer_list<int64_t> dims) {
      Tensor tensor(cursor, DType::i32, kind, dims);
      cursor += tensor.numel();
      return tensor;
    };
    EpReceiveLayout layout;
    layout.num_ranks = ranks;
    layout.local_experts = experts;
    layout.chunks = chunks;
    layout.alignment = alignment;
    layout.recv_counts = take({ranks, experts});
    layout.expert_totals = take({experts});
    layout.expert_offsets = take({experts + 1});
    layout.chunk_offsets = take({experts + chunks});
    return layout;
  }
  void compute() {
    cpu::ep_receive_layout(host);
    cuda::ep_receive_layout(device, nullptr);
    device_synchronize(DeviceKind::cuda);
  }
  int64_t rows() const { return host.expert_offsets.as<int32_t>()[experts]; }
  int64_t offset(int expert) const { return host.expert_offsets.as<int32_t>()[expert]; }
};

std::vector<int32_t> random_counts(std::mt19937_64& generator, int ranks, int experts, int max_count) {
  std::uniform_int_distribution<int> count(0, max_count), coin(0, 4);
  std::vector<int32_t> counts(size_t(ranks) * size_t(experts));
  for (int32_t& value : counts) value = coin(generator) == 0 ? 0 : count(generator);
  if (ranks > 1)
    for (int expert = 0; expert < experts; ++expert) counts[size_t(expert)] = 0;  // source 0 sends nothing
  if (experts > 1)
    for (int rank = 0; rank < ranks; ++rank) counts[size_t(rank) * size_t(experts) + size_t(experts - 1)] = 0;
  return counts;
}

struct LayoutCase {
  int ranks, experts, chunks, alignment;
};

class EpLayoutCuda : public ::testing::TestWithParam<LayoutCase> {};

TEST_P(EpLayoutCuda, MatchesReference) {
  SKIP_WITHOUT_CUDA();
  const LayoutCase& test = GetParam();
  std::mt19937_64 generator(uint64_t(test.ranks) * 1000 + uint64_t(test.experts) * 10 + uint64_t(test.chunks));
  LayoutPair layout(test.ranks, test.experts, test.chunks, test.alignment,
                    random_counts(generator, test.ranks, test.experts, 40));
  layout.compute();
  const char* names[] = {"expert_totals", "expert_offsets", "chunk_offsets"};
  const Tensor* host_tensors[] = {&layout.host.expert_totals, &layout.host.expert_offsets, &layout.host.chunk_offsets};
  const Tensor* device_tensors[] = {&layout.device.expert_totals, &layout.device.expert_offsets,
                                    &layout.device.chunk_offsets};
  for (int index = 0; index < 3; ++index)
    EXPECT_EQ(bytes_of(*device_tensors[index]), bytes_of(*host_tensors[index])) << names[index];
}

INSTANTIATE_TEST_SUITE_P(Shapes, EpLayoutCuda,
                         ::testing::Values(LayoutCase{1, 1, 1, 1}, LayoutCase{2, 4, 2, 128}, LayoutCase{3, 5, 5, 8},
                                           LayoutCase{8, 16, 3, 128}, LayoutCase{64, 32, 7, 128},
                                           LayoutCase{1024, 4, 4, 1}, LayoutCase{4, 1024, 9, 64}));

TEST(EpOpsCuda, SendCountsMatchReference) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 generator(3);
  for (int experts : {1, 8, 300}) {
    std::vector<int32_t> offsets(size_t(experts) + 1, 0);
    for (int expert = 0; expert < experts; ++expert)
      offsets[size_t(expert) + 1] = offsets[size_t(expert)] + int32_t(generator() % 50);
    Tensor host_offsets(offsets.data(), DType::i32, DeviceKind::cpu, {experts + 1});
    HostTensor expected(DType::i32, {experts});
    cpu::ep_send_counts(host_offsets, expected);
    Buffer device_offsets(DeviceKind::cuda, offsets.size() * 4), device_counts(DeviceKind::cuda, size_t(experts) * 4);
    device_copy(device_offsets.data(), DeviceKind::cuda, offsets.data(), DeviceKind::cpu, offsets.size() * 4);
    device_memset(device_counts.data(), DeviceKind::cuda, 0xA5, device_counts.bytes());
    Tensor counts = device_counts.view(DType::i32, {experts});
    cuda::ep_send_counts(device_offsets.view(DType::i32, {experts + 1}), counts, nullptr);
    device_synchronize(DeviceKind::cuda);
    EXPECT_EQ(bytes_of(counts), bytes_of(expected)) << experts << " experts";
  }
}

struct ZeroCase {
  DType dtype;
  int64_t width;
  int ranks, experts, chunks, alignment;
  bool misaligned;  // the tensor starts one element into its buffer: narrower stores
};

std::string zero_case_name(const ::testing::TestParamInfo<ZeroCase>& info) {
  const ZeroCase& test = info.param;
  return std::string(dtype_name(test.dtype)) + "_D" + std::to_string(test.width) + "_P" + std::to_string(test.ranks) +
         "_L" + std::to_string(test.experts) + "_C" + std::to_string(test.chunks) + "_A" +
         std::to_string(test.alignment) + (test.misaligned ? "_misaligned" : "");
}

class EpZeroPaddingCuda : public ::testing::TestWithParam<ZeroCase> {};

TEST_P(EpZeroPaddingCuda, ChunkedZeroingMatchesReferenceBitForBit) {
  SKIP_WITHOUT_CUDA();
  const ZeroCase& test = GetParam();
  std::mt19937_64 generator(uint64_t(test.width) * 31 + uint64_t(test.ranks));
  LayoutPair layout(test.ranks, test.experts, test.chunks, test.alignment,
                    random_counts(generator, test.ranks, test.experts, 12));
  layout.compute();
  const int64_t rows = layout.rows() + 1, width = test.width;  // one spare row: must keep its bytes
  const int64_t lead = test.misaligned ? 1 : 0;
  const size_t element = dtype_size(test.dtype), bytes = size_t((rows * width + lead)) * element;

  // Random bytes everywhere (no all-zero rows), the same on both sides.
  std::vector<unsigned char> host(bytes);
  for (unsigned char& byte : host) byte = static_cast<unsigned char>(1 + generator() % 255);
  Buffer device_memory(DeviceKind::cuda, bytes);
  device_copy(device_memory.data(), DeviceKind::cuda, host.data(), DeviceKind::cpu, bytes);
  Tensor on_host(host.data() + lead * element, test.dtype, DeviceKind::cpu, {rows, width});
  Tensor on_device(static_cast<char*>(device_memory.data()) + lead * element, test.dtype, DeviceKind::cuda,
                   {rows, width});

  for (int chunk = 0; chunk < test.chunks; ++chunk) {
    const int first = ep_chunk_first_expert(chunk, test.chunks, test.experts);
    const int end = ep_chunk_first_expert(chunk + 1, test.chunks, test.experts);
    cpu::ep_zero_padding(layout.host, first, end, on_host);
    cuda::ep_zero_padding(layout.device, first, end, on_device, nullptr);
    device_synchronize(DeviceKind::cuda);
    std::vector<unsigned char> result(bytes);
    device_copy(result.data(), DeviceKind::cpu, device_memory.data(), DeviceKind::cuda, bytes);
    EXPECT_EQ(result, host) << "rows after chunk " << chunk;
  }
  // The reference did zero something where the layout has padding (the test can fail).
  bool any_zero_row = false;
  for (int64_t row = 0; row < rows && !any_zero_row; ++row) {
    bool zero = true;
    for (size_t byte = 0; byte < size_t(width) * element; ++byte)
      zero = zero && host[size_t(lead) * element + size_t(row * width) * element + byte] == 0;
    any_zero_row = zero;
  }
  int64_t padding_rows = 0;
  for (int expert = 0; expert < test.experts; ++expert)
    padding_rows += layout.offset(expert + 1) - layout.offset(expert) - layout.host.expert_totals.as<int32_t>()[expert];
  EXPECT_EQ(any_zero_row, padding_rows > 0);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, EpZeroPaddingCuda,
    ::testing::Values(ZeroCase{DType::bf16, 768, 4, 8, 2, 128, false},   // 16-byte stores
                      ZeroCase{DType::bf16, 64, 8, 2, 1, 8, false},
                      ZeroCase{DType::f32, 13, 3, 5, 5, 4, false},      // 4-byte stores
                      ZeroCase{DType::bf16, 7, 2, 3, 3, 16, false},     // 2-byte stores
                      ZeroCase{DType::u8, 5, 5, 4, 2, 16, false},       // 1-byte stores
                      ZeroCase{DType::bf16, 768, 4, 8, 4, 128, true},   // misaligned base: 2-byte stores
                      ZeroCase{DType::f64, 3, 16, 16, 4, 128, false},
                      ZeroCase{DType::f32, 16, 3, 4, 2, 1, false}),     // no padding at all
    zero_case_name);

TEST(EpOpsCuda, RejectsBadArguments) {
  SKIP_WITHOUT_CUDA();
  LayoutPair layout(2, 2, 2, 4, {1, 2, 3, 0});
  layout.compute();
  Buffer memory(DeviceKind::cuda, 64 * 8);
  Tensor padded(memory.data(), DType::bf16, DeviceKind::cuda, {12, 8});
  Tensor flat(memory.data(), DType::bf16, DeviceKind::cuda, {96});
  Tensor on_host(memory.data(), DType::bf16, DeviceKind::cpu, {12, 8});
  EXPECT_THROW(cuda::ep_zero_padding(layout.device, 1, 3, padded, nullptr), Error);  // past L
  EXPECT_THROW(cuda::ep_zero_padding(layout.device, 1, 0, padded, nullptr), Error);  // reversed
  EXPECT_THROW(cuda::ep_zero_padding(layout.device, 0, 2, flat, nullptr), Error);    // not [R, D]
  EXPECT_THROW(cuda::ep_zero_padding(layout.device, 0, 2, on_host, nullptr), Error);
  EXPECT_THROW(cuda::ep_zero_padding(layout.host, 0, 2, padded, nullptr), Error);    // host layout
  EXPECT_THROW(cuda::ep_receive_layout(layout.host, nullptr), Error);                // host tensors
}

}  // namespace
