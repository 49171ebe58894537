// CPU reference attention. Tiles are Eigen matrix products; softmax statistics in float64.
// Parallel over (head, query tile) with OpenMP; Eigen runs single-threaded inside.
#include "proxyattn/attention.hpp"

#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <string>

#include "proxyattn/error.hpp"

namespace proxyattn {

namespace {

using MatRM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowsMap = Eigen::Map<const MatRM, 0, Eigen::OuterStride<>>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per host thread: the analysis runs two units on two host threads, each with half the threads.
thread_local int g_threads = 0;

RowsMap rows_of(ConstView v, int64_t h, int64_t t0, int64_t n) {
  return RowsMap(v.row(h, t0), n, v.dim, Eigen::OuterStride<>(v.stride_token));
}

// Scaled scores of query rows [q0, q0 + S.rows()) against keys [k0, k0 + S.cols()), with
// entries above the causal diagonal set to -inf, and with window W > 0 also the keys j <= i - W.
void causal_scores(ConstView q, ConstView k, int64_t hq, int64_t hk, int64_t q0, int64_t nq,
                   int64_t k0, int64_t nk, float scale, MatRM& S, int64_t window = 0) {
  S.noalias() = rows_of(q, hq, q0, nq) * rows_of(k, hk, k0, nk).transpose();
  S *= scale;
  if (k0 + nk - 1 > q0)  // some key is after some query: cut the upper triangle
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t c = std::max<int64_t>(0, q0 + r - k0 + 1); c < nk; ++c) S(r, c) = kNegInf;
  if (window > 0 && k0 + window <= q0 + nq - 1)  // some key is left of some query's window
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t c = 0; c < std::min<int64_t>(nk, q0 + r - window + 1 - k0); ++c) S(r, c) = kNegInf;
}

// Exceptions cannot leave an OpenMP region: the first one is kept and rethrown after it.
template <class F>
void parallel_for_2d(int64_t n0, int64_t n1, F&& f) {
  const int threads = g_threads > 0 ? g_threads : omp_get_max_threads();
  std::exception_ptr first;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)
  for (int64_t a = 0; a < n0; ++a)
    for (int64_t b = 0; b < n1; ++b) {
      try {
        f(a, b);
      } catch (...) {
#pragma omp critical(proxyattn_first_error)
        if (!first) first = std::current_exception();
      }
    }
  if (first) std::rethrow_exception(first);
}

// Online-softmax attention of query rows [q0, q1) of head h over a list of key ranges.
struct KeyRange {
  int64_t begin, end;
};
void attend_rows(ConstView q, ConstView k, ConstView v, const AttentionShape& s, int64_t h, int64_t q0,
                 int64_t q1, const std::vector<KeyRange>& ranges, AttentionOutput& out, int64_t window = 0) {
  const int64_t nq = q1 - q0, d = s.head_dim, hk = s.kv_head_of(static_cast<int>(h));
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  MatRM acc = MatRM::Zero(nq, d), S;
  std::vector<float> m(nq, kNegInf);
  std::vector<double> l(nq, 0.0);
  for (const KeyRange& kr : ranges) {
    const int64_t k0 = kr.begin, nk = std::min(kr.end, q1) - k0;
    if (nk <= 0) continue;
    S.resize(nq, nk);
    causal_scores(q, k, h, hk, q0, nq, k0, nk, scale, S, window);
    for (int64_t r = 0; r < nq; ++r) {
      const float mc = S.row(r).maxCoeff();
      if (mc == kNegInf) {  // row fully masked in this range
        S.row(r).setZero();
        continue;
      }
      const float mn = std::max(m[r], mc);
      const float alpha = m[r] == kNegInf ? 0.0f : std::exp(m[r] - mn);
      S.row(r) = (S.row(r).array() - mn).exp().matrix();
      l[r] = l[r] * alpha + static_cast<double>(S.row(r).sum());
      acc.row(r) *= alpha;
      m[r] = mn;
    }
    acc.noalias() += S * rows_of(v, hk, k0, nk);
  }
  for (int64_t r = 0; r < nq; ++r) {
    if (l[r] <= 0) throw Error("attention: query row " + std::to_string(q0 + r) + " of head " +
                               std::to_string(h) + " attends to no key (its diagonal block is missing)");
    float* o = out.o.row(h, q0 + r);
    const float inv = static_cast<float>(1.0 / l[r]);
    for (int64_t c = 0; c < d; ++c) o[c] = acc(r, c) * inv;
    out.lse[h * s.seq_len + q0 + r] = static_cast<float>(m[r] + std::log(l[r]));
  }
}

