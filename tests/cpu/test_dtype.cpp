#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "proxyattn/dtype.hpp"
#include "test_util.hpp"

namespace proxyattn {
namespace {

// Slow, obviously-right reference: the nearest half to x by exhaustive search over the
// 63,488 finite non-negative... patterns is too slow per value, so use exact long double math.
uint16_t half_ref(float f) {
  if (std::isnan(f)) return 0x7e00;
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  long double a = std::fabs(static_cast<long double>(f));
  if (a >= 65520.0L) return sign | 0x7c00;
  // Candidates are k * 2^(e-24) for the binade of a; round half to even on k.
  int e;
  std::frexp(static_cast<double>(a), &e);  // a in [2^(e-1), 2^e)
  int exp_unbiased = std::max(e - 1, -14);
  long double step = std::ldexp(1.0L, exp_unbiased - 10);
  long double k = a / step;
  long double fl = std::floor(k);
  long double frac = k - fl;
  uint64_t q = static_cast<uint64_t>(fl);
  if (frac > 0.5L || (frac == 0.5L && (q & 1))) ++q;
  // q counts steps of the binade: convert to bits.
  uint32_t bits;
  if (exp_unbiased == -14 && q < 1024) bits = static_cast<uint32_t>(q);  // subnormal
  else {
    int ex = exp_unbiased;
    if (q >= 2048) { q >>= 1; ++ex; }
    if (ex > 15) return sign | 0x7c00;
    bits = static_cast<uint32_t>((ex + 15) << 10) | static_cast<uint32_t>(q & 0x3ff);
  }
  return sign | static_cast<uint16_t>(bits);
}

TEST(DType, HalfToFloatAllPatternsRoundTrip) {
  int nan = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = half_to_float(static_cast<uint16_t>(h));
    const bool is_nan_pattern = ((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff) != 0;
    if (is_nan_pattern) {
      ASSERT_TRUE(std::isnan(f)) << h;
      ++nan;
      continue;
    }
    ASSERT_EQ(float_to_half(f), h) << "pattern " << h << " -> " << f;
    // Exact value: sign * 2^(e-15) * (1 + m/1024) or subnormal m * 2^-24.
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double ref = e == 0 ? std::ldexp(m, -24) : e == 31 ? INFINITY : std::ldexp(1024 + m, e - 25);
    if (h & 0x8000) ref = -ref;
    ASSERT_EQ(static_cast<double>(f), ref) << "pattern " << h;
  }
  EXPECT_EQ(nan, 2 * 1023);
}

TEST(DType, BranchFreeHalfConversionMatchesOnAllPatterns) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint32_t want = std::bit_cast<uint32_t>(half_to_float(static_cast<uint16_t>(h)));
    ASSERT_EQ(half_to_float_bits(static_cast<uint16_t>(h)), want) << "pattern " << h;
  }
}

TEST(DType, FloatToHalfMatchesExactRounding) {
  // Every float near each half boundary, plus random floats over the whole range.
  std::uniform_int_distribution<uint32_t> bits;
  for (int n = 0; n < 2'000'000; ++n) {
    const float f = std::bit_cast<float>(bits(test::rng()));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_half(f), half_ref(f)) << "f=" << f;
  }
  for (uint32_t h = 0; h < 0x7c00; ++h) {  // midpoints between neighbouring halves: ties to even
    const double a = half_to_float(static_cast<uint16_t>(h)), b = half_to_float(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((a + b) / 2);
    if (static_cast<double>(mid) != (a + b) / 2) continue;  // not representable in float32
    ASSERT_EQ(float_to_half(mid), half_ref(mid)) << "midpoint after pattern " << h;
    ASSERT_EQ(float_to_half(mid) & 1, 0) << "tie must round to even";
  }
  EXPECT_EQ(float_to_half(1e6f), 0x7c00);
  EXPECT_EQ(float_to_half(-1e6f), 0xfc00);
  EXPECT_EQ(float_to_half(65504.0f), 0x7bff);
  EXPECT_TRUE(std::isnan(half_to_float(float_to_half(NAN))));
}

// The bulk conversion (F16C where the build has it) equals float_to_half bit for bit: random
// bit patterns (NaNs with payloads, both infinities, float32 subnormals included), the ties
// between neighbouring halves, and lengths that leave a scalar tail.
TEST(DType, BulkFloatToHalfMatchesScalar) {
  std::uniform_int_distribution<uint32_t> bits;
  std::vector<float> src;
  for (int n = 0; n < 1'000'003; ++n) src.push_back(std::bit_cast<float>(bits(test::rng())));
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const double a = half_to_float(static_cast<uint16_t>(h)), b = half_to_float(static_cast<uint16_t>(h + 1));
    src.push_back(static_cast<float>((a + b) / 2));
    src.push_back(-static_cast<float>((a + b) / 2));
  }
  for (float f : {0.0f, -0.0f, 65504.0f, 65519.996f, 65520.0f, 1e-45f, -1e-45f, 5.9604645e-8f, 2.9802322e-8f, INFINITY,
                  -INFINITY, NAN, std::bit_cast<float>(0x7f800001u), std::bit_cast<float>(0xffbfffffu)})
    src.push_back(f);
  for (size_t len : {src.size(), size_t(7), size_t(8), size_t(13)}) {
    std::vector<uint16_t> got(len);
    floats_to_halves(src.data(), got.data(), len);
    for (size_t i = 0; i < len; ++i)
      ASSERT_EQ(got[i], float_to_half(src[i])) << "value " << i << " bits " << std::bit_cast<uint32_t>(src[i]);
  }
}

TEST(DType, Bf16AllPatterns) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = bf16_to_float(static_cast<uint16_t>(b));
    uint32_t expect_bits = b << 16;
    ASSERT_EQ(std::bit_cast<uint32_t>(f), expect_bits);
    if (std::isnan(f)) ASSERT_TRUE(std::isnan(bf16_to_float(float_to_bf16(f))));
    else ASSERT_EQ(float_to_bf16(f), b) << b;
  }
  // Round to nearest even on random floats: compare with exact arithmetic.
  std::uniform_int_distribution<uint32_t> bits;
  for (int n = 0; n < 1'000'000; ++n) {
    const float f = std::bit_cast<float>(bits(test::rng()));
    if (std::isnan(f) || std::isinf(f)) continue;
    const uint32_t x = std::bit_cast<uint32_t>(f);
    const float lo = std::bit_cast<float>(x & 0xffff0000u);
    // The next bf16 up in exact arithmetic (2^128 past the largest finite, where Inf is right).
    const int e = static_cast<int>((x >> 23) & 0xff);
    const long double ulp = std::ldexp(1.0L, std::max(e, 1) - 127 - 7);
    const long double hi = std::fabs(static_cast<long double>(lo)) + ulp;
    const long double af = std::fabs(static_cast<long double>(f));
    const long double dl = af - std::fabs(static_cast<long double>(lo)), dh = hi - af;
    const uint16_t got = float_to_bf16(f), lob = static_cast<uint16_t>(x >> 16);
    if (dl < dh) ASSERT_EQ(got, lob);
    else if (dh < dl) ASSERT_EQ(got, static_cast<uint16_t>(lob + 1));
    else ASSERT_EQ(got & 1, 0);
  }
}

TEST(DType, Names) {
  EXPECT_EQ(parse_dtype("float16"), DType::f16);
  EXPECT_EQ(parse_dtype("bf16"), DType::bf16);
  EXPECT_EQ(dtype_name(DType::f32), "float32");
  EXPECT_THROW(parse_dtype("int8"), Error);
}

}  // namespace
}  // namespace proxyattn
