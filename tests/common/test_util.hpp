#pragma once
// Shared test helpers: seeded random tensors, naive float64 references (the spec in its most
// literal form) and a tolerance check that reports max/mean error and the count over tolerance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "proxyattn/attention.hpp"
#include "proxyattn/block_mask.hpp"
#include "proxyattn/tensor.hpp"

namespace proxyattn::test {

// Fresh random data on every run unless PROXYATTN_TEST_SEED is set; the seed is printed so a
// failure can be replayed.
inline uint64_t test_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* s = std::getenv("PROXYATTN_TEST_SEED")) return static_cast<uint64_t>(std::stoull(s));
    return static_cast<uint64_t>(std::random_device{}()) << 32 | std::random_device{}();
  }();
  return seed;
}
inline std::mt19937_64& rng() {
  static std::mt19937_64 g = [] {
    std::printf("[ seed     ] PROXYATTN_TEST_SEED=%llu\n", static_cast<unsigned long long>(test_seed()));
    return std::mt19937_64(test_seed());
  }();
  return g;
}

// A random rank order of every row's blocks 0..i (selection_order's causal layout: row (h, i) at
// h Nb (Nb + 1) / 2 + i (i + 1) / 2), for the prefix-error kernels' tests.
inline std::vector<int32_t> random_rank_order(int heads, int nb) {
  std::vector<int32_t> order;
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i) {
      std::vector<int32_t> row(static_cast<size_t>(i) + 1);
      for (int j = 0; j <= i; ++j) row[static_cast<size_t>(j)] = j;
      std::shuffle(row.begin(), row.end(), rng());
      order.insert(order.end(), row.begin(), row.end());
    }
  return order;
}

// Normal(0, scale) values; scale > 1 on q makes softmax peaky like real attention.
inline Tensor3 random_tensor(int64_t h, int64_t n, int64_t d, float scale = 1.0f) {
  Tensor3 t(h, n, d);
  std::normal_distribution<float> dist(0.0f, scale);
  for (float& x : t.storage()) x = dist(rng());
  return t;
}

// Naive float64 attention of one query row: probabilities over keys allowed by keep(k).
template <class Keep>
inline std::vector<double> probs64(ConstView q, ConstView k, int64_t h, int64_t t, Keep keep) {
  const int64_t r = q.heads / k.heads, hk = h / r, d = q.dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> s(t + 1, -std::numeric_limits<double>::infinity());
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c <= t; ++c) {
    if (!keep(c)) continue;
    double acc = 0;
    for (int64_t x = 0; x < d; ++x) acc += static_cast<double>(q(h, t, x)) * k(hk, c, x);
    s[c] = acc * scale;
    m = std::max(m, s[c]);
  }
  double l = 0;
  for (double& x : s) {
    x = std::isinf(x) ? 0.0 : std::exp(x - m);
    l += x;
  }
  for (double& x : s) x /= l;
  return s;
}

// Naive float64 output of attention with an optional block mask (nullptr = full causal).
inline std::vector<double> attention64(ConstView q, ConstView k, ConstView v, const BlockMask* mask) {
  const int64_t H = q.heads, N = q.tokens, d = q.dim, r = q.heads / k.heads;
  std::vector<double> o(static_cast<size_t>(H * N * d), 0.0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < N; ++t) {
      const auto p = probs64(q, k, h, t, [&](int64_t c) {
        return !mask || mask->contains(static_cast<int>(h), static_cast<int>(t / mask->block()),
                                       static_cast<int>(c / mask->block()));
      });
      for (int64_t c = 0; c <= t; ++c)
        if (p[c] != 0)
          for (int64_t x = 0; x < d; ++x) o[(h * N + t) * d + x] += p[c] * v(h / r, c, x);
    }
  return o;
}

