// ProxyAttn proxy heads and scores.
// Fast path (the benchmark's; real deployments round): pool_heads mean-pools groups of heads into
// one head per group (fp32 sums, stored in the operand dtype); the scores are row_lse (full.cu)
// on the proxy heads followed by block_scores with reduce = max (oracle_mass.cu); the dispatch
// layer chains the three.
// Exact path (proxy_scores_exact; the analysis'): the proxy heads are the CPU's float32 means,
// and the scores match the CPU estimator to float rounding (its rankings, budgets and masks up
// to exact ties). Two ways, the same contract:
//  - split (tensor cores): each float32 proxy value x is carried as two fp16 pieces, hi = fp16(x)
//    and lo = fp16(x - hi) (22 significant bits); pieces concatenated along d make q.k a sum of
//    fp16 products that the MMAs form exactly and accumulate in fp32, so row_lse and
//    block_scores on the concatenated heads give the exact scores at tensor-core speed:
//      k exact in fp16 (one f16 KV head per group):  q' = [hi, lo]      . k' = [k, k]
//      otherwise:                                    q' = [hi, hi, lo]  . k' = [hi, lo, hi]
//                                                    (or [hi,hi,lo,lo] . [hi,lo,hi,lo] when 4d
//                                                    is a kernel head_dim; lo.lo ~ 2^-22 x|q.k|)
//    taken when the concatenated width is 64, 128, 256 or 384 and the block 64 or 128;
//  - SIMT (otherwise: d 256 with pooled heads): fp32 tiles, two passes (row LSE in float64,
//    then the block max).
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "peer_tiles.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace detail {
namespace {

struct PoolArgs {  // pool_heads_kernel (dst: the operand type) and pool_f32_kernel (dst: float32)
  const void* src;
  void* dst;
  int64_t sh, st;
  int64_t n;
  int d;
  int groups;
  int32_t begin[kMaxPoolGroups];
  int32_t end[kMaxPoolGroups];
};

// One thread per (group, token, 8-element chunk): 16-byte loads, fp32 mean.
template <class T>
__global__ void pool_heads_kernel(const PoolArgs a) {
  const int chunks = a.d / 8;
  const int64_t total = int64_t(a.groups) * a.n * chunks;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < total; x += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(x % chunks);
    const int64_t t = (x / chunks) % a.n;
    const int g = int(x / (int64_t(chunks) * a.n));
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int h = a.begin[g]; h < a.end[g]; ++h) {
      const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.src) + h * a.sh + t * a.st + c * 8);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] += to_float(e[u]);
    }
    const float inv = 1.f / float(a.end[g] - a.begin[g]);
    uint4 out;
    T* o = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int u = 0; u < 8; ++u) o[u] = from_float<T>(acc[u] * inv);
    *reinterpret_cast<uint4*>(static_cast<T*>(a.dst) + (int64_t(g) * a.n + t) * a.d + c * 8) = out;
  }
}

}  // namespace
}  // namespace detail

Status pool_heads(const PoolHeadsParams& p) noexcept {
  if (p.type != ElemType::bf16 && p.type != ElemType::f16)
    return fail(Status::unsupported, "pool_heads: type must be bf16 or f16");
  if (!p.src || !p.dst) return fail(Status::invalid_argument, "pool_heads: null pointer");
  if (p.groups < 1 || p.groups > kMaxPoolGroups) return fail(Status::invalid_argument, "pool_heads: groups outside [1, 128]");
  if (p.head_dim <= 0 || p.head_dim % 8 != 0 || p.seq_len <= 0 || p.heads <= 0)
    return fail(Status::invalid_argument, "pool_heads: bad shape");
  detail::PoolArgs a{};
  a.src = p.src;
  a.dst = p.dst;
  a.st = p.stride_token ? p.stride_token : p.head_dim;
  a.sh = p.stride_head ? p.stride_head : p.seq_len * a.st;
  if ((a.st | a.sh) % 8 != 0 || !detail::aligned16(p.src) || !detail::aligned16(p.dst))
    return fail(Status::invalid_argument, "pool_heads: strides must be multiples of 8, pointers 16-byte aligned");
  a.n = p.seq_len;
  a.d = p.head_dim;
  a.groups = p.groups;
  for (int g = 0; g < p.groups; ++g) {
    if (p.head_begin[g] < 0 || p.head_end[g] > p.heads || p.head_begin[g] >= p.head_end[g])
      return fail(Status::invalid_argument, "pool_heads: empty or out-of-range head range");
    a.begin[g] = p.head_begin[g];
    a.end[g] = p.head_end[g];
  }
  const int64_t total = int64_t(p.groups) * p.seq_len * (p.head_dim / 8);
  const unsigned grid = unsigned(std::min<int64_t>((total + 255) / 256, 65535 * 4));
  cudaStream_t st = detail::stream_of(p.stream);
  if (p.type == ElemType::bf16)
    detail::pool_heads_kernel<__nv_bfloat16><<<grid, 256, 0, st>>>(a);
  else
    detail::pool_heads_kernel<__half><<<grid, 256, 0, st>>>(a);
  return detail::check_launch("pool_heads launch");
}


