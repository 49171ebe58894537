#pragma once
// CPU reference attention: the spec the CUDA kernels are tested against. Causal, GQA by index
// mapping (query head h reads KV head h / (Hq / Hkv)), scale 1/sqrt(d), float32 values with
// float64 softmax statistics. Multithreaded with OpenMP over (head, query tile).
#include <cstdint>
#include <vector>

#include "proxyattn/block_mask.hpp"
#include "proxyattn/tensor.hpp"

namespace proxyattn {

// Shapes of one layer's attention problem, validated against each other.
struct AttentionShape {
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t seq_len = 0;
  int group() const { return q_heads / kv_heads; }  // GQA ratio r
  int kv_head_of(int h) const { return h / group(); }
};
// Throws Error naming the mismatch (q vs k heads, dims, lengths, Hq % Hkv, N = 0). v may be
// empty (estimators need only Q and K).
AttentionShape check_qkv(ConstView q, ConstView k, ConstView v = {});

struct AttentionOutput {
  Tensor3 o;               // [Hq, N, d]
  std::vector<float> lse;  // [Hq * N], natural-log row log-sum-exp of the scaled scores
};

// Full causal attention.
AttentionOutput full_attention_cpu(ConstView q, ConstView k, ConstView v);
// Sliding-window causal attention (Gemma-3 local layers): query i attends keys j with
// i - window < j <= i (window 0, or >= N: full causal).
AttentionOutput sliding_attention_cpu(ConstView q, ConstView k, ConstView v, int64_t window);
// Block-sparse attention: query block i of head h attends to the key blocks of mask.row(h, i),
// causal inside the diagonal block. With BlockMask::causal it equals full attention.
AttentionOutput sparse_attention_cpu(ConstView q, ConstView k, ConstView v, const BlockMask& mask);
// Row log-sum-exp only (first pass of the oracle), [Hq * N].
std::vector<float> row_lse_cpu(ConstView q, ConstView k);

// Oracle block mass M_h[i, j] = mean over rows q of block i of sum_{k in block j} P_h[q, k].
// Stored dense [H, Nb, Nb], zero above the diagonal; each row sums to 1. Two passes (row LSE,
// then block sums), never an N x N buffer.
struct BlockMass {
  int heads = 0, num_blocks = 0, block = 0;
  int64_t seq_len = 0;
  std::vector<float> mass;  // [heads * Nb * Nb]
  const float* row(int h, int i) const { return mass.data() + (static_cast<size_t>(h) * num_blocks + i) * num_blocks; }
  float* row(int h, int i) { return mass.data() + (static_cast<size_t>(h) * num_blocks + i) * num_blocks; }
  float at(int h, int i, int j) const { return row(h, i)[j]; }
};
BlockMass block_mass_cpu(ConstView q, ConstView k, int block);
// Same, given row LSEs already computed (e.g. by full_attention_cpu).
BlockMass block_mass_cpu(ConstView q, ConstView k, int block, const std::vector<float>& lse);

// Threads used by the CPU reference on the calling host thread (0 = OpenMP default).
void set_cpu_threads(int n);
int cpu_threads();

}  // namespace proxyattn
