#pragma once
// Tensors of attention data: [heads, tokens, dim], float32 in memory. A View3 is a non-owning,
// strided window (the innermost dim is always contiguous); Tensor3 owns a contiguous buffer.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "proxyattn/error.hpp"

namespace proxyattn {

template <class T>
struct View3 {
  T* data = nullptr;
  int64_t heads = 0, tokens = 0, dim = 0;
  int64_t stride_head = 0, stride_token = 0;  // in elements; dim stride is 1

  static View3 contiguous(T* p, int64_t h, int64_t n, int64_t d) {
    return View3{p, h, n, d, n * d, d};
  }
  T* row(int64_t h, int64_t t) const { return data + h * stride_head + t * stride_token; }
  T& operator()(int64_t h, int64_t t, int64_t c) const { return row(h, t)[c]; }
  bool empty() const { return heads == 0 || tokens == 0 || dim == 0; }
  bool is_contiguous() const { return stride_token == dim && stride_head == tokens * dim; }
  // Tokens [a, b) of every head; throws Error when out of range.
  View3 slice_tokens(int64_t a, int64_t b) const {
    if (a < 0 || b < a || b > tokens)
      throw Error("token range " + std::to_string(a) + ":" + std::to_string(b) +
                  " outside [0, " + std::to_string(tokens) + "]");
    return View3{data + a * stride_token, heads, b - a, dim, stride_head, stride_token};
  }
  // One head as a [1, tokens, dim] view.
  View3 head(int64_t h) const {
    if (h < 0 || h >= heads)
      throw Error("head " + std::to_string(h) + " outside [0, " + std::to_string(heads) + ")");
    return View3{data + h * stride_head, 1, tokens, dim, stride_head, stride_token};
  }
  operator View3<const T>() const { return {data, heads, tokens, dim, stride_head, stride_token}; }
};

using ConstView = View3<const float>;

// std::allocator whose argument-less construct() default-initializes: a vector's resize(n) of
// floats then leaves them unwritten instead of zero-filling them (explicit values still copy).
template <class T>
struct DefaultInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  DefaultInitAllocator() = default;
  template <class U>
  DefaultInitAllocator(const DefaultInitAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

class Tensor3 {
 public:
  using Storage = std::vector<float, DefaultInitAllocator<float>>;

  Tensor3() = default;
  Tensor3(int64_t heads, int64_t tokens, int64_t dim, float fill = 0.0f);
  // Elements left unwritten (indeterminate): only for a caller that writes every one of them
  // before any read. Skips the serial zero-fill, and lets a parallel writer do the first touch.
  static Tensor3 uninitialized(int64_t heads, int64_t tokens, int64_t dim);
  int64_t heads() const { return heads_; }
  int64_t tokens() const { return tokens_; }
  int64_t dim() const { return dim_; }
  int64_t size() const { return static_cast<int64_t>(data_.size()); }
  float* data() { return data_.data(); }
  const float* data() const { return data_.data(); }
  Storage& storage() { return data_; }
  const Storage& storage() const { return data_; }
  float& operator()(int64_t h, int64_t t, int64_t c) { return data_[(h * tokens_ + t) * dim_ + c]; }
  float operator()(int64_t h, int64_t t, int64_t c) const { return data_[(h * tokens_ + t) * dim_ + c]; }
  float* row(int64_t h, int64_t t) { return data_.data() + (h * tokens_ + t) * dim_; }
  const float* row(int64_t h, int64_t t) const { return data_.data() + (h * tokens_ + t) * dim_; }
  View3<float> view() { return View3<float>::contiguous(data_.data(), heads_, tokens_, dim_); }
  ConstView view() const { return ConstView::contiguous(data_.data(), heads_, tokens_, dim_); }
  operator ConstView() const { return view(); }

 private:
  struct NoInit {};
  Tensor3(int64_t heads, int64_t tokens, int64_t dim, NoInit);
  int64_t heads_ = 0, tokens_ = 0, dim_ = 0;
  Storage data_;
};

// Copy any view into a contiguous tensor.
Tensor3 to_tensor(ConstView v);

// Count of NaN and +-Inf values in a view.
struct FiniteCount {
  int64_t nan = 0, inf = 0;
  bool ok() const { return nan == 0 && inf == 0; }
};
FiniteCount count_nonfinite(ConstView v);

// Throws Error("<what>: N NaN and M Inf values ...") unless every value is finite.
void require_finite(ConstView v, const std::string& what);

}  // namespace proxyattn
