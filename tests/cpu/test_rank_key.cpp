// Integer rank keys (rank_key.hpp) and the selection / metric paths built on them, each against
// the comparator-based implementation it replaced (kept here as the reference), on random
// inputs with ties, NaN, +-0 and infinities, odd sizes and every forcing option. Exact equality.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <span>

#include "proxyattn/analysis/metrics.hpp"
#include "proxyattn/rank_key.hpp"
#include "proxyattn/select.hpp"
#include "test_util.hpp"

namespace proxyattn {
namespace {

constexpr float kNaNf = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Few distinct levels so that ties are common; NaN, +-0 and +-inf among them.
float tricky(std::mt19937_64& g) {
  static const float levels[] = {kNaNf, 0.0f, -0.0f, kInf, -kInf, 0.25f, 0.5f, -0.5f, 1.0f, 1e-30f};
  std::uniform_int_distribution<int> pick(0, 9);
  return levels[pick(g)];
}

// The reference order: stable sort by descending value, NaN last (the former order_desc).
template <class T>
std::vector<int32_t> ref_order(const T* v, int64_t n) {
  std::vector<int32_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) {
    const bool na = std::isnan(static_cast<double>(v[a])), nb = std::isnan(static_cast<double>(v[b]));
    if (na || nb) return !na && nb;
    return v[a] > v[b];
  });
  return idx;
}

TEST(RankKey, OrdersEqualTheStableComparatorSort) {
  auto& g = test::rng();
  for (int n : {1, 2, 3, 17, 64, 257, 1000}) {
    std::vector<float> f(n);
    std::vector<double> d(n);
    for (int t = 0; t < n; ++t) d[t] = f[t] = tricky(g);
    EXPECT_EQ(rank::order_desc(f.data(), n), ref_order(f.data(), n)) << n;
    EXPECT_EQ(rank::order_desc(d.data(), n), ref_order(d.data(), n)) << n;
    // Ascending keys (average ranks): ascending value, NaN last, ties lower id.
    std::vector<int32_t> asc(n), ref(n);
    std::iota(ref.begin(), ref.end(), 0);
    std::stable_sort(ref.begin(), ref.end(), [&](int32_t a, int32_t b) {
      const bool na = std::isnan(f[a]), nb = std::isnan(f[b]);
      if (na || nb) return !na && nb;
      return f[a] < f[b];
    });
    std::vector<uint64_t> keys;
    for (int t = 0; t < n; ++t) keys.push_back(rank::asc_id_key(f[t], static_cast<uint32_t>(t)));
    std::sort(keys.begin(), keys.end());
    for (int t = 0; t < n; ++t) asc[t] = static_cast<int32_t>(keys[t] & 0xFFFFFFFFu);
    EXPECT_EQ(asc, ref) << n;
    for (int k : {0, 1, n / 3, n - 1, n}) {
      std::vector<int32_t> top(std::max(k, 0));
      rank::top_desc(f.data(), n, k, top.data(), keys);
      const std::vector<int32_t> ref = ref_order(f.data(), n);
      EXPECT_EQ(top, std::vector<int32_t>(ref.begin(), ref.begin() + std::max(k, 0))) << n << " " << k;
    }
  }
}

