#pragma once
// Private CPU micro-kernels of the estimators: C = scale * A * Bt panel products and the
// exp / max reductions of a softmax. The library is built without -march flags, so AVX2+FMA
// versions are chosen at run time (target attributes); portable loops otherwise.
#include <cstdint>
#include <vector>

#include "proxyattn/tensor.hpp"

namespace proxyattn::detail::kern {

// Column granularity of gemm_abt: Bt rows must be readable (zero padded) and C rows writable
// up to round_up16(n) columns.
constexpr int64_t kCols = 16;
inline int64_t round_up16(int64_t n) { return (n + kCols - 1) / kCols * kCols; }

// C[r, c] = scale * sum_{t < d} A[r * lda + t] * Bt[t * ldb + c] for r < m, c < round_up16(n).
void gemm_abt(const float* a, int64_t lda, int64_t m, int64_t d, const float* bt, int64_t ldb, int64_t n,
              float* c, int64_t ldc, float scale);

// max of x[0, n), n >= 1.
float row_max(const float* x, int64_t n);
// sum of exp(x[c] - shift) for c < n (read only); exp of -inf (or below ~-87) counts 0.
double exp_sum(const float* x, int64_t n, float shift);
// In place x = exp(x - shift); returns the sum.
double exp_inplace_sum(float* x, int64_t n, float shift);

// Head h of v transposed: [d, ld] row-major, zero padded, ld = round_up16(tokens) + 16 so a
// panel starting at any token c reads round_up16(n) columns inside the buffer.
struct Transposed {
  int64_t d = 0, n = 0, ld = 0;
  std::vector<float> t;
  const float* col(int64_t c) const { return t.data() + c; }  // column c = token c
};
Transposed transpose_head(ConstView v, int64_t h);

bool using_avx2();
// Tests: run the portable loops even where AVX2 is available.
void force_portable(bool on);

}  // namespace proxyattn::detail::kern
