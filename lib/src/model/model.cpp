// Back-end independent parts of the model runtime: config from GGUF metadata, the attention
// policies, perplexity and greedy decoding on top of Model::forward, and back-end dispatch.
#include "proxyattn/model/model.hpp"

#include <algorithm>
#include <cmath>
#include <regex>

#include "model_internal.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/methods.hpp"
#include "proxyattn/model/gguf.hpp"
#include "proxyattn/model_config.hpp"

namespace proxyattn::model {

std::string_view backend_name(Backend b) { return b == Backend::cpu ? "cpu" : "cuda"; }
Backend parse_backend(std::string_view s) {
  if (s == "cpu") return Backend::cpu;
  if (s == "cuda" || s == "gpu") return Backend::cuda;
  throw Error("unknown back end '" + std::string(s) + "' (cpu, cuda)");
}

namespace {

int to_int(const gguf::File& f, int64_t v, const std::string& key, int64_t lo, int64_t hi) {
  if (v < lo || v > hi)
    throw Error(f.where("metadata '" + key + "': " + std::to_string(v) + " outside [" + std::to_string(lo) + ", " +
                        std::to_string(hi) + "]"));
  return static_cast<int>(v);
}

}  // namespace

double ModelConfig::scale() const { return attn_scale > 0 ? attn_scale : 1.0 / std::sqrt(static_cast<double>(head_dim)); }

int ModelConfig::global_layers() const {
  int n = 0;
  for (int l = 0; l < n_layers; ++l) n += window(l) == 0;
  return n;
}

double window_element_density(int64_t n, int64_t window) {
  if (n <= 0) return 0.0;
  const double causal = 0.5 * double(n) * double(n + 1);
  if (window <= 0 || window >= n) return 1.0;
  // Row i sees min(i + 1, W) keys.
  const double w = double(window);
  return (0.5 * w * (w + 1) + double(n - window) * w) / causal;
}

namespace {

// Gemma-3 as llama.cpp runs it from the same file (capture_qk.GGUFModel._gemma3_config): local
// layers with a sliding window and their own RoPE base, every P-th layer global, the attention
// scale from the file (else query_pre_attn_scalar^-1/2), embeddings times sqrt(n_embd), per-head
// q/k norms, sandwich norms, GeGLU; norm weights used as stored (the converter added Gemma's +1).
void read_gemma3(const gguf::File& f, ModelConfig& c) {
  const std::string a = "gemma3";
  const int64_t window = f.get_int(a + ".attention.sliding_window");
  if (window < 1 || window > (int64_t{1} << 30))
    throw Error(f.where("metadata '" + a + ".attention.sliding_window' = " + std::to_string(window) + " must be in [1, 2^30]"));
  std::vector<bool> sliding(static_cast<size_t>(c.n_layers));
  const std::string pkey = a + ".attention.sliding_window_pattern";
  const gguf::Value* pv = f.find(pkey);
  if (pv && pv->is_array()) {
    if (static_cast<int64_t>(pv->array.size()) != c.n_layers)
      throw Error(f.where("metadata '" + pkey + "' has " + std::to_string(pv->array.size()) + " entries for " +
                          std::to_string(c.n_layers) + " layers"));
    for (int i = 0; i < c.n_layers; ++i) {
      const gguf::Value& e = pv->array[static_cast<size_t>(i)];
      sliding[static_cast<size_t>(i)] = e.type == gguf::ValueType::boolean ? e.as_bool(f.where("metadata '" + pkey + "'"))
                                                                              : e.as_int(f.where("metadata '" + pkey + "'")) != 0;
    }
  } else {
    const int64_t period = pv ? pv->as_int(f.where("metadata '" + pkey + "'")) : 6;
    if (period < 1) throw Error(f.where("metadata '" + pkey + "' = " + std::to_string(period) + " must be >= 1"));
    for (int i = 0; i < c.n_layers; ++i) sliding[static_cast<size_t>(i)] = i % period < period - 1;
  }
  c.layer_window.resize(static_cast<size_t>(c.n_layers));
  for (int i = 0; i < c.n_layers; ++i) c.layer_window[static_cast<size_t>(i)] = sliding[static_cast<size_t>(i)] ? int(window) : 0;
  c.rope_theta_local = f.get_double(a + ".rope.freq_base_swa", 10000.0);
  if (!(c.rope_theta_local > 0) || !std::isfinite(c.rope_theta_local)) throw Error(f.where("RoPE bases must be positive"));
  const double scale = f.get_double(a + ".attention.scale", 0.0);
  if (scale > 0 && std::isfinite(scale)) {
    c.attn_scale = scale;
  } else {
    // query_pre_attn_scalar: n_embd / n_head for the 62-layer 27B model, else the head dim.
    const double qpas = c.n_layers == 62 ? double(c.n_embd) / c.n_head : double(c.head_dim);
    c.attn_scale = 1.0 / std::sqrt(qpas);
  }
  if (f.get_double(a + ".attn_logit_softcapping", 0.0) > 0)
    throw Error(f.where("attention logit soft-capping is not supported"));
  c.final_softcap = f.get_double(a + ".final_logit_softcapping", 0.0);
  if (!(c.final_softcap >= 0) || !std::isfinite(c.final_softcap))
    throw Error(f.where("metadata '" + a + ".final_logit_softcapping' must be >= 0"));
  c.embed_scale = std::sqrt(static_cast<double>(c.n_embd));
  c.act = Activation::gelu_tanh;
  c.qk_norm = true;
  c.sandwich_norm = true;
  c.rope_permuted = false;
}

}  // namespace

ModelConfig read_model_config(const gguf::File& f) {
  ModelConfig c;
  c.arch = f.get_string("general.architecture", "");
  if (c.arch != "llama" && c.arch != "gemma3")
    throw Error(f.where("architecture '" + c.arch + "' is not supported (supported: general.architecture = llama or gemma3)"));
  const std::string a = c.arch;
  const bool gemma = a == "gemma3";
  if (f.get_int(a + ".expert_count", 0) > 0) throw Error(f.where("mixture-of-experts models are not supported"));
  c.name = f.get_string("general.name", f.path());
  constexpr int64_t kMaxDim = 1 << 20;
  c.n_embd = to_int(f, f.get_int(a + ".embedding_length"), a + ".embedding_length", 1, kMaxDim);
  const gguf::Value& hv = f.get(a + ".attention.head_count");
  const gguf::Value* hkv = f.find(a + ".attention.head_count_kv");
  if (hv.is_array() || (hkv && hkv->is_array())) throw Error(f.where("per-layer head counts are not supported"));
  c.n_head = to_int(f, f.get_int(a + ".attention.head_count"), a + ".attention.head_count", 1, 4096);
  c.n_head_kv = to_int(f, f.get_int(a + ".attention.head_count_kv", c.n_head), a + ".attention.head_count_kv", 1, 4096);
  // Gemma's head dim is not n_embd / n_head: the file must say it.
  const int64_t kl = gemma ? f.get_int(a + ".attention.key_length") : f.get_int(a + ".attention.key_length", c.n_embd / c.n_head);
  c.head_dim = to_int(f, kl, a + ".attention.key_length", 1, 4096);
  const int64_t v_dim = f.get_int(a + ".attention.value_length", c.head_dim);
  const int64_t rope_dim = f.get_int(a + ".rope.dimension_count", c.head_dim);
  if (v_dim != c.head_dim || rope_dim != c.head_dim || c.head_dim % 2)
    throw Error(f.where("head dims k=" + std::to_string(c.head_dim) + " v=" + std::to_string(v_dim) + " rope=" +
                        std::to_string(rope_dim) + " must be equal and even"));
  if (c.n_head % c.n_head_kv)
    throw Error(f.where(std::to_string(c.n_head) + " query heads is not a multiple of " + std::to_string(c.n_head_kv) + " KV heads"));
  const std::string scaling = f.get_string(a + ".rope.scaling.type", "none");
  if (scaling == "linear") {
    const gguf::Value& fv = f.get(a + ".rope.scaling.factor");
    c.rope_linear_factor = fv.as_double(f.where("metadata '" + a + ".rope.scaling.factor'"));
    if (!(c.rope_linear_factor > 0) || !std::isfinite(c.rope_linear_factor))
      throw Error(f.where("metadata '" + a + ".rope.scaling.factor' must be positive"));
  } else if (scaling != "none" && !scaling.empty()) {
    throw Error(f.where("RoPE scaling '" + scaling + "' is not supported"));
  }
  c.n_layers = to_int(f, f.get_int(a + ".block_count"), a + ".block_count", 1, 100000);
  c.n_ff = to_int(f, f.get_int(a + ".feed_forward_length"), a + ".feed_forward_length", 1, kMaxDim);
  c.rope_theta = f.get_double(a + ".rope.freq_base", 10000.0);
  c.rms_eps = f.get_double(a + ".attention.layer_norm_rms_epsilon", 1e-5);
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta)) throw Error(f.where("RoPE theta must be positive"));
  if (!(c.rms_eps >= 0) || !std::isfinite(c.rms_eps)) throw Error(f.where("RMSNorm epsilon must be >= 0"));
  c.n_ctx = f.get_int(a + ".context_length");
  if (c.n_ctx < 1) throw Error(f.where("context length must be positive"));
  if (gemma) read_gemma3(f, c);
  const gguf::TensorInfo& emb = f.tensor("token_embd.weight");
  if (emb.shape.size() != 2) throw Error(f.where("tensor 'token_embd.weight' is not 2-D"));
  c.vocab_size = emb.shape[1];
  c.tied_embeddings = f.find_tensor("output.weight") == nullptr;
  c.rope_freq_factors = f.find_tensor("rope_freqs.weight") != nullptr;

  // Tensor shapes (ne0 first) and types, as capture_qk.py checks them.
  const int64_t E = c.n_embd, D = c.head_dim;
  auto want = [&](const std::string& name, std::vector<int64_t> shape) {
    const gguf::TensorInfo& t = f.tensor(name);
    if (t.shape != shape) {
      auto str = [](const std::vector<int64_t>& s) {
        std::string r = "[";
        for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
        return r + "]";
      };
      throw Error(f.where("tensor '" + name + "' has shape " + str(t.shape) + ", expected " + str(shape) + " from the metadata"));
    }
    const gguf::TypeTraits* tr = gguf::type_traits(static_cast<uint32_t>(t.type));
    if (!tr || !tr->dequantizable)
      throw Error(f.where("tensor '" + name + "' uses quantisation " + gguf::type_name(static_cast<uint32_t>(t.type)) +
                          ", not supported (supported: " + gguf::dequantizable_types() + ")"));
  };
  want("token_embd.weight", {E, c.vocab_size});
  want("output_norm.weight", {E});
  if (!c.tied_embeddings) want("output.weight", {E, c.vocab_size});
  if (c.rope_freq_factors) want("rope_freqs.weight", {D / 2});
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    want(p + "attn_norm.weight", {E});
    want(p + "ffn_norm.weight", {E});
    want(p + "attn_q.weight", {E, c.n_head * D});
    want(p + "attn_k.weight", {E, c.n_head_kv * D});
    want(p + "attn_v.weight", {E, c.n_head_kv * D});
    want(p + "attn_output.weight", {c.n_head * D, E});
    want(p + "ffn_gate.weight", {E, c.n_ff});
    want(p + "ffn_up.weight", {E, c.n_ff});
    want(p + "ffn_down.weight", {c.n_ff, E});
    if (c.qk_norm) {
      want(p + "attn_q_norm.weight", {D});
      want(p + "attn_k_norm.weight", {D});
    }
    if (c.sandwich_norm) {
      want(p + "post_attention_norm.weight", {E});
      want(p + "post_ffw_norm.weight", {E});
    }
  }
  static const std::regex bias(R"(blk\.\d+\.(attn_[qkv]|attn_output|ffn_\w+)\.bias)");
  for (const gguf::TensorInfo& t : f.tensors())
    if (std::regex_match(t.name, bias))
      throw Error(f.where("tensor '" + t.name + "': projection biases are not supported (not a plain Llama model)"));
  return c;
}

