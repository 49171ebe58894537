// The accuracy sweep (sweep.hpp): points from the registry, one mask per layer per point from
// the analysis' selection rules, the whole model per case, the report.
#include "sweep.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "proxyattn/analysis/metrics.hpp"
#include "proxyattn/analysis/report.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/method.hpp"
#include "proxyattn/progress.hpp"
#include "proxyattn/select.hpp"

namespace proxyattn::eval {

namespace {

using nlohmann::json;
using analysis::num;

std::string short_num(double x) { return fmt::format("{:g}", x); }

// The analysis' selection id (analyze_internal.hpp SelDesc::id) for the same selection.
std::string point_id(const Point& p) {
  std::string s = p.method->name;
  if (p.groups > 0) s += "/g" + std::to_string(p.groups);
  s += "/" + p.budget;
  if (std::isfinite(p.gamma)) s += "/gamma" + short_num(p.gamma);
  if (std::isfinite(p.target_sparsity)) s += "/s" + short_num(p.target_sparsity);
  return s;
}

// The estimator config of a point: block, groups, and the coverage its scores are taken at
// (the point's gamma for a native point, gamma_ref for a fixed sparsity, as the analysis does).
EstimatorConfig config_for(const Point& p, const SweepConfig& c) {
  EstimatorConfig e = c.estimator;
  if (p.method->set_groups) p.method->set_groups(e, p.groups);
  if (p.method->set_coverage) p.method->set_coverage(e, std::isfinite(p.gamma) ? p.gamma : c.gamma_ref());
  return e;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double mean_of(const std::vector<double>& v) {
  if (v.empty()) return kNaN;
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

// What one case's forward used: per-layer densities (all layers) and their means over the
// sparse layers (global layers past dense_layers: a sliding-window layer runs its own window,
// not the method's selection, and is not counted).
struct CaseDensity {
  std::vector<model::BlockMaskAttention::LayerDensity> layers;
  double block = kNaN, element = kNaN;
};

CaseDensity densities_of(const model::BlockMaskAttention& policy, int n_layers, int dense_layers) {
  CaseDensity d;
  d.layers = policy.densities();
  // Only the prefill runs the policy (decoding attends densely through the cache).
  if (static_cast<int>(d.layers.size()) != n_layers)
    throw Error("internal: attention policy ran " + std::to_string(d.layers.size()) + " times for " +
                std::to_string(n_layers) + " layers");
  std::vector<double> b, e;
  for (const auto& l : d.layers)
    if (l.layer >= dense_layers && !l.windowed()) {
      b.push_back(l.block_density);
      e.push_back(l.element_density);
    }
  d.block = mean_of(b);
  d.element = mean_of(e);
  return d;
}

std::string ids_text(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t t : ids) {
    if (!s.empty()) s += ' ';
    s += std::to_string(t);
  }
  return s;
}

// A query must attend to some key: a row the selection leaves empty (the layer-global oracle at
// a high sparsity forces no blocks) keeps its single best block by `rank` (NaN lowest, ties to
// the lower block). Returns how many rows were filled.
template <class Rank>
int64_t fill_empty_rows(BlockMask& mask, const Rank& rank) {
  const int H = mask.heads(), nb = mask.num_blocks();
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(H) * nb);
  int64_t filled = 0;
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < nb; ++i) {
      const auto r = mask.row(h, i);
      auto& out = rows[static_cast<size_t>(h) * nb + i];
      out.assign(r.begin(), r.end());
      if (!out.empty()) continue;
      const float* x = rank.row(h, i);
      int best = 0;
      for (int j = 1; j <= i; ++j)
        if (std::isnan(x[best]) ? !std::isnan(x[j]) : x[j] > x[best]) best = j;
      out.push_back(best);
      ++filled;
    }
  if (filled) mask = BlockMask::from_rows(H, mask.seq_len(), mask.block(), rows);
  return filled;
}

}  // namespace

