// The exact oracle (`oracle`): the block mass of the causal softmax. Its selections need no
// forced blocks (the upper bound); at a fixed density it keeps the globally best blocks of the
// layer; its "native" selections are the per-row top-k reaching each gamma (the analysis).
#include "method_util.hpp"
#include "../estimator_util.hpp"
#include "proxyattn/cuda_dispatch.hpp"

namespace proxyattn::methods {

namespace {

MethodInfo make() {
  MethodInfo m;
  m.name = "oracle";
  m.description = "exact block mass of the causal softmax";
  m.native = NativeRule::none;
  m.forced_blocks = false;
  m.exact_mass = true;
  m.auto_density = AutoDensity::layer_global;
  m.validate = [](const EstimatorConfig&, int) {};
  m.estimate_cpu = [](ConstView q, ConstView k, const EstimatorConfig& c) {
    return scores_from_mass(block_mass_cpu(q, k, c.block));
  };
  m.estimate_gpu = [](const CudaLayer& layer, const EstimatorConfig& c) {
    return scores_from_mass(layer.block_mass(c.block));
  };
  m.gpu_in_analysis = true;
  m.cost = [](const AttentionShape&, const EstimatorConfig&) { return 1.0; };
  return m;
}

}  // namespace

const MethodInfo& oracle_method() {
  static const MethodInfo m = make();
  return m;
}

}  // namespace proxyattn::methods
