// Block selection on the device (select.hpp's rule): per head h and query block i, the forced
// blocks (sink 0, diagonal i, window i-1..i-w), then the best remaining causal blocks by score
// (descending, ties lower j, NaN last) until the row holds max(forced, min(budget, i + 1)).
// select_counts writes the CSR indptr (row counts depend only on budgets and options, then one
// block-wide scan); select_fill ranks each (score head, row) once with a bitonic sort shared by
// the query heads of that score head and writes each head's sorted key-block ids.
#include "sort.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace detail {
namespace {

struct SelArgs {
  const float* scores;
  int score_heads, heads, nb;
  const int32_t* row_k;
  const int32_t* head_k;
  int mode;
  int sink, diag, window;
  int32_t* indptr;
  int32_t* indices;
};

__device__ __forceinline__ int row_budget(const SelArgs& a, int h, int i) {
  if (a.row_k) return a.row_k[int64_t(h) * a.nb + i];
  const int k = a.head_k[h];
  if (a.mode == 0) return k > 1 ? k : 1;
  const int64_t p = (int64_t(k) * (i + 1) + a.nb - 1) / a.nb;
  return p > 1 ? int(p) : 1;
}
__device__ __forceinline__ bool is_forced(const SelArgs& a, int i, int j) {
  return (a.sink && j == 0) || (a.diag && j == i) || (j < i && j >= i - a.window);
}
__device__ __forceinline__ int forced_count(const SelArgs& a, int i) {
  const int w0 = i - a.window > 0 ? i - a.window : 0;  // window covers [w0, i-1]
  const int win = a.window > 0 ? i - w0 : 0;
  const bool zero_covered = (a.diag && i == 0) || (a.window > 0 && i >= 1 && w0 == 0);
  return win + (a.diag ? 1 : 0) + ((a.sink && !zero_covered) ? 1 : 0);
}
__device__ __forceinline__ int row_total(const SelArgs& a, int h, int i) {
  const int64_t b = row_budget(a, h, i);
  const int64_t m = b < i + 1 ? b : i + 1;
  const int nf = forced_count(a, i);
  return int(m > nf ? m : nf);
}

// Exclusive scan of one int per thread over the block (blockDim.x multiple of 32, <= 1024);
// *total receives the block sum.
__device__ int block_exclusive_scan(int x, int* total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int incl = x;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += y;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int v = lane < nw ? warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, v, off);
      if (lane >= off) v += y;
    }
    if (lane < nw) warp_sums[lane] = v;  // inclusive over warps
  }
  __syncthreads();
  const int before = warp > 0 ? warp_sums[warp - 1] : 0;
  *total = warp_sums[nw - 1];
  __syncthreads();  // warp_sums reusable by the next call
  return before + incl - x;
}

__global__ void __launch_bounds__(1024) counts_kernel(const SelArgs a) {
  const int64_t rows = int64_t(a.heads) * a.nb;
  int64_t carry = 0;
  if (threadIdx.x == 0) a.indptr[0] = 0;
  for (int64_t base = 0; base < rows; base += blockDim.x) {
    const int64_t r = base + threadIdx.x;
    const int c = r < rows ? row_total(a, int(r / a.nb), int(r % a.nb)) : 0;
    int tot;
    const int ex = block_exclusive_scan(c, &tot);
    if (r < rows) a.indptr[r + 1] = int32_t(carry + ex + c);
    carry += tot;
  }
}

