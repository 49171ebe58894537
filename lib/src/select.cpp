// Selection of key blocks per (head, query block) into a BlockMask.
#include "proxyattn/select.hpp"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <string>

#include "estimator_util.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/rank_key.hpp"

namespace proxyattn {

namespace {

void check_scores(const BlockScores& s, const char* who) {
  if (s.heads <= 0 || s.num_blocks <= 0 || s.block <= 0 ||
      s.score.size() != static_cast<size_t>(s.heads) * s.num_blocks * s.num_blocks)
    throw Error(std::string(who) + ": block scores of '" + s.method + "' are empty or mis-shaped");
}

void check_options(const SelectOptions& o) {
  if (o.local_window < 0)
    throw Error("select: local_window = " + std::to_string(o.local_window) + " must be >= 0");
}

// Forced flags of row i into `forced` (size >= i + 1); returns their count.
int mark_forced(int i, const SelectOptions& o, std::vector<uint8_t>& forced) {
  std::fill(forced.begin(), forced.begin() + i + 1, 0);
  if (o.sink) forced[0] = 1;
  if (o.diagonal) forced[i] = 1;
  for (int w = 1; w <= o.local_window && i - w >= 0; ++w) forced[i - w] = 1;
  int n = 0;
  for (int j = 0; j <= i; ++j) n += forced[j];
  return n;
}

int forced_count(int i, const SelectOptions& o) {
  std::vector<uint8_t> f(i + 1);
  return mark_forced(i, o, f);
}

// Score order for ranking: NaN lowest.
inline bool better(float a, float b) {
  if (std::isnan(a)) return false;
  if (std::isnan(b)) return true;
  return a > b;
}

// Blocks of row i: forced ones, then by descending score (ties lower j) up to the row total.
void select_row(const float* score, int i, int64_t budget, const SelectOptions& o,
                std::vector<uint8_t>& forced, std::vector<int32_t>& out, std::vector<uint64_t>& keys) {
  out.clear();
  const int nf = mark_forced(i, o, forced);
  const int64_t total = std::max<int64_t>(nf, std::min<int64_t>(budget, i + 1));
  if (total >= i + 1) {
    for (int j = 0; j <= i; ++j) out.push_back(j);
    return;
  }
  keys.clear();
  for (int j = 0; j <= i; ++j)
    if (forced[j]) out.push_back(j);
    else keys.push_back(rank::desc_id_key(score[j], static_cast<uint32_t>(j)));
  const size_t take = static_cast<size_t>(total - nf);
  if (take < keys.size()) std::nth_element(keys.begin(), keys.begin() + take, keys.end());
  for (size_t t = 0; t < take; ++t) out.push_back(static_cast<int32_t>(keys[t] & 0xFFFFFFFFu));
  std::sort(out.begin(), out.end());
}

// Mask from per-row budgets row_k(h, i).
template <class RowK>
BlockMask select_with(const BlockScores& s, const SelectOptions& o, RowK&& row_k) {
  const int nb = s.num_blocks;
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(s.heads) * nb);
  detail::parallel_for(s.heads, [&](int64_t h) {
    std::vector<uint8_t> forced(nb);
    std::vector<uint64_t> keys;
    for (int i = 0; i < nb; ++i)
      select_row(s.row(static_cast<int>(h), i), i, row_k(static_cast<int>(h), i), o, forced,
                 rows[static_cast<size_t>(h) * nb + i], keys);
  });
  std::vector<int32_t> indptr{0}, indices;
  for (const auto& r : rows) {
    indices.insert(indices.end(), r.begin(), r.end());
    indptr.push_back(static_cast<int32_t>(indices.size()));
  }
  return BlockMask(s.heads, s.seq_len, s.block, std::move(indptr), std::move(indices));
}

double causal_blocks(int nb) { return 0.5 * nb * (nb + 1.0); }

// row_uniform: the shared per-row k whose density is closest to the target (nf: forced blocks
// per row). The density of a shared k is the same for every head: sum_i max(nf_i, min(k, i+1)).
int row_uniform_k(int nb, double density, const std::vector<int>& nf) {
  int best_k = 1;
  double best_err = 2.0;
  for (int k = 1; k <= nb; ++k) {
    double sel = 0;
    for (int i = 0; i < nb; ++i) sel += std::max(nf[i], std::min(k, i + 1));
    const double err = std::abs(sel / causal_blocks(nb) - density);
    if (err < best_err - 1e-15) best_err = err, best_k = k;
  }
  return best_k;
}

// head_global / native_adjust for several targets T (blocks per head) of one score set. One key
// per causal cell: tier (2 bits: forced, native, other), score (descending, NaN lowest), then the
// causal index i (i + 1) / 2 + j (ties by lower i, then j): the comparator order of
// select_to_density as plain integers. The keys are built once per head and each target's T
// smallest found through one histogram of their top bits (the sets are nested); masks go
// straight into CSR rows.
constexpr int64_t kKeyedCells = int64_t{1} << 30;
constexpr int64_t kKeyBuckets = int64_t{1} << 16;
std::vector<BlockMask> keyed_density_masks(const BlockScores& s, const std::vector<int64_t>& targets, bool use_native,
                                           const SelectOptions& o) {
  const int nb = s.num_blocks;
  const int64_t per_head = static_cast<int64_t>(nb) * (nb + 1) / 2;
  const size_t nt = targets.size();
  std::vector<size_t> by_size(nt);  // targets, largest first
  for (size_t t = 0; t < nt; ++t) by_size[t] = t;
  std::stable_sort(by_size.begin(), by_size.end(), [&](size_t x, size_t y) { return targets[x] > targets[y]; });
  std::vector<std::vector<std::vector<int32_t>>> head_idx(nt, std::vector<std::vector<int32_t>>(s.heads));
  std::vector<std::vector<int32_t>> row_n(nt, std::vector<int32_t>(static_cast<size_t>(s.heads) * nb));
  detail::parallel_for(s.heads, [&](int64_t h64) {
    const int h = static_cast<int>(h64);
    std::vector<uint64_t> keys(static_cast<size_t>(per_head));
    std::vector<uint8_t> forced(nb);
    int64_t nforced = 0;
    for (int i = 0; i < nb; ++i) {
      nforced += mark_forced(i, o, forced);
      const float* row = s.row(h, i);
      const uint64_t base = static_cast<uint64_t>(i) * (i + 1) / 2;
      std::span<const int32_t> nat;
      if (use_native) nat = s.native->row(h, i);
      size_t p = 0;  // walks the sorted native row alongside j
      for (int j = 0; j <= i; ++j) {
        while (p < nat.size() && nat[p] < j) ++p;
        const uint64_t tier = forced[j] ? 0 : (p < nat.size() && nat[p] == j ? 1 : 2);
        keys[base + j] = (tier << 62) | (uint64_t{rank::desc_key(row[j])} << 30) | (base + j);
      }
    }
    // The `take` smallest keys of a target, found by the keys' top 16 bits: a histogram puts
    // the cut in one bucket; the keys of lower buckets are all in, the cut bucket is ordered
    // alone (keys are unique: the same set as a full sort). level[cell] = how many targets take
    // the cell: the sets are nested, so a cell of level L is in the L largest targets
    // (by_size[0 .. L)); one scan then writes every mask's rows.
    std::vector<uint32_t> hist(kKeyBuckets, 0);
    for (uint64_t key : keys) ++hist[key >> 48];
    std::vector<uint16_t> level(static_cast<size_t>(per_head), 0);
    std::vector<int64_t> cut(nt), need(nt);  // per target: its cut bucket (-1: none), keys taken there
    std::vector<std::vector<int32_t>*> idx(nt);
    for (size_t x = 0; x < nt; ++x) {
      const size_t t = by_size[x];
      const int64_t take = std::min<int64_t>(per_head, std::max(nforced, targets[t]));
      idx[x] = &head_idx[t][static_cast<size_t>(h)];
      idx[x]->resize(static_cast<size_t>(take));  // a target's set holds exactly `take` cells
      int64_t below = 0, b = 0;
      while (b < kKeyBuckets && below + hist[static_cast<size_t>(b)] < take) below += hist[static_cast<size_t>(b++)];
      cut[x] = take > 0 ? b : -1;
      need[x] = take - below;
    }
    std::vector<std::vector<uint64_t>> cand(nt);
    for (uint64_t key : keys) {
      const int64_t b = static_cast<int64_t>(key >> 48);
      uint16_t lv = 0;
      for (size_t x = 0; x < nt; ++x) {
        lv += b < cut[x];
        if (b == cut[x]) cand[x].push_back(key);
      }
      level[key & (kKeyedCells - 1)] = lv;
    }
    for (size_t x = 0; x < nt; ++x) {
      std::vector<uint64_t>& c = cand[x];
      if (need[x] < static_cast<int64_t>(c.size())) std::nth_element(c.begin(), c.begin() + need[x], c.end());
      for (int64_t y = 0; y < need[x]; ++y) ++level[c[static_cast<size_t>(y)] & (kKeyedCells - 1)];
    }
    std::vector<int32_t*> out(nt), before(nt);
    for (size_t x = 0; x < nt; ++x) out[x] = idx[x]->data();
    for (int i = 0; i < nb; ++i) {
      const uint16_t* lv = level.data() + static_cast<size_t>(i) * (i + 1) / 2;
      for (size_t x = 0; x < nt; ++x) before[x] = out[x];
      for (int j = 0; j <= i; ++j)
        for (int x = 0; x < lv[j]; ++x) *out[static_cast<size_t>(x)]++ = j;
      for (size_t x = 0; x < nt; ++x)
        row_n[by_size[x]][static_cast<size_t>(h) * nb + i] = static_cast<int32_t>(out[x] - before[x]);
    }
  });
  std::vector<BlockMask> out;
  for (size_t t = 0; t < nt; ++t) {
    std::vector<int32_t> indptr(row_n[t].size() + 1, 0);
    for (size_t r = 0; r < row_n[t].size(); ++r) indptr[r + 1] = indptr[r] + row_n[t][r];
    std::vector<int32_t> indices(static_cast<size_t>(indptr.back()));
    detail::parallel_for(s.heads, [&](int64_t h) {  // each head's rows at their offset
      const std::vector<int32_t>& idx = head_idx[t][static_cast<size_t>(h)];
      std::copy(idx.begin(), idx.end(), indices.begin() + indptr[static_cast<size_t>(h) * nb]);
    });
    out.emplace_back(s.heads, s.seq_len, s.block, std::move(indptr), std::move(indices));
  }
  return out;
}

}  // namespace

