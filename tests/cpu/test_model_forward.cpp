// The CPU model runtime against its spec, the numpy forward of scripts/capture_qk.py, on a tiny
// random Llama GGUF (fixtures: tests/python/model_fixtures.py): per-layer post-RoPE Q/K/V,
// logits of every position, perplexity, greedy decoding with the KV cache; pluggable attention
// (BlockMask-driven) and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "model_test_util.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/model/gguf.hpp"
#include "proxyattn/kernels.h"
#include "proxyattn/model/model.hpp"
#include "proxyattn/model_config.hpp"
#include "test_util.hpp"

namespace proxyattn::test {
namespace {

using model::ForwardOptions;
using model::load_model;

constexpr double kRtol = 2e-3;  // the capture's torch cross-check limit

struct Reference {
  gguf::File f;
  std::vector<int32_t> tokens;
  explicit Reference(const std::string& path) : f(path) {
    for (float t : f.dequantize(f.tensor("tokens"))) tokens.push_back(static_cast<int32_t>(t));
  }
  std::vector<float> tensor(const std::string& name) const { return f.dequantize(f.tensor(name)); }
};

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::abs(x)));
  return m;
}

// |x - ref| <= rtol * (|ref| + max|ref|): relative to the element and to the tensor's scale.
void check_rel(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
  check_close(what, got, want, kRtol * max_abs(want), kRtol);
}

std::vector<float> copy_of(ConstView v) {
  std::vector<float> out;
  for (int64_t h = 0; h < v.heads; ++h)
    for (int64_t t = 0; t < v.tokens; ++t) out.insert(out.end(), v.row(h, t), v.row(h, t) + v.dim);
  return out;
}

// The Python-written fixtures with the spec's outputs: the Llama model (tiny) and the Gemma-3
// model (tiny_gemma: sliding and global layers, window 11 < N = 53, GQA 3, a non-default
// attention scale, soft-capped logits).
class SpecCase : public ::testing::TestWithParam<std::string> {};
INSTANTIATE_TEST_SUITE_P(Models, SpecCase, ::testing::Values("tiny", "tiny_gemma"),
                         [](const auto& info) { return info.param; });

TEST_P(SpecCase, MatchesNumpySpec) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  const std::string name = GetParam();
  auto m = load_model(model_fixture(name + ".gguf"));
  const Reference ref(model_fixture(name + "_ref.gguf"));
  const auto& c = m->config();
  EXPECT_EQ(c.n_head, 6);
  EXPECT_EQ(c.n_head_kv, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_TRUE(c.tied_embeddings);
  if (name == "tiny") {
    EXPECT_EQ(c.arch, "llama");
    EXPECT_EQ(c.n_layers, 3);
    EXPECT_TRUE(c.layer_window.empty());
    EXPECT_EQ(c.global_layers(), 3);
  } else {
    EXPECT_EQ(c.arch, "gemma3");
    EXPECT_EQ(c.n_layers, 4);
    EXPECT_EQ(c.layer_window, (std::vector<int>{11, 0, 11, 0}));
    EXPECT_EQ(c.global_layers(), 2);
    EXPECT_DOUBLE_EQ(c.rope_theta_local, 1e4);
    EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
    EXPECT_NEAR(c.scale(), 0.2, 1e-7);
    EXPECT_NEAR(c.embed_scale, std::sqrt(96.0), 1e-12);
    EXPECT_NEAR(c.final_softcap, 5.0, 1e-7);
    EXPECT_TRUE(c.qk_norm && c.sandwich_norm && !c.rope_permuted && c.act == model::Activation::gelu_tanh);
  }
  const int64_t N = static_cast<int64_t>(ref.tokens.size());

  ForwardOptions opt;
  for (int64_t i = 0; i < N; ++i) opt.logits_at.push_back(i);
  opt.nll_begin = 0;
  std::map<int, std::vector<std::vector<float>>> qkv;
  opt.on_layer = [&](int layer, ConstView q, ConstView k, ConstView v) {
    EXPECT_EQ(q.heads, 6);
    EXPECT_EQ(k.heads, 2);
    EXPECT_EQ(q.tokens, N);
    qkv[layer] = {copy_of(q), copy_of(k), copy_of(v)};
  };
  const auto r = m->forward(ref.tokens, opt);
  ASSERT_EQ(qkv.size(), size_t(c.n_layers));
  for (const auto& [layer, t] : qkv) {
    check_rel(name + " q." + std::to_string(layer), t[0], ref.tensor("q." + std::to_string(layer)));
    check_rel(name + " k." + std::to_string(layer), t[1], ref.tensor("k." + std::to_string(layer)));
    check_rel(name + " v." + std::to_string(layer), t[2], ref.tensor("v." + std::to_string(layer)));
  }
  check_rel(name + " logits", r.logits, ref.tensor("logits"));
  double s = 0;
  for (double x : r.nll) s += x;
  const double ppl = std::exp(s / static_cast<double>(r.nll.size()));
  const double want = ref.f.get_double("ref.ppl", 0);
  EXPECT_NEAR(ppl, want, 1e-4 * want) << "perplexity";
  EXPECT_NEAR(m->perplexity(ref.tokens), want, 1e-4 * want);
}

