// The model runtime's CUDA back end against the CPU back end (the spec): the small kernels of
// model_ops.cu and the cuBLAS GEMM against float64 on random odd-sized inputs, then the whole
// forward of a tiny random Llama GGUF written here (per-layer Q/K/V, logits, perplexity, token
// chunks), decoding with the KV cache, block-sparse attention in every layer (device pipeline
// and host masks), random weights, bad input; the same for a tiny random Gemma-3 GGUF (sliding
// window smaller than N, GQA 3, N not a multiple of the block), whose global layers alone take
// the attention policy.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "gpu_test_util.hpp"
#include "model_test_util.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/methods.hpp"
#include "proxyattn/model/model.hpp"
#include "proxyattn/model_config.hpp"

namespace proxyattn::test {
namespace {

namespace kn = proxyattn::kernels;
using model::Backend;
using model::ForwardOptions;

std::vector<float> normal_vec(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = round_to(DType::bf16, nd(rng));
  return v;
}
template <class T>
std::vector<T> download(const kn::DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  EXPECT_EQ(b.download(v.data(), n * sizeof(T)), kn::Status::ok);
  EXPECT_EQ(kn::synchronize(), kn::Status::ok);
  return v;
}
std::vector<float> from_bf16(const std::vector<uint16_t>& b) {
  std::vector<float> v(b.size());
  for (size_t i = 0; i < b.size(); ++i) v[i] = bf16_to_float(b[i]);
  return v;
}
double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::fabs(x)));
  return m;
}
// max |x - ref| / max |ref|.
double rel_max(const std::vector<float>& x, const std::vector<float>& ref) {
  double e = 0;
  for (size_t i = 0; i < x.size(); ++i) e = std::max(e, double(std::fabs(x[i] - ref[i])));
  return e / std::max(1e-30, max_abs(ref));
}

TEST(ModelOps, GemmMatchesFloat64) {
  PROXYATTN_REQUIRE_GPU();
  const int64_t m = 37, n = 29, k = 72;
  const auto x = normal_vec(size_t(m * k), 1), w = normal_vec(size_t(n * k), 2), y0 = normal_vec(size_t(m * n), 3);
  kn::DeviceBuffer dx = upload16(x, DType::bf16), dw = upload16(w, DType::bf16);
  std::vector<double> ref(size_t(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t t = 0; t < k; ++t) s += double(x[i * k + t]) * w[j * k + t];
      ref[i * n + j] = s;
    }
  // f32 output, then accumulate into it (beta = 1), then bf16 output.
  kn::DeviceBuffer dy = upload_raw(y0);
  kn::GemmParams g;
  g.x = dx.data();
  g.w = dw.data();
  g.y = dy.data();
  g.y_type = kn::ElemType::f32;
  g.m = m;
  g.n = n;
  g.k = k;
  g.beta = 1.0f;
  kcheck(kn::gemm(g), "gemm beta 1");
  const auto y = download<float>(dy, size_t(m * n));
  for (size_t i = 0; i < y.size(); ++i) ASSERT_NEAR(y[i], ref[i] + y0[i], 1e-3 * (1 + std::fabs(ref[i]))) << i;
  kn::DeviceBuffer dh;
  kcheck(dh.allocate(size_t(m * n) * 2), "alloc");
  g.y = dh.data();
  g.y_type = kn::ElemType::bf16;
  g.beta = 0.0f;
  kcheck(kn::gemm(g), "gemm bf16");
  const auto yh = from_bf16(download<uint16_t>(dh, size_t(m * n)));
  for (size_t i = 0; i < yh.size(); ++i) ASSERT_NEAR(yh[i], ref[i], 8e-3 * (1 + std::fabs(ref[i]))) << i;
  // beta != 0 into bf16 is refused.
  g.beta = 1.0f;
  EXPECT_EQ(kn::gemm(g), kn::Status::invalid_argument);
}