ModelConfig read_llama_config(const gguf::File& f) {
  const std::string arch = f.get_string("general.architecture", "");
  if (arch != "llama")
    throw Error(f.where("architecture '" + arch + "' is not supported (only the Llama family: general.architecture = llama)"));
  return read_model_config(f);
}

// ------------------------------------------------------------------------------------------
namespace detail {

void check_forward_args(const ModelConfig& c, std::span<const int32_t> tokens, const ForwardOptions& opt,
                        int64_t offset, bool has_cache) {
  const int64_t N = static_cast<int64_t>(tokens.size()), V = c.vocab_size;
  if (N == 0) throw Error("forward: no tokens");
  for (int64_t i = 0; i < N; ++i)
    if (tokens[i] < 0 || tokens[i] >= V)
      throw Error("token " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
                  " is outside the vocabulary [0, " + std::to_string(V) + ")");
  if (offset + N > c.n_ctx && !opt.allow_overlength)
    throw Error(std::to_string(offset + N) + " tokens exceed the model's context length " + std::to_string(c.n_ctx));
  for (int64_t p : opt.logits_at)
    if (p < 0 || p >= N)
      throw Error("logits position " + std::to_string(p) + " outside [0, " + std::to_string(N) + ")");
  if (opt.nll_begin < -1 || opt.nll_begin > N - 1)
    throw Error("nll_begin " + std::to_string(opt.nll_begin) + " outside [-1, " + std::to_string(N - 1) + "]");
  if (opt.stop_after_layer < -1 || opt.stop_after_layer >= c.n_layers)
    throw Error("stop_after_layer " + std::to_string(opt.stop_after_layer) + " outside [-1, " +
                std::to_string(c.n_layers) + ")");
  if (opt.stop_after_layer >= 0 && has_cache) throw Error("forward: stop_after_layer cannot be used with a KV cache");
}

void unpermute_rope_rows(float* w, int64_t cols, int64_t row0, int heads, int d) {
  std::vector<float> tmp(static_cast<size_t>(d) * cols);
  for (int h = 0; h < heads; ++h) {
    float* base = w + (row0 + int64_t{h} * d) * cols;
    for (int j = 0; j < d / 2; ++j)
      for (int s = 0; s < 2; ++s)
        std::copy_n(base + (2 * j + s) * cols, cols, tmp.data() + (s * (d / 2) + j) * cols);
    std::copy(tmp.begin(), tmp.end(), base);
  }
}

void dequantize_tensor(const gguf::File& f, const std::string& name, float* out) {
  const gguf::TensorInfo& t = f.tensor(name);
  const int64_t rows = t.rows(), cols = t.cols(), per = 64;
  f.dequantize_rows(t, 0, 0, out);  // type and range checks (throws) outside the parallel loop
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t r0 = 0; r0 < rows; r0 += per) f.dequantize_rows(t, r0, std::min(per, rows - r0), out + r0 * cols);
}

