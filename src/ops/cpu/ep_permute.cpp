// CPU reference of the expert-parallel row moves (semantics: src/ops/ep_ops.h).
//
// The reference walks the (source rank, local expert) segments directly: segment (p, l) holds
// recv_counts[p, l] rows, packed at packed_starts[p*L + l] and padded at segment_rows[p, l].
// The CUDA kernels instead map each padded row back to its segment by binary search; the two
// must agree bit for bit (rows are copied as bytes, padding is all-zero bytes).
#include <cstring>
#include <limits>
#include <string>

#include "src/ops/cpu/reference_util.h"
#include "src/ops/ep_ops.h"

namespace switchyard {

void validate_ep_receive_layout(const EpReceiveLayout& layout, DeviceKind device) {
  const int64_t ranks = layout.num_ranks, experts = layout.local_experts, chunks = layout.chunks;
  SY_CHECK(ranks >= 1, "ep layout: num_ranks must be >= 1, got ", ranks);
  SY_CHECK(experts >= 1, "ep layout: local_experts must be >= 1, got ", experts);
  SY_CHECK(chunks >= 1 && chunks <= experts, "ep layout: chunks must be in [1, local_experts=", experts, "], got ",
           chunks);
  SY_CHECK(layout.alignment >= 1, "ep layout: alignment must be >= 1, got ", layout.alignment);
  auto expect = [&](const char* name, const Tensor& tensor, std::initializer_list<int64_t> dims) {
    bool matches = tensor.device == device && tensor.dtype == DType::i32 && tensor.rank == int(dims.size()) &&
                   (tensor.data != nullptr || tensor.numel() == 0);
    int axis = 0;
    for (int64_t dim : dims) matches = matches && tensor.shape[axis++] == dim;
    SY_CHECK(matches, "ep layout: ", name, " must be i32", cpu::detail::shape_string(dims), " on ",
             device_kind_name(device), ", got ", tensor.describe());
  };
  expect("recv_counts", layout.recv_counts, {ranks, experts});
  expect("packed_starts", layout.packed_starts, {ranks * experts + 1});
  expect("expert_totals", layout.expert_totals, {experts});
  expect("expert_offsets", layout.expert_offsets, {experts + 1});
  expect("segment_rows", layout.segment_rows, {ranks, experts});
  expect("chunk_offsets", layout.chunk_offsets, {experts + chunks});
}

namespace cpu {
namespace {

void check_expert_range(const char* op, const EpReceiveLayout& layout, int first_expert, int end_expert) {
  SY_CHECK(first_expert >= 0 && first_expert <= end_expert && end_expert <= layout.local_experts, op,
           ": expert range [", first_expert, ", ", end_expert, ") is not within [0, ", layout.local_experts, ")");
}

// packed [N, D] and padded [R, D] of one dtype, with room for the rows the layout addresses.
void check_row_tensors(const char* op, const Tensor& packed, const Tensor& padded, const EpReceiveLayout& layout) {
  SY_CHECK(packed.device == DeviceKind::cpu && padded.device == DeviceKind::cpu && packed.rank == 2 &&
               padded.rank == 2 && packed.dtype == padded.dtype && packed.dim(1) == padded.dim(1) &&
               (packed.data || packed.numel() == 0) && (padded.data || padded.numel() == 0),
           op, ": packed and padded must be host [N, D] and [R, D] tensors of one dtype, got ", packed.describe(),
           " and ", padded.describe());
  const int64_t received = layout.packed_starts.as<int32_t>()[int64_t(layout.num_ranks) * layout.local_experts];
  const int64_t rows = layout.expert_offsets.as<int32_t>()[layout.local_experts];
  SY_CHECK(packed.dim(0) >= received, op, ": packed has ", packed.dim(0), " rows, the layout received ", received);
  SY_CHECK(padded.dim(0) >= rows, op, ": padded has ", padded.dim(0), " rows, the layout needs ", rows);
}

// Calls visit(packed_row, padded_row) for every data row of experts [first, end), then
// pad(padded_row) for every segment padding row of those experts.
template <typename Visit, typename Pad>
void for_each_row(const EpReceiveLayout& layout, int first_expert, int end_expert, Visit&& visit, Pad&& pad) {
  const int64_t experts = layout.local_experts;
  const int32_t* counts = layout.recv_counts.as<int32_t>();
  const int32_t* packed_starts = layout.packed_starts.as<int32_t>();
  const int32_t* segment_rows = layout.segment_rows.as<int32_t>();
  const int32_t* totals = layout.expert_totals.as<int32_t>();
  const int32_t* offsets = layout.expert_offsets.as<int32_t>();
  for (int64_t expert = first_expert; expert < end_expert; ++expert) {
    for (int64_t rank = 0; rank < layout.num_ranks; ++rank) {
      const int64_t segment = rank * experts + expert;
      for (int64_t index = 0; index < counts[segment]; ++index)
        visit(int64_t(packed_starts[segment]) + index, int64_t(segment_rows[segment]) + index);
    }
    for (int64_t row = int64_t(offsets[expert]) + totals[expert]; row < offsets[expert + 1]; ++row) pad(row);
  }
}

}  // namespace

void ep_send_counts(const Tensor& expert_offsets, Tensor& send_counts) {
  SY_CHECK(send_counts.rank == 1, "ep_send_counts: send_counts must be i32[E], got ", send_counts.describe());
  const int64_t experts = send_counts.dim(0);
  detail::expect_tensor("ep_send_counts", "expert_offsets", expert_offsets, DType::i32, {experts + 1});
  detail::expect_tensor("ep_send_counts", "send_counts", send_counts, DType::i32, {experts});
  const int32_t* offsets = expert_offsets.as<int32_t>();
  int32_t* counts = send_counts.as<int32_t>();
  SY_CHECK(offsets[0] == 0, "ep_send_counts: expert_offsets[0] must be 0, got ", offsets[0]);
  for (int64_t expert = 0; expert < experts; ++expert) {
    SY_CHECK(offsets[expert + 1] >= offsets[expert], "ep_send_counts: expert_offsets decrease at expert ", expert);
    counts[expert] = offsets[expert + 1] - offsets[expert];
  }
}

void ep_receive_layout(EpReceiveLayout& layout) {
  validate_ep_receive_layout(layout, DeviceKind::cpu);
  const int64_t ranks = layout.num_ranks, experts = layout.local_experts, alignment = layout.alignment;
  const int32_t* counts = layout.recv_counts.as<int32_t>();
  int32_t* packed_starts = layout.packed_starts.as<int32_t>();
  int32_t* totals = layout.expert_totals.as<int32_t>();
  int32_t* offsets = layout.expert_offsets.as<int32_t>();
  int32_t* segment_rows = layout.segment_rows.as<int32_t>();
  int32_t* chunk_offsets = layout.chunk_offsets.as<int32_t>();
  const int64_t int32_max = std::numeric_limits<int32_t>::max();

  int64_t running = 0;
  for (int64_t segment = 0; segment < ranks * experts; ++segment) {
    SY_CHECK(counts[segment] >= 0, "ep_receive_layout: negative count ", counts[segment], " from rank ",
             segment / experts, " for local expert ", segment % experts);
    packed_starts[segment] = int32_t(running);
    running += counts[segment];
    SY_CHECK(running <= int32_max, "ep_receive_layout: received rows exceed int32");
  }
  packed_starts[ranks * experts] = int32_t(running);

  int64_t padded = 0;
  offsets[0] = 0;
  for (int64_t expert = 0; expert < experts; ++expert) {
    int64_t row = padded, total = 0;
    for (int64_t rank = 0; rank < ranks; ++rank) {
      segment_rows[rank * experts + expert] = int32_t(row);
      row += counts[rank * experts + expert];
      total += counts[rank * experts + expert];
    }
    totals[expert] = int32_t(total);
    padded += round_up(total, alignment);
    SY_CHECK(padded <= int32_max, "ep_receive_layout: padded expert rows exceed int32");
    offsets[expert + 1] = int32_t(padded);
  }

  for (int chunk = 0; chunk < layout.chunks; ++chunk) {
    const int first = ep_chunk_first_expert(chunk, layout.chunks, layout.local_experts);
    const int end = ep_chunk_first_expert(chunk + 1, layout.chunks, layout.local_experts);
    for (int expert = first; expert <= end; ++expert)
      chunk_offsets[expert + chunk] = offsets[expert] - offsets[first];
  }
}

void ep_to_expert_layout(const Tensor& packed, const EpReceiveLayout& layout, int first_expert, int end_expert,
                         int64_t /*expected_rows*/, Tensor& padded) {
  const char* op = "ep_to_expert_layout";
  validate_ep_receive_layout(layout, DeviceKind::cpu);
  check_expert_range(op, layout, first_expert, end_expert);
  check_row_tensors(op, packed, padded, layout);
  const size_t row_bytes = size_t(packed.dim(1)) * dtype_size(packed.dtype);
  const char* source = static_cast<const char*>(packed.data);
  char* destination = static_cast<char*>(padded.data);
  for_each_row(
      layout, first_expert, end_expert,
      [&](int64_t packed_row, int64_t padded_row) {
        std::memcpy(destination + size_t(padded_row) * row_bytes, source + size_t(packed_row) * row_bytes, row_bytes);
      },
      [&](int64_t padded_row) { std::memset(destination + size_t(padded_row) * row_bytes, 0, row_bytes); });
}

void ep_from_expert_layout(const Tensor& padded, const EpReceiveLayout& layout, int first_expert, int end_expert,
                           int64_t /*expected_rows*/, Tensor& packed) {
  const char* op = "ep_from_expert_layout";
  validate_ep_receive_layout(layout, DeviceKind::cpu);
  check_expert_range(op, layout, first_expert, end_expert);
  check_row_tensors(op, packed, padded, layout);
  const size_t row_bytes = size_t(packed.dim(1)) * dtype_size(packed.dtype);
  const char* source = static_cast<const char*>(padded.data);
  char* destination = static_cast<char*>(packed.data);
  for_each_row(
      layout, first_expert, end_expert,
      [&](int64_t packed_row, int64_t padded_row) {
        std::memcpy(destination + size_t(packed_row) * row_bytes, source + size_t(padded_row) * row_bytes, row_bytes);
      },
      [](int64_t) {});
}

}  // namespace cpu
}  // namespace switchyard
