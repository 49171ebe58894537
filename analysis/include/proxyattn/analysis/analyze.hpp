#pragma once
// The analysis driver behind `proxyattn-analyze`: for every (store, layer) it reads the layer
// once, computes the exact quantities once (layer_oracle.hpp) and shares them among every
// metric, runs the estimators / budgets / selections of lib/, and fills a Report (report.hpp).
//
// Topics (the subcommands; `all` = every topic):
//   similarity  head x head similarity (top-k token overlap, cosine, Spearman), per-head oracle
//               budget at every gamma, proxy fidelity for every group count.
//   recall      every method's selection cut/grown to each fixed sparsity, and its native
//               operating point at each gamma: density, mass recall, block recall.
//   budget      ProxyAttn's scores with the budgets dynamic/token/uniform/cumulative/oracle at
//               each gamma: budget accuracy vs the oracle, and dynamic/token/uniform at each
//               fixed sparsity (Fig. 5c).
//   error       the selections of recall and budget, plus the output error of each (needs V).
// Tables and their columns: see the README section of proxyattn-analyze (and report.cpp).
//
// Cost: one fused pass per layer (layer_oracle.hpp: oracle + output errors + prefix tables),
// the estimators once per configuration (ProxyAttn with g = Hq reuses the pass's block max;
// pooled / xattn natives for further gammas are re-derived from their scores). With two or
// more (store, layer) units and threads, units run in parallel and the work inside each runs
// serially; results do not depend on the thread count.
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "proxyattn/budget.hpp"
#include "proxyattn/estimator.hpp"

namespace proxyattn {
class Distributed;
}

namespace proxyattn::analysis {

struct AnalyzeConfig {
  std::string command = "all";  // similarity | recall | budget | error | all
  std::vector<std::string> stores;
  std::vector<int> layers;      // empty: every layer of each store
  std::vector<std::string> methods{"proxy", "pooled", "xattn", "flexprefill", "vslash", "oracle"};
  std::vector<double> sparsity{0.5, 0.7, 0.8, 0.9, 0.95};  // each in [0, 1)
  std::vector<double> gamma{0.9, 0.95};                   // each in (0, 1]
  std::vector<int> groups;      // proxy group counts; empty: every divisor of Hq (per store)
  int block = 128;
  // How a method's selection is brought to a fixed density: "auto" (per method, see
  // analyze.cpp: proxy scales its dynamic budgets, oracle takes the globally best blocks,
  // methods with a native selection cut/grow it), or one of select.hpp's DensityRule names
  // for every method.
  std::string density_rule = "auto";
  std::vector<double> topk_fractions{0.01, 0.05};
  int sim_rows = 0;             // rows for cosine/Spearman, 0 = all (SimilarityOptions)
  std::string device = "cpu";   // cpu | cuda (needs a CUDA build and a device)
  int threads = 0;              // 0 = OpenMP default
  // (store, layer) units in flight when they run one after another: 2 lets one unit's CPU stages
  // (selections, metrics) overlap the other's GPU stages. 0 = auto: 2 with --device cuda when two
  // units fit host and GPU memory, else 1. Results do not depend on it.
  int lanes = 0;
  bool quiet = false;
  bool allow_nonfinite = false;
  EstimatorConfig estimator;    // knobs of the estimators (block is taken from `block`)
  BudgetConfig budget;          // k_min and mode of dynamic/token/uniform
  std::vector<std::string> argv;  // recorded in the report
};

// Checks everything that does not need a store: command, method names, sparsity in [0, 1),
// gamma in (0, 1], block a power of two, density rule, top-k fractions, device. Throws Error
// naming the flag ("--gamma: 1.5 outside (0, 1]").
void validate_config(const AnalyzeConfig& cfg);

// Runs the analysis and returns the report document (report.hpp). Opens and checks every store
// (readable, layers in range, groups dividing Hq, V present where the error topic needs it)
// before any heavy work. Progress per (store, layer) on stderr unless quiet.
// Under MPI (dist with size() > 1) every rank runs its share of the (store, layer) units
// (balanced by cost) and rank 0 returns the merged report, equal number for number to a
// single-process run (timing aside); the other ranks return null. A failure on any rank throws
// on every rank with that rank's message.
nlohmann::json analyze(const AnalyzeConfig& cfg, const Distributed* dist = nullptr);

// Every divisor of n, ascending (the default proxy group counts).
std::vector<int> divisors(int n);

}  // namespace proxyattn::analysis
