// CPU micro-kernels of the analysis passes. The AVX2 paths carry their own target attribute so
// the library needs no -march flag; using_avx2() picks them once at run time.
#include "analysis_kernels.hpp"

#include <cmath>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PROXYATTN_X86 1
#endif

namespace proxyattn::analysis::kernels {

namespace {

// ---- portable paths --------------------------------------------------------------------------

void gemm_panel_scalar(const float* a, int64_t lda, int nr, int d, const float* packed,
                       int64_t nc, float* s, int64_t lds) {
  const int64_t ncp = round_up_cols(nc);
  for (int64_t c0 = 0; c0 < ncp; c0 += kColTile) {
    const float* b = packed + c0 * d;
    for (int r = 0; r < nr; ++r) {
      float acc[kColTile] = {};
      for (int t = 0; t < d; ++t) {
        const float av = a[r * lda + t];
        for (int c = 0; c < kColTile; ++c) acc[c] += av * b[t * kColTile + c];
      }
      for (int c = 0; c < kColTile; ++c) s[r * lds + c0 + c] = acc[c];
    }
  }
}

double exp_shift_sum_scalar(float* x, int64_t n, float shift) {
  double sum = 0;
  for (int64_t c = 0; c < n; ++c) {
    x[c] = std::exp(x[c] - shift);
    sum += x[c];
  }
  return sum;
}

void pv_panel_scalar(const float* p, int64_t ldp, int nr, const float* v, int64_t ldv, int nc,
                     int d, float* u, int64_t ldu) {
  for (int r = 0; r < nr; ++r) {
    float* urow = u + r * ldu;
    for (int t = 0; t < d; ++t) urow[t] = 0.0f;
    for (int c = 0; c < nc; ++c) {
      const float pv = p[r * ldp + c];
      const float* vrow = v + c * ldv;
      for (int t = 0; t < d; ++t) urow[t] += pv * vrow[t];
    }
  }
}

void block_sums_scalar(const float* x, int64_t n, int block, double* out) {
  for (int64_t c0 = 0, j = 0; c0 < n; c0 += block, ++j) {
    const int64_t c1 = c0 + block < n ? c0 + block : n;
    double s = 0;
    for (int64_t c = c0; c < c1; ++c) s += x[c];
    out[j] = s;
  }
}

void block_maxs_scalar(const float* x, int64_t n, int block, float* out) {
  for (int64_t c0 = 0, j = 0; c0 < n; c0 += block, ++j) {
    const int64_t c1 = c0 + block < n ? c0 + block : n;
    float m = 0.0f;
    for (int64_t c = c0; c < c1; ++c) m = x[c] > m ? x[c] : m;
    out[j] = m;
  }
}

double masked_sq_error_scalar(const float* u, const int32_t* sel, int64_t n, const double* pm,
                              const float* of, int d, bool* empty) {
  double den = 0;
  for (int64_t t = 0; t < n; ++t) den += pm[sel[t]];
  double e = 0;
  if (!(den > 0)) {
    for (int c = 0; c < d; ++c) e += static_cast<double>(of[c]) * of[c];
    *empty = true;
    return e;
  }
  *empty = false;
  const float inv = static_cast<float>(1.0 / den);
  for (int c = 0; c < d; ++c) {
    float os = 0.0f;
    for (int64_t t = 0; t < n; ++t) os += u[static_cast<int64_t>(sel[t]) * d + c];
    const double diff = static_cast<double>(os * inv - of[c]);
    e += diff * diff;
  }
  return e;
}

void prefix_sq_errors_scalar(const float* u, const int32_t* order, int n, const double* pm,
                             const float* of, int d, double* err, int32_t* empty, float* sacc) {
  double ofsq = 0;
  for (int c = 0; c < d; ++c) ofsq += static_cast<double>(of[c]) * of[c];
  for (int c = 0; c < d; ++c) sacc[c] = 0.0f;
  double den = 0;
  err[0] += ofsq;
  empty[0] += 1;
  for (int t = 0; t < n; ++t) {
    const float* uj = u + static_cast<int64_t>(order[t]) * d;
    for (int c = 0; c < d; ++c) sacc[c] += uj[c];
    den += pm[order[t]];
    if (!(den > 0)) {
      err[t + 1] += ofsq;
      empty[t + 1] += 1;
      continue;
    }
    const float inv = static_cast<float>(1.0 / den);
    double e = 0;
    for (int c = 0; c < d; ++c) {
      const double diff = static_cast<double>(sacc[c] * inv - of[c]);
      e += diff * diff;
    }
    err[t + 1] += e;
  }
}

float row_max_scalar(const float* x, int64_t n) {
  float m = x[0];
  for (int64_t c = 1; c < n; ++c) {
    if (std::isnan(x[c])) return x[c];
    m = x[c] > m ? x[c] : m;
  }
  return m;
}

#ifdef PROXYATTN_X86
// ---- AVX2 + FMA paths ------------------------------------------------------------------------
#define PA_AVX2 __attribute__((target("avx2,fma")))

// exp for x <= 0 (Cephes polynomial, ~2 ulp); x < -87.3 gives exactly 0, as does -inf.
PA_AVX2 inline __m256 exp_nonpos(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, x);  // operand order keeps a NaN a NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(underflow, y);
}

// The one 6 x 16 micro-kernel: o[6 x 16] = p[6 x nc] * v[nc x 16] (row strides ldp, ldv, ldu).
// Serves both S = Q K^T (v = packed K^T) and U = P V.
PA_AVX2 inline void tile6x16(const float* p, int64_t ldp, const float* v, int64_t ldv, int nc,
                             float* o, int64_t ldu) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int c = 0; c < nc; ++c) {
    const float* vr = v + c * ldv;
    const __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8);
    __m256 x = _mm256_broadcast_ss(p + c);
    c00 = _mm256_fmadd_ps(x, v0, c00); c01 = _mm256_fmadd_ps(x, v1, c01);
    x = _mm256_broadcast_ss(p + ldp + c);
    c10 = _mm256_fmadd_ps(x, v0, c10); c11 = _mm256_fmadd_ps(x, v1, c11);
    x = _mm256_broadcast_ss(p + 2 * ldp + c);
    c20 = _mm256_fmadd_ps(x, v0, c20); c21 = _mm256_fmadd_ps(x, v1, c21);
    x = _mm256_broadcast_ss(p + 3 * ldp + c);
    c30 = _mm256_fmadd_ps(x, v0, c30); c31 = _mm256_fmadd_ps(x, v1, c31);
    x = _mm256_broadcast_ss(p + 4 * ldp + c);
    c40 = _mm256_fmadd_ps(x, v0, c40); c41 = _mm256_fmadd_ps(x, v1, c41);
    x = _mm256_broadcast_ss(p + 5 * ldp + c);
    c50 = _mm256_fmadd_ps(x, v0, c50); c51 = _mm256_fmadd_ps(x, v1, c51);
  }
  _mm256_storeu_ps(o, c00); _mm256_storeu_ps(o + 8, c01); o += ldu;
  _mm256_storeu_ps(o, c10); _mm256_storeu_ps(o + 8, c11); o += ldu;
  _mm256_storeu_ps(o, c20); _mm256_storeu_ps(o + 8, c21); o += ldu;
  _mm256_storeu_ps(o, c30); _mm256_storeu_ps(o + 8, c31); o += ldu;
  _mm256_storeu_ps(o, c40); _mm256_storeu_ps(o + 8, c41); o += ldu;
  _mm256_storeu_ps(o, c50); _mm256_storeu_ps(o + 8, c51);
}

