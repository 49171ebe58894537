// The Hopper kernels (AttnImpl::hopper: wgmma + TMA, warp-specialised; attention_sm90.cuh) vs
// the CPU reference and vs the portable kernels on fresh random inputs: odd N (partial last
// tiles, several passes round the 2-stage ring), GQA 1/3/4, head dims 64/128, bf16 and fp16,
// NaN-poisoned outputs, O in f32 and in the operand dtype, strided [N, H, d] inputs (the TMA
// maps take the strides), sparse masks with and without the diagonal and with empty rows.
// Skipped without a device of compute capability 9.x; requests the kernels cannot take fail
// with Status::unsupported (never a silent fallback).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <tuple>
#include <utility>

#include "gpu_test_util.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/estimator.hpp"

namespace proxyattn {
namespace {

namespace kk = proxyattn::kernels;

bool is_hopper() {
  kk::DeviceInfo info;
  int dev = 0;
  return kk::device_count() > 0 && kk::current_device(&dev) == kk::Status::ok &&
         kk::device_info(dev, &info) == kk::Status::ok && info.cc_major == 9;
}

#define REQUIRE_HOPPER()                                                          \
  do {                                                                            \
    PROXYATTN_REQUIRE_GPU();                                                      \
    if (!is_hopper()) GTEST_SKIP() << "the device is not compute capability 9.x"; \
  } while (0)

struct Case {
  int hq, hkv, d;
  int64_t n;
};

std::vector<Case> cases() {
  if (test::small_mode()) return {{2, 2, 64, 131}, {3, 1, 128, 300}};
  return {{2, 2, 64, 1},    {4, 4, 64, 127},   {3, 1, 64, 1031},  {6, 2, 128, 300},
          {8, 2, 128, 257}, {4, 1, 128, 1000}, {2, 2, 128, 4099}, {3, 3, 128, 129}};
}

// [h, n, d] -> [n, h, d] (token stride h d, head stride d).
std::vector<float> interleave(const Tensor3& t) {
  const int64_t h = t.heads(), n = t.tokens(), d = t.dim();
  std::vector<float> out(size_t(h * n * d));
  for (int64_t a = 0; a < h; ++a)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t x = 0; x < d; ++x) out[size_t((r * h + a) * d + x)] = t.storage()[size_t((a * n + r) * d + x)];
  return out;
}

// Random causal CSR mask, block 128: each off-diagonal block kept with probability `density`;
// the diagonal kept except in a few rows that keep an earlier block (every query row still
// attends a key: the CPU reference refuses rows without one).
BlockMask random_mask(int heads, int64_t n, double density, bool drop_some_diagonals) {
  const int nb = num_blocks_for(n, 128);
  std::bernoulli_distribution keep(density), drop(0.2);
  std::vector<std::vector<int32_t>> rows(size_t(heads) * nb);
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i) {
      auto& r = rows[size_t(h) * nb + i];
      for (int j = 0; j < i; ++j)
        if (keep(test::rng())) r.push_back(j);
      if (r.empty() || !(drop_some_diagonals && drop(test::rng()))) r.push_back(i);
    }
  return BlockMask::from_rows(heads, n, 128, rows);
}

class HopperAttention : public ::testing::TestWithParam<std::tuple<Case, DType>> {};

INSTANTIATE_TEST_SUITE_P(Shapes, HopperAttention, ::testing::Combine(::testing::ValuesIn(cases()),
                                                                     ::testing::Values(DType::bf16, DType::f16)),
                         [](const auto& info) {
                           const Case c = std::get<0>(info.param);
                           return "Hq" + std::to_string(c.hq) + "_Hkv" + std::to_string(c.hkv) + "_d" +
                                  std::to_string(c.d) + "_N" + std::to_string(c.n) + "_" +
                                  (std::get<1>(info.param) == DType::bf16 ? "bf16" : "f16");
                         });

