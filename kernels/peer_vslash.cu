// `vslash` (MInference vertical-slash mapped to blocks; the CPU spec is detail::estimate_vslash
// in lib/src/estimator_peers.cpp), the whole estimator on the device:
//   1. row_lse of the last L queries (full.cu);
//   2. vslash_stats: one CTA per (128-key chunk, head) recomputes the probabilities of the L rows
//      against its keys (mma.sync), writes the column sums (vertical) and per-chunk diagonal sums
//      (slash partials, combined in chunk order by vslash_combine: deterministic);
//   3. vslash_topk: per head, the K-th best column / diagonal by a radix select over the 64-bit
//      rank keys (value descending, ties lower index: sort.cuh's rank_key, unique per entry), the
//      forced sink columns / local diagonals ranked as +inf like the CPU;
//   4. vslash_finish: kept-column mass per key block, prefix sums of the kept diagonal mass and
//      count over offsets (float64 / int);
//   5. vslash_blocks: per block (i, j) the score and the native bitmap, and the row counts.
#include <cmath>

#include "peer_tiles.cuh"
#include "sort.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace peer {
namespace {

using detail::rank_key;

constexpr int VBR = 64, VBK = 64, VKC = 128, VNT = 128, VLDP = VBK + 1;
constexpr int kMaxLastQ = 4096;

struct VArgs {
  const void* q;
  const void* k;
  int64_t qsh, qst, ksh, kst;
  int64_t n;
  int group;
  int L;    // last rows
  int nch;  // key chunks of VKC
  int W;    // slash partial width L + VKC - 1
  float scale_log2;
  const float* lse;  // [Hq, N] natural log, rows N-L.. valid
  float* vertical;   // [Hq, N]
  float* part;       // [Hq, nch, W]
};

template <int D, class T>
constexpr size_t stats_smem(int W) {
  return sizeof(T) * size_t(VBR + VBK) * D + sizeof(float) * (size_t(VBR) * VLDP + VKC + size_t(W));
}

template <int D, class T>
__global__ void __launch_bounds__(VNT) vslash_stats_kernel(const VArgs a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);                  // [VBR][D]
  T* sK = sQ + VBR * D;                                    // [VBK][D]
  float* sP = reinterpret_cast<float*>(sK + VBK * D);      // [VBR][VLDP]
  float* col = sP + VBR * VLDP;                            // [VKC] column sums of this chunk
  float* sl = col + VKC;                                   // [W] diagonal sums, offset obase + x

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int c = blockIdx.x, h = blockIdx.y, kvh = h / a.group;
  const int64_t n = a.n, k0 = int64_t(c) * VKC, r_first = n - a.L;
  const int64_t obase = r_first - (k0 + VKC - 1);  // smallest offset q - k this chunk can see
  const T* gq = static_cast<const T*>(a.q) + h * a.qsh;
  const T* gk = static_cast<const T*>(a.k) + kvh * a.ksh;
  for (int x = tid; x < VKC; x += VNT) col[x] = 0.f;
  for (int x = tid; x < a.W; x += VNT) sl[x] = 0.f;

