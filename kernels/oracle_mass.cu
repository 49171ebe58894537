// Block scores from Q, K and the row LSE (block_score_kernel in attention_core.cuh): the second
// pass of the oracle block mass (mean of the row sums of P over each block pair) and, with
// reduce = max, of the ProxyAttn token-level max-pool. One CTA per (query block, head); tiles
// of P live only in registers, the output is [H, Nb, Nb] floats.
#include <algorithm>
#include <type_traits>

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
      case 384:  // the exact proxy's fp16 pieces (make_block_score_args admits f16 only)
        if constexpr (std::is_same_v<T, __half>) return launch_scores<384, 2, 4, 64, T>(a, p.q_heads, st);
        break;
    }
  } else {
    switch (p.head_dim) {
      case 64: return launch_scores<64, 1, 4, 64, T>(a, p.q_heads, st);
      case 128: return launch_scores<128, 1, 4, 64, T>(a, p.q_heads, st);
      case 256: return launch_scores<256, 1, 4, 64, T>(a, p.q_heads, st);
      case 384:
        if constexpr (std::is_same_v<T, __half>) return launch_scores<384, 1, 4, 64, T>(a, p.q_heads, st);
        break;
    }
  }
  return fail(Status::unsupported, "block_scores: head_dim must be 64, 128 or 256");
}

}  // namespace

Status block_scores(const BlockScoreParams& p) noexcept {
  BlockScoreArgs a{};
  Status s = detail::make_block_score_args(p, "block_scores", true, &a);
  if (s != Status::ok) return s;
  const int64_t nb = a.nb;
  // Split the key blocks when the query blocks alone cannot fill the GPU (the last-block mass).
  if (p.key_splits < 0) return fail(Status::invalid_argument, "block_scores: key_splits must be >= 0");
  int splits = p.key_splits;
  if (splits == 0) {
    const int sms = detail::sm_count();
    const int64_t ctas = int64_t(a.out_rows) * p.q_heads;
    splits = ctas >= 2 * sms ? 1 : int(std::min<int64_t>({(4 * sms + ctas - 1) / ctas, nb, 64}));
  }
  a.key_splits = std::min<int>(std::max(splits, 1), int(std::min<int64_t>(nb, 65535)));
  // The max-pool (ProxyAttn's second pass) or the mass of a whole layer on Hopper:
  // attn_sm90_kernel, blockmax / blockmass.
  if (p.impl != AttnImpl::portable) {
    const bool mass = p.reduce == BlockReduce::mean_sum;
    const char* why = p.block != 128             ? "hopper block_scores: block must be 128"
                      : p.row_block_begin != 0   ? "hopper block_scores: row_block_begin must be 0"
                      : a.key_splits != 1        ? "hopper block_scores: keys split over CTAs (query blocks are few)"
                      : mass && p.query_stride != 1 ? "hopper block_scores: the mass needs query_stride 1"
                      : mass && p.head_dim > 128 ? "hopper block_scores: the mass needs head_dim 64 or 128"
                                                 : nullptr;
    const detail::AttnArgs aa = detail::sm90_score_args(a, const_cast<float*>(p.lse));
    if (!why) why = detail::sm90_unsupported_reason(aa, p.head_dim, false, 0, /*d256=*/!mass);
    if (!why) {
      detail::Sm90Scores sco;
      sco.out = p.out;
      sco.query_stride = p.query_stride;
      return detail::launch_sm90(mass ? detail::Sm90Mode::blockmass : detail::Sm90Mode::blockmax, aa, p.in_type,
                                 p.head_dim, p.q_heads, p.kv_heads, sco, detail::stream_of(p.stream));
    }
    if (p.impl == AttnImpl::hopper) return fail(Status::unsupported, why);
  }
  return p.in_type == ElemType::bf16 ? dispatch_scores<__nv_bfloat16>(a, p) : dispatch_scores<__half>(a, p);
}

}  // namespace proxyattn::kernels
