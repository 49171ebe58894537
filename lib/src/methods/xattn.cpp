// XAttention (`xattn`): strided antidiagonal scores; native selection per row: sink and
// diagonal first, then descending score while the kept mass is below tau.
// The estimate itself: detail::estimate_xattn (estimator_peers.cpp).
#include "method_util.hpp"
#include "../estimator_util.hpp"
#include "device_util.hpp"
#include "proxyattn/cuda_dispatch.hpp"

namespace proxyattn::methods {

namespace {

void validate(const EstimatorConfig& c, int) {
  require(pow2(c.xattn.stride) && c.xattn.stride <= c.block,
          "xattn.stride = " + std::to_string(c.xattn.stride) + " must be a power of two <= block (" +
              std::to_string(c.block) + ")");
  require(coverage_ok(c.xattn.tau), "xattn.tau = " + num_str(c.xattn.tau) + " must be in (0, 1]");
}

// One strided logit per S x S tile: QK^T / S over the causal half.
double cost(const AttentionShape&, const EstimatorConfig& c) { return 1.0 / (2.0 * std::max(1, c.xattn.stride)); }

void estimate_device(const DeviceEstimate& d) {
  kernels::XAttnScoreParams p;
  p.in = peer_input(d);
  p.block = d.config->block;
  p.stride = d.config->xattn.stride;
  p.out = d.scores;
  p.stream = d.stream;
  check_launch(kernels::xattn_scores(p), "xattn_scores");
}

MethodInfo make() {
  MethodInfo m;
  m.name = "xattn";
  m.description = "XAttention: strided antidiagonal scores, per-row threshold tau";
  m.native = NativeRule::from_scores;
  m.options = {field_option("xattn", "stride", "xattn-stride", "XAttention antidiagonal stride",
                            [](EstimatorConfig& c) -> int& { return c.xattn.stride; })};
  m.validate = validate;
  m.set_coverage = [](EstimatorConfig& c, double gamma) { c.xattn.tau = gamma; };
  m.estimate_cpu = detail::estimate_xattn;
  m.estimate_gpu = [](const CudaLayer& layer, const EstimatorConfig& c) { return layer.xattn_scores(c); };
  m.gpu_in_analysis = true;
  m.estimate_device = estimate_device;
  m.device_scratch_bytes = [](const AttentionShape& s, const EstimatorConfig& c) {
    return s.q_heads * (static_cast<double>(s.seq_len) / c.xattn.stride + 1) * 4;  // strided row LSE
  };
  m.device_timed = "scores: xattn_scores (strided LSE pass + block-sum pass, mma.sync); select: native_select (tau) + CSR";
  m.renative = [](BlockScores& s, const EstimatorConfig& c) { s.native = detail::xattn_native(s, c.xattn.tau); };
  m.device_native = [](const EstimatorConfig& c) { return DeviceNative{DeviceNativeRule::forced_then_cover, c.xattn.tau}; };
  m.cost = cost;
  return m;
}

}  // namespace

const MethodInfo& xattn_method() {
  static const MethodInfo m = make();
  return m;
}

}  // namespace proxyattn::methods
