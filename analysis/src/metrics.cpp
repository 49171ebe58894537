// Metrics of block selections against the oracle block mass; see metrics.hpp for definitions.
#include "proxyattn/analysis/metrics.hpp"

#include "proxyattn/methods.hpp"
#include "proxyattn/select.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "proxyattn/error.hpp"
#include "proxyattn/rank_key.hpp"

namespace proxyattn::analysis {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// Parallel regions only pay off for large layers: on a shared 2-core machine a region for a
// few hundred microseconds of work mostly waits for the second thread.
bool worth_threads(const BlockMass& m) {
  return static_cast<int64_t>(m.heads) * m.num_blocks * m.num_blocks > (int64_t{1} << 20);
}

// Relative slack when comparing a cumulative mass with gamma (float rows summed in double).
constexpr double kGammaSlack = 1e-9;

void check_mass(const BlockMass& m, const char* what) {
  if (m.heads <= 0 || m.num_blocks <= 0 ||
      m.mass.size() != static_cast<size_t>(m.heads) * m.num_blocks * m.num_blocks)
    throw Error(std::string(what) + ": block mass is empty or inconsistent (" +
                std::to_string(m.heads) + " heads, " + std::to_string(m.num_blocks) +
                " blocks, " + std::to_string(m.mass.size()) + " values)");
}

void check_mask_vs_mass(const BlockMask& sel, const BlockMass& m, const char* what) {
  check_mass(m, what);
  if (sel.heads() != m.heads || sel.num_blocks() != m.num_blocks)
    throw Error(std::string(what) + ": selection has " + std::to_string(sel.heads()) +
                " heads x " + std::to_string(sel.num_blocks()) + " blocks, block mass has " +
                std::to_string(m.heads) + " x " + std::to_string(m.num_blocks));
}

void check_gamma(double gamma) {
  if (!(gamma > 0.0 && gamma <= 1.0))
    throw Error("gamma " + std::to_string(gamma) + " outside (0, 1]");
}

// Strict total order for ranking (the path of oracle_density_mask too large for rank keys):
// descending value, NaN after every number, ties by the lower id. (A NaN-unaware comparator is
// not a strict weak order, and std::sort may then read out of range with --allow-nonfinite.)
template <class Id>
inline bool desc_before(float x, float y, Id a, Id b) {
  const bool nx = std::isnan(x), ny = std::isnan(y);
  if (nx != ny) return ny;
  if (!nx && x != y) return x > y;
  return a < b;
}

// The top-k ids of a row (blocks 0..i) in ranking order, descending, ties by lower id.
std::vector<int32_t> topk_of_row(const float* row, int i, int k) {
  thread_local std::vector<uint64_t> keys;
  k = std::clamp(k, 0, i + 1);
  std::vector<int32_t> ids(static_cast<size_t>(k));
  rank::top_desc(row, i + 1, k, ids.data(), keys);
  return ids;
}

double row_sum(const float* row, int i) {
  double s = 0;
  for (int j = 0; j <= i; ++j) s += row[j];
  return s;
}

// Average ranks (1-based) of x; ties share the mean of their positions.
void average_ranks(std::span<const float> x, std::vector<double>& ranks, std::vector<int32_t>& ids) {
  const size_t n = x.size();
  ids.resize(n);
  ranks.resize(n);
  thread_local std::vector<uint64_t> keys;
  keys.resize(n);
  for (size_t t = 0; t < n; ++t) keys[t] = rank::asc_id_key(x[t], static_cast<uint32_t>(t));
  thread_local std::vector<uint64_t> scratch;
  rank::sort_id_keys(keys, scratch);  // ids ascend in input order
  for (size_t t = 0; t < n; ++t) ids[t] = static_cast<int32_t>(keys[t] & 0xFFFFFFFFu);
  size_t s = 0;
  while (s < n) {
    size_t e = s + 1;
    while (e < n && x[ids[e]] == x[ids[s]]) ++e;
    const double r = 0.5 * static_cast<double>(s + e - 1) + 1.0;
    for (size_t t = s; t < e; ++t) ranks[ids[t]] = r;
    s = e;
  }
}

// out[q] = sum_t x[t] * ys[q][t] for q < m <= 4, each summed in t order (as a single dot would
// be); the m sums interleave for instruction-level parallelism.
void dots(const double* x, const std::vector<double>* ys, int m, size_t n, double* out) {
  if (m == 4) {
    const double *y0 = ys[0].data(), *y1 = ys[1].data(), *y2 = ys[2].data(), *y3 = ys[3].data();
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t t = 0; t < n; ++t) {
      s0 += x[t] * y0[t];
      s1 += x[t] * y1[t];
      s2 += x[t] * y2[t];
      s3 += x[t] * y3[t];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
    return;
  }
  for (int q = 0; q < m; ++q) {
    const double* y = ys[q].data();
    double s = 0;
    for (size_t t = 0; t < n; ++t) s += x[t] * y[t];
    out[q] = s;
  }
}

double pearson(const double* a, const double* b, size_t n) {
  double ma = 0, mb = 0;
  for (size_t t = 0; t < n; ++t) { ma += a[t]; mb += b[t]; }
  ma /= static_cast<double>(n);
  mb /= static_cast<double>(n);
  double sab = 0, saa = 0, sbb = 0;
  for (size_t t = 0; t < n; ++t) {
    const double da = a[t] - ma, db = b[t] - mb;
    sab += da * db; saa += da * da; sbb += db * db;
  }
  if (saa <= 0 || sbb <= 0) return kNaN;
  return std::clamp(sab / std::sqrt(saa * sbb), -1.0, 1.0);
}

}  // namespace

// ---- summaries -------------------------------------------------------------------------------

double percentile(std::span<const double> values, double p) {
  if (!(p >= 0.0 && p <= 100.0)) throw Error("percentile " + std::to_string(p) + " outside [0, 100]");
  std::vector<double> v;
  v.reserve(values.size());
  for (double x : values)
    if (std::isfinite(x)) v.push_back(x);
  if (v.empty()) return kNaN;
  std::sort(v.begin(), v.end());
  const double pos = p / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  const double frac = pos - static_cast<double>(lo);
  return v[lo] + (v[hi] - v[lo]) * frac;
}

