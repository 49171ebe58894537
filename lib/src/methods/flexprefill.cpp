// FlexPrefill (`flexprefill`): last-block vertical/slash statistics, a JSD decision per head
// between the vertical-slash and the query-aware pattern, coverage gamma. Its native selection
// depends on gamma through the estimate itself. The estimate: detail::estimate_flexprefill
// (estimator_peers.cpp). No GPU kernel.
#include "method_util.hpp"
#include "../estimator_util.hpp"

namespace proxyattn::methods {

namespace {

void validate(const EstimatorConfig& c, int) {
  const FlexPrefillConfig& f = c.flexprefill;
  require(coverage_ok(f.gamma), "flexprefill.gamma = " + num_str(f.gamma) + " must be in (0, 1]");
  require(f.tau >= 0.0, "flexprefill.tau = " + num_str(f.tau) + " must be >= 0");
  require(f.min_budget_tokens >= 0,
          "flexprefill.min_budget_tokens = " + std::to_string(f.min_budget_tokens) + " must be >= 0");
  require(f.last_q >= 1, "flexprefill.last_q = " + std::to_string(f.last_q) + " must be >= 1");
}

// The last last_q query rows against every key, plus the pooled scores.
double cost(const AttentionShape& s, const EstimatorConfig& c) {
  return std::min(1.0, c.flexprefill.last_q / std::max<double>(1.0, static_cast<double>(s.seq_len)));
}

MethodInfo make() {
  MethodInfo m;
  m.name = "flexprefill";
  m.description = "FlexPrefill: last-block vertical/slash, JSD pattern decision, query-aware union";
  m.native = NativeRule::estimate;
  m.options = {
      field_option("flexprefill", "tau", "flexprefill-tau", "FlexPrefill sqrt(JSD) threshold of the query-aware pattern",
                   [](EstimatorConfig& c) -> double& { return c.flexprefill.tau; }),
      field_option("flexprefill", "min_budget_tokens", "flexprefill-min-budget",
                   "FlexPrefill lower bound of the vertical/slash budgets (tokens)",
                   [](EstimatorConfig& c) -> int64_t& { return c.flexprefill.min_budget_tokens; }),
      field_option("flexprefill", "last_q", "flexprefill-last-q", "FlexPrefill estimation queries (the last ones)",
                   [](EstimatorConfig& c) -> int& { return c.flexprefill.last_q; })};
  m.validate = validate;
  m.set_coverage = [](EstimatorConfig& c, double gamma) { c.flexprefill.gamma = gamma; };
  m.estimate_cpu = detail::estimate_flexprefill;
  m.estimate_cpu_coverages = detail::estimate_flexprefill_gammas;
  m.cost = cost;
  return m;
}

}  // namespace

const MethodInfo& flexprefill_method() {
  static const MethodInfo m = make();
  return m;
}

}  // namespace proxyattn::methods