// The radix sort of id keys equals std::sort: ids ascending with gaps (as rows with forced
// blocks skipped build them), values from few levels (ties, NaN, +-0) or the whole float range.
TEST(RankKey, SortIdKeysEqualsStdSort) {
  auto& g = test::rng();
  std::uniform_real_distribution<float> wide(-1e3f, 1e3f);
  std::lognormal_distribution<float> ln(0.0f, 4.0f);
  std::uniform_int_distribution<int> gap(1, 3);
  std::vector<uint64_t> scratch;
  for (int n : {1, 5, 95, 96, 97, 255, 1000, 4099}) {
    for (int kind = 0; kind < 3; ++kind) {
      std::vector<uint64_t> keys;
      uint32_t id = 0;
      for (int t = 0; t < n; ++t, id += static_cast<uint32_t>(gap(g))) {
        const float x = kind == 0 ? tricky(g) : kind == 1 ? wide(g) : ln(g);
        keys.push_back(kind == 2 ? rank::asc_id_key(x, id) : rank::desc_id_key(x, id));
      }
      std::vector<uint64_t> ref = keys;
      std::sort(ref.begin(), ref.end());
      rank::sort_id_keys(keys, scratch);
      EXPECT_EQ(keys, ref) << n << " " << kind;
    }
    // order_desc of doubles over the whole range (its radix path): the stable comparator sort.
    std::vector<double> d(static_cast<size_t>(n));
    for (double& x : d) x = ln(g) * (wide(g) < 0 ? -1.0 : 1.0) * 1e-3;
    EXPECT_EQ(rank::order_desc(d.data(), n), ref_order(d.data(), n)) << n;
  }
}

// ---- select_to_density (head_global, native_adjust): the former cell comparator -------------

bool better(float a, float b) {
  if (std::isnan(a)) return false;
  if (std::isnan(b)) return true;
  return a > b;
}

BlockMask ref_select_to_density(const BlockScores& s, double density, bool native_rule, const SelectOptions& o) {
  const int nb = s.num_blocks;
  const bool use_native = native_rule && s.native.has_value();
  const int64_t target = std::llround(density * 0.5 * nb * (nb + 1.0));
  std::vector<uint8_t> bitmap(static_cast<size_t>(s.heads) * nb * nb, 0);
  for (int h = 0; h < s.heads; ++h) {
    struct Cell {
      float score;
      int32_t i, j;
      uint8_t tier;
    };
    std::vector<Cell> cells;
    for (int i = 0; i < nb; ++i)
      for (int j = 0; j <= i; ++j) {
        const bool forced = (o.sink && j == 0) || (o.diagonal && j == i) || (j < i && i - j <= o.local_window);
        const uint8_t tier = forced ? 0 : (use_native && s.native->contains(h, i, j) ? 1 : 2);
        cells.push_back({s.at(h, i, j), i, j, tier});
      }
    int64_t nforced = 0;
    for (const Cell& c : cells) nforced += c.tier == 0;
    const int64_t take = std::min<int64_t>(static_cast<int64_t>(cells.size()), std::max(nforced, target));
    std::sort(cells.begin(), cells.end(), [](const Cell& a, const Cell& b) {
      if (a.tier != b.tier) return a.tier < b.tier;
      if (better(a.score, b.score)) return true;
      if (better(b.score, a.score)) return false;
      return a.i != b.i ? a.i < b.i : a.j < b.j;
    });
    for (int64_t t = 0; t < take; ++t) bitmap[(static_cast<size_t>(h) * nb + cells[t].i) * nb + cells[t].j] = 1;
  }
  return BlockMask::from_bitmap(s.heads, s.seq_len, s.block, bitmap);
}

// The former select_row: forced blocks, then a partial sort of the others by the comparator.
BlockMask ref_select_top_k(const BlockScores& s, int k, const SelectOptions& o) {
  const int nb = s.num_blocks;
  std::vector<std::vector<int32_t>> rows;
  for (int h = 0; h < s.heads; ++h)
    for (int i = 0; i < nb; ++i) {
      std::vector<int32_t> out, rest;
      for (int j = 0; j <= i; ++j) {
        const bool forced = (o.sink && j == 0) || (o.diagonal && j == i) || (j < i && i - j <= o.local_window);
        (forced ? out : rest).push_back(j);
      }
      const int64_t total = std::max<int64_t>(static_cast<int64_t>(out.size()), std::min<int64_t>(k, i + 1));
      const float* score = s.row(h, i);
      std::sort(rest.begin(), rest.end(), [&](int32_t a, int32_t b) {
        if (better(score[a], score[b])) return true;
        if (better(score[b], score[a])) return false;
        return a < b;
      });
      out.insert(out.end(), rest.begin(), rest.begin() + (total - static_cast<int64_t>(out.size())));
      rows.push_back(out);
    }
  return BlockMask::from_rows(s.heads, s.seq_len, s.block, rows);
}