// Per (query row, key block): local max and sum of exp(score - local max). The row LSE and
// the block mass both follow from these without a second pass over the keys.
struct BlockStats {
  MatRM mx, sum;  // [rows, Nb]
};
void block_stats(ConstView q, ConstView k, const AttentionShape& s, int64_t h, int i, int block,
                 BlockStats& st) {
  const int64_t N = s.seq_len, q0 = static_cast<int64_t>(i) * block, q1 = std::min(N, q0 + block),
                nq = q1 - q0, hk = s.kv_head_of(static_cast<int>(h));
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  st.mx.setConstant(nq, i + 1, kNegInf);
  st.sum.setZero(nq, i + 1);
  // Scores for several key blocks per matrix product: larger products run much faster.
  const int per_chunk = std::max(1, 512 / block);
  MatRM S;
  for (int j0 = 0; j0 <= i; j0 += per_chunk) {
    const int j1 = std::min(i + 1, j0 + per_chunk);
    const int64_t k0 = static_cast<int64_t>(j0) * block, nk = std::min(N, static_cast<int64_t>(j1) * block) - k0;
    S.resize(nq, nk);
    causal_scores(q, k, h, hk, q0, nq, k0, nk, scale, S);
    for (int j = j0; j < j1; ++j) {
      const int64_t c0 = static_cast<int64_t>(j - j0) * block, nc = std::min<int64_t>(block, nk - c0);
      for (int64_t r = 0; r < nq; ++r) {
        const float mc = S.row(r).segment(c0, nc).maxCoeff();
        st.mx(r, j) = mc;
        if (mc != kNegInf) st.sum(r, j) = (S.row(r).segment(c0, nc).array() - mc).exp().sum();
      }
    }
  }
}

}  // namespace

void set_cpu_threads(int n) { g_threads = n > 0 ? n : 0; }
int cpu_threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }

AttentionShape check_qkv(ConstView q, ConstView k, ConstView v) {
  AttentionShape s;
  if (q.tokens == 0) throw Error("q: sequence length is 0");
  if (q.heads == 0 || k.heads == 0) throw Error("q/k: zero heads");
  if (q.dim != k.dim)
    throw Error("head dim of q (" + std::to_string(q.dim) + ") differs from k (" + std::to_string(k.dim) + ")");
  if (q.tokens != k.tokens)
    throw Error("q has " + std::to_string(q.tokens) + " tokens but k has " + std::to_string(k.tokens));
  if (q.heads % k.heads != 0)
    throw Error("q heads (" + std::to_string(q.heads) + ") not a multiple of k heads (" +
                std::to_string(k.heads) + ")");
  if (!v.empty()) {
    if (v.heads != k.heads || v.tokens != k.tokens || v.dim != k.dim)
      throw Error("v shape [" + std::to_string(v.heads) + ", " + std::to_string(v.tokens) + ", " +
                  std::to_string(v.dim) + "] differs from k [" + std::to_string(k.heads) + ", " +
                  std::to_string(k.tokens) + ", " + std::to_string(k.dim) + "]");
  }
  s.q_heads = static_cast<int>(q.heads);
  s.kv_heads = static_cast<int>(k.heads);
  s.head_dim = static_cast<int>(q.dim);
  s.seq_len = q.tokens;
  return s;
}

AttentionOutput full_attention_cpu(ConstView q, ConstView k, ConstView v) { return sliding_attention_cpu(q, k, v, 0); }

AttentionOutput sliding_attention_cpu(ConstView q, ConstView k, ConstView v, int64_t window) {
  if (v.empty()) throw Error("full attention needs v");
  if (window < 0) throw Error("sliding attention: window " + std::to_string(window) + " must be >= 0");
  const AttentionShape s = check_qkv(q, k, v);
  constexpr int64_t kQTile = 64, kKChunk = 256;
  const int64_t N = s.seq_len, tiles = (N + kQTile - 1) / kQTile;
  if (window >= N) window = 0;  // the window holds every causal key
  AttentionOutput out{Tensor3(s.q_heads, N, s.head_dim), std::vector<float>(s.q_heads * N)};
  parallel_for_2d(s.q_heads, tiles, [&](int64_t h, int64_t t) {
    const int64_t q0 = t * kQTile, q1 = std::min(N, q0 + kQTile);
    // Keys left of the tile's first window are never read: a local layer costs O(N (tile + W)).
    const int64_t kb = window > 0 ? std::max<int64_t>(0, q0 - window + 1) : 0;
    std::vector<KeyRange> ranges;
    for (int64_t k0 = kb; k0 < q1; k0 += kKChunk) ranges.push_back({k0, std::min(q1, k0 + kKChunk)});
    attend_rows(q, k, v, s, h, q0, q1, ranges, out, window);
  });
  return out;
}

