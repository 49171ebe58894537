#pragma once
// Naive float64 references of the estimators (ALGORITHMS.md in its most literal form) and
// small helpers for the estimator / budget / selection tests.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "proxyattn/attention.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/tensor.hpp"
#include "test_util.hpp"

namespace proxyattn::test {

// A [H, N, d] float64 tensor.
struct T64 {
  int64_t heads = 0, tokens = 0, dim = 0;
  std::vector<double> v;
  double& operator()(int64_t h, int64_t t, int64_t c) { return v[(h * tokens + t) * dim + c]; }
  double operator()(int64_t h, int64_t t, int64_t c) const { return v[(h * tokens + t) * dim + c]; }
};

inline T64 to64(ConstView x) {
  T64 t{x.heads, x.tokens, x.dim, std::vector<double>(static_cast<size_t>(x.heads * x.tokens * x.dim))};
  for (int64_t h = 0; h < x.heads; ++h)
    for (int64_t n = 0; n < x.tokens; ++n)
      for (int64_t c = 0; c < x.dim; ++c) t(h, n, c) = x(h, n, c);
  return t;
}

// Causal probabilities of row t of q head hq against k head hk (float64, [t + 1]).
inline std::vector<double> row_probs64(const T64& q, const T64& k, int64_t hq, int64_t hk, int64_t t) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.dim));
  std::vector<double> s(t + 1);
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c <= t; ++c) {
    double acc = 0;
    for (int64_t x = 0; x < q.dim; ++x) acc += q(hq, t, x) * k(hk, c, x);
    s[c] = acc * scale;
    m = std::max(m, s[c]);
  }
  double l = 0;
  for (double& x : s) l += (x = std::exp(x - m));
  for (double& x : s) x /= l;
  return s;
}

// Token-level max-pool block scores of every head pair (q head h, k head h): [H, Nb, Nb].
inline std::vector<double> maxpool64(const T64& q, const T64& k, int block, int stride = 1) {
  const int64_t H = q.heads, N = q.tokens, nb = (N + block - 1) / block;
  std::vector<double> out(static_cast<size_t>(H * nb * nb), 0.0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < N; ++t) {
      if ((t % block) % stride != 0) continue;
      const auto p = row_probs64(q, k, h, h, t);
      const int64_t i = t / block;
      for (int64_t c = 0; c <= t; ++c) {
        double& o = out[(h * nb + i) * nb + c / block];
        o = std::max(o, p[c]);
      }
    }
  return out;
}

// ProxyAttn reference: mean-pooled proxy heads in float64, max-pooled token softmax, broadcast
// to the member query heads. [Hq, Nb, Nb].
inline std::vector<double> proxy64(ConstView qf, ConstView kf, int groups, int block, int stride = 1) {
  const T64 q = to64(qf), k = to64(kf);
  const int64_t Hq = q.heads, Hkv = k.heads, r = Hq / Hkv, per = Hq / groups, N = q.tokens, d = q.dim;
  T64 pq{groups, N, d, std::vector<double>(static_cast<size_t>(groups * N * d), 0.0)};
  T64 pk = pq;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t h0 = g * per, h1 = h0 + per, k0 = h0 / r, k1 = (h1 - 1) / r + 1;
    for (int64_t t = 0; t < N; ++t)
      for (int64_t x = 0; x < d; ++x) {
        double a = 0, b = 0;
        for (int64_t h = h0; h < h1; ++h) a += q(h, t, x);
        for (int64_t h = k0; h < k1; ++h) b += k(h, t, x);
        pq(g, t, x) = a / per;
        pk(g, t, x) = b / (k1 - k0);
      }
  }
  const std::vector<double> gs = maxpool64(pq, pk, block, stride);
  const int64_t nb = (N + block - 1) / block, sz = nb * nb;
  std::vector<double> out(static_cast<size_t>(Hq * sz));
  for (int64_t h = 0; h < Hq; ++h) std::copy_n(gs.begin() + (h / per) * sz, sz, out.begin() + h * sz);
  return out;
}

// Pooled-block reference: exact block means, block-causal row softmax. [Hq, Nb, Nb].
inline std::vector<double> pooled64(ConstView qf, ConstView kf, int block) {
  const T64 q = to64(qf), k = to64(kf);
  const int64_t Hq = q.heads, r = Hq / k.heads, N = q.tokens, d = q.dim, nb = (N + block - 1) / block;
  auto means = [&](const T64& x, int64_t h) {
    std::vector<double> m(static_cast<size_t>(nb * d), 0.0);
    for (int64_t t = 0; t < N; ++t)
      for (int64_t c = 0; c < d; ++c) m[(t / block) * d + c] += x(h, t, c);
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t n = std::min<int64_t>(N, (i + 1) * block) - i * block;
      for (int64_t c = 0; c < d; ++c) m[i * d + c] /= n;
    }
    return m;
  };
  std::vector<double> out(static_cast<size_t>(Hq * nb * nb), 0.0);
  for (int64_t h = 0; h < Hq; ++h) {
    const auto qb = means(q, h), kb = means(k, h / r);
    for (int64_t i = 0; i < nb; ++i) {
      std::vector<double> s(i + 1);
      double m = -1e300, l = 0;
      for (int64_t j = 0; j <= i; ++j) {
        double a = 0;
        for (int64_t c = 0; c < d; ++c) a += qb[i * d + c] * kb[j * d + c];
        s[j] = a / std::sqrt(static_cast<double>(d));
        m = std::max(m, s[j]);
      }
      for (double& x : s) l += (x = std::exp(x - m));
      for (int64_t j = 0; j <= i; ++j) out[(h * nb + i) * nb + j] = s[j] / l;
    }
  }
  return out;
}