BlockScores random_scores(int heads, int nb, int block, bool with_native) {
  auto& g = test::rng();
  BlockScores s;
  s.method = "random";
  s.heads = heads;
  s.num_blocks = nb;
  s.block = block;
  s.seq_len = int64_t(nb) * block - block / 3;  // a partial last block
  for (int x = 0; x < heads * nb * nb; ++x) s.score.push_back(tricky(g));
  if (with_native) {
    std::bernoulli_distribution keep(0.3);
    std::vector<std::vector<int32_t>> rows;
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < nb; ++i) {
        std::vector<int32_t> r{0, i};
        for (int j = 1; j < i; ++j)
          if (keep(g)) r.push_back(j);
        rows.push_back(r);
      }
    s.native = BlockMask::from_rows(heads, s.seq_len, block, rows);
  }
  return s;
}

TEST(RankKey, SelectionsEqualTheComparatorReference) {
  for (const auto& [heads, nb] : {std::pair{1, 1}, std::pair{3, 2}, std::pair{2, 37}, std::pair{5, 64}}) {
    for (bool native : {false, true}) {
      const BlockScores s = random_scores(heads, nb, 64, native);
      for (const SelectOptions& o : {SelectOptions{}, SelectOptions{false, true, 0}, SelectOptions{true, false, 2},
                                     SelectOptions{false, false, 0}}) {
        for (double d : {0.01, 0.1, 0.37, 0.9, 1.0}) {
          EXPECT_EQ(select_to_density(s, d, DensityRule::head_global, o), ref_select_to_density(s, d, false, o))
              << heads << " " << nb << " " << d;
          EXPECT_EQ(select_to_density(s, d, DensityRule::native_adjust, o), ref_select_to_density(s, d, true, o))
              << heads << " " << nb << " " << d;
        }
        for (int k : {1, 2, 5, nb}) EXPECT_EQ(select_top_k(s, k, o), ref_select_top_k(s, k, o)) << k;
        // Several densities at once (unsorted, repeated): each as alone.
        const std::vector<double> ds{0.37, 0.01, 0.9, 0.37, 1.0};
        for (DensityRule r : {DensityRule::head_global, DensityRule::native_adjust, DensityRule::row_uniform}) {
          const std::vector<BlockMask> many = select_to_densities(s, ds, r, o);
          ASSERT_EQ(many.size(), ds.size());
          for (size_t x = 0; x < ds.size(); ++x) EXPECT_EQ(many[x], select_to_density(s, ds[x], r, o)) << ds[x];
        }
      }
    }
  }
}

// The former bisection of select_budgets_to_density: the density of every row summed per step.
Budgets ref_scaled(const BlockScores& s, const Budgets& b, double density, const SelectOptions& o) {
  const int nb = s.num_blocks;
  std::vector<int> nf(nb);
  for (int i = 0; i < nb; ++i)
    for (int j = 0; j <= i; ++j)
      nf[i] += (o.sink && j == 0) || (o.diagonal && j == i) || (j < i && i - j <= o.local_window);
  auto scaled_k = [&](double c, size_t r) {
    return static_cast<int32_t>(std::max<int64_t>(1, std::llround(c * b.per_row_k[r])));
  };
  auto density_of = [&](double c) {
    double sel = 0;
    for (int h = 0; h < s.heads; ++h)
      for (int i = 0; i < nb; ++i)
        sel += std::max<int64_t>(nf[i], std::min<int64_t>(scaled_k(c, static_cast<size_t>(h) * nb + i), i + 1));
    return sel / (0.5 * nb * (nb + 1.0) * s.heads);
  };
  int32_t kmin = nb;
  for (int32_t k : b.per_row_k) kmin = std::min(kmin, std::max(1, k));
  double lo = 0.0, hi = 2.0 * nb / kmin + 1.0;
  for (int it = 0; it < 100; ++it) {
    const double mid = 0.5 * (lo + hi);
    (density_of(mid) < density ? lo : hi) = mid;
  }
  const double c = std::abs(density_of(lo) - density) < std::abs(density_of(hi) - density) ? lo : hi;
  Budgets out = b;
  for (size_t r = 0; r < out.per_row_k.size(); ++r) out.per_row_k[r] = scaled_k(c, r);
  for (int h = 0; h < s.heads; ++h) out.per_head_k[h] = b.per_head_k[h] * c;
  return out;
}