  for (int rc = 0; rc * VBR < a.L; ++rc) {
    const int64_t qr0 = r_first + int64_t(rc) * VBR;
    const int64_t qr_end = qr0 + VBR < n ? qr0 + VBR : n;
    if (qr_end - 1 < k0) continue;  // every row of the chunk is before these keys
    __syncthreads();                // the previous row chunk is done with sQ, sK, sP
    load_rows<VBR, D, VNT>(sQ, gq, a.qst, qr0, 1, n, tid);
    cp_async_commit();
    float nl2[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int64_t row = qr0 + warp * 16 + (lane >> 2) + hr * 8;
      nl2[hr] = row < n ? -a.lse[int64_t(h) * n + row] * detail::kLog2e : -INFINITY;
    }
    for (int st = 0; st < VKC / VBK; ++st) {
      const int64_t kk0 = k0 + int64_t(st) * VBK;
      if (kk0 >= n || kk0 > qr_end - 1) break;
      if (st > 0) __syncthreads();  // the previous subtile is done with sK, sP
      load_rows<VBK, D, VNT>(sK, gk, a.kst, kk0, 1, n, tid);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      float acc[1][VBK / 8][4];
#pragma unroll
      for (int nt = 0; nt < VBK / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[0][nt][e] = 0.f;
      mma_tile<D, 1, VBK, T>(acc, sQ, sK, warp * 16, lane);
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int rl = warp * 16 + (lane >> 2) + hr * 8;
        const int64_t row = qr0 + rl;
#pragma unroll
        for (int nt = 0; nt < VBK / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int cl = nt * 8 + (lane & 3) * 2 + e;
            const float p = kk0 + cl <= row ? detail::ex2(fmaf(acc[0][nt][2 * hr + e], a.scale_log2, nl2[hr])) : 0.f;
            sP[rl * VLDP + cl] = p;
          }
      }
      __syncthreads();
      if (tid < VBK) {  // column sums
        float s = 0.f;
        for (int r = 0; r < VBR; ++r) s += sP[r * VLDP + tid];
        col[st * VBK + tid] += s;
      }
      // Diagonal sums: dlt = row - col inside the tile, offset o = qr0 - kk0 + dlt.
      for (int x = tid; x < VBR + VBK - 1; x += VNT) {
        const int dlt = x - (VBK - 1);
        const int rlo = dlt > 0 ? dlt : 0, rhi = VBK + dlt < VBR ? VBK + dlt : VBR;
        float s = 0.f;
        for (int r = rlo; r < rhi; ++r) s += sP[r * VLDP + (r - dlt)];
        const int64_t idx = qr0 - kk0 + dlt - obase;
        if (idx >= 0 && idx < a.W) sl[idx] += s;  // idx >= W only for rows past N (sum 0)
      }
    }
  }
  __syncthreads();
  for (int x = tid; x < VKC; x += VNT)
    if (k0 + x < n) a.vertical[int64_t(h) * n + k0 + x] = col[x] / float(a.L);
  float* pp = a.part + (int64_t(h) * a.nch + c) * a.W;
  for (int x = tid; x < a.W; x += VNT) pp[x] = sl[x];
}

// slash[h, o] = (sum over the chunks whose window covers o, in chunk order) / L.
__global__ void vslash_combine_kernel(const float* __restrict__ part, int heads, int64_t n, int L, int nch, int W,
                                      float* __restrict__ slash) {
  const int64_t total = int64_t(heads) * n;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < total; x += int64_t(gridDim.x) * blockDim.x) {
    const int64_t h = x / n, o = x - h * n;
    // Chunk c covers o when c * VKC lies in [n - L - VKC + 1 - o, n - 1 - o].
    int64_t c_lo = -floor_div(-(n - L - VKC + 1 - o), VKC), c_hi = floor_div(n - 1 - o, VKC);
    if (c_lo < 0) c_lo = 0;
    if (c_hi > nch - 1) c_hi = nch - 1;
    float s = 0.f;
    for (int64_t c = c_lo; c <= c_hi; ++c) {
      const int64_t idx = o - (n - L - c * VKC - VKC + 1);
      s += part[(h * nch + c) * W + idx];
    }
    slash[x] = s / float(L);
  }
}

__device__ __forceinline__ uint64_t vs_key(const float* v, int64_t t, int forced) {
  return rank_key(t < forced ? INFINITY : v[t], int(t));
}