// A shape large enough for cuBLASLt to offer several algorithms, so the first call tunes: the
// tuning must not accumulate into y (beta = 1 twice gives y0 + 2 ref, exactly once each), and a
// strided y (ldy > n) keeps the columns past n untouched.
TEST(ModelOps, TunedGemmAccumulatesOnceAndKeepsStride) {
  PROXYATTN_REQUIRE_GPU();
  const int64_t m = 301, n = 264, k = 520, ldy = 280;
  const auto x = normal_vec(size_t(m * k), 11), w = normal_vec(size_t(n * k), 12), y0 = normal_vec(size_t(m * ldy), 13);
  kn::DeviceBuffer dx = upload16(x, DType::bf16), dw = upload16(w, DType::bf16), dy = upload_raw(y0);
  const auto xb = from_bf16(download<uint16_t>(dx, x.size())), wb = from_bf16(download<uint16_t>(dw, w.size()));
  kn::GemmParams g;
  g.x = dx.data();
  g.w = dw.data();
  g.y = dy.data();
  g.y_type = kn::ElemType::f32;
  g.m = m;
  g.n = n;
  g.k = k;
  g.ldy = ldy;
  g.beta = 1.0f;
  kcheck(kn::gemm(g), "gemm tuned 1");
  kcheck(kn::gemm(g), "gemm tuned 2");
  const auto y = download<float>(dy, size_t(m * ldy));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < ldy; ++j) {
      const size_t o = size_t(i * ldy + j);
      if (j >= n) {
        ASSERT_EQ(y[o], y0[o]) << "column past n written: " << i << "," << j;
        continue;
      }
      double s = 0;
      for (int64_t t = 0; t < k; ++t) s += double(xb[size_t(i * k + t)]) * wb[size_t(j * k + t)];
      ASSERT_NEAR(y[o], y0[o] + 2 * s, 1e-3 * (1 + std::fabs(s))) << i << "," << j;
    }
}

// E, d and ff pick the launchers' paths: multiples of 4 / 4 / 8 take the vectorised kernels, the
// others the scalar ones; both must match float64.
void check_norm_rope_activation(int64_t E, int d, int64_t ff) {
  const int64_t rows = 45;
  const auto x = normal_vec(size_t(rows * E), 11, 3.0f), w = normal_vec(size_t(E), 12);
  kn::DeviceBuffer dx = upload_raw(x), dw = upload_raw(w), dn;
  kcheck(dn.allocate(size_t(rows * E) * 2), "alloc");
  kcheck(kn::rms_norm_rows(dx.as<float>(), dw.as<float>(), dn.data(), rows, E, 1e-5f), "rms_norm_rows");
  const auto nrm = from_bf16(download<uint16_t>(dn, size_t(rows * E)));
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0;
    for (int64_t c = 0; c < E; ++c) s += double(x[r * E + c]) * x[r * E + c];
    const double inv = 1.0 / std::sqrt(s / E + 1e-5);
    for (int64_t c = 0; c < E; ++c) ASSERT_NEAR(nrm[r * E + c], x[r * E + c] * inv * w[c], 1e-2 * (1 + std::fabs(x[r * E + c] * inv * w[c])));
  }

  // rope_split: Hq 3, Hkv 1 (GQA), with bias, into rows from row0 of wider buffers.
  const int hq = 3, hkv = 1, half = d / 2;
  const int64_t n = 19, row0 = 5, cap = 31, width = (hq + 2 * hkv) * d;
  const auto qkv = normal_vec(size_t(n * width), 13), bias = normal_vec(size_t(width), 14, 0.1f);
  std::vector<float> inv(half);
  for (int j = 0; j < half; ++j) inv[j] = float(1.0 / std::pow(10000.0, 2.0 * j / d));
  kn::DeviceBuffer dq = upload16(qkv, DType::bf16), db = upload_raw(bias), di = upload_raw(inv), dc, ds, oq, ok, ov;
  kcheck(dc.allocate(size_t(n * half) * 4), "alloc");
  kcheck(ds.allocate(size_t(n * half) * 4), "alloc");
  kcheck(kn::rope_table(di.as<float>(), half, row0, n, dc.as<float>(), ds.as<float>()), "rope_table");
  for (auto* b : {&oq, &ok, &ov}) kcheck(b->allocate(size_t(hq * cap * d) * 2), "alloc");
  kn::RopeSplitParams rp;
  rp.qkv = dq.data();
  rp.bias = db.as<float>();
  rp.cos = dc.as<float>();
  rp.sin = ds.as<float>();
  rp.q = oq.data();
  rp.k = ok.data();
  rp.v = ov.data();
  rp.q_heads = hq;
  rp.kv_heads = hkv;
  rp.head_dim = d;
  rp.rows = n;
  rp.row0 = row0;
  rp.q_head_stride = rp.kv_head_stride = cap * d;
  kcheck(kn::rope_split(rp), "rope_split");
  const auto q = from_bf16(download<uint16_t>(oq, size_t(hq * cap * d)));
  const auto k = from_bf16(download<uint16_t>(ok, size_t(hq * cap * d)));
  const auto v = from_bf16(download<uint16_t>(ov, size_t(hq * cap * d)));
  for (int h = 0; h < hq + 2 * hkv; ++h)
    for (int64_t r = 0; r < n; ++r)
      for (int j = 0; j < half; ++j) {
        const double a = qkv[r * width + h * d + j] + bias[h * d + j];
        const double b = qkv[r * width + h * d + j + half] + bias[h * d + j + half];
        const double ang = double(float(row0 + r) * inv[j]);
        const bool rot = h < hq + hkv;
        const double o1 = rot ? a * std::cos(ang) - b * std::sin(ang) : a;
        const double o2 = rot ? b * std::cos(ang) + a * std::sin(ang) : b;
        const std::vector<float>& out = h < hq ? q : (h < hq + hkv ? k : v);
        const int hh = h < hq ? h : (h < hq + hkv ? h - hq : h - hq - hkv);
        const size_t at = size_t(hh) * cap * d + size_t(row0 + r) * d;
        ASSERT_NEAR(out[at + j], o1, 1e-2 * (1 + std::fabs(o1))) << h << " " << r << " " << j;
        ASSERT_NEAR(out[at + j + half], o2, 1e-2 * (1 + std::fabs(o2))) << h << " " << r << " " << j;
      }

  // heads_to_rows of rows [row0, row0 + n) of q (16-byte vectors: d a multiple of 8), and silu_mul.
  if (d % 8 == 0) {
    kn::DeviceBuffer dr;
    kcheck(dr.allocate(size_t(n * hq * d) * 2), "alloc");
    kcheck(kn::heads_to_rows(oq.data(), dr.data(), hq, n, d, cap * d, row0), "heads_to_rows");
    const auto rws = from_bf16(download<uint16_t>(dr, size_t(n * hq * d)));
    for (int64_t r = 0; r < n; ++r)
      for (int h = 0; h < hq; ++h)
        for (int c = 0; c < d; ++c) ASSERT_EQ(rws[(r * hq + h) * d + c], q[size_t(h) * cap * d + (row0 + r) * d + c]);
  }
  const auto gu = normal_vec(size_t(n * 2 * ff), 15, 2.0f);
  kn::DeviceBuffer dg = upload16(gu, DType::bf16), da;
  kcheck(da.allocate(size_t(n * ff) * 2), "alloc");
  kcheck(kn::silu_mul(dg.data(), da.data(), n, ff), "silu_mul");
  const auto act = from_bf16(download<uint16_t>(da, size_t(n * ff)));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < ff; ++c) {
      const double g = gu[r * 2 * ff + c], u = gu[r * 2 * ff + ff + c], want = g / (1 + std::exp(-g)) * u;
      ASSERT_NEAR(act[r * ff + c], want, 1e-2 * (1 + std::fabs(want)));
    }
}

