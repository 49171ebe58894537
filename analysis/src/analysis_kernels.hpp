#pragma once
// Private CPU micro-kernels of the analysis passes (layer_oracle.cpp): a register-blocked
// S = A * Bt panel product, a row softmax step and the P * V accumulation. AVX2+FMA versions
// are chosen at run time (the library is built without -march flags); plain loops otherwise.
#include <cstdint>

namespace proxyattn::analysis::kernels {

// Columns are processed in tiles of this many; buffers holding S must have row lengths (ld)
// rounded up to it.
constexpr int kColTile = 16;
inline int64_t round_up_cols(int64_t n) { return (n + kColTile - 1) / kColTile * kColTile; }

// B packed by column tiles: tile c / 16 holds B[c0 .. c0 + 16, 0 .. d) transposed, i.e.
// packed[(c / 16) * d * 16 + t * 16 + c % 16] = B[c, t]; zero past the last real column.
// (A plain d x N transpose would put the 64-128 rows of a tile at a large power-of-two stride,
// which maps them onto one L1 set.)
int64_t packed_size(int64_t n, int d);
void pack_rows(const float* b, int64_t ldb, int64_t n, int d, float* packed);

// S[r, c] = sum_t A[r, t] * B[c, t] for r < nr, c < round_up_cols(nc).
// A: nr x d (row stride lda), B packed (pack_rows), S: nr x lds.
void gemm_panel(const float* a, int64_t lda, int nr, int d, const float* packed, int64_t nc,
                float* s, int64_t lds);

// In place over x[0, n): x = exp(x - shift); returns the sum (float64).
double exp_shift_sum(float* x, int64_t n, float shift);
// In place over x[0, n): x = exp(x - shift) (no sum).
void exp_shift(float* x, int64_t n, float shift);

// U[r, :] = sum_{c < nc} P[r, c] * V[c, :] for r < nr (overwrites U).
// P: nr x ldp, V: nc rows of d floats with row stride ldv, U: nr rows with stride ldu.
void pv_panel(const float* p, int64_t ldp, int nr, const float* v, int64_t ldv, int nc, int d,
              float* u, int64_t ldu);

// out[j] = sum of x[j * block .. min((j + 1) * block, n)) for every (possibly partial) block.
void block_sums(const float* x, int64_t n, int block, double* out);
// out[j] = max of the block's values (blocks as in block_sums); x >= 0 (probabilities).
void block_maxs(const float* x, int64_t n, int block, float* out);
// Output error of one query row under one selection: with os = sum_{j in sel} u[j * d + .] and
// den = sum_{j in sel} pm[j], returns sum_c (os[c] / den - of[c])^2, or sum_c of[c]^2 when
// den <= 0 (an empty selection); *empty tells which.
double masked_sq_error(const float* u, const int32_t* sel, int64_t n, const double* pm,
                       const float* of, int d, bool* empty);
// Output error of one query row for every prefix of a block order: with s_m = sum of the first
// m blocks' u rows and den_m their mass, err[m] += ||s_m / den_m - of||^2 for m = 0..n (den <= 0:
// ||of||^2 and empty[m] += 1). scratch: d floats.
void prefix_sq_errors(const float* u, const int32_t* order, int n, const double* pm, const float* of,
                      int d, double* err, int32_t* empty, float* scratch);
// x[0, n) *= a.
void scale(float* x, int64_t n, float a);
// max of x[0, n), n >= 1 (NaN if any value is NaN).
float row_max(const float* x, int64_t n);

bool using_avx2();

}  // namespace proxyattn::analysis::kernels
