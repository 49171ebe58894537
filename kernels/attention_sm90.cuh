#pragma once
// Hopper attention (sm_90a): full causal and CSR block-sparse, FlashAttention-3-shaped.
//
// One CTA = one 128-row query tile of one head, three warpgroups:
//   warpgroup 0, producer: gives back registers (setmaxnreg.dec) and one thread streams Q once,
//     then K and V tiles (128 keys) through a 2-stage ring with TMA (128-byte swizzle),
//     each stage guarded by a "full" mbarrier (TMA bytes) and an "empty" one (consumers done);
//   warpgroups 1 and 2, consumers: 64 query rows each; S = Q K^T with wgmma (Q and K from
//     shared memory), masked online softmax in registers (base 2, fp32), P rounded to the
//     operand type and fed to O += P V straight from registers (wgmma with A in registers,
//     V transposed by the instruction). K's stage is released as soon as S is done, V's after
//     P V. Within a warpgroup the softmax of tile t overlaps P_{t-1} V_{t-1} on the tensor
//     cores (see the loop); the two consumer warpgroups run independently.
// Key tiles are walked from the diagonal down (full) or over the CSR row of the query block
// (sparse, mask block 128 = the tile); the causal mask is applied to whichever tile reaches past
// the row (in prefix mode the diagonal block may come anywhere in the rank order).
// prefix mode (prefix_error.cu): the output errors of several masks that are prefixes of one
// ranking in one pass; after each prefix length where some mask's row ends, O / l is compared
// with the full output (attention_core.cuh's contract, on these tiles).
// Numerics match attn_kernel (attention_core.cuh): fp32 accumulation, row sum of the unrounded
// probabilities, O = acc / l, lse natural log; a row with no blocks gives O = 0, lse = -inf.
#include "attention_core.cuh"
#include "sm90.cuh"

