// The report's per-unit tables: their columns in one place for the main report and every
// unit's private document.
#include "analyze_internal.hpp"

namespace proxyattn::analysis::detail {

namespace {
std::string pct_name(double f) { return short_num(f * 100.0) + "pct"; }
}  // namespace

// The tables of the topics in `doc` (column lists in one place for the main report and every
// unit's private document).
Tables make_tables(json& doc, const AnalyzeConfig& cfg, const Topics& topics) {
  Tables T;
  if (topics.similarity) {
    std::vector<std::string> pc{"store", "layer", "head_a", "head_b", "same_kv"};
    for (double f : cfg.topk_fractions) pc.push_back("topk_overlap_" + pct_name(f));
    pc.insert(pc.end(), {"cosine", "spearman"});
    T.sim_pairs.emplace(doc, "similarity_pairs", pc);
    std::vector<std::string> lc{"store", "layer", "pairs", "rows_used"};
    for (double f : cfg.topk_fractions) {
      lc.push_back("topk_overlap_" + pct_name(f) + "_mean");
      lc.push_back("topk_overlap_" + pct_name(f) + "_min");
    }
    const std::string pl = pct_name(cfg.topk_fractions.back());
    lc.insert(lc.end(), {"cosine_mean", "cosine_min", "spearman_mean", "spearman_min",
                         "topk_overlap_" + pl + "_same_kv", "topk_overlap_" + pl + "_cross_kv"});
    T.sim_layers.emplace(doc, "similarity_layers", lc);
    T.head_budget.emplace(doc, "head_budget",
                          std::vector<std::string>{"store", "layer", "head", "gamma", "budget_mean",
                                                   "budget_min", "budget_p5", "budget_p25", "budget_median",
                                                   "budget_p75", "budget_p95", "budget_max",
                                                   "budget_last_row", "density", "sparsity"});
    T.head_budget_layers.emplace(doc, "head_budget_layers",
                                 std::vector<std::string>{"store", "layer", "gamma", "budget_mean", "budget_std",
                                                          "budget_cv", "budget_min", "budget_max",
                                                          "sparsity_mean", "sparsity_min", "sparsity_max"});
    T.fidelity.emplace(doc, "proxy_fidelity",
                       std::vector<std::string>{"store", "layer", "groups", "gamma", "head", "group",
                                                "block_recall", "mass_recall", "mass_ratio"});
  }
  if (topics.recall || topics.budget) {
    T.selections.emplace(doc, "selections",
                         std::vector<std::string>{"store", "layer", "selection", "method", "groups", "budget",
                                                  "rule", "gamma", "target_sparsity", "head", "selected_blocks",
                                                  "density", "element_density", "sparsity", "mass_recall",
                                                  "block_recall", "output_error"});
    T.selection_summary.emplace(
        doc, "selection_summary",
        std::vector<std::string>{"store", "layer", "selection", "method", "groups", "budget", "rule", "gamma",
                                 "target_sparsity", "density", "element_density", "sparsity",
                                 "mass_recall_mean", "mass_recall_p5", "mass_recall_min", "block_recall_mean",
                                 "output_error_mean", "output_error_max", "empty_rows"});
  }
  if (topics.budget)
    T.budget_accuracy.emplace(doc, "budget_accuracy",
                              std::vector<std::string>{"store", "layer", "budget", "gamma", "head", "k_est",
                                                       "k_effective", "oracle_mean", "oracle_last_row",
                                                       "rel_error", "abs_rel_error", "mass_reached",
                                                       "rows_below_gamma", "mass_recall", "density"});

  return T;
}

}  // namespace proxyattn::analysis::detail