TEST(ModelOps, NormRopeActivationRowsMatchFloat64) {
  PROXYATTN_REQUIRE_GPU();
  {
    SCOPED_TRACE("scalar paths: E 83, d 6, ff 37");
    check_norm_rope_activation(83, 6, 37);
  }
  {
    SCOPED_TRACE("vector paths: E 84, d 64, ff 40");
    check_norm_rope_activation(84, 64, 40);
  }
}

TEST(ModelOps, LogitsRowsNllAndArgmax) {
  PROXYATTN_REQUIRE_GPU();
  const int64_t rows = 7, vocab = 1237;
  auto lg = normal_vec(size_t(rows * vocab), 21, 4.0f);
  lg[3 * vocab + 100] = lg[3 * vocab + 900] = 50.0f;  // a tie: the first maximum wins
  std::vector<int32_t> target(rows);
  for (int64_t r = 0; r < rows; ++r) target[r] = int32_t((r * 311) % vocab);
  kn::DeviceBuffer dl = upload_raw(lg), dt = upload_raw(target), dn, da;
  kcheck(dn.allocate(size_t(rows) * 8), "alloc");
  kcheck(da.allocate(size_t(rows) * 4), "alloc");
  kcheck(kn::logits_rows(dl.as<float>(), rows, vocab, dt.as<int32_t>(), dn.as<double>(), da.as<int32_t>()), "logits_rows");
  const auto nll = download<double>(dn, rows);
  const auto arg = download<int32_t>(da, rows);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = lg.data() + r * vocab;
    const int64_t am = std::max_element(row, row + vocab) - row;
    double m = row[am], s = 0;
    for (int64_t c = 0; c < vocab; ++c) s += std::exp(double(row[c]) - m);
    EXPECT_EQ(arg[r], am);
    EXPECT_NEAR(nll[r], m + std::log(s) - row[target[r]], 1e-4 * (1 + std::fabs(nll[r])));
  }
  EXPECT_EQ(arg[3], 100);
}

