// Estimator registry, config validation, ProxyAttn (`proxy`), pooled-block (`pooled`) and the
// oracle. The peers FlexPrefill / XAttention / vertical-slash live in estimator_peers.cpp.
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

namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw Error("estimator config: " + msg);
}
bool coverage_ok(double x) { return x > 0.0 && x <= 1.0; }  // false for NaN too
bool pow2(int x) { return x > 0 && (x & (x - 1)) == 0; }

}  // namespace

void validate_estimator_config(const EstimatorConfig& c, int q_heads, std::string_view method) {
  require(pow2(c.block), "block = " + std::to_string(c.block) + " must be a positive power of two");
  const bool all = method.empty();
  if (all || method == "proxy") {
    const ProxyConfig& p = c.proxy;
    require(p.groups >= 1, "proxy.groups = " + std::to_string(p.groups) + " must be >= 1");
    if (q_heads > 0)
      require(q_heads % p.groups == 0, "proxy.groups = " + std::to_string(p.groups) + " does not divide the " +
                                           std::to_string(q_heads) + " query heads");
    require(p.query_stride >= 1, "proxy.query_stride = " + std::to_string(p.query_stride) + " must be >= 1");
  }
  if (all || method == "pooled")
    require(coverage_ok(c.pooled.gamma), "pooled.gamma = " + str(c.pooled.gamma) + " must be in (0, 1]");
  if (all || method == "flexprefill") {
    const FlexPrefillConfig& f = c.flexprefill;
    require(coverage_ok(f.gamma), "flexprefill.gamma = " + str(f.gamma) + " must be in (0, 1]");
    require(f.tau >= 0.0, "flexprefill.tau = " + str(f.tau) + " must be >= 0");
    require(f.min_budget_tokens >= 0,
            "flexprefill.min_budget_tokens = " + std::to_string(f.min_budget_tokens) + " must be >= 0");
    require(f.last_q >= 1, "flexprefill.last_q = " + std::to_string(f.last_q) + " must be >= 1");
  }
  if (all || method == "xattn") {
    require(pow2(c.xattn.stride) && c.xattn.stride <= c.block,
            "xattn.stride = " + std::to_string(c.xattn.stride) + " must be a power of two <= block (" +
                std::to_string(c.block) + ")");
    require(coverage_ok(c.xattn.tau), "xattn.tau = " + str(c.xattn.tau) + " must be in (0, 1]");
  }
  if (all || method == "vslash") {
    const VSlashConfig& v = c.vslash;
    require(v.last_q >= 1, "vslash.last_q = " + std::to_string(v.last_q) + " must be >= 1");
    require(v.vertical >= 0, "vslash.vertical = " + std::to_string(v.vertical) + " must be >= 0");
    require(v.slash >= 0, "vslash.slash = " + std::to_string(v.slash) + " must be >= 0");
    require(v.sink_columns >= 0, "vslash.sink_columns = " + std::to_string(v.sink_columns) + " must be >= 0");
    require(v.local_diagonals >= 0,
            "vslash.local_diagonals = " + std::to_string(v.local_diagonals) + " must be >= 0");
  }
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
  ProxyHeads ph{Tensor3(g, N, d), Tensor3(g, N, d), std::vector<int>(s.q_heads), std::vector<int>(g, -1)};
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

namespace {

class ProxyEstimator final : public Estimator {
 public:
  std::string name() const override { return "proxy"; }
  std::string description() const override {
    return "ProxyAttn: proxy head per group (mean-pooled Q/K), token-level softmax max-pooled to blocks";
  }
  BlockScores estimate(ConstView q, ConstView k, const EstimatorConfig& c) const override {
    const AttentionShape s = check_qkv(q, k);
    validate_estimator_config(c, s.q_heads, name());
    BlockScores out = detail::make_scores(name(), s.q_heads, s.seq_len, c.block);
    const ProxyHeads ph = make_proxy_heads(q, k, c.proxy);
    const std::vector<float> gs = maxpool_block_scores(ph.q, ph.k, c.block, c.proxy.query_stride);
    const size_t per_head = static_cast<size_t>(out.num_blocks) * out.num_blocks;
    for (int h = 0; h < s.q_heads; ++h)
      std::copy_n(gs.begin() + ph.group_of_head[h] * per_head, per_head, out.score.begin() + h * per_head);
    out.group_of_head = ph.group_of_head;
    return out;
  }
};

}  // namespace

namespace detail {

// Native selection of `pooled`: per row (or over the flattened head) the fewest blocks
// reaching gamma, union the sink and the diagonal.
BlockMask cumulative_native(const BlockScores& s, double gamma, bool global) {
  const int nb = s.num_blocks;
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(s.heads) * nb);
  for (int h = 0; h < s.heads; ++h) {
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
  }
  return BlockMask::from_rows(s.heads, s.seq_len, s.block, rows);
}

}  // namespace detail

