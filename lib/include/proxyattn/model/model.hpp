#pragma once
// The model runtime: prefill (and greedy decoding) of a Llama-family or Gemma-3 GGUF model, with
// every global layer's attention pluggable. scripts/capture_qk.py (numpy) is the spec of the
// forward pass: embeddings, RMSNorm, RoPE in Hugging Face's rotate_half layout (Llama: GGUF's Q/K
// rows are un-permuted at load), GQA causal attention, SwiGLU MLP, final RMSNorm, logits (tied to
// the embedding when the file has no output.weight). Gemma-3 adds (ModelConfig's Gemma fields):
// embeddings times sqrt(n_embd), per-head q/k RMSNorm before RoPE, sliding-window local layers
// with their own RoPE base, an attention scale from the file, the sandwich norms (RMSNorm of the
// attention and MLP outputs before each residual add), GeGLU (tanh GELU) and optional final
// logit soft-capping. Local (sliding-window) layers always run their exact windowed attention:
// an AttentionPolicy is applied to the global layers only and told of the others (windowed()).
//
// One interface, two back ends (Backend): CPU (float32, Eigen + OpenMP; the spec) and CUDA
// (bf16 weights and activations with fp32 accumulation and a float32 residual stream: cuBLAS
// GEMMs, our attention kernels and the device pipeline, model_ops.cu for the rest).
//
// Token ids come from the Python tokenizer; the runtime never tokenises.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "proxyattn/block_mask.hpp"
#include "proxyattn/device_pipeline.hpp"
#include "proxyattn/tensor.hpp"

namespace proxyattn {
struct ModelConfig;
}
namespace proxyattn::gguf {
class File;
}

namespace proxyattn::model {

enum class Backend { cpu, cuda };
std::string_view backend_name(Backend b);   // "cpu", "cuda"
Backend parse_backend(std::string_view s);  // throws Error on an unknown name

// Shapes and constants of a Llama-family or Gemma-3 model, read from GGUF metadata and validated
// against the tensor table (the same checks as capture_qk.py: architecture llama or gemma3, no
// MoE, equal even head dims, Hq % Hkv == 0, no projection biases, supported RoPE scaling, tensor
// shapes; Gemma-3 as capture_qk.GGUFModel._gemma3_config reads it).
enum class Activation { silu, gelu_tanh };  // of the gated MLP: SwiGLU or GeGLU
struct ModelConfig {
  std::string arch, name;
  int n_layers = 0, n_embd = 0, n_ff = 0, n_head = 0, n_head_kv = 0, head_dim = 0;
  int64_t n_ctx = 0, vocab_size = 0;
  double rope_theta = 10000.0, rms_eps = 1e-5, rope_linear_factor = 1.0;
  bool tied_embeddings = false;  // lm_head = token_embd (no output.weight)
  bool rope_freq_factors = false;  // rope_freqs.weight present (llama3-style)
  bool qkv_bias = false;           // Q/K/V projection biases (random_model of a Qwen2 shape only)
  // Gemma-3 (the defaults are Llama's).
  std::vector<int> layer_window;   // per layer: 0 = global (full causal), W > 0 = keys (i - W, i]; empty: all global
  double rope_theta_local = 0;     // RoPE base of the sliding layers (unscaled, no factors); 0: rope_theta
  double attn_scale = 0;           // softmax scale of q.k; 0: 1/sqrt(head_dim)
  double embed_scale = 1.0;        // embedding rows times this (Gemma: sqrt(n_embd))
  Activation act = Activation::silu;
  bool qk_norm = false;            // per-head RMSNorm of q and k before RoPE (attn_q_norm / attn_k_norm)
  bool sandwich_norm = false;      // RMSNorm of the attention and MLP outputs before the residual add
  bool rope_permuted = true;       // Q/K rows permuted by llama.cpp's converter (Llama only)
  double final_softcap = 0;        // logits = c tanh(logits / c) when > 0
  int group() const { return n_head / n_head_kv; }
  int window(int layer) const { return layer_window.empty() ? 0 : layer_window[static_cast<size_t>(layer)]; }
  double scale() const;            // attn_scale or 1/sqrt(head_dim)
  int global_layers() const;       // layers with window 0
};
ModelConfig read_model_config(const gguf::File& f);
// Same, refusing any architecture but llama (kept for callers that need a Llama model).
ModelConfig read_llama_config(const gguf::File& f);

// Attention of one layer in a prefill from position 0: q [Hq, N, d], k and v [Hkv, N, d]
// (post-RoPE; when the model's attention scale is not 1/sqrt(d), q arrives multiplied by
// scale * sqrt(d), so 1/sqrt(d) attention is exact). Returns O [Hq, N, d]. Called once per global
// layer, in layer order; a sliding-window layer runs its own windowed attention and is reported
// with windowed() instead, so the policy sees every layer once.
class AttentionPolicy {
 public:
  virtual ~AttentionPolicy() = default;
  virtual Tensor3 attend(int layer, ConstView q, ConstView k, ConstView v) = 0;
  // The back end ran layer `layer` (n tokens) with its exact sliding window of `window` keys.
  virtual void windowed(int /*layer*/, int64_t /*n*/, int /*window*/) {}
  // Short description for reports ("full", "block-sparse", ...).
  virtual std::string name() const = 0;
};

// Full causal attention (full_attention_cpu). The default.
class FullAttention final : public AttentionPolicy {
 public:
  Tensor3 attend(int layer, ConstView q, ConstView k, ConstView v) override;
  std::string name() const override { return "full"; }
};

// Block-sparse attention driven by a per-layer BlockMask (sparse_attention_cpu). mask_for is
// asked for each layer not in dense_layers; returning std::nullopt runs that layer dense.
// The block density each layer used is recorded (1.0 for dense layers).
// (layer, block density, element density) of each attention call, in call order. A
// sliding-window layer (window > 0) is not the method's: block density NaN, element density the
// share of the causal triangle its window computes (window_element_density).
struct LayerDensity {
  int layer;
  double block_density, element_density;
  int window = 0;
  bool windowed() const { return window > 0; }
};
// Elements of an n-token window-W band over those of the n-token causal triangle.
double window_element_density(int64_t n, int64_t window);

class BlockMaskAttention final : public AttentionPolicy {
 public:
  using MaskFn = std::function<std::optional<BlockMask>(int layer, ConstView q, ConstView k)>;
  explicit BlockMaskAttention(MaskFn mask_for, std::vector<int> dense_layers = {});
  Tensor3 attend(int layer, ConstView q, ConstView k, ConstView v) override;
  void windowed(int layer, int64_t n, int window) override;
  std::string name() const override { return "block-sparse"; }
  // The mask of a layer (std::nullopt: dense), its density recorded: what attend() runs, for a
  // back end that runs the attention itself (CUDA).
  std::optional<BlockMask> mask(int layer, ConstView q, ConstView k);
  using LayerDensity = model::LayerDensity;
  const std::vector<LayerDensity>& densities() const { return densities_; }
  void clear() { densities_.clear(); }

