// CPU reference of the expert-parallel layout ops (semantics: kernels/ep_ops.h).
//
// The reference walks experts in order: the layout is a running sum of padded expert totals, and
// the padding of expert l is [offsets[l] + totals[l], offsets[l+1]). The CUDA kernels must agree
// bit for bit (integers; padding rows are all-zero bytes).
#include <cstring>
#include <limits>
#include <string>

#include "kernels/cpu/reference_util.h"
#include "kernels/ep_ops.h"

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
  expect("expert_totals", layout.expert_totals, {experts});
  expect("expert_offsets", layout.expert_offsets, {experts + 1});
  expect("chunk_offsets", layout.chunk_offsets, {experts + chunks});
}

namespace cpu {

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
  int32_t* totals = layout.expert_totals.as<int32_t>();
  int32_t* offsets = layout.expert_offsets.as<int32_t>();
  int32_t* chunk_offsets = layout.chunk_offsets.as<int32_t>();
  const int64_t int32_max = std::numeric_limits<int32_t>::max();

  int64_t padded = 0;
  offsets[0] = 0;
  for (int64_t expert = 0; expert < experts; ++expert) {
    int64_t total = 0;
    for (int64_t rank = 0; rank < ranks; ++rank) {
      const int32_t count = counts[rank * experts + expert];
      SY_CHECK(count >= 0, "ep_receive_layout: negative count ", count, " from rank ", rank, " for local expert ",
               expert);
      total += count;
    }
    SY_CHECK(total <= int32_max, "ep_receive_layout: rows of local expert ", expert, " exceed int32");
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

void ep_zero_padding(const EpReceiveLayout& layout, int first_expert, int end_expert, Tensor& padded) {
  validate_ep_receive_layout(layout, DeviceKind::cpu);
  SY_CHECK(first_expert >= 0 && first_expert <= end_expert && end_expert <= layout.local_experts,
           "ep_zero_padding: expert range [", first_expert, ", ", end_expert, ") is not within [0, ",
           layout.local_experts, ")");
  SY_CHECK(padded.device == DeviceKind::cpu && padded.rank == 2 && (padded.data || padded.numel() == 0),
           "ep_zero_padding: padded must be a host [R, D] tensor, got ", padded.describe());
  const int32_t* totals = layout.expert_totals.as<int32_t>();
  const int32_t* offsets = layout.expert_offsets.as<int32_t>();
  SY_CHECK(padded.dim(0) >= offsets[end_expert], "ep_zero_padding: padded has ", padded.dim(0),
           " rows, experts [", first_expert, ", ", end_expert, ") end at row ", offsets[end_expert]);
  const size_t row_bytes = size_t(padded.dim(1)) * dtype_size(padded.dtype);
  char* base = static_cast<char*>(padded.data);
  for (int expert = first_expert; expert < end_expert; ++expert) {
    const int64_t first_pad = int64_t(offsets[expert]) + totals[expert], end_pad = offsets[expert + 1];
    SY_CHECK(first_pad <= end_pad, "ep_zero_padding: local expert ", expert, " holds ", totals[expert],
             " rows in a segment of ", end_pad - offsets[expert]);
    if (end_pad > first_pad)
      std::memset(base + size_t(first_pad) * row_bytes, 0, size_t(end_pad - first_pad) * row_bytes);
  }
}

}  // namespace cpu
}  // namespace switchyard