// One 6 x 16 tile of S: rows r.., columns c0..c0+15 (b: packed K^T, kColTile wide).
PA_AVX2 inline void gemm_tile6(const float* a, int64_t lda, int d, const float* b, float* o, int64_t lds) {
  tile6x16(a, lda, b, kColTile, d, o, lds);
}

PA_AVX2 inline void gemm_tile1(const float* a, int d, const float* b, float* o) {
  constexpr int64_t ldb = kColTile;
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  for (int t = 0; t < d; ++t) {
    const __m256 x = _mm256_broadcast_ss(a + t);
    c00 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + t * ldb), c00);
    c01 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + t * ldb + 8), c01);
  }
  _mm256_storeu_ps(o, c00);
  _mm256_storeu_ps(o + 8, c01);
}

PA_AVX2 void gemm_panel_avx2(const float* a, int64_t lda, int nr, int d, const float* packed,
                             int64_t nc, float* s, int64_t lds) {
  const int64_t ncp = round_up_cols(nc);
  // Columns in chunks whose packed B (chunk x d floats, 64 KiB at d = 64) stays in L2 while
  // every row sweeps it; inside a chunk 6 rows at a time against each 16-column tile.
  constexpr int64_t kChunk = 256;
  for (int64_t cc = 0; cc < ncp; cc += kChunk) {
    const int64_t ce = cc + kChunk < ncp ? cc + kChunk : ncp;
    int r = 0;
    for (; r + 6 <= nr; r += 6)
      for (int64_t c0 = cc; c0 < ce; c0 += kColTile)
        gemm_tile6(a + r * lda, lda, d, packed + c0 * d, s + r * lds + c0, lds);
    for (; r < nr; ++r)
      for (int64_t c0 = cc; c0 < ce; c0 += kColTile)
        gemm_tile1(a + r * lda, d, packed + c0 * d, s + r * lds + c0);
  }
}

