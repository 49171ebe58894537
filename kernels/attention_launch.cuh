#pragma once
// Host-side glue shared by the attention-shaped launchers: argument checks (one message per
// failure, kept in last_error_detail) and the launch of one attn_kernel instantiation.
#include <cmath>
#include <cstdio>

#include "attention_core.cuh"

namespace proxyattn::kernels::detail {

// Fills the kernel arguments from the public params; checks what every attention kernel needs.
inline Status make_attn_args(const AttentionParams& p, bool need_v, AttnArgs* a) {
  if (p.in_type != ElemType::bf16 && p.in_type != ElemType::f16)
    return fail(Status::unsupported, "attention: in_type must be bf16 or f16");
  // 384 (row_lse of fp16 operands only): the exact proxy's three-piece heads (proxy_score.cu).
  const bool wide = p.head_dim == 384 && !need_v && p.in_type == ElemType::f16;
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256 && !wide)
    return fail(Status::unsupported, "attention: head_dim must be 64, 128 or 256 (384: f16 row_lse only)");
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
  a->o_ref = nullptr;
  a->counts = nullptr;
  a->masks = 0;
  a->err = nullptr;
  if (p.window < 0) return fail(Status::invalid_argument, "attention: window must be >= 0");
  a->window = p.window >= n ? 0 : int(p.window);  // a window holding every key is plain causal
  return Status::ok;
}

// Multiprocessors of the current device (132 when it cannot be asked): sizes key splits.
inline int sm_count() {
  int sms = 132, dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

// Fills the block-score kernel arguments (key_splits left at 1); `who` names the caller in the
// messages; the row lse is an input only when need_lse.
inline Status make_block_score_args(const BlockScoreParams& p, const char* who, bool need_lse, BlockScoreArgs* a) {
  auto bad = [&](Status s, const char* what) {  // fail() copies the text
    char msg[160];
    std::snprintf(msg, sizeof msg, "%s: %s", who, what);
    return fail(s, msg);
  };
  if (p.in_type != ElemType::bf16 && p.in_type != ElemType::f16) return bad(Status::unsupported, "in_type must be bf16 or f16");
  const bool wide = p.head_dim == 384 && p.in_type == ElemType::f16;  // as make_attn_args
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256 && !wide)
    return bad(Status::unsupported, "head_dim must be 64, 128 or 256 (384: f16 only)");
  if (p.block != 64 && p.block != 128) return bad(Status::unsupported, "block must be 64 or 128");
  if (p.q_heads <= 0 || p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 || p.q_heads > 65535)
    return bad(Status::invalid_argument, "q_heads must be a positive multiple of kv_heads");
  if (p.seq_len <= 0 || p.seq_len > 0x7fffffffLL) return bad(Status::invalid_argument, "seq_len must be in [1, 2^31)");
  if (!p.q || !p.k || (need_lse && !p.lse) || !p.out) return bad(Status::invalid_argument, "null pointer");
  if (!aligned16(p.q) || !aligned16(p.k)) return bad(Status::invalid_argument, "q/k must be 16-byte aligned");
  if (p.query_stride < 1) return bad(Status::invalid_argument, "query_stride must be >= 1");
  const int64_t nb = (p.seq_len + p.block - 1) / p.block;
  if (nb > 65535) return bad(Status::invalid_argument, "too many blocks");
  if (p.row_block_begin < 0 || p.row_block_begin >= nb) return bad(Status::invalid_argument, "row_block_begin outside [0, Nb)");
  const int64_t d = p.head_dim, n = p.seq_len;
  a->q = p.q;
  a->k = p.k;
  a->lse = p.lse;
  a->out = p.out;
  a->qst = p.q_stride_token ? p.q_stride_token : d;
  a->qsh = p.q_stride_head ? p.q_stride_head : n * a->qst;
  a->kst = p.k_stride_token ? p.k_stride_token : d;
  a->ksh = p.k_stride_head ? p.k_stride_head : n * a->kst;
  if ((a->qst | a->qsh | a->kst | a->ksh) % 8 != 0) return bad(Status::invalid_argument, "strides must be multiples of 8 elements");
  a->n = n;
  a->group = p.q_heads / p.kv_heads;
  a->nb = int(nb);
  a->row_block_begin = p.row_block_begin;
  a->out_rows = int(nb) - p.row_block_begin;
  a->query_stride = p.query_stride;
  a->reduce_max = p.reduce == BlockReduce::max ? 1 : 0;
  const float scale = p.scale > 0.f ? p.scale : 1.0f / std::sqrt(float(p.head_dim));
  a->scale_log2 = scale * kLog2e;
  a->key_splits = 1;
  return Status::ok;
}