 private:
  MaskFn mask_for_;
  std::vector<int> dense_;
  std::vector<LayerDensity> densities_;
};

// Block-sparse attention selected on the GPU by the device pipeline (device_pipeline.hpp) in
// every layer not in dense_layers: the CUDA back end's fast path (proxyattn-bench's prefill).
// The CPU back end refuses it (its masks come from BlockMaskAttention + run_method).
class DevicePipelineAttention final : public AttentionPolicy {
 public:
  explicit DevicePipelineAttention(PipelineSpec spec, std::vector<int> dense_layers = {});
  Tensor3 attend(int layer, ConstView q, ConstView k, ConstView v) override;  // throws Error
  void windowed(int layer, int64_t n, int window) override;
  std::string name() const override;
  const PipelineSpec& spec() const { return spec_; }
  bool dense(int layer) const;
  // Block density per layer of the last forward (element density not measured: NaN).
  std::vector<LayerDensity>& densities() { return densities_; }

 private:
  PipelineSpec spec_;
  std::vector<int> dense_;
  std::vector<LayerDensity> densities_;
};

// Called per layer with that layer's post-RoPE q [Hq, n, d], k and v [Hkv, n, d] of the tokens
// of this forward call (the layout of the Q/K store).
using LayerHook = std::function<void(int layer, ConstView q, ConstView k, ConstView v)>;

// Keys and values of the tokens seen so far (for decoding). Opaque: each back end has its own.
class KVCache {
 public:
  virtual ~KVCache() = default;
  virtual int64_t length() const = 0;  // tokens cached
};

struct ForwardOptions {
  // Positions (indices into this call's tokens) whose logits are returned, in this order.
  std::vector<int64_t> logits_at;
  // When >= 0: negative log-likelihood (natural log, float64) of tokens[i + 1] given the prefix,
  // for i in [nll_begin, n - 1). Computed in row chunks; the [n, vocab] logits never exist.
  int64_t nll_begin = -1;
  // Attention of each layer when the cache is empty (a prefill from position 0); nullptr =
  // full causal. Tokens appended to a non-empty cache (decoding) attend densely to it.
  AttentionPolicy* attention = nullptr;
  LayerHook on_layer;
  // Stop after this layer (capture only: no logits, no NLL); -1 = run every layer.
  int stop_after_layer = -1;
  // Allow more tokens (cache included) than the model's context length.
  bool allow_overlength = false;
};

// Device time of the parts of one forward call (CUDA back end; CUDA events between the launches),
// milliseconds; linear_flops counts the projections and MLP (2 m n k per GEMM), logits apart.
struct DeviceStages {
  double linear_ms = 0, elementwise_ms = 0, estimation_ms = 0, attention_ms = 0, logits_ms = 0, total_ms = 0;
  double host_ms = 0;  // transfers and host callbacks inside the forward (on_layer, a host policy)
  double linear_flops = 0;
  size_t peak_bytes = 0;  // device memory in use at its highest sample (after each layer)
};

// Wall seconds of the parts of one forward call.
struct ForwardTiming {
  double embed = 0, qkv = 0, attention = 0, mlp = 0, logits = 0;  // mlp includes the output projection
  double total() const { return embed + qkv + attention + mlp + logits; }
};

struct ForwardResult {
  int64_t vocab = 0;
  ForwardTiming timing;
  DeviceStages device;  // CUDA back end only
  std::vector<float> logits;  // [logits_at.size(), vocab], row-major
  std::vector<double> nll;    // [n - 1 - nll_begin]
  std::span<const float> logits_row(size_t i) const {
    return {logits.data() + i * static_cast<size_t>(vocab), static_cast<size_t>(vocab)};
  }
};

class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelConfig& config() const = 0;
  virtual Backend backend() const = 0;
  // Runs the model over `tokens`. Without a cache (or with an empty one) this is a prefill
  // from position 0; with a non-empty cache the tokens continue the cached ones, which they
  // attend to, and are appended to it. Throws Error on token ids outside [0, vocab) or a
  // length over the context (unless allow_overlength).
  virtual ForwardResult forward(std::span<const int32_t> tokens, const ForwardOptions& opt,
                                KVCache* cache = nullptr) = 0;
  virtual std::unique_ptr<KVCache> new_cache() const = 0;

