// GPU full causal attention and row LSE vs the CPU reference (attention.hpp) on fresh random
// inputs rounded through the device dtype: odd N, GQA 1/3/4, head dims 64/128/256, bf16 and
// fp16, NaN-poisoned outputs, every tile variant, O in f32 and in the operand dtype; the sliding
// window (Gemma-3 local layers) against sliding_attention_cpu; the host's 16-bit rounding against
// the device's conversion.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <span>
#include <tuple>

#include "gpu_test_util.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/cuda_dispatch.hpp"

namespace proxyattn {
namespace {

namespace kk = proxyattn::kernels;

struct Case {
  int hq, hkv, d;
  int64_t n;
};

std::vector<Case> cases() {
  if (test::small_mode()) return {{2, 2, 64, 37}, {3, 1, 128, 130}, {4, 1, 256, 67}};
  return {{2, 2, 64, 1},   {4, 4, 64, 127},  {6, 2, 128, 300},  {8, 2, 128, 257},
          {3, 1, 256, 129}, {4, 1, 128, 1000}, {2, 2, 256, 333}, {4, 1, 64, 2049}};
}

class FullAttention : public ::testing::TestWithParam<std::tuple<Case, DType>> {};

INSTANTIATE_TEST_SUITE_P(Shapes, FullAttention, ::testing::Combine(::testing::ValuesIn(cases()),
                                                                   ::testing::Values(DType::bf16, DType::f16)),
                         [](const auto& info) {
                           const Case c = std::get<0>(info.param);
                           return "Hq" + std::to_string(c.hq) + "_Hkv" + std::to_string(c.hkv) + "_d" +
                                  std::to_string(c.d) + "_N" + std::to_string(c.n) + "_" +
                                  (std::get<1>(info.param) == DType::bf16 ? "bf16" : "f16");
                         });

// Outputs [heads, n, width] computed from row row_begin = rb on (decoding with a cache): rows
// before rb must stay NaN (the buffer's poison: never written), rows from rb match the reference.
void expect_rows_from(std::span<const float> got, std::span<const float> ref, int heads, int64_t n, int width,
                      int64_t rb, double tol, const std::string& what) {
  std::vector<float> got_tail, ref_tail;
  int64_t untouched = 0;
  for (int h = 0; h < heads; ++h)
    for (int64_t t = 0; t < n; ++t)
      for (int x = 0; x < width; ++x) {
        const size_t i = (size_t(h) * n + t) * width + x;
        if (t < rb) {
          untouched += std::isnan(got[i]) ? 1 : 0;
        } else {
          got_tail.push_back(got[i]);
          ref_tail.push_back(ref[i]);
        }
      }
  EXPECT_EQ(untouched, int64_t(heads) * rb * width) << what << ": rows before row_begin were written";
  test::expect_rel(what.c_str(), got_tail, ref_tail, tol);
}

TEST_P(FullAttention, MatchesCpuReference) {
  PROXYATTN_REQUIRE_GPU();
  const auto [c, dt] = GetParam();
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, dt),
                v = test::random_rounded(c.hkv, c.n, c.d, dt);
  const AttentionOutput ref = full_attention_cpu(q, k, v);
  const double tol = test::rel_tol(dt);
  const kk::ElemType et = test::elem_of(dt);
  kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt),
                   dv = test::upload16(v.storage(), dt);
  const int64_t no = int64_t(c.hq) * c.n * c.d, nl = int64_t(c.hq) * c.n;

  // The portable kernels; the Hopper ones: test_hopper_attention.cpp.
  kk::AttentionParams p = test::attn_params(dq, dk, &dv, dt, c.hq, c.hkv, c.d, c.n, kk::AttnImpl::portable);

