// Mean-pooled block scoring (`pooled`): block-causal row softmax of the block means of Q and K;
// native selection: per row (or over the flattened head) the fewest blocks reaching gamma, plus
// the sink and the diagonal.
#include "method_util.hpp"
#include "../estimator_util.hpp"
#include "device_util.hpp"
#include "proxyattn/cuda_dispatch.hpp"

namespace proxyattn::methods {

namespace {

void validate(const EstimatorConfig& c, int) {
  require(coverage_ok(c.pooled.gamma), "pooled.gamma = " + num_str(c.pooled.gamma) + " must be in (0, 1]");
}

BlockScores estimate_cpu(ConstView q, ConstView k, const EstimatorConfig& c) {
  const AttentionShape s = check_qkv(q, k);
  BlockScores out = detail::make_scores("pooled", s.q_heads, s.seq_len, c.block);
  detail::pooled_scores(q, k, out);
  out.native = detail::cumulative_native(out, c.pooled.gamma, c.pooled.global);
  return out;
}

void renative(BlockScores& s, const EstimatorConfig& c) {
  s.native = detail::cumulative_native(s, c.pooled.gamma, c.pooled.global);
}

// Block-level work only: the block means read Q and K once, the logits are Nb^2.
double cost(const AttentionShape& s, const EstimatorConfig& c) {
  return 1.0 / std::max<double>(1.0, static_cast<double>(s.seq_len)) +
         1.0 / (static_cast<double>(c.block) * c.block);
}

void estimate_device(const DeviceEstimate& d) {
  kernels::PooledScoreParams p;
  p.in = peer_input(d);
  p.block = d.config->block;
  p.out = d.scores;
  p.stream = d.stream;
  check_launch(kernels::pooled_scores(p), "pooled_scores");
}

MethodInfo make() {
  MethodInfo m;
  m.name = "pooled";
  m.description = "mean-pooled Q/K per block, block-causal row softmax (coarse-grained)";
  m.native = NativeRule::from_scores;
  m.options = {field_option("pooled", "global", "pooled-global",
                            "pooled native selection over the flattened head (FlexPrefill's cover) instead of per row",
                            [](EstimatorConfig& c) -> bool& { return c.pooled.global; })};
  m.validate = validate;
  m.set_coverage = [](EstimatorConfig& c, double gamma) { c.pooled.gamma = gamma; };
  m.estimate_cpu = estimate_cpu;
  m.estimate_gpu = [](const CudaLayer& layer, const EstimatorConfig& c) { return layer.pooled_scores(c); };
  m.gpu_in_analysis = true;
  m.estimate_device = estimate_device;
  m.device_scratch_bytes = [](const AttentionShape& s, const EstimatorConfig& c) {
    const double nb = std::ceil(static_cast<double>(s.seq_len) / c.block);
    return (s.q_heads + s.kv_heads) * nb * s.head_dim * 4;  // the fp32 block means
  };
  m.device_timed = "scores: pooled_scores (block means, logits, float64 softmax); select: native_select (per-row gamma) + CSR";
  m.renative = renative;
  m.device_native = [](const EstimatorConfig& c) {
    if (c.pooled.global)
      throw Error("cuda: native_select: pooled.global (one budget over the flattened head) has no GPU kernel");
    return DeviceNative{DeviceNativeRule::cumulative, c.pooled.gamma};
  };
  m.cost = cost;
  return m;
}

}  // namespace

const MethodInfo& pooled_method() {
  static const MethodInfo m = make();
  return m;
}

}  // namespace proxyattn::methods
