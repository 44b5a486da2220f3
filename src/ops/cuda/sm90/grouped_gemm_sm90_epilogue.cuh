// Epilogues of the sm_90a forward grouped GEMM (grouped_gemm_sm90_forward.cu): what a consumer
// warpgroup does with its 64 x kBlockN fp32 accumulator tile once the mainloop is done.
//
//   store            C = tile                                           (any grouped GEMM)
//   gelu             pre = tile, post = gelu_tanh(pre)                 (expert GEMM 1)
//   swiglu           pre = tile, post = silu(gate) * up                (expert GEMM 1)
//   gelu_backward    grad_pre = tile * gelu_tanh'(pre)                 (expert data grad 2:
//   swiglu_backward  grad_gate = tile * up * s (1 + gate (1 - s)),       the tile is dL/d post)
//                    grad_up = tile * silu(gate),  s = sigmoid(gate)
//
// Numerics match the unfused ops exactly: the tile is rounded to bf16 first (what the separate
// activation kernel would read back), the activation math is the same fp32 code as
// src/ops/cuda/activation.cu (fast __expf sigmoid), and the result is rounded to bf16.
//
// swiglu without reordering W1: pre = [gate | up] per row, so the gate and up columns of one post
// column are F apart. The producer fills the B tile from two column ranges: the first kBlockN/2
// columns of the tile are gate columns [p0, p0 + kBlockN/2), the last kBlockN/2 the up columns
// [F + p0, ...). In the wgmma D layout a thread holding tile column c also holds c + kBlockN/2, so
// silu(gate) * up needs no data exchange. Weights, checkpoints and the unfused path keep the plain
// [gate | up] layout.
//
// Output path, one 64-column slice per output matrix at a time: fragment -> bf16 pairs -> either
// padded shared staging rows -> 16-byte coalesced st.global by all threads (DirectWriter), or a
// swizzled shared box -> a TMA store issued by one thread, two boxes in turn (TmaWriter; see
// grouped_gemm_sm90.h for why). The backward epilogues read pre in
// the fragment layout straight from global memory, one slice ahead of the one being computed: the
// first slice before the tile's mainloop, the rest from L2, where the producer prefetched the
// tile's pre boxes when it started the tile.
#pragma once

#include <type_traits>

#include "src/ops/cuda/sm90/grouped_gemm_sm90_common.cuh"
#include "src/ops/cuda/sm90/grouped_gemm_sm90_ptx.cuh"