// thr[h, which] = the K-th smallest rank key (K >= 1) of vertical (which 0) / slash (which 1);
// an entry is kept iff its key <= thr. Radix select over 8 bits per pass, per-warp histograms.
__global__ void __launch_bounds__(1024) vslash_topk_kernel(const float* __restrict__ vertical,
                                                           const float* __restrict__ slash, int64_t n, int sink,
                                                           int local, int64_t kv, int64_t ks,
                                                           unsigned long long* __restrict__ thr) {
  __shared__ int hist[32][256];
  __shared__ unsigned long long s_prefix;
  __shared__ long long s_rem;
  const int h = blockIdx.x, which = blockIdx.y, tid = threadIdx.x, warp = tid >> 5;
  const float* arr = (which ? slash : vertical) + int64_t(h) * n;
  const int forced = which ? local : sink;
  const int64_t K = which ? ks : kv;
  if (K <= 0) {
    if (tid == 0) thr[2 * h + which] = 0;
    return;
  }
  uint64_t prefix = 0, mask = 0;
  if (tid == 0) {
    s_prefix = 0;
    s_rem = K;
  }
  for (int pass = 0; pass < 8; ++pass) {
    const int shift = 56 - 8 * pass;
    for (int x = tid; x < 32 * 256; x += blockDim.x) (&hist[0][0])[x] = 0;
    __syncthreads();
    for (int64_t t = tid; t < n; t += blockDim.x) {
      const uint64_t key = vs_key(arr, t, forced);
      if ((key & mask) == prefix) atomicAdd(&hist[warp][(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (tid < 256) {
      int tot = 0;
      for (int w = 0; w < 32; ++w) tot += hist[w][tid];
      hist[0][tid] = tot;  // each thread reads and writes only its own bin
    }
    __syncthreads();
    if (tid == 0) {
      long long rem = s_rem, cum = 0;
      int digit = 255;
      for (int b = 0; b < 256; ++b) {
        if (cum + hist[0][b] >= rem) {
          digit = b;
          break;
        }
        cum += hist[0][b];
      }
      s_rem = rem - cum;
      s_prefix = prefix | (uint64_t(digit) << shift);
    }
    __syncthreads();
    prefix = s_prefix;
    mask |= uint64_t(255) << shift;
  }
  if (tid == 0) thr[2 * h + which] = prefix;
}

// Per head: kept-column mass / flag per key block; prefix sums (float64) and counts of the kept
// diagonals: pm[o + 1] = sum of kept slash[0..o], pc likewise.
__global__ void __launch_bounds__(1024) vslash_finish_kernel(const float* __restrict__ vertical,
                                                             const float* __restrict__ slash, int64_t n, int B, int nb,
                                                             int sink, int local, int64_t kv, int64_t ks,
                                                             const unsigned long long* __restrict__ thr,
                                                             double* __restrict__ colm, uint8_t* __restrict__ colk,
                                                             double* __restrict__ pm, int* __restrict__ pc) {
  const int h = blockIdx.x, tid = threadIdx.x;
  const float* v = vertical + int64_t(h) * n;
  const float* sl = slash + int64_t(h) * n;
  const uint64_t tv = thr[2 * h], ts = thr[2 * h + 1];
  for (int J = tid; J < nb; J += blockDim.x) {
    double m = 0;
    int any = 0;
    const int64_t t1 = int64_t(J + 1) * B < n ? int64_t(J + 1) * B : n;
    for (int64_t t = int64_t(J) * B; t < t1; ++t)
      if (kv > 0 && vs_key(v, t, sink) <= tv) {
        m += double(v[t]);
        any = 1;
      }
    colm[int64_t(h) * nb + J] = m;
    colk[int64_t(h) * nb + J] = uint8_t(any);
  }
  const int64_t per = (n + blockDim.x - 1) / blockDim.x;
  const int64_t o0 = tid * per < n ? tid * per : n, o1 = o0 + per < n ? o0 + per : n;
  double sm = 0;
  int cnt = 0;
  for (int64_t o = o0; o < o1; ++o)
    if (ks > 0 && vs_key(sl, o, local) <= ts) {
      sm += double(sl[o]);
      ++cnt;
    }
  double run = block_exclusive_scan<double>(sm, nullptr);
  int crun = block_exclusive_scan<int>(cnt, nullptr);
  double* pmh = pm + int64_t(h) * (n + 1);
  int* pch = pc + int64_t(h) * (n + 1);
  if (tid == 0) {
    pmh[0] = 0;
    pch[0] = 0;
  }
  for (int64_t o = o0; o < o1; ++o) {
    if (ks > 0 && vs_key(sl, o, local) <= ts) {
      run += double(sl[o]);
      ++crun;
    }
    pmh[o + 1] = run;
    pch[o + 1] = crun;
  }
}

// Row (h, i): score and native bitmap of every j (0 above the diagonal), and the row count.
__global__ void __launch_bounds__(128) vslash_blocks_kernel(int64_t n, int B, int nb, const double* __restrict__ colm,
                                                            const uint8_t* __restrict__ colk,
                                                            const double* __restrict__ pm, const int* __restrict__ pc,
                                                            float* __restrict__ out, uint8_t* __restrict__ bitmap,
                                                            int32_t* __restrict__ counts) {
  const int i = blockIdx.x, h = blockIdx.y;
  const int64_t qlast = (int64_t(i + 1) * B < n ? int64_t(i + 1) * B : n) - 1;
  const double* pmh = pm + int64_t(h) * (n + 1);
  const int* pch = pc + int64_t(h) * (n + 1);
  const int64_t row = int64_t(h) * nb + i;
  int kept = 0;
  for (int j = threadIdx.x; j < nb; j += blockDim.x) {
    if (j > i) {
      out[row * nb + j] = 0.f;
      bitmap[row * nb + j] = 0;
      continue;
    }
    const int64_t lo0 = int64_t(i) * B - int64_t(j + 1) * B + 1;
    const int64_t lo = lo0 > 0 ? lo0 : 0, hi = qlast - int64_t(j) * B;  // hi >= lo since j <= i
    const int cnt = pch[hi + 1] - pch[lo];
    out[row * nb + j] = float(colm[int64_t(h) * nb + j] + pmh[hi + 1] - pmh[lo]);
    const bool bm = colk[int64_t(h) * nb + j] || cnt > 0 || j == 0 || j == i;
    bitmap[row * nb + j] = bm ? 1 : 0;
    kept += bm ? 1 : 0;
  }
  int total = 0;
  block_exclusive_scan<int>(kept, &total);
  if (threadIdx.x == 0) counts[row] = total;
}

unsigned grid_1d(int64_t n, int threads) {
  const int64_t g = (n + threads - 1) / threads;
  return unsigned(g < 1 ? 1 : (g > 65535 * 8 ? 65535 * 8 : g));
}

template <int D, class T>
Status launch_stats(const VArgs& a, int heads, cudaStream_t st) {
  const size_t smem = stats_smem<D, T>(a.W);
  auto kern = vslash_stats_kernel<D, T>;
  Status s = detail::from_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                               "vslash_scores: cudaFuncSetAttribute");
  if (s != Status::ok) return s;
  kern<<<dim3(unsigned(a.nch), unsigned(heads)), VNT, smem, st>>>(a);
  return detail::check_launch("vslash_scores: stats launch");
}

template <class T>
Status dispatch_stats(const VArgs& a, int heads, int d, cudaStream_t st) {
  switch (d) {
    case 64: return launch_stats<64, T>(a, heads, st);
    case 128: return launch_stats<128, T>(a, heads, st);
    case 256: return launch_stats<256, T>(a, heads, st);
  }
  return fail(Status::unsupported, "vslash_scores: head_dim must be 64, 128 or 256");
}

}  // namespace
}  // namespace peer

Status vslash_scores(const VSlashParams& p) noexcept {
  peer::Operands o{};
  Status s = peer::make_operands(p.in, "vslash_scores", true, &o);
  if (s != Status::ok) return s;
  if (!peer::is_pow2(p.block)) return fail(Status::invalid_argument, "vslash_scores: block must be a power of two");
  if (p.last_q < 1) return fail(Status::invalid_argument, "vslash_scores: last_q must be >= 1");
  if (p.vertical < 0 || p.slash < 0 || p.sink_columns < 0 || p.local_diagonals < 0)
    return fail(Status::invalid_argument, "vslash_scores: negative vertical/slash/sink_columns/local_diagonals");
  if (!p.out || !p.bitmap || !p.row_counts) return fail(Status::invalid_argument, "vslash_scores: null out/bitmap/row_counts");
  const int64_t n = o.n, L64 = p.last_q < n ? p.last_q : n;
  if (L64 > peer::kMaxLastQ) return fail(Status::unsupported, "vslash_scores: last_q above 4096");
  const int64_t nb64 = (n + p.block - 1) / p.block;
  if (nb64 > 65535) return fail(Status::invalid_argument, "vslash_scores: too many blocks");
  const int H = p.in.q_heads, nb = int(nb64), L = int(L64);
  cudaStream_t st = detail::stream_of(p.stream);
  peer::Scratch scratch(st);

  peer::VArgs a{};
  a.q = o.q;
  a.k = o.k;
  a.qsh = o.qsh;
  a.qst = o.qst;
  a.ksh = o.ksh;
  a.kst = o.kst;
  a.n = n;
  a.group = o.group;
  a.L = L;
  a.nch = int((n + peer::VKC - 1) / peer::VKC);
  a.W = L + peer::VKC - 1;
  a.scale_log2 = (1.0f / std::sqrt(float(p.in.head_dim))) * detail::kLog2e;
  float *lse = nullptr, *vertical = p.vertical_out, *slash = p.slash_out, *part = nullptr;
  unsigned long long* thr = nullptr;
  double *pm = nullptr, *colm = nullptr;
  int* pc = nullptr;
  uint8_t* colk = nullptr;
  if ((s = scratch.get(&lse, size_t(H) * n, "vslash_scores: lse workspace")) != Status::ok) return s;
  if (!vertical && (s = scratch.get(&vertical, size_t(H) * n, "vslash_scores: vertical workspace")) != Status::ok) return s;
  if (!slash && (s = scratch.get(&slash, size_t(H) * n, "vslash_scores: slash workspace")) != Status::ok) return s;
  if ((s = scratch.get(&part, size_t(H) * a.nch * a.W, "vslash_scores: slash partials")) != Status::ok) return s;
  if ((s = scratch.get(&thr, size_t(2) * H, "vslash_scores: thresholds")) != Status::ok) return s;
  if ((s = scratch.get(&pm, size_t(H) * (n + 1), "vslash_scores: prefix mass")) != Status::ok) return s;
  if ((s = scratch.get(&pc, size_t(H) * (n + 1), "vslash_scores: prefix counts")) != Status::ok) return s;
  if ((s = scratch.get(&colm, size_t(H) * nb, "vslash_scores: column mass")) != Status::ok) return s;
  if ((s = scratch.get(&colk, size_t(H) * nb, "vslash_scores: column flags")) != Status::ok) return s;
  a.lse = lse;
  a.vertical = vertical;
  a.part = part;

  AttentionParams lp;
  lp.q = p.in.q;
  lp.k = p.in.k;
  lp.in_type = p.in.in_type;
  lp.q_heads = H;
  lp.kv_heads = p.in.kv_heads;
  lp.head_dim = p.in.head_dim;
  lp.seq_len = n;
  lp.q_stride_head = o.qsh;
  lp.q_stride_token = o.qst;
  lp.k_stride_head = o.ksh;
  lp.k_stride_token = o.kst;
  lp.lse = lse;
  lp.row_begin = n - L;
  lp.stream = p.stream;
  if ((s = row_lse(lp)) != Status::ok) return s;

  s = p.in.in_type == ElemType::bf16 ? peer::dispatch_stats<__nv_bfloat16>(a, H, p.in.head_dim, st)
                                     : peer::dispatch_stats<__half>(a, H, p.in.head_dim, st);
  if (s != Status::ok) return s;
  peer::vslash_combine_kernel<<<peer::grid_1d(int64_t(H) * n, 256), 256, 0, st>>>(part, H, n, L, a.nch, a.W, slash);
  if ((s = detail::check_launch("vslash_scores: combine launch")) != Status::ok) return s;
  const int64_t kv = p.vertical < n ? p.vertical : n, ks = p.slash < n ? p.slash : n;
  const int sink = int(p.sink_columns < n ? p.sink_columns : n), local = int(p.local_diagonals < n ? p.local_diagonals : n);
  peer::vslash_topk_kernel<<<dim3(unsigned(H), 2), 1024, 0, st>>>(vertical, slash, n, sink, local, kv, ks, thr);
  if ((s = detail::check_launch("vslash_scores: top-k launch")) != Status::ok) return s;
  peer::vslash_finish_kernel<<<unsigned(H), 1024, 0, st>>>(vertical, slash, n, p.block, nb, sink, local, kv, ks, thr, colm,
                                                           colk, pm, pc);
  if ((s = detail::check_launch("vslash_scores: finish launch")) != Status::ok) return s;
  peer::vslash_blocks_kernel<<<dim3(unsigned(nb), unsigned(H)), 128, 0, st>>>(n, p.block, nb, colm, colk, pm, pc, p.out,
                                                                              p.bitmap, p.row_counts);
  return detail::check_launch("vslash_scores: blocks launch");
}

}  // namespace proxyattn::kernels