TEST_P(SpecCase, GreedyDecodingMatchesSpec) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  const std::string name = GetParam();
  auto m = load_model(model_fixture(name + ".gguf"));
  const Reference ref(model_fixture(name + "_ref.gguf"));
  const int64_t P = ref.f.get_int("ref.prompt_len");
  std::vector<int32_t> want;
  for (const auto& v : ref.f.get("ref.generated").array) want.push_back(static_cast<int32_t>(v.as_int("generated")));
  const auto got = m->generate(std::span(ref.tokens).first(P), static_cast<int>(want.size()));
  EXPECT_EQ(got, want);
  // A stop token ends the continuation before it.
  const int32_t stop[1] = {want[2]};
  const auto cut = m->generate(std::span(ref.tokens).first(P), static_cast<int>(want.size()), stop);
  EXPECT_EQ(cut, std::vector<int32_t>(want.begin(), std::find(want.begin(), want.end(), want[2])));
}

// Prefill of a prefix, then the rest token by token and in one chunk through the cache: the
// logits equal the full prefill's (Gemma: the prefix 20 and the decoded positions are past the
// window, so the cached sliding layers must drop keys).
TEST_P(SpecCase, KvCacheEqualsFullPrefill) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  const std::string name = GetParam();
  auto m = load_model(model_fixture(name + ".gguf"));
  const Reference ref(model_fixture(name + "_ref.gguf"));
  const auto& toks = ref.tokens;
  const int64_t N = static_cast<int64_t>(toks.size()), V = m->config().vocab_size, P = 20;
  const auto full = ref.tensor("logits");

  auto cache = m->new_cache();
  ForwardOptions o;
  o.logits_at = {P - 1};
  auto r = m->forward(std::span(toks).first(P), o, cache.get());
  EXPECT_EQ(cache->length(), P);
  std::vector<float> got(r.logits), want(full.begin() + (P - 1) * V, full.begin() + P * V);
  for (int64_t i = P; i < N; ++i) {
    ForwardOptions o1;
    o1.logits_at = {0};
    r = m->forward(std::span(toks).subspan(i, 1), o1, cache.get());
    got.insert(got.end(), r.logits.begin(), r.logits.end());
    want.insert(want.end(), full.begin() + i * V, full.begin() + (i + 1) * V);
  }
  EXPECT_EQ(cache->length(), N);
  check_rel("logits, one token at a time", got, want);

  auto cache2 = m->new_cache();
  m->forward(std::span(toks).first(P), ForwardOptions{}, cache2.get());
  ForwardOptions oc;
  for (int64_t i = 0; i < N - P; ++i) oc.logits_at.push_back(i);
  r = m->forward(std::span(toks).subspan(P), oc, cache2.get());
  check_rel("logits, one chunk", r.logits, std::vector<float>(full.begin() + P * V, full.end()));
}

// The all-causal BlockMask equals full attention; dense_layers are never asked for a mask; a
// sparse mask changes later layers only.
TEST(ModelForward, BlockMaskAttention) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  auto m = load_model(model_fixture("tiny.gguf"));
  const Reference ref(model_fixture("tiny_ref.gguf"));
  const int64_t N = static_cast<int64_t>(ref.tokens.size());
  const int B = 16;  // N = 41: 3 blocks, the last partial

  std::vector<int> asked;
  model::BlockMaskAttention causal(
      [&](int layer, ConstView q, ConstView) -> std::optional<BlockMask> {
        asked.push_back(layer);
        return BlockMask::causal(static_cast<int>(q.heads), q.tokens, B);
      },
      {1});
  ForwardOptions opt;
  opt.logits_at = {N - 1};
  const auto dense = m->forward(ref.tokens, opt);
  opt.attention = &causal;
  const auto sparse = m->forward(ref.tokens, opt);
  EXPECT_EQ(asked, (std::vector<int>{0, 2}));
  ASSERT_EQ(causal.densities().size(), 3u);
  for (const auto& d : causal.densities()) EXPECT_DOUBLE_EQ(d.block_density, 1.0);
  check_close("causal mask vs full", sparse.logits, dense.logits, 1e-5, 1e-5);

  // Local attention (diagonal blocks only) from layer 1 on.
  model::BlockMaskAttention local([&](int layer, ConstView q, ConstView) -> std::optional<BlockMask> {
    if (layer == 0) return std::nullopt;
    const int nb = num_blocks_for(q.tokens, B);
    std::vector<std::vector<int32_t>> rows;
    for (int h = 0; h < q.heads; ++h)
      for (int i = 0; i < nb; ++i) rows.push_back({i});
    return BlockMask::from_rows(static_cast<int>(q.heads), q.tokens, B, rows);
  });
  std::map<int, std::vector<float>> q_full, q_local;
  ForwardOptions o2;
  o2.on_layer = [&](int l, ConstView q, ConstView, ConstView) { q_full[l] = copy_of(q); };
  m->forward(ref.tokens, o2);
  o2.attention = &local;
  o2.on_layer = [&](int l, ConstView q, ConstView, ConstView) { q_local[l] = copy_of(q); };
  m->forward(ref.tokens, o2);
  EXPECT_EQ(q_full[0], q_local[0]);
  EXPECT_EQ(q_full[1], q_local[1]);  // layer 0 ran dense in both
  EXPECT_NE(q_full[2], q_local[2]);  // layer 1's local attention changed layer 2's input
  ASSERT_EQ(local.densities().size(), 3u);
  EXPECT_LT(local.densities()[1].block_density, 1.0);

  // A mask of the wrong shape is an error naming the layer.
  model::BlockMaskAttention wrong([&](int, ConstView q, ConstView) -> std::optional<BlockMask> {
    return BlockMask::causal(static_cast<int>(q.heads), q.tokens + 1, B);
  });
  ForwardOptions o3;
  o3.attention = &wrong;
  EXPECT_THROW(m->forward(ref.tokens, o3), Error);
}

