// CPU back end of the model runtime: the Llama-family forward in float32 with Eigen GEMMs
// (multithreaded by Eigen's OpenMP) and OpenMP loops for the row-wise parts. Tokens go through
// the projections and the MLP in chunks of kTokenChunk rows, so activation memory is
// O(chunk * (n_ff + heads * d)) plus Q/K/V of one layer; logits are never [n, vocab].
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "model_internal.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/model/gguf.hpp"
#include "proxyattn/model/model.hpp"

namespace proxyattn::model::detail {

namespace {

using MatRM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vec = Eigen::VectorXf;
constexpr int64_t kTokenChunk = 1024;  // rows per projection/MLP chunk
constexpr int64_t kLogitChunk = 256;   // rows per logits chunk (NLL)
constexpr int64_t kDecodeChunk = 256;  // query rows per score buffer when attending to a cache

// Adds the seconds since the last lap (or construction) to a counter.
class Lap {
 public:
  void to(double& acc) {
    const auto now = std::chrono::steady_clock::now();
    acc += std::chrono::duration<double>(now - t_).count();
    t_ = now;
  }

 private:
  std::chrono::steady_clock::time_point t_ = std::chrono::steady_clock::now();
};

struct Layer {
  Vec attn_norm, ffn_norm;
  MatRM wqkv;  // [(Hq + 2 Hkv) d, E], Q/K rows in HF (rotate_half) order
  MatRM wo;    // [E, Hq d]
  MatRM wgu;   // [2 F, E]: gate rows then up rows
  MatRM wd;    // [E, F]
};

class CpuCache final : public KVCache {
 public:
  int64_t length() const override { return n; }
  int64_t n = 0, cap = 0;
  int heads = 0, dim = 0;
  std::vector<std::vector<float>> k, v;  // per layer [heads, cap, dim]

  void grow(int64_t need, int layers) {
    if (k.empty()) {
      k.resize(layers);
      v.resize(layers);
    }
    if (need <= cap) return;
    const int64_t nc = std::max<int64_t>(need, std::max<int64_t>(64, cap * 2));
    for (int l = 0; l < layers; ++l)
      for (auto* buf : {&k[l], &v[l]}) {
        std::vector<float> nb(static_cast<size_t>(heads) * nc * dim);
        for (int h = 0; h < heads; ++h)
          if (n > 0)
            std::memcpy(nb.data() + static_cast<size_t>(h) * nc * dim, buf->data() + static_cast<size_t>(h) * cap * dim,
                        sizeof(float) * n * dim);
        buf->swap(nb);
      }
    cap = nc;
  }
  View3<float> view(std::vector<float>& buf, int64_t tokens) {
    return View3<float>{buf.data(), heads, tokens, dim, cap * dim, dim};
  }
};

// x [rows, E] -> out = x / rms(x) * w, rms in float64.
void rms_norm(const Eigen::Ref<const MatRM>& x, const Vec& w, float eps, MatRM& out) {
  const int64_t n = x.rows(), E = x.cols();
  out.resize(n, E);
#pragma omp parallel for schedule(static) if (n >= 64)
  for (int64_t r = 0; r < n; ++r) {
    double s = 0;
    for (int64_t c = 0; c < E; ++c) s += static_cast<double>(x(r, c)) * x(r, c);
    const float var = static_cast<float>(s / static_cast<double>(E));
    const float inv = 1.0f / std::sqrt(var + eps);
    out.row(r) = (x.row(r) * inv).cwiseProduct(w.transpose());
  }
}

class CpuLlama final : public Model {
 public:
  CpuLlama(const std::string& path, const LoadOptions& opt) : file_(path) {
    cfg_ = read_llama_config(file_);
    if (opt.threads > 0) {
      Eigen::setNbThreads(opt.threads);
      set_cpu_threads(opt.threads);
      omp_set_num_threads(opt.threads);
    }
    const ModelConfig& c = cfg_;
    const int D = c.head_dim;
    embd_ = load("token_embd.weight");
    if (!c.tied_embeddings) out_ = load("output.weight");
    out_norm_ = load_vec("output_norm.weight");
    layers_.resize(c.n_layers);
    for (int i = 0; i < c.n_layers; ++i) {
      const std::string p = "blk." + std::to_string(i) + ".";
      Layer& L = layers_[i];
      L.attn_norm = load_vec(p + "attn_norm.weight");
      L.ffn_norm = load_vec(p + "ffn_norm.weight");
      const int64_t nq = int64_t{c.n_head} * D, nk = int64_t{c.n_head_kv} * D;
      L.wqkv.resize(nq + 2 * nk, c.n_embd);
      load_into(p + "attn_q.weight", L.wqkv.data());
      load_into(p + "attn_k.weight", L.wqkv.data() + nq * c.n_embd);
      load_into(p + "attn_v.weight", L.wqkv.data() + (nq + nk) * c.n_embd);
      unpermute_rope_rows(L.wqkv.data(), c.n_embd, 0, c.n_head, D);
      unpermute_rope_rows(L.wqkv.data(), c.n_embd, nq, c.n_head_kv, D);
      L.wo = load(p + "attn_output.weight");
      L.wgu.resize(2 * int64_t{c.n_ff}, c.n_embd);
      load_into(p + "ffn_gate.weight", L.wgu.data());
      load_into(p + "ffn_up.weight", L.wgu.data() + int64_t{c.n_ff} * c.n_embd);
      L.wd = load(p + "ffn_down.weight");
    }
    std::vector<float> factors;
    if (c.rope_freq_factors) {
      const Vec f = load_vec("rope_freqs.weight");
      factors.assign(f.data(), f.data() + f.size());
    }
    inv_freq_ = rope_inv_freq(c, factors);
  }

