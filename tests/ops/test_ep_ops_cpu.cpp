// The CPU reference of the expert-parallel row moves (src/ops/ep_ops.h) against an independent
// enumeration written here: packed rows numbered source-major, padded rows numbered expert by
// expert with the alignment applied, row by row. Random counts include empty sources, empty
// experts and empty (source, expert) segments; outputs are poisoned before every call.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "src/ops/ep_ops.h"
#include "tests/support/ep_host_layout.h"
#include "tests/support/test_helpers.h"

using namespace switchyard;
using namespace switchyard::testing;

namespace {


// The layout written out by enumeration: padded row of every packed row, padding rows, totals.
struct Expected {
  std::vector<int64_t> padded_of_packed;  // [N]
  std::vector<int> expert_of_packed;      // [N]
  std::vector<int64_t> expert_offsets;    // [L + 1]
  std::vector<bool> is_padding;           // [R]
  int64_t received = 0, rows = 0;
};

Expected enumerate(int ranks, int experts, int alignment, const std::vector<int32_t>& counts) {
  Expected expected;
  // Packed: source-major. Remember each packed row's (rank, expert, index).
  struct Origin { int rank, expert, index; };
  std::vector<Origin> origins;
  for (int rank = 0; rank < ranks; ++rank)
    for (int expert = 0; expert < experts; ++expert)
      for (int index = 0; index < counts[size_t(rank * experts + expert)]; ++index)
        origins.push_back({rank, expert, index});
  expected.received = int64_t(origins.size());
  // Padded: expert by expert, sources in order, then padding up to the alignment.
  std::vector<std::vector<int64_t>> first_row(size_t(ranks), std::vector<int64_t>(size_t(experts), -1));
  int64_t row = 0;
  expected.expert_offsets.push_back(0);
  for (int expert = 0; expert < experts; ++expert) {
    const int64_t start = row;
    for (int rank = 0; rank < ranks; ++rank) {
      first_row[size_t(rank)][size_t(expert)] = row;
      for (int index = 0; index < counts[size_t(rank * experts + expert)]; ++index) {
        expected.is_padding.push_back(false);
        ++row;
      }
    }
    while ((row - start) % alignment != 0) {
      expected.is_padding.push_back(true);
      ++row;
    }
    expected.expert_offsets.push_back(row);
  }
  expected.rows = row;
  for (const Origin& origin : origins) {
    expected.padded_of_packed.push_back(first_row[size_t(origin.rank)][size_t(origin.expert)] + origin.index);
    expected.expert_of_packed.push_back(origin.expert);
  }
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

bool row_is_poison(const Tensor& tensor, int64_t row) {
  const int64_t width = tensor.dim(1);
  for (int64_t column = 0; column < width; ++column)
    if (!std::isnan(get_element(tensor, row * width + column))) return false;
  return true;
}

bool rows_equal(const Tensor& left, int64_t left_row, const Tensor& right, int64_t right_row) {
  const size_t row_bytes = size_t(left.dim(1)) * dtype_size(left.dtype);
  return std::memcmp(static_cast<const char*>(left.data) + size_t(left_row) * row_bytes,
                     static_cast<const char*>(right.data) + size_t(right_row) * row_bytes, row_bytes) == 0;
}

bool row_is_zero(const Tensor& tensor, int64_t row) {
  const size_t row_bytes = size_t(tensor.dim(1)) * dtype_size(tensor.dtype);
  const char* base = static_cast<const char*>(tensor.data) + size_t(row) * row_bytes;
  for (size_t byte = 0; byte < row_bytes; ++byte)
    if (base[byte] != 0) return false;
  return true;
}

TEST(EpOpsCpu, HandWorkedLayout) {
  // P = 2, L = 2, A = 4, C = 2; counts [[3, 0], [1, 2]]: expert 0 gets 3 + 1 rows (padded to 4),
  // expert 1 gets 0 + 2 (rows 4, 5; 6, 7 pad), so (1, 1) starts at row 4 like the empty (0, 1).
  HostLayout host(2, 2, 2, 4, {3, 0, 1, 2});
  cpu::ep_receive_layout(host.layout);
  EXPECT_EQ(to_vector(host.packed_starts), (std::vector<double>{0, 3, 3, 4, 6}));
  EXPECT_EQ(to_vector(host.expert_totals), (std::vector<double>{4, 2}));
  EXPECT_EQ(to_vector(host.expert_offsets), (std::vector<double>{0, 4, 8}));
  EXPECT_EQ(to_vector(host.segment_rows), (std::vector<double>{0, 4, 3, 4}));
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
          EXPECT_EQ(host.packed_starts.data<int32_t>()[ranks * experts], expected.received);
          // Chunk c's relative offsets start at 0 and rise by the chunk's segments.
          for (int chunk = 0; chunk < chunks; ++chunk) {
            const int first = ep_chunk_first_expert(chunk, chunks, experts);
            const int end = ep_chunk_first_expert(chunk + 1, chunks, experts);
            ASSERT_LT(first, end);
            for (int expert = first; expert <= end; ++expert)
              EXPECT_EQ(host.chunk_offsets.data<int32_t>()[expert + chunk],
                        expected.expert_offsets[size_t(expert)] - expected.expert_offsets[size_t(first)]);
          }
          // Every packed row's segment start and padded row agree with the enumeration.
          int64_t packed_row = 0;
          for (int rank = 0; rank < ranks; ++rank) {
            for (int expert = 0; expert < experts; ++expert) {
              const int segment = rank * experts + expert;
              EXPECT_EQ(host.packed_starts.data<int32_t>()[segment], packed_row);
              if (counts[size_t(segment)] > 0)
                EXPECT_EQ(host.segment_rows.data<int32_t>()[segment], expected.padded_of_packed[size_t(packed_row)]);
              packed_row += counts[size_t(segment)];
            }
          }
        }
      }
    }
  }
}

