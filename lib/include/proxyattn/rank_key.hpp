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

// Sorts keys[0..n) ascending when their low 32 bits (the ids) ascend in input order, as keys
// built id by id do: then a stable sort by the high 32 bits alone is std::sort's order, found
// by a least-significant-digit radix sort (8-bit digits; a digit all keys share is skipped).
// `scratch` is reused between calls.
inline void sort_id_keys(uint64_t* keys, size_t n, std::vector<uint64_t>& scratch) {
  if (n < 96 || n > 0xFFFFFFFFu) {
    std::sort(keys, keys + n);
    return;
  }
  uint32_t count[4][256] = {};
  for (size_t t = 0; t < n; ++t) {
    const uint32_t hi = static_cast<uint32_t>(keys[t] >> 32);
    ++count[0][hi & 0xFF], ++count[1][(hi >> 8) & 0xFF], ++count[2][(hi >> 16) & 0xFF], ++count[3][hi >> 24];
  }
  scratch.resize(n);
  uint64_t *src = keys, *dst = scratch.data();
  for (int d = 0; d < 4; ++d) {
    const int shift = 32 + 8 * d;
    if (count[d][(src[0] >> shift) & 0xFF] == n) continue;  // one digit for all: order kept
    uint32_t pos[256];
    uint32_t sum = 0;
    for (int b = 0; b < 256; ++b) pos[b] = sum, sum += count[d][b];
    for (size_t t = 0; t < n; ++t) dst[pos[(src[t] >> shift) & 0xFF]++] = src[t];
    std::swap(src, dst);
  }
  if (src != keys) std::copy(src, src + n, keys);
}
inline void sort_id_keys(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch) {
  sort_id_keys(keys.data(), keys.size(), scratch);
}

// The first k ids of values[0..n) in ranking order (descending, NaN last, ties lower id) into
// out[0..k). `keys` is scratch.
inline void top_desc(const float* values, int64_t n, int64_t k, int32_t* out, std::vector<uint64_t>& keys) {
  k = std::clamp<int64_t>(k, 0, n);
  keys.resize(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) keys[static_cast<size_t>(j)] = desc_id_key(values[j], static_cast<uint32_t>(j));
  if (k == n) {  // the whole order
    thread_local std::vector<uint64_t> scratch;
    sort_id_keys(keys, scratch);
  } else {
    std::nth_element(keys.begin(), keys.begin() + k, keys.end());
    std::sort(keys.begin(), keys.begin() + k);
  }
  for (int64_t t = 0; t < k; ++t) out[t] = static_cast<int32_t>(keys[static_cast<size_t>(t)] & 0xFFFFFFFFu);
}

// All ids of values[0..n) in ranking order (descending, NaN last, ties lower id).
inline std::vector<int32_t> order_desc(const float* values, int64_t n) {
  std::vector<uint64_t> keys(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) keys[static_cast<size_t>(j)] = desc_id_key(values[j], static_cast<uint32_t>(j));
  thread_local std::vector<uint64_t> scratch;
  sort_id_keys(keys, scratch);
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
  if (n < 96) {
    std::sort(keys.begin(), keys.end());
  } else {
    // Ids ascend in input order: a stable LSD radix sort by the key alone (8-bit digits, a digit
    // all keys share skipped) gives the (key, id) order.
    std::vector<uint32_t> count(8 * 256, 0);
    for (const Key& k : keys)
      for (int d = 0; d < 8; ++d) ++count[static_cast<size_t>(d) * 256 + ((k.key >> (8 * d)) & 0xFF)];
    std::vector<Key> scratch(keys.size());
    Key *src = keys.data(), *dst = scratch.data();
    for (int d = 0; d < 8; ++d) {
      const uint32_t* c = count.data() + static_cast<size_t>(d) * 256;
      if (c[(src[0].key >> (8 * d)) & 0xFF] == static_cast<uint64_t>(n)) continue;
      uint32_t pos[256];
      uint32_t sum = 0;
      for (int b = 0; b < 256; ++b) pos[b] = sum, sum += c[b];
      for (int64_t t = 0; t < n; ++t) dst[pos[(src[t].key >> (8 * d)) & 0xFF]++] = src[t];
      std::swap(src, dst);
    }
    if (src != keys.data()) std::copy(src, src + n, keys.data());
  }
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) ids[static_cast<size_t>(t)] = keys[static_cast<size_t>(t)].id;
  return ids;
}

}  // namespace proxyattn::rank
