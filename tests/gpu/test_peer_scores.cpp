// GPU estimators vs the CPU specs (make_estimator): pooled, xattn, vslash (peer_*.cu), the
// score-only native selections and the CSR of a bitmap (peer_select.cu), and the exact ProxyAttn
// path (proxy_scores_exact). Fresh random inputs rounded through the device dtype (so the CPU and
// the GPU see the same values), odd N, GQA 1/3/4, head dims 64/128/256, blocks 64/128, bf16 and
// fp16; every output poisoned before the run (NaN for floats, 0xAB / 0xFF for bytes / counts) so
// an entry left unwritten fails.
//
// Tolerances. The operand-dtype tolerance of issue 5 (1e-2 bf16, 2e-3 fp16) is the ceiling; the
// estimators here compute on exactly representable operands with fp32 accumulation, so they are
// also held to kTight (1e-4 relative, ~100x float rounding). Native masks must equal the CPU's;
// the one documented exception is a near tie of the CPU's own decision (a coverage sum within
// 1e-5 of its threshold, or two scores within 1e-5 of each other at the cut), which float
// rounding may decide either way: such rows are counted and printed, never silently accepted
// elsewhere.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <tuple>

#include "gpu_test_util.hpp"
#include "proxyattn/budget.hpp"
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/select.hpp"

namespace proxyattn {
namespace {

namespace kk = proxyattn::kernels;

constexpr double kTight = 1e-4;
constexpr double kTieEps = 1e-5;

struct Case {
  int hq, hkv, d, block;
  int64_t n;
};

std::vector<Case> cases() {
  // compute-sanitizer (racecheck is ~100x slower): small N, every code path still taken
  if (test::small_mode()) return {{2, 2, 64, 64, 131}, {3, 1, 128, 128, 200}, {4, 1, 256, 64, 131}};
  return {{2, 2, 64, 64, 389},   {3, 1, 128, 128, 1001}, {8, 2, 128, 64, 517},
          {4, 1, 256, 128, 389}, {6, 2, 64, 128, 1001},  {4, 4, 256, 64, 263}};
}

std::string case_name(const Case& c, DType dt) {
  return "Hq" + std::to_string(c.hq) + "_Hkv" + std::to_string(c.hkv) + "_d" + std::to_string(c.d) + "_B" +
         std::to_string(c.block) + "_N" + std::to_string(c.n) + "_" + (dt == DType::bf16 ? "bf16" : "f16");
}

class PeerScoresTest : public ::testing::TestWithParam<std::tuple<Case, DType>> {
 protected:
  void SetUp() override {
    if (kk::device_count() == 0) GTEST_SKIP() << "no CUDA device";
    std::tie(c, dt) = GetParam();
    q = test::random_rounded(c.hq, c.n, c.d, dt, 1.5f);
    k = test::random_rounded(c.hkv, c.n, c.d, dt);
    dq = test::upload16(q.storage(), dt);
    dk = test::upload16(k.storage(), dt);
    nb = num_blocks_for(c.n, c.block);
  }
  kk::PeerInput input() const {
    kk::PeerInput p;
    p.q = dq.data();
    p.k = dk.data();
    p.in_type = test::elem_of(dt);
    p.q_heads = c.hq;
    p.kv_heads = c.hkv;
    p.head_dim = c.d;
    p.seq_len = c.n;
    return p;
  }
  size_t cells() const { return size_t(c.hq) * nb * nb; }
  std::string what(const std::string& s) const { return s + " " + case_name(c, dt); }

