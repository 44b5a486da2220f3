// The mainloops of the sm_90a grouped GEMM kernels (device code only): one stage of wgmma for a
// warpgroup, the ring of shared-memory stages and its barriers, the basic kernels' mainloop, and
// the consumer side of the warp-specialized pipeline (cooperative, drained and pingpong variants).
// Built on grouped_gemm_sm90_ptx.cuh.
#pragma once

#include "src/ops/cuda/sm90/grouped_gemm_sm90_common.cuh"
#include "src/ops/cuda/sm90/grouped_gemm_sm90_ptx.cuh"

namespace switchyard {
namespace cuda {
namespace sm90 {
namespace detail {

#ifdef SY_SM90A_DEVICE_CODE

// One stage of MMA for one consumer warpgroup: D[64 x kBlockN] += A[64 x 64] * B[64 x kBlockN] as four
// k16 wgmma instructions. `a_address`/`b_address` are the shared addresses of this warpgroup's
// operand tiles in the stage.
template <int kBlockN, bool kAMNMajor, bool kBMNMajor>
__device__ __forceinline__ void mma_stage(float (&acc)[kBlockN / 2], uint32_t a_address, uint32_t b_address) {
  using LayoutA = OperandLayout<kAMNMajor>;
  using LayoutB = OperandLayout<kBMNMajor>;
  const uint64_t desc_a = smem_descriptor(a_address, LayoutA::kLeadingBytes, LayoutA::kStrideBytes);
  const uint64_t desc_b = smem_descriptor(b_address, LayoutB::kLeadingBytes, LayoutB::kStrideBytes);
#pragma unroll
  for (int slice = 0; slice < kBlockK / 16; ++slice) {
    // The start address sits in the descriptor's low bits (16-byte units); no carry out of 14 bits.
    wgmma_tile<kBlockN, LayoutA::kTranspose, LayoutB::kTranspose>(acc, desc_a + ((slice * LayoutA::kSliceBytes) >> 4),
                                                                   desc_b + ((slice * LayoutB::kSliceBytes) >> 4));
  }
}

// Ring position shared by producer and consumers: stage index and the parity of its current use.
struct PipelineState {
  int stage = 0;
  uint32_t phase = 0;
  template <int kStages>
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

// Shared memory of a warp-specialized kernel: 1024-aligned base and its barrier rings.
struct PipelineSmem {
  uint8_t* base;
  uint32_t address;  // shared-space address of base
  uint32_t full_barriers;
  uint32_t empty_barriers;
};

// Aligns the dynamic shared memory and initializes the full (1 arrival + TMA bytes) and empty (one
// arrival per consumer warp that reads the stage: all of them, or one warpgroup's in the pingpong
// schedule) barriers of every stage. Called by the whole CTA.
template <class Layout>
__device__ __forceinline__ PipelineSmem setup_pipeline(uint8_t* dynamic_smem, int stage_readers = kConsumerWarps) {
  PipelineSmem smem;
  smem.base = aligned_dynamic_smem(dynamic_smem);
  smem.address = shared_address(smem.base);
  smem.full_barriers = smem.address + Layout::kOffsetFull;
  smem.empty_barriers = smem.address + Layout::kOffsetEmpty;
  if (threadIdx.x == 0) {
    for (int stage = 0; stage < Layout::kStages; ++stage) {
      mbarrier_init(smem.full_barriers + 8 * stage, 1);
      mbarrier_init(smem.empty_barriers + 8 * stage, stage_readers);
    }
    fence_barrier_init();
  }
  __syncthreads();
  return smem;
}

// The basic kernels' whole mainloop for one tile: two warpgroups each consume every stage (this
// one reads its A rows at a_tiles + a_offset); thread 0 primes the ring and refills a stage once the
// CTA is done with it. load_stage(k_block, stage) issues expect-tx and the TMA loads of a k-block
// into a stage, completing on full_barriers + 8 * stage.
template <int kBlockN, bool kAMNMajor, bool kBMNMajor, int kStages, class LoadStage>
__device__ __forceinline__ void basic_mainloop(float (&acc)[kBlockN / 2], int k_blocks, uint32_t a_tiles,
                                               uint32_t a_offset, uint32_t b_tiles, uint32_t full_barriers,
                                               const LoadStage& load_stage) {
  constexpr uint32_t kStageBytesB = kBlockN * kBlockK * 2;
  if (threadIdx.x == 0) {
    for (int stage = 0; stage < kStages; ++stage) mbarrier_init(full_barriers + 8 * stage, 1);
    fence_barrier_init();
    for (int k_block = 0; k_block < min(kStages, k_blocks); ++k_block) load_stage(k_block, k_block);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) acc[i] = 0.0f;
  for (int k_block = 0; k_block < k_blocks; ++k_block) {
    const int stage = k_block % kStages;
    mbarrier_wait(full_barriers + 8 * stage, (k_block / kStages) & 1);
    fence_accumulators(acc);
    wgmma_fence();
    mma_stage<kBlockN, kAMNMajor, kBMNMajor>(acc, a_tiles + stage * kTileBytesA + a_offset,
                                             b_tiles + stage * kStageBytesB);
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(acc);
    __syncthreads();  // every warpgroup is done with this stage
    if (threadIdx.x == 0 && k_block + kStages < k_blocks) load_stage(k_block + kStages, stage);
  }
}

// Consumer side of the warp-specialized pipeline for one tile: waits for each stage, issues its
// wgmmas (issue_stage(a_stage, b_stage): the stage's A and B tile addresses), and hands a stage back
// to the producer (one arrival per consumer warp) as soon as the MMAs reading it are complete. One
// wgmma group stays in flight across stages. fence() pins the accumulators around the async MMAs.
// On return all MMAs of the tile are complete. peer_cta >= 0: the stages also hold data multicast by
// that CTA of the cluster, whose producer must see them released too.
template <int kStages, class IssueStage, class Fence>
__device__ __forceinline__ void consume_stages(int k_blocks, uint32_t a_tiles, uint32_t a_stage_bytes,
                                               uint32_t b_tiles, uint32_t b_stage_bytes, uint32_t full_barriers,
                                               uint32_t empty_barriers, PipelineState& state, bool signalling_lane,
                                               const IssueStage& issue_stage, const Fence& fence, int peer_cta = -1) {
  auto release = [&](int stage) {
    mbarrier_arrive(empty_barriers + 8 * stage);
    if (peer_cta >= 0) mbarrier_arrive_cluster(empty_barriers + 8 * stage, uint32_t(peer_cta));
  };
  int in_flight_stage = -1;
  for (int k_block = 0; k_block < k_blocks; ++k_block) {
    mbarrier_wait(full_barriers + 8 * state.stage, state.phase);
    fence();
    wgmma_fence();
    issue_stage(a_tiles + state.stage * a_stage_bytes, b_tiles + state.stage * b_stage_bytes);
    wgmma_commit();
    wgmma_wait<1>();  // the previous stage's group is done
    if (in_flight_stage >= 0 && signalling_lane) release(in_flight_stage);
    in_flight_stage = state.stage;
    state.advance<kStages>();
  }
  wgmma_wait<0>();
  fence();
  if (in_flight_stage >= 0 && signalling_lane) release(in_flight_stage);
}

// One warpgroup's 64 x kBlockN accumulator tile (cooperative schedule, weight grad).
template <int kBlockN, bool kAMNMajor, bool kBMNMajor, int kStages>
__device__ __forceinline__ void consume_k_blocks(float (&acc)[kBlockN / 2], int k_blocks, uint32_t a_tiles,
                                                 uint32_t a_stage_bytes, uint32_t b_tiles, uint32_t b_stage_bytes,
                                                 uint32_t full_barriers, uint32_t empty_barriers,
                                                 PipelineState& state, bool signalling_lane, int peer_cta = -1) {
  consume_stages<kStages>(
      k_blocks, a_tiles, a_stage_bytes, b_tiles, b_stage_bytes, full_barriers, empty_barriers, state, signalling_lane,
      [&](uint32_t a_stage, uint32_t b_stage) { mma_stage<kBlockN, kAMNMajor, kBMNMajor>(acc, a_stage, b_stage); },
      [&] { fence_accumulators(acc); }, peer_cta);
}

// The stages of k_blocks k-blocks, waited for and released without any MMA: the consumer's rows
// are all padding (zero), so its accumulators stay 0. A separate path, not a condition around the
// MMA issue: a wgmma under a runtime branch makes ptxas serialize every wgmma of the kernel.
template <int kStages>
__device__ __forceinline__ void drain_k_blocks(int k_blocks, uint32_t full_barriers, uint32_t empty_barriers,
                                               PipelineState& state, bool signalling_lane) {
  for (int k_block = 0; k_block < k_blocks; ++k_block) {
    mbarrier_wait(full_barriers + 8 * state.stage, state.phase);
    if (signalling_lane) mbarrier_arrive(empty_barriers + 8 * state.stage);
    state.advance<kStages>();
  }
}

// A warpgroup that computes a whole 128-row tile (pingpong schedule): per stage one wgmma group
// with rows [0, 64) of the A tile into acc_top and rows [64, 128) into acc_bottom, same B.
template <int kBlockN, bool kAMNMajor, bool kBMNMajor, int kStages>
__device__ __forceinline__ void consume_k_blocks_whole_tile(float (&acc_top)[kBlockN / 2],
                                                            float (&acc_bottom)[kBlockN / 2], int k_blocks,
                                                            uint32_t a_tiles, uint32_t a_stage_bytes, uint32_t b_tiles,
                                                            uint32_t b_stage_bytes, uint32_t full_barriers,
                                                            uint32_t empty_barriers, PipelineState& state,
                                                            bool signalling_lane) {
  static_assert(!kAMNMajor, "the row halves of a K-major A tile are 64 rows x 128 bytes apart");
  consume_stages<kStages>(
      k_blocks, a_tiles, a_stage_bytes, b_tiles, b_stage_bytes, full_barriers, empty_barriers, state, signalling_lane,
      [&](uint32_t a_stage, uint32_t b_stage) {
        mma_stage<kBlockN, kAMNMajor, kBMNMajor>(acc_top, a_stage, b_stage);
        mma_stage<kBlockN, kAMNMajor, kBMNMajor>(acc_bottom, a_stage + kTileBytesA / 2, b_stage);
      },
      [&] {
        fence_accumulators(acc_top);
        fence_accumulators(acc_bottom);
      });
}

#endif  // SY_SM90A_DEVICE_CODE

}  // namespace detail
}  // namespace sm90
}  // namespace cuda
}  // namespace switchyard
