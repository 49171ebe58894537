// CPU reference attention vs naive float64, on fresh random inputs of odd sizes and GQA.
#include <gtest/gtest.h>

#include <tuple>

#include "proxyattn/attention.hpp"
#include "proxyattn/error.hpp"
#include "test_util.hpp"

namespace proxyattn {
namespace {

using test::check_close;
using test::random_tensor;

struct Case {
  int hq, hkv, d, block;
  int64_t n;
};

std::string name(const Case& c) {
  return "Hq" + std::to_string(c.hq) + "_Hkv" + std::to_string(c.hkv) + "_d" + std::to_string(c.d) + "_B" +
         std::to_string(c.block) + "_N" + std::to_string(c.n);
}

class AttentionCase : public ::testing::TestWithParam<Case> {};

// GQA ratios 1, 3, 4; head dims 64 and 128; blocks 64 and 128; N prime or not a block multiple.
INSTANTIATE_TEST_SUITE_P(Shapes, AttentionCase,
                         ::testing::Values(Case{2, 2, 64, 64, 131}, Case{3, 1, 64, 128, 257},
                                           Case{4, 1, 128, 64, 199}, Case{6, 2, 128, 128, 300},
                                           Case{8, 2, 64, 64, 389}),
                         [](const auto& info) { return name(info.param); });

TEST_P(AttentionCase, FullMatchesFloat64) {
  const Case c = GetParam();
  const Tensor3 q = random_tensor(c.hq, c.n, c.d, 2.0f), k = random_tensor(c.hkv, c.n, c.d),
                v = random_tensor(c.hkv, c.n, c.d);
  const AttentionOutput out = full_attention_cpu(q, k, v);
  check_close("full O", out.o.storage(), test::attention64(q, k, v, nullptr), 2e-5, 1e-4);
  check_close("full LSE", out.lse, test::lse64(q, k), 1e-4, 1e-5);
  check_close("row_lse_cpu", row_lse_cpu(q, k), test::lse64(q, k), 1e-4, 1e-5);
}

// Windows smaller than a query tile (64), not a multiple of it, larger than N (= full) and 1
// (each query sees itself only: O = V of its own KV head).
TEST_P(AttentionCase, SlidingWindowMatchesFloat64) {
  const Case c = GetParam();
  const Tensor3 q = random_tensor(c.hq, c.n, c.d, 2.0f), k = random_tensor(c.hkv, c.n, c.d),
                v = random_tensor(c.hkv, c.n, c.d);
  for (int64_t w : {int64_t{1}, int64_t{37}, int64_t{100}, c.n - 1}) {
    const AttentionOutput out = sliding_attention_cpu(q, k, v, w);
    check_close("sliding O window " + std::to_string(w), out.o.storage(), test::sliding_attention64(q, k, v, w), 2e-5,
                1e-4);
  }
  check_close("sliding(window N) vs full", sliding_attention_cpu(q, k, v, c.n).o.storage(),
              full_attention_cpu(q, k, v).o.storage(), 0, 0);
  const AttentionOutput one = sliding_attention_cpu(q, k, v, 1);
  const int r = c.hq / c.hkv;
  for (int h = 0; h < c.hq; h += r + 1)
    for (int64_t t = 0; t < c.n; t += 17) EXPECT_NEAR(one.o(h, t, 3), v(h / r, t, 3), 1e-6);
  EXPECT_THROW(sliding_attention_cpu(q, k, v, -1), Error);
}

TEST_P(AttentionCase, SparseMatchesDenseWithMaskExpanded) {
  const Case c = GetParam();
  const Tensor3 q = random_tensor(c.hq, c.n, c.d, 2.0f), k = random_tensor(c.hkv, c.n, c.d),
                v = random_tensor(c.hkv, c.n, c.d);
  for (double density : {0.2, 0.6}) {
    const BlockMask mask = test::random_mask(c.hq, c.n, c.block, density);
    const AttentionOutput out = sparse_attention_cpu(q, k, v, mask);
    check_close("sparse O density " + std::to_string(density), out.o.storage(),
                test::attention64(q, k, v, &mask), 2e-5, 1e-4);
  }
  // With every causal block selected it is full attention.
  const AttentionOutput all = sparse_attention_cpu(q, k, v, BlockMask::causal(c.hq, c.n, c.block));
  check_close("sparse(all causal) O", all.o.storage(), test::attention64(q, k, v, nullptr), 2e-5, 1e-4);
  check_close("sparse(all causal) vs full", all.o.storage(), full_attention_cpu(q, k, v).o.storage(), 1e-5, 1e-4);
}

TEST_P(AttentionCase, BlockMassMatchesFloat64AndRowsSumToOne) {
  const Case c = GetParam();
  const Tensor3 q = random_tensor(c.hq, c.n, c.d, 2.0f), k = random_tensor(c.hkv, c.n, c.d);
  const BlockMass bm = block_mass_cpu(q, k, c.block);
  const auto ref = test::block_mass64(q, k, c.block);
  check_close("block mass (one pass)", bm.mass, ref, 1e-6, 1e-4);
  const BlockMass bm2 = block_mass_cpu(q, k, c.block, row_lse_cpu(q, k));
  check_close("block mass (given lse)", bm2.mass, ref, 1e-6, 1e-4);
  for (int h = 0; h < bm.heads; ++h)
    for (int i = 0; i < bm.num_blocks; ++i) {
      double s = 0;
      for (int j = 0; j < bm.num_blocks; ++j) {
        s += bm.at(h, i, j);
        if (j > i) ASSERT_EQ(bm.at(h, i, j), 0.0f);
      }
      ASSERT_NEAR(s, 1.0, 1e-5) << "head " << h << " row " << i;
    }
}

TEST(Attention, StridedViewsWork) {
  // A token slice of a larger tensor (non-contiguous heads) gives the same answer as a copy.
  const Tensor3 q = random_tensor(2, 150, 64), k = random_tensor(2, 150, 64), v = random_tensor(2, 150, 64);
  const ConstView qs = q.view().slice_tokens(0, 101), ks = k.view().slice_tokens(0, 101),
                  vs = v.view().slice_tokens(0, 101);
  const AttentionOutput a = full_attention_cpu(qs, ks, vs);
  const AttentionOutput b = full_attention_cpu(to_tensor(qs), to_tensor(ks), to_tensor(vs));
  check_close("strided", a.o.storage(), b.o.storage(), 0, 0);
}

TEST(Attention, ShapeErrorsNameTheMismatch) {
  const Tensor3 q = random_tensor(3, 10, 64), k = random_tensor(2, 10, 64), k2 = random_tensor(1, 10, 32),
                k3 = random_tensor(1, 11, 64), v = random_tensor(1, 10, 64);
  EXPECT_THROW(check_qkv(q, k), Error);   // 3 % 2 != 0
  EXPECT_THROW(check_qkv(q, k2), Error);  // head dims differ
  EXPECT_THROW(check_qkv(q, k3), Error);  // lengths differ
  EXPECT_THROW(full_attention_cpu(q, v, Tensor3(1, 10, 32)), Error);
  EXPECT_THROW(check_qkv(Tensor3(1, 0, 64), Tensor3(1, 0, 64)), Error);
  try {
    check_qkv(q, k2);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("head dim"), std::string::npos);
  }
}

TEST(Attention, MaskWithoutDiagonalOnAFirstRowIsAnError) {
  const Tensor3 q = random_tensor(1, 64, 64), k = random_tensor(1, 64, 64), v = random_tensor(1, 64, 64);
  const BlockMask empty = BlockMask::from_rows(1, 64, 32, {{}, {1}});
  EXPECT_THROW(sparse_attention_cpu(q, k, v, empty), Error);
}

}  // namespace
}  // namespace proxyattn
