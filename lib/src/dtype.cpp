#include "proxyattn/dtype.hpp"

#include <bit>
#include <cmath>
#include <string>

#include "proxyattn/error.hpp"

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

namespace proxyattn {

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "?";
}

DType parse_dtype(std::string_view s) {
  if (s == "float32" || s == "f32" || s == "fp32") return DType::f32;
  if (s == "float16" || s == "f16" || s == "fp16" || s == "half") return DType::f16;
  if (s == "bfloat16" || s == "bf16") return DType::bf16;
  throw Error("unknown dtype '" + std::string(s) + "' (expected float32, float16 or bfloat16)");
}

int dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    // Inf, or NaN with its payload kept (and made quiet).
    bits = sign | 0x7f800000u | (mant << 13) | (mant ? 0x00400000u : 0u);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal half: normalise into a float32 normal.
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

uint16_t float_to_half(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // Inf or NaN
    if (abs == 0x7f800000u) return sign | 0x7c00u;
    return sign | 0x7e00u | static_cast<uint16_t>((abs >> 13) & 0x3ffu);
  }
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520 → Inf
  if (abs >= 0x38800000u) {                       // normal half range
    const uint32_t mant_odd = (abs >> 13) & 1u;
    uint32_t r = abs + 0xfffu + mant_odd;  // round to nearest even on bit 13
    r -= 0x38000000u;                       // rebias exponent 127 → 15
    return sign | static_cast<uint16_t>(r >> 13);
  }
  if (abs < 0x33000000u) return sign;  // below half of the smallest subnormal → ±0
  // Subnormal half: shift the full significand, round to nearest even.
  const uint32_t e = abs >> 23;
  const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14..24 for this range
  uint32_t q = m >> shift;  // value in units of 2^-24 (the half subnormal step)
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  return sign | static_cast<uint16_t>(q);
}

void floats_to_halves(const float* src, uint16_t* dst, size_t n) {
  size_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  // Hardware rounding to nearest even gives float_to_half's result for every non-NaN input
  // (overflow to Inf, half subnormals, float32 subnormals to ±0); NaN payloads follow ours.
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) {
      for (size_t j = i; j < i + 8; ++j) dst[j] = float_to_half(src[j]);
      continue;
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}

float bf16_to_float(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

uint16_t float_to_bf16(float f) {
  uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

float round_to(DType t, float f) {
  switch (t) {
    case DType::f32: return f;
    case DType::f16: return half_to_float(float_to_half(f));
    case DType::bf16: return bf16_to_float(float_to_bf16(f));
  }
  return f;
}

}  // namespace proxyattn
