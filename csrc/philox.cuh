// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based
// generator. The same 128-bit counter and 64-bit key always give the same four 32-bit words, so any
// thread can draw "the n-th number of sample i" directly, with no state carried between draws.
// It is the generator behind curand's Philox4_32_10 state; written out here so the kernels need no curand
// headers and the same code runs on the host (tests check it against the published known-answer vectors).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BEVT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BEVT_HOST_DEVICE inline
#endif

namespace bevt {

struct U32x4 {
  uint32_t x, y, z, w;
};

BEVT_HOST_DEVICE uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// counter (c.x, c.y, c.z, c.w), key (k0, k1) -> four independent uniform 32-bit words
BEVT_HOST_DEVICE U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(0xD2511F53u, c.x, &hi0);
    const uint32_t lo1 = philox_mulhilo(0xCD9E8D57u, c.z, &hi1);
    c = U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;  // Weyl key schedule
    k1 += 0xBB67AE85u;
  }
  return c;
}

// uniform float in [0, 1) with 24 random bits (every value exactly representable)
BEVT_HOST_DEVICE float philox_u01(uint32_t x) { return static_cast<float>(x >> 8) * (1.0f / 16777216.0f); }

// uniform integer in [0, n) for 0 < n <= 2^31: floor(x * n / 2^32); bias below n / 2^32 (< 1e-8 here)
BEVT_HOST_DEVICE int philox_below(uint32_t x, int n) {
  uint32_t hi;
  philox_mulhilo(x, static_cast<uint32_t>(n), &hi);
  return static_cast<int>(hi);
}

}  // namespace bevt
