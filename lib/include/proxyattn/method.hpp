#pragma once
// One call from Q/K to a BlockMask, so the apps stay thin:
//
//   MethodSpec spec;                      // estimator "proxy", budget "dynamic", defaults
//   spec.estimator = "xattn"; spec.budget = "native";
//   MethodResult r = run_method(q, k, spec);
//   r.mask / r.scores / r.budgets / r.estimate_seconds ...
#include <string>
#include <vector>

#include "proxyattn/attention.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/budget.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/select.hpp"

namespace proxyattn {

struct MethodSpec {
  std::string estimator = "proxy";  // estimator_names()
  // budget_names(), or "native": the estimator's own selection (Error if it has none).
  std::string budget = "dynamic";
  EstimatorConfig config;           // config.block is the block size of everything
  BudgetConfig budget_config;
  SelectOptions select;
};

struct MethodResult {
  BlockScores scores;
  Budgets budgets;   // "native": per_row_k = the native mask's row counts
  BlockMask mask;
  double estimate_seconds = 0, budget_seconds = 0, select_seconds = 0;
  double total_seconds() const { return estimate_seconds + budget_seconds + select_seconds; }
};

// oracle_mass: optional exact block mass (same block size) reused by the oracle estimator and
// budget instead of recomputing it; last_block_probs: optional [Hq * N] last-block token
// probabilities reused by the dynamic / token budgets (Budget::compute). Throws Error on
// unknown names / bad config / shapes.
MethodResult run_method(ConstView q, ConstView k, const MethodSpec& spec,
                        const BlockMass* oracle_mass = nullptr,
                        const std::vector<float>* last_block_probs = nullptr);

// Budgets whose per_row_k are the row counts of `mask` (per_head_k = mean over rows).
Budgets budgets_from_mask(const BlockMask& mask, std::string kind = "native");

}  // namespace proxyattn