TEST(RankKey, BudgetsScaledToDensityEqualTheReference) {
  auto& g = test::rng();
  for (const auto& [heads, nb] : {std::pair{1, 1}, std::pair{3, 7}, std::pair{4, 53}}) {
    const BlockScores s = random_scores(heads, nb, 64, false);
    for (int pattern = 0; pattern < 3; ++pattern) {
      Budgets b;
      b.kind = "random";
      b.heads = heads;
      b.num_blocks = nb;
      std::uniform_int_distribution<int> k(0, nb + 3);
      for (int h = 0; h < heads; ++h) {
        const int kh = k(g);
        b.per_head_k.push_back(kh + 0.25);
        for (int i = 0; i < nb; ++i)  // constant per head, proportional-like runs, random
          b.per_row_k.push_back(pattern == 0 ? kh : pattern == 1 ? (kh * (i + 1) + nb - 1) / nb : k(g));
      }
      for (const SelectOptions& o : {SelectOptions{}, SelectOptions{false, false, 0}, SelectOptions{true, true, 5}})
        for (double d : {0.02, 0.3, 0.77, 1.0}) {
          Budgets got;
          select_budgets_to_density(s, b, d, o, &got);
          const Budgets ref = ref_scaled(s, b, d, o);
          EXPECT_EQ(got.per_row_k, ref.per_row_k) << heads << " " << nb << " " << pattern << " " << d;
          EXPECT_EQ(got.per_head_k, ref.per_head_k) << heads << " " << nb << " " << pattern << " " << d;
        }
    }
  }
}

// ---- metrics ---------------------------------------------------------------------------------

BlockMass random_mass(int heads, int nb, int block) {
  auto& g = test::rng();
  std::uniform_int_distribution<int> level(0, 7);
  BlockMass m;
  m.heads = heads;
  m.num_blocks = nb;
  m.block = block;
  m.seq_len = int64_t(nb) * block - 5;
  m.mass.assign(static_cast<size_t>(heads) * nb * nb, 0.0f);
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i)
      for (int j = 0; j <= i; ++j) m.row(h, i)[j] = 0.125f * level(g);  // many ties, zeros
  return m;
}

// The former oracle_density_mask: (value, flat index) pairs under a comparator.
BlockMask ref_oracle_density_mask(const BlockMass& mass, double density) {
  const int H = mass.heads, nb = mass.num_blocks;
  const int64_t causal = static_cast<int64_t>(nb) * (nb + 1) / 2;
  const int64_t T = std::clamp<int64_t>(std::llround(density * static_cast<double>(causal) * H), 0, causal * H);
  std::vector<std::pair<float, int64_t>> cells;
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < nb; ++i)
      for (int j = 0; j <= i; ++j) cells.emplace_back(mass.row(h, i)[j], (static_cast<int64_t>(h) * nb + i) * nb + j);
  std::sort(cells.begin(), cells.end(), [](const auto& a, const auto& b) {
    if (a.first != b.first) return a.first > b.first;
    return a.second < b.second;
  });
  std::vector<uint8_t> bitmap(static_cast<size_t>(H) * nb * nb, 0);
  for (int64_t t = 0; t < T; ++t) bitmap[static_cast<size_t>(cells[t].second)] = 1;
  return BlockMask::from_bitmap(H, mass.seq_len, mass.block, bitmap);
}

