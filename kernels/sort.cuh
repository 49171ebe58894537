#pragma once
// Block-wide helpers for ranking scores deterministically: a 64-bit key whose ascending order is
// descending score, NaN last, ties by lower index (the CPU order_desc / select rule), and an
// in-shared-memory bitonic sort of such keys.
#include "common.cuh"

namespace proxyattn::kernels::detail {

// Ascending key order = descending value; -0 == +0; NaN after every number.
__device__ __forceinline__ uint64_t rank_key(float v, int idx) {
  uint32_t top;
  if (isnan(v)) {
    top = 0xffffffffu;
  } else {
    if (v == 0.f) v = 0.f;  // fold -0 into +0 (they compare equal on the CPU)
    const uint32_t u = __float_as_uint(v);
    const uint32_t ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending in v
    top = ~ord;  // descending in v; never 0xffffffff for a number
  }
  return (uint64_t(top) << 32) | uint32_t(idx);
}

// Ascending bitonic sort of n (power of two) keys in shared memory by the whole block.
__device__ __forceinline__ void bitonic_sort(uint64_t* key, int n) {
  for (int size = 2; size <= n; size <<= 1)
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int t = threadIdx.x; t < (n >> 1); t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool asc = (lo & size) == 0;
        const uint64_t x = key[lo], y = key[hi];
        if ((x > y) == asc) {
          key[lo] = y;
          key[hi] = x;
        }
      }
    }
  __syncthreads();
}

inline int next_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace proxyattn::kernels::detail
