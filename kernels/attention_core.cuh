#pragma once
// The tile machinery shared by every attention-shaped kernel (full, sparse, row LSE, block
// scores): FlashAttention-2 style. One CTA owns BR = NW * MT * 16 query rows of one head; each
// warp owns MT m16 row tiles. Q sits in shared memory (or registers when small), K and V tiles
// of BKV keys stream through shared memory with cp.async, S = Q K^T and O += P V run on the
// tensor cores (mma.sync m16n8k16, fp32 accumulators), softmax statistics stay in registers.
//
// Shared-memory tiles are [rows][D] with the 16-byte chunk c of row r stored at c ^ (r & 7), so
// that the 8 row addresses of each ldmatrix hit 8 different bank groups.
#include <type_traits>

#include "common.cuh"

namespace proxyattn::kernels::detail {

// prefix: the output errors of several masks that are prefixes of one ranking, in one sparse
// pass (see prefix_error.cu).
enum class AttnMode : int { full = 0, sparse = 1, lse = 2, prefix = 3 };

struct AttnArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  int64_t qsh, qst, ksh, kst, vsh, vst, osh, ost;
  int64_t n;          // tokens
  int64_t row_begin;  // first query row computed
  int group;          // Hq / Hkv
  int num_q_tiles;    // CTAs along x
  float scale_log2;   // scale * log2(e)
  int out_f32;        // o is float32 (else the operand type)
  const int32_t* indptr;
  const int32_t* indices;
  int mask_block;  // B of the CSR mask
  int nb;          // Nb of the CSR mask
  // lse mode split over keys (short row ranges, e.g. the last block of the dynamic budget):
  // CTA z handles its share of the key tiles and writes (m, l) to part
  // [kv_splits, Hq, N - row_begin]; lse_combine_kernel finishes.
  int kv_splits;
  float2* part;
  // full mode: W > 0 = sliding window, query i sees keys (i - W, i]; 0 = plain causal.
  int window;
  // prefix mode: `indices` is a rank order in causal layout (row (h, i) at h Nb (Nb + 1) / 2 +
  // i (i + 1) / 2, blocks 0..i); mask m's row (h, i) is the first counts[(m Hq + h) Nb + i]
  // blocks of it; err[m Hq + h] += sum over the row block of (O_m - o_ref)^2.
  const float* o_ref;
  const int32_t* counts;
  int masks;
  double* err;
};

template <int D>
__device__ __forceinline__ int swz(int row, int col) {  // element offset of (row, col), col % 8 == 0
  return row * D + ((((col >> 3) ^ (row & 7))) << 3);
}

// Async copy of ROWS x D elements (rows [row0, row0 + ROWS) of a [N, D] strided matrix) into a
// swizzled tile; rows >= n are zero-filled. Each thread owns one 16-byte column chunk and every
// NT / (D / 8)-th row, so its addresses advance by constants (few live registers).
template <int ROWS, int D, int NT, class T>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t stride, int64_t row0, int64_t n, int tid) {
  constexpr int CH = D / 8;
  if constexpr (NT % CH == 0) {
    constexpr int RPP = NT / CH;  // rows per pass
    static_assert(ROWS % RPP == 0, "tile shape");
    const int ch = tid % CH, r0 = tid / CH;
    const T* src = g + (row0 + r0) * stride + ch * 8;
    const int64_t avail = n - row0 - r0;  // rows of this thread's column that exist
#pragma unroll
    for (int k = 0; k < ROWS / RPP; ++k) {
      const bool ok = k * RPP < avail;
      cp_async16(smem_u32(s + swz<D>(r0 + k * RPP, ch * 8)), ok ? src + int64_t(k * RPP) * stride : g, ok ? 16 : 0);
    }
  } else {
    // A width whose chunks do not divide the threads (d 384: the exact proxy's fp16 pieces):
    // one flat loop over the tile's chunks.
    for (int e = tid; e < ROWS * CH; e += NT) {
      const int r = e / CH, ch = e % CH;
      const bool ok = row0 + r < n;
      cp_async16(smem_u32(s + swz<D>(r, ch * 8)), ok ? g + (row0 + r) * stride + ch * 8 : g, ok ? 16 : 0);
    }
  }
}