Summary summarize(std::span<const double> values) {
  Summary s;
  double sum = 0;
  for (double x : values)
    if (std::isfinite(x)) { sum += x; ++s.count; }
  if (s.count == 0) {
    s.mean = s.min = s.p5 = s.p25 = s.median = s.p75 = s.p95 = s.max = kNaN;
    return s;
  }
  s.mean = sum / static_cast<double>(s.count);
  s.min = percentile(values, 0);
  s.p5 = percentile(values, 5);
  s.p25 = percentile(values, 25);
  s.median = percentile(values, 50);
  s.p75 = percentile(values, 75);
  s.p95 = percentile(values, 95);
  s.max = percentile(values, 100);
  return s;
}

// ---- density ---------------------------------------------------------------------------------

std::vector<HeadDensity> density_per_head(const BlockMask& mask) {
  std::vector<HeadDensity> out(static_cast<size_t>(mask.heads()));
  const int64_t nb = mask.num_blocks();
  for (int h = 0; h < mask.heads(); ++h) {
    HeadDensity& d = out[static_cast<size_t>(h)];
    d.head = h;
    d.selected = mask.selected(h);
    d.causal_blocks = nb * (nb + 1) / 2;
    d.density = mask.density(h);
    d.element_density = mask.element_density(h);
  }
  return out;
}

// ---- oracle rankings and budgets -------------------------------------------------------------

std::vector<int32_t> rank_row(const float* row, int i) { return topk_of_row(row, i, i + 1); }

int row_budget(const float* row, int i, double gamma) {
  check_gamma(gamma);
  const std::vector<int32_t> order = rank_row(row, i);
  const double target = gamma * row_sum(row, i) * (1.0 - kGammaSlack);
  double cum = 0;
  for (int t = 0; t <= i; ++t) {
    cum += row[order[static_cast<size_t>(t)]];
    if (cum >= target) return t + 1;
  }
  return i + 1;
}

double OracleBudget::mean(int h) const {
  double s = 0;
  for (int i = 0; i < num_blocks; ++i) s += at(h, i);
  return s / num_blocks;
}

std::vector<double> OracleBudget::rows(int h) const {
  std::vector<double> r(static_cast<size_t>(num_blocks));
  for (int i = 0; i < num_blocks; ++i) r[static_cast<size_t>(i)] = at(h, i);
  return r;
}

OracleBudget oracle_budget(const BlockMass& mass, double gamma) {
  check_mass(mass, "oracle budget");
  check_gamma(gamma);
  OracleBudget b;
  b.heads = mass.heads;
  b.num_blocks = mass.num_blocks;
  b.gamma = gamma;
  b.per_row.assign(static_cast<size_t>(b.heads) * b.num_blocks, 0);
  const int64_t rows = static_cast<int64_t>(b.heads) * b.num_blocks;
  const bool par = worth_threads(mass);
#pragma omp parallel for schedule(dynamic, 16) if (par)
  for (int64_t r = 0; r < rows; ++r) {
    const int h = static_cast<int>(r / b.num_blocks), i = static_cast<int>(r % b.num_blocks);
    b.per_row[static_cast<size_t>(r)] = row_budget(mass.row(h, i), i, gamma);
  }
  return b;
}

namespace {
void check_rank_pos(const BlockMass& mass, const std::vector<int32_t>& rank_pos, const char* what) {
  const size_t per_head = static_cast<size_t>(mass.num_blocks) * (mass.num_blocks + 1) / 2;
  if (rank_pos.size() != per_head * static_cast<size_t>(mass.heads))
    throw Error(std::string(what) + ": rank positions are not of this mass");
}
}  // namespace

OracleBudget oracle_budget(const BlockMass& mass, double gamma, const std::vector<int32_t>& rank_pos) {
  check_mass(mass, "oracle budget");
  check_gamma(gamma);
  check_rank_pos(mass, rank_pos, "oracle budget");
  OracleBudget b;
  b.heads = mass.heads;
  b.num_blocks = mass.num_blocks;
  b.gamma = gamma;
  b.per_row.assign(static_cast<size_t>(b.heads) * b.num_blocks, 0);
  const int nb = b.num_blocks;
  const int64_t rows = static_cast<int64_t>(b.heads) * nb;
  const bool par = worth_threads(mass);
#pragma omp parallel if (par)
  {
    std::vector<int32_t> order(static_cast<size_t>(nb));
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) {
      const int h = static_cast<int>(r / nb), i = static_cast<int>(r % nb);
      const float* row = mass.row(h, i);
      const int32_t* p = rank_pos.data() + static_cast<size_t>(h) * (static_cast<size_t>(nb) * (nb + 1) / 2) +
                         static_cast<size_t>(i) * (i + 1) / 2;
      for (int j = 0; j <= i; ++j) order[static_cast<size_t>(p[j])] = j;
      // row_budget() on that order.
      const double target = gamma * row_sum(row, i) * (1.0 - kGammaSlack);
      double cum = 0;
      int k = i + 1;
      for (int t = 0; t <= i; ++t) {
        cum += row[order[static_cast<size_t>(t)]];
        if (cum >= target) {
          k = t + 1;
          break;
        }
      }
      b.per_row[static_cast<size_t>(r)] = k;
    }
  }
  return b;
}

