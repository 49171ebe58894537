// The peers, re-implemented from their public descriptions (ALGORITHMS.md "Peers"):
// FlexPrefill (full method), XAttention (antidiagonal scoring), MInference vertical-slash.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "estimator_util.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/estimator.hpp"

namespace proxyattn::detail {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Mean over the last L query rows of head hq of the exact causal probabilities, per key column
// (vertical, [N]) and per diagonal offset o = q - k (slash, [N]). Both sum to 1.
struct LastRows {
  std::vector<float> vertical, slash;
};
LastRows last_rows_vertical_slash(ConstView q, const kern::Transposed& kt, int64_t hq, int64_t L) {
  const int64_t N = q.tokens, r0 = N - L;
  std::vector<double> v(N, 0.0), sl(N, 0.0);
  for_each_prob_chunk(q, kt, hq, r0, L, [&](int64_t k0, int64_t nk, const float* P, int64_t ldp) {
    for (int64_t r = 0; r < L; ++r) {
      const int64_t qpos = r0 + r, cmax = std::min(nk, qpos - k0 + 1);
      for (int64_t c = 0; c < cmax; ++c) {
        const double p = P[r * ldp + c];
        v[k0 + c] += p;
        sl[qpos - k0 - c] += p;
      }
    }
  });
  LastRows out{std::vector<float>(N), std::vector<float>(N)};
  for (int64_t t = 0; t < N; ++t) {
    out.vertical[t] = static_cast<float>(v[t] / L);
    out.slash[t] = static_cast<float>(sl[t] / L);
  }
  return out;
}

// Fewest entries (descending) reaching gamma of the total; 0 for an all-zero input.
int64_t cover_count(const std::vector<float>& v, double gamma) {
  return static_cast<int64_t>(cover_indices(v.data(), static_cast<int64_t>(v.size()), gamma).size());
}

// cover_count for each of several gammas: one order and total, the prefix walked per gamma.
std::vector<int64_t> cover_counts(const float* v, int64_t n, const std::vector<double>& gammas) {
  const std::vector<int32_t> order = order_desc(v, n);
  double total = 0;
  for (int32_t j : order)
    if (v[j] > 0) total += v[j];
  std::vector<int64_t> out(gammas.size(), 0);
  if (total <= 0) return out;
  for (size_t x = 0; x < gammas.size(); ++x) {
    double acc = 0;
    int64_t count = 0;
    for (int32_t j : order) {
      ++count;
      acc += v[j];
      if (acc >= gammas[x] * total) break;
    }
    out[x] = count;
  }
  return out;
}

// The top `count` indices of v (descending, ties lower index).
std::vector<int32_t> top_indices(const std::vector<float>& v, int64_t count) {
  std::vector<int32_t> o = order_desc(v.data(), static_cast<int64_t>(v.size()));
  o.resize(std::min<size_t>(o.size(), static_cast<size_t>(std::max<int64_t>(count, 0))));
  return o;
}

}  // namespace