TEST_P(HopperAttention, FullMatchesCpuAndPortable) {
  REQUIRE_HOPPER();
  const auto [c, dt] = GetParam();
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, dt),
                v = test::random_rounded(c.hkv, c.n, c.d, dt);
  const AttentionOutput ref = full_attention_cpu(q, k, v);
  const double tol = test::rel_tol(dt);
  const kk::ElemType et = test::elem_of(dt);
  kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt),
                   dv = test::upload16(v.storage(), dt);
  const int64_t no = int64_t(c.hq) * c.n * c.d, nl = int64_t(c.hq) * c.n;
  kk::AttentionParams p = test::attn_params(dq, dk, &dv, dt, c.hq, c.hkv, c.d, c.n, kk::AttnImpl::automatic);

  std::vector<float> portable_o;
  for (kk::AttnImpl impl : {kk::AttnImpl::portable, kk::AttnImpl::hopper})
    for (kk::ElemType ot : {kk::ElemType::f32, et}) {
      kk::DeviceBuffer o = test::poisoned(no, ot), lse = test::poisoned(nl, kk::ElemType::f32);
      p.o = o.data();
      p.out_type = ot;
      p.lse = lse.as<float>();
      p.impl = impl;
      test::kcheck(kk::full_attention(p), "full_attention");
      test::kcheck(kk::synchronize(), "full_attention sync");
      const std::string tag = std::string(kk::attn_impl_name(impl)) + (ot == kk::ElemType::f32 ? " f32" : " 16b");
      const std::vector<float> got = test::download_as_float(o, no, ot);
      test::expect_rel(("O " + tag).c_str(), got, ref.o.storage(), tol);
      test::expect_rel(("LSE " + tag).c_str(), test::download_as_float(lse, nl, kk::ElemType::f32), ref.lse, tol);
      if (ot == kk::ElemType::f32) {
        if (impl == kk::AttnImpl::portable) portable_o = got;
        else test::expect_rel(("O hopper vs portable " + tag).c_str(), got, portable_o, tol);
      }
    }
}

TEST_P(HopperAttention, StridedInputs) {
  REQUIRE_HOPPER();
  const auto [c, dt] = GetParam();
  if (c.n > 1100) GTEST_SKIP() << "covered by the smaller shapes";
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, dt),
                v = test::random_rounded(c.hkv, c.n, c.d, dt);
  const AttentionOutput ref = full_attention_cpu(q, k, v);
  kk::DeviceBuffer dq = test::upload16(interleave(q), dt), dk = test::upload16(interleave(k), dt),
                   dv = test::upload16(interleave(v), dt);
  const int64_t no = int64_t(c.hq) * c.n * c.d, nl = int64_t(c.hq) * c.n;
  kk::DeviceBuffer o = test::poisoned(no, kk::ElemType::f32), lse = test::poisoned(nl, kk::ElemType::f32);
  kk::AttentionParams p = test::attn_params(dq, dk, &dv, dt, c.hq, c.hkv, c.d, c.n, kk::AttnImpl::hopper);
  p.o = o.data();
  p.lse = lse.as<float>();
  p.out_type = kk::ElemType::f32;
  p.q_stride_token = int64_t(c.hq) * c.d;
  p.q_stride_head = c.d;
  p.k_stride_token = p.v_stride_token = int64_t(c.hkv) * c.d;
  p.k_stride_head = p.v_stride_head = c.d;
  test::kcheck(kk::full_attention(p), "full_attention strided");
  test::kcheck(kk::synchronize(), "full_attention strided sync");
  test::expect_rel("O strided", test::download_as_float(o, no, kk::ElemType::f32), ref.o.storage(), test::rel_tol(dt));
  test::expect_rel("LSE strided", test::download_as_float(lse, nl, kk::ElemType::f32), ref.lse, test::rel_tol(dt));
}

TEST_P(HopperAttention, SparseMatchesCpu) {
  REQUIRE_HOPPER();
  const auto [c, dt] = GetParam();
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, dt),
                v = test::random_rounded(c.hkv, c.n, c.d, dt);
  const double tol = test::rel_tol(dt);
  const kk::ElemType et = test::elem_of(dt);
  kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt),
                   dv = test::upload16(v.storage(), dt);
  const int64_t no = int64_t(c.hq) * c.n * c.d, nl = int64_t(c.hq) * c.n;
  for (bool drop : {false, true}) {
    const BlockMask mask = random_mask(c.hq, c.n, 0.35, drop);
    const AttentionOutput ref = sparse_attention_cpu(q, k, v, mask);
    kk::DeviceBuffer ip = test::upload_raw(mask.indptr()), ix = test::upload_raw(mask.indices());
    for (kk::ElemType ot : {kk::ElemType::f32, et}) {
      kk::DeviceBuffer o = test::poisoned(no, ot), lse = test::poisoned(nl, kk::ElemType::f32);
      kk::SparseAttentionParams sp;
      sp.attn = test::attn_params(dq, dk, &dv, dt, c.hq, c.hkv, c.d, c.n, kk::AttnImpl::hopper);
      sp.attn.o = o.data();
      sp.attn.lse = lse.as<float>();
      sp.attn.out_type = ot;
      sp.indptr = ip.as<int32_t>();
      sp.indices = ix.as<int32_t>();
      sp.block = 128;
      test::kcheck(kk::sparse_attention(sp), "sparse_attention");
      test::kcheck(kk::synchronize(), "sparse_attention sync");
      const std::string tag = std::string(drop ? "holes " : "diag ") + (ot == kk::ElemType::f32 ? "f32" : "16b");
      test::expect_rel(("sparse O " + tag).c_str(), test::download_as_float(o, no, ot), ref.o.storage(), tol);
      test::expect_rel(("sparse LSE " + tag).c_str(), test::download_as_float(lse, nl, kk::ElemType::f32), ref.lse,
                       tol);
    }
  }
}