class EpRowMoves : public ::testing::TestWithParam<DType> {};

TEST_P(EpRowMoves, ChunkedMovesMatchEnumerationAndRoundTrip) {
  const DType dtype = GetParam();
  std::mt19937_64 generator(7 + int(dtype));
  for (int trial = 0; trial < 12; ++trial) {
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

    // Two spare rows on each side: the ops must leave rows beyond the layout alone.
    HostTensor packed(dtype, {expected.received + 2, width});
    fill_uniform(packed.tensor(), generator, -2.0, 2.0);
    HostTensor padded(dtype, {expected.rows + 2, width});
    poison(padded.tensor());
    HostTensor back(dtype, {expected.received + 2, width});
    poison(back.tensor());

    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int first = ep_chunk_first_expert(chunk, chunks, experts);
      const int end = ep_chunk_first_expert(chunk + 1, chunks, experts);
      const int64_t chunk_rows = expected.expert_offsets[size_t(end)] - expected.expert_offsets[size_t(first)];
      cpu::ep_to_expert_layout(packed, host.layout, first, end, chunk_rows, padded);
      // Rows of later chunks are still poisoned.
      for (int64_t row = expected.expert_offsets[size_t(end)]; row < expected.rows + 2; ++row)
        EXPECT_TRUE(row_is_poison(padded, row)) << "row " << row << " written before its chunk";
      cpu::ep_from_expert_layout(padded, host.layout, first, end, chunk_rows, back);
      for (int64_t row = 0; row < expected.received; ++row) {
        const int expert = expected.expert_of_packed[size_t(row)];
        if (expert < end) EXPECT_TRUE(rows_equal(back, row, packed, row)) << "packed row " << row;
        else EXPECT_TRUE(row_is_poison(back, row)) << "packed row " << row << " of a later chunk was written";
      }
    }
    for (int64_t row = 0; row < expected.received; ++row)
      EXPECT_TRUE(rows_equal(padded, expected.padded_of_packed[size_t(row)], packed, row)) << "packed row " << row;
    for (int64_t row = 0; row < expected.rows; ++row)
      if (expected.is_padding[size_t(row)]) EXPECT_TRUE(row_is_zero(padded, row)) << "padding row " << row;
    for (int64_t row = expected.rows; row < expected.rows + 2; ++row) EXPECT_TRUE(row_is_poison(padded, row));
    for (int64_t row = expected.received; row < expected.received + 2; ++row) EXPECT_TRUE(row_is_poison(back, row));
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, EpRowMoves, ::testing::Values(DType::f32, DType::f64, DType::bf16),
                         [](const ::testing::TestParamInfo<DType>& info) { return std::string(dtype_name(info.param)); });

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
  HostLayout host(2, 3, 2, 4, {1, 2, 0, 0, 3, 1});
  cpu::ep_receive_layout(host.layout);
  HostTensor packed(DType::f32, {7, 4}), padded(DType::f32, {16, 4}), small_padded(DType::f32, {10, 4});
  std::mt19937_64 generator(1);
  fill_uniform(packed.tensor(), generator, -1, 1);
  EXPECT_NO_THROW(cpu::ep_to_expert_layout(packed, host.layout, 0, 3, 16, padded));
  EXPECT_THROW(cpu::ep_to_expert_layout(packed, host.layout, 2, 4, 0, padded), Error);        // past L
  EXPECT_THROW(cpu::ep_to_expert_layout(packed, host.layout, 2, 1, 0, padded), Error);        // reversed
  EXPECT_THROW(cpu::ep_to_expert_layout(packed, host.layout, 0, 3, 16, small_padded), Error);  // too few rows
  HostTensor short_packed(DType::f32, {6, 4}), other_dtype(DType::f64, {16, 4});
  EXPECT_THROW(cpu::ep_from_expert_layout(padded, host.layout, 0, 3, 16, short_packed), Error);
  EXPECT_THROW(cpu::ep_from_expert_layout(other_dtype, host.layout, 0, 3, 16, packed), Error);
  HostLayout too_many_chunks(1, 2, 3, 1, {1, 1});
  EXPECT_THROW(cpu::ep_receive_layout(too_many_chunks.layout), Error);
  HostLayout negative(1, 2, 1, 1, {1, -1});
  EXPECT_THROW(cpu::ep_receive_layout(negative.layout), Error);
}

}  // namespace
