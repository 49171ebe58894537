// Fused oracle pass and multi-mask output-error pass; see layer_oracle.hpp.
#include "proxyattn/analysis/layer_oracle.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "analysis_kernels.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/select.hpp"

namespace proxyattn::analysis {

namespace {

namespace kn = kernels;

// K packed per KV head by column tiles (kernels::pack_rows), so panels read contiguous tiles.
std::vector<float> pack_k(ConstView k) {
  const int d = static_cast<int>(k.dim);
  const int64_t per = kn::packed_size(k.tokens, d);
  std::vector<float> kt(static_cast<size_t>(k.heads * per));
#pragma omp parallel for schedule(static)
  for (int64_t h = 0; h < k.heads; ++h)
    kn::pack_rows(k.row(h, 0), k.stride_token, k.tokens, d, kt.data() + h * per);
  return kt;
}

// (head, query block) tasks, largest panels first so the dynamic schedule balances.
std::vector<std::pair<int, int>> panel_tasks(int heads, int nb) {
  std::vector<std::pair<int, int>> t;
  t.reserve(static_cast<size_t>(heads) * nb);
  for (int i = nb - 1; i >= 0; --i)
    for (int h = 0; h < heads; ++h) t.emplace_back(h, i);
  return t;
}

struct Geometry {
  AttentionShape shape;
  int64_t n = 0;
  int d = 0, block = 0, nb = 0;
  int64_t ldk = 0;  // padded key length
  float scale = 0;
};

Geometry geometry(ConstView q, ConstView k, ConstView v, int block) {
  Geometry g;
  g.shape = check_qkv(q, k, v);
  validate_block_size(block);
  g.n = g.shape.seq_len;
  g.d = g.shape.head_dim;
  g.block = block;
  g.nb = num_blocks_for(g.n, block);
  g.ldk = kn::round_up_cols(g.n);
  g.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(g.d)));
  return g;
}

// Scaled query rows [r0, r0 + nr) of head h into a contiguous buffer.
void load_queries(ConstView q, int h, int64_t r0, int nr, int d, float scale, float* dst) {
  for (int r = 0; r < nr; ++r) {
    const float* src = q.row(h, r0 + r);
    for (int t = 0; t < d; ++t) dst[static_cast<size_t>(r) * d + t] = src[t] * scale;
  }
}

// Per-key-block partial outputs of a panel of nr rows: u[r, j, :] = P[r, keys of block j] V[those
// keys] for the key blocks j < nbk (P: nr rows of stride ldp over ncols keys).
void block_partial_outputs(const float* p, int64_t ldp, int nr, ConstView v, int kvh, int64_t ncols, int B, int nbk,
                           int d, float* u, int64_t ldu) {
  for (int j = 0; j < nbk; ++j) {
    const int64_t c0 = static_cast<int64_t>(j) * B;
    const int nc = static_cast<int>(std::min<int64_t>(B, ncols - c0));
    kn::pv_panel(p + c0, ldp, nr, v.row(kvh, c0), v.stride_token, nc, d, u + static_cast<size_t>(j) * d, ldu);
  }
}

// One query row: the full output is the sum of its per-key-block partial outputs ur[j] (written to
// `of`); adds each mask's squared error of the row to err/empty at slot (m, h, i) and adds the
// full row's squared norm to fsq (term by term, so sums are the same as one inline loop).
void add_row_errors(const float* ur, int nbk, int d, const double* pr, const std::vector<const BlockMask*>& masks,
                      int H, int h, int i, int nb, std::vector<float>& of, std::vector<double>& err,
                      std::vector<int64_t>& empty, double& fsq) {
  std::fill(of.begin(), of.end(), 0.0f);
  for (int j = 0; j < nbk; ++j) {
    const float* uj = ur + static_cast<size_t>(j) * d;
    for (int c = 0; c < d; ++c) of[static_cast<size_t>(c)] += uj[c];
  }
  for (int c = 0; c < d; ++c) fsq += static_cast<double>(of[static_cast<size_t>(c)]) * of[static_cast<size_t>(c)];
  for (size_t m = 0; m < masks.size(); ++m) {
    const auto sel = masks[m]->row(h, i);
    const size_t slot = (m * H + h) * nb + i;
    bool none = false;
    err[slot] += kn::masked_sq_error(ur, sel.data(), static_cast<int64_t>(sel.size()), pr, of.data(), d, &none);
    empty[slot] += none;
  }
}

}  // namespace