template <int D, int MT, int NW, int BKV>
struct AttnConfig {
  static constexpr int BR = NW * MT * 16;
  static constexpr int NT = NW * 32;
  // Q fragments stay in registers when they are few (MT * D / 16 * 4 32-bit registers).
  static constexpr bool QREG = MT * D <= 128;
  // Q plus two K/V tiles (K and V, or two K buffers in lse mode / block scores), or four
  // (double-buffered K and V) with PIPE 1.
  template <class T>
  static constexpr size_t smem_bytes(int pipe = 0) {
    return sizeof(T) * (size_t(BR) * D + size_t(BKV) * D * (pipe ? 4 : 2));
  }
};

// S[mt][nt] (+)= Q K^T for one BKV-key tile held in sK.
template <int D, int MT, int BKV, bool QREG, class T>
__device__ __forceinline__ void qk_tile(float (&s)[MT][BKV / 8][4], const uint32_t (&qf)[QREG ? MT : 1][QREG ? D / 16 : 1][4],
                                        const T* sQ, const T* sK, int warp_row0, int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < BKV / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t qa[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if constexpr (QREG) {
#pragma unroll
        for (int e = 0; e < 4; ++e) qa[mt][e] = qf[mt][kk][e];
      } else {
        const int r = warp_row0 + mt * 16 + (lane & 15);
        ldmatrix_x4(qa[mt], smem_u32(sQ + swz<D>(r, kk * 16 + (lane >> 4) * 8)));
      }
    }
#pragma unroll
    for (int np = 0; np < BKV / 16; ++np) {
      uint32_t kb[4];
      const int r = np * 16 + (lane & 7) + ((lane >> 4) << 3);
      ldmatrix_x4(kb, smem_u32(sK + swz<D>(r, kk * 16 + ((lane >> 3) & 1) * 8)));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(s[mt][2 * np], qa[mt], kb[0], kb[1]);
        mma16816<T>(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
      }
    }
  }
}

template <int D, int MT, bool QREG, class T>
__device__ __forceinline__ void load_q_frags(uint32_t (&qf)[QREG ? MT : 1][QREG ? D / 16 : 1][4], const T* sQ,
                                             int warp_row0, int lane) {
  if constexpr (QREG) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int r = warp_row0 + mt * 16 + (lane & 15);
        ldmatrix_x4(qf[mt][kk], smem_u32(sQ + swz<D>(r, kk * 16 + (lane >> 4) * 8)));
      }
  }
}

// Key offset of tile t of this CTA. Full / lse: tiles 0, BKV, 2 BKV, ...; sparse: the sub-tiles
// of the CSR row's key blocks in order.
template <int BKV, AttnMode MODE, int SUBT, class L>
__device__ __forceinline__ int64_t tile_kv0(const AttnArgs& a, L lo, int t) {
  if constexpr (MODE == AttnMode::sparse || MODE == AttnMode::prefix) {
    const int j = __ldg(a.indices + lo + t / SUBT);
    return int64_t(j) * (SUBT * BKV) + int64_t(t % SUBT) * BKV;
  } else {
    return int64_t(t) * BKV;
  }
}

// prefix mode: the smallest prefix length > after among the masks of row (h, i) (INT_MAX: none).
__device__ __forceinline__ int next_prefix(const AttnArgs& a, int h, int i, int after) {
  int best = 0x7fffffff;
  for (int m = 0; m < a.masks; ++m) {
    const int c = __ldg(a.counts + (int64_t(m) * gridDim.y + h) * a.nb + i);
    if (c > after && c < best) best = c;
  }
  return best;
}

// prefix mode: the warp's squared error (sq: this lane's share) added to every mask whose row
// (h, i) ends after `count` blocks (row (h, i) of CTA (i, h); gridDim.y = Hq).
__device__ __forceinline__ void prefix_add_error(const AttnArgs& a, float sq, int h, int i, int count, int lane) {
  double w = sq;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) w += __shfl_xor_sync(0xffffffffu, w, off);
  if (lane == 0)
    for (int m = 0; m < a.masks; ++m)
      if (__ldg(a.counts + (int64_t(m) * gridDim.y + h) * a.nb + i) == count) atomicAdd(a.err + m * gridDim.y + h, w);
}

