// Budgets: hand-computed cases, float64 references, properties (oracle recall at its own
// budget, monotonicity), bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "estimator_test_util.hpp"
#include "proxyattn/budget.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/method.hpp"
#include "proxyattn/select.hpp"
#include "test_util.hpp"

namespace proxyattn {
namespace {

using test::check_close;
using test::random_tensor;
using test::tensor_1d;

// d = 1, B = 2, N = 6, q = 1, k = [0, ln 3, 0, 0, 0, 0]. The last block holds rows 4 and 5:
//   row 4: [1, 3, 1, 1, 1] / 7, row 5: [1, 3, 1, 1, 1, 1] / 8
//   p = [(4/7 + 4/8)/2, (2/7 + 2/8)/2, (1/7 + 2/8)/2] = [0.5357, 0.2679, 0.1964]
//   tokens t = [(1/7+1/8)/2, (3/7+3/8)/2, (1/7+1/8)/2 x 3, (1/8)/2]
struct Tiny {
  Tensor3 q = tensor_1d(1, 6, {1, 1, 1, 1, 1, 1});
  Tensor3 k = tensor_1d(1, 6, {0, std::log(3.0f), 0, 0, 0, 0});
  BlockScores scores = test::make_block_scores(1, 6, 2, std::vector<float>(9, 1.0f));
};

TEST(BudgetDynamic, HandComputed) {
  Tiny t;
  const std::vector<double> p = last_block_mass_cpu(t.q, t.k, 2);
  const std::vector<double> p_ref{(4.0 / 7 + 4.0 / 8) / 2, (2.0 / 7 + 2.0 / 8) / 2, (1.0 / 7 + 2.0 / 8) / 2};
  check_close("last block mass", p, p_ref, 1e-7, 1e-6);
  const auto dyn = make_budget("dynamic");
  BudgetConfig c;
  c.k_min = 1;
  const std::pair<double, int> cases[] = {{0.5, 1}, {0.8, 2}, {0.81, 3}, {1.0, 3}};
  for (auto [gamma, expect] : cases) {
    c.gamma = gamma;
    const Budgets b = dyn->compute(t.q, t.k, t.scores, c);
    EXPECT_EQ(b.per_head_k[0], expect) << "gamma " << gamma;
    for (int i = 0; i < 3; ++i) EXPECT_EQ(b.row_k(0, i), expect);
  }
  // k_min clamps; the kept mass of the last block is reported.
  c.gamma = 0.5;
  c.k_min = 2;
  Budgets b = dyn->compute(t.q, t.k, t.scores, c);
  EXPECT_EQ(b.per_head_k[0], 2);
  EXPECT_NEAR(b.last_block_mass[0], p_ref[0] + p_ref[1], 1e-6);
  // Proportional: ceil(2 (i + 1) / 3) = 1, 2, 2.
  c.mode = BudgetMode::proportional;
  b = dyn->compute(t.q, t.k, t.scores, c);
  EXPECT_EQ(b.row_k(0, 0), 1);
  EXPECT_EQ(b.row_k(0, 1), 2);
  EXPECT_EQ(b.row_k(0, 2), 2);
  EXPECT_NEAR(b.mean_row_k(0), 5.0 / 3, 1e-12);
}

TEST(BudgetToken, HandComputed) {
  Tiny t;
  const std::vector<double> tok = last_block_token_probs_cpu(t.q, t.k, 2);
  const double a = (1.0 / 7 + 1.0 / 8) / 2;
  check_close("last block tokens", tok, std::vector<double>{a, (3.0 / 7 + 3.0 / 8) / 2, a, a, a, 1.0 / 16}, 1e-7,
              1e-6);
  const auto tb = make_budget("token");
  BudgetConfig c;
  c.k_min = 1;
  // gamma 0.5: 2 tokens -> 1 block; 0.6: 3 tokens (0.6696) -> 2 blocks; 0.95: 6 tokens -> 3.
  const std::pair<double, int> cases[] = {{0.5, 1}, {0.6, 2}, {0.95, 3}};
  for (auto [gamma, expect] : cases) {
    c.gamma = gamma;
    EXPECT_EQ(tb->compute(t.q, t.k, t.scores, c).per_head_k[0], expect) << "gamma " << gamma;
  }
}

TEST(BudgetUniform, HandComputed) {
  Tiny t;
  BudgetConfig c;
  c.uniform_k = 2;
  const Budgets b = make_budget("uniform")->compute(t.q, t.k, t.scores, c);
  EXPECT_EQ(b.per_row_k, (std::vector<int32_t>{2, 2, 2}));
  EXPECT_EQ(b.per_head_k[0], 2);
  EXPECT_NEAR(b.mean_row_k(0), (1 + 2 + 2) / 3.0, 1e-12);
  c.mode = BudgetMode::proportional;
  c.uniform_k = 3;
  EXPECT_EQ(make_budget("uniform")->compute(t.q, t.k, t.scores, c).per_row_k, (std::vector<int32_t>{1, 2, 3}));
}

// Rows (unnormalised): [1], [2, 6], [1, 6, 3] -> normalised [1], [.25, .75], [.1, .6, .3].
// Per row, sink + diagonal first: row 2 holds 0.4 with them; gamma 0.5 adds block 1.
// Global (gamma * Nb): forced cells hold 1 + 1 + 0.4 = 2.4; gamma 0.9 (2.7) adds (2, 1).
TEST(BudgetCumulative, HandComputed) {
  Tiny t;
  const BlockScores s = test::make_block_scores(1, 6, 2, {1, 0, 0, 2, 6, 0, 1, 6, 3});
  const auto cb = make_budget("cumulative");
  BudgetConfig c;
  c.gamma = 0.5;
  EXPECT_EQ(cb->compute(t.q, t.k, s, c).per_row_k, (std::vector<int32_t>{1, 2, 3}));
  c.gamma = 0.35;
  EXPECT_EQ(cb->compute(t.q, t.k, s, c).per_row_k, (std::vector<int32_t>{1, 2, 2}));
  c.global = true;
  c.gamma = 0.9;
  Budgets b = cb->compute(t.q, t.k, s, c);
  EXPECT_EQ(b.per_row_k, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_NEAR(b.per_head_k[0], 2.0, 1e-12);
  c.gamma = 0.7;
  EXPECT_EQ(cb->compute(t.q, t.k, s, c).per_row_k, (std::vector<int32_t>{1, 2, 2}));
  // Selection with these budgets keeps exactly the covering blocks.
  c.global = false;
  c.gamma = 0.5;
  const BlockMask m = select_blocks(s, cb->compute(t.q, t.k, s, c));
  EXPECT_EQ(m.selected(), 1 + 2 + 3);
}

TEST(BudgetOracle, HandComputed) {
  Tiny t;
  BlockMass mass{1, 3, 2, 6, {1, 0, 0, .3f, .7f, 0, .5f, .2f, .3f}};
  const auto ob = make_budget("oracle");
  BudgetConfig c;
  c.gamma = 0.6;
  Budgets b = ob->compute(t.q, t.k, t.scores, c, &mass);
  EXPECT_EQ(b.per_row_k, (std::vector<int32_t>{1, 1, 2}));
  EXPECT_NEAR(b.per_head_k[0], 4.0 / 3, 1e-12);
  c.gamma = 1.0;
  EXPECT_EQ(ob->compute(t.q, t.k, t.scores, c, &mass).per_row_k, (std::vector<int32_t>{1, 2, 3}));
  // Without a precomputed mass it computes the exact one: here [1], [.8,.2]-like rows of Tiny.
  c.gamma = 0.5;
  const Budgets own = ob->compute(t.q, t.k, t.scores, c);
  EXPECT_EQ(own.per_row_k[0], 1);
}

TEST(BudgetHelpers, CountToCoverage) {
  const double v[] = {0.1, 0.4, 0.2, 0.3};
  EXPECT_EQ(count_to_coverage(v, 4, 0.4), 1);
  EXPECT_EQ(count_to_coverage(v, 4, 0.41), 2);
  EXPECT_EQ(count_to_coverage(v, 4, 1.0), 4);
  const double z[] = {0, 0};
  EXPECT_EQ(count_to_coverage(z, 2, 0.5), 0);
  const float w[] = {0, 2, 0, 0};
  EXPECT_EQ(count_to_coverage(w, 4, 1.0), 1);  // zeros never needed
  EXPECT_EQ(row_budget(5, 0, 8, BudgetMode::proportional), 1);
  EXPECT_EQ(row_budget(5, 7, 8, BudgetMode::proportional), 5);
  EXPECT_EQ(row_budget(5, 3, 8, BudgetMode::proportional), 3);  // ceil(20 / 8)
  EXPECT_EQ(row_budget(5, 3, 8, BudgetMode::constant), 5);
}

// Precomputed last-block token probabilities give the same budgets; a wrong size is an Error.
TEST(BudgetDynamic, ReusesLastBlockProbs) {
  const Tensor3 q = random_tensor(6, 301, 64, 2.0f);
  const Tensor3 k = random_tensor(2, 301, 64);
  const BlockScores s = test::make_block_scores(6, 301, 64, std::vector<float>(6 * 5 * 5, 1.0f));
  const std::vector<double> tok = last_block_token_probs_cpu(q, k, 64);
  const std::vector<float> tokf(tok.begin(), tok.end());
  for (const char* name : {"dynamic", "token"})
    for (double gamma : {0.5, 0.9}) {
      BudgetConfig c;
      c.gamma = gamma;
      c.k_min = 1;
      const Budgets a = make_budget(name)->compute(q, k, s, c);
      const Budgets b = make_budget(name)->compute(q, k, s, c, nullptr, &tokf);
      EXPECT_EQ(a.per_row_k, b.per_row_k) << name << " " << gamma;
    }
  const std::vector<float> short_probs(10, 0.1f);
  EXPECT_THROW(make_budget("dynamic")->compute(q, k, s, {}, nullptr, &short_probs), Error);
}

// Last-block mass vs float64 on random odd sizes, GQA 3 and 4.
TEST(BudgetDynamic, LastBlockMassMatchesFloat64) {
  struct S {
    int hq, hkv, d;
    int64_t n;
    int block;
  };
  for (const S sh : {S{6, 2, 64, 301, 64}, S{8, 2, 128, 389, 128}, S{3, 3, 64, 129, 128}}) {
    const Tensor3 q = random_tensor(sh.hq, sh.n, sh.d, 2.0f);
    const Tensor3 k = random_tensor(sh.hkv, sh.n, sh.d);
    const test::T64 q64 = test::to64(q), k64 = test::to64(k);
    const int nb = num_blocks_for(sh.n, sh.block);
    const int64_t r0 = static_cast<int64_t>(nb - 1) * sh.block, L = sh.n - r0;
    std::vector<double> ref(static_cast<size_t>(sh.hq) * nb, 0.0);
    for (int h = 0; h < sh.hq; ++h)
      for (int64_t t = r0; t < sh.n; ++t) {
        const auto p = test::row_probs64(q64, k64, h, h / (sh.hq / sh.hkv), t);
        for (int64_t c = 0; c <= t; ++c) ref[static_cast<size_t>(h) * nb + c / sh.block] += p[c] / L;
      }
    check_close("last block mass n" + std::to_string(sh.n), last_block_mass_cpu(q, k, sh.block), ref, 1e-7, 1e-5);
  }
}

// ------------------------------------------------------------------ properties

// The oracle selection at its own budget: every row keeps >= gamma of its mass, with the
// fewest blocks (dropping the last-ranked kept block falls below gamma), and equals the
// oracle's top-k at that budget (block recall 1).
TEST(BudgetOracle, RecallAtOwnBudgetIsOne) {
  const Tensor3 q = random_tensor(6, 457, 64, 3.0f);
  const Tensor3 k = random_tensor(2, 457, 64);
  const int B = 64;
  const auto mass = test::block_mass64(q, k, B);
  const BlockScores s = make_estimator("oracle")->estimate(q, k, [] {
    EstimatorConfig c;
    c.block = 64;
    return c;
  }());
  const int nb = s.num_blocks;
  for (double gamma : {0.5, 0.9, 0.95, 1.0}) {
    BudgetConfig c;
    c.gamma = gamma;
    const Budgets b = make_budget("oracle")->compute(q, k, s, c);
    const BlockMask m = select_blocks(s, b, SelectOptions{false, false, 0});
    for (int h = 0; h < 6; ++h)
      for (int i = 0; i < nb; ++i) {
        const double* row = &mass[(static_cast<size_t>(h) * nb + i) * nb];
        const auto order = test::ranks_desc(row, i + 1);
        const auto sel = m.row(h, i);
        ASSERT_EQ(static_cast<int>(sel.size()), b.row_k(h, i));
        double kept = 0;
        int hits = 0;
        for (int32_t j : sel) kept += row[j];
        for (int r = 0; r < b.row_k(h, i); ++r) hits += m.contains(h, i, order[r]);
        EXPECT_EQ(hits, b.row_k(h, i)) << "block recall vs oracle top-k, head " << h << " row " << i;
        EXPECT_GE(kept, gamma - 1e-5) << "head " << h << " row " << i;
        if (sel.size() > 1) EXPECT_LT(kept - row[order[sel.size() - 1]], gamma + 1e-5);
      }
  }
}

// Mass recall is monotone in the budget: fixed k = 1..Nb for every estimator, and the dynamic
// budget over increasing gamma (selections are nested).
TEST(Budgets, RecallMonotoneInBudget) {
  const Tensor3 q = random_tensor(6, 401, 64, 3.0f);
  const Tensor3 k = random_tensor(3, 401, 64);
  EstimatorConfig ec;
  ec.block = 64;
  ec.flexprefill.min_budget_tokens = 64;
  const auto mass = test::block_mass64(q, k, 64);
  for (const std::string& name : estimator_names()) {
    const BlockScores s = make_estimator(name)->estimate(q, k, ec);
    double prev = -1;
    for (int kk = 1; kk <= s.num_blocks; ++kk) {
      const double r = test::mass_recall(select_top_k(s, kk), mass);
      EXPECT_GE(r, prev - 1e-12) << name << " k " << kk;
      prev = r;
    }
    EXPECT_NEAR(prev, 1.0, 1e-9) << name << ": all causal blocks keep all the mass";
  }
  const BlockScores s = make_estimator("proxy")->estimate(q, k, ec);
  double prev = -1, prev_k = 0;
  for (double gamma : {0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0}) {
    BudgetConfig c;
    c.gamma = gamma;
    const Budgets b = make_budget("dynamic")->compute(q, k, s, c);
    double ksum = 0;
    for (double x : b.per_head_k) ksum += x;
    EXPECT_GE(ksum, prev_k);
    prev_k = ksum;
    const double r = test::mass_recall(select_blocks(s, b), mass);
    EXPECT_GE(r, prev - 1e-12) << "gamma " << gamma;
    prev = r;
  }
}

// The cumulative budget on normalised scores keeps >= gamma of every row's score mass.
TEST(BudgetCumulative, SelectionReachesGamma) {
  const Tensor3 q = random_tensor(4, 300, 64, 3.0f);
  const Tensor3 k = random_tensor(4, 300, 64);
  EstimatorConfig ec;
  ec.block = 64;
  const BlockScores s = make_estimator("pooled")->estimate(q, k, ec);
  BudgetConfig c;
  c.gamma = 0.8;
  const BlockMask m = select_blocks(s, make_budget("cumulative")->compute(q, k, s, c));
  for (int h = 0; h < 4; ++h)
    for (int i = 0; i < s.num_blocks; ++i) {
      double kept = 0;
      for (int32_t j : m.row(h, i)) kept += s.at(h, i, j);
      EXPECT_GE(kept, 0.8 - 1e-6);
    }
}

// ------------------------------------------------------------------ bad input

TEST(Budgets, BadInput) {
  Tiny t;
  EXPECT_THROW(make_budget("fixed"), Error);
  try {
    make_budget("x");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("dynamic, token, uniform, cumulative, oracle"), std::string::npos);
  }
  for (const std::string& name : budget_names())
    for (double gamma : {0.0, -0.5, 1.0001, std::nan("")}) {
      BudgetConfig c;
      c.gamma = gamma;
      try {
        make_budget(name)->compute(t.q, t.k, t.scores, c);
        ADD_FAILURE() << name << " accepted gamma " << gamma;
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("gamma"), std::string::npos) << e.what();
      }
    }
  BudgetConfig c;
  c.k_min = 0;
  EXPECT_THROW(make_budget("dynamic")->compute(t.q, t.k, t.scores, c), Error);
  c = {};
  c.uniform_k = 0;
  EXPECT_THROW(make_budget("uniform")->compute(t.q, t.k, t.scores, c), Error);
  // Scores of another layer shape.
  const BlockScores other = test::make_block_scores(2, 6, 2, std::vector<float>(18, 1.0f));
  EXPECT_THROW(make_budget("dynamic")->compute(t.q, t.k, other, {}), Error);
  EXPECT_THROW(parse_budget_mode("linear"), Error);
  EXPECT_EQ(parse_budget_mode("proportional"), BudgetMode::proportional);
}

// ------------------------------------------------------------------ run_method

TEST(RunMethod, EndToEnd) {
  const Tensor3 q = random_tensor(6, 333, 64, 2.0f);
  const Tensor3 k = random_tensor(2, 333, 64);
  MethodSpec spec;
  spec.config.block = 64;
  spec.config.proxy.groups = 2;
  const MethodResult r = run_method(q, k, spec);
  EXPECT_EQ(r.scores.method, "proxy");
  EXPECT_EQ(r.budgets.kind, "dynamic");
  EXPECT_EQ(r.mask, select_blocks(r.scores, r.budgets));
  EXPECT_GE(r.total_seconds(), 0.0);

  spec.estimator = "xattn";
  spec.budget = "native";
  const MethodResult x = run_method(q, k, spec);
  EXPECT_EQ(x.mask, *x.scores.native);
  for (int h = 0; h < 6; ++h)
    for (int i = 0; i < x.mask.num_blocks(); ++i)
      EXPECT_EQ(x.budgets.row_k(h, i), static_cast<int32_t>(x.mask.row(h, i).size()));

  // The oracle reuses a precomputed mass.
  const BlockMass mass = block_mass_cpu(q, k, 64);
  spec.estimator = "oracle";
  spec.budget = "oracle";
  spec.select = {false, false, 0};
  const MethodResult o = run_method(q, k, spec, &mass);
  EXPECT_EQ(o.scores.score, mass.mass);

  spec.estimator = "proxy";
  spec.budget = "native";
  EXPECT_THROW(run_method(q, k, spec), Error);  // proxy has no native selection
  spec.budget = "nope";
  EXPECT_THROW(run_method(q, k, spec), Error);
  spec.budget = "dynamic";
  spec.budget_config.gamma = 2;
  EXPECT_THROW(run_method(q, k, spec), Error);
  spec.budget_config.gamma = 0.9;
  spec.config.proxy.groups = 4;  // does not divide 6
  EXPECT_THROW(run_method(q, k, spec), Error);
}

}  // namespace
}  // namespace proxyattn
