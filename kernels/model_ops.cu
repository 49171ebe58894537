// The model runtime's small kernels: everything of a Llama-family or Gemma-3 layer that is not a
// GEMM or attention (lib/src/model/llama_cuda.cpp strings them together). Memory-bound, one thread per
// element or one block per row; the CPU back end (lib/src/model/llama_cpu.cpp) is the spec of
// each, including where it accumulates in float64.
#include <cstdint>
#include <new>

#include "common.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace detail {
namespace {

using bf16 = __nv_bfloat16;
constexpr int kThreads = 256;

unsigned grid_for(int64_t n, int per_thread = 1) {
  const int64_t g = (n + int64_t(kThreads) * per_thread - 1) / (int64_t(kThreads) * per_thread);
  return unsigned(g < 1 ? 1 : (g > 1048576 ? 1048576 : g));
}

// SplitMix64: a counter-based hash, so the value of element i depends on (seed, i) alone.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <class T>
__global__ void fill_normal_kernel(T* dst, int64_t n, uint64_t seed, float std) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t h = mix64(seed ^ mix64(uint64_t(i)));
    // Box-Muller on two 24-bit uniforms in (0, 1].
    const float u1 = (float((h >> 40) & 0xffffff) + 1.0f) * (1.0f / 16777216.0f);
    const float u2 = float((h >> 8) & 0xffffff) * (1.0f / 16777216.0f);
    const float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    if constexpr (sizeof(T) == 4) dst[i] = z * std;
    else dst[i] = __float2bfloat16_rn(z * std);
  }
}

__global__ void embed_kernel(const bf16* __restrict__ table, const int32_t* __restrict__ tokens, float* __restrict__ out,
                             int64_t dim) {
  const int64_t r = blockIdx.x;
  const bf16* src = table + int64_t(tokens[r]) * dim;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) out[r * dim + c] = __bfloat162float(src[c]);
}

// The row norms' block reduction (kThreads threads, one row per block): each thread's float64
// sum of squares in, 1 / sqrt(mean + eps) out to every thread. Once per kernel (shared scratch).
__device__ float block_inv_rms(double s, int64_t dim, float eps) {
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  __shared__ double part[kThreads / 32];
  __shared__ float inv;
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0;
    for (int i = 0; i < int(blockDim.x) / 32; ++i) t += part[i];
    inv = 1.0f / sqrtf(float(t / double(dim)) + eps);
  }
  __syncthreads();
  return inv;
}

// One block per row. kVec: float4 loads and 4-bf16 stores (dim and ldx multiples of 4, 16-byte
// aligned x): the norms run at memory speed only with wide accesses. The sum of squares is float64
// in either path (the CPU back end's); only its order differs.
template <bool kVec>
__global__ void rms_norm_kernel(const float* __restrict__ x, const float* __restrict__ w, bf16* __restrict__ out,
                                int64_t dim, int64_t ldx, float eps) {
  const int64_t r = blockIdx.x;
  const float* row = x + r * ldx;
  double s = 0;
  if constexpr (kVec) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    for (int64_t c = threadIdx.x; c < dim / 4; c += blockDim.x) {
      const float4 v = row4[c];
      s += double(v.x) * v.x + double(v.y) * v.y + double(v.z) * v.z + double(v.w) * v.w;
    }
  } else {
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) s += double(row[c]) * row[c];
  }
  const float inv = block_inv_rms(s, dim, eps);
  if constexpr (kVec) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(out + r * dim);
    for (int64_t c = threadIdx.x; c < dim / 4; c += blockDim.x) {
      const float4 v = row4[c], g = w4[c];
      o2[2 * c] = __floats2bfloat162_rn(v.x * inv * g.x, v.y * inv * g.y);
      o2[2 * c + 1] = __floats2bfloat162_rn(v.z * inv * g.z, v.w * inv * g.w);
    }
  } else {
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) out[r * dim + c] = __float2bfloat16_rn(row[c] * inv * w[c]);
  }
}

