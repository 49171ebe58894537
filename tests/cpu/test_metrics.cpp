// Analysis metrics (analysis/metrics.hpp, analysis/layer_oracle.hpp): hand-computed cases on
// tiny inputs, float64 references on random odd-sized layers, and the properties of ALGORITHMS.md
// (oracle recall at its own budget is 1, recall monotone in the budget, self-similarity 1).
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>

#include "proxyattn/analysis/layer_oracle.hpp"
#include "proxyattn/analysis/metrics.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/select.hpp"
#include "test_util.hpp"

namespace proxyattn::analysis {
namespace {

using test::check_close;
using test::random_tensor;

// A hand-made block mass [H, Nb, Nb] from rows (causal part only; the rest stays 0).
BlockMass make_mass(int heads, int nb, int block, const std::vector<std::vector<float>>& rows) {
  BlockMass m;
  m.heads = heads;
  m.num_blocks = nb;
  m.block = block;
  m.seq_len = static_cast<int64_t>(nb) * block;
  m.mass.assign(static_cast<size_t>(heads) * nb * nb, 0.0f);
  EXPECT_EQ(rows.size(), static_cast<size_t>(heads) * nb);
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i) {
      const auto& r = rows[static_cast<size_t>(h) * nb + i];
      EXPECT_EQ(r.size(), static_cast<size_t>(i) + 1);
      for (int j = 0; j <= i; ++j) m.row(h, i)[j] = r[static_cast<size_t>(j)];
    }
  return m;
}

// One head, three blocks: the running example of the hand-computed tests.
BlockMass example_mass() {
  return make_mass(1, 3, 4, {{1.0f}, {0.3f, 0.7f}, {0.5f, 0.2f, 0.3f}});
}

BlockMask mask_rows(int heads, int64_t n, int block, std::vector<std::vector<int32_t>> rows) {
  return BlockMask::from_rows(heads, n, block, rows);
}

// ---- hand-computed -----------------------------------------------------------------------------

TEST(MetricsHand, PercentileAndSummaryIgnoreNaN) {
  const std::vector<double> v{4, 1, std::nan(""), 3, 2};
  EXPECT_DOUBLE_EQ(percentile(v, 0), 1.0);
  EXPECT_DOUBLE_EQ(percentile(v, 100), 4.0);
  EXPECT_DOUBLE_EQ(percentile(v, 5), 1.15);  // 1 + 0.05 * 3 * (2 - 1), numpy "linear"
  EXPECT_DOUBLE_EQ(percentile(v, 50), 2.5);
  const Summary s = summarize(v);
  EXPECT_EQ(s.count, 4);
  EXPECT_DOUBLE_EQ(s.mean, 2.5);
  EXPECT_DOUBLE_EQ(s.p5, 1.15);
  EXPECT_DOUBLE_EQ(s.p95, 3.85);
  EXPECT_TRUE(std::isnan(summarize(std::vector<double>{std::nan("")}).mean));
  EXPECT_THROW(percentile(v, 101), Error);
}

TEST(MetricsHand, DensityPerHead) {
  // N = 300, B = 128: Nb = 3, 6 causal blocks; the last block holds 44 rows.
  const BlockMask m = mask_rows(2, 300, 128, {{0}, {1}, {0, 2}, {0}, {0, 1}, {0, 1, 2}});
  const auto d = density_per_head(m);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].selected, 4);
  EXPECT_EQ(d[0].causal_blocks, 6);
  EXPECT_DOUBLE_EQ(d[0].density, 4.0 / 6.0);
  EXPECT_DOUBLE_EQ(d[0].sparsity(), 2.0 / 6.0);
  // Elements: diag 0 and 1: 128*129/2 each; row block 2: 44*128 (block 0) + 44*45/2 (diag).
  EXPECT_NEAR(d[0].element_density, (8256.0 + 8256.0 + 5632.0 + 990.0) / (300.0 * 301.0 / 2.0), 1e-12);
  EXPECT_DOUBLE_EQ(d[1].density, 1.0);
  EXPECT_NEAR(d[1].element_density, 1.0, 1e-12);
}

TEST(MetricsHand, MassAndBlockRecall) {
  const BlockMass m = example_mass();
  const BlockMask good = mask_rows(1, 12, 4, {{0}, {1}, {0, 2}});
  EXPECT_NEAR(mass_recall_per_head(good, m)[0], (1.0 + 0.7 + 0.8) / 3.0, 1e-7);
  EXPECT_NEAR(block_recall_per_head(good, m)[0], 1.0, 1e-12);
  // Row 1 picks the weaker block (0 of 1 best), row 2 picks {1, 2} vs best {0, 2} (1 of 2).
  const BlockMask bad = mask_rows(1, 12, 4, {{0}, {0}, {1, 2}});
  EXPECT_NEAR(mass_recall_per_head(bad, m)[0], (1.0 + 0.3 + 0.5) / 3.0, 1e-7);
  EXPECT_NEAR(block_recall_per_head(bad, m)[0], (1.0 + 0.0 + 0.5) / 3.0, 1e-12);
  // Empty rows do not count towards block recall.
  const BlockMask sparse = mask_rows(1, 12, 4, {{}, {0}, {}});
  EXPECT_NEAR(block_recall_per_head(sparse, m)[0], 0.0, 1e-12);
  EXPECT_NEAR(mass_recall_per_head(sparse, m)[0], 0.3 / 3.0, 1e-7);
}