std::string_view density_rule_name(DensityRule r) {
  switch (r) {
    case DensityRule::row_uniform: return "row_uniform";
    case DensityRule::head_global: return "head_global";
    case DensityRule::native_adjust: return "native_adjust";
  }
  return "?";
}

DensityRule parse_density_rule(std::string_view s) {
  if (s == "row_uniform") return DensityRule::row_uniform;
  if (s == "head_global") return DensityRule::head_global;
  if (s == "native_adjust") return DensityRule::native_adjust;
  throw Error("unknown density rule '" + std::string(s) + "' (valid: row_uniform, head_global, native_adjust)");
}

BlockMask select_blocks(const BlockScores& s, const Budgets& b, const SelectOptions& o) {
  check_scores(s, "select_blocks");
  check_options(o);
  if (b.heads != s.heads || b.num_blocks != s.num_blocks ||
      b.per_row_k.size() != static_cast<size_t>(s.heads) * s.num_blocks)
    throw Error("select_blocks: budgets '" + b.kind + "' are for " + std::to_string(b.heads) + " heads x " +
                std::to_string(b.num_blocks) + " blocks, scores '" + s.method + "' for " + std::to_string(s.heads) +
                " x " + std::to_string(s.num_blocks));
  return select_with(s, o, [&](int h, int i) { return static_cast<int64_t>(b.row_k(h, i)); });
}