__global__ void rope_table_kernel(const float* __restrict__ inv_freq, int half, int64_t pos0, int64_t rows,
                                  float* __restrict__ cs, float* __restrict__ sn) {
  const int64_t n = rows * half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / half;
    const int j = int(i % half);
    const float ang = float(pos0 + r) * inv_freq[j];
    double s, c;
    sincos(double(ang), &s, &c);
    cs[i] = float(c);
    sn[i] = float(s);
  }
}

// One thread per (token, head, pair j): q/k get the rotation, v is copied (pairs as well).
__global__ void rope_split_kernel(RopeSplitParams p) {
  const int half = p.head_dim / 2, heads = p.q_heads + 2 * p.kv_heads;
  const int64_t width = int64_t(heads) * p.head_dim;
  const int64_t n = p.rows * heads * half;
  const bf16* qkv = static_cast<const bf16*>(p.qkv);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int j = int(i % half);
    const int h = int((i / half) % heads);
    const int64_t r = i / (int64_t(half) * heads);
    const int64_t col = int64_t(h) * p.head_dim;
    float a = __bfloat162float(qkv[r * width + col + j]);
    float b = __bfloat162float(qkv[r * width + col + j + half]);
    if (p.bias) {
      a += p.bias[col + j];
      b += p.bias[col + j + half];
    }
    bf16* dst;
    if (h < p.q_heads) {
      dst = static_cast<bf16*>(p.q) + int64_t(h) * p.q_head_stride;
    } else if (h < p.q_heads + p.kv_heads) {
      dst = static_cast<bf16*>(p.k) + int64_t(h - p.q_heads) * p.kv_head_stride;
    } else {
      dst = static_cast<bf16*>(p.v) + int64_t(h - p.q_heads - p.kv_heads) * p.kv_head_stride;
    }
    dst += (p.row0 + r) * p.head_dim;
    if (h < p.q_heads + p.kv_heads) {
      const float c = p.cos[r * half + j], s = p.sin[r * half + j];
      // out[j] = a cos - b sin, out[j + half] = b cos + a sin (rotate_half), the CPU's order.
      dst[j] = __float2bfloat16_rn(a * c + (-b) * s);
      dst[j + half] = __float2bfloat16_rn(b * c + a * s);
    } else {
      dst[j] = __float2bfloat16_rn(a);
      dst[j + half] = __float2bfloat16_rn(b);
    }
  }
}

// The same rotation, two pairs (j, j + 1) per thread with 4-byte loads, rows on grid.y: no 64-bit
// division per element (head_dim a multiple of 4). Bit-identical to rope_split_kernel.
__global__ void rope_split_vec_kernel(RopeSplitParams p) {
  const int half = p.head_dim / 2, q2 = half / 2, heads = p.q_heads + 2 * p.kv_heads;
  const int64_t width = int64_t(heads) * p.head_dim;
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= heads * q2) return;
  const int h = t / q2, j = 2 * (t % q2);
  const int64_t col = int64_t(h) * p.head_dim;
  const bool rotate = h < p.q_heads + p.kv_heads;
  bf16* base;
  if (h < p.q_heads) base = static_cast<bf16*>(p.q) + int64_t(h) * p.q_head_stride;
  else if (rotate) base = static_cast<bf16*>(p.k) + int64_t(h - p.q_heads) * p.kv_head_stride;
  else base = static_cast<bf16*>(p.v) + int64_t(h - p.q_heads - p.kv_heads) * p.kv_head_stride;
  float2 ba = make_float2(0, 0), bb = make_float2(0, 0);
  if (p.bias) {
    ba = make_float2(p.bias[col + j], p.bias[col + j + 1]);
    bb = make_float2(p.bias[col + j + half], p.bias[col + j + half + 1]);
  }
  const bf16* qkv = static_cast<const bf16*>(p.qkv);
  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    const float2 a2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(qkv + r * width + col + j));
    const float2 b2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(qkv + r * width + col + j + half));
    const float a0 = p.bias ? a2.x + ba.x : a2.x, a1 = p.bias ? a2.y + ba.y : a2.y;
    const float b0 = p.bias ? b2.x + bb.x : b2.x, b1 = p.bias ? b2.y + bb.y : b2.y;
    bf16* dst = base + (p.row0 + r) * p.head_dim;
    __nv_bfloat162 lo, hi;
    if (rotate) {
      const float2 c = *reinterpret_cast<const float2*>(p.cos + r * half + j);
      const float2 sn = *reinterpret_cast<const float2*>(p.sin + r * half + j);
      lo = __floats2bfloat162_rn(a0 * c.x + (-b0) * sn.x, a1 * c.y + (-b1) * sn.y);
      hi = __floats2bfloat162_rn(b0 * c.x + a0 * sn.x, b1 * c.y + a1 * sn.y);
    } else {
      lo = __floats2bfloat162_rn(a0, a1);
      hi = __floats2bfloat162_rn(b0, b1);
    }
    *reinterpret_cast<__nv_bfloat162*>(dst + j) = lo;
    *reinterpret_cast<__nv_bfloat162*>(dst + j + half) = hi;
  }
}

