#include "proxyattn/tensor.hpp"

#include <algorithm>
#include <cmath>

#include "proxyattn/checked.hpp"

namespace proxyattn {

Tensor3::Tensor3(int64_t heads, int64_t tokens, int64_t dim, float fill) : Tensor3(heads, tokens, dim, NoInit{}) {
  std::fill(data_.begin(), data_.end(), fill);
}

Tensor3 Tensor3::uninitialized(int64_t heads, int64_t tokens, int64_t dim) {
  return Tensor3(heads, tokens, dim, NoInit{});
}

Tensor3::Tensor3(int64_t heads, int64_t tokens, int64_t dim, NoInit)
    : heads_(heads), tokens_(tokens), dim_(dim) {
  if (heads < 0 || tokens < 0 || dim < 0) throw Error("negative tensor shape");
  const std::string what = "tensor [" + std::to_string(heads) + ", " + std::to_string(tokens) + ", " +
                           std::to_string(dim) + "]";
  const int64_t n = checked_product({heads, tokens, dim, int64_t{sizeof(float)}}, what) / int64_t{sizeof(float)};
  // Small tensors skip the (file-reading) memory check.
  if (n > (int64_t{16} << 20)) require_fits(n * int64_t{sizeof(float)}, what);
  data_.resize(static_cast<size_t>(n));  // default-initialized: see DefaultInitAllocator
}

Tensor3 to_tensor(ConstView v) {
  Tensor3 t = Tensor3::uninitialized(v.heads, v.tokens, v.dim);  // every row is copied below
  for (int64_t h = 0; h < v.heads; ++h)
    for (int64_t n = 0; n < v.tokens; ++n) {
      const float* src = v.row(h, n);
      std::copy(src, src + v.dim, t.row(h, n));
    }
  return t;
}

FiniteCount count_nonfinite(ConstView v) {
  FiniteCount c;
  for (int64_t h = 0; h < v.heads; ++h)
    for (int64_t n = 0; n < v.tokens; ++n) {
      const float* r = v.row(h, n);
      for (int64_t i = 0; i < v.dim; ++i) {
        if (std::isnan(r[i])) ++c.nan;
        else if (std::isinf(r[i])) ++c.inf;
      }
    }
  return c;
}

void require_finite(ConstView v, const std::string& what) {
  const FiniteCount c = count_nonfinite(v);
  if (!c.ok())
    throw Error(what + ": " + std::to_string(c.nan) + " NaN and " + std::to_string(c.inf) +
                " Inf values (use --allow-nonfinite to read anyway)");
}

}  // namespace proxyattn