TEST(MetricsHand, OracleBudgetAndMasks) {
  const BlockMass m = example_mass();
  const OracleBudget b90 = oracle_budget(m, 0.9);
  EXPECT_EQ(b90.at(0, 0), 1);
  EXPECT_EQ(b90.at(0, 1), 2);  // 0.7 < 0.9
  EXPECT_EQ(b90.at(0, 2), 3);  // 0.5 + 0.3 = 0.8 < 0.9
  EXPECT_DOUBLE_EQ(b90.mean(0), 2.0);
  const OracleBudget b75 = oracle_budget(m, 0.75);
  EXPECT_EQ(b75.at(0, 1), 2);
  EXPECT_EQ(b75.at(0, 2), 2);
  EXPECT_DOUBLE_EQ(b75.mean(0), 5.0 / 3.0);
  // gamma = 1 is reachable although float rows do not sum to exactly 1.
  EXPECT_EQ(oracle_budget(m, 1.0).at(0, 2), 3);
  const BlockMask g75 = oracle_gamma_mask(m, 0.75);
  EXPECT_EQ(g75, mask_rows(1, 12, 4, {{0}, {0, 1}, {0, 2}}));
  // Ties go to the lower block id.
  const BlockMass tie = make_mass(1, 2, 4, {{1.0f}, {0.5f, 0.5f}});
  EXPECT_EQ(oracle_budget(tie, 0.5).at(0, 1), 1);
  EXPECT_EQ(oracle_gamma_mask(tie, 0.5), mask_rows(1, 8, 4, {{0}, {0}}));
  EXPECT_EQ(rank_row(tie.row(0, 1), 1), (std::vector<int32_t>{0, 1}));
  // NaN ranks after every number (data read with --allow-nonfinite).
  const std::vector<float> with_nan{0.2f, std::nanf(""), 0.5f, 0.2f};
  EXPECT_EQ(rank_row(with_nan.data(), 3), (std::vector<int32_t>{2, 0, 3, 1}));
  EXPECT_THROW(oracle_budget(m, 0.0), Error);
  EXPECT_THROW(oracle_budget(m, 1.5), Error);
}

TEST(MetricsHand, OracleDensityMaskTakesTheLayersLargestCells) {
  // Two heads, 2 blocks (3 causal cells each): head 0 rows {1}, {0.3, 0.7}; head 1 rows
  // {1}, {0.5, 0.5}. Density 4/6 -> T = 4 of 6 cells: the three 1.0/0.7 cells... i.e. 1 (h0 r0),
  // 1 (h1 r0), 0.7 (h0 r1 b1), then the 0.5 tie goes to head 1 row 1 block 0.
  const BlockMass m = make_mass(2, 2, 4, {{1.0f}, {0.3f, 0.7f}, {1.0f}, {0.5f, 0.5f}});
  const BlockMask sel = oracle_density_mask(m, 4.0 / 6.0);
  EXPECT_EQ(sel, mask_rows(2, 8, 4, {{0}, {1}, {0}, {0}}));
  // Density differs per head (the layer-wide choice), mean over heads is the target.
  EXPECT_DOUBLE_EQ(sel.density(), 4.0 / 6.0);
  const auto r = mass_recall_per_head(sel, m);
  EXPECT_NEAR(r[0], (1.0 + 0.7) / 2.0, 1e-7);
  EXPECT_NEAR(r[1], (1.0 + 0.5) / 2.0, 1e-7);
  EXPECT_EQ(oracle_density_mask(m, 1.0), BlockMask::causal(2, 8, 4));
  EXPECT_THROW(oracle_density_mask(m, 0.0), Error);
}

TEST(MetricsHand, RankingFidelity) {
  const BlockMass m = example_mass();
  // Scores disagree with the mass in row 2 only.
  std::vector<float> sc(9, 0.0f);
  sc[0] = 1.0f;
  sc[3] = 0.2f; sc[4] = 0.8f;
  sc[6] = 0.1f; sc[7] = 0.9f; sc[8] = 0.5f;
  const ScoreView view{sc.data(), 1, 3, 1};
  const auto f = ranking_fidelity(view, m, oracle_budget(m, 0.75));
  // Budgets 1, 2, 2. Row 2: S = {1, 2}, S* = {0, 2}: recall 1/2, mass 0.5 vs 0.8.
  EXPECT_NEAR(f[0].block_recall, (1.0 + 1.0 + 0.5) / 3.0, 1e-12);
  EXPECT_NEAR(f[0].mass_recall, (1.0 + 1.0 + 0.5) / 3.0, 1e-7);
  EXPECT_NEAR(f[0].mass_ratio, (1.0 + 1.0 + 0.5 / 0.8) / 3.0, 1e-7);
}