double SweepConfig::gamma_ref() const { return *std::max_element(gammas.begin(), gammas.end()); }

std::vector<Point> expand_points(const SweepConfig& c, int q_heads) {
  if (c.methods.empty()) throw Error("--methods: empty list (valid: " + method_name_list() + ")");
  if (c.gammas.empty()) throw Error("--gamma: empty list");
  for (double g : c.gammas)
    if (!(g > 0.0 && g <= 1.0)) throw Error("--gamma: " + short_num(g) + " outside (0, 1]");
  for (double s : c.sparsities)
    if (!(s >= 0.0 && s < 1.0)) throw Error("--sparsity: " + short_num(s) + " outside [0, 1)");
  if (c.sparsities.empty() && !c.native) throw Error("--sparsity: empty list and --no-native: no sparse point to run");
  if (c.groups.empty()) throw Error("--groups: empty list");
  if (c.dense_layers < 0) throw Error("--dense-layers: must be >= 0");
  validate_block_size(c.estimator.block);
  try {
    validate_budget_config(c.budget);
  } catch (const Error& e) {
    throw Error(std::string("budget: ") + e.what());
  }
  std::vector<Point> out(1);  // full attention first: the baseline every row is compared with
  std::set<std::string> seen{"full"};
  for (const std::string& name : c.methods) {
    const MethodInfo* m = nullptr;
    try {
      m = &find_method(name);
    } catch (const Error& e) {
      throw Error(std::string("--methods: ") + e.what());
    }
    const std::vector<int> groups = m->grouped() ? c.groups : std::vector<int>{0};
    for (int g : groups) {
      Point base;
      base.method = m;
      base.groups = g;
      // The registry refuses what it cannot run (groups not dividing Hq, bad knobs) before any work.
      try {
        if (g < 1 && m->grouped()) throw Error("group count " + std::to_string(g) + " must be >= 1");
        validate_estimator_config(config_for(base, c), q_heads, m->name);
      } catch (const Error& e) {
        throw Error((m->grouped() ? "--groups " + std::to_string(g) + ": " : "--methods " + m->name + ": ") + e.what());
      }
      std::vector<Point> mine;
      for (double s : c.sparsities) {
        Point p = base;
        p.budget = "fixed";
        p.rule = auto_density_name(m->auto_density);
        p.target_sparsity = s;
        mine.push_back(p);
      }
      if (c.native) {
        // The method's own operating point: its native rule, or the budget it runs with by
        // default (ProxyAttn's dynamic budget); the exact mass' own selection is the oracle's
        // per-row top-k reaching gamma, as in the analysis.
        Point p = base;
        p.budget = m->exact_mass ? "native" : default_budget(*m);
        // Coverage-independent rules (vslash) have one native point; the others one per gamma.
        const bool by_gamma = m->set_coverage != nullptr || p.budget != "native" || m->exact_mass;
        for (double gamma : by_gamma ? c.gammas : std::vector<double>{kNaN}) {
          p.gamma = gamma;
          mine.push_back(p);
        }
      }
      for (Point& p : mine) {
        p.id = point_id(p);
        if (seen.insert(p.id).second) out.push_back(p);
      }
    }
  }
  return out;
}

