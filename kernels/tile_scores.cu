// One-pass block scores (fused_block_scores): the Hopper kernel's tilestats pass stores, for
// every query row q and key tile j, m[q, j] = max of the logits q.k (keys k <= q of tile j) and
// s[q, j] = sum_k 2^((q.k - m[q, j]) scale_log2); every block score is a function of them and of
// the row lse (base 2: lse2[q] = log2 sum_j s[q, j] 2^(m[q, j] scale_log2)):
//   max-pool  out[i, j] = max_{q in i} 2^(m[q, j] scale_log2 - lse2[q])   (= max of P: exp is monotone)
//   mass      out[i, j] = (1 / rows of i) sum_{q in i} s[q, j] 2^(m[q, j] scale_log2 - lse2[q])
// (mask block = key tile = 128). The reduction below reads them once; the alternative, a second
// pass over Q K^T (block_scores), costs as much as the first.
#include <algorithm>

#include "attention_launch.cuh"
#include "attention_sm90_launch.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace detail {
namespace {

constexpr int kTile = 128;       // rows of a query block = keys of a key tile
constexpr int kReduceWarps = 32;  // warp w takes key tiles j = w, w + 32, ... (few CTAs: the last block)

struct TileReduceArgs {
  const float* tile_max;  // [Hq, Nb, rows], row q at q - 128 row_block_begin
  const float* tile_sum;  // same; null when not stored (max-pool with lse_in)
  const float* lse_in;    // [Hq, N] natural log, or null: combined here from the statistics
  float* lse_out;         // [Hq, N] or null; written when combined here
  float* out;             // [Hq, out_rows, Nb]
  int64_t n, rows;
  int nb, row_block_begin, out_rows, query_stride, reduce_max;
  float scale_log2;
};

// One CTA per (query block i, head h), 32 warps. Lane l holds the rows l + 32 u (u < 4) of the
// block; warp w walks the key tiles j = w, w + 32, ... so that each load of a warp is one
// coalesced 128-byte line of a [j][row] statistic.
__global__ void __launch_bounds__(kReduceWarps * 32) tile_reduce_kernel(const TileReduceArgs a) {
  __shared__ float part_m[kReduceWarps][kTile], part_l[kReduceWarps][kTile];
  __shared__ float lse2_s[kTile];
  const int i = a.row_block_begin + int(blockIdx.x), h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q0 = int64_t(i) * kTile, first_row = int64_t(a.row_block_begin) * kTile;
  const float sl2 = a.scale_log2;
  auto at = [&](int j, int u) { return (int64_t(h) * a.nb + j) * a.rows + (q0 - first_row) + lane + 32 * u; };

  // 1. lse2 of the block's rows: given, or the log-sum of the tiles' (m, s), warp partials merged.
  if (!a.lse_in) {
    float m[4], l[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) m[u] = -INFINITY, l[u] = 0.f;
    for (int j = warp; j <= i; j += kReduceWarps)
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const float s = a.tile_sum[at(j, u)];
        if (s > 0.f) {
          const float tm = a.tile_max[at(j, u)] * sl2, mx = fmaxf(m[u], tm);
          l[u] = l[u] * ex2(m[u] - mx) + s * ex2(tm - mx);
          m[u] = mx;
        }
      }
#pragma unroll
    for (int u = 0; u < 4; ++u) part_m[warp][lane + 32 * u] = m[u], part_l[warp][lane + 32 * u] = l[u];
    __syncthreads();
  }
  if (threadIdx.x < kTile) {
    const int r = threadIdx.x;
    const int64_t q = q0 + r;
    float v = INFINITY;  // rows past N or off the query stride: 2^(x - inf) = 0
    if (q < a.n) {
      float l2;
      if (a.lse_in) {
        l2 = a.lse_in[int64_t(h) * a.n + q] * kLog2e;
      } else {
        float mx = -INFINITY, l = 0.f;
        for (int w = 0; w < kReduceWarps; ++w) mx = fmaxf(mx, part_m[w][r]);
        for (int w = 0; w < kReduceWarps; ++w)
          if (part_l[w][r] > 0.f) l += part_l[w][r] * ex2(part_m[w][r] - mx);
        l2 = mx + log2f(l);
        if (a.lse_out) a.lse_out[int64_t(h) * a.n + q] = l2 * kLn2;
      }
      if (r % a.query_stride == 0) v = l2;
    }
    lse2_s[r] = v;
  }
  __syncthreads();
  float lse2[4];
  int used = 0;  // rows scored (the mean's divisor)
#pragma unroll
  for (int u = 0; u < 4; ++u) lse2[u] = lse2_s[lane + 32 * u];
  for (int r = 0; r < kTile; ++r) used += lse2_s[r] < INFINITY;

