// Estimators: hand-computed tiny cases, float64 references on random odd-size inputs, the
// properties of ALGORITHMS.md, and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <string>

#include "estimator_test_util.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/methods.hpp"
#include "proxyattn/select.hpp"
#include "test_util.hpp"

namespace proxyattn {
namespace {

using test::check_close;
using test::random_tensor;
using test::tensor_1d;

EstimatorConfig cfg_block(int block) {
  EstimatorConfig c;
  c.block = block;
  return c;
}

// ------------------------------------------------------------------ hand-computed

// d = 1 (scale 1), B = 2, N = 4, one head, q = 1, k = [0, 0, 0, ln 5]:
//   row 2: softmax [0, 0, 0]      = [1/3, 1/3, 1/3]
//   row 3: softmax [0, 0, 0, ln5] = [1, 1, 1, 5] / 8
//   A[0, 0] = 1 (row 0), A[1, 0] = max(1/3, 1/8) = 1/3, A[1, 1] = max(1/3, 5/8) = 5/8.
//   With query stride 2 only rows 0 and 2 count: A[1, 1] = 1/3.
TEST(EstimatorProxy, HandComputedSingleHead) {
  const Tensor3 q = tensor_1d(1, 4, {1, 1, 1, 1});
  const Tensor3 k = tensor_1d(1, 4, {0, 0, 0, std::log(5.0f)});
  EstimatorConfig c = cfg_block(2);
  const BlockScores s = make_estimator("proxy")->estimate(q, k, c);
  ASSERT_EQ(s.num_blocks, 2);
  EXPECT_NEAR(s.at(0, 0, 0), 1.0, 1e-6);
  EXPECT_NEAR(s.at(0, 1, 0), 1.0 / 3, 1e-6);
  EXPECT_NEAR(s.at(0, 1, 1), 5.0 / 8, 1e-6);
  EXPECT_EQ(s.at(0, 0, 1), 0.0f);  // above the diagonal
  EXPECT_FALSE(s.native.has_value());
  c.proxy.query_stride = 2;
  const BlockScores s2 = make_estimator("proxy")->estimate(q, k, c);
  EXPECT_NEAR(s2.at(0, 1, 0), 1.0 / 3, 1e-6);
  EXPECT_NEAR(s2.at(0, 1, 1), 1.0 / 3, 1e-6);
}

// Two query heads reading one KV head (GQA 2), q0 = 2, q1 = 0: the mean proxy query is 1,
// so both heads get the single-head scores above; max_norm picks head 0 (q = 2):
//   row 3: [1, 1, 1, 25] / 28 -> A[1, 1] = 25/28, A[1, 0] = max(1/3, 1/28) = 1/3.
TEST(EstimatorProxy, HandComputedPooling) {
  const Tensor3 q = tensor_1d(2, 4, {2, 2, 2, 2, 0, 0, 0, 0});
  const Tensor3 k = tensor_1d(1, 4, {0, 0, 0, std::log(5.0f)});
  EstimatorConfig c = cfg_block(2);
  const BlockScores s = make_estimator("proxy")->estimate(q, k, c);
  for (int h = 0; h < 2; ++h) {
    EXPECT_NEAR(s.at(h, 1, 1), 5.0 / 8, 1e-6) << h;
    EXPECT_NEAR(s.at(h, 1, 0), 1.0 / 3, 1e-6) << h;
  }
  EXPECT_EQ(s.group_of_head, (std::vector<int>{0, 0}));
  c.proxy.pool = ProxyPool::max_norm;
  const BlockScores m = make_estimator("proxy")->estimate(q, k, c);
  EXPECT_NEAR(m.at(1, 1, 1), 25.0 / 28, 1e-6);
  EXPECT_NEAR(m.at(1, 1, 0), 1.0 / 3, 1e-6);
  EXPECT_EQ(make_proxy_heads(q, k, c.proxy).picked_head, (std::vector<int>{0}));
  // Two groups: each head is its own proxy (head 1 has q = 0: uniform rows).
  c.proxy.pool = ProxyPool::mean;
  c.proxy.groups = 2;
  const BlockScores g2 = make_estimator("proxy")->estimate(q, k, c);
  EXPECT_NEAR(g2.at(0, 1, 1), 25.0 / 28, 1e-6);
  EXPECT_NEAR(g2.at(1, 1, 1), 1.0 / 3, 1e-6);  // row 2: 1/3 each, row 3: 1/4 each
  EXPECT_EQ(g2.group_of_head, (std::vector<int>{0, 1}));
}

// Mean of the distinct KV heads: two KV heads [0, 0, 0, 2 ln 5] and [0, 0, 0, 0] average to
// the single-head k above.
TEST(EstimatorProxy, HandComputedKvMean) {
  const Tensor3 q = tensor_1d(2, 4, {1, 1, 1, 1, 1, 1, 1, 1});
  const Tensor3 k = tensor_1d(2, 4, {0, 0, 0, 2 * std::log(5.0f), 0, 0, 0, 0});
  const BlockScores s = make_estimator("proxy")->estimate(q, k, cfg_block(2));
  EXPECT_NEAR(s.at(0, 1, 1), 5.0 / 8, 1e-6);
  EXPECT_NEAR(s.at(1, 1, 1), 5.0 / 8, 1e-6);
}

// Pooled: d = 1, B = 2, q = [1, 1, 2, 2] (Qbar = [1, 2]), k = [0, 0, a, a] with a = ln(3)/2
// (Kbar = [0, a]): row 1 = softmax([0, 2a]) = [1/4, 3/4]; row 0 = [1].
// A partial last block (N = 5, q[4] = 4, k[4] = 0): Qbar[2] = 4, Kbar[2] = 0:
//   row 2 = softmax([0, 4a, 0]) = [1, 9, 1] / 11.
TEST(EstimatorPooled, HandComputed) {
  const float a = std::log(3.0f) / 2;
  const Tensor3 q = tensor_1d(1, 5, {1, 1, 2, 2, 4});
  const Tensor3 k = tensor_1d(1, 5, {0, 0, a, a, 0});
  EstimatorConfig c = cfg_block(2);
  c.pooled.gamma = 0.7;
  const BlockScores s = make_estimator("pooled")->estimate(q, k, c);
  ASSERT_EQ(s.num_blocks, 3);
  EXPECT_NEAR(s.at(0, 0, 0), 1.0, 1e-6);
  EXPECT_NEAR(s.at(0, 1, 0), 0.25, 1e-6);
  EXPECT_NEAR(s.at(0, 1, 1), 0.75, 1e-6);
  EXPECT_NEAR(s.at(0, 2, 0), 1.0 / 11, 1e-6);
  EXPECT_NEAR(s.at(0, 2, 1), 9.0 / 11, 1e-6);
  EXPECT_NEAR(s.at(0, 2, 2), 1.0 / 11, 1e-6);
  // Native at gamma 0.7: row 1 covers with {1}, row 2 with {1}; plus sink and diagonal.
  ASSERT_TRUE(s.native.has_value());
  EXPECT_EQ(std::vector<int32_t>(s.native->row(0, 1).begin(), s.native->row(0, 1).end()), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(std::vector<int32_t>(s.native->row(0, 2).begin(), s.native->row(0, 2).end()),
            (std::vector<int32_t>{0, 1, 2}));
}

// XAttention, S = 2, B = 4, N = 8, d = 1: q = [0, 1, 0, 1, ...] so the antidiagonal of tile
// (a, b) is q[2a+1] k[2b] + q[2a] k[2b+1] = k[2b]; with k = [0, 0, 0, 0, 2 ln 3, 0, 0, 0]
// s[a, b] = k[2b] / 2 = [0, 0, ln 3, 0][b]. (A main-diagonal sum would give 0 everywhere.)
//   a = 0: [1]; a = 1: [1/2, 1/2]; a = 2: [1, 1, 3] / 5; a = 3: [1, 1, 3, 1] / 6.
//   W[0, 0] = 1; W[1, 0] = (2/5 + 2/6) / 2; W[1, 1] = (3/5 + 4/6) / 2.
TEST(EstimatorXAttn, HandComputed) {
  const Tensor3 q = tensor_1d(1, 8, {0, 1, 0, 1, 0, 1, 0, 1});
  const Tensor3 k = tensor_1d(1, 8, {0, 0, 0, 0, 2 * std::log(3.0f), 0, 0, 0});
  EstimatorConfig c = cfg_block(4);
  c.xattn.stride = 2;
  const BlockScores s = make_estimator("xattn")->estimate(q, k, c);
  ASSERT_EQ(s.num_blocks, 2);
  EXPECT_NEAR(s.at(0, 0, 0), 1.0, 1e-6);
  EXPECT_NEAR(s.at(0, 1, 0), (2.0 / 5 + 2.0 / 6) / 2, 1e-6);
  EXPECT_NEAR(s.at(0, 1, 1), (3.0 / 5 + 4.0 / 6) / 2, 1e-6);
  ASSERT_TRUE(s.native.has_value());
  EXPECT_EQ(s.native->selected(), 3);  // sink + diagonal = every causal block here
}

// XAttention native threshold on a 3-block row: forced blocks 0 and 2 count first, then the
// largest other block while the kept mass is < tau.
TEST(EstimatorXAttn, NativeThresholdRule) {
  const Tensor3 q = random_tensor(2, 301, 64, 2.0f);
  const Tensor3 k = random_tensor(1, 301, 64);
  EstimatorConfig c = cfg_block(64);
  c.xattn.stride = 8;
  c.xattn.tau = 0.8;
  const BlockScores s = make_estimator("xattn")->estimate(q, k, c);
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < s.num_blocks; ++i) {
      std::vector<double> w(i + 1), rest(i + 1);
      double total = 0;
      for (int j = 0; j <= i; ++j) total += (w[j] = s.at(h, i, j));
      std::set<int32_t> expect{0, i};
      double acc = w[0] + (i > 0 ? w[i] : 0);
      for (int j = 0; j <= i; ++j) rest[j] = (j == 0 || j == i) ? -1 : w[j];
      for (int32_t j : test::ranks_desc(rest.data(), i + 1)) {
        if (j == 0 || j == i || acc >= c.xattn.tau * total) break;
        expect.insert(j);
        acc += w[j];
      }
      const auto r = s.native->row(h, i);
      EXPECT_EQ(std::set<int32_t>(r.begin(), r.end()), expect) << "head " << h << " row " << i;
    }
}

// Vertical-slash, d = 1, B = 2, N = 8, last_q = 2, q = 1, k[2] = ln 1000, else 0:
//   row 6: [1, 1, 1000, 1, 1, 1, 1] / 1006, row 7: [1, 1, 1000, 1, 1, 1, 1, 1] / 1007.
// sink_columns 1, vertical 2 -> columns {0, 2}; local_diagonals 1, slash 2 -> offsets {0, 4}
// (slash[4] = (1000/1006 + 1/1007)/2 > slash[5] = (1/1006 + 1000/1007)/2). Column 0 -> (i, 0); column 2 -> (i, 1)
// for i >= 1; offset 0 -> diagonals; offset 4 crosses (2, 0) and (3, 1) (offset spans [3, 5]).
TEST(EstimatorVSlash, HandComputed) {
  const Tensor3 q = tensor_1d(1, 8, {1, 1, 1, 1, 1, 1, 1, 1});
  const Tensor3 k = tensor_1d(1, 8, {0, 0, std::log(1000.0f), 0, 0, 0, 0, 0});
  EstimatorConfig c = cfg_block(2);
  c.vslash.last_q = 2;
  c.vslash.sink_columns = 1;
  c.vslash.vertical = 2;
  c.vslash.local_diagonals = 1;
  c.vslash.slash = 2;
  const BlockScores s = make_estimator("vslash")->estimate(q, k, c);
  ASSERT_TRUE(s.native.has_value());
  const std::vector<std::vector<int32_t>> expect{{0}, {0, 1}, {0, 1, 2}, {0, 1, 3}};
  for (int i = 0; i < 4; ++i) {
    const auto r = s.native->row(0, i);
    EXPECT_EQ(std::vector<int32_t>(r.begin(), r.end()), expect[i]) << "row " << i;
  }
  const double p6 = 1000.0 / 1006, p7 = 1000.0 / 1007;
  const double v0 = (1.0 / 1006 + 1.0 / 1007) / 2, v2 = (p6 + p7) / 2;
  // Offset 0: the diagonal cells (6, 6), (7, 7); offset 4: cells (6, 2) and (7, 3).
  const double s0 = (1.0 / 1006 + 1.0 / 1007) / 2, s4 = (p6 + 1.0 / 1007) / 2;
  EXPECT_NEAR(s.at(0, 3, 1), v2 + s4, 1e-6);  // column 2 + offset 4
  EXPECT_NEAR(s.at(0, 2, 0), v0 + s4, 1e-6);  // column 0 + offset 4
  EXPECT_NEAR(s.at(0, 3, 3), s0, 1e-6);       // offset 0 only
  EXPECT_NEAR(s.at(0, 3, 2), 0.0, 1e-9);      // nothing kept crosses
}

// FlexPrefill on the same input with B = 2, last_q = 2, min_budget 4 tokens (2 blocks):
// vertical covers 0.9 with 1 token -> 1/2 + 1 = 1 block, clamped to 2: column blocks {0 (forced),
// 1}; slash covers with 2 offsets (4, 5) -> 2 blocks: offset blocks {0 (forced), 2} -> (2, 0),
// (3, 1). tau = 0 forces vertical-slash; tau = 1 (> sqrt(ln 2)) forces query-aware, whose
// pooled cover adds nothing new here.
TEST(EstimatorFlexPrefill, HandComputed) {
  const Tensor3 q = tensor_1d(1, 8, {1, 1, 1, 1, 1, 1, 1, 1});
  const Tensor3 k = tensor_1d(1, 8, {0, 0, std::log(1000.0f), 0, 0, 0, 0, 0});
  EstimatorConfig c = cfg_block(2);
  c.flexprefill.last_q = 2;
  c.flexprefill.min_budget_tokens = 4;
  c.flexprefill.gamma = 0.9;
  const std::vector<std::vector<int32_t>> expect{{0}, {0, 1}, {0, 1, 2}, {0, 1, 3}};
  for (double tau : {0.0, 1.0}) {
    c.flexprefill.tau = tau;
    const BlockScores s = make_estimator("flexprefill")->estimate(q, k, c);
    ASSERT_TRUE(s.native.has_value());
    EXPECT_EQ(s.query_aware[0], tau > 0 ? 1 : 0);
    for (int i = 0; i < 4; ++i) {
      const auto r = s.native->row(0, i);
      EXPECT_EQ(std::vector<int32_t>(r.begin(), r.end()), expect[i]) << "tau " << tau << " row " << i;
    }
    // The decision statistic: sqrt(JSD(softmax(mean q_last . Kbar), block-pooled vertical)).
    const double L = 1000.0, den6 = 1006, den7 = 1007;
    const double vb[4] = {(2 / den6 + 2 / den7) / 2, (L / den6 + 1 / den6 + L / den7 + 1 / den7) / 2,
                          (2 / den6 + 2 / den7) / 2, (1 / den6 + 2 / den7) / 2};
    const double e1 = std::sqrt(L);  // Kbar[1] = ln(1000) / 2
    const double z = 3 + e1, est[4] = {1 / z, e1 / z, 1 / z, 1 / z};
    double js = 0;
    for (int j = 0; j < 4; ++j) {
      const double m = 0.5 * (est[j] + vb[j]);
      js += 0.5 * est[j] * std::log(est[j] / m) + 0.5 * vb[j] * std::log(vb[j] / m);
    }
    EXPECT_NEAR(s.jsd[0], std::sqrt(js), 1e-5);
    // Vertical-slash scores vb[j] + sb[i - j] / query-aware scores = pooled.
    if (tau == 0) EXPECT_NEAR(s.at(0, 3, 3), vb[3] + (1 / den6 + 1 / den7) / 2 + (1 / den6 + 1 / den7) / 2, 1e-5);
  }
}

// ------------------------------------------------------------------ float64 references

struct Shape {
  int hq, hkv, d;
  int64_t n;
  int block;
};

// GQA 1 / 3 / 4, head dims 64 / 128, blocks 64 / 128, N not a multiple of the block.
const Shape kShapes[] = {
    {4, 4, 64, 331, 64},
    {6, 2, 128, 293, 128},
    {12, 3, 64, 263, 128},
    {8, 2, 64, 197, 64},
};

TEST(EstimatorProxy, MatchesFloat64Reference) {
  for (const Shape& sh : kShapes) {
    const Tensor3 q = random_tensor(sh.hq, sh.n, sh.d, 2.0f);
    const Tensor3 k = random_tensor(sh.hkv, sh.n, sh.d);
    for (int g : {1, sh.hq / 2, sh.hq}) {
      if (sh.hq % g != 0) continue;
      for (int stride : {1, 3}) {
        EstimatorConfig c = cfg_block(sh.block);
        c.proxy.groups = g;
        c.proxy.query_stride = stride;
        const BlockScores s = make_estimator("proxy")->estimate(q, k, c);
        const auto ref = test::proxy64(q, k, g, sh.block, stride);
        check_close("proxy hq" + std::to_string(sh.hq) + " hkv" + std::to_string(sh.hkv) + " g" +
                        std::to_string(g) + " s" + std::to_string(stride),
                    s.score, ref, 1e-6, 1e-4);
      }
    }
  }
}

TEST(EstimatorPooled, MatchesFloat64Reference) {
  for (const Shape& sh : kShapes) {
    const Tensor3 q = random_tensor(sh.hq, sh.n, sh.d, 4.0f);
    const Tensor3 k = random_tensor(sh.hkv, sh.n, sh.d);
    const BlockScores s = make_estimator("pooled")->estimate(q, k, cfg_block(sh.block));
    check_close("pooled hq" + std::to_string(sh.hq), s.score, test::pooled64(q, k, sh.block), 1e-6, 1e-4);
  }
}

TEST(EstimatorOracle, MatchesFloat64Reference) {
  const Shape sh = kShapes[2];
  const Tensor3 q = random_tensor(sh.hq, sh.n, sh.d, 2.0f);
  const Tensor3 k = random_tensor(sh.hkv, sh.n, sh.d);
  const BlockScores s = make_estimator("oracle")->estimate(q, k, cfg_block(sh.block));
  check_close("oracle", s.score, test::block_mass64(q, k, sh.block), 1e-6, 1e-4);
}

// XAttention's strided score equals the brute-force antidiagonal sums (through the whole
// softmax + block-sum pipeline), strides 8 and 16, N not a multiple of the stride.
TEST(EstimatorXAttn, MatchesBruteForceAntidiagonals) {
  for (const Shape& sh : {kShapes[0], kShapes[2]})
    for (int S : {8, 16}) {
      const Tensor3 q = random_tensor(sh.hq, sh.n, sh.d, 2.0f);
      const Tensor3 k = random_tensor(sh.hkv, sh.n, sh.d);
      EstimatorConfig c = cfg_block(sh.block);
      c.xattn.stride = S;
      const BlockScores s = make_estimator("xattn")->estimate(q, k, c);
      check_close("xattn S" + std::to_string(S), s.score, test::xattn64(q, k, sh.block, S), 1e-6, 1e-4);
    }
}

// Vertical-slash on random data: scores and the block mapping against a brute-force crossing
// test (every (q, k) pair of each block enumerated).
TEST(EstimatorVSlash, MatchesBruteForceMapping) {
  const Shape sh{6, 2, 64, 301, 64};
  const Tensor3 q = random_tensor(sh.hq, sh.n, sh.d, 2.0f);
  const Tensor3 k = random_tensor(sh.hkv, sh.n, sh.d);
  EstimatorConfig c = cfg_block(sh.block);
  c.vslash = {17, 40, 60, 5, 7};  // last_q, vertical, slash, sinks, local diagonals
  const BlockScores s = make_estimator("vslash")->estimate(q, k, c);
  const int nb = s.num_blocks;
  const int64_t N = sh.n;
  std::vector<double> ref(s.score.size(), 0.0);
  std::vector<uint8_t> sel(s.score.size(), 0);
  for (int h = 0; h < sh.hq; ++h) {
    const test::VS64 vs = test::vertical_slash64(q, k, h, 17);
    std::vector<double> vr = vs.vertical, sr = vs.slash;
    for (int t = 0; t < 5; ++t) vr[t] = 1e9;
    for (int t = 0; t < 7; ++t) sr[t] = 1e9;
    const auto vo = test::ranks_desc(vr.data(), static_cast<int>(N));
    const auto so = test::ranks_desc(sr.data(), static_cast<int>(N));
    std::set<int64_t> cols(vo.begin(), vo.begin() + 40), offs(so.begin(), so.begin() + 60);
    for (int i = 0; i < nb; ++i)
      for (int j = 0; j <= i; ++j) {
        const size_t at = (static_cast<size_t>(h) * nb + i) * nb + j;
        std::set<int64_t> crossing;
        for (int64_t qp = i * 64; qp < std::min<int64_t>(N, (i + 1) * 64); ++qp)
          for (int64_t kp = j * 64; kp < (j + 1) * 64 && kp <= qp; ++kp)
            if (offs.count(qp - kp)) crossing.insert(qp - kp);
        double score = 0;
        bool any_col = false;
        for (int64_t kp = j * 64; kp < std::min<int64_t>(N, (j + 1) * 64); ++kp)
          if (cols.count(kp)) score += vs.vertical[kp], any_col = true;
        for (int64_t o : crossing) score += vs.slash[o];
        ref[at] = score;
        sel[at] = any_col || !crossing.empty() || j == 0 || j == i;
      }
  }
  check_close("vslash scores", s.score, ref, 1e-6, 1e-4);
  EXPECT_EQ(s.native->bitmap(), sel);
}

// FlexPrefill on random data: invariants of the native mask and the pattern statistic.
TEST(EstimatorFlexPrefill, RandomInvariants) {
  const Shape sh{6, 2, 64, 389, 64};
  const Tensor3 q = random_tensor(sh.hq, sh.n, sh.d, 2.0f);
  const Tensor3 k = random_tensor(sh.hkv, sh.n, sh.d);
  EstimatorConfig c = cfg_block(sh.block);
  c.flexprefill.min_budget_tokens = 64;
  for (double tau : {0.0, 1.0}) {
    c.flexprefill.tau = tau;
    const BlockScores s = make_estimator("flexprefill")->estimate(q, k, c);
    ASSERT_TRUE(s.native.has_value());
    ASSERT_EQ(s.query_aware.size(), 6u);
    for (int h = 0; h < sh.hq; ++h) {
      EXPECT_EQ(s.query_aware[h], tau > 0 ? 1 : 0);
      EXPECT_GE(s.jsd[h], 0.0);
      EXPECT_LE(s.jsd[h], std::sqrt(std::log(2.0)) + 1e-9);
      for (int i = 0; i < s.num_blocks; ++i) {
        EXPECT_TRUE(s.native->contains(h, i, 0));
        EXPECT_TRUE(s.native->contains(h, i, i));
      }
    }
    if (tau > 0) {  // query-aware scores are the pooled scores
      check_close("flexprefill query-aware scores", s.score, test::pooled64(q, k, sh.block), 1e-6, 1e-4);
    }
  }
}

// FlexPrefill at several gammas in one estimate (the analysis' path) equals one estimate per
// gamma: scores, pattern statistics and native masks, on odd sizes and both patterns.
TEST(EstimatorFlexPrefill, CoveragesEqualOneEstimateEach) {
  const Shape sh{6, 2, 64, 389, 16};
  const Tensor3 q = random_tensor(sh.hq, sh.n, sh.d, 2.0f);
  const Tensor3 k = random_tensor(sh.hkv, sh.n, sh.d);
  EstimatorConfig c = cfg_block(sh.block);
  c.flexprefill.min_budget_tokens = 16;
  c.flexprefill.last_q = 37;
  const MethodInfo& m = find_method("flexprefill");
  const std::vector<double> gammas{0.9, 0.5, 1.0, 0.97};
  for (double tau : {0.0, 0.3, 1.0}) {
    c.flexprefill.tau = tau;
    const std::vector<BlockScores> all = m.estimate_coverages(q, k, c, gammas);
    ASSERT_EQ(all.size(), gammas.size());
    for (size_t x = 0; x < gammas.size(); ++x) {
      EstimatorConfig cx = c;
      cx.flexprefill.gamma = gammas[x];
      const BlockScores one = m.estimate(q, k, cx);
      EXPECT_EQ(all[x].score, one.score) << "tau " << tau << ", gamma " << gammas[x];
      EXPECT_EQ(all[x].jsd, one.jsd);
      EXPECT_EQ(all[x].query_aware, one.query_aware);
      ASSERT_TRUE(all[x].native.has_value());
      EXPECT_EQ(*all[x].native, *one.native) << "tau " << tau << ", gamma " << gammas[x];
    }
    EXPECT_NE(*all[1].native, *all[2].native);  // the gammas do differ
  }
}

// ------------------------------------------------------------------ properties

// proxy with g = Hq on a model without GQA selects exactly what per-head token-level max-pool
// scoring (naive float64) selects, at several budgets.
TEST(EstimatorProxy, PerHeadGroupsEqualTokenMaxPoolSelection) {
  const int H = 5, B = 64;
  const int64_t N = 467;
  const Tensor3 q = random_tensor(H, N, 64, 2.0f);
  const Tensor3 k = random_tensor(H, N, 64);
  EstimatorConfig c = cfg_block(B);
  c.proxy.groups = H;
  const BlockScores s = make_estimator("proxy")->estimate(q, k, c);
  const auto ref = test::maxpool64(test::to64(q), test::to64(k), B);
  std::vector<float> reff(ref.begin(), ref.end());
  const BlockScores r = test::make_block_scores(H, N, B, reff);
  for (int kk : {1, 2, 3, 5}) EXPECT_EQ(select_top_k(s, kk), select_top_k(r, kk)) << "k = " << kk;
}

// Every estimator: scores finite, non-negative, zero above the diagonal; native masks keep the
// sink and diagonal; deterministic (two runs equal).
TEST(Estimators, CommonInvariants) {
  const Tensor3 q = random_tensor(6, 333, 64, 2.0f);
  const Tensor3 k = random_tensor(2, 333, 64);
  EstimatorConfig c = cfg_block(64);
  c.flexprefill.min_budget_tokens = 64;
  for (const std::string& name : estimator_names()) {
    const auto e = make_estimator(name);
    EXPECT_EQ(e->name(), name);
    const BlockScores s = e->estimate(q, k, c);
    EXPECT_EQ(s.method, name);
    EXPECT_EQ(s.heads, 6);
    EXPECT_EQ(s.num_blocks, 6);
    for (int h = 0; h < 6; ++h)
      for (int i = 0; i < 6; ++i)
        for (int j = 0; j < 6; ++j) {
          const float x = s.at(h, i, j);
          ASSERT_TRUE(std::isfinite(x)) << name;
          if (j > i) ASSERT_EQ(x, 0.0f) << name;
          else ASSERT_GE(x, 0.0f) << name;
        }
    if (s.native)
      for (int h = 0; h < 6; ++h)
        for (int i = 0; i < 6; ++i) {
          EXPECT_TRUE(s.native->contains(h, i, 0)) << name;
          EXPECT_TRUE(s.native->contains(h, i, i)) << name;
        }
    const BlockScores s2 = e->estimate(q, k, c);
    EXPECT_EQ(s.score, s2.score) << name;
  }
}

// Re-deriving the native selection from the scores equals estimating again with the new
// threshold (pooled, xattn); the others report that they cannot.
TEST(Estimators, RenativeFromScores) {
  const Tensor3 q = random_tensor(6, 333, 64, 2.0f);
  const Tensor3 k = random_tensor(2, 333, 64);
  EstimatorConfig c = cfg_block(64);
  c.flexprefill.min_budget_tokens = 64;
  for (const std::string name : {"pooled", "xattn"}) {
    BlockScores s = make_estimator(name)->estimate(q, k, c);
    EstimatorConfig c2 = c;
    c2.pooled.gamma = 0.5;
    c2.pooled.global = true;
    c2.xattn.tau = 0.6;
    const BlockScores fresh = make_estimator(name)->estimate(q, k, c2);
    ASSERT_TRUE(renative_from_scores(s, c2));
    EXPECT_EQ(*s.native, *fresh.native) << name;
    c2.xattn.tau = 0.0;
    c2.pooled.gamma = 0.0;
    EXPECT_THROW(renative_from_scores(s, c2), Error) << name;
  }
  for (const std::string name : {"proxy", "flexprefill", "vslash", "oracle"}) {
    BlockScores s = make_estimator(name)->estimate(q, k, c);
    const auto before = s.native;
    EXPECT_FALSE(renative_from_scores(s, c)) << name;
    EXPECT_EQ(s.native.has_value(), before.has_value());
  }
}

// ------------------------------------------------------------------ bad input

TEST(Estimators, BadInput) {
  const Tensor3 q = random_tensor(6, 100, 64);
  const Tensor3 k = random_tensor(2, 100, 64);
  EXPECT_THROW(make_estimator("nope"), Error);
  try {
    make_estimator("proxyattn");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("proxy, pooled"), std::string::npos) << e.what();
  }
  auto expect_bad = [&](const std::string& est, auto mutate, const std::string& needle) {
    EstimatorConfig c = cfg_block(64);
    mutate(c);
    try {
      make_estimator(est)->estimate(q, k, c);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_bad("proxy", [](EstimatorConfig& c) { c.proxy.groups = 4; }, "proxy.groups");
  expect_bad("proxy", [](EstimatorConfig& c) { c.proxy.groups = 0; }, "proxy.groups");
  expect_bad("proxy", [](EstimatorConfig& c) { c.proxy.query_stride = 0; }, "query_stride");
  expect_bad("proxy", [](EstimatorConfig& c) { c.block = 96; }, "block");
  expect_bad("pooled", [](EstimatorConfig& c) { c.block = 0; }, "block");
  expect_bad("pooled", [](EstimatorConfig& c) { c.pooled.gamma = 0.0; }, "pooled.gamma");
  expect_bad("pooled", [](EstimatorConfig& c) { c.pooled.gamma = 1.5; }, "pooled.gamma");
  expect_bad("flexprefill", [](EstimatorConfig& c) { c.flexprefill.gamma = -0.1; }, "flexprefill.gamma");
  expect_bad("flexprefill", [](EstimatorConfig& c) { c.flexprefill.gamma = std::nan(""); }, "flexprefill.gamma");
  expect_bad("xattn", [](EstimatorConfig& c) { c.xattn.tau = 1.01; }, "xattn.tau");
  expect_bad("xattn", [](EstimatorConfig& c) { c.xattn.stride = 6; }, "xattn.stride");
  expect_bad("xattn", [](EstimatorConfig& c) { c.xattn.stride = 128; }, "xattn.stride");
  expect_bad("vslash", [](EstimatorConfig& c) { c.vslash.vertical = -1; }, "vslash.vertical");
  // Shape mismatches come from check_qkv.
  const Tensor3 k_bad = random_tensor(4, 100, 64);
  EXPECT_THROW(make_estimator("proxy")->estimate(q, k_bad, cfg_block(64)), Error);
  const Tensor3 k_short = random_tensor(2, 99, 64);
  EXPECT_THROW(make_estimator("pooled")->estimate(q, k_short, cfg_block(64)), Error);
  EXPECT_THROW(parse_proxy_pool("median"), Error);
  EXPECT_EQ(parse_proxy_pool("max_norm"), ProxyPool::max_norm);
}

}  // namespace
}  // namespace proxyattn

namespace proxyattn {
namespace {

// The length-relative vertical-slash setting resolves to token counts: a fraction f keeps
// ceil(f N) columns / diagonals, exactly what the token count ceil(f N) keeps.
TEST(EstimatorVSlash, FractionsResolveToTokenCounts) {
  const int64_t n = 777;
  const Tensor3 q = test::random_tensor(3, n, 64, 1.5f), k = test::random_tensor(1, n, 64);
  EstimatorConfig rel;
  rel.block = 64;
  rel.vslash.vertical_fraction = 0.05;
  rel.vslash.slash_fraction = 0.2;
  EXPECT_EQ(vslash_vertical(rel.vslash, n), 39);
  EXPECT_EQ(vslash_slash(rel.vslash, n), 156);
  EstimatorConfig abs = rel;
  abs.vslash.vertical_fraction = abs.vslash.slash_fraction = 0;
  abs.vslash.vertical = 39;
  abs.vslash.slash = 156;
  const BlockScores a = make_estimator("vslash")->estimate(q, k, rel), b = make_estimator("vslash")->estimate(q, k, abs);
  EXPECT_EQ(a.score, b.score);
  ASSERT_TRUE(a.native && b.native);
  EXPECT_TRUE(*a.native == *b.native);
  EstimatorConfig bad = rel;
  bad.vslash.slash_fraction = 1.5;
  EXPECT_THROW(make_estimator("vslash")->estimate(q, k, bad), Error);
  EXPECT_EQ(vslash_vertical(abs.vslash, 20), 20);  // clamped to N
}

}  // namespace
}  // namespace proxyattn