BlockMask oracle_topk_mask(const BlockMass& mass, std::span<const int32_t> k_per_row,
                           const std::vector<int32_t>& rank_pos) {
  check_mass(mass, "oracle top-k");
  check_rank_pos(mass, rank_pos, "oracle top-k");
  const int nb = mass.num_blocks;
  const int64_t rows = static_cast<int64_t>(mass.heads) * nb;
  if (k_per_row.size() != static_cast<size_t>(rows))
    throw Error("oracle top-k: " + std::to_string(k_per_row.size()) + " budgets for " +
                std::to_string(rows) + " rows");
  std::vector<int32_t> indptr(static_cast<size_t>(rows) + 1, 0);
  for (int64_t r = 0; r < rows; ++r)
    indptr[static_cast<size_t>(r) + 1] =
        indptr[static_cast<size_t>(r)] + std::clamp<int32_t>(k_per_row[static_cast<size_t>(r)], 0, static_cast<int32_t>(r % nb) + 1);
  std::vector<int32_t> indices(static_cast<size_t>(indptr.back()));
  const bool par = worth_threads(mass);
#pragma omp parallel for schedule(dynamic, 64) if (par)
  for (int64_t r = 0; r < rows; ++r) {
    const int h = static_cast<int>(r / nb), i = static_cast<int>(r % nb);
    const int32_t k = indptr[static_cast<size_t>(r) + 1] - indptr[static_cast<size_t>(r)];
    const int32_t* p = rank_pos.data() + static_cast<size_t>(h) * (static_cast<size_t>(nb) * (nb + 1) / 2) +
                       static_cast<size_t>(i) * (i + 1) / 2;
    int32_t* out = indices.data() + indptr[static_cast<size_t>(r)];
    for (int j = 0; j <= i; ++j)
      if (p[j] < k) *out++ = j;  // the row's k best blocks, ascending
  }
  return BlockMask(mass.heads, mass.seq_len, mass.block, std::move(indptr), std::move(indices));
}

BlockMask oracle_topk_mask(const BlockMass& mass, std::span<const int32_t> k_per_row) {
  check_mass(mass, "oracle top-k");
  const int64_t rows = static_cast<int64_t>(mass.heads) * mass.num_blocks;
  if (k_per_row.size() != static_cast<size_t>(rows))
    throw Error("oracle top-k: " + std::to_string(k_per_row.size()) + " budgets for " +
                std::to_string(rows) + " rows");
  std::vector<std::vector<int32_t>> sel(static_cast<size_t>(rows));
  const bool par = worth_threads(mass);
#pragma omp parallel for schedule(dynamic, 16) if (par)
  for (int64_t r = 0; r < rows; ++r) {
    const int h = static_cast<int>(r / mass.num_blocks), i = static_cast<int>(r % mass.num_blocks);
    sel[static_cast<size_t>(r)] = topk_of_row(mass.row(h, i), i, k_per_row[static_cast<size_t>(r)]);
  }
  return BlockMask::from_rows(mass.heads, mass.seq_len, mass.block, sel);
}

BlockMask oracle_gamma_mask(const BlockMass& mass, double gamma) {
  const OracleBudget b = oracle_budget(mass, gamma);
  return oracle_topk_mask(mass, b.per_row);
}

BlockMask oracle_density_mask(const BlockMass& mass, double density) {
  check_mass(mass, "oracle density mask");
  if (!(density > 0.0 && density <= 1.0))
    throw Error("oracle density mask: density " + std::to_string(density) + " outside (0, 1]");
  const int H = mass.heads, nb = mass.num_blocks;
  const int64_t causal = static_cast<int64_t>(nb) * (nb + 1) / 2;
  const int64_t T = std::clamp<int64_t>(std::llround(density * static_cast<double>(causal) * H), 0, causal * H);
  const int64_t cells_n = causal * H;
  if (cells_n <= int64_t{0xFFFFFFFF}) {
    // The T smallest keys (value descending, then the causal index h * causal + i (i + 1) / 2 + j,
    // which orders ties by head, row, block as the flat index of the path below does), found in
    // parallel: a histogram of the keys' top 16 bits puts the cut in one bucket; only that
    // bucket is ordered. Keys are unique, so the set is the one a full sort would give.
    const bool par = worth_threads(mass);
    std::vector<uint8_t> picked(static_cast<size_t>(cells_n), T >= cells_n ? 1 : 0);
    if (T > 0 && T < cells_n) {
      constexpr int kBuckets = 1 << 16;
      std::vector<int64_t> hist(kBuckets, 0);
#pragma omp parallel if (par)
      {
        std::vector<int64_t> local(kBuckets, 0);
#pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < H; ++h)
          for (int i = 0; i < nb; ++i) {
            const float* row = mass.row(h, i);
            for (int j = 0; j <= i; ++j) ++local[rank::desc_key(row[j]) >> 16];
          }
#pragma omp critical
        for (int b = 0; b < kBuckets; ++b) hist[static_cast<size_t>(b)] += local[static_cast<size_t>(b)];
      }
      uint32_t cut = 0;
      int64_t below = 0;
      while (below + hist[cut] < T) below += hist[cut++];
      std::vector<std::vector<uint64_t>> cand(static_cast<size_t>(H));
#pragma omp parallel for schedule(dynamic, 1) if (par)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < nb; ++i) {
          const float* row = mass.row(h, i);
          const int64_t base = static_cast<int64_t>(h) * causal + static_cast<int64_t>(i) * (i + 1) / 2;
          for (int j = 0; j <= i; ++j) {
            const uint32_t key = rank::desc_key(row[j]);
            if ((key >> 16) < cut) picked[static_cast<size_t>(base + j)] = 1;
            else if ((key >> 16) == cut) cand[static_cast<size_t>(h)].push_back((uint64_t{key} << 32) | (base + j));
          }
        }
      std::vector<uint64_t> all;
      for (auto& c : cand) all.insert(all.end(), c.begin(), c.end());
      const int64_t need = T - below;
      std::nth_element(all.begin(), all.begin() + need, all.end());
      for (int64_t t = 0; t < need; ++t) picked[all[static_cast<size_t>(t)] & 0xFFFFFFFFu] = 1;
    }
    std::vector<std::vector<int32_t>> idx(static_cast<size_t>(H));
    std::vector<int32_t> row_n(static_cast<size_t>(H) * nb);
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < nb; ++i) {
        const uint8_t* p = picked.data() + static_cast<int64_t>(h) * causal + static_cast<int64_t>(i) * (i + 1) / 2;
        const size_t before = idx[static_cast<size_t>(h)].size();
        for (int j = 0; j <= i; ++j)
          if (p[j]) idx[static_cast<size_t>(h)].push_back(j);
        row_n[static_cast<size_t>(h) * nb + i] = static_cast<int32_t>(idx[static_cast<size_t>(h)].size() - before);
      }
    std::vector<int32_t> indptr(row_n.size() + 1, 0);
    for (size_t r = 0; r < row_n.size(); ++r) indptr[r + 1] = indptr[r] + row_n[r];
    std::vector<int32_t> indices(static_cast<size_t>(indptr.back()));
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (int h = 0; h < H; ++h)  // each head's rows at their offset
      std::copy(idx[static_cast<size_t>(h)].begin(), idx[static_cast<size_t>(h)].end(),
                indices.begin() + indptr[static_cast<size_t>(h) * nb]);
    return BlockMask(H, mass.seq_len, mass.block, std::move(indptr), std::move(indices));
  }
  // Cells as (value, flat index h * Nb * Nb + i * Nb + j); the flat index orders ties by head,
  // row, block.
  std::vector<std::pair<float, int64_t>> cells;
  cells.reserve(static_cast<size_t>(causal * H));
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < nb; ++i) {
      const float* row = mass.row(h, i);
      for (int j = 0; j <= i; ++j)
        cells.emplace_back(row[j], (static_cast<int64_t>(h) * nb + i) * nb + j);
    }
  auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return desc_before(a.first, b.first, a.second, b.second);
  };
  if (T < static_cast<int64_t>(cells.size()))
    std::nth_element(cells.begin(), cells.begin() + T, cells.end(), better);
  std::vector<uint8_t> bitmap(static_cast<size_t>(H) * nb * nb, 0);
  for (int64_t t = 0; t < T; ++t) bitmap[static_cast<size_t>(cells[static_cast<size_t>(t)].second)] = 1;
  return BlockMask::from_bitmap(H, mass.seq_len, mass.block, bitmap);
}

