#include "proxyattn/value_stats.hpp"

#include <algorithm>
#include <cmath>

namespace proxyattn {

double ValueStats::std() const { return count > 1 ? std::sqrt(m2 / static_cast<double>(count)) : 0.0; }

void ValueStats::merge(const ValueStats& o) {
  nan += o.nan;
  inf += o.inf;
  if (o.count == 0) return;
  if (count == 0) {
    const int64_t n = nan, i = inf;
    *this = o;
    nan = n;
    inf = i;
    return;
  }
  const double na = static_cast<double>(count), nb = static_cast<double>(o.count), n = na + nb;
  const double delta = o.mean - mean;
  mean += delta * nb / n;
  m2 += o.m2 + delta * delta * na * nb / n;
  count += o.count;
  min = std::min(min, o.min);
  max = std::max(max, o.max);
}

namespace {
// One row (contiguous dim values), Welford within the row.
ValueStats row_stats(const float* p, int64_t d) {
  ValueStats s;
  for (int64_t i = 0; i < d; ++i) {
    const float x = p[i];
    if (std::isnan(x)) {
      ++s.nan;
      continue;
    }
    if (std::isinf(x)) {
      ++s.inf;
      continue;
    }
    const double v = x;
    if (s.count == 0) {
      s.min = s.max = v;
    } else {
      s.min = std::min(s.min, v);
      s.max = std::max(s.max, v);
    }
    ++s.count;
    const double delta = v - s.mean;
    s.mean += delta / static_cast<double>(s.count);
    s.m2 += delta * (v - s.mean);
  }
  return s;
}

ValueStats head_stats(ConstView v, int64_t h) {
  ValueStats s;
  for (int64_t t = 0; t < v.tokens; ++t) s.merge(row_stats(v.row(h, t), v.dim));
  return s;
}
}  // namespace

std::vector<ValueStats> value_stats_per_head(ConstView v) {
  std::vector<ValueStats> out(static_cast<size_t>(std::max<int64_t>(v.heads, 0)));
  // Fixed per-head work, so the result does not depend on the thread count.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t h = 0; h < v.heads; ++h) out[static_cast<size_t>(h)] = head_stats(v, h);
  return out;
}

ValueStats value_stats(ConstView v) {
  ValueStats s;
  for (const ValueStats& h : value_stats_per_head(v)) s.merge(h);
  return s;
}

}  // namespace proxyattn