// Prefix mode (the errors of several masks that are prefixes of one rank order, one pass): the
// Hopper kernel's per-(mask, head) errors vs the portable kernel's and vs the CPU's output,
// with rows of no block (O = 0: error 1), of some, and of every block (error of rounding only).
TEST_P(HopperAttention, PrefixErrorsMatchPortable) {
  REQUIRE_HOPPER();
  const auto [c, dt] = GetParam();
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, dt),
                v = test::random_rounded(c.hkv, c.n, c.d, dt);
  const AttentionOutput full = full_attention_cpu(q, k, v);
  const int nb = num_blocks_for(c.n, 128), masks = 4;
  const std::vector<int32_t> order = test::random_rank_order(c.hq, nb);
  std::vector<int32_t> counts(size_t(masks) * c.hq * nb);
  for (int h = 0; h < c.hq; ++h)
    for (int i = 0; i < nb; ++i) {
      for (int m = 0; m < masks; ++m)
        counts[(size_t(m) * c.hq + h) * nb + i] =
            m == 0 ? 0 : m == masks - 1 ? i + 1 : std::uniform_int_distribution<int>(0, i + 1)(test::rng());
    }
  const std::vector<float> full_o(full.o.storage().begin(), full.o.storage().end());
  kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt),
                   dv = test::upload16(v.storage(), dt), ref = test::upload_raw(full_o),
                   d_order = test::upload_raw(order), d_counts = test::upload_raw(counts);
  std::vector<double> ref_sq(size_t(c.hq), 0.0);
  for (int h = 0; h < c.hq; ++h)
    for (int64_t t = 0; t < c.n; ++t)
      for (int64_t x = 0; x < c.d; ++x) ref_sq[size_t(h)] += double(full.o(h, t, x)) * full.o(h, t, x);
  auto run = [&](kk::AttnImpl impl) {
    kk::DeviceBuffer err;
    test::kcheck(err.allocate(size_t(masks) * c.hq * sizeof(double)), "allocate");
    test::kcheck(kk::memset_device(err.data(), 0, err.bytes()), "memset");
    kk::PrefixErrorParams pp;
    pp.attn = test::attn_params(dq, dk, &dv, dt, c.hq, c.hkv, c.d, c.n, impl);
    pp.o_ref = ref.as<float>();
    pp.order = d_order.as<int32_t>();
    pp.counts = d_counts.as<int32_t>();
    pp.masks = masks;
    pp.block = 128;
    pp.sq_diff = err.as<double>();
    test::kcheck(kk::prefix_output_errors(pp), "prefix_output_errors");
    test::kcheck(kk::synchronize(), "prefix_output_errors sync");
    std::vector<double> e(size_t(masks) * c.hq);
    EXPECT_EQ(err.download(e.data(), e.size() * sizeof(double)), kk::Status::ok);
    for (size_t x = 0; x < e.size(); ++x) e[x] = std::sqrt(e[x] / ref_sq[x % size_t(c.hq)]);
    return e;
  };
  const std::vector<double> hopper = run(kk::AttnImpl::hopper), portable = run(kk::AttnImpl::portable);
  const double tol = test::rel_tol(dt);
  for (int m = 0; m < masks; ++m)
    for (int h = 0; h < c.hq; ++h) {
      const size_t x = size_t(m) * c.hq + h;
      ASSERT_TRUE(std::isfinite(hopper[x])) << "mask " << m << " head " << h;
      EXPECT_NEAR(hopper[x], portable[x], tol) << "mask " << m << " head " << h;
      if (m == 0) EXPECT_NEAR(hopper[x], 1.0, 1e-6) << "empty rows, head " << h;
      if (m == masks - 1) EXPECT_LT(hopper[x], tol) << "whole rows, head " << h;
    }
}