PA_AVX2 double exp_shift_sum_avx2(float* x, int64_t n, float shift, bool want_sum) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  double sum = 0;
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 y = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + c), sh));
    _mm256_storeu_ps(x + c, y);
    acc = _mm256_add_ps(acc, y);
    // Flush the float lanes now and then so long rows keep float64 accuracy.
    if ((c & 1023) == 1016) {
      alignas(32) float l[8];
      _mm256_store_ps(l, acc);
      for (float v : l) sum += v;
      acc = _mm256_setzero_ps();
    }
  }
  if (c < n) {
    alignas(32) float tmp[8] = {0};
    const int rem = static_cast<int>(n - c);
    for (int t = 0; t < rem; ++t) tmp[t] = x[c + t];
    __m256 y = exp_nonpos(_mm256_sub_ps(_mm256_load_ps(tmp), sh));
    _mm256_store_ps(tmp, y);
    for (int t = 0; t < rem; ++t) { x[c + t] = tmp[t]; sum += tmp[t]; }
  }
  if (want_sum) {
    alignas(32) float l[8];
    _mm256_store_ps(l, acc);
    for (float v : l) sum += v;
  }
  return sum;
}

PA_AVX2 void pv_panel_avx2(const float* p, int64_t ldp, int nr, const float* v, int64_t ldv,
                           int nc, int d, float* u, int64_t ldu) {
  int t0 = 0;
  for (; t0 + 16 <= d; t0 += 16) {
    int r = 0;
    for (; r + 6 <= nr; r += 6) tile6x16(p + r * ldp, ldp, v + t0, ldv, nc, u + r * ldu + t0, ldu);
    for (; r < nr; ++r) {
      __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
      for (int c = 0; c < nc; ++c) {
        const __m256 x = _mm256_broadcast_ss(p + r * ldp + c);
        c00 = _mm256_fmadd_ps(x, _mm256_loadu_ps(v + c * ldv + t0), c00);
        c01 = _mm256_fmadd_ps(x, _mm256_loadu_ps(v + c * ldv + t0 + 8), c01);
      }
      _mm256_storeu_ps(u + r * ldu + t0, c00);
      _mm256_storeu_ps(u + r * ldu + t0 + 8, c01);
    }
  }
  // Head dims that are not a multiple of 16: the rest column by column.
  for (int r = 0; r < nr && t0 < d; ++r) {
    float* urow = u + r * ldu;
    for (int t = t0; t < d; ++t) urow[t] = 0.0f;
    for (int c = 0; c < nc; ++c) {
      const float pv = p[r * ldp + c];
      const float* vrow = v + c * ldv;
      for (int t = t0; t < d; ++t) urow[t] += pv * vrow[t];
    }
  }
}
PA_AVX2 inline double hsum(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return (static_cast<double>(l[0]) + l[1] + l[2] + l[3]) + (static_cast<double>(l[4]) + l[5] + l[6] + l[7]);
}

PA_AVX2 void block_sums_avx2(const float* x, int64_t n, int block, double* out) {
  for (int64_t c0 = 0, j = 0; c0 < n; c0 += block, ++j) {
    const int64_t c1 = c0 + block < n ? c0 + block : n;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t c = c0;
    for (; c + 16 <= c1; c += 16) {
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + c));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + c + 8));
    }
    double s = hsum(_mm256_add_ps(a0, a1));
    for (; c < c1; ++c) s += x[c];
    out[j] = s;
  }
}