namespace {
size_t order_offset(int h, int i, int nb) {
  return static_cast<size_t>(h) * nb * (nb + 1) / 2 + static_cast<size_t>(i) * (i + 1) / 2;
}
}  // namespace

std::vector<int32_t> selection_order(const BlockScores& s, const SelectOptions& o) {
  check_scores(s, "selection_order");
  check_options(o);
  const int nb = s.num_blocks;
  std::vector<int32_t> order(order_offset(s.heads, 0, nb));
  // Heads whose scores are bitwise those of the previous head (the members of one proxy group)
  // get its order copied instead of sorted again.
  const std::vector<int> leader = equal_head_leaders(s.score.data(), s.heads, static_cast<size_t>(nb) * nb);
  std::vector<int> own;  // heads sorted here; in parallel over (head, row): one head may be all
  for (int h = 0; h < s.heads; ++h)
    if (leader[static_cast<size_t>(h)] == h) own.push_back(h);
  detail::parallel_heads_blocks(static_cast<int>(own.size()), nb, [&](int x, int i) {
    const int h = own[static_cast<size_t>(x)];
    selection_order_row(s.row(h, i), i, o, order.data() + order_offset(h, i, nb));
  });
  detail::parallel_for(s.heads, [&](int64_t h64) {
    const int h = static_cast<int>(h64), from = leader[static_cast<size_t>(h)];
    if (from != h)
      std::copy(order.begin() + order_offset(from, 0, nb), order.begin() + order_offset(from + 1, 0, nb),
                order.begin() + order_offset(h, 0, nb));
  });
  return order;
}

