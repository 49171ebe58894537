#pragma once
// The device pipeline of one attention layer: estimate -> budget -> select -> block-sparse
// attention, with every buffer on the GPU and a CUDA event per stage. proxyattn-bench times it
// and the model runtime's CUDA back end runs it in every layer, so the benchmark's numbers are
// those of the prefill. Plain C++ over the CUDA-free kernels API (kernels.h).
//
//   DevicePipeline p(spec, shape);              // buffers for sequences up to shape.seq_len
//   p.select(layer);                            // the method's block mask, on the device
//   p.attend(layer);                            // sparse attention on it (full for no method)
//   PipelineTimes t = p.times();                // ms per stage of the last select/attend
//
// The stages per method kind (from the registry's traits, never its name):
//   grouped (ProxyAttn): pool_heads(Q, K) into g proxy heads; fused_block_scores(max) on them
//            (one pass over Q K^T on Hopper); the last query block's mass of every head and the
//            dynamic budget k_h at gamma; select_counts + select_fill (sink, diagonal, best proxy
//            scores). With a target density the budgets are scaled to it: max(1, round(c k_h))
//            with the one c giving that mean block density (ProxyAttn@density=D).
//   device estimate (pooled, xattn, vslash): MethodInfo::estimate_device, the native rule on the
//            device (kernels::native_select unless the estimate gives its bitmap), CSR.
//   none: full attention (no mask).
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "proxyattn/block_mask.hpp"
#include "proxyattn/estimator.hpp"

namespace proxyattn {

struct MethodInfo;

// One layer's operands on the device, [heads, N, d] with a head stride (elements; 0 = N d) and
// token stride d: q [Hq], k and v [Hkv], output o [Hq] (o may be null for select alone).
struct DeviceOperands {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;  // optional [Hq, N]
  int elem = 2;          // kernels::ElemType: 1 f16, 2 bf16
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t seq_len = 0;
  int64_t q_head_stride = 0, kv_head_stride = 0, o_head_stride = 0;
  void* stream = nullptr;
};

struct PipelineSpec {
  const MethodInfo* method = nullptr;  // nullptr: full attention
  int block = 128;
  // Grouped methods (ProxyAttn): proxy groups, query stride, dynamic budget.
  int groups = 1;
  int query_stride = 1;
  double gamma = 0.95;
  int k_min = 2;
  std::optional<double> density;  // scale the budgets to this mean block density
  // Budgets scaled once, on the first select, and kept (a benchmark repeating one input); else
  // every select scales its own (a model: every layer has its own budgets).
  bool scale_once = false;
  EstimatorConfig config;  // the method's section (peers: their defaults); block is set from `block`
};

struct PipelineTimes {
  double scores_ms = 0, budget_ms = 0, select_ms = 0, attention_ms = 0;
  double estimation_ms() const { return scores_ms + budget_ms + select_ms; }
};

class DevicePipeline {
 public:
  // Allocates the buffers of sequences up to max.seq_len (Error naming what failed).
  DevicePipeline(const PipelineSpec& spec, const AttentionShape& max);
  ~DevicePipeline();
  DevicePipeline(DevicePipeline&&) noexcept;
  DevicePipeline& operator=(DevicePipeline&&) noexcept;

  // Why this spec cannot run on the device ("" when it can): no GPU estimator, too many groups.
  static std::string unsupported_reason(const PipelineSpec& spec);
  // Device bytes the pipeline allocates (and its launchers' scratch) for this shape.
  static double bytes(const PipelineSpec& spec, const AttentionShape& shape);

  bool sparse() const;
  // Estimate -> budget -> select for this layer (x.seq_len <= the constructor's); the mask stays
  // on the device. Nothing for full attention.
  void select(const DeviceOperands& x);
  // Attention of the layer: block-sparse on the last selection, or full.
  void attend(const DeviceOperands& x);
  // Stage times of the last select / attend (synchronises on their events).
  PipelineTimes times();
  // The last selection, downloaded (Error for full attention).
  BlockMask mask() const;
  // Mean block density of the last selection from its row pointers (1 for full attention).
  double block_density() const;
  // Blocks the last selection kept (all heads), copied to a device int32 without a host wait:
  // a model records one per layer and reads them after the forward.
  void copy_selected_count(int32_t* dst, void* stream) const;
  // Causal blocks of a selection over n tokens, all heads (the denominator of the density).
  double causal_blocks(int64_t n) const;
  // The stages' settings for reports (proxy groups, budget, passes, the peer's config).
  const nlohmann::json& info() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The scale c for which per-head budgets k'_h = max(1, round(c k_h)) give the mean block
// density closest to `target` under the selection rule (row i keeps max(forced_i, min(k', i + 1)),
// forced = sink + diagonal), and the scaled budgets. achieved = their density.
std::vector<int32_t> scale_budgets_to_density(const std::vector<int32_t>& k, double target, int num_blocks,
                                              double* achieved);

}  // namespace proxyattn