// ---- exact path: float32 proxy heads -----------------------------------------------------------
namespace detail {
namespace {

// dst[g, t, c] = (sum over heads h in [begin, end) in order of src[h, t, c]) / count: the CPU's
// make_proxy_heads (zero, += each member, /= count) in the same order, so the same float.
template <class T>
__global__ void pool_f32_kernel(const PoolArgs a) {  // a.dst: float32
  const int64_t total = int64_t(a.groups) * a.n * a.d;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < total; x += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(x % a.d);
    const int64_t t = (x / a.d) % a.n;
    const int g = int(x / (int64_t(a.d) * a.n));
    float acc = 0.f;
    for (int h = a.begin[g]; h < a.end[g]; ++h) acc += to_float(static_cast<const T*>(a.src)[h * a.sh + t * a.st + c]);
    static_cast<float*>(a.dst)[x] = acc / float(a.end[g] - a.begin[g]);
  }
}

// The float32 group mean of pool_f32_kernel, written as fp16 pieces: dst[g, t, u * d + c] =
// hi or lo (code[u]) of the mean, for the u = 0 .. terms - 1 pieces of the concatenated head.
struct SplitCodes {
  int terms;
  int lo[4];  // piece u is lo (1) or hi (0)
};

template <class T>
__global__ void pool_split_kernel(const PoolArgs a, const SplitCodes codes) {  // a.dst: __half
  const int64_t total = int64_t(a.groups) * a.n * a.d;
  __half* dst = static_cast<__half*>(a.dst);
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < total; x += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(x % a.d);
    const int64_t t = (x / a.d) % a.n;
    const int g = int(x / (int64_t(a.d) * a.n));
    float acc = 0.f;
    for (int h = a.begin[g]; h < a.end[g]; ++h) acc += to_float(static_cast<const T*>(a.src)[h * a.sh + t * a.st + c]);
    const float v = acc / float(a.end[g] - a.begin[g]);
    const __half hi = __float2half_rn(v);
    const __half lo = __float2half_rn(v - __half2float(hi));  // v - hi is exact in float32
    __half* o = dst + (int64_t(g) * a.n + t) * (int64_t(codes.terms) * a.d) + c;
    for (int u = 0; u < codes.terms; ++u) o[int64_t(u) * a.d] = codes.lo[u] ? lo : hi;
  }
}

constexpr int kXT = 64, kXC = 64, kXNT = 256;

struct ExactArgs {
  const float* qg;  // [groups, N, d]
  const float* kg;
  double* lse;      // [groups, N]
  float* out;       // [groups, Nb, Nb]
  int64_t n;
  int d, block, nb, query_stride, row_tiles;
  float scale;
};

