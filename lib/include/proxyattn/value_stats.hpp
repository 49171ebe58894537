#pragma once
// Summary statistics of tensor values (what `proxyattn-dump info` prints): min/max/mean/std over
// the finite values, plus NaN and Inf counts. Accumulated in float64; mergeable (Chan et al.)
// so per-head results combine into per-tensor ones exactly as one pass would.
#include <cstdint>
#include <vector>

#include "proxyattn/tensor.hpp"

namespace proxyattn {

struct ValueStats {
  int64_t count = 0;  // finite values
  int64_t nan = 0, inf = 0;
  double min = 0, max = 0, mean = 0;
  double m2 = 0;      // sum of squared deviations from the mean
  double std() const;  // population standard deviation; 0 when count < 2
  void merge(const ValueStats& o);
};

// Over all values of a view.
ValueStats value_stats(ConstView v);
// One entry per head of the view.
std::vector<ValueStats> value_stats_per_head(ConstView v);

}  // namespace proxyattn