__global__ void __launch_bounds__(256) fill_kernel(const SelArgs a, int npow) {
  extern __shared__ uint64_t key[];
  uint8_t* flag = reinterpret_cast<uint8_t*>(key + npow);
  const int sh = blockIdx.y, i = blockIdx.x;
  const int n = i + 1;
  const int hps = a.heads / a.score_heads;
  const float* srow = a.scores + (int64_t(sh) * a.nb + i) * a.nb;
  int np = 1;
  while (np < n) np <<= 1;
  // Forced blocks first (top word 0), then by score; padding last.
  for (int j = threadIdx.x; j < np; j += blockDim.x)
    key[j] = j < n ? (is_forced(a, i, j) ? uint64_t(j) : rank_key(srow[j], j)) : ~0ull;
  bitonic_sort(key, np);
  const int chunk = (n + blockDim.x - 1) / blockDim.x;
  const int j0 = threadIdx.x * chunk, j1 = j0 + chunk < n ? j0 + chunk : n;
  for (int h = sh * hps; h < (sh + 1) * hps; ++h) {
    const int total = row_total(a, h, i);
    for (int j = threadIdx.x; j < n; j += blockDim.x) flag[j] = 0;
    __syncthreads();
    for (int r = threadIdx.x; r < total; r += blockDim.x) flag[uint32_t(key[r])] = 1;
    __syncthreads();
    int local = 0;
    for (int j = j0; j < j1; ++j) local += flag[j];
    int tot;
    const int off = block_exclusive_scan(local, &tot);
    int32_t* out = a.indices + a.indptr[int64_t(h) * a.nb + i] + off;
    for (int j = j0; j < j1; ++j)
      if (flag[j]) *out++ = j;
    __syncthreads();  // flags rewritten for the next head
  }
}

}  // namespace
}  // namespace detail

namespace {
Status make_sel_args(const SelectParams& p, detail::SelArgs* a) {
  if (p.heads <= 0 || p.score_heads <= 0 || p.heads % p.score_heads != 0)
    return fail(Status::invalid_argument, "select: heads must be a positive multiple of score_heads");
  if (p.num_blocks <= 0 || p.num_blocks > 16384) return fail(Status::invalid_argument, "select: Nb outside [1, 16384]");
  if (!p.row_k && !p.head_k) return fail(Status::invalid_argument, "select: row_k or head_k required");
  if (p.mode != 0 && p.mode != 1) return fail(Status::invalid_argument, "select: mode must be 0 or 1");
  if (p.local_window < 0) return fail(Status::invalid_argument, "select: local_window must be >= 0");
  if (!p.indptr) return fail(Status::invalid_argument, "select: null indptr");
  if (int64_t(p.heads) * p.num_blocks * p.num_blocks > 0x7fffffffLL)
    return fail(Status::invalid_argument, "select: mask could exceed int32 indices");
  *a = detail::SelArgs{p.scores, p.score_heads, p.heads, p.num_blocks, p.row_k, p.head_k, p.mode,
                       p.sink ? 1 : 0, p.diagonal ? 1 : 0, p.local_window, p.indptr, p.indices};
  return Status::ok;
}
}  // namespace

Status select_counts(const SelectParams& p) noexcept {
  detail::SelArgs a{};
  Status s = make_sel_args(p, &a);
  if (s != Status::ok) return s;
  detail::counts_kernel<<<1, 1024, 0, detail::stream_of(p.stream)>>>(a);
  return detail::check_launch("select_counts launch");
}

Status select_fill(const SelectParams& p) noexcept {
  detail::SelArgs a{};
  Status s = make_sel_args(p, &a);
  if (s != Status::ok) return s;
  if (!p.scores || !p.indices) return fail(Status::invalid_argument, "select_fill: null scores/indices");
  const int npow = detail::next_pow2(p.num_blocks);
  const size_t smem = size_t(npow) * (sizeof(uint64_t) + 1);
  if (smem > 48 * 1024) {
    s = detail::from_cuda(
        cudaFuncSetAttribute(detail::fill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "select_fill: cudaFuncSetAttribute");
    if (s != Status::ok) return s;
  }
  const dim3 grid{unsigned(p.num_blocks), unsigned(p.score_heads), 1u};
  detail::fill_kernel<<<grid, 256, smem, detail::stream_of(p.stream)>>>(a, npow);
  return detail::check_launch("select_fill launch");
}

}  // namespace proxyattn::kernels
