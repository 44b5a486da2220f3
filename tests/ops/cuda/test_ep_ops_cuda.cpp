// The CUDA expert-parallel row moves (src/ops/cuda/ep_permute.cu) against the CPU reference
// (src/ops/cpu/ep_permute.cpp) on identical inputs. Everything is a copy or integer arithmetic,
// so results must match bit for bit: the layout integers, every moved row, the zeroed padding
// and the rows the ops must leave alone (poisoned on both sides before each call). Widths cover
// the 16-, 4-, 2- and 1-byte copy paths; shapes cover many ranks, many experts and empty segments.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "src/ops/ep_ops.h"
#include "src/core/device.h"
#include "tests/support/cuda_test_support.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

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
    const int64_t ints = segments + (segments + 1) + experts + (experts + 1) + segments + (experts + chunks);
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
    layout.packed_starts = take({int64_t(ranks) * experts + 1});
    layout.expert_totals = take({experts});
    layout.expert_offsets = take({experts + 1});
    layout.segment_rows = take({ranks, experts});
    layout.chunk_offsets = take({experts + chunks});
    return layout;
  }
  void compute() {
    cpu::ep_receive_layout(host);
    cuda::ep_receive_layout(device, nullptr);
    device_synchronize(DeviceKind::cuda);
  }
  int64_t received() const { return host.packed_starts.as<int32_t>()[int64_t(ranks) * experts]; }
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
  const char* names[] = {"packed_starts", "expert_totals", "expert_offsets", "segment_rows", "chunk_offsets"};
  const Tensor* host_tensors[] = {&layout.host.packed_starts, &layout.host.expert_totals, &layout.host.expert_offsets,
                                  &layout.host.segment_rows, &layout.host.chunk_offsets};
  const Tensor* device_tensors[] = {&layout.device.packed_starts, &layout.device.expert_totals,
                                    &layout.device.expert_offsets, &layout.device.segment_rows,
                                    &layout.device.chunk_offsets};
  for (int index = 0; index < 5; ++index)
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

struct MoveCase {
  DType dtype;
  int64_t width;
  int ranks, experts, chunks, alignment;
  bool wrong_hint;  // expected_rows = 1: the launch is undersized, the result must not change
};

std::string move_case_name(const ::testing::TestParamInfo<MoveCase>& info) {
  const MoveCase& test = info.param;
  return std::string(dtype_name(test.dtype)) + "_D" + std::to_string(test.width) + "_P" + std::to_string(test.ranks) +
         "_L" + std::to_string(test.experts) + "_C" + std::to_string(test.chunks) + "_A" +
         std::to_string(test.alignment) + (test.wrong_hint ? "_wrong_hint" : "");
}

class EpMovesCuda : public ::testing::TestWithParam<MoveCase> {};

