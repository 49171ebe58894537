// ProxyAttn (`proxy`): g proxy heads (pooled Q/K of each group) score key blocks token by token
// (causal softmax max-pooled to blocks); every member head reads its group's scores. No native
// selection: a budget (dynamic by default) picks the blocks. ALGORITHMS.md "ProxyAttn".
#include <algorithm>

#include "method_util.hpp"
#include "../estimator_util.hpp"
#include "proxyattn/cuda_dispatch.hpp"

namespace proxyattn::methods {

namespace {

void validate(const EstimatorConfig& c, int q_heads) {
  const ProxyConfig& p = c.proxy;
  require(p.groups >= 1, "proxy.groups = " + std::to_string(p.groups) + " must be >= 1");
  if (q_heads > 0)
    require(q_heads % p.groups == 0, "proxy.groups = " + std::to_string(p.groups) + " does not divide the " +
                                         std::to_string(q_heads) + " query heads");
  require(p.query_stride >= 1, "proxy.query_stride = " + std::to_string(p.query_stride) + " must be >= 1");
}

BlockScores estimate_cpu(ConstView q, ConstView k, const EstimatorConfig& c) {
  const AttentionShape s = check_qkv(q, k);
  BlockScores out = detail::make_scores("proxy", s.q_heads, s.seq_len, c.block);
  const ProxyHeads ph = make_proxy_heads(q, k, c.proxy);
  const std::vector<float> gs = maxpool_block_scores(ph.q, ph.k, c.block, c.proxy.query_stride);
  const size_t per_head = static_cast<size_t>(out.num_blocks) * out.num_blocks;
  for (int h = 0; h < s.q_heads; ++h)
    std::copy_n(gs.begin() + ph.group_of_head[h] * per_head, per_head, out.score.begin() + h * per_head);
  out.group_of_head = ph.group_of_head;
  return out;
}

BlockScores estimate_gpu(const CudaLayer& layer, const EstimatorConfig& c) {
  return layer.proxy_scores(c, ProxyPrecision::exact);
}

// g proxy heads of Hq, QK^T only (half of attention's work), every s-th query row; the pooling
// reads Q and K once.
double cost(const AttentionShape& s, const EstimatorConfig& c) {
  const double g = std::max(1, c.proxy.groups), stride = std::max(1, c.proxy.query_stride);
  return g / (2.0 * std::max(1, s.q_heads) * stride) + 1.0 / std::max<double>(1.0, static_cast<double>(s.seq_len));
}

MethodInfo make() {
  MethodInfo m;
  m.name = "proxy";
  m.description = "ProxyAttn: proxy head per group (mean-pooled Q/K), token-level softmax max-pooled to blocks";
  m.native = NativeRule::none;
  m.set_groups = [](EstimatorConfig& c, int groups) { c.proxy.groups = groups; };
  m.equals_block_max = [](const EstimatorConfig& c, int q_heads) {
    return c.proxy.groups == q_heads && c.proxy.query_stride == 1;
  };
  m.auto_density = AutoDensity::scaled_dynamic;
  MethodOption pool;
  pool.key = "pool";
  pool.flag = "proxy-pool";
  pool.help = "ProxyAttn proxy head: mean or max_norm";
  pool.get = [](const EstimatorConfig& c) { return nlohmann::json(std::string(proxy_pool_name(c.proxy.pool))); };
  pool.set = [](EstimatorConfig& c, const nlohmann::json& v) {
    if (!v.is_string()) throw Error("estimator config: proxy.pool: expected \"mean\" or \"max_norm\", got " + v.dump());
    c.proxy.pool = parse_proxy_pool(v.get<std::string>());
  };
  m.options = {pool, field_option("proxy", "query_stride", "query-stride", "ProxyAttn query stride s",
                                  [](EstimatorConfig& c) -> int& { return c.proxy.query_stride; })};
  m.validate = validate;
  m.estimate_cpu = estimate_cpu;
  m.estimate_gpu = estimate_gpu;
  m.gpu_in_analysis = true;
  m.cost = cost;
  return m;
}

}  // namespace

const MethodInfo& proxy_method() {
  static const MethodInfo m = make();
  return m;
}

}  // namespace proxyattn::methods
