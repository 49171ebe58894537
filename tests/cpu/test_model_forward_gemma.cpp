// Gemma-3 in the CPU model runtime beyond the spec cross-check (test_model_forward.cpp's
// SpecCase): the attention policy runs the global layers only and is told of the sliding ones;
// the window is what separates a local layer from a global one; config errors are one line.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "model_test_util.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/model/gguf.hpp"
#include "proxyattn/model/model.hpp"
#include "test_util.hpp"

namespace proxyattn::test {
namespace {

using model::ForwardOptions;
using model::load_model;

std::vector<int32_t> some_tokens(int64_t n, int vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = static_cast<int32_t>((i * 37 + 11) % vocab);
  return t;
}

TEST(GemmaForward, WindowElementDensity) {
  // n = 4, W = 2: rows see 1, 2, 2, 2 of the causal 1 + 2 + 3 + 4 = 10 keys.
  EXPECT_DOUBLE_EQ(model::window_element_density(4, 2), 0.7);
  EXPECT_DOUBLE_EQ(model::window_element_density(4, 4), 1.0);
  EXPECT_DOUBLE_EQ(model::window_element_density(4, 0), 1.0);
  EXPECT_DOUBLE_EQ(model::window_element_density(5, 1), 5.0 / 15.0);
}

// The policy is asked for the global layers (1, 3) only; the sliding ones (0, 2) are reported
// as windowed with their band's element density; the all-causal mask on the global layers
// equals the default forward.
TEST(GemmaForward, PolicySeesGlobalLayersOnly) {
  PROXYATTN_REQUIRE_MODEL_FIXTURES();
  auto m = load_model(model_fixture("tiny_gemma.gguf"));
  gguf::File rf(model_fixture("tiny_gemma_ref.gguf"));
  std::vector<int32_t> toks;
  for (float t : rf.dequantize(rf.tensor("tokens"))) toks.push_back(static_cast<int32_t>(t));
  const int64_t N = static_cast<int64_t>(toks.size());
  const int B = 16;  // N = 53: 4 blocks, the last partial
  std::vector<int> asked;
  model::BlockMaskAttention causal([&](int layer, ConstView q, ConstView) -> std::optional<BlockMask> {
    asked.push_back(layer);
    return BlockMask::causal(static_cast<int>(q.heads), q.tokens, B);
  });
  ForwardOptions opt;
  opt.logits_at = {N - 1, N / 2};
  const auto dense = m->forward(toks, opt);
  opt.attention = &causal;
  const auto masked = m->forward(toks, opt);
  EXPECT_EQ(asked, (std::vector<int>{1, 3}));
  ASSERT_EQ(causal.densities().size(), 4u);
  for (const auto& d : causal.densities()) {
    EXPECT_EQ(d.windowed(), d.layer % 2 == 0) << d.layer;
    if (d.windowed()) {
      EXPECT_EQ(d.window, 11);
      EXPECT_TRUE(std::isnan(d.block_density));
      EXPECT_DOUBLE_EQ(d.element_density, model::window_element_density(N, 11));
    } else {
      EXPECT_DOUBLE_EQ(d.block_density, 1.0);
    }
  }
  check_close("causal mask on the global layers vs full", masked.logits, dense.logits, 1e-5, 1e-5);

  // A diagonal-only mask on the global layers changes the output.
  model::BlockMaskAttention diag([&](int, ConstView q, ConstView) -> std::optional<BlockMask> {
    const int nb = num_blocks_for(q.tokens, B);
    std::vector<std::vector<int32_t>> rows;
    for (int h = 0; h < q.heads; ++h)
      for (int i = 0; i < nb; ++i) rows.push_back({i});
    return BlockMask::from_rows(static_cast<int>(q.heads), q.tokens, B, rows);
  });
  opt.attention = &diag;
  const auto local = m->forward(toks, opt);
  double diff = 0;
  for (size_t i = 0; i < local.logits.size(); ++i) diff = std::max(diff, double(std::abs(local.logits[i] - dense.logits[i])));
  EXPECT_GT(diff, 1e-3);
}

// With the same RoPE base for both layer kinds, sliding layers whose window covers the whole
// prompt are global layers: a model of only sliding layers (period > layers) equals the same
// weights with only global layers (period 1) until the prompt outgrows the window.
TEST(GemmaForward, WindowIsWhatMakesALayerLocal) {
  TinyGemma t;
  t.layers = 3;
  t.head_dim = 32;
  t.rope_theta_swa = t.rope_theta;
  t.window = 40;
  t.period = 1;
  auto global = load_model(write_tiny_gemma(t, "gemma_global.gguf"));
  t.period = 1000;
  auto sliding = load_model(write_tiny_gemma(t, "gemma_sliding.gguf"));
  EXPECT_EQ(global->config().global_layers(), 3);
  EXPECT_EQ(sliding->config().global_layers(), 0);
  auto logits = [](model::Model& m, int64_t n) {
    ForwardOptions o;
    for (int64_t i = 0; i < n; ++i) o.logits_at.push_back(i);
    return m.forward(some_tokens(n, 211), o).logits;
  };
  check_close("window 40 >= N 40: sliding == global", logits(*sliding, 40), logits(*global, 40), 1e-5, 1e-5);
  const auto a = logits(*sliding, 61), b = logits(*global, 61);
  const size_t V = 211;
  // Rows before the window is full agree; the last rows (past position 40) do not.
  check_close("rows 0..39", std::vector<float>(a.begin(), a.begin() + 40 * V), std::vector<float>(b.begin(), b.begin() + 40 * V),
              1e-5, 1e-5);
  double diff = 0;
  for (size_t i = 41 * V; i < a.size(); ++i) diff = std::max(diff, double(std::abs(a[i] - b[i])));
  EXPECT_GT(diff, 1e-4);
  // Greedy decoding past the window through the cache equals the prefill's argmax.
  const auto prompt = some_tokens(45, 211);
  const auto gen = sliding->generate(prompt, 3);
  ASSERT_EQ(gen.size(), 3u);
  std::vector<int32_t> all = prompt;
  all.push_back(gen[0]);
  all.push_back(gen[1]);
  ForwardOptions o;
  o.logits_at = {static_cast<int64_t>(all.size()) - 1};
  const auto r = sliding->forward(all, o);
  EXPECT_EQ(std::max_element(r.logits.begin(), r.logits.end()) - r.logits.begin(), gen[2]);
}

TEST(GemmaForward, ConfigErrorsAreOneLine) {
  auto msg = [](const TinyGemma& t, const std::string& name) {
    const std::string p = write_tiny_gemma(t, name);
    try {
      load_model(p);
    } catch (const Error& e) {
      const std::string w = e.what();
      EXPECT_EQ(w.find('\n'), std::string::npos) << w;
      EXPECT_EQ(w.rfind("gguf " + p + ": ", 0), 0u) << w;
      return w;
    }
    return std::string("accepted");
  };
  TinyGemma t;
  EXPECT_EQ(msg(t, "g_ok.gguf"), "accepted");
  t.drop = {"gemma3.attention.sliding_window"};
  EXPECT_NE(msg(t, "g_nowin.gguf").find("'gemma3.attention.sliding_window' is missing"), std::string::npos);
  t.drop = {"gemma3.attention.key_length"};
  EXPECT_NE(msg(t, "g_nokl.gguf").find("'gemma3.attention.key_length' is missing"), std::string::npos);
  t.drop = {};
  t.window = 0;
  EXPECT_NE(msg(t, "g_win0.gguf").find("sliding_window' = 0 must be in [1, 2^30]"), std::string::npos);
  t.window = 37;
  t.period = 0;
  EXPECT_NE(msg(t, "g_p0.gguf").find("sliding_window_pattern' = 0 must be >= 1"), std::string::npos);
  t.period = 2;
  t.attn_softcap = 50;
  EXPECT_NE(msg(t, "g_cap.gguf").find("attention logit soft-capping is not supported"), std::string::npos);
  // A Gemma file is not a Llama one for the callers that need one.
  t.attn_softcap = 0;
  gguf::File f(write_tiny_gemma(t, "g_ok2.gguf"));
  EXPECT_THROW(model::read_llama_config(f), Error);
  EXPECT_EQ(model::read_model_config(f).layer_window, (std::vector<int>{37, 0, 37, 0}));
}

}  // namespace
}  // namespace proxyattn::test