TEST_P(EpMovesCuda, ChunkedMovesMatchReferenceBitForBit) {
  SKIP_WITHOUT_CUDA();
  const MoveCase& test = GetParam();
  std::mt19937_64 generator(uint64_t(test.width) * 31 + uint64_t(test.ranks));
  LayoutPair layout(test.ranks, test.experts, test.chunks, test.alignment,
                    random_counts(generator, test.ranks, test.experts, 12));
  layout.compute();
  const int64_t received = layout.received(), rows = layout.rows(), width = test.width;

  // Packed rows of random bytes (+1 spare row each side: the ops must not touch it).
  HostTensor packed(test.dtype, {received + 1, width});
  for (size_t byte = 0; byte < packed.tensor().bytes(); ++byte)
    static_cast<unsigned char*>(packed.tensor().data)[byte] = static_cast<unsigned char>(generator());
  Buffer packed_device(DeviceKind::cuda, packed.tensor().bytes());
  device_copy(packed_device.data(), DeviceKind::cuda, packed.tensor().data, DeviceKind::cpu, packed.tensor().bytes());
  Tensor packed_on_device(packed_device.data(), test.dtype, DeviceKind::cuda, {received + 1, width});

  HostTensor padded(test.dtype, {rows + 1, width}), back(test.dtype, {received + 1, width});
  std::memset(padded.tensor().data, 0x5A, padded.tensor().bytes());
  std::memset(back.tensor().data, 0x5A, back.tensor().bytes());
  Buffer padded_device(DeviceKind::cuda, padded.tensor().bytes()), back_device(DeviceKind::cuda, back.tensor().bytes());
  device_memset(padded_device.data(), DeviceKind::cuda, 0x5A, padded_device.bytes());
  device_memset(back_device.data(), DeviceKind::cuda, 0x5A, back_device.bytes());
  Tensor padded_on_device(padded_device.data(), test.dtype, DeviceKind::cuda, {rows + 1, width});
  Tensor back_on_device(back_device.data(), test.dtype, DeviceKind::cuda, {received + 1, width});

  for (int chunk = 0; chunk < test.chunks; ++chunk) {
    const int first = ep_chunk_first_expert(chunk, test.chunks, test.experts);
    const int end = ep_chunk_first_expert(chunk + 1, test.chunks, test.experts);
    const int64_t hint = test.wrong_hint ? 1 : layout.offset(end) - layout.offset(first);
    cpu::ep_to_expert_layout(packed, layout.host, first, end, hint, padded);
    cuda::ep_to_expert_layout(packed_on_device, layout.device, first, end, hint, padded_on_device, nullptr);
    cpu::ep_from_expert_layout(padded, layout.host, first, end, hint, back);
    cuda::ep_from_expert_layout(padded_on_device, layout.device, first, end, hint, back_on_device, nullptr);
    device_synchronize(DeviceKind::cuda);
    EXPECT_EQ(bytes_of(padded_on_device), bytes_of(padded)) << "padded rows after chunk " << chunk;
    EXPECT_EQ(bytes_of(back_on_device), bytes_of(back)) << "packed rows after chunk " << chunk;
  }
  // And the round trip restored every received row (the spare row keeps its poison).
  const size_t data_bytes = size_t(received * width) * dtype_size(test.dtype);
  EXPECT_EQ(std::memcmp(back.tensor().data, packed.tensor().data, data_bytes), 0);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, EpMovesCuda,
    ::testing::Values(MoveCase{DType::bf16, 768, 4, 8, 2, 128, false},   // 16-byte packs
                      MoveCase{DType::bf16, 64, 8, 2, 1, 8, false},
                      MoveCase{DType::f32, 13, 3, 5, 5, 4, false},      // 4-byte units
                      MoveCase{DType::bf16, 7, 2, 3, 3, 1, false},      // 2-byte units
                      MoveCase{DType::u8, 5, 5, 4, 2, 16, false},       // 1-byte units
                      MoveCase{DType::f64, 3, 16, 16, 4, 128, false},
                      MoveCase{DType::bf16, 768, 4, 8, 4, 128, true}),  // undersized launch
    move_case_name);

TEST(EpOpsCuda, RejectsBadArguments) {
  SKIP_WITHOUT_CUDA();
  LayoutPair layout(2, 2, 2, 4, {1, 2, 3, 0});
  layout.compute();
  Buffer memory(DeviceKind::cuda, 64 * 8);
  Tensor packed(memory.data(), DType::bf16, DeviceKind::cuda, {6, 8});
  Tensor padded(memory.data(), DType::bf16, DeviceKind::cuda, {12, 8});
  Tensor wrong_dtype(memory.data(), DType::f32, DeviceKind::cuda, {12, 8});
  Tensor on_host(memory.data(), DType::bf16, DeviceKind::cpu, {12, 8});
  EXPECT_THROW(cuda::ep_to_expert_layout(packed, layout.device, 1, 3, 1, padded, nullptr), Error);
  EXPECT_THROW(cuda::ep_to_expert_layout(packed, layout.device, 0, 2, 1, wrong_dtype, nullptr), Error);
  EXPECT_THROW(cuda::ep_from_expert_layout(on_host, layout.device, 0, 2, 1, packed, nullptr), Error);
  EXPECT_THROW(cuda::ep_receive_layout(layout.host, nullptr), Error);  // host tensors
}

}  // namespace
