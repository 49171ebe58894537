// MInference vertical-slash (`vslash`), mapped to blocks: the last queries pick the top columns
// and diagonals; native selection: every block a kept column or diagonal crosses (independent
// of gamma). The estimate: detail::estimate_vslash (estimator_peers.cpp).
#include "method_util.hpp"
#include "../estimator_util.hpp"
#include "device_util.hpp"
#include "proxyattn/cuda_dispatch.hpp"

namespace proxyattn::methods {

namespace {

void validate(const EstimatorConfig& c, int) {
  const VSlashConfig& v = c.vslash;
  require(v.last_q >= 1, "vslash.last_q = " + std::to_string(v.last_q) + " must be >= 1");
  require(v.vertical >= 0, "vslash.vertical = " + std::to_string(v.vertical) + " must be >= 0");
  require(v.slash >= 0, "vslash.slash = " + std::to_string(v.slash) + " must be >= 0");
  require(v.sink_columns >= 0, "vslash.sink_columns = " + std::to_string(v.sink_columns) + " must be >= 0");
  require(v.local_diagonals >= 0, "vslash.local_diagonals = " + std::to_string(v.local_diagonals) + " must be >= 0");
  require(v.vertical_fraction >= 0 && v.vertical_fraction <= 1,
          "vslash.vertical_fraction = " + num_str(v.vertical_fraction) + " must be in [0, 1] (0: use vslash.vertical)");
  require(v.slash_fraction >= 0 && v.slash_fraction <= 1,
          "vslash.slash_fraction = " + num_str(v.slash_fraction) + " must be in [0, 1] (0: use vslash.slash)");
}

double cost(const AttentionShape& s, const EstimatorConfig& c) {
  return std::min(1.0, c.vslash.last_q / std::max<double>(1.0, static_cast<double>(s.seq_len)));
}

void estimate_device(const DeviceEstimate& d) {
  const VSlashConfig& v = d.config->vslash;
  kernels::VSlashParams p;
  p.in = peer_input(d);
  p.block = d.config->block;
  p.last_q = v.last_q;
  p.vertical = vslash_vertical(v, d.seq_len);
  p.slash = vslash_slash(v, d.seq_len);
  p.sink_columns = v.sink_columns;
  p.local_diagonals = v.local_diagonals;
  p.out = d.scores;
  p.bitmap = d.bitmap;
  p.row_counts = d.row_counts;
  p.stream = d.stream;
  check_launch(kernels::vslash_scores(p), "vslash_scores");
}

MethodInfo make() {
  MethodInfo m;
  m.name = "vslash";
  m.description = "MInference vertical-slash from the last queries, mapped to blocks";
  m.native = NativeRule::fixed;
  m.options = {
      field_option("vslash", "last_q", "vslash-last-q", "vertical-slash estimation queries (the last ones)",
                   [](EstimatorConfig& c) -> int& { return c.vslash.last_q; }),
      field_option("vslash", "vertical", "vslash-vertical", "vertical-slash kept columns (tokens)",
                   [](EstimatorConfig& c) -> int64_t& { return c.vslash.vertical; }),
      field_option("vslash", "slash", "vslash-slash", "vertical-slash kept diagonals (tokens)",
                   [](EstimatorConfig& c) -> int64_t& { return c.vslash.slash; }),
      field_option("vslash", "sink_columns", "vslash-sink-columns", "vertical-slash forced first columns",
                   [](EstimatorConfig& c) -> int& { return c.vslash.sink_columns; }),
      field_option("vslash", "local_diagonals", "vslash-local-diagonals", "vertical-slash forced local diagonals",
                   [](EstimatorConfig& c) -> int& { return c.vslash.local_diagonals; }),
      field_option("vslash", "vertical_fraction", "vslash-vertical-fraction",
                   "vertical-slash kept columns as a fraction of N (0: the token count --vslash-vertical)",
                   [](EstimatorConfig& c) -> double& { return c.vslash.vertical_fraction; }),
      field_option("vslash", "slash_fraction", "vslash-slash-fraction",
                   "vertical-slash kept diagonals as a fraction of N (0: the token count --vslash-slash)",
                   [](EstimatorConfig& c) -> double& { return c.vslash.slash_fraction; })};
  m.validate = validate;
  m.estimate_cpu = detail::estimate_vslash;
  m.estimate_gpu = [](const CudaLayer& layer, const EstimatorConfig& c) { return layer.vslash_scores(c); };
  // The kernel's fp16 column / diagonal sums reorder near-equal columns: block recall off by up
  // to 0.01 at fixed densities; its cost is the last 64 queries only.
  m.gpu_in_analysis = false;
  m.estimate_device = estimate_device;
  m.device_native_bitmap = true;
  m.device_scratch_bytes = [](const AttentionShape& s, const EstimatorConfig& c) {
    const double n = static_cast<double>(s.seq_len), L = std::min<double>(c.vslash.last_q, n);
    const double nb = std::ceil(n / c.block);
    return s.q_heads * n * (4 + 4 + 4 + 8 + 4) + s.q_heads * (n / 128 + 1) * (L + 127) * 4 + s.q_heads * nb * 9;
  };
  m.device_timed = "scores: vslash_scores (last-row LSE + statistics, top-k radix selects, block scores and native "
                   "bitmap); select: CSR of the bitmap";
  m.gpu_note = "vslash on the CPU (last 64 queries only; the GPU's fp16 column sums reorder near-equal columns)";
  m.cost = cost;
  m.config_note = [](const EstimatorConfig& c) -> std::string {
    const VSlashConfig& v = c.vslash;
    if (v.vertical_fraction > 0 || v.slash_fraction > 0)
      return "vslash: length-relative operating point: " +
             (v.vertical_fraction > 0 ? "vertical = ceil(" + num_str(v.vertical_fraction) + " N)"
                                      : "vertical = " + std::to_string(v.vertical) + " tokens") +
             ", " +
             (v.slash_fraction > 0 ? "slash = ceil(" + num_str(v.slash_fraction) + " N)"
                                   : "slash = " + std::to_string(v.slash) + " tokens");
    return "vslash: MInference's published operating point, " + std::to_string(v.vertical) + " vertical / " +
           std::to_string(v.slash) + " slash tokens (tuned at 128K; it keeps almost every block at 8K-16K: "
           "--vslash-vertical-fraction / --vslash-slash-fraction keep a share of N instead)";
  };
  return m;
}

}  // namespace

const MethodInfo& vslash_method() {
  static const MethodInfo m = make();
  return m;
}

}  // namespace proxyattn::methods