// acc[u][v] = scale * q_row . k_col for rows r0 + ty + 16 u and keys k0 + tx + 16 v (fp32 FMA in
// d order, then the scale: the CPU's gemm). Rows / keys past N read as 0.
__device__ __forceinline__ void exact_tile(float (&acc)[4][4], float (*sq)[kXC + 1], float (*sk)[kXC + 1],
                                           const float* q, const float* k, int64_t r0, int64_t k0, int64_t n, int d,
                                           float scale) {
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[u][v] = 0.f;
  for (int c0 = 0; c0 < d; c0 += kXC) {
    const int cw = d - c0 < kXC ? d - c0 : kXC;
    __syncthreads();  // the previous chunk / tile is consumed
    for (int e = tid; e < kXT * kXC; e += kXNT) {
      const int r = e / kXC, c = e % kXC;
      const bool okc = c < cw;
      sq[r][c] = okc && r0 + r < n ? q[(r0 + r) * d + c0 + c] : 0.f;
      sk[r][c] = okc && k0 + r < n ? k[(k0 + r) * d + c0 + c] : 0.f;
    }
    __syncthreads();
    peer::fma_4x4(acc, sq, sk, cw, tx, ty);
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[u][v] *= scale;
}

// Pass 1: lse[g, row] = m + log(sum_k exp(logit - m)) over k <= row, float64 sums.
__global__ void __launch_bounds__(kXNT) exact_lse_kernel(const ExactArgs a) {
  __shared__ float sq[kXT][kXC + 1], sk[kXT][kXC + 1];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int tile = a.row_tiles - 1 - int(blockIdx.x), g = blockIdx.y;
  const int64_t r0 = int64_t(tile) * kXT;
  const int64_t r_end = r0 + kXT < a.n ? r0 + kXT : a.n;
  const float* q = a.qg + int64_t(g) * a.n * a.d;
  const float* k = a.kg + int64_t(g) * a.n * a.d;
  float m[4];
  double l[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    m[u] = -INFINITY;
    l[u] = 0;
  }
  const int n_kt = int((r_end - 1) / kXT) + 1;
  for (int kt = 0; kt < n_kt; ++kt) {
    const int64_t k0 = int64_t(kt) * kXT;
    float acc[4][4];
    exact_tile(acc, sq, sk, q, k, r0, k0, a.n, a.d, a.scale);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t row = r0 + ty + 16 * u;
      float mx = -INFINITY;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        if (k0 + tx + 16 * v > row) acc[u][v] = -INFINITY;
        mx = fmaxf(mx, acc[u][v]);
      }
#pragma unroll
      for (int off = 1; off < 16; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m[u], mx);
      if (m_new == -INFINITY) continue;  // nothing visible yet (never for rows < N)
      double s = 0;
#pragma unroll
      for (int v = 0; v < 4; ++v) s += double(expf(acc[u][v] - m_new));  // exp(-inf) = 0
      l[u] = l[u] * exp(double(m[u]) - double(m_new)) + s;
      m[u] = m_new;
    }
  }
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    double lt = l[u];
#pragma unroll
    for (int off = 1; off < 16; off <<= 1) lt += __shfl_xor_sync(0xffffffffu, lt, off);
    const int64_t row = r0 + ty + 16 * u;
    if (tx == 0 && row < a.n) a.lse[int64_t(g) * a.n + row] = double(m[u]) + log(lt);
  }
}

// Pass 2: out[g, i, j] = max over the scored rows of this 64-row tile (inside query block i) of
// float(exp(max_{k in j, k <= row} logit - lse[row])); atomicMax on the bits of the non-negative
// result (out zeroed first) combines the B / 64 row tiles of block i.
__global__ void __launch_bounds__(kXNT) exact_max_kernel(const ExactArgs a) {
  __shared__ float sq[kXT][kXC + 1], sk[kXT][kXC + 1];
  __shared__ double red[16];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int tile = a.row_tiles - 1 - int(blockIdx.x), g = blockIdx.y;
  const int64_t r0 = int64_t(tile) * kXT;
  const int64_t r_end = r0 + kXT < a.n ? r0 + kXT : a.n;
  const int i = int(r0 / a.block);
  const int64_t qb0 = int64_t(i) * a.block;
  const float* q = a.qg + int64_t(g) * a.n * a.d;
  const float* k = a.kg + int64_t(g) * a.n * a.d;
  double nlse[4];
  bool use[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t row = r0 + ty + 16 * u;
    use[u] = row < a.n && (row - qb0) % a.query_stride == 0;
    nlse[u] = use[u] ? a.lse[int64_t(g) * a.n + row] : 0.0;
  }
  const int per_block = a.block / kXT;  // key tiles per key block
  const int n_kt = int((r_end - 1) / kXT) + 1;
  double best = -INFINITY;  // thread 0: running max of the current key block
  for (int kt = 0; kt < n_kt; ++kt) {
    const int64_t k0 = int64_t(kt) * kXT;
    float acc[4][4];
    exact_tile(acc, sq, sk, q, k, r0, k0, a.n, a.d, a.scale);
    double vmax = -INFINITY;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t row = r0 + ty + 16 * u;
      float mx = -INFINITY;
#pragma unroll
      for (int v = 0; v < 4; ++v)
        if (k0 + tx + 16 * v <= row) mx = fmaxf(mx, acc[u][v]);
#pragma unroll
      for (int off = 1; off < 16; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      if (use[u] && mx != -INFINITY) vmax = fmax(vmax, double(mx) - nlse[u]);
    }
    if (tx == 0) red[ty] = vmax;
    __syncthreads();
    if (tid == 0) {
      for (int y = 0; y < 16; ++y) best = fmax(best, red[y]);
      const int j = int(k0 / a.block);
      if ((kt + 1) % per_block == 0 || kt + 1 == n_kt) {
        if (best != -INFINITY) {
          const float val = float(exp(best));
          atomicMax(reinterpret_cast<int*>(a.out + (int64_t(g) * a.nb + i) * a.nb + j), __float_as_int(val));
        }
        best = -INFINITY;
      }
    }
    // red[] is rewritten only after the next tile's barriers (inside exact_tile).
  }
}

}  // namespace
}  // namespace detail

