#pragma once
// GPU versions of the CPU reference operations (attention.hpp, estimator.hpp, budget.hpp,
// select.hpp), same signatures and semantics; the CPU code is the spec. Plain C++ over the
// CUDA-free kernels API: inputs are float32 views, converted to bf16 or fp16 on the device
// (`dtype`), computed with fp32 accumulation, results copied back as float32. Every failure
// (no CUDA build, no device, out of memory, a kernel error) throws proxyattn::Error naming the
// operation and the CUDA detail.
//
//   if (proxyattn::cuda_available()) {
//     proxyattn::CudaLayer layer(q, k, v, DType::bf16);   // one upload per layer
//     AttentionOutput o = layer.full_attention();
//     BlockMass m = layer.block_mass(128);
//     BlockScores s = layer.proxy_scores(config);          // == make_estimator("proxy")
//     BlockScores x = layer.estimate("xattn", config);     // == make_estimator("xattn")
//   }
//
// Estimators on the GPU: proxy, pooled, xattn, vslash and oracle (flexprefill has no kernel:
// has_estimator() says which). Scores match the CPU estimator to float rounding (fp32
// accumulation where the CPU accumulates in float32, float64 softmax statistics where it uses
// float64); the native selections follow the CPU's rule: pooled / xattn apply it on the host to
// the device scores (renative_from_scores), vslash's comes from the device. A selection can then
// differ from the CPU's only where the CPU's own decision is a near tie (a cumulative sum within
// float rounding of its threshold, or two scores within float rounding of each other at the
// boundary of a top-k or of a coverage cut).
#include <future>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "proxyattn/attention.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/budget.hpp"
#include "proxyattn/dtype.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/kernels.h"
#include "proxyattn/select.hpp"
#include "proxyattn/tensor.hpp"

namespace proxyattn {

struct MethodInfo;

// The one Status -> Error of lib and the tools: nothing for ok, else Error("<what>: <status>
// (<the thread's last CUDA detail>)").
void throw_on_failure(kernels::Status s, const std::string& what);

// True when the library was built with CUDA and a device is visible. Never throws.
bool cuda_available() noexcept;
// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)", or why there is none.
std::string cuda_device_description();
// Global memory of the current device in bytes; 0 without a device. Never throws.
size_t cuda_device_memory_bytes() noexcept;
// One GPU per MPI rank: makes device local_rank % device_count() current for this process
// (no-op without a device). Returns the device chosen, -1 when none.
int use_cuda_device_for_rank(int local_rank);
// The calling host thread's current device (-1 without one), and making a device current on
// another host thread (the CUDA device is per thread): no-op for -1.
int current_cuda_device() noexcept;
void use_cuda_device(int device);
// Call first in main(), before any CUDA call, in a tool that launches kernels from several host
// threads at once (proxyattn-analyze): sets CUDA_MODULE_LOADING=EAGER unless the user set it.
// With CUDA's default lazy loading, the first launch of a kernel not yet loaded, beside the other
// threads' work, hung the driver (H200, driver 580, one 128K layer of analyze --device cuda: 3 of
// 7 runs; the GPU idle, the launching thread blocked inside cudaFuncSetAttribute, a driver thread
// spinning). Eager loading puts the library's kernels (~20 MB of sm_90a code) into the context
// when it is created, which analyze overlaps with reading the store: 0 hangs in 17 runs, no
// measurable cost (5.85 against 5.83 s on one machine). Not for a process that calls cuBLASLt
// (the model runtime): eagerly, its first matmul loads all of cuBLASLt's kernels (+2.8 s in the
// GPU tests).
void load_cuda_kernels_eagerly();
// The CUDA_MODULE_LOADING the process runs with ("EAGER", "LAZY", or "default" when unset).
std::string cuda_module_loading();
// The calling thread's device's context created on another thread, now: the ~0.1-0.3 s of
// driver work overlaps what the caller does next (reading a store) instead of delaying the
// first upload. Failures are left to the calls that follow (they report them). Wait for the
// future before the process ends.
std::future<void> start_cuda_context();

// Output error of block masks against full attention (CudaLayer::output_errors).
struct MaskErrors {
  std::vector<std::vector<double>> rel_error;  // [mask][head]: ||O_sparse - O_full||_F / ||O_full||_F
  std::vector<int64_t> empty_rows;             // [mask]: query rows whose mask row is empty (O = 0)
};

// How CudaLayer::proxy_scores builds and scores the proxy heads.
enum class ProxyPrecision {
  // float32 proxy heads (the means of the 16-bit inputs, in the CPU's order) scored exactly
  // (kernels::proxy_scores_exact: fp16 hi/lo pieces on the tensor cores, or fp32 SIMT): the CPU
  // estimator's scores to float rounding, so its budgets and masks up to exact ties. What the
  // analysis uses.
  exact,
  // Heads pooled into the operand dtype, tensor-core row LSE + block max (pool_heads, row_lse,
  // block_scores): the benchmark's fast path. The rounding of the pooled heads moves block scores
  // by up to ~1e-2 (bf16) relative, enough to shift a budget or a mask by one block in a few
  // rows out of a thousand.
  operand,
};

// One layer's Q, K (and optionally V) resident on the GPU in `dtype` (bf16 or f16).
class CudaLayer {
 public:
  CudaLayer(ConstView q, ConstView k, ConstView v = {}, DType dtype = DType::bf16);
  ~CudaLayer();
  CudaLayer(CudaLayer&&) noexcept;
  CudaLayer& operator=(CudaLayer&&) noexcept;