// act = silu(gate) * up on 8 bf16 (16 bytes) per thread (ff a multiple of 8, aligned buffers):
// the widest memory-bound step of a layer. Bit-identical to silu_mul_kernel.
__global__ void silu_mul_vec_kernel(const uint4* __restrict__ gu, uint4* __restrict__ act, int64_t rows, int64_t ff8) {
  const int64_t n = rows * ff8;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / ff8, c = i - r * ff8;
    const uint4 gv = gu[r * 2 * ff8 + c], uv = gu[r * 2 * ff8 + ff8 + c];
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gv);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&uv);
    uint4 ov;
    __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&ov);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 g = __bfloat1622float2(g2[e]), u = __bfloat1622float2(u2[e]);
      o2[e] = __floats2bfloat162_rn(g.x / (expf(-g.x) + 1.0f) * u.x, g.y / (expf(-g.y) + 1.0f) * u.y);
    }
    act[i] = ov;
  }
}

__global__ void silu_mul_kernel(const bf16* __restrict__ gu, bf16* __restrict__ act, int64_t rows, int64_t ff) {
  const int64_t n = rows * ff;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / ff, c = i % ff;
    const float g = __bfloat162float(gu[r * 2 * ff + c]), u = __bfloat162float(gu[r * 2 * ff + ff + c]);
    act[i] = __float2bfloat16_rn(g / (expf(-g) + 1.0f) * u);
  }
}

__global__ void gelu_mul_kernel(const bf16* __restrict__ gu, bf16* __restrict__ act, int64_t rows, int64_t ff) {
  const int64_t n = rows * ff;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / ff, c = i % ff;
    const float g = __bfloat162float(gu[r * 2 * ff + c]), u = __bfloat162float(gu[r * 2 * ff + ff + c]);
    float t = g * g;
    t *= 0.044715f;
    t += 1.0f;
    t *= g;
    t *= 0.79788456080286535588f;  // sqrt(2/pi)
    t = tanhf(t);
    t += 1.0f;
    t *= 0.5f;
    act[i] = __float2bfloat16_rn(g * t * u);
  }
}

__global__ void scale_kernel(float* __restrict__ x, int64_t n, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] *= scale;
}

__global__ void softcap_kernel(float* __restrict__ z, int64_t n, float cap) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    z[i] = tanhf(z[i] / cap) * cap;
}