namespace {

class PooledEstimator final : public Estimator {
 public:
  std::string name() const override { return "pooled"; }
  std::string description() const override {
    return "mean-pooled Q/K per block, block-causal row softmax (coarse-grained)";
  }
  BlockScores estimate(ConstView q, ConstView k, const EstimatorConfig& c) const override {
    const AttentionShape s = check_qkv(q, k);
    validate_estimator_config(c, s.q_heads, name());
    BlockScores out = detail::make_scores(name(), s.q_heads, s.seq_len, c.block);
    detail::pooled_scores(q, k, out);
    out.native = detail::cumulative_native(out, c.pooled.gamma, c.pooled.global);
    return out;
  }
};

class OracleEstimator final : public Estimator {
 public:
  std::string name() const override { return "oracle"; }
  std::string description() const override { return "exact block mass of the causal softmax"; }
  BlockScores estimate(ConstView q, ConstView k, const EstimatorConfig& c) const override {
    const AttentionShape s = check_qkv(q, k);
    validate_estimator_config(c, s.q_heads, name());
    return scores_from_mass(block_mass_cpu(q, k, c.block));
  }
};

template <BlockScores (*F)(ConstView, ConstView, const EstimatorConfig&)>
class PeerEstimator final : public Estimator {
 public:
  PeerEstimator(std::string name, std::string desc) : name_(std::move(name)), desc_(std::move(desc)) {}
  std::string name() const override { return name_; }
  std::string description() const override { return desc_; }
  BlockScores estimate(ConstView q, ConstView k, const EstimatorConfig& c) const override {
    const AttentionShape s = check_qkv(q, k);
    validate_estimator_config(c, s.q_heads, name());
    return F(q, k, c);
  }

 private:
  std::string name_, desc_;
};

}  // namespace

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

bool renative_from_scores(BlockScores& s, const EstimatorConfig& c) {
  if (s.method != "pooled" && s.method != "xattn") return false;
  validate_estimator_config(c, 0, s.method);
  if (s.heads <= 0 || s.score.size() != static_cast<size_t>(s.heads) * s.num_blocks * s.num_blocks)
    throw Error("renative_from_scores: block scores of '" + s.method + "' are empty or mis-shaped");
  s.native = s.method == "pooled" ? detail::cumulative_native(s, c.pooled.gamma, c.pooled.global)
                                  : detail::xattn_native(s, c.xattn.tau);
  return true;
}

std::vector<std::string> estimator_names() {
  return {"proxy", "pooled", "flexprefill", "xattn", "vslash", "oracle"};
}

std::unique_ptr<Estimator> make_estimator(std::string_view name) {
  if (name == "proxy") return std::make_unique<ProxyEstimator>();
  if (name == "pooled") return std::make_unique<PooledEstimator>();
  if (name == "oracle") return std::make_unique<OracleEstimator>();
  if (name == "flexprefill")
    return std::make_unique<PeerEstimator<detail::estimate_flexprefill>>(
        "flexprefill", "FlexPrefill: last-block vertical/slash, JSD pattern decision, query-aware union");
  if (name == "xattn")
    return std::make_unique<PeerEstimator<detail::estimate_xattn>>(
        "xattn", "XAttention: strided antidiagonal scores, per-row threshold tau");
  if (name == "vslash")
    return std::make_unique<PeerEstimator<detail::estimate_vslash>>(
        "vslash", "MInference vertical-slash from the last queries, mapped to blocks");
  std::string valid;
  for (const auto& n : estimator_names()) valid += (valid.empty() ? "" : ", ") + n;
  throw Error("unknown estimator '" + std::string(name) + "' (valid: " + valid + ")");
}

}  // namespace proxyattn
