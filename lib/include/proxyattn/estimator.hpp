#pragma once
// Block-importance estimators (ALGORITHMS.md): one interface, implementations chosen by name.
//
//   auto est = make_estimator("proxy");            // or pooled, flexprefill, xattn, vslash, oracle
//   BlockScores s = est->estimate(q, k, config);   // q [Hq, N, d], k [Hkv, N, d]
//
// An estimator turns one layer's Q/K into a block score per query head (higher = more
// important) and, where the method has its own selection rule, that selection (`native`).
// Budgets (budget.hpp) and selection (select.hpp) turn scores into a BlockMask.
// All estimators run on the CPU, float32 values with float64 softmax statistics, OpenMP over
// heads / blocks (thread count: set_cpu_threads / cpu_threads in attention.hpp), memory
// O(N d + H Nb^2): never an N x N buffer. The hot products use AVX2+FMA kernels chosen at run
// time (lib/src/estimator_kernels.cpp). Deterministic: same input, same scores and masks.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "proxyattn/attention.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/tensor.hpp"

namespace proxyattn {

// How a ProxyAttn group builds its proxy head. (R) ALGORITHMS.md step 2.
enum class ProxyPool {
  mean,      // Qg = mean of the group's query heads, Kg = mean of the distinct KV heads they read
  max_norm,  // the member query head with the largest ||Q_h||_F and the KV head it reads
};
std::string_view proxy_pool_name(ProxyPool p);  // "mean", "max_norm"
ProxyPool parse_proxy_pool(std::string_view s); // throws Error listing the valid names

// ProxyAttn scoring (`proxy`). (R) choices are knobs with the documented defaults.
struct ProxyConfig {
  int groups = 1;                 // g contiguous groups of Hq/g query heads; must divide Hq
  ProxyPool pool = ProxyPool::mean;
  int query_stride = 1;           // s: score only query rows r of a block with r % s == 0
                                  // (row offset inside the block); s >= 1
};

// Mean-pooled block scoring (`pooled`): A = block-causal row-softmax(Qbar Kbar^T / sqrt d).
struct PooledConfig {
  double gamma = 0.9;   // native selection: cumulative mass gamma in (0, 1]
  bool global = false;  // false: per row i; true: one budget over the flattened head, as
                        // FlexPrefill (entries divided by Nb so the head sums to 1)
};

// FlexPrefill full method (`flexprefill`).
struct FlexPrefillConfig {
  double gamma = 0.9;                // cumulative coverage for vertical, slash and query-aware
  double tau = 0.1;                  // sqrt(JSD) threshold (natural log): < tau -> query-aware
  int64_t min_budget_tokens = 1024;  // lower bound of the vertical and slash budgets, in tokens
                                     // (converted to max(1, ceil(min_budget_tokens / B)) blocks)
  int last_q = 128;                  // the last last_q queries estimate vertical/slash
};

// XAttention antidiagonal scoring (`xattn`).
struct XAttnConfig {
  int stride = 8;     // S: power of two, S <= block
  double tau = 0.9;   // native selection: per row, fewest blocks reaching tau (sink+diag first)
};

// MInference vertical-slash (`vslash`), mapped to blocks.
struct VSlashConfig {
  int last_q = 64;               // the last last_q queries estimate columns and diagonals
  int64_t vertical = 1000;       // kept columns (top by column sum, clamped to N)
  int64_t slash = 6096;          // kept diagonals (top by diagonal sum, clamped to N)
  int sink_columns = 30;         // columns 0..sink_columns-1 always kept (count in `vertical`)
  int local_diagonals = 100;     // offsets 0..local_diagonals-1 always kept (count in `slash`)
  // Length-relative counts: when > 0, vertical = ceil(vertical_fraction * N) and slash =
  // ceil(slash_fraction * N) replace the token counts above. MInference's published operating
  // point (1000 / 6096 tokens, tuned at 128K) keeps almost every block at 8K-16K; a fraction keeps
  // the same share of the context at every length.
  double vertical_fraction = 0;
  double slash_fraction = 0;
};
// The kept column and diagonal counts for a sequence of n tokens (fractions resolved, clamped
// to [0, n]).
int64_t vslash_vertical(const VSlashConfig& c, int64_t n);
int64_t vslash_slash(const VSlashConfig& c, int64_t n);

struct EstimatorConfig {
  int block = 128;  // B: positive power of two (64 and 128 are the tested sizes)
  ProxyConfig proxy;
  PooledConfig pooled;
  FlexPrefillConfig flexprefill;
  XAttnConfig xattn;
  VSlashConfig vslash;
};

// Throws Error naming the field ("estimator config: proxy.groups = 4 does not divide the 9
// query heads") for: block not a positive power of two, groups < 1 or not dividing q_heads,
// query_stride < 1, any gamma/tau coverage outside (0, 1], flexprefill.tau < 0, last_q < 1,
// xattn.stride not a power of two or > block, negative vslash counts. q_heads <= 0 skips the
// group check. `method` = an estimator name checks only the block and that method's section
// (what estimate() does); empty checks every section.
void validate_estimator_config(const EstimatorConfig& c, int q_heads = 0, std::string_view method = {});

// Block scores of one layer, per QUERY head.
//   score[(h * Nb + i) * Nb + j], h < heads, i, j < Nb; higher = more important.
//   Only the causal part (j <= i) is meaningful; entries above the diagonal are 0.
// What the numbers are, per method:
//   proxy       Ag[i, j] = max over q in i (every s-th row), k in j, k <= q of the proxy head's
//               causal token softmax; the group's score is broadcast to each member head.
//   pooled      row-softmax of Qbar Kbar^T / sqrt(d) over j <= i (rows sum to 1).
//   flexprefill query-aware heads: the pooled scores; vertical-slash heads:
//               vertical_block[j] + slash_block[i - j] (block-pooled column / diagonal mass of
//               the last queries; diagonal block offset ob = floor((q - k) / B)). `native` =
//               the method's own mask, step by step in estimator_peers.cpp: vertical/slash
//               budgets n = cover(gamma) / B + 1 clamped to [ceil(min_budget_tokens / B), Nb];
//               query-aware when sqrt(JSD) < tau, then budgets = the minimum plus the pooled
//               cover of the flattened head at gamma; column block 0 and the diagonal always.
//   xattn       W[I, J] = mean over the strided rows of block I of the summed strided softmax
//               cells of block J (rows sum to 1).
//   vslash      summed last-query attention of the KEPT columns in block j plus that of the
//               KEPT diagonals crossing block (i, j); 0 where nothing kept crosses.
//   oracle      exact block mass M_h[i, j] (rows sum to 1).
struct BlockScores {
  std::string method;          // estimator name
  int heads = 0;               // Hq
  int num_blocks = 0;          // Nb = ceil(N / B)
  int block = 0;               // B
  int64_t seq_len = 0;         // N
  std::vector<float> score;    // [heads, Nb, Nb]
  // The method's own selection where it has one, always including block 0 and the diagonal:
  // pooled: fewest blocks reaching pooled.gamma per row (or over the flattened head) union
  // sink + diagonal; flexprefill: see above; xattn: sink + diagonal first (their mass counts),
  // then descending W while the kept mass is < tau; vslash: every block a kept column or kept
  // diagonal crosses. None for proxy (use a Budget) and oracle.
  std::optional<BlockMask> native;
  // flexprefill only: per head, 1 = query-aware pattern chosen, 0 = vertical-slash; and the
  // sqrt(JSD) that decided it. Empty for other methods.
  std::vector<uint8_t> query_aware;
  std::vector<double> jsd;
  // proxy only: group of each query head (size heads). Empty for other methods.
  std::vector<int> group_of_head;