TEST(RankKey, OracleDensityMaskEqualsTheReference) {
  for (const auto& [heads, nb] : {std::pair{1, 1}, std::pair{3, 5}, std::pair{4, 41}}) {
    const BlockMass m = random_mass(heads, nb, 64);
    for (double d : {0.01, 0.2, 0.5, 0.99, 1.0})
      EXPECT_EQ(analysis::oracle_density_mask(m, d), ref_oracle_density_mask(m, d)) << heads << " " << nb << " " << d;
  }
}

// The former ranking_fidelity: two partial sorts per row and a set intersection.
std::vector<analysis::RankingFidelity> ref_fidelity(const analysis::ScoreView& sc, const BlockMass& mass,
                                                    const analysis::OracleBudget& budget) {
  auto top = [](const float* row, int i, int k) {
    std::vector<int32_t> ids(i + 1);
    std::iota(ids.begin(), ids.end(), 0);
    k = std::clamp(k, 0, i + 1);
    std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) {
      if (better(row[a], row[b])) return true;
      if (better(row[b], row[a])) return false;
      return a < b;
    });
    ids.resize(k);
    std::sort(ids.begin(), ids.end());
    return ids;
  };
  std::vector<analysis::RankingFidelity> out;
  for (int h = 0; h < mass.heads; ++h) {
    double br = 0, mr = 0, ratio = 0;
    for (int i = 0; i < mass.num_blocks; ++i) {
      const int k = budget.at(h, i);
      const float* m = mass.row(h, i);
      const std::vector<int32_t> s = top(sc.row(h, i), i, k), best = top(m, i, k);
      std::vector<int32_t> common;
      std::set_intersection(s.begin(), s.end(), best.begin(), best.end(), std::back_inserter(common));
      double ms = 0, mb = 0;
      for (int32_t j : s) ms += m[j];
      for (int32_t j : best) mb += m[j];
      br += k > 0 ? static_cast<double>(common.size()) / k : 1.0;
      mr += ms;
      ratio += mb > 0 ? ms / mb : 1.0;
    }
    const double n = mass.num_blocks;
    out.push_back({h, br / n, mr / n, ratio / n});
  }
  return out;
}

// Budget accuracy of several budgets at once (each mass row put in rank order once, from its rank
// positions) equals each budget's own call bit for bit: ties and zeros in the mass, values whose
// sums depend on the order, row budgets of 0, within and above the row.
TEST(RankKey, BudgetAccuracyOfManyEqualsOneByOne) {
  const int H = 5, nb = 23;
  BlockMass m = random_mass(H, nb, 32);
  for (float& x : m.mass) x *= 0.8f;  // 0.1-steps: float sums that depend on their order
  const std::vector<int32_t> pos = analysis::mass_rank_positions(m);
  std::uniform_int_distribution<int> extra(-2, 3);
  std::vector<analysis::OracleBudget> oracles;
  for (double gamma : {0.6, 0.95}) oracles.push_back(analysis::oracle_budget(m, gamma));
  std::vector<std::vector<double>> k_est;
  std::vector<std::vector<int32_t>> k_rows;
  std::vector<analysis::BudgetAccuracyRequest> requests;
  for (int r = 0; r < 4; ++r) {
    std::vector<int32_t> rows(static_cast<size_t>(H) * nb);
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < nb; ++i) rows[static_cast<size_t>(h) * nb + i] = std::max(0, i / (r + 1) + extra(test::rng()));
    k_rows.push_back(std::move(rows));
    k_est.push_back(std::vector<double>(static_cast<size_t>(H), 1.5 * r));
  }
  for (int r = 0; r < 4; ++r) requests.push_back({k_est[r], k_rows[r], &oracles[static_cast<size_t>(r % 2)]});
  const auto all = analysis::budget_accuracy(requests, m, pos);
  ASSERT_EQ(all.size(), requests.size());
  for (size_t r = 0; r < requests.size(); ++r) {
    const auto one = analysis::budget_accuracy(k_est[r], k_rows[r], m, *requests[r].oracle);
    for (int h = 0; h < H; ++h) {
      const analysis::BudgetAccuracy &a = all[r][h], &b = one[h];
      EXPECT_EQ(a.head, b.head);
      EXPECT_EQ(a.k_est, b.k_est) << r << " " << h;
      EXPECT_EQ(a.k_effective, b.k_effective) << r << " " << h;
      EXPECT_EQ(a.oracle_mean, b.oracle_mean) << r << " " << h;
      EXPECT_EQ(a.oracle_last_row, b.oracle_last_row) << r << " " << h;
      EXPECT_EQ(a.rel_error, b.rel_error) << r << " " << h;
      EXPECT_EQ(a.mass_reached, b.mass_reached) << r << " " << h;
      EXPECT_EQ(a.rows_below_gamma, b.rows_below_gamma) << r << " " << h;
    }
  }
  const std::vector<int32_t> short_rows(3, 1);
  const analysis::BudgetAccuracyRequest bad{k_est[0], short_rows, &oracles[0]};
  EXPECT_THROW(analysis::budget_accuracy(std::span(&bad, 1), m, pos), Error);
  EXPECT_THROW(analysis::budget_accuracy(requests, m, std::vector<int32_t>(5)), Error);
}