// One warp per (row, head) of the q and k heads.
__global__ void head_norm_kernel(HeadNormParams p) {
  const int heads = p.q_heads + p.kv_heads;
  const int64_t width = int64_t(p.q_heads + 2 * p.kv_heads) * p.head_dim;
  const int64_t warps = p.rows * heads;
  const int lane = threadIdx.x % 32;
  for (int64_t wi = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; wi < warps;
       wi += int64_t(gridDim.x) * blockDim.x / 32) {
    const int64_t r = wi / heads;
    const int h = int(wi % heads);
    bf16* x = static_cast<bf16*>(p.qkv) + r * width + int64_t(h) * p.head_dim;
    const float* w = h < p.q_heads ? p.q_weight : p.k_weight;
    double s = 0;
    for (int c = lane; c < p.head_dim; c += 32) {
      const double v = __bfloat162float(x[c]);
      s += v * v;
    }
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    const float inv = 1.0f / sqrtf(float(s / double(p.head_dim)) + p.eps);
    for (int c = lane; c < p.head_dim; c += 32) x[c] = __float2bfloat16_rn(__bfloat162float(x[c]) * inv * w[c]);
  }
}

__global__ void rms_norm_add_kernel(const float* __restrict__ y, const float* __restrict__ w, float* __restrict__ x,
                                    int64_t dim, float eps) {
  const int64_t r = blockIdx.x;
  const float* row = y + r * dim;
  double s = 0;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) s += double(row[c]) * row[c];
  const float inv = block_inv_rms(s, dim, eps);
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) x[r * dim + c] += row[c] * inv * w[c];
}

// 8 bf16 (16 bytes) per thread where the head dim allows (always: d is 64, 128 or 256 here).
__global__ void heads_to_rows_kernel(const uint4* __restrict__ o, uint4* __restrict__ out, int heads, int64_t rows,
                                     int vecs_per_head_row, int64_t o_head_stride_vecs, int64_t row0) {
  const int64_t n = rows * heads * vecs_per_head_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int v = int(i % vecs_per_head_row);
    const int h = int((i / vecs_per_head_row) % heads);
    const int64_t r = i / (int64_t(vecs_per_head_row) * heads);
    out[i] = o[int64_t(h) * o_head_stride_vecs + (row0 + r) * vecs_per_head_row + v];
  }
}

__global__ void logits_rows_kernel(const float* __restrict__ logits, int64_t vocab, const int32_t* __restrict__ target,
                                   double* __restrict__ nll, int32_t* __restrict__ argmax) {
  const int64_t r = blockIdx.x;
  const float* row = logits + r * vocab;
  float m = -INFINITY;
  int64_t arg = 0;
  for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x)
    if (row[c] > m) {
      m = row[c];
      arg = c;
    }
  // Block argmax, first maximum on ties (lowest index).
  __shared__ float sm[kThreads];
  __shared__ int64_t sa[kThreads];
  sm[threadIdx.x] = m;
  sa[threadIdx.x] = arg;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) {
      const float om = sm[threadIdx.x + w];
      const int64_t oa = sa[threadIdx.x + w];
      if (om > sm[threadIdx.x] || (om == sm[threadIdx.x] && oa < sa[threadIdx.x])) {
        sm[threadIdx.x] = om;
        sa[threadIdx.x] = oa;
      }
    }
    __syncthreads();
  }
  const float mx = sm[0];
  if (argmax && threadIdx.x == 0) argmax[r] = int32_t(sa[0]);
  if (!nll) return;
  double s = 0;
  for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) s += double(expf(row[c] - mx));
  __shared__ double ss[kThreads];
  ss[threadIdx.x] = s;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) ss[threadIdx.x] += ss[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) nll[r] = double(mx) + log(ss[0]) - double(row[target[r]]);
}

}  // namespace
}  // namespace detail

Status fill_normal(void* dst, ElemType type, int64_t n, uint64_t seed, float std, Stream s) noexcept {
  if (n < 0 || (n > 0 && !dst) || (type != ElemType::bf16 && type != ElemType::f32))
    return fail(Status::invalid_argument, "fill_normal: bad arguments (bf16 or f32)");
  if (n == 0) return Status::ok;
  const unsigned g = detail::grid_for(n, 4);
  if (type == ElemType::f32)
    detail::fill_normal_kernel<float><<<g, detail::kThreads, 0, detail::stream_of(s)>>>(static_cast<float*>(dst), n, seed, std);
  else
    detail::fill_normal_kernel<__nv_bfloat16><<<g, detail::kThreads, 0, detail::stream_of(s)>>>(
        static_cast<__nv_bfloat16*>(dst), n, seed, std);
  return detail::check_launch("fill_normal launch");
}