PA_AVX2 float row_max_avx2(const float* x, int64_t n) {
  if (n < 8) return row_max_scalar(x, n);
  __m256 m = _mm256_loadu_ps(x);
  __m256 nan = _mm256_cmp_ps(m, m, _CMP_UNORD_Q);
  int64_t c = 8;
  for (; c + 8 <= n; c += 8) {
    const __m256 v = _mm256_loadu_ps(x + c);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m = _mm256_max_ps(m, v);
  }
  if (_mm256_movemask_ps(nan)) return std::nanf("");
  alignas(32) float l[8];
  _mm256_store_ps(l, m);
  float r = l[0];
  for (int t = 1; t < 8; ++t) r = l[t] > r ? l[t] : r;
  for (; c < n; ++c) {
    if (std::isnan(x[c])) return x[c];
    r = x[c] > r ? x[c] : r;
  }
  return r;
}
PA_AVX2 void block_maxs_avx2(const float* x, int64_t n, int block, float* out) {
  for (int64_t c0 = 0, j = 0; c0 < n; c0 += block, ++j) {
    const int64_t c1 = c0 + block < n ? c0 + block : n;
    __m256 m = _mm256_setzero_ps();
    int64_t c = c0;
    for (; c + 8 <= c1; c += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + c));
    alignas(32) float l[8];
    _mm256_store_ps(l, m);
    float r = 0.0f;
    for (float v : l) r = v > r ? v : r;
    for (; c < c1; ++c) r = x[c] > r ? x[c] : r;
    out[j] = r;
  }
}

PA_AVX2 double masked_sq_error_avx2(const float* u, const int32_t* sel, int64_t n, const double* pm,
                                    const float* of, int d, bool* empty) {
  if (d % 32 != 0) return masked_sq_error_scalar(u, sel, n, pm, of, d, empty);
  double den = 0;
  for (int64_t t = 0; t < n; ++t) den += pm[sel[t]];
  if (!(den > 0)) return masked_sq_error_scalar(u, sel, 0, pm, of, d, empty);
  *empty = false;
  const __m256 inv = _mm256_set1_ps(static_cast<float>(1.0 / den));
  __m256 e = _mm256_setzero_ps();
  for (int c = 0; c < d; c += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const float* uj = u + static_cast<int64_t>(sel[t]) * d + c;
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(uj));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(uj + 8));
      a2 = _mm256_add_ps(a2, _mm256_loadu_ps(uj + 16));
      a3 = _mm256_add_ps(a3, _mm256_loadu_ps(uj + 24));
    }
    const __m256 d0 = _mm256_fmsub_ps(a0, inv, _mm256_loadu_ps(of + c));
    const __m256 d1 = _mm256_fmsub_ps(a1, inv, _mm256_loadu_ps(of + c + 8));
    const __m256 d2 = _mm256_fmsub_ps(a2, inv, _mm256_loadu_ps(of + c + 16));
    const __m256 d3 = _mm256_fmsub_ps(a3, inv, _mm256_loadu_ps(of + c + 24));
    e = _mm256_fmadd_ps(d0, d0, e);
    e = _mm256_fmadd_ps(d1, d1, e);
    e = _mm256_fmadd_ps(d2, d2, e);
    e = _mm256_fmadd_ps(d3, d3, e);
  }
  return hsum(e);
}
PA_AVX2 void prefix_sq_errors_avx2(const float* u, const int32_t* order, int n, const double* pm,
                                   const float* of, int d, double* err, int32_t* empty, float* sacc) {
  if (d % 8 != 0) return prefix_sq_errors_scalar(u, order, n, pm, of, d, err, empty, sacc);
  __m256 o2 = _mm256_setzero_ps();
  for (int c = 0; c < d; c += 8) {
    const __m256 o = _mm256_loadu_ps(of + c);
    o2 = _mm256_fmadd_ps(o, o, o2);
    _mm256_storeu_ps(sacc + c, _mm256_setzero_ps());
  }
  const double ofsq = hsum(o2);
  double den = 0;
  err[0] += ofsq;
  empty[0] += 1;
  for (int t = 0; t < n; ++t) {
    const float* uj = u + static_cast<int64_t>(order[t]) * d;
    den += pm[order[t]];
    if (!(den > 0)) {
      for (int c = 0; c < d; c += 8)
        _mm256_storeu_ps(sacc + c, _mm256_add_ps(_mm256_loadu_ps(sacc + c), _mm256_loadu_ps(uj + c)));
      err[t + 1] += ofsq;
      empty[t + 1] += 1;
      continue;
    }
    const __m256 inv = _mm256_set1_ps(static_cast<float>(1.0 / den));
    __m256 e = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 8) {
      const __m256 sv = _mm256_add_ps(_mm256_loadu_ps(sacc + c), _mm256_loadu_ps(uj + c));
      _mm256_storeu_ps(sacc + c, sv);
      const __m256 diff = _mm256_fmsub_ps(sv, inv, _mm256_loadu_ps(of + c));
      e = _mm256_fmadd_ps(diff, diff, e);
    }
    err[t + 1] += hsum(e);
  }
}