// Gemma-3's kernels: GeGLU, the embedding scale, per-head q/k RMSNorm on the fused projection,
// the sandwich norm added into the residual, logit soft-capping.
TEST(ModelOps, GemmaOpsMatchFloat64) {
  PROXYATTN_REQUIRE_GPU();
  const int64_t n = 23, ff = 41;
  const auto gu = normal_vec(size_t(n * 2 * ff), 31, 2.0f);
  kn::DeviceBuffer dg = upload16(gu, DType::bf16), da;
  kcheck(da.allocate(size_t(n * ff) * 2), "alloc");
  kcheck(kn::gelu_mul(dg.data(), da.data(), n, ff), "gelu_mul");
  const auto act = from_bf16(download<uint16_t>(da, size_t(n * ff)));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < ff; ++c) {
      const double g = gu[r * 2 * ff + c], u = gu[r * 2 * ff + ff + c];
      const double want = 0.5 * g * (1 + std::tanh(std::sqrt(2 / std::numbers::pi) * (g + 0.044715 * g * g * g))) * u;
      ASSERT_NEAR(act[r * ff + c], want, 1e-2 * (1 + std::fabs(want))) << r << " " << c;
    }

  auto x = normal_vec(size_t(n * 37), 32);
  kn::DeviceBuffer dx = upload_raw(x);
  kcheck(kn::scale_f32(dx.as<float>(), n * 37, 25.3f), "scale_f32");
  const auto xs = download<float>(dx, size_t(n * 37));
  for (size_t i = 0; i < xs.size(); ++i) ASSERT_EQ(xs[i], x[i] * 25.3f) << i;

  // head_rms_norm: Hq 3, Hkv 1, d 64; q and k heads normed in place, v untouched.
  const int hq = 3, hkv = 1, d = 64;
  const int64_t width = (hq + 2 * hkv) * d;
  const auto qkv = normal_vec(size_t(n * width), 33, 3.0f), wq = normal_vec(d, 34), wk = normal_vec(d, 35);
  kn::DeviceBuffer dq = upload16(qkv, DType::bf16), dwq = upload_raw(wq), dwk = upload_raw(wk);
  kn::HeadNormParams hp;
  hp.qkv = dq.data();
  hp.q_weight = dwq.as<float>();
  hp.k_weight = dwk.as<float>();
  hp.q_heads = hq;
  hp.kv_heads = hkv;
  hp.head_dim = d;
  hp.rows = n;
  hp.eps = 1e-6f;
  kcheck(kn::head_rms_norm(hp), "head_rms_norm");
  const auto nq = from_bf16(download<uint16_t>(dq, size_t(n * width)));
  for (int64_t r = 0; r < n; ++r)
    for (int h = 0; h < hq + 2 * hkv; ++h) {
      const float* in = qkv.data() + r * width + h * d;
      double s = 0;
      for (int c = 0; c < d; ++c) s += double(in[c]) * in[c];
      const double inv = 1.0 / std::sqrt(s / d + 1e-6);
      for (int c = 0; c < d; ++c) {
        const double want = h < hq ? in[c] * inv * wq[c] : (h < hq + hkv ? in[c] * inv * wk[c] : in[c]);
        ASSERT_NEAR(nq[r * width + h * d + c], want, 1e-2 * (1 + std::fabs(want))) << r << " " << h << " " << c;
      }
    }

  // rms_norm_add_rows: x += rms_norm(y) * w over E = 83.
  const int64_t E = 83;
  const auto y = normal_vec(size_t(n * E), 36, 5.0f), w = normal_vec(size_t(E), 37), x0 = normal_vec(size_t(n * E), 38);
  kn::DeviceBuffer dy = upload_raw(y), dw = upload_raw(w), dx0 = upload_raw(x0);
  kcheck(kn::rms_norm_add_rows(dy.as<float>(), dw.as<float>(), dx0.as<float>(), n, E, 1e-6f), "rms_norm_add_rows");
  const auto xa = download<float>(dx0, size_t(n * E));
  for (int64_t r = 0; r < n; ++r) {
    double s = 0;
    for (int64_t c = 0; c < E; ++c) s += double(y[r * E + c]) * y[r * E + c];
    const double inv = 1.0 / std::sqrt(s / E + 1e-6);
    for (int64_t c = 0; c < E; ++c) {
      const double want = x0[r * E + c] + y[r * E + c] * inv * w[c];
      ASSERT_NEAR(xa[r * E + c], want, 1e-5 * (1 + std::fabs(want))) << r << " " << c;
    }
  }

  auto z = normal_vec(1001, 39, 20.0f);
  kn::DeviceBuffer dz = upload_raw(z);
  kcheck(kn::softcap(dz.as<float>(), 1001, 15.0f), "softcap");
  const auto zc = download<float>(dz, 1001);
  for (size_t i = 0; i < zc.size(); ++i) ASSERT_NEAR(zc[i], 15.0 * std::tanh(z[i] / 15.0), 1e-5) << i;
  EXPECT_NE(kn::softcap(dz.as<float>(), 1001, 0.0f), kn::Status::ok);
}

