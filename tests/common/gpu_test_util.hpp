#pragma once
// Helpers of the GPU tests (tests/gpu/test_*.cpp): skip without a device, inputs rounded through
// the device dtype (so dtype loss is not counted as kernel error), uploads in bf16/fp16 bits,
// NaN-poisoned outputs, and the relative-error check ||out - ref|| / ||ref|| (NaN never passes).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

#include "proxyattn/dtype.hpp"
#include "proxyattn/kernels.h"
#include "proxyattn/tensor.hpp"
#include "test_util.hpp"

namespace proxyattn::test {

namespace kk = proxyattn::kernels;

#define PROXYATTN_REQUIRE_GPU()                                                     \
  do {                                                                              \
    if (::proxyattn::kernels::device_count() == 0) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

// Small sizes only (compute-sanitizer runs): PROXYATTN_TEST_SMALL=1.
inline bool small_mode() {
  const char* s = std::getenv("PROXYATTN_TEST_SMALL");
  return s && *s && std::string(s) != "0";
}

inline kk::ElemType elem_of(DType t) { return t == DType::bf16 ? kk::ElemType::bf16 : kk::ElemType::f16; }
// Tolerance of ||out - ref|| / ||ref|| for the operand dtype (issue 5).
inline double rel_tol(DType t) { return t == DType::bf16 ? 1e-2 : 2e-3; }

inline void round_through(Tensor3& t, DType d) {
  for (float& x : t.storage()) x = round_to(d, x);
}
inline Tensor3 random_rounded(int64_t h, int64_t n, int64_t d, DType t, float scale = 1.0f) {
  Tensor3 x = random_tensor(h, n, d, scale);
  round_through(x, t);
  return x;
}

inline void kcheck(kk::Status s, const char* what) {
  ASSERT_EQ(s, kk::Status::ok) << what << ": " << kk::status_string(s) << " (" << kk::last_error_detail() << ")";
}

// Device buffer holding `v` as 16-bit values of dtype t.
inline kk::DeviceBuffer upload16(std::span<const float> v, DType t) {
  std::vector<uint16_t> bits(v.size());
  for (size_t i = 0; i < v.size(); ++i) bits[i] = t == DType::bf16 ? float_to_bf16(v[i]) : float_to_half(v[i]);
  kk::DeviceBuffer b;
  EXPECT_EQ(b.allocate(bits.size() * 2 + 16), kk::Status::ok);
  EXPECT_EQ(b.upload(bits.data(), bits.size() * 2), kk::Status::ok);
  return b;
}
template <class T>
inline kk::DeviceBuffer upload_raw(const std::vector<T>& v) {
  kk::DeviceBuffer b;
  EXPECT_EQ(b.allocate(v.size() * sizeof(T) + 16), kk::Status::ok);
  EXPECT_EQ(b.upload(v.data(), v.size() * sizeof(T)), kk::Status::ok);
  return b;
}
// Buffer of n elements of type t filled with NaN (for f32/bf16/f16).
// Attention parameters over device Q/K/V (contiguous [heads, n, d]), no outputs yet.
inline kk::AttentionParams attn_params(const kk::DeviceBuffer& q, const kk::DeviceBuffer& k, const kk::DeviceBuffer* v,
                                DType dt, int hq, int hkv, int d, int64_t n, kk::AttnImpl impl) {
  kk::AttentionParams p;
  p.q = q.data();
  p.k = k.data();
  p.v = v ? v->data() : nullptr;
  p.in_type = elem_of(dt);
  p.q_heads = hq;
  p.kv_heads = hkv;
  p.head_dim = d;
  p.seq_len = n;
  p.impl = impl;
  return p;
}

inline kk::DeviceBuffer poisoned(int64_t n, kk::ElemType t) {
  kk::DeviceBuffer b;
  EXPECT_EQ(b.allocate(size_t(n) * kk::elem_size(t) + 16), kk::Status::ok);
  EXPECT_EQ(kk::fill(b.data(), t, n, std::nanf(""), nullptr), kk::Status::ok);
  return b;
}
// n elements of type t from the device as floats.
inline std::vector<float> download_as_float(const kk::DeviceBuffer& b, int64_t n, kk::ElemType t) {
  std::vector<float> out(n);
  if (t == kk::ElemType::f32) {
    EXPECT_EQ(b.download(out.data(), size_t(n) * 4), kk::Status::ok);
    return out;
  }
  std::vector<uint16_t> bits(n);
  EXPECT_EQ(b.download(bits.data(), size_t(n) * 2), kk::Status::ok);
  for (int64_t i = 0; i < n; ++i) out[i] = t == kk::ElemType::bf16 ? bf16_to_float(bits[i]) : half_to_float(bits[i]);
  return out;
}

struct RelErr {
  double rel = 0, max_abs = 0;
  int64_t nonfinite = 0;
};
// ||out - ref|| / ||ref||; any non-finite output (where ref is finite) makes rel infinite.
// A, B: anything with size() and [] (std::vector, Tensor3::Storage) of float or double.
template <class A, class B>
RelErr rel_error(const A& out, const B& ref) {
  RelErr e;
  double num = 0, den = 0;
  const size_t n = std::min(out.size(), ref.size());
  for (size_t i = 0; i < n; ++i) {
    const double o = double(out[i]), r = double(ref[i]);
    if (!std::isfinite(o) && !(std::isinf(r) && o == r)) {
      ++e.nonfinite;
      continue;
    }
    if (std::isinf(r)) continue;
    num += (o - r) * (o - r);
    den += r * r;
    e.max_abs = std::max(e.max_abs, std::abs(o - r));
  }
  e.rel = e.nonfinite > 0 || out.size() != ref.size() ? INFINITY : (den > 0 ? std::sqrt(num / den) : std::sqrt(num));
  return e;
}
template <class A, class B>
void expect_rel(const char* what, const A& out, const B& ref, double tol) {
  ASSERT_EQ(out.size(), ref.size()) << what;
  const RelErr e = rel_error(out, ref);
  std::printf("[ relerr   ] %-28s rel %.3e  max|d| %.3e  nonfinite %lld  (tol %.1e)\n", what, e.rel, e.max_abs,
              static_cast<long long>(e.nonfinite), tol);
  EXPECT_LE(e.rel, tol) << what << ": relative error " << e.rel << ", " << e.nonfinite << " non-finite values";
}

}  // namespace proxyattn::test