BlockMask auto_density_mask(const MethodInfo& method, const BlockScores& scores, double density,
                            const std::function<const Budgets&()>& dynamic,
                            const std::function<const BlockMass&()>& mass, const std::vector<int32_t>* order) {
  SelectOptions opts;
  if (!method.forced_blocks) opts.sink = opts.diagonal = false;
  switch (method.auto_density) {
    case AutoDensity::scaled_dynamic:
      // The order is that of the default options (sink and diagonal forced).
      return order && opts.sink && opts.diagonal ? select_budgets_to_density(scores, *order, dynamic(), density)
                                                 : select_budgets_to_density(scores, dynamic(), density, opts);
    case AutoDensity::layer_global:
      return oracle_density_mask(mass(), density);
    case AutoDensity::native_adjust:
      break;
  }
  return select_to_density(scores, density, DensityRule::native_adjust, opts);
}

std::vector<BlockMask> auto_density_masks(const MethodInfo& method, const BlockScores& scores,
                                          const std::vector<double>& densities,
                                          const std::function<const Budgets&()>& dynamic,
                                          const std::function<const BlockMass&()>& mass,
                                          const std::vector<int32_t>* order) {
  if (method.auto_density == AutoDensity::native_adjust) {
    SelectOptions opts;
    if (!method.forced_blocks) opts.sink = opts.diagonal = false;
    return select_to_densities(scores, densities, DensityRule::native_adjust, opts);
  }
  std::vector<BlockMask> out;
  for (double d : densities) out.push_back(auto_density_mask(method, scores, d, dynamic, mass, order));
  return out;
}

// ---- recall ----------------------------------------------------------------------------------

std::vector<double> mass_recall_per_head(const BlockMask& sel, const BlockMass& mass) {
  check_mask_vs_mass(sel, mass, "mass recall");
  std::vector<double> out(static_cast<size_t>(mass.heads));
  const bool par = worth_threads(mass);
#pragma omp parallel for schedule(static) if (par)
  for (int h = 0; h < mass.heads; ++h) {
    double total = 0;
    for (int i = 0; i < mass.num_blocks; ++i) {
      const float* row = mass.row(h, i);
      double s = 0;
      for (int32_t j : sel.row(h, i)) s += row[j];
      total += s;
    }
    out[static_cast<size_t>(h)] = total / mass.num_blocks;
  }
  return out;
}

std::vector<int32_t> mass_rank_positions(const BlockMass& mass) {
  const int nb = mass.num_blocks;
  const size_t per_head = static_cast<size_t>(nb) * (nb + 1) / 2;
  std::vector<int32_t> pos(per_head * static_cast<size_t>(mass.heads));
  const bool par = worth_threads(mass);
#pragma omp parallel for schedule(dynamic, 16) if (par)
  for (int64_t t = 0; t < static_cast<int64_t>(mass.heads) * nb; ++t) {
    const int h = static_cast<int>(t / nb), i = static_cast<int>(t % nb);
    const std::vector<int32_t> order = rank_row(mass.row(h, i), i);
    int32_t* p = pos.data() + static_cast<size_t>(h) * per_head + static_cast<size_t>(i) * (i + 1) / 2;
    for (int r = 0; r <= i; ++r) p[order[static_cast<size_t>(r)]] = r;
  }
  return pos;
}

std::vector<double> block_recall_per_head(const BlockMask& sel, const BlockMass& mass,
                                          const std::vector<int32_t>& rank_pos) {
  check_mask_vs_mass(sel, mass, "block recall");
  const int nb = mass.num_blocks;
  const size_t per_head = static_cast<size_t>(nb) * (nb + 1) / 2;
  if (rank_pos.size() != per_head * static_cast<size_t>(mass.heads))
    throw Error("block recall: rank positions are not of this mass");
  std::vector<double> out(static_cast<size_t>(mass.heads));
  const bool par = worth_threads(mass);
#pragma omp parallel for schedule(static) if (par)
  for (int h = 0; h < mass.heads; ++h) {
    double total = 0;
    int used = 0;
    for (int i = 0; i < nb; ++i) {
      const auto s = sel.row(h, i);
      const int k = static_cast<int>(s.size());
      if (k == 0) continue;
      const int32_t* p = rank_pos.data() + static_cast<size_t>(h) * per_head + static_cast<size_t>(i) * (i + 1) / 2;
      int hit = 0;
      for (int32_t j : s) hit += p[j] < k;  // j is among the row's k best blocks
      total += static_cast<double>(hit) / k;
      ++used;
    }
    out[static_cast<size_t>(h)] = used ? total / used : kNaN;
  }
  return out;
}

