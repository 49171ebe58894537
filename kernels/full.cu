// Full causal attention (flash-style, mma.sync) and the row-LSE-only pass. The kernel itself is
// attn_kernel in attention_core.cuh; this file picks the tile configuration per head dim and
// dtype and launches it.
//
// Tile configurations (D, MT m16 tiles per warp, NW warps, BKV keys per tile; PIPE and LAZY
// as in attention_core.cuh):
//   d 64:  MT 2, NW 4, BKV 64 (128 query rows per CTA)
//   d 128: MT 2, NW 4, BKV 64 (FlashAttention-2's shape, Q re-read from shared memory);
//          variant 0 (default) = FA2's schedule (PIPE 0, no LAZY, no spills: fastest on the
//          H100), 1 = PIPE 0 + LAZY, 2 = PIPE 1 + LAZY, 3 = PIPE 1 (NOTES.md has the timings)
//   d 256: MT 1, NW 4, BKV 64 (64 rows; O alone is 128 fp32 registers per thread)
// All defaults use PIPE 0 without LAZY (the others spilled registers and ran slower).
// A sliding window (AttentionParams::window) has its own instantiation of each default (WIN):
// it skips the key tiles left of a query tile's first window and masks the band's left edge.
#include <algorithm>

#include <type_traits>

#include "attention_launch.cuh"
#include "attention_sm90_launch.cuh"

namespace proxyattn::kernels {

using detail::AttnArgs;
using detail::AttnMode;
using detail::fail;
using detail::launch_attn;

namespace detail {
namespace {
// lse = ln 2 * (M + log2 sum_z l_z 2^(m_z - M)) over the key splits of one row.
__global__ void lse_combine_kernel(const float2* __restrict__ part, int splits, int heads, int64_t rows,
                                   int64_t row_begin, int64_t n, float* __restrict__ lse) {
  const int64_t total = int64_t(heads) * rows;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < total; x += int64_t(gridDim.x) * blockDim.x) {
    const int h = int(x / rows);
    const int64_t r = x % rows;
    float mx = -INFINITY;
    for (int z = 0; z < splits; ++z) {
      const float2 v = part[(int64_t(z) * heads + h) * rows + r];
      if (v.y > 0.f) mx = fmaxf(mx, v.x);
    }
    float l = 0.f;
    for (int z = 0; z < splits; ++z) {
      const float2 v = part[(int64_t(z) * heads + h) * rows + r];
      if (v.y > 0.f) l += v.y * exp2f(v.x - mx);
    }
    lse[int64_t(h) * n + row_begin + r] = l > 0.f ? (mx + log2f(l)) * kLn2 : -INFINITY;
  }
}
}  // namespace
}  // namespace detail

namespace {

template <class T, AttnMode MODE>
Status dispatch_full(const AttnArgs& a, const AttentionParams& p) {
  cudaStream_t st = detail::stream_of(p.stream);
  if constexpr (MODE == AttnMode::full) {
    if (a.window > 0) {  // sliding window (Gemma-3 local layers): the default schedule only
      if (p.variant != 0) return fail(Status::unsupported, "full_attention: a sliding window runs variant 0 only");
      switch (p.head_dim) {
        case 64: return launch_attn<64, 2, 4, 64, T, MODE, 0, false, 1, true>(a, p.q_heads, st);
        case 128: return launch_attn<128, 2, 4, 64, T, MODE, 0, false, 1, true>(a, p.q_heads, st);
        case 256: return launch_attn<256, 1, 4, 64, T, MODE, 0, false, 1, true>(a, p.q_heads, st);
      }
      return fail(Status::unsupported, "attention: head_dim must be 64, 128 or 256");
    }
  }
  switch (p.head_dim) {
    case 64: return launch_attn<64, 2, 4, 64, T, MODE, 0, false>(a, p.q_heads, st);
    case 128:
      if constexpr (MODE == AttnMode::full) {
        if (p.variant == 1) return launch_attn<128, 2, 4, 64, T, MODE, 0, true>(a, p.q_heads, st);
        if (p.variant == 2) return launch_attn<128, 2, 4, 64, T, MODE, 1, true>(a, p.q_heads, st);
        if (p.variant == 3) return launch_attn<128, 2, 4, 64, T, MODE, 1, false>(a, p.q_heads, st);
      }
      return launch_attn<128, 2, 4, 64, T, MODE, 0, false>(a, p.q_heads, st);
    case 256: return launch_attn<256, 1, 4, 64, T, MODE, 0, false>(a, p.q_heads, st);
    case 384:  // row_lse of the exact proxy's fp16 pieces (make_attn_args admits nothing else)
      if constexpr (MODE == AttnMode::lse && std::is_same_v<T, __half>)
        return launch_attn<384, 2, 4, 64, T, MODE, 0, false>(a, p.q_heads, st);
      break;
  }
  return fail(Status::unsupported, "attention: head_dim must be 64, 128 or 256");
}

}  // namespace

