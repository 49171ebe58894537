// What `proxyattn-analyze --device cuda` takes from the GPU beyond the kernels' own tests, vs the
// CPU spec on fresh random inputs (odd N, GQA 1/3/4, head dims 64/128/256, blocks 64/128):
//   - the output error (CudaLayer::output_errors: full output once, each mask's block-sparse
//     output, a float64 reduction per head on the device) vs analysis::output_errors, masks of
//     several densities, one with empty rows and the full causal mask (error 0);
//   - the same with masks that are prefixes of a rank order (one shared pass per order);
//   - the oracle's block max with GQA (CudaLayer::maxpool_block_scores) vs LayerOracle::block_max;
//   - the block mass and row LSE taken from the full output's pass (compute_full_output).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "gpu_test_util.hpp"
#include "proxyattn/analysis/layer_oracle.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/select.hpp"

namespace proxyattn {
namespace {

struct Case {
  int hq, hkv, d, block;
  int64_t n;
};

std::vector<Case> cases() {
  if (test::small_mode()) return {{3, 1, 64, 64, 200}, {2, 2, 128, 128, 300}};
  return {{2, 2, 64, 64, 131}, {3, 1, 64, 128, 389}, {8, 2, 128, 128, 1031}, {6, 2, 128, 64, 700}, {3, 3, 256, 128, 333}};
}

// Random rows; the diagonal kept unless `empty_some` (then every 3rd row of head 0 is empty).
BlockMask random_mask(int heads, int64_t n, int block, double density, bool empty_some) {
  const int nb = num_blocks_for(n, block);
  std::bernoulli_distribution keep(density);
  std::vector<std::vector<int32_t>> rows(size_t(heads) * nb);
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i) {
      auto& r = rows[size_t(h) * nb + i];
      if (empty_some && h == 0 && i % 3 == 1) continue;
      for (int j = 0; j < i; ++j)
        if (keep(test::rng())) r.push_back(j);
      r.push_back(i);
    }
  return BlockMask::from_rows(heads, n, block, rows);
}

class OutputError : public ::testing::TestWithParam<Case> {};

INSTANTIATE_TEST_SUITE_P(Shapes, OutputError, ::testing::ValuesIn(cases()), [](const auto& info) {
  const Case c = info.param;
  return "Hq" + std::to_string(c.hq) + "_Hkv" + std::to_string(c.hkv) + "_d" + std::to_string(c.d) + "_B" +
         std::to_string(c.block) + "_N" + std::to_string(c.n);
});

TEST_P(OutputError, MatchesCpuSpec) {
  PROXYATTN_REQUIRE_GPU();
  const Case c = GetParam();
  // fp16-exact inputs: the GPU reads exactly what the CPU reads.
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, DType::f16, 1.5f),
                k = test::random_rounded(c.hkv, c.n, c.d, DType::f16), v = test::random_rounded(c.hkv, c.n, c.d, DType::f16);
  std::vector<BlockMask> masks;
  for (double density : {0.1, 0.4, 0.8}) masks.push_back(random_mask(c.hq, c.n, c.block, density, false));
  masks.push_back(random_mask(c.hq, c.n, c.block, 0.3, true));
  masks.push_back(random_mask(c.hq, c.n, c.block, 1.0, false));  // every causal block: error 0
  std::vector<const BlockMask*> ptrs;
  for (const BlockMask& m : masks) ptrs.push_back(&m);

  const analysis::LayerOracle oracle = analysis::layer_oracle(q, k, c.block);
  const analysis::OutputErrors ref = analysis::output_errors(q, k, v, oracle, ptrs);
  const CudaLayer layer(q, k, v, DType::f16);
  const MaskErrors got = layer.output_errors(ptrs);

  ASSERT_EQ(got.rel_error.size(), masks.size());
  // fp16 probabilities before P.V move each output by ~1e-3 relative; the error is a difference
  // of two such outputs.
  const double atol = 3e-3, rtol = 2e-2;
  double max_err = 0;
  int over = 0;
  for (size_t x = 0; x < masks.size(); ++x) {
    EXPECT_EQ(got.empty_rows[x], ref.empty_rows[x]) << "mask " << x;
    for (int h = 0; h < c.hq; ++h) {
      const double a = got.rel_error[x][size_t(h)], b = ref.rel_error[x][size_t(h)];
      ASSERT_TRUE(std::isfinite(a)) << "mask " << x << " head " << h;
      const double e = std::abs(a - b);
      max_err = std::max(max_err, e);
      if (e > atol + rtol * std::abs(b)) ++over;
    }
  }
  for (int h = 0; h < c.hq; ++h) EXPECT_LT(got.rel_error.back()[size_t(h)], 2e-3) << "full mask, head " << h;
  std::printf("output error GPU vs CPU: max |diff| %.3g, %d of %zu over tolerance\n", max_err, over,
              masks.size() * size_t(c.hq));
  EXPECT_EQ(over, 0);
}