void recall_per_head(const BlockMask& sel, const BlockMass& mass, const std::vector<int32_t>& rank_pos,
                     std::vector<double>& mass_recall, std::vector<double>& block_recall) {
  check_mask_vs_mass(sel, mass, "recall");
  const int nb = mass.num_blocks;
  const size_t per_head = static_cast<size_t>(nb) * (nb + 1) / 2;
  if (rank_pos.size() != per_head * static_cast<size_t>(mass.heads))
    throw Error("block recall: rank positions are not of this mass");
  mass_recall.assign(static_cast<size_t>(mass.heads), 0.0);
  block_recall.assign(static_cast<size_t>(mass.heads), 0.0);
  const bool par = worth_threads(mass);
  // Heads differ in selected blocks: dynamic. Each head's sums in the order of the two
  // functions above.
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int h = 0; h < mass.heads; ++h) {
    double mass_total = 0, block_total = 0;
    int used = 0;
    for (int i = 0; i < nb; ++i) {
      const float* row = mass.row(h, i);
      const auto sr = sel.row(h, i);
      const int k = static_cast<int>(sr.size());
      const int32_t* p = rank_pos.data() + static_cast<size_t>(h) * per_head + static_cast<size_t>(i) * (i + 1) / 2;
      double s = 0;
      int hit = 0;
      for (int32_t j : sr) {
        s += row[j];
        hit += p[j] < k;  // j is among the row's k best blocks
      }
      mass_total += s;
      if (k == 0) continue;
      block_total += static_cast<double>(hit) / k;
      ++used;
    }
    mass_recall[static_cast<size_t>(h)] = mass_total / nb;
    block_recall[static_cast<size_t>(h)] = used ? block_total / used : kNaN;
  }
}

std::vector<double> block_recall_per_head(const BlockMask& sel, const BlockMass& mass) {
  check_mask_vs_mass(sel, mass, "block recall");
  std::vector<double> out(static_cast<size_t>(mass.heads));
  const bool par = worth_threads(mass);
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int h = 0; h < mass.heads; ++h) {
    double total = 0;
    int used = 0;
    for (int i = 0; i < mass.num_blocks; ++i) {
      const auto s = sel.row(h, i);
      const int k = static_cast<int>(s.size());
      if (k == 0) continue;
      std::vector<int32_t> best = topk_of_row(mass.row(h, i), i, k);
      std::sort(best.begin(), best.end());
      // Both sorted: count the intersection by merging.
      int hit = 0;
      size_t a = 0, b = 0;
      while (a < s.size() && b < best.size()) {
        if (s[a] == best[b]) { ++hit; ++a; ++b; }
        else if (s[a] < best[b]) ++a;
        else ++b;
      }
      total += static_cast<double>(hit) / k;
      ++used;
    }
    out[static_cast<size_t>(h)] = used ? total / used : kNaN;
  }
  return out;
}

// ---- estimator scores ------------------------------------------------------------------------

std::vector<RankingFidelity> ranking_fidelity(const ScoreView& scores, const BlockMass& mass,
                                              const OracleBudget& budget) {
  return ranking_fidelity(std::span<const ScoreView>(&scores, 1), mass, budget).front();
}

std::vector<std::vector<RankingFidelity>> ranking_fidelity(std::span<const ScoreView> views, const BlockMass& mass,
                                                           const OracleBudget& budget) {
  const OracleBudget* one[] = {&budget};
  return ranking_fidelity(views, mass, std::span<const OracleBudget* const>(one)).front();
}