  Case c{};
  DType dt = DType::bf16;
  Tensor3 q, k;
  kk::DeviceBuffer dq, dk;
  int nb = 0;
};
INSTANTIATE_TEST_SUITE_P(Shapes, PeerScoresTest,
                         ::testing::Combine(::testing::ValuesIn(cases()), ::testing::Values(DType::bf16, DType::f16)),
                         [](const auto& info) { return case_name(std::get<0>(info.param), std::get<1>(info.param)); });

// Both tolerances: the operand ceiling and the tight one.
void expect_scores(const std::string& what, const std::vector<float>& got, const std::vector<float>& ref, DType dt,
                   double tight = kTight) {
  test::expect_rel(what.c_str(), got, ref, std::min(test::rel_tol(dt), tight));
  // Entries above the diagonal are 0 on both sides; report the worst element too.
  size_t worst = 0;
  double wd = 0;
  for (size_t x = 0; x < std::min(got.size(), ref.size()); ++x) {
    const double dd = std::abs(double(got[x]) - double(ref[x]));
    if (!(dd <= wd)) wd = dd, worst = x;
  }
  if (!got.empty()) std::printf("[ worst    ] %s: index %zu got %.9g ref %.9g\n", what.c_str(), worst, got[worst], ref[worst]);
}

// Device bitmap + row counts (poisoned first) -> BlockMask; checks the counts.
BlockMask mask_from_device(const kk::DeviceBuffer& bm, const kk::DeviceBuffer& counts, int heads, int64_t n, int block,
                           const std::string& what) {
  const int nb = num_blocks_for(n, block);
  const size_t cells = size_t(heads) * nb * nb, rows = size_t(heads) * nb;
  std::vector<uint8_t> bits(cells);
  std::vector<int32_t> cnt(rows);
  EXPECT_EQ(bm.download(bits.data(), cells), kk::Status::ok);
  EXPECT_EQ(counts.download(cnt.data(), rows * 4), kk::Status::ok);
  size_t bad_bits = 0, bad_counts = 0;
  for (size_t r = 0; r < rows; ++r) {
    int32_t s = 0;
    for (int j = 0; j < nb; ++j) {
      const uint8_t b = bits[r * nb + j];
      if (b > 1 || (j > int(r % nb) && b != 0)) ++bad_bits;
      s += b == 1 ? 1 : 0;
    }
    if (s != cnt[r]) {
      if (bad_counts == 0) ADD_FAILURE() << what << ": row " << r << " count " << cnt[r] << " but bitmap has " << s;
      ++bad_counts;
    }
  }
  EXPECT_EQ(bad_bits, 0u) << what << ": bitmap entries not 0/1 or set above the diagonal (unwritten poison?)";
  EXPECT_EQ(bad_counts, 0u) << what << ": row counts differ from the bitmap";
  for (uint8_t& b : bits) b = b == 1 ? 1 : 0;
  for (size_t r = 0; r < rows; ++r)
    for (int j = int(r % nb) + 1; j < nb; ++j) bits[r * nb + j] = 0;
  return BlockMask::from_bitmap(heads, n, block, bits);
}

// Whether row (h, i) of the CPU's native decision is a near tie (see the file comment).
// cumulative: sorted values, positive total T, CPU count c = fewest reaching gamma*T.
// xattn: the forced pair first, then descending while the mass is < tau * row total.
bool near_tie(const BlockScores& cpu, int h, int i, bool xattn, double thr) {
  const float* w = cpu.row(h, i);
  std::vector<int> idx(i + 1);
  std::iota(idx.begin(), idx.end(), 0);
  if (xattn) idx.erase(std::remove_if(idx.begin(), idx.end(), [&](int j) { return j == 0 || j == i; }), idx.end());
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return w[a] > w[b]; });
  double total = 0, acc = 0;
  if (xattn) {
    for (int j = 0; j <= i; ++j) total += w[j];
    acc = w[0] + (i > 0 ? w[i] : 0.0);
  } else {
    for (int j : idx) total += w[j] > 0 ? w[j] : 0.0;
  }
  if (total <= 0) return false;
  const double target = thr * total;
  double margin = std::abs(acc - target);
  for (size_t r = 0; r < idx.size(); ++r) {
    acc += w[idx[r]];
    margin = std::min(margin, std::abs(acc - target));
    if (r + 1 < idx.size()) margin = std::min(margin, std::abs(double(w[idx[r]]) - w[idx[r + 1]]));
  }
  return margin <= kTieEps * total;
}

