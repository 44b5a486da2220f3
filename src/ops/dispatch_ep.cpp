// Backend dispatch of the expert-parallel row moves (src/ops/ep_ops.h), the FP8 row packing of the
// FP8 dispatch (src/ops/fp8_rows.h) and the nvlink transport's direct peer row moves and signals
// (src/ops/ep_nvlink_ops.h); declared in src/ops/ops.h, rules in src/ops/dispatch.h.
#include "src/ops/dispatch.h"

namespace switchyard {
namespace ops {

using dispatch::expect_cuda_context;
using dispatch::expect_on_device;
using dispatch::is_cpu;

namespace {
void expect_layout_on_device(const ExecContext& context, const char* op, const EpReceiveLayout& layout) {
  expect_on_device(context, op,
                   {&layout.recv_counts, &layout.packed_starts, &layout.expert_totals, &layout.expert_offsets,
                    &layout.segment_rows, &layout.chunk_offsets});
}
}  // namespace

// ---- Expert-parallel row moves ----------------------------------------------------------------

void ep_send_counts(const ExecContext& context, const Tensor& expert_offsets, Tensor& send_counts) {
  expect_on_device(context, "ep_send_counts", {&expert_offsets, &send_counts});
  if (is_cpu(context)) return cpu::ep_send_counts(expert_offsets, send_counts);
  SY_CUDA_BACKEND("ep_send_counts", cuda::ep_send_counts(expert_offsets, send_counts, context.stream));
}

void ep_receive_layout(const ExecContext& context, EpReceiveLayout& layout) {
  expect_layout_on_device(context, "ep_receive_layout", layout);
  if (is_cpu(context)) return cpu::ep_receive_layout(layout);
  SY_CUDA_BACKEND("ep_receive_layout", cuda::ep_receive_layout(layout, context.stream));
}

void ep_to_expert_layout(const ExecContext& context, const Tensor& packed, const EpReceiveLayout& layout,
                         int first_expert, int end_expert, int64_t expected_rows, Tensor& padded) {
  expect_on_device(context, "ep_to_expert_layout", {&packed, &padded});
  expect_layout_on_device(context, "ep_to_expert_layout", layout);
  if (is_cpu(context))
    return cpu::ep_to_expert_layout(packed, layout, first_expert, end_expert, expected_rows, padded);
  SY_CUDA_BACKEND("ep_to_expert_layout", cuda::ep_to_expert_layout(packed, layout, first_expert, end_expert,
                                                                   expected_rows, padded, context.stream));
}

void ep_from_expert_layout(const ExecContext& context, const Tensor& padded, const EpReceiveLayout& layout,
                           int first_expert, int end_expert, int64_t expected_rows, Tensor& packed) {
  expect_on_device(context, "ep_from_expert_layout", {&padded, &packed});
  expect_layout_on_device(context, "ep_from_expert_layout", layout);
  if (is_cpu(context))
    return cpu::ep_from_expert_layout(padded, layout, first_expert, end_expert, expected_rows, packed);
  SY_CUDA_BACKEND("ep_from_expert_layout", cuda::ep_from_expert_layout(padded, layout, first_expert, end_expert,
                                                                       expected_rows, packed, context.stream));
}

// ---- Hierarchical exchange bookkeeping ---------------------------------------------------------

void ep_kept_choices(const ExecContext& context, const Tensor& ids, const Tensor& slots, const Tensor& scalars,
                     Tensor& kept_ids) {
  expect_on_device(context, "ep_kept_choices", {&ids, &slots, &scalars, &kept_ids});
  if (is_cpu(context)) return cpu::ep_kept_choices(ids, slots, scalars, kept_ids);
  SY_CUDA_BACKEND("ep_kept_choices", cuda::ep_kept_choices(ids, slots, scalars, kept_ids, context.stream));
}

void ep_choice_layout(const ExecContext& context, const Tensor& ids, int num_slots, Tensor& slots, Tensor& counts,
                      Tensor& offsets, Tensor& scalars) {
  expect_on_device(context, "ep_choice_layout", {&ids, &slots, &counts, &offsets, &scalars});
  if (is_cpu(context)) return cpu::ep_choice_layout(ids, num_slots, slots, counts, offsets, scalars);
  SY_CUDA_BACKEND("ep_choice_layout",
                  cuda::ep_choice_layout(ids, num_slots, slots, counts, offsets, scalars, context.stream));
}

void ep_map_choice_ids(const ExecContext& context, const Tensor& ids, const Tensor& expert_map, Tensor& mapped_ids) {
  expect_on_device(context, "ep_map_choice_ids", {&ids, &expert_map, &mapped_ids});
  if (is_cpu(context)) return cpu::ep_map_choice_ids(ids, expert_map, mapped_ids);
  SY_CUDA_BACKEND("ep_map_choice_ids", cuda::ep_map_choice_ids(ids, expert_map, mapped_ids, context.stream));
}

void ep_node_choices(const ExecContext& context, const Tensor& ids, const Tensor& slots, const Tensor& scalars, int experts_per_node,
                     int num_nodes, Tensor& node_ids) {
  expect_on_device(context, "ep_node_choices", {&ids, &slots, &scalars, &node_ids});
  if (is_cpu(context)) return cpu::ep_node_choices(ids, slots, scalars, experts_per_node, num_nodes, node_ids);
  SY_CUDA_BACKEND("ep_node_choices",
                  cuda::ep_node_choices(ids, slots, scalars, experts_per_node, num_nodes, node_ids, context.stream));
}

void ep_pack_node_choices(const ExecContext& context, const Tensor& ids, const Tensor& gates,
                          const Tensor& slots, const Tensor& scalars, const Tensor& node_ids, const Tensor& node_rows,
                          int experts_per_node, Tensor& meta_ids, Tensor& meta_gates) {
  expect_on_device(context, "ep_pack_node_choices",
                   {&ids, &gates, &slots, &scalars, &node_ids, &node_rows, &meta_ids, &meta_gates});
  if (is_cpu(context))
    return cpu::ep_pack_node_choices(ids, gates, slots, scalars, node_ids, node_rows, experts_per_node, meta_ids,
                                     meta_gates);
  SY_CUDA_BACKEND("ep_pack_node_choices", cuda::ep_pack_node_choices(ids, gates, slots, scalars, node_ids, node_rows,
                                                                     experts_per_node, meta_ids, meta_gates,
                                                                     context.stream));
}

void ep_unpack_node_gate_grads(const ExecContext& context, const Tensor& meta_grad_gates, const Tensor& ids,
                               const Tensor& slots, const Tensor& scalars, const Tensor& node_ids, const Tensor& node_rows,
                               int experts_per_node, Tensor& grad_gates) {
  expect_on_device(context, "ep_unpack_node_gate_grads",
                   {&meta_grad_gates, &ids, &slots, &scalars, &node_ids, &node_rows, &grad_gates});
  if (is_cpu(context))
    return cpu::ep_unpack_node_gate_grads(meta_grad_gates, ids, slots, scalars, node_ids, node_rows, experts_per_node,
                                          grad_gates);
  SY_CUDA_BACKEND("ep_unpack_node_gate_grads",
                  cuda::ep_unpack_node_gate_grads(meta_grad_gates, ids, slots, scalars, node_ids, node_rows,
                                                  experts_per_node, grad_gates, context.stream));
}

// ---- FP8 row packing ---------------------------------------------------------------------------

void quantize_rows_fp8(const ExecContext& context, const Tensor& rows, Tensor& packed) {
  expect_on_device(context, "quantize_rows_fp8", {&rows, &packed});
  if (is_cpu(context)) return cpu::quantize_rows_fp8(rows, packed);
  SY_CUDA_BACKEND("quantize_rows_fp8", cuda::quantize_rows_fp8(rows, packed, context.stream));
}

void dequantize_rows_fp8(const ExecContext& context, const Tensor& packed, Tensor& rows) {
  expect_on_device(context, "dequantize_rows_fp8", {&packed, &rows});
  if (is_cpu(context)) return cpu::dequantize_rows_fp8(packed, rows);
  SY_CUDA_BACKEND("dequantize_rows_fp8", cuda::dequantize_rows_fp8(packed, rows, context.stream));
}

// ---- Direct peer row moves (raw pointers: nothing to check against the context) ---------------

void ep_push_rows(const ExecContext& context, const void* packed, int64_t rows, const EpPeerRows& peers,
                  [[maybe_unused]] const EpSignalBoards& signal, [[maybe_unused]] int signal_kind,
                  [[maybe_unused]] unsigned* block_counter) {
  if (is_cpu(context)) return cpu::ep_push_rows(packed, rows, peers);
  SY_CUDA_BACKEND("ep_push_rows",
                  cuda::ep_push_rows(packed, rows, peers, signal, signal_kind, block_counter, context.stream));
}

void ep_pull_rows(const ExecContext& context, void* packed, int64_t rows, const EpPeerRows& peers) {
  if (is_cpu(context)) return cpu::ep_pull_rows(packed, rows, peers);
  SY_CUDA_BACKEND("ep_pull_rows", cuda::ep_pull_rows(packed, rows, peers, context.stream));
}

void ep_pull_combine(const ExecContext& context, const EpPeerRows& peers, int64_t rows, const int32_t* choice_rows,
                     const float* gates, int64_t num_tokens, int k_max, DType dtype, void* tokens_out, void* keep) {
  if (is_cpu(context))
    return cpu::ep_pull_combine(peers, rows, choice_rows, gates, num_tokens, k_max, dtype, tokens_out, keep);
  SY_CUDA_BACKEND("ep_pull_combine", cuda::ep_pull_combine(peers, rows, choice_rows, gates, num_tokens, k_max, dtype,
                                                           tokens_out, keep, context.stream));
}

void ep_zero_padding_rows(const ExecContext& context, void* padded, int64_t row_bytes, const int32_t* expert_offsets,
                          const int32_t* expert_totals, int local_experts,
                          [[maybe_unused]] int64_t max_padding_rows) {
  if (is_cpu(context))
    return cpu::ep_zero_padding_rows(padded, row_bytes, expert_offsets, expert_totals, local_experts);
  SY_CUDA_BACKEND("ep_zero_padding_rows",
                  cuda::ep_zero_padding_rows(padded, row_bytes, expert_offsets, expert_totals, local_experts,
                                             max_padding_rows, context.stream));
}

// ---- Signals and the count all-gather: CUDA only ----------------------------------------------

void ep_signal_peers(const ExecContext& context, [[maybe_unused]] const EpSignalBoards& signal,
                     [[maybe_unused]] int signal_kind) {
  expect_cuda_context(context, "ep_signal_peers");
  SY_CUDA_BACKEND("ep_signal_peers", cuda::ep_signal_peers(signal, signal_kind, context.stream));
}

void ep_all_gather_counts(const ExecContext& context, [[maybe_unused]] const int32_t* packed_offsets,
                          [[maybe_unused]] int64_t segments, [[maybe_unused]] void* const* peer_bases,
                          [[maybe_unused]] const EpSignalBoards& signal, [[maybe_unused]] int signal_kind) {
  expect_cuda_context(context, "ep_all_gather_counts");
  SY_CUDA_BACKEND("ep_all_gather_counts", cuda::ep_all_gather_counts(packed_offsets, segments, peer_bases, signal,
                                                                     signal_kind, context.stream));
}

void ep_wait_signals(const ExecContext& context, [[maybe_unused]] const EpSignalBoards& signal,
                     [[maybe_unused]] int signal_kind, [[maybe_unused]] unsigned long long expected,
                     [[maybe_unused]] int64_t timeout_ns, [[maybe_unused]] EpWaitFailure* failure) {
  expect_cuda_context(context, "ep_wait_signals");
  SY_CUDA_BACKEND("ep_wait_signals", cuda::ep_wait_signals(signal, signal_kind, expected, timeout_ns, failure,
                                                           context.stream));
}

void ep_signal_and_wait(const ExecContext& context, [[maybe_unused]] const EpSignalBoards& signal,
                        [[maybe_unused]] int signal_kind, [[maybe_unused]] unsigned long long expected,
                        [[maybe_unused]] int64_t timeout_ns, [[maybe_unused]] EpWaitFailure* failure) {
  expect_cuda_context(context, "ep_signal_and_wait");
  SY_CUDA_BACKEND("ep_signal_and_wait", cuda::ep_signal_and_wait(signal, signal_kind, expected, timeout_ns, failure,
                                                                 context.stream));
}

}  // namespace ops
}  // namespace switchyard