PA_AVX2 void scale_avx2(float* x, int64_t n, float a) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) _mm256_storeu_ps(x + c, _mm256_mul_ps(_mm256_loadu_ps(x + c), av));
  for (; c < n; ++c) x[c] *= a;
}
#undef PA_AVX2
#endif  // PROXYATTN_X86

bool detect_avx2() {
#ifdef PROXYATTN_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace

bool using_avx2() {
  static const bool yes = detect_avx2();
  return yes;
}

int64_t packed_size(int64_t n, int d) { return round_up_cols(n) * d; }

void pack_rows(const float* b, int64_t ldb, int64_t n, int d, float* packed) {
  const int64_t ncp = round_up_cols(n);
  for (int64_t c0 = 0; c0 < ncp; c0 += kColTile) {
    float* tile = packed + c0 * d;
    for (int c = 0; c < kColTile; ++c) {
      const int64_t col = c0 + c;
      for (int t = 0; t < d; ++t) tile[t * kColTile + c] = col < n ? b[col * ldb + t] : 0.0f;
    }
  }
}

void gemm_panel(const float* a, int64_t lda, int nr, int d, const float* packed, int64_t nc,
                float* s, int64_t lds) {
#ifdef PROXYATTN_X86
  if (using_avx2()) return gemm_panel_avx2(a, lda, nr, d, packed, nc, s, lds);
#endif
  gemm_panel_scalar(a, lda, nr, d, packed, nc, s, lds);
}

double exp_shift_sum(float* x, int64_t n, float shift) {
#ifdef PROXYATTN_X86
  if (using_avx2()) return exp_shift_sum_avx2(x, n, shift, true);
#endif
  return exp_shift_sum_scalar(x, n, shift);
}

void exp_shift(float* x, int64_t n, float shift) {
#ifdef PROXYATTN_X86
  if (using_avx2()) {
    exp_shift_sum_avx2(x, n, shift, false);
    return;
  }
#endif
  exp_shift_sum_scalar(x, n, shift);
}

void pv_panel(const float* p, int64_t ldp, int nr, const float* v, int64_t ldv, int nc, int d,
              float* u, int64_t ldu) {
#ifdef PROXYATTN_X86
  if (using_avx2()) return pv_panel_avx2(p, ldp, nr, v, ldv, nc, d, u, ldu);
#endif
  pv_panel_scalar(p, ldp, nr, v, ldv, nc, d, u, ldu);
}

void block_sums(const float* x, int64_t n, int block, double* out) {
#ifdef PROXYATTN_X86
  if (using_avx2()) return block_sums_avx2(x, n, block, out);
#endif
  block_sums_scalar(x, n, block, out);
}

void block_maxs(const float* x, int64_t n, int block, float* out) {
#ifdef PROXYATTN_X86
  if (using_avx2()) return block_maxs_avx2(x, n, block, out);
#endif
  block_maxs_scalar(x, n, block, out);
}

double masked_sq_error(const float* u, const int32_t* sel, int64_t n, const double* pm,
                       const float* of, int d, bool* empty) {
#ifdef PROXYATTN_X86
  if (using_avx2()) return masked_sq_error_avx2(u, sel, n, pm, of, d, empty);
#endif
  return masked_sq_error_scalar(u, sel, n, pm, of, d, empty);
}

void prefix_sq_errors(const float* u, const int32_t* order, int n, const double* pm, const float* of,
                      int d, double* err, int32_t* empty, float* scratch) {
#ifdef PROXYATTN_X86
  if (using_avx2()) return prefix_sq_errors_avx2(u, order, n, pm, of, d, err, empty, scratch);
#endif
  prefix_sq_errors_scalar(u, order, n, pm, of, d, err, empty, scratch);
}

void scale(float* x, int64_t n, float a) {
#ifdef PROXYATTN_X86
  if (using_avx2()) return scale_avx2(x, n, a);
#endif
  for (int64_t c = 0; c < n; ++c) x[c] *= a;
}

float row_max(const float* x, int64_t n) {
#ifdef PROXYATTN_X86
  if (using_avx2()) return row_max_avx2(x, n);
#endif
  return row_max_scalar(x, n);
}

}  // namespace proxyattn::analysis::kernels
