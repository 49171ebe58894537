#pragma once
// Masks the bench times and hands to the peer script (scripts/bench_peers.py):
// - random_density_mask: per head, the diagonal block of every query block plus causal
//   off-diagonal blocks drawn uniformly without replacement until the head holds
//   round(density * Nb (Nb + 1) / 2) blocks (at least the Nb diagonal blocks), the masks of
//   PERFORMANCE.md's FlexAttention rows. Deterministic per (seed, head), any thread count.
// - mask files (".pxm"), little endian:
//     char[8] "PXMASK01" | int32 heads | int32 block | int64 seq_len | int32 num_blocks |
//     int32 0 | int64 nnz | int32 indptr[heads * num_blocks + 1] | int32 indices[nnz]
//   (CSR exactly as BlockMask holds it: row r = h * Nb + i, sorted key-block ids j <= i).
// - manifest.json in an export directory lists every mask written (file, method, n, density...).
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "proxyattn/block_mask.hpp"

namespace proxyattn::bench {

BlockMask random_density_mask(int heads, int64_t seq_len, int block, double density, uint64_t seed);

// Atomic write (temp + rename). Throws Error naming the file.
void write_mask_file(const std::string& path, const BlockMask& mask);
// Validates magic, header, size and the CSR invariants; Error names the file and the problem.
BlockMask read_mask_file(const std::string& path);
// The file's bytes without the file (masks travel between MPI ranks in this form); decode_mask
// validates like read_mask_file, `what` names the source in errors.
std::string encode_mask(const BlockMask& mask);
BlockMask decode_mask(const std::string& bytes, const std::string& what);

// Collects the masks exported during a run; write() puts DIR/manifest.json atomically.
class MaskExporter {
 public:
  MaskExporter() = default;
  explicit MaskExporter(std::string dir);  // creates dir; Error when it cannot
  bool enabled() const { return !dir_.empty(); }
  // Writes DIR/<file stem>.pxm once per (method, n) and records it; returns the path.
  std::string add(const std::string& method, int64_t n, const BlockMask& mask, const nlohmann::json& info);
  bool has(const std::string& method, int64_t n) const;
  void write() const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  nlohmann::json entries_ = nlohmann::json::array();
};

}  // namespace proxyattn::bench
