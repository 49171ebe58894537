// Budgets: dynamic (ProxyAttn block-aware), token, uniform, cumulative, oracle.
#include "proxyattn/budget.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "estimator_util.hpp"
#include "proxyattn/error.hpp"

namespace proxyattn {

using detail::str;

std::string_view budget_mode_name(BudgetMode m) {
  return m == BudgetMode::constant ? "constant" : "proportional";
}

BudgetMode parse_budget_mode(std::string_view s) {
  if (s == "constant") return BudgetMode::constant;
  if (s == "proportional") return BudgetMode::proportional;
  throw Error("unknown budget mode '" + std::string(s) + "' (valid: constant, proportional)");
}

void validate_budget_config(const BudgetConfig& c) {
  if (!(c.gamma > 0.0 && c.gamma <= 1.0))
    throw Error("budget config: gamma = " + str(c.gamma) + " must be in (0, 1]");
  if (c.k_min < 1) throw Error("budget config: k_min = " + std::to_string(c.k_min) + " must be >= 1");
  if (c.uniform_k < 1)
    throw Error("budget config: uniform_k = " + std::to_string(c.uniform_k) + " must be >= 1");
}

double Budgets::mean_row_k(int h) const {
  double s = 0;
  for (int i = 0; i < num_blocks; ++i) s += std::min(row_k(h, i), i + 1);
  return num_blocks ? s / num_blocks : 0.0;
}

template <class T>
static int64_t count_to_coverage_impl(const T* v, int64_t n, double gamma) {
  const std::vector<int32_t> order = detail::order_desc(v, n);
  double total = 0;
  for (int32_t j : order)
    if (v[j] > 0) total += v[j];
  if (total <= 0) return 0;
  double acc = 0;
  int64_t count = 0;
  for (int32_t j : order) {
    ++count;
    acc += v[j];
    if (acc >= gamma * total) break;
  }
  return count;
}
int64_t count_to_coverage(const double* v, int64_t n, double gamma) { return count_to_coverage_impl(v, n, gamma); }
int64_t count_to_coverage(const float* v, int64_t n, double gamma) { return count_to_coverage_impl(v, n, gamma); }

int32_t row_budget(int32_t k, int i, int num_blocks, BudgetMode mode) {
  if (mode == BudgetMode::constant) return std::max(1, k);
  const int64_t p = (static_cast<int64_t>(k) * (i + 1) + num_blocks - 1) / num_blocks;  // ceil
  return static_cast<int32_t>(std::max<int64_t>(1, p));
}

namespace {

// Mean over the last query block's rows of the exact probabilities, per key token ([H, N]).
std::vector<double> last_block_tokens(ConstView q, ConstView k, int block) {
  const AttentionShape s = check_qkv(q, k);
  const int nb = num_blocks_for(s.seq_len, block);
  const int64_t N = s.seq_len, r0 = static_cast<int64_t>(nb - 1) * block, L = N - r0;
  std::vector<double> out(static_cast<size_t>(s.q_heads) * N, 0.0);
  std::vector<detail::kern::Transposed> kt(s.kv_heads);
  detail::parallel_for(s.kv_heads, [&](int64_t h) { kt[h] = detail::kern::transpose_head(k, h); });
  detail::parallel_for(s.q_heads, [&](int64_t h) {
    double* o = out.data() + h * N;
    detail::for_each_prob_chunk(q, kt[s.kv_head_of(static_cast<int>(h))], h, r0, L,
                                [&](int64_t k0, int64_t nk, const float* P, int64_t ldp) {
                                  for (int64_t r = 0; r < L; ++r)
                                    for (int64_t c = 0; c < nk; ++c) o[k0 + c] += P[r * ldp + c];
                                });
    for (int64_t t = 0; t < N; ++t) o[t] /= static_cast<double>(L);
  });
  return out;
}

void check_scores(const BlockScores& s) {
  if (s.heads <= 0 || s.num_blocks <= 0 || s.score.size() != static_cast<size_t>(s.heads) * s.num_blocks * s.num_blocks)
    throw Error("budget: block scores of '" + s.method + "' are empty or mis-shaped");
}

Budgets empty_budgets(const std::string& kind, const BlockScores& s) {
  Budgets b;
  b.kind = kind;
  b.heads = s.heads;
  b.num_blocks = s.num_blocks;
  b.per_head_k.assign(s.heads, 0.0);
  b.per_row_k.assign(static_cast<size_t>(s.heads) * s.num_blocks, 1);
  return b;
}

void check_layer(ConstView q, ConstView k, const BlockScores& s) {
  const AttentionShape sh = check_qkv(q, k);
  if (sh.q_heads != s.heads || sh.seq_len != s.seq_len)
    throw Error("budget: scores are for " + std::to_string(s.heads) + " heads x " + std::to_string(s.seq_len) +
                " tokens, the layer has " + std::to_string(sh.q_heads) + " x " + std::to_string(sh.seq_len));
}

// dynamic and token share everything but how k_h is counted.
class LastBlockBudget final : public Budget {
 public:
  explicit LastBlockBudget(bool token) : token_(token) {}
  std::string name() const override { return token_ ? "token" : "dynamic"; }
  std::string description() const override {
    return token_ ? "token-level budget: tokens of the last block reaching gamma, / B, ceil"
                  : "ProxyAttn block-aware budget: blocks of the last query block reaching gamma";
  }
  Budgets compute(ConstView q, ConstView k, const BlockScores& s, const BudgetConfig& c, const BlockMass*,
                  const std::vector<float>* last_probs) const override {
    validate_budget_config(c);
    check_scores(s);
    check_layer(q, k, s);
    const int nb = s.num_blocks, B = s.block;
    const int64_t N = s.seq_len;
    Budgets b = empty_budgets(name(), s);
    b.last_block_mass.assign(s.heads, 0.0);
    std::vector<double> tok;
    if (last_probs) {
      if (last_probs->size() != static_cast<size_t>(s.heads) * N)
        throw Error(name() + " budget: last_block_probs has " + std::to_string(last_probs->size()) +
                    " values, expected Hq * N = " + std::to_string(static_cast<size_t>(s.heads) * N));
      tok.assign(last_probs->begin(), last_probs->end());
    } else {
      tok = last_block_tokens(q, k, B);
    }
    // Heads are independent (each writes its own entries): in parallel, same result.
    detail::parallel_for(s.heads, [&](int64_t h64) {
      const int h = static_cast<int>(h64);
      const double* t = tok.data() + static_cast<size_t>(h) * N;
      std::vector<double> p(nb, 0.0);
      for (int64_t x = 0; x < N; ++x) p[x / B] += t[x];
      int64_t kh = token_ ? (count_to_coverage(t, N, c.gamma) + B - 1) / B : count_to_coverage(p.data(), nb, c.gamma);
      kh = std::clamp<int64_t>(kh, std::min(c.k_min, nb), nb);
      b.per_head_k[h] = static_cast<double>(kh);
      const std::vector<int32_t> order = detail::order_desc(p.data(), nb);
      for (int64_t r = 0; r < kh; ++r) b.last_block_mass[h] += p[order[r]];
      for (int i = 0; i < nb; ++i)
        b.per_row_k[static_cast<size_t>(h) * nb + i] = row_budget(static_cast<int32_t>(kh), i, nb, c.mode);
    });
    return b;
  }

