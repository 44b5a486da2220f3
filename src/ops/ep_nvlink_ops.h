// Expert-parallel rows moved straight between the GPUs of one node (the "nvlink" transport of
// src/comm/nvlink_exchange.h): the sender writes its packed rows into each peer's padded expert
// layout through mapped peer memory, and reads the results back from there; no staging buffer,
// no receiver-side reorder, no NCCL call on the payload path.
//
//   switchyard::cpu::NAME   src/ops/cpu/ep_nvlink.cpp   reference (host pointers stand for peers)
//   switchyard::cuda::NAME  src/ops/cuda/ep_nvlink.cu   same bytes, on a stream
//   switchyard::ops::NAME   src/ops/ops.h               picks the backend from the context
//                                                       (src/ops/dispatch_ep.cpp); the signals
//                                                       and ep_all_gather_counts are CUDA only
//
// Layouts (src/ops/ep_ops.h names). This rank r routed its tokens with segment_alignment 1, so its
// send rows are packed by global expert: expert e = p*L + l owns packed rows
// [packed_offsets[e], packed_offsets[e+1]). Rank p's padded layout by local expert (what
// ep_receive_layout computes from the counts of all sources) puts the rows that r sends to its
// expert l at [peer_rows[p*L + l], peer_rows[p*L + l] + count): peer_rows[p*L + l] is rank p's
// segment_rows[r, l]. Row i of the segment is packed row packed_offsets[e] + i. So
//   ep_push_rows:  peer_base[p] row (peer_rows[p*L+l] + i)  <-  packed row packed_offsets[e] + i
//   ep_pull_rows:  packed row packed_offsets[e] + i          <-  peer_base[p] row (peer_rows[p*L+l] + i)
// for every e < P*L and i < packed_offsets[e+1] - packed_offsets[e]: exactly what a payload
// all-to-all followed by ep_to_expert_layout (and, back, ep_from_expert_layout followed by the
// return all-to-all) moves, in one pass. peer_base[r] is this rank's own buffer.
//   ep_zero_padding_rows: rows [expert_offsets[l] + expert_totals[l], expert_offsets[l+1]) of the
//       padded layout become zero (the grouped GEMMs read them; no peer writes them).
// Signals (CUDA only). Each rank has a board of kEpSignalKinds x P uint64 counters in mapped
// memory; "rank r signals kind k to p" adds 1 to board_p[k][r]. ep_push_rows ends with that signal
// to every peer once all its rows are written (the last block, after a system-scope fence by every
// thread); ep_signal_peers sends one after whatever the stream ran before it; ep_wait_signals
// spins until board_r[k][s] >= expected for every source s, or until `timeout_ns` (then it stores
// the kind and source in the host-mapped failure record and traps, so the stream fails instead of
// hanging; src/comm/nvlink_exchange.h turns that into an Error naming both).
#pragma once

#include <cstdint>

#include "src/core/dtype.h"