  // 2. The scores: warp w, key tiles j = w, w + 32, ...; zero above the diagonal.
  float* orow = a.out + (int64_t(h) * a.out_rows + (i - a.row_block_begin)) * a.nb;
  for (int j = warp; j < a.nb; j += kReduceWarps) {
    float v = 0.f;
    if (j <= i) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (lse2[u] == INFINITY) continue;
        const float p = ex2(fmaf(a.tile_max[at(j, u)], sl2, -lse2[u]));
        v = a.reduce_max ? fmaxf(v, p) : v + a.tile_sum[at(j, u)] * p;
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        const float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = a.reduce_max ? fmaxf(v, o) : v + o;
      }
      if (!a.reduce_max) v /= float(used);
    }
    if (lane == 0) orow[j] = v;
  }
}

// row_lse then block_scores: the path where the one-pass one does not apply.
Status two_passes(const FusedScoreParams& fp, const BlockScoreArgs& b) {
  const BlockScoreParams& p = fp.scores;
  cudaStream_t st = stream_of(p.stream);
  float* lse = fp.lse_out;
  void* tmp = nullptr;
  if (!lse) {
    Status s = from_cuda(cudaMallocAsync(&tmp, size_t(p.q_heads) * size_t(b.n) * 4, st), "fused_block_scores: lse scratch");
    if (s != Status::ok) return s;
    lse = static_cast<float*>(tmp);
  }
  AttentionParams ap;
  ap.q = p.q;
  ap.k = p.k;
  ap.lse = lse;
  ap.in_type = p.in_type;
  ap.q_heads = p.q_heads;
  ap.kv_heads = p.kv_heads;
  ap.head_dim = p.head_dim;
  ap.seq_len = p.seq_len;
  ap.q_stride_head = b.qsh;
  ap.q_stride_token = b.qst;
  ap.k_stride_head = b.ksh;
  ap.k_stride_token = b.kst;
  ap.scale = p.scale;
  ap.row_begin = int64_t(p.row_block_begin) * p.block;
  ap.impl = p.impl;
  ap.stream = p.stream;
  Status s = row_lse(ap);
  if (s == Status::ok) {
    BlockScoreParams bp = p;
    bp.lse = lse;
    s = block_scores(bp);
  }
  if (tmp) {
    const Status sf = from_cuda(cudaFreeAsync(tmp, st), "fused_block_scores: lse scratch free");
    if (s == Status::ok) s = sf;
  }
  return s;
}

// What the one-pass path does for a request: why it cannot (null when it can), its key splits,
// whether it stores the tile sums, and its workspace (statistics, then the lse when scratch).
struct FusedPlan {
  const char* why = nullptr;
  int splits = 1;
  bool need_sum = false, lse_scratch = false;
  int64_t rows = 0;
  size_t stat_bytes = 0, bytes = 0;
};

FusedPlan plan_fused(const FusedScoreParams& fp, const BlockScoreArgs& b) {
  const BlockScoreParams& p = fp.scores;
  FusedPlan pl;
  if (p.impl == AttnImpl::portable) {
    pl.why = "fused_block_scores: portable requested";
    return pl;
  }
  // Query tiles [row_block_begin, Nb) x heads CTAs; keys split until they fill the GPU.
  const int64_t nb = b.nb;
  pl.rows = int64_t(b.out_rows) * kTile;
  int splits = p.key_splits;
  if (splits == 0) {
    const int64_t ctas = int64_t(b.out_rows) * p.q_heads, sms = sm_count();
    splits = ctas >= sms ? 1 : int(std::max<int64_t>(1, sms / ctas));
  }
  pl.splits = int(std::min<int64_t>({int64_t(splits), nb, 65535}));
  pl.need_sum = p.reduce == BlockReduce::mean_sum || pl.splits > 1;
  pl.lse_scratch = pl.splits == 1 && !fp.lse_out;
  pl.stat_bytes = size_t(p.q_heads) * size_t(nb) * size_t(pl.rows) * 4;
  pl.bytes = pl.stat_bytes * (pl.need_sum ? 2 : 1) + (pl.lse_scratch ? size_t(p.q_heads) * size_t(b.n) * 4 : 0);
  if (p.block != kTile) pl.why = "fused_block_scores: the one-pass path needs block 128";
  if (!pl.why) pl.why = sm90_unsupported_reason(sm90_score_args(b, nullptr), p.head_dim, false, 0);
  if (!pl.why && pl.bytes > fp.workspace_limit) pl.why = "fused_block_scores: the one-pass workspace exceeds workspace_limit";
  return pl;
}

