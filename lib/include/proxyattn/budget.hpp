#pragma once
// Budgets: how many key blocks each query block of each head keeps (ALGORITHMS.md step 4 and
// the peers' rules). One interface, implementations chosen by name:
//
//   dynamic     ProxyAttn block-aware budget: last query block of head h, exact probabilities
//               against all keys, mean over those rows of the mass per key block p_h[j], sort
//               descending, k_h = fewest blocks reaching gamma, clamped to [k_min, Nb].
//   token       the token-level variant: mean probability per key token over the same rows,
//               count the fewest tokens reaching gamma, k_h = ceil(count / B), clamped.
//   uniform     k_h = uniform_k for every head.
//   cumulative  per row i: the estimator's scores normalised by the row's causal sum; block 0
//               and the diagonal first (their mass counts, as XAttention's find_blocks), then
//               descending score; the budget is the length of that order reaching gamma, so
//               select_blocks keeps exactly those blocks. global = true: the same over the
//               flattened head (all sinks and diagonals first, then every other block by
//               descending row-normalised score, ties lower i then j) until gamma * Nb; each
//               row's budget is its share of that prefix (FlexPrefill's global cover).
//   oracle      per row i: the fewest blocks of the exact block mass M_h[i, :] reaching gamma.
//
// For dynamic / token / uniform the per-row budget is k_h in every row (mode constant) or
// ceil(k_h * (i + 1) / Nb) (mode proportional), at least 1. Selection (select.hpp) keeps
// min(budget, i + 1) blocks of row i, never fewer than the forced sink/diagonal/window blocks.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "proxyattn/attention.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/tensor.hpp"

namespace proxyattn {

enum class BudgetMode {
  constant,      // k_h in every row (R: default)
  proportional,  // ceil(k_h * (i + 1) / Nb)
};
std::string_view budget_mode_name(BudgetMode m);    // "constant", "proportional"
BudgetMode parse_budget_mode(std::string_view s);   // throws Error listing the valid names

struct BudgetConfig {
  double gamma = 0.95;                  // coverage in (0, 1] (dynamic, token, cumulative, oracle)
  int k_min = 2;                        // dynamic/token clamp [k_min, Nb]; >= 1
  BudgetMode mode = BudgetMode::constant;  // dynamic, token, uniform
  int uniform_k = 8;                    // uniform: blocks per row; >= 1
  bool global = false;                  // cumulative: one budget over the flattened head
};
// Throws Error naming the field: gamma outside (0, 1], k_min < 1, uniform_k < 1.
void validate_budget_config(const BudgetConfig& c);

// Budgets of one layer.
struct Budgets {
  std::string kind;               // budget name
  int heads = 0, num_blocks = 0;
  // Per head: dynamic/token: k_h (after the clamp, before the mode is applied); uniform:
  // uniform_k; cumulative/oracle: mean over rows of per_row_k.
  std::vector<double> per_head_k;
  // [heads, Nb]: budget of row i of head h (>= 1; may exceed i + 1, selection caps it).
  std::vector<int32_t> per_row_k;
  // dynamic/token: the mass of the last query block that the chosen k_h blocks actually keep
  // (block level, p_h summed over the k_h best blocks); empty for other kinds.
  std::vector<double> last_block_mass;

  int32_t row_k(int h, int i) const { return per_row_k[static_cast<size_t>(h) * num_blocks + i]; }
  // Mean over rows of min(per_row_k, i + 1): the blocks actually kept per row on average
  // before forced blocks are added.
  double mean_row_k(int h) const;
};

class Budget {
 public:
  virtual ~Budget() = default;
  virtual std::string name() const = 0;
  virtual std::string description() const = 0;
  // q, k: the layer (dynamic, token, oracle read them); scores: the estimator's output (its
  // shape fixes heads / Nb / B; cumulative reads its scores). oracle_mass: optional precomputed
  // exact block mass for `oracle` (computed here with block_mass_cpu when null).
  // last_block_probs: optional [Hq * N] mean over the rows of the last query block of
  // P_h[q, k] per key token (analysis::LayerOracle::last_block_probs, or
  // last_block_token_probs_cpu), reused by dynamic / token instead of recomputed (~2 x Hq x B x N
  // x d work per call).
  virtual Budgets compute(ConstView q, ConstView k, const BlockScores& scores,
                          const BudgetConfig& config, const BlockMass* oracle_mass = nullptr,
                          const std::vector<float>* last_block_probs = nullptr) const = 0;
};

// "dynamic", "token", "uniform", "cumulative", "oracle". Unknown -> Error listing valid names.
std::unique_ptr<Budget> make_budget(std::string_view name);
std::vector<std::string> budget_names();

// ---- building blocks (tests, analysis, GPU comparison) ----

// Per query head h: p_h[j] = mean over the rows of the LAST query block of the exact causal
// probability mass in key block j. [Hq, Nb], each row sums to 1.
std::vector<double> last_block_mass_cpu(ConstView q, ConstView k, int block);
// Same at token level: [Hq, N] mean probability per key token over the last block's rows.
std::vector<double> last_block_token_probs_cpu(ConstView q, ConstView k, int block);

// Fewest entries of `values` (non-negative) whose descending-sorted prefix sum reaches
// gamma * sum(values) (ties: lower index first); 0 for an empty or all-zero input.
int64_t count_to_coverage(const double* values, int64_t n, double gamma);
int64_t count_to_coverage(const float* values, int64_t n, double gamma);

// Per-row budget from a head budget: constant -> k, proportional -> max(1, ceil(k (i+1) / Nb)).
int32_t row_budget(int32_t k, int i, int num_blocks, BudgetMode mode);

}  // namespace proxyattn