std::vector<int> equal_head_leaders(const float* data, int heads, size_t per_head) {
  std::vector<char> same(static_cast<size_t>(std::max(heads, 0)), 0);  // equal to the head before
  detail::parallel_for(std::max(heads - 1, 0), [&](int64_t x) {
    const size_t h = static_cast<size_t>(x) + 1;
    same[h] = std::equal(data + h * per_head, data + (h + 1) * per_head, data + (h - 1) * per_head,
                         [](float a, float b) { return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b); });
  });
  std::vector<int> leader(same.size());
  for (size_t h = 0; h < leader.size(); ++h) leader[h] = same[h] ? leader[h - 1] : static_cast<int>(h);
  return leader;
}

void selection_order_row(const float* score, int i, const SelectOptions& o, int32_t* out) {
  auto forced = [&](int j) { return (o.sink && j == 0) || (o.diagonal && j == i) || (j < i && i - j <= o.local_window); };
  int n = 0;
  for (int j = 0; j <= i; ++j)
    if (forced(j)) out[n++] = j;
  // The others by rank key (descending score, NaN last, ties lower j).
  thread_local std::vector<uint64_t> keys, scratch;
  keys.clear();
  for (int j = 0; j <= i; ++j)
    if (!forced(j)) keys.push_back(rank::desc_id_key(score[j], static_cast<uint32_t>(j)));
  rank::sort_id_keys(keys, scratch);  // ids ascend in input order
  for (uint64_t key : keys) out[n++] = static_cast<int32_t>(key & 0xFFFFFFFFu);
}

bool is_prefix_of_order(const BlockMask& mask, const std::vector<int32_t>& order) {
  const int nb = mask.num_blocks(), H = mask.heads();
  if (order.size() != order_offset(H, 0, nb)) return false;
  std::atomic<bool> ok{true};
  detail::parallel_for(H, [&](int64_t h64) {
    const int h = static_cast<int>(h64);
    // A row is a prefix when each of the order's first |row| blocks is in it (the row is sorted
    // and unique, the order a permutation of 0..i): a stamp per block, O(|row|).
    std::vector<int32_t> stamp(static_cast<size_t>(nb), -1);
    for (int i = 0; i < nb && ok.load(std::memory_order_relaxed); ++i) {
      const auto row = mask.row(h, i);
      if (row.size() > static_cast<size_t>(i) + 1) {
        ok = false;
        return;
      }
      for (int32_t j : row) stamp[static_cast<size_t>(j)] = i;
      const int32_t* o = order.data() + order_offset(h, i, nb);
      for (size_t x = 0; x < row.size(); ++x)
        if (stamp[static_cast<size_t>(o[x])] != i) {
          ok = false;
          return;
        }
    }
  });
  return ok.load();
}

