// Shared estimator building blocks: ProxyAttn's proxy heads and max-pooled token softmax, the
// pooled block scores and their cumulative native rule, the oracle's scores from a mass. The
// method units (registry, config, CPU/GPU estimates) live in lib/src/methods/; the peers'
// estimates FlexPrefill / XAttention / vertical-slash in estimator_peers.cpp.
#include "proxyattn/estimator.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "estimator_util.hpp"
#include "proxyattn/error.hpp"

namespace proxyattn {

using detail::kNegInf;
using detail::MatRM;
using detail::rows_of;
using detail::str;

std::string_view proxy_pool_name(ProxyPool p) { return p == ProxyPool::mean ? "mean" : "max_norm"; }

ProxyPool parse_proxy_pool(std::string_view s) {
  if (s == "mean") return ProxyPool::mean;
  if (s == "max_norm" || s == "max-norm") return ProxyPool::max_norm;
  throw Error("unknown proxy pooling '" + std::string(s) + "' (valid: mean, max_norm)");
}

namespace detail {

BlockScores make_scores(std::string method, int heads, int64_t seq_len, int block) {
  BlockScores s;
  s.method = std::move(method);
  s.heads = heads;
  s.block = block;
  s.seq_len = seq_len;
  s.num_blocks = num_blocks_for(seq_len, block);
  s.score.assign(static_cast<size_t>(heads) * s.num_blocks * s.num_blocks, 0.0f);
  return s;
}

void pooled_scores(ConstView q, ConstView k, BlockScores& s) {
  const AttentionShape sh = check_qkv(q, k);
  const int nb = s.num_blocks, B = s.block;
  const float scale = 1.0f / std::sqrt(static_cast<float>(sh.head_dim));
  std::vector<MatRM> kbar(sh.kv_heads);
  detail::parallel_for(sh.kv_heads, [&](int64_t h) { kbar[h] = block_means(k, h, B); });
  detail::parallel_for(sh.q_heads, [&](int64_t h) {
    const MatRM qbar = block_means(q, h, B);
    MatRM A = (qbar * kbar[sh.kv_head_of(static_cast<int>(h))].transpose()) * scale;
    for (int i = 0; i < nb; ++i) {
      double m = -std::numeric_limits<double>::infinity(), l = 0;
      for (int j = 0; j <= i; ++j) m = std::max(m, static_cast<double>(A(i, j)));
      for (int j = 0; j <= i; ++j) l += std::exp(A(i, j) - m);
      float* out = s.row(static_cast<int>(h), i);
      for (int j = 0; j <= i; ++j) out[j] = static_cast<float>(std::exp(A(i, j) - m) / l);
    }
  });
}

std::vector<int32_t> cover_indices(const float* v, int64_t n, double gamma) {
  const std::vector<int32_t> order = order_desc(v, n);
  double total = 0;
  for (int32_t j : order)
    if (v[j] > 0) total += v[j];
  std::vector<int32_t> out;
  if (total <= 0) return out;
  double acc = 0;
  for (int32_t j : order) {
    out.push_back(j);
    acc += v[j];
    if (acc >= gamma * total) break;
  }
  return out;
}

}  // namespace detail

// ---------------------------------------------------------------- ProxyAttn

ProxyHeads make_proxy_heads(ConstView q, ConstView k, const ProxyConfig& config) {
  const AttentionShape s = check_qkv(q, k);
  EstimatorConfig c;
  c.proxy = config;
  validate_estimator_config(c, s.q_heads, "proxy");
  const int g = config.groups, per = s.q_heads / g, r = s.group();
  const int64_t N = s.seq_len, d = s.head_dim;
  // Each group's rows are assigned in full below (either pool).
  ProxyHeads ph{Tensor3::uninitialized(g, N, d), Tensor3::uninitialized(g, N, d), std::vector<int>(s.q_heads),
                std::vector<int>(g, -1)};
  for (int h = 0; h < s.q_heads; ++h) ph.group_of_head[h] = h / per;
  detail::parallel_for(g, [&](int64_t gi) {
    const int h0 = static_cast<int>(gi) * per, h1 = h0 + per;  // member query heads [h0, h1)
    auto qg = Eigen::Map<MatRM>(ph.q.row(gi, 0), N, d);
    auto kg = Eigen::Map<MatRM>(ph.k.row(gi, 0), N, d);
    if (config.pool == ProxyPool::mean) {
      qg.setZero();
      for (int h = h0; h < h1; ++h) qg += rows_of(q, h, 0, N);
      qg /= static_cast<float>(per);
      // The distinct KV heads read by the members: h0/r .. (h1-1)/r.
      const int k0 = h0 / r, k1 = (h1 - 1) / r + 1;
      kg.setZero();
      for (int hk = k0; hk < k1; ++hk) kg += rows_of(k, hk, 0, N);
      kg /= static_cast<float>(k1 - k0);
    } else {
      int best = h0;
      double best_norm = -1;
      for (int h = h0; h < h1; ++h) {
        const double nrm = rows_of(q, h, 0, N).template cast<double>().squaredNorm();
        if (nrm > best_norm) best_norm = nrm, best = h;  // ties: the lower head
      }
      ph.picked_head[gi] = best;
      qg = rows_of(q, best, 0, N);
      kg = rows_of(k, best / r, 0, N);
    }
  });
  return ph;
}

std::vector<float> maxpool_block_scores(ConstView q, ConstView k, int block, int query_stride) {
  const AttentionShape s = check_qkv(q, k);
  if (s.q_heads != s.kv_heads)
    throw Error("maxpool_block_scores: q has " + std::to_string(s.q_heads) + " heads but k has " +
                std::to_string(s.kv_heads) + " (one k head per q head required)");
  if (query_stride < 1) throw Error("maxpool_block_scores: query_stride must be >= 1");
  const int nb = num_blocks_for(s.seq_len, block);
  const int64_t N = s.seq_len;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  std::vector<float> out(static_cast<size_t>(s.q_heads) * nb * nb, 0.0f);
  std::vector<detail::kern::Transposed> kt(s.q_heads);
  detail::parallel_for(s.q_heads, [&](int64_t h) { kt[h] = detail::kern::transpose_head(k, h); });
  // Key panels of about 1024 tokens: a few hundred KB per thread at any N.
  const int chunk_blocks = std::max(1, 1024 / block);
  const int64_t ldc = detail::kern::round_up16(static_cast<int64_t>(chunk_blocks) * block);
  detail::parallel_heads_blocks(s.q_heads, nb, [&](int h, int i) {
    // One pass over the causal key blocks keeps per (row, key block) the max score and the sum
    // of exp(score - max); the row LSE and every block max-probability follow from these.
    const int64_t q0 = static_cast<int64_t>(i) * block, nq = std::min<int64_t>(N, q0 + block) - q0;
    const int64_t nr = (nq + query_stride - 1) / query_stride;
    std::vector<float> S(static_cast<size_t>(nr * ldc)), mx(static_cast<size_t>(nr * (i + 1)));
    std::vector<double> sm(mx.size());
    for (int j0 = 0; j0 <= i; j0 += chunk_blocks) {
      const int j1 = std::min(i + 1, j0 + chunk_blocks);
      const int64_t k0 = static_cast<int64_t>(j0) * block, nk = std::min<int64_t>(N, static_cast<int64_t>(j1) * block) - k0;
      detail::kern::gemm_abt(q.row(h, q0), q.stride_token * query_stride, nr, s.head_dim, kt[h].col(k0), kt[h].ld,
                             nk, S.data(), ldc, scale);
      for (int j = j0; j < j1; ++j) {
        const int64_t off = static_cast<int64_t>(j - j0) * block,
                      len = std::min<int64_t>(N, static_cast<int64_t>(j + 1) * block) - static_cast<int64_t>(j) * block;
        for (int64_t a = 0; a < nr; ++a) {
          float* seg = &S[a * ldc + off];
          if (j == i)  // causal cut inside the diagonal block: key offset c <= query offset
            for (int64_t c = a * query_stride + 1; c < len; ++c) seg[c] = kNegInf;
          const float m = detail::kern::row_max(seg, len);
          mx[a * (i + 1) + j] = m;
          sm[a * (i + 1) + j] = detail::kern::exp_sum(seg, len, m);
        }
      }
    }
    float* o = out.data() + (static_cast<size_t>(h) * nb + i) * nb;
    for (int64_t a = 0; a < nr; ++a) {
      const float* mr = &mx[a * (i + 1)];
      const double* sr = &sm[a * (i + 1)];
      double m = -std::numeric_limits<double>::infinity(), l = 0;
      for (int j = 0; j <= i; ++j) m = std::max(m, static_cast<double>(mr[j]));
      for (int j = 0; j <= i; ++j)
        if (mr[j] != kNegInf) l += sr[j] * std::exp(mr[j] - m);
      const double lse = m + std::log(l);
      for (int j = 0; j <= i; ++j)
        if (mr[j] != kNegInf) o[j] = std::max(o[j], static_cast<float>(std::exp(mr[j] - lse)));
    }
  });
  return out;
}

namespace detail {

// Native selection of `pooled`: per row (or over the flattened head) the fewest blocks
// reaching gamma, union the sink and the diagonal.
BlockMask cumulative_native(const BlockScores& s, double gamma, bool global) {
  const int nb = s.num_blocks;
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(s.heads) * nb);
  // Heads are independent (each writes its own rows): in parallel, same result.
  detail::parallel_for(s.heads, [&](int64_t h64) {
    const int h = static_cast<int>(h64);
    if (global) {
      std::vector<float> flat;
      std::vector<int32_t> row_of, col_of;
      for (int i = 0; i < nb; ++i)
        for (int j = 0; j <= i; ++j) {
          flat.push_back(s.at(h, i, j));
          row_of.push_back(i);
          col_of.push_back(j);
        }
      for (int32_t t : detail::cover_indices(flat.data(), static_cast<int64_t>(flat.size()), gamma))
        rows[static_cast<size_t>(h) * nb + row_of[t]].push_back(col_of[t]);
    }
    for (int i = 0; i < nb; ++i) {
      auto& r = rows[static_cast<size_t>(h) * nb + i];
      if (!global) r = detail::cover_indices(s.row(h, i), i + 1, gamma);
      r.push_back(0);
      r.push_back(i);
    }
  });
  return BlockMask::from_rows(s.heads, s.seq_len, s.block, rows);
}

}  // namespace detail

BlockScores scores_from_mass(const BlockMass& mass) {
  BlockScores s;
  s.method = "oracle";
  s.heads = mass.heads;
  s.num_blocks = mass.num_blocks;
  s.block = mass.block;
  s.seq_len = mass.seq_len;
  s.score = mass.mass;
  return s;
}

}  // namespace proxyattn