AttentionOutput sparse_attention_cpu(ConstView q, ConstView k, ConstView v, const BlockMask& mask) {
  if (v.empty()) throw Error("sparse attention needs v");
  const AttentionShape s = check_qkv(q, k, v);
  if (mask.heads() != s.q_heads || mask.seq_len() != s.seq_len)
    throw Error("mask is for " + std::to_string(mask.heads()) + " heads x " + std::to_string(mask.seq_len()) +
                " tokens, attention has " + std::to_string(s.q_heads) + " x " + std::to_string(s.seq_len));
  const int64_t N = s.seq_len, B = mask.block();
  AttentionOutput out{Tensor3(s.q_heads, N, s.head_dim), std::vector<float>(s.q_heads * N)};
  parallel_for_2d(s.q_heads, mask.num_blocks(), [&](int64_t h, int64_t i) {
    std::vector<KeyRange> ranges;
    for (int32_t j : mask.row(static_cast<int>(h), static_cast<int>(i)))
      ranges.push_back({j * B, std::min(N, (j + 1) * B)});
    attend_rows(q, k, v, s, h, i * B, std::min(N, (i + 1) * B), ranges, out);
  });
  return out;
}

std::vector<float> row_lse_cpu(ConstView q, ConstView k) {
  const AttentionShape s = check_qkv(q, k);
  constexpr int kBlock = 128;
  const int nb = num_blocks_for(s.seq_len, kBlock);
  std::vector<float> lse(static_cast<size_t>(s.q_heads) * s.seq_len);
  parallel_for_2d(s.q_heads, nb, [&](int64_t h, int64_t i) {
    BlockStats st;
    block_stats(q, k, s, h, static_cast<int>(i), kBlock, st);
    for (int64_t r = 0; r < st.mx.rows(); ++r) {
      const double m = st.mx.row(r).maxCoeff();
      double l = 0;
      for (int64_t j = 0; j < st.mx.cols(); ++j)
        if (st.mx(r, j) != kNegInf) l += st.sum(r, j) * std::exp(st.mx(r, j) - m);
      lse[h * s.seq_len + i * kBlock + r] = static_cast<float>(m + std::log(l));
    }
  });
  return lse;
}

BlockMass block_mass_cpu(ConstView q, ConstView k, int block) {
  const AttentionShape s = check_qkv(q, k);
  const int nb = num_blocks_for(s.seq_len, block);
  BlockMass bm{s.q_heads, nb, block, s.seq_len, std::vector<float>(static_cast<size_t>(s.q_heads) * nb * nb, 0.0f)};
  parallel_for_2d(s.q_heads, nb, [&](int64_t h, int64_t i) {
    BlockStats st;
    block_stats(q, k, s, h, static_cast<int>(i), block, st);
    const int64_t rows = st.mx.rows();
    std::vector<double> acc(i + 1, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const double m = st.mx.row(r).maxCoeff();
      double l = 0;
      for (int64_t j = 0; j <= i; ++j)
        if (st.mx(r, j) != kNegInf) l += st.sum(r, j) * std::exp(st.mx(r, j) - m);
      for (int64_t j = 0; j <= i; ++j)
        if (st.mx(r, j) != kNegInf) acc[j] += st.sum(r, j) * std::exp(st.mx(r, j) - m) / l;
    }
    float* out = bm.row(static_cast<int>(h), static_cast<int>(i));
    for (int64_t j = 0; j <= i; ++j) out[j] = static_cast<float>(acc[j] / rows);
  });
  return bm;
}

BlockMass block_mass_cpu(ConstView q, ConstView k, int block, const std::vector<float>& lse) {
  const AttentionShape s = check_qkv(q, k);
  const int nb = num_blocks_for(s.seq_len, block);
  if (lse.size() != static_cast<size_t>(s.q_heads) * s.seq_len)
    throw Error("block mass: lse has " + std::to_string(lse.size()) + " rows, expected Hq * N");
  BlockMass bm{s.q_heads, nb, block, s.seq_len, std::vector<float>(static_cast<size_t>(s.q_heads) * nb * nb, 0.0f)};
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const int64_t N = s.seq_len;
  parallel_for_2d(s.q_heads, nb, [&](int64_t h, int64_t i) {
    const int64_t q0 = i * block, nq = std::min(N, q0 + block) - q0, hk = s.kv_head_of(static_cast<int>(h));
    MatRM S;
    float* out = bm.row(static_cast<int>(h), static_cast<int>(i));
    for (int64_t j = 0; j <= i; ++j) {
      const int64_t k0 = j * block, nk = std::min(N, k0 + block) - k0;
      S.resize(nq, nk);
      causal_scores(q, k, h, hk, q0, nq, k0, nk, scale, S);
      double acc = 0;
      for (int64_t r = 0; r < nq; ++r)
        acc += (S.row(r).array() - lse[h * N + q0 + r]).exp().template cast<double>().sum();
      out[j] = static_cast<float>(acc / nq);
    }
  });
  return bm;
}

}  // namespace proxyattn