  // exp(mean NLL) of tokens[1..n) given their prefixes (one prefill).
  double perplexity(std::span<const int32_t> tokens, AttentionPolicy* attention = nullptr);
  // Greedy decoding with a KV cache: the prompt's prefill uses `attention`, each new token
  // attends densely. Stops at max_new tokens or at a token in stop (not returned).
  std::vector<int32_t> generate(std::span<const int32_t> prompt, int max_new,
                                std::span<const int32_t> stop = {}, AttentionPolicy* attention = nullptr,
                                bool allow_overlength = false);
};

struct LoadOptions {
  Backend backend = Backend::cpu;
  int threads = 0;  // CPU threads (0 = OpenMP default); > 0 sets OpenMP's and Eigen's process-wide count
  int64_t token_chunk = 0;  // CUDA: rows per projection/MLP chunk (0 = 16384)
};
// Opens and validates the GGUF file, dequantises its weights (float32 on the CPU, bf16 on the GPU).
std::unique_ptr<Model> load_model(const std::string& gguf_path, const LoadOptions& opt = {});
// A model of this shape (configs/models/*.json with the whole-model fields) with seeded random
// weights: N(0, 0.02) projections, embeddings and biases, unit norms; CUDA back end only (the
// prefill benchmark: no file needed). Error when the config lacks the whole-model fields or the
// weights do not fit the GPU.
std::unique_ptr<Model> random_model(const proxyattn::ModelConfig& shape, uint64_t seed, const LoadOptions& opt = {});
// Device bytes of random_model's weights for this shape (bf16), for memory checks.
double model_weight_bytes(const proxyattn::ModelConfig& shape);
// Device bytes a CUDA forward of n tokens allocates beyond the weights (token_chunk rows per
// projection chunk; 0 = the default), attention pipeline excluded (DevicePipeline::bytes).
double forward_workspace_bytes(const proxyattn::ModelConfig& shape, int64_t n, int64_t token_chunk = 0);

}  // namespace proxyattn::model