TEST(MetricsHand, BudgetAccuracy) {
  const BlockMass m = example_mass();
  const OracleBudget b = oracle_budget(m, 0.9);  // rows 1, 2, 3: mean 2
  const std::vector<double> k{2.0};
  const auto a = budget_accuracy(k, m, b)[0];
  EXPECT_DOUBLE_EQ(a.oracle_mean, 2.0);
  EXPECT_DOUBLE_EQ(a.oracle_last_row, 3.0);
  // Rows keep min(2, i + 1) = 1, 2, 2 blocks: 5/3 on average vs the oracle's 2.
  EXPECT_DOUBLE_EQ(a.k_est, 2.0);
  EXPECT_DOUBLE_EQ(a.k_effective, 5.0 / 3.0);
  EXPECT_NEAR(a.rel_error, -1.0 / 6.0, 1e-12);
  EXPECT_NEAR(a.abs_rel_error, 1.0 / 6.0, 1e-12);
  // Mass 1, 1, 0.8; row 2 is below 0.9.
  EXPECT_NEAR(a.mass_reached, 2.8 / 3.0, 1e-7);
  EXPECT_NEAR(a.rows_below_gamma, 1.0 / 3.0, 1e-12);
  // Fractional budgets round up: 2.5 -> 3 blocks per row = 1, 2, 3 used = the oracle exactly.
  const auto over = budget_accuracy(std::vector<double>{2.5}, m, b)[0];
  EXPECT_DOUBLE_EQ(over.k_effective, 2.0);
  EXPECT_NEAR(over.rel_error, 0.0, 1e-12);
  EXPECT_NEAR(over.mass_reached, 1.0, 1e-7);
  EXPECT_DOUBLE_EQ(over.rows_below_gamma, 0.0);
  const auto under = budget_accuracy(std::vector<double>{1.0}, m, b)[0];
  EXPECT_DOUBLE_EQ(under.rel_error, -0.5);
  EXPECT_DOUBLE_EQ(under.abs_rel_error, 0.5);
  EXPECT_NEAR(under.mass_reached, (1.0 + 0.7 + 0.5) / 3.0, 1e-7);
  // Per-row budgets above the oracle's: 1, 2, 3 -> +0 %; 1, 2, 9 (capped to 3) the same.
  const std::vector<int32_t> rows{1, 2, 9};
  const auto capped = budget_accuracy(std::vector<double>{4.0}, rows, m, b)[0];
  EXPECT_DOUBLE_EQ(capped.k_effective, 2.0);
  EXPECT_NEAR(capped.rel_error, 0.0, 1e-12);
  // Proportional: row i keeps ceil(k (i + 1) / Nb) = ceil(2/3), ceil(4/3), ceil(6/3) = 1, 2, 2.
  EXPECT_NEAR(budget_accuracy(k, m, b, true)[0].mass_reached, 2.8 / 3.0, 1e-7);
  EXPECT_THROW(budget_accuracy(std::vector<double>{1.0, 2.0}, m, b), Error);
}

