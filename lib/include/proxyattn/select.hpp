#pragma once
// Selection: block scores + budgets -> the one BlockMask type (ALGORITHMS.md step 5).
//
// Rule of every function here, per head h and query block i (causal blocks j <= i):
//   1. forced blocks: the sink block 0, the diagonal i and the local window i-1 .. i-w;
//   2. then the remaining causal blocks in descending score, ties by lower j, until the row
//      holds max(forced, min(budget, i + 1)) blocks (all causal blocks when i + 1 <= budget).
// Deterministic: the same scores always give the same mask. NaN scores rank lowest.
#include <cstdint>

#include "proxyattn/block_mask.hpp"
#include "proxyattn/budget.hpp"
#include "proxyattn/estimator.hpp"

namespace proxyattn {

struct SelectOptions {
  bool sink = true;      // always keep block 0
  bool diagonal = true;  // always keep block i
  int local_window = 0;  // also always keep blocks i-1 .. i-w (w >= 0)
};

// Per-row budgets from `budgets` (row_k). Throws Error when shapes differ.
BlockMask select_blocks(const BlockScores& scores, const Budgets& budgets,
                        const SelectOptions& options = {});

// The order select_blocks takes each row's blocks in: the forced blocks (sink, diagonal, window;
// ascending), then the others by descending score (NaN lowest, ties lower j). Causal layout: row
// (h, i) at h Nb (Nb + 1) / 2 + i (i + 1) / 2. Computed once per score set, it turns every later
// selection from those scores into a prefix per row (select_blocks_in_order).
std::vector<int32_t> selection_order(const BlockScores& scores, const SelectOptions& options = {});
// Per score head (data: heads x per_head floats), the first head of its run of bitwise-equal
// neighbours: itself unless it equals the head before (the members of one proxy group carry
// copies of its scores), so rankings are taken once per run. Compared in parallel.
std::vector<int> equal_head_leaders(const float* data, int heads, size_t per_head);
// One row of it: the blocks 0..i of `row` into out[0..i].
void selection_order_row(const float* row, int i, const SelectOptions& options, int32_t* out);
// True when every row of mask holds (as a set) the first |row| blocks of that row of `order`
// (selection_order's layout): then the mask is a prefix per row of that ranking. O(selected).
bool is_prefix_of_order(const BlockMask& mask, const std::vector<int32_t>& order);
// The order the native_adjust selections of a native mask are prefixes of: per row the forced
// blocks, then the native mask's other blocks, then the rest, each part in the order of `order`
// (selection_order(scores, options) of the scores the native came with).
std::vector<int32_t> native_first_order(const BlockMask& native, const std::vector<int32_t>& order,
                                        const SelectOptions& options = {});
// select_blocks(scores, budgets, options) from selection_order(scores, options): the same mask,
// O(selected) per row instead of a partial sort.
BlockMask select_blocks_in_order(const BlockScores& scores, const std::vector<int32_t>& order, const Budgets& budgets,
                                 const SelectOptions& options = {});

// The same budget k (>= 1) in every row of every head.
BlockMask select_top_k(const BlockScores& scores, int k, const SelectOptions& options = {});

// Fixed-density comparisons: target block density in (0, 1] (density = selected causal
// blocks / (Nb (Nb + 1) / 2), BlockMask::density). Rules:
enum class DensityRule {
  // One per-row budget k shared by every row and head (select_top_k): the k in [1, Nb] whose
  // mean density over heads is closest to the target (ties: the smaller k). Forced blocks
  // count, so very low targets may be unreachable; the lowest reachable density is returned.
  row_uniform,
  // Per head, T = round(density * Nb (Nb + 1) / 2) blocks (at least the forced ones): forced
  // blocks first, then all remaining causal blocks of the head by descending score (ties:
  // lower i, then lower j). Scores of different rows are compared directly.
  head_global,
  // Per head, the method's native selection cut (lowest-scoring non-forced native blocks
  // dropped) or grown (highest-scoring other blocks added) to the same T as head_global.
  // Equals head_global when the scores have no native mask.
  native_adjust,
};
std::string_view density_rule_name(DensityRule r);   // "row_uniform", "head_global", "native_adjust"
DensityRule parse_density_rule(std::string_view s);  // throws Error listing the valid names

// Throws Error when density is outside (0, 1].
BlockMask select_to_density(const BlockScores& scores, double density,
                            DensityRule rule = DensityRule::row_uniform,
                            const SelectOptions& options = {});
// The same with row_uniform selected from a precomputed selection_order of the same options
// (same mask); the other rules as above.
BlockMask select_to_density(const BlockScores& scores, const std::vector<int32_t>& order, double density,
                            DensityRule rule, const SelectOptions& options = {});
// select_to_density for each of several densities of one score set: the same masks, the cells
// of each head ranked once for all (head_global, native_adjust).
std::vector<BlockMask> select_to_densities(const BlockScores& scores, const std::vector<double>& densities,
                                           DensityRule rule, const SelectOptions& options = {});

// Budgets scaled to a target density: per_row_k' = max(1, round(c * per_row_k)) with the
// scale c > 0 (bisection) whose mask's mean density over heads is closest to the target; keeps
// each head's relative budget (how the dynamic / token / oracle budgets are compared at a fixed
// density). If `scaled` is non-null it receives the scaled budgets.
BlockMask select_budgets_to_density(const BlockScores& scores, const Budgets& budgets,
                                    double density, const SelectOptions& options = {},
                                    Budgets* scaled = nullptr);
// The same with the final selection from a precomputed selection_order (same mask).
BlockMask select_budgets_to_density(const BlockScores& scores, const std::vector<int32_t>& order,
                                    const Budgets& budgets, double density, const SelectOptions& options = {});

}  // namespace proxyattn