namespace switchyard {
namespace cuda {
namespace sm90 {
namespace detail {

#ifdef SY_SM90A_DEVICE_CODE

constexpr float kSqrtTwoOverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;
constexpr int kSlicePairs = 2 * (kChunk / 8);  // bf16 pairs of one thread in a 64-column slice

// The same expressions as src/ops/cuda/activation.cu, so fused and unfused results agree bit for bit.
__device__ __forceinline__ float epilogue_sigmoid(float z) { return __fdividef(1.0f, 1.0f + __expf(fminf(-z, 80.0f))); }

__device__ __forceinline__ float epilogue_gelu(float x) {
  const float inner = kSqrtTwoOverPi * fmaf(kGeluCubic * x, x * x, x);
  return x * epilogue_sigmoid(2.0f * inner);
}

__device__ __forceinline__ float epilogue_gelu_derivative(float x) {
  const float inner = kSqrtTwoOverPi * fmaf(kGeluCubic * x, x * x, x);
  const float s = epilogue_sigmoid(2.0f * inner);
  const float inner_derivative = kSqrtTwoOverPi * fmaf(3.0f * kGeluCubic * x, x, 1.0f);
  return fmaf(2.0f * x * s * (1.0f - s), inner_derivative, s);
}

__device__ __forceinline__ float2 unpack_bf16x2(uint32_t bits) {
  __nv_bfloat162 pair;
  *reinterpret_cast<uint32_t*>(&pair) = bits;
  return __bfloat1622float2(pair);
}

// Position of a thread's fragment inside its warpgroup's 64 x kBlockN tile (wgmma D layout: rows r
// and r + 8, column pairs c, c + 1 in every 8-column group).
struct FragmentPosition {
  int row;     // 0..7 + 16 * warp
  int column;  // 0, 2, 4, 6
};

__device__ __forceinline__ FragmentPosition fragment_position(int thread_in_warpgroup) {
  const int warp = thread_in_warpgroup / 32, lane = thread_in_warpgroup % 32;
  return FragmentPosition{warp * 16 + lane / 4, (lane % 4) * 2};
}

// The thread's accumulators of 64-column slice `slice` as bf16 pairs: pairs[2j] row r, pairs[2j+1]
// row r + 8, columns 8j + c, 8j + c + 1.
template <int kCount>
__device__ __forceinline__ void slice_pairs(const float (&acc)[kCount], int slice, uint32_t (&pairs)[kSlicePairs]) {
#pragma unroll
  for (int j = 0; j < kChunk / 8; ++j) {
    const float* group = acc + 4 * (slice * (kChunk / 8) + j);
    pairs[2 * j] = pack_bf16x2(group[0], group[1]);
    pairs[2 * j + 1] = pack_bf16x2(group[2], group[3]);
  }
}

__device__ __forceinline__ void stage_pairs(uint8_t* staging, FragmentPosition position,
                                            const uint32_t (&pairs)[kSlicePairs]) {
#pragma unroll
  for (int j = 0; j < kChunk / 8; ++j) {
    const int byte_column = (j * 8 + position.column) * 2;
    *reinterpret_cast<uint32_t*>(staging + position.row * kStagingPitch + byte_column) = pairs[2 * j];
    *reinterpret_cast<uint32_t*>(staging + (position.row + 8) * kStagingPitch + byte_column) = pairs[2 * j + 1];
  }
}

// Writes the staged 64 x 64 slice to rows [row0, row0 + 64) (those below `rows`) and columns
// [column, column + 64) of a row-major bf16 matrix with `pitch` columns. The first barrier makes
// every thread's staged pairs visible, the second frees the staging buffer for the next slice.
__device__ __forceinline__ void flush_staging(const uint8_t* staging, __nv_bfloat16* out, int64_t pitch, int row0,
                                              int column, int rows, int barrier_id, int thread_in_warpgroup) {
  warpgroup_barrier(barrier_id);
#pragma unroll
  for (int pass = 0; pass < 64 * 8 / kWarpgroupThreads; ++pass) {
    const int piece = pass * kWarpgroupThreads + thread_in_warpgroup;
    const int row = piece / 8, piece_column = (piece % 8) * 8;
    const uint4 value = *reinterpret_cast<const uint4*>(staging + row * kStagingPitch + piece_column * 2);
    const int64_t global_row = int64_t(row0) + row;
    if (global_row < rows) *reinterpret_cast<uint4*>(out + global_row * pitch + column + piece_column) = value;
  }
  warpgroup_barrier(barrier_id);
}

// Output writers: write(pairs, to_post, pitch, row0, column) puts one 64 x 64 bf16 slice of the
// warpgroup's tile (its fragment pairs) at rows [row0, row0 + 64) and columns [column, +64) of C
// (problem.c: C, pre or grad_pre) or of post. `pitch` is that matrix's row length.

// Padded staging rows, then 16-byte st.global by every thread.
struct DirectWriter {
  uint8_t* staging;  // kStagingBytesPerWarpgroup of this warpgroup
  const ForwardProblem* problem;
  FragmentPosition position;
  int barrier_id;
  int thread_in_warpgroup;

  __device__ __forceinline__ void write(const uint32_t (&pairs)[kSlicePairs], bool to_post, int64_t pitch, int row0,
                                        int column) {
    stage_pairs(staging, position, pairs);
    flush_staging(staging, to_post ? problem->post : problem->c, pitch, row0, column, problem->rows, barrier_id,
                  thread_in_warpgroup);
  }
  __device__ __forceinline__ void finish() {}
};

// Two 128-byte-swizzled 64 x 64 boxes used in turn, stored by TMA (thread 0 issues and owns the
// bulk groups): a slice is staged into one box while the other may still be read by its store.
// The swizzle (16-byte unit u of row r at u ^ (r % 8)) makes a warp's pair writes conflict-free.
struct TmaWriter {
  uint8_t* staging;  // two kBf16BoxBytes boxes, 1024-byte aligned
  const CUtensorMap* map_c;
  const CUtensorMap* map_post;
  FragmentPosition position;
  int barrier_id;
  int thread_in_warpgroup;
  int box = 0;  // the box to fill next; carried across tiles