// prefix mode: the warp's rows normalised now (O / l; 0 where l = 0, as an empty row) against
// o_ref, the squared error summed and added to every mask whose row (h, i) ends here.
template <int D, int MT>
__device__ __forceinline__ void prefix_snapshot(const AttnArgs& a, const float (&o)[MT][D / 8][4],
                                                const float (&l)[MT][2], int h, int i, int64_t row_lo, int lane,
                                                int count) {
  float sq = 0.f;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const float lt = quad_sum(l[mt][hr]);
      const int64_t row = row_lo + mt * 16 + (lane >> 2) + hr * 8;
      if (row >= a.n) continue;
      const float inv = lt > 0.f ? 1.f / lt : 0.f;
      const float* ref = a.o_ref + h * a.osh + row * a.ost;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        const float2 r = __ldg(reinterpret_cast<const float2*>(ref + nt * 8 + (lane & 3) * 2));
        const float d0 = o[mt][nt][2 * hr] * inv - r.x, d1 = o[mt][nt][2 * hr + 1] * inv - r.y;
        sq = fmaf(d0, d0, fmaf(d1, d1, sq));
      }
    }
  prefix_add_error(a, sq, h, i, count, lane);
}

// PIPE 0: FlashAttention-2's schedule (one K and one V buffer; V(t) loads during S(t) and the
// softmax, K(t+1) during P(t) V(t); two barriers per tile). PIPE 1: K and V double-buffered,
// tile t+1 loads during all of tile t, one barrier per tile.
// LAZY: skip the O rescale when no row max of the warp moved (alpha == 1 for every row).
// SUBT (sparse): key tiles per mask block, B = SUBT * BKV.
// WIN (full): the sliding window a.window is applied (its own instantiation, so that the plain
// causal kernels keep their registers: the window's masking made the d 128 one spill).
template <int D, int MT, int NW, int BKV, class T, AttnMode MODE, int PIPE = 0, bool LAZY = false, int SUBT = 1,
          bool WIN = false>