// got == ref, except rows that are near ties of the CPU decision (counted, printed).
void expect_same_mask(const std::string& what, const BlockMask& got, const BlockMask& ref, const BlockScores* cpu = nullptr,
                      bool xattn = false, double thr = 0) {
  ASSERT_EQ(got.heads(), ref.heads()) << what;
  ASSERT_EQ(got.num_blocks(), ref.num_blocks()) << what;
  int diff = 0, ties = 0;
  for (int h = 0; h < ref.heads(); ++h)
    for (int i = 0; i < ref.num_blocks(); ++i) {
      const auto a = got.row(h, i), b = ref.row(h, i);
      if (std::equal(a.begin(), a.end(), b.begin(), b.end())) continue;
      if (cpu && near_tie(*cpu, h, i, xattn, thr)) {
        ++ties;
        continue;
      }
      if (diff++ == 0) {
        std::string sa, sb;
        for (int32_t j : a) sa += std::to_string(j) + " ";
        for (int32_t j : b) sb += std::to_string(j) + " ";
        ADD_FAILURE() << what << ": first differing row h " << h << " i " << i << "\n  gpu: " << sa << "\n  cpu: " << sb;
      }
    }
  std::printf("[ mask     ] %-40s differing rows %d, near-tie rows %d (of %d)\n", what.c_str(), diff, ties,
              ref.heads() * ref.num_blocks());
  EXPECT_EQ(diff, 0) << what;
}

// ---- pooled ----

TEST_P(PeerScoresTest, PooledKernelMatchesCpu) {
  for (bool global : {false, true}) {
    EstimatorConfig cfg;
    cfg.block = c.block;
    cfg.pooled.gamma = 0.9;
    cfg.pooled.global = global;
    const BlockScores ref = make_estimator("pooled")->estimate(q, k, cfg);
    if (!global) {
      kk::DeviceBuffer out = test::poisoned(int64_t(cells()), kk::ElemType::f32);
      kk::PooledScoreParams p;
      p.in = input();
      p.block = c.block;
      p.out = out.as<float>();
      test::kcheck(kk::pooled_scores(p), "pooled_scores");
      test::kcheck(kk::synchronize(), "synchronize");
      expect_scores(what("pooled kernel"), test::download_as_float(out, int64_t(cells()), kk::ElemType::f32), ref.score,
                    dt, 1e-5);
    }
    const BlockScores got = CudaLayer(q, k, {}, dt).pooled_scores(cfg);
    expect_scores(what(global ? "pooled layer global" : "pooled layer"), got.score, ref.score, dt, 1e-5);
    ASSERT_TRUE(got.native && ref.native);
    expect_same_mask(what(global ? "pooled native global" : "pooled native"), *got.native, *ref.native,
                     global ? nullptr : &ref, false, cfg.pooled.gamma);
  }
}

// ---- xattn ----

TEST_P(PeerScoresTest, XAttnKernelMatchesCpu) {
  for (int stride : {8, 16, 4}) {
    if (test::small_mode() && stride == 4) continue;
    EstimatorConfig cfg;
    cfg.block = c.block;
    cfg.xattn.stride = stride;
    cfg.xattn.tau = 0.9;
    const BlockScores ref = make_estimator("xattn")->estimate(q, k, cfg);
    kk::DeviceBuffer out = test::poisoned(int64_t(cells()), kk::ElemType::f32);
    kk::XAttnScoreParams p;
    p.in = input();
    p.block = c.block;
    p.stride = stride;
    p.out = out.as<float>();
    test::kcheck(kk::xattn_scores(p), "xattn_scores");
    test::kcheck(kk::synchronize(), "synchronize");
    const std::string s = "xattn S" + std::to_string(stride);
    expect_scores(what(s + " kernel"), test::download_as_float(out, int64_t(cells()), kk::ElemType::f32), ref.score, dt);
    // Rows of W sum to 1.
    const BlockScores got = CudaLayer(q, k, {}, dt).xattn_scores(cfg);
    double worst = 0;
    for (int h = 0; h < c.hq; ++h)
      for (int i = 0; i < nb; ++i) {
        double sum = 0;
        for (int j = 0; j < nb; ++j) sum += got.at(h, i, j);
        worst = std::max(worst, std::abs(sum - 1.0));
      }
    EXPECT_LE(worst, 1e-4) << what(s) << ": a row of W does not sum to 1";
    expect_scores(what(s + " layer"), got.score, ref.score, dt);
    ASSERT_TRUE(got.native && ref.native);
    expect_same_mask(what(s + " native"), *got.native, *ref.native, &ref, true, cfg.xattn.tau);
  }
}

// ---- score-only native selections on the device ----