// Masks that are prefixes of a random rank order (test::random_rank_order): per row a random
// length in [0, i + 1] (so empty rows and whole rows too).
BlockMask prefix_mask(const std::vector<int32_t>& order, int heads, int64_t n, int block, double fill) {
  const int nb = num_blocks_for(n, block);
  std::vector<std::vector<int32_t>> rows(size_t(heads) * nb);
  size_t at = 0;
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i) {
      const int c = std::min(i + 1, int(std::floor(fill * (i + 1) * std::uniform_real_distribution<double>(0.5, 1.5)(test::rng()))));
      auto& r = rows[size_t(h) * nb + i];
      r.assign(order.begin() + long(at), order.begin() + long(at) + c);
      std::sort(r.begin(), r.end());
      at += size_t(i) + 1;
    }
  return BlockMask::from_rows(heads, n, block, rows);
}

// Masks that are prefixes of a ranking share one pass (prefix_output_errors); the others keep
// their own. Both against the CPU spec and against one pass per mask.
TEST_P(OutputError, PrefixMasksShareAPass) {
  PROXYATTN_REQUIRE_GPU();
  const Case c = GetParam();
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, DType::f16, 1.5f),
                k = test::random_rounded(c.hkv, c.n, c.d, DType::f16), v = test::random_rounded(c.hkv, c.n, c.d, DType::f16);
  const int nb = num_blocks_for(c.n, c.block);
  const std::vector<int32_t> a = test::random_rank_order(c.hq, nb), b = test::random_rank_order(c.hq, nb);
  std::vector<BlockMask> masks;
  for (double fill : {0.0, 0.2, 0.5, 2.0}) masks.push_back(prefix_mask(a, c.hq, c.n, c.block, fill));
  masks.push_back(random_mask(c.hq, c.n, c.block, 0.3, true));  // a prefix of neither (almost surely)
  for (double fill : {0.1, 0.7}) masks.push_back(prefix_mask(b, c.hq, c.n, c.block, fill));
  std::vector<const BlockMask*> ptrs;
  for (const BlockMask& m : masks) ptrs.push_back(&m);
  EXPECT_TRUE(is_prefix_of_order(masks[1], a));
  EXPECT_TRUE(is_prefix_of_order(masks[5], b));

  const analysis::LayerOracle oracle = analysis::layer_oracle(q, k, c.block);
  const analysis::OutputErrors ref = analysis::output_errors(q, k, v, oracle, ptrs);
  const CudaLayer layer(q, k, v, DType::f16);
  const MaskErrors shared = layer.output_errors(ptrs, {&a, &b}), alone = layer.output_errors(ptrs);
  ASSERT_EQ(shared.rel_error.size(), masks.size());
  const double atol = 3e-3, rtol = 2e-2;
  int over = 0;
  double max_vs_alone = 0;
  for (size_t x = 0; x < masks.size(); ++x) {
    EXPECT_EQ(shared.empty_rows[x], ref.empty_rows[x]) << "mask " << x;
    for (int h = 0; h < c.hq; ++h) {
      const double g = shared.rel_error[x][size_t(h)], r = ref.rel_error[x][size_t(h)];
      ASSERT_TRUE(std::isfinite(g)) << "mask " << x << " head " << h;
      if (std::abs(g - r) > atol + rtol * std::abs(r)) ++over;
      // The same products in another block order: float rounding apart.
      max_vs_alone = std::max(max_vs_alone, std::abs(g - alone.rel_error[x][size_t(h)]));
    }
  }
  // The empty prefix (fill 0 keeps nothing): O = 0, error 1; the whole rows: error ~0.
  for (int h = 0; h < c.hq; ++h) {
    EXPECT_NEAR(shared.rel_error[0][size_t(h)], 1.0, 1e-6) << "empty mask, head " << h;
    EXPECT_LT(shared.rel_error[3][size_t(h)], 2e-3) << "whole rows, head " << h;
  }
  std::printf("prefix errors: %d of %zu over tolerance vs CPU, max |shared - alone| %.3g\n", over,
              masks.size() * size_t(c.hq), max_vs_alone);
  EXPECT_EQ(over, 0);
  EXPECT_LT(max_vs_alone, 1e-3);
}