// Row LSE of device Q/K (kv_splits 1: one CTA per query tile, as the Hopper kernel needs).
kk::DeviceBuffer row_lse_of(const kk::DeviceBuffer& dq, const kk::DeviceBuffer& dk, DType dt, int hq, int hkv, int d,
                            int64_t n, kk::AttnImpl impl) {
  kk::DeviceBuffer lse = test::poisoned(int64_t(hq) * n, kk::ElemType::f32);
  kk::AttentionParams p = test::attn_params(dq, dk, nullptr, dt, hq, hkv, d, n, impl);
  p.lse = lse.as<float>();
  p.kv_splits = 1;
  test::kcheck(kk::row_lse(p), "row_lse");
  return lse;
}

// block_scores (block 128, keys unsplit) with `reduce`; its status, and the scores when ok.
std::pair<kk::Status, std::vector<float>> block_scores_of(const kk::DeviceBuffer& dq, const kk::DeviceBuffer& dk,
                                                          const kk::DeviceBuffer& lse, DType dt, int hq, int hkv, int d,
                                                          int64_t n, kk::BlockReduce reduce, int stride,
                                                          kk::AttnImpl impl) {
  const int nb = num_blocks_for(n, 128);
  const int64_t ns = int64_t(hq) * nb * nb;
  kk::DeviceBuffer out = test::poisoned(ns, kk::ElemType::f32);
  kk::BlockScoreParams b;
  b.q = dq.data();
  b.k = dk.data();
  b.lse = lse.as<float>();
  b.out = out.as<float>();
  b.in_type = test::elem_of(dt);
  b.q_heads = hq;
  b.kv_heads = hkv;
  b.head_dim = d;
  b.seq_len = n;
  b.block = 128;
  b.query_stride = stride;
  b.reduce = reduce;
  b.key_splits = 1;
  b.impl = impl;
  const kk::Status s = kk::block_scores(b);
  if (s != kk::Status::ok) return {s, {}};
  test::kcheck(kk::synchronize(), "block_scores sync");
  return {s, test::download_as_float(out, ns, kk::ElemType::f32)};
}

// The score passes on Hopper: row LSE (no P V), the block max-pool of P (ProxyAttn's second
// pass) and the block mass, vs the CPU (lse of full attention; maxpool_block_scores and
// block_mass_cpu, one k head per q head) and vs the portable kernels with GQA; the max-pool
// with query strides 1 and 3.
TEST_P(HopperAttention, ScorePassesMatchCpuAndPortable) {
  REQUIRE_HOPPER();
  const auto [c, dt] = GetParam();
  const double tol = test::rel_tol(dt);
  for (bool gqa : {false, true}) {
    const int hq = c.hq, hkv = gqa ? c.hkv : c.hq;
    if (gqa && hkv == hq) continue;
    const Tensor3 q = test::random_rounded(hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(hkv, c.n, c.d, dt);
    kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt);
    const int64_t nl = int64_t(hq) * c.n;
    kk::DeviceBuffer lse_h = row_lse_of(dq, dk, dt, hq, hkv, c.d, c.n, kk::AttnImpl::hopper),
                     lse_p = row_lse_of(dq, dk, dt, hq, hkv, c.d, c.n, kk::AttnImpl::portable);
    const std::vector<float> lh = test::download_as_float(lse_h, nl, kk::ElemType::f32);
    test::expect_rel("hopper row_lse vs portable", lh, test::download_as_float(lse_p, nl, kk::ElemType::f32), tol);
    if (!gqa) {
      Tensor3 v = test::random_rounded(hkv, c.n, c.d, dt);
      test::expect_rel("hopper row_lse vs cpu", lh, full_attention_cpu(q, k, v).lse, tol);
    }
    const std::string kind = gqa ? "gqa" : "mha";
    for (int stride : {1, 3}) {
      auto run = [&](kk::AttnImpl impl, const kk::DeviceBuffer& lse) {
        auto [s, out] = block_scores_of(dq, dk, lse, dt, hq, hkv, c.d, c.n, kk::BlockReduce::max, stride, impl);
        test::kcheck(s, "block_scores max");
        return out;
      };
      const std::vector<float> gh = run(kk::AttnImpl::hopper, lse_h), gp = run(kk::AttnImpl::portable, lse_p);
      const std::string tag = kind + " stride " + std::to_string(stride);
      test::expect_rel(("hopper maxpool vs portable " + tag).c_str(), gh, gp, tol);
      if (!gqa) test::expect_rel(("hopper maxpool vs cpu " + tag).c_str(), gh, maxpool_block_scores(q, k, 128, stride), tol);
    }
    auto run_mass = [&](kk::AttnImpl impl, const kk::DeviceBuffer& lse) {
      auto [s, out] = block_scores_of(dq, dk, lse, dt, hq, hkv, c.d, c.n, kk::BlockReduce::mean_sum, 1, impl);
      test::kcheck(s, "block_scores mass");
      return out;
    };
    const std::vector<float> mh = run_mass(kk::AttnImpl::hopper, lse_h), mp = run_mass(kk::AttnImpl::portable, lse_p);
    test::expect_rel(("hopper mass vs portable " + kind).c_str(), mh, mp, tol);
    if (!gqa) test::expect_rel(("hopper mass vs cpu " + kind).c_str(), mh, block_mass_cpu(q, k, 128).mass, tol);
    // Reproducible: the per-warp sums are added in a fixed order (no atomics).
    EXPECT_EQ(mh, run_mass(kk::AttnImpl::hopper, lse_h)) << "hopper mass " << kind << " differs between two runs";
  }
}