TEST(MetricsHand, CosineSpearmanAndTopK) {
  const std::vector<float> a{0.1f, 0.2f, 0.7f}, b{0.2f, 0.1f, 0.7f};
  EXPECT_NEAR(cosine_similarity(a, b), 0.53 / 0.54, 1e-6);
  EXPECT_NEAR(spearman_rho(a, b), 0.5, 1e-12);  // 1 - 6 * 2 / (3 * 8)
  // Ties share average ranks: (1.5, 1.5, 3) vs (1, 2, 3) -> rho = sqrt(3)/2.
  EXPECT_NEAR(spearman_rho(std::vector<float>{1, 1, 2}, std::vector<float>{1, 2, 3}), std::sqrt(3.0) / 2.0, 1e-12);
  EXPECT_TRUE(std::isnan(spearman_rho(std::vector<float>{1, 1}, std::vector<float>{1, 2})));
  EXPECT_TRUE(std::isnan(cosine_similarity(std::vector<float>{0, 0}, std::vector<float>{1, 2})));
  const std::vector<float> p{0.1f, 0.3f, 0.3f, 0.05f, 0.25f};
  EXPECT_EQ(topk_tokens(p, 2), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(topk_tokens(p, 3), (std::vector<int64_t>{1, 2, 4}));
}

TEST(MetricsHand, HeadSimilarity) {
  // Two heads, 3 blocks of 4 tokens. Row 1: (0.4, 0.6) vs (0.6, 0.4); row 2 as above.
  const BlockMass m = make_mass(2, 3, 4,
                                {{1.0f}, {0.4f, 0.6f}, {0.1f, 0.2f, 0.7f},
                                 {1.0f}, {0.6f, 0.4f}, {0.2f, 0.1f, 0.7f}});
  // Token probabilities over N = 10 tokens; k = round(0.2 * 10) = 2: top {3, 7} vs {3, 5}.
  std::vector<float> tp(20, 0.01f);
  tp[3] = 0.5f; tp[7] = 0.3f;
  tp[10 + 3] = 0.4f; tp[10 + 5] = 0.35f;
  SimilarityOptions opts;
  opts.topk_fractions = {0.2, 0.5};
  const HeadSimilarity s = head_similarity(m, tp, 10, opts);
  ASSERT_EQ(s.topk_k, (std::vector<int64_t>{2, 5}));
  EXPECT_DOUBLE_EQ(s.at(s.topk_overlap[0], 0, 1), 0.5);
  EXPECT_DOUBLE_EQ(s.at(s.topk_overlap[0], 1, 0), 0.5);
  // k = 5: head 0 -> {3, 7, 0, 1, 2}, head 1 -> {3, 5, 0, 1, 2} (ties by lower id): 4 of 5.
  EXPECT_DOUBLE_EQ(s.at(s.topk_overlap[1], 0, 1), 0.8);
  EXPECT_EQ(s.rows_used, 2);
  EXPECT_NEAR(s.at(s.cosine, 0, 1), (0.48 / 0.52 + 0.53 / 0.54) / 2.0, 1e-6);
  EXPECT_NEAR(s.at(s.spearman, 0, 1), (-1.0 + 0.5) / 2.0, 1e-12);
  for (int h = 0; h < 2; ++h) {
    EXPECT_DOUBLE_EQ(s.at(s.topk_overlap[0], h, h), 1.0);
    EXPECT_NEAR(s.at(s.cosine, h, h), 1.0, 1e-12);
    EXPECT_NEAR(s.at(s.spearman, h, h), 1.0, 1e-12);
  }
  // max_rows = 1 keeps only the last row.
  opts.max_rows = 1;
  const HeadSimilarity last = head_similarity(m, tp, 10, opts);
  EXPECT_EQ(last.rows_used, 1);
  EXPECT_NEAR(last.at(last.spearman, 0, 1), 0.5, 1e-12);
}

// ---- the layer oracle against float64 references -------------------------------------------------

struct Shape {
  int hq, hkv, d, block;
  int64_t n;
};

std::string shape_name(const Shape& c) {
  return "Hq" + std::to_string(c.hq) + "_Hkv" + std::to_string(c.hkv) + "_d" + std::to_string(c.d) + "_B" +
         std::to_string(c.block) + "_N" + std::to_string(c.n);
}

class OracleCase : public ::testing::TestWithParam<Shape> {};

// GQA ratios 1, 3, 4; head dims 64, 128 (and 72, the non-multiple-of-16 tail); N prime or odd.
INSTANTIATE_TEST_SUITE_P(Shapes, OracleCase,
                         ::testing::Values(Shape{2, 2, 64, 64, 131}, Shape{3, 1, 64, 128, 257},
                                           Shape{4, 1, 128, 64, 199}, Shape{6, 2, 128, 128, 300},
                                           Shape{3, 3, 72, 64, 97}),
                         [](const auto& info) { return shape_name(info.param); });

TEST_P(OracleCase, MassLseAndLastBlockMatchFloat64) {
  const Shape c = GetParam();
  const Tensor3 q = random_tensor(c.hq, c.n, c.d, 2.0f), k = random_tensor(c.hkv, c.n, c.d);
  const LayerOracle o = layer_oracle(q, k, c.block);
  const int nb = num_blocks_for(c.n, c.block);
  ASSERT_EQ(o.mass.num_blocks, nb);
  check_close("oracle mass", o.mass.mass, test::block_mass64(q, k, c.block), 1e-6, 1e-4);
  check_close("oracle lse", o.lse, test::lse64(q, k), 1e-4, 1e-5);
  // Last-block token probabilities: mean over the last block's rows of P_h[q, k].
  std::vector<double> ref(static_cast<size_t>(c.hq) * c.n, 0.0);
  const int64_t r0 = static_cast<int64_t>(nb - 1) * c.block, rows = c.n - r0;
  for (int h = 0; h < c.hq; ++h)
    for (int64_t t = r0; t < c.n; ++t) {
      const auto p = test::probs64(q, k, h, t, [](int64_t) { return true; });
      for (int64_t x = 0; x <= t; ++x) ref[static_cast<size_t>(h) * c.n + x] += p[static_cast<size_t>(x)] / rows;
    }
  check_close("last-block token probs", o.last_block_probs, ref, 1e-7, 1e-4);
  for (int h = 0; h < c.hq; ++h)
    for (int i = 0; i < nb; ++i) {
      double s = 0;
      for (int j = 0; j < nb; ++j) s += o.mass.at(h, i, j);
      ASSERT_NEAR(s, 1.0, 1e-5) << "row " << i << " of head " << h;
    }
}

// Block recall from the per-layer rank positions equals the partial-sort definition, ties
// included (a mass with repeated values: ties go to the lower block in both).
TEST_P(OracleCase, BlockRecallFromRankPositionsEqualsTheDefinition) {
  const Shape c = GetParam();
  const Tensor3 q = random_tensor(c.hq, c.n, c.d, 2.0f), k = random_tensor(c.hkv, c.n, c.d);
  LayerOracle o = layer_oracle(q, k, c.block);
  for (size_t x = 0; x < o.mass.mass.size(); x += 7) o.mass.mass[x] = 0.125f;  // ties
  const std::vector<int32_t> pos = mass_rank_positions(o.mass);
  for (double density : {0.1, 0.4, 0.9}) {
    const BlockMask m = test::random_mask(c.hq, c.n, c.block, density);
    const std::vector<double> a = block_recall_per_head(m, o.mass), b = block_recall_per_head(m, o.mass, pos);
    ASSERT_EQ(a.size(), b.size());
    for (size_t h = 0; h < a.size(); ++h) EXPECT_EQ(a[h], b[h]) << "density " << density << " head " << h;
    // Both recalls in one pass: bitwise the two functions.
    std::vector<double> mr, br;
    recall_per_head(m, o.mass, pos, mr, br);
    EXPECT_EQ(mr, mass_recall_per_head(m, o.mass)) << "density " << density;
    ASSERT_EQ(br.size(), b.size());
    for (size_t h = 0; h < b.size(); ++h)
      EXPECT_TRUE(br[h] == b[h] || (std::isnan(br[h]) && std::isnan(b[h]))) << "density " << density << " head " << h;
  }
  EXPECT_THROW(block_recall_per_head(test::random_mask(c.hq, c.n, c.block, 0.5), o.mass, std::vector<int32_t>(3)), Error);
}

// Oracle budgets and top-k masks from the per-layer rank positions equal the sorting
// definitions, ties included (random budgets, 0 and past the row's length too).
TEST_P(OracleCase, OracleBudgetAndTopKFromRankPositionsEqualTheDefinition) {
  const Shape c = GetParam();
  const Tensor3 q = random_tensor(c.hq, c.n, c.d, 2.0f), k = random_tensor(c.hkv, c.n, c.d);
  LayerOracle o = layer_oracle(q, k, c.block);
  for (size_t x = 0; x < o.mass.mass.size(); x += 5) o.mass.mass[x] = 0.0625f;  // ties
  const std::vector<int32_t> pos = mass_rank_positions(o.mass);
  for (double gamma : {0.3, 0.9, 0.95, 1.0}) {
    const OracleBudget a = oracle_budget(o.mass, gamma), b = oracle_budget(o.mass, gamma, pos);
    EXPECT_EQ(a.per_row, b.per_row) << "gamma " << gamma;
    EXPECT_EQ(oracle_topk_mask(o.mass, a.per_row), oracle_topk_mask(o.mass, a.per_row, pos)) << "gamma " << gamma;
  }
  const int nb = o.mass.num_blocks;
  std::uniform_int_distribution<int32_t> kd(-1, nb + 2);
  std::vector<int32_t> ks(static_cast<size_t>(c.hq) * nb);
  for (int32_t& x : ks) x = kd(test::rng());
  EXPECT_EQ(oracle_topk_mask(o.mass, ks), oracle_topk_mask(o.mass, ks, pos));
  EXPECT_THROW(oracle_topk_mask(o.mass, ks, std::vector<int32_t>(3)), Error);
  EXPECT_THROW(oracle_budget(o.mass, 0.9, std::vector<int32_t>(3)), Error);
}

TEST_P(OracleCase, OutputErrorsMatchFloat64) {
  const Shape c = GetParam();
  const Tensor3 q = random_tensor(c.hq, c.n, c.d, 2.0f), k = random_tensor(c.hkv, c.n, c.d),
                v = random_tensor(c.hkv, c.n, c.d);
  const LayerOracle o = layer_oracle(q, k, c.block);
  const BlockMask all = BlockMask::causal(c.hq, c.n, c.block);
  const BlockMask m1 = test::random_mask(c.hq, c.n, c.block, 0.3);
  // Diagonal blocks only: drops every off-diagonal key, so its error is clearly non-zero.
  const int nb = num_blocks_for(c.n, c.block);
  std::vector<std::vector<int32_t>> diag_rows;
  for (int h = 0; h < c.hq; ++h)
    for (int i = 0; i < nb; ++i) diag_rows.push_back({i});
  const BlockMask m2 = BlockMask::from_rows(c.hq, c.n, c.block, diag_rows);
  const OutputErrors e = output_errors(q, k, v, o, {&all, &m1, &m2});
  ASSERT_EQ(e.rel_error.size(), 3u);
  const std::vector<double> full = test::attention64(q, k, v, nullptr);
  const int64_t per_head = c.n * c.d;
  for (size_t mi = 1; mi < 3; ++mi) {
    const BlockMask& mk = mi == 1 ? m1 : m2;
    const std::vector<double> sp = test::attention64(q, k, v, &mk);
    std::vector<double> ref(static_cast<size_t>(c.hq));
    for (int h = 0; h < c.hq; ++h) {
      double num = 0, den = 0;
      for (int64_t x = 0; x < per_head; ++x) {
        const size_t at = static_cast<size_t>(h * per_head + x);
        num += (sp[at] - full[at]) * (sp[at] - full[at]);
        den += full[at] * full[at];
      }
      ref[static_cast<size_t>(h)] = std::sqrt(num / den);
      if (mi == 2) EXPECT_GT(ref[static_cast<size_t>(h)], 1e-3) << "the diagonal-only mask drops mass";
    }
    check_close("output error mask " + std::to_string(mi), e.rel_error[mi], ref, 2e-5, 1e-3);
    EXPECT_EQ(e.empty_rows[mi], 0);
  }
  for (double x : e.rel_error[0]) EXPECT_LT(x, 2e-5) << "all-causal mask must reproduce full attention";
}

TEST_P(OracleCase, BlockMaxIsProxyScoreWithOneGroupPerHead) {
  const Shape c = GetParam();
  const Tensor3 q = random_tensor(c.hq, c.n, c.d, 2.0f), k = random_tensor(c.hkv, c.n, c.d);
  const LayerOracle o = layer_oracle(q, k, c.block);
  EstimatorConfig cfg;
  cfg.block = c.block;
  cfg.proxy.groups = c.hq;  // one proxy per query head: the head itself
  const BlockScores s = make_estimator("proxy")->estimate(q, k, cfg);
  check_close("block max vs proxy g = Hq", o.block_max, s.score, 1e-7, 1e-4);
}

// The fused pass: its oracle equals layer_oracle, its explicit-mask errors equal the two-pass
// output_errors, and errors read from prefix tables equal the direct ones for every mask built
// from a ranking (oracle selections, select.hpp selections from scores with forced blocks).
TEST_P(OracleCase, FusedPassAndPrefixTablesMatchTheDirectErrors) {
  const Shape c = GetParam();
  const Tensor3 q = random_tensor(c.hq, c.n, c.d, 2.0f), k = random_tensor(c.hkv, c.n, c.d),
                v = random_tensor(c.hkv, c.n, c.d);
  const int nb = num_blocks_for(c.n, c.block);
  const LayerOracle o = layer_oracle(q, k, c.block);
  // Scores of a pretend estimator, ranked with forced sink + diagonal.
  BlockScores sc;
  sc.method = "test";
  sc.heads = c.hq;
  sc.num_blocks = nb;
  sc.block = c.block;
  sc.seq_len = c.n;
  sc.score.resize(static_cast<size_t>(c.hq) * nb * nb);
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  for (float& x : sc.score) x = u01(test::rng());
  std::vector<Ranking> rankings(3);
  rankings[0].source = Ranking::Source::mass;
  rankings[1].source = Ranking::Source::block_max;
  rankings[1].sink = rankings[1].diagonal = true;
  rankings[2].source = Ranking::Source::given;
  rankings[2].order = rank_orders(sc.score.data(), c.hq, nb, true, true);
  const BlockMask explicit_mask = test::random_mask(c.hq, c.n, c.block, 0.4);
  const LayerPass p = layer_pass(q, k, v, c.block, {&explicit_mask}, rankings);
  EXPECT_EQ(p.oracle.mass.mass, o.mass.mass);
  EXPECT_EQ(p.oracle.lse, o.lse);
  EXPECT_EQ(p.oracle.block_max, o.block_max);
  check_close("fused explicit error", p.errors.rel_error[0],
              output_errors(q, k, v, o, {&explicit_mask}).rel_error[0], 1e-6, 1e-4);

  BlockScores bm = sc;
  bm.score = o.block_max;
  std::vector<std::pair<size_t, BlockMask>> built;  // (ranking, mask)
  built.emplace_back(0, oracle_gamma_mask(o.mass, 0.7));
  built.emplace_back(0, oracle_density_mask(o.mass, 0.3));  // may leave rows empty
  built.emplace_back(1, select_top_k(bm, 2));
  built.emplace_back(2, select_top_k(sc, 3));
  built.emplace_back(2, select_to_density(sc, 0.5, DensityRule::head_global));
  for (const auto& [r, mask] : built) {
    std::vector<double> rel;
    int64_t empty = -1;
    ASSERT_TRUE(prefix_mask_errors(p.prefix[r], p.full_sq, mask, rel, empty)) << "ranking " << r;
    const OutputErrors direct = output_errors(q, k, v, o, {&mask});
    check_close("prefix-table error, ranking " + std::to_string(r), rel, direct.rel_error[0], 1e-6, 1e-4);
    EXPECT_EQ(empty, direct.empty_rows[0]);
  }
  // A mask that is not a prefix of a ranking is refused.
  std::vector<double> rel;
  int64_t empty = 0;
  const BlockMask other = select_top_k(sc, 2);
  if (!is_prefix_of_order(other, p.prefix[0].order))
    EXPECT_FALSE(prefix_mask_errors(p.prefix[0], p.full_sq, other, rel, empty));
  EXPECT_FALSE(is_prefix_of_order(test::random_mask(c.hq, c.n, c.block, 0.5), std::vector<int32_t>(3, 0)));
  EXPECT_THROW(layer_pass(q, k, ConstView{}, c.block, {&explicit_mask}), Error);
}

TEST(OracleErrors, RankOrderPutsForcedBlocksFirst) {
  const std::vector<float> row{0.1f, 0.9f, std::nanf(""), 0.9f, 0.2f};
  std::vector<int32_t> out(5);
  rank_order(row.data(), 4, true, true, out.data());
  EXPECT_EQ(out, (std::vector<int32_t>{0, 4, 1, 3, 2}));  // ties by lower id, NaN last
  rank_order(row.data(), 4, false, false, out.data());
  EXPECT_EQ(out, (std::vector<int32_t>{1, 3, 4, 0, 2}));
  rank_order(row.data(), 0, true, true, out.data());
  EXPECT_EQ(out[0], 0);
}

TEST(OracleErrors, EmptyRowsCountAndBadInput) {
  const Tensor3 q = random_tensor(2, 100, 64), k = random_tensor(1, 100, 64), v = random_tensor(1, 100, 64);
  const LayerOracle o = layer_oracle(q, k, 64);
  // Head 1 row block 1 selects nothing: 36 query rows give O_sparse = 0, error counted fully.
  const BlockMask m = mask_rows(2, 100, 64, {{0}, {1}, {0}, {}});
  const OutputErrors e = output_errors(q, k, v, o, {&m});
  EXPECT_EQ(e.empty_rows[0], 36);
  // Head 1 then keeps the exact output of rows 0..63 and zero for rows 64..99.
  const std::vector<double> full = test::attention64(q, k, v, nullptr);
  double tail = 0, all = 0;
  for (int64_t t = 0; t < 100; ++t)
    for (int64_t x = 0; x < 64; ++x) {
      const double y = full[static_cast<size_t>((100 + t) * 64 + x)];
      all += y * y;
      if (t >= 64) tail += y * y;
    }
  EXPECT_NEAR(e.rel_error[0][1], std::sqrt(tail / all), 1e-5);
  EXPECT_THROW(output_errors(q, k, ConstView{}, o, {&m}), Error);
  const BlockMask wrong = BlockMask::causal(2, 100, 32);
  EXPECT_THROW(output_errors(q, k, v, o, {&wrong}), Error);
  EXPECT_THROW(layer_oracle(q, k, 100), Error);
}

// ---- properties on random layers ------------------------------------------------------------------

LayerOracle random_oracle(int hq, int hkv, int64_t n, int d, int block) {
  const Tensor3 q = random_tensor(hq, n, d, 3.0f), k = random_tensor(hkv, n, d);
  return layer_oracle(q, k, block);
}

TEST(MetricsProperty, OracleRecallAtItsOwnBudgetIsOne) {
  const LayerOracle o = random_oracle(6, 2, 389, 64, 32);
  for (double gamma : {0.5, 0.9, 0.99}) {
    const BlockMask g = oracle_gamma_mask(o.mass, gamma);
    for (double r : block_recall_per_head(g, o.mass)) EXPECT_DOUBLE_EQ(r, 1.0);
    // Every row reaches gamma, so the mean does too.
    for (double r : mass_recall_per_head(g, o.mass)) EXPECT_GE(r, gamma * (1 - 1e-6));
    // The oracle maximises the mass kept at its own per-row budget: a random selection with
    // the same row sizes never keeps more.
    std::vector<std::vector<int32_t>> rows;
    std::mt19937_64& rng = test::rng();
    for (int h = 0; h < g.heads(); ++h)
      for (int i = 0; i < g.num_blocks(); ++i) {
        std::vector<int32_t> ids(static_cast<size_t>(i) + 1);
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), rng);
        ids.resize(g.row(h, i).size());
        rows.push_back(ids);
      }
    const BlockMask rnd = BlockMask::from_rows(g.heads(), g.seq_len(), g.block(), rows);
    const auto mo = mass_recall_per_head(g, o.mass), mr = mass_recall_per_head(rnd, o.mass);
    for (size_t h = 0; h < mo.size(); ++h) EXPECT_GE(mo[h], mr[h] - 1e-9);
  }
  // Full attention keeps everything.
  for (double r : mass_recall_per_head(BlockMask::causal(6, 389, 32), o.mass)) EXPECT_NEAR(r, 1.0, 1e-5);
}