  const int variants = c.d == 128 ? 4 : 1;
  for (int variant = 0; variant < variants; ++variant)
    for (kk::ElemType ot : {kk::ElemType::f32, et}) {
      kk::DeviceBuffer o = test::poisoned(no, ot), lse = test::poisoned(nl, kk::ElemType::f32);
      p.o = o.data();
      p.out_type = ot;
      p.lse = lse.as<float>();
      p.variant = variant;
      test::kcheck(kk::full_attention(p), "full_attention");
      test::kcheck(kk::synchronize(), "full_attention sync");
      const std::string tag = "v" + std::to_string(variant) + (ot == kk::ElemType::f32 ? " f32" : " 16b");
      test::expect_rel(("O " + tag).c_str(), test::download_as_float(o, no, ot), ref.o.storage(), tol);
      test::expect_rel(("LSE " + tag).c_str(), test::download_as_float(lse, nl, kk::ElemType::f32), ref.lse, tol);
    }

  // Row LSE only: keys split automatically (0), never (1), in 3 or 7 parts, and from a row_begin.
  for (int splits : {0, 1, 3, 7}) {
    kk::DeviceBuffer lse = test::poisoned(nl, kk::ElemType::f32);
    kk::AttentionParams pl = p;
    pl.o = nullptr;
    pl.v = nullptr;
    pl.lse = lse.as<float>();
    pl.variant = 0;
    pl.kv_splits = splits;
    test::kcheck(kk::row_lse(pl), "row_lse");
    test::expect_rel(("row_lse splits " + std::to_string(splits)).c_str(),
                     test::download_as_float(lse, nl, kk::ElemType::f32), ref.lse, tol);
    if (c.n > 2) {
      const int64_t rb = c.n - c.n / 3 - 1;
      pl.row_begin = rb;
      kk::DeviceBuffer lse2 = test::poisoned(nl, kk::ElemType::f32);
      pl.lse = lse2.as<float>();
      test::kcheck(kk::row_lse(pl), "row_lse row_begin");
      expect_rows_from(test::download_as_float(lse2, nl, kk::ElemType::f32), ref.lse, c.hq, c.n, 1, rb, tol,
                       "row_lse rows >= row_begin, splits " + std::to_string(splits));
    }
  }
  // A row range: rows before row_begin stay untouched (NaN), the rest match.
  if (c.n > 2) {
    const int64_t rb = c.n / 2 + 1;
    kk::DeviceBuffer o = test::poisoned(no, kk::ElemType::f32), lse = test::poisoned(nl, kk::ElemType::f32);
    kk::AttentionParams pr = p;
    pr.o = o.data();
    pr.out_type = kk::ElemType::f32;
    pr.lse = lse.as<float>();
    pr.variant = 0;
    pr.row_begin = rb;
    test::kcheck(kk::full_attention(pr), "full_attention row_begin");
    expect_rows_from(test::download_as_float(o, no, kk::ElemType::f32), ref.o.storage(), c.hq, c.n, c.d, rb, tol,
                     "O rows >= row_begin");
  }
}

