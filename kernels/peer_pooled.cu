// `pooled` block scores (the CPU spec: detail::pooled_scores in lib/src/estimator.cpp):
// block means of Q and K in fp32, logits Qbar Kbar^T * scale (fp32 SIMT, 64 x 64 tiles), then a
// row softmax over j <= i in float64 (as the CPU). The product is Nb x Nb x d per head, 1/B^2 of
// QK^T: tensor cores would buy nothing here and fp32 keeps the scores at the CPU's precision.
#include <cmath>

#include "peer_tiles.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace peer {
namespace {

// out[h, I, c] = mean of rows [I B, min(N, (I+1) B)) of column c of head h, fp32. The sum pairs
// consecutive rows like Eigen's packet-wise column sum (acc + (x_i + x_{i+1})), so the means are
// usually bit-identical to the CPU's; then divided by the row count.
template <class T>
__global__ void block_means_kernel(const T* __restrict__ g, int64_t sh, int64_t st, int64_t n, int heads, int nb,
                                   int d, int block, float* __restrict__ out) {
  const int64_t total = int64_t(heads) * nb * d;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < total; x += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(x % d);
    const int64_t hb = x / d;
    const int I = int(hb % nb), h = int(hb / nb);
    const int64_t t0 = int64_t(I) * block, t1 = t0 + block < n ? t0 + block : n;
    const T* col = g + h * sh + c;
    float acc = detail::to_float(col[t0 * st]);
    int64_t t = t0 + 1;
    for (; t + 1 < t1; t += 2) acc = acc + (detail::to_float(col[t * st]) + detail::to_float(col[(t + 1) * st]));
    if (t < t1) acc = acc + detail::to_float(col[t * st]);
    out[x] = acc / float(t1 - t0);
  }
}

constexpr int kTile = 64, kChunk = 64;

// Logits of one 64 x 64 tile (query blocks i0.., key blocks j0..) of head h: 256 threads, each
// 4 x 4 outputs (rows ty + 16 a, columns tx + 16 b), d in chunks of 64 through shared memory.
// Writes out[h, i, j] = scale * qbar_i . kbar_j for j <= i only (the softmax pass owns the rest).
__global__ void __launch_bounds__(256) pooled_logits_kernel(const float* __restrict__ qbar,
                                                            const float* __restrict__ kbar, int nb, int d, int group,
                                                            float scale, float* __restrict__ out) {
  const int ti = blockIdx.x, tj = blockIdx.y, h = blockIdx.z;
  if (tj > ti) return;  // above the diagonal: no causal entry
  __shared__ float sq[kTile][kChunk + 1], sk[kTile][kChunk + 1];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int i0 = ti * kTile, j0 = tj * kTile;
  const float* qb = qbar + int64_t(h) * nb * d;
  const float* kb = kbar + int64_t(h / group) * nb * d;
  float acc[4][4] = {};
  for (int c0 = 0; c0 < d; c0 += kChunk) {
    const int cw = d - c0 < kChunk ? d - c0 : kChunk;
    __syncthreads();  // previous chunk consumed
    for (int e = tid; e < kTile * kChunk; e += 256) {
      const int r = e / kChunk, c = e % kChunk;
      const bool okc = c < cw;
      sq[r][c] = okc && i0 + r < nb ? qb[int64_t(i0 + r) * d + c0 + c] : 0.f;
      sk[r][c] = okc && j0 + r < nb ? kb[int64_t(j0 + r) * d + c0 + c] : 0.f;
    }
    __syncthreads();
    fma_4x4(acc, sq, sk, cw, tx, ty);
  }
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int i = i0 + ty + 16 * u, j = j0 + tx + 16 * v;
      if (i < nb && j <= i) out[(int64_t(h) * nb + i) * nb + j] = acc[u][v] * scale;
    }
}

// One warp per row (h, i): m = max_j a_j, l = sum exp(a_j - m) in float64, out = exp(a - m) / l
// for j <= i (the CPU's formula), 0 above the diagonal.
__global__ void pooled_softmax_kernel(float* __restrict__ out, int heads, int nb) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= int64_t(heads) * nb) return;
  const int i = int(row % nb);
  float* r = out + row * nb;
  double m = -INFINITY;
  for (int j = lane; j <= i; j += 32) m = fmax(m, double(r[j]));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, off));
  double l = 0;
  for (int j = lane; j <= i; j += 32) l += exp(double(r[j]) - m);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
  __syncwarp();
  for (int j = lane; j < nb; j += 32) r[j] = j <= i ? float(exp(double(r[j]) - m) / l) : 0.f;
}