// ---------------------------------------------------------------- FlexPrefill
// Per query head, following the public FlexPrefill code:
//  1. the last L = min(last_q, N) queries: exact probabilities; vertical[k] = mean over rows,
//     slash[o] = mean over rows along offset o = q - k;
//  2. budgets: n_v = cover(vertical, gamma) / B + 1 blocks, n_s likewise, clamped to
//     [min_blocks = max(1, ceil(min_budget_tokens / B)), Nb];
//  3. block pooling: vb[j] = sum of vertical over block j, sb[ob] = sum of slash over offsets
//     with floor(o / B) = ob (diagonal block offset: block (i, i - ob));
//  4. pattern: d = sqrt(JSD(softmax_j(mean(Q_last) . Kbar_j / sqrt(d)), vb)) (natural log);
//     d < tau -> query-aware, whose vertical/slash budgets drop to min_blocks;
//  5. vb[0] and sb[0] forced to the top (block 0 column and the diagonal always kept); the top
//     n_v column blocks select (i, j) for all i >= j, the top n_s offsets select (i, i - ob);
//  6. query-aware heads add the pooled-block cover: the fewest blocks of the flattened head's
//     pooled scores (each row sums to 1, so the head sums to Nb) reaching gamma * Nb.
// Scores: query-aware heads the pooled scores, vertical-slash heads vb[j] + sb[i - j].
// Only the budgets (steps 2 and 6) depend on gamma: for several gammas the probabilities, the
// pattern decision and the scores are computed once, each ranking sorted once.
std::vector<BlockScores> estimate_flexprefill_gammas(ConstView q, ConstView k, const EstimatorConfig& c,
                                                     const std::vector<double>& gammas) {
  const AttentionShape sh = check_qkv(q, k);
  const FlexPrefillConfig& f = c.flexprefill;
  const int B = c.block;
  const size_t G = gammas.size();
  BlockScores out = make_scores("flexprefill", sh.q_heads, sh.seq_len, B);
  const int nb = out.num_blocks;
  const int64_t N = sh.seq_len, L = std::min<int64_t>(f.last_q, N);
  const int64_t min_blocks = std::min<int64_t>(nb, std::max<int64_t>(1, (f.min_budget_tokens + B - 1) / B));
  const float scale = 1.0f / std::sqrt(static_cast<float>(sh.head_dim));

  BlockScores pooled = make_scores("pooled", sh.q_heads, sh.seq_len, B);
  pooled_scores(q, k, pooled);
  std::vector<MatRM> kbar(sh.kv_heads);
  std::vector<kern::Transposed> kt(sh.kv_heads);
  parallel_for(sh.kv_heads, [&](int64_t h) {
    kbar[h] = block_means(k, h, B);
    kt[h] = kern::transpose_head(k, h);
  });

  out.query_aware.assign(sh.q_heads, 0);
  out.jsd.assign(sh.q_heads, 0.0);
  std::vector<std::vector<std::vector<int32_t>>> rows(G, std::vector<std::vector<int32_t>>(static_cast<size_t>(sh.q_heads) * nb));
  parallel_for(sh.q_heads, [&](int64_t h64) {
    const int h = static_cast<int>(h64), hk = sh.kv_head_of(h);
    const LastRows lr = last_rows_vertical_slash(q, kt[hk], h, L);
    const std::vector<int64_t> cv = cover_counts(lr.vertical.data(), N, gammas);
    const std::vector<int64_t> cs = cover_counts(lr.slash.data(), N, gammas);
    std::vector<float> vb(nb, 0.0f), sb(nb, 0.0f);
    for (int64_t t = 0; t < N; ++t) {
      vb[t / B] += lr.vertical[t];
      sb[t / B] += lr.slash[t];
    }
    // Pattern decision: block-pooled estimate of the last queries vs their true block mass.
    const Eigen::RowVectorXf qmean = rows_of(q, h, N - L, L).colwise().mean();
    const Eigen::RowVectorXf logits = (qmean * kbar[hk].transpose()) * scale;
    const double mx = logits.maxCoeff();
    double z = 0;
    for (int j = 0; j < nb; ++j) z += std::exp(logits(j) - mx);
    double js = 0;
    for (int j = 0; j < nb; ++j) {
      const double p = std::exp(logits(j) - mx) / z, v = vb[j], m = 0.5 * (p + v);
      if (p > 0) js += 0.5 * p * std::log(p / m);
      if (v > 0) js += 0.5 * v * std::log(v / m);
    }
    const double dist = std::sqrt(std::max(0.0, js));
    const bool qa = dist < f.tau;
    out.jsd[h] = dist;
    out.query_aware[h] = qa ? 1 : 0;

    for (int i = 0; i < nb; ++i) {
      float* o = out.row(h, i);
      if (qa) std::copy_n(pooled.row(h, i), i + 1, o);
      else
        for (int j = 0; j <= i; ++j) o[j] = vb[j] + sb[i - j];
    }
    std::vector<float> vb_rank = vb, sb_rank = sb;
    vb_rank[0] = kInf;
    sb_rank[0] = kInf;
    const std::vector<int32_t> vorder = order_desc(vb_rank.data(), nb), sorder = order_desc(sb_rank.data(), nb);
    // The query-aware cover of the flattened head (cells in (i, j) order).
    std::vector<int32_t> qa_order;
    double qa_total = 0;
    std::vector<float> flat;
    if (qa) {
      flat.reserve(static_cast<size_t>(nb) * (nb + 1) / 2);
      for (int i = 0; i < nb; ++i) flat.insert(flat.end(), pooled.row(h, i), pooled.row(h, i) + i + 1);
      qa_order = order_desc(flat.data(), static_cast<int64_t>(flat.size()));
      for (int32_t t : qa_order)
        if (flat[t] > 0) qa_total += flat[t];
    }
    for (size_t x = 0; x < G; ++x) {
      int64_t nv = std::clamp<int64_t>(cv[x] / B + 1, min_blocks, nb);
      int64_t ns = std::clamp<int64_t>(cs[x] / B + 1, min_blocks, nb);
      if (qa) nv = ns = min_blocks;
      auto* my_rows = &rows[x][static_cast<size_t>(h) * nb];
      for (int64_t t = 0; t < std::min<int64_t>(nv, nb); ++t)
        for (int i = vorder[t]; i < nb; ++i) my_rows[i].push_back(vorder[t]);
      for (int64_t t = 0; t < std::min<int64_t>(ns, nb); ++t)
        for (int i = sorder[t]; i < nb; ++i) my_rows[i].push_back(i - sorder[t]);
      if (qa && qa_total > 0) {
        // cover_indices over the flattened head: the prefix of its order reaching gamma.
        double acc = 0;
        auto first_of_row = [](int64_t i) { return i * (i + 1) / 2; };
        for (int32_t t : qa_order) {
          int64_t i = static_cast<int64_t>((std::sqrt(8.0 * t + 1.0) - 1.0) / 2.0);  // cell t = (i, j)
          while (first_of_row(i + 1) <= t) ++i;
          while (first_of_row(i) > t) --i;
          my_rows[i].push_back(static_cast<int32_t>(t - first_of_row(i)));
          acc += flat[t];
          if (acc >= gammas[x] * qa_total) break;
        }
      }
      for (int i = 0; i < nb; ++i) {
        my_rows[i].push_back(0);
        my_rows[i].push_back(i);
      }
    }
  });
  std::vector<BlockScores> res(G);
  for (size_t x = 0; x < G; ++x) {
    if (x + 1 < G) res[x] = out;
    else res[x] = std::move(out);
    res[x].native = BlockMask::from_rows(sh.q_heads, sh.seq_len, B, rows[x]);
  }
  return res;
}