Status embed_rows(const void* table, const int32_t* tokens, float* out, int64_t rows, int64_t dim, Stream s) noexcept {
  if (!table || !tokens || !out || rows <= 0 || dim <= 0 || rows > 2147483647)
    return fail(Status::invalid_argument, "embed_rows: bad arguments");
  detail::embed_kernel<<<unsigned(rows), detail::kThreads, 0, detail::stream_of(s)>>>(
      static_cast<const __nv_bfloat16*>(table), tokens, out, dim);
  return detail::check_launch("embed_rows launch");
}

Status rms_norm_rows(const float* x, const float* w, void* out, int64_t rows, int64_t dim, float eps, int64_t ldx,
                     Stream s) noexcept {
  if (!x || !w || !out || rows <= 0 || dim <= 0 || rows > 2147483647 || (ldx != 0 && ldx < dim))
    return fail(Status::invalid_argument, "rms_norm_rows: bad arguments");
  const int64_t ld = ldx ? ldx : dim;
  const bool vec = dim % 4 == 0 && ld % 4 == 0 && detail::aligned16(x) && detail::aligned16(w) &&
                   reinterpret_cast<uintptr_t>(out) % 4 == 0;
  if (vec)
    detail::rms_norm_kernel<true><<<unsigned(rows), detail::kThreads, 0, detail::stream_of(s)>>>(
        x, w, static_cast<__nv_bfloat16*>(out), dim, ld, eps);
  else
    detail::rms_norm_kernel<false><<<unsigned(rows), detail::kThreads, 0, detail::stream_of(s)>>>(
        x, w, static_cast<__nv_bfloat16*>(out), dim, ld, eps);
  return detail::check_launch("rms_norm_rows launch");
}

Status rope_table(const float* inv_freq, int half, int64_t pos0, int64_t rows, float* cos_out, float* sin_out,
                  Stream s) noexcept {
  if (!inv_freq || !cos_out || !sin_out || half <= 0 || rows <= 0 || pos0 < 0)
    return fail(Status::invalid_argument, "rope_table: bad arguments");
  detail::rope_table_kernel<<<detail::grid_for(rows * half, 4), detail::kThreads, 0, detail::stream_of(s)>>>(
      inv_freq, half, pos0, rows, cos_out, sin_out);
  return detail::check_launch("rope_table launch");
}

Status rope_split(const RopeSplitParams& p) noexcept {
  if (!p.qkv || !p.cos || !p.sin || !p.q || !p.k || !p.v || p.q_heads <= 0 || p.kv_heads <= 0 || p.head_dim <= 0 ||
      p.head_dim % 2 || p.rows <= 0 || p.row0 < 0 || p.q_head_stride < (p.row0 + p.rows) * p.head_dim ||
      p.kv_head_stride < (p.row0 + p.rows) * p.head_dim)
    return fail(Status::invalid_argument, "rope_split: bad arguments (null pointer, odd head_dim or head strides too small)");
  const int heads = p.q_heads + 2 * p.kv_heads;
  const auto a4 = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 4 == 0; };
  if (p.head_dim % 4 == 0 && a4(p.qkv) && a4(p.q) && a4(p.k) && a4(p.v) && p.q_head_stride % 2 == 0 &&
      p.kv_head_stride % 2 == 0 && reinterpret_cast<uintptr_t>(p.cos) % 8 == 0 &&
      reinterpret_cast<uintptr_t>(p.sin) % 8 == 0) {
    const int per_row = heads * (p.head_dim / 4);
    const dim3 grid(unsigned((per_row + detail::kThreads - 1) / detail::kThreads),
                    unsigned(p.rows < 65535 ? p.rows : 65535));
    detail::rope_split_vec_kernel<<<grid, detail::kThreads, 0, detail::stream_of(p.stream)>>>(p);
  } else {
    const int64_t n = p.rows * heads * (p.head_dim / 2);
    detail::rope_split_kernel<<<detail::grid_for(n, 4), detail::kThreads, 0, detail::stream_of(p.stream)>>>(p);
  }
  return detail::check_launch("rope_split launch");
}

