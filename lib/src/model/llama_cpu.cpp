// CPU back end of the model runtime: the Llama-family and Gemma-3 forward in float32 with Eigen
// GEMMs (multithreaded by Eigen's OpenMP) and OpenMP loops for the row-wise parts. One forward
// for both: what differs (ModelConfig's Gemma fields) is a branch at each step, never a copy. Tokens go through
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
  Vec q_norm, k_norm;                  // [d] (qk_norm)
  Vec post_attn_norm, post_ffn_norm;   // [E] (sandwich_norm)
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

// x [n, E] in place: x = x / rms(x) * w per row (a view's rows).
void rms_norm_inplace(Eigen::Ref<MatRM> x, const Vec& w, float eps) {
  const int64_t n = x.rows(), E = x.cols();
#pragma omp parallel for schedule(static) if (n >= 64)
  for (int64_t r = 0; r < n; ++r) {
    double s = 0;
    for (int64_t c = 0; c < E; ++c) s += static_cast<double>(x(r, c)) * x(r, c);
    const float inv = 1.0f / std::sqrt(static_cast<float>(s / static_cast<double>(E)) + eps);
    x.row(r) = (x.row(r) * inv).cwiseProduct(w.transpose());
  }
}

// One head's d values in place: RMSNorm with weight w (Gemma-3's per-head q/k norm).
void head_norm(float* x, const Vec& w, int64_t d, float eps) {
  double s = 0;
  for (int64_t c = 0; c < d; ++c) s += static_cast<double>(x[c]) * x[c];
  const float inv = 1.0f / std::sqrt(static_cast<float>(s / static_cast<double>(d)) + eps);
  for (int64_t c = 0; c < d; ++c) x[c] = x[c] * inv * w[c];
}

// In place, the operation order of capture_qk.gelu_tanh_ (float32):
// g * 0.5 (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
inline float gelu_tanh(float g) {
  float t = g * g;
  t *= 0.044715f;
  t += 1.0f;
  t *= g;
  t *= static_cast<float>(0.79788456080286535588);  // sqrt(2/pi)
  t = std::tanh(t);
  t += 1.0f;
  t *= 0.5f;
  return g * t;
}

// logits = c tanh(logits / c) (final logit soft-capping), c > 0.
void softcap_inplace(float* z, int64_t n, float cap) {
  for (int64_t i = 0; i < n; ++i) z[i] = std::tanh(z[i] / cap) * cap;
}

class CpuModel final : public Model {
 public:
  CpuModel(const std::string& path, const LoadOptions& opt) : file_(path) {
    cfg_ = read_model_config(file_);
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
      if (c.rope_permuted) {
        unpermute_rope_rows(L.wqkv.data(), c.n_embd, 0, c.n_head, D);
        unpermute_rope_rows(L.wqkv.data(), c.n_embd, nq, c.n_head_kv, D);
      }
      if (c.qk_norm) {
        L.q_norm = load_vec(p + "attn_q_norm.weight");
        L.k_norm = load_vec(p + "attn_k_norm.weight");
      }
      if (c.sandwich_norm) {
        L.post_attn_norm = load_vec(p + "post_attention_norm.weight");
        L.post_ffn_norm = load_vec(p + "post_ffw_norm.weight");
      }
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
    inv_freq_local_ = rope_inv_freq_local(c);
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

  void attend_cached(ConstView q, ConstView k, ConstView v, int64_t offset, int64_t window, Tensor3& o) const;

  gguf::File file_;
  ModelConfig cfg_;
  MatRM embd_, out_;
  Vec out_norm_;
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_, inv_freq_local_;  // global and sliding layers' RoPE
};

// Queries at positions offset + r attend to keys [0, offset + r] of the cache (dense), or with
// window W > 0 to keys (offset + r - W, offset + r].
void CpuModel::attend_cached(ConstView q, ConstView k, ConstView v, int64_t offset, int64_t window, Tensor3& o) const {
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
        const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
        auto row = S.row(i);
        const float m = row.segment(first, last + 1 - first).maxCoeff();
        double l = 0;
        for (int64_t c = 0; c < keys; ++c) {
          const float e = c <= last && c >= first ? std::exp(row(c) - m) : 0.0f;
          row(c) = e;
          l += e;
        }
        row *= static_cast<float>(1.0 / l);
      }
      MatRM O = S * V;
      for (int64_t i = 0; i < n; ++i) std::memcpy(o.row(h, c0 + i), O.row(i).data(), sizeof(float) * d);
    }
}