BlockScores estimate_flexprefill(ConstView q, ConstView k, const EstimatorConfig& c) {
  return std::move(estimate_flexprefill_gammas(q, k, c, {c.flexprefill.gamma}).front());
}

// ---------------------------------------------------------------- XAttention
// Strided rows a (positions aS .. aS+S-1, reversed) and strided keys b (bS .. bS+S-1):
//   s[a, b] = sum_{t<S} q[aS+S-1-t] . k[bS+t] / (sqrt(d) S), positions >= N contribute 0;
// causal at tile level (b <= a), softmax over b per strided row; W[I, J] = sum of the softmax
// cells of the strided rows of block I and strided keys of block J, divided by the number of
// strided rows of block I (rows sum to 1). Native: per row, block 0 and the diagonal first
// (their mass counts), then descending W until the kept mass reaches tau (as XAttention's
// find_blocks: a block is added while the mass before it is < tau).
BlockScores estimate_xattn(ConstView q, ConstView k, const EstimatorConfig& c) {
  const AttentionShape sh = check_qkv(q, k);
  const int B = c.block, S = c.xattn.stride, per_block = B / S;
  BlockScores out = make_scores("xattn", sh.q_heads, sh.seq_len, B);
  const int nb = out.num_blocks;
  const int64_t N = sh.seq_len, d = sh.head_dim, A = (N + S - 1) / S;
  const float scale = 1.0f / (std::sqrt(static_cast<float>(d)) * S);

  // Strided (reshaped) queries per query head, row a = [q[aS+S-1], ..., q[aS]] (row-major
  // [A, S d]); strided keys per KV head transposed: column b = [k[bS], ..., k[bS+S-1]].
  const int64_t D = S * d, ldk = kern::round_up16(A) + kern::kCols;
  std::vector<std::vector<float>> qs(sh.q_heads), kst(sh.kv_heads);
  parallel_for(sh.kv_heads + sh.q_heads, [&](int64_t t) {
    if (t < sh.kv_heads) {
      std::vector<float>& m = kst[t];
      m.assign(static_cast<size_t>(D * ldk), 0.0f);
      for (int64_t b = 0; b < A; ++b)
        for (int s = 0; s < S; ++s) {
          const int64_t pos = b * S + s;
          if (pos >= N) break;
          const float* kr = k.row(t, pos);
          for (int64_t c = 0; c < d; ++c) m[(s * d + c) * ldk + b] = kr[c];
        }
    } else {
      const int64_t h = t - sh.kv_heads;
      std::vector<float>& m = qs[h];
      m.assign(static_cast<size_t>(A * D), 0.0f);
      for (int64_t a = 0; a < A; ++a)
        for (int s = 0; s < S; ++s) {
          const int64_t pos = a * S + (S - 1 - s);
          if (pos < N) std::copy_n(q.row(h, pos), d, &m[a * D + s * d]);
        }
    }
  });

  parallel_heads_blocks(sh.q_heads, nb, [&](int h, int I) {
    const int64_t a0 = static_cast<int64_t>(I) * per_block, a1 = std::min<int64_t>(A, a0 + per_block);
    const int64_t rows = a1 - a0, ldt = kern::round_up16(a1);  // strided keys 0 .. a1-1 (b <= a)
    std::vector<float> T(static_cast<size_t>(rows * ldt));
    kern::gemm_abt(&qs[h][a0 * D], D, rows, D, kst[sh.kv_head_of(h)].data(), ldk, a1, T.data(), ldt, scale);
    std::vector<double> acc(I + 1, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t a = a0 + r, n = a + 1;  // visible strided keys 0..a
      float* row = &T[r * ldt];
      const double z = kern::exp_inplace_sum(row, n, kern::row_max(row, n));
      for (int J = 0; J <= I; ++J) {
        const int64_t b0 = static_cast<int64_t>(J) * per_block, b1 = std::min<int64_t>(n, b0 + per_block);
        double part = 0;
        for (int64_t b = b0; b < b1; ++b) part += row[b];
        acc[J] += part / z;
      }
    }
    float* o = out.row(h, I);
    for (int J = 0; J <= I; ++J) o[J] = static_cast<float>(acc[J] / rows);
  });

  out.native = xattn_native(out, c.xattn.tau);
  return out;
}

