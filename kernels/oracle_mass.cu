// Block scores from Q, K and the row LSE (block_score_kernel in attention_core.cuh): the second
// pass of the oracle block mass (mean of the row sums of P over each block pair) and, with
// reduce = max, of the ProxyAttn token-level max-pool. One CTA per (query block, head); tiles
// of P live only in registers, the output is [H, Nb, Nb] floats.
#include <algorithm>

#include "attention_launch.cuh"
#include "attention_sm90_launch.cuh"

namespace proxyattn::kernels {

using detail::BlockScoreArgs;
using detail::fail;

namespace {

template <int D, int MT, int NW, int BKV, class T>
Status launch_scores(const BlockScoreArgs& a, int q_heads, cudaStream_t st) {
  using Cfg = detail::AttnConfig<D, MT, NW, BKV>;
  const size_t smem = Cfg::template smem_bytes<T>(0);
  auto kern = detail::block_score_kernel<D, MT, NW, BKV, T>;
  {  // always: the kernel's static shared memory counts against the 48 KB default too
    Status s = detail::from_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                                 "block_scores: cudaFuncSetAttribute");
    if (s != Status::ok) return s;
  }
  const dim3 grid{unsigned(a.out_rows), unsigned(q_heads), unsigned(a.key_splits)};
  kern<<<grid, Cfg::NT, smem, st>>>(a);
  return detail::check_launch("block_scores launch");
}

template <class T>
Status dispatch_scores(const BlockScoreArgs& a, const BlockScoreParams& p) {
  cudaStream_t st = detail::stream_of(p.stream);
  if (p.block == 128) {
    switch (p.head_dim) {
      case 64: return launch_scores<64, 2, 4, 64, T>(a, p.q_heads, st);
      case 128: return launch_scores<128, 2, 4, 64, T>(a, p.q_heads, st);
      case 256: return launch_scores<256, 2, 4, 64, T>(a, p.q_heads, st);
    }
  } else {
    switch (p.head_dim) {
      case 64: return launch_scores<64, 1, 4, 64, T>(a, p.q_heads, st);
      case 128: return launch_scores<128, 1, 4, 64, T>(a, p.q_heads, st);
      case 256: return launch_scores<256, 1, 4, 64, T>(a, p.q_heads, st);
    }
  }
  return fail(Status::unsupported, "block_scores: head_dim must be 64, 128 or 256");
}

}  // namespace

Status block_scores(const BlockScoreParams& p) noexcept {
  if (p.in_type != ElemType::bf16 && p.in_type != ElemType::f16)
    return fail(Status::unsupported, "block_scores: in_type must be bf16 or f16");
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256)
    return fail(Status::unsupported, "block_scores: head_dim must be 64, 128 or 256");
  if (p.block != 64 && p.block != 128) return fail(Status::unsupported, "block_scores: block must be 64 or 128");
  if (p.q_heads <= 0 || p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 || p.q_heads > 65535)
    return fail(Status::invalid_argument, "block_scores: q_heads must be a positive multiple of kv_heads");
  if (p.seq_len <= 0) return fail(Status::invalid_argument, "block_scores: seq_len must be positive");
  if (!p.q || !p.k || !p.lse || !p.out) return fail(Status::invalid_argument, "block_scores: null pointer");
  if (!detail::aligned16(p.q) || !detail::aligned16(p.k))
    return fail(Status::invalid_argument, "block_scores: q/k must be 16-byte aligned");
  if (p.query_stride < 1) return fail(Status::invalid_argument, "block_scores: query_stride must be >= 1");
  const int64_t nb = (p.seq_len + p.block - 1) / p.block;
  if (nb > 65535) return fail(Status::invalid_argument, "block_scores: too many blocks");
  if (p.row_block_begin < 0 || p.row_block_begin >= nb)
    return fail(Status::invalid_argument, "block_scores: row_block_begin outside [0, Nb)");
  BlockScoreArgs a{};
  const int64_t d = p.head_dim, n = p.seq_len;
  a.q = p.q;
  a.k = p.k;
  a.lse = p.lse;
  a.out = p.out;
  a.qst = p.q_stride_token ? p.q_stride_token : d;
  a.qsh = p.q_stride_head ? p.q_stride_head : n * a.qst;
  a.kst = p.k_stride_token ? p.k_stride_token : d;
  a.ksh = p.k_stride_head ? p.k_stride_head : n * a.kst;
  if ((a.qst | a.qsh | a.kst | a.ksh) % 8 != 0)
    return fail(Status::invalid_argument, "block_scores: strides must be multiples of 8 elements");
  a.n = n;
  a.group = p.q_heads / p.kv_heads;
  a.nb = int(nb);
  a.row_block_begin = p.row_block_begin;
  a.out_rows = int(nb) - p.row_block_begin;
  a.query_stride = p.query_stride;
  a.reduce_max = p.reduce == BlockReduce::max ? 1 : 0;
  const float scale = p.scale > 0.f ? p.scale : 1.0f / std::sqrt(float(p.head_dim));
  a.scale_log2 = scale * detail::kLog2e;
  // Split the key blocks when the query blocks alone cannot fill the GPU (the last-block mass).
  if (p.key_splits < 0) return fail(Status::invalid_argument, "block_scores: key_splits must be >= 0");
  int splits = p.key_splits;
  if (splits == 0) {
    int sms = 132, dev = 0;
    if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    const int64_t ctas = int64_t(a.out_rows) * p.q_heads;
    splits = ctas >= 2 * sms ? 1 : int(std::min<int64_t>({(4 * sms + ctas - 1) / ctas, nb, 64}));
  }
  a.key_splits = std::min<int>(std::max(splits, 1), int(std::min<int64_t>(nb, 65535)));
  // The max-pool of a whole layer (ProxyAttn's second pass) on Hopper: attn_sm90_kernel, blockmax.
  if (p.impl != AttnImpl::portable) {
    const char* why = p.reduce != BlockReduce::max ? "hopper block_scores: only reduce = max"
                      : p.block != 128             ? "hopper block_scores: block must be 128"
                      : p.row_block_begin != 0     ? "hopper block_scores: row_block_begin must be 0"
                      : a.key_splits != 1          ? "hopper block_scores: keys split over CTAs (query blocks are few)"
                                                   : nullptr;
    detail::AttnArgs aa{};
    if (!why) {
      aa.q = p.q;
      aa.k = p.k;
      aa.lse = const_cast<float*>(p.lse);
      aa.qst = a.qst;
      aa.qsh = a.qsh;
      aa.kst = a.kst;
      aa.ksh = a.ksh;
      aa.n = n;
      aa.group = a.group;
      aa.scale_log2 = a.scale_log2;
      aa.kv_splits = 1;
      why = detail::sm90_unsupported_reason(aa, p.head_dim, false, 0);
    }
    if (!why) {
      detail::Sm90Scores sco;
      sco.out = p.out;
      sco.query_stride = p.query_stride;
      return detail::launch_sm90(detail::Sm90Mode::blockmax, aa, p.in_type, p.head_dim, p.q_heads, p.kv_heads, sco,
                                 detail::stream_of(p.stream));
    }
    if (p.impl == AttnImpl::hopper) return fail(Status::unsupported, why);
  }
  return p.in_type == ElemType::bf16 ? dispatch_scores<__nv_bfloat16>(a, p) : dispatch_scores<__half>(a, p);
}

}  // namespace proxyattn::kernels
