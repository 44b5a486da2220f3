// The CPU reference of the expert-parallel layout ops (kernels/ep_ops.h) against an independent
// enumeration written here: padded rows numbered expert by expert, sources in order, with the
// alignment applied, row by row. Random counts include empty sources, empty experts and empty
// (source, expert) segments; outputs are poisoned before every call.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/ep_ops.h"
#include "tests/unit/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {

// A layout whose tensors live in host memory owned here.
struct HostLayout {
  HostTensor recv_counts, expert_totals, expert_offsets, chunk_offsets;
  EpReceiveLayout layout;

  HostLayout(int ranks, int experts, int chunks, int alignment, const std::vector<int32_t>& counts)
      : recv_counts(DType::i32, {ranks, experts}),
        expert_totals(DType::i32, {experts}),
        expert_offsets(DType::i32, {experts + 1}),
        chunk_offsets(DType::i32, {experts + chunks}) {
    layout.num_ranks = ranks;
    layout.local_experts = experts;
    layout.chunks = chunks;
    layout.alignment = alignment;
    layout.recv_counts = recv_counts;
    layout.expert_totals = expert_totals;
    layout.expert_offsets = expert_offsets;
    layout.chunk_offsets = chunk_offsets;
    std::copy(counts.begin(), counts.end(), recv_counts.data<int32_t>());
    for (HostTensor* output : {&expert_totals, &expert_offsets, &chunk_offsets}) poison(output->tensor());
  }
};

// The padded layout written out by enumeration.
struct Expected {
  std::vector<int64_t> expert_offsets;  // [L + 1]
  std::vector<int64_t> totals;          // [L]
  std::vector<int> expert_of_row;       // [R]
  std::vector<bool> is_padding;         // [R]
  int64_t rows = 0;
};

Expected enumerate(int ranks, int experts, int alignment, const std::vector<int32_t>& counts) {
  Expected expected;
  int64_t row = 0;
  expected.expert_offsets.push_back(0);
  for (int expert = 0; expert < experts; ++expert) {
    const int64_t start = row;
    for (int rank = 0; rank < ranks; ++rank) {
      for (int index = 0; index < counts[size_t(rank * experts + expert)]; ++index) {
        expected.is_padding.push_back(false);
        expected.expert_of_row.push_back(expert);
        ++row;
      }
    }
    expected.totals.push_back(row - start);
    while ((row - start) % alignment != 0) {
      expected.is_padding.push_back(true);
      expected.expert_of_row.push_back(expert);
      ++row;
    }
    expected.expert_offsets.push_back(row);
  }
  expected.rows = row;
  return expected;
}

std::vector<int32_t> random_counts(std::mt19937_64& generator, int ranks, int experts) {
  std::uniform_int_distribution<int> count(0, 6), coin(0, 3);
  std::vector<int32_t> counts(size_t(ranks * experts));
  for (int32_t& value : counts) value = coin(generator) == 0 ? 0 : count(generator);
  // An idle source and an idle expert when there is room for them.
  if (ranks > 1) {
    const int idle_rank = int(generator() % unsigned(ranks));
    for (int expert = 0; expert < experts; ++expert) counts[size_t(idle_rank * experts + expert)] = 0;
  }
  if (experts > 1) {
    const int idle_expert = int(generator() % unsigned(experts));
    for (int rank = 0; rank < ranks; ++rank) counts[size_t(rank * experts + idle_expert)] = 0;
  }
  return counts;
}

bool row_is_zero(const Tensor& tensor, int64_t row) {
  const size_t row_bytes = size_t(tensor.dim(1)) * dtype_size(tensor.dtype);
  const char* base = static_cast<const char*>(tensor.data) + size_t(row) * row_bytes;
  for (size_t byte = 0; byte < row_bytes; ++byte)
    if (base[byte] != 0) return false;
  return true;
}

