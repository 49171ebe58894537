// Host side of the Hopper attention kernels (attention_sm90.cuh): when they apply, the TMA
// tensor maps (3-D views [heads, tokens, head_dim] of Q, K, V with 128-byte swizzled 64 x 64
// boxes) and the launch. full.cu / sparse.cu call launch_attn_sm90 when AttnImpl selects it.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <mutex>

#include "attention_sm90.cuh"
#include "attention_sm90_launch.cuh"

namespace proxyattn::kernels::detail {
namespace {

// The driver's tensor-map encoder, fetched once through the runtime (no link to libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  });
  return fn;
}

// [heads, n, d] with element strides (token, head) -> tensor map with 64 x 64 boxes.
Status make_map(CUtensorMap* map, const void* ptr, ElemType t, int heads, int64_t n, int d, int64_t st_token,
                int64_t st_head, const char* what) {
  auto enc = encoder();
  if (!enc) return fail(Status::unsupported, "hopper attention: the driver has no cuTensorMapEncodeTiled");
  const cuuint64_t dims[3] = {cuuint64_t(d), cuuint64_t(n), cuuint64_t(heads)};
  const cuuint64_t strides[2] = {cuuint64_t(st_token) * 2, cuuint64_t(st_head) * 2};
  const cuuint32_t box[3] = {64, 64, 1};
  const cuuint32_t estr[3] = {1, 1, 1};
  const CUresult r = enc(map, t == ElemType::bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                         3, const_cast<void*>(ptr), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                         CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return fail(Status::invalid_argument, what);
  return Status::ok;
}

template <int D, class T, Sm90Mode MODE>
Status launch(const AttnArgs& a0, ElemType t, int q_heads, int kv_heads, const Sm90Scores& sco, cudaStream_t st) {
  constexpr bool with_v = sm90_with_v(MODE);
  using C = Sm90Config<D, with_v>;
  AttnArgs a = a0;
  CUtensorMap mq, mk, mv;
  Status s = make_map(&mq, a.q, t, q_heads, a.n, D, a.qst, a.qsh, "hopper attention: TMA map of q rejected");
  if (s == Status::ok) s = make_map(&mk, a.k, t, kv_heads, a.n, D, a.kst, a.ksh, "hopper attention: TMA map of k rejected");
  if (s == Status::ok && with_v)
    s = make_map(&mv, a.v, t, kv_heads, a.n, D, a.vst, a.vsh, "hopper attention: TMA map of v rejected");
  if (s != Status::ok) return s;
  if (!with_v) mv = mk;  // not read
  auto kern = attn_sm90_kernel<D, T, MODE>;
  const int smem = C::smem_bytes(MODE);
  s = from_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
                "hopper attention: cudaFuncSetAttribute");
  if (s != Status::ok) return s;
  const int64_t tiles = (a.n + C::BM - 1) / C::BM;
  a.num_q_tiles = int(tiles);
  if (MODE == Sm90Mode::blockmax || MODE == Sm90Mode::blockmass) a.nb = int(tiles);
  // V (MN-major): 64-column chunks are BN rows x 128 B apart; 8-row groups 1024 B apart.
  const Sm90VDesc vd{uint32_t(C::BN * 128), 1024u};
  // tilestats: only the query tiles [first_tile, tiles) (the kernel counts them from the last),
  // each with its keys split over key_splits CTAs.
  const bool stats = MODE == Sm90Mode::tilestats;
  const dim3 grid(unsigned(stats ? tiles - sco.first_tile : tiles), unsigned(q_heads), unsigned(stats ? sco.key_splits : 1));
  kern<<<grid, C::THREADS, smem, st>>>(mq, mk, mv, a, vd, sco);
  return check_launch("hopper attention kernel launch");
}

template <int D, class T>
Status launch_mode(Sm90Mode mode, const AttnArgs& a, ElemType t, int q_heads, int kv_heads, const Sm90Scores& sco,
                   cudaStream_t st) {
  switch (mode) {
    case Sm90Mode::full: return launch<D, T, Sm90Mode::full>(a, t, q_heads, kv_heads, sco, st);
    case Sm90Mode::sparse: return launch<D, T, Sm90Mode::sparse>(a, t, q_heads, kv_heads, sco, st);
    case Sm90Mode::lse: return launch<D, T, Sm90Mode::lse>(a, t, q_heads, kv_heads, sco, st);
    case Sm90Mode::blockmax: return launch<D, T, Sm90Mode::blockmax>(a, t, q_heads, kv_heads, sco, st);
    case Sm90Mode::tilestats: return launch<D, T, Sm90Mode::tilestats>(a, t, q_heads, kv_heads, sco, st);
    case Sm90Mode::prefix: return launch<D, T, Sm90Mode::prefix>(a, t, q_heads, kv_heads, sco, st);
    case Sm90Mode::blockmass: return launch<D, T, Sm90Mode::blockmass>(a, t, q_heads, kv_heads, sco, st);
  }
  return fail(Status::invalid_argument, "hopper attention: unknown mode");
}

// head_dim 256: the score passes of the exact proxy's fp16 pieces only (no V; the block mass's
// per-warp sums do not fit beside a 256-wide K ring).
template <class T>
Status launch_mode_256(Sm90Mode mode, const AttnArgs& a, ElemType t, int q_heads, int kv_heads, const Sm90Scores& sco,
                       cudaStream_t st) {
  switch (mode) {
    case Sm90Mode::lse: return launch<256, T, Sm90Mode::lse>(a, t, q_heads, kv_heads, sco, st);
    case Sm90Mode::blockmax: return launch<256, T, Sm90Mode::blockmax>(a, t, q_heads, kv_heads, sco, st);
    default: return fail(Status::unsupported, "hopper attention: head_dim 256 only for row lse and the block max");
  }
}

bool device_is_hopper() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major == 9;
}

}  // namespace

