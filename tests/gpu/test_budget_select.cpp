// GPU dynamic budget and block selection vs the CPU spec (budget.hpp, select.hpp): masks must
// be identical (deterministic ties: lower j wins, NaN lowest), budgets identical on the same
// last-block mass, and within boundary ties when the mass itself comes from the GPU.
#include <gtest/gtest.h>

#include <algorithm>

#include "gpu_test_util.hpp"
#include "proxyattn/budget.hpp"
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/select.hpp"

namespace proxyattn {
namespace {

namespace kk = proxyattn::kernels;

// Scores from a few levels (many ties), some NaN, some negative zero.
BlockScores random_scores(int heads, int nb, int block) {
  BlockScores s;
  s.method = "test";
  s.heads = heads;
  s.num_blocks = nb;
  s.block = block;
  s.seq_len = int64_t(nb) * block - 5;
  s.score.assign(size_t(heads) * nb * nb, 0.f);
  std::uniform_int_distribution<int> level(0, 12);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i)
      for (int j = 0; j <= i; ++j) {
        const float x = u(test::rng());
        float v = x < 0.5f ? float(level(test::rng())) / 12.f : u(test::rng());
        if (x > 0.98f) v = std::nanf("");
        if (x > 0.96f && x <= 0.98f) v = -0.0f;
        s.score[(size_t(h) * nb + i) * nb + j] = v;
      }
  return s;
}

Budgets random_budgets(int heads, int nb) {
  Budgets b;
  b.kind = "test";
  b.heads = heads;
  b.num_blocks = nb;
  b.per_head_k.assign(heads, 0);
  b.per_row_k.resize(size_t(heads) * nb);
  std::uniform_int_distribution<int> k(1, nb + 2);
  for (auto& x : b.per_row_k) x = k(test::rng());
  return b;
}

std::vector<SelectOptions> option_sets() {
  SelectOptions a, b, c, d;
  b.sink = false;
  b.local_window = 2;
  c.diagonal = false;
  c.local_window = 1;
  d.sink = false;
  d.diagonal = false;
  return {a, b, c, d};
}

TEST(SelectBlocks, MatchesCpuExactly) {
  PROXYATTN_REQUIRE_GPU();
  std::vector<std::pair<int, int>> shapes = {{3, 1}, {2, 17}, {4, 130}, {2, 1100}};
  if (test::small_mode()) shapes = {{2, 1}, {2, 33}};
  for (auto [heads, nb] : shapes)
    for (const SelectOptions& o : option_sets()) {
      const BlockScores s = random_scores(heads, nb, 64);
      const Budgets b = random_budgets(heads, nb);
      const BlockMask ref = select_blocks(s, b, o);
      const BlockMask got = select_blocks_cuda(s, b, o);
      EXPECT_EQ(got.indptr(), ref.indptr()) << "heads " << heads << " nb " << nb << " window " << o.local_window;
      EXPECT_TRUE(got == ref) << "heads " << heads << " nb " << nb << " sink " << o.sink << " diag " << o.diagonal
                              << " window " << o.local_window;
    }
}

// Score heads shared by groups of query heads, budgets from head k and a mode (kernel API).
TEST(SelectBlocks, SharedScoreHeadsAndModes) {
  PROXYATTN_REQUIRE_GPU();
  const int G = 2, H = 6, nb = test::small_mode() ? 20 : 77;
  const BlockScores sg = random_scores(G, nb, 128);
  BlockScores s = sg;
  s.heads = H;
  s.score.resize(size_t(H) * nb * nb);
  for (int h = 0; h < H; ++h)
    std::copy_n(sg.score.begin() + size_t(h / (H / G)) * nb * nb, size_t(nb) * nb, s.score.begin() + size_t(h) * nb * nb);
  std::vector<int32_t> head_k = {1, 3, 8, 40, 77, 100};
  kk::DeviceBuffer dsc = test::upload_raw(sg.score), dk = test::upload_raw(head_k);
  for (BudgetMode mode : {BudgetMode::constant, BudgetMode::proportional}) {
    Budgets b;
    b.heads = H;
    b.num_blocks = nb;
    b.per_row_k.resize(size_t(H) * nb);
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < nb; ++i) b.per_row_k[size_t(h) * nb + i] = row_budget(head_k[h], i, nb, mode);
    const BlockMask ref = select_blocks(s, b, SelectOptions{});
    kk::DeviceBuffer ip = test::poisoned(int64_t(H) * nb + 1, kk::ElemType::f32);
    kk::SelectParams p;
    p.scores = dsc.as<float>();
    p.score_heads = G;
    p.heads = H;
    p.num_blocks = nb;
    p.head_k = dk.as<int32_t>();
    p.mode = mode == BudgetMode::constant ? 0 : 1;
    p.indptr = ip.as<int32_t>();
    test::kcheck(kk::select_counts(p), "select_counts");
    std::vector<int32_t> indptr(size_t(H) * nb + 1);
    test::kcheck(ip.download(indptr.data(), indptr.size() * 4), "download indptr");
    ASSERT_EQ(indptr, ref.indptr());
    kk::DeviceBuffer ix = test::poisoned(indptr.back(), kk::ElemType::f32);
    p.indices = ix.as<int32_t>();
    test::kcheck(kk::select_fill(p), "select_fill");
    std::vector<int32_t> indices(indptr.back());
    test::kcheck(ix.download(indices.data(), indices.size() * 4), "download indices");
    EXPECT_EQ(indices, ref.indices()) << "mode " << int(mode);
  }
}

