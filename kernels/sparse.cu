// Block-sparse causal attention driven by the CSR BlockMask: one CTA per (query tile, head)
// walks the key blocks of its mask row (attn_kernel in attention_core.cuh, sparse mode), so the
// work is proportional to the selected blocks. Same numerics as the full kernel.
//
// Tiles: launch_csr (attention_launch.cuh); FA2's schedule (PIPE 0, no LAZY), as the full default.
#include "attention_launch.cuh"
#include "attention_sm90_launch.cuh"

namespace proxyattn::kernels {

using detail::AttnArgs;
using detail::AttnMode;
using detail::fail;

Status sparse_attention(const SparseAttentionParams& sp) noexcept {
  AttnArgs a{};
  Status s = detail::make_attn_args(sp.attn, true, &a);
  if (s != Status::ok) return s;
  if (sp.attn.window != 0) return fail(Status::unsupported, "sparse_attention: no sliding window (full_attention only)");
  if (sp.attn.row_begin != 0) return fail(Status::invalid_argument, "sparse_attention: row_begin must be 0");
  if (!sp.attn.o && !sp.attn.lse) return fail(Status::invalid_argument, "sparse_attention: neither o nor lse given");
  if (sp.block != 64 && sp.block != 128) return fail(Status::unsupported, "sparse_attention: block must be 64 or 128");
  if (!sp.indptr || !sp.indices) return fail(Status::invalid_argument, "sparse_attention: null indptr/indices");
  const int64_t nb = (sp.attn.seq_len + sp.block - 1) / sp.block;
  if (nb > 0x7fffffff) return fail(Status::invalid_argument, "sparse_attention: too many blocks");
  a.indptr = sp.indptr;
  a.indices = sp.indices;
  a.mask_block = sp.block;
  a.nb = int(nb);
  bool hopper = false;
  s = detail::pick_sm90(sp.attn.impl, a, sp.attn.head_dim, true, sp.block, &hopper);
  if (s != Status::ok) return s;
  if (hopper)
    return detail::launch_sm90(detail::Sm90Mode::sparse, a, sp.attn.in_type, sp.attn.head_dim, sp.attn.q_heads,
                               sp.attn.kv_heads, {}, detail::stream_of(sp.attn.stream));
  cudaStream_t st = detail::stream_of(sp.attn.stream);
  return sp.attn.in_type == ElemType::bf16
             ? detail::launch_csr<__nv_bfloat16, AttnMode::sparse>(a, sp.block, sp.attn.head_dim, sp.attn.q_heads, st)
             : detail::launch_csr<__half, AttnMode::sparse>(a, sp.block, sp.attn.head_dim, sp.attn.q_heads, st);
}

}  // namespace proxyattn::kernels