// The Hopper kernel's arguments for a score pass over the operands of `b` (no V, no O).
inline AttnArgs sm90_score_args(const BlockScoreArgs& b, float* lse) {
  AttnArgs a{};
  a.q = b.q;
  a.k = b.k;
  a.lse = lse;
  a.qst = b.qst;
  a.qsh = b.qsh;
  a.kst = b.kst;
  a.ksh = b.ksh;
  a.n = b.n;
  a.group = b.group;
  a.scale_log2 = b.scale_log2;
  a.kv_splits = 1;
  return a;
}

template <int D, int MT, int NW, int BKV, class T, AttnMode MODE, int PIPE = 0, bool LAZY = false, int SUBT = 1,
          bool WIN = false>
Status launch_attn(AttnArgs a, int q_heads, cudaStream_t st) {
  using Cfg = AttnConfig<D, MT, NW, BKV>;
  const size_t smem = Cfg::template smem_bytes<T>(MODE == AttnMode::lse ? 0 : PIPE);
  auto kern = attn_kernel<D, MT, NW, BKV, T, MODE, PIPE, LAZY, SUBT, WIN>;
  {
    Status s = from_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                         "attention: cudaFuncSetAttribute");
    if (s != Status::ok) return s;
  }
  const int64_t rows = (MODE == AttnMode::sparse || MODE == AttnMode::prefix) ? a.n : a.n - a.row_begin;
  const int64_t tiles = (rows + Cfg::BR - 1) / Cfg::BR;
  if (tiles > 0x7fffffff) return fail(Status::invalid_argument, "attention: sequence too long");
  a.num_q_tiles = int(tiles);
  const dim3 grid{unsigned(tiles), unsigned(q_heads), unsigned(a.kv_splits > 1 ? a.kv_splits : 1)};
  kern<<<grid, Cfg::NT, smem, st>>>(a);
  return check_launch("attention kernel launch");
}

// The CSR-driven modes (sparse, prefix): query tile BR divides the mask block B (B 128 -> 128
// rows for d 64/128, 64 rows for d 256; B 64 -> 64 rows), key tiles of 64, FA2's schedule.
template <class T, AttnMode MODE>
Status launch_csr(const AttnArgs& a, int block, int head_dim, int q_heads, cudaStream_t st) {
  if (block == 128) {
    switch (head_dim) {
      case 64: return launch_attn<64, 2, 4, 64, T, MODE, 0, false, 2>(a, q_heads, st);
      case 128: return launch_attn<128, 2, 4, 64, T, MODE, 0, false, 2>(a, q_heads, st);
      case 256: return launch_attn<256, 1, 4, 64, T, MODE, 0, false, 2>(a, q_heads, st);
    }
  } else {
    switch (head_dim) {
      case 64: return launch_attn<64, 1, 4, 64, T, MODE, 0, false>(a, q_heads, st);
      case 128: return launch_attn<128, 1, 4, 64, T, MODE, 0, false>(a, q_heads, st);
      case 256: return launch_attn<256, 1, 4, 64, T, MODE, 0, false>(a, q_heads, st);
    }
  }
  return fail(Status::unsupported, "attention: head_dim must be 64, 128 or 256");
}

}  // namespace proxyattn::kernels::detail