// ---- the whole model ---------------------------------------------------------------------------

struct Pair {
  std::unique_ptr<model::Model> cpu, gpu;
};
Pair load_pair(const std::string& path, int64_t chunk = 0) {
  model::LoadOptions lc, lg;
  lg.backend = Backend::cuda;
  lg.token_chunk = chunk;
  return {model::load_model(path, lc), model::load_model(path, lg)};
}
std::vector<int32_t> random_tokens(int64_t n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = int32_t(rng() % uint64_t(vocab));
  return t;
}
std::vector<float> flat(ConstView v) {
  std::vector<float> out;
  for (int64_t h = 0; h < v.heads; ++h)
    for (int64_t t = 0; t < v.tokens; ++t) out.insert(out.end(), v.row(h, t), v.row(h, t) + v.dim);
  return out;
}

TEST(ModelCuda, ForwardMatchesCpuBackEnd) {
  PROXYATTN_REQUIRE_GPU();
  const TinyLlama t;
  // Chunks of 256 rows over 700 tokens: 256 + 256 + 188.
  Pair p = load_pair(write_tiny_llama(t, "tiny_cuda.gguf"), 256);
  EXPECT_EQ(p.gpu->backend(), Backend::cuda);
  const auto toks = random_tokens(700, t.vocab, 3);
  std::vector<std::vector<float>> ref_qkv[3];
  ForwardOptions o;
  o.logits_at = {0, 255, 256, 699};
  o.nll_begin = 0;
  o.on_layer = [&](int l, ConstView q, ConstView k, ConstView v) {
    ref_qkv[0].push_back(flat(q));
    ref_qkv[1].push_back(flat(k));
    ref_qkv[2].push_back(flat(v));
  };
  const auto rc = p.cpu->forward(toks, o);
  int layer_seen = 0;
  o.on_layer = [&](int l, ConstView q, ConstView k, ConstView v) {
    ASSERT_EQ(l, layer_seen++);
    // bf16 weights and activations against float32: about 1e-2 of the tensor's scale.
    EXPECT_LT(rel_max(flat(q), ref_qkv[0][l]), 3e-2) << "q layer " << l;
    EXPECT_LT(rel_max(flat(k), ref_qkv[1][l]), 3e-2) << "k layer " << l;
    EXPECT_LT(rel_max(flat(v), ref_qkv[2][l]), 3e-2) << "v layer " << l;
  };
  const auto rg = p.gpu->forward(toks, o);
  EXPECT_EQ(layer_seen, t.layers);
  ASSERT_EQ(rg.logits.size(), rc.logits.size());
  EXPECT_LT(rel_max(rg.logits, rc.logits), 5e-2);
  ASSERT_EQ(rg.nll.size(), rc.nll.size());
  double sc = 0, sg = 0;
  for (size_t i = 0; i < rc.nll.size(); ++i) {
    sc += rc.nll[i];
    sg += rg.nll[i];
  }
  EXPECT_NEAR(std::exp(sg / rg.nll.size()) / std::exp(sc / rc.nll.size()), 1.0, 1e-2);
  // The stage clock covers the forward: its stages add up to the total, with the on_layer
  // downloads as host time; without a hook there is next to none.
  auto stage_sum = [](const model::DeviceStages& st) {
    return st.linear_ms + st.elementwise_ms + st.attention_ms + st.estimation_ms + st.logits_ms + st.host_ms;
  };
  const auto& st = rg.device;
  EXPECT_GT(st.total_ms, 0);
  EXPECT_GT(st.linear_ms, 0);
  EXPECT_GT(st.attention_ms, 0);
  EXPECT_GT(st.host_ms, 0);
  EXPECT_NEAR(stage_sum(st), st.total_ms, 1e-3 * st.total_ms + 0.05);
  ForwardOptions plain;
  plain.logits_at = {699};
  const auto rp = p.gpu->forward(toks, plain);
  EXPECT_NEAR(stage_sum(rp.device), rp.device.total_ms, 1e-3 * rp.device.total_ms + 0.05);
  EXPECT_LT(rp.device.host_ms, 0.2 * rp.device.total_ms);
  const double E = t.embd, F = t.ff, W = (t.heads + 2 * t.kv_heads) * t.head_dim;
  EXPECT_DOUBLE_EQ(st.linear_flops, t.layers * 2.0 * 700 * (W * E + t.heads * t.head_dim * E + 3 * F * E));
}

