#pragma once
// The HDF5 Q/K(/V) store (schema: DESIGN.md). One file per (model, prompt):
//   /             attributes model, source, num_layers, num_q_heads, num_kv_heads, head_dim,
//                 seq_len, rope_theta, rope_applied, dtype, prompt_sha256, creator
//   /layers/NN/q  [Hq, N, d]   /layers/NN/k, /layers/NN/v  [Hkv, N, d]   (float16 or float32)
//   /tokens       int32 [N]    /needle (group, optional) attributes position, text
//   /layers/NN    attributes attention = "global" (the default when absent) or "sliding" with
//                 window = W (Gemma-3 local layers: query i sees keys j with i - W < j <= i)
// Layers are read one at a time (memory O(one layer)). Every read validates shapes and
// attributes against each other and throws Error naming the file, dataset and mismatch.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json_fwd.hpp>
#include <vector>

#include "proxyattn/dtype.hpp"
#include "proxyattn/tensor.hpp"

namespace proxyattn {

struct Needle {
  int64_t position = 0;  // token index where the needle sentence starts
  std::string text;
};

struct StoreMeta {
  std::string model;
  std::string source;
  int num_layers = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int64_t seq_len = 0;
  double rope_theta = 10000.0;
  bool rope_applied = true;
  DType dtype = DType::f16;
  std::string prompt_sha256;
  std::string creator;
  std::optional<Needle> needle;
};

// One layer's tensors, float32 in memory.
struct LayerData {
  int layer = 0;
  Tensor3 q, k;           // [Hq, N, d], [Hkv, N, d]
  std::optional<Tensor3> v;
};

// What a layer's attention is (attributes `attention`, `window` on /layers/NN).
enum class AttentionKind { global, sliding };
struct LayerAttention {
  AttentionKind kind = AttentionKind::global;  // a store without the attribute is global
  int64_t window = 0;                          // sliding: W >= 1 keys, the query's own included
  bool sliding() const { return kind == AttentionKind::sliding; }
  friend bool operator==(const LayerAttention&, const LayerAttention&) = default;
};
std::string_view attention_kind_name(AttentionKind k);  // "global", "sliding"
// The store's root attributes as JSON (model, source, num_layers, num_q_heads, num_kv_heads,
// head_dim, seq_len, rope_theta, rope_applied, dtype, prompt_sha256, creator): one list for
// `proxyattn-dump info --json` and the analysis report.
nlohmann::json store_attributes_json(const StoreMeta& m);

// Which of q/k/v a dataset is.
enum class Tensor { q, k, v };

struct ReadOptions {
  bool allow_nonfinite = false;  // otherwise NaN/Inf in a read dataset is an Error
};

// How a reader's reads so far went (for tests and benchmarks). Chunked datasets with shuffle,
// gzip and Fletcher-32 are read chunk by chunk, decoded in parallel outside the HDF5 lock; a
// chunk that does not decode exactly as expected is read again through H5Dread, and other
// datasets (or all, with PROXYATTN_H5_DIRECT=0) are read whole through H5Dread.
struct ReadStats {
  int64_t direct_chunks = 0;    // chunks decoded by the reader
  int64_t h5dread_chunks = 0;   // chunks read again through H5Dread
  int64_t h5dread_windows = 0;  // windows read whole through H5Dread
};

class StoreReader {
 public:
  explicit StoreReader(const std::string& path, ReadOptions opts = {});
  ~StoreReader();
  StoreReader(StoreReader&&) noexcept;
  StoreReader& operator=(StoreReader&&) noexcept;

  const std::string& path() const;
  const StoreMeta& meta() const;
  // Layer ids present under /layers, ascending.
  const std::vector<int>& layers() const;
  bool has_v(int layer) const;
  bool has_tokens() const;

  LayerData read_layer(int layer, bool with_v = true) const;
  // A window of one dataset: heads [h0, h1), tokens [t0, t1). Reads only that hyperslab.
  Tensor3 read(int layer, Tensor which, int64_t h0, int64_t h1, int64_t t0, int64_t t1) const;
  std::vector<int32_t> tokens() const;
  // Storage dtype of a dataset as found in the file.
  DType dataset_dtype(int layer, Tensor which) const;
  // The layer's attention, validated when the store is opened.
  const LayerAttention& attention(int layer) const;
  ReadStats read_stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct WriteOptions {
  DType dtype = DType::f16;  // f16 or f32
  int64_t chunk_tokens = 1024;
  bool gzip = false;         // shuffle + gzip(4)
};

// Writes to "<path>.tmp-<pid>" and renames to path in commit(); a writer destroyed without
// commit() removes its temporary file, so a failed run never leaves a partial store.
class StoreWriter {
 public:
  StoreWriter(const std::string& path, const StoreMeta& meta, WriteOptions opts = {});
  ~StoreWriter();
  StoreWriter(const StoreWriter&) = delete;
  StoreWriter& operator=(const StoreWriter&) = delete;

  // q [Hq, N, d], k and v [Hkv, N, d]; shapes checked against meta.
  void write_layer(int layer, ConstView q, ConstView k, const ConstView* v = nullptr);
  void write_tokens(const std::vector<int32_t>& tokens);
  // Attributes attention (and window) on /layers/NN of a layer already written; a layer
  // without them reads as global.
  void set_attention(int layer, const LayerAttention& att);
  void commit();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

std::string_view tensor_name(Tensor t);  // "q", "k", "v"
Tensor parse_tensor(std::string_view s);

}  // namespace proxyattn