__global__ void __launch_bounds__(NW * 32, 1) attn_kernel(const AttnArgs a) {
  using Cfg = AttnConfig<D, MT, NW, BKV>;
  constexpr int BR = Cfg::BR, NT = Cfg::NT;
  constexpr bool QREG = Cfg::QREG;
  constexpr bool WITH_V = MODE != AttnMode::lse;
  constexpr int NTILE = BKV / 8;  // n8 tiles of S per m-tile
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BR * D;  // lse mode: two K buffers
  T* sV = sK + BKV * D;
  constexpr bool DB = WITH_V && PIPE == 1;  // double-buffered K and V
  // DB layout: K0 K1 V0 V1.
  if constexpr (DB) sV = sK + 2 * BKV * D;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int h = blockIdx.y;
  const int kvh = h / a.group;
  // Heaviest query tiles first (causal work grows with the row), for a shorter tail.
  constexpr bool CSR = MODE == AttnMode::sparse || MODE == AttnMode::prefix;
  const int tile = CSR ? blockIdx.x : a.num_q_tiles - 1 - blockIdx.x;
  const int64_t q0 = a.row_begin + int64_t(tile) * BR;
  const T* gq = static_cast<const T*>(a.q) + h * a.qsh;
  const T* gk = static_cast<const T*>(a.k) + kvh * a.ksh;
  const T* gv = WITH_V ? static_cast<const T*>(a.v) + kvh * a.vsh : nullptr;

  // Keys this CTA may see: [0, kv_end).
  const int64_t kv_end = q0 + BR < a.n ? q0 + BR : a.n;
  int n_tiles;
  // Start of the row's block list: indptr (sparse, 32 bits), causal offset (prefix, 64 bits).
  std::conditional_t<MODE == AttnMode::prefix, int64_t, int> lo = 0;
  constexpr int sub = SUBT;
  int next_cut = 0;  // prefix mode: the next prefix length (blocks) where some mask's row ends
  if constexpr (MODE == AttnMode::prefix) {
    // Every block of the longest prefix in full (the diagonal one may sit anywhere in the
    // order; its tiles past kv_end are masked whole).
    const int i = int(q0 / a.mask_block);
    lo = int64_t(h) * a.nb * (a.nb + 1) / 2 + int64_t(i) * (i + 1) / 2;
    int longest = 0;
    for (int m = 0; m < a.masks; ++m) longest = max(longest, __ldg(a.counts + (int64_t(m) * gridDim.y + h) * a.nb + i));
    n_tiles = longest * sub;
    next_cut = next_prefix(a, h, i, -1);
  } else if constexpr (MODE == AttnMode::sparse) {
    const int i = int(q0 / a.mask_block);
    const int64_t r = int64_t(h) * a.nb + i;
    lo = __ldg(a.indptr + r);
    const int hi = __ldg(a.indptr + r + 1);
    n_tiles = 0;
    if (hi > lo) {
      // Only the last (largest) key block can reach past kv_end (diagonal block with BR < B,
      // or the partial last block): count its valid sub-tiles.
      const int64_t jl = int64_t(__ldg(a.indices + hi - 1)) * a.mask_block;
      int64_t vs = (kv_end - jl + BKV - 1) / BKV;
      vs = vs < 0 ? 0 : (vs > sub ? sub : vs);
      n_tiles = (hi - lo - 1) * sub + int(vs);
    }
  } else {
    n_tiles = int((kv_end + BKV - 1) / BKV);
  }
  int t_begin = 0, t_end = n_tiles;
  if constexpr (MODE == AttnMode::full && WIN) {
    // Sliding window: key tiles wholly left of the first row's window are never loaded.
    if (q0 - a.window + 1 > 0) t_begin = int((q0 - a.window + 1) / BKV);
  }
  if constexpr (MODE == AttnMode::lse) {
    if (a.kv_splits > 1) {
      const int per = (n_tiles + a.kv_splits - 1) / a.kv_splits;
      t_begin = min(int(blockIdx.z) * per, n_tiles);
      t_end = min(t_begin + per, n_tiles);
    }
  }

  load_tile<BR, D, NT>(sQ, gq, a.qst, q0, a.n, tid);
  cp_async_commit();
  if (t_begin < t_end) {
    const int64_t kv00 = tile_kv0<BKV, MODE, SUBT>(a, lo, t_begin);
    load_tile<BKV, D, NT>(sK, gk, a.kst, kv00, a.n, tid);
    if constexpr (DB) load_tile<BKV, D, NT>(sV, gv, a.vst, kv00, a.n, tid);
  }
  cp_async_commit();

  const int warp_row0 = warp * MT * 16;
  uint32_t qf[QREG ? MT : 1][QREG ? D / 16 : 1][4];
  if constexpr (QREG) {
    cp_async_wait<1>();
    __syncthreads();
    load_q_frags<D, MT, QREG>(qf, sQ, warp_row0, lane);
  }

  float o[WITH_V ? MT : 1][WITH_V ? D / 8 : 1][4];
  if constexpr (WITH_V) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mt][nt][e] = 0.f;
  }
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      m[mt][hr] = -INFINITY;
      l[mt][hr] = 0.f;
    }
  const int64_t row_lo = q0 + warp_row0;  // smallest row of this warp
  if constexpr (MODE == AttnMode::prefix) {
    if (next_cut == 0) {  // masks whose row is empty: O = 0
      const int i = int(q0 / a.mask_block);
      prefix_snapshot<D, MT>(a, o, l, h, i, row_lo, lane, 0);
      next_cut = next_prefix(a, h, i, 0);
    }
  }

  for (int t = t_begin; t < t_end; ++t) {
    const int64_t kv0 = tile_kv0<BKV, MODE, SUBT>(a, lo, t);
    const int par = (t - t_begin) & 1;  // buffer of tile t where double-buffered
    const T* sKt = (MODE == AttnMode::lse || DB) ? sK + par * BKV * D : sK;
    const T* sVt = DB ? sV + par * BKV * D : sV;
    cp_async_wait<0>();
    __syncthreads();  // K(t) (and Q) landed; every warp finished tile t-1
    if constexpr (DB) {
      if (t + 1 < t_end) {
        const int64_t kvn = tile_kv0<BKV, MODE, SUBT>(a, lo, t + 1);
        load_tile<BKV, D, NT>(sK + (par ^ 1) * BKV * D, gk, a.kst, kvn, a.n, tid);
        load_tile<BKV, D, NT>(sV + (par ^ 1) * BKV * D, gv, a.vst, kvn, a.n, tid);
      }
      cp_async_commit();
    } else if constexpr (WITH_V) {
      load_tile<BKV, D, NT>(sV, gv, a.vst, kv0, a.n, tid);
      cp_async_commit();
    } else {
      if (t + 1 < t_end)
        load_tile<BKV, D, NT>(sK + (par ^ 1) * BKV * D, gk, a.kst, tile_kv0<BKV, MODE, SUBT>(a, lo, t + 1), a.n, tid);
      cp_async_commit();
    }

    float s[MT][NTILE][4];
    qk_tile<D, MT, BKV, QREG, T>(s, qf, sQ, sKt, warp_row0, lane);

    // Causal mask, only where some key of the tile lies after some row of this warp. Keys
    // >= N only meet rows >= N, which are never stored. With a window, also where some key of
    // the tile lies at or left of row - W for some row of the warp (key - row <= -W).
    const bool cut_right = kv0 + BKV - 1 > row_lo;
    const bool cut_left = WIN && kv0 + a.window <= row_lo + MT * 16 - 1;
    if (cut_right || cut_left) {
      // (key - row) in 32 bits: N < 2^31 is checked by the launcher.
      const int d0 = int(kv0 - row_lo) + (lane & 3) * 2 - (lane >> 2);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NTILE; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int dk = d0 + nt * 8 + (e & 1) - mt * 16 - (e >> 1) * 8;
            if (dk > 0 || (WIN && dk <= -a.window)) s[mt][nt][e] = -INFINITY;
          }
    }

    // Online softmax in base 2: m in units of scale*log2(e)*score.
    float alpha[MT][2];
    bool moved = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NTILE; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hr], s[mt][nt][2 * hr + 1]));
        mx = quad_max(mx);
        const float m_new = fmaxf(m[mt][hr], mx * a.scale_log2);
        const float base = m_new == -INFINITY ? 0.f : m_new;  // fully masked row so far: no NaN
        alpha[mt][hr] = ex2(m[mt][hr] - base);
        moved |= alpha[mt][hr] != 1.f;
        m[mt][hr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NTILE; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = ex2(fmaf(s[mt][nt][2 * hr + e], a.scale_log2, -base));
            s[mt][nt][2 * hr + e] = p;
            sum += p;
          }
        l[mt][hr] = l[mt][hr] * alpha[mt][hr] + sum;
      }
    if constexpr (WITH_V) {
      if (!LAZY || __any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < D / 8; ++nt) {
            o[mt][nt][0] *= alpha[mt][0];
            o[mt][nt][1] *= alpha[mt][0];
            o[mt][nt][2] *= alpha[mt][1];
            o[mt][nt][3] *= alpha[mt][1];
          }
      }
    }

    if constexpr (WITH_V) {
      if constexpr (!DB) {
        cp_async_wait<0>();
        __syncthreads();  // V(t) landed; every warp is done reading K(t)
        if (t + 1 < t_end)
          load_tile<BKV, D, NT>(sK, gk, a.kst, tile_kv0<BKV, MODE, SUBT>(a, lo, t + 1), a.n, tid);
        cp_async_commit();
      }
#pragma unroll
      for (int kt = 0; kt < BKV / 16; ++kt) {
        uint32_t pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          pa[mt][0] = Vec2<T>::pack(s[mt][2 * kt][0], s[mt][2 * kt][1]);
          pa[mt][1] = Vec2<T>::pack(s[mt][2 * kt][2], s[mt][2 * kt][3]);
          pa[mt][2] = Vec2<T>::pack(s[mt][2 * kt + 1][0], s[mt][2 * kt + 1][1]);
          pa[mt][3] = Vec2<T>::pack(s[mt][2 * kt + 1][2], s[mt][2 * kt + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t vb[4];
          const int r = kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          ldmatrix_x4_trans(vb, smem_u32(sVt + swz<D>(r, dp * 16 + (lane >> 4) * 8)));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816<T>(o[mt][2 * dp], pa[mt], vb[0], vb[1]);
            mma16816<T>(o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
          }
        }
      }
    }
    if constexpr (MODE == AttnMode::prefix) {
      if ((t + 1) % sub == 0 && (t + 1) / sub == next_cut) {  // the first next_cut blocks done
        const int i = int(q0 / a.mask_block);
        prefix_snapshot<D, MT>(a, o, l, h, i, row_lo, lane, next_cut);
        next_cut = next_prefix(a, h, i, next_cut);
      }
    }
  }
  cp_async_wait<0>();  // nothing in flight at exit

  // Epilogue: O / l and lse = (m + log2 l) ln 2.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float lt = l[mt][hr];
      lt = quad_sum(lt);
      const int64_t row = row_lo + mt * 16 + (lane >> 2) + hr * 8;
      if (row >= a.n) continue;
      if (MODE == AttnMode::lse && a.kv_splits > 1) {
        if ((lane & 3) == 0) {
          const int64_t rows = a.n - a.row_begin;
          a.part[(int64_t(blockIdx.z) * gridDim.y + h) * rows + (row - a.row_begin)] = make_float2(m[mt][hr], lt);
        }
        continue;
      }
      if (a.lse && (lane & 3) == 0)
        a.lse[int64_t(h) * a.n + row] = lt > 0.f ? (m[mt][hr] + log2f(lt)) * kLn2 : -INFINITY;
      if constexpr (WITH_V) {
        if (a.o) {
          const float inv = lt > 0.f ? 1.f / lt : 0.f;
          if (a.out_f32) {
            float* go = static_cast<float*>(a.o) + h * a.osh + row * a.ost;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
              const int col = nt * 8 + (lane & 3) * 2;
              *reinterpret_cast<float2*>(go + col) =
                  make_float2(o[mt][nt][2 * hr] * inv, o[mt][nt][2 * hr + 1] * inv);
            }
          } else {
            T* go = static_cast<T*>(a.o) + h * a.osh + row * a.ost;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
              const int col = nt * 8 + (lane & 3) * 2;
              *reinterpret_cast<uint32_t*>(go + col) = Vec2<T>::pack(o[mt][nt][2 * hr] * inv, o[mt][nt][2 * hr + 1] * inv);
            }
          }
        }
      }
    }
}

