// Back-end independent parts of the model runtime: config from GGUF metadata, the attention
// policies, perplexity and greedy decoding on top of Model::forward, and back-end dispatch.
#include "proxyattn/model/model.hpp"

#include <algorithm>
#include <cmath>
#include <regex>

#include "model_internal.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/model/gguf.hpp"

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

ModelConfig read_llama_config(const gguf::File& f) {
  ModelConfig c;
  c.arch = f.get_string("general.architecture", "");
  if (c.arch != "llama")
    throw Error(f.where("architecture '" + c.arch + "' is not supported (only the Llama family: general.architecture = llama)"));
  const std::string a = c.arch;
  if (f.get_int(a + ".expert_count", 0) > 0) throw Error(f.where("mixture-of-experts models are not supported"));
  c.name = f.get_string("general.name", f.path());
  constexpr int64_t kMaxDim = 1 << 20;
  c.n_embd = to_int(f, f.get_int(a + ".embedding_length"), a + ".embedding_length", 1, kMaxDim);
  const gguf::Value& hv = f.get(a + ".attention.head_count");
  const gguf::Value* hkv = f.find(a + ".attention.head_count_kv");
  if (hv.is_array() || (hkv && hkv->is_array())) throw Error(f.where("per-layer head counts are not supported"));
  c.n_head = to_int(f, f.get_int(a + ".attention.head_count"), a + ".attention.head_count", 1, 4096);
  c.n_head_kv = to_int(f, f.get_int(a + ".attention.head_count_kv", c.n_head), a + ".attention.head_count_kv", 1, 4096);
  c.head_dim = to_int(f, f.get_int(a + ".attention.key_length", c.n_embd / c.n_head), a + ".attention.key_length", 1, 4096);
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
  }
  static const std::regex bias(R"(blk\.\d+\.(attn_[qkv]|attn_output|ffn_\w+)\.bias)");
  for (const gguf::TensorInfo& t : f.tensors())
    if (std::regex_match(t.name, bias))
      throw Error(f.where("tensor '" + t.name + "': projection biases are not supported (not a plain Llama model)"));
  return c;
}

// ------------------------------------------------------------------------------------------
Tensor3 FullAttention::attend(int, ConstView q, ConstView k, ConstView v) { return full_attention_cpu(q, k, v).o; }

BlockMaskAttention::BlockMaskAttention(MaskFn mask_for, std::vector<int> dense_layers)
    : mask_for_(std::move(mask_for)), dense_(std::move(dense_layers)) {
  if (!mask_for_) throw Error("block-sparse attention: no mask function");
}

Tensor3 BlockMaskAttention::attend(int layer, ConstView q, ConstView k, ConstView v) {
  std::optional<BlockMask> mask;
  if (std::find(dense_.begin(), dense_.end(), layer) == dense_.end()) mask = mask_for_(layer, q, k);
  if (!mask) {
    densities_.push_back({layer, 1.0, 1.0});
    return full_attention_cpu(q, k, v).o;
  }
  if (mask->heads() != q.heads || mask->seq_len() != q.tokens)
    throw Error("layer " + std::to_string(layer) + ": mask is for " + std::to_string(mask->heads()) + " heads x " +
                std::to_string(mask->seq_len()) + " tokens, the layer has " + std::to_string(q.heads) + " x " +
                std::to_string(q.tokens));
  densities_.push_back({layer, mask->density(), mask->element_density()});
  return sparse_attention_cpu(q, k, v, *mask).o;
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
    case Backend::cpu: return detail::load_cpu_llama(gguf_path, opt);
    case Backend::cuda:
      throw Error("model back end 'cuda' is not implemented yet (use cpu)");
  }
  throw Error("unknown back end");
}

}  // namespace proxyattn::model
