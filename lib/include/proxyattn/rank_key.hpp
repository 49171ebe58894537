#pragma once
// Integer sort keys for the one ranking order of the project: value descending, NaN after every
// number, ties by the lower id (select.hpp, metrics.hpp). Sorting plain uint64 keys (value key
// in the high half, id in the low half) gives exactly that order, several times faster than a
// comparator that reads the values through the ids. -0 and +0 share a key, as they compare equal.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

namespace proxyattn::rank {

// Ascending in x for every non-NaN x; NaN maps to the largest key (last).
inline uint32_t asc_key(float x) {
  if (std::isnan(x)) return 0xFFFFFFFFu;
  if (x == 0.0f) x = 0.0f;
  const uint32_t u = std::bit_cast<uint32_t>(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // never 0xFFFFFFFF for a number
}
// Descending in x; NaN still last.
inline uint32_t desc_key(float x) { return std::isnan(x) ? 0xFFFFFFFFu : ~asc_key(x); }

// The same for double values (64-bit keys; the id goes beside them).
inline uint64_t asc_key(double x) {
  if (std::isnan(x)) return ~uint64_t{0};
  if (x == 0.0) x = 0.0;
  const uint64_t u = std::bit_cast<uint64_t>(x);
  return (u >> 63) ? ~u : (u | (uint64_t{1} << 63));
}
inline uint64_t desc_key(double x) { return std::isnan(x) ? ~uint64_t{0} : ~asc_key(x); }

inline uint64_t desc_id_key(float x, uint32_t id) { return (uint64_t{desc_key(x)} << 32) | id; }
inline uint64_t asc_id_key(float x, uint32_t id) { return (uint64_t{asc_key(x)} << 32) | id; }

// The first k ids of values[0..n) in ranking order (descending, NaN last, ties lower id) into
// out[0..k). `keys` is scratch.
inline void top_desc(const float* values, int64_t n, int64_t k, int32_t* out, std::vector<uint64_t>& keys) {
  k = std::clamp<int64_t>(k, 0, n);
  keys.resize(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) keys[static_cast<size_t>(j)] = desc_id_key(values[j], static_cast<uint32_t>(j));
  if (k < n) std::nth_element(keys.begin(), keys.begin() + k, keys.end());
  std::sort(keys.begin(), keys.begin() + k);
  for (int64_t t = 0; t < k; ++t) out[t] = static_cast<int32_t>(keys[static_cast<size_t>(t)] & 0xFFFFFFFFu);
}

// All ids of values[0..n) in ranking order (descending, NaN last, ties lower id).
inline std::vector<int32_t> order_desc(const float* values, int64_t n) {
  std::vector<uint64_t> keys(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) keys[static_cast<size_t>(j)] = desc_id_key(values[j], static_cast<uint32_t>(j));
  std::sort(keys.begin(), keys.end());
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) ids[static_cast<size_t>(t)] = static_cast<int32_t>(keys[static_cast<size_t>(t)] & 0xFFFFFFFFu);
  return ids;
}
inline std::vector<int32_t> order_desc(const double* values, int64_t n) {
  struct Key {
    uint64_t key;
    int32_t id;
    bool operator<(const Key& o) const { return key != o.key ? key < o.key : id < o.id; }
  };
  std::vector<Key> keys(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) keys[static_cast<size_t>(j)] = {desc_key(values[j]), static_cast<int32_t>(j)};
  std::sort(keys.begin(), keys.end());
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) ids[static_cast<size_t>(t)] = keys[static_cast<size_t>(t)].id;
  return ids;
}

}  // namespace proxyattn::rank