void rank_order(const float* row, int i, bool sink, bool diagonal, int32_t* out) {
  // select.hpp's order (forced blocks first, ascending; then by score), so prefix tables and
  // selections agree by construction.
  SelectOptions o;
  o.sink = sink;
  o.diagonal = diagonal;
  selection_order_row(row, i, o, out);
}

std::vector<int32_t> rank_orders(const float* scores, int heads, int nb, bool sink, bool diagonal) {
  std::vector<int32_t> order(causal_offset(heads, 0, nb));
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i)
      rank_order(scores + (static_cast<size_t>(h) * nb + i) * nb, i, sink, diagonal,
                 order.data() + causal_offset(h, i, nb));
  return order;
}

bool prefix_mask_errors(const PrefixErrors& table, const std::vector<double>& full_sq,
                        const BlockMask& mask, std::vector<double>& rel_error, int64_t& empty_rows) {
  const int H = table.heads, nb = table.num_blocks;
  if (mask.heads() != H || mask.num_blocks() != nb || full_sq.size() != static_cast<size_t>(H) ||
      !is_prefix_of_order(mask, table.order))
    return false;
  rel_error.assign(static_cast<size_t>(H), 0.0);
  empty_rows = 0;
  for (int h = 0; h < H; ++h) {
    double e = 0;
    for (int i = 0; i < nb; ++i) {
      const size_t at = prefix_offset(h, i, nb) + mask.row(h, i).size();
      e += table.sq_error[at];
      empty_rows += table.empty_rows[at];
    }
    rel_error[static_cast<size_t>(h)] =
        full_sq[static_cast<size_t>(h)] > 0 ? std::sqrt(e / full_sq[static_cast<size_t>(h)])
                                            : std::numeric_limits<double>::quiet_NaN();
  }
  return true;
}

LayerOracle layer_oracle(ConstView q, ConstView k, int block) {
  return std::move(layer_pass(q, k, {}, block).oracle);
}