  const ModelConfig& config() const override { return cfg_; }
  Backend backend() const override { return Backend::cpu; }
  std::unique_ptr<KVCache> new_cache() const override {
    auto c = std::make_unique<CpuCache>();
    c->heads = cfg_.n_head_kv;
    c->dim = cfg_.head_dim;
    return c;
  }

  ForwardResult forward(std::span<const int32_t> tokens, const ForwardOptions& opt, KVCache* kv) override;

 private:
  MatRM load(const std::string& name) {
    const gguf::TensorInfo& t = file_.tensor(name);
    MatRM m(t.rows(), t.cols());
    load_into(name, m.data());
    return m;
  }
  Vec load_vec(const std::string& name) {
    const gguf::TensorInfo& t = file_.tensor(name);
    Vec v(t.elements);
    load_into(name, v.data());
    return v;
  }
  void load_into(const std::string& name, float* out) { dequantize_tensor(file_, name, out); }

  void attend_cached(ConstView q, ConstView k, ConstView v, int64_t offset, Tensor3& o) const;

  gguf::File file_;
  ModelConfig cfg_;
  MatRM embd_, out_;
  Vec out_norm_;
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;
};

// Queries at positions offset + r attend to keys [0, offset + r] of the cache (dense).
void CpuLlama::attend_cached(ConstView q, ConstView k, ConstView v, int64_t offset, Tensor3& o) const {
  const int64_t Hq = q.heads, N = q.tokens, d = q.dim, r = Hq / k.heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  using RowsMap = Eigen::Map<const MatRM, 0, Eigen::OuterStride<>>;
  // A decoding step is little work: threads would mostly wait for each other.
  const bool parallel = Hq * N * (offset + N) * d >= (int64_t{1} << 22);
#pragma omp parallel for collapse(2) schedule(dynamic, 1) if (parallel)
  for (int64_t h = 0; h < Hq; ++h)
    for (int64_t c0 = 0; c0 < N; c0 += kDecodeChunk) {
      const int64_t n = std::min(kDecodeChunk, N - c0), keys = offset + c0 + n, hk = h / r;
      RowsMap Q(q.row(h, c0), n, d, Eigen::OuterStride<>(q.stride_token));
      RowsMap K(k.row(hk, 0), keys, d, Eigen::OuterStride<>(k.stride_token));
      RowsMap V(v.row(hk, 0), keys, d, Eigen::OuterStride<>(v.stride_token));
      MatRM S = (Q * K.transpose()) * scale;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t last = offset + c0 + i;  // last visible key
        auto row = S.row(i);
        const float m = row.head(last + 1).maxCoeff();
        double l = 0;
        for (int64_t c = 0; c < keys; ++c) {
          const float e = c <= last ? std::exp(row(c) - m) : 0.0f;
          row(c) = e;
          l += e;
        }
        row *= static_cast<float>(1.0 / l);
      }
      MatRM O = S * V;
      for (int64_t i = 0; i < n; ++i) std::memcpy(o.row(h, c0 + i), O.row(i).data(), sizeof(float) * d);
    }
}

ForwardResult CpuLlama::forward(std::span<const int32_t> tokens, const ForwardOptions& opt, KVCache* kv) {
  const ModelConfig& c = cfg_;
  const int64_t N = static_cast<int64_t>(tokens.size()), E = c.n_embd, D = c.head_dim, Hq = c.n_head,
                Hkv = c.n_head_kv, F = c.n_ff, V = c.vocab_size;
  if (N == 0) throw Error("forward: no tokens");
  CpuCache* cache = nullptr;
  if (kv) {
    cache = dynamic_cast<CpuCache*>(kv);
    if (!cache) throw Error("forward: the KV cache belongs to another back end");
  }
  const int64_t offset = cache ? cache->n : 0;
  check_forward_args(c, tokens, opt, offset, cache != nullptr);
  const int last = opt.stop_after_layer >= 0 ? opt.stop_after_layer : c.n_layers - 1;
  if (cache) cache->grow(offset + N, c.n_layers);
  ForwardResult res;
  res.vocab = V;
  Lap lap;

  // Embeddings.
  MatRM x(N, E);
  for (int64_t i = 0; i < N; ++i) x.row(i) = embd_.row(tokens[i]);
  // RoPE tables [N, d/2] for positions offset..offset+N-1 (float32 angles, as capture_qk).
  const int64_t half = D / 2;
  std::vector<float> cosv(static_cast<size_t>(N * half)), sinv(cosv.size());
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < half; ++j) {
      const float ang = static_cast<float>(offset + i) * inv_freq_[j];
      cosv[i * half + j] = static_cast<float>(std::cos(static_cast<double>(ang)));
      sinv[i * half + j] = static_cast<float>(std::sin(static_cast<double>(ang)));
    }

