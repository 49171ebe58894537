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
//   }
#include <memory>
#include <string>
#include <vector>

#include "proxyattn/attention.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/budget.hpp"
#include "proxyattn/dtype.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/select.hpp"
#include "proxyattn/tensor.hpp"

namespace proxyattn {

// True when the library was built with CUDA and a device is visible. Never throws.
bool cuda_available() noexcept;
// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)", or why there is none.
std::string cuda_device_description();
// One GPU per MPI rank: makes device local_rank % device_count() current for this process
// (no-op without a device). Returns the device chosen, -1 when none.
int use_cuda_device_for_rank(int local_rank);

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
  BlockMass block_mass(int block) const;

  // estimator.hpp: make_estimator("proxy")->estimate(q, k, config) (score broadcast to the
  // member heads, group_of_head filled).
  BlockScores proxy_scores(const EstimatorConfig& config) const;
  // estimator.hpp maxpool_block_scores on the layer's own heads (requires Hq == Hkv).
  std::vector<float> maxpool_block_scores(int block, int query_stride = 1) const;

  // budget.hpp: last_block_mass_cpu as float64 [Hq, Nb].
  std::vector<double> last_block_mass(int block) const;
  // make_budget("dynamic")->compute(q, k, scores-shaped, config) for block size `block`.
  Budgets dynamic_budget(int block, const BudgetConfig& config) const;

  // Device time of the kernels of the last call above (ms, CUDA events; transfers excluded).
  double last_kernel_ms() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// select.hpp select_blocks on the GPU (scores of any estimator, per-row budgets).
BlockMask select_blocks_cuda(const BlockScores& scores, const Budgets& budgets,
                             const SelectOptions& options = {});

// One-shot helpers (upload, compute, download).
AttentionOutput full_attention_cuda(ConstView q, ConstView k, ConstView v, DType dtype = DType::bf16);
AttentionOutput sparse_attention_cuda(ConstView q, ConstView k, ConstView v, const BlockMask& mask,
                                      DType dtype = DType::bf16);
BlockMass block_mass_cuda(ConstView q, ConstView k, int block, DType dtype = DType::bf16);

}  // namespace proxyattn
