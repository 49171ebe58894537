// Dynamic per-head budget (ALGORITHMS.md step 4) on the device: the last query block's mass per
// key block p_h (block_scores with row_block_begin = Nb - 1) is ranked (descending, ties lower j,
// NaN last; the CPU order_desc rule) and k_h = fewest blocks whose prefix sum reaches
// gamma * sum of the positive entries, clamped to [min(k_min, Nb), Nb]. Sums in float64 in
// rank order, as count_to_coverage on the CPU.
#include "sort.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace detail {
namespace {

__global__ void budget_kernel(const float* __restrict__ mass, int nb, int npow, double gamma, int k_min,
                              int32_t* __restrict__ k_out, double* __restrict__ kept) {
  extern __shared__ uint64_t key[];
  const int h = blockIdx.x;
  const float* p = mass + int64_t(h) * nb;
  for (int j = threadIdx.x; j < npow; j += blockDim.x) key[j] = j < nb ? rank_key(p[j], j) : ~0ull;
  bitonic_sort(key, npow);
  // The values in rank order, in place of their keys: the serial float64 sums below (the CPU's
  // order, so the same k_h) then read shared memory, not scattered global loads.
  double* val = reinterpret_cast<double*>(key);
  for (int r = threadIdx.x; r < nb; r += blockDim.x) val[r] = double(p[uint32_t(key[r])]);
  __syncthreads();
  if (threadIdx.x == 0) {
    // Loads run 8 ahead of the dependent float64 adds (the chain is the cost; the order is kept).
    constexpr int U = 8;
    double total = 0;
    int r = 0;
    for (; r + U <= nb; r += U) {
      double v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) v[u] = val[r + u];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (v[u] > 0) total += v[u];
    }
    for (; r < nb; ++r)
      if (val[r] > 0) total += val[r];
    // count = fewest ranked blocks whose prefix reaches gamma * total; acc = that prefix.
    int64_t count = 0;
    double acc = 0;
    if (total > 0) {
      const double target = gamma * total;
      bool done = false;
      for (r = 0; r < nb && !done; r += U) {
        double v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = r + u < nb ? val[r + u] : 0.0;
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (!done && r + u < nb) {
            ++count;
            acc += v[u];
            done = acc >= target;
          }
      }
    }
    const int64_t lo = k_min < nb ? k_min : nb;
    const int64_t kh = count < lo ? lo : (count > nb ? nb : count);
    k_out[h] = int32_t(kh);
    if (kept) {  // the prefix sum of kh blocks: acc, extended when k_min raised kh above count
      double s = acc;
      for (int64_t x = count; x < kh; ++x) s += val[x];
      kept[h] = s;
    }
  }
}

}  // namespace
}  // namespace detail

Status dynamic_budget(const BudgetParams& p) noexcept {
  if (!p.mass || !p.k_out) return fail(Status::invalid_argument, "dynamic_budget: null pointer");
  if (p.heads <= 0 || p.num_blocks <= 0 || p.num_blocks > 16384)
    return fail(Status::invalid_argument, "dynamic_budget: heads must be > 0 and Nb in [1, 16384]");
  if (!(p.gamma > 0.0 && p.gamma <= 1.0)) return fail(Status::invalid_argument, "dynamic_budget: gamma outside (0, 1]");
  if (p.k_min < 1) return fail(Status::invalid_argument, "dynamic_budget: k_min must be >= 1");
  const int npow = detail::next_pow2(p.num_blocks);
  const size_t smem = size_t(npow) * sizeof(uint64_t);
  if (smem > 48 * 1024) {
    Status s = detail::from_cuda(
        cudaFuncSetAttribute(detail::budget_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "dynamic_budget: cudaFuncSetAttribute");
    if (s != Status::ok) return s;
  }
  detail::budget_kernel<<<p.heads, 256, smem, detail::stream_of(p.stream)>>>(p.mass, p.num_blocks, npow, p.gamma,
                                                                            p.k_min, p.k_out, p.kept);
  return detail::check_launch("dynamic_budget launch");
}

}  // namespace proxyattn::kernels
