#pragma once
// Launch interface of the Hopper attention kernels (attention_sm90.cu), for full.cu and
// sparse.cu: which requests they can take, and the launch.
#include "attention_core.cuh"
#include "attention_sm90.cuh"

namespace proxyattn::kernels::detail {

// Why the Hopper kernels cannot run this request on the current device (null when they can).
// d256: the request is a score pass (row lse, block max) that also takes head_dim 256.
const char* sm90_unsupported_reason(const AttnArgs& a, int head_dim, bool sparse, int mask_block, bool d256 = false);

// One launch of attn_sm90_kernel: full or CSR block-sparse attention (a.indptr/indices, mask
// block 128), the prefix errors (prefix_error.cu), row lse only (a.o ignored), or the block
// max-pool / mass of P (a.lse read, sco.out).
Status launch_sm90(Sm90Mode mode, const AttnArgs& a, ElemType t, int head_dim, int q_heads, int kv_heads,
                   const Sm90Scores& sco, cudaStream_t st);

// Resolves AttnImpl::automatic: true -> Hopper kernels; false -> portable. An explicit
// `hopper` the request cannot take fails with the reason (never a silent fallback).
inline Status pick_sm90(AttnImpl impl, const AttnArgs& a, int head_dim, bool sparse, int mask_block, bool* use,
                        bool d256 = false) {
  *use = false;
  if (impl == AttnImpl::portable) return Status::ok;
  if (impl != AttnImpl::automatic && impl != AttnImpl::hopper)
    return fail(Status::invalid_argument, "attention: unknown impl");
  const char* why = sm90_unsupported_reason(a, head_dim, sparse, mask_block, d256);
  if (!why) {
    *use = true;
    return Status::ok;
  }
  return impl == AttnImpl::hopper ? fail(Status::unsupported, why) : Status::ok;
}

}  // namespace proxyattn::kernels::detail
