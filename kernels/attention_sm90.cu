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

template <int D, class T, bool SPARSE>
Status launch(const AttnArgs& a0, ElemType t, int q_heads, int kv_heads, cudaStream_t st) {
  using C = Sm90Config<D>;
  AttnArgs a = a0;
  CUtensorMap mq, mk, mv;
  Status s = make_map(&mq, a.q, t, q_heads, a.n, D, a.qst, a.qsh, "hopper attention: TMA map of q rejected");
  if (s == Status::ok) s = make_map(&mk, a.k, t, kv_heads, a.n, D, a.kst, a.ksh, "hopper attention: TMA map of k rejected");
  if (s == Status::ok) s = make_map(&mv, a.v, t, kv_heads, a.n, D, a.vst, a.vsh, "hopper attention: TMA map of v rejected");
  if (s != Status::ok) return s;
  auto kern = attn_sm90_kernel<D, T, SPARSE>;
  s = from_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM),
                "hopper attention: cudaFuncSetAttribute");
  if (s != Status::ok) return s;
  const int64_t tiles = (a.n + C::BM - 1) / C::BM;
  a.num_q_tiles = int(tiles);
  // V (MN-major): 64-column chunks are BN rows x 128 B apart; 8-row groups 1024 B apart.
  const Sm90VDesc vd{uint32_t(C::BN * 128), 1024u};
  kern<<<dim3(unsigned(tiles), unsigned(q_heads)), C::THREADS, C::SMEM, st>>>(mq, mk, mv, a, vd);
  return check_launch("hopper attention kernel launch");
}

bool device_is_hopper() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major == 9;
}

}  // namespace

const char* sm90_unsupported_reason(const AttnArgs& a, int head_dim, bool sparse, int mask_block) {
  if (!device_is_hopper()) return "hopper attention: the device is not compute capability 9.x";
  if (head_dim != 64 && head_dim != 128) return "hopper attention: head_dim must be 64 or 128";
  if (sparse && mask_block != 128) return "hopper attention: sparse mask block must be 128";
  if (a.row_begin != 0) return "hopper attention: row_begin must be 0";
  if (a.n > 0x7fffffffLL - 256) return "hopper attention: sequence too long for TMA coordinates";
  return nullptr;
}

Status launch_attn_sm90(const AttnArgs& a, ElemType t, int head_dim, int q_heads, int kv_heads, bool sparse,
                        cudaStream_t st) {
  const bool bf = t == ElemType::bf16;
  if (head_dim == 128) {
    if (sparse) return bf ? launch<128, __nv_bfloat16, true>(a, t, q_heads, kv_heads, st)
                          : launch<128, __half, true>(a, t, q_heads, kv_heads, st);
    return bf ? launch<128, __nv_bfloat16, false>(a, t, q_heads, kv_heads, st)
              : launch<128, __half, false>(a, t, q_heads, kv_heads, st);
  }
  if (head_dim == 64) {
    if (sparse) return bf ? launch<64, __nv_bfloat16, true>(a, t, q_heads, kv_heads, st)
                          : launch<64, __half, true>(a, t, q_heads, kv_heads, st);
    return bf ? launch<64, __nv_bfloat16, false>(a, t, q_heads, kv_heads, st)
              : launch<64, __half, false>(a, t, q_heads, kv_heads, st);
  }
  return fail(Status::unsupported, "hopper attention: head_dim must be 64 or 128");
}

}  // namespace proxyattn::kernels::detail
