#pragma once
// Metrics of block selections against the oracle block mass (ALGORITHMS.md, "Metrics").
// Every function is pure: it takes a BlockMask and/or a BlockMass (and scores) of one layer
// and returns numbers; the analysis driver (analyze.hpp) decides what to compute and where the
// numbers go. CPU, multithreaded with OpenMP over heads/rows where it matters, sums in float64.
//
// Conventions shared by every function here:
//  - Only the causal part of a row counts: row i of a head has the key blocks j = 0..i.
//  - Ranking by a score (oracle mass or an estimator's score) is descending, NaN after every
//    number, ties broken by the lower key-block id, so every selection is deterministic.
//  - "Reaching gamma": the fewest top-ranked blocks whose mass sum is >= gamma * (row sum),
//    with a relative slack of 1e-9 so gamma = 1 is reachable despite float rounding.
//  - Percentiles interpolate linearly between order statistics (numpy's default).
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "proxyattn/attention.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/budget.hpp"
#include "proxyattn/estimator.hpp"

namespace proxyattn {
struct MethodInfo;
}

namespace proxyattn::analysis {

// ---- summaries -------------------------------------------------------------------------------

// p in [0, 100]; NaNs are ignored; NaN when no finite value is left.
double percentile(std::span<const double> values, double p);

struct Summary {
  int64_t count = 0;  // finite values summarized
  double mean = 0, min = 0, p5 = 0, p25 = 0, median = 0, p75 = 0, p95 = 0, max = 0;
};
// NaNs are ignored; every field is NaN (count 0) when no finite value is left.
Summary summarize(std::span<const double> values);

// ---- density ---------------------------------------------------------------------------------

struct HeadDensity {
  int head = 0;
  int64_t selected = 0;       // selected causal blocks
  int64_t causal_blocks = 0;  // Nb (Nb + 1) / 2
  double density = 0;         // selected / causal_blocks
  double element_density = 0; // causal (q, k) pairs computed / (N (N + 1) / 2)
  double sparsity() const { return 1.0 - density; }
};
std::vector<HeadDensity> density_per_head(const BlockMask& mask);

// ---- oracle rankings and budgets -------------------------------------------------------------

// Key blocks 0..i of one row, ranked by score (descending, ties by lower id).
std::vector<int32_t> rank_row(const float* row, int i);
// Fewest top-ranked blocks of row i (blocks 0..i) whose mass reaches gamma; in [1, i + 1].
int row_budget(const float* row, int i, double gamma);

// Per-row oracle budget at gamma for every head and query block.
struct OracleBudget {
  int heads = 0, num_blocks = 0;
  double gamma = 0;
  std::vector<int32_t> per_row;  // [heads * Nb]
  int32_t at(int h, int i) const { return per_row[static_cast<size_t>(h) * num_blocks + i]; }
  // Blocks of head h: the mean over rows (the "oracle budget" of the head), and all rows.
  double mean(int h) const;
  std::vector<double> rows(int h) const;
};
OracleBudget oracle_budget(const BlockMass& mass, double gamma);
// The same from mass_rank_positions(mass): each row's order read from its rank positions.
OracleBudget oracle_budget(const BlockMass& mass, double gamma, const std::vector<int32_t>& rank_pos);

// Oracle selections: per row the top-ranked blocks of the mass. No sink/diagonal forcing (the
// oracle needs none). k per row from a callback-free array [heads * Nb] (clamped to [0, i + 1]).
BlockMask oracle_topk_mask(const BlockMass& mass, std::span<const int32_t> k_per_row);
// The same from mass_rank_positions(mass): row i keeps the blocks of rank < k, no sort.
BlockMask oracle_topk_mask(const BlockMass& mass, std::span<const int32_t> k_per_row,
                           const std::vector<int32_t>& rank_pos);
// Per row the fewest blocks reaching gamma (the mask whose row sizes are oracle_budget()).
BlockMask oracle_gamma_mask(const BlockMass& mass, double gamma);

// Fixed-density oracle: the T = round(density * H * Nb (Nb + 1) / 2) causal cells of largest
// block mass over the whole layer (all heads and rows together, ties by lower head, row, block;
// no forced blocks). Mean mass recall over heads is (1 / (H Nb)) * the sum of the selected
// cells, so no selection with the same mean density over heads keeps more: the upper bound
// every method is compared with at a fixed sparsity. density in (0, 1].
BlockMask oracle_density_mask(const BlockMass& mass, double density);

// A method's selection at a fixed block density under the "auto" density rule, as its registry
// entry says (MethodInfo::auto_density): its dynamic budgets scaled to the density
// (scaled_dynamic; `dynamic` gives the budgets at the reference gamma), the layer's globally
// best blocks of the exact mass (layer_global; `mass`), or its native selection cut or grown by
// score (native_adjust). Sink and diagonal forced unless the method says otherwise. `order`:
// selection_order(scores) for the default options when the caller has it (a faster route to
// the same mask). The callbacks are called only by the rule that needs them. What the analysis'
// fixed-sparsity selections and proxyattn-eval's fixed-sparsity points both run.
BlockMask auto_density_mask(const MethodInfo& method, const BlockScores& scores, double density,
                            const std::function<const Budgets&()>& dynamic,
                            const std::function<const BlockMass&()>& mass,
                            const std::vector<int32_t>* order = nullptr);
// The same for several densities of one score set (the same masks; native_adjust ranks each
// head's cells once for all, select_to_densities).
std::vector<BlockMask> auto_density_masks(const MethodInfo& method, const BlockScores& scores,
                                          const std::vector<double>& densities,
                                          const std::function<const Budgets&()>& dynamic,
                                          const std::function<const BlockMass&()>& mass,
                                          const std::vector<int32_t>* order = nullptr);

// ---- recall ----------------------------------------------------------------------------------

// Mass recall per head: mean over query blocks i of sum_{j in S_h[i]} M_h[i, j].
std::vector<double> mass_recall_per_head(const BlockMask& sel, const BlockMass& mass);
// Block recall per head vs the oracle at the same per-row budget: per row k = |S_h[i]|,
// S* = top-k of M_h[i, :], recall = |S cap S*| / k; mean over rows with k > 0 (NaN if none).
std::vector<double> block_recall_per_head(const BlockMask& sel, const BlockMass& mass);
// The same from the rank of every block in its mass row (mass_rank_positions), computed once per
// layer: O(selected blocks) per mask instead of a partial sort of every row.
std::vector<double> block_recall_per_head(const BlockMask& sel, const BlockMass& mass,
                                          const std::vector<int32_t>& rank_pos);
// mass_recall_per_head and block_recall_per_head(sel, mass, rank_pos) in one pass over the mask.
void recall_per_head(const BlockMask& sel, const BlockMass& mass, const std::vector<int32_t>& rank_pos,
                     std::vector<double>& mass_recall, std::vector<double>& block_recall);
// Position of block j in the descending order of row (h, i) of the mass (ties: lower j first),
// in the causal layout of layer_oracle.hpp (row (h, i) at h Nb (Nb + 1) / 2 + i (i + 1) / 2).
std::vector<int32_t> mass_rank_positions(const BlockMass& mass);

// ---- estimator scores ------------------------------------------------------------------------

// Read-only view of block scores [score_heads, Nb, Nb] (row-major, causal part used). Query
// head h reads score head h / (q_heads / score_heads): one score head per query head, per GQA
// group, or per proxy group (contiguous groups), by the same index mapping.
struct ScoreView {
  const float* data = nullptr;
  int score_heads = 0, num_blocks = 0, q_heads = 0;
  int score_head_of(int h) const { return h / (q_heads / score_heads); }
  const float* row(int h, int i) const {
    return data + (static_cast<size_t>(score_head_of(h)) * num_blocks + i) * num_blocks;
  }
};

// Ranking quality of a score at the oracle's own per-row budget (ALGORITHMS.md "fidelity of
// each proxy"): per row k = oracle budget at gamma, S = top-k of the score row, S* = top-k of
// the mass row. Per query head: block recall |S cap S*| / k, mass recall of S (mean over rows of
// the mass S keeps), and mass ratio (mean over rows of mass(S) / mass(S*)).
struct RankingFidelity {
  int head = 0;
  double block_recall = 0, mass_recall = 0, mass_ratio = 0;
};
std::vector<RankingFidelity> ranking_fidelity(const ScoreView& scores, const BlockMass& mass,
                                              const OracleBudget& budget);
// The same for several score sets ([set][head]): each mass row's top k is ranked once for all.
std::vector<std::vector<RankingFidelity>> ranking_fidelity(std::span<const ScoreView> views, const BlockMass& mass,
                                                           const OracleBudget& budget);
// ... and at several oracle budgets ([budget][set][head], each as the one-budget call gives it):
// every ranking once, at the largest budget (a smaller one's top k is a prefix of it).
std::vector<std::vector<std::vector<RankingFidelity>>> ranking_fidelity(std::span<const ScoreView> views,
                                                                        const BlockMass& mass,
                                                                        std::span<const OracleBudget* const> budgets);

// ---- budget accuracy -------------------------------------------------------------------------

// Estimated budgets vs the oracle budget at gamma. A budget is given per row (blocks of query
// block i; values above i + 1 mean "all causal blocks"), plus the per-head figure the method
// reports (k_h for dynamic/token/uniform, mean over rows for row-varying budgets).
struct BudgetAccuracy {
  int head = 0;
  double k_est = 0;            // the method's per-head budget as reported
  double k_effective = 0;      // mean over rows of min(k_row, i + 1): blocks actually used
  double oracle_mean = 0;      // oracle budget, mean over rows (the reference)
  double oracle_last_row = 0;  // oracle budget of the last query block (what a last-block
                               // estimate sees exactly)
  double rel_error = 0;        // (k_effective - oracle_mean) / oracle_mean: both count blocks
                               // a row can actually hold, so early rows compare like for like
  double abs_rel_error = 0;
  double mass_reached = 0;     // mean over rows of the mass of the top-min(k_row, i + 1)
                               // oracle-ranked blocks: what the budget alone can reach
  double rows_below_gamma = 0; // fraction of rows whose reached mass is < gamma
};
// k_est [heads], k_per_row [heads * Nb].
std::vector<BudgetAccuracy> budget_accuracy(std::span<const double> k_est,
                                            std::span<const int32_t> k_per_row,
                                            const BlockMass& mass, const OracleBudget& budget);
// Convenience for one (possibly fractional: the token-level variant counts tokens / B) budget
// per head, rounded up to whole blocks: every row uses ceil(k_h), or with proportional = true
// max(1, ceil(k_h * (i + 1) / Nb)) (ALGORITHMS.md step 5).
std::vector<BudgetAccuracy> budget_accuracy(std::span<const double> k_est, const BlockMass& mass,
                                            const OracleBudget& budget, bool proportional = false);
// Several budgets at once ([request][head], each as the first form gives it alone): each mass row
// is put in rank order once (from mass_rank_positions) and every request's top-k mass is read off
// one running sum of it, instead of a partial sort per row and request.
struct BudgetAccuracyRequest {
  std::span<const double> k_est;        // [heads]
  std::span<const int32_t> k_per_row;   // [heads * Nb]
  const OracleBudget* oracle = nullptr;
};
std::vector<std::vector<BudgetAccuracy>> budget_accuracy(std::span<const BudgetAccuracyRequest> requests,
                                                         const BlockMass& mass, const std::vector<int32_t>& rank_pos);

// ---- head similarity (paper Fig. 2) ----------------------------------------------------------

struct SimilarityOptions {
  // Top-k sizes as fractions of N (k = max(1, round(f * N))).
  std::vector<double> topk_fractions{0.01, 0.05};
  // Query blocks used for cosine/Spearman: 0 = every row i >= 1 (row 0 has one block); else at
  // most this many rows, evenly spaced over [1, Nb - 1].
  int max_rows = 0;
};

// Matrices [H * H] (row a, column b), symmetric, diagonal 1.
struct HeadSimilarity {
  int heads = 0;
  std::vector<double> topk_fractions;
  std::vector<int64_t> topk_k;                   // per fraction
  std::vector<std::vector<double>> topk_overlap; // per fraction: |T_a cap T_b| / k
  std::vector<double> cosine;    // mean over used rows of cos(M_a[i, 0..i], M_b[i, 0..i])
  std::vector<double> spearman;  // same for Spearman's rho (average ranks for ties); rows where
                                 // either side is constant are skipped (NaN if none is left)
  int rows_used = 0;
  double at(const std::vector<double>& m, int a, int b) const {
    return m[static_cast<size_t>(a) * heads + b];
  }
};
// token_probs [H * N]: per head, the mean over the last query block's rows of P_h[q, k] for every
// key token k (LayerOracle::last_block_probs); T_h = its top-k token ids (ties by lower id).
HeadSimilarity head_similarity(const BlockMass& mass, std::span<const float> token_probs,
                               int64_t seq_len, const SimilarityOptions& opts = {});

// Top-k token ids of one head's token-probability vector, sorted ascending.
std::vector<int64_t> topk_tokens(std::span<const float> probs, int64_t k);

// Building blocks, exposed for tests: cosine (0 norm -> NaN) and Spearman (constant -> NaN).
double cosine_similarity(std::span<const float> a, std::span<const float> b);
double spearman_rho(std::span<const float> a, std::span<const float> b);

}  // namespace proxyattn::analysis