 private:
  bool token_;
};

class UniformBudget final : public Budget {
 public:
  std::string name() const override { return "uniform"; }
  std::string description() const override { return "the same k blocks per row for every head"; }
  Budgets compute(ConstView, ConstView, const BlockScores& s, const BudgetConfig& c, const BlockMass*,
                  const std::vector<float>*) const override {
    validate_budget_config(c);
    check_scores(s);
    Budgets b = empty_budgets(name(), s);
    for (int h = 0; h < s.heads; ++h) {
      b.per_head_k[h] = c.uniform_k;
      for (int i = 0; i < s.num_blocks; ++i)
        b.per_row_k[static_cast<size_t>(h) * s.num_blocks + i] = row_budget(c.uniform_k, i, s.num_blocks, c.mode);
    }
    return b;
  }
};

// Per row: block 0 and the diagonal first (what selection always keeps), then descending
// normalised score; the count of that order reaching gamma of the row's causal sum. With
// global = true the same order runs over the whole head (all sinks and diagonals first, then
// every other causal block by descending row-normalised score, ties lower i then j) and each
// row's budget is its share of the prefix reaching gamma * Nb.
class CumulativeBudget final : public Budget {
 public:
  std::string name() const override { return "cumulative"; }
  std::string description() const override {
    return "per-row coverage gamma of the estimator's normalised scores (FlexPrefill/XAttention)";
  }
  Budgets compute(ConstView, ConstView, const BlockScores& s, const BudgetConfig& c, const BlockMass*,
                  const std::vector<float>*) const override {
    validate_budget_config(c);
    check_scores(s);
    const int nb = s.num_blocks;
    Budgets b = empty_budgets(name(), s);
    detail::parallel_for(s.heads, [&](int64_t h64) {
      const int h = static_cast<int>(h64);
      int32_t* rk = b.per_row_k.data() + static_cast<size_t>(h) * nb;
      // Row-normalised scores (negative / NaN treated as 0).
      std::vector<std::vector<double>> rows(nb);
      for (int i = 0; i < nb; ++i) {
        const float* r = s.row(h, i);
        rows[i].resize(i + 1);
        double sum = 0;
        for (int j = 0; j <= i; ++j) sum += rows[i][j] = (r[j] > 0 ? r[j] : 0.0);
        // A row without information keeps only its forced blocks: all its weight on the sink.
        for (int j = 0; j <= i; ++j) rows[i][j] = sum > 0 ? rows[i][j] / sum : (j == 0 ? 1.0 : 0.0);
      }
      if (!c.global) {
        for (int i = 0; i < nb; ++i) {
          const std::vector<double>& w = rows[i];
          double acc = w[0] + (i > 0 ? w[i] : 0.0);
          int32_t count = i > 0 ? 2 : 1;
          std::vector<double> rest = w;
          rest[0] = -1;
          rest[i] = -1;
          for (int32_t j : detail::order_desc(rest.data(), i + 1)) {
            if (acc >= c.gamma || j == 0 || j == i) break;
            acc += w[j];
            ++count;
          }
          rk[i] = count;
        }
      } else {
        struct Cell {
          double w;
          int32_t i, j;
        };
        std::vector<Cell> cells;
        double acc = 0;
        for (int i = 0; i < nb; ++i) {
          rk[i] = i > 0 ? 2 : 1;  // sink + diagonal first
          acc += rows[i][0] + (i > 0 ? rows[i][i] : 0.0);
          for (int j = 1; j < i; ++j) cells.push_back({rows[i][j], i, j});
        }
        std::stable_sort(cells.begin(), cells.end(), [](const Cell& a, const Cell& x) { return a.w > x.w; });
        for (const Cell& cell : cells) {
          if (acc >= c.gamma * nb) break;
          acc += cell.w;
          ++rk[cell.i];
        }
      }
      double sum = 0;
      for (int i = 0; i < nb; ++i) sum += rk[i];
      b.per_head_k[h] = sum / nb;
    });
    return b;
  }
};

// Per row, the fewest blocks of the exact block mass reaching gamma (no forced blocks).
class OracleBudget final : public Budget {
 public:
  std::string name() const override { return "oracle"; }
  std::string description() const override { return "per row, fewest blocks of the exact block mass reaching gamma"; }
  Budgets compute(ConstView q, ConstView k, const BlockScores& s, const BudgetConfig& c, const BlockMass* mass,
                  const std::vector<float>*) const override {
    validate_budget_config(c);
    check_scores(s);
    BlockMass own;
    if (!mass) {
      check_layer(q, k, s);
      own = block_mass_cpu(q, k, s.block);
      mass = &own;
    }
    if (mass->heads != s.heads || mass->num_blocks != s.num_blocks || mass->block != s.block)
      throw Error("oracle budget: block mass is " + std::to_string(mass->heads) + " heads x " +
                  std::to_string(mass->num_blocks) + " blocks of " + std::to_string(mass->block) +
                  ", scores are " + std::to_string(s.heads) + " x " + std::to_string(s.num_blocks) + " of " +
                  std::to_string(s.block));
    const int nb = s.num_blocks;
    Budgets b = empty_budgets(name(), s);
    detail::parallel_for(s.heads, [&](int64_t h64) {  // heads independent: same result
      const int h = static_cast<int>(h64);
      double sum = 0;
      for (int i = 0; i < nb; ++i) {
        const int64_t n = count_to_coverage(mass->row(h, i), i + 1, c.gamma);
        b.per_row_k[static_cast<size_t>(h) * nb + i] = static_cast<int32_t>(std::max<int64_t>(1, n));
        sum += std::max<int64_t>(1, n);
      }
      b.per_head_k[h] = sum / nb;
    });
    return b;
  }
};

}  // namespace

std::vector<double> last_block_token_probs_cpu(ConstView q, ConstView k, int block) {
  return last_block_tokens(q, k, block);
}

std::vector<double> last_block_mass_cpu(ConstView q, ConstView k, int block) {
  const AttentionShape s = check_qkv(q, k);
  const int nb = num_blocks_for(s.seq_len, block);
  const std::vector<double> tok = last_block_tokens(q, k, block);
  std::vector<double> out(static_cast<size_t>(s.q_heads) * nb, 0.0);
  for (int h = 0; h < s.q_heads; ++h)
    for (int64_t t = 0; t < s.seq_len; ++t) out[static_cast<size_t>(h) * nb + t / block] += tok[h * s.seq_len + t];
  return out;
}

std::vector<std::string> budget_names() { return {"dynamic", "token", "uniform", "cumulative", "oracle"}; }

std::unique_ptr<Budget> make_budget(std::string_view name) {
  if (name == "dynamic") return std::make_unique<LastBlockBudget>(false);
  if (name == "token") return std::make_unique<LastBlockBudget>(true);
  if (name == "uniform") return std::make_unique<UniformBudget>();
  if (name == "cumulative") return std::make_unique<CumulativeBudget>();
  if (name == "oracle") return std::make_unique<OracleBudget>();
  std::string valid;
  for (const auto& n : budget_names()) valid += (valid.empty() ? "" : ", ") + n;
  throw Error("unknown budget '" + std::string(name) + "' (valid: " + valid + ")");
}

}  // namespace proxyattn