Status proxy_scores_exact(const ProxyExactParams& p) noexcept {
  peer::Operands o{};
  Status s = peer::make_operands(p.in, "proxy_scores_exact", false, &o);
  if (s != Status::ok) return s;
  if (!peer::is_pow2(p.block) || p.block < detail::kXT)
    return fail(Status::invalid_argument, "proxy_scores_exact: block must be a power of two >= 64");
  if (p.groups < 1 || p.groups > kMaxPoolGroups) return fail(Status::invalid_argument, "proxy_scores_exact: groups outside [1, 128]");
  if (p.query_stride < 1) return fail(Status::invalid_argument, "proxy_scores_exact: query_stride must be >= 1");
  if (!p.out) return fail(Status::invalid_argument, "proxy_scores_exact: null out");
  const int64_t n = o.n, d = p.in.head_dim, nb = (n + p.block - 1) / p.block;
  detail::PoolArgs pq{}, pk{};
  pq.src = o.q;
  pq.sh = o.qsh;
  pq.st = o.qst;
  pk.src = o.k;
  pk.sh = o.ksh;
  pk.st = o.kst;
  pq.n = pk.n = n;
  pq.d = pk.d = int(d);
  pq.groups = pk.groups = p.groups;
  for (int g = 0; g < p.groups; ++g) {
    if (p.q_begin[g] < 0 || p.q_end[g] > p.in.q_heads || p.q_begin[g] >= p.q_end[g] || p.k_begin[g] < 0 ||
        p.k_end[g] > p.in.kv_heads || p.k_begin[g] >= p.k_end[g])
      return fail(Status::invalid_argument, "proxy_scores_exact: empty or out-of-range head range");
    pq.begin[g] = p.q_begin[g];
    pq.end[g] = p.q_end[g];
    pk.begin[g] = p.k_begin[g];
    pk.end[g] = p.k_end[g];
  }
  cudaStream_t st = detail::stream_of(p.stream);
  peer::Scratch scratch(st);
  const float scale = p.scale > 0.f ? p.scale : 1.0f / std::sqrt(float(d));
  // Runs launch(dtype tag, grid) for the input dtype: the pooling of the Q and K operands.
  const unsigned pool_grid = unsigned(std::min<int64_t>((int64_t(p.groups) * n * d + 255) / 256, 65535 * 8));
  auto pool_qk = [&](auto&& launch, const char* what) {
    if (p.in.in_type == ElemType::bf16) launch(__nv_bfloat16{}, pool_grid);
    else launch(__half{}, pool_grid);
    return detail::check_launch(what);
  };

  // Split path: the pieces' pattern from whether every group's Q / K is one f16 head (exact).
  bool q_exact = p.in.in_type == ElemType::f16, k_exact = q_exact;
  for (int g = 0; g < p.groups; ++g) {
    q_exact = q_exact && p.q_end[g] - p.q_begin[g] == 1;
    k_exact = k_exact && p.k_end[g] - p.k_begin[g] == 1;
  }
  detail::SplitCodes cq{}, ck{};
  auto set = [](detail::SplitCodes& c, std::initializer_list<int> lo) {
    c.terms = 0;
    for (int x : lo) c.lo[c.terms++] = x;
  };
  if (q_exact && k_exact) {
    set(cq, {0});
    set(ck, {0});
  } else if (k_exact) {
    set(cq, {0, 1});
    set(ck, {0, 0});
  } else if (4 * d <= 256) {
    set(cq, {0, 0, 1, 1});
    set(ck, {0, 1, 0, 1});
  } else {
    set(cq, {0, 0, 1});
    set(ck, {0, 1, 0});
  }
  const int64_t dd = int64_t(cq.terms) * d;
  if ((dd == 64 || dd == 128 || dd == 256 || dd == 384) && (p.block == 64 || p.block == 128)) {
    __half *qs = nullptr, *ks = nullptr;
    float* lse = nullptr;
    const size_t elems = size_t(p.groups) * n * dd;
    if ((s = scratch.get(&qs, elems, "proxy_scores_exact: split proxy q")) != Status::ok) return s;
    if ((s = scratch.get(&ks, elems, "proxy_scores_exact: split proxy k")) != Status::ok) return s;
    if ((s = scratch.get(&lse, size_t(p.groups) * n, "proxy_scores_exact: lse")) != Status::ok) return s;
    pq.dst = qs;
    pk.dst = ks;
    s = pool_qk([&](auto tag, unsigned grid) {
      using T = decltype(tag);
      detail::pool_split_kernel<T><<<grid, 256, 0, st>>>(pq, cq);
      detail::pool_split_kernel<T><<<grid, 256, 0, st>>>(pk, ck);
    }, "proxy_scores_exact: split pooling launch");
    if (s != Status::ok) return s;
    AttentionParams ap;
    ap.q = qs;
    ap.k = ks;
    ap.lse = lse;
    ap.in_type = ElemType::f16;
    ap.q_heads = ap.kv_heads = p.groups;
    ap.head_dim = int(dd);
    ap.seq_len = n;
    ap.scale = scale;  // the proxy head's 1 / sqrt(d), not the concatenation's
    ap.stream = p.stream;
    if ((s = row_lse(ap)) != Status::ok) return s;
    BlockScoreParams bp;
    bp.q = qs;
    bp.k = ks;
    bp.lse = lse;
    bp.out = p.out;
    bp.in_type = ElemType::f16;
    bp.q_heads = bp.kv_heads = p.groups;
    bp.head_dim = int(dd);
    bp.seq_len = n;
    bp.scale = scale;
    bp.block = p.block;
    bp.query_stride = p.query_stride;
    bp.reduce = BlockReduce::max;
    bp.stream = p.stream;
    return block_scores(bp);
  }

  float *qg = nullptr, *kg = nullptr;
  double* lse = nullptr;
  const size_t elems = size_t(p.groups) * n * d;
  if ((s = scratch.get(&qg, elems, "proxy_scores_exact: proxy q")) != Status::ok) return s;
  if ((s = scratch.get(&kg, elems, "proxy_scores_exact: proxy k")) != Status::ok) return s;
  if ((s = scratch.get(&lse, size_t(p.groups) * n, "proxy_scores_exact: lse")) != Status::ok) return s;
  pq.dst = qg;
  pk.dst = kg;
  s = pool_qk([&](auto tag, unsigned grid) {
    using T = decltype(tag);
    detail::pool_f32_kernel<T><<<grid, 256, 0, st>>>(pq);
    detail::pool_f32_kernel<T><<<grid, 256, 0, st>>>(pk);
  }, "proxy_scores_exact: pooling launch");
  if (s != Status::ok) return s;
  detail::ExactArgs a{};
  a.qg = qg;
  a.kg = kg;
  a.lse = lse;
  a.out = p.out;
  a.n = n;
  a.d = int(d);
  a.block = p.block;
  a.nb = int(nb);
  a.query_stride = p.query_stride;
  a.row_tiles = int((n + detail::kXT - 1) / detail::kXT);
  a.scale = scale;
  const dim3 g2{unsigned(a.row_tiles), unsigned(p.groups)};
  detail::exact_lse_kernel<<<g2, detail::kXNT, 0, st>>>(a);
  if ((s = detail::check_launch("proxy_scores_exact: LSE launch")) != Status::ok) return s;
  if ((s = detail::from_cuda(cudaMemsetAsync(p.out, 0, sizeof(float) * size_t(p.groups) * nb * nb, st),
                             "proxy_scores_exact: zeroing out")) != Status::ok)
    return s;
  detail::exact_max_kernel<<<g2, detail::kXNT, 0, st>>>(a);
  return detail::check_launch("proxy_scores_exact: block-max launch");
}

}  // namespace proxyattn::kernels