std::vector<std::vector<std::vector<RankingFidelity>>> ranking_fidelity(std::span<const ScoreView> views,
                                                                        const BlockMass& mass,
                                                                        std::span<const OracleBudget* const> budgets) {
  check_mass(mass, "ranking fidelity");
  for (const ScoreView& scores : views)
    if (!scores.data || scores.score_heads <= 0 || scores.q_heads != mass.heads ||
        scores.q_heads % scores.score_heads != 0 || scores.num_blocks != mass.num_blocks)
      throw Error("ranking fidelity: scores [" + std::to_string(scores.score_heads) + " heads, " +
                  std::to_string(scores.num_blocks) + " blocks] do not fit " +
                  std::to_string(mass.heads) + " query heads x " + std::to_string(mass.num_blocks) +
                  " blocks");
  for (const OracleBudget* budget : budgets)
    if (!budget || budget->heads != mass.heads || budget->num_blocks != mass.num_blocks)
      throw Error("ranking fidelity: oracle budget does not match the block mass");
  const int nb = mass.num_blocks;
  const size_t B = budgets.size(), V = views.size();
  // Row (h, i)'s largest clamped budget: every ranking is taken that deep once.
  auto deepest = [&](int h, int i) {
    int k = 0;
    for (const OracleBudget* budget : budgets) k = std::max(k, std::clamp(budget->at(h, i), 0, i + 1));
    return k;
  };
  const bool par = worth_threads(mass);
  const size_t per_head = static_cast<size_t>(nb) * nb;
  // Per score set: query heads that read the same scores (one score head, or score heads
  // bitwise equal to the previous one: the copies of one proxy group) share its ranking: each
  // distinct score row's top k_max (the largest budget of its readers, at any of the budgets)
  // once; each reader's top k is a prefix of it.
  struct Tops {
    std::vector<int> leader;     // per score head
    std::vector<int64_t> sptr;   // per score row: its top ids in stop[sptr[r] .. sptr[r + 1])
    std::vector<int32_t> stop;
    int64_t row_of(const ScoreView& v, int h, int i, int nb) const {
      return static_cast<int64_t>(leader[static_cast<size_t>(v.score_head_of(h))]) * nb + i;
    }
  };
  std::vector<Tops> tops(views.size());
  for (size_t v = 0; v < views.size(); ++v) {
    const ScoreView& scores = views[v];
    Tops& tp = tops[v];
    tp.leader = equal_head_leaders(scores.data, scores.score_heads, per_head);
    const int64_t srows = static_cast<int64_t>(scores.score_heads) * nb;
    std::vector<int32_t> kmax(static_cast<size_t>(srows), 0);
    for (int h = 0; h < mass.heads; ++h)
      for (int i = 0; i < nb; ++i) {
        int32_t& km = kmax[static_cast<size_t>(tp.row_of(scores, h, i, nb))];
        km = std::max(km, deepest(h, i));
      }
    tp.sptr.assign(static_cast<size_t>(srows) + 1, 0);
    for (int64_t t = 0; t < srows; ++t)
      tp.sptr[static_cast<size_t>(t) + 1] = tp.sptr[static_cast<size_t>(t)] + kmax[static_cast<size_t>(t)];
    tp.stop.resize(static_cast<size_t>(tp.sptr.back()));
#pragma omp parallel if (par)
    {
      std::vector<uint64_t> keys;
#pragma omp for schedule(dynamic, 16)
      for (int64_t t = 0; t < srows; ++t) {
        if (kmax[static_cast<size_t>(t)] <= 0) continue;
        const int sh = static_cast<int>(t / nb), i = static_cast<int>(t % nb);
        const float* row = scores.data + (static_cast<size_t>(sh) * nb + i) * nb;
        rank::top_desc(row, i + 1, kmax[static_cast<size_t>(t)], tp.stop.data() + tp.sptr[static_cast<size_t>(t)],
                       keys);
      }
    }
  }
  // Per head: each mass row's top k (the oracle's S*) once for every score set and budget.
  std::vector<std::vector<std::vector<RankingFidelity>>> out(
      B, std::vector<std::vector<RankingFidelity>>(V, std::vector<RankingFidelity>(static_cast<size_t>(mass.heads))));
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int h = 0; h < mass.heads; ++h) {
    std::vector<uint64_t> keys;
    std::vector<int32_t> best(static_cast<size_t>(nb));
    std::vector<uint8_t> flag(static_cast<size_t>(nb), 0);  // bit 0: in S, bit 1: in S*
    std::vector<double> br(B * V, 0.0), mr(B * V, 0.0), ratio(B * V, 0.0);  // [budget][set]
    for (int i = 0; i < nb; ++i) {
      const float* m = mass.row(h, i);
      rank::top_desc(m, i + 1, deepest(h, i), best.data(), keys);
      for (size_t b = 0; b < B; ++b) {
        for (size_t v = 0; v < V; ++v) {
          const int k = budgets[b]->at(h, i), kk = std::clamp(k, 0, i + 1);
          const size_t bv = b * V + v;
          const Tops& tp = tops[v];
          const int32_t* s = tp.stop.data() + tp.sptr[static_cast<size_t>(tp.row_of(views[v], h, i, nb))];
          for (int t = 0; t < kk; ++t) flag[static_cast<size_t>(s[t])] |= 1;
          for (int t = 0; t < kk; ++t) flag[static_cast<size_t>(best[static_cast<size_t>(t)])] |= 2;
          // Both sets summed in ascending block order (as sorted lists were).
          double ms = 0, mb = 0;
          int common = 0;
          for (int j = 0; j <= i; ++j) {
            const uint8_t f = flag[static_cast<size_t>(j)];
            if (!f) continue;
            if (f & 1) ms += m[j];
            if (f & 2) mb += m[j];
            common += f == 3;
            flag[static_cast<size_t>(j)] = 0;
          }
          br[bv] += k > 0 ? static_cast<double>(common) / k : 1.0;
          mr[bv] += ms;
          ratio[bv] += mb > 0 ? ms / mb : 1.0;
        }
      }
    }
    for (size_t b = 0; b < B; ++b)
      for (size_t v = 0; v < V; ++v) {
        const size_t bv = b * V + v;
        out[b][v][static_cast<size_t>(h)] = {h, br[bv] / nb, mr[bv] / nb, ratio[bv] / nb};
      }
  }
  return out;
}

// ---- budget accuracy -------------------------------------------------------------------------

namespace {

// The checks of one request (both forms): the budgets' sizes and the oracle's shape.
void check_budget_request(std::span<const double> k_est, std::span<const int32_t> k_per_row, const BlockMass& mass,
                          const OracleBudget* budget) {
  const int nb = mass.num_blocks;
  if (k_est.size() != static_cast<size_t>(mass.heads) ||
      k_per_row.size() != static_cast<size_t>(mass.heads) * nb)
    throw Error("budget accuracy: " + std::to_string(k_est.size()) + " head budgets and " +
                std::to_string(k_per_row.size()) + " row budgets for " + std::to_string(mass.heads) +
                " heads x " + std::to_string(nb) + " blocks");
  if (!budget || budget->heads != mass.heads || budget->num_blocks != nb)
    throw Error("budget accuracy: oracle budget does not match the block mass");
}

// What one request's sums give (the two forms share it).
BudgetAccuracy accuracy_of(int h, double k_est, const OracleBudget& budget, double used, double reached, int below) {
  const int nb = budget.num_blocks;
  BudgetAccuracy a;
  a.head = h;
  a.k_est = k_est;
  a.oracle_mean = budget.mean(h);
  a.oracle_last_row = budget.at(h, nb - 1);
  a.k_effective = used / nb;
  a.rel_error = (a.k_effective - a.oracle_mean) / a.oracle_mean;
  a.abs_rel_error = std::abs(a.rel_error);
  a.mass_reached = reached / nb;
  a.rows_below_gamma = static_cast<double>(below) / nb;
  return a;
}

}  // namespace

std::vector<BudgetAccuracy> budget_accuracy(std::span<const double> k_est,
                                            std::span<const int32_t> k_per_row,
                                            const BlockMass& mass, const OracleBudget& budget) {
  check_mass(mass, "budget accuracy");
  check_budget_request(k_est, k_per_row, mass, &budget);
  const int nb = mass.num_blocks;
  std::vector<BudgetAccuracy> out(static_cast<size_t>(mass.heads));
  const bool par = worth_threads(mass);
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int h = 0; h < mass.heads; ++h) {
    double reached = 0, used = 0;
    int below = 0;
    for (int i = 0; i < nb; ++i) {
      const int k = std::clamp<int>(k_per_row[static_cast<size_t>(h) * nb + i], 0, i + 1);
      used += k;
      const float* m = mass.row(h, i);
      const std::vector<int32_t> top = topk_of_row(m, i, k);
      double s = 0;
      for (int32_t j : top) s += m[j];
      reached += s;
      if (s < budget.gamma * row_sum(m, i) * (1.0 - kGammaSlack)) ++below;
    }
    out[static_cast<size_t>(h)] = accuracy_of(h, k_est[static_cast<size_t>(h)], budget, used, reached, below);
  }
  return out;
}