TEST_P(PeerScoresTest, NativeSelectMatchesHostRule) {
  for (const char* method : {"pooled", "xattn"}) {
    for (double thr : {0.9, 0.5, 1.0}) {
      EstimatorConfig cfg;
      cfg.block = c.block;
      cfg.pooled.gamma = thr;
      cfg.xattn.tau = thr;
      BlockScores s = make_estimator(method)->estimate(q, k, cfg);
      // Device rule on the CPU scores vs the CPU rule on the same scores, through the raw
      // launchers with poisoned outputs.
      kk::DeviceBuffer sc = test::upload_raw(s.score);
      kk::DeviceBuffer bm, counts, ip, ix;
      ASSERT_EQ(bm.allocate(cells()), kk::Status::ok);
      ASSERT_EQ(counts.allocate(size_t(c.hq) * nb * 4), kk::Status::ok);
      ASSERT_EQ(kk::memset_device(bm.data(), 0xAB, cells()), kk::Status::ok);
      ASSERT_EQ(kk::memset_device(counts.data(), 0xFF, size_t(c.hq) * nb * 4), kk::Status::ok);
      kk::NativeSelectParams p;
      p.scores = sc.as<float>();
      p.heads = c.hq;
      p.num_blocks = nb;
      p.rule = std::string(method) == "xattn" ? kk::NativeRule::xattn : kk::NativeRule::cumulative;
      p.threshold = thr;
      p.bitmap = bm.as<uint8_t>();
      p.row_counts = counts.as<int32_t>();
      test::kcheck(kk::native_select(p), "native_select");
      test::kcheck(kk::synchronize(), "synchronize");
      const std::string w = what(std::string(method) + " native_select thr " + std::to_string(thr).substr(0, 4));
      const BlockMask got = mask_from_device(bm, counts, c.hq, c.n, c.block, w);
      expect_same_mask(w, got, *s.native, &s, std::string(method) == "xattn", thr);
      // CSR from the bitmap, poisoned indptr / indices.
      const size_t rows = size_t(c.hq) * nb;
      ASSERT_EQ(ip.allocate((rows + 1) * 4), kk::Status::ok);
      ASSERT_EQ(kk::memset_device(ip.data(), 0xFF, (rows + 1) * 4), kk::Status::ok);
      kk::CsrParams cp;
      cp.bitmap = bm.as<uint8_t>();
      cp.row_counts = counts.as<int32_t>();
      cp.heads = c.hq;
      cp.num_blocks = nb;
      cp.indptr = ip.as<int32_t>();
      test::kcheck(kk::csr_indptr(cp), "csr_indptr");
      std::vector<int32_t> indptr(rows + 1);
      ASSERT_EQ(ip.download(indptr.data(), indptr.size() * 4), kk::Status::ok);
      ASSERT_EQ(indptr, got.indptr()) << w << ": csr_indptr";
      ASSERT_EQ(ix.allocate(size_t(indptr.back()) * 4 + 16), kk::Status::ok);
      ASSERT_EQ(kk::memset_device(ix.data(), 0xFF, size_t(indptr.back()) * 4 + 16), kk::Status::ok);
      cp.indices = ix.as<int32_t>();
      test::kcheck(kk::csr_fill(cp), "csr_fill");
      std::vector<int32_t> indices(size_t(indptr.back()));
      ASSERT_EQ(ix.download(indices.data(), indices.size() * 4), kk::Status::ok);
      EXPECT_EQ(indices, got.indices()) << w << ": csr_fill";
      // The dispatch helper (upload, select, CSR) gives the same mask.
      EXPECT_EQ(native_select_cuda(s, cfg), got) << w << ": native_select_cuda";
    }
  }
}

// ---- vslash ----