ForwardResult CpuModel::forward(std::span<const int32_t> tokens, const ForwardOptions& opt, KVCache* kv) {
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

  // Embeddings (Gemma: times sqrt(n_embd), rounded to float32 as capture_qk.embed).
  MatRM x(N, E);
  const float emb_scale = static_cast<float>(c.embed_scale);
  for (int64_t i = 0; i < N; ++i) x.row(i) = embd_.row(tokens[i]);
  if (emb_scale != 1.0f) x *= emb_scale;
  // RoPE tables [N, d/2] for positions offset..offset+N-1 (float32 angles, as capture_qk): the
  // global layers' and, for a model with sliding layers, theirs.
  const int64_t half = D / 2;
  struct Rope {
    std::vector<float> cos, sin;
  };
  auto rope_table = [&](const std::vector<float>& inv) {
    Rope r{std::vector<float>(static_cast<size_t>(N * half)), std::vector<float>(static_cast<size_t>(N * half))};
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < half; ++j) {
        const float ang = static_cast<float>(offset + i) * inv[j];
        r.cos[i * half + j] = static_cast<float>(std::cos(static_cast<double>(ang)));
        r.sin[i * half + j] = static_cast<float>(std::sin(static_cast<double>(ang)));
      }
    return r;
  };
  const Rope rope_global = rope_table(inv_freq_);
  const Rope rope_local = c.global_layers() < c.n_layers ? rope_table(inv_freq_local_) : Rope{};

  lap.to(res.timing.embed);
  FullAttention full;
  AttentionPolicy* policy = opt.attention ? opt.attention : &full;
  Tensor3 q(Hq, N, D), k(Hkv, N, D), v(Hkv, N, D);
  MatRM h, proj, act, out;
  const float eps = static_cast<float>(c.rms_eps);
  const int64_t qkv_cols = (Hq + 2 * Hkv) * D;
  // The attention kernels scale by 1/sqrt(d): another model scale is folded into the q they get.
  const float q_fold = static_cast<float>(c.scale() * std::sqrt(static_cast<double>(D)));
  for (int li = 0; li <= last; ++li) {
    const Layer& L = layers_[li];
    const int64_t window = c.window(li);
    const Rope& rp = window > 0 ? rope_local : rope_global;
    for (int64_t c0 = 0; c0 < N; c0 += kTokenChunk) {
      const int64_t n = std::min(kTokenChunk, N - c0);
      rms_norm(x.middleRows(c0, n), L.attn_norm, eps, h);
      proj.resize(n, qkv_cols);
      proj.noalias() = h * L.wqkv.transpose();
#pragma omp parallel for schedule(static) if (n >= 16)
      for (int64_t r = 0; r < n; ++r) {
        const float* cs = rp.cos.data() + (c0 + r) * half;
        const float* sn = rp.sin.data() + (c0 + r) * half;
        float* src = proj.row(r).data();
        if (c.qk_norm) {  // per-head RMSNorm of q and k, before RoPE
          for (int64_t hh = 0; hh < Hq; ++hh) head_norm(src + hh * D, L.q_norm, D, eps);
          for (int64_t hh = 0; hh < Hkv; ++hh) head_norm(src + (Hq + hh) * D, L.k_norm, D, eps);
        }
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

    if (q_fold != 1.0f) {
      float* p = q.data();
      for (int64_t i = 0, e = q.size(); i < e; ++i) p[i] *= q_fold;
    }
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
        attend_cached(q.view(), kc, vc, offset, window, o);
      }
    }
    if (offset == 0) {
      if (window > 0) {  // a local layer: its exact window, whatever the policy
        o = sliding_attention_cpu(q.view(), k.view(), v.view(), window).o;
        policy->windowed(li, N, static_cast<int>(window));
      } else {
        o = policy->attend(li, q.view(), k.view(), v.view());
      }
    }
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
      if (c.sandwich_norm) {
        out.resize(n, E);
        out.noalias() = act * L.wo.transpose();
        rms_norm_inplace(out, L.post_attn_norm, eps);
        x.middleRows(c0, n) += out;
      } else {
        x.middleRows(c0, n).noalias() += act * L.wo.transpose();
      }
      rms_norm(x.middleRows(c0, n), L.ffn_norm, eps, h);
      proj.resize(n, 2 * F);
      proj.noalias() = h * L.wgu.transpose();
      act.resize(n, F);
#pragma omp parallel for schedule(static) if (n >= 16)
      for (int64_t r = 0; r < n; ++r) {
        if (c.act == Activation::gelu_tanh) {
          const float* g = proj.row(r).data();
          const float* u = g + F;
          float* a = act.row(r).data();
          for (int64_t j = 0; j < F; ++j) a[j] = gelu_tanh(g[j]) * u[j];
        } else {
          auto g = proj.row(r).head(F).array();
          auto u = proj.row(r).tail(F).array();
          act.row(r) = (g / ((-g).exp() + 1.0f) * u).matrix();
        }
      }
      if (c.sandwich_norm) {
        out.resize(n, E);
        out.noalias() = act * L.wd.transpose();
        rms_norm_inplace(out, L.post_ffn_norm, eps);
        x.middleRows(c0, n) += out;
      } else {
        x.middleRows(c0, n).noalias() += act * L.wd.transpose();
      }
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
    if (c.final_softcap > 0) softcap_inplace(lg.data(), lg.size(), static_cast<float>(c.final_softcap));
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
        if (c.final_softcap > 0) softcap_inplace(lg.row(r).data(), V, static_cast<float>(c.final_softcap));
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

std::unique_ptr<Model> load_cpu_model(const std::string& gguf_path, const LoadOptions& opt) {
  return std::make_unique<CpuModel>(gguf_path, opt);
}

}  // namespace proxyattn::model::detail