// head_dim 256 (the exact proxy's [hi, lo] fp16 pieces): Hopper's row LSE and block max-pool vs
// the portable kernels, GQA and odd N; the block mass at 256 is refused (the portable kernel
// has it).
TEST(HopperScores, HeadDim256MatchesPortable) {
  REQUIRE_HOPPER();
  for (DType dt : {DType::f16, DType::bf16})
    for (const Case c : {Case{3, 1, 256, 1031}, Case{2, 2, 256, 300}, Case{4, 2, 256, 129}}) {
      const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, dt);
      kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt);
      const double tol = test::rel_tol(dt);
      const int64_t nl = int64_t(c.hq) * c.n;
      kk::DeviceBuffer lse_h = row_lse_of(dq, dk, dt, c.hq, c.hkv, c.d, c.n, kk::AttnImpl::hopper),
                       lse_p = row_lse_of(dq, dk, dt, c.hq, c.hkv, c.d, c.n, kk::AttnImpl::portable);
      const std::string tag = std::string(dt == DType::bf16 ? "bf16" : "f16") + " N " + std::to_string(c.n);
      test::expect_rel(("d256 row_lse " + tag).c_str(), test::download_as_float(lse_h, nl, kk::ElemType::f32),
                       test::download_as_float(lse_p, nl, kk::ElemType::f32), tol);
      for (int stride : {1, 3}) {
        auto [sh, gh] = block_scores_of(dq, dk, lse_h, dt, c.hq, c.hkv, c.d, c.n, kk::BlockReduce::max, stride,
                                        kk::AttnImpl::hopper);
        auto [sp, gp] = block_scores_of(dq, dk, lse_p, dt, c.hq, c.hkv, c.d, c.n, kk::BlockReduce::max, stride,
                                        kk::AttnImpl::portable);
        ASSERT_EQ(sh, kk::Status::ok);
        ASSERT_EQ(sp, kk::Status::ok);
        test::expect_rel(("d256 maxpool " + tag + " stride " + std::to_string(stride)).c_str(), gh, gp, tol);
      }
      EXPECT_EQ(block_scores_of(dq, dk, lse_h, dt, c.hq, c.hkv, c.d, c.n, kk::BlockReduce::mean_sum, 1,
                                kk::AttnImpl::hopper).first,
                kk::Status::unsupported);
    }
}

