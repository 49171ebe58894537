#pragma once
// BlockMask: the one type that carries a block selection between estimators, kernels and
// metrics. Per head h and query block i, the selected key blocks are a sorted list of ids in
// CSR form (row r = h * num_blocks + i): indices[indptr[r] .. indptr[r+1]).
// Invariants (checked by the constructor): causal (j <= i), in range, strictly increasing.
#include <cstdint>
#include <span>
#include <vector>

namespace proxyattn {

class BlockMask {
 public:
  BlockMask() = default;
  // Validating constructor; throws Error naming the first offending (head, row, entry).
  BlockMask(int heads, int64_t seq_len, int block, std::vector<int32_t> indptr,
            std::vector<int32_t> indices);

  // Every causal block (full causal attention).
  static BlockMask causal(int heads, int64_t seq_len, int block);
  // From a dense bitmap [heads, Nb, Nb] (non-zero = selected); entries above the diagonal
  // are rejected.
  static BlockMask from_bitmap(int heads, int64_t seq_len, int block,
                               const std::vector<uint8_t>& bitmap);
  // From per-row lists (any order, duplicates allowed): sorted and deduplicated here.
  static BlockMask from_rows(int heads, int64_t seq_len, int block,
                             const std::vector<std::vector<int32_t>>& rows);

  int heads() const { return heads_; }
  int64_t seq_len() const { return seq_len_; }
  int block() const { return block_; }
  int num_blocks() const { return num_blocks_; }
  const std::vector<int32_t>& indptr() const { return indptr_; }
  const std::vector<int32_t>& indices() const { return indices_; }
  std::span<const int32_t> row(int h, int i) const {
    const size_t r = static_cast<size_t>(h) * num_blocks_ + i;
    return {indices_.data() + indptr_[r], static_cast<size_t>(indptr_[r + 1] - indptr_[r])};
  }
  bool contains(int h, int i, int j) const;

  // Dense bitmap view [heads, Nb, Nb], 1 = selected.
  std::vector<uint8_t> bitmap() const;

  // Selected blocks of head h / of all heads.
  int64_t selected(int h) const;
  int64_t selected() const { return static_cast<int64_t>(indices_.size()); }
  // Block density: selected / (Nb (Nb+1) / 2), per head and averaged over heads.
  double density(int h) const;
  double density() const;
  // Element density: causal (q, k) pairs the kernel computes / N (N+1) / 2 (partial last
  // block and the causal cut inside diagonal blocks accounted for exactly).
  double element_density(int h) const;
  double element_density() const;

  bool operator==(const BlockMask& o) const = default;

 private:
  int heads_ = 0;
  int64_t seq_len_ = 0;
  int block_ = 0;
  int num_blocks_ = 0;
  std::vector<int32_t> indptr_{0};
  std::vector<int32_t> indices_;
};

// Nb = ceil(N / B); throws Error unless B is a positive power of two and N > 0.
int num_blocks_for(int64_t seq_len, int block);
void validate_block_size(int block);

}  // namespace proxyattn