std::optional<BlockMask> point_mask(const Point& p, const SweepConfig& c, ConstView q, ConstView k,
                                    int64_t* filled_rows) {
  if (p.full()) return std::nullopt;
  const MethodInfo& m = *p.method;
  const EstimatorConfig e = config_for(p, c);
  const int block = c.estimator.block;
  if (p.budget == "fixed") {
    // A fixed density the way proxyattn-analyze reaches it with --density-rule auto: the
    // registry says which rule (analysis::auto_density_mask). The model cannot take a query
    // row without keys: a row the rule left empty gets its best block (counted).
    const double density = 1.0 - p.target_sparsity;
    std::optional<BlockScores> sc;
    std::optional<Budgets> dyn;
    std::optional<BlockMass> mass;
    // The layer_global rule reads only the exact mass: no estimate is made for it.
    if (m.auto_density != AutoDensity::layer_global) sc = m.estimate(q, k, e);
    const BlockScores empty;
    BlockMask mask = analysis::auto_density_mask(
        m, sc ? *sc : empty, density,
        [&]() -> const Budgets& {
          BudgetConfig bc = c.budget;
          bc.gamma = c.gamma_ref();
          return dyn.emplace(make_budget("dynamic")->compute(q, k, *sc, bc));
        },
        [&]() -> const BlockMass& { return mass.emplace(block_mass_cpu(q, k, block)); });
    const int64_t n = mass ? fill_empty_rows(mask, *mass)
                           : (m.forced_blocks ? 0 : fill_empty_rows(mask, *sc));
    if (filled_rows) *filled_rows += n;
    return mask;
  }
  if (m.exact_mass) return analysis::oracle_gamma_mask(block_mass_cpu(q, k, block), p.gamma);
  MethodSpec spec;
  spec.estimator = m.name;
  spec.budget = p.budget;
  spec.config = e;
  spec.budget_config = c.budget;
  spec.budget_config.gamma = std::isfinite(p.gamma) ? p.gamma : c.gamma_ref();
  return run_method(q, k, spec).mask;
}