// Greedy decoding of 6 tokens through the GPU's KV cache: each new token is the argmax of the
// prefill of everything before it (up to near ties: then the two logits must be within the
// bf16 noise), and the CPU back end decodes the same first token.
void expect_decoding_matches_prefill(Pair& p, const std::vector<int32_t>& prompt) {
  const auto out = p.gpu->generate(prompt, 6);
  ASSERT_EQ(out.size(), 6u);
  std::vector<int32_t> all = prompt;
  for (int32_t tok : out) {
    ForwardOptions o;
    o.logits_at = {int64_t(all.size()) - 1};
    const auto r = p.gpu->forward(all, o);
    const auto row = r.logits_row(0);
    const float best = *std::max_element(row.begin(), row.end());
    EXPECT_LE(best - row[tok], 2e-2 * (1 + std::fabs(best))) << "token " << all.size();
    all.push_back(tok);
  }
  EXPECT_EQ(p.cpu->generate(prompt, 1).front(), out.front());
}

TEST(ModelCuda, DecodingWithTheCacheMatchesPrefill) {
  PROXYATTN_REQUIRE_GPU();
  const TinyLlama t;
  Pair p = load_pair(write_tiny_llama(t, "tiny_cuda_decode.gguf"));
  expect_decoding_matches_prefill(p, random_tokens(300, t.vocab, 5));
}

TEST(ModelCuda, SparseAttentionInEveryLayer) {
  PROXYATTN_REQUIRE_GPU();
  const TinyLlama t;
  Pair p = load_pair(write_tiny_llama(t, "tiny_cuda_sparse.gguf"));
  const auto toks = random_tokens(700, t.vocab, 9);
  const double full = p.gpu->perplexity(toks);

  // Every causal block kept: the sparse paths must give full attention's result.
  const auto all_blocks = [](int, ConstView q, ConstView) {
    const int64_t nb = (q.tokens + 127) / 128;
    std::vector<int32_t> indptr{0}, idx;
    for (int64_t h = 0; h < q.heads; ++h)
      for (int64_t i = 0; i < nb; ++i) {
        for (int64_t j = 0; j <= i; ++j) idx.push_back(int32_t(j));
        indptr.push_back(int32_t(idx.size()));
      }
    return std::optional<BlockMask>(BlockMask(int(q.heads), q.tokens, 128, indptr, idx));
  };
  model::BlockMaskAttention dense_mask(all_blocks);
  EXPECT_NEAR(p.gpu->perplexity(toks, &dense_mask) / full, 1.0, 1e-4);
  PipelineSpec spec;
  spec.method = &proxyattn_method();
  spec.density = 1.0;
  model::DevicePipelineAttention dense_pipe(spec);
  EXPECT_NEAR(p.gpu->perplexity(toks, &dense_pipe) / full, 1.0, 1e-4);

  // ProxyAttn at density 0.5 from the device pipeline, layer 0 dense.
  spec.density = 0.5;
  model::DevicePipelineAttention half(spec, {0});
  const double ppl = p.gpu->perplexity(toks, &half);
  EXPECT_TRUE(std::isfinite(ppl));
  ASSERT_EQ(half.densities().size(), size_t(t.layers));
  EXPECT_EQ(half.densities()[0].block_density, 1.0);
  for (int l = 1; l < t.layers; ++l) EXPECT_NEAR(half.densities()[l].block_density, 0.5, 0.15) << l;

  // A host mask (the CPU estimators' route) on both back ends: the same masks, so perplexities
  // within the bf16 noise.
  const auto diagonal_and_sink = [](int, ConstView q, ConstView) {
    const int64_t nb = (q.tokens + 127) / 128;
    std::vector<int32_t> indptr{0}, idx;
    for (int64_t h = 0; h < q.heads; ++h)
      for (int64_t i = 0; i < nb; ++i) {
        if (i > 0) idx.push_back(0);
        if (i > 2 && h % 2) idx.push_back(int32_t(i - 2));
        idx.push_back(int32_t(i));
        indptr.push_back(int32_t(idx.size()));
      }
    return std::optional<BlockMask>(BlockMask(int(q.heads), q.tokens, 128, indptr, idx));
  };
  model::BlockMaskAttention mc(diagonal_and_sink), mg(diagonal_and_sink);
  const double pc = p.cpu->perplexity(toks, &mc), pg = p.gpu->perplexity(toks, &mg);
  EXPECT_NEAR(pg / pc, 1.0, 1e-2);
  EXPECT_GT(std::fabs(pg / full - 1.0), 1e-3);  // the mask changed the model
  EXPECT_EQ(mg.densities().size(), size_t(t.layers));
}