Status full_attention(const AttentionParams& p) noexcept {
  AttnArgs a{};
  Status s = detail::make_attn_args(p, true, &a);
  if (s != Status::ok) return s;
  if (!p.o && !p.lse) return fail(Status::invalid_argument, "full_attention: neither o nor lse given");
  if (p.variant < 0 || p.variant > 3) return fail(Status::invalid_argument, "full_attention: variant must be 0..3");
  bool hopper = false;
  s = detail::pick_sm90(p.impl, a, p.head_dim, false, 0, &hopper);
  if (s != Status::ok) return s;
  if (hopper)
    return detail::launch_sm90(detail::Sm90Mode::full, a, p.in_type, p.head_dim, p.q_heads, p.kv_heads, {},
                               detail::stream_of(p.stream));
  return p.in_type == ElemType::bf16 ? dispatch_full<__nv_bfloat16, AttnMode::full>(a, p)
                                     : dispatch_full<__half, AttnMode::full>(a, p);
}

Status row_lse(const AttentionParams& p) noexcept {
  AttnArgs a{};
  Status s = detail::make_attn_args(p, false, &a);
  if (s != Status::ok) return s;
  if (!p.lse) return fail(Status::invalid_argument, "row_lse: lse output required");
  if (p.window != 0) return fail(Status::unsupported, "row_lse: no sliding window (full_attention only)");
  a.o = nullptr;
  a.v = nullptr;
  // Split the keys when the row tiles alone cannot fill the GPU (e.g. one query block per head).
  constexpr int kBR = 64;  // smallest row tile of the lse configs (d 256); d 64/128 use 128
  const int64_t rows = p.seq_len - p.row_begin;
  const int64_t br = p.head_dim == 256 ? kBR : 128;
  const int64_t ctas = (rows + br - 1) / br * p.q_heads;
  const int64_t max_tiles = (p.seq_len + 63) / 64;
  int splits = p.kv_splits;
  if (splits < 0) return fail(Status::invalid_argument, "row_lse: kv_splits must be >= 0");
  if (splits == 0) {
    const int sms = detail::sm_count();
    splits = ctas >= 2 * sms ? 1 : int(std::min<int64_t>({(4 * sms + ctas - 1) / ctas, max_tiles, 64}));
  }
  if (splits > 65535) return fail(Status::invalid_argument, "row_lse: kv_splits too large");
  if (splits <= 1) {
    bool hopper = false;
    s = detail::pick_sm90(p.impl, a, p.head_dim, false, 0, &hopper, /*d256=*/true);
    if (s != Status::ok) return s;
    if (hopper)
      return detail::launch_sm90(detail::Sm90Mode::lse, a, p.in_type, p.head_dim, p.q_heads, p.kv_heads, {},
                                 detail::stream_of(p.stream));
  } else if (p.impl == AttnImpl::hopper) {
    return fail(Status::unsupported, "hopper row_lse: keys split over CTAs (rows are few); use kv_splits = 1");
  }
  if (splits <= 1)
    return p.in_type == ElemType::bf16 ? dispatch_full<__nv_bfloat16, AttnMode::lse>(a, p)
                                       : dispatch_full<__half, AttnMode::lse>(a, p);
  cudaStream_t st = detail::stream_of(p.stream);
  const size_t bytes = size_t(splits) * p.q_heads * rows * sizeof(float2);
  void* ws = nullptr;
  s = detail::from_cuda(cudaMallocAsync(&ws, bytes, st), "row_lse: workspace");
  if (s != Status::ok) return s;
  a.kv_splits = splits;
  a.part = static_cast<float2*>(ws);
  s = p.in_type == ElemType::bf16 ? dispatch_full<__nv_bfloat16, AttnMode::lse>(a, p)
                                  : dispatch_full<__half, AttnMode::lse>(a, p);
  if (s == Status::ok) {
    const int64_t total = int64_t(p.q_heads) * rows;
    const unsigned grid = unsigned(std::min<int64_t>((total + 255) / 256, 4096));
    detail::lse_combine_kernel<<<grid, 256, 0, st>>>(a.part, splits, p.q_heads, rows, p.row_begin, p.seq_len, p.lse);
    s = detail::check_launch("row_lse combine");
  }
  const Status sf = detail::from_cuda(cudaFreeAsync(ws, st), "row_lse: workspace free");
  return s != Status::ok ? s : sf;
}

}  // namespace proxyattn::kernels