std::vector<float> rope_inv_freq(const ModelConfig& c, const std::vector<float>& factors) {
  return rope_inv_freq(c.rope_theta, c.head_dim, factors, c.rope_linear_factor);
}

std::vector<float> rope_inv_freq_local(const ModelConfig& c) {
  return rope_inv_freq(c.rope_theta_local > 0 ? c.rope_theta_local : c.rope_theta, c.head_dim, {}, 1.0);
}

std::vector<float> rope_inv_freq(double theta, int D, const std::vector<float>& factors, double linear_factor) {
  std::vector<float> inv_freq(D / 2);
  for (int j = 0; j < D / 2; ++j) {
    double inv = 1.0 / std::pow(theta, static_cast<double>(2 * j) / D);
    if (!factors.empty()) inv /= static_cast<double>(factors[j]);
    inv_freq[j] = static_cast<float>(inv / linear_factor);
  }
  return inv_freq;
}

}  // namespace detail

// ------------------------------------------------------------------------------------------
Tensor3 FullAttention::attend(int, ConstView q, ConstView k, ConstView v) { return full_attention_cpu(q, k, v).o; }

BlockMaskAttention::BlockMaskAttention(MaskFn mask_for, std::vector<int> dense_layers)
    : mask_for_(std::move(mask_for)), dense_(std::move(dense_layers)) {
  if (!mask_for_) throw Error("block-sparse attention: no mask function");
}