std::vector<int32_t> native_first_order(const BlockMask& native, const std::vector<int32_t>& order,
                                        const SelectOptions& o) {
  check_options(o);
  const int nb = native.num_blocks(), H = native.heads();
  if (order.size() != order_offset(H, 0, nb)) throw Error("native_first_order: order of another shape");
  std::vector<int32_t> out(order.size());
  detail::parallel_for(H, [&](int64_t h64) {
    const int h = static_cast<int>(h64);
    std::vector<int32_t> stamp(static_cast<size_t>(nb), -1), rest;
    std::vector<uint8_t> forced(static_cast<size_t>(nb));
    for (int i = 0; i < nb; ++i) {
      for (int32_t j : native.row(h, i)) stamp[static_cast<size_t>(j)] = i;
      const int32_t* src = order.data() + order_offset(h, i, nb);
      int32_t* dst = out.data() + order_offset(h, i, nb);
      // The forced blocks lead `order`'s row: they stay first; the rest is split stably.
      const int nf = mark_forced(i, o, forced);
      int n = nf;
      std::copy(src, src + nf, dst);
      rest.clear();
      for (int x = nf; x <= i; ++x) {
        const int32_t j = src[x];
        if (stamp[static_cast<size_t>(j)] == i) dst[n++] = j;
        else rest.push_back(j);
      }
      std::copy(rest.begin(), rest.end(), dst + n);
    }
  });
  return out;
}

BlockMask select_blocks_in_order(const BlockScores& s, const std::vector<int32_t>& order, const Budgets& b,
                                 const SelectOptions& o) {
  check_scores(s, "select_blocks_in_order");
  check_options(o);
  const int nb = s.num_blocks;
  if (b.heads != s.heads || b.num_blocks != nb || b.per_row_k.size() != static_cast<size_t>(s.heads) * nb)
    throw Error("select_blocks_in_order: budgets '" + b.kind + "' do not match scores '" + s.method + "'");
  if (order.size() != order_offset(s.heads, 0, nb))
    throw Error("select_blocks_in_order: the order is not of these scores");
  std::vector<int32_t> indptr(static_cast<size_t>(s.heads) * nb + 1, 0);
  std::vector<int32_t> take(static_cast<size_t>(s.heads) * nb);
  for (int i = 0; i < nb; ++i) {
    const int64_t nf = forced_count(i, o);
    for (int h = 0; h < s.heads; ++h) {
      const size_t r = static_cast<size_t>(h) * nb + i;
      take[r] = static_cast<int32_t>(std::max<int64_t>(nf, std::min<int64_t>(b.per_row_k[r], i + 1)));
    }
  }
  for (size_t r = 0; r < take.size(); ++r) indptr[r + 1] = indptr[r] + take[r];
  std::vector<int32_t> indices(static_cast<size_t>(indptr.back()));
  detail::parallel_for(s.heads, [&](int64_t h64) {
    const int h = static_cast<int>(h64);
    std::vector<uint64_t> bits(static_cast<size_t>(nb + 63) / 64, 0);
    for (int i = 0; i < nb; ++i) {
      const size_t r = static_cast<size_t>(h) * nb + i;
      const int32_t* src = order.data() + order_offset(h, i, nb);
      int32_t* dst = indices.data() + indptr[r];
      const int32_t n = take[r];
      if (n == i + 1) {  // the whole row
        for (int j = 0; j <= i; ++j) dst[j] = j;
        continue;
      }
      // The row's first n blocks as bits, read back in ascending order (word by word).
      for (int32_t t = 0; t < n; ++t) bits[static_cast<size_t>(src[t]) >> 6] |= uint64_t{1} << (src[t] & 63);
      for (size_t w = 0; w <= static_cast<size_t>(i) >> 6; ++w) {
        for (uint64_t x = bits[w]; x; x &= x - 1) *dst++ = static_cast<int32_t>(w * 64 + std::countr_zero(x));
        bits[w] = 0;
      }
    }
  });
  return BlockMask(s.heads, s.seq_len, s.block, std::move(indptr), std::move(indices));
}

BlockMask select_top_k(const BlockScores& s, int k, const SelectOptions& o) {
  check_scores(s, "select_top_k");
  check_options(o);
  if (k < 1) throw Error("select_top_k: k = " + std::to_string(k) + " must be >= 1");
  return select_with(s, o, [&](int, int) { return static_cast<int64_t>(k); });
}

namespace {
// select_to_density's checks; the forced blocks of each row.
std::vector<int> density_forced_counts(const BlockScores& s, double density, const SelectOptions& o) {
  check_scores(s, "select_to_density");
  check_options(o);
  if (!(density > 0.0 && density <= 1.0))
    throw Error("select_to_density: density = " + detail::str(density) + " must be in (0, 1]");
  std::vector<int> nf(static_cast<size_t>(s.num_blocks));
  for (int i = 0; i < s.num_blocks; ++i) nf[static_cast<size_t>(i)] = forced_count(i, o);
  return nf;
}
}  // namespace