LayerPass layer_pass(ConstView q, ConstView k, ConstView v, int block,
                     const std::vector<const BlockMask*>& masks, const std::vector<Ranking>& rankings) {
  const Geometry g = geometry(q, k, v, block);
  const int H = g.shape.q_heads, nb = g.nb, B = g.block, d = g.d;
  const int64_t N = g.n;
  const bool with_v = !v.empty();
  if (!with_v && (!masks.empty() || !rankings.empty()))
    throw Error("layer pass: output errors need V");
  for (size_t m = 0; m < masks.size(); ++m)
    if (!masks[m] || masks[m]->heads() != H || masks[m]->seq_len() != N || masks[m]->block() != B)
      throw Error("layer pass: mask " + std::to_string(m) + " does not match the layer (" + std::to_string(H) +
                  " heads, N = " + std::to_string(N) + ", block " + std::to_string(B) + ")");
  const size_t causal_all = causal_offset(H, 0, nb), prefix_all = prefix_offset(H, 0, nb);
  for (const Ranking& r : rankings)
    if (r.source == Ranking::Source::given && r.order.size() != causal_all)
      throw Error("layer pass: a given ranking has " + std::to_string(r.order.size()) + " entries, expected " +
                  std::to_string(causal_all));

  LayerPass res;
  LayerOracle& out = res.oracle;
  out.shape = g.shape;
  out.mass.heads = H;
  out.mass.num_blocks = nb;
  out.mass.block = B;
  out.mass.seq_len = N;
  out.mass.mass.assign(static_cast<size_t>(H) * nb * nb, 0.0f);
  out.lse.assign(static_cast<size_t>(H) * N, 0.0f);
  out.last_block_probs.assign(static_cast<size_t>(H) * N, 0.0f);
  out.block_max.assign(static_cast<size_t>(H) * nb * nb, 0.0f);

  const size_t M = masks.size(), R = rankings.size();
  std::vector<double> err(M * H * nb, 0.0), full(static_cast<size_t>(H) * nb, 0.0);
  std::vector<int64_t> empty(M * H * nb, 0);
  res.prefix.resize(R);
  for (size_t x = 0; x < R; ++x) {
    PrefixErrors& p = res.prefix[x];
    p.heads = H;
    p.num_blocks = nb;
    p.order = rankings[x].source == Ranking::Source::given ? rankings[x].order : std::vector<int32_t>(causal_all);
    p.sq_error.assign(prefix_all, 0.0);
    p.empty_rows.assign(prefix_all, 0);
  }

  const std::vector<float> kt = pack_k(k);
  const auto tasks = panel_tasks(H, nb);

#pragma omp parallel
  {
    std::vector<float> qs(static_cast<size_t>(B) * d);
    std::vector<float> s(static_cast<size_t>(B) * g.ldk);
    std::vector<double> bsum(static_cast<size_t>(nb)), macc(static_cast<size_t>(nb));
    std::vector<float> bmax(static_cast<size_t>(nb)), mmax(static_cast<size_t>(nb));
    std::vector<double> colacc;
    std::vector<float> u, of, scratch;
    std::vector<double> pm;  // [r][j] mass of key block j in query row r
    if (with_v) {
      u.resize(static_cast<size_t>(B) * nb * d);  // [r][j][t]
      of.resize(static_cast<size_t>(d));
      scratch.resize(static_cast<size_t>(d));
      pm.resize(static_cast<size_t>(B) * nb);
    }
#pragma omp for schedule(dynamic, 1)
    for (size_t t = 0; t < tasks.size(); ++t) {
      const auto [h, i] = tasks[t];
      const int64_t r0 = static_cast<int64_t>(i) * B;
      const int nr = static_cast<int>(std::min<int64_t>(B, N - r0));
      const int64_t ncols = r0 + nr;  // keys 0 .. last row of the block
      const int nbk = i + 1;
      const int kvh = g.shape.kv_head_of(h);
      const float* ktb = kt.data() + static_cast<size_t>(kvh) * d * g.ldk;
      load_queries(q, h, r0, nr, d, g.scale, qs.data());
      kn::gemm_panel(qs.data(), d, nr, d, ktb, ncols, s.data(), g.ldk);
      std::fill(macc.begin(), macc.begin() + nbk, 0.0);
      std::fill(mmax.begin(), mmax.begin() + nbk, 0.0f);
      const bool last = i == nb - 1;
      if (last) colacc.assign(static_cast<size_t>(ncols), 0.0);
      // Row softmax: exp(s - max), sums -> LSE; P = e / l (normalised in place when V follows).
      for (int r = 0; r < nr; ++r) {
        float* row = s.data() + static_cast<size_t>(r) * g.ldk;
        const int64_t valid = r0 + r + 1;  // causal: keys 0 .. q
        const float m = kn::row_max(row, valid);
        const double l = kn::exp_shift_sum(row, valid, m);
        out.lse[static_cast<size_t>(h) * N + r0 + r] = static_cast<float>(m + std::log(l));
        std::fill(row + valid, row + ncols, 0.0f);
        kn::block_sums(row, ncols, B, bsum.data());
        const double inv = 1.0 / l;
        for (int j = 0; j < nbk; ++j) macc[static_cast<size_t>(j)] += bsum[static_cast<size_t>(j)] * inv;
        if (with_v)
          for (int j = 0; j < nbk; ++j) pm[static_cast<size_t>(r) * nb + j] = bsum[static_cast<size_t>(j)] * inv;
        kn::block_maxs(row, ncols, B, bmax.data());
        const float finv = static_cast<float>(inv);
        for (int j = 0; j < nbk; ++j)
          mmax[static_cast<size_t>(j)] = std::max(mmax[static_cast<size_t>(j)], bmax[static_cast<size_t>(j)] * finv);
        if (last)
          for (int64_t c = 0; c < valid; ++c) colacc[static_cast<size_t>(c)] += row[c] * inv;
        if (with_v) kn::scale(row, valid, finv);
      }
      float* mrow = out.mass.row(h, i);
      for (int j = 0; j < nbk; ++j) mrow[j] = static_cast<float>(macc[static_cast<size_t>(j)] / nr);
      float* xrow = out.block_max.data() + (static_cast<size_t>(h) * nb + i) * nb;
      for (int j = 0; j < nbk; ++j) xrow[j] = mmax[static_cast<size_t>(j)];
      if (last) {
        float* tp = out.last_block_probs.data() + static_cast<size_t>(h) * N;
        for (int64_t c = 0; c < ncols; ++c) tp[c] = static_cast<float>(colacc[static_cast<size_t>(c)] / nr);
      }
      if (!with_v) continue;

      // Partial outputs per key block, the full output, then every mask and ranking.
      const int64_t ldu = static_cast<int64_t>(nb) * d;
      block_partial_outputs(s.data(), g.ldk, nr, v, kvh, ncols, B, nbk, d, u.data(), ldu);
      for (size_t x = 0; x < R; ++x) {
        const Ranking& rk = rankings[x];
        if (rk.source == Ranking::Source::given) continue;
        rank_order(rk.source == Ranking::Source::mass ? mrow : xrow, i, rk.sink, rk.diagonal,
                   res.prefix[x].order.data() + causal_offset(h, i, nb));
      }
      double fsq = 0;
      for (int r = 0; r < nr; ++r) {
        const float* ur = u.data() + static_cast<size_t>(r) * ldu;
        const double* pr = pm.data() + static_cast<size_t>(r) * nb;
        add_row_errors(ur, nbk, d, pr, masks, H, h, i, nb, of, err, empty, fsq);
        for (size_t x = 0; x < R; ++x) {
          PrefixErrors& p = res.prefix[x];
          const size_t at = prefix_offset(h, i, nb);
          kn::prefix_sq_errors(ur, p.order.data() + causal_offset(h, i, nb), nbk, pr, of.data(), d,
                               p.sq_error.data() + at, p.empty_rows.data() + at, scratch.data());
        }
      }
      full[static_cast<size_t>(h) * nb + i] = fsq;
    }
  }
  if (!with_v) return res;

  res.full_sq.assign(static_cast<size_t>(H), 0.0);
  res.errors.rel_error.assign(M, std::vector<double>(static_cast<size_t>(H), 0.0));
  res.errors.empty_rows.assign(M, 0);
  for (int h = 0; h < H; ++h) {
    double f = 0;
    for (int i = 0; i < nb; ++i) f += full[static_cast<size_t>(h) * nb + i];
    res.full_sq[static_cast<size_t>(h)] = f;
    for (size_t m = 0; m < M; ++m) {
      double e = 0;
      for (int i = 0; i < nb; ++i) {
        e += err[(m * H + h) * nb + i];
        res.errors.empty_rows[m] += empty[(m * H + h) * nb + i];
      }
      res.errors.rel_error[m][static_cast<size_t>(h)] =
          f > 0 ? std::sqrt(e / f) : std::numeric_limits<double>::quiet_NaN();
    }
  }
  return res;
}