TEST(ModelForward, StopAfterLayerCapturesOnly) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  auto m = load_model(model_fixture("tiny.gguf"));
  const Reference ref(model_fixture("tiny_ref.gguf"));
  std::vector<int> seen;
  ForwardOptions o;
  o.stop_after_layer = 1;
  o.on_layer = [&](int l, ConstView, ConstView, ConstView) { seen.push_back(l); };
  const auto r = m->forward(ref.tokens, o);
  EXPECT_EQ(seen, (std::vector<int>{0, 1}));
  EXPECT_TRUE(r.logits.empty());
}

TEST(ModelForward, BadInputIsOneError) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  auto m = load_model(model_fixture("tiny.gguf"));
  const auto& c = m->config();
  auto msg = [&](std::vector<int32_t> toks, ForwardOptions o = {}) {
    try {
      m->forward(toks, o);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(msg({1, 2, static_cast<int32_t>(c.vocab_size)}).find("token 301 at position 2 is outside the vocabulary"),
            std::string::npos);
  EXPECT_NE(msg({1, -1}).find("outside the vocabulary"), std::string::npos);
  EXPECT_NE(msg(std::vector<int32_t>(c.n_ctx + 1, 1)).find("exceed the model's context length 128"), std::string::npos);
  ForwardOptions over;
  over.allow_overlength = true;
  EXPECT_EQ(msg(std::vector<int32_t>(c.n_ctx + 1, 1), over), "");
  ForwardOptions lp;
  lp.logits_at = {5};
  EXPECT_NE(msg({1, 2}, lp).find("logits position 5"), std::string::npos);
  EXPECT_NE(msg({}).find("no tokens"), std::string::npos);
  model::LoadOptions cuda;
  cuda.backend = model::Backend::cuda;
  EXPECT_THROW(load_model(model_fixture("tiny.gguf"), cuda), Error);
  EXPECT_THROW(model::parse_backend("tpu"), Error);

  // Neither Llama nor Gemma-3 / a missing tensor: one error naming the file.
  GgufBytes g;
  g.header(0, 1).kv_str("general.architecture", "qwen2");
  const std::string p = write_temp(g.b, "qwen2.gguf");
  try {
    load_model(p);
    ADD_FAILURE() << "qwen2 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gguf " + p + ": architecture 'qwen2' is not supported (supported: "
                                         "general.architecture = llama or gemma3)"),
              std::string::npos)
        << e.what();
  }
  GgufBytes h;
  h.header(0, 5).kv_str("general.architecture", "llama").kv_u32("llama.embedding_length", 64);
  h.kv_u32("llama.attention.head_count", 4).kv_u32("llama.block_count", 1).kv_u32("llama.feed_forward_length", 64);
  const std::string p2 = write_temp(h.b, "llama.gguf");
  try {
    load_model(p2);
    ADD_FAILURE() << "incomplete model accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gguf " + p2 + ": "), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace proxyattn::test

namespace proxyattn::test {
namespace {

// The C++-written tiny GGUF (model_test_util.hpp, what the GPU tests load) is a valid model;
// the CUDA back end without a device is one clear error.
TEST(ModelForward, TinyWrittenInCppLoadsAndCudaNeedsADevice) {
  const TinyLlama t;
  const std::string path = write_tiny_llama(t, "tiny_cpp.gguf");
  auto m = model::load_model(path);
  EXPECT_EQ(m->config().n_layers, t.layers);
  EXPECT_EQ(m->config().vocab_size, t.vocab);
  std::vector<int32_t> toks(300);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = int32_t((i * 37) % t.vocab);
  const double ppl = m->perplexity(toks);
  EXPECT_TRUE(std::isfinite(ppl) && ppl > 1.0);
  if (kernels::device_count() == 0) {
    model::LoadOptions lo;
    lo.backend = model::Backend::cuda;
    try {
      model::load_model(path, lo);
      ADD_FAILURE() << "loaded without a device";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("no CUDA device"), std::string::npos) << e.what();
    }
    ModelConfig shape = load_model_config(std::string(PROXYATTN_SOURCE_DIR) + "/configs/models/llama-3.1-8b.json");
    EXPECT_THROW(model::random_model(shape, 1, lo), Error);
  }
}

}  // namespace
}  // namespace proxyattn::test
