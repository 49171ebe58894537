// The analysis driver: stores -> layers -> exact quantities once -> estimators, budgets,
// selections -> metrics -> report tables. See analyze.hpp for the topics.
#include "proxyattn/analysis/analyze.hpp"

#include <omp.h>
#include <time.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>

#include <fmt/core.h>
#include <fmt/format.h>

#include "proxyattn/analysis/layer_oracle.hpp"
#include "proxyattn/analysis/metrics.hpp"
#include "proxyattn/analysis/report.hpp"
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/distributed.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/id_ranges.hpp"
#include "proxyattn/progress.hpp"
#include "proxyattn/select.hpp"
#include "proxyattn/store.hpp"

namespace proxyattn::analysis {

namespace {

using json = nlohmann::json;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Budget kinds of the budget topic, in report order.
const std::vector<std::string> kBudgetKinds{"dynamic", "token", "uniform", "cumulative", "oracle"};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// CPU time of the process (all threads) or of the calling thread: on a shared machine wall
// time says little about cost.
double cpu_now(bool thread = false) {
  timespec t{};
  clock_gettime(thread ? CLOCK_THREAD_CPUTIME_ID : CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// Compact decimal for ids and column names: 0.9 -> "0.9", 0.95 -> "0.95", 1 -> "1".
std::string short_num(double x) { return fmt::format("{:g}", x); }

struct Topics {
  bool similarity = false, recall = false, budget = false, error = false;
};

Topics topics_of(const std::string& command) {
  Topics t;
  if (command == "similarity") t.similarity = true;
  else if (command == "recall") t.recall = true;
  else if (command == "budget") t.budget = true;
  else if (command == "error") t.recall = t.budget = t.error = true;
  else if (command == "all") t.similarity = t.recall = t.budget = t.error = true;
  else
    throw Error("unknown subcommand '" + command + "' (valid: similarity, recall, budget, error, all)");
  return t;
}

// ---- selections --------------------------------------------------------------------------------

struct SelDesc {
  std::string method;
  int groups = 0;          // proxy group count; 0 for other methods
  std::string budget;      // fixed | native | dynamic | token | uniform | cumulative | oracle
  std::string rule;        // how a fixed density was reached; "" otherwise
  double gamma = kNaN;     // coverage used, NaN when none
  double target = kNaN;    // target sparsity, NaN when budget-driven

  std::string id() const {
    std::string s = method;
    if (method == "proxy") s += "/g" + std::to_string(groups);
    s += "/" + budget;
    if (!rule.empty() && budget != "fixed") s += "/" + rule;
    if (std::isfinite(gamma)) s += "/gamma" + short_num(gamma);
    if (std::isfinite(target)) s += "/s" + short_num(target);
    return s;
  }
};

struct Selection {
  SelDesc desc;
  BlockMask mask;
};

// ---- stores ------------------------------------------------------------------------------------

struct StoreCtx {
  std::string path, label;
  std::unique_ptr<StoreReader> reader;
  std::vector<int> layers;
  std::vector<int> groups;
  bool error_ok = false;  // every analysed layer has V
};


json store_json(const StoreCtx& s) {
  const StoreMeta& m = s.reader->meta();
  json j;
  j["label"] = s.label;
  j["path"] = s.path;
  j["model"] = m.model;
  j["source"] = m.source;
  j["num_layers"] = m.num_layers;
  j["num_q_heads"] = m.num_q_heads;
  j["num_kv_heads"] = m.num_kv_heads;
  j["head_dim"] = m.head_dim;
  j["seq_len"] = m.seq_len;
  j["rope_theta"] = m.rope_theta;
  j["rope_applied"] = m.rope_applied;
  j["dtype"] = std::string(dtype_name(m.dtype));
  j["prompt_sha256"] = m.prompt_sha256;
  j["creator"] = m.creator;
  if (m.needle) j["needle"] = {{"position", m.needle->position}, {"text", m.needle->text}};
  else j["needle"] = nullptr;
  j["layers_analyzed"] = s.layers;
  j["proxy_groups"] = s.groups;
  j["has_v"] = s.error_ok;
  return j;
}

// ---- tables ------------------------------------------------------------------------------------

std::string pct_name(double f) { return short_num(f * 100.0) + "pct"; }

struct Tables {
  std::optional<TableWriter> sim_pairs, sim_layers, head_budget, head_budget_layers, fidelity,
      selections, selection_summary, budget_accuracy;
};

// Values kept across stores and layers for the aggregate tables.
struct SelAgg {
  SelDesc desc;
  std::set<std::string> stores;
  int layers = 0;
  std::vector<double> density, element_density, mass, block, error;
  std::vector<double> layer_density;  // per (store, layer): mean over heads
};
struct BudgetAgg {
  std::vector<double> k_est, k_eff, oracle, rel, abs_rel, reached, below, mass, density;
};

struct Aggregates {
  std::vector<std::string> sel_order;
  std::map<std::string, SelAgg> sel;
  std::vector<std::pair<std::string, double>> budget_order;
  std::map<std::pair<std::string, double>, BudgetAgg> budget;
  // (store, kind, gamma, head)
  std::map<std::tuple<std::string, std::string, double, int>, BudgetAgg> budget_heads;
  std::map<std::pair<int, double>, std::array<std::vector<double>, 3>> fidelity;
  // Per store: (selection, target, reached) where the reached sparsity is off the target.
  struct Missed {
    std::string id;
    double target, reached;
  };
  std::map<std::string, std::vector<Missed>> missed;
  std::map<std::string, int> store_blocks;  // Nb per store (for the sparsity ceiling note)
};

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

double mean_of(const std::vector<double>& v) { return summarize(v).mean; }

// ---- per layer ---------------------------------------------------------------------------------

// Exclusive wall and CPU time per stage: a Scope switches the running stage and switches back
// when it ends, so nested stages (an estimate inside a selection) are not counted twice.
// ---- moving unit results between MPI ranks -----------------------------------------------------
// CBOR keeps every double bit-exact (NaN included), so a merged multi-rank report equals the
// single-process one number for number.

json budget_wire(const BudgetAgg& b) {
  return json::array({b.k_est, b.k_eff, b.oracle, b.rel, b.abs_rel, b.reached, b.below, b.mass, b.density});
}
BudgetAgg budget_unwire(const json& j) {
  BudgetAgg b;
  std::vector<double>* f[] = {&b.k_est, &b.k_eff, &b.oracle, &b.rel, &b.abs_rel, &b.reached, &b.below, &b.mass, &b.density};
  for (size_t i = 0; i < std::size(f); ++i) *f[i] = j.at(i).get<std::vector<double>>();
  return b;
}

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

struct Timing {
  struct Stage {
    double wall = 0, cpu = 0;
  };
  std::map<std::string, Stage> stages;
  std::string current = "other";
  bool thread_clock = false;  // units in parallel: charge the thread's CPU time only
  int64_t second_pass_masks = 0;  // masks whose output error needed a second pass
  std::chrono::steady_clock::time_point w0 = std::chrono::steady_clock::now();
  double c0 = cpu_now();

  void reset() {
    w0 = std::chrono::steady_clock::now();
    c0 = cpu_now(thread_clock);
  }
  void switch_to(const std::string& stage) {
    const auto w = std::chrono::steady_clock::now();
    const double c = cpu_now(thread_clock);
    Stage& st = stages[current];
    st.wall += std::chrono::duration<double>(w - w0).count();
    st.cpu += c - c0;
    w0 = w;
    c0 = c;
    current = stage;
  }
  class Scope {
   public:
    Scope(Timing& t, const std::string& stage) : t_(t), prev_(t.current) { t_.switch_to(stage); }
    ~Scope() { t_.switch_to(prev_); }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Timing& t_;
    std::string prev_;
  };
};

// One (store, layer) unit. Three phases around one fused pass over the layer:
//   before  the selections that need neither the oracle nor its block max (peers, ProxyAttn
//           with g < Hq and its budgets read from the last block);
//   pass    oracle + output error of the "before" masks + prefix error tables of the rankings
//           the later masks are built from (oracle mass, block max, ProxyAttn's scores);
//   after   the oracle's own selections, ProxyAttn with g = Hq (its scores are the oracle's
//           block max) and the oracle budget; their errors come from the prefix tables.
class LayerRun {
 public:
  LayerRun(const AnalyzeConfig& cfg, const Topics& topics, StoreCtx& store, int layer,
           Tables& tables, Aggregates& agg, Timing& timing, std::set<std::string>& notes)
      : cfg_(cfg), topics_(topics), store_(store), layer_(layer), T_(tables), A_(agg),
        tm_(timing), notes_(notes) {}

  void run();

 private:
  enum class Phase { before, after };
  const BlockScores& scores(const std::string& method, int groups, double gamma);
  const Budgets& budgets(const std::string& kind, const BlockScores& sc, double gamma);
  BlockMask fixed_selection(const std::string& method, const BlockScores& sc, double density,
                            std::string& rule);
  // ProxyAttn with g groups scores from the pass (g = Hq, stride 1: the block max).
  bool proxy_from_pass(int g) const {
    return g == store_.reader->meta().num_q_heads && cfg_.estimator.proxy.query_stride == 1;
  }
  bool in_phase(bool needs_pass) const { return needs_pass == (phase_ == Phase::after); }
  // Adds a selection (once per id); make() runs only when it is added.
  template <class F>
  void add(SelDesc d, F&& make);
  void similarity();
  void recall_selections();
  void budget_selections();
  void pass();
  void evaluate();

  const AnalyzeConfig& cfg_;
  const Topics& topics_;
  StoreCtx& store_;
  int layer_;
  Tables& T_;
  Aggregates& A_;
  Timing& tm_;
  std::set<std::string>& notes_;

  // --device cuda: the layer's Q and K on the GPU (fp16: exact for the float16 stores),
  // uploaded on first use and released with the run.
  CudaLayer& gpu() {
    if (!gpu_) gpu_ = std::make_unique<CudaLayer>(q_, k_, ConstView{}, DType::f16);
    return *gpu_;
  }
  bool cuda() const { return cfg_.device == "cuda"; }
  std::unique_ptr<CudaLayer> gpu_;

  Phase phase_ = Phase::before;
  bool errors_ = false;  // output error computed for this layer
  LayerData data_;
  ConstView q_, k_;
  LayerOracle oracle_;
  LayerPass pass_;                      // errors and prefix tables (oracle moved to oracle_)
  std::vector<int> explicit_of_;        // per selection: index into pass_.errors, or -1
  std::vector<OracleBudget> obudget_;   // per cfg.gamma
  std::map<std::string, BlockScores> score_cache_;
  std::map<std::string, Budgets> budget_cache_;
  std::vector<Selection> sels_;
  std::set<std::string> sel_ids_;
  // Budget topic rows: accuracy is computed once the oracle budget exists.
  struct PendingBudget {
    std::string kind;
    double gamma;
    size_t gamma_index;
    const Budgets* budgets;
    size_t sel;
  };
  std::vector<PendingBudget> pending_;
};

double gamma_ref(const AnalyzeConfig& cfg) { return *std::max_element(cfg.gamma.begin(), cfg.gamma.end()); }

const BlockScores& LayerRun::scores(const std::string& method, int groups, double gamma) {
  // Only the natives of pooled / flexprefill / xattn depend on gamma; proxy on its groups.
  const bool by_gamma = method == "pooled" || method == "flexprefill" || method == "xattn";
  const std::string key = method + "/" + std::to_string(groups) + "/" + (by_gamma ? short_num(gamma) : "");
  auto it = score_cache_.find(key);
  if (it != score_cache_.end()) return it->second;
  if ((method == "pooled" || method == "xattn") && gamma != gamma_ref(cfg_)) {
    // Their native selection is a function of the scores: score once (at the reference
    // gamma), then only redo the native rule for this gamma.
    BlockScores s = scores(method, groups, gamma_ref(cfg_));
    Timing::Scope scope(tm_, "estimate:" + method);
    EstimatorConfig c = cfg_.estimator;
    c.block = cfg_.block;
    c.pooled.gamma = gamma;
    c.xattn.tau = gamma;
    renative_from_scores(s, c);
    return score_cache_.emplace(key, std::move(s)).first->second;
  }
  Timing::Scope scope(tm_, "estimate:" + method);
  BlockScores s;
  const int H = oracle_.mass.heads;
  if (method == "oracle") {
    s = scores_from_mass(oracle_.mass);
  } else if (method == "proxy" && groups == H && cfg_.estimator.proxy.query_stride == 1) {
    // One group per query head: the proxy is the head itself (either pooling), and its score
    // Ag is the block max of the exact probabilities the oracle pass already computed.
    s.method = "proxy";
    s.heads = H;
    s.num_blocks = oracle_.mass.num_blocks;
    s.block = oracle_.mass.block;
    s.seq_len = oracle_.mass.seq_len;
    s.score = oracle_.block_max;
    s.group_of_head.resize(static_cast<size_t>(H));
    for (int h = 0; h < H; ++h) s.group_of_head[static_cast<size_t>(h)] = h;
  } else {
    EstimatorConfig c = cfg_.estimator;
    c.block = cfg_.block;
    if (method == "proxy") c.proxy.groups = groups;
    if (by_gamma) {
      c.pooled.gamma = gamma;
      c.flexprefill.gamma = gamma;
      c.xattn.tau = gamma;
    }
    // --device cuda: proxy (exact path: float32 proxy heads, so the scores are the CPU's to float
    // rounding; the operand-dtype pooling of the benchmark shifted budgets by a block in ~0.4 %
    // of the rows), pooled and xattn on the GPU; their native rules as on the CPU. vslash stays
    // on the CPU (its cost is the last 64 queries only, and its fp16-operand column / diagonal
    // sums reorder near-equal columns: block recall off by up to 0.01 at fixed densities);
    // flexprefill has no GPU kernel.
    if (cuda() && method != "vslash" && CudaLayer::has_estimator(method))
      s = gpu().estimate(method, c);
    else
      s = make_estimator(method)->estimate(q_, k_, c);
  }
  return score_cache_.emplace(key, std::move(s)).first->second;
}

const Budgets& LayerRun::budgets(const std::string& kind, const BlockScores& sc, double gamma) {
  // dynamic/token/oracle do not read the scores (uniform derives its k from dynamic); the
  // cumulative budget does, so it is cached per score set (cached scores never move).
  std::string key = kind + "/" + short_num(gamma);
  if (kind == "cumulative") key += fmt::format("/{}", fmt::ptr(&sc));
  auto it = budget_cache_.find(key);
  if (it != budget_cache_.end()) return it->second;
  BudgetConfig c = cfg_.budget;
  c.gamma = gamma;
  if (kind == "uniform") {
    // The baseline of the dynamic budget: the same blocks per row for every head, as many as
    // the dynamic budget gives on average at this gamma.
    const Budgets& dyn = budgets("dynamic", sc, gamma);
    double mean = 0;
    for (double x : dyn.per_head_k) mean += x;
    mean /= static_cast<double>(dyn.per_head_k.size());
    c.uniform_k = std::max(1, static_cast<int>(std::lround(mean)));
  }
  Timing::Scope scope(tm_, "budget");
  const BlockMass* mass = kind == "oracle" ? &oracle_.mass : nullptr;
  Budgets b = make_budget(kind)->compute(q_, k_, sc, c, mass);
  return budget_cache_.emplace(key, std::move(b)).first->second;
}

BlockMask LayerRun::fixed_selection(const std::string& method, const BlockScores& sc,
                                    double density, std::string& rule) {
  // The oracle needs no forced blocks: its fixed-density selection is the upper bound.
  SelectOptions opts;
  if (method == "oracle") opts.sink = opts.diagonal = false;
  if (cfg_.density_rule == "auto") {
    if (method == "proxy") {
      rule = "scaled_dynamic";
      return select_budgets_to_density(sc, budgets("dynamic", sc, gamma_ref(cfg_)), density, opts);
    }
    if (method == "oracle") {
      rule = "layer_global";
      return oracle_density_mask(oracle_.mass, density);
    }
    rule = "native_adjust";
    return select_to_density(sc, density, parse_density_rule(rule), opts);
  }
  rule = cfg_.density_rule;
  return select_to_density(sc, density, parse_density_rule(rule), opts);
}

template <class F>
void LayerRun::add(SelDesc d, F&& make) {
  if (!sel_ids_.insert(d.id()).second) return;  // the same selection from two topics
  sels_.push_back({std::move(d), make()});
}

void LayerRun::similarity() {
  const int H = oracle_.mass.heads, nb = oracle_.mass.num_blocks, r = oracle_.shape.group();
  SimilarityOptions so;
  so.topk_fractions = cfg_.topk_fractions;
  so.max_rows = cfg_.sim_rows;
  const HeadSimilarity s = head_similarity(oracle_.mass, oracle_.last_block_probs,
                                           oracle_.shape.seq_len, so);
  const size_t F = s.topk_fractions.size();
  std::vector<std::vector<double>> pair_topk(F);
  std::vector<double> pair_cos, pair_sp, same_kv, cross_kv;
  const size_t last_f = F - 1;
  for (int a = 0; a < H; ++a)
    for (int b = 0; b < H; ++b) {
      json row = {store_.label, layer_, a, b, (a / r == b / r) ? 1 : 0};
      for (size_t f = 0; f < F; ++f) row.push_back(num(s.at(s.topk_overlap[f], a, b)));
      row.push_back(num(s.at(s.cosine, a, b)));
      row.push_back(num(s.at(s.spearman, a, b)));
      T_.sim_pairs->add(std::move(row));
      if (a < b) {
        for (size_t f = 0; f < F; ++f) pair_topk[f].push_back(s.at(s.topk_overlap[f], a, b));
        pair_cos.push_back(s.at(s.cosine, a, b));
        pair_sp.push_back(s.at(s.spearman, a, b));
        (a / r == b / r ? same_kv : cross_kv).push_back(s.at(s.topk_overlap[last_f], a, b));
      }
    }
  json row = {store_.label, layer_, H * (H - 1) / 2, s.rows_used};
  for (size_t f = 0; f < F; ++f) {
    const Summary sm = summarize(pair_topk[f]);
    row.push_back(num(sm.mean));
    row.push_back(num(sm.min));
  }
  const Summary sc = summarize(pair_cos), ss = summarize(pair_sp);
  row.push_back(num(sc.mean));
  row.push_back(num(sc.min));
  row.push_back(num(ss.mean));
  row.push_back(num(ss.min));
  row.push_back(num(mean_of(same_kv)));
  row.push_back(num(mean_of(cross_kv)));
  T_.sim_layers->add(std::move(row));

  // Per-head oracle budget at each gamma: "same tokens, different sparsity".
  const double causal = 0.5 * nb * (nb + 1.0);
  for (size_t gi = 0; gi < cfg_.gamma.size(); ++gi) {
    const OracleBudget& b = obudget_[gi];
    std::vector<double> head_mean, head_sparsity;
    for (int h = 0; h < H; ++h) {
      const std::vector<double> rows = b.rows(h);
      const Summary sm = summarize(rows);
      double sel = 0;
      for (double x : rows) sel += x;
      const double density = sel / causal;
      head_mean.push_back(sm.mean);
      head_sparsity.push_back(1.0 - density);
      T_.head_budget->add({store_.label, layer_, h, num(b.gamma), num(sm.mean), num(sm.min),
                           num(sm.p5), num(sm.p25), num(sm.median), num(sm.p75), num(sm.p95),
                           num(sm.max), b.at(h, nb - 1), num(density), num(1.0 - density)});
    }
    const Summary hm = summarize(head_mean), hs = summarize(head_sparsity);
    double var = 0;
    for (double x : head_mean) var += (x - hm.mean) * (x - hm.mean);
    const double sd = std::sqrt(var / static_cast<double>(H));
    T_.head_budget_layers->add({store_.label, layer_, num(b.gamma), num(hm.mean), num(sd),
                                num(hm.mean > 0 ? sd / hm.mean : kNaN), num(hm.min), num(hm.max),
                                num(hs.mean), num(hs.min), num(hs.max)});
  }

  // Fidelity of each proxy: its ranking at each member head's own oracle budget.
  for (int g : store_.groups) {
    const BlockScores& sc = scores("proxy", g, kNaN);
    const ScoreView view{sc.score.data(), sc.heads, sc.num_blocks, H};
    for (size_t gi = 0; gi < cfg_.gamma.size(); ++gi) {
      const auto f = ranking_fidelity(view, oracle_.mass, obudget_[gi]);
      auto& agg = A_.fidelity[{g, cfg_.gamma[gi]}];
      for (const RankingFidelity& x : f) {
        T_.fidelity->add({store_.label, layer_, g, num(cfg_.gamma[gi]), x.head,
                          proxy_group_of(x.head, H, g), num(x.block_recall), num(x.mass_recall),
                          num(x.mass_ratio)});
        agg[0].push_back(x.block_recall);
        agg[1].push_back(x.mass_recall);
        agg[2].push_back(x.mass_ratio);
      }
    }
  }
}

void LayerRun::recall_selections() {
  const double gref = gamma_ref(cfg_);
  for (const std::string& m : cfg_.methods) {
    Timing::Scope scope(tm_, "select");
    if (m == "proxy") {
      for (int g : store_.groups) {
        if (!in_phase(proxy_from_pass(g))) continue;
        const BlockScores& sc = scores(m, g, kNaN);
        for (double gamma : cfg_.gamma)
          add({m, g, "dynamic", "", gamma, kNaN}, [&] { return select_blocks(sc, budgets("dynamic", sc, gamma)); });
        for (double s : cfg_.sparsity) {
          std::string rule = "scaled_dynamic";
          if (cfg_.density_rule != "auto") rule = cfg_.density_rule;
          add({m, g, "fixed", rule, kNaN, s}, [&] { return fixed_selection(m, sc, 1.0 - s, rule); });
        }
      }
    } else if (m == "oracle") {
      if (!in_phase(true)) continue;
      const BlockScores& sc = scores(m, 0, kNaN);
      for (size_t gi = 0; gi < cfg_.gamma.size(); ++gi)
        add({m, 0, "native", "", cfg_.gamma[gi], kNaN},
            [&] { return oracle_topk_mask(oracle_.mass, obudget_[gi].per_row); });
      for (double s : cfg_.sparsity) {
        std::string rule = cfg_.density_rule == "auto" ? "layer_global" : cfg_.density_rule;
        add({m, 0, "fixed", rule, kNaN, s}, [&] { return fixed_selection(m, sc, 1.0 - s, rule); });
      }
    } else {
      if (!in_phase(false)) continue;
      const bool by_gamma = m != "vslash";
      if (by_gamma) {
        for (double gamma : cfg_.gamma) {
          const BlockScores& sc = scores(m, 0, gamma);
          if (sc.native) add({m, 0, "native", "", gamma, kNaN}, [&] { return *sc.native; });
        }
      } else {
        const BlockScores& sc = scores(m, 0, kNaN);
        if (sc.native) add({m, 0, "native", "", kNaN, kNaN}, [&] { return *sc.native; });
      }
      const BlockScores& sc = scores(m, 0, by_gamma ? gref : kNaN);
      for (double s : cfg_.sparsity) {
        std::string rule = cfg_.density_rule == "auto" ? "native_adjust" : cfg_.density_rule;
        add({m, 0, "fixed", rule, kNaN, s}, [&] { return fixed_selection(m, sc, 1.0 - s, rule); });
      }
    }
  }
}

void LayerRun::budget_selections() {
  Timing::Scope scope(tm_, "select");
  const int g0 = store_.groups.front();
  const bool g0_pass = proxy_from_pass(g0);
  const bool any_now = in_phase(g0_pass) || in_phase(true);
  if (!any_now) return;
  for (size_t gi = 0; gi < cfg_.gamma.size(); ++gi) {
    const double gamma = cfg_.gamma[gi];
    for (const std::string& kind : kBudgetKinds) {
      if (!in_phase(g0_pass || kind == "oracle")) continue;
      const BlockScores& sc = scores("proxy", g0, kNaN);
      const Budgets& b = budgets(kind, sc, gamma);
      SelDesc d{"proxy", g0, kind, "", gamma, kNaN};
      add(d, [&] { return select_blocks(sc, b); });
      // Index of the selection (it may have been added by the recall topic already).
      size_t at = 0;
      while (sels_[at].desc.id() != d.id()) ++at;
      pending_.push_back({kind, gamma, gi, &b, at});
    }
    if (!in_phase(g0_pass)) continue;
    // Fig. 5c: the same scores with each budget brought to each fixed sparsity. The per-head
    // budgets keep their proportions (scaled); uniform is one k for every row and head.
    const BlockScores& sc = scores("proxy", g0, kNaN);
    for (double s : cfg_.sparsity)
      for (const char* kind : {"dynamic", "token"})
        add({"proxy", g0, kind, "scaled", gamma, s},
            [&] { return select_budgets_to_density(sc, budgets(kind, sc, gamma), 1.0 - s); });
  }
  if (!in_phase(g0_pass)) return;
  const BlockScores& sc = scores("proxy", g0, kNaN);
  for (double s : cfg_.sparsity)
    add({"proxy", g0, "uniform", "row_uniform", kNaN, s},
        [&] { return select_to_density(sc, 1.0 - s, DensityRule::row_uniform); });
}

void LayerRun::pass() {
  const int H = store_.reader->meta().num_q_heads;
  if (!errors_) {
    Timing::Scope scope(tm_, "oracle");
    oracle_ = layer_oracle(q_, k_, cfg_.block);
  } else {
    Timing::Scope scope(tm_, "oracle+output_error");
    // Rankings for the masks built after the pass (and for "before" masks that are prefixes
    // of ProxyAttn's scores, which then need no explicit evaluation).
    std::vector<Ranking> rankings;
    Ranking oracle_rank;
    oracle_rank.source = Ranking::Source::mass;
    rankings.push_back(oracle_rank);
    if (proxy_from_pass(H) && std::find(store_.groups.begin(), store_.groups.end(), H) != store_.groups.end()) {
      Ranking bm;
      bm.source = Ranking::Source::block_max;
      bm.sink = bm.diagonal = true;
      rankings.push_back(bm);
    }
    for (const auto& [key, sc] : score_cache_)
      if (sc.method == "proxy") {
        Ranking r;
        r.source = Ranking::Source::given;
        r.order = rank_orders(sc.score.data(), sc.heads, sc.num_blocks, true, true);
        rankings.push_back(std::move(r));
      }
    // The "before" masks that no ranking covers, once per distinct mask.
    std::vector<const BlockMask*> masks;
    explicit_of_.assign(sels_.size(), -1);
    for (size_t i = 0; i < sels_.size(); ++i) {
      const BlockMask& m = sels_[i].mask;
      bool covered = false;
      for (const Ranking& r : rankings)
        if (r.source == Ranking::Source::given && is_prefix_mask(m, r.order)) covered = true;
      if (covered) continue;
      int found = -1;
      for (size_t c = 0; c < masks.size() && found < 0; ++c)
        if (*masks[c] == m) found = static_cast<int>(c);
      if (found < 0) {
        found = static_cast<int>(masks.size());
        masks.push_back(&m);
      }
      explicit_of_[i] = found;
    }
    pass_ = layer_pass(q_, k_, *data_.v, cfg_.block, masks, rankings);
    oracle_ = std::move(pass_.oracle);
  }
  if (cuda()) {
    // The exact block mass and row LSE every metric reads come from the GPU. The CPU pass
    // above still supplies the block max, the last-block token probabilities and the output
    // errors (its prefix tables have no GPU counterpart); a mask that is no longer a prefix of
    // the CPU mass ranking (near ties) falls back to the direct output-error pass.
    Timing::Scope scope(tm_, "oracle:cuda");
    BlockMass m = gpu().block_mass(cfg_.block);
    std::vector<float> lse = gpu().row_lse();
    if (m.mass.size() != oracle_.mass.mass.size() || lse.size() != oracle_.lse.size())
      throw Error("--device cuda: GPU block mass / row LSE shape differs from the CPU pass");
    oracle_.mass = std::move(m);
    oracle_.lse = std::move(lse);
  }
  Timing::Scope scope(tm_, "oracle");
  A_.store_blocks[store_.label] = oracle_.mass.num_blocks;
  for (double g : cfg_.gamma) obudget_.push_back(oracle_budget(oracle_.mass, g));
}

void LayerRun::evaluate() {
  const int H = oracle_.mass.heads;
  const size_t S = sels_.size();
  std::optional<Timing::Scope> scope(std::in_place, tm_, "metrics");
  std::vector<std::vector<HeadDensity>> dens(S);
  std::vector<std::vector<double>> mass(S), block(S);
  for (size_t i = 0; i < S; ++i) {
    dens[i] = density_per_head(sels_[i].mask);
    mass[i] = mass_recall_per_head(sels_[i].mask, oracle_.mass);
    block[i] = block_recall_per_head(sels_[i].mask, oracle_.mass);
  }

  // Output errors: from the pass (explicit masks), else from a prefix table; a mask neither
  // covers (none expected) gets a second, direct pass.
  std::vector<std::vector<double>> rel(S);
  std::vector<int64_t> empty(S, 0);
  const bool err = errors_ && S > 0;
  if (err) {
    Timing::Scope e(tm_, "output_error");
    std::vector<size_t> left;
    for (size_t i = 0; i < S; ++i) {
      const int x = i < explicit_of_.size() ? explicit_of_[i] : -1;
      if (x >= 0) {
        rel[i] = pass_.errors.rel_error[static_cast<size_t>(x)];
        empty[i] = pass_.errors.empty_rows[static_cast<size_t>(x)];
        continue;
      }
      bool done = false;
      for (const PrefixErrors& t : pass_.prefix)
        if (!done) done = prefix_mask_errors(t, pass_.full_sq, sels_[i].mask, rel[i], empty[i]);
      if (!done) left.push_back(i);
    }
    if (!left.empty()) {
      std::vector<const BlockMask*> masks;
      for (size_t i : left) masks.push_back(&sels_[i].mask);
      const OutputErrors o = output_errors(q_, k_, *data_.v, oracle_, masks);
      for (size_t x = 0; x < left.size(); ++x) {
        rel[left[x]] = o.rel_error[x];
        empty[left[x]] = o.empty_rows[x];
      }
      tm_.second_pass_masks += static_cast<int64_t>(left.size());
    }
  }

  // Budget accuracy needs the oracle budget, known only now.
  std::vector<std::vector<BudgetAccuracy>> acc;
  for (const PendingBudget& p : pending_)
    acc.push_back(budget_accuracy(p.budgets->per_head_k, p.budgets->per_row_k, oracle_.mass, obudget_[p.gamma_index]));

  for (size_t i = 0; i < S; ++i) {
    const SelDesc& d = sels_[i].desc;
    const std::string id = d.id();
    auto [it, fresh] = A_.sel.try_emplace(id);
    SelAgg& agg = it->second;
    if (fresh) {
      agg.desc = d;
      A_.sel_order.push_back(id);
    }
    agg.stores.insert(store_.label);
    ++agg.layers;
    std::vector<double> ev(static_cast<size_t>(H), kNaN), dv;
    for (int h = 0; h < H; ++h) {
      const HeadDensity& hd = dens[i][static_cast<size_t>(h)];
      const double e = err ? rel[i][static_cast<size_t>(h)] : kNaN;
      ev[static_cast<size_t>(h)] = e;
      dv.push_back(hd.density);
      T_.selections->add({store_.label, layer_, id, d.method, d.groups, d.budget, d.rule,
                          num(d.gamma), num(d.target), h, hd.selected, num(hd.density),
                          num(hd.element_density), num(hd.sparsity()),
                          num(mass[i][static_cast<size_t>(h)]), num(block[i][static_cast<size_t>(h)]), num(e)});
      agg.density.push_back(hd.density);
      agg.element_density.push_back(hd.element_density);
      agg.mass.push_back(mass[i][static_cast<size_t>(h)]);
      agg.block.push_back(block[i][static_cast<size_t>(h)]);
      agg.error.push_back(e);
    }
    const Summary ms = summarize(mass[i]), es = summarize(ev);
    const double dmean = mean_of(dv);
    agg.layer_density.push_back(dmean);
    T_.selection_summary->add(
        {store_.label, layer_, id, d.method, d.groups, d.budget, d.rule, num(d.gamma), num(d.target),
         num(dmean), num(sels_[i].mask.element_density()), num(1.0 - dmean), num(ms.mean),
         num(ms.p5), num(ms.min), num(mean_of(block[i])), num(es.mean), num(es.max),
         err ? json(empty[i]) : json(nullptr)});
    if (std::isfinite(d.target) && std::abs((1.0 - dmean) - d.target) > 0.01)
      A_.missed[store_.label].push_back({id, d.target, 1.0 - dmean});
  }

  for (size_t pi = 0; pi < pending_.size(); ++pi) {
    const PendingBudget& p = pending_[pi];
    const size_t i = p.sel;
    auto& agg = A_.budget[{p.kind, p.gamma}];
    if (std::find(A_.budget_order.begin(), A_.budget_order.end(), std::make_pair(p.kind, p.gamma)) ==
        A_.budget_order.end())
      A_.budget_order.emplace_back(p.kind, p.gamma);
    for (const BudgetAccuracy& a : acc[pi]) {
      const size_t h = static_cast<size_t>(a.head);
      const double mr = mass[i][h], dn = dens[i][h].density;
      T_.budget_accuracy->add({store_.label, layer_, p.kind, num(p.gamma), a.head, num(a.k_est),
                               num(a.k_effective), num(a.oracle_mean), num(a.oracle_last_row),
                               num(a.rel_error), num(a.abs_rel_error), num(a.mass_reached),
                               num(a.rows_below_gamma), num(mr), num(dn)});
      for (BudgetAgg* b : {&agg, &A_.budget_heads[{store_.label, p.kind, p.gamma, a.head}]}) {
        b->k_est.push_back(a.k_est);
        b->k_eff.push_back(a.k_effective);
        b->oracle.push_back(a.oracle_mean);
        b->rel.push_back(a.rel_error);
        b->abs_rel.push_back(a.abs_rel_error);
        b->reached.push_back(a.mass_reached);
        b->below.push_back(a.rows_below_gamma);
        b->mass.push_back(mr);
        b->density.push_back(dn);
      }
    }
  }
}

void LayerRun::run() {
  {
    Timing::Scope scope(tm_, "read");
    errors_ = topics_.error && store_.error_ok;
    // HDF5 (and one reader per store) is shared by the units running in parallel.
    static std::mutex read_mutex;
    std::lock_guard lock(read_mutex);
    data_ = store_.reader->read_layer(layer_, errors_);
    q_ = data_.q.view();
    k_ = data_.k.view();
  }
  phase_ = Phase::before;
  if (topics_.recall) recall_selections();
  if (topics_.budget) budget_selections();
  pass();
  phase_ = Phase::after;
  if (topics_.similarity) {
    Timing::Scope scope(tm_, "similarity");
    similarity();
  }
  if (topics_.recall) recall_selections();
  if (topics_.budget) budget_selections();
  evaluate();
}

// ---- aggregate tables --------------------------------------------------------------------------

// Report order of selections: methods as configured, then groups, budget kind, gamma, target.
std::vector<std::string> sorted_selections(const AnalyzeConfig& cfg, const Aggregates& A) {
  static const std::vector<std::string> budgets{"fixed", "native", "dynamic", "token", "uniform", "cumulative", "oracle"};
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

}  // namespace

std::vector<int> divisors(int n) {
  std::vector<int> d;
  for (int x = 1; x <= n; ++x)
    if (n % x == 0) d.push_back(x);
  return d;
}

void validate_config(const AnalyzeConfig& cfg) {
  topics_of(cfg.command);
  if (cfg.stores.empty()) throw Error("STORE: at least one store file is required");
  const std::vector<std::string> valid = estimator_names();
  std::string list;
  for (const auto& v : valid) list += (list.empty() ? "" : ", ") + v;
  if (cfg.methods.empty()) throw Error("--methods: empty list (valid: " + list + ")");
  for (const auto& m : cfg.methods)
    if (std::find(valid.begin(), valid.end(), m) == valid.end())
      throw Error("--methods: unknown method '" + m + "' (valid: " + list + ")");
  if (cfg.sparsity.empty()) throw Error("--sparsity: empty list");
  for (double s : cfg.sparsity)
    if (!(s >= 0.0 && s < 1.0)) throw Error("--sparsity: " + short_num(s) + " outside [0, 1)");
  if (cfg.gamma.empty()) throw Error("--gamma: empty list");
  for (double g : cfg.gamma)
    if (!(g > 0.0 && g <= 1.0)) throw Error("--gamma: " + short_num(g) + " outside (0, 1]");
  for (int g : cfg.groups)
    if (g < 1) throw Error("--groups: " + std::to_string(g) + " must be >= 1");
  if (cfg.block <= 0 || (cfg.block & (cfg.block - 1)) != 0)
    throw Error("--block: " + std::to_string(cfg.block) + " is not a positive power of two");
  if (cfg.density_rule != "auto") {
    try {
      parse_density_rule(cfg.density_rule);
    } catch (const Error&) {
      throw Error("--density-rule: unknown rule '" + cfg.density_rule +
                  "' (valid: auto, row_uniform, head_global, native_adjust)");
    }
  }
  if (cfg.topk_fractions.empty()) throw Error("top-k fractions: empty list");
  for (double f : cfg.topk_fractions)
    if (!(f > 0.0 && f <= 1.0)) throw Error("top-k fraction " + short_num(f) + " outside (0, 1]");
  if (cfg.sim_rows < 0) throw Error("--sim-rows: must be >= 0");
  if (cfg.device == "cuda" && !cuda_available()) {
    // "no CUDA device (<driver detail>)"; the detail is empty on a build without CUDA.
    std::string why = cuda_device_description();
    if (why.size() > 3 && why.compare(why.size() - 3, 3, " ()") == 0) why.resize(why.size() - 3);
    throw Error("--device cuda: " + why + " (needs a CUDA build and a visible GPU); use --device cpu");
  }
  if (cfg.device != "cpu" && cfg.device != "cuda") throw Error("--device: unknown device '" + cfg.device + "' (valid: cpu, cuda)");
  EstimatorConfig ec = cfg.estimator;
  ec.block = cfg.block;
  validate_estimator_config(ec);
  validate_budget_config(cfg.budget);
}

json analyze(const AnalyzeConfig& cfg_in, const Distributed* dist) {
  AnalyzeConfig cfg = cfg_in;
  validate_config(cfg);
  const Topics topics = topics_of(cfg.command);
  std::sort(cfg.gamma.begin(), cfg.gamma.end());
  cfg.gamma.erase(std::unique(cfg.gamma.begin(), cfg.gamma.end()), cfg.gamma.end());
  std::sort(cfg.sparsity.begin(), cfg.sparsity.end());
  cfg.sparsity.erase(std::unique(cfg.sparsity.begin(), cfg.sparsity.end()), cfg.sparsity.end());
  std::sort(cfg.groups.begin(), cfg.groups.end());
  cfg.groups.erase(std::unique(cfg.groups.begin(), cfg.groups.end()), cfg.groups.end());
  const auto wall0 = std::chrono::steady_clock::now();
  const double cpu0 = cpu_now();

  // Open and check every store before the heavy work.
  std::vector<StoreCtx> stores;
  std::set<std::string> notes;
  std::map<std::string, int> label_count;
  for (const std::string& path : cfg.stores) {
    StoreCtx s;
    s.path = path;
    if (!std::filesystem::exists(path)) throw Error(path + ": no such store file");
    ReadOptions ro;
    ro.allow_nonfinite = cfg.allow_nonfinite;
    s.reader = std::make_unique<StoreReader>(path, ro);
    const StoreMeta& m = s.reader->meta();
    std::string label = std::filesystem::path(path).stem().string();
    if (const int n = ++label_count[label]; n > 1) label += "#" + std::to_string(n);
    s.label = label;
    const std::vector<int>& have = s.reader->layers();
    if (have.empty()) throw Error(path + ": the store holds no layers");
    if (cfg.layers.empty()) {
      s.layers = have;
    } else {
      for (int l : cfg.layers)
        if (std::find(have.begin(), have.end(), l) == have.end())
          throw Error("--layers: layer " + std::to_string(l) + " is not in " + path + " (layers " +
                      format_id_ranges(have) + ")");
      s.layers = cfg.layers;
    }
    if (cfg.groups.empty()) {
      s.groups = divisors(m.num_q_heads);
    } else {
      for (int g : cfg.groups)
        if (m.num_q_heads % g != 0)
          throw Error("--groups: " + std::to_string(g) + " does not divide the " +
                      std::to_string(m.num_q_heads) + " query heads of " + path);
      s.groups = cfg.groups;
    }
    s.error_ok = true;
    for (int l : s.layers)
      if (!s.reader->has_v(l)) s.error_ok = false;
    if (topics.error && !s.error_ok) {
      if (cfg.command == "error")
        throw Error(path + ": no V in some analysed layers; the output error needs V (capture "
                    "with V, or use the recall subcommand)");
      notes.insert(s.label + ": no V in some analysed layers, output error skipped");
    }
    stores.push_back(std::move(s));
  }

  json report = report_skeleton("proxyattn-analyze", cfg.command);
  report["argv"] = cfg.argv;
  report["device"]["kind"] = cfg.device;
  report["device"]["threads"] = omp_get_max_threads();
  if (cfg.device == "cuda") {
    report["device"]["name"] = cuda_device_description();
    notes.insert("--device cuda: on the GPU (fp16 operands, fp32 accumulation): exact block mass and row LSE, "
                 "ProxyAttn scores for g < Hq or query stride > 1 (float32 proxy heads, float64 LSE), pooled and "
                 "xattn scores with their native selections (rules applied on the host to the GPU scores); on the "
                 "CPU: flexprefill, vslash (last 64 queries only), ProxyAttn g = Hq (block max of the oracle pass), "
                 "last-block token probabilities, output errors (prefix tables), budgets and selections. "
                 "Tables match --device cpu within 1e-3; a mask can differ only at a near tie of the CPU's own "
                 "decision (scores within float rounding at a cut)");
  }
  json& c = report["config"];
  c["command"] = cfg.command;
  c["layers"] = cfg.layers.empty() ? json("all") : json(cfg.layers);
  c["methods"] = cfg.methods;
  c["sparsity"] = cfg.sparsity;
  c["gamma"] = cfg.gamma;
  c["gamma_ref"] = gamma_ref(cfg);
  c["groups"] = cfg.groups.empty() ? json("divisors of Hq") : json(cfg.groups);
  c["block"] = cfg.block;
  c["density_rule"] = cfg.density_rule;
  c["topk_fractions"] = cfg.topk_fractions;
  c["sim_rows"] = cfg.sim_rows;
  c["allow_nonfinite"] = cfg.allow_nonfinite;
  c["budget_kinds"] = kBudgetKinds;
  const EstimatorConfig& e = cfg.estimator;
  c["estimator"] = {
      {"proxy", {{"pool", std::string(proxy_pool_name(e.proxy.pool))}, {"query_stride", e.proxy.query_stride}}},
      {"flexprefill", {{"tau", e.flexprefill.tau}, {"min_budget_tokens", e.flexprefill.min_budget_tokens},
                       {"last_q", e.flexprefill.last_q}}},
      {"xattn", {{"stride", e.xattn.stride}}},
      {"vslash", {{"last_q", e.vslash.last_q}, {"vertical", e.vslash.vertical}, {"slash", e.vslash.slash},
                  {"sink_columns", e.vslash.sink_columns}, {"local_diagonals", e.vslash.local_diagonals}}},
      {"pooled", {{"global", e.pooled.global}}}};
  c["budget"] = {{"k_min", cfg.budget.k_min}, {"mode", std::string(budget_mode_name(cfg.budget.mode))},
                 {"uniform_k", "round(mean dynamic k_h at the same gamma)"}};
  report["stores"] = json::array();
  for (const StoreCtx& s : stores) report["stores"].push_back(store_json(s));

  make_tables(report, cfg, topics);  // every table exists (with its columns) even when empty

  // Units of work: (store, layer). With at least two units and two threads, units run in
  // parallel, one thread each, and everything inside a unit runs serially (nested parallel
  // regions are switched off): on a 2-core machine this avoids thousands of tiny parallel
  // regions. With one unit the work inside it is parallel instead.
  struct Unit {
    StoreCtx* store = nullptr;
    int layer = 0;
    json doc = json::object();
    Aggregates agg;
    Timing tm;
    std::set<std::string> notes;
    std::string error;
  };
  std::vector<Unit> units;
  for (StoreCtx& s : stores)
    for (int l : s.layers) {
      Unit u;
      u.store = &s;
      u.layer = l;
      units.push_back(std::move(u));
    }
  // Across MPI ranks: units balanced by cost (N^2 * Hq * d), each rank runs its own, rank 0
  // receives every result and merges in (store, layer) order exactly as one process would.
  const int ranks = dist ? dist->size() : 1, rank = dist ? dist->rank() : 0;
  std::vector<int> owner(units.size(), 0);
  if (ranks > 1) {
    std::vector<double> cost;
    for (const Unit& u : units) {
      const StoreMeta& m = u.store->reader->meta();
      cost.push_back(static_cast<double>(m.seq_len) * static_cast<double>(m.seq_len) * m.num_q_heads * m.head_dim);
    }
    owner = assign_by_cost(cost, ranks);
  }
  std::vector<Unit*> mine;
  for (size_t i = 0; i < units.size(); ++i)
    if (owner[i] == rank) mine.push_back(&units[i]);

  const int threads = omp_get_max_threads();
  const bool outer = mine.size() >= 2 && threads > 1;
  Progress progress("analyze " + cfg.command, static_cast<int64_t>(mine.size()), cfg.quiet);
  auto run_unit = [&](Unit& u) {
    u.tm.thread_clock = outer;
    u.tm.reset();
    progress.set_label(fmt::format("analyze {}: {} layer {}", cfg.command, u.store->label, u.layer));
    Tables T = make_tables(u.doc, cfg, topics);
    LayerRun(cfg, topics, *u.store, u.layer, T, u.agg, u.tm, u.notes).run();
    u.tm.switch_to("other");
    progress.tick();
  };
  auto guarded_unit = [&](Unit& u) {
    try {
      run_unit(u);
    } catch (const std::exception& e) {
      u.error = e.what();
    }
  };
  if (outer) {
    const int levels = omp_get_max_active_levels();
    omp_set_max_active_levels(1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (size_t i = 0; i < mine.size(); ++i) guarded_unit(*mine[i]);
    omp_set_max_active_levels(levels);
  } else {
    for (Unit* u : mine) guarded_unit(*u);
  }
  json rank_info = json::array();
  std::string first_error;
  for (const Unit* u : mine)
    if (!u->error.empty()) {
      first_error = u->error;
      break;
    }
  if (ranks == 1) {
    if (!first_error.empty()) throw Error(first_error);
  } else {
    dist->agree_or_throw(first_error);  // one failing rank fails them all, with its message
    json out = json::array();
    for (size_t i = 0; i < units.size(); ++i) {
      if (owner[i] != rank) continue;
      const Unit& u = units[i];
      json stages = json::object();
      for (const auto& [name, st] : u.tm.stages) stages[name] = json::array({st.wall, st.cpu});
      out.push_back({{"unit", i}, {"doc", u.doc}, {"agg", aggregates_wire(u.agg)}, {"stages", stages},
                     {"second_pass_masks", u.tm.second_pass_masks}, {"notes", u.notes}});
    }
    const json mine_doc = {{"host", dist->hostname()}, {"device", cfg.device}, {"units", std::move(out)}};
    const std::vector<uint8_t> bytes = json::to_cbor(mine_doc);
    const std::vector<std::string> parts = dist->gather_to_root(std::string(bytes.begin(), bytes.end()));
    if (!dist->is_root()) return json();  // rank 0 writes the report
    for (int r = 0; r < ranks; ++r) {
      json part = json::from_cbor(parts[static_cast<size_t>(r)]);
      rank_info.push_back({{"rank", r}, {"host", part.at("host")}, {"device", part.at("device")},
                           {"units", part.at("units").size()}});
      if (r == 0) continue;  // rank 0's units are already in place
      for (json& e : part.at("units")) {
        Unit& u = units.at(e.at("unit").get<size_t>());
        u.doc = std::move(e.at("doc"));
        u.agg = aggregates_unwire(e.at("agg"));
        for (const auto& [name, st] : e.at("stages").items())
          u.tm.stages[name] = {st.at(0).get<double>(), st.at(1).get<double>()};
        u.tm.second_pass_masks = e.at("second_pass_masks").get<int64_t>();
        u.notes = e.at("notes").get<std::set<std::string>>();
      }
    }
  }
  report["distributed"] = {{"ranks", ranks},
                           {"mpi", dist && dist->active()},
                           {"per_rank", rank_info},
                           {"assignment", "longest-processing-time first by cost N^2 * Hq * d per (store, layer)"}};

  // Merge the units in (store, layer) order: rows, aggregates, timing, notes.
  Aggregates A;
  Timing tm;
  std::map<std::string, double> store_seconds;
  for (Unit& u : units) {
    for (auto& [name, table] : u.doc["tables"].items()) {
      json& rows = report["tables"][name]["rows"];
      for (auto& r : table["rows"]) rows.push_back(std::move(r));
    }
    merge_into(A, std::move(u.agg));
    tm.second_pass_masks += u.tm.second_pass_masks;
    for (const auto& [stage, st] : u.tm.stages) {
      tm.stages[stage].wall += st.wall;
      tm.stages[stage].cpu += st.cpu;
      store_seconds[u.store->label] += st.wall;
    }
    notes.insert(u.notes.begin(), u.notes.end());
  }
  json per_store = json::array();
  for (const StoreCtx& s : stores)
    per_store.push_back({{"store", s.label}, {"layers", s.layers.size()}, {"thread_seconds", store_seconds[s.label]}});
  progress.done();
  aggregate_tables(report, cfg, A);

  json& t = report["timing"];
  t["total_seconds"] = seconds_since(wall0);
  t["total_cpu_seconds"] = cpu_now() - cpu0;
  t["threads"] = threads;
  t["parallel_over"] = outer ? "layers" : "heads and blocks";
  // Exclusive per stage, summed over units (thread-seconds when units ran in parallel);
  // estimate:<method> is each estimator's scoring time.
  json stages = json::object();
  for (const auto& [name, st] : tm.stages) stages[name] = {{"wall_seconds", st.wall}, {"cpu_seconds", st.cpu}};
  t["stages"] = stages;
  t["second_pass_masks"] = tm.second_pass_masks;
  t["per_store"] = per_store;
  // Fixed sparsities that were not reached, summarised per store: the ceiling that the forced
  // sink and diagonal blocks set, then any other miss with its range over layers.
  for (const auto& [label, misses] : A.missed) {
    const int nb = A.store_blocks[label];
    const double ceiling = nb > 1 ? 1.0 - (2.0 * nb - 1.0) / (0.5 * nb * (nb + 1.0)) : 0.0;
    std::set<double> capped;
    std::map<std::string, std::pair<double, double>> other;  // "id" -> reached range
    for (const auto& m : misses) {
      if (std::abs(m.reached - ceiling) < 0.005) {
        capped.insert(m.target);
        continue;
      }
      auto [it, fresh] = other.try_emplace(m.id, m.reached, m.reached);
      it->second.first = std::min(it->second.first, m.reached);
      it->second.second = std::max(it->second.second, m.reached);
    }
    if (!capped.empty()) {
      std::string ts;
      for (double t : capped) ts += (ts.empty() ? "" : ", ") + short_num(t);
      notes.insert(fmt::format("{}: with Nb = {} blocks the sink and diagonal blocks alone keep sparsity <= "
                               "{:.3f}; targets {} give that ceiling for every method that forces them",
                               label, nb, ceiling, ts));
    }
    for (const auto& [id, range] : other)
      notes.insert(fmt::format("{}: {} reached sparsity {:.3f}{} (target off by more than 0.01)", label, id,
                               range.first, range.second > range.first + 1e-9
                                                ? fmt::format(" to {:.3f} over layers", range.second)
                                                : std::string()));
  }
  report["notes"] = json(std::vector<std::string>(notes.begin(), notes.end()));
  return report;
}

}  // namespace proxyattn::analysis