std::optional<BlockMask> BlockMaskAttention::mask(int layer, ConstView q, ConstView k) {
  std::optional<BlockMask> mask;
  if (std::find(dense_.begin(), dense_.end(), layer) == dense_.end()) mask = mask_for_(layer, q, k);
  if (!mask) {
    densities_.push_back({layer, 1.0, 1.0});
    return mask;
  }
  if (mask->heads() != q.heads || mask->seq_len() != q.tokens)
    throw Error("layer " + std::to_string(layer) + ": mask is for " + std::to_string(mask->heads()) + " heads x " +
                std::to_string(mask->seq_len()) + " tokens, the layer has " + std::to_string(q.heads) + " x " +
                std::to_string(q.tokens));
  densities_.push_back({layer, mask->density(), mask->element_density()});
  return mask;
}

void BlockMaskAttention::windowed(int layer, int64_t n, int window) {
  densities_.push_back({layer, std::nan(""), window_element_density(n, window), window});
}

Tensor3 BlockMaskAttention::attend(int layer, ConstView q, ConstView k, ConstView v) {
  const std::optional<BlockMask> m = mask(layer, q, k);
  return m ? sparse_attention_cpu(q, k, v, *m).o : full_attention_cpu(q, k, v).o;
}

DevicePipelineAttention::DevicePipelineAttention(PipelineSpec spec, std::vector<int> dense_layers)
    : spec_(std::move(spec)), dense_(std::move(dense_layers)) {
  if (const std::string why = DevicePipeline::unsupported_reason(spec_); !why.empty())
    throw Error("device attention: " + why);
}

