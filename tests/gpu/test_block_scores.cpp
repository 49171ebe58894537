// GPU block scores vs the CPU specs: oracle block mass (block_mass_cpu), token-level max-pool
// (maxpool_block_scores, with query stride), ProxyAttn scores (make_estimator("proxy")) and the
// last-block mass of the dynamic budget (last_block_mass_cpu). Fresh random inputs rounded
// through the device dtype, odd N, GQA 1/3/4, head dims 64/128/256, blocks 64/128, outputs
// poisoned with NaN (every entry, zeros above the diagonal included, must be written).
#include <gtest/gtest.h>

#include <tuple>

#include "gpu_test_util.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/budget.hpp"
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/estimator.hpp"

namespace proxyattn {
namespace {

namespace kk = proxyattn::kernels;

struct Case {
  int hq, hkv, d, block;
  int64_t n;
};

std::vector<Case> cases() {
  if (test::small_mode()) return {{2, 2, 64, 64, 150}, {3, 1, 128, 128, 260}, {2, 2, 256, 128, 140}};
  return {{2, 2, 64, 64, 131}, {3, 1, 64, 128, 389}, {6, 2, 128, 64, 500},
          {8, 2, 128, 128, 1031}, {3, 1, 256, 128, 333}, {4, 4, 256, 64, 257}};
}

std::string case_name(const Case& c, DType dt) {
  return "Hq" + std::to_string(c.hq) + "_Hkv" + std::to_string(c.hkv) + "_d" + std::to_string(c.d) + "_B" +
         std::to_string(c.block) + "_N" + std::to_string(c.n) + "_" + (dt == DType::bf16 ? "bf16" : "f16");
}

class BlockScoresTest : public ::testing::TestWithParam<std::tuple<Case, DType>> {};
INSTANTIATE_TEST_SUITE_P(Shapes, BlockScoresTest,
                         ::testing::Combine(::testing::ValuesIn(cases()), ::testing::Values(DType::bf16, DType::f16)),
                         [](const auto& info) { return case_name(std::get<0>(info.param), std::get<1>(info.param)); });

// Runs row_lse + block_scores through the kernels API with poisoned outputs.
std::vector<float> gpu_scores(const Tensor3& q, const Tensor3& k, DType dt, int block, kk::BlockReduce reduce,
                              int stride, int splits = 0) {
  const int hq = int(q.heads()), hkv = int(k.heads()), d = int(q.dim());
  const int64_t n = q.tokens();
  const int nb = num_blocks_for(n, block);
  kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt);
  kk::DeviceBuffer lse = test::poisoned(int64_t(hq) * n, kk::ElemType::f32);
  kk::DeviceBuffer out = test::poisoned(int64_t(hq) * nb * nb, kk::ElemType::f32);
  kk::AttentionParams p;
  p.q = dq.data();
  p.k = dk.data();
  p.in_type = test::elem_of(dt);
  p.q_heads = hq;
  p.kv_heads = hkv;
  p.head_dim = d;
  p.seq_len = n;
  p.lse = lse.as<float>();
  EXPECT_EQ(kk::row_lse(p), kk::Status::ok) << kk::last_error_detail();
  kk::BlockScoreParams b;
  b.q = dq.data();
  b.k = dk.data();
  b.lse = lse.as<float>();
  b.out = out.as<float>();
  b.in_type = p.in_type;
  b.q_heads = hq;
  b.kv_heads = hkv;
  b.head_dim = d;
  b.seq_len = n;
  b.block = block;
  b.query_stride = stride;
  b.reduce = reduce;
  b.key_splits = splits;
  EXPECT_EQ(kk::block_scores(b), kk::Status::ok) << kk::last_error_detail();
  EXPECT_EQ(kk::synchronize(), kk::Status::ok) << kk::last_error_detail();
  return test::download_as_float(out, int64_t(hq) * nb * nb, kk::ElemType::f32);
}

TEST_P(BlockScoresTest, OracleMassMatchesCpu) {
  PROXYATTN_REQUIRE_GPU();
  const auto [c, dt] = GetParam();
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, dt);
  const BlockMass ref = block_mass_cpu(q, k, c.block);
  // Key blocks split automatically, never, and in 3 parts.
  for (int splits : {1, 3}) {
    const std::vector<float> g = gpu_scores(q, k, dt, c.block, kk::BlockReduce::mean_sum, 1, splits);
    test::expect_rel(("block mass, key splits " + std::to_string(splits)).c_str(), g, ref.mass, test::rel_tol(dt));
  }
  const std::vector<float> got = gpu_scores(q, k, dt, c.block, kk::BlockReduce::mean_sum, 1);
  test::expect_rel("block mass", got, ref.mass, test::rel_tol(dt));
  // Rows of M sum to 1.
  const int nb = ref.num_blocks;
  double worst = 0;
  for (int h = 0; h < c.hq; ++h)
    for (int i = 0; i < nb; ++i) {
      double s = 0;
      for (int j = 0; j < nb; ++j) s += got[(size_t(h) * nb + i) * nb + j];
      worst = std::max(worst, std::abs(s - 1.0));
    }
  EXPECT_LE(worst, 1e-3) << "a block-mass row does not sum to 1";
}