std::vector<std::vector<BudgetAccuracy>> budget_accuracy(std::span<const BudgetAccuracyRequest> requests,
                                                         const BlockMass& mass, const std::vector<int32_t>& rank_pos) {
  check_mass(mass, "budget accuracy");
  const int nb = mass.num_blocks;
  const size_t per_head = static_cast<size_t>(nb) * (nb + 1) / 2;
  if (rank_pos.size() != per_head * static_cast<size_t>(mass.heads))
    throw Error("budget accuracy: rank positions are not of this mass");
  for (const BudgetAccuracyRequest& r : requests) check_budget_request(r.k_est, r.k_per_row, mass, r.oracle);
  const size_t R = requests.size();
  std::vector<std::vector<BudgetAccuracy>> out(R, std::vector<BudgetAccuracy>(static_cast<size_t>(mass.heads)));
  const bool par = worth_threads(mass);
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int h = 0; h < mass.heads; ++h) {
    std::vector<double> reached(R, 0.0), used(R, 0.0);
    std::vector<int> below(R, 0);
    std::vector<int32_t> order(static_cast<size_t>(nb));
    std::vector<double> cum(static_cast<size_t>(nb) + 1, 0.0);  // cum[t]: mass of the t top blocks
    for (int i = 0; i < nb; ++i) {
      const float* m = mass.row(h, i);
      const int32_t* pos = rank_pos.data() + static_cast<size_t>(h) * per_head + static_cast<size_t>(i) * (i + 1) / 2;
      for (int j = 0; j <= i; ++j) order[static_cast<size_t>(pos[j])] = j;
      // Summed in rank order from 0, as the first form sums each top-k list.
      for (int t = 0; t <= i; ++t)
        cum[static_cast<size_t>(t) + 1] = cum[static_cast<size_t>(t)] + m[order[static_cast<size_t>(t)]];
      const double total = row_sum(m, i);
      for (size_t r = 0; r < R; ++r) {
        const int k = std::clamp<int>(requests[r].k_per_row[static_cast<size_t>(h) * nb + i], 0, i + 1);
        used[r] += k;
        const double s = cum[static_cast<size_t>(k)];
        reached[r] += s;
        if (s < requests[r].oracle->gamma * total * (1.0 - kGammaSlack)) ++below[r];
      }
    }
    for (size_t r = 0; r < R; ++r)
      out[r][static_cast<size_t>(h)] =
          accuracy_of(h, requests[r].k_est[static_cast<size_t>(h)], *requests[r].oracle, used[r], reached[r], below[r]);
  }
  return out;
}

std::vector<BudgetAccuracy> budget_accuracy(std::span<const double> k_est, const BlockMass& mass,
                                            const OracleBudget& budget, bool proportional) {
  check_mass(mass, "budget accuracy");
  const int nb = mass.num_blocks;
  if (k_est.size() != static_cast<size_t>(mass.heads))
    throw Error("budget accuracy: " + std::to_string(k_est.size()) + " budgets for " +
                std::to_string(mass.heads) + " heads");
  std::vector<int32_t> rows(static_cast<size_t>(mass.heads) * nb);
  for (int h = 0; h < mass.heads; ++h)
    for (int i = 0; i < nb; ++i) {
      const double k = k_est[static_cast<size_t>(h)];
      // Whole blocks: round up, with slack for values like 3.0000000001 from a division.
      const double kr = proportional ? std::max(1.0, std::ceil(k * (i + 1) / nb - 1e-9))
                                     : std::ceil(k - 1e-9);
      rows[static_cast<size_t>(h) * nb + i] =
          static_cast<int32_t>(std::clamp(kr, 0.0, static_cast<double>(nb)));
    }
  return budget_accuracy(k_est, rows, mass, budget);
}

// ---- head similarity -------------------------------------------------------------------------

std::vector<int64_t> topk_tokens(std::span<const float> probs, int64_t k) {
  const int64_t n = static_cast<int64_t>(probs.size());
  k = std::clamp<int64_t>(k, 0, n);
  if (n > int64_t{0x7FFFFFFF}) throw Error("top-k tokens: more than 2^31 tokens");
  std::vector<uint64_t> keys;
  std::vector<int32_t> top(static_cast<size_t>(k));
  rank::top_desc(probs.data(), n, k, top.data(), keys);
  std::vector<int64_t> ids(top.begin(), top.end());
  std::sort(ids.begin(), ids.end());
  return ids;
}

double cosine_similarity(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size()) throw Error("cosine: vectors of different lengths");
  double ab = 0, aa = 0, bb = 0;
  for (size_t t = 0; t < a.size(); ++t) {
    ab += static_cast<double>(a[t]) * b[t];
    aa += static_cast<double>(a[t]) * a[t];
    bb += static_cast<double>(b[t]) * b[t];
  }
  if (aa <= 0 || bb <= 0) return kNaN;
  return std::clamp(ab / std::sqrt(aa * bb), -1.0, 1.0);
}

double spearman_rho(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size()) throw Error("spearman: vectors of different lengths");
  if (a.size() < 2) return kNaN;
  std::vector<double> ra, rb;
  std::vector<int32_t> ids;
  average_ranks(a, ra, ids);
  average_ranks(b, rb, ids);
  return pearson(ra.data(), rb.data(), a.size());
}