BlockMask select_to_density(const BlockScores& s, double density, DensityRule rule, const SelectOptions& o) {
  const std::vector<int> nf = density_forced_counts(s, density, o);
  const int nb = s.num_blocks;

  if (rule == DensityRule::row_uniform) return select_top_k(s, row_uniform_k(nb, density, nf), o);

  const bool use_native = rule == DensityRule::native_adjust && s.native.has_value();
  const int64_t target = std::llround(density * causal_blocks(nb));
  const int64_t per_head = static_cast<int64_t>(nb) * (nb + 1) / 2;
  if (per_head < kKeyedCells) return keyed_density_masks(s, {target}, use_native, o).front();
  std::vector<uint8_t> bitmap(static_cast<size_t>(s.heads) * nb * nb, 0);
  detail::parallel_for(s.heads, [&](int64_t h64) {
    const int h = static_cast<int>(h64);
    struct Cell {
      float score;
      int32_t i, j;
      uint8_t tier;  // 0 forced, 1 native, 2 other
    };
    std::vector<Cell> cells;
    std::vector<uint8_t> forced(nb);
    for (int i = 0; i < nb; ++i) {
      mark_forced(i, o, forced);
      for (int j = 0; j <= i; ++j) {
        const uint8_t tier = forced[j] ? 0 : (use_native && s.native->contains(h, i, j) ? 1 : 2);
        cells.push_back({s.at(h, i, j), i, j, tier});
      }
    }
    int64_t nforced = 0;
    for (const Cell& c : cells) nforced += c.tier == 0;
    const int64_t take = std::min<int64_t>(static_cast<int64_t>(cells.size()), std::max(nforced, target));
    // A strict total order (tier, score descending, NaN lowest, then i, j): the first `take`
    // cells are one set, found in linear time (at 128K a head has 524K causal cells).
    std::nth_element(cells.begin(), cells.begin() + take, cells.end(), [](const Cell& a, const Cell& b) {
      if (a.tier != b.tier) return a.tier < b.tier;
      if (better(a.score, b.score)) return true;
      if (better(b.score, a.score)) return false;
      return a.i != b.i ? a.i < b.i : a.j < b.j;
    });
    for (int64_t t = 0; t < take; ++t)
      bitmap[(static_cast<size_t>(h) * nb + cells[t].i) * nb + cells[t].j] = 1;
  });
  return BlockMask::from_bitmap(s.heads, s.seq_len, s.block, bitmap);
}

BlockMask select_to_density(const BlockScores& s, const std::vector<int32_t>& order, double density, DensityRule rule,
                            const SelectOptions& o) {
  if (rule != DensityRule::row_uniform) return select_to_density(s, density, rule, o);
  const std::vector<int> nf = density_forced_counts(s, density, o);
  const int nb = s.num_blocks;
  // select_top_k(k) is select_blocks with k in every row: a prefix of each row's order.
  Budgets b;
  b.kind = "uniform";
  b.heads = s.heads;
  b.num_blocks = nb;
  b.per_row_k.assign(static_cast<size_t>(s.heads) * nb, row_uniform_k(nb, density, nf));
  return select_blocks_in_order(s, order, b, o);
}

std::vector<BlockMask> select_to_densities(const BlockScores& s, const std::vector<double>& densities, DensityRule rule,
                                           const SelectOptions& o) {
  check_scores(s, "select_to_densities");
  check_options(o);
  const int nb = s.num_blocks;
  const int64_t per_head = static_cast<int64_t>(nb) * (nb + 1) / 2;
  bool keyed = rule != DensityRule::row_uniform && per_head < kKeyedCells && densities.size() < 65536;
  std::vector<int64_t> targets;
  for (double d : densities) {
    if (!(d > 0.0 && d <= 1.0)) keyed = false;  // select_to_density names the bad value
    targets.push_back(std::llround(d * causal_blocks(nb)));
  }
  if (keyed) return keyed_density_masks(s, targets, rule == DensityRule::native_adjust && s.native.has_value(), o);
  std::vector<BlockMask> out;
  for (double d : densities) out.push_back(select_to_density(s, d, rule, o));
  return out;
}

