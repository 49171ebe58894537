#pragma once
// The exact per-layer quantities every metric shares, computed once per layer on the CPU:
// oracle block mass, row log-sum-exp and the last query block's token probabilities (one
// fused pass), and the output error of any number of block masks (a second pass that needs V).
//
// Both passes work on one (head, query block) panel at a time: the B x (i+1)B scores of query
// block i, never an N x N buffer (memory O(N d + H Nb^2) plus one panel per thread). The
// products use AVX2+FMA micro-kernels when the CPU has them (chosen at run time).
#include <cstdint>
#include <vector>

#include "proxyattn/attention.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/tensor.hpp"

namespace proxyattn::analysis {

struct LayerOracle {
  AttentionShape shape;
  BlockMass mass;                       // [Hq, Nb, Nb], rows sum to 1
  std::vector<float> lse;               // [Hq * N], natural-log row LSE of the scaled scores
  // [Hq * N]: per head, the mean over the rows of the last query block of P_h[q, k] for every
  // key token k (the "last-block rows" of the top-k token overlap); sums to 1 per head.
  std::vector<float> last_block_probs;
  // [Hq, Nb, Nb]: max over q in block i, k in block j, k <= q of P_h[q, k] (0 above the
  // diagonal). This is ProxyAttn's score Ag with one group per query head (g = Hq: the proxy
  // of a group of one head is the head itself), so the analysis takes it from here instead of
  // scoring every head a second time.
  std::vector<float> block_max;
};

// One pass: scores, row max, exp, row sums -> LSE, block mass, block max, last-block token
// probabilities.
LayerOracle layer_oracle(ConstView q, ConstView k, int block);

// Relative output error per mask and head, ||O_sparse - O_full||_F / ||O_full||_F over the
// head's N x d output, where O_sparse is what block-sparse attention with the mask computes
// (softmax over the selected keys only, causal inside the diagonal block). One pass computes,
// per (head, query block), the probabilities from the oracle's LSE, per key block the partial
// outputs sum_{k in j} P[q, k] V[k] and masses, and assembles every mask's rows from them.
// A row whose selection holds no mass at all (empty, or underflow) gives O_sparse = 0 and is
// counted in empty_rows.
struct OutputErrors {
  std::vector<std::vector<double>> rel_error;  // [mask][head]
  std::vector<int64_t> empty_rows;             // [mask]: query rows with no selected mass
};
OutputErrors output_errors(ConstView q, ConstView k, ConstView v, const LayerOracle& oracle,
                           const std::vector<const BlockMask*>& masks);

// ---- one fused pass ---------------------------------------------------------------------------
//
// Masks that depend on the oracle itself (the oracle's own selections, budgets read from the
// exact mass) cannot be listed before the oracle pass. They are, however, prefixes of a ranking
// in every row: row i of the selection = the first m_i blocks of a fixed order of the blocks
// 0..i (the oracle ranks by M_h[i, :]; select.hpp ranks forced blocks first, then by score).
// For such a ranking the fused pass records the squared output error of EVERY prefix length of
// every row, so the error of any mask built later from that ranking is a sum of table entries.
// One pass then gives the oracle, the errors of the masks known in advance, and prefix tables.

// Row layouts: per (head, row i) the causal blocks 0..i (order) or the prefix lengths 0..i+1
// (tables), rows concatenated.
inline size_t causal_offset(int h, int i, int nb) {
  return static_cast<size_t>(h) * nb * (nb + 1) / 2 + static_cast<size_t>(i) * (i + 1) / 2;
}
inline size_t prefix_offset(int h, int i, int nb) {
  return static_cast<size_t>(h) * nb * (nb + 3) / 2 + static_cast<size_t>(i) * (i + 3) / 2;
}

// Rank order of the blocks 0..i of one row into out[0..i]: forced blocks first (0 if sink,
// i if diagonal, in block order), then by descending score, NaN lowest, ties by lower block
// (the order of select.hpp; with no forced blocks the order of the oracle).
void rank_order(const float* row, int i, bool sink, bool diagonal, int32_t* out);

struct Ranking {
  enum class Source {
    mass,       // the oracle's block mass rows (computed in the pass)
    block_max,  // LayerOracle::block_max rows (ProxyAttn's score with g = Hq)
    given,      // `order` below, computed before the pass
  };
  Source source = Source::mass;
  bool sink = false, diagonal = false;  // forced blocks (mass / block_max sources)
  std::vector<int32_t> order;           // given: causal layout, see causal_offset
};
// The order of every row of a [heads, Nb, Nb] score array (causal layout).
std::vector<int32_t> rank_orders(const float* scores, int heads, int nb, bool sink, bool diagonal);
// Whether a mask is a prefix of such an order per row: select.hpp is_prefix_of_order.

struct PrefixErrors {
  int heads = 0, num_blocks = 0;
  std::vector<int32_t> order;       // causal layout
  std::vector<double> sq_error;     // prefix layout: summed over the block's query rows
  std::vector<int32_t> empty_rows;  // prefix layout: rows with no selected mass
};

struct LayerPass {
  LayerOracle oracle;
  std::vector<double> full_sq;        // [Hq]: ||O_full_h||_F^2 (empty without V)
  OutputErrors errors;                // of the masks given to layer_pass
  std::vector<PrefixErrors> prefix;   // per ranking given to layer_pass
};

// The oracle (as layer_oracle) and, when v is given, the output error of `masks` and the prefix
// tables of `rankings`, in one pass over the (head, query block) panels.
LayerPass layer_pass(ConstView q, ConstView k, ConstView v, int block,
                     const std::vector<const BlockMask*>& masks = {},
                     const std::vector<Ranking>& rankings = {});

// Relative output error per head of a mask from a prefix table: false (outputs untouched) when
// some row of the mask is not a prefix of the table's order.
bool prefix_mask_errors(const PrefixErrors& table, const std::vector<double>& full_sq,
                        const BlockMask& mask, std::vector<double>& rel_error, int64_t& empty_rows);

}  // namespace proxyattn::analysis