unsigned grid_1d(int64_t n, int threads) {
  const int64_t g = (n + threads - 1) / threads;
  return unsigned(g < 1 ? 1 : (g > 65535 * 8 ? 65535 * 8 : g));
}

}  // namespace

template <class T>
Status launch_block_means(const T* g, int64_t sh, int64_t st, int64_t n, int heads, int nb, int d, int block,
                          float* out, cudaStream_t s) {
  const int64_t total = int64_t(heads) * nb * d;
  block_means_kernel<T><<<grid_1d(total, 256), 256, 0, s>>>(g, sh, st, n, heads, nb, d, block, out);
  return detail::check_launch("pooled_scores: block means launch");
}

}  // namespace peer

Status pooled_scores(const PooledScoreParams& p) noexcept {
  peer::Operands o{};
  Status s = peer::make_operands(p.in, "pooled_scores", false, &o);
  if (s != Status::ok) return s;
  if (!peer::is_pow2(p.block)) return fail(Status::invalid_argument, "pooled_scores: block must be a power of two");
  if (!p.out) return fail(Status::invalid_argument, "pooled_scores: null out");
  const int64_t nb64 = (p.in.seq_len + p.block - 1) / p.block;
  if (nb64 > 65535 * peer::kTile) return fail(Status::invalid_argument, "pooled_scores: too many blocks");
  const int nb = int(nb64), d = p.in.head_dim;
  const float scale = p.scale > 0.f ? p.scale : 1.0f / std::sqrt(float(d));
  cudaStream_t st = detail::stream_of(p.stream);
  peer::Scratch scratch(st);
  float *qbar = nullptr, *kbar = nullptr;
  if ((s = scratch.get(&qbar, size_t(p.in.q_heads) * nb * d, "pooled_scores: qbar workspace")) != Status::ok) return s;
  if ((s = scratch.get(&kbar, size_t(p.in.kv_heads) * nb * d, "pooled_scores: kbar workspace")) != Status::ok) return s;
  if (p.in.in_type == ElemType::bf16) {
    using T = __nv_bfloat16;
    s = peer::launch_block_means(static_cast<const T*>(o.q), o.qsh, o.qst, o.n, p.in.q_heads, nb, d, p.block, qbar, st);
    if (s == Status::ok)
      s = peer::launch_block_means(static_cast<const T*>(o.k), o.ksh, o.kst, o.n, p.in.kv_heads, nb, d, p.block, kbar, st);
  } else {
    using T = __half;
    s = peer::launch_block_means(static_cast<const T*>(o.q), o.qsh, o.qst, o.n, p.in.q_heads, nb, d, p.block, qbar, st);
    if (s == Status::ok)
      s = peer::launch_block_means(static_cast<const T*>(o.k), o.ksh, o.kst, o.n, p.in.kv_heads, nb, d, p.block, kbar, st);
  }
  if (s != Status::ok) return s;
  const unsigned tiles = unsigned((nb + peer::kTile - 1) / peer::kTile);
  peer::pooled_logits_kernel<<<dim3(tiles, tiles, unsigned(p.in.q_heads)), 256, 0, st>>>(qbar, kbar, nb, d, o.group,
                                                                                         scale, p.out);
  if ((s = detail::check_launch("pooled_scores: logits launch")) != Status::ok) return s;
  const int64_t rows = int64_t(p.in.q_heads) * nb;
  const int64_t blocks = (rows + 7) / 8;  // 8 warps per CTA
  if (blocks > 0x7fffffffLL) return fail(Status::invalid_argument, "pooled_scores: too many rows");
  peer::pooled_softmax_kernel<<<unsigned(blocks), 256, 0, st>>>(p.out, p.in.q_heads, nb);
  return detail::check_launch("pooled_scores: softmax launch");
}

}  // namespace proxyattn::kernels