// fused_block_scores (one pass: per-tile statistics + reduction) vs the CPU and vs the two
// portable passes (row_lse + block_scores): the max-pool (query strides 1 and 3) and the block
// mass of all rows and of the last block alone, unsplit and with the keys split over CTAs
// (forced, and the automatic choice), MHA and GQA. The statistics are exact fp32 (no P rounding),
// so the tolerance is far tighter than the attention outputs'.
TEST_P(HopperAttention, FusedScoresMatchCpuAndTwoPasses) {
  REQUIRE_HOPPER();
  const auto [c, dt] = GetParam();
  const kk::ElemType et = test::elem_of(dt);
  constexpr double tol = 1e-4;
  for (bool gqa : {false, true}) {
    const int hq = c.hq, hkv = gqa ? c.hkv : c.hq;
    if (gqa && hkv == hq) continue;
    const Tensor3 q = test::random_rounded(hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(hkv, c.n, c.d, dt);
    const int nb = num_blocks_for(c.n, 128);
    kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt);
    const int64_t nl = int64_t(hq) * c.n;
    const BlockMass mass_cpu = block_mass_cpu(q, k, 128);
    auto params = [&](kk::BlockReduce reduce, int stride, int rbb, int splits, kk::AttnImpl impl) {
      kk::FusedScoreParams f;
      kk::BlockScoreParams& b = f.scores;
      b.q = dq.data();
      b.k = dk.data();
      b.in_type = et;
      b.q_heads = hq;
      b.kv_heads = hkv;
      b.head_dim = c.d;
      b.seq_len = c.n;
      b.block = 128;
      b.query_stride = stride;
      b.row_block_begin = rbb;
      b.reduce = reduce;
      b.key_splits = splits;
      b.impl = impl;
      return f;
    };
    // Runs one request; returns the scores and the lse of rows [rbb 128, N) (NaN-poisoned elsewhere).
    auto run = [&](kk::FusedScoreParams f, bool expect_one_pass, bool own_workspace = false) {
      const int64_t ns = int64_t(hq) * (nb - f.scores.row_block_begin) * nb;
      kk::DeviceBuffer out = test::poisoned(ns, kk::ElemType::f32), lse = test::poisoned(nl, kk::ElemType::f32);
      bool one = !expect_one_pass;
      f.scores.out = out.as<float>();
      f.lse_out = lse.as<float>();
      f.one_pass = &one;
      kk::DeviceBuffer ws;
      if (own_workspace) {
        const size_t bytes = kk::fused_block_scores_workspace(f);
        EXPECT_EQ(bytes > 0, expect_one_pass);
        test::kcheck(ws.allocate(bytes), "workspace");
        test::kcheck(kk::fill(ws.data(), kk::ElemType::f32, int64_t(bytes / 4), NAN), "poison workspace");
        f.workspace = ws.data();
        f.workspace_bytes = bytes;
      }
      test::kcheck(kk::fused_block_scores(f), "fused_block_scores");
      test::kcheck(kk::synchronize(), "fused_block_scores sync");
      EXPECT_EQ(one, expect_one_pass);
      std::vector<float> l = test::download_as_float(lse, nl, kk::ElemType::f32);
      for (int h = 0; h < hq; ++h)  // keep the rows that were asked for
        l.erase(l.begin() + int64_t(h) * (c.n - 128 * f.scores.row_block_begin),
                l.begin() + int64_t(h) * (c.n - 128 * f.scores.row_block_begin) + 128 * f.scores.row_block_begin);
      return std::make_pair(test::download_as_float(out, ns, kk::ElemType::f32), l);
    };
    for (int stride : {1, 3})
      for (int splits : {1, 3}) {
        const std::string tag = std::string(gqa ? "gqa" : "mha") + " stride " + std::to_string(stride) + " splits " +
                                std::to_string(splits);
        const auto [got, got_lse] = run(params(kk::BlockReduce::max, stride, 0, splits, kk::AttnImpl::hopper), true);
        const auto [ref, ref_lse] = run(params(kk::BlockReduce::max, stride, 0, 0, kk::AttnImpl::portable), false);
        test::expect_rel(("fused maxpool vs two passes " + tag).c_str(), got, ref, tol);
        test::expect_rel(("fused lse vs row_lse " + tag).c_str(), got_lse, ref_lse, tol);
        if (!gqa) test::expect_rel(("fused maxpool vs cpu " + tag).c_str(), got, maxpool_block_scores(q, k, 128, stride), tol);
        // The caller's (NaN-poisoned) workspace gives the same bits as the stream-ordered one.
        const auto [own, own_lse] = run(params(kk::BlockReduce::max, stride, 0, splits, kk::AttnImpl::hopper), true, true);
        EXPECT_EQ(own, got) << tag;
        EXPECT_EQ(own_lse, got_lse) << tag;
      }
    for (int rbb : std::set<int>{0, nb - 1})
      for (int splits : {0, 1, 4}) {
        if (rbb == 0 && splits == 0) continue;  // same as 1 unless the rows are few
        const std::string tag = std::string(gqa ? "gqa" : "mha") + " from block " + std::to_string(rbb) + " splits " +
                                std::to_string(splits);
        const auto [got, got_lse] = run(params(kk::BlockReduce::mean_sum, 1, rbb, splits, kk::AttnImpl::hopper), true);
        const auto [ref, ref_lse] = run(params(kk::BlockReduce::mean_sum, 1, rbb, 0, kk::AttnImpl::portable), false, true);
        test::expect_rel(("fused mass vs two passes " + tag).c_str(), got, ref, tol);
        test::expect_rel(("fused lse vs row_lse " + tag).c_str(), got_lse, ref_lse, tol);
        const std::vector<float> cpu(mass_cpu.mass.begin(), mass_cpu.mass.end());
        std::vector<float> cpu_rows;
        for (int h = 0; h < hq; ++h)
          cpu_rows.insert(cpu_rows.end(), cpu.begin() + (int64_t(h) * nb + rbb) * nb, cpu.begin() + int64_t(h + 1) * nb * nb);
        test::expect_rel(("fused mass vs cpu " + tag).c_str(), got, cpu_rows, tol);
      }
  }
}