// ---- Gemma-3 ------------------------------------------------------------------------------------

// Window 37 < N, GQA 3, head dim 64, N = 700 in chunks of 256 (and N = 301: not a multiple of
// the block); two sliding and two global layers with their own RoPE bases.
TEST(ModelCuda, GemmaForwardMatchesCpuBackEnd) {
  PROXYATTN_REQUIRE_GPU();
  const TinyGemma t;
  Pair p = load_pair(write_tiny_gemma(t, "tiny_gemma_cuda.gguf"), 256);
  ASSERT_EQ(p.gpu->config().layer_window, (std::vector<int>{37, 0, 37, 0}));
  for (int64_t n : {int64_t{700}, int64_t{301}}) {
    const auto toks = random_tokens(n, t.vocab, 13);
    std::vector<std::vector<float>> ref_qkv[3];
    ForwardOptions o;
    o.logits_at = {0, 36, 37, n - 1};
    o.nll_begin = 0;
    o.on_layer = [&](int, ConstView q, ConstView k, ConstView v) {
      ref_qkv[0].push_back(flat(q));
      ref_qkv[1].push_back(flat(k));
      ref_qkv[2].push_back(flat(v));
    };
    const auto rc = p.cpu->forward(toks, o);
    int seen = 0;
    o.on_layer = [&](int l, ConstView q, ConstView k, ConstView v) {
      ASSERT_EQ(l, seen++);
      EXPECT_LT(rel_max(flat(q), ref_qkv[0][l]), 3e-2) << "q layer " << l << " n " << n;
      EXPECT_LT(rel_max(flat(k), ref_qkv[1][l]), 3e-2) << "k layer " << l << " n " << n;
      EXPECT_LT(rel_max(flat(v), ref_qkv[2][l]), 3e-2) << "v layer " << l << " n " << n;
    };
    const auto rg = p.gpu->forward(toks, o);
    EXPECT_EQ(seen, t.layers);
    ASSERT_EQ(rg.logits.size(), rc.logits.size());
    EXPECT_LT(rel_max(rg.logits, rc.logits), 5e-2) << "n " << n;
    ASSERT_EQ(rg.nll.size(), rc.nll.size());
    double sc = 0, sg = 0;
    for (size_t i = 0; i < rc.nll.size(); ++i) {
      sc += rc.nll[i];
      sg += rg.nll[i];
    }
    EXPECT_NEAR(std::exp(sg / rg.nll.size()) / std::exp(sc / rc.nll.size()), 1.0, 1e-2) << "n " << n;
  }
  // The window matters: the same weights with every layer global give other logits.
  TinyGemma g = t;
  g.period = 1;
  Pair pg = load_pair(write_tiny_gemma(g, "tiny_gemma_cuda_global.gguf"));
  const auto toks = random_tokens(300, t.vocab, 14);
  ForwardOptions o;
  o.logits_at = {299};
  EXPECT_GT(rel_max(p.gpu->forward(toks, o).logits, pg.gpu->forward(toks, o).logits), 5e-2);
}

// Decoding through the cache past the window: each token is the argmax of the prefill of
// everything before it (within bf16 noise), the CPU back end decodes the same first token.
TEST(ModelCuda, GemmaDecodingWithTheCacheMatchesPrefill) {
  PROXYATTN_REQUIRE_GPU();
  const TinyGemma t;
  Pair p = load_pair(write_tiny_gemma(t, "tiny_gemma_cuda_decode.gguf"));
  expect_decoding_matches_prefill(p, random_tokens(203, t.vocab, 15));
}