  __device__ __forceinline__ void write(const uint32_t (&pairs)[kSlicePairs], bool to_post, int64_t /*pitch*/,
                                        int row0, int column) {
    uint8_t* destination = staging + box * kBf16BoxBytes;
    if (thread_in_warpgroup == 0) bulk_wait_group_read<1>();  // the store two slices back has read this box
    warpgroup_barrier(barrier_id);
    const int swizzle = position.row % 8;  // rows r and r + 8 share it
#pragma unroll
    for (int j = 0; j < kChunk / 8; ++j) {
      // Columns 8j + c, +1 of the slice: 16-byte unit j, byte 2c inside it.
      uint8_t* pair = destination + ((j ^ swizzle) << 4) + position.column * 2;
      *reinterpret_cast<uint32_t*>(pair + position.row * 128) = pairs[2 * j];
      *reinterpret_cast<uint32_t*>(pair + (position.row + 8) * 128) = pairs[2 * j + 1];
    }
    fence_proxy_async_shared();  // every writer, before the barrier that precedes the TMA's reads
    warpgroup_barrier(barrier_id);
    if (thread_in_warpgroup == 0) {
      tma_store_2d(to_post ? map_post : map_c, shared_address(destination), column, row0);
      bulk_commit_group();
    }
    box ^= 1;
  }
  // The kernel's last stores must be done with the staging before the CTA's shared memory goes.
  __device__ __forceinline__ void finish() {
    if (thread_in_warpgroup == 0) bulk_wait_group_all();
  }
};

// The thread's bf16 pairs of pre in one 64-column slice (fragment layout), read from global memory.
__device__ __forceinline__ void load_fragment_pairs(const __nv_bfloat16* matrix, int64_t pitch, int row0, int column,
                                                    int rows, FragmentPosition position,
                                                    uint32_t (&pairs)[kSlicePairs]) {
  const int64_t row = int64_t(row0) + position.row;
#pragma unroll
  for (int j = 0; j < kChunk / 8; ++j) {
    const int64_t offset = column + j * 8 + position.column;
    pairs[2 * j] = row < rows ? __ldg(reinterpret_cast<const unsigned int*>(matrix + row * pitch + offset)) : 0u;
    pairs[2 * j + 1] =
        row + 8 < rows ? __ldg(reinterpret_cast<const unsigned int*>(matrix + (row + 8) * pitch + offset)) : 0u;
  }
}

// pre pairs of one slice for the backward epilogues: gate (= the whole input for gelu) and up.
template <bool kSwiglu>
struct PreSlice {
  uint32_t gate[kSlicePairs];
  uint32_t up[kSwiglu ? kSlicePairs : 1];
};

// Loads the gate (gelu: the only) half of a pre slice; load_pre_up the swiglu up half.
template <bool kSwiglu>
__device__ __forceinline__ void load_pre_gate(const ForwardProblem& problem, int row0, int column,
                                              FragmentPosition position, PreSlice<kSwiglu>& slice) {
  const int64_t pitch = kSwiglu ? 2 * int64_t(problem.n) : int64_t(problem.n);
  load_fragment_pairs(problem.pre, pitch, row0, column, problem.rows, position, slice.gate);
}

__device__ __forceinline__ void load_pre_up(const ForwardProblem& problem, int row0, int column,
                                            FragmentPosition position, PreSlice<true>& slice) {
  load_fragment_pairs(problem.pre, 2 * int64_t(problem.n), row0, problem.n + column, problem.rows, position, slice.up);
}

// What an epilogue reads besides the accumulators, fetched before the tile's mainloop so the load
// latency hides behind the MMAs: the first pre slice for the backward epilogues, nothing otherwise.
struct NoEpilogueInput {};
template <Epilogue kEpilogue>
using EpilogueInput = typename std::conditional<is_backward_epilogue(kEpilogue),
                                                PreSlice<kEpilogue == Epilogue::swiglu_backward>,
                                                NoEpilogueInput>::type;

template <Epilogue kEpilogue>
__device__ __forceinline__ void load_epilogue_input(const ForwardProblem& problem, int row0, int n0,
                                                    int thread_in_warpgroup, EpilogueInput<kEpilogue>& input) {
  if constexpr (is_backward_epilogue(kEpilogue)) {
    constexpr bool kSwiglu = kEpilogue == Epilogue::swiglu_backward;
    const FragmentPosition position = fragment_position(thread_in_warpgroup);
    load_pre_gate<kSwiglu>(problem, row0, n0, position, input);
    if constexpr (kSwiglu) load_pre_up(problem, row0, n0, position, input);
  }
}

// The whole epilogue of one warpgroup's tile: rows [row0, row0 + 64), tile columns from n0 (in
// the `problem.n` space), `input` from load_epilogue_input. Columns at or past problem.n are never
// written.
template <Epilogue kEpilogue, int kBlockN, class Writer>
__device__ __forceinline__ void run_epilogue(const float (&acc)[kBlockN / 2], const ForwardProblem& problem, int row0,
                                             int n0, const EpilogueInput<kEpilogue>& input, FragmentPosition position,
                                             Writer& writer) {
  const int n = problem.n;
  uint32_t pairs[kSlicePairs];
  if constexpr (kEpilogue == Epilogue::store || kEpilogue == Epilogue::gelu) {
#pragma unroll
    for (int slice = 0; slice < kBlockN / kChunk; ++slice) {
      const int column = n0 + slice * kChunk;
      if (column >= n) break;  // uniform over the warpgroup
      slice_pairs(acc, slice, pairs);
      if (kEpilogue == Epilogue::store || problem.c != nullptr)
        writer.write(pairs, false, n, row0, column);
      if constexpr (kEpilogue == Epilogue::gelu) {
#pragma unroll
        for (int i = 0; i < kSlicePairs; ++i) {
          const float2 x = unpack_bf16x2(pairs[i]);
          pairs[i] = pack_bf16x2(epilogue_gelu(x.x), epilogue_gelu(x.y));
        }
        writer.write(pairs, true, n, row0, column);
      }
    }
  } else if constexpr (kEpilogue == Epilogue::swiglu) {
    constexpr int kHalfSlices = kBlockN / (2 * kChunk);  // gate slices, then as many up slices
#pragma unroll
    for (int slice = 0; slice < kHalfSlices; ++slice) {
      const int column = n0 + slice * kChunk;
      if (column >= n) break;
      uint32_t up[kSlicePairs];
      slice_pairs(acc, slice, pairs);
      slice_pairs(acc, kHalfSlices + slice, up);
      if (problem.c != nullptr) {
        writer.write(pairs, false, 2 * int64_t(n), row0, column);
        writer.write(up, false, 2 * int64_t(n), row0, n + column);
      }
#pragma unroll
      for (int i = 0; i < kSlicePairs; ++i) {
        const float2 gate = unpack_bf16x2(pairs[i]), value = unpack_bf16x2(up[i]);
        pairs[i] =
            pack_bf16x2(gate.x * epilogue_sigmoid(gate.x) * value.x, gate.y * epilogue_sigmoid(gate.y) * value.y);
      }
      writer.write(pairs, true, n, row0, column);
    }
  } else {
    static_assert(is_backward_epilogue(kEpilogue), "unknown epilogue");
    constexpr bool kSwiglu = kEpilogue == Epilogue::swiglu_backward;
    constexpr int kSlices = kBlockN / kChunk;
    const int64_t out_pitch = kSwiglu ? 2 * int64_t(n) : int64_t(n);
    PreSlice<kSwiglu> current = input, next;
#pragma unroll
    for (int slice = 0; slice < kSlices; ++slice) {
      const int column = n0 + slice * kChunk;
      if (column >= n) break;
      // The next slice's loads are in flight while this one is computed and stored (swiglu: its up
      // half once this slice's gate gradient is out, to bound the live registers).
      const bool prefetch = slice + 1 < kSlices && column + kChunk < n;
      if (prefetch) load_pre_gate<kSwiglu>(problem, row0, column + kChunk, position, next);
      slice_pairs(acc, slice, pairs);  // dL/d post, rounded as the unfused GEMM would store it
      if constexpr (!kSwiglu) {
#pragma unroll
        for (int i = 0; i < kSlicePairs; ++i) {
          const float2 grad = unpack_bf16x2(pairs[i]), x = unpack_bf16x2(current.gate[i]);
          pairs[i] = pack_bf16x2(grad.x * epilogue_gelu_derivative(x.x), grad.y * epilogue_gelu_derivative(x.y));
        }
        writer.write(pairs, false, out_pitch, row0, column);
      } else {
        // grad_up overwrites `up` in place: it is the last use of this slice's up values.
#pragma unroll
        for (int i = 0; i < kSlicePairs; ++i) {
          const float2 grad = unpack_bf16x2(pairs[i]);
          const float2 gate = unpack_bf16x2(current.gate[i]), up = unpack_bf16x2(current.up[i]);
          const float s0 = epilogue_sigmoid(gate.x), s1 = epilogue_sigmoid(gate.y);
          pairs[i] = pack_bf16x2(grad.x * up.x * s0 * fmaf(gate.x, 1.0f - s0, 1.0f),
                                 grad.y * up.y * s1 * fmaf(gate.y, 1.0f - s1, 1.0f));
          current.up[i] = pack_bf16x2(grad.x * gate.x * s0, grad.y * gate.y * s1);
        }
        writer.write(pairs, false, out_pitch, row0, column);
        if (prefetch) load_pre_up(problem, row0, column + kChunk, position, next);
        writer.write(current.up, false, out_pitch, row0, n + column);
      }
      current = next;
    }
  }
}

// gelu_backward's pre input through shared memory (the pingpong kernel): TMA loads of 64 x 64
// boxes (128-byte swizzle, as TmaWriter's staging) into two buffers, one per 64-column slice of a
// tile, each with its own mbarrier; the threads then read their fragment pairs conflict-free.
// Coalesced 128-byte lines instead of the fragment layout's half-used 32-byte sectors, and no
// global-load stalls in the epilogue. Thread 0 issues; a box is re-armed only after a warpgroup
// barrier, so every thread has waited on (and read) its previous load. `phases` (bit b: the parity
// box b completes next) advances identically in every thread.
struct SmemPreSource {
  uint8_t* boxes;     // two kBf16BoxBytes boxes, 1024-byte aligned
  uint32_t barriers;  // two mbarriers, 8 bytes apart
  const CUtensorMap* map_pre;
  int thread_in_warpgroup;
  uint32_t phases = 0;