TEST(MetricsProperty, OracleDensityMaskIsTheUpperBoundAtItsDensity) {
  const LayerOracle o = random_oracle(5, 1, 300, 64, 32);
  const int H = o.mass.heads;
  for (double density : {0.2, 0.5, 0.8}) {
    const BlockMask best = oracle_density_mask(o.mass, density);
    double best_mean = 0;
    for (double r : mass_recall_per_head(best, o.mass)) best_mean += r / H;
    // Any other selection with the same total number of blocks keeps no more on average.
    const BlockMask rnd = test::random_mask(H, 300, 32, density);
    const BlockMask per_row = oracle_topk_mask(o.mass, oracle_budget(o.mass, 0.9).per_row);
    for (const BlockMask* other : {&rnd, &per_row}) {
      const BlockMask cut = oracle_density_mask(o.mass, std::min(1.0, other->density()));
      double cut_mean = 0, other_mean = 0;
      for (double r : mass_recall_per_head(cut, o.mass)) cut_mean += r / H;
      for (double r : mass_recall_per_head(*other, o.mass)) other_mean += r / H;
      EXPECT_GE(cut_mean, other_mean - 1e-6);
    }
    EXPECT_NEAR(best.density(), density, 1.0 / (H * 55.0));
  }
}

TEST(MetricsProperty, RecallMonotoneInBudget) {
  const LayerOracle o = random_oracle(4, 1, 311, 64, 16);
  const int nb = o.mass.num_blocks, H = o.mass.heads;
  // A fixed (non-oracle) ranking: top-k of random scores is nested in k.
  std::vector<float> sc(static_cast<size_t>(H) * nb * nb);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (float& x : sc) x = u(test::rng());
  const ScoreView view{sc.data(), H, nb, H};
  std::vector<double> prev_oracle(static_cast<size_t>(H), -1.0), prev_rand(static_cast<size_t>(H), -1.0);
  for (int k = 1; k <= nb; ++k) {
    const std::vector<int32_t> ks(static_cast<size_t>(H) * nb, k);
    const auto mo = mass_recall_per_head(oracle_topk_mask(o.mass, ks), o.mass);
    std::vector<std::vector<int32_t>> rows;
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < nb; ++i) {
        std::vector<int32_t> r = rank_row(view.row(h, i), i);
        r.resize(static_cast<size_t>(std::min(k, i + 1)));
        rows.push_back(r);
      }
    const auto mr = mass_recall_per_head(BlockMask::from_rows(H, o.mass.seq_len, o.mass.block, rows), o.mass);
    for (int h = 0; h < H; ++h) {
      EXPECT_GE(mo[static_cast<size_t>(h)], prev_oracle[static_cast<size_t>(h)] - 1e-12);
      EXPECT_GE(mr[static_cast<size_t>(h)], prev_rand[static_cast<size_t>(h)] - 1e-12);
      EXPECT_GE(mo[static_cast<size_t>(h)], mr[static_cast<size_t>(h)] - 1e-9);
      prev_oracle[static_cast<size_t>(h)] = mo[static_cast<size_t>(h)];
      prev_rand[static_cast<size_t>(h)] = mr[static_cast<size_t>(h)];
    }
  }
  for (double x : prev_oracle) EXPECT_NEAR(x, 1.0, 1e-5);
  // Oracle budgets grow with gamma.
  double last = 0;
  for (double gamma : {0.3, 0.6, 0.9, 0.99, 1.0}) {
    const OracleBudget b = oracle_budget(o.mass, gamma);
    double mean = 0;
    for (int h = 0; h < H; ++h) mean += b.mean(h);
    EXPECT_GE(mean, last);
    last = mean;
  }
}