const char* sm90_unsupported_reason(const AttnArgs& a, int head_dim, bool sparse, int mask_block, bool d256) {
  if (!device_is_hopper()) return "hopper attention: the device is not compute capability 9.x";
  if (head_dim != 64 && head_dim != 128 && !(d256 && head_dim == 256))
    return d256 ? "hopper attention: head_dim must be 64, 128 or 256" : "hopper attention: head_dim must be 64 or 128";
  if (sparse && mask_block != 128) return "hopper attention: sparse mask block must be 128";
  if (a.row_begin != 0) return "hopper attention: row_begin must be 0";
  if (a.window != 0) return "hopper attention: no sliding window (the portable kernel has it)";
  if (a.n > 0x7fffffffLL - 256) return "hopper attention: sequence too long for TMA coordinates";
  return nullptr;
}

Status launch_sm90(Sm90Mode mode, const AttnArgs& a, ElemType t, int head_dim, int q_heads, int kv_heads,
                   const Sm90Scores& sco, cudaStream_t st) {
  if ((mode == Sm90Mode::blockmax || mode == Sm90Mode::blockmass) && (a.n + 127) / 128 > Sm90Config<128>::MAX_KEY_TILES)
    return fail(Status::unsupported, "hopper block scores: more than 2048 key blocks");
  const bool bf = t == ElemType::bf16;
  if (head_dim == 256)
    return bf ? launch_mode_256<__nv_bfloat16>(mode, a, t, q_heads, kv_heads, sco, st)
              : launch_mode_256<__half>(mode, a, t, q_heads, kv_heads, sco, st);
  if (head_dim == 128)
    return bf ? launch_mode<128, __nv_bfloat16>(mode, a, t, q_heads, kv_heads, sco, st)
              : launch_mode<128, __half>(mode, a, t, q_heads, kv_heads, sco, st);
  if (head_dim == 64)
    return bf ? launch_mode<64, __nv_bfloat16>(mode, a, t, q_heads, kv_heads, sco, st)
              : launch_mode<64, __half>(mode, a, t, q_heads, kv_heads, sco, st);
  return fail(Status::unsupported, "hopper attention: head_dim must be 64, 128 or 256");
}

}  // namespace proxyattn::kernels::detail
