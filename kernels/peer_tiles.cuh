#pragma once
// Small building blocks of the peers' kernels (peer_*.cu) and the exact proxy path: argument
// checks of PeerInput, gathered tile loads into XOR-swizzled shared memory, one warp's
// S = A B^T over a [rows, D] x [cols, D] pair of tiles with mma.sync, and block-wide scans.
// Kept apart from attention_core.cuh so the attention kernels can change freely.
#include "common.cuh"

namespace proxyattn::kernels::peer {

using detail::cp_async16;
using detail::cp_async_commit;
using detail::cp_async_wait;
using detail::fail;
using detail::ldmatrix_x4;
using detail::mma16816;
using detail::smem_u32;

// Resolved strides of a PeerInput.
struct Operands {
  const void* q;
  const void* k;
  int64_t qsh, qst, ksh, kst;
  int64_t n;
  int group;  // Hq / Hkv
};

// Checks what every peer launcher needs; `dims` says whether head_dim must be 64/128/256
// (tensor-core kernels) or only a multiple of 8 up to 256.
inline Status make_operands(const PeerInput& p, const char* who, bool mma_dims, Operands* o) {
  static thread_local char msg[256];
  auto bad = [&](Status s, const char* what) {
    std::snprintf(msg, sizeof msg, "%s: %s", who, what);
    return fail(s, msg);
  };
  if (p.in_type != ElemType::bf16 && p.in_type != ElemType::f16) return bad(Status::unsupported, "in_type must be bf16 or f16");
  if (mma_dims ? (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256)
               : (p.head_dim <= 0 || p.head_dim % 8 != 0 || p.head_dim > 256))
    return bad(Status::unsupported, mma_dims ? "head_dim must be 64, 128 or 256" : "head_dim must be a multiple of 8 <= 256");
  if (p.q_heads <= 0 || p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 || p.q_heads > 65535)
    return bad(Status::invalid_argument, "q_heads must be a positive multiple of kv_heads (<= 65535)");
  if (p.seq_len <= 0 || p.seq_len > 0x7fffffffLL) return bad(Status::invalid_argument, "seq_len must be in [1, 2^31)");
  if (!p.q || !p.k) return bad(Status::invalid_argument, "null q/k pointer");
  if (!detail::aligned16(p.q) || !detail::aligned16(p.k)) return bad(Status::invalid_argument, "q/k must be 16-byte aligned");
  const int64_t d = p.head_dim, n = p.seq_len;
  o->q = p.q;
  o->k = p.k;
  o->qst = p.q_stride_token ? p.q_stride_token : d;
  o->qsh = p.q_stride_head ? p.q_stride_head : n * o->qst;
  o->kst = p.k_stride_token ? p.k_stride_token : d;
  o->ksh = p.k_stride_head ? p.k_stride_head : n * o->kst;
  if ((o->qst | o->qsh | o->kst | o->ksh) % 8 != 0) return bad(Status::invalid_argument, "strides must be multiples of 8 elements");
  o->n = n;
  o->group = p.q_heads / p.kv_heads;
  return Status::ok;
}

inline bool is_pow2(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }
// Smallest power of two >= n (n >= 1), host and device.
__host__ __device__ __forceinline__ int pow2_ceil(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Scratch memory taken stream-ordered and given back when the guard leaves scope (also on an
// early error return), so a launcher never leaks.
class Scratch {
 public:
  explicit Scratch(cudaStream_t s) : s_(s) {}
  ~Scratch() {
    for (int i = 0; i < n_; ++i) cudaFreeAsync(p_[i], s_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  Status get(T** out, size_t count, const char* what) {
    *out = nullptr;
    if (n_ == kMax) return fail(Status::invalid_argument, what);
    void* p = nullptr;
    const Status s = detail::from_cuda(cudaMallocAsync(&p, count * sizeof(T) + 256, s_), what);
    if (s != Status::ok) return s;
    p_[n_++] = p;
    *out = static_cast<T*>(p);
    return Status::ok;
  }

 private:
  static constexpr int kMax = 16;
  cudaStream_t s_;
  void* p_[kMax] = {};
  int n_ = 0;
};

// ---- tensor-core tiles ----------------------------------------------------------------------

// Element offset of (row, col) in a [rows][D] tile whose 16-byte chunk c of row r sits at
// c ^ (r & 7) (col % 8 == 0): the 8 row addresses of an ldmatrix hit 8 bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3);
}

// Async copy of ROWS rows into a swizzled [ROWS][D] tile: tile row r = token tok0 + r * step of a
// strided [N, D] matrix g (row stride `stride` elements); tokens >= n are zero-filled (never
// read). tok0 >= 0, step >= 1. NT threads; each owns one 16-byte column chunk.
template <int ROWS, int D, int NT, class T>
__device__ __forceinline__ void load_rows(T* s, const T* g, int64_t stride, int64_t tok0, int64_t step, int64_t n,
                                          int tid) {
  constexpr int CH = D / 8;
  constexpr int RPP = NT / CH;  // rows per pass
  static_assert(NT % CH == 0 && ROWS % RPP == 0, "tile shape");
  const int ch = tid % CH, r0 = tid / CH;
#pragma unroll 4
  for (int kk = 0; kk < ROWS / RPP; ++kk) {
    const int r = r0 + kk * RPP;
    const int64_t tok = tok0 + int64_t(r) * step;
    const bool ok = tok < n;
    cp_async16(smem_u32(s + swz<D>(r, ch * 8)), ok ? g + tok * stride + ch * 8 : g, ok ? 16 : 0);
  }
}

// acc[mt][nt][e] += sum over D of A[row, :] . B[col, :] for the warp's rows warp_row0 + mt*16 +
// (lane >> 2) + (e >> 1) * 8 and columns nt*8 + (lane & 3)*2 + (e & 1). A [>= warp rows][D] and
// B [BN][D] are swizzled shared tiles.
template <int D, int MT, int BN, class T>
__device__ __forceinline__ void mma_tile(float (&acc)[MT][BN / 8][4], const T* sA, const T* sB, int warp_row0,
                                         int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t qa[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int r = warp_row0 + mt * 16 + (lane & 15);
      ldmatrix_x4(qa[mt], smem_u32(sA + swz<D>(r, kk * 16 + (lane >> 4) * 8)));
    }
#pragma unroll
    for (int np = 0; np < BN / 16; ++np) {
      uint32_t kb[4];
      const int r = np * 16 + (lane & 7) + ((lane >> 4) << 3);
      ldmatrix_x4(kb, smem_u32(sB + swz<D>(r, kk * 16 + ((lane >> 3) & 1) * 8)));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(acc[mt][2 * np], qa[mt], kb[0], kb[1]);
        mma16816<T>(acc[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
      }
    }
  }
}

// ---- block-wide scans ------------------------------------------------------------------------

// Exclusive scan of one value per thread over the whole block (blockDim.x a multiple of 32, at
// most 1024); *total (optional) receives the block sum. Deterministic order. Contains barriers:
// every thread must call it.
template <class V>
__device__ V block_exclusive_scan(V x, V* total) {
  __shared__ V warp_sums[32];
  __shared__ V block_total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  V incl = x;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const V y = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += y;
  }
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    V w = lane < nw ? warp_sums[lane] : V(0);
    V wi = w;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const V y = __shfl_up_sync(0xffffffffu, wi, off);
      if (lane >= off) wi += y;
    }
    V we = __shfl_up_sync(0xffffffffu, wi, 1);
    if (lane == 0) we = V(0);
    if (lane < nw) warp_sums[lane] = we;  // exclusive prefix of the warp sums
    if (lane == nw - 1) block_total = wi;
  }
  V excl = __shfl_up_sync(0xffffffffu, incl, 1);  // exact (no incl - x for floating types)
  if (lane == 0) excl = V(0);
  __syncthreads();
  const V out = warp_sums[warp] + excl;
  if (total) *total = block_total;
  return out;
}

// acc[u][v] += sum over c < cw of sa[ty + 16 u][c] * sb[tx + 16 v][c]: the 4 x 4 register block
// of a 64 x 64 fp32 tile computed by 16 x 16 threads from one chunk staged in shared memory,
// FMA in c order (the CPU's summation order within the chunk).
template <int W>
__device__ __forceinline__ void fma_4x4(float (&acc)[4][4], const float (*sa)[W], const float (*sb)[W], int cw,
                                        int tx, int ty) {
  for (int c = 0; c < cw; ++c) {
    float a[4], b[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      a[u] = sa[ty + 16 * u][c];
      b[u] = sb[tx + 16 * u][c];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(a[u], b[v], acc[u][v]);
  }
}

// floor(a / b) for b > 0 and any sign of a.
__host__ __device__ __forceinline__ int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

}  // namespace proxyattn::kernels::peer