  const AttentionShape& shape() const;
  DType dtype() const;
  bool has_v() const;

  // attention.hpp equivalents (O in float32).
  AttentionOutput full_attention() const;
  AttentionOutput sparse_attention(const BlockMask& mask) const;
  std::vector<float> row_lse() const;
  // Output error of each mask (analysis::output_errors on the device): the full output once,
  // then a float64 reduction per head of each mask's block-sparse output; outputs float32 on
  // the device, never downloaded. Needs V. The masks that are prefixes (select.hpp
  // is_prefix_of_order) of one of `orders` (rank orders in selection_order's causal layout) are
  // evaluated together, one sparse pass per order at its densest mask (prefix_output_errors);
  // the others one pass each.
  MaskErrors output_errors(const std::vector<const BlockMask*>& masks,
                           const std::vector<const std::vector<int32_t>*>& orders = {}) const;
  BlockMass block_mass(int block) const;
  // The output errors' reference (the full output, kept on the device) computed now rather than
  // by the first output_errors call. Its pass writes the row LSE as well: called before
  // block_mass / row_lse, they need no LSE pass of their own. Needs V.
  void compute_full_output() const;

  // estimator.hpp: make_estimator("proxy")->estimate(q, k, config) (score broadcast to the
  // member heads, group_of_head filled). Groups are scored 128 at a time.
  BlockScores proxy_scores(const EstimatorConfig& config, ProxyPrecision precision = ProxyPrecision::exact) const;
  // make_estimator("pooled" / "xattn" / "vslash")->estimate(q, k, config), native included.
  BlockScores pooled_scores(const EstimatorConfig& config) const;
  BlockScores xattn_scores(const EstimatorConfig& config) const;
  BlockScores vslash_scores(const EstimatorConfig& config) const;
  // By name: proxy (exact), pooled, xattn, vslash, oracle (scores_from_mass of block_mass).
  // Throws Error for a name without a GPU implementation (flexprefill) or an unknown one.
  BlockScores estimate(std::string_view name, const EstimatorConfig& config) const;
  static bool has_estimator(std::string_view name);
  // estimator.hpp maxpool_block_scores on the layer's own heads; with GQA each query head
  // against the KV head it reads (the oracle's block max, LayerOracle::block_max).
  std::vector<float> maxpool_block_scores(int block, int query_stride = 1) const;

  // budget.hpp: last_block_mass_cpu as float64 [Hq, Nb].
  std::vector<double> last_block_mass(int block) const;
  // make_budget("dynamic")->compute(q, k, scores-shaped, config) for block size `block`.
  Budgets dynamic_budget(int block, const BudgetConfig& config) const;

  // Device time of the kernels of the last call above (ms, CUDA events; transfers excluded).
  double last_kernel_ms() const;

 private:
  // A method's device estimate (MethodInfo::estimate_device) on this layer, downloaded; the
  // native selection from its bitmap, else the CPU's rule on the device scores.
  BlockScores device_estimate(const MethodInfo& method, const EstimatorConfig& config) const;

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// select.hpp select_blocks on the GPU (scores of any estimator, per-row budgets).
BlockMask select_blocks_cuda(const BlockScores& scores, const Budgets& budgets,
                             const SelectOptions& options = {});

// The native selection of pooled (per-row gamma; pooled.global is not on the device: Error) or
// xattn (tau) computed on the GPU from the given scores (kernels::native_select + CSR): what the
// benchmark times. Equal to renative_from_scores on the same scores (up to the last bits of a
// float64 sum at the threshold).
BlockMask native_select_cuda(const BlockScores& scores, const EstimatorConfig& config);

// One-shot helpers (upload, compute, download).
AttentionOutput full_attention_cuda(ConstView q, ConstView k, ConstView v, DType dtype = DType::bf16);
AttentionOutput sparse_attention_cuda(ConstView q, ConstView k, ConstView v, const BlockMask& mask,
                                      DType dtype = DType::bf16);
BlockMass block_mass_cuda(ConstView q, ConstView k, int block, DType dtype = DType::bf16);

}  // namespace proxyattn