// Naive float64 sliding-window attention: query t sees keys c with t - window < c <= t.
inline std::vector<double> sliding_attention64(ConstView q, ConstView k, ConstView v, int64_t window) {
  const int64_t H = q.heads, N = q.tokens, d = q.dim, r = q.heads / k.heads;
  std::vector<double> o(static_cast<size_t>(H * N * d), 0.0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < N; ++t) {
      const auto p = probs64(q, k, h, t, [&](int64_t c) { return c > t - window; });
      for (int64_t c = 0; c <= t; ++c)
        if (p[c] != 0)
          for (int64_t x = 0; x < d; ++x) o[(h * N + t) * d + x] += p[c] * v(h / r, c, x);
    }
  return o;
}

inline std::vector<double> lse64(ConstView q, ConstView k) {
  const int64_t H = q.heads, N = q.tokens, d = q.dim, r = q.heads / k.heads;
  std::vector<double> out(static_cast<size_t>(H * N));
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < N; ++t) {
      std::vector<double> s(t + 1);
      double m = -1e300;
      for (int64_t c = 0; c <= t; ++c) {
        double acc = 0;
        for (int64_t x = 0; x < d; ++x) acc += static_cast<double>(q(h, t, x)) * k(h / r, c, x);
        s[c] = acc * scale;
        m = std::max(m, s[c]);
      }
      double l = 0;
      for (double x : s) l += std::exp(x - m);
      out[h * N + t] = m + std::log(l);
    }
  return out;
}

// Naive float64 oracle block mass [H, Nb, Nb].
inline std::vector<double> block_mass64(ConstView q, ConstView k, int block) {
  const int64_t H = q.heads, N = q.tokens, nb = (N + block - 1) / block;
  std::vector<double> m(static_cast<size_t>(H * nb * nb), 0.0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < N; ++t) {
      const auto p = probs64(q, k, h, t, [](int64_t) { return true; });
      const int64_t i = t / block, rows = std::min<int64_t>(N, (i + 1) * block) - i * block;
      for (int64_t c = 0; c <= t; ++c) m[(h * nb + i) * nb + c / block] += p[c] / rows;
    }
  return m;
}

struct ErrorStats {
  double max_abs = 0, mean_abs = 0;
  int64_t over = 0, nan = 0, n = 0;
};

// |x - ref| <= atol + rtol |ref| for every element; NaN never passes. Prints the statistics.
template <class X, class R>
inline ErrorStats check_close(const std::string& what, const X& x, const R& ref, double atol, double rtol) {
  ErrorStats e;
  e.n = static_cast<int64_t>(ref.size());
  EXPECT_EQ(static_cast<size_t>(x.size()), static_cast<size_t>(ref.size())) << what;
  double sum = 0;
  for (size_t i = 0; i < static_cast<size_t>(ref.size()) && i < static_cast<size_t>(x.size()); ++i) {
    const double a = static_cast<double>(x[i]), b = static_cast<double>(ref[i]);
    if (std::isnan(a) || std::isnan(b)) {
      ++e.nan;
      ++e.over;
      continue;
    }
    const double err = std::abs(a - b);
    e.max_abs = std::max(e.max_abs, err);
    sum += err;
    if (err > atol + rtol * std::abs(b)) ++e.over;
  }
  e.mean_abs = e.n ? sum / e.n : 0;
  std::printf("[ check    ] %s: max %.3g mean %.3g over-tol %lld/%lld nan %lld\n", what.c_str(), e.max_abs,
              e.mean_abs, static_cast<long long>(e.over), static_cast<long long>(e.n), static_cast<long long>(e.nan));
  EXPECT_EQ(e.over, 0) << what << ": " << e.over << " of " << e.n << " elements over tolerance (max abs err "
                       << e.max_abs << ")";
  return e;
}

// A random valid mask with the diagonal always kept and roughly `density` of causal blocks.
inline BlockMask random_mask(int heads, int64_t n, int block, double density) {
  const int nb = num_blocks_for(n, block);
  std::bernoulli_distribution keep(density);
  std::vector<std::vector<int32_t>> rows;
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i) {
      std::vector<int32_t> r{i};
      for (int j = 0; j < i; ++j)
        if (keep(rng())) r.push_back(j);
      rows.push_back(r);
    }
  return BlockMask::from_rows(heads, n, block, rows);
}

}  // namespace proxyattn::test
