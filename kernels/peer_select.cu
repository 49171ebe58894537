// Native selections of the peers that are functions of their scores (pooled: per-row cumulative
// gamma; xattn: sink + diagonal then tau), as a bitmap + row counts, and the CSR of a bitmap.
// The CPU spec: detail::cumulative_native / detail::xattn_native (lib/src/estimator*.cpp).
//
// One CTA per row (h, i): the row's rank keys (sort.cuh: value descending, ties lower j, NaN
// last) are bitonic-sorted in shared memory; the kept count is found with a block-wide scan of
// the sorted values in float64 (the CPU sums sequentially in float64: the two can differ only in
// the last bits, which moves a decision only when a prefix sum equals the threshold to ~1e-16).
#include "peer_tiles.cuh"
#include "sort.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace peer {
namespace {

using detail::bitonic_sort;
using detail::rank_key;

constexpr int SNT = 256;

__global__ void __launch_bounds__(SNT) native_select_kernel(const float* __restrict__ scores, int nb, int rule,
                                                            double thr, uint8_t* __restrict__ bitmap,
                                                            int32_t* __restrict__ counts) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int npow_max = pow2_ceil(nb);
  uint64_t* key = reinterpret_cast<uint64_t*>(smem_raw);           // [npow_max]
  uint8_t* flag = reinterpret_cast<uint8_t*>(key + npow_max);      // [nb]
  __shared__ int s_count;      // kept entries of the sorted order
  __shared__ int s_first_forced;
  __shared__ double s_base;

  const int tid = threadIdx.x;
  const int i = nb - 1 - int(blockIdx.x), h = blockIdx.y;  // longest rows first
  const int64_t row = int64_t(h) * nb + i;
  const float* w = scores + row * nb;
  const int n = i + 1, np = pow2_ceil(n);
  const bool xa = rule == 1;

  for (int j = tid; j < np; j += SNT) {
    uint64_t kj = ~0ull;
    if (j < n) kj = xa && (j == 0 || j == i) ? rank_key(-INFINITY, j) : rank_key(w[j], j);
    key[j] = kj;
  }
  for (int j = tid; j < nb; j += SNT) flag[j] = 0;
  if (tid == 0) {
    s_count = n;
    s_first_forced = n;
    if (xa) s_base = double(w[0]) + (i > 0 ? double(w[i]) : 0.0);
  }
  bitonic_sort(key, np);  // barriers before and after

  // Each thread owns a contiguous segment of the sorted positions [0, n).
  const int per = (n + SNT - 1) / SNT;
  const int r0 = tid * per < n ? tid * per : n, r1 = r0 + per < n ? r0 + per : n;
  auto val = [&](int r) { return double(w[uint32_t(key[r])]); };
  if (xa) {
    // Sorted position of the first forced entry (0 or i): the CPU's loop stops there.
    for (int r = r0; r < r1; ++r) {
      const int j = int(uint32_t(key[r]));
      if (j == 0 || j == i) {
        atomicMin(&s_first_forced, r);
        break;
      }
    }
  }
  double local = 0, pos_local = 0;
  for (int r = r0; r < r1; ++r) {
    const double v = val(r);
    local += v;
    if (v > 0) pos_local += v;
  }
  // Row total (xattn; the CPU sums in index order: same value up to the last bits) and the
  // total of the positive entries (cumulative).
  double row_total = 0, pos_total = 0;
  const double before = block_exclusive_scan<double>(local, &row_total);
  block_exclusive_scan<double>(pos_local, &pos_total);  // barriers: s_first_forced visible
  if (!xa) {
    // cover_indices: the first r with (prefix through r) >= thr * (positive total); none kept
    // when the positive total is 0; all n when never reached (NaN sums included).
    if (pos_total <= 0) {
      if (tid == 0) s_count = 0;
    } else {
      const double target = thr * pos_total;
      double acc = before;
      for (int r = r0; r < r1; ++r) {
        acc += val(r);
        if (acc >= target) {
          atomicMin(&s_count, r + 1);
          break;
        }
      }
    }
  } else {
    // xattn: rest entries r < first_forced are added while base + prefix before r < tau * total.
    const int rest = s_first_forced;
    const double target = thr * row_total;
    if (tid == 0) s_count = rest;  // never stopped early: every rest entry (overwritten below)
    __syncthreads();
    double acc = s_base + before;
    for (int r = r0; r < r1 && r < rest; ++r) {
      if (acc >= target) {
        atomicMin(&s_count, r);
        break;
      }
      acc += val(r);
    }
  }
  __syncthreads();
  const int cnt = s_count;
  for (int r = tid; r < cnt; r += SNT) flag[uint32_t(key[r])] = 1;
  __syncthreads();
  if (tid == 0) {
    flag[0] = 1;
    flag[i] = 1;
  }
  __syncthreads();
  int mine = 0;
  for (int j = tid; j < nb; j += SNT) {
    const uint8_t f = j <= i ? flag[j] : 0;
    bitmap[row * nb + j] = f;
    mine += f;
  }
  int total = 0;
  block_exclusive_scan<int>(mine, &total);
  if (tid == 0) counts[row] = total;
}

