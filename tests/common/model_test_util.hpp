#pragma once
// Helpers of the model runtime tests: a minimal GGUF writer (to build valid and corrupt files
// byte by byte) and the location of the Python-written fixtures (tests/python/model_fixtures.py,
// run by ctest's model_fixtures setup test).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

namespace proxyattn::test {

inline std::filesystem::path model_fixture_dir() {
  if (const char* e = std::getenv("PROXYATTN_MODEL_FIXTURES")) return e;
#ifdef PROXYATTN_MODEL_FIXTURES
  return PROXYATTN_MODEL_FIXTURES;
#else
  return {};
#endif
}
inline std::string model_fixture(const std::string& name) { return (model_fixture_dir() / name).string(); }
inline bool have_model_fixtures() { return std::filesystem::exists(model_fixture_dir() / "tiny_ref.gguf"); }
#define PROXYATTN_REQUIRE_MODEL_FIXTURES()                                                            \
  if (!::proxyattn::test::have_model_fixtures())                                                      \
  GTEST_SKIP() << "model fixtures missing (" << ::proxyattn::test::model_fixture_dir()               \
               << "): run tests/python/model_fixtures.py DIR and set PROXYATTN_MODEL_FIXTURES=DIR"

// Little-endian GGUF bytes, written field by field.
struct GgufBytes {
  std::vector<uint8_t> b;
  template <class T>
  GgufBytes& put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof(T));
    return *this;
  }
  GgufBytes& str(const std::string& s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  GgufBytes& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    return put<uint32_t>(0x46554747).put<uint32_t>(version).put<uint64_t>(n_tensors).put<uint64_t>(n_kv);
  }
  GgufBytes& kv_u32(const std::string& k, uint32_t v) { return str(k).put<uint32_t>(4).put<uint32_t>(v); }
  GgufBytes& kv_str(const std::string& k, const std::string& v) { return str(k).put<uint32_t>(8).str(v); }
  GgufBytes& kv_f32(const std::string& k, float v) { return str(k).put<uint32_t>(6).put<float>(v); }
  GgufBytes& tensor_info(const std::string& name, std::vector<uint64_t> shape, uint32_t type, uint64_t offset) {
    str(name).put<uint32_t>(static_cast<uint32_t>(shape.size()));
    for (uint64_t d : shape) put<uint64_t>(d);
    return put<uint32_t>(type).put<uint64_t>(offset);
  }
  GgufBytes& align(size_t a = 32) {
    while (b.size() % a) b.push_back(0);
    return *this;
  }
  GgufBytes& floats(const std::vector<float>& v) {
    for (float x : v) put<float>(x);
    return *this;
  }
};

// A per-process temporary folder, removed at exit.
struct TempDir {
  std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("proxyattn_model_test_" + std::to_string(::getpid()));
  TempDir() { std::filesystem::create_directories(path); }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};
inline const std::filesystem::path& temp_dir() {
  static const TempDir d;
  return d.path;
}

inline std::string write_temp(const std::vector<uint8_t>& bytes, const std::string& name) {
  const auto p = temp_dir() / name;
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return p.string();
}

}  // namespace proxyattn::test

namespace proxyattn::test {

// Tiny random GGUF models (F32 tensors, N(0, sigma) projections, embeddings N(0, emb_sigma),
// norms near 1), written in C++ so that tests need no Python: the GPU tests use them on the
// device machine. Shapes ne0 first, as llama.cpp writes them.
struct TinyLlama {
  int layers = 3, embd = 96, heads = 6, kv_heads = 2, head_dim = 64, ff = 160, vocab = 211, ctx = 4096;
  float sigma = 0.08f;
  uint64_t seed = 7;
};
// Gemma-3: layer i is global when i % period == period - 1 (the default pattern's rule), the
// others slide over `window` keys with RoPE base rope_theta_swa; no attention.scale key (the
// scale is 1/sqrt(head_dim)); metadata keys named in `drop` are left out (error tests).
struct TinyGemma {
  int layers = 4, embd = 96, heads = 6, kv_heads = 2, head_dim = 64, ff = 160, vocab = 211, ctx = 4096;
  int window = 37, period = 2;
  float rope_theta = 1e6f, rope_theta_swa = 1e4f;
  float attn_softcap = 0;  // > 0: writes gemma3.attn_logit_softcapping (not supported: an error)
  std::vector<std::string> drop;
  float sigma = 0.08f;
  uint64_t seed = 11;
};

namespace detail {
// Writes metadata (kv writes the `n_kv` key/values) and random F32 tensors.
template <class KV>
inline std::string write_tiny_gguf(const std::vector<std::pair<std::string, std::vector<uint64_t>>>& tensors,
                                   uint64_t n_kv, KV&& kv, float sigma, float emb_sigma, uint64_t seed,
                                   const std::string& name) {
  GgufBytes g;
  g.header(tensors.size(), n_kv);
  kv(g);
  uint64_t offset = 0;
  std::vector<uint64_t> sizes;
  for (const auto& [n, shape] : tensors) {
    uint64_t e = 1;
    for (uint64_t d : shape) e *= d;
    g.tensor_info(n, shape, 0, offset);
    sizes.push_back(e);
    offset += (e * 4 + 31) / 32 * 32;
  }
  g.align();
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string& n = tensors[i].first;
    const bool norm = n.find("norm") != std::string::npos, emb = n == "token_embd.weight";
    for (uint64_t j = 0; j < sizes[i]; ++j)
      g.put<float>(norm ? 1.0f + 0.1f * nd(rng) : (emb ? emb_sigma : sigma) * nd(rng));
    g.align();
  }
  return write_temp(g.b, name);
}

template <class T>
inline std::vector<std::pair<std::string, std::vector<uint64_t>>> tiny_tensors(const T& t, bool gemma) {
  std::vector<std::pair<std::string, std::vector<uint64_t>>> tensors;
  const uint64_t E = t.embd, V = t.vocab, Q = uint64_t(t.heads) * t.head_dim, K = uint64_t(t.kv_heads) * t.head_dim;
  tensors.push_back({"token_embd.weight", {E, V}});
  tensors.push_back({"output_norm.weight", {E}});
  for (int l = 0; l < t.layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    tensors.push_back({p + "attn_norm.weight", {E}});
    tensors.push_back({p + "ffn_norm.weight", {E}});
    tensors.push_back({p + "attn_q.weight", {E, Q}});
    tensors.push_back({p + "attn_k.weight", {E, K}});
    tensors.push_back({p + "attn_v.weight", {E, K}});
    tensors.push_back({p + "attn_output.weight", {Q, E}});
    tensors.push_back({p + "ffn_gate.weight", {E, uint64_t(t.ff)}});
    tensors.push_back({p + "ffn_up.weight", {E, uint64_t(t.ff)}});
    tensors.push_back({p + "ffn_down.weight", {uint64_t(t.ff), E}});
    if (gemma) {
      tensors.push_back({p + "attn_q_norm.weight", {uint64_t(t.head_dim)}});
      tensors.push_back({p + "attn_k_norm.weight", {uint64_t(t.head_dim)}});
      tensors.push_back({p + "post_attention_norm.weight", {E}});
      tensors.push_back({p + "post_ffw_norm.weight", {E}});
    }
  }
  return tensors;
}
}  // namespace detail

