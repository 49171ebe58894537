#include "proxyattn/block_mask.hpp"

#include <algorithm>
#include <string>

#include "proxyattn/error.hpp"

namespace proxyattn {

void validate_block_size(int block) {
  if (block <= 0 || (block & (block - 1)) != 0)
    throw Error("block size " + std::to_string(block) + " must be a positive power of two");
}

int num_blocks_for(int64_t seq_len, int block) {
  validate_block_size(block);
  if (seq_len <= 0) throw Error("sequence length " + std::to_string(seq_len) + " must be positive");
  return static_cast<int>((seq_len + block - 1) / block);
}

BlockMask::BlockMask(int heads, int64_t seq_len, int block, std::vector<int32_t> indptr,
                     std::vector<int32_t> indices)
    : heads_(heads), seq_len_(seq_len), block_(block), num_blocks_(num_blocks_for(seq_len, block)),
      indptr_(std::move(indptr)), indices_(std::move(indices)) {
  if (heads <= 0) throw Error("BlockMask: heads must be positive, got " + std::to_string(heads));
  const size_t rows = static_cast<size_t>(heads) * num_blocks_;
  if (indptr_.size() != rows + 1)
    throw Error("BlockMask: indptr has " + std::to_string(indptr_.size()) + " entries, expected " +
                std::to_string(rows + 1) + " (heads * Nb + 1)");
  if (indptr_[0] != 0) throw Error("BlockMask: indptr[0] must be 0");
  if (static_cast<size_t>(indptr_.back()) != indices_.size())
    throw Error("BlockMask: indptr.back() = " + std::to_string(indptr_.back()) + " but " +
                std::to_string(indices_.size()) + " indices");
  // Check every row in parallel first (a mask of a 128K layer holds millions of entries); only a
  // mask that fails is walked again in order, for the message naming its first offending entry.
  bool ok = true;
#pragma omp parallel for schedule(static) reduction(&& : ok) if (indices_.size() > (size_t{1} << 18))
  for (int64_t r = 0; r < static_cast<int64_t>(rows); ++r) {
    const int32_t i = static_cast<int32_t>(r % num_blocks_), b = indptr_[r], e = indptr_[r + 1];
    bool row_ok = b >= 0 && e >= b && static_cast<size_t>(e) <= indices_.size();
    for (int32_t p = b; row_ok && p < e; ++p) {
      const int32_t j = indices_[p];
      row_ok = j >= 0 && j <= i && (p == b || indices_[p - 1] < j);
    }
    ok = ok && row_ok;
  }
  if (ok) return;
  for (size_t r = 0; r < rows; ++r) {
    const int h = static_cast<int>(r / num_blocks_), i = static_cast<int>(r % num_blocks_);
    const auto where = [&] { return "BlockMask: head " + std::to_string(h) + ", query block " + std::to_string(i); };
    if (indptr_[r + 1] < indptr_[r]) throw Error(where() + ": indptr decreases");
    for (int32_t p = indptr_[r]; p < indptr_[r + 1]; ++p) {
      const int32_t j = indices_[p];
      if (j < 0 || j > i)
        throw Error(where() + ": key block " + std::to_string(j) + " is not causal (must be in [0, " +
                    std::to_string(i) + "])");
      if (p > indptr_[r] && indices_[p - 1] >= j)
        throw Error(where() + ": key blocks not strictly increasing at " + std::to_string(j));
    }
  }
}

BlockMask BlockMask::causal(int heads, int64_t seq_len, int block) {
  const int nb = num_blocks_for(seq_len, block);
  std::vector<int32_t> indptr{0}, indices;
  indices.reserve(static_cast<size_t>(heads) * nb * (nb + 1) / 2);
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i) {
      for (int j = 0; j <= i; ++j) indices.push_back(j);
      indptr.push_back(static_cast<int32_t>(indices.size()));
    }
  return BlockMask(heads, seq_len, block, std::move(indptr), std::move(indices));
}

BlockMask BlockMask::from_bitmap(int heads, int64_t seq_len, int block, const std::vector<uint8_t>& bitmap) {
  const int nb = num_blocks_for(seq_len, block);
  if (bitmap.size() != static_cast<size_t>(heads) * nb * nb)
    throw Error("BlockMask::from_bitmap: bitmap has " + std::to_string(bitmap.size()) +
                " entries, expected heads * Nb * Nb = " + std::to_string(static_cast<size_t>(heads) * nb * nb));
  std::vector<int32_t> indptr{0}, indices;
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < nb; ++i) {
      const uint8_t* row = bitmap.data() + (static_cast<size_t>(h) * nb + i) * nb;
      for (int j = 0; j < nb; ++j)
        if (row[j]) indices.push_back(j);  // j > i is rejected by the validating constructor
      indptr.push_back(static_cast<int32_t>(indices.size()));
    }
  return BlockMask(heads, seq_len, block, std::move(indptr), std::move(indices));
}