// The automatic path of fused_block_scores takes the two passes when its workspace would pass
// the limit, and an explicit hopper request then fails with the reason.
TEST(HopperAttentionApi, FusedScoresFallBackOverTheWorkspaceLimit) {
  REQUIRE_HOPPER();
  const int64_t n = 700;
  const int nb = num_blocks_for(n, 128);
  const Tensor3 q = test::random_rounded(2, n, 64, DType::bf16), k = test::random_rounded(2, n, 64, DType::bf16);
  kk::DeviceBuffer dq = test::upload16(q.storage(), DType::bf16), dk = test::upload16(k.storage(), DType::bf16);
  kk::DeviceBuffer out = test::poisoned(int64_t(2) * nb * nb, kk::ElemType::f32);
  kk::FusedScoreParams f;
  f.scores.q = dq.data();
  f.scores.k = dk.data();
  f.scores.out = out.as<float>();
  f.scores.q_heads = f.scores.kv_heads = 2;
  f.scores.head_dim = 64;
  f.scores.seq_len = n;
  f.scores.reduce = kk::BlockReduce::max;
  f.workspace_limit = 1024;
  bool one = true;
  f.one_pass = &one;
  test::kcheck(kk::fused_block_scores(f), "fused_block_scores (automatic, over the limit)");
  test::kcheck(kk::synchronize(), "sync");
  EXPECT_FALSE(one);
  test::expect_rel("two-pass fallback vs cpu", test::download_as_float(out, int64_t(2) * nb * nb, kk::ElemType::f32),
                   maxpool_block_scores(q, k, 128, 1), 1e-4);
  f.scores.impl = kk::AttnImpl::hopper;
  EXPECT_EQ(kk::fused_block_scores(f), kk::Status::unsupported);
  EXPECT_NE(std::string(kk::last_error_detail()).find("workspace"), std::string::npos) << kk::last_error_detail();
}

// A query block with an empty CSR row gives O = 0 and lse = -inf; the other rows are unaffected.
TEST(HopperAttentionSparse, EmptyRowsGiveZeroAndMinusInf) {
  REQUIRE_HOPPER();
  const DType dt = DType::f16;
  const int hq = 3, hkv = 1, d = 128;
  const int64_t n = test::small_mode() ? 300 : 1001;
  const int nb = num_blocks_for(n, 128);
  const Tensor3 q = test::random_rounded(hq, n, d, dt, 1.5f), k = test::random_rounded(hkv, n, d, dt),
                v = test::random_rounded(hkv, n, d, dt);
  std::vector<std::vector<int32_t>> rows(size_t(hq) * nb), full_rows(size_t(hq) * nb);
  std::vector<uint8_t> empty(size_t(hq) * nb, 0);
  for (int h = 0; h < hq; ++h)
    for (int i = 0; i < nb; ++i) {
      const size_t r = size_t(h) * nb + i;
      for (int j = 0; j <= i; ++j)
        if (j == i || j % 2 == h % 2) full_rows[r].push_back(j);
      empty[r] = (i + h) % 3 == 1;
      if (!empty[r]) rows[r] = full_rows[r];
    }
  const BlockMask mask = BlockMask::from_rows(hq, n, 128, rows);
  const AttentionOutput ref = sparse_attention_cpu(q, k, v, BlockMask::from_rows(hq, n, 128, full_rows));
  kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt),
                   dv = test::upload16(v.storage(), dt);
  kk::DeviceBuffer ip = test::upload_raw(mask.indptr()), ix = test::upload_raw(mask.indices());
  const int64_t no = int64_t(hq) * n * d, nl = int64_t(hq) * n;
  kk::DeviceBuffer o = test::poisoned(no, kk::ElemType::f32), lse = test::poisoned(nl, kk::ElemType::f32);
  kk::SparseAttentionParams sp;
  sp.attn = test::attn_params(dq, dk, &dv, dt, hq, hkv, d, n, kk::AttnImpl::hopper);
  sp.attn.o = o.data();
  sp.attn.lse = lse.as<float>();
  sp.attn.out_type = kk::ElemType::f32;
  sp.indptr = ip.as<int32_t>();
  sp.indices = ix.as<int32_t>();
  sp.block = 128;
  test::kcheck(kk::sparse_attention(sp), "sparse_attention");
  const std::vector<float> go = test::download_as_float(o, no, kk::ElemType::f32),
                           gl = test::download_as_float(lse, nl, kk::ElemType::f32);
  std::vector<float> got_o, ref_o, got_l, ref_l;
  int64_t bad_empty = 0, empty_rows = 0;
  for (int h = 0; h < hq; ++h)
    for (int64_t t = 0; t < n; ++t) {
      const size_t row = size_t(h) * n + t;
      if (empty[size_t(h) * nb + t / 128]) {
        ++empty_rows;
        bool ok = std::isinf(gl[row]) && gl[row] < 0;
        for (int x = 0; x < d; ++x) ok = ok && go[row * d + x] == 0.f;
        bad_empty += ok ? 0 : 1;
        continue;
      }
      got_l.push_back(gl[row]);
      ref_l.push_back(ref.lse[row]);
      for (int x = 0; x < d; ++x) {
        got_o.push_back(go[row * d + x]);
        ref_o.push_back(ref.o.storage()[row * d + x]);
      }
    }
  ASSERT_GT(empty_rows, 0);
  EXPECT_EQ(bad_empty, 0) << "rows of empty query blocks must be O = 0, lse = -inf";
  test::expect_rel("O of the other rows", got_o, ref_o, test::rel_tol(dt));
  test::expect_rel("LSE of the other rows", got_l, ref_l, test::rel_tol(dt));
}