HeadSimilarity head_similarity(const BlockMass& mass, std::span<const float> token_probs,
                               int64_t seq_len, const SimilarityOptions& opts) {
  check_mass(mass, "head similarity");
  const int H = mass.heads, nb = mass.num_blocks;
  if (seq_len <= 0 || token_probs.size() != static_cast<size_t>(H) * static_cast<size_t>(seq_len))
    throw Error("head similarity: " + std::to_string(token_probs.size()) +
                " token probabilities for " + std::to_string(H) + " heads x " +
                std::to_string(seq_len) + " tokens");
  HeadSimilarity s;
  s.heads = H;
  s.topk_fractions = opts.topk_fractions;
  const size_t HH = static_cast<size_t>(H) * H;

  // Top-k token overlap of the last block's mean probabilities.
  for (double f : opts.topk_fractions) {
    if (!(f > 0.0 && f <= 1.0)) throw Error("head similarity: top-k fraction outside (0, 1]");
    const int64_t k = std::clamp<int64_t>(std::llround(f * static_cast<double>(seq_len)), 1, seq_len);
    s.topk_k.push_back(k);
    std::vector<std::vector<int64_t>> top(static_cast<size_t>(H));
#pragma omp parallel for schedule(static) if (seq_len * H > (int64_t{1} << 20))
    for (int h = 0; h < H; ++h)
      top[static_cast<size_t>(h)] =
          topk_tokens(token_probs.subspan(static_cast<size_t>(h) * seq_len, seq_len), k);
    std::vector<double> m(HH);
    for (int a = 0; a < H; ++a)
      for (int b = 0; b < H; ++b) {
        std::vector<int64_t> common;
        const auto& ta = top[static_cast<size_t>(a)];
        const auto& tb = top[static_cast<size_t>(b)];
        std::set_intersection(ta.begin(), ta.end(), tb.begin(), tb.end(), std::back_inserter(common));
        m[static_cast<size_t>(a) * H + b] = static_cast<double>(common.size()) / k;
      }
    s.topk_overlap.push_back(std::move(m));
  }

  // Rows used for the block-mass correlations.
  std::vector<int> rows;
  for (int i = 1; i < nb; ++i) rows.push_back(i);
  if (opts.max_rows > 0 && static_cast<int>(rows.size()) > opts.max_rows) {
    std::vector<int> picked;
    const int n = static_cast<int>(rows.size());
    for (int t = 0; t < opts.max_rows; ++t) {
      const int idx = opts.max_rows == 1 ? n - 1
                                          : static_cast<int>(std::llround(
                                                static_cast<double>(t) * (n - 1) / (opts.max_rows - 1)));
      if (picked.empty() || picked.back() != rows[static_cast<size_t>(idx)])
        picked.push_back(rows[static_cast<size_t>(idx)]);
    }
    rows = std::move(picked);
  }
  s.rows_used = static_cast<int>(rows.size());

  // Per row: ranks of every head once, then all pairs. Each row's values are kept and summed
  // in row order afterwards, so the result does not depend on the threads (the serial sums).
  const size_t R = rows.size();
  std::vector<double> row_cos(R * HH, kNaN), row_sp(R * HH, kNaN);
  const bool par = worth_threads(mass) || static_cast<int64_t>(HH) * nb * nb > (int64_t{1} << 22);
#pragma omp parallel if (par)
  {
    std::vector<std::vector<double>> ranks(static_cast<size_t>(H));
    std::vector<int32_t> ids;
    // Per head, what cosine_similarity and pearson compute for every pair from one vector alone
    // (the values as double, the centred ranks, their sums of squares), with the same operations
    // in the same order: each pair then costs two dot products, four pairs per sweep.
    std::vector<std::vector<double>> val(static_cast<size_t>(H)), cen(static_cast<size_t>(H));
    std::vector<double> vsq(static_cast<size_t>(H)), csq(static_cast<size_t>(H));
#pragma omp for schedule(dynamic, 1)
    for (size_t t = 0; t < rows.size(); ++t) {
      const int i = rows[t];
      const size_t len = static_cast<size_t>(i) + 1;
      for (int h = 0; h < H; ++h) {
        const size_t hs = static_cast<size_t>(h);
        average_ranks({mass.row(h, i), len}, ranks[hs], ids);
        const float* x = mass.row(h, i);
        val[hs].resize(len);
        double aa = 0;
        for (size_t u = 0; u < len; ++u) {
          val[hs][u] = static_cast<double>(x[u]);
          aa += val[hs][u] * val[hs][u];
        }
        vsq[hs] = aa;
        const std::vector<double>& r = ranks[hs];
        double m = 0;
        for (size_t u = 0; u < len; ++u) m += r[u];
        m /= static_cast<double>(len);
        cen[hs].resize(len);
        double cc = 0;
        for (size_t u = 0; u < len; ++u) {
          cen[hs][u] = r[u] - m;
          cc += cen[hs][u] * cen[hs][u];
        }
        csq[hs] = cc;
      }
      for (int a = 0; a < H; ++a)
        for (int b0 = a; b0 < H; b0 += 4) {
          const int nbh = std::min(4, H - b0);
          double ab[4], rr[4];
          dots(val[static_cast<size_t>(a)].data(), val.data() + b0, nbh, len, ab);
          dots(cen[static_cast<size_t>(a)].data(), cen.data() + b0, nbh, len, rr);
          for (int q = 0; q < nbh; ++q) {
            const int b = b0 + q;
            const double aa = vsq[static_cast<size_t>(a)], bb = vsq[static_cast<size_t>(b)];
            const double ca = csq[static_cast<size_t>(a)], cb = csq[static_cast<size_t>(b)];
            const double c = (aa <= 0 || bb <= 0) ? kNaN : std::clamp(ab[q] / std::sqrt(aa * bb), -1.0, 1.0);
            const double r = (ca <= 0 || cb <= 0) ? kNaN : std::clamp(rr[q] / std::sqrt(ca * cb), -1.0, 1.0);
            const size_t ix = t * HH + static_cast<size_t>(a) * H + b;
            row_cos[ix] = c;
            row_sp[ix] = r;
          }
        }
    }
  }
  s.cosine.assign(HH, kNaN);
  s.spearman.assign(HH, kNaN);
  for (int a = 0; a < H; ++a)
    for (int b = a; b < H; ++b) {
      const size_t ab = static_cast<size_t>(a) * H + b, ba = static_cast<size_t>(b) * H + a;
      double cs = 0, ss = 0;
      int64_t cn = 0, sn = 0;
      for (size_t t = 0; t < R; ++t) {
        const double x = row_cos[t * HH + ab], y = row_sp[t * HH + ab];
        if (std::isfinite(x)) { cs += x; ++cn; }
        if (std::isfinite(y)) { ss += y; ++sn; }
      }
      const double c = cn ? cs / cn : kNaN;
      const double r = sn ? ss / sn : kNaN;
      s.cosine[ab] = s.cosine[ba] = c;
      s.spearman[ab] = s.spearman[ba] = r;
    }
  return s;
}

}  // namespace proxyattn::analysis