// Sliding window: windows of 1 key, smaller than a key tile (64), not a multiple of it, around
// a query tile (64 / 128 rows), and >= N (plain causal); every row, and rows from a row_begin
// (decoding with a cache). The kernel must skip the tiles left of each window and mask the
// band's left edge inside a tile.
TEST_P(FullAttention, SlidingWindowMatchesCpuReference) {
  PROXYATTN_REQUIRE_GPU();
  const auto [c, dt] = GetParam();
  if (c.n < 3) GTEST_SKIP() << "covered by the larger shapes";
  const Tensor3 q = test::random_rounded(c.hq, c.n, c.d, dt, 1.5f), k = test::random_rounded(c.hkv, c.n, c.d, dt),
                v = test::random_rounded(c.hkv, c.n, c.d, dt);
  const double tol = test::rel_tol(dt);
  kk::DeviceBuffer dq = test::upload16(q.storage(), dt), dk = test::upload16(k.storage(), dt),
                   dv = test::upload16(v.storage(), dt);
  const int64_t no = int64_t(c.hq) * c.n * c.d;
  for (int64_t w : {int64_t{1}, int64_t{37}, int64_t{64}, int64_t{100}, int64_t{129}, c.n - 1, c.n + 5}) {
    if (w < 1) continue;
    const AttentionOutput ref = sliding_attention_cpu(q, k, v, w);
    for (kk::AttnImpl impl : {kk::AttnImpl::portable, kk::AttnImpl::automatic}) {
      kk::AttentionParams p = test::attn_params(dq, dk, &dv, dt, c.hq, c.hkv, c.d, c.n, impl);
      kk::DeviceBuffer o = test::poisoned(no, kk::ElemType::f32);
      p.o = o.data();
      p.out_type = kk::ElemType::f32;
      p.window = w;
      test::kcheck(kk::full_attention(p), "full_attention (window)");
      test::kcheck(kk::synchronize(), "full_attention (window) sync");
      const std::string tag = "window " + std::to_string(w) + (impl == kk::AttnImpl::portable ? "" : " automatic");
      test::expect_rel(("O " + tag).c_str(), test::download_as_float(o, no, kk::ElemType::f32), ref.o.storage(), tol);
    }
    // Rows from row_begin (what decoding with a KV cache runs): the earlier rows stay NaN.
    const int64_t rb = c.n - c.n / 3 - 1;
    kk::AttentionParams p = test::attn_params(dq, dk, &dv, dt, c.hq, c.hkv, c.d, c.n, kk::AttnImpl::portable);
    kk::DeviceBuffer o = test::poisoned(no, kk::ElemType::f32);
    p.o = o.data();
    p.out_type = kk::ElemType::f32;
    p.window = w;
    p.row_begin = rb;
    test::kcheck(kk::full_attention(p), "full_attention (window, row_begin)");
    expect_rows_from(test::download_as_float(o, no, kk::ElemType::f32), ref.o.storage(), c.hq, c.n, c.d, rb, tol,
                     "O rows >= row_begin, window " + std::to_string(w));
  }
  // What has no window refuses one: the Hopper kernel, row_lse; and a negative window is an error.
  kk::AttentionParams p = test::attn_params(dq, dk, &dv, dt, c.hq, c.hkv, c.d, c.n, kk::AttnImpl::hopper);
  kk::DeviceBuffer o = test::poisoned(no, kk::ElemType::f32), lse = test::poisoned(int64_t(c.hq) * c.n, kk::ElemType::f32);
  p.o = o.data();
  p.out_type = kk::ElemType::f32;
  p.window = 5;
  EXPECT_NE(kk::full_attention(p), kk::Status::ok);
  p.impl = kk::AttnImpl::portable;
  p.o = nullptr;
  p.lse = lse.as<float>();
  EXPECT_EQ(kk::row_lse(p), kk::Status::unsupported);
  p.window = -1;
  p.o = o.data();
  EXPECT_EQ(kk::full_attention(p), kk::Status::invalid_argument);
}

// The lib dispatch (upload f32, convert on device, download f32) on one shape per dtype.
TEST(FullAttentionDispatch, MatchesCpuReference) {
  PROXYATTN_REQUIRE_GPU();
  for (DType dt : {DType::bf16, DType::f16}) {
    const Tensor3 q = test::random_rounded(6, 211, 128, dt, 1.5f), k = test::random_rounded(2, 211, 128, dt),
                  v = test::random_rounded(2, 211, 128, dt);
    const AttentionOutput ref = full_attention_cpu(q, k, v);
    const AttentionOutput got = full_attention_cuda(q, k, v, dt);
    test::expect_rel("dispatch O", got.o.storage(), ref.o.storage(), test::rel_tol(dt));
    test::expect_rel("dispatch LSE", got.lse, ref.lse, test::rel_tol(dt));
  }
}

