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
// bfloat16 <-> binary32. bf16_to_float is exact; float_to_bf16 rounds to nearest even and
// keeps NaN a NaN.
float bf16_to_float(uint16_t b);
uint16_t float_to_bf16(float f);

// Round a float through a storage dtype (what the value becomes after a store/load).
float round_to(DType t, float f);

}  // namespace proxyattn