TEST_P(PeerScoresTest, VSlashKernelMatchesCpu) {
  struct V {
    int last_q;
    int64_t vertical, slash;
    int sink, local;
  };
  // Counts below N so the top-k selections bind; the defaults (all columns at these N) too.
  const int64_t n = c.n;
  std::vector<V> vs = {{64, n / 7 + 1, n / 5 + 3, 5, 11}, {100, n / 3, n / 2, 30, 100}, {64, 1000, 6096, 30, 100}};
  if (test::small_mode()) vs.resize(2);
  for (const V& v : vs) {
    EstimatorConfig cfg;
    cfg.block = c.block;
    cfg.vslash.last_q = v.last_q;
    cfg.vslash.vertical = v.vertical;
    cfg.vslash.slash = v.slash;
    cfg.vslash.sink_columns = v.sink;
    cfg.vslash.local_diagonals = v.local;
    const BlockScores ref = make_estimator("vslash")->estimate(q, k, cfg);
    const std::string s = "vslash L" + std::to_string(v.last_q) + " v" + std::to_string(v.vertical) + " s" +
                          std::to_string(v.slash);
    kk::DeviceBuffer out = test::poisoned(int64_t(cells()), kk::ElemType::f32);
    kk::DeviceBuffer vert = test::poisoned(int64_t(c.hq) * n, kk::ElemType::f32);
    kk::DeviceBuffer slash = test::poisoned(int64_t(c.hq) * n, kk::ElemType::f32);
    kk::DeviceBuffer bm, counts;
    ASSERT_EQ(bm.allocate(cells()), kk::Status::ok);
    ASSERT_EQ(counts.allocate(size_t(c.hq) * nb * 4), kk::Status::ok);
    ASSERT_EQ(kk::memset_device(bm.data(), 0xAB, cells()), kk::Status::ok);
    ASSERT_EQ(kk::memset_device(counts.data(), 0xFF, size_t(c.hq) * nb * 4), kk::Status::ok);
    kk::VSlashParams p;
    p.in = input();
    p.block = c.block;
    p.last_q = v.last_q;
    p.vertical = v.vertical;
    p.slash = v.slash;
    p.sink_columns = v.sink;
    p.local_diagonals = v.local;
    p.out = out.as<float>();
    p.bitmap = bm.as<uint8_t>();
    p.row_counts = counts.as<int32_t>();
    p.vertical_out = vert.as<float>();
    p.slash_out = slash.as<float>();
    test::kcheck(kk::vslash_scores(p), "vslash_scores");
    test::kcheck(kk::synchronize(), "synchronize");
    expect_scores(what(s + " kernel"), test::download_as_float(out, int64_t(cells()), kk::ElemType::f32), ref.score, dt);
    // vertical and slash are means of probability rows: each sums to 1 per head.
    const std::vector<float> vv = test::download_as_float(vert, int64_t(c.hq) * n, kk::ElemType::f32);
    const std::vector<float> sv = test::download_as_float(slash, int64_t(c.hq) * n, kk::ElemType::f32);
    for (int h = 0; h < c.hq; ++h) {
      double a = 0, b = 0;
      for (int64_t t = 0; t < n; ++t) {
        a += vv[size_t(h) * n + t];
        b += sv[size_t(h) * n + t];
      }
      EXPECT_NEAR(a, 1.0, 1e-4) << what(s) << ": vertical of head " << h << " does not sum to 1";
      EXPECT_NEAR(b, 1.0, 1e-4) << what(s) << ": slash of head " << h << " does not sum to 1";
    }
    const BlockMask got = mask_from_device(bm, counts, c.hq, n, c.block, what(s));
    ASSERT_TRUE(ref.native);
    expect_same_mask(what(s + " native"), got, *ref.native);
    const BlockScores lay = CudaLayer(q, k, {}, dt).vslash_scores(cfg);
    expect_scores(what(s + " layer"), lay.score, ref.score, dt);
    ASSERT_TRUE(lay.native);
    expect_same_mask(what(s + " layer native"), *lay.native, *ref.native);
  }
}

// ---- ProxyAttn, exact path ----