TEST_P(BlockScoresTest, MaxPoolMatchesCpu) {
  PROXYATTN_REQUIRE_GPU();
  const auto [c, dt] = GetParam();
  // maxpool_block_scores needs one k head per q head.
  const Tensor3 q = test::random_rounded(c.hkv, c.n, c.d, dt, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, dt);
  for (int stride : {1, 3}) {
    const std::vector<float> ref = maxpool_block_scores(q, k, c.block, stride);
    const std::vector<float> got = gpu_scores(q, k, dt, c.block, kk::BlockReduce::max, stride);
    test::expect_rel(("maxpool stride " + std::to_string(stride)).c_str(), got, ref, test::rel_tol(dt));
  }
}

TEST_P(BlockScoresTest, LastBlockMassMatchesCpu) {
  PROXYATTN_REQUIRE_GPU();
  const auto [c, dt] = GetParam();
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, dt);
  const std::vector<double> ref = last_block_mass_cpu(q, k, c.block);
  const std::vector<double> got = CudaLayer(q, k, {}, dt).last_block_mass(c.block);
  test::expect_rel("last-block mass", got, ref, test::rel_tol(dt));
}

// ProxyAttn scores through the dispatch (operand-precision proxy heads) vs the CPU estimator.
TEST(ProxyScores, MatchEstimator) {
  PROXYATTN_REQUIRE_GPU();
  struct P {
    int hq, hkv, d, block, groups, stride;
    int64_t n;
    ProxyPool pool;
  };
  std::vector<P> ps = {{4, 1, 128, 128, 1, 1, 389, ProxyPool::mean}, {8, 2, 128, 64, 2, 1, 300, ProxyPool::mean},
                       {6, 2, 64, 128, 3, 2, 401, ProxyPool::mean},  {4, 4, 256, 64, 2, 1, 200, ProxyPool::max_norm},
                       {8, 2, 128, 128, 4, 3, 515, ProxyPool::max_norm}};
  if (test::small_mode()) ps.resize(2);
  for (DType dt : {DType::bf16, DType::f16})
    for (const P& p : ps) {
      const Tensor3 q = test::random_rounded(p.hq, p.n, p.d, dt, 1.5f), k = test::random_rounded(p.hkv, p.n, p.d, dt);
      EstimatorConfig cfg;
      cfg.block = p.block;
      cfg.proxy.groups = p.groups;
      cfg.proxy.query_stride = p.stride;
      cfg.proxy.pool = p.pool;
      const BlockScores ref = make_estimator("proxy")->estimate(q, k, cfg);
      // The operand-precision (benchmark) path; the exact path is test_peer_scores.cpp's.
      const BlockScores got = CudaLayer(q, k, {}, dt).proxy_scores(cfg, ProxyPrecision::operand);
      ASSERT_EQ(got.heads, ref.heads);
      ASSERT_EQ(got.num_blocks, ref.num_blocks);
      EXPECT_EQ(got.group_of_head, ref.group_of_head);
      const std::string what = std::string("proxy g") + std::to_string(p.groups) + " s" + std::to_string(p.stride) +
                               (p.pool == ProxyPool::mean ? " mean" : " maxnorm") + (dt == DType::bf16 ? " bf16" : " f16");
      // Kernel error: the CPU proxy heads rounded to the operand dtype, as the GPU stores its
      // pooled heads, then the CPU max-pool, broadcast to the members.
      ProxyHeads ph = make_proxy_heads(q, k, cfg.proxy);
      test::round_through(ph.q, dt);
      test::round_through(ph.k, dt);
      const std::vector<float> gs = maxpool_block_scores(ph.q, ph.k, p.block, p.stride);
      std::vector<float> rounded_ref(ref.score.size());
      const size_t per = size_t(ref.num_blocks) * ref.num_blocks;
      for (int h = 0; h < ref.heads; ++h)
        std::copy_n(gs.begin() + size_t(ref.group_of_head[h]) * per, per, rounded_ref.begin() + size_t(h) * per);
      test::expect_rel((what + " (pooled rounded)").c_str(), got.score, rounded_ref, test::rel_tol(dt));
      // Against the estimator itself (float32 pooling): the GPU rounds the pooled heads once
      // more, so twice the kernel tolerance.
      test::expect_rel(what.c_str(), got.score, ref.score, 2 * test::rel_tol(dt));
    }
}

}  // namespace
}  // namespace proxyattn