bool rows_equal(const Tensor& left, const Tensor& right, int64_t row) {
  const size_t row_bytes = size_t(left.dim(1)) * dtype_size(left.dtype);
  return std::memcmp(static_cast<const char*>(left.data) + size_t(row) * row_bytes,
                     static_cast<const char*>(right.data) + size_t(row) * row_bytes, row_bytes) == 0;
}

TEST(EpOpsCpu, HandWorkedLayout) {
  // P = 2, L = 2, A = 4, C = 2; counts [[3, 0], [1, 2]]: expert 0 gets 3 + 1 rows (padded to 4),
  // expert 1 gets 0 + 2 (rows 4, 5; 6, 7 pad).
  HostLayout host(2, 2, 2, 4, {3, 0, 1, 2});
  cpu::ep_receive_layout(host.layout);
  EXPECT_EQ(to_vector(host.expert_totals), (std::vector<double>{4, 2}));
  EXPECT_EQ(to_vector(host.expert_offsets), (std::vector<double>{0, 4, 8}));
  EXPECT_EQ(to_vector(host.chunk_offsets), (std::vector<double>{0, 4, 0, 4}));
}

TEST(EpOpsCpu, LayoutMatchesEnumeration) {
  std::mt19937_64 generator(20261126);
  for (int ranks : {1, 3, 4}) {
    for (int experts : {1, 2, 5}) {
      for (int alignment : {1, 4, 128}) {
        for (int chunks = 1; chunks <= experts; ++chunks) {
          SCOPED_TRACE(::testing::Message() << "P=" << ranks << " L=" << experts << " A=" << alignment
                                            << " C=" << chunks);
          const std::vector<int32_t> counts = random_counts(generator, ranks, experts);
          HostLayout host(ranks, experts, chunks, alignment, counts);
          cpu::ep_receive_layout(host.layout);
          const Expected expected = enumerate(ranks, experts, alignment, counts);
          const int32_t* offsets = host.expert_offsets.data<int32_t>();
          for (int expert = 0; expert <= experts; ++expert)
            EXPECT_EQ(offsets[expert], expected.expert_offsets[size_t(expert)]) << "expert " << expert;
          for (int expert = 0; expert < experts; ++expert)
            EXPECT_EQ(host.expert_totals.data<int32_t>()[expert], expected.totals[size_t(expert)])
                << "expert " << expert;
          // Chunk c's relative offsets start at 0 and rise by the chunk's segments.
          for (int chunk = 0; chunk < chunks; ++chunk) {
            const int first = ep_chunk_first_expert(chunk, chunks, experts);
            const int end = ep_chunk_first_expert(chunk + 1, chunks, experts);
            ASSERT_LT(first, end);
            for (int expert = first; expert <= end; ++expert)
              EXPECT_EQ(host.chunk_offsets.data<int32_t>()[expert + chunk],
                        expected.expert_offsets[size_t(expert)] - expected.expert_offsets[size_t(first)]);
          }
        }
      }
    }
  }
}

class EpZeroPadding : public ::testing::TestWithParam<DType> {};