namespace proxyattn::kernels::detail {

// What one launch computes: O and lse (full / sparse), lse only (the first pass of the scores),
// the token-level max-pool of P per (query block, key block) (second pass, needs lse), the
// block mass (the mean over a block's rows of P summed over the key block; needs lse), or the
// statistics of every (query row, key tile) that all block scores are functions of (one pass;
// tile_scores.cu reduces them).
enum class Sm90Mode : int { full = 0, sparse = 1, lse = 2, blockmax = 3, tilestats = 4, prefix = 5, blockmass = 6 };

constexpr bool sm90_with_v(Sm90Mode m) { return m == Sm90Mode::full || m == Sm90Mode::sparse || m == Sm90Mode::prefix; }

// Shared memory: Q, the K (and V) stages, the barriers, then per-tile results (blockmax: one
// float per key tile; blockmass: one per key tile and consumer warp, summed in a fixed order).
// The score modes (no V) also take head_dim 256 (the exact proxy's fp16 [hi, lo] pieces).
template <int D, bool V = true>
struct Sm90Config {
  static constexpr int BM = 128;  // query rows: 2 consumer warpgroups x 64
  static constexpr int BN = 128;  // keys per tile (= the sparse mask block)
  static constexpr int STAGES = 2;
  static constexpr int THREADS = 384;
  static constexpr int BOX = 64;  // TMA box: 64 elements (128 B) x 64 rows
  static constexpr int Q_BYTES = BM * D * 2;
  static constexpr int KV_BYTES = BN * D * 2;
  static constexpr int Q_OFF = 0;
  static constexpr int K_OFF = Q_OFF + Q_BYTES;
  static constexpr int V_OFF = K_OFF + STAGES * KV_BYTES;
  static constexpr int BAR_OFF = V_OFF + (V ? STAGES * KV_BYTES : 0);
  static constexpr int NUM_BARS = 1 + 4 * STAGES;  // q_full, k_full, v_full, k_empty, v_empty
  static constexpr int TILE_OFF = BAR_OFF + 8 * NUM_BARS;  // per-tile results
  static constexpr int MAX_KEY_TILES = 2048;                 // N <= 256K
  static constexpr int CONSUMER_WARPS = 8;
  static constexpr int tile_floats(Sm90Mode m) {
    return m == Sm90Mode::blockmax ? MAX_KEY_TILES : m == Sm90Mode::blockmass ? CONSUMER_WARPS * MAX_KEY_TILES : 0;
  }
  static constexpr int smem_bytes(Sm90Mode m) { return TILE_OFF + 4 * tile_floats(m) + 1024; }  // + slack to align
  static_assert(D == 64 || D == 128 || (D == 256 && !V), "Hopper kernels: head_dim 64 or 128 (256 without V)");
};

// blockmax: out[h, i, j] = max over rows q of block i (every query_stride-th row offset) and
// keys k <= q of block j of exp(scale q.k - lse[q]); 0 above the diagonal.
// blockmass: out[h, i, j] = (1 / rows of block i) sum over its rows q and keys k <= q of block j
// of exp(scale q.k - lse[q]) (query_stride 1); 0 above the diagonal.
// tilestats: for row q and key tile j (keys k <= q only), tile_max = max_k q.k (unscaled) and,
// when tile_sum is set, tile_sum = sum_k 2^((q.k - tile_max) scale_log2); both [Hq, Nb, stat_rows]
// with row q at q - 128 first_tile. The CTAs of the query tiles [first_tile, Nb) run, their key
// tiles split over key_splits CTAs (contiguous ranges); a.lse is written only unsplit.
struct Sm90Scores {
  float* out = nullptr;  // [Hq, Nb, Nb]
  int query_stride = 1;
  float* tile_max = nullptr;
  float* tile_sum = nullptr;
  int64_t stat_rows = 0;
  int first_tile = 0;
  int key_splits = 1;
};

// V's descriptor offsets (MN-major, see smem_desc); a kernel argument so the launcher owns them.
struct Sm90VDesc {
  uint32_t lbo, sbo;
};

template <int D, class T, Sm90Mode MODE>
__global__ void __launch_bounds__(384, 1)
    attn_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                     const __grid_constant__ CUtensorMap tm_v, const AttnArgs a, const Sm90VDesc vdesc,
                     const Sm90Scores sco) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  constexpr bool SPARSE = MODE == Sm90Mode::sparse;
  constexpr bool PREFIX = MODE == Sm90Mode::prefix;
  constexpr bool MASS = MODE == Sm90Mode::blockmass;
  constexpr bool WITH_V = sm90_with_v(MODE);
  using C = Sm90Config<D, WITH_V>;
  constexpr int BM = C::BM, BN = C::BN, S = C::STAGES;
  constexpr int CHUNS = D / 64;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base + C::Q_OFF, sK = base + C::K_OFF, sV = base + C::V_OFF;
  const uint32_t bars = base + C::BAR_OFF;
  const uint32_t q_full = bars;
  auto k_full = [&](int s) { return bars + 8u * (1 + s); };
  auto v_full = [&](int s) { return bars + 8u * (1 + S + s); };
  auto k_empty = [&](int s) { return bars + 8u * (1 + 2 * S + s); };
  auto v_empty = [&](int s) { return bars + 8u * (1 + 3 * S + s); };

  const int qt = a.num_q_tiles - 1 - int(blockIdx.x);  // heaviest query tiles first
  const int h = blockIdx.y;
  const int kvh = h / a.group;
  const int64_t q0 = int64_t(qt) * BM;
  int count = 0, row_end = 0, jmax = 0, t0 = 0;
  int64_t order0 = 0;  // prefix: the row's rank order at a.indices + order0 (causal layout)
  int next_cut = 0;    // prefix: the next prefix length (tiles) where some mask's row ends
  if constexpr (SPARSE) {
    const int64_t row = int64_t(h) * a.nb + qt;
    row_end = a.indptr[row + 1];
    count = row_end - a.indptr[row];
  } else if constexpr (PREFIX) {  // the longest prefix of the row's order among the masks
    order0 = int64_t(h) * a.nb * (a.nb + 1) / 2 + int64_t(qt) * (qt + 1) / 2;
    for (int m = 0; m < a.masks; ++m) count = max(count, __ldg(a.counts + (int64_t(m) * gridDim.y + h) * a.nb + qt));
    next_cut = next_prefix(a, h, qt, -1);
  } else {
    jmax = int((min(q0 + BM, a.n) - 1) / BN);
    count = jmax + 1;
    if constexpr (MODE == Sm90Mode::tilestats) {  // this CTA's share of the key tiles
      const int z = blockIdx.z, zs = gridDim.z;
      t0 = int(int64_t(count) * z / zs);
      count = int(int64_t(count) * (z + 1) / zs) - t0;
    }
  }
  // Key tile of step t: from the diagonal down (the CSR row is sorted ascending); prefix: in rank
  // order.
  auto tile_of = [&](int t) {
    if constexpr (SPARSE) return a.indices[row_end - 1 - t];
    else if constexpr (PREFIX) return a.indices[order0 + t];
    else return jmax - t0 - t;
  };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = threadIdx.x / 128;
  float* tilemax = reinterpret_cast<float*>(smem_raw + (base - smem_u32(smem_raw)) + C::TILE_OFF);  // or the sums
  if constexpr (MODE == Sm90Mode::blockmax)
    for (int j = threadIdx.x; j < count; j += blockDim.x) tilemax[j] = 0.f;
  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < S; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), 8);  // one arrive per consumer warp
      mbar_init(v_empty(s), 8);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {  // ---------------------------------------------------------------- producer
    setmaxnreg_dec<24>();
    if (warp == 0 && lane == 0) {
      prefetch_tensormap(&tm_q);
      prefetch_tensormap(&tm_k);
      prefetch_tensormap(&tm_v);
      mbar_arrive_expect_tx(q_full, C::Q_BYTES);
#pragma unroll
      for (int c = 0; c < CHUNS; ++c)
#pragma unroll
        for (int r = 0; r < BM / C::BOX; ++r)
          tma_load_3d(sQ + c * BM * 128 + r * C::BOX * 128, &tm_q, q_full, c * 64, int(q0) + r * C::BOX, h);
      for (int t = 0; t < count; ++t) {
        const int s = t % S;
        const uint32_t ph = (t / S) & 1;
        const int k0 = tile_of(t) * BN;
        const uint32_t dk = sK + s * C::KV_BYTES, dv = sV + s * C::KV_BYTES;
        mbar_wait(k_empty(s), ph ^ 1);
        mbar_arrive_expect_tx(k_full(s), C::KV_BYTES);
#pragma unroll
        for (int c = 0; c < CHUNS; ++c)
#pragma unroll
          for (int r = 0; r < BN / C::BOX; ++r)
            tma_load_3d(dk + c * BN * 128 + r * C::BOX * 128, &tm_k, k_full(s), c * 64, k0 + r * C::BOX, kvh);
        if constexpr (WITH_V) {
          mbar_wait(v_empty(s), ph ^ 1);
          mbar_arrive_expect_tx(v_full(s), C::KV_BYTES);
#pragma unroll
          for (int c = 0; c < CHUNS; ++c)
#pragma unroll
            for (int r = 0; r < BN / C::BOX; ++r)
              tma_load_3d(dv + c * BN * 128 + r * C::BOX * 128, &tm_v, v_full(s), c * 64, k0 + r * C::BOX, kvh);
        }
      }
    }
    return;
  }

  // -------------------------------------------------------------------------------- consumers
  setmaxnreg_inc<240>();
  const int cw = wg - 1;         // consumer warpgroup: query rows 64 cw ..
  const int wi = warp % 4;       // warp in the warpgroup: 16 rows
  const int g = lane / 4, t4 = lane % 4;
  const int64_t r_lo = q0 + 64 * cw + 16 * wi + g;  // this thread's rows: r_lo and r_lo + 8
  const float sl2 = a.scale_log2;

  float o[D / 2];  // D/8 column tiles x 4 (rows g, g+8; two columns each)
  float sc[BN / 2];
  uint32_t pa[BN / 16][4];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) sc[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  mbar_wait(q_full, 0);
  const uint32_t q_base = sQ + cw * 64 * 128;

  // S = Q K^T of the key tile in stage s (64 x 128 per warpgroup), issued, not waited.
  auto issue_qk = [&](int s, float (&acc)[BN / 2]) {
    const uint32_t kb = sK + s * C::KV_BYTES;
    reg_fence(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk % 4) * 32;  // 16 elements along K inside the 128-byte row
      const uint64_t da = smem_desc(q_base + (kk / 4) * BM * 128 + off, 16, 1024);
      const uint64_t db = smem_desc(kb + (kk / 4) * BN * 128 + off, 16, 1024);
      wgmma_ss_n128(acc, da, db, kk > 0, T{});
    }
    wgmma_commit();
  };
  // O += P V of the value tile in stage s (64 x D per warpgroup), P from registers; not waited.
  auto issue_pv = [&](int s) {
    const uint32_t vb = sV + s * C::KV_BYTES;
    reg_fence(o);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) reg_fence(pa[kk]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint64_t db = smem_desc(vb + kk * 16 * 128, vdesc.lbo, vdesc.sbo);
      if constexpr (D == 128) wgmma_rs_n128(o, pa[kk], db, 1, T{});
      else if constexpr (D == 64) wgmma_rs_n64(o, pa[kk], db, 1, T{});
    }
    wgmma_commit();
  };
  // Causal mask of the tile at key k0: -inf where k > q, only in tiles reaching past this
  // thread's first row (offsets inside the tile in 32 bits: the 64-bit compare per element was
  // the bottleneck of the score passes, NOTES.md v9).
  auto mask_causal = [&](float (&sc)[BN / 2], int64_t k0) {
    if (k0 + BN - 1 > r_lo) {
      const int lim = int(r_lo - k0);  // in (-BN, BN) here
#pragma unroll
      for (int i = 0; i < BN / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (8 * i + 2 * t4 + (e & 1) > lim + (e >> 1) * 8) sc[4 * i + e] = -INFINITY;
    }
  };
  // The causal mask, then the online softmax: row max over the quad, probabilities in place in
  // sc, alpha = rescale of O.
  auto softmax = [&](float (&sc)[BN / 2], int64_t k0, float (&alpha)[2]) {
    mask_causal(sc, k0);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) mx = fmaxf(mx, fmaxf(sc[4 * i + 2 * r], sc[4 * i + 2 * r + 1]));
      mx = quad_max(mx);
      alpha[r] = ex2((m[r] - mx) * sl2);
      m[r] = mx;
      const float msc = mx * sl2;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) {
        const float p0 = ex2(fmaf(sc[4 * i + 2 * r], sl2, -msc));
        const float p1 = ex2(fmaf(sc[4 * i + 2 * r + 1], sl2, -msc));
        sc[4 * i + 2 * r] = p0;
        sc[4 * i + 2 * r + 1] = p1;
        sum += p0 + p1;
      }
      l[r] = l[r] * alpha[r] + sum;
    }
  };
  // P (rounded to the operand type) into the A fragments of the P V product.
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = Vec2<T>::pack(sc[8 * kk + 0], sc[8 * kk + 1]);
      pa[kk][1] = Vec2<T>::pack(sc[8 * kk + 2], sc[8 * kk + 3]);
      pa[kk][2] = Vec2<T>::pack(sc[8 * kk + 4], sc[8 * kk + 5]);
      pa[kk][3] = Vec2<T>::pack(sc[8 * kk + 6], sc[8 * kk + 7]);
    }
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[4 * i + 0] *= alpha[0];
      o[4 * i + 1] *= alpha[0];
      o[4 * i + 2] *= alpha[1];
      o[4 * i + 3] *= alpha[1];
    }
  };
  auto release = [&](uint32_t bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  // tilestats: this thread's first row in the statistics at tile 0 (tile j adds j * stat_rows).
  const int64_t stat_row = int64_t(h) * a.num_q_tiles * sco.stat_rows + (r_lo - int64_t(sco.first_tile) * BM);
  // tilestats: the online softmax above (its exponentials, relative to the running max), plus the
  // tile's own max and, rescaled to it, the tile's sum, stored by one thread of the quad.
  auto stats = [&](float (&sc)[BN / 2], int j) {
    const int64_t k0 = int64_t(j) * BN;
    const int64_t at0 = stat_row + int64_t(j) * sco.stat_rows;
    mask_causal(sc, k0);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tm = -INFINITY;
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) tm = fmaxf(tm, fmaxf(sc[4 * i + 2 * r], sc[4 * i + 2 * r + 1]));
      tm = quad_max(tm);
      const float mx = fmaxf(m[r], tm);
      const float alpha = ex2((m[r] - mx) * sl2);
      m[r] = mx;
      const float msc = mx * sl2;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < BN / 8; ++i)
        sum += ex2(fmaf(sc[4 * i + 2 * r], sl2, -msc)) + ex2(fmaf(sc[4 * i + 2 * r + 1], sl2, -msc));
      l[r] = l[r] * alpha + sum;
      const int64_t at = at0 + 8 * r;
      if (sco.tile_sum) {
        sum = quad_sum(sum);
        if (t4 == 0) __stcs(sco.tile_sum + at, sum * ex2((mx - tm) * sl2));
      }
      if (t4 == 0) __stcs(sco.tile_max + at, tm);
    }
  };

  // prefix: this thread's rows normalised by `lp` (the l of the tiles in O; 0 where it is 0, as
  // an empty row) against o_ref, the squared error summed over the warp and added to every mask
  // whose row ends after `cut` tiles.
  auto snapshot = [&](const float (&lp)[2], int cut) {
    float sq = 0.f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float lt = quad_sum(lp[r]);
      const int64_t row = r_lo + 8 * r;
      if (row >= a.n) continue;
      const float inv = lt > 0.f ? 1.f / lt : 0.f;
      const float* ref = a.o_ref + int64_t(h) * a.osh + row * a.ost;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        const float2 x = __ldg(reinterpret_cast<const float2*>(ref + 8 * i + 2 * t4));
        const float d0 = o[4 * i + 2 * r] * inv - x.x, d1 = o[4 * i + 2 * r + 1] * inv - x.y;
        sq = fmaf(d0, d0, fmaf(d1, d1, sq));
      }
    }
    prefix_add_error(a, sq, h, qt, cut, lane);
  };

  if constexpr (!WITH_V) {
    // Scores only (no P V): S per tile, then the row statistics (lse), the tile's max of P or
    // its sum (this warp's rows).
    float lse2[2];  // blockmax / blockmass: the row's lse in base 2; +inf for rows that do not count
    if constexpr (MODE == Sm90Mode::blockmax || MASS) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t row = r_lo + 8 * r;
        const bool counts = row < a.n && (row - q0) % sco.query_stride == 0;
        lse2[r] = counts ? a.lse[int64_t(h) * a.n + row] * kLog2e : INFINITY;
      }
    }
    // Per tile: the row statistics (lse) or the tile's max of P (blockmax).
    auto consume = [&](float (&acc)[BN / 2], int t) {
      const int j = tile_of(t);
      if constexpr (MODE == Sm90Mode::lse) {
        float alpha[2];
        softmax(acc, int64_t(j) * BN, alpha);
      } else if constexpr (MODE == Sm90Mode::tilestats) {
        stats(acc, j);
      } else if constexpr (MASS) {
        // Sum of P over this warp's 16 rows and the tile's keys k <= q, one slot per warp and
        // tile (no atomics: the CTA's sum is then taken in a fixed order, reproducibly).
        const int64_t k0 = int64_t(j) * BN;
        float sum = 0.f;
        if (k0 + BN - 1 > r_lo) {  // diagonal tile
          const int lim = int(r_lo - k0);
#pragma unroll
          for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (8 * i + 2 * t4 + (e & 1) <= lim + (e >> 1) * 8) sum += ex2(fmaf(acc[4 * i + e], sl2, -lse2[e >> 1]));
        } else {
#pragma unroll
          for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) sum += ex2(fmaf(acc[4 * i + e], sl2, -lse2[e >> 1]));
        }
#pragma unroll
        for (int off = 1; off < 32; off *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (lane == 0) tilemax[(warp - 4) * C::MAX_KEY_TILES + j] = sum;
      } else {
        const int64_t k0 = int64_t(j) * BN;
        // max of exp(x) = exp(max of x): one ex2 per warp and tile instead of one per element
        float mx = -INFINITY;
        if (k0 + BN - 1 > r_lo) {  // diagonal tile: causal mask, offsets relative to the tile
          const int lim = int(r_lo - k0);
#pragma unroll
          for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (8 * i + 2 * t4 + (e & 1) <= lim + (e >> 1) * 8) mx = fmaxf(mx, fmaf(acc[4 * i + e], sl2, -lse2[e >> 1]));
        } else {
#pragma unroll
          for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) mx = fmaxf(mx, fmaf(acc[4 * i + e], sl2, -lse2[e >> 1]));
        }
#pragma unroll
        for (int off = 1; off < 32; off *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        // P >= 0: the float order is the int order of its bits
        if (lane == 0) atomicMax(reinterpret_cast<int*>(tilemax + j), __float_as_int(ex2(mx)));
      }
    };
    // One S at a time: a second accumulator in flight (S_{t+1} during tile t) measured slower
    // here (NOTES.md, v8); the two consumer warpgroups overlap each other instead.
    for (int t = 0; t < count; ++t) {
      mbar_wait(k_full(t % S), (t / S) & 1);
      issue_qk(t % S, sc);
      wgmma_wait<0>();
      reg_fence(sc);
      release(k_empty(t % S));
      consume(sc, t);
    }
    if constexpr (MODE == Sm90Mode::blockmax) {
      asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both consumer warpgroups, not the producer
      const int nb = a.nb;
      float* out = sco.out + (int64_t(h) * nb + qt) * nb;
      for (int j = threadIdx.x - 128; j < nb; j += 256) out[j] = j <= jmax ? tilemax[j] : 0.f;
      return;
    }
    if constexpr (MASS) {
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
      const int nb = a.nb;
      const float rows = float(min(int64_t(BM), a.n - q0));
      float* out = sco.out + (int64_t(h) * nb + qt) * nb;
      for (int j = threadIdx.x - 128; j < nb; j += 256) {
        float s = 0.f;
        if (j <= jmax) {
#pragma unroll
          for (int w = 0; w < C::CONSUMER_WARPS; ++w) s += tilemax[w * C::MAX_KEY_TILES + j];
          s /= rows;
        }
        out[j] = s;
      }
      return;
    }
  } else {
    if constexpr (PREFIX) {
      if (next_cut == 0) {  // masks whose row is empty: O = 0
        const float none[2] = {0.f, 0.f};
        snapshot(none, 0);
        next_cut = next_prefix(a, h, qt, 0);
      }
    }
    // Pipeline (FlashAttention-3's intra-warpgroup overlap): while the softmax of tile t runs
    // on the CUDA cores, the tensor cores work on P_{t-1} V_{t-1}:
    //   issue S_t; issue O += P_{t-1} V_{t-1}; wait S_t; softmax_t; wait P V; O *= alpha_t.
    // prefix: after the wait for P_{t-1} V_{t-1}, O holds the first t tiles at the scale of the
    // l from before softmax_t (kept in lp): the snapshot of a prefix of t tiles goes there.
    if (count > 0) {
      float alpha[2];
      mbar_wait(k_full(0), 0);
      issue_qk(0, sc);
      wgmma_wait<0>();
      reg_fence(sc);
      release(k_empty(0));
      softmax(sc, int64_t(tile_of(0)) * BN, alpha);  // O is still 0: no rescale
      pack_p();
      for (int t = 1; t < count; ++t) {
        const int s = t % S, sp = (t - 1) % S;
        mbar_wait(k_full(s), (t / S) & 1);
        issue_qk(s, sc);
        mbar_wait(v_full(sp), ((t - 1) / S) & 1);
        issue_pv(sp);
        wgmma_wait<1>();  // S_t done (P V may still run)
        reg_fence(sc);
        release(k_empty(s));
        [[maybe_unused]] const float lp[2] = {l[0], l[1]};
        softmax(sc, int64_t(tile_of(t)) * BN, alpha);
        wgmma_wait<0>();  // P_{t-1} V_{t-1} done: pa and o are free again
        reg_fence(o);
        release(v_empty(sp));
        if constexpr (PREFIX) {
          if (t == next_cut) {
            snapshot(lp, t);
            next_cut = next_prefix(a, h, qt, t);
          }
        }
        pack_p();
        rescale_o(alpha);
      }
      const int sl = (count - 1) % S;
      mbar_wait(v_full(sl), ((count - 1) / S) & 1);
      issue_pv(sl);
      wgmma_wait<0>();
      reg_fence(o);
      release(v_empty(sl));
      if constexpr (PREFIX) {
        if (count == next_cut) snapshot(l, count);
      }
    }
  }

  // epilogue: O / l, lse; rows >= N are not written (blockmax has written its row above;
  // prefix has compared its snapshots)
  if constexpr (MODE != Sm90Mode::blockmax && !MASS && !PREFIX) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float lr = l[r];
      lr = quad_sum(lr);
      const int64_t row = r_lo + 8 * r;
      if (row >= a.n) continue;
      const float inv = lr > 0.f ? 1.f / lr : 0.f;
      const int64_t qh = h;
      if (a.o) {
        if (a.out_f32) {
          float* op = static_cast<float*>(a.o) + qh * a.osh + row * a.ost;
#pragma unroll
          for (int i = 0; i < D / 8; ++i)
            *reinterpret_cast<float2*>(op + 8 * i + 2 * t4) = make_float2(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
        } else {
          T* op = static_cast<T*>(a.o) + qh * a.osh + row * a.ost;
#pragma unroll
          for (int i = 0; i < D / 8; ++i)
            *reinterpret_cast<uint32_t*>(op + 8 * i + 2 * t4) = Vec2<T>::pack(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
        }
      }
      if (a.lse && t4 == 0) a.lse[qh * a.n + row] = lr > 0.f ? (m[r] * sl2 + log2f(lr)) * kLn2 : -INFINITY;
    }
  }
#else
  __trap();  // built without sm_90a: the launcher never selects this kernel there
#endif
}

}  // namespace proxyattn::kernels::detail