  const float* row(int h, int i) const {
    return score.data() + (static_cast<size_t>(h) * num_blocks + i) * num_blocks;
  }
  float* row(int h, int i) {
    return score.data() + (static_cast<size_t>(h) * num_blocks + i) * num_blocks;
  }
  float at(int h, int i, int j) const { return row(h, i)[j]; }
};

class Estimator {
 public:
  virtual ~Estimator() = default;
  virtual std::string name() const = 0;
  // One line for --help / reports.
  virtual std::string description() const = 0;
  // Validates shapes (check_qkv) and config (validate_estimator_config); throws Error.
  virtual BlockScores estimate(ConstView q, ConstView k, const EstimatorConfig& config) const = 0;
};

// "proxy", "pooled", "flexprefill", "xattn", "vslash", "oracle". Unknown name -> Error listing
// the valid names.
std::unique_ptr<Estimator> make_estimator(std::string_view name);
std::vector<std::string> estimator_names();

// Recomputes s.native from s.score alone where the method's native rule is a function of its
// scores (pooled: pooled.gamma / pooled.global; xattn: xattn.tau), e.g. to sweep gamma without
// estimating again; validates that section of c. Returns false and leaves s unchanged for the
// others (flexprefill and vslash need the last queries' raw statistics: estimate again; proxy
// and oracle have no native selection).
bool renative_from_scores(BlockScores& s, const EstimatorConfig& c);

// The oracle's BlockScores from an already computed exact block mass (what `oracle` returns,
// without recomputing the mass).
BlockScores scores_from_mass(const BlockMass& mass);

// ---- ProxyAttn building blocks (shared with the GPU path and the analysis) ----

// Group of query head h for `groups` contiguous groups of q_heads heads.
inline int proxy_group_of(int h, int q_heads, int groups) { return h / (q_heads / groups); }

// The proxy heads of a layer: q [g, N, d], k [g, N, d] (already pooled / picked per
// ProxyConfig), and the group of every query head.
struct ProxyHeads {
  Tensor3 q, k;
  std::vector<int> group_of_head;  // [Hq]
  std::vector<int> picked_head;    // max_norm: the member query head used per group; mean: -1
};
ProxyHeads make_proxy_heads(ConstView q, ConstView k, const ProxyConfig& config);

// Token-level causal softmax of q_h k_h^T / sqrt(d) for each head of (q, k) (same head count),
// max-pooled to blocks over k <= q: out[h, i, j]. Rows r of a block with r % query_stride != 0
// are skipped. Two passes (row LSE, then block max), no N x N buffer. Used by `proxy` on the
// proxy heads and by tests / analysis on real heads (Hq == Hkv required here).
std::vector<float> maxpool_block_scores(ConstView q, ConstView k, int block, int query_stride = 1);

}  // namespace proxyattn