namespace switchyard {

constexpr int kEpSignalKinds = 5;
enum EpSignalKind : int {
  kEpRowsDispatched = 0,   // forward: my rows are in your expert layout
  kEpOutputsReady = 1,     // forward: your rows' expert outputs are ready to pull
  kEpGradientsDispatched = 2,  // backward: my output-row gradients are in your layout
  kEpInputGradientsReady = 3,  // backward: your rows' input gradients are ready to pull
  kEpCountsGathered = 4,   // the count exchange: my row counts are in your count region
};
const char* ep_signal_kind_name(int kind);

// Where this rank's packed rows go (all pointers device-visible on CUDA, host on CPU).
struct EpPeerRows {
  int num_ranks = 1, local_experts = 1, rank = 0;
  int64_t row_bytes = 0;
  const int32_t* packed_offsets = nullptr;  // [P*L + 1]
  const int32_t* peer_rows = nullptr;       // [P*L]
  void* const* peer_bases = nullptr;        // [P]
  // CUDA: the most blocks a push, pull or pull-combine launches (parallel.ep_sm_budget), so the
  // exchange leaves the other SMs to the experts; 0: no cap beyond the kernels' own.
  int max_blocks = 0;
};

// What a failed wait leaves for the host (host-mapped memory on CUDA).
struct EpWaitFailure {
  int failed;        // 0, or 1 once a wait timed out (the first one wins)
  int kind;          // EpSignalKind
  int source;        // the rank that did not signal
  int rank;          // the waiting rank
  unsigned long long expected, seen;
};

// Signal boards for one exchange group: pointers to every rank's board (device [P]).
struct EpSignalBoards {
  unsigned long long* const* boards = nullptr;  // boards[p]: [kEpSignalKinds][P] on rank p
  int num_ranks = 1, rank = 0;
};

// Host bookkeeping, shared by both backends: from every rank's send counts by global expert,
// all_counts [P][P*L] (row s = rank s's packed segment sizes), the first row in rank p's padded
// layout of rank `rank`'s rows for p's local expert l:
//   peer_rows[p*L + l] = expert_start_p(l) + sum_{s < rank} all_counts[s][p*L + l],
//   expert_start_p(l)  = sum_{l' < l} roundup(sum_s all_counts[s][p*L + l'], alignment)
// (what ep_receive_layout computes as rank p's segment_rows[rank, l]). Returns the largest padded
// layout of any rank, in rows. Negative counts or int32 overflow: SY_CHECK.
int64_t ep_peer_rows(const int32_t* all_counts, int num_ranks, int local_experts, int rank, int alignment,
                     int32_t* peer_rows);

namespace cpu {
// `packed` holds `rows` rows of row_bytes (rows = packed_offsets[P*L]).
void ep_push_rows(const void* packed, int64_t rows, const EpPeerRows& peers);
void ep_pull_rows(void* packed, int64_t rows, const EpPeerRows& peers);
// dtype f32 or f64 here (accumulated in that type, in choice order).
void ep_pull_combine(const EpPeerRows& peers, int64_t rows, const int32_t* choice_rows, const float* gates,
                     int64_t num_tokens, int k_max, DType dtype, void* tokens_out, void* keep);
void ep_zero_padding_rows(void* padded, int64_t row_bytes, const int32_t* expert_offsets, const int32_t* expert_totals,
                          int local_experts);
}  // namespace cpu

namespace cuda {
void ep_push_rows(const void* packed, int64_t rows, const EpPeerRows& peers, const EpSignalBoards& signal,
                  int signal_kind, unsigned* block_counter, void* stream);
void ep_pull_rows(void* packed, int64_t rows, const EpPeerRows& peers, void* stream);
// The pull fused with the token-side gather of src/ops/moe_ops.h (one warp per token): with R(r)
// packed row r's copy in peer memory (as ep_pull_rows reads it), for every token t
//   tokens_out[t] = sum_j weight(t, j) * R(choice_rows[t, j])   over j with choice_rows[t, j] >= 0,
//   weight = gates[t, j] (unpermute_combine) or 1 when gates is null (permute_backward),
// accumulated in fp32 in choice order, so it equals ep_pull_rows followed by that op bit for bit;
// `keep` (optional, [rows, D]) also receives every R(r) a choice refers to (the forward keeps the
// expert outputs for the backward's gate gradients). dtype: bf16, f16 or f32; row_bytes = D * size.
void ep_pull_combine(const EpPeerRows& peers, int64_t rows, const int32_t* choice_rows, const float* gates,
                     int64_t num_tokens, int k_max, DType dtype, void* tokens_out, void* keep, void* stream);
void ep_zero_padding_rows(void* padded, int64_t row_bytes, const int32_t* expert_offsets, const int32_t* expert_totals,
                          int local_experts, int64_t max_padding_rows, void* stream);
void ep_signal_peers(const EpSignalBoards& signal, int signal_kind, void* stream);
// All-gather of the send counts: rank r writes counts[e] = packed_offsets[e+1] - packed_offsets[e]
// (e < segments = P*L) to row r of every rank's int32 [P][segments] table (peer_bases [P], its own
// included), then signals `signal_kind` to every peer. One block.
void ep_all_gather_counts(const int32_t* packed_offsets, int64_t segments, void* const* peer_bases,
                          const EpSignalBoards& signal, int signal_kind, void* stream);
void ep_wait_signals(const EpSignalBoards& signal, int signal_kind, unsigned long long expected, int64_t timeout_ns,
                     EpWaitFailure* failure, void* stream);
// ep_signal_peers then ep_wait_signals for the same kind, in one launch (a barrier of the group
// after the work before it on the stream).
void ep_signal_and_wait(const EpSignalBoards& signal, int signal_kind, unsigned long long expected, int64_t timeout_ns,
                        EpWaitFailure* failure, void* stream);
}  // namespace cuda

}  // namespace switchyard
