// `xattn` block scores (XAttention's antidiagonal estimator; the CPU spec is
// detail::estimate_xattn in lib/src/estimator_peers.cpp).
//
// The strided logits s[a, b] = scale * sum_{t < S} q[aS + S-1-t] . k[bS + t] are a GEMM with an
// effective head dimension S*d whose operand rows are gathered on the fly: step (key tile, t)
// loads the 128 query rows aS + S-1-t and the 64 key rows bS + t of the tile (cp.async, zero
// past N) and accumulates one d-wide slice with mma.sync (fp32 accumulators). Pass 1 keeps an
// online (max, sum) per strided row and writes its base-2 LSE; pass 2 recomputes the logits,
// turns them into probabilities with that LSE and sums them per (query block, key block) through
// shared memory (fixed order: deterministic). Cost per pass N^2 d H / S multiply-adds (half of
// it causal), the same work as XAttention's own estimator; memory O(H N / S + H Nb^2).
#include <cmath>

#include "peer_tiles.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace peer {
namespace {

struct XArgs {
  const void* q;
  const void* k;
  int64_t qsh, qst, ksh, kst;
  int64_t n;  // tokens
  int64_t A;  // strided rows = ceil(N / S)
  int S;
  int group;
  int pb;  // strided rows (and keys) per block = B / S, <= XBM
  int nb;
  int row_tiles;
  float scale_log2;
  float* lse2;  // [Hq, A]: log2 of sum_b 2^(s[a, b] * scale_log2)
  float* out;   // [Hq, Nb, Nb]
};

constexpr int XMT = 2, XNW = 4, XBM = XNW * XMT * 16, XBN = 64, XNT = XNW * 32, XLDP = XBN + 1;
static_assert(XBM == XNT, "stage 1 of the block sums gives each thread one row");

template <int D, class T, bool SUMS>
constexpr size_t xattn_smem() {
  return sizeof(T) * size_t(2 * XBM + 2 * XBN) * D + (SUMS ? sizeof(float) * XBM * XLDP : 0);
}

template <int D, class T, bool SUMS>
__global__ void __launch_bounds__(XNT, 1) xattn_kernel(const XArgs a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);                  // [2][XBM][D]
  T* sK = sQ + 2 * XBM * D;                                // [2][XBN][D]
  float* sP = reinterpret_cast<float*>(sK + 2 * XBN * D);  // [XBM][XLDP] (pass 2)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int h = blockIdx.y, kvh = h / a.group;
  const int tile = a.row_tiles - 1 - int(blockIdx.x);  // heaviest row tiles first
  const int64_t a0 = int64_t(tile) * XBM;
  const int64_t rows_end = a0 + XBM < a.A ? a0 + XBM : a.A;
  const int n_bt = int((rows_end + XBN - 1) / XBN);  // key tiles with some b <= a
  const int S = a.S;
  const int U = n_bt * S;
  const T* gq = static_cast<const T*>(a.q) + h * a.qsh;
  const T* gk = static_cast<const T*>(a.k) + kvh * a.ksh;
  const int warp_row0 = warp * XMT * 16;
  const int64_t row_lo = a0 + warp_row0;

  // Step u = (key tile u / S, slice t = u % S) into buffer `buf`.
  auto load_step = [&](int u, int buf) {
    const int bt = u / S, t = u - (u / S) * S;
    load_rows<XBM, D, XNT>(sQ + buf * XBM * D, gq, a.qst, a0 * S + (S - 1 - t), S, a.n, tid);
    load_rows<XBN, D, XNT>(sK + buf * XBN * D, gk, a.kst, int64_t(bt) * XBN * S + t, S, a.n, tid);
  };

  float m[XMT][2], l[XMT][2], nl2[XMT][2];
#pragma unroll
  for (int mt = 0; mt < XMT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int64_t row = row_lo + mt * 16 + (lane >> 2) + hr * 8;
      m[mt][hr] = -INFINITY;
      l[mt][hr] = 0.f;
      nl2[mt][hr] = SUMS && row < a.A ? -a.lse2[int64_t(h) * a.A + row] : -INFINITY;
    }