TEST(RankKey, RankingFidelityEqualsTheReference) {
  const int H = 6, nb = 29;
  const BlockMass m = random_mass(H, nb, 32);
  // Several score sets at once give each set's numbers alone.
  std::vector<BlockScores> sets;
  std::vector<analysis::ScoreView> views;
  for (int score_heads : {1, 2, 3, 6}) sets.push_back(random_scores(score_heads, nb, 32, false));
  for (const BlockScores& x : sets) views.push_back({x.score.data(), x.heads, nb, H});
  const analysis::OracleBudget b75 = analysis::oracle_budget(m, 0.75);
  const auto all = analysis::ranking_fidelity(views, m, b75);
  for (size_t v = 0; v < views.size(); ++v) {
    const auto ref = ref_fidelity(views[v], m, b75);
    for (int h = 0; h < H; ++h) {
      EXPECT_EQ(all[v][h].block_recall, ref[h].block_recall) << v << " " << h;
      EXPECT_EQ(all[v][h].mass_recall, ref[h].mass_recall) << v << " " << h;
      EXPECT_EQ(all[v][h].mass_ratio, ref[h].mass_ratio) << v << " " << h;
    }
  }
  // ... and at several budgets at once (rankings taken at the largest): each budget's numbers
  // as the reference gives them alone, the largest budget neither first nor last.
  const analysis::OracleBudget b50 = analysis::oracle_budget(m, 0.5), b95 = analysis::oracle_budget(m, 0.95);
  const analysis::OracleBudget* budgets[] = {&b50, &b95, &b75};
  const auto by_budget = analysis::ranking_fidelity(views, m, std::span<const analysis::OracleBudget* const>(budgets));
  ASSERT_EQ(by_budget.size(), 3u);
  for (size_t b = 0; b < 3; ++b)
    for (size_t v = 0; v < views.size(); ++v) {
      const auto ref = ref_fidelity(views[v], m, *budgets[b]);
      for (int h = 0; h < H; ++h) {
        EXPECT_EQ(by_budget[b][v][h].block_recall, ref[h].block_recall) << b << " " << v << " " << h;
        EXPECT_EQ(by_budget[b][v][h].mass_recall, ref[h].mass_recall) << b << " " << v << " " << h;
        EXPECT_EQ(by_budget[b][v][h].mass_ratio, ref[h].mass_ratio) << b << " " << v << " " << h;
      }
    }
  for (int score_heads : {1, 2, 3, 6}) {
    const BlockScores s = random_scores(score_heads, nb, 32, false);
    const analysis::ScoreView view{s.score.data(), score_heads, nb, H};
    for (double gamma : {0.5, 0.9}) {
      const analysis::OracleBudget b = analysis::oracle_budget(m, gamma);
      const auto got = analysis::ranking_fidelity(view, m, b), ref = ref_fidelity(view, m, b);
      for (int h = 0; h < H; ++h) {
        EXPECT_EQ(got[h].block_recall, ref[h].block_recall) << score_heads << " " << h;
        EXPECT_EQ(got[h].mass_recall, ref[h].mass_recall) << score_heads << " " << h;
        EXPECT_EQ(got[h].mass_ratio, ref[h].mass_ratio) << score_heads << " " << h;
      }
    }
  }
  // Scores expanded to every query head (proxy groups of 3 copied per member; one head apart):
  // the shared ranking of equal heads gives the reference's numbers, and the same selection order.
  BlockScores one = random_scores(3, nb, 32, false);
  BlockScores s = one;
  s.heads = H;
  s.score.clear();
  for (int h = 0; h < H; ++h) {
    const int src = h < 3 ? 0 : (h == 3 ? 1 : 2);
    s.score.insert(s.score.end(), one.score.begin() + src * nb * nb, one.score.begin() + (src + 1) * nb * nb);
  }
  const analysis::ScoreView view{s.score.data(), H, nb, H};
  const analysis::OracleBudget b = analysis::oracle_budget(m, 0.9);
  const auto got = analysis::ranking_fidelity(view, m, b), ref = ref_fidelity(view, m, b);
  for (int h = 0; h < H; ++h) {
    EXPECT_EQ(got[h].block_recall, ref[h].block_recall) << h;
    EXPECT_EQ(got[h].mass_recall, ref[h].mass_recall) << h;
    EXPECT_EQ(got[h].mass_ratio, ref[h].mass_ratio) << h;
  }
  const std::vector<int32_t> order = selection_order(s);
  std::vector<int32_t> direct;
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < nb; ++i) {
      std::vector<int32_t> r(i + 1);
      selection_order_row(s.row(h, i), i, SelectOptions{}, r.data());
      direct.insert(direct.end(), r.begin(), r.end());
    }
  EXPECT_EQ(order, direct);
}