Status silu_mul(const void* gu, void* act, int64_t rows, int64_t ff, Stream s) noexcept {
  if (!gu || !act || rows <= 0 || ff <= 0) return fail(Status::invalid_argument, "silu_mul: bad arguments");
  if (ff % 8 == 0 && detail::aligned16(gu) && detail::aligned16(act))
    detail::silu_mul_vec_kernel<<<detail::grid_for(rows * ff / 8, 2), detail::kThreads, 0, detail::stream_of(s)>>>(
        static_cast<const uint4*>(gu), static_cast<uint4*>(act), rows, ff / 8);
  else
    detail::silu_mul_kernel<<<detail::grid_for(rows * ff, 4), detail::kThreads, 0, detail::stream_of(s)>>>(
        static_cast<const __nv_bfloat16*>(gu), static_cast<__nv_bfloat16*>(act), rows, ff);
  return detail::check_launch("silu_mul launch");
}

Status gelu_mul(const void* gu, void* act, int64_t rows, int64_t ff, Stream s) noexcept {
  if (!gu || !act || rows <= 0 || ff <= 0) return fail(Status::invalid_argument, "gelu_mul: bad arguments");
  detail::gelu_mul_kernel<<<detail::grid_for(rows * ff, 4), detail::kThreads, 0, detail::stream_of(s)>>>(
      static_cast<const __nv_bfloat16*>(gu), static_cast<__nv_bfloat16*>(act), rows, ff);
  return detail::check_launch("gelu_mul launch");
}

Status scale_f32(float* x, int64_t n, float scale, Stream s) noexcept {
  if (!x || n <= 0) return fail(Status::invalid_argument, "scale_f32: bad arguments");
  detail::scale_kernel<<<detail::grid_for(n, 4), detail::kThreads, 0, detail::stream_of(s)>>>(x, n, scale);
  return detail::check_launch("scale_f32 launch");
}

Status softcap(float* z, int64_t n, float cap, Stream s) noexcept {
  if (!z || n <= 0 || !(cap > 0)) return fail(Status::invalid_argument, "softcap: bad arguments (cap must be > 0)");
  detail::softcap_kernel<<<detail::grid_for(n, 4), detail::kThreads, 0, detail::stream_of(s)>>>(z, n, cap);
  return detail::check_launch("softcap launch");
}

Status head_rms_norm(const HeadNormParams& p) noexcept {
  if (!p.qkv || !p.q_weight || !p.k_weight || p.q_heads <= 0 || p.kv_heads <= 0 || p.head_dim <= 0 || p.rows <= 0)
    return fail(Status::invalid_argument, "head_rms_norm: bad arguments");
  const int64_t threads = p.rows * (p.q_heads + p.kv_heads) * 32;
  detail::head_norm_kernel<<<detail::grid_for(threads), detail::kThreads, 0, detail::stream_of(p.stream)>>>(p);
  return detail::check_launch("head_rms_norm launch");
}

Status rms_norm_add_rows(const float* y, const float* w, float* x, int64_t rows, int64_t dim, float eps,
                         Stream s) noexcept {
  if (!y || !w || !x || rows <= 0 || dim <= 0 || rows > 2147483647)
    return fail(Status::invalid_argument, "rms_norm_add_rows: bad arguments");
  detail::rms_norm_add_kernel<<<unsigned(rows), detail::kThreads, 0, detail::stream_of(s)>>>(y, w, x, dim, eps);
  return detail::check_launch("rms_norm_add_rows launch");
}