  float acc[XMT][XBN / 8][4];
  load_step(0, 0);
  cp_async_commit();
  for (int u = 0; u < U; ++u) {
    cp_async_wait<0>();
    __syncthreads();  // step u landed; every warp is done with step u-1 (and with sP)
    if (u + 1 < U) load_step(u + 1, (u + 1) & 1);
    cp_async_commit();
    const int bt = u / S, t = u - bt * S;
    if (t == 0) {
#pragma unroll
      for (int mt = 0; mt < XMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < XBN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
    }
    mma_tile<D, XMT, XBN, T>(acc, sQ + (u & 1) * XBM * D, sK + (u & 1) * XBN * D, warp_row0, lane);
    if (t != S - 1) continue;

    const int64_t b0 = int64_t(bt) * XBN;
    if constexpr (!SUMS) {
      // Online softmax statistics in base 2 (as the attention kernels).
      const bool need_mask = b0 + XBN - 1 > row_lo;
#pragma unroll
      for (int mt = 0; mt < XMT; ++mt)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int64_t row = row_lo + mt * 16 + (lane >> 2) + hr * 8;
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < XBN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = acc[mt][nt][2 * hr + e];
              if (need_mask && b0 + nt * 8 + (lane & 3) * 2 + e > row) x = -INFINITY;
              mx = fmaxf(mx, x);
            }
          mx = detail::quad_max(mx);
          const float m_new = fmaxf(m[mt][hr], mx * a.scale_log2);
          const float base = m_new == -INFINITY ? 0.f : m_new;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < XBN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) sum += detail::ex2(fmaf(acc[mt][nt][2 * hr + e], a.scale_log2, -base));
          l[mt][hr] = l[mt][hr] * detail::ex2(m[mt][hr] - base) + sum;
          m[mt][hr] = m_new;
        }
    } else {
      // Probabilities into sP (0 where b > a or the row does not exist).
#pragma unroll
      for (int mt = 0; mt < XMT; ++mt)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int rl = warp_row0 + mt * 16 + (lane >> 2) + hr * 8;
          const int64_t row = a0 + rl;
#pragma unroll
          for (int nt = 0; nt < XBN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int cl = nt * 8 + (lane & 3) * 2 + e;
              const float p = b0 + cl <= row ? detail::ex2(fmaf(acc[mt][nt][2 * hr + e], a.scale_log2, nl2[mt][hr])) : 0.f;
              sP[rl * XLDP + cl] = p;
            }
        }
      __syncthreads();
      // Stage 1: each thread sums its row over every key block of the tile, in place.
      const int w = a.pb < XBN ? a.pb : XBN, nJ = XBN / w;
      {
        float* pr = sP + tid * XLDP;
        for (int J = 0; J < nJ; ++J) {
          float s = 0.f;
          for (int c = 0; c < w; ++c) s += pr[J * w + c];
          pr[J] = s;  // J <= J * w: never a column still to be read
        }
      }
      __syncthreads();
      // Stage 2: each (query block, key block) cell sums its rows and adds to the output; the
      // CTA owns whole query blocks (pb <= XBM divides XBM), so no other CTA writes the cell.
      const int pb = a.pb, nI = XBM / pb;
      const int Ib = int(a0 / pb), Jb = int(b0 / pb);
      for (int cell = tid; cell < nI * nJ; cell += XNT) {
        const int Il = cell / nJ, J = cell - Il * nJ;
        const int I = Ib + Il, Jg = Jb + J;
        if (int64_t(I) * pb >= a.A || Jg > I) continue;
        float s = 0.f;
        for (int r = Il * pb; r < Il * pb + pb; ++r) s += sP[r * XLDP + J];
        const int64_t r1 = int64_t(I + 1) * pb < a.A ? int64_t(I + 1) * pb : a.A;
        a.out[(int64_t(h) * a.nb + I) * a.nb + Jg] += s / float(r1 - int64_t(I) * pb);
      }
    }
  }
  cp_async_wait<0>();  // nothing in flight at exit

  if constexpr (!SUMS) {
#pragma unroll
    for (int mt = 0; mt < XMT; ++mt)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float lt = l[mt][hr];
        lt = detail::quad_sum(lt);
        const int64_t row = row_lo + mt * 16 + (lane >> 2) + hr * 8;
        if (row < a.A && (lane & 3) == 0) a.lse2[int64_t(h) * a.A + row] = m[mt][hr] + log2f(lt);
      }
  }
}