namespace {

// The budgets scaled by the one factor c that brings the mean density over heads closest to the
// target (selection keeps max(forced, min(k, i + 1)) blocks per row, independent of the scores).
Budgets budgets_scaled_to_density(const BlockScores& s, const Budgets& b, double density, const SelectOptions& o,
                                  const char* who) {
  check_scores(s, who);
  check_options(o);
  if (!(density > 0.0 && density <= 1.0))
    throw Error(std::string(who) + ": density = " + detail::str(density) + " must be in (0, 1]");
  if (b.heads != s.heads || b.num_blocks != s.num_blocks ||
      b.per_row_k.size() != static_cast<size_t>(s.heads) * s.num_blocks)
    throw Error(std::string(who) + ": budgets '" + b.kind + "' do not match scores '" + s.method + "'");
  const int nb = s.num_blocks;
  std::vector<int> nf(nb);
  for (int i = 0; i < nb; ++i) nf[i] = forced_count(i, o);
  auto scaled_k = [&](double c, size_t r) {
    return static_cast<int32_t>(std::max<int64_t>(1, std::llround(c * b.per_row_k[r])));
  };
  // The selected count is a sum of integers (exact in any order), so it is summed per run of
  // rows with the same budget: rows with i + 1 <= k keep all i + 1 blocks, the others k (once k
  // covers the forced blocks), in closed form; ~100 bisection steps then cost O(runs) each.
  struct Run {
    int i0, i1;
    int32_t k;
  };
  std::vector<Run> runs;
  for (int h = 0; h < s.heads; ++h)
    for (int i = 0; i < nb; ++i) {
      const int32_t k = b.per_row_k[static_cast<size_t>(h) * nb + i];
      if (i > 0 && runs.back().k == k) runs.back().i1 = i;
      else runs.push_back({i, i, k});
    }
  const int nf_max = *std::max_element(nf.begin(), nf.end());
  auto density_of = [&](double c) {
    int64_t sel = 0;
    for (const Run& run : runs) {
      const int64_t K = static_cast<int32_t>(std::max<int64_t>(1, std::llround(c * run.k)));  // as scaled_k
      if (K < nf_max) {
        for (int i = run.i0; i <= run.i1; ++i) sel += std::max<int64_t>(nf[i], std::min<int64_t>(K, i + 1));
        continue;
      }
      const int64_t a = run.i0, e = std::min<int64_t>(run.i1, K - 1);  // rows keeping all i + 1
      if (e >= a) sel += (e + 1) * (e + 2) / 2 - a * (a + 1) / 2;
      const int64_t lo = std::max<int64_t>(run.i0, K);
      if (run.i1 >= lo) sel += (run.i1 - lo + 1) * K;
    }
    return static_cast<double>(sel) / (causal_blocks(nb) * s.heads);
  };
  int32_t kmin = nb;
  for (int32_t k : b.per_row_k) kmin = std::min(kmin, std::max(1, k));
  double lo = 0.0, hi = 2.0 * nb / kmin + 1.0;  // density_of(hi) == 1
  for (int it = 0; it < 100; ++it) {  // lo: density < target, hi: density >= target
    const double mid = 0.5 * (lo + hi);
    (density_of(mid) < density ? lo : hi) = mid;
  }
  const double c = std::abs(density_of(lo) - density) < std::abs(density_of(hi) - density) ? lo : hi;
  Budgets out = b;
  out.kind = b.kind + "@density";
  for (size_t r = 0; r < out.per_row_k.size(); ++r) out.per_row_k[r] = scaled_k(c, r);
  for (int h = 0; h < s.heads; ++h) out.per_head_k[h] = b.per_head_k[h] * c;
  return out;
}

}  // namespace

BlockMask select_budgets_to_density(const BlockScores& s, const Budgets& b, double density,
                                    const SelectOptions& o, Budgets* scaled) {
  Budgets out = budgets_scaled_to_density(s, b, density, o, "select_budgets_to_density");
  BlockMask m = select_blocks(s, out, o);
  if (scaled) *scaled = std::move(out);
  return m;
}

BlockMask select_budgets_to_density(const BlockScores& s, const std::vector<int32_t>& order, const Budgets& b,
                                    double density, const SelectOptions& o) {
  return select_blocks_in_order(s, order, budgets_scaled_to_density(s, b, density, o, "select_budgets_to_density"),
                                o);
}

}  // namespace proxyattn
