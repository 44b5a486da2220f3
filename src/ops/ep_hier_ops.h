// The bookkeeping of the hierarchical expert-parallel exchange (src/comm/ep_exchange_hierarchical.cpp):
// which nodes a token's rows go to, what travels with each row, and the stable layouts on either
// side; of the EP layer's two-part overlap (src/model/moe_ep_layer.h: a part's routing is
// ep_kept_choices of the full routing's rows, laid out by ep_choice_layout); and of its hot-expert
// replication (ep_map_choice_ids: the routing's experts renamed to the ranks' virtual experts). One
// declaration, two backends, the conventions of src/ops/moe_ops.h:
//
//   switchyard::cpu::NAME   src/ops/cpu/ep_hierarchy.cpp   reference
//   switchyard::cuda::NAME  src/ops/cuda/ep_hierarchy.cu   same integers bit for bit, same floats
//   switchyard::ops::NAME   src/ops/ops.h                  picks the backend (src/ops/dispatch_ep.cpp)
//
// The expert-parallel group is N nodes x R ranks; node m holds the G = R*L global experts
// [m*G, (m+1)*G) (rank r of the group is rank r % R of node r / R, and holds experts [r*L, (r+1)*L)).
// Choices are the sender's RoutingResult: expert_ids int32 [T, K] (-1: no choice), slots [T, K] and
// scalars; choice (t, j) is kept when its id >= 0 and 0 <= slot < scalars[kCapacity] (the rule
// permute applies).
//
//   ep_choice_layout(ids [T, K], experts X) -> slots [T, K], counts [X], offsets [X + 1], scalars:
//       a stable counting sort of the choices by id: slots[t, j] = the number of choices (t', j')
//       with the same id before (t, j) in token-major order (t' < t, or t' = t and j' < j);
//       counts[x] = choices with id x; offsets the exclusive prefix (no padding); -1 ids get slot -1.
//       scalars = {capacity INT32_MAX, total choices, 0 dropped, offsets[X]}: a RoutingResult with
//       these (and ids, gates) is what permute / unpermute_combine / their backwards read.
//   ep_kept_choices(ids, slots, scalars) -> kept_ids [T, K]: ids[t, j] where choice (t, j) is kept,
//       else -1. ids / slots may be rows [t0, t1) of a larger routing (scalars is that routing's);
//       given to ep_choice_layout, kept_ids lay out exactly the choices permute would have kept.
//   ep_map_choice_ids(ids [T, K], expert_map [X]) -> mapped_ids [T, K]: expert_map[ids[t, j]] where
//       ids[t, j] >= 0, else -1 (every id must be < X; slots and capacity are the caller's: the
//       mapped ids keep the routing's slots, so permute keeps and drops the same choices).
//   ep_node_choices(ids, slots, scalars, G, N) -> node_ids [T, KN], KN = min(K, N): the distinct nodes
//       id / G of t's kept choices in ascending order, then -1.
//   ep_pack_node_choices(ids, gates, slots, scalars, node_ids, node_rows [T, KN], G)
//       -> meta_ids [M, K] int32, meta_gates [M, K] float: for the row node_rows[t, s] >= 0 that
//       carries token t to node n = node_ids[t, s], column j holds choice j's node-local expert
//       (ids[t, j] - n*G) and gate if choice j is kept and on node n, else -1 and 0. M is the row
//       count of the node layout; other rows are untouched.
//   ep_unpack_node_gate_grads(meta_grad_gates [M, K], ids, slots, scalars,
//       node_ids, node_rows, G)
//       -> grad_gates [T, K]: the entry of choice j's node row, column j; 0 for choices not kept.
// Floats are the reference's type on the CPU and fp32 on CUDA; the gate values move, never change.
#pragma once

#include <cstdint>

#include "src/core/tensor.h"

namespace switchyard {

namespace cpu {
void ep_kept_choices(const Tensor& ids, const Tensor& slots, const Tensor& scalars, Tensor& kept_ids);
void ep_choice_layout(const Tensor& ids, int num_slots, Tensor& slots, Tensor& counts, Tensor& offsets,
                      Tensor& scalars);
void ep_map_choice_ids(const Tensor& ids, const Tensor& expert_map, Tensor& mapped_ids);
void ep_node_choices(const Tensor& ids, const Tensor& slots, const Tensor& scalars, int experts_per_node, int num_nodes,
                     Tensor& node_ids);
void ep_pack_node_choices(const Tensor& ids, const Tensor& gates, const Tensor& slots, const Tensor& scalars, const Tensor& node_ids,
                          const Tensor& node_rows, int experts_per_node, Tensor& meta_ids, Tensor& meta_gates);
void ep_unpack_node_gate_grads(const Tensor& meta_grad_gates, const Tensor& ids, const Tensor& slots, const Tensor& scalars,
                               const Tensor& node_ids, const Tensor& node_rows, int experts_per_node,
                               Tensor& grad_gates);
}  // namespace cpu

namespace cuda {
void ep_kept_choices(const Tensor& ids, const Tensor& slots, const Tensor& scalars, Tensor& kept_ids, void* stream);
void ep_choice_layout(const Tensor& ids, int num_slots, Tensor& slots, Tensor& counts, Tensor& offsets,
                      Tensor& scalars, void* stream);
void ep_map_choice_ids(const Tensor& ids, const Tensor& expert_map, Tensor& mapped_ids, void* stream);
void ep_node_choices(const Tensor& ids, const Tensor& slots, const Tensor& scalars, int experts_per_node, int num_nodes,
                     Tensor& node_ids, void* stream);
void ep_pack_node_choices(const Tensor& ids, const Tensor& gates, const Tensor& slots, const Tensor& scalars, const Tensor& node_ids,
                          const Tensor& node_rows, int experts_per_node, Tensor& meta_ids, Tensor& meta_gates,
                          void* stream);
void ep_unpack_node_gate_grads(const Tensor& meta_grad_gates, const Tensor& ids, const Tensor& slots, const Tensor& scalars,
                               const Tensor& node_ids, const Tensor& node_rows, int experts_per_node,
                               Tensor& grad_gates, void* stream);
}  // namespace cuda

}  // namespace switchyard