BlockMask xattn_native(const BlockScores& s, double tau) {
  const int nb = s.num_blocks;
  std::vector<std::vector<int32_t>> sel(static_cast<size_t>(s.heads) * nb);
  // Rows are independent: in parallel over (head, row), same result.
  parallel_for(static_cast<int64_t>(s.heads) * nb, [&](int64_t t) {
    {
      const int h = static_cast<int>(t / nb), i = static_cast<int>(t % nb);
      const float* w = s.row(h, i);
      double total = 0;
      for (int j = 0; j <= i; ++j) total += w[j];
      auto& r = sel[static_cast<size_t>(h) * nb + i];
      r.push_back(0);
      double acc = w[0];
      if (i > 0) {
        r.push_back(i);
        acc += w[i];
      }
      std::vector<float> rest(w, w + i + 1);
      rest[0] = -kInf;
      rest[i] = -kInf;
      for (int32_t j : order_desc(rest.data(), i + 1)) {
        if (j == 0 || j == i || acc >= tau * total) break;
        r.push_back(j);
        acc += w[j];
      }
    }
  });
  return BlockMask::from_rows(s.heads, s.seq_len, s.block, sel);
}

// ---------------------------------------------------------------- vertical-slash
// Per query head: last L = min(last_q, N) queries, exact probabilities; vertical[k] and
// slash[o] = mean over those rows. Kept columns: 0 .. sink_columns-1 forced, then the top by
// vertical up to `vertical` in total; kept diagonals: offsets 0 .. local_diagonals-1 forced,
// then the top by slash up to `slash` in total. A block (i, j) is selected when a kept column
// lies in key block j (any i >= j), or a kept offset o lies in the offsets block (i, j) spans:
// [max(0, iB - (j+1)B + 1), min(N, (i+1)B) - 1 - jB]. Block 0 and the diagonal always.
// Score: vertical mass of the kept columns of block j + slash mass of the kept offsets crossing
// (i, j).
BlockScores estimate_vslash(ConstView q, ConstView k, const EstimatorConfig& c) {
  const AttentionShape sh = check_qkv(q, k);
  const VSlashConfig& vc = c.vslash;
  const int B = c.block;
  BlockScores out = make_scores("vslash", sh.q_heads, sh.seq_len, B);
  const int nb = out.num_blocks;
  const int64_t N = sh.seq_len, L = std::min<int64_t>(vc.last_q, N);
  std::vector<uint8_t> bitmap(static_cast<size_t>(sh.q_heads) * nb * nb, 0);
  std::vector<kern::Transposed> kt(sh.kv_heads);
  parallel_for(sh.kv_heads, [&](int64_t h) { kt[h] = kern::transpose_head(k, h); });
  parallel_for(sh.q_heads, [&](int64_t h64) {
    const int h = static_cast<int>(h64);
    const LastRows lr = last_rows_vertical_slash(q, kt[sh.kv_head_of(h)], h, L);
    std::vector<float> vr = lr.vertical, sr = lr.slash;
    for (int64_t t = 0; t < std::min<int64_t>(vc.sink_columns, N); ++t) vr[t] = kInf;
    for (int64_t t = 0; t < std::min<int64_t>(vc.local_diagonals, N); ++t) sr[t] = kInf;
    std::vector<double> col_mass(nb, 0.0);
    std::vector<uint8_t> col_kept(nb, 0);
    for (int32_t t : top_indices(vr, vslash_vertical(vc, N))) {
      col_mass[t / B] += lr.vertical[t];
      col_kept[t / B] = 1;
    }
    // Prefix sums over offsets of the kept diagonals: mass and count.
    std::vector<double> pm(N + 1, 0.0);
    std::vector<int64_t> pc(N + 1, 0);
    std::vector<uint8_t> kept(N, 0);
    for (int32_t o : top_indices(sr, vslash_slash(vc, N))) kept[o] = 1;
    for (int64_t o = 0; o < N; ++o) {
      pm[o + 1] = pm[o] + (kept[o] ? lr.slash[o] : 0.0);
      pc[o + 1] = pc[o] + kept[o];
    }
    for (int i = 0; i < nb; ++i) {
      const int64_t qlast = std::min<int64_t>(N, static_cast<int64_t>(i + 1) * B) - 1;
      float* o = out.row(h, i);
      uint8_t* bm = &bitmap[(static_cast<size_t>(h) * nb + i) * nb];
      for (int j = 0; j <= i; ++j) {
        const int64_t lo = std::max<int64_t>(0, static_cast<int64_t>(i) * B - static_cast<int64_t>(j + 1) * B + 1);
        const int64_t hi = qlast - static_cast<int64_t>(j) * B;  // >= lo since j <= i
        const int64_t cnt = pc[hi + 1] - pc[lo];
        o[j] = static_cast<float>(col_mass[j] + pm[hi + 1] - pm[lo]);
        bm[j] = (col_kept[j] || cnt > 0 || j == 0 || j == i) ? 1 : 0;
      }
    }
  });
  out.native = BlockMask::from_bitmap(sh.q_heads, sh.seq_len, B, bitmap);
  return out;
}

}  // namespace proxyattn::detail

namespace proxyattn {

namespace {
int64_t resolve_count(int64_t tokens, double fraction, int64_t n) {
  const int64_t k = fraction > 0 ? static_cast<int64_t>(std::ceil(fraction * static_cast<double>(n))) : tokens;
  return std::clamp<int64_t>(k, 0, n);
}
}  // namespace

int64_t vslash_vertical(const VSlashConfig& c, int64_t n) { return resolve_count(c.vertical, c.vertical_fraction, n); }
int64_t vslash_slash(const VSlashConfig& c, int64_t n) { return resolve_count(c.slash, c.slash_fraction, n); }

}  // namespace proxyattn