inline std::string write_tiny_llama(const TinyLlama& t, const std::string& name) {
  return detail::write_tiny_gguf(
      detail::tiny_tensors(t, false), 8,
      [&](GgufBytes& g) {
        g.kv_str("general.architecture", "llama")
            .kv_u32("llama.embedding_length", t.embd)
            .kv_u32("llama.attention.head_count", t.heads)
            .kv_u32("llama.attention.head_count_kv", t.kv_heads)
            .kv_u32("llama.attention.key_length", t.head_dim)
            .kv_u32("llama.block_count", t.layers)
            .kv_u32("llama.feed_forward_length", t.ff)
            .kv_u32("llama.context_length", t.ctx);
      },
      t.sigma, 1.0f, t.seed, name);
}

inline std::string write_tiny_gemma(const TinyGemma& t, const std::string& name) {
  // Embeddings times sqrt(E) at run time: rows of rms ~1 then.
  const float emb_sigma = 1.0f / std::sqrt(static_cast<float>(t.embd));
  std::vector<std::pair<std::string, std::function<void(GgufBytes&)>>> kv = {
      {"general.architecture", [&](GgufBytes& g) { g.kv_str("general.architecture", "gemma3"); }},
      {"gemma3.embedding_length", [&](GgufBytes& g) { g.kv_u32("gemma3.embedding_length", t.embd); }},
      {"gemma3.attention.head_count", [&](GgufBytes& g) { g.kv_u32("gemma3.attention.head_count", t.heads); }},
      {"gemma3.attention.head_count_kv", [&](GgufBytes& g) { g.kv_u32("gemma3.attention.head_count_kv", t.kv_heads); }},
      {"gemma3.attention.key_length", [&](GgufBytes& g) { g.kv_u32("gemma3.attention.key_length", t.head_dim); }},
      {"gemma3.attention.value_length", [&](GgufBytes& g) { g.kv_u32("gemma3.attention.value_length", t.head_dim); }},
      {"gemma3.block_count", [&](GgufBytes& g) { g.kv_u32("gemma3.block_count", t.layers); }},
      {"gemma3.feed_forward_length", [&](GgufBytes& g) { g.kv_u32("gemma3.feed_forward_length", t.ff); }},
      {"gemma3.context_length", [&](GgufBytes& g) { g.kv_u32("gemma3.context_length", t.ctx); }},
      {"gemma3.attention.sliding_window", [&](GgufBytes& g) { g.kv_u32("gemma3.attention.sliding_window", t.window); }},
      {"gemma3.attention.sliding_window_pattern",
       [&](GgufBytes& g) { g.kv_u32("gemma3.attention.sliding_window_pattern", t.period); }},
      {"gemma3.rope.freq_base", [&](GgufBytes& g) { g.kv_f32("gemma3.rope.freq_base", t.rope_theta); }},
      {"gemma3.rope.freq_base_swa", [&](GgufBytes& g) { g.kv_f32("gemma3.rope.freq_base_swa", t.rope_theta_swa); }},
      {"gemma3.attention.layer_norm_rms_epsilon",
       [&](GgufBytes& g) { g.kv_f32("gemma3.attention.layer_norm_rms_epsilon", 1e-6f); }},
  };
  if (t.attn_softcap > 0)
    kv.push_back({"gemma3.attn_logit_softcapping", [&](GgufBytes& g) { g.kv_f32("gemma3.attn_logit_softcapping", t.attn_softcap); }});
  std::erase_if(kv, [&](const auto& e) { return std::find(t.drop.begin(), t.drop.end(), e.first) != t.drop.end(); });
  return detail::write_tiny_gguf(
      detail::tiny_tensors(t, true), kv.size(),
      [&](GgufBytes& g) {
        for (const auto& e : kv) e.second(g);
      },
      t.sigma, emb_sigma, t.seed, name);
}

}  // namespace proxyattn::test