template <int D, class T, bool SUMS>
Status launch_xattn(const XArgs& a, int heads, cudaStream_t st) {
  constexpr size_t smem = xattn_smem<D, T, SUMS>();
  auto kern = xattn_kernel<D, T, SUMS>;
  Status s = detail::from_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                               "xattn_scores: cudaFuncSetAttribute");
  if (s != Status::ok) return s;
  kern<<<dim3(unsigned(a.row_tiles), unsigned(heads)), XNT, smem, st>>>(a);
  return detail::check_launch(SUMS ? "xattn_scores: block-sum pass launch" : "xattn_scores: LSE pass launch");
}

template <int D, class T>
Status run_xattn(const XArgs& a, int heads, size_t out_bytes, cudaStream_t st) {
  Status s = launch_xattn<D, T, false>(a, heads, st);
  if (s != Status::ok) return s;
  s = detail::from_cuda(cudaMemsetAsync(a.out, 0, out_bytes, st), "xattn_scores: zeroing out");
  if (s != Status::ok) return s;
  return launch_xattn<D, T, true>(a, heads, st);
}

template <class T>
Status dispatch_xattn(const XArgs& a, int heads, int d, size_t out_bytes, cudaStream_t st) {
  switch (d) {
    case 64: return run_xattn<64, T>(a, heads, out_bytes, st);
    case 128: return run_xattn<128, T>(a, heads, out_bytes, st);
    case 256: return run_xattn<256, T>(a, heads, out_bytes, st);
  }
  return fail(Status::unsupported, "xattn_scores: head_dim must be 64, 128 or 256");
}

}  // namespace
}  // namespace peer

Status xattn_scores(const XAttnScoreParams& p) noexcept {
  peer::Operands o{};
  Status s = peer::make_operands(p.in, "xattn_scores", true, &o);
  if (s != Status::ok) return s;
  const int S = p.stride, B = p.block;
  if (!peer::is_pow2(S) || !peer::is_pow2(B) || S > B || B / S > peer::XBM)
    return fail(Status::invalid_argument, "xattn_scores: stride and block must be powers of two, stride <= block <= 128 * stride");
  if (!p.out) return fail(Status::invalid_argument, "xattn_scores: null out");
  peer::XArgs a{};
  a.q = o.q;
  a.k = o.k;
  a.qsh = o.qsh;
  a.qst = o.qst;
  a.ksh = o.ksh;
  a.kst = o.kst;
  a.n = o.n;
  a.A = (o.n + S - 1) / S;
  a.S = S;
  a.group = o.group;
  a.pb = B / S;
  const int64_t nb = (o.n + B - 1) / B;
  a.nb = int(nb);
  a.row_tiles = int((a.A + peer::XBM - 1) / peer::XBM);
  // The CPU's scale: 1 / (sqrt(d) * S) in float.
  const float scale = p.scale > 0.f ? p.scale : 1.0f / (std::sqrt(float(p.in.head_dim)) * float(S));
  a.scale_log2 = scale * detail::kLog2e;
  a.out = p.out;
  cudaStream_t st = detail::stream_of(p.stream);
  peer::Scratch scratch(st);
  if ((s = scratch.get(&a.lse2, size_t(p.in.q_heads) * a.A, "xattn_scores: LSE workspace")) != Status::ok) return s;
  const size_t out_bytes = sizeof(float) * size_t(p.in.q_heads) * nb * nb;
  return p.in.in_type == ElemType::bf16
             ? peer::dispatch_xattn<__nv_bfloat16>(a, p.in.q_heads, p.in.head_dim, out_bytes, st)
             : peer::dispatch_xattn<__half>(a, p.in.q_heads, p.in.head_dim, out_bytes, st);
}

}  // namespace proxyattn::kernels