// indptr = exclusive scan of counts (one CTA, contiguous segments per thread).
__global__ void __launch_bounds__(1024) csr_indptr_kernel(const int32_t* __restrict__ counts, int64_t rows,
                                                          int32_t* __restrict__ indptr) {
  const int tid = threadIdx.x;
  const int64_t per = (rows + blockDim.x - 1) / blockDim.x;
  const int64_t r0 = tid * per < rows ? tid * per : rows, r1 = r0 + per < rows ? r0 + per : rows;
  long long local = 0;
  for (int64_t r = r0; r < r1; ++r) local += counts[r];
  long long total = 0;
  long long run = block_exclusive_scan<long long>(local, &total);
  for (int64_t r = r0; r < r1; ++r) {
    indptr[r] = int32_t(run);
    run += counts[r];
  }
  if (tid == 0) indptr[rows] = int32_t(total);
}

// One warp per row: the set j of the bitmap row, ascending, at indices[indptr[row] ..].
__global__ void csr_fill_kernel(const uint8_t* __restrict__ bitmap, int64_t rows, int nb,
                                const int32_t* __restrict__ indptr, int32_t* __restrict__ indices) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const uint8_t* b = bitmap + row * nb;
  int32_t at = indptr[row];
  for (int j0 = 0; j0 < nb; j0 += 32) {
    const int j = j0 + lane;
    const bool on = j < nb && b[j] != 0;
    const unsigned m = __ballot_sync(0xffffffffu, on);
    if (on) indices[at + __popc(m & ((1u << lane) - 1u))] = j;
    at += __popc(m);
  }
}

}  // namespace
}  // namespace peer

Status native_select(const NativeSelectParams& p) noexcept {
  if (!p.scores || !p.bitmap || !p.row_counts) return fail(Status::invalid_argument, "native_select: null pointer");
  if (p.heads <= 0 || p.heads > 65535 || p.num_blocks <= 0 || p.num_blocks > 16384)
    return fail(Status::invalid_argument, "native_select: heads must be in [1, 65535] and Nb in [1, 16384]");
  if (!(p.threshold > 0.0 && p.threshold <= 1.0)) return fail(Status::invalid_argument, "native_select: threshold outside (0, 1]");
  if (p.rule != NativeRule::cumulative && p.rule != NativeRule::xattn)
    return fail(Status::invalid_argument, "native_select: unknown rule");
  const size_t smem = size_t(peer::pow2_ceil(p.num_blocks)) * 8 + size_t(p.num_blocks);
  auto kern = peer::native_select_kernel;
  Status s = detail::from_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                               "native_select: cudaFuncSetAttribute");
  if (s != Status::ok) return s;
  kern<<<dim3(unsigned(p.num_blocks), unsigned(p.heads)), peer::SNT, smem, detail::stream_of(p.stream)>>>(
      p.scores, p.num_blocks, p.rule == NativeRule::xattn ? 1 : 0, p.threshold, p.bitmap, p.row_counts);
  return detail::check_launch("native_select launch");
}

Status csr_indptr(const CsrParams& p) noexcept {
  if (!p.row_counts || !p.indptr) return fail(Status::invalid_argument, "csr_indptr: null pointer");
  if (p.heads <= 0 || p.num_blocks <= 0) return fail(Status::invalid_argument, "csr_indptr: empty shape");
  const int64_t rows = int64_t(p.heads) * p.num_blocks;
  peer::csr_indptr_kernel<<<1, 1024, 0, detail::stream_of(p.stream)>>>(p.row_counts, rows, p.indptr);
  return detail::check_launch("csr_indptr launch");
}

Status csr_fill(const CsrParams& p) noexcept {
  if (!p.bitmap || !p.indptr || !p.indices) return fail(Status::invalid_argument, "csr_fill: null pointer");
  if (p.heads <= 0 || p.num_blocks <= 0) return fail(Status::invalid_argument, "csr_fill: empty shape");
  const int64_t rows = int64_t(p.heads) * p.num_blocks;
  const int64_t blocks = (rows + 7) / 8;
  if (blocks > 0x7fffffffLL) return fail(Status::invalid_argument, "csr_fill: too many rows");
  peer::csr_fill_kernel<<<unsigned(blocks), 256, 0, detail::stream_of(p.stream)>>>(p.bitmap, rows, p.num_blocks,
                                                                                   p.indptr, p.indices);
  return detail::check_launch("csr_fill launch");
}

}  // namespace proxyattn::kernels