  lap.to(res.timing.embed);
  FullAttention full;
  AttentionPolicy* policy = opt.attention ? opt.attention : &full;
  Tensor3 q(Hq, N, D), k(Hkv, N, D), v(Hkv, N, D);
  MatRM h, proj, act;
  const float eps = static_cast<float>(c.rms_eps);
  const int64_t qkv_cols = (Hq + 2 * Hkv) * D;
  for (int li = 0; li <= last; ++li) {
    const Layer& L = layers_[li];
    for (int64_t c0 = 0; c0 < N; c0 += kTokenChunk) {
      const int64_t n = std::min(kTokenChunk, N - c0);
      rms_norm(x.middleRows(c0, n), L.attn_norm, eps, h);
      proj.resize(n, qkv_cols);
      proj.noalias() = h * L.wqkv.transpose();
#pragma omp parallel for schedule(static) if (n >= 16)
      for (int64_t r = 0; r < n; ++r) {
        const float* cs = cosv.data() + (c0 + r) * half;
        const float* sn = sinv.data() + (c0 + r) * half;
        const float* src = proj.row(r).data();
        auto rope = [&](const float* in, float* out) {
          for (int64_t j = 0; j < half; ++j) {
            const float a = in[j], b = in[j + half];
            out[j] = a * cs[j] + (-b) * sn[j];
            out[j + half] = b * cs[j] + a * sn[j];
          }
        };
        for (int64_t hh = 0; hh < Hq; ++hh) rope(src + hh * D, q.row(hh, c0 + r));
        for (int64_t hh = 0; hh < Hkv; ++hh) rope(src + (Hq + hh) * D, k.row(hh, c0 + r));
        for (int64_t hh = 0; hh < Hkv; ++hh)
          std::memcpy(v.row(hh, c0 + r), src + (Hq + Hkv + hh) * D, sizeof(float) * D);
      }
    }
    lap.to(res.timing.qkv);
    if (opt.on_layer) opt.on_layer(li, q.view(), k.view(), v.view());
    if (li == opt.stop_after_layer) break;
    lap = Lap();

    Tensor3 o;
    if (cache) {
      auto kc = cache->view(cache->k[li], offset + N), vc = cache->view(cache->v[li], offset + N);
      for (int64_t hh = 0; hh < Hkv; ++hh)
        for (int64_t i = 0; i < N; ++i) {
          std::memcpy(kc.row(hh, offset + i), k.row(hh, i), sizeof(float) * D);
          std::memcpy(vc.row(hh, offset + i), v.row(hh, i), sizeof(float) * D);
        }
      if (offset > 0) {
        o = Tensor3(Hq, N, D);
        attend_cached(q.view(), kc, vc, offset, o);
      }
    }
    if (offset == 0) o = policy->attend(li, q.view(), k.view(), v.view());
    if (o.heads() != Hq || o.tokens() != N || o.dim() != D)
      throw Error("layer " + std::to_string(li) + ": attention '" + policy->name() + "' returned shape [" +
                  std::to_string(o.heads()) + ", " + std::to_string(o.tokens()) + ", " + std::to_string(o.dim()) + "]");
    lap.to(res.timing.attention);

    for (int64_t c0 = 0; c0 < N; c0 += kTokenChunk) {
      const int64_t n = std::min(kTokenChunk, N - c0);
      act.resize(n, Hq * D);
#pragma omp parallel for schedule(static) if (n >= 16)
      for (int64_t r = 0; r < n; ++r)
        for (int64_t hh = 0; hh < Hq; ++hh) std::memcpy(act.row(r).data() + hh * D, o.row(hh, c0 + r), sizeof(float) * D);
      x.middleRows(c0, n).noalias() += act * L.wo.transpose();
      rms_norm(x.middleRows(c0, n), L.ffn_norm, eps, h);
      proj.resize(n, 2 * F);
      proj.noalias() = h * L.wgu.transpose();
      act.resize(n, F);
#pragma omp parallel for schedule(static) if (n >= 16)
      for (int64_t r = 0; r < n; ++r) {
        auto g = proj.row(r).head(F).array();
        auto u = proj.row(r).tail(F).array();
        act.row(r) = (g / ((-g).exp() + 1.0f) * u).matrix();
      }
      x.middleRows(c0, n).noalias() += act * L.wd.transpose();
    }
    lap.to(res.timing.mlp);
  }
  if (cache) cache->n = offset + N;
  if (opt.stop_after_layer >= 0) return res;
  const MatRM& lm = c.tied_embeddings ? embd_ : out_;
  if (!opt.logits_at.empty()) {
    MatRM sel(static_cast<int64_t>(opt.logits_at.size()), E), xn;
    for (size_t i = 0; i < opt.logits_at.size(); ++i) sel.row(static_cast<int64_t>(i)) = x.row(opt.logits_at[i]);
    rms_norm(sel, out_norm_, eps, xn);
    MatRM lg = xn * lm.transpose();
    res.logits.assign(lg.data(), lg.data() + lg.size());
  }
  if (opt.nll_begin >= 0 && opt.nll_begin < N - 1) {
    const int64_t b = opt.nll_begin, cnt = N - 1 - b;
    res.nll.resize(cnt);
    MatRM xn, lg;
    for (int64_t c0 = 0; c0 < cnt; c0 += kLogitChunk) {
      const int64_t n = std::min(kLogitChunk, cnt - c0);
      rms_norm(x.middleRows(b + c0, n), out_norm_, eps, xn);
      lg.resize(n, V);
      lg.noalias() = xn * lm.transpose();
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < n; ++r) {
        const float m = lg.row(r).maxCoeff();
        const double l = (lg.row(r).array() - m).exp().template cast<double>().sum();
        const int32_t t = tokens[b + c0 + r + 1];
        res.nll[c0 + r] = static_cast<double>(m) + std::log(l) - static_cast<double>(lg(r, t));
      }
    }
  }
  lap.to(res.timing.logits);
  return res;
}

}  // namespace

std::unique_ptr<Model> load_cpu_llama(const std::string& gguf_path, const LoadOptions& opt) {
  return std::make_unique<CpuLlama>(gguf_path, opt);
}

}  // namespace proxyattn::model::detail
