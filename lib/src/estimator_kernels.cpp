// CPU micro-kernels of the estimators. The AVX2 paths carry their own target attribute so the
// rest of the library stays portable; using_avx2() picks them once at run time.
#include "estimator_kernels.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PA_HAVE_X86 1
#define PA_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace proxyattn::detail::kern {

namespace {

// ---------------------------------------------------------------- portable
void gemm_portable(const float* a, int64_t lda, int64_t m, int64_t d, const float* bt, int64_t ldb, int64_t n,
                   float* c, int64_t ldc, float scale) {
  const int64_t nc = round_up16(n);
  for (int64_t r = 0; r < m; ++r) {
    float* cr = c + r * ldc;
    std::fill(cr, cr + nc, 0.0f);
    for (int64_t t = 0; t < d; ++t) {
      const float av = a[r * lda + t];
      const float* b = bt + t * ldb;
      for (int64_t x = 0; x < nc; ++x) cr[x] += av * b[x];
    }
    for (int64_t x = 0; x < nc; ++x) cr[x] *= scale;
  }
}

float row_max_portable(const float* x, int64_t n) {
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

double exp_sum_portable(const float* x, int64_t n, float shift) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

double exp_inplace_sum_portable(float* x, int64_t n, float shift) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - shift));
  return s;
}

#ifdef PA_HAVE_X86
// ---------------------------------------------------------------- AVX2 + FMA

// R rows x 16 columns of C, accumulators in registers.
template <int R>
PA_AVX2 void micro(const float* a, int64_t lda, int64_t d, const float* bt, int64_t ldb, float* c, int64_t ldc,
                   float scale) {
  __m256 acc0[R], acc1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t t = 0; t < d; ++t) {
    const __m256 b0 = _mm256_loadu_ps(bt + t * ldb), b1 = _mm256_loadu_ps(bt + t * ldb + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + t);
      acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
    }
  }
  const __m256 s = _mm256_set1_ps(scale);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(c + r * ldc, _mm256_mul_ps(acc0[r], s));
    _mm256_storeu_ps(c + r * ldc + 8, _mm256_mul_ps(acc1[r], s));
  }
}

PA_AVX2 void gemm_avx2(const float* a, int64_t lda, int64_t m, int64_t d, const float* bt, int64_t ldb, int64_t n,
                       float* c, int64_t ldc, float scale) {
  constexpr int kR = 6;
  const int64_t nc = round_up16(n);
  for (int64_t x = 0; x < nc; x += kCols) {  // the Bt tile (d x 16) stays in L1 across rows
    int64_t r = 0;
    for (; r + kR <= m; r += kR) micro<kR>(a + r * lda, lda, d, bt + x, ldb, c + r * ldc + x, ldc, scale);
    const float* ar = a + r * lda;
    float* cr = c + r * ldc + x;
    switch (m - r) {
      case 5: micro<5>(ar, lda, d, bt + x, ldb, cr, ldc, scale); break;
      case 4: micro<4>(ar, lda, d, bt + x, ldb, cr, ldc, scale); break;
      case 3: micro<3>(ar, lda, d, bt + x, ldb, cr, ldc, scale); break;
      case 2: micro<2>(ar, lda, d, bt + x, ldb, cr, ldc, scale); break;
      case 1: micro<1>(ar, lda, d, bt + x, ldb, cr, ldc, scale); break;
      default: break;
    }
  }
}

// exp for x <= ~88 (Cephes polynomial, relative error ~1e-7); below -87.3 (and -inf) -> 0.
PA_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 zero = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), lo);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(zero, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

PA_AVX2 double hsum(__m256 v) {
  const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  const __m256d s = _mm256_add_pd(a, b);
  alignas(32) double t[4];
  _mm256_store_pd(t, s);
  return (t[0] + t[1]) + (t[2] + t[3]);
}

PA_AVX2 float row_max_avx2(const float* x, int64_t n) {
  int64_t i = 0;
  float m = x[0];
  if (n >= 8) {
    __m256 v = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + i));
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    m = *std::max_element(t, t + 8);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// Float vector partial sums flushed to double every 512 values.
template <bool kStore>
PA_AVX2 double exp_sum_avx2(float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  double total = 0;
  int64_t i = 0;
  while (i + 8 <= n) {
    __m256 acc = _mm256_setzero_ps();
    const int64_t end = std::min(n - n % 8, i + 512);
    for (; i < end; i += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
      if constexpr (kStore) _mm256_storeu_ps(x + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    total += hsum(acc);
  }
  for (; i < n; ++i) {
    const float e = std::exp(x[i] - shift);
    if constexpr (kStore) x[i] = e;
    total += e;
  }
  return total;
}
#endif

bool detect_avx2() {
#ifdef PA_HAVE_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace

std::atomic<bool> g_force_portable{false};

bool using_avx2() {
  static const bool yes = detect_avx2();
  return yes && !g_force_portable.load(std::memory_order_relaxed);
}

void force_portable(bool on) { g_force_portable.store(on); }

void gemm_abt(const float* a, int64_t lda, int64_t m, int64_t d, const float* bt, int64_t ldb, int64_t n, float* c,
              int64_t ldc, float scale) {
  if (m <= 0 || n <= 0) return;
#ifdef PA_HAVE_X86
  if (using_avx2()) return gemm_avx2(a, lda, m, d, bt, ldb, n, c, ldc, scale);
#endif
  gemm_portable(a, lda, m, d, bt, ldb, n, c, ldc, scale);
}

float row_max(const float* x, int64_t n) {
#ifdef PA_HAVE_X86
  if (using_avx2()) return row_max_avx2(x, n);
#endif
  return row_max_portable(x, n);
}

double exp_sum(const float* x, int64_t n, float shift) {
  if (shift == -std::numeric_limits<float>::infinity()) return 0.0;  // every entry masked
#ifdef PA_HAVE_X86
  if (using_avx2()) return exp_sum_avx2<false>(const_cast<float*>(x), n, shift);  // read only
#endif
  return exp_sum_portable(x, n, shift);
}

double exp_inplace_sum(float* x, int64_t n, float shift) {
  if (shift == -std::numeric_limits<float>::infinity()) {
    std::fill(x, x + n, 0.0f);
    return 0.0;
  }
#ifdef PA_HAVE_X86
  if (using_avx2()) return exp_sum_avx2<true>(x, n, shift);
#endif
  return exp_inplace_sum_portable(x, n, shift);
}

Transposed transpose_head(ConstView v, int64_t h) {
  Transposed t;
  t.d = v.dim;
  t.n = v.tokens;
  t.ld = round_up16(v.tokens) + kCols;  // a panel may start at any token and read 16-wide
  t.t.assign(static_cast<size_t>(t.d * t.ld), 0.0f);
  for (int64_t n = 0; n < v.tokens; ++n) {
    const float* r = v.row(h, n);
    for (int64_t c = 0; c < v.dim; ++c) t.t[c * t.ld + n] = r[c];
  }
  return t;
}

}  // namespace proxyattn::detail::kern