Status heads_to_rows(const void* o, void* rows_out, int heads, int64_t rows, int head_dim, int64_t o_head_stride,
                     int64_t row0, Stream s) noexcept {
  if (!o || !rows_out || heads <= 0 || rows <= 0 || head_dim <= 0 || head_dim % 8 || o_head_stride % 8 || row0 < 0 ||
      o_head_stride < (row0 + rows) * head_dim || !detail::aligned16(o) || !detail::aligned16(rows_out))
    return fail(Status::invalid_argument, "heads_to_rows: bad arguments (head_dim and head stride multiples of 8, "
                                          "16-byte aligned buffers)");
  const int vec = head_dim / 8;
  detail::heads_to_rows_kernel<<<detail::grid_for(rows * heads * vec, 2), detail::kThreads, 0, detail::stream_of(s)>>>(
      static_cast<const uint4*>(o), static_cast<uint4*>(rows_out), heads, rows, vec, o_head_stride / 8, row0);
  return detail::check_launch("heads_to_rows launch");
}

Status logits_rows(const float* logits, int64_t rows, int64_t vocab, const int32_t* target, double* nll,
                   int32_t* argmax, Stream s) noexcept {
  if (!logits || rows <= 0 || vocab <= 0 || rows > 2147483647 || (nll && !target))
    return fail(Status::invalid_argument, "logits_rows: bad arguments");
  detail::logits_rows_kernel<<<unsigned(rows), detail::kThreads, 0, detail::stream_of(s)>>>(logits, vocab, target, nll,
                                                                                             argmax);
  return detail::check_launch("logits_rows launch");
}

EventLog::~EventLog() {
  for (size_t i = 0; i < n_; ++i) cudaEventDestroy(static_cast<cudaEvent_t>(events_[i]));
  delete[] events_;
}

Status EventLog::record(size_t i, Stream s) noexcept {
  if (i > n_) return fail(Status::invalid_argument, "EventLog::record: index past the end");
  if (i == n_) {
    if (n_ == cap_) {
      const size_t nc = cap_ ? cap_ * 2 : 64;
      void** ne = new (std::nothrow) void*[nc];
      if (!ne) return fail(Status::out_of_memory, "EventLog: host allocation");
      for (size_t j = 0; j < n_; ++j) ne[j] = events_[j];
      delete[] events_;
      events_ = ne;
      cap_ = nc;
    }
    cudaEvent_t e;
    Status st = detail::from_cuda(cudaEventCreate(&e), "cudaEventCreate");
    if (st != Status::ok) return st;
    events_[n_++] = e;
  }
  return detail::from_cuda(cudaEventRecord(static_cast<cudaEvent_t>(events_[i]), detail::stream_of(s)), "cudaEventRecord");
}

Status EventLog::elapsed_ms(size_t a, size_t b, float* ms) noexcept {
  if (a >= n_ || b >= n_ || !ms) return fail(Status::invalid_argument, "EventLog::elapsed_ms: event not recorded");
  Status st = detail::from_cuda(cudaEventSynchronize(static_cast<cudaEvent_t>(events_[b])), "cudaEventSynchronize");
  if (st != Status::ok) return st;
  return detail::from_cuda(
      cudaEventElapsedTime(ms, static_cast<cudaEvent_t>(events_[a]), static_cast<cudaEvent_t>(events_[b])),
      "cudaEventElapsedTime");
}

Status device_memory_used(size_t* used) noexcept {
  if (!used) return fail(Status::invalid_argument, "device_memory_used: null pointer");
  size_t free_b = 0, total = 0;
  Status st = detail::from_cuda(cudaMemGetInfo(&free_b, &total), "cudaMemGetInfo");
  if (st == Status::ok) *used = total - free_b;
  return st;
}

}  // namespace proxyattn::kernels