TEST(MetricsProperty, SelfSimilarityIsOne) {
  // Heads 0 and 2 are the same query head (copied), head 1 differs.
  Tensor3 q = random_tensor(3, 263, 64, 3.0f);
  for (int64_t t = 0; t < 263; ++t)
    for (int64_t x = 0; x < 64; ++x) q(2, t, x) = q(0, t, x);
  const Tensor3 k = random_tensor(1, 263, 64);
  const LayerOracle o = layer_oracle(q, k, 32);
  const HeadSimilarity s = head_similarity(o.mass, o.last_block_probs, 263);
  for (size_t f = 0; f < s.topk_overlap.size(); ++f) {
    EXPECT_DOUBLE_EQ(s.at(s.topk_overlap[f], 0, 2), 1.0);
    for (int h = 0; h < 3; ++h) EXPECT_DOUBLE_EQ(s.at(s.topk_overlap[f], h, h), 1.0);
  }
  for (int h = 0; h < 3; ++h) {
    EXPECT_NEAR(s.at(s.cosine, h, h), 1.0, 1e-12);
    EXPECT_NEAR(s.at(s.spearman, h, h), 1.0, 1e-12);
  }
  EXPECT_NEAR(s.at(s.cosine, 0, 2), 1.0, 1e-12);
  EXPECT_NEAR(s.at(s.spearman, 0, 2), 1.0, 1e-12);
  // A different head is less similar than itself (random data: clearly below 1).
  EXPECT_LT(s.at(s.spearman, 0, 1), 0.99);
  EXPECT_LT(s.at(s.topk_overlap[1], 0, 1), 1.0);
  // Symmetric, in range.
  for (int a = 0; a < 3; ++a)
    for (int b = 0; b < 3; ++b) {
      EXPECT_DOUBLE_EQ(s.at(s.cosine, a, b), s.at(s.cosine, b, a));
      EXPECT_GE(s.at(s.topk_overlap[0], a, b), 0.0);
      EXPECT_LE(s.at(s.spearman, a, b), 1.0);
    }
}

