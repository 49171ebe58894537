// The estimators' private CPU micro-kernels (AVX2 and portable paths) against float64 loops.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "../../lib/src/estimator_kernels.hpp"
#include "test_util.hpp"

namespace proxyattn::detail::kern {
namespace {

class KernelPaths : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { force_portable(GetParam()); }
  void TearDown() override { force_portable(false); }
};

TEST_P(KernelPaths, GemmMatchesFloat64) {
  std::normal_distribution<float> nd;
  for (auto [m, d, n] : {std::tuple{1, 64, 1}, {7, 64, 33}, {13, 128, 100}, {6, 512, 17}, {128, 64, 1024}}) {
    const int64_t lda = d + 3, ldb = round_up16(n) + 16, ldc = round_up16(n) + 5;
    std::vector<float> a(m * lda), bt(d * ldb, 0.0f), c(m * ldc, std::nanf(""));
    for (float& x : a) x = nd(test::rng());
    for (int64_t t = 0; t < d; ++t)
      for (int64_t x = 0; x < n; ++x) bt[t * ldb + x] = nd(test::rng());
    gemm_abt(a.data(), lda, m, d, bt.data(), ldb, n, c.data(), ldc, 0.125f);
    std::vector<double> got, ref;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t x = 0; x < n; ++x) {
        double s = 0;
        for (int64_t t = 0; t < d; ++t) s += static_cast<double>(a[r * lda + t]) * bt[t * ldb + x];
        ref.push_back(0.125 * s);
        got.push_back(c[r * ldc + x]);
      }
    test::check_close("gemm " + std::to_string(m) + "x" + std::to_string(d) + "x" + std::to_string(n), got, ref,
                      1e-5, 1e-5);
  }
}

TEST_P(KernelPaths, ExpAndMaxMatchFloat64) {
  std::normal_distribution<float> nd(0.0f, 10.0f);
  for (int64_t n : {1, 7, 8, 9, 100, 1031}) {
    std::vector<float> x(n);
    for (float& v : x) v = nd(test::rng());
    if (n > 1) x[n / 2] = -std::numeric_limits<float>::infinity();  // masked entries count 0
    const float m = row_max(x.data(), n);
    float ref_m = -std::numeric_limits<float>::infinity();
    double ref_s = 0;
    for (float v : x) ref_m = std::max(ref_m, v);
    std::vector<double> ref_e;
    for (float v : x) ref_s += std::exp(static_cast<double>(v) - ref_m), ref_e.push_back(std::exp(static_cast<double>(v) - ref_m));
    EXPECT_EQ(m, ref_m);
    EXPECT_NEAR(exp_sum(x.data(), n, m), ref_s, 1e-6 * ref_s);
    std::vector<float> y = x;
    EXPECT_NEAR(exp_inplace_sum(y.data(), n, m), ref_s, 1e-6 * ref_s);
    test::check_close("exp n" + std::to_string(n), y, ref_e, 1e-12, 1e-6);
  }
  std::vector<float> all_masked(9, -std::numeric_limits<float>::infinity());
  EXPECT_EQ(exp_sum(all_masked.data(), 9, -std::numeric_limits<float>::infinity()), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Estimators, KernelPaths, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "portable" : "dispatched"; });

}  // namespace
}  // namespace proxyattn::detail::kern
