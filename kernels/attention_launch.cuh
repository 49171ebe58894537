#pragma once
// Host-side glue shared by the attention-shaped launchers: argument checks (one message per
// failure, kept in last_error_detail) and the launch of one attn_kernel instantiation.
#include <cmath>

#include "attention_core.cuh"

namespace proxyattn::kernels::detail {

// Fills the kernel arguments from the public params; checks what every attention kernel needs.
inline Status make_attn_args(const AttentionParams& p, bool need_v, AttnArgs* a) {
  if (p.in_type != ElemType::bf16 && p.in_type != ElemType::f16)
    return fail(Status::unsupported, "attention: in_type must be bf16 or f16");
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256)
    return fail(Status::unsupported, "attention: head_dim must be 64, 128 or 256");
  if (p.q_heads <= 0 || p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0)
    return fail(Status::invalid_argument, "attention: q_heads must be a positive multiple of kv_heads");
  if (p.q_heads > 65535) return fail(Status::invalid_argument, "attention: more than 65535 query heads");
  if (p.seq_len <= 0 || p.seq_len > 0x7fffffffLL)
    return fail(Status::invalid_argument, "attention: seq_len must be in [1, 2^31)");
  if (p.row_begin < 0 || p.row_begin >= p.seq_len)
    return fail(Status::invalid_argument, "attention: row_begin outside [0, seq_len)");
  if (!p.q || !p.k || (need_v && !p.v)) return fail(Status::invalid_argument, "attention: null q/k/v pointer");
  if (!aligned16(p.q) || !aligned16(p.k) || (need_v && !aligned16(p.v)) || (p.o && !aligned16(p.o)))
    return fail(Status::invalid_argument, "attention: q/k/v/o must be 16-byte aligned");
  if (p.o && p.out_type != ElemType::f32 && p.out_type != p.in_type)
    return fail(Status::invalid_argument, "attention: out_type must be f32 or in_type");
  const int64_t d = p.head_dim, n = p.seq_len;
  a->q = p.q;
  a->k = p.k;
  a->v = p.v;
  a->o = p.o;
  a->lse = p.lse;
  a->qst = p.q_stride_token ? p.q_stride_token : d;
  a->qsh = p.q_stride_head ? p.q_stride_head : n * a->qst;
  a->kst = p.k_stride_token ? p.k_stride_token : d;
  a->ksh = p.k_stride_head ? p.k_stride_head : n * a->kst;
  a->vst = p.v_stride_token ? p.v_stride_token : d;
  a->vsh = p.v_stride_head ? p.v_stride_head : n * a->vst;
  a->ost = p.o_stride_token ? p.o_stride_token : d;
  a->osh = p.o_stride_head ? p.o_stride_head : n * a->ost;
  if ((a->qst | a->qsh | a->kst | a->ksh | a->vst | a->vsh) % 8 != 0 || (p.o && (a->ost | a->osh) % 8 != 0))
    return fail(Status::invalid_argument, "attention: strides must be multiples of 8 elements");
  a->n = n;
  a->row_begin = p.row_begin;
  a->group = p.q_heads / p.kv_heads;
  a->num_q_tiles = 0;
  const float scale = p.scale > 0.f ? p.scale : 1.0f / std::sqrt(float(p.head_dim));
  a->scale_log2 = scale * kLog2e;
  a->out_f32 = p.out_type == ElemType::f32 ? 1 : 0;
  a->indptr = nullptr;
  a->indices = nullptr;
  a->mask_block = 0;
  a->nb = 0;
  a->kv_splits = 1;
  a->part = nullptr;
  return Status::ok;
}

template <int D, int MT, int NW, int BKV, class T, AttnMode MODE, int PIPE = 0, bool LAZY = false, int SUBT = 1>
Status launch_attn(AttnArgs a, int q_heads, cudaStream_t st) {
  using Cfg = AttnConfig<D, MT, NW, BKV>;
  const size_t smem = Cfg::template smem_bytes<T>(MODE == AttnMode::lse ? 0 : PIPE);
  auto kern = attn_kernel<D, MT, NW, BKV, T, MODE, PIPE, LAZY, SUBT>;
  {
    Status s = from_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                         "attention: cudaFuncSetAttribute");
    if (s != Status::ok) return s;
  }
  const int64_t rows = MODE == AttnMode::sparse ? a.n : a.n - a.row_begin;
  const int64_t tiles = (rows + Cfg::BR - 1) / Cfg::BR;
  if (tiles > 0x7fffffff) return fail(Status::invalid_argument, "attention: sequence too long");
  a.num_q_tiles = int(tiles);
  const dim3 grid{unsigned(tiles), unsigned(q_heads), unsigned(a.kv_splits > 1 ? a.kv_splits : 1)};
  kern<<<grid, Cfg::NT, smem, st>>>(a);
  return check_launch("attention kernel launch");
}

}  // namespace proxyattn::kernels::detail