BlockMask BlockMask::from_rows(int heads, int64_t seq_len, int block,
                               const std::vector<std::vector<int32_t>>& rows) {
  const int nb = num_blocks_for(seq_len, block);
  if (rows.size() != static_cast<size_t>(heads) * nb)
    throw Error("BlockMask::from_rows: " + std::to_string(rows.size()) + " rows, expected heads * Nb = " +
                std::to_string(static_cast<size_t>(heads) * nb));
  // Rows sorted and deduplicated in parallel (independent), then laid out in order.
  const int64_t n = static_cast<int64_t>(rows.size());
  std::vector<std::vector<int32_t>> sorted(rows.size());
  const bool par = n * 16 > (int64_t{1} << 16);
#pragma omp parallel for schedule(dynamic, 64) if (par)
  for (int64_t r = 0; r < n; ++r) {
    std::vector<int32_t>& s = sorted[static_cast<size_t>(r)];
    s = rows[static_cast<size_t>(r)];
    std::sort(s.begin(), s.end());
    s.erase(std::unique(s.begin(), s.end()), s.end());
  }
  std::vector<int32_t> indptr(rows.size() + 1, 0);
  for (size_t r = 0; r < rows.size(); ++r) indptr[r + 1] = indptr[r] + static_cast<int32_t>(sorted[r].size());
  std::vector<int32_t> indices(static_cast<size_t>(indptr.back()));
#pragma omp parallel for schedule(dynamic, 64) if (par)
  for (int64_t r = 0; r < n; ++r)
    std::copy(sorted[static_cast<size_t>(r)].begin(), sorted[static_cast<size_t>(r)].end(),
              indices.begin() + indptr[static_cast<size_t>(r)]);
  return BlockMask(heads, seq_len, block, std::move(indptr), std::move(indices));
}

bool BlockMask::contains(int h, int i, int j) const {
  const auto r = row(h, i);
  return std::binary_search(r.begin(), r.end(), j);
}

std::vector<uint8_t> BlockMask::bitmap() const {
  std::vector<uint8_t> bm(static_cast<size_t>(heads_) * num_blocks_ * num_blocks_, 0);
  for (int h = 0; h < heads_; ++h)
    for (int i = 0; i < num_blocks_; ++i)
      for (int32_t j : row(h, i)) bm[(static_cast<size_t>(h) * num_blocks_ + i) * num_blocks_ + j] = 1;
  return bm;
}

int64_t BlockMask::selected(int h) const {
  const size_t r0 = static_cast<size_t>(h) * num_blocks_;
  return indptr_[r0 + num_blocks_] - indptr_[r0];
}

double BlockMask::density(int h) const {
  const double causal = 0.5 * num_blocks_ * (num_blocks_ + 1.0);
  return static_cast<double>(selected(h)) / causal;
}

double BlockMask::density() const {
  double s = 0;
  for (int h = 0; h < heads_; ++h) s += density(h);
  return heads_ ? s / heads_ : 0.0;
}

double BlockMask::element_density(int h) const {
  // Pairs (q, k) with k <= q inside selected blocks: off-diagonal blocks are full rectangles
  // (rows of block i times columns of block j), the diagonal block is a triangle.
  // Every term is a whole number, so the double sum is exact in any grouping: per row, its
  // off-diagonal blocks at once (the row is sorted: the diagonal, if kept, is its last entry).
  const int64_t B = block_, N = seq_len_;
  double pairs = 0;
  for (int i = 0; i < num_blocks_; ++i) {
    const int64_t q0 = i * B, q1 = std::min<int64_t>(N, q0 + B), rows = q1 - q0;
    const auto r = row(h, i);
    const bool diag = !r.empty() && r.back() == i;
    const int64_t off = static_cast<int64_t>(r.size()) - (diag ? 1 : 0);
    pairs += static_cast<double>(rows * B * off);  // key block j < i is always full
    if (diag) pairs += 0.5 * static_cast<double>(rows) * (rows + 1);
  }
  return pairs / (0.5 * static_cast<double>(N) * (N + 1));
}

double BlockMask::element_density() const {
  double s = 0;
  for (int h = 0; h < heads_; ++h) s += element_density(h);
  return heads_ ? s / heads_ : 0.0;
}

}  // namespace proxyattn