Status check_fused(const FusedScoreParams& fp, BlockScoreArgs* b) {
  const BlockScoreParams& p = fp.scores;
  Status s = make_block_score_args(p, "fused_block_scores", false, b);
  if (s != Status::ok) return s;
  if (p.key_splits < 0) return fail(Status::invalid_argument, "fused_block_scores: key_splits must be >= 0");
  if (p.impl != AttnImpl::automatic && p.impl != AttnImpl::portable && p.impl != AttnImpl::hopper)
    return fail(Status::invalid_argument, "fused_block_scores: unknown impl");
  return Status::ok;
}

}  // namespace
}  // namespace detail

size_t fused_block_scores_workspace(const FusedScoreParams& fp) noexcept {
  detail::BlockScoreArgs b{};
  if (detail::check_fused(fp, &b) != Status::ok) return 0;
  const detail::FusedPlan pl = detail::plan_fused(fp, b);
  return pl.why ? 0 : pl.bytes;
}

Status fused_block_scores(const FusedScoreParams& fp) noexcept {
  const BlockScoreParams& p = fp.scores;
  detail::BlockScoreArgs b{};
  Status s = detail::check_fused(fp, &b);
  if (s != Status::ok) return s;
  if (fp.one_pass) *fp.one_pass = false;
  const detail::FusedPlan pl = detail::plan_fused(fp, b);
  cudaStream_t st = detail::stream_of(p.stream);
  void* ws = fp.workspace && fp.workspace_bytes >= pl.bytes ? fp.workspace : nullptr;
  bool owned = false;
  const char* why = pl.why;
  if (!why && !ws) {
    if (cudaMallocAsync(&ws, pl.bytes, st) == cudaSuccess) {
      owned = true;
    } else {
      (void)cudaGetLastError();  // out of memory is not sticky: take the two passes
      ws = nullptr;
      why = "fused_block_scores: the one-pass workspace could not be allocated";
    }
  }
  if (why) {
    if (p.impl == AttnImpl::hopper) return fail(Status::unsupported, why);
    return detail::two_passes(fp, b);
  }

  float* stats = static_cast<float*>(ws);
  const size_t stat_floats = pl.stat_bytes / 4;
  float* lse = pl.splits > 1 ? nullptr : fp.lse_out ? fp.lse_out : stats + stat_floats * (pl.need_sum ? 2 : 1);
  detail::AttnArgs aa = detail::sm90_score_args(b, lse);
  detail::Sm90Scores sco;
  sco.tile_max = stats;
  sco.tile_sum = pl.need_sum ? stats + stat_floats : nullptr;
  sco.stat_rows = pl.rows;
  sco.first_tile = b.row_block_begin;
  sco.key_splits = pl.splits;
  s = detail::launch_sm90(detail::Sm90Mode::tilestats, aa, p.in_type, p.head_dim, p.q_heads, p.kv_heads, sco, st);
  if (s == Status::ok) {
    detail::TileReduceArgs r{};
    r.tile_max = sco.tile_max;
    r.tile_sum = sco.tile_sum;
    r.lse_in = lse;
    r.lse_out = lse ? nullptr : fp.lse_out;
    r.out = p.out;
    r.n = b.n;
    r.rows = pl.rows;
    r.nb = b.nb;
    r.row_block_begin = b.row_block_begin;
    r.out_rows = b.out_rows;
    r.query_stride = b.query_stride;
    r.reduce_max = b.reduce_max;
    r.scale_log2 = b.scale_log2;
    detail::tile_reduce_kernel<<<dim3(unsigned(b.out_rows), unsigned(p.q_heads)), detail::kReduceWarps * 32, 0, st>>>(r);
    s = detail::check_launch("fused_block_scores: reduction launch");
  }
  if (owned) {
    const Status sf = detail::from_cuda(cudaFreeAsync(ws, st), "fused_block_scores: workspace free");
    if (s == Status::ok) s = sf;
  }
  if (s == Status::ok && fp.one_pass) *fp.one_pass = true;
  return s;
}

}  // namespace proxyattn::kernels