Tensor3 DevicePipelineAttention::attend(int, ConstView, ConstView, ConstView) {
  throw Error("attention '" + name() + "' runs on the cuda back end only (the cpu back end takes its masks from the "
              "CPU estimators: BlockMaskAttention)");
}

void DevicePipelineAttention::windowed(int layer, int64_t n, int window) {
  densities_.push_back({layer, std::nan(""), window_element_density(n, window), window});
}

std::string DevicePipelineAttention::name() const { return "device:" + (spec_.method ? spec_.method->name : std::string("full")); }

bool DevicePipelineAttention::dense(int layer) const {
  return !spec_.method || std::find(dense_.begin(), dense_.end(), layer) != dense_.end();
}

// ------------------------------------------------------------------------------------------
double Model::perplexity(std::span<const int32_t> tokens, AttentionPolicy* attention) {
  if (tokens.size() < 2) throw Error("perplexity: needs at least 2 tokens");
  ForwardOptions opt;
  opt.nll_begin = 0;
  opt.attention = attention;
  const ForwardResult r = forward(tokens, opt);
  double s = 0;
  for (double x : r.nll) s += x;
  return std::exp(s / static_cast<double>(r.nll.size()));
}

std::vector<int32_t> Model::generate(std::span<const int32_t> prompt, int max_new, std::span<const int32_t> stop,
                                     AttentionPolicy* attention, bool allow_overlength) {
  if (prompt.empty()) throw Error("generate: the prompt is empty");
  std::vector<int32_t> out;
  if (max_new <= 0) return out;
  auto cache = new_cache();
  ForwardOptions opt;
  opt.attention = attention;
  opt.allow_overlength = allow_overlength;
  opt.logits_at = {static_cast<int64_t>(prompt.size()) - 1};
  ForwardResult r = forward(prompt, opt, cache.get());
  for (int step = 0; step < max_new; ++step) {
    const auto row = r.logits_row(0);
    const int32_t t = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
    if (std::find(stop.begin(), stop.end(), t) != stop.end()) break;
    out.push_back(t);
    if (step + 1 == max_new) break;
    ForwardOptions o2;
    o2.allow_overlength = allow_overlength;
    o2.logits_at = {0};
    const int32_t one[1] = {t};
    r = forward(std::span<const int32_t>(one, 1), o2, cache.get());
  }
  return out;
}

std::unique_ptr<Model> load_model(const std::string& gguf_path, const LoadOptions& opt) {
  switch (opt.backend) {
    case Backend::cpu: return detail::load_cpu_model(gguf_path, opt);
    case Backend::cuda: return detail::load_cuda_model(gguf_path, opt);
  }
  throw Error("unknown back end");
}

std::unique_ptr<Model> random_model(const proxyattn::ModelConfig& shape, uint64_t seed, const LoadOptions& opt) {
  if (!shape.has_full_shape())
    throw Error("model config '" + shape.name + "' has no hidden_size / intermediate_size / vocab_size (needed for a "
                "whole-model forward)");
  if (opt.backend != Backend::cuda) throw Error("random_model: random weights are generated on the cuda back end only");
  ModelConfig c;
  c.arch = "llama";
  c.name = shape.name + " (random weights, seed " + std::to_string(seed) + ")";
  c.n_layers = shape.num_layers;
  c.n_embd = shape.hidden_size;
  c.n_ff = shape.intermediate_size;
  c.n_head = shape.num_q_heads;
  c.n_head_kv = shape.num_kv_heads;
  c.head_dim = shape.head_dim;
  c.n_ctx = shape.max_context;
  c.vocab_size = shape.vocab_size;
  c.rope_theta = shape.rope_theta;
  c.rms_eps = shape.rms_norm_eps;
  c.qkv_bias = shape.qkv_bias;
  return detail::random_cuda_llama(c, seed, opt);
}

double model_weight_bytes(const proxyattn::ModelConfig& s) {
  const double E = s.hidden_size, F = s.intermediate_size, V = double(s.vocab_size);
  const double W = double(s.num_q_heads + 2 * s.num_kv_heads) * s.head_dim;
  const double per_layer = 2 * (W * E + double(s.num_q_heads) * s.head_dim * E + 3 * E * F) + 4 * (2 * E + W);
  return s.num_layers * per_layer + 2 * 2 * V * E + 4 * E;
}

}  // namespace proxyattn::model
