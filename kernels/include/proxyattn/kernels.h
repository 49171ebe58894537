#pragma once
// CUDA-free public API of the kernels (kernels/*.cu). Plain parameter structs holding raw device
// pointers; every launcher returns a Status instead of throwing or exiting, so lib/ and apps/
// compile with the host compiler alone and a build without CUDA links the stub (no_cuda.cpp),
// where every call returns Status::no_cuda and device_count() returns 0.
//
// Layouts (all row-major, innermost dim contiguous, element strides given per tensor; a stride
// of 0 means "contiguous"):
//   q [Hq, N, d], k/v [Hkv, N, d], o [Hq, N, d]; lse [Hq, N] float32, natural log of the row's
//   sum of exp(scale * q.k) over the keys it attends (causal). Query head h reads KV head
//   h / (Hq / Hkv) (GQA by index, never a copy).
//   BlockMask CSR: indptr [H * Nb + 1], indices int32, row r = h * Nb + i (query block i of
//   head h), sorted key-block ids j <= i.
// Numerics: bf16 or fp16 operands, fp32 accumulation and softmax statistics; the probabilities
// are rounded to the operand type before the P.V product (as FlashAttention does).
#include <cstddef>
#include <cstdint>

namespace proxyattn::kernels {

enum class Status : int {
  ok = 0,
  no_cuda,           // library built without CUDA
  no_device,         // no driver or no GPU
  invalid_argument,  // a pointer, shape or option the kernels cannot take
  unsupported,       // valid request this build has no kernel for (e.g. head_dim 96)
  out_of_memory,
  cuda_error,        // any other CUDA failure; last_error_detail() has the text
};

const char* status_string(Status s) noexcept;
// Text of the last failure seen by this thread ("cudaErrorIllegalAddress: ..." or the argument
// check that failed); empty when none.
const char* last_error_detail() noexcept;

// Number of CUDA devices; 0 when built without CUDA, without a driver or without a GPU. Never
// throws, never aborts.
int device_count() noexcept;

struct DeviceInfo {
  char name[256] = {0};
  int sm_count = 0;
  int cc_major = 0, cc_minor = 0;
  size_t global_mem = 0;
  size_t l2_bytes = 0;
};
Status device_info(int device, DeviceInfo* out) noexcept;
// Makes `device` the current one of the calling host thread (MPI ranks: local rank % count);
// `current` receives the current device.
Status set_device(int device) noexcept;
Status current_device(int* current) noexcept;
// Creates the current device's context now (the first allocation would otherwise: a tool can
// overlap that with its reads).
Status init_context() noexcept;

enum class ElemType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Which attention implementation runs (full and sparse): `automatic` picks the Hopper kernels
// (wgmma + TMA, warp-specialised; attention_sm90.cuh) on compute capability 9.x when the shape
// and strides allow them, the portable mma.sync kernels (attention_core.cuh) otherwise.
enum class AttnImpl : int { automatic = 0, portable = 1, hopper = 2 };
inline const char* attn_impl_name(AttnImpl i) noexcept {
  return i == AttnImpl::portable ? "portable" : i == AttnImpl::hopper ? "hopper" : "automatic";
}
int elem_size(ElemType t) noexcept;

// Opaque cudaStream_t; nullptr is the calling host thread's own default stream
// (cudaStreamPerThread), so two host threads' work (the analysis's error worker and its main
// thread) runs concurrently instead of queueing on the one legacy stream.
using Stream = void*;

// ---- memory ----------------------------------------------------------------------------------
// Stream-ordered on the calling thread's default stream (no device-wide synchronization on
// free). A buffer used by another thread must be complete first (a synchronizing download or
// synchronize() on the thread that wrote it), as everywhere in lib/.
Status device_alloc(void** ptr, size_t bytes) noexcept;
Status device_free(void* ptr) noexcept;
Status copy_to_device(void* dst, const void* src, size_t bytes, Stream s = nullptr) noexcept;
Status copy_to_host(void* dst, const void* src, size_t bytes, Stream s = nullptr) noexcept;
Status copy_device(void* dst, const void* src, size_t bytes, Stream s = nullptr) noexcept;
Status memset_device(void* dst, int byte, size_t bytes, Stream s = nullptr) noexcept;
Status synchronize(Stream s = nullptr) noexcept;
// Element-wise dtype conversion on the device (round to nearest even), n elements.
Status convert(const void* src, ElemType src_type, void* dst, ElemType dst_type, int64_t n,
               Stream s = nullptr) noexcept;
// Fill n elements with one value (tests poison outputs with NaN).
Status fill(void* dst, ElemType type, int64_t n, float value, Stream s = nullptr) noexcept;
// Evict the L2 cache (writes a buffer larger than L2) before a cold timing.
Status flush_l2(Stream s = nullptr) noexcept;

// Move-only owning device buffer. allocate() reports failure as a Status; the destructor frees.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      ptr_ = o.ptr_;
      bytes_ = o.bytes_;
      o.ptr_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }
  Status allocate(size_t bytes) noexcept {
    reset();
    if (bytes == 0) return Status::ok;
    Status st = device_alloc(&ptr_, bytes);
    if (st == Status::ok) bytes_ = bytes;
    else ptr_ = nullptr;
    return st;
  }
  void reset() noexcept {
    if (ptr_) device_free(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* data() const noexcept { return ptr_; }
  template <class T>
  T* as() const noexcept { return static_cast<T*>(ptr_); }
  size_t bytes() const noexcept { return bytes_; }
  Status upload(const void* src, size_t bytes, Stream s = nullptr) const noexcept {
    return bytes > bytes_ ? Status::invalid_argument : copy_to_device(ptr_, src, bytes, s);
  }
  Status download(void* dst, size_t bytes, Stream s = nullptr) const noexcept {
    return bytes > bytes_ ? Status::invalid_argument : copy_to_host(dst, ptr_, bytes, s);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// CUDA-event timer for benchmarks: start/stop on a stream, elapsed_ms synchronizes on stop.
class EventTimer {
 public:
  EventTimer() = default;
  ~EventTimer();
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  Status start(Stream s = nullptr) noexcept;
  Status stop(Stream s = nullptr) noexcept;
  Status elapsed_ms(float* ms) noexcept;

 private:
  void* start_ = nullptr;
  void* stop_ = nullptr;
};

// Host -> device copies through two page-locked staging buffers: the caller fills stage() (host
// work, e.g. rounding to 16 bits) while the other buffer's copy runs, at the bus's speed and
// without a pageable copy's extra staging. stage() waits until the buffer it returns is free.
class StagedUpload {
 public:
  StagedUpload() = default;
  ~StagedUpload();
  StagedUpload(const StagedUpload&) = delete;
  StagedUpload& operator=(const StagedUpload&) = delete;
  Status init(size_t chunk_bytes) noexcept;  // two buffers of chunk_bytes
  size_t chunk_bytes() const noexcept { return chunk_; }
  Status stage(void** buffer) noexcept;                          // the next buffer to fill
  Status push(void* dst, size_t bytes, Stream s = nullptr) noexcept;  // copy it to dst, switch
  Status finish() noexcept;                                      // every copy complete

 private:
  void* buf_[2] = {nullptr, nullptr};
  void* done_[2] = {nullptr, nullptr};  // events: the last copy out of each buffer
  bool pending_[2] = {false, false};
  int next_ = 0;
  size_t chunk_ = 0;
};

// ---- attention -------------------------------------------------------------------------------
struct AttentionParams {
  const void* q = nullptr;  // [Hq, N, d], in_type
  const void* k = nullptr;  // [Hkv, N, d], in_type
  const void* v = nullptr;  // [Hkv, N, d], in_type (unused by row_lse)
  void* o = nullptr;        // [Hq, N, d], out_type; may be null when only lse is wanted
  float* lse = nullptr;     // [Hq, N]; may be null
  ElemType in_type = ElemType::bf16;   // bf16 or f16
  ElemType out_type = ElemType::bf16;  // in_type or f32
  int q_heads = 0, kv_heads = 0, head_dim = 0;  // head_dim 64, 128 or 256 (384: f16 row_lse and block_scores, the exact proxy's pieces)
  int64_t seq_len = 0;
  // Element strides (0 = contiguous).
  int64_t q_stride_head = 0, q_stride_token = 0;
  int64_t k_stride_head = 0, k_stride_token = 0;
  int64_t v_stride_head = 0, v_stride_token = 0;
  int64_t o_stride_head = 0, o_stride_token = 0;
  float scale = 0.0f;       // 0 -> 1 / sqrt(head_dim)
  int64_t row_begin = 0;    // only query rows [row_begin, N) are computed (others untouched)
  int64_t window = 0;       // full_attention only: W > 0 = sliding window, query i sees keys
                            // (i - W, i] (Gemma-3 local layers; the portable kernel, which skips
                            // the key tiles left of a query tile's window)
  int variant = 0;          // portable full attention, d 128: schedule 0..3 (0 = default; NOTES.md)
  AttnImpl impl = AttnImpl::automatic;  // hopper: unsupported when the shape/strides/device
                                        // cannot take it (never a silent fallback)
  int kv_splits = 0;        // row_lse: keys split over this many CTAs per row tile, partial
                            // results combined (0 = auto: only when rows are few; 1 = never;
                            // the Hopper kernel never splits: taken only when no split is made)
  Stream stream = nullptr;
};

// Full causal attention: o and lse for rows [row_begin, N).
Status full_attention(const AttentionParams& p) noexcept;
// Row log-sum-exp only (first pass of the oracle mass and the proxy scores): lse required.
Status row_lse(const AttentionParams& p) noexcept;

struct SparseAttentionParams {
  AttentionParams attn;              // row_begin must be 0
  const int32_t* indptr = nullptr;   // [Hq * Nb + 1], device
  const int32_t* indices = nullptr;  // device
  int block = 128;                   // mask block B: 64 or 128
};
// Block-sparse causal attention: query block i of head h attends the key blocks of its CSR row,
// causal inside the diagonal block. A row with no blocks gives o = 0, lse = -inf.
Status sparse_attention(const SparseAttentionParams& p) noexcept;

// Output error of a sparse output against a reference (output_error.cu): per head,
// sq_diff[h] += sum (o - o_ref)^2 and sq_ref[h] += sum o_ref^2 over its N x d values (float64;
// the caller zeroes the sums). Both outputs [heads, N, d] float32, contiguous.
struct OutputErrorParams {
  const float* o_ref = nullptr;
  const float* o = nullptr;
  int heads = 0, head_dim = 0;
  int64_t seq_len = 0;
  double* sq_diff = nullptr;  // [heads], device
  double* sq_ref = nullptr;   // [heads], device; may be null
  Stream stream = nullptr;
};
Status output_error_sums(const OutputErrorParams& p) noexcept;

// Output errors of several masks that are all prefixes of one ranking, in one block-sparse pass
// (prefix_error.cu; the GPU form of the analysis' prefix tables): each CTA walks its row's key
// blocks in rank order up to the longest prefix, and where a mask's row ends it normalises its
// rows (O / l; 0 for an empty row) and adds sum (O - o_ref)^2 to that mask's head sum. The cost
// is one sparse attention at the densest mask instead of one per mask.
struct PrefixErrorParams {
  AttentionParams attn;           // q, k, v, types, shape, strides (o_stride_* lay out o_ref);
                                  // o / lse unused; row_begin 0, no window
  const float* o_ref = nullptr;   // [Hq, N, d] float32: the full output
  const int32_t* order = nullptr; // causal layout: row (h, i) at h Nb (Nb+1)/2 + i (i+1)/2 holds
                                  // the blocks 0..i in rank order (select.hpp selection_order)
  const int32_t* counts = nullptr;  // [masks, Hq, Nb]: mask m's row (h, i) = the first
                                    // counts[m, h, i] (0..i+1) blocks of the order
  int masks = 0;
  int block = 128;                // 64 or 128
  double* sq_diff = nullptr;      // [masks, Hq], device: += (the caller zeroes)
};
Status prefix_output_errors(const PrefixErrorParams& p) noexcept;

// ---- block scores (oracle mass, proxy max-pool) ----------------------------------------------
enum class BlockReduce : int {
  mean_sum = 0,  // out[h,i,j] = (1/rows of block i) * sum_{q in i, k in j, k <= q} P[q,k]
  max = 1,       // out[h,i,j] = max_{q in i, k in j, k <= q} P[q,k]
};
struct BlockScoreParams {
  const void* q = nullptr;     // [Hq, N, d]
  const void* k = nullptr;     // [Hkv, N, d]
  const float* lse = nullptr;  // [Hq, N] natural log (from row_lse / full_attention)
  float* out = nullptr;        // [Hq, Nb - row_block_begin, Nb], every entry written (0 above diag)
  ElemType in_type = ElemType::bf16;
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t seq_len = 0;
  int64_t q_stride_head = 0, q_stride_token = 0;
  int64_t k_stride_head = 0, k_stride_token = 0;
  float scale = 0.0f;
  int block = 128;             // 64 or 128
  int query_stride = 1;        // only rows r of a block with r % query_stride == 0 (offset in block)
  int row_block_begin = 0;     // query blocks [row_block_begin, Nb)
  BlockReduce reduce = BlockReduce::mean_sum;
  int key_splits = 0;          // key blocks split over this many CTAs per query block
                               // (0 = auto: only when query blocks are few; 1 = never)
  AttnImpl impl = AttnImpl::automatic;  // hopper: reduce max, block 128, head_dim 64/128,
                                        // row_block_begin 0, no key splits (else unsupported)
  Stream stream = nullptr;
};
// Second pass of the oracle (mean_sum) or of the ProxyAttn scores (max); never an N x N buffer.
Status block_scores(const BlockScoreParams& p) noexcept;

// Block scores straight from Q and K, the row LSE found on the way: what row_lse then
// block_scores give (the same `out`; lse_out = row_lse's lse of rows [row_block_begin B, N)).
// Where the Hopper kernels apply (compute capability 9.x, block 128, head_dim 64/128) it is one
// pass over Q K^T instead of two: attn_sm90_kernel stores the max logit of every (query row, key
// tile) and, when needed, the tile's exp-sum in a stream-ordered workspace (Hq x rows x Nb x 4
// or 8 bytes, rows = the query rows scored), its key tiles split over CTAs when the rows are
// few (the last-block mass); a reduction (tile_scores.cu) turns them into the scores.
// Elsewhere, or when the workspace would pass workspace_limit or cannot be allocated, the two
// passes run (impl = hopper fails instead, with the reason). A caller that repeats the call
// (a benchmark) passes its own workspace of fused_block_scores_workspace(p) bytes: a 512 MB
// stream-ordered allocation per call costs as much as the reduction.
struct FusedScoreParams {
  BlockScoreParams scores;                   // scores.lse is not read
  float* lse_out = nullptr;                  // optional [Hq, N]
  size_t workspace_limit = size_t(4) << 30;  // bytes
  void* workspace = nullptr;                 // optional, device; used when workspace_bytes suffice
  size_t workspace_bytes = 0;
  bool* one_pass = nullptr;                  // optional: set to whether the one-pass path ran
};
Status fused_block_scores(const FusedScoreParams& p) noexcept;
// Workspace bytes the one-pass path takes for p; 0 when the two passes would run.
size_t fused_block_scores_workspace(const FusedScoreParams& p) noexcept;
// ---- ProxyAttn building blocks ---------------------------------------------------------------
constexpr int kMaxPoolGroups = 128;
// dst[g] = mean over src heads [head_begin[g], head_end[g]) of src (same dtype, fp32 sums).
struct PoolHeadsParams {
  const void* src = nullptr;  // [heads, N, d]
  void* dst = nullptr;        // [groups, N, d] contiguous
  ElemType type = ElemType::bf16;
  int heads = 0, head_dim = 0, groups = 0;
  int64_t seq_len = 0;
  int64_t stride_head = 0, stride_token = 0;
  int32_t head_begin[kMaxPoolGroups] = {0};
  int32_t head_end[kMaxPoolGroups] = {0};
  Stream stream = nullptr;
};
Status pool_heads(const PoolHeadsParams& p) noexcept;

// Dynamic budget (ALGORITHMS.md step 4): per head, k_h = fewest entries of mass[h, :] whose
// descending-sorted prefix sum reaches gamma * sum (ties: lower index first), clamped to
// [k_min, Nb]. kept (optional) = that prefix sum (fraction of the row total).
struct BudgetParams {
  const float* mass = nullptr;  // [heads, Nb] last-block mass p_h
  int heads = 0, num_blocks = 0;
  double gamma = 0.95;
  int k_min = 2;
  int32_t* k_out = nullptr;     // [heads]
  double* kept = nullptr;       // [heads], may be null
  Stream stream = nullptr;
};
Status dynamic_budget(const BudgetParams& p) noexcept;

// Selection (select.hpp): per head h and query block i, the forced blocks (sink 0, diagonal i,
// window i-1..i-w), then the best remaining causal blocks by score (ties: lower j; NaN lowest)
// until the row holds max(forced, min(budget, i + 1)) blocks.
struct SelectParams {
  const float* scores = nullptr;  // [score_heads, Nb, Nb]; query head h uses score head
                                  // h / (heads / score_heads)
  int score_heads = 0, heads = 0, num_blocks = 0;
  const int32_t* row_k = nullptr;   // [heads, Nb] per-row budgets; or null and then:
  const int32_t* head_k = nullptr;  // [heads], row budget = k (mode 0) or
  int mode = 0;                     // max(1, ceil(k (i + 1) / Nb)) (mode 1, proportional)
  bool sink = true, diagonal = true;
  int local_window = 0;
  int32_t* indptr = nullptr;   // [heads * Nb + 1] written by select_counts
  int32_t* indices = nullptr;  // [indptr[last]] written by select_fill
  Stream stream = nullptr;
};
Status select_counts(const SelectParams& p) noexcept;
Status select_fill(const SelectParams& p) noexcept;


// =============================================================================================
// ---- the peers' estimators and exact ProxyAttn scores (peer_*.cu, proxy_score.cu) -----------
// Same semantics as the CPU estimators (lib/src/estimator.cpp, estimator_peers.cpp; the CPU code
// is the spec): scores [Hq, Nb, Nb] float32, every entry written (0 above the diagonal), fp32
// accumulation, softmax statistics in fp32 or better. Launchers that need scratch memory take it
// stream-ordered (cudaMallocAsync / cudaFreeAsync on p.stream), as row_lse does.
//
// Native selections come out as a bitmap [H, Nb, Nb] uint8 (1 = selected; only j <= i is ever
// 1) plus the row counts [H * Nb]; csr_indptr + csr_fill turn them into the BlockMask CSR.

// Operand-side fields shared by the peers' launchers (same meaning as in AttentionParams).
struct PeerInput {
  const void* q = nullptr;  // [Hq, N, d]
  const void* k = nullptr;  // [Hkv, N, d]
  ElemType in_type = ElemType::bf16;  // bf16 or f16
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t seq_len = 0;
  int64_t q_stride_head = 0, q_stride_token = 0;  // elements, 0 = contiguous
  int64_t k_stride_head = 0, k_stride_token = 0;
};

// `pooled`: out[h, i, j] = row-softmax over j <= i of (Qbar_i . Kbar_j) * scale, Qbar / Kbar the
// exact fp32 means of the tokens of each block (a partial last block averages its own rows).
// fp32 SIMT (the product is Nb x Nb x d per head: small), softmax in float64 like the CPU.
// head_dim a multiple of 8 up to 256; block any power of two.
struct PooledScoreParams {
  PeerInput in;
  int block = 128;
  float scale = 0.0f;     // 0 -> 1 / sqrt(head_dim)
  float* out = nullptr;   // [Hq, Nb, Nb]
  Stream stream = nullptr;
};
Status pooled_scores(const PooledScoreParams& p) noexcept;

// `xattn` (XAttention antidiagonal scoring): strided rows a and keys b (S = stride),
//   s[a, b] = scale * sum_{t < S} q[aS + S-1-t] . k[bS + t]   (positions >= N read as 0),
// causal b <= a, softmax over b per strided row; out[h, I, J] = (sum over the strided rows a of
// block I and strided keys b of block J of softmax[a, b]) / (strided rows of block I).
// Two passes of mma.sync (row LSE, then block sums), never an A x A buffer. head_dim 64, 128 or
// 256; block a power of two with stride <= block <= 128 * stride.
struct XAttnScoreParams {
  PeerInput in;
  int block = 128;
  int stride = 8;         // S: power of two
  float scale = 0.0f;     // 0 -> 1 / (sqrt(head_dim) * stride)
  float* out = nullptr;   // [Hq, Nb, Nb]
  Stream stream = nullptr;
};
Status xattn_scores(const XAttnScoreParams& p) noexcept;

// `vslash` (MInference vertical-slash mapped to blocks), the whole estimator: exact
// probabilities of the last L = min(last_q, N) queries (row_lse + one mma.sync pass), vertical[k]
// and slash[o = q - k] means over those rows; kept columns = 0..sink_columns-1 then the top by
// vertical up to `vertical` in all, kept diagonals = offsets 0..local_diagonals-1 then the top by
// slash up to `slash` (ranking: value descending, ties lower index, as the CPU's order_desc, by a
// radix select on the device); then per block (i, j) the score (kept column mass of block j +
// kept diagonal mass crossing (i, j)) and the native bitmap (a kept column or diagonal crosses
// it, or j == 0, or j == i). head_dim 64, 128 or 256; last_q <= 4096.
struct VSlashParams {
  PeerInput in;
  int block = 128;
  int last_q = 64;
  int64_t vertical = 1000, slash = 6096;
  int sink_columns = 30, local_diagonals = 100;
  float* out = nullptr;          // [Hq, Nb, Nb] scores
  uint8_t* bitmap = nullptr;     // [Hq, Nb, Nb] native selection
  int32_t* row_counts = nullptr; // [Hq * Nb] blocks per row of the bitmap
  float* vertical_out = nullptr; // optional [Hq, N]: the vertical means (tests)
  float* slash_out = nullptr;    // optional [Hq, N]: the slash means (tests)
  Stream stream = nullptr;
};
Status vslash_scores(const VSlashParams& p) noexcept;

// Native selections that are functions of the scores, per row (h, i) over j <= i:
//   cumulative (pooled, per row): the fewest blocks in descending order (ties lower j, NaN last)
//     whose sum reaches threshold * (sum of the positive entries), union block 0 and the diagonal;
//   xattn: block 0 and the diagonal first (their mass counts), then descending while the kept mass
//     is < threshold * (row sum).
enum class NativeRule : int { cumulative = 0, xattn = 1 };
struct NativeSelectParams {
  const float* scores = nullptr;  // [heads, Nb, Nb]
  int heads = 0, num_blocks = 0;  // num_blocks <= 16384
  NativeRule rule = NativeRule::cumulative;
  double threshold = 0.9;         // gamma or tau, in (0, 1]
  uint8_t* bitmap = nullptr;      // [heads, Nb, Nb], every entry written
  int32_t* row_counts = nullptr;  // [heads * Nb]
  Stream stream = nullptr;
};
Status native_select(const NativeSelectParams& p) noexcept;

// CSR from a bitmap: indptr = exclusive prefix sum of row_counts ([rows + 1], rows = heads * Nb,
// total < 2^31); then indices[indptr[r] ..] = the selected j of row r, ascending.
struct CsrParams {
  const uint8_t* bitmap = nullptr;      // [heads, Nb, Nb]
  const int32_t* row_counts = nullptr;  // [heads * Nb], must equal the bitmap's row sums
  int heads = 0, num_blocks = 0;
  int32_t* indptr = nullptr;   // [heads * Nb + 1], written by csr_indptr
  int32_t* indices = nullptr;  // [indptr[last]], written by csr_fill
  Stream stream = nullptr;
};
Status csr_indptr(const CsrParams& p) noexcept;
Status csr_fill(const CsrParams& p) noexcept;

// ProxyAttn scores with float32 proxy heads (the "exact" path; CudaLayer::proxy_scores and the
// analysis use it). The fast path (pool_heads into the operand dtype, row_lse, block_scores max)
// rounds the pooled heads to bf16/fp16, which moves a few block scores enough to flip near-equal
// rankings; here the proxy heads are the fp32 means of the 16-bit inputs (the CPU's values when
// the inputs are 16-bit exact) and
//   out[g, i, j] = max over rows q of block i (q - iB multiple of query_stride) of
//                  exp(max_{k in j, k <= q} logit[q, k] - lse[q])   (as the CPU, to float rounding).
// Where the concatenated width allows (proxy_score.cu: d 64 and 128; block 64/128) the float32 heads travel as fp16 hi/lo pieces through the tensor-core row_lse
// and block_scores (about the fast path's cost times the pieces); otherwise fp32 SIMT tiles with
// a float64 row LSE (2 * N^2/2 * d FMA per group).
struct ProxyExactParams {
  PeerInput in;
  int groups = 0;  // <= kMaxPoolGroups per call
  // Group g averages query heads [q_begin[g], q_end[g]) and KV heads [k_begin[g], k_end[g]).
  int32_t q_begin[kMaxPoolGroups] = {0}, q_end[kMaxPoolGroups] = {0};
  int32_t k_begin[kMaxPoolGroups] = {0}, k_end[kMaxPoolGroups] = {0};
  int block = 128;         // power of two >= 64
  int query_stride = 1;
  float scale = 0.0f;      // 0 -> 1 / sqrt(head_dim)
  float* out = nullptr;    // [groups, Nb, Nb]
  Stream stream = nullptr;
};
Status proxy_scores_exact(const ProxyExactParams& p) noexcept;


// =============================================================================================
// ---- model runtime (model_ops.cu, gemm.cu) --------------------------------------------------
// The pieces of a Llama-family forward around attention. Activations are row-major [tokens,
// features]; the residual stream is float32, GEMM operands bf16, accumulation fp32.

// y[M, N] = alpha * x[M, K] . w[N, K]^T + beta * y (cuBLAS, bf16 operands, fp32 compute).
// x, w bf16 row-major (leading dims K); y bf16 or f32 row-major with leading dim ldy (0 = N).
// beta != 0 needs y_type f32 (the residual stream accumulates in place).
struct GemmParams {
  const void* x = nullptr;
  const void* w = nullptr;
  void* y = nullptr;
  ElemType y_type = ElemType::bf16;
  int64_t m = 0, n = 0, k = 0, ldy = 0;
  float alpha = 1.0f, beta = 0.0f;
  Stream stream = nullptr;
};
Status gemm(const GemmParams& p) noexcept;

// Seeded N(0, std) values (a counter-based hash of (seed, index), so the same seed gives the same
// tensor whatever the GPU or launch shape), written as `type` (bf16 or f32).
Status fill_normal(void* dst, ElemType type, int64_t n, uint64_t seed, float std, Stream s = nullptr) noexcept;

// out[i, :] = table[tokens[i], :] as float32 (table bf16 [vocab, E]); tokens checked in [0, vocab)
// by the caller.
Status embed_rows(const void* table, const int32_t* tokens, float* out, int64_t rows, int64_t dim,
                  Stream s = nullptr) noexcept;

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w (float64 sum of squares, as the CPU back
// end); x float32 [rows, dim] (row stride ldx, 0 = dim), w float32 [dim], out bf16 [rows, dim].
Status rms_norm_rows(const float* x, const float* w, void* out, int64_t rows, int64_t dim, float eps,
                     int64_t ldx = 0, Stream s = nullptr) noexcept;

// RoPE tables for positions [pos0, pos0 + rows): angle = float(pos) * inv_freq[j] (float32),
// cos/sin in float64 rounded to float32 (the CPU back end's and capture_qk.py's order).
Status rope_table(const float* inv_freq, int half, int64_t pos0, int64_t rows, float* cos_out, float* sin_out,
                  Stream s = nullptr) noexcept;

// Splits the fused projection qkv bf16 [rows, (Hq + 2 Hkv) d] (+ bias float32 [(Hq + 2 Hkv) d] when
// given) into q [Hq, *, d], k and v [Hkv, *, d] (bf16, token r written at row row0 + r of each
// head, head strides q/kv_head_stride elements, token stride d), rotating q and k by the tables
// (rotate_half layout: pairs (j, j + d/2)).
struct RopeSplitParams {
  const void* qkv = nullptr;
  const float* bias = nullptr;
  const float* cos = nullptr;  // [rows, d/2]
  const float* sin = nullptr;
  void* q = nullptr;
  void* k = nullptr;
  void* v = nullptr;
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t rows = 0, row0 = 0;
  int64_t q_head_stride = 0, kv_head_stride = 0;  // elements
  Stream stream = nullptr;
};
Status rope_split(const RopeSplitParams& p) noexcept;

// act[r, :F] = silu(gu[r, :F]) * gu[r, F:2F] (bf16 in and out, fp32 math).
Status silu_mul(const void* gu, void* act, int64_t rows, int64_t ff, Stream s = nullptr) noexcept;

// act[r, :F] = gelu_tanh(gu[r, :F]) * gu[r, F:2F] (GeGLU; bf16 in and out, fp32 math in the
// CPU back end's order: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))).
Status gelu_mul(const void* gu, void* act, int64_t rows, int64_t ff, Stream s = nullptr) noexcept;

// x[i] *= scale for i < n (float32; Gemma's embedding scale sqrt(n_embd)).
Status scale_f32(float* x, int64_t n, float scale, Stream s = nullptr) noexcept;

// Per-head RMSNorm in place on the fused projection qkv bf16 [rows, (Hq + 2 Hkv) d] (Gemma-3's
// q/k norm, before RoPE): head h < Hq with q_weight, Hq <= h < Hq + Hkv with k_weight (float32
// [d]); v untouched. float64 sum of squares, as the CPU back end.
struct HeadNormParams {
  void* qkv = nullptr;
  const float* q_weight = nullptr;
  const float* k_weight = nullptr;
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t rows = 0;
  float eps = 1e-6f;
  Stream stream = nullptr;
};
Status head_rms_norm(const HeadNormParams& p) noexcept;

// x[r, :] += y[r, :] / sqrt(mean(y[r, :]^2) + eps) * w: the sandwich norm of an attention or MLP
// output y before the residual add (x, y float32 [rows, dim], w float32 [dim]; float64 sum of
// squares).
Status rms_norm_add_rows(const float* y, const float* w, float* x, int64_t rows, int64_t dim, float eps,
                         Stream s = nullptr) noexcept;

// z[i] = cap * tanh(z[i] / cap) for i < n (final logit soft-capping; cap > 0).
Status softcap(float* z, int64_t n, float cap, Stream s = nullptr) noexcept;

// Attention output o bf16 [heads, *, d] (head stride o_head_stride elements, rows row0..row0+rows)
// -> rows bf16 [rows, heads * d] (the input of the output projection).
Status heads_to_rows(const void* o, void* rows_out, int heads, int64_t rows, int head_dim, int64_t o_head_stride,
                     int64_t row0 = 0, Stream s = nullptr) noexcept;

// Per row r of logits float32 [rows, vocab]: nll[r] = logsumexp(row) - row[target[r]] (float64)
// and argmax[r] (first maximum), each optional.
Status logits_rows(const float* logits, int64_t rows, int64_t vocab, const int32_t* target, double* nll,
                   int32_t* argmax, Stream s = nullptr) noexcept;

// Events recorded on a stream, read after it is synchronised: the model runtime's stage clock.
class EventLog {
 public:
  EventLog() = default;
  ~EventLog();
  EventLog(const EventLog&) = delete;
  EventLog& operator=(const EventLog&) = delete;
  // Records event i (created on first use); i <= size().
  Status record(size_t i, Stream s = nullptr) noexcept;
  // Milliseconds from event a to event b (both recorded; synchronises on b).
  Status elapsed_ms(size_t a, size_t b, float* ms) noexcept;
  size_t size() const noexcept { return n_; }

 private:
  void** events_ = nullptr;
  size_t n_ = 0, cap_ = 0;
};
// Bytes of device memory in use (cudaMemGetInfo: total - free, so other processes count too).
Status device_memory_used(size_t* used) noexcept;

}  // namespace proxyattn::kernels