// head_similarity sums each pair's per-row values in row order whatever the threads: the same
// numbers, bit for bit, as the public per-pair functions summed serially. Large enough for the
// parallel path.
TEST(RankKey, HeadSimilarityEqualsSerialPairs) {
  const int H = 8, nb = 300;
  BlockMass m = random_mass(H, nb, 16);
  auto& g = test::rng();
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int h = 0; h < H; h += 2)  // half the heads with few ties
    for (int i = 0; i < nb; ++i)
      for (int j = 0; j <= i; ++j) m.row(h, i)[j] = u(g);
  std::vector<float> probs(static_cast<size_t>(H) * m.seq_len);
  for (float& x : probs) x = 0.01f * static_cast<float>(static_cast<int>(u(g) * 10));
  analysis::SimilarityOptions o;
  o.max_rows = 0;
  const analysis::HeadSimilarity s = analysis::head_similarity(m, probs, m.seq_len, o);
  for (int a = 0; a < H; ++a)
    for (int b = a; b < H; ++b) {
      double cs = 0, ss = 0;
      int cn = 0, sn = 0;
      for (int i = 1; i < nb; ++i) {
        const size_t len = static_cast<size_t>(i) + 1;
        const double c = analysis::cosine_similarity({m.row(a, i), len}, {m.row(b, i), len});
        const double r = analysis::spearman_rho({m.row(a, i), len}, {m.row(b, i), len});
        if (std::isfinite(c)) cs += c, ++cn;
        if (std::isfinite(r)) ss += r, ++sn;
      }
      EXPECT_EQ(s.at(s.cosine, a, b), cn ? cs / cn : std::nan("")) << a << " " << b;
      EXPECT_EQ(s.at(s.spearman, a, b), sn ? ss / sn : std::nan("")) << a << " " << b;
    }
}

}  // namespace
}  // namespace proxyattn