// XAttention brute force: the strided score as explicit antidiagonal sums over the S x S
// tile (a, b): sum over the tile cells (x, y) with x + y = S - 1 of q[aS + x] . k[bS + y].
inline double xattn_strided64(const T64& q, const T64& k, int64_t hq, int64_t hk, int64_t a, int64_t b, int S) {
  double acc = 0;
  for (int x = 0; x < S; ++x)
    for (int y = 0; y < S; ++y) {
      if (x + y != S - 1) continue;
      const int64_t qp = a * S + x, kp = b * S + y;
      if (qp >= q.tokens || kp >= k.tokens) continue;
      for (int64_t c = 0; c < q.dim; ++c) acc += q(hq, qp, c) * k(hk, kp, c);
    }
  return acc / (std::sqrt(static_cast<double>(q.dim)) * S);
}

// XAttention block scores from the brute-force strided scores. [Hq, Nb, Nb].
inline std::vector<double> xattn64(ConstView qf, ConstView kf, int block, int S) {
  const T64 q = to64(qf), k = to64(kf);
  const int64_t Hq = q.heads, r = Hq / k.heads, N = q.tokens, A = (N + S - 1) / S, nb = (N + block - 1) / block,
                per = block / S;
  std::vector<double> out(static_cast<size_t>(Hq * nb * nb), 0.0);
  for (int64_t h = 0; h < Hq; ++h) {
    std::vector<int64_t> rows(nb, 0);
    for (int64_t a = 0; a < A; ++a) {
      std::vector<double> s(a + 1);
      double m = -1e300, l = 0;
      for (int64_t b = 0; b <= a; ++b) m = std::max(m, s[b] = xattn_strided64(q, k, h, h / r, a, b, S));
      for (double& x : s) l += (x = std::exp(x - m));
      const int64_t I = a / per;
      ++rows[I];
      for (int64_t b = 0; b <= a; ++b) out[(h * nb + I) * nb + b / per] += s[b] / l;
    }
    for (int64_t I = 0; I < nb; ++I)
      for (int64_t J = 0; J < nb; ++J) out[(h * nb + I) * nb + J] /= rows[I];
  }
  return out;
}

// Mean over the last L rows of the causal probabilities: per key column and per offset q - k.
struct VS64 {
  std::vector<double> vertical, slash;
};
inline VS64 vertical_slash64(ConstView qf, ConstView kf, int64_t h, int64_t L) {
  const T64 q = to64(qf), k = to64(kf);
  const int64_t N = q.tokens, r = q.heads / k.heads;
  VS64 o{std::vector<double>(N, 0.0), std::vector<double>(N, 0.0)};
  for (int64_t t = N - L; t < N; ++t) {
    const auto p = row_probs64(q, k, h, h / r, t);
    for (int64_t c = 0; c <= t; ++c) {
      o.vertical[c] += p[c] / L;
      o.slash[t - c] += p[c] / L;
    }
  }
  return o;
}

// Mass recall of a mask against an exact block mass (computed here, inline: the analysis
// library owns the real metric): mean over heads and rows of the selected mass.
inline double mass_recall(const BlockMask& m, const std::vector<double>& mass) {
  const int nb = m.num_blocks();
  double s = 0;
  for (int h = 0; h < m.heads(); ++h)
    for (int i = 0; i < nb; ++i)
      for (int32_t j : m.row(h, i)) s += mass[(static_cast<size_t>(h) * nb + i) * nb + j];
  return s / (static_cast<double>(m.heads()) * nb);
}

// Descending order of v[0..n), ties lower index.
inline std::vector<int32_t> ranks_desc(const double* v, int n) {
  std::vector<int32_t> o(n);
  for (int i = 0; i < n; ++i) o[i] = i;
  std::stable_sort(o.begin(), o.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
  return o;
}

// BlockScores by hand from a dense [H, Nb, Nb] array.
inline BlockScores make_block_scores(int heads, int64_t seq_len, int block, const std::vector<float>& score) {
  BlockScores s;
  s.method = "hand";
  s.heads = heads;
  s.seq_len = seq_len;
  s.block = block;
  s.num_blocks = num_blocks_for(seq_len, block);
  s.score = score;
  return s;
}

// Fill a Tensor3 of shape [h, n, 1] from values listed head by head.
inline Tensor3 tensor_1d(int64_t h, int64_t n, const std::vector<float>& vals) {
  Tensor3 t(h, n, 1);
  for (size_t i = 0; i < vals.size(); ++i) t.storage()[i] = vals[i];
  return t;
}

}  // namespace proxyattn::test