TEST(MetricsProperty, FidelityOfTheMassItselfIsOne) {
  const LayerOracle o = random_oracle(4, 2, 201, 64, 32);
  const ScoreView view{o.mass.mass.data(), o.mass.heads, o.mass.num_blocks, o.mass.heads};
  for (const auto& f : ranking_fidelity(view, o.mass, oracle_budget(o.mass, 0.9))) {
    EXPECT_DOUBLE_EQ(f.block_recall, 1.0);
    EXPECT_DOUBLE_EQ(f.mass_ratio, 1.0);
  }
  // A shared (group) score: query heads 0, 1 read score head 0 and heads 2, 3 score head 1.
  // Score head 0 = head 0's mass, score head 1 = head 3's mass: heads 0 and 3 rank perfectly.
  const size_t per = static_cast<size_t>(o.mass.num_blocks) * o.mass.num_blocks;
  std::vector<float> sc(2 * per);
  std::copy(o.mass.mass.begin(), o.mass.mass.begin() + per, sc.begin());
  std::copy(o.mass.mass.begin() + 3 * per, o.mass.mass.begin() + 4 * per, sc.begin() + per);
  const ScoreView grouped{sc.data(), 2, o.mass.num_blocks, 4};
  EXPECT_EQ(grouped.score_head_of(1), 0);
  EXPECT_EQ(grouped.score_head_of(2), 1);
  const auto g = ranking_fidelity(grouped, o.mass, oracle_budget(o.mass, 0.9));
  EXPECT_DOUBLE_EQ(g[0].block_recall, 1.0);
  EXPECT_DOUBLE_EQ(g[3].block_recall, 1.0);
  EXPECT_DOUBLE_EQ(g[3].mass_ratio, 1.0);
  // The reversed ranking of a head's own mass keeps less than the oracle.
  std::vector<float> neg(o.mass.mass.size());
  for (size_t x = 0; x < neg.size(); ++x) neg[x] = -o.mass.mass[x];
  const ScoreView reversed{neg.data(), o.mass.heads, o.mass.num_blocks, o.mass.heads};
  const OracleBudget b = oracle_budget(o.mass, 0.9);
  for (const auto& f : ranking_fidelity(reversed, o.mass, b)) {
    // Only a row whose budget leaves a block out can be ranked worse (with 4 blocks a head's
    // random mass can need every block of every row at gamma 0.9).
    bool partial = false;
    for (int i = 0; i < o.mass.num_blocks; ++i) partial = partial || b.at(f.head, i) < i + 1;
    if (!partial) {
      EXPECT_DOUBLE_EQ(f.mass_ratio, 1.0);
      continue;
    }
    EXPECT_LT(f.mass_ratio, 1.0);
    EXPECT_LT(f.block_recall, 1.0);
  }
}

}  // namespace
}  // namespace proxyattn::analysis
