// Moving one unit's aggregates between MPI ranks. CBOR keeps every double bit-exact (NaN
// included), so a merged multi-rank report equals the single-process one number for number.
#include "analyze_internal.hpp"

namespace proxyattn::analysis::detail {

namespace {

json budget_wire(const BudgetAgg& b) {
  return json::array({b.k_est, b.k_eff, b.oracle, b.rel, b.abs_rel, b.reached, b.below, b.mass, b.density});
}
BudgetAgg budget_unwire(const json& j) {
  BudgetAgg b;
  std::vector<double>* f[] = {&b.k_est, &b.k_eff, &b.oracle, &b.rel, &b.abs_rel, &b.reached, &b.below, &b.mass, &b.density};
  for (size_t i = 0; i < std::size(f); ++i) *f[i] = j.at(i).get<std::vector<double>>();
  return b;
}

}  // namespace

json aggregates_wire(const Aggregates& a) {
  json j;
  j["sel_order"] = a.sel_order;
  json sel = json::array();
  for (const auto& [id, s] : a.sel)
    sel.push_back(json::array({id, s.desc.method, s.desc.groups, s.desc.budget, s.desc.rule, s.desc.gamma,
                               s.desc.target, s.stores, s.layers, s.density, s.element_density, s.mass, s.block,
                               s.error, s.layer_density}));
  j["sel"] = sel;
  json order = json::array(), budget = json::array(), heads = json::array(), fid = json::array(),
       missed = json::array();
  for (const auto& [kind, g] : a.budget_order) order.push_back(json::array({kind, g}));
  for (const auto& [key, b] : a.budget) budget.push_back(json::array({key.first, key.second, budget_wire(b)}));
  for (const auto& [key, b] : a.budget_heads)
    heads.push_back(json::array({std::get<0>(key), std::get<1>(key), std::get<2>(key), std::get<3>(key), budget_wire(b)}));
  for (const auto& [key, v] : a.fidelity) fid.push_back(json::array({key.first, key.second, v[0], v[1], v[2]}));
  for (const auto& [store, list] : a.missed)
    for (const auto& m : list) missed.push_back(json::array({store, m.id, m.target, m.reached}));
  j["budget_order"] = order;
  j["budget"] = budget;
  j["budget_heads"] = heads;
  j["fidelity"] = fid;
  j["missed"] = missed;
  j["store_blocks"] = a.store_blocks;
  return j;
}

Aggregates aggregates_unwire(const json& j) {
  Aggregates a;
  a.sel_order = j.at("sel_order").get<std::vector<std::string>>();
  for (const json& e : j.at("sel")) {
    SelAgg s;
    s.desc.method = e.at(1).get<std::string>();
    s.desc.groups = e.at(2).get<int>();
    s.desc.budget = e.at(3).get<std::string>();
    s.desc.rule = e.at(4).get<std::string>();
    s.desc.gamma = e.at(5).is_null() ? kNaN : e.at(5).get<double>();
    s.desc.target = e.at(6).is_null() ? kNaN : e.at(6).get<double>();
    s.stores = e.at(7).get<std::set<std::string>>();
    s.layers = e.at(8).get<int>();
    s.density = e.at(9).get<std::vector<double>>();
    s.element_density = e.at(10).get<std::vector<double>>();
    s.mass = e.at(11).get<std::vector<double>>();
    s.block = e.at(12).get<std::vector<double>>();
    s.error = e.at(13).get<std::vector<double>>();
    s.layer_density = e.at(14).get<std::vector<double>>();
    a.sel.emplace(e.at(0).get<std::string>(), std::move(s));
  }
  for (const json& e : j.at("budget_order")) a.budget_order.emplace_back(e.at(0).get<std::string>(), e.at(1).get<double>());
  for (const json& e : j.at("budget"))
    a.budget.emplace(std::make_pair(e.at(0).get<std::string>(), e.at(1).get<double>()), budget_unwire(e.at(2)));
  for (const json& e : j.at("budget_heads"))
    a.budget_heads.emplace(std::make_tuple(e.at(0).get<std::string>(), e.at(1).get<std::string>(), e.at(2).get<double>(),
                                           e.at(3).get<int>()),
                           budget_unwire(e.at(4)));
  for (const json& e : j.at("fidelity"))
    a.fidelity.emplace(std::make_pair(e.at(0).get<int>(), e.at(1).get<double>()),
                       std::array<std::vector<double>, 3>{e.at(2).get<std::vector<double>>(),
                                                          e.at(3).get<std::vector<double>>(),
                                                          e.at(4).get<std::vector<double>>()});
  for (const json& e : j.at("missed"))
    a.missed[e.at(0).get<std::string>()].push_back({e.at(1).get<std::string>(), e.at(2).get<double>(), e.at(3).get<double>()});
  a.store_blocks = j.at("store_blocks").get<std::map<std::string, int>>();
  return a;
}

}  // namespace proxyattn::analysis::detail