// With the all-causal mask the sparse kernel walks the same tiles as the full one: same bits.
TEST(HopperAttentionCausal, SparseCausalEqualsFullBitwise) {
  REQUIRE_HOPPER();
  const DType dt = DType::bf16;
  const int hq = 4, hkv = 1, d = 128;
  const int64_t n = test::small_mode() ? 300 : 1555;
  const Tensor3 q = test::random_rounded(hq, n, d, dt, 1.5f), k = test::random_rounded(hkv, n, d, dt),
                v = test::random_rounded(hkv, n, d, dt);
  const BlockMask mask = BlockMask::causal(hq, n, 128);
  kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt),
                   dv = test::upload16(v.storage(), dt);
  kk::DeviceBuffer ip = test::upload_raw(mask.indptr()), ix = test::upload_raw(mask.indices());
  const int64_t no = int64_t(hq) * n * d;
  kk::DeviceBuffer of = test::poisoned(no, kk::ElemType::f32), os = test::poisoned(no, kk::ElemType::f32);
  kk::SparseAttentionParams sp;
  sp.attn = test::attn_params(dq, dk, &dv, dt, hq, hkv, d, n, kk::AttnImpl::hopper);
  sp.attn.out_type = kk::ElemType::f32;
  sp.attn.o = of.data();
  test::kcheck(kk::full_attention(sp.attn), "full_attention");
  sp.attn.o = os.data();
  sp.indptr = ip.as<int32_t>();
  sp.indices = ix.as<int32_t>();
  sp.block = 128;
  test::kcheck(kk::sparse_attention(sp), "sparse_attention");
  const std::vector<float> a = test::download_as_float(of, no, kk::ElemType::f32),
                           b = test::download_as_float(os, no, kk::ElemType::f32);
  int64_t differ = 0;
  for (size_t i = 0; i < a.size(); ++i) differ += (a[i] != b[i] || std::isnan(a[i])) ? 1 : 0;
  EXPECT_EQ(differ, 0) << "sparse (causal mask) and full differ in " << differ << " of " << a.size() << " values";
}

// Requests the Hopper kernels cannot take: an explicit `hopper` fails with unsupported and a
// reason; `automatic` falls back to the portable kernels and succeeds.
TEST(HopperAttentionApi, UnsupportedRequestsAreRefused) {
  PROXYATTN_REQUIRE_GPU();
  const DType dt = DType::bf16;
  const int64_t n = 70;
  const Tensor3 q = test::random_rounded(2, n, 256, dt), k = test::random_rounded(2, n, 256, dt);
  kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt);
  kk::DeviceBuffer o = test::poisoned(int64_t(2) * n * 256, kk::ElemType::f32);
  kk::AttentionParams p;
  p.q = dq.data();
  p.k = dk.data();
  p.v = dk.data();
  p.o = o.data();
  p.in_type = kk::ElemType::bf16;
  p.out_type = kk::ElemType::f32;
  p.q_heads = 2;
  p.kv_heads = 2;
  p.head_dim = 256;
  p.seq_len = n;
  p.impl = kk::AttnImpl::hopper;
  EXPECT_EQ(kk::full_attention(p), kk::Status::unsupported);
  EXPECT_NE(std::string(kk::last_error_detail()).find("hopper"), std::string::npos) << kk::last_error_detail();
  p.impl = kk::AttnImpl::automatic;
  test::kcheck(kk::full_attention(p), "full_attention automatic d256");
  p.impl = static_cast<kk::AttnImpl>(7);
  EXPECT_EQ(kk::full_attention(p), kk::Status::invalid_argument);
}

}  // namespace
}  // namespace proxyattn