json run_sweep(model::Model& mdl, const EvalSet& set, const SweepConfig& c, const std::vector<Point>& points,
               const SweepOptions& o) {
  if (points.empty() || !points.front().full()) throw Error("internal: the sweep's first point must be full attention");
  const auto t_all = std::chrono::steady_clock::now();
  const model::ModelConfig& mc = mdl.config();
  const int L = mc.n_layers;
  int sparse_layers = 0;
  for (int l = c.dense_layers; l < L; ++l) sparse_layers += mc.window(l) == 0;
  if (sparse_layers == 0)
    throw Error("--dense-layers " + std::to_string(c.dense_layers) + ": leaves no sparse layer (the model has " +
                std::to_string(L) + " layers, " + std::to_string(mc.global_layers()) + " of them global)");

  json report = analysis::report_skeleton("proxyattn-eval", "sweep");
  report["device"]["kind"] = std::string(model::backend_name(mdl.backend()));
  report["device"]["threads"] = cpu_threads();
  json methods_cfg = json::object();
  std::set<std::string> notes;
  for (const Point& p : points)
    if (!p.full()) {
      const EstimatorConfig e = config_for(p, c);
      methods_cfg[p.method->name] = p.method->config_json(e);
      if (p.method->config_note) {
        const std::string n = p.method->config_note(e);
        if (!n.empty()) notes.insert(n);
      }
    }
  report["config"] = {{"methods", c.methods},
                      {"sparsity", c.sparsities},
                      {"gamma", c.gammas},
                      {"gamma_ref", c.gamma_ref()},
                      {"groups", c.groups},
                      {"native", c.native},
                      {"block", c.estimator.block},
                      {"dense_layers", c.dense_layers},
                      {"density_rule", "auto"},
                      {"k_min", c.budget.k_min},
                      {"budget_mode", c.budget.mode == BudgetMode::constant ? "constant" : "proportional"},
                      {"estimator", methods_cfg},
                      {"points", json::array()}};
  for (const Point& p : points) report["config"]["points"].push_back(p.id);
  std::set<int64_t> lengths;
  for (const auto& cs : set.niah) lengths.insert(cs.length);
  json windows = json::array();
  for (int l = 0; l < L; ++l) windows.push_back(mc.window(l));
  report["model"] = {{"identity", set.model.to_json()},
                     {"layers", L},
                     {"global_layers", mc.global_layers()},
                     {"layer_window", windows},
                     {"q_heads", mc.n_head},
                     {"kv_heads", mc.n_head_kv},
                     {"head_dim", mc.head_dim}};
  report["eval_set"] = {{"path", set.path},
                        {"niah_cases", set.niah.size()},
                        {"niah_lengths", lengths},
                        {"ppl_documents", set.ppl.size()}};

  analysis::TableWriter t_points(report, "points",
                                 {"point", "method", "groups", "budget", "rule", "gamma", "target_sparsity",
                                  "block_density", "element_density", "sparsity", "niah_cases", "niah_correct",
                                  "niah_accuracy", "niah_kept", "ppl", "delta_ppl", "delta_ppl_pct", "nll_mean",
                                  "seconds"});
  analysis::TableWriter t_niah(report, "niah",
                               {"point", "case", "length", "depth", "needle_position", "correct", "full_correct",
                                "block_density", "element_density", "generated", "seconds"});
  analysis::TableWriter t_ppl(report, "ppl",
                              {"point", "document", "tokens", "scored", "ppl", "delta_ppl", "nll_mean",
                               "block_density", "element_density", "seconds"});
  analysis::TableWriter t_layers(report, "layers",
                                 {"point", "layer", "attention", "window", "dense", "block_density_mean",
                                  "block_density_min", "block_density_max", "element_density_mean"});

  Progress prog("sweep", static_cast<int64_t>(points.size() * (set.niah.size() + set.ppl.size())), o.quiet);
  std::vector<bool> full_correct(set.niah.size(), false);
  std::vector<double> full_doc_ppl(set.ppl.size(), kNaN);
  double full_ppl = kNaN;
  std::vector<int32_t> stop = set.stop_ids;

  for (const Point& p : points) {
    prog.set_label(p.id);
    const auto t_point = std::chrono::steady_clock::now();
    std::vector<int> dense;
    for (int l = 0; l < c.dense_layers; ++l) dense.push_back(l);
    int64_t filled_rows = 0;
    model::BlockMaskAttention policy(
        [&p, &c, &filled_rows](int, ConstView q, ConstView k) { return point_mask(p, c, q, k, &filled_rows); }, dense);
    std::vector<std::vector<double>> layer_b(L), layer_e(L);
    std::vector<double> case_b, case_e;
    std::map<int64_t, std::vector<double>> b_by_length;
    auto record = [&](const CaseDensity& d, int64_t length) {
      for (const auto& l : d.layers) {
        layer_b[l.layer].push_back(l.block_density);
        layer_e[l.layer].push_back(l.element_density);
      }
      case_b.push_back(d.block);
      case_e.push_back(d.element);
      b_by_length[length].push_back(d.block);
    };

    int correct = 0, kept = 0, full_right = 0;
    for (size_t i = 0; i < set.niah.size(); ++i) {
      const NiahCase& cs = set.niah[i];
      const auto t0 = std::chrono::steady_clock::now();
      policy.clear();
      const std::vector<int32_t> gen = mdl.generate(cs.tokens, cs.max_new, stop, &policy, o.allow_overlength);
      const CaseDensity d = densities_of(policy, L, c.dense_layers);
      record(d, cs.length);
      const bool ok = contains_run(gen, cs.answer_ids);
      if (p.full()) full_correct[i] = ok;
      correct += ok;
      if (full_correct[i]) {
        ++full_right;
        kept += ok;
      }
      t_niah.add({p.id, cs.id, cs.length, num(cs.depth), cs.needle_position, ok ? 1 : 0, full_correct[i] ? 1 : 0,
                  num(d.block), num(d.element), ids_text(gen), num(seconds_since(t0))});
      prog.tick();
    }

    double nll_sum = 0;
    int64_t nll_count = 0;
    for (size_t i = 0; i < set.ppl.size(); ++i) {
      const PplDocument& doc = set.ppl[i];
      const auto t0 = std::chrono::steady_clock::now();
      policy.clear();
      model::ForwardOptions fo;
      const int64_t n = static_cast<int64_t>(doc.tokens.size());
      fo.nll_begin = n - 1 - doc.score_last;
      fo.attention = &policy;
      fo.allow_overlength = o.allow_overlength;
      const model::ForwardResult r = mdl.forward(doc.tokens, fo);
      const CaseDensity d = densities_of(policy, L, c.dense_layers);
      record(d, n);
      double s = 0;
      for (double x : r.nll) s += x;
      nll_sum += s;
      nll_count += static_cast<int64_t>(r.nll.size());
      const double nll_mean = s / static_cast<double>(r.nll.size());
      const double ppl = std::exp(nll_mean);
      if (p.full()) full_doc_ppl[i] = ppl;
      t_ppl.add({p.id, doc.id, n, static_cast<int64_t>(r.nll.size()), num(ppl), num(ppl - full_doc_ppl[i]),
                 num(nll_mean), num(d.block), num(d.element), num(seconds_since(t0))});
      prog.tick();
    }

    const double nll_mean = nll_count ? nll_sum / static_cast<double>(nll_count) : kNaN;
    const double ppl = std::exp(nll_mean);
    if (p.full()) full_ppl = ppl;
    const double bd = mean_of(case_b);
    const int n_niah = static_cast<int>(set.niah.size());
    t_points.add({p.id, p.full() ? "full" : p.method->name, p.groups, p.budget, p.rule, num(p.gamma),
                  num(p.target_sparsity), num(bd), num(mean_of(case_e)), num(1.0 - bd), n_niah, correct,
                  num(n_niah ? static_cast<double>(correct) / n_niah : kNaN),
                  num(full_right ? static_cast<double>(kept) / full_right : kNaN), num(ppl), num(ppl - full_ppl),
                  num(100.0 * (ppl - full_ppl) / full_ppl), num(nll_mean), num(seconds_since(t_point))});
    for (int l = 0; l < L; ++l) {
      const auto& b = layer_b[l];
      if (b.empty()) continue;
      const int w = mc.window(l);
      // A sliding layer has no block density of a method: nulls, and the element density of its band.
      t_layers.add({p.id, l, w > 0 ? "sliding" : "global", w, l < c.dense_layers ? 1 : 0, w > 0 ? num(kNaN) : num(mean_of(b)),
                    w > 0 ? num(kNaN) : num(*std::min_element(b.begin(), b.end())),
                    w > 0 ? num(kNaN) : num(*std::max_element(b.begin(), b.end())), num(mean_of(layer_e[l]))});
    }
    if (filled_rows)
      notes.insert(fmt::format("{}: {} (head, query block) rows left empty by the selection kept their best block "
                               "(a query must attend to some key)", p.id, filled_rows));
    if (std::isfinite(p.target_sparsity))
      for (const auto& [len, v] : b_by_length) {
        const double got = 1.0 - mean_of(v);
        if (std::abs(got - p.target_sparsity) > 0.01)
          notes.insert(fmt::format("{}: sparsity {:.3f} at {} tokens, not the target {} (block {}: {})", p.id, got, len,
                                   short_num(p.target_sparsity), c.estimator.block,
                                   got > p.target_sparsity ? "the selection overshoots"
                                   : p.method->forced_blocks ? "the forced sink and diagonal blocks set a floor on the density"
                                                             : "rows left empty keep their best block"));
      }
  }
  prog.done();

  if (mc.global_layers() < L)
    notes.insert(fmt::format("{} of the {} layers are sliding-window (local) layers: they run their exact window in every "
                             "point (the methods replace the {} global layers' attention only); densities and sparsity "
                             "are means over the global layers, the layers table lists the local ones with their "
                             "window's element density",
                             L - mc.global_layers(), L, mc.global_layers()));
  for (size_t i = 0; i < set.niah.size(); ++i)
    if (!full_correct[i])
      notes.insert("full attention (the baseline) fails NIAH case " + set.niah[i].id +
                   ": the dense model itself does not retrieve this needle, so no sparse point is expected to");
  report["notes"] = json::array();
  for (const auto& n : notes) report["notes"].push_back(n);
  report["timing"]["total_seconds"] = seconds_since(t_all);
  return report;
}

