// Aggregates across (store, layer) units: merging a unit's values and the cross-store tables
// (recall_vs_sparsity, budget_summary, budget_heads, fidelity_summary).
#include <algorithm>
#include <iterator>

#include "analyze_internal.hpp"
#include "proxyattn/methods.hpp"

namespace proxyattn::analysis::detail {

namespace {

template <class V>
void append(std::vector<V>& to, std::vector<V>&& from) {
  to.insert(to.end(), std::make_move_iterator(from.begin()), std::make_move_iterator(from.end()));
}

void append(BudgetAgg& to, BudgetAgg&& from) {
  append(to.k_est, std::move(from.k_est));
  append(to.k_eff, std::move(from.k_eff));
  append(to.oracle, std::move(from.oracle));
  append(to.rel, std::move(from.rel));
  append(to.abs_rel, std::move(from.abs_rel));
  append(to.reached, std::move(from.reached));
  append(to.below, std::move(from.below));
  append(to.mass, std::move(from.mass));
  append(to.density, std::move(from.density));
}

// Appends one unit's aggregates; first-seen order of selections and budgets is kept.
}  // namespace

void merge_into(Aggregates& to, Aggregates&& from) {
  for (const std::string& id : from.sel_order) {
    SelAgg& src = from.sel.at(id);
    auto [it, fresh] = to.sel.try_emplace(id);
    SelAgg& dst = it->second;
    if (fresh) {
      dst.desc = src.desc;
      to.sel_order.push_back(id);
    }
    dst.stores.insert(src.stores.begin(), src.stores.end());
    dst.layers += src.layers;
    append(dst.density, std::move(src.density));
    append(dst.element_density, std::move(src.element_density));
    append(dst.mass, std::move(src.mass));
    append(dst.block, std::move(src.block));
    append(dst.error, std::move(src.error));
    append(dst.layer_density, std::move(src.layer_density));
  }
  for (const auto& key : from.budget_order) {
    if (std::find(to.budget_order.begin(), to.budget_order.end(), key) == to.budget_order.end())
      to.budget_order.push_back(key);
    append(to.budget[key], std::move(from.budget.at(key)));
  }
  for (auto& [key, b] : from.budget_heads) append(to.budget_heads[key], std::move(b));
  for (auto& [key, v] : from.fidelity)
    for (size_t x = 0; x < v.size(); ++x) append(to.fidelity[key][x], std::move(v[x]));
  for (auto& [store, m] : from.missed) append(to.missed[store], std::move(m));
  for (const auto& [store, nb] : from.store_blocks) to.store_blocks[store] = nb;
}

namespace {

// Report order of selections: methods as configured, then groups, budget kind, gamma, target.
std::vector<std::string> sorted_selections(const AnalyzeConfig& cfg, const Aggregates& A) {
  static const std::vector<std::string> budgets = [] {
    std::vector<std::string> b{"fixed", "native"};
    for (const BudgetKindInfo* k : all_budget_kinds()) b.push_back(k->name);
    return b;
  }();
  auto rank = [](const std::vector<std::string>& v, const std::string& x) {
    return static_cast<int>(std::find(v.begin(), v.end(), x) - v.begin());
  };
  auto num_key = [](double x) { return std::isfinite(x) ? x : -1.0; };
  std::vector<std::string> ids = A.sel_order;
  std::stable_sort(ids.begin(), ids.end(), [&](const std::string& a, const std::string& b) {
    const SelDesc& x = A.sel.at(a).desc;
    const SelDesc& y = A.sel.at(b).desc;
    return std::make_tuple(rank(cfg.methods, x.method), x.groups, rank(budgets, x.budget), x.rule, num_key(x.gamma),
                           num_key(x.target)) <
           std::make_tuple(rank(cfg.methods, y.method), y.groups, rank(budgets, y.budget), y.rule, num_key(y.gamma),
                           num_key(y.target));
  });
  return ids;
}

}  // namespace

void aggregate_tables(json& report, const AnalyzeConfig& cfg, const Aggregates& A) {
  if (!A.sel.empty()) {
    TableWriter t(report, "recall_vs_sparsity",
                  {"selection", "method", "groups", "budget", "rule", "gamma", "target_sparsity",
                   "stores", "layers", "density", "sparsity", "sparsity_min", "sparsity_max",
                   "element_density", "mass_recall_mean", "mass_recall_p5", "block_recall_mean",
                   "output_error_mean", "output_error_p95"});
    for (const std::string& id : sorted_selections(cfg, A)) {
      const SelAgg& a = A.sel.at(id);
      const SelDesc& d = a.desc;
      const Summary dn = summarize(a.density), ld = summarize(a.layer_density);
      const Summary ms = summarize(a.mass), es = summarize(a.error);
      t.add({id, d.method, d.groups, d.budget, d.rule, num(d.gamma), num(d.target),
             static_cast<int64_t>(a.stores.size()), a.layers, num(dn.mean), num(1.0 - dn.mean),
             num(1.0 - ld.max), num(1.0 - ld.min), num(mean_of(a.element_density)), num(ms.mean),
             num(ms.p5), num(mean_of(a.block)), num(es.mean), num(es.p95)});
    }
  }
  if (!A.budget.empty()) {
    TableWriter t(report, "budget_summary",
                  {"budget", "gamma", "heads", "k_est_mean", "k_effective_mean", "oracle_mean",
                   "rel_error_mean", "abs_rel_error_mean", "abs_rel_error_p95", "mass_reached_mean",
                   "rows_below_gamma_mean", "mass_recall_mean", "density_mean"});
    for (const auto& key : A.budget_order) {
      const BudgetAgg& b = A.budget.at(key);
      t.add({key.first, num(key.second), static_cast<int64_t>(b.k_est.size()), num(mean_of(b.k_est)),
             num(mean_of(b.k_eff)), num(mean_of(b.oracle)), num(mean_of(b.rel)), num(mean_of(b.abs_rel)),
             num(summarize(b.abs_rel).p95), num(mean_of(b.reached)), num(mean_of(b.below)),
             num(mean_of(b.mass)), num(mean_of(b.density))});
    }
    TableWriter th(report, "budget_heads",
                   {"store", "budget", "gamma", "head", "layers", "k_est_mean", "k_effective_mean",
                    "oracle_mean", "rel_error_mean", "abs_rel_error_mean", "mass_reached_mean",
                    "mass_recall_mean"});
    for (const auto& [key, b] : A.budget_heads) {
      const auto& [store, kind, gamma, head] = key;
      th.add({store, kind, num(gamma), head, static_cast<int64_t>(b.k_est.size()), num(mean_of(b.k_est)),
              num(mean_of(b.k_eff)), num(mean_of(b.oracle)), num(mean_of(b.rel)), num(mean_of(b.abs_rel)),
              num(mean_of(b.reached)), num(mean_of(b.mass))});
    }
  }
  if (!A.fidelity.empty()) {
    TableWriter t(report, "fidelity_summary",
                  {"groups", "gamma", "heads", "block_recall_mean", "block_recall_p5",
                   "mass_recall_mean", "mass_ratio_mean", "mass_ratio_p5"});
    for (const auto& [key, v] : A.fidelity) {
      const Summary br = summarize(v[0]), mr = summarize(v[2]);
      t.add({key.first, num(key.second), static_cast<int64_t>(v[0].size()), num(br.mean), num(br.p5),
             num(mean_of(v[1])), num(mr.mean), num(mr.p5)});
    }
  }
}

// The tables of the topics in `doc` (column lists in one place for the main report and every
// unit's private document).
}  // namespace proxyattn::analysis::detail
