// Stub of the kernels API for builds without CUDA: every call reports Status::no_cuda and
// device_count() is 0, so callers (lib/src/cuda_dispatch.cpp, tests) fail or skip cleanly.
// Keep in sync with include/proxyattn/kernels.h.
#include "proxyattn/kernels.h"

namespace proxyattn::kernels {

const char* status_string(Status s) noexcept {
  switch (s) {
    case Status::ok: return "ok";
    case Status::no_cuda: return "built without CUDA";
    case Status::no_device: return "no CUDA device";
    case Status::invalid_argument: return "invalid argument";
    case Status::unsupported: return "unsupported";
    case Status::out_of_memory: return "out of device memory";
    case Status::cuda_error: return "CUDA error";
  }
  return "unknown status";
}
const char* last_error_detail() noexcept { return "proxyattn was built without CUDA"; }
int device_count() noexcept { return 0; }
Status device_info(int, DeviceInfo*) noexcept { return Status::no_cuda; }
Status set_device(int) noexcept { return Status::no_cuda; }
Status init_context() noexcept { return Status::no_cuda; }
Status current_device(int*) noexcept { return Status::no_cuda; }
int elem_size(ElemType t) noexcept { return t == ElemType::f32 ? 4 : 2; }

Status device_alloc(void** ptr, size_t) noexcept {
  if (ptr) *ptr = nullptr;
  return Status::no_cuda;
}
Status device_free(void*) noexcept { return Status::no_cuda; }
Status copy_to_device(void*, const void*, size_t, Stream) noexcept { return Status::no_cuda; }
Status copy_to_host(void*, const void*, size_t, Stream) noexcept { return Status::no_cuda; }
Status copy_device(void*, const void*, size_t, Stream) noexcept { return Status::no_cuda; }
Status memset_device(void*, int, size_t, Stream) noexcept { return Status::no_cuda; }
Status synchronize(Stream) noexcept { return Status::no_cuda; }
Status convert(const void*, ElemType, void*, ElemType, int64_t, Stream) noexcept { return Status::no_cuda; }
Status fill(void*, ElemType, int64_t, float, Stream) noexcept { return Status::no_cuda; }
Status flush_l2(Stream) noexcept { return Status::no_cuda; }

EventTimer::~EventTimer() = default;
StagedUpload::~StagedUpload() = default;
Status StagedUpload::init(size_t) noexcept { return Status::no_cuda; }
Status StagedUpload::stage(void** b) noexcept {
  if (b) *b = nullptr;
  return Status::no_cuda;
}
Status StagedUpload::push(void*, size_t, Stream) noexcept { return Status::no_cuda; }
Status StagedUpload::finish() noexcept { return Status::no_cuda; }
Status EventTimer::start(Stream) noexcept { return Status::no_cuda; }
Status EventTimer::stop(Stream) noexcept { return Status::no_cuda; }
Status EventTimer::elapsed_ms(float*) noexcept { return Status::no_cuda; }

Status full_attention(const AttentionParams&) noexcept { return Status::no_cuda; }
Status row_lse(const AttentionParams&) noexcept { return Status::no_cuda; }
Status sparse_attention(const SparseAttentionParams&) noexcept { return Status::no_cuda; }
Status block_scores(const BlockScoreParams&) noexcept { return Status::no_cuda; }
Status fused_block_scores(const FusedScoreParams&) noexcept { return Status::no_cuda; }
size_t fused_block_scores_workspace(const FusedScoreParams&) noexcept { return 0; }
Status pool_heads(const PoolHeadsParams&) noexcept { return Status::no_cuda; }
Status dynamic_budget(const BudgetParams&) noexcept { return Status::no_cuda; }
Status output_error_sums(const OutputErrorParams&) noexcept { return Status::no_cuda; }
Status prefix_output_errors(const PrefixErrorParams&) noexcept { return Status::no_cuda; }
Status select_counts(const SelectParams&) noexcept { return Status::no_cuda; }
Status select_fill(const SelectParams&) noexcept { return Status::no_cuda; }

// Peers' estimators and the exact proxy path (peer_*.cu, proxy_score.cu).
Status pooled_scores(const PooledScoreParams&) noexcept { return Status::no_cuda; }
Status xattn_scores(const XAttnScoreParams&) noexcept { return Status::no_cuda; }
Status vslash_scores(const VSlashParams&) noexcept { return Status::no_cuda; }
Status native_select(const NativeSelectParams&) noexcept { return Status::no_cuda; }
Status csr_indptr(const CsrParams&) noexcept { return Status::no_cuda; }
Status csr_fill(const CsrParams&) noexcept { return Status::no_cuda; }
Status proxy_scores_exact(const ProxyExactParams&) noexcept { return Status::no_cuda; }

// Model runtime (model_ops.cu, gemm.cu).
Status gemm(const GemmParams&) noexcept { return Status::no_cuda; }
Status fill_normal(void*, ElemType, int64_t, uint64_t, float, Stream) noexcept { return Status::no_cuda; }
Status embed_rows(const void*, const int32_t*, float*, int64_t, int64_t, Stream) noexcept { return Status::no_cuda; }
Status rms_norm_rows(const float*, const float*, void*, int64_t, int64_t, float, int64_t, Stream) noexcept {
  return Status::no_cuda;
}
Status rope_table(const float*, int, int64_t, int64_t, float*, float*, Stream) noexcept { return Status::no_cuda; }
Status rope_split(const RopeSplitParams&) noexcept { return Status::no_cuda; }
Status silu_mul(const void*, void*, int64_t, int64_t, Stream) noexcept { return Status::no_cuda; }
Status gelu_mul(const void*, void*, int64_t, int64_t, Stream) noexcept { return Status::no_cuda; }
Status scale_f32(float*, int64_t, float, Stream) noexcept { return Status::no_cuda; }
Status head_rms_norm(const HeadNormParams&) noexcept { return Status::no_cuda; }
Status rms_norm_add_rows(const float*, const float*, float*, int64_t, int64_t, float, Stream) noexcept {
  return Status::no_cuda;
}
Status softcap(float*, int64_t, float, Stream) noexcept { return Status::no_cuda; }
Status heads_to_rows(const void*, void*, int, int64_t, int, int64_t, int64_t, Stream) noexcept { return Status::no_cuda; }
Status logits_rows(const float*, int64_t, int64_t, const int32_t*, double*, int32_t*, Stream) noexcept {
  return Status::no_cuda;
}
EventLog::~EventLog() = default;
Status EventLog::record(size_t, Stream) noexcept { return Status::no_cuda; }
Status EventLog::elapsed_ms(size_t, size_t, float*) noexcept { return Status::no_cuda; }
Status device_memory_used(size_t* used) noexcept {
  if (used) *used = 0;
  return Status::no_cuda;
}

}  // namespace proxyattn::kernels
