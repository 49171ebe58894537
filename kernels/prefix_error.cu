// Output errors of masks that are prefixes of one ranking, one block-sparse pass for all of them
// (attn_kernel in attention_core.cuh, prefix mode): the analysis' budget-driven and fixed-density
// masks of one score set are all prefixes of its selection order, so their errors cost one
// sparse attention at the densest of them. Same tiles and numerics as sparse.cu: the Hopper
// kernel (attention_sm90.cuh, prefix mode) where it applies (mask block 128, d 64/128), else
// attn_kernel.
#include "attention_launch.cuh"
#include "attention_sm90_launch.cuh"

namespace proxyattn::kernels {

using detail::AttnArgs;
using detail::AttnMode;
using detail::fail;

Status prefix_output_errors(const PrefixErrorParams& p) noexcept {
  AttnArgs a{};
  AttentionParams ap = p.attn;
  ap.o = nullptr;
  ap.lse = nullptr;
  Status s = detail::make_attn_args(ap, true, &a);
  if (s != Status::ok) return s;
  if (ap.window != 0) return fail(Status::unsupported, "prefix_output_errors: no sliding window");
  if (ap.row_begin != 0) return fail(Status::invalid_argument, "prefix_output_errors: row_begin must be 0");
  if (p.block != 64 && p.block != 128) return fail(Status::unsupported, "prefix_output_errors: block must be 64 or 128");
  if (!p.o_ref || !p.order || !p.counts || !p.sq_diff)
    return fail(Status::invalid_argument, "prefix_output_errors: null o_ref/order/counts/sq_diff");
  if (p.masks < 1) return fail(Status::invalid_argument, "prefix_output_errors: masks must be >= 1");
  if (!detail::aligned16(p.o_ref) || (a.ost | a.osh) % 8 != 0)
    return fail(Status::invalid_argument, "prefix_output_errors: o_ref must be 16-byte aligned, strides multiples of 8");
  const int64_t nb = (ap.seq_len + p.block - 1) / p.block;
  if (nb > 65535) return fail(Status::invalid_argument, "prefix_output_errors: too many blocks");
  a.indices = p.order;
  a.mask_block = p.block;
  a.nb = int(nb);
  a.o_ref = p.o_ref;
  a.counts = p.counts;
  a.masks = p.masks;
  a.err = p.sq_diff;
  cudaStream_t st = detail::stream_of(ap.stream);
  bool hopper = false;
  s = detail::pick_sm90(ap.impl, a, ap.head_dim, true, p.block, &hopper);
  if (s != Status::ok) return s;
  if (hopper)
    return detail::launch_sm90(detail::Sm90Mode::prefix, a, ap.in_type, ap.head_dim, ap.q_heads, ap.kv_heads, {}, st);
  return ap.in_type == ElemType::bf16
             ? detail::launch_csr<__nv_bfloat16, AttnMode::prefix>(a, p.block, ap.head_dim, ap.q_heads, st)
             : detail::launch_csr<__half, AttnMode::prefix>(a, p.block, ap.head_dim, ap.q_heads, st);
}

}  // namespace proxyattn::kernels
