#pragma once
// Storage dtypes and bit-exact conversions. In memory every tensor is float32; float16 and
// bfloat16 exist only in files and on the GPU, so conversion happens at the edges.
#include <cstdint>
#include <string>
#include <string_view>

namespace proxyattn {

enum class DType { f32, f16, bf16 };

std::string_view dtype_name(DType t);          // "float32", "float16", "bfloat16"
DType parse_dtype(std::string_view name);      // accepts the names above and f32/f16/bf16
int dtype_size(DType t);

// IEEE binary16 <-> binary32. half_to_float is exact for all 65,536 patterns (NaN payloads kept
// as quiet NaN); float_to_half rounds to nearest even, overflows to Inf.
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
// float_to_half of n values, bit for bit; eight at a time with the F16C instruction where the
// build has it (the upload of a 128K layer rounds ~800 M values), NaN lanes by float_to_half.
void floats_to_halves(const float* src, uint16_t* dst, size_t n);
// The bits of half_to_float(h), branch-free so that loops over many halves vectorise (the
// store's reader converts whole chunks with it; equal to half_to_float on all 65,536 patterns).
inline uint32_t half_to_float_bits(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  const uint32_t normal = sign | ((exp + 112u) << 23) | (mant << 13);
  const uint32_t special = sign | 0x7f800000u | (mant << 13) | (mant ? 0x00400000u : 0u);  // Inf, quiet NaN
  // Zero and subnormals: mant * 2^-24, exact in float32 (a float32 normal, or +0).
  const float sub = static_cast<float>(mant) * 0x1p-24f;
  uint32_t sub_bits;
  __builtin_memcpy(&sub_bits, &sub, sizeof sub_bits);
  return exp == 0x1fu ? special : exp != 0 ? normal : (sign | sub_bits);
}
// bfloat16 <-> binary32. bf16_to_float is exact; float_to_bf16 rounds to nearest even and
// keeps NaN a NaN.
float bf16_to_float(uint16_t b);
uint16_t float_to_bf16(float f);

// Round a float through a storage dtype (what the value becomes after a store/load).
float round_to(DType t, float f);

}  // namespace proxyattn