// ---- block scores: second pass of the oracle mass / ProxyAttn max-pool --------------------------
struct BlockScoreArgs {
  const void* q;
  const void* k;
  const float* lse;
  float* out;
  int64_t qsh, qst, ksh, kst;
  int64_t n;
  int group;
  int nb;
  int row_block_begin;
  int out_rows;  // Nb - row_block_begin
  int query_stride;
  int reduce_max;
  float scale_log2;
  int key_splits;  // CTA z of a row block handles key blocks [z*ceil(Nb/splits), ...)
};

// One CTA per (query block i, head h); BR == mask block B. K tiles double-buffered.
template <int D, int MT, int NW, int BKV, class T>
__global__ void __launch_bounds__(NW * 32, 1) block_score_kernel(const BlockScoreArgs a) {
  using Cfg = AttnConfig<D, MT, NW, BKV>;
  constexpr int BR = Cfg::BR, NT = Cfg::NT;
  constexpr bool QREG = Cfg::QREG;
  constexpr int NTILE = BKV / 8;
  constexpr int SUB = BR / BKV;  // key tiles per key block
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BR * D;
  __shared__ float red[NW];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int h = blockIdx.y;
  const int kvh = h / a.group;
  const int nblk = a.nb - a.row_block_begin;
  const int i = a.row_block_begin + (nblk - 1 - int(blockIdx.x));  // heaviest rows first
  const int64_t q0 = int64_t(i) * BR;
  const T* gq = static_cast<const T*>(a.q) + h * a.qsh;
  const T* gk = static_cast<const T*>(a.k) + kvh * a.ksh;
  const int64_t kv_end = q0 + BR < a.n ? q0 + BR : a.n;
  const int n_tiles = int((kv_end + BKV - 1) / BKV);
  const int warp_row0 = warp * MT * 16;
  const int64_t row_lo = q0 + warp_row0;
  // Key blocks [j0, j1) of this CTA; tiles [t0, t1) of them that are causal for block i.
  const int kb_per = (a.nb + a.key_splits - 1) / a.key_splits;
  const int j0 = min(int(blockIdx.z) * kb_per, a.nb), j1 = min(j0 + kb_per, a.nb);
  const int t0 = min(j0 * SUB, n_tiles), t1 = min(min(j1, i + 1) * SUB, n_tiles);

  load_tile<BR, D, NT>(sQ, gq, a.qst, q0, a.n, tid);
  cp_async_commit();
  if (t0 < t1) load_tile<BKV, D, NT>(sK, gk, a.kst, int64_t(t0) * BKV, a.n, tid);
  cp_async_commit();

  // Per-row -lse in base 2; +inf for rows not scored (past N or off the query stride) so that
  // their probabilities vanish.
  float nl2[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int64_t row = row_lo + mt * 16 + (lane >> 2) + hr * 8;
      const bool use = row < a.n && ((row - q0) % a.query_stride) == 0;
      nl2[mt][hr] = use ? a.lse[int64_t(h) * a.n + row] * kLog2e : INFINITY;
    }
  int rows_used = 0;  // scored rows of this block (mean divisor)
  for (int64_t r = q0; r < kv_end; r += a.query_stride) ++rows_used;

  uint32_t qf[QREG ? MT : 1][QREG ? D / 16 : 1][4];
  if constexpr (QREG) {
    cp_async_wait<1>();
    __syncthreads();
    load_q_frags<D, MT, QREG>(qf, sQ, warp_row0, lane);
  }

  float* orow = a.out + (int64_t(h) * a.out_rows + (i - a.row_block_begin)) * a.nb;
  float acc = 0.f;
  for (int t = t0; t < t1; ++t) {
    const int64_t kv0 = int64_t(t) * BKV;
    const int par = (t - t0) & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < t1) load_tile<BKV, D, NT>(sK + (par ^ 1) * BKV * D, gk, a.kst, kv0 + BKV, a.n, tid);
    cp_async_commit();

    float s[MT][NTILE][4];
    qk_tile<D, MT, BKV, QREG, T>(s, qf, sQ, sK + par * BKV * D, warp_row0, lane);
    const bool need_mask = kv0 + BKV - 1 > row_lo;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NTILE; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float p = ex2(fmaf(s[mt][nt][e], a.scale_log2, -nl2[mt][e >> 1]));
          if (need_mask) {
            const int64_t row = row_lo + mt * 16 + (lane >> 2) + (e >> 1) * 8;
            const int64_t col = kv0 + nt * 8 + (lane & 3) * 2 + (e & 1);
            if (col > row) p = 0.f;
          }
          acc = a.reduce_max ? fmaxf(acc, p) : acc + p;
        }

    const int j = int(kv0 / BR);
    if ((t + 1) % SUB == 0 || t + 1 == n_tiles) {  // key block j complete
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const float x = __shfl_xor_sync(0xffffffffu, acc, off);
        acc = a.reduce_max ? fmaxf(acc, x) : acc + x;
      }
      if (lane == 0) red[warp] = acc;
      __syncthreads();
      if (tid == 0) {
        float tot = red[0];
        for (int w = 1; w < NW; ++w) tot = a.reduce_max ? fmaxf(tot, red[w]) : tot + red[w];
        orow[j] = a.reduce_max ? tot : (rows_used > 0 ? tot / float(rows_used) : 0.f);
      }
      acc = 0.f;
      // red[] is rewritten only after the next block's tiles, each behind a __syncthreads.
    }
  }
  cp_async_wait<0>();
  for (int j = max(j0, i + 1) + tid; j < j1; j += NT) orow[j] = 0.f;
}

}  // namespace proxyattn::kernels::detail
