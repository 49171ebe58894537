// GPU block-sparse attention vs the CPU reference (sparse_attention_cpu) on random CSR masks
// (diagonal always kept): blocks 64/128, odd N, GQA 1/3/4, head dims 64/128/256, bf16 and fp16,
// NaN-poisoned outputs; with the all-causal mask it must equal full attention.
#include <gtest/gtest.h>

#include <tuple>

#include "gpu_test_util.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/cuda_dispatch.hpp"

namespace proxyattn {
namespace {

namespace kk = proxyattn::kernels;

struct Case {
  int hq, hkv, d, block;
  int64_t n;
  double density;  // chance of each off-diagonal causal block
};

std::vector<Case> cases() {
  if (test::small_mode()) return {{2, 2, 64, 64, 150, 0.5}, {3, 1, 128, 128, 300, 0.4}, {2, 1, 256, 128, 200, 0.5}};
  return {{2, 2, 64, 64, 131, 0.5},    {3, 1, 64, 128, 389, 0.3},   {6, 2, 128, 64, 500, 0.3},
          {8, 2, 128, 128, 1031, 0.2}, {4, 1, 128, 128, 1000, 1.0}, {3, 1, 256, 128, 333, 0.4},
          {4, 4, 256, 64, 257, 0.5},   {4, 1, 128, 64, 64, 0.5}};
}

BlockMask random_mask(int heads, int64_t n, int block, double density) {
  const int nb = num_blocks_for(n, block);
  std::bernoulli_distribution keep(density);
  std::vector<std::vector<int32_t>> rows(size_t(heads) * nb);
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i) {
      auto& r = rows[size_t(h) * nb + i];
      for (int j = 0; j < i; ++j)
        if (keep(test::rng())) r.push_back(j);
      r.push_back(i);
    }
  return BlockMask::from_rows(heads, n, block, rows);
}

class SparseAttention : public ::testing::TestWithParam<std::tuple<Case, DType>> {};

INSTANTIATE_TEST_SUITE_P(Shapes, SparseAttention, ::testing::Combine(::testing::ValuesIn(cases()),
                                                                     ::testing::Values(DType::bf16, DType::f16)),
                         [](const auto& info) {
                           const Case c = std::get<0>(info.param);
                           return "Hq" + std::to_string(c.hq) + "_Hkv" + std::to_string(c.hkv) + "_d" +
                                  std::to_string(c.d) + "_B" + std::to_string(c.block) + "_N" + std::to_string(c.n) +
                                  "_" + (std::get<1>(info.param) == DType::bf16 ? "bf16" : "f16");
                         });

TEST_P(SparseAttention, MatchesCpuReference) {
  PROXYATTN_REQUIRE_GPU();
  const auto [c, dt] = GetParam();
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, dt),
                v = test::random_rounded(c.hkv, c.n, c.d, dt);
  const BlockMask mask = random_mask(c.hq, c.n, c.block, c.density);
  const AttentionOutput ref = sparse_attention_cpu(q, k, v, mask);
  const double tol = test::rel_tol(dt);
  const kk::ElemType et = test::elem_of(dt);
  kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt),
                   dv = test::upload16(v.storage(), dt);
  kk::DeviceBuffer ip = test::upload_raw(mask.indptr()), ix = test::upload_raw(mask.indices());
  const int64_t no = int64_t(c.hq) * c.n * c.d, nl = int64_t(c.hq) * c.n;
  for (kk::ElemType ot : {kk::ElemType::f32, et}) {
    kk::DeviceBuffer o = test::poisoned(no, ot), lse = test::poisoned(nl, kk::ElemType::f32);
    kk::SparseAttentionParams sp;  // the portable kernel; Hopper: test_hopper_attention.cpp
    sp.attn = test::attn_params(dq, dk, &dv, dt, c.hq, c.hkv, c.d, c.n, kk::AttnImpl::portable);
    sp.attn.o = o.data();
    sp.attn.lse = lse.as<float>();
    sp.attn.out_type = ot;
    sp.indptr = ip.as<int32_t>();
    sp.indices = ix.as<int32_t>();
    sp.block = c.block;
    test::kcheck(kk::sparse_attention(sp), "sparse_attention");
    test::kcheck(kk::synchronize(), "sparse_attention sync");
    const char* tag = ot == kk::ElemType::f32 ? "f32" : "16b";
    test::expect_rel((std::string("sparse O ") + tag).c_str(), test::download_as_float(o, no, ot), ref.o.storage(), tol);
    test::expect_rel((std::string("sparse LSE ") + tag).c_str(), test::download_as_float(lse, nl, kk::ElemType::f32),
                     ref.lse, tol);
  }
}

// All-causal mask through the dispatch == full attention (CPU and GPU).
TEST(SparseAttentionDispatch, CausalMaskEqualsFull) {
  PROXYATTN_REQUIRE_GPU();
  for (int block : {64, 128}) {
    const DType dt = DType::bf16;
    const int64_t n = test::small_mode() ? 200 : 777;
    const Tensor3 q = test::random_rounded(4, n, 128, dt, 1.5f), k = test::random_rounded(1, n, 128, dt),
                  v = test::random_rounded(1, n, 128, dt);
    const AttentionOutput full = full_attention_cpu(q, k, v);
    CudaLayer layer(q, k, v, dt);
    const AttentionOutput sp = layer.sparse_attention(BlockMask::causal(4, n, block));
    const AttentionOutput gf = layer.full_attention();
    test::expect_rel("causal sparse vs cpu full", sp.o.storage(), full.o.storage(), test::rel_tol(dt));
    test::expect_rel("causal sparse vs gpu full", sp.o.storage(), gf.o.storage(), test::rel_tol(dt));
    test::expect_rel("causal sparse LSE", sp.lse, full.lse, test::rel_tol(dt));
  }
}

}  // namespace
}  // namespace proxyattn