// Chunk by chunk: exactly the chunk's padding rows become zero; data rows, other chunks' padding
// and the spare rows past the layout keep their (random, non-zero) bytes.
TEST_P(EpZeroPadding, ZeroesExactlyThePaddingRowsOfTheRange) {
  const DType dtype = GetParam();
  std::mt19937_64 generator(7 + int(dtype));
  for (int trial = 0; trial < 16; ++trial) {
    const int ranks = 1 + int(generator() % 4), experts = 1 + int(generator() % 5);
    const int alignment = std::vector<int>{1, 3, 8}[generator() % 3];
    const int chunks = 1 + int(generator() % unsigned(experts));
    const int64_t width = 1 + int64_t(generator() % 9);
    SCOPED_TRACE(::testing::Message() << "trial " << trial << ": P=" << ranks << " L=" << experts
                                      << " A=" << alignment << " C=" << chunks << " D=" << width);
    const std::vector<int32_t> counts = random_counts(generator, ranks, experts);
    HostLayout host(ranks, experts, chunks, alignment, counts);
    cpu::ep_receive_layout(host.layout);
    const Expected expected = enumerate(ranks, experts, alignment, counts);

    HostTensor padded(dtype, {expected.rows + 2, width}), original(dtype, {expected.rows + 2, width});
    fill_uniform(padded.tensor(), generator, 0.5, 2.0);  // no zero byte patterns in any row
    std::memcpy(original.tensor().data, padded.tensor().data, padded.tensor().bytes());
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int first = ep_chunk_first_expert(chunk, chunks, experts);
      const int end = ep_chunk_first_expert(chunk + 1, chunks, experts);
      cpu::ep_zero_padding(host.layout, first, end, padded);
      for (int64_t row = 0; row < expected.rows + 2; ++row) {
        const bool zeroed = row < expected.rows && expected.is_padding[size_t(row)] &&
                            expected.expert_of_row[size_t(row)] < end;
        if (zeroed) EXPECT_TRUE(row_is_zero(padded, row)) << "padding row " << row << " after chunk " << chunk;
        else EXPECT_TRUE(rows_equal(padded, original, row)) << "row " << row << " changed after chunk " << chunk;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, EpZeroPadding, ::testing::Values(DType::f32, DType::f64, DType::bf16),
                         [](const ::testing::TestParamInfo<DType>& info) {
                           return std::string(dtype_name(info.param));
                         });

TEST(EpOpsCpu, SendCountsAreSegmentLengths) {
  HostTensor offsets(DType::i32, {7});
  const std::vector<int32_t> values{0, 4, 4, 9, 10, 10, 17};
  std::copy(values.begin(), values.end(), offsets.data<int32_t>());
  HostTensor counts(DType::i32, {6});
  poison(counts.tensor());
  cpu::ep_send_counts(offsets, counts);
  EXPECT_EQ(to_vector(counts), (std::vector<double>{4, 0, 5, 1, 0, 7}));
  offsets.data<int32_t>()[3] = 3;  // decreasing
  EXPECT_THROW(cpu::ep_send_counts(offsets, counts), Error);
}

TEST(EpOpsCpu, RejectsBadArguments) {
  HostLayout host(2, 3, 2, 4, {1, 2, 0, 0, 3, 1});  // totals 1, 5, 1: padded 4, 8, 4
  cpu::ep_receive_layout(host.layout);
  HostTensor padded(DType::f32, {16, 4}), small_padded(DType::f32, {10, 4}), flat(DType::f32, {16});
  std::mt19937_64 generator(1);
  fill_uniform(padded.tensor(), generator, -1, 1);
  EXPECT_NO_THROW(cpu::ep_zero_padding(host.layout, 0, 3, padded));
  EXPECT_NO_THROW(cpu::ep_zero_padding(host.layout, 0, 1, small_padded));        // expert 0 ends at row 4
  EXPECT_THROW(cpu::ep_zero_padding(host.layout, 0, 2, small_padded), Error);    // expert 1 ends at row 12
  EXPECT_THROW(cpu::ep_zero_padding(host.layout, 2, 4, padded), Error);          // past L
  EXPECT_THROW(cpu::ep_zero_padding(host.layout, 2, 1, padded), Error);          // reversed
  EXPECT_THROW(cpu::ep_zero_padding(host.layout, 0, 3, small_padded), Error);    // too few rows
  EXPECT_THROW(cpu::ep_zero_padding(host.layout, 0, 3, flat), Error);            // not [R, D]
  HostLayout too_many_chunks(1, 2, 3, 1, {1, 1});
  EXPECT_THROW(cpu::ep_receive_layout(too_many_chunks.layout), Error);
  HostLayout negative(1, 2, 1, 1, {1, -1});
  EXPECT_THROW(cpu::ep_receive_layout(negative.layout), Error);
}

}  // namespace