  __device__ __forceinline__ void init() const {
    if (thread_in_warpgroup == 0) {
      mbarrier_init(barriers, 1);
      mbarrier_init(barriers + 8, 1);
      fence_barrier_init();
    }
  }
  // Rows [row0, row0 + 64), columns [column, column + 64) of pre into box `box`.
  __device__ __forceinline__ void issue(int box, int row0, int column) const {
    if (thread_in_warpgroup != 0) return;
    const uint32_t barrier = barriers + 8 * box;
    mbarrier_arrive_expect_tx(barrier, kBf16BoxBytes);
    tma_load_2d(shared_address(boxes + box * kBf16BoxBytes), map_pre, barrier, column, row0);
  }
  __device__ __forceinline__ void read(int box, FragmentPosition position, uint32_t (&pairs)[kSlicePairs]) {
    mbarrier_wait(barriers + 8 * box, (phases >> box) & 1u);
    phases ^= 1u << box;
    const uint8_t* base = boxes + box * kBf16BoxBytes;
    const int swizzle = position.row % 8;  // rows r and r + 8 share it
#pragma unroll
    for (int j = 0; j < kChunk / 8; ++j) {
      const uint8_t* pair = base + ((j ^ swizzle) << 4) + position.column * 2;
      pairs[2 * j] = *reinterpret_cast<const uint32_t*>(pair + position.row * 128);
      pairs[2 * j + 1] = *reinterpret_cast<const uint32_t*>(pair + (position.row + 8) * 128);
    }
  }
};

// gelu_backward of one 64-row half (rows from row0, tile columns from n0: two 64-column slices) of
// a pingpong tile, pre from `source` (slice s in box s, issued earlier). With refill_row0 >= 0 each
// box is re-armed, once read, with the same columns of rows [refill_row0, +64) (the next half).
template <class Writer>
__device__ __forceinline__ void gelu_backward_half_from_smem(const float (&acc)[64], const ForwardProblem& problem,
                                                             int row0, int n0, SmemPreSource& source,
                                                             int refill_row0, FragmentPosition position,
                                                             Writer& writer, int barrier_id) {
  uint32_t pairs[kSlicePairs], pre[kSlicePairs];
#pragma unroll
  for (int slice = 0; slice < 2; ++slice) {
    const int column = n0 + slice * kChunk;
    if (column >= problem.n) break;  // uniform over the warpgroup; never issued either
    source.read(slice, position, pre);
    slice_pairs(acc, slice, pairs);  // dL/d post, rounded as the unfused GEMM would store it
#pragma unroll
    for (int i = 0; i < kSlicePairs; ++i) {
      const float2 grad = unpack_bf16x2(pairs[i]), x = unpack_bf16x2(pre[i]);
      pairs[i] = pack_bf16x2(grad.x * epilogue_gelu_derivative(x.x), grad.y * epilogue_gelu_derivative(x.y));
    }
    if (refill_row0 >= 0) {
      warpgroup_barrier(barrier_id);  // every thread has read the box
      source.issue(slice, refill_row0, column);
    }
    writer.write(pairs, false, problem.n, row0, column);
  }
}

#endif  // SY_SM90A_DEVICE_CODE

}  // namespace detail
}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
