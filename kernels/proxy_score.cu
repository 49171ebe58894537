// ProxyAttn proxy heads: mean-pool groups of heads into one head per group (fp32 sums, stored
// in the operand dtype). The scores themselves are row_lse (full.cu) on the proxy heads followed
// by block_scores with reduce = max (oracle_mass.cu); the dispatch layer chains the three.
#include <algorithm>

#include "common.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace detail {
namespace {

struct PoolArgs {
  const void* src;
  void* dst;
  int64_t sh, st;
  int64_t n;
  int d;
  int groups;
  int32_t begin[kMaxPoolGroups];
  int32_t end[kMaxPoolGroups];
};

// One thread per (group, token, 8-element chunk): 16-byte loads, fp32 mean.
template <class T>
__global__ void pool_heads_kernel(const PoolArgs a) {
  const int chunks = a.d / 8;
  const int64_t total = int64_t(a.groups) * a.n * chunks;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < total; x += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(x % chunks);
    const int64_t t = (x / chunks) % a.n;
    const int g = int(x / (int64_t(chunks) * a.n));
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int h = a.begin[g]; h < a.end[g]; ++h) {
      const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.src) + h * a.sh + t * a.st + c * 8);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] += to_float(e[u]);
    }
    const float inv = 1.f / float(a.end[g] - a.begin[g]);
    uint4 out;
    T* o = reinterpret_cast<T*>(&out);
#pragma unroll
    for (int u = 0; u < 8; ++u) o[u] = from_float<T>(acc[u] * inv);
    *reinterpret_cast<uint4*>(static_cast<T*>(a.dst) + (int64_t(g) * a.n + t) * a.d + c * 8) = out;
  }
}

}  // namespace
}  // namespace detail

Status pool_heads(const PoolHeadsParams& p) noexcept {
  if (p.type != ElemType::bf16 && p.type != ElemType::f16)
    return fail(Status::unsupported, "pool_heads: type must be bf16 or f16");
  if (!p.src || !p.dst) return fail(Status::invalid_argument, "pool_heads: null pointer");
  if (p.groups < 1 || p.groups > kMaxPoolGroups) return fail(Status::invalid_argument, "pool_heads: groups outside [1, 128]");
  if (p.head_dim <= 0 || p.head_dim % 8 != 0 || p.seq_len <= 0 || p.heads <= 0)
    return fail(Status::invalid_argument, "pool_heads: bad shape");
  detail::PoolArgs a{};
  a.src = p.src;
  a.dst = p.dst;
  a.st = p.stride_token ? p.stride_token : p.head_dim;
  a.sh = p.stride_head ? p.stride_head : p.seq_len * a.st;
  if ((a.st | a.sh) % 8 != 0 || !detail::aligned16(p.src) || !detail::aligned16(p.dst))
    return fail(Status::invalid_argument, "pool_heads: strides must be multiples of 8, pointers 16-byte aligned");
  a.n = p.seq_len;
  a.d = p.head_dim;
  a.groups = p.groups;
  for (int g = 0; g < p.groups; ++g) {
    if (p.head_begin[g] < 0 || p.head_end[g] > p.heads || p.head_begin[g] >= p.head_end[g])
      return fail(Status::invalid_argument, "pool_heads: empty or out-of-range head range");
    a.begin[g] = p.head_begin[g];
    a.end[g] = p.head_end[g];
  }
  const int64_t total = int64_t(p.groups) * p.seq_len * (p.head_dim / 8);
  const unsigned grid = unsigned(std::min<int64_t>((total + 255) / 256, 65535 * 4));
  cudaStream_t st = detail::stream_of(p.stream);
  if (p.type == ElemType::bf16)
    detail::pool_heads_kernel<__nv_bfloat16><<<grid, 256, 0, st>>>(a);
  else
    detail::pool_heads_kernel<__half><<<grid, 256, 0, st>>>(a);
  return detail::check_launch("pool_heads launch");
}

}  // namespace proxyattn::kernels