std::string render_sweep_markdown(const json& report) {
  std::ostringstream o;
  const json& cfg = report.at("config");
  const json& mdl = report.at("model");
  const json& es = report.at("eval_set");
  o << "# proxyattn-eval sweep\n\n";
  o << "Created " << report.value("created_utc", std::string("?")) << " by version " << report.value("version", std::string("?"))
    << " (git " << report.value("git_sha", std::string("?")) << "), back end "
    << report["device"].value("kind", std::string("?")) << ", "
    << fmt::format("{:.1f}", report["timing"].value("total_seconds", 0.0)) << " s. Model "
    << mdl["identity"].value("file", std::string("?")) << " (" << mdl.value("layers", 0) << " layers, "
    << mdl.value("q_heads", 0) << " q / " << mdl.value("kv_heads", 0) << " kv heads); " << es.value("niah_cases", 0)
    << " NIAH cases, " << es.value("ppl_documents", 0) << " perplexity documents; block "
    << cfg.value("block", 0) << ", first " << cfg.value("dense_layers", 0)
    << " layers dense. Every number comes from report.json.\n\n";

  const auto cell = [](const json& v, const char* f) -> std::string {
    if (v.is_null()) return "–";
    if (v.is_string()) return v.get<std::string>();
    return fmt::format(fmt::runtime(f), v.get<double>());
  };
  const json& pt = report["tables"]["points"];
  const auto col = [&](const json& table, const std::string& name) {
    const json& cols = table.at("columns");
    return static_cast<size_t>(std::find(cols.begin(), cols.end(), name) - cols.begin());
  };
  o << "## Accuracy and perplexity per operating point\n\n"
    << "Sparsity = 1 − block density, the mean over cases of the mean over sparse layers (global layers only: "
       "a sliding-window layer always runs its exact window). NIAH kept = "
       "the share of the cases full attention answers that this point answers too. Δppl is against "
       "full attention on the same tokens.\n\n"
    << "| point | sparsity | element density | NIAH | NIAH kept | ppl | Δppl | Δppl % | seconds |\n"
    << "|---|---|---|---|---|---|---|---|---|\n";
  for (const json& r : pt.at("rows")) {
    o << "| " << r[col(pt, "point")].get<std::string>() << " | " << cell(r[col(pt, "sparsity")], "{:.3f}") << " | "
      << cell(r[col(pt, "element_density")], "{:.3f}") << " | " << r[col(pt, "niah_correct")].get<int>() << "/"
      << r[col(pt, "niah_cases")].get<int>() << " | " << cell(r[col(pt, "niah_kept")], "{:.2f}") << " | "
      << cell(r[col(pt, "ppl")], "{:.3f}") << " | " << cell(r[col(pt, "delta_ppl")], "{:+.3f}") << " | "
      << cell(r[col(pt, "delta_ppl_pct")], "{:+.2f}") << " | " << cell(r[col(pt, "seconds")], "{:.0f}") << " |\n";
  }
  o << "\n";

  const json& nt = report["tables"]["niah"];
  if (!nt.at("rows").empty()) {
    o << "## Full attention (the baseline) per NIAH case\n\n| case | length | depth | correct | generated ids |\n|---|---|---|---|---|\n";
    for (const json& r : nt.at("rows"))
      if (r[col(nt, "point")] == "full")
        o << "| " << r[col(nt, "case")].get<std::string>() << " | " << r[col(nt, "length")].get<int64_t>() << " | "
          << cell(r[col(nt, "depth")], "{:g}") << " | " << (r[col(nt, "correct")].get<int>() ? "yes" : "**no**")
          << " | " << r[col(nt, "generated")].get<std::string>() << " |\n";
    o << "\n";
  }
  if (!report["notes"].empty()) {
    o << "## Notes\n\n";
    for (const json& n : report["notes"]) o << "- " << n.get<std::string>() << "\n";
    o << "\n";
  }
  return o.str();
}

}  // namespace proxyattn::eval
