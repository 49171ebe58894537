#pragma once
// The accuracy sweep of proxyattn-eval: every operating point (full attention, each method at
// each fixed sparsity, each method at its own rule) runs the whole model over the evaluation
// set with that point's block-sparse attention in every layer (the first dense_layers dense):
// NIAH answers by greedy decoding with the KV cache, perplexity of the documents' last tokens,
// the densities each layer used. Points come from the method registry's traits (no method
// names here); masks are the analysis' selections (same estimators, budgets and density rules).
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval_set.hpp"
#include "proxyattn/budget.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/methods.hpp"
#include "proxyattn/model/model.hpp"

namespace proxyattn::eval {

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct SweepConfig {
  std::vector<std::string> methods;
  std::vector<double> sparsities;  // each in [0, 1)
  std::vector<double> gammas;      // each in (0, 1]; the largest (gamma_ref) drives the fixed-sparsity scores
  std::vector<int> groups;         // group counts of a grouped method (ProxyAttn); each divides Hq
  bool native = true;              // also each method's own rule at each gamma
  int dense_layers = 0;            // the first L layers keep full attention
  EstimatorConfig estimator;       // estimator.block is the block size
  BudgetConfig budget;             // k_min, mode (gamma set per point)
  double gamma_ref() const;
};

// One operating point. Ids are the analysis' selection ids (proxy/g1/fixed/s0.9,
// xattn/native/gamma0.9, proxy/g3/dynamic/gamma0.95, oracle/fixed/s0.5) so a sweep row and a
// proxyattn-analyze row of the same selection carry the same name; "full" is the baseline.
struct Point {
  std::string id = "full";
  const MethodInfo* method = nullptr;  // null: full attention
  int groups = 0;                      // grouped methods only
  std::string budget = "full";         // full | fixed | native | the method's default budget kind
  std::string rule;                    // fixed: the registry's auto_density rule
  double gamma = kNaN, target_sparsity = kNaN;
  bool full() const { return method == nullptr; }
};

// Checks the config against the registry and the model's query heads (Error naming the flag)
// and lists the points: full first, then per method its fixed sparsities and native points.
std::vector<Point> expand_points(const SweepConfig& c, int q_heads);

// The BlockMask of one layer at point p (std::nullopt: full attention). A selection that
// leaves a row empty (only a method whose fixed-density selections force no blocks: the
// oracle) gets that row's best block, counted in *filled_rows.
std::optional<BlockMask> point_mask(const Point& p, const SweepConfig& c, ConstView q, ConstView k,
                                    int64_t* filled_rows = nullptr);

struct SweepOptions {
  bool allow_overlength = false;
  bool quiet = false;
};

// Runs every point over the set and returns the report (analysis/report.hpp layout: tables
// points, niah, ppl, layers; notes).
nlohmann::json run_sweep(model::Model& m, const EvalSet& set, const SweepConfig& c, const std::vector<Point>& points,
                         const SweepOptions& o);

// report.md of a sweep report.
std::string render_sweep_markdown(const nlohmann::json& report);

}  // namespace proxyattn::eval
