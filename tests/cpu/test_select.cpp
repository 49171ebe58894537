// Selection: the forced blocks, ranking and tie rules by hand, fixed-density rules, bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "estimator_test_util.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/select.hpp"
#include "test_util.hpp"

namespace proxyattn {
namespace {

std::vector<int32_t> row_of(const BlockMask& m, int h, int i) {
  const auto r = m.row(h, i);
  return {r.begin(), r.end()};
}

Budgets budgets_of(int heads, int nb, std::vector<int32_t> per_row) {
  Budgets b;
  b.kind = "hand";
  b.heads = heads;
  b.num_blocks = nb;
  b.per_row_k = std::move(per_row);
  b.per_head_k.assign(heads, 0.0);
  return b;
}

// One head, Nb = 5 (N = 9, B = 2: the last block is partial). Row 4 scores
// [0.1, 0.5, 0.5, 0.9, 0.2]: forced sink 0 and diagonal 4, then 3 (0.9), then the tie
// 1 = 2 = 0.5 broken by the lower j.
const std::vector<float> kScores = {
    1, 0, 0, 0, 0,              //
    .3f, .7f, 0, 0, 0,          //
    .2f, .5f, .3f, 0, 0,        //
    .4f, .1f, .2f, .3f, 0,      //
    .1f, .5f, .5f, .9f, .2f};

TEST(Select, HandComputedRanking) {
  const BlockScores s = test::make_block_scores(1, 9, 2, kScores);
  const BlockMask m2 = select_top_k(s, 2);
  EXPECT_EQ(row_of(m2, 0, 0), (std::vector<int32_t>{0}));
  EXPECT_EQ(row_of(m2, 0, 1), (std::vector<int32_t>{0, 1}));     // i + 1 <= k: all
  EXPECT_EQ(row_of(m2, 0, 3), (std::vector<int32_t>{0, 3}));     // forced only
  EXPECT_EQ(row_of(m2, 0, 4), (std::vector<int32_t>{0, 4}));
  const BlockMask m3 = select_top_k(s, 3);
  EXPECT_EQ(row_of(m3, 0, 2), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(row_of(m3, 0, 3), (std::vector<int32_t>{0, 2, 3}));  // 0.2 beats 0.1
  EXPECT_EQ(row_of(m3, 0, 4), (std::vector<int32_t>{0, 3, 4}));
  const BlockMask m4 = select_top_k(s, 4);
  EXPECT_EQ(row_of(m4, 0, 4), (std::vector<int32_t>{0, 1, 3, 4}));  // tie 1 vs 2 -> 1
  // Without forced blocks: pure top-k of the row.
  const BlockMask p = select_top_k(s, 2, SelectOptions{false, false, 0});
  EXPECT_EQ(row_of(p, 0, 4), (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(row_of(p, 0, 3), (std::vector<int32_t>{0, 3}));
  EXPECT_EQ(row_of(p, 0, 0), (std::vector<int32_t>{0}));
  // Local window of 1 forces i - 1 too: row 4 = {0, 3, 4} at k = 2 (forced exceed the budget).
  const BlockMask w = select_top_k(s, 2, SelectOptions{true, true, 1});
  EXPECT_EQ(row_of(w, 0, 4), (std::vector<int32_t>{0, 3, 4}));
  EXPECT_EQ(row_of(w, 0, 2), (std::vector<int32_t>{0, 1, 2}));
}

TEST(Select, PerRowBudgetsAndNaN) {
  std::vector<float> sc = kScores;
  sc[4 * 5 + 3] = std::numeric_limits<float>::quiet_NaN();  // NaN ranks lowest
  const BlockScores s = test::make_block_scores(1, 9, 2, sc);
  const BlockMask m = select_blocks(s, budgets_of(1, 5, {1, 1, 1, 1, 3}));
  EXPECT_EQ(row_of(m, 0, 1), (std::vector<int32_t>{0, 1}));  // forced beat a budget of 1
  EXPECT_EQ(row_of(m, 0, 4), (std::vector<int32_t>{0, 1, 4}));
  EXPECT_EQ(select_blocks(s, budgets_of(1, 5, {9, 9, 9, 9, 9})), BlockMask::causal(1, 9, 2));
}

TEST(Select, Deterministic) {
  const Tensor3 q = test::random_tensor(4, 300, 64, 2.0f);
  const Tensor3 k = test::random_tensor(4, 300, 64);
  EstimatorConfig c;
  c.block = 64;
  const BlockScores s = make_estimator("pooled")->estimate(q, k, c);
  EXPECT_EQ(select_top_k(s, 2), select_top_k(s, 2));
  BlockScores flat = s;
  std::fill(flat.score.begin(), flat.score.end(), 0.5f);  // all ties: lowest j after forced
  const BlockMask m = select_top_k(flat, 3);
  EXPECT_EQ(row_of(m, 2, 4), (std::vector<int32_t>{0, 1, 4}));
}

// Nb = 4, sink + diagonal forced: rows keep max(forced, min(k, i+1)) = k=1,2: 1+2+2+2 = 7,
// k=3: 9, k=4: 10 of 10 causal blocks.
TEST(SelectDensity, RowUniform) {
  std::vector<float> sc(16, 0.0f);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j <= i; ++j) sc[i * 4 + j] = static_cast<float>(j + 1);
  const BlockScores s = test::make_block_scores(1, 8, 2, sc);
  EXPECT_NEAR(select_to_density(s, 0.5).density(), 0.7, 1e-12);   // lowest reachable
  EXPECT_NEAR(select_to_density(s, 0.85).density(), 0.9, 1e-12);  // k = 3
  EXPECT_NEAR(select_to_density(s, 0.8).density(), 0.7, 1e-12);   // tie 0.7 / 0.9 -> smaller k
  EXPECT_NEAR(select_to_density(s, 1.0).density(), 1.0, 1e-12);
}

// head_global: forced first, then every other causal block of the head by score (ties lower
// i, then j) up to round(density * 10).
TEST(SelectDensity, HeadGlobalAndNativeAdjust) {
  // Rows of Nb = 4 (forced: (0,0), (1,0), (1,1), (2,0), (2,2), (3,0), (3,3) = 7 blocks);
  // others: (2,1) = 0.9, (3,1) = 0.1, (3,2) = 0.5.
  std::vector<float> sc(16, 0.0f);
  sc[2 * 4 + 1] = 0.9f;
  sc[3 * 4 + 1] = 0.1f;
  sc[3 * 4 + 2] = 0.5f;
  BlockScores s = test::make_block_scores(1, 8, 2, sc);
  BlockMask m = select_to_density(s, 0.8, DensityRule::head_global);
  EXPECT_EQ(m.selected(), 8);
  EXPECT_TRUE(m.contains(0, 2, 1));
  m = select_to_density(s, 0.9, DensityRule::head_global);
  EXPECT_EQ(m.selected(), 9);
  EXPECT_TRUE(m.contains(0, 3, 2));
  EXPECT_FALSE(m.contains(0, 3, 1));
  EXPECT_EQ(select_to_density(s, 0.1, DensityRule::head_global).selected(), 7);  // forced only
  // native_adjust: native holds (3, 1) -> it is kept before higher-scored non-native blocks
  // (grow), and the native is cut by score when the target is below it.
  s.native = BlockMask::from_rows(1, 8, 2, {{0}, {0, 1}, {0, 2}, {0, 1, 3}});
  m = select_to_density(s, 0.8, DensityRule::native_adjust);
  EXPECT_EQ(m.selected(), 8);
  EXPECT_TRUE(m.contains(0, 3, 1));
  EXPECT_FALSE(m.contains(0, 2, 1));
  m = select_to_density(s, 0.9, DensityRule::native_adjust);
  EXPECT_TRUE(m.contains(0, 3, 1));
  EXPECT_TRUE(m.contains(0, 2, 1));
  EXPECT_EQ(select_to_density(s, 0.7, DensityRule::native_adjust).selected(), 7);
  EXPECT_EQ(parse_density_rule("native_adjust"), DensityRule::native_adjust);
  EXPECT_EQ(density_rule_name(DensityRule::head_global), "head_global");
}

TEST(SelectDensity, BudgetsScaledToDensity) {
  const Tensor3 q = test::random_tensor(6, 1031, 64, 2.0f);
  const Tensor3 k = test::random_tensor(2, 1031, 64);
  EstimatorConfig c;
  c.block = 64;
  const BlockScores s = make_estimator("proxy")->estimate(q, k, c);
  // Heads with different budgets: 2, 4, 6, ... keep their ratios.
  Budgets b = budgets_of(6, s.num_blocks, {});
  for (int h = 0; h < 6; ++h)
    for (int i = 0; i < s.num_blocks; ++i) b.per_row_k.push_back(2 * (h + 1));
  for (int h = 0; h < 6; ++h) b.per_head_k[h] = 2 * (h + 1);
  double prev = 0;
  for (double target : {0.2, 0.3, 0.5, 0.8}) {
    Budgets scaled;
    const BlockMask m = select_budgets_to_density(s, b, target, {}, &scaled);
    EXPECT_NEAR(m.density(), target, 0.05) << target;
    EXPECT_GE(m.density(), prev);
    prev = m.density();
    EXPECT_LE(scaled.row_k(0, 5), scaled.row_k(5, 5));  // ordering of heads kept
    EXPECT_EQ(m, select_blocks(s, scaled));
  }
}

// A selection from the precomputed order equals select_blocks on random scores with ties and
// NaN, random per-row budgets (0 included: forced blocks only) and each forcing option; so does
// the fixed-density selection.
TEST(Select, InOrderEqualsSelectBlocks) {
  const int heads = 3, nb = 37;
  BlockScores s;
  s.method = "hand";
  s.heads = heads;
  s.num_blocks = nb;
  s.block = 64;
  s.seq_len = int64_t(nb) * 64 - 17;
  std::uniform_int_distribution<int> level(0, 6), budget(0, nb + 2);
  for (int x = 0; x < heads * nb * nb; ++x)
    s.score.push_back(level(test::rng()) == 0 ? std::numeric_limits<float>::quiet_NaN() : 0.1f * level(test::rng()));
  Budgets b = budgets_of(heads, nb, {});
  for (int r = 0; r < heads * nb; ++r) b.per_row_k.push_back(budget(test::rng()));
  for (const SelectOptions& o : {SelectOptions{}, SelectOptions{false, true, 0}, SelectOptions{true, false, 2},
                                 SelectOptions{false, false, 0}}) {
    const std::vector<int32_t> order = selection_order(s, o);
    EXPECT_EQ(select_blocks_in_order(s, order, b, o), select_blocks(s, b, o));
    for (double d : {0.1, 0.4, 0.9}) {
      EXPECT_EQ(select_budgets_to_density(s, order, b, d, o), select_budgets_to_density(s, b, d, o)) << d;
      EXPECT_EQ(select_to_density(s, order, d, DensityRule::row_uniform, o),
                select_to_density(s, d, DensityRule::row_uniform, o)) << d;
    }
  }
  EXPECT_THROW(select_blocks_in_order(s, std::vector<int32_t>(5), b), Error);
}

// is_prefix_of_order: the selections from an order are its prefixes (each forcing option);
// a mask with one block swapped for a later-ranked one, or an order of another shape, is not.
TEST(Select, PrefixOfOrder) {
  const int heads = 2, nb = 23;
  BlockScores s;
  s.method = "hand";
  s.heads = heads;
  s.num_blocks = nb;
  s.block = 64;
  s.seq_len = int64_t(nb) * 64 - 5;
  std::uniform_int_distribution<int> level(0, 9), budget(0, nb + 1);
  for (int x = 0; x < heads * nb * nb; ++x) s.score.push_back(0.1f * level(test::rng()));
  Budgets b = budgets_of(heads, nb, {});
  for (int r = 0; r < heads * nb; ++r) b.per_row_k.push_back(budget(test::rng()));
  for (const SelectOptions& o : {SelectOptions{}, SelectOptions{false, false, 0}}) {
    const std::vector<int32_t> order = selection_order(s, o);
    const BlockMask m = select_blocks_in_order(s, order, b, o);
    EXPECT_TRUE(is_prefix_of_order(m, order));
    EXPECT_TRUE(is_prefix_of_order(select_to_density(s, 0.3, DensityRule::head_global, o), order));
    // Row (1, 15) with its last-taken block replaced by the next one in the order.
    std::vector<std::vector<int32_t>> rows;
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < nb; ++i) rows.emplace_back(m.row(h, i).begin(), m.row(h, i).end());
    const int h = 1, i = 15;
    const size_t at = size_t(h) * nb + i, off = size_t(h) * nb * (nb + 1) / 2 + size_t(i) * (i + 1) / 2;
    std::vector<int32_t> r(order.begin() + long(off), order.begin() + long(off) + 4);  // 4 of 16 blocks
    std::sort(r.begin(), r.end());
    rows[at] = r;
    EXPECT_TRUE(is_prefix_of_order(BlockMask::from_rows(heads, s.seq_len, 64, rows), order));
    r.assign(order.begin() + long(off), order.begin() + long(off) + 3);
    r.push_back(order[off + 4]);
    std::sort(r.begin(), r.end());
    rows[at] = r;
    EXPECT_FALSE(is_prefix_of_order(BlockMask::from_rows(heads, s.seq_len, 64, rows), order));
    EXPECT_FALSE(is_prefix_of_order(m, std::vector<int32_t>(order.begin(), order.end() - 1)));
  }
}

// The native_adjust selections (cut or grown by score) of a native mask, and the native
// itself, are prefixes of native_first_order.
TEST(Select, NativeAdjustIsPrefixOfNativeFirstOrder) {
  const int heads = 3, nb = 29;
  BlockScores s;
  s.method = "hand";
  s.heads = heads;
  s.num_blocks = nb;
  s.block = 64;
  s.seq_len = int64_t(nb) * 64 - 9;
  std::uniform_int_distribution<int> level(0, 12);
  std::bernoulli_distribution keep(0.3);
  for (int x = 0; x < heads * nb * nb; ++x) s.score.push_back(0.05f * level(test::rng()));
  std::vector<std::vector<int32_t>> rows;
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i) {
      std::vector<int32_t> r;
      for (int j = 0; j <= i; ++j)
        if (j == 0 || j == i || keep(test::rng())) r.push_back(j);
      rows.push_back(r);
    }
  s.native = BlockMask::from_rows(heads, s.seq_len, 64, rows);
  const std::vector<int32_t> order = native_first_order(*s.native, selection_order(s));
  EXPECT_TRUE(is_prefix_of_order(*s.native, order));
  for (const BlockMask& m : select_to_densities(s, {0.05, 0.2, 0.5, 0.9}, DensityRule::native_adjust))
    EXPECT_TRUE(is_prefix_of_order(m, order)) << m.density();
  EXPECT_THROW(native_first_order(*s.native, std::vector<int32_t>(7)), Error);
}

TEST(Select, BadInput) {
  const BlockScores s = test::make_block_scores(1, 9, 2, kScores);
  EXPECT_THROW(select_top_k(s, 0), Error);
  EXPECT_THROW(select_to_density(s, 0.0), Error);
  EXPECT_THROW(select_to_density(s, 1.5), Error);
  EXPECT_THROW(select_to_density(s, std::nan("")), Error);
  EXPECT_THROW(select_blocks(s, budgets_of(2, 5, std::vector<int32_t>(10, 1))), Error);
  EXPECT_THROW(select_top_k(s, 1, SelectOptions{true, true, -1}), Error);
  BlockScores bad = s;
  bad.score.pop_back();
  EXPECT_THROW(select_top_k(bad, 1), Error);
  EXPECT_THROW(parse_density_rule("global"), Error);
}

}  // namespace
}  // namespace proxyattn