// The policies run the global layers (1, 3) only; the sliding ones are reported windowed.
TEST(ModelCuda, GemmaSparseAttentionOnGlobalLayers) {
  PROXYATTN_REQUIRE_GPU();
  const TinyGemma t;
  Pair p = load_pair(write_tiny_gemma(t, "tiny_gemma_cuda_sparse.gguf"));
  const auto toks = random_tokens(700, t.vocab, 16);
  const double full = p.gpu->perplexity(toks);
  std::vector<int> asked;
  model::BlockMaskAttention all_causal([&](int layer, ConstView q, ConstView) -> std::optional<BlockMask> {
    asked.push_back(layer);
    return BlockMask::causal(int(q.heads), q.tokens, 128);
  });
  EXPECT_NEAR(p.gpu->perplexity(toks, &all_causal) / full, 1.0, 1e-4);
  EXPECT_EQ(asked, (std::vector<int>{1, 3}));
  ASSERT_EQ(all_causal.densities().size(), 4u);
  for (const auto& d : all_causal.densities()) {
    EXPECT_EQ(d.windowed(), d.layer % 2 == 0) << d.layer;
    if (d.windowed()) EXPECT_DOUBLE_EQ(d.element_density, model::window_element_density(700, 37));
  }

  PipelineSpec spec;
  spec.method = &proxyattn_method();
  spec.density = 1.0;
  model::DevicePipelineAttention dense_pipe(spec);
  EXPECT_NEAR(p.gpu->perplexity(toks, &dense_pipe) / full, 1.0, 1e-4);
  spec.density = 0.5;
  model::DevicePipelineAttention half(spec);
  const double ppl = p.gpu->perplexity(toks, &half);
  EXPECT_TRUE(std::isfinite(ppl));
  ASSERT_EQ(half.densities().size(), size_t(t.layers));
  for (const auto& d : half.densities()) {
    EXPECT_EQ(d.windowed(), d.layer % 2 == 0) << d.layer;
    if (!d.windowed()) EXPECT_NEAR(d.block_density, 0.5, 0.15) << d.layer;
  }

  // A host mask on both back ends: the same masks, perplexities within the bf16 noise.
  const auto diagonal_and_sink = [](int, ConstView q, ConstView) {
    const int64_t nb = (q.tokens + 127) / 128;
    std::vector<int32_t> indptr{0}, idx;
    for (int64_t h = 0; h < q.heads; ++h)
      for (int64_t i = 0; i < nb; ++i) {
        if (i > 0) idx.push_back(0);
        idx.push_back(int32_t(i));
        indptr.push_back(int32_t(idx.size()));
      }
    return std::optional<BlockMask>(BlockMask(int(q.heads), q.tokens, 128, indptr, idx));
  };
  model::BlockMaskAttention mc(diagonal_and_sink), mg(diagonal_and_sink);
  const double pc = p.cpu->perplexity(toks, &mc), pg = p.gpu->perplexity(toks, &mg);
  EXPECT_NEAR(pg / pc, 1.0, 1e-2);
  EXPECT_GT(std::fabs(pg / full - 1.0), 1e-3);
}

TEST(ModelCuda, RandomWeightsAreSeeded) {
  PROXYATTN_REQUIRE_GPU();
  ModelConfig shape;
  shape.name = "tiny-qwen-like";
  shape.num_layers = 2;
  shape.num_q_heads = 4;
  shape.num_kv_heads = 2;
  shape.head_dim = 128;
  shape.rope_theta = 1e6;
  shape.max_context = 8192;
  shape.hidden_size = 256;
  shape.intermediate_size = 352;
  shape.vocab_size = 1000;
  shape.qkv_bias = true;
  model::LoadOptions lo;
  lo.backend = Backend::cuda;
  auto a = model::random_model(shape, 1, lo), b = model::random_model(shape, 1, lo), c = model::random_model(shape, 2, lo);
  const auto toks = random_tokens(333, 1000, 4);
  ForwardOptions o;
  o.logits_at = {332};
  const auto ra = a->forward(toks, o), rb = b->forward(toks, o), rc = c->forward(toks, o);
  EXPECT_EQ(ra.logits, rb.logits);
  EXPECT_NE(ra.logits, rc.logits);
  for (float x : ra.logits) ASSERT_TRUE(std::isfinite(x));
  EXPECT_GT(model::model_weight_bytes(shape), 0);
  // Refused: no whole-model fields, the CPU back end.
  ModelConfig bare = shape;
  bare.hidden_size = 0;
  EXPECT_THROW(model::random_model(bare, 1, lo), Error);
  EXPECT_THROW(model::random_model(shape, 1, {}), Error);
}

TEST(ModelCuda, BadInputIsAnError) {
  PROXYATTN_REQUIRE_GPU();
  const TinyLlama t;
  Pair p = load_pair(write_tiny_llama(t, "tiny_cuda_bad.gguf"));
  const std::vector<int32_t> bad{1, 2, t.vocab};
  EXPECT_THROW(p.gpu->forward(bad, {}), Error);
  auto cpu_cache = p.cpu->new_cache();
  const std::vector<int32_t> ok{1, 2, 3};
  EXPECT_THROW(p.gpu->forward(ok, {}, cpu_cache.get()), Error);
  ForwardOptions o;
  o.logits_at = {3};
  EXPECT_THROW(p.gpu->forward(ok, o), Error);
  // A device-pipeline policy on the CPU back end is refused by name.
  PipelineSpec spec;
  spec.method = &proxyattn_method();
  model::DevicePipelineAttention dp(spec);
  ForwardOptions od;
  od.attention = &dp;
  EXPECT_THROW(p.cpu->forward(ok, od), Error);
}

}  // namespace
}  // namespace proxyattn::test