TEST_P(OutputError, BlockMaxMatchesCpuPass) {
  PROXYATTN_REQUIRE_GPU();
  const Case c = GetParam();
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, DType::f16, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, DType::f16);
  const analysis::LayerOracle oracle = analysis::layer_oracle(q, k, c.block);
  const CudaLayer layer(q, k, ConstView{}, DType::f16);
  const std::vector<float> got = layer.maxpool_block_scores(c.block, 1);
  ASSERT_EQ(got.size(), oracle.block_max.size());
  double max_rel = 0;
  int over = 0;
  for (size_t x = 0; x < got.size(); ++x) {
    const double a = got[x], b = oracle.block_max[x], e = std::abs(a - b);
    max_rel = std::max(max_rel, e / std::max(1e-30, std::abs(b)));
    if (e > 1e-6 + 1e-4 * std::abs(b)) ++over;
  }
  std::printf("block max GPU vs CPU pass: max rel %.3g, %d of %zu over tolerance\n", max_rel, over, got.size());
  EXPECT_EQ(over, 0);
}

// compute_full_output first (the analysis with V): the block mass and row LSE then come from the
// full-attention pass's LSE, not a pass of their own. Both against the layer without V (its own
// LSE pass) and the CPU spec; the output errors after it unchanged.
TEST_P(OutputError, FullOutputGivesTheRowLse) {
  PROXYATTN_REQUIRE_GPU();
  const Case c = GetParam();
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, DType::f16, 1.5f),
                k = test::random_rounded(c.hkv, c.n, c.d, DType::f16), v = test::random_rounded(c.hkv, c.n, c.d, DType::f16);
  const CudaLayer with_v(q, k, v, DType::f16), no_v(q, k, ConstView{}, DType::f16);
  with_v.compute_full_output();
  const std::vector<float> lse = with_v.row_lse(), own = no_v.row_lse();
  const BlockMass mass = with_v.block_mass(c.block), own_mass = no_v.block_mass(c.block);
  const BlockMass ref = block_mass_cpu(q, k, c.block);
  ASSERT_EQ(lse.size(), own.size());
  double max_lse = 0;
  for (size_t x = 0; x < lse.size(); ++x) max_lse = std::max(max_lse, double(std::abs(lse[x] - own[x])));
  EXPECT_LT(max_lse, 1e-4) << "row LSE of the full pass vs the LSE pass";
  test::expect_rel("block mass (full pass LSE) vs LSE pass", mass.mass, own_mass.mass, 1e-4);
  test::expect_rel("block mass (full pass LSE) vs cpu", mass.mass, ref.mass, test::rel_tol(DType::f16));
  const BlockMask m = random_mask(c.hq, c.n, c.block, 0.4, false);
  const analysis::LayerOracle oracle = analysis::layer_oracle(q, k, c.block);
  const analysis::OutputErrors e_ref = analysis::output_errors(q, k, v, oracle, {&m});
  const MaskErrors e = with_v.output_errors({&m});
  for (int h = 0; h < c.hq; ++h)
    EXPECT_NEAR(e.rel_error[0][size_t(h)], e_ref.rel_error[0][size_t(h)], 3e-3 + 2e-2 * e_ref.rel_error[0][size_t(h)])
        << "head " << h;
  EXPECT_THROW(no_v.compute_full_output(), Error);
}

TEST(OutputErrorArgs, RejectsAMaskOfAnotherShape) {
  PROXYATTN_REQUIRE_GPU();
  const Tensor3 q = test::random_rounded(2, 200, 64, DType::f16), k = test::random_rounded(2, 200, 64, DType::f16),
                v = test::random_rounded(2, 200, 64, DType::f16);
  const CudaLayer layer(q, k, v, DType::f16);
  const BlockMask other = random_mask(3, 200, 64, 0.5, false);
  EXPECT_THROW(layer.output_errors({&other}), Error);
  const CudaLayer no_v(q, k, ConstView{}, DType::f16);
  const BlockMask ok = random_mask(2, 200, 64, 0.5, false);
  EXPECT_THROW(no_v.output_errors({&ok}), Error);
}

}  // namespace
}  // namespace proxyattn