// The budget kernel on given masses equals count_to_coverage + clamp exactly.
TEST(DynamicBudget, KernelMatchesCountToCoverage) {
  PROXYATTN_REQUIRE_GPU();
  std::vector<int> nbs = {1, 5, 64, 1000, 2048};
  if (test::small_mode()) nbs = {5, 64};
  for (int nb : nbs) {
    const int H = 5;
    std::vector<float> mass(size_t(H) * nb);
    std::uniform_real_distribution<float> u(0.f, 1.f);
    std::uniform_int_distribution<int> level(0, 4);
    for (int h = 0; h < H; ++h) {
      double tot = 0;
      for (int j = 0; j < nb; ++j) {
        float v = h % 2 ? float(level(test::rng())) : std::pow(u(test::rng()), 6.f);  // ties / peaked
        mass[size_t(h) * nb + j] = v;
        tot += v;
      }
      for (int j = 0; j < nb && tot > 0; ++j) mass[size_t(h) * nb + j] = float(mass[size_t(h) * nb + j] / tot);
    }
    for (double gamma : {0.5, 0.9, 0.95, 1.0})
      for (int k_min : {1, 2, 7}) {
        kk::DeviceBuffer dm = test::upload_raw(mass);
        kk::DeviceBuffer dk = test::poisoned(H, kk::ElemType::f32), dkept = test::poisoned(2 * H, kk::ElemType::f32);
        kk::BudgetParams p;
        p.mass = dm.as<float>();
        p.heads = H;
        p.num_blocks = nb;
        p.gamma = gamma;
        p.k_min = k_min;
        p.k_out = dk.as<int32_t>();
        p.kept = dkept.as<double>();
        test::kcheck(kk::dynamic_budget(p), "dynamic_budget");
        std::vector<int32_t> k(H);
        std::vector<double> kept(H);
        test::kcheck(dk.download(k.data(), H * 4), "download k");
        test::kcheck(dkept.download(kept.data(), H * 8), "download kept");
        for (int h = 0; h < H; ++h) {
          const float* row = mass.data() + size_t(h) * nb;
          int64_t want = count_to_coverage(row, nb, gamma);
          want = std::clamp<int64_t>(want, std::min(k_min, nb), nb);
          EXPECT_EQ(k[h], want) << "nb " << nb << " head " << h << " gamma " << gamma << " k_min " << k_min;
          std::vector<float> sorted(row, row + nb);
          std::sort(sorted.begin(), sorted.end(), std::greater<float>());
          double s = 0;
          for (int r = 0; r < want; ++r) s += sorted[r];
          EXPECT_NEAR(kept[h], s, 1e-9);
        }
      }
  }
}

// End to end from Q/K: GPU last-block mass + budget vs the CPU "dynamic" budget. A head may
// differ only where the CPU prefix sum sits within 1e-3 of gamma at the boundary.
TEST(DynamicBudget, MatchesCpuBudget) {
  PROXYATTN_REQUIRE_GPU();
  struct P {
    int hq, hkv, d, block;
    int64_t n;
  };
  std::vector<P> ps = {{4, 1, 128, 128, 1031}, {6, 2, 64, 64, 700}, {3, 3, 256, 128, 389}};
  if (test::small_mode()) ps = {{2, 1, 128, 64, 200}};
  for (DType dt : {DType::bf16, DType::f16})
    for (const P& p : ps)
      for (BudgetMode mode : {BudgetMode::constant, BudgetMode::proportional}) {
        const Tensor3 q = test::random_rounded(p.hq, p.n, p.d, dt, 2.5f), k = test::random_rounded(p.hkv, p.n, p.d, dt);
        BudgetConfig cfg;
        cfg.gamma = 0.9;
        cfg.mode = mode;
        BlockScores shape;
        shape.method = "shape";
        shape.heads = p.hq;
        shape.num_blocks = num_blocks_for(p.n, p.block);
        shape.block = p.block;
        shape.seq_len = p.n;
        shape.score.assign(size_t(p.hq) * shape.num_blocks * shape.num_blocks, 0.f);
        const Budgets ref = make_budget("dynamic")->compute(q, k, shape, cfg);
        const Budgets got = CudaLayer(q, k, {}, dt).dynamic_budget(p.block, cfg);
        const std::vector<double> pm = last_block_mass_cpu(q, k, p.block);
        const int nb = shape.num_blocks;
        for (int h = 0; h < p.hq; ++h) {
          if (got.per_head_k[h] == ref.per_head_k[h]) continue;
          std::vector<double> row(pm.begin() + size_t(h) * nb, pm.begin() + size_t(h + 1) * nb);
          std::sort(row.begin(), row.end(), std::greater<double>());
          double tot = 0, pre = 0;
          for (double x : row) tot += x;
          const int lo = int(std::min(got.per_head_k[h], ref.per_head_k[h]));
          for (int r = 0; r < lo; ++r) pre += row[r];
          EXPECT_NEAR(pre, cfg.gamma * tot, 1e-3 * tot)
              << "head " << h << ": GPU k " << got.per_head_k[h] << " vs CPU " << ref.per_head_k[h];
        }
        if (got.per_head_k == ref.per_head_k) {
          EXPECT_EQ(got.per_row_k, ref.per_row_k);
          test::expect_rel("kept last-block mass", got.last_block_mass, ref.last_block_mass, test::rel_tol(dt));
        }
      }
}

}  // namespace
}  // namespace proxyattn