// The analysis rounds Q/K/V to 16 bits on the host before the upload (cuda_dispatch.cpp's
// upload_view): float_to_half / float_to_bf16 must give the device conversion's bits, on every
// exponent, ties and the subnormal and overflow ranges.
// Uploads through two page-locked staging buffers (CudaLayer's Q/K/V): every chunk lands where it
// was pushed, the buffers reused while copies run, a partial last chunk included; a push of more
// than a chunk is refused.
TEST(StagedUpload, CopiesEveryChunkInPlace) {
  PROXYATTN_REQUIRE_GPU();
  constexpr size_t chunk = 4096;
  kk::StagedUpload up;
  ASSERT_EQ(up.init(chunk), kk::Status::ok);
  std::vector<uint8_t> src(chunk * 7 + 123);
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint8_t& b : src) b = static_cast<uint8_t>(byte(test::rng()));
  kk::DeviceBuffer dst;
  ASSERT_EQ(dst.allocate(src.size()), kk::Status::ok);
  for (size_t off = 0; off < src.size(); off += chunk) {
    const size_t len = std::min(chunk, src.size() - off);
    void* buf = nullptr;
    ASSERT_EQ(up.stage(&buf), kk::Status::ok);
    std::memcpy(buf, src.data() + off, len);
    ASSERT_EQ(up.push(static_cast<char*>(dst.data()) + off, len), kk::Status::ok);
  }
  ASSERT_EQ(up.finish(), kk::Status::ok);
  std::vector<uint8_t> back(src.size());
  ASSERT_EQ(dst.download(back.data(), back.size()), kk::Status::ok);
  EXPECT_EQ(back, src);
  EXPECT_NE(up.push(dst.data(), chunk + 1), kk::Status::ok);
}

TEST(HostRounding, MatchesDeviceConvert) {
  PROXYATTN_REQUIRE_GPU();
  std::vector<float> x;
  std::mt19937 rng(7);
  for (int e = -40; e <= 40; ++e)  // random mantissas over the exponents
    for (int i = 0; i < 200; ++i)
      x.push_back(std::ldexp(std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng), e));
  for (uint32_t h = 0; h < 0x7c00u; ++h) {  // every finite half, and the midpoints above each
    const float f = half_to_float(static_cast<uint16_t>(h)), up = half_to_float(static_cast<uint16_t>(h + 1));
    x.push_back(f);
    x.push_back(-(f + (up - f) / 2));
  }
  for (float f : {65504.0f, 65520.0f, 65536.0f, 1e30f, 3.4e38f, 1e-30f, 0.0f, -0.0f}) x.push_back(f);
  const int64_t n = static_cast<int64_t>(x.size());
  const kk::DeviceBuffer src = test::upload_raw(x);
  for (kk::ElemType t : {kk::ElemType::f16, kk::ElemType::bf16}) {
    kk::DeviceBuffer dst;
    ASSERT_EQ(dst.allocate(size_t(n) * 2), kk::Status::ok);
    test::kcheck(kk::convert(src.data(), kk::ElemType::f32, dst.data(), t, n), "convert");
    std::vector<uint16_t> bits(static_cast<size_t>(n));
    ASSERT_EQ(dst.download(bits.data(), bits.size() * 2), kk::Status::ok);
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t host = t == kk::ElemType::f16 ? float_to_half(x[size_t(i)]) : float_to_bf16(x[size_t(i)]);
      if (host != bits[size_t(i)] && ++bad <= 5)
        ADD_FAILURE() << (t == kk::ElemType::f16 ? "f16" : "bf16") << " of " << x[size_t(i)] << ": host " << host
                      << ", device " << bits[size_t(i)];
    }
    EXPECT_EQ(bad, 0);
  }
}

TEST(KernelsApi, RejectsBadArguments) {
  kk::AttentionParams p;  // all null
  p.head_dim = 128;
  p.q_heads = 2;
  p.kv_heads = 2;
  p.seq_len = 10;
  const kk::Status s = kk::full_attention(p);
  if (kk::device_count() == 0)
    EXPECT_NE(s, kk::Status::ok);
  else
    EXPECT_EQ(s, kk::Status::invalid_argument) << kk::last_error_detail();
  p.head_dim = 96;
  EXPECT_NE(kk::full_attention(p), kk::Status::ok);
}

}  // namespace
}  // namespace proxyattn
