#pragma once
// Internal to the analysis (not installed): the pieces the driver (analyze.cpp), the per-layer
// run (layer_run.cpp), the tables (tables.cpp), the aggregates (aggregates.cpp) and the MPI wire
// format (wire.cpp) share.
#include <time.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <fmt/core.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "proxyattn/analysis/analyze.hpp"
#include "proxyattn/analysis/metrics.hpp"
#include "proxyattn/analysis/report.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/store.hpp"

namespace proxyattn::analysis::detail {

using json = nlohmann::json;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// CPU time of the process (all threads) or of the calling thread: on a shared machine wall
// time says little about cost.
inline double cpu_now(bool thread = false) {
  timespec t{};
  clock_gettime(thread ? CLOCK_THREAD_CPUTIME_ID : CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// Compact decimal for ids and column names: 0.9 -> "0.9", 0.95 -> "0.95", 1 -> "1".
inline std::string short_num(double x) { return fmt::format("{:g}", x); }

struct Topics {
  bool similarity = false, recall = false, budget = false, error = false;
};
Topics topics_of(const std::string& command);

inline double mean_of(const std::vector<double>& v) { return summarize(v).mean; }

// The largest configured gamma: the coverage of the rankings the fixed densities start from.
inline double gamma_ref(const AnalyzeConfig& cfg) { return *std::max_element(cfg.gamma.begin(), cfg.gamma.end()); }

// ---- selections --------------------------------------------------------------------------------

struct SelDesc {
  std::string method;
  int groups = 0;          // group count of a grouped method (proxy); 0 for the others
  std::string budget;      // fixed | native | dynamic | token | uniform | cumulative | oracle
  std::string rule;        // how a fixed density was reached; "" otherwise
  double gamma = kNaN;     // coverage used, NaN when none
  double target = kNaN;    // target sparsity, NaN when budget-driven

  std::string id() const {
    std::string s = method;
    if (groups > 0) s += "/g" + std::to_string(groups);
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

// ---- tables and aggregates ---------------------------------------------------------------------

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

// The tables of the topics in `doc` (column lists in one place for the main report and every
// unit's private document).
Tables make_tables(json& doc, const AnalyzeConfig& cfg, const Topics& topics);

// Appends one unit's aggregates; first-seen order of selections and budgets is kept.
void merge_into(Aggregates& to, Aggregates&& from);
// The cross-store tables (recall_vs_sparsity, budget_summary, budget_heads, fidelity_summary).
void aggregate_tables(json& report, const AnalyzeConfig& cfg, const Aggregates& A);

// One unit's aggregates as CBOR-ready JSON and back (MPI): every double bit-exact.
json aggregates_wire(const Aggregates& a);
Aggregates aggregates_unwire(const json& j);

// Exclusive wall and CPU time per stage: a Scope switches the running stage and switches back
// when it ends, so nested stages (an estimate inside a selection) are not counted twice.
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

// Runs one (store, layer) unit: its rows go to `tables`, its values to `agg`.
// `data` is the layer as read from the store (V included when the error topic needs it).
void run_layer(const AnalyzeConfig& cfg, const Topics& topics, StoreCtx& store, LayerData&& data, Tables& tables,
               Aggregates& agg, Timing& timing, std::set<std::string>& notes);

}  // namespace proxyattn::analysis::detail
