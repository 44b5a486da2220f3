// Counter-based RNG (Philox-4x32-10, Salmon et al. 2011): the same (seed, counter) gives the
// same numbers on CPU and GPU, with no state to carry between kernels. A stream is named by
// (seed, stream_id); element i of a draw uses counter = (i, offset, stream_id). Callers advance
// `offset` per step so draws never repeat; checkpoints save (seed, offset).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SY_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SY_HOST_DEVICE inline
#endif

namespace switchyard {

struct PhiloxOutput {
  uint32_t value[4];
};

SY_HOST_DEVICE uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
}

SY_HOST_DEVICE PhiloxOutput philox4x32(uint32_t counter0, uint32_t counter1, uint32_t counter2,
                                       uint32_t counter3, uint64_t key) {
  uint32_t c0 = counter0, c1 = counter1, c2 = counter2, c3 = counter3;
  uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0 = mul_hi_u32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    uint32_t hi1 = mul_hi_u32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  PhiloxOutput out;
  out.value[0] = c0; out.value[1] = c1; out.value[2] = c2; out.value[3] = c3;
  return out;
}

// Uniform float in [0, 1) with 24 random bits: exact and identical on host and device.
SY_HOST_DEVICE float uint_to_unit_float(uint32_t bits) { return float(bits >> 8) * (1.0f / 16777216.0f); }

// The `index`-th uniform in [0,1) of stream (seed, stream_id) at `offset`.
SY_HOST_DEVICE float philox_uniform(uint64_t seed, uint32_t stream_id, uint64_t offset, uint64_t index) {
  PhiloxOutput out = philox4x32(uint32_t(index >> 2), uint32_t(index >> 34), uint32_t(offset) ^ stream_id,
                                uint32_t(offset >> 32), seed);
  return uint_to_unit_float(out.value[index & 3]);
}

}  // namespace switchyard