TEST_P(PeerScoresTest, ProxyExactMatchesCpu) {
  struct P {
    int groups, stride;
    ProxyPool pool;
  };
  std::vector<P> ps = {{1, 1, ProxyPool::mean}, {c.hq, 1, ProxyPool::mean}, {1, 3, ProxyPool::max_norm}};
  if (c.hq % 2 == 0) ps.push_back({2, 2, ProxyPool::mean});
  if (test::small_mode()) ps.resize(2);
  const CudaLayer layer(q, k, {}, dt);
  for (const P& pp : ps) {
    EstimatorConfig cfg;
    cfg.block = c.block;
    cfg.proxy.groups = pp.groups;
    cfg.proxy.query_stride = pp.stride;
    cfg.proxy.pool = pp.pool;
    const std::string s = "proxy exact g" + std::to_string(pp.groups) + " s" + std::to_string(pp.stride) +
                          (pp.pool == ProxyPool::mean ? " mean" : " maxnorm");
    const BlockScores ref = make_estimator("proxy")->estimate(q, k, cfg);
    // Raw launcher on poisoned output for the mean pooling.
    if (pp.pool == ProxyPool::mean) {
      const int per = c.hq / pp.groups, r = c.hq / c.hkv;
      kk::DeviceBuffer out = test::poisoned(int64_t(pp.groups) * nb * nb, kk::ElemType::f32);
      kk::ProxyExactParams pe;
      pe.in = input();
      pe.groups = pp.groups;
      for (int g = 0; g < pp.groups; ++g) {
        pe.q_begin[g] = g * per;
        pe.q_end[g] = (g + 1) * per;
        pe.k_begin[g] = g * per / r;
        pe.k_end[g] = ((g + 1) * per - 1) / r + 1;
      }
      pe.block = c.block;
      pe.query_stride = pp.stride;
      pe.out = out.as<float>();
      test::kcheck(kk::proxy_scores_exact(pe), "proxy_scores_exact");
      test::kcheck(kk::synchronize(), "synchronize");
      const std::vector<float> gs = test::download_as_float(out, int64_t(pp.groups) * nb * nb, kk::ElemType::f32);
      std::vector<float> per_head(ref.score.size());
      const size_t per_group = size_t(nb) * nb;
      for (int h = 0; h < c.hq; ++h)
        std::copy_n(gs.begin() + size_t(h / per) * per_group, per_group, per_head.begin() + size_t(h) * per_group);
      expect_scores(what(s + " kernel"), per_head, ref.score, dt, 1e-5);
    }
    const BlockScores got = layer.proxy_scores(cfg);
    EXPECT_EQ(got.group_of_head, ref.group_of_head) << what(s);
    expect_scores(what(s), got.score, ref.score, dt, 1e-5);
    // Budgets that read the scores and the selections built from them: identical.
    BudgetConfig bc;
    bc.gamma = 0.9;
    const Budgets dyn = make_budget("dynamic")->compute(q, k, ref, bc);
    expect_same_mask(what(s + " dynamic selection"), select_blocks(got, dyn), select_blocks(ref, dyn));
    const Budgets cum_ref = make_budget("cumulative")->compute(q, k, ref, bc);
    const Budgets cum_got = make_budget("cumulative")->compute(q, k, got, bc);
    EXPECT_EQ(cum_got.per_row_k, cum_ref.per_row_k) << what(s) << ": cumulative budgets differ";
    expect_same_mask(what(s + " cumulative selection"), select_blocks(got, cum_got), select_blocks(ref, cum_ref));
  }
}

// The operand-precision proxy path keeps its own (looser) contract: see test_block_scores.cpp.

TEST(PeerScores, EstimateByName) {
  PROXYATTN_REQUIRE_GPU();
  const DType dt = DType::f16;
  const Tensor3 q = test::random_rounded(4, 301, 64, dt, 1.5f), k = test::random_rounded(2, 301, 64, dt);
  const CudaLayer layer(q, k, {}, dt);
  EstimatorConfig cfg;
  cfg.block = 64;
  for (const std::string& name : estimator_names()) {
    if (!CudaLayer::has_estimator(name)) {
      EXPECT_THROW(layer.estimate(name, cfg), Error) << name;
      continue;
    }
    const BlockScores got = layer.estimate(name, cfg), ref = make_estimator(name)->estimate(q, k, cfg);
    EXPECT_EQ(got.method, ref.method);
    EXPECT_EQ(got.heads, ref.heads);
    EXPECT_EQ(got.num_blocks, ref.num_blocks);
    EXPECT_EQ(got.native.has_value(), ref.native.has_value()) << name;
    test::expect_rel(("estimate " + name).c_str(), got.score, ref.score, test::rel_tol(dt));
  }
  EXPECT_THROW(layer.estimate("nope", cfg), Error);
}

}  // namespace
}  // namespace proxyattn