OutputErrors output_errors(ConstView q, ConstView k, ConstView v, const LayerOracle& oracle,
                           const std::vector<const BlockMask*>& masks) {
  if (v.empty()) throw Error("output error: the layer has no V");
  const Geometry g = geometry(q, k, v, oracle.mass.block);
  const int H = g.shape.q_heads, nb = g.nb, B = g.block, d = g.d;
  const int64_t N = g.n;
  if (oracle.mass.heads != H || oracle.mass.num_blocks != nb || oracle.mass.seq_len != N ||
      oracle.lse.size() != static_cast<size_t>(H) * N)
    throw Error("output error: the oracle was computed for another layer shape");
  for (size_t m = 0; m < masks.size(); ++m) {
    const BlockMask* mk = masks[m];
    if (!mk || mk->heads() != H || mk->seq_len() != N || mk->block() != B)
      throw Error("output error: mask " + std::to_string(m) + " does not match the layer (" +
                  std::to_string(H) + " heads, N = " + std::to_string(N) + ", block " +
                  std::to_string(B) + ")");
  }
  const size_t M = masks.size();
  // Per (mask, head, query block) squared error; per (head, block) squared full norm. Each task
  // writes only its own slots, so no reduction races.
  std::vector<double> err(M * H * nb, 0.0), full(static_cast<size_t>(H) * nb, 0.0);
  std::vector<int64_t> empty(M * H * nb, 0);

  const std::vector<float> kt = pack_k(k);
  const auto tasks = panel_tasks(H, nb);

#pragma omp parallel
  {
    std::vector<float> qs(static_cast<size_t>(B) * d);
    std::vector<float> s(static_cast<size_t>(B) * g.ldk);
    std::vector<float> u(static_cast<size_t>(B) * nb * d);     // [r][j][t]
    std::vector<double> pm(static_cast<size_t>(B) * nb);       // [r][j] mass of block j in row r
    std::vector<float> of(static_cast<size_t>(d));
#pragma omp for schedule(dynamic, 1)
    for (size_t t = 0; t < tasks.size(); ++t) {
      const auto [h, i] = tasks[t];
      const int64_t r0 = static_cast<int64_t>(i) * B;
      const int nr = static_cast<int>(std::min<int64_t>(B, N - r0));
      const int64_t ncols = r0 + nr;
      const int nbk = i + 1;
      const int kvh = g.shape.kv_head_of(h);
      const float* ktb = kt.data() + static_cast<size_t>(kvh) * d * g.ldk;
      load_queries(q, h, r0, nr, d, g.scale, qs.data());
      kn::gemm_panel(qs.data(), d, nr, d, ktb, ncols, s.data(), g.ldk);
      for (int r = 0; r < nr; ++r) {
        float* row = s.data() + static_cast<size_t>(r) * g.ldk;
        const int64_t valid = r0 + r + 1;
        kn::exp_shift(row, valid, oracle.lse[static_cast<size_t>(h) * N + r0 + r]);
        std::fill(row + valid, row + ncols, 0.0f);
        kn::block_sums(row, ncols, B, pm.data() + static_cast<size_t>(r) * nb);
      }
      const int64_t ldu = static_cast<int64_t>(nb) * d;
      block_partial_outputs(s.data(), g.ldk, nr, v, kvh, ncols, B, nbk, d, u.data(), ldu);
      double fsq = 0;
      for (int r = 0; r < nr; ++r) {
        const float* ur = u.data() + static_cast<size_t>(r) * ldu;
        const double* pr = pm.data() + static_cast<size_t>(r) * nb;
        add_row_errors(ur, nbk, d, pr, masks, H, h, i, nb, of, err, empty, fsq);
      }
      full[static_cast<size_t>(h) * nb + i] = fsq;
    }
  }

  OutputErrors out;
  out.rel_error.assign(M, std::vector<double>(static_cast<size_t>(H), 0.0));
  out.empty_rows.assign(M, 0);
  for (int h = 0; h < H; ++h) {
    double f = 0;
    for (int i = 0; i < nb; ++i) f += full[static_cast<size_t>(h) * nb + i];
    for (size_t m = 0; m < M; ++m) {
      double e = 0;
      for (int i = 0; i < nb; ++i) {
        e += err[(m * H + h) * nb + i];
        out.empty_rows[m] += empty[(m * H + h) * nb + i];
      }
      out.rel_error[m][static_cast<size_t>(h)] =
          f > 0 ? std::sqrt(e / f) : std::numeric_limits<double>::quiet_NaN();
    }
  }
  return out;
}

}  // namespace proxyattn::analysis
