#pragma once
// Internal helpers shared by the estimator, budget and selection sources (not installed).
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "estimator_kernels.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/rank_key.hpp"
#include "proxyattn/tensor.hpp"

namespace proxyattn::detail {

using MatRM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowsMap = Eigen::Map<const MatRM, 0, Eigen::OuterStride<>>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows t0, t0 + step, ... (n of them) of head h as an [n, d] matrix, no copy.
inline RowsMap rows_of(ConstView v, int64_t h, int64_t t0, int64_t n, int64_t step = 1) {
  return RowsMap(v.row(h, t0), n, v.dim, Eigen::OuterStride<>(v.stride_token * step));
}

// Parallel loop over n tasks (dynamic schedule: tasks have uneven cost). f must not throw.
template <class F>
void parallel_for(int64_t n, F&& f) {
  const int threads = cpu_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < n; ++t) f(t);
}

// Tasks (h, i) over heads x query blocks, the most expensive (largest i) first.
template <class F>
void parallel_heads_blocks(int heads, int nb, F&& f) {
  parallel_for(static_cast<int64_t>(heads) * nb, [&](int64_t t) {
    const int i = nb - 1 - static_cast<int>(t / heads), h = static_cast<int>(t % heads);
    f(h, i);
  });
}

// Exact mean of each block of tokens of head h: [Nb, d] (a partial last block averages its
// own rows).
inline MatRM block_means(ConstView v, int64_t h, int block) {
  const int64_t N = v.tokens, d = v.dim;
  const int nb = static_cast<int>((N + block - 1) / block);
  MatRM m(nb, d);
  for (int i = 0; i < nb; ++i) {
    const int64_t t0 = static_cast<int64_t>(i) * block, n = std::min<int64_t>(N, t0 + block) - t0;
    m.row(i) = rows_of(v, h, t0, n).colwise().sum() / static_cast<float>(n);
  }
  return m;
}

// Indices 0..n-1 ordered by descending value, ties by lower index; NaN last (rank_key.hpp:
// integer keys, the order of a stable sort by value).
template <class T>
std::vector<int32_t> order_desc(const T* v, int64_t n) {
  return rank::order_desc(v, n);
}

// Exact causal probabilities of query rows [r0, r0 + L) of query head hq against a transposed
// KV head, delivered in key chunks: f(k0, nk, P, ldp) with P [L rows, stride ldp] (0 where
// k > q). Two passes (row log-sum-exp in float64, then probabilities), memory O(L * chunk).
template <class F>
void for_each_prob_chunk(ConstView q, const kern::Transposed& kt, int64_t hq, int64_t r0, int64_t L, F&& f) {
  constexpr int64_t kChunk = 1024;
  const float scale = 1.0f / std::sqrt(static_cast<float>(q.dim));
  const int64_t kend = r0 + L, ldp = kern::round_up16(kChunk);  // keys past the last query: never visible
  std::vector<float> P(static_cast<size_t>(L * ldp));
  std::vector<double> m(L, -std::numeric_limits<double>::infinity()), l(L, 0.0);
  auto scores = [&](int64_t k0, int64_t nk) {
    kern::gemm_abt(q.row(hq, r0), q.stride_token, L, q.dim, kt.col(k0), kt.ld, nk, P.data(), ldp, scale);
    if (k0 + nk - 1 > r0)
      for (int64_t r = 0; r < L; ++r)
        for (int64_t c = std::max<int64_t>(0, r0 + r - k0 + 1); c < nk; ++c) P[r * ldp + c] = kNegInf;
  };
  for (int64_t k0 = 0; k0 < kend; k0 += kChunk) {
    const int64_t nk = std::min(kend, k0 + kChunk) - k0;
    scores(k0, nk);
    for (int64_t r = 0; r < L; ++r) {
      const float mc = kern::row_max(&P[r * ldp], nk);
      if (mc == kNegInf) continue;
      const double mn = std::max(m[r], static_cast<double>(mc));
      const double s = kern::exp_sum(&P[r * ldp], nk, static_cast<float>(mn));
      l[r] = l[r] * std::exp(m[r] - mn) + s;
      m[r] = mn;
    }
  }
  std::vector<float> lse(L);
  for (int64_t r = 0; r < L; ++r) lse[r] = static_cast<float>(m[r] + std::log(l[r]));
  for (int64_t k0 = 0; k0 < kend; k0 += kChunk) {
    const int64_t nk = std::min(kend, k0 + kChunk) - k0;
    scores(k0, nk);
    for (int64_t r = 0; r < L; ++r) kern::exp_inplace_sum(&P[r * ldp], nk, lse[r]);
    f(k0, nk, static_cast<const float*>(P.data()), ldp);
  }
}

inline std::string str(double x) {
  std::string s = std::to_string(x);
  while (s.size() > 1 && s.back() == '0') s.pop_back();
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

// ---- defined in estimator.cpp / estimator_peers.cpp ----

// Empty scores [H, Nb, Nb] for `method`.
BlockScores make_scores(std::string method, int heads, int64_t seq_len, int block);
// Pooled block scores of every query head: block-causal row softmax of Qbar Kbar^T / sqrt(d)
// (rows sum to 1), written into s.
void pooled_scores(ConstView q, ConstView k, BlockScores& s);
// Indices of the fewest entries of v[0..n) (descending, ties lower index) whose sum reaches
// gamma * total (total summed in that order, so gamma = 1 keeps every positive entry).
std::vector<int32_t> cover_indices(const float* v, int64_t n, double gamma);

// Native selections that are functions of the scores: per row (or flattened head) cumulative
// gamma union sink + diagonal (pooled); sink + diagonal first then to tau (xattn).
BlockMask cumulative_native(const BlockScores& s, double gamma, bool global);
BlockMask xattn_native(const BlockScores& s, double tau);

BlockScores estimate_flexprefill(ConstView q, ConstView k, const EstimatorConfig& c);
// estimate_flexprefill at each flexprefill.gamma of `gammas` (c's own gamma unused): the same
// scores, each from one pass over the last queries.
std::vector<BlockScores> estimate_flexprefill_gammas(ConstView q, ConstView k, const EstimatorConfig& c,
                                                     const std::vector<double>& gammas);
BlockScores estimate_xattn(ConstView q, ConstView k, const EstimatorConfig& c);
BlockScores estimate_vslash(ConstView q, ConstView k, const EstimatorConfig& c);

}  // namespace proxyattn::detail
