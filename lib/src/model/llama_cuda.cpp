// CUDA back end of the model runtime: the Llama-family and Gemma-3 forward of llama_cpu.cpp (the
// spec) on the GPU. Gemma's local layers run full_attention with its sliding window; its norms,
// GeGLU, embedding scale and soft-capping are model_ops.cu kernels. Weights and activations bf16
// with fp32 accumulation (cuBLASLt GEMMs, kernels/gemm.cu), the residual
// stream float32 (the output projection and the MLP's down projection accumulate into it with
// beta = 1), attention by our kernels: full attention, the device pipeline of a method
// (DevicePipelineAttention), or a host mask (BlockMaskAttention: the CPU estimators' masks,
// the GPU's sparse kernel). Tokens go through the projections and the MLP in chunks of
// token_chunk rows. Every launch is followed by an event; after the forward the gaps between
// events are summed per stage (DeviceStages), so the breakdown costs no host waits.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>

#include "model_internal.hpp"
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/dtype.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/kernels.h"
#include "proxyattn/methods.hpp"
#include "proxyattn/model/gguf.hpp"
#include "proxyattn/model/model.hpp"
#include "proxyattn/model_config.hpp"

namespace proxyattn::model::detail {

namespace {

namespace kn = proxyattn::kernels;

void ck(kn::Status s, const std::string& what) { throw_on_failure(s, "cuda back end: " + what); }

constexpr int64_t kDefaultChunk = 16384;
constexpr double kLogitBytes = 256.0 * (1 << 20);  // float32 logits of one NLL chunk
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

enum Stage : int { s_embed, s_norm, s_qkv_gemm, s_rope, s_estimate, s_attend, s_to_rows, s_o_gemm, s_mlp_gemm, s_act,
                   s_logits, s_host, kStages };

struct GpuLayer {
  kn::DeviceBuffer attn_norm, ffn_norm;  // float32 [E]
  kn::DeviceBuffer q_norm, k_norm;       // float32 [d] (qk_norm)
  kn::DeviceBuffer post_attn_norm, post_ffn_norm;  // float32 [E] (sandwich_norm)
  kn::DeviceBuffer wqkv;                 // bf16 [(Hq + 2 Hkv) d, E], Q/K rows in HF order
  kn::DeviceBuffer bqkv;                 // float32 [(Hq + 2 Hkv) d] or empty
  kn::DeviceBuffer wo;                   // bf16 [E, Hq d]
  kn::DeviceBuffer wgu;                  // bf16 [2 F, E]: gate rows then up rows
  kn::DeviceBuffer wd;                   // bf16 [E, F]
};

class GpuCache final : public KVCache {
 public:
  int64_t length() const override { return n; }
  int64_t n = 0, cap = 0;
  int q_heads = 0, kv_heads = 0, dim = 0;
  std::vector<kn::DeviceBuffer> k, v;  // per layer [Hkv, cap, d] bf16
  kn::DeviceBuffer q, o;               // [Hq, cap, d] bf16, shared by the layers

  // Room for `need` tokens, keeping the cached ones (head strides change with the capacity).
  void grow(int64_t need, int layers) {
    if (need <= cap) return;
    const int64_t nc = std::max<int64_t>(need, std::max<int64_t>(256, cap * 2));
    auto regrow = [&](kn::DeviceBuffer& b, int heads) {
      kn::DeviceBuffer nb;
      ck(nb.allocate(size_t(heads) * nc * dim * 2), "alloc KV cache");
      for (int h = 0; h < heads && n > 0; ++h)
        ck(kn::copy_device(static_cast<char*>(nb.data()) + size_t(h) * nc * dim * 2,
                           static_cast<const char*>(b.data()) + size_t(h) * cap * dim * 2, size_t(n) * dim * 2),
           "copy KV cache");
      b = std::move(nb);
    };
    if (k.empty()) {
      k.resize(layers);
      v.resize(layers);
    }
    for (int l = 0; l < layers; ++l) {
      regrow(k[l], kv_heads);
      regrow(v[l], kv_heads);
    }
    regrow(q, q_heads);
    regrow(o, q_heads);
    cap = nc;
  }
};

// Device bytes a forward of n tokens (chunk rows) allocates beyond the weights; gemma: the
// sliding layers' RoPE tables and the float32 rows of the sandwich norms.
double workspace_bytes(double E, double F, double hq, double hkv, double d, int64_t n, int64_t chunk,
                       bool gemma = false) {
  const double N = double(n), C = double(std::min(n, chunk)), W = (hq + 2 * hkv) * d;
  return N * E * 4 + N * 4 + N * 8 + N * d * 4      // x, tokens, nll, cos/sin
         + (2 * hq + 2 * hkv) * N * d * 2            // q, o, k, v
         + C * (E + W + hq * d + 2 * F + F) * 2      // hn, qkv, orow, gu, act
         + (gemma ? N * d * 4 + C * E * 4 : 0.0)     // local cos/sin, sandwich rows
         + kLogitBytes + (64 << 20);
}

// Downloads rows [row0, row0 + rows) of every head of a bf16 [heads, *, d] buffer as float32.
Tensor3 download_heads(const void* p, int heads, int64_t rows, int d, int64_t head_stride, int64_t row0) {
  Tensor3 t = Tensor3::uninitialized(heads, rows, d);  // every head's rows are written below
  std::vector<uint16_t> bits(static_cast<size_t>(rows) * d);
  for (int h = 0; h < heads; ++h) {
    ck(kn::copy_to_host(bits.data(), static_cast<const uint16_t*>(p) + h * head_stride + row0 * d, bits.size() * 2),
       "download q/k/v");
    ck(kn::synchronize(), "synchronize");
    float* dst = t.row(h, 0);
    for (size_t i = 0; i < bits.size(); ++i) dst[i] = bf16_to_float(bits[i]);
  }
  return t;
}

// Uploads a float32 [heads, rows, d] tensor as bf16 into rows [row0, ...) of a [heads, *, d] buffer.
void upload_heads(const Tensor3& t, void* p, int64_t head_stride, int64_t row0) {
  std::vector<uint16_t> bits(static_cast<size_t>(t.tokens()) * t.dim());
  for (int64_t h = 0; h < t.heads(); ++h) {
    const float* src = t.row(h, 0);
    for (size_t i = 0; i < bits.size(); ++i) bits[i] = float_to_bf16(src[i]);
    ck(kn::copy_to_device(static_cast<uint16_t*>(p) + h * head_stride + row0 * t.dim(), bits.data(), bits.size() * 2),
       "upload attention output");
    ck(kn::synchronize(), "synchronize");
  }
}

// What a built pipeline depends on: a policy object can be reused (a benchmark's std::optional)
// with another spec at the same address.
std::string spec_key(const PipelineSpec& p) {
  if (!p.method) return "full";
  EstimatorConfig c = p.config;
  c.block = p.block;
  return p.method->name + "|" + std::to_string(p.block) + "|" + std::to_string(p.groups) + "|" +
         std::to_string(p.query_stride) + "|" + std::to_string(p.gamma) + "|" + std::to_string(p.k_min) + "|" +
         (p.density ? std::to_string(*p.density) : "-") + "|" + std::to_string(p.scale_once) + "|" +
         p.method->config_json(c).dump();
}

// A device buffer that only grows.
void ensure(kn::DeviceBuffer& b, double bytes, const char* what) {
  if (double(b.bytes()) >= bytes) return;
  b.reset();
  ck(b.allocate(static_cast<size_t>(bytes)), std::string("alloc ") + what);
}

class CudaModel final : public Model {
 public:
  // Weights from a GGUF file: dequantised to float32 on the host, rounded to bf16 on the device.
  CudaModel(const std::string& path, const LoadOptions& opt) {
    require_device();
    gguf::File file(path);
    cfg_ = read_model_config(file);
    chunk_ = opt.token_chunk > 0 ? opt.token_chunk : kDefaultChunk;
    const ModelConfig& c = cfg_;
    const int D = c.head_dim;
    std::vector<float> host;
    kn::DeviceBuffer f32;
    // Tensor -> float32 host rows -> device (float32 for norms, bf16 for matrices).
    auto fetch = [&](const std::string& name) -> std::vector<float>& {
      const gguf::TensorInfo& t = file.tensor(name);
      host.resize(static_cast<size_t>(t.rows() * t.cols()));
      dequantize_tensor(file, name, host.data());
      return host;
    };
    auto to_bf16 = [&](const std::vector<float>& h, kn::DeviceBuffer& dst, size_t offset_elems, const std::string& name) {
      ensure(f32, double(h.size()) * 4, "weight staging");
      ck(f32.upload(h.data(), h.size() * 4), "upload " + name);
      ck(kn::convert(f32.data(), kn::ElemType::f32, static_cast<uint16_t*>(dst.data()) + offset_elems, kn::ElemType::bf16,
                     static_cast<int64_t>(h.size())),
         "convert " + name);
      ck(kn::synchronize(), "synchronize");
    };
    auto matrix = [&](const std::string& name, kn::DeviceBuffer& dst) {
      const auto& h = fetch(name);
      ck(dst.allocate(h.size() * 2), "alloc " + name);
      to_bf16(h, dst, 0, name);
    };
    auto vec = [&](const std::string& name, kn::DeviceBuffer& dst) {
      const auto& h = fetch(name);
      ck(dst.allocate(h.size() * 4), "alloc " + name);
      ck(dst.upload(h.data(), h.size() * 4), "upload " + name);
    };
    matrix("token_embd.weight", embd_);
    if (!c.tied_embeddings) matrix("output.weight", out_);
    vec("output_norm.weight", out_norm_);
    layers_.resize(c.n_layers);
    const int64_t nq = int64_t{c.n_head} * D, nk = int64_t{c.n_head_kv} * D, E = c.n_embd, F = c.n_ff;
    for (int i = 0; i < c.n_layers; ++i) {
      const std::string p = "blk." + std::to_string(i) + ".";
      GpuLayer& L = layers_[i];
      vec(p + "attn_norm.weight", L.attn_norm);
      vec(p + "ffn_norm.weight", L.ffn_norm);
      ck(L.wqkv.allocate(size_t(nq + 2 * nk) * E * 2), "alloc wqkv");
      {
        auto& h = fetch(p + "attn_q.weight");
        if (c.rope_permuted) unpermute_rope_rows(h.data(), E, 0, c.n_head, D);
        to_bf16(h, L.wqkv, 0, p + "attn_q.weight");
      }
      {
        auto& h = fetch(p + "attn_k.weight");
        if (c.rope_permuted) unpermute_rope_rows(h.data(), E, 0, c.n_head_kv, D);
        to_bf16(h, L.wqkv, size_t(nq) * E, p + "attn_k.weight");
      }
      if (c.qk_norm) {
        vec(p + "attn_q_norm.weight", L.q_norm);
        vec(p + "attn_k_norm.weight", L.k_norm);
      }
      if (c.sandwich_norm) {
        vec(p + "post_attention_norm.weight", L.post_attn_norm);
        vec(p + "post_ffw_norm.weight", L.post_ffn_norm);
      }
      to_bf16(fetch(p + "attn_v.weight"), L.wqkv, size_t(nq + nk) * E, p + "attn_v.weight");
      matrix(p + "attn_output.weight", L.wo);
      ck(L.wgu.allocate(size_t(2 * F) * E * 2), "alloc wgu");
      to_bf16(fetch(p + "ffn_gate.weight"), L.wgu, 0, p + "ffn_gate.weight");
      to_bf16(fetch(p + "ffn_up.weight"), L.wgu, size_t(F) * E, p + "ffn_up.weight");
      matrix(p + "ffn_down.weight", L.wd);
    }
    std::vector<float> factors;
    if (c.rope_freq_factors) factors = fetch("rope_freqs.weight");
    upload_inv_freq(rope_inv_freq(c, factors));
    if (c.global_layers() < c.n_layers) {
      const std::vector<float> f = rope_inv_freq_local(c);
      ck(inv_freq_local_.allocate(f.size() * 4), "alloc rope");
      ck(inv_freq_local_.upload(f.data(), f.size() * 4), "upload rope");
    }
  }

  // Seeded random weights of a shape (random_model).
  CudaModel(const ModelConfig& c, uint64_t seed, const LoadOptions& opt) : cfg_(c) {
    require_device();
    chunk_ = opt.token_chunk > 0 ? opt.token_chunk : kDefaultChunk;
    const int64_t W = int64_t(c.n_head + 2 * c.n_head_kv) * c.head_dim, E = c.n_embd, F = c.n_ff;
    uint64_t tensor = 0;
    auto normal = [&](kn::DeviceBuffer& b, int64_t n, kn::ElemType t, const char* what) {
      ck(b.allocate(size_t(n) * kn::elem_size(t)), std::string("alloc ") + what + " (random weights)");
      ck(kn::fill_normal(b.data(), t, n, seed * 0x9e3779b97f4a7c15ull + ++tensor, 0.02f), what);
    };
    auto ones = [&](kn::DeviceBuffer& b, int64_t n, const char* what) {
      ck(b.allocate(size_t(n) * 4), std::string("alloc ") + what);
      ck(kn::fill(b.data(), kn::ElemType::f32, n, 1.0f), what);
    };
    normal(embd_, c.vocab_size * E, kn::ElemType::bf16, "token_embd");
    normal(out_, c.vocab_size * E, kn::ElemType::bf16, "output");
    ones(out_norm_, E, "output_norm");
    layers_.resize(c.n_layers);
    for (GpuLayer& L : layers_) {
      ones(L.attn_norm, E, "attn_norm");
      ones(L.ffn_norm, E, "ffn_norm");
      normal(L.wqkv, W * E, kn::ElemType::bf16, "wqkv");
      if (c.qkv_bias) normal(L.bqkv, W, kn::ElemType::f32, "bqkv");
      normal(L.wo, E * int64_t(c.n_head) * c.head_dim, kn::ElemType::bf16, "wo");
      normal(L.wgu, 2 * F * E, kn::ElemType::bf16, "wgu");
      normal(L.wd, E * F, kn::ElemType::bf16, "wd");
    }
    ck(kn::synchronize(), "synchronize (random weights)");
    upload_inv_freq(rope_inv_freq(c, {}));
  }

  const ModelConfig& config() const override { return cfg_; }
  Backend backend() const override { return Backend::cuda; }
  std::unique_ptr<KVCache> new_cache() const override {
    auto c = std::make_unique<GpuCache>();
    c->q_heads = cfg_.n_head;
    c->kv_heads = cfg_.n_head_kv;
    c->dim = cfg_.head_dim;
    return c;
  }
  ForwardResult forward(std::span<const int32_t> tokens, const ForwardOptions& opt, KVCache* kv) override;

 private:
  static void require_device() {
    if (kn::device_count() < 1) {
      const std::string d = kn::last_error_detail();
      throw Error("model back end 'cuda': no CUDA device" + (d.empty() ? std::string() : " (" + d + ")"));
    }
  }
  void upload_inv_freq(const std::vector<float>& f) {
    ck(inv_freq_.allocate(f.size() * 4), "alloc rope");
    ck(inv_freq_.upload(f.data(), f.size() * 4), "upload rope");
  }
  ModelConfig cfg_;
  int64_t chunk_ = kDefaultChunk;
  kn::DeviceBuffer embd_, out_, out_norm_, inv_freq_, inv_freq_local_;
  std::vector<GpuLayer> layers_;
  // Forward workspace, grown on demand and kept between calls.
  kn::DeviceBuffer x_, hn_, qkv_, q_, k_, v_, o_, orow_, gu_, act_, cs_, sn_, tok_, lg_, nll_, sel_, counts_;
  kn::DeviceBuffer cs_local_, sn_local_, yrow_;  // sliding layers' RoPE; float32 rows of the sandwich norms
  kn::DeviceBuffer mask_indptr_, mask_indices_;
  std::optional<DevicePipeline> pipeline_;
  std::string pipeline_key_;  // spec_key of the built pipeline
  int64_t pipeline_n_ = 0;
  kn::EventLog events_;
};

ForwardResult CudaModel::forward(std::span<const int32_t> tokens, const ForwardOptions& opt, KVCache* kv) {
  const ModelConfig& c = cfg_;
  const int64_t N = static_cast<int64_t>(tokens.size()), E = c.n_embd, D = c.head_dim, Hq = c.n_head,
                Hkv = c.n_head_kv, F = c.n_ff, V = c.vocab_size, half = D / 2;
  const int64_t W = (Hq + 2 * Hkv) * D;
  GpuCache* cache = nullptr;
  if (kv) {
    cache = dynamic_cast<GpuCache*>(kv);
    if (!cache) throw Error("forward: the KV cache belongs to another back end");
  }
  const int64_t offset = cache ? cache->n : 0;
  check_forward_args(c, tokens, opt, offset, cache != nullptr);
  const int last = opt.stop_after_layer >= 0 ? opt.stop_after_layer : c.n_layers - 1;
  const int64_t C = std::min(chunk_, N);
  const int64_t logit_rows = std::max<int64_t>(1, std::min<int64_t>(N, static_cast<int64_t>(kLogitBytes / (4.0 * V))));

  // The attention of this call.
  AttentionPolicy* policy = offset == 0 ? opt.attention : nullptr;
  auto* device_policy = dynamic_cast<DevicePipelineAttention*>(policy);
  auto* mask_policy = dynamic_cast<BlockMaskAttention*>(policy);
  const bool full = !policy || dynamic_cast<FullAttention*>(policy);
  const bool sliding = c.global_layers() < c.n_layers;
  // The kernels take the model's scale; a host policy gets q times scale * sqrt(d) (so that its
  // 1/sqrt(d) attention is exact), as on the CPU; the device pipeline scales by 1/sqrt(d) only.
  const float q_fold = static_cast<float>(c.scale() * std::sqrt(static_cast<double>(D)));
  if (device_policy && device_policy->spec().method && q_fold != 1.0f)
    throw Error("cuda back end: attention '" + device_policy->name() + "': the device pipeline scales scores by "
                "1/sqrt(head_dim), this model by " + std::to_string(c.scale()) + " (use a host mask: BlockMaskAttention)");

  // Memory before any allocation: the workspace (and pipeline) against what is free now.
  {
    kn::DeviceInfo info;
    int dev = 0;
    ck(kn::current_device(&dev), "current_device");
    ck(kn::device_info(dev, &info), "device_info");
    size_t used = 0;
    ck(kn::device_memory_used(&used), "memory");
    const double have = double(info.global_mem) - double(used) + double(x_.bytes() + hn_.bytes() + qkv_.bytes() +
                        q_.bytes() + k_.bytes() + v_.bytes() + o_.bytes() + orow_.bytes() + gu_.bytes() + act_.bytes() +
                        cs_.bytes() + sn_.bytes() + lg_.bytes());
    double need = workspace_bytes(c.n_embd, c.n_ff, c.n_head, c.n_head_kv, c.head_dim, N, C, c.sandwich_norm || sliding);
    if (device_policy && device_policy->spec().method &&
        !(pipeline_key_ == spec_key(device_policy->spec()) && pipeline_n_ >= N)) {
      AttentionShape s{int(Hq), int(Hkv), int(D), N};
      need += DevicePipeline::bytes(device_policy->spec(), s);
    }
    if (need > have)
      throw Error("cuda back end: " + std::to_string(N) + " tokens need " + std::to_string(need / kGiB).substr(0, 5) +
                  " GiB of device memory beyond the weights, " + std::to_string(have / kGiB).substr(0, 5) + " GiB free on " +
                  info.name);
  }
  ensure(x_, double(N) * E * 4, "x");
  ensure(hn_, double(std::max(C, logit_rows)) * E * 2, "normed rows");
  ensure(qkv_, double(C) * W * 2, "qkv");
  ensure(orow_, double(C) * Hq * D * 2, "attention rows");
  ensure(gu_, double(C) * 2 * F * 2, "gate/up");
  ensure(act_, double(C) * F * 2, "mlp activation");
  ensure(cs_, double(N) * half * 4, "rope cos");
  ensure(sn_, double(N) * half * 4, "rope sin");
  ensure(tok_, double(N) * 4, "tokens");
  ensure(lg_, double(logit_rows) * V * 4, "logits");
  ensure(nll_, double(N) * 8, "nll");
  ensure(counts_, double(c.n_layers) * 4, "mask sizes");
  if (sliding) {
    ensure(cs_local_, double(N) * half * 4, "rope cos (local)");
    ensure(sn_local_, double(N) * half * 4, "rope sin (local)");
  }
  if (c.sandwich_norm) ensure(yrow_, double(C) * E * 4, "sandwich rows");
  if (!cache) {
    ensure(q_, double(Hq) * N * D * 2, "q");
    ensure(o_, double(Hq) * N * D * 2, "o");
    ensure(k_, double(Hkv) * N * D * 2, "k");
    ensure(v_, double(Hkv) * N * D * 2, "v");
  } else {
    cache->grow(offset + N, c.n_layers);
  }
  if (device_policy) {
    device_policy->densities().clear();
    const std::string key = spec_key(device_policy->spec());
    if (!(pipeline_ && pipeline_key_ == key && pipeline_n_ >= N)) {
      pipeline_.reset();
      pipeline_.emplace(device_policy->spec(), AttentionShape{int(Hq), int(Hkv), int(D), N});
      pipeline_key_ = key;
      pipeline_n_ = N;
    }
  }

  ForwardResult res;
  res.vocab = V;
  std::vector<int> tags;
  size_t ev = 0;
  auto mark = [&](Stage s) {
    ck(events_.record(ev++), "event");
    tags.push_back(s);
  };
  size_t peak = 0;
  auto sample_memory = [&]() {
    size_t used = 0;
    if (kn::device_memory_used(&used) == kn::Status::ok) peak = std::max(peak, used);
  };
  mark(s_host);
  ck(kn::copy_to_device(tok_.data(), tokens.data(), size_t(N) * 4), "upload tokens");
  ck(kn::embed_rows(embd_.data(), tok_.as<int32_t>(), x_.as<float>(), N, E), "embed_rows");
  if (static_cast<float>(c.embed_scale) != 1.0f)
    ck(kn::scale_f32(x_.as<float>(), N * E, static_cast<float>(c.embed_scale)), "scale_f32 (embeddings)");
  mark(s_embed);
  ck(kn::rope_table(inv_freq_.as<float>(), int(half), offset, N, cs_.as<float>(), sn_.as<float>()), "rope_table");
  if (sliding)
    ck(kn::rope_table(inv_freq_local_.as<float>(), int(half), offset, N, cs_local_.as<float>(), sn_local_.as<float>()),
       "rope_table (local)");
  mark(s_rope);

  // Where this call's q/k/v/o live: the cache (head stride cap d, rows from offset) or the
  // contiguous workspace.
  void* qd = cache ? cache->q.data() : q_.data();
  void* od = cache ? cache->o.data() : o_.data();
  const int64_t q_hs = cache ? cache->cap * D : N * D;
  const int64_t row0 = offset;
  const float eps = static_cast<float>(c.rms_eps);
  double linear_flops = 0;
  auto gemm = [&](const void* x, const void* w, void* y, kn::ElemType yt, int64_t m, int64_t n, int64_t k, float beta,
                  const char* what) {
    kn::GemmParams g;
    g.x = x;
    g.w = w;
    g.y = y;
    g.y_type = yt;
    g.m = m;
    g.n = n;
    g.k = k;
    g.beta = beta;
    ck(kn::gemm(g), what);
  };
  int counted = 0;
  for (int li = 0; li <= last; ++li) {
    const GpuLayer& L = layers_[li];
    void* kd = cache ? cache->k[li].data() : k_.data();
    void* vd = cache ? cache->v[li].data() : v_.data();
    const int64_t kv_hs = cache ? cache->cap * D : N * D;
    const int64_t window = c.window(li);
    const float* cos_t = window > 0 ? cs_local_.as<float>() : cs_.as<float>();
    const float* sin_t = window > 0 ? sn_local_.as<float>() : sn_.as<float>();
    for (int64_t c0 = 0; c0 < N; c0 += C) {
      const int64_t n = std::min(C, N - c0);
      ck(kn::rms_norm_rows(x_.as<float>() + c0 * E, L.attn_norm.as<float>(), hn_.data(), n, E, eps), "rms_norm (attn)");
      mark(s_norm);
      gemm(hn_.data(), L.wqkv.data(), qkv_.data(), kn::ElemType::bf16, n, W, E, 0.0f, "gemm (qkv)");
      linear_flops += 2.0 * n * W * E;
      mark(s_qkv_gemm);
      if (c.qk_norm) {
        kn::HeadNormParams hp;
        hp.qkv = qkv_.data();
        hp.q_weight = L.q_norm.as<float>();
        hp.k_weight = L.k_norm.as<float>();
        hp.q_heads = int(Hq);
        hp.kv_heads = int(Hkv);
        hp.head_dim = int(D);
        hp.rows = n;
        hp.eps = eps;
        ck(kn::head_rms_norm(hp), "head_rms_norm");
        mark(s_norm);
      }
      kn::RopeSplitParams rp;
      rp.qkv = qkv_.data();
      rp.bias = L.bqkv.bytes() ? L.bqkv.as<float>() : nullptr;
      rp.cos = cos_t + c0 * half;
      rp.sin = sin_t + c0 * half;
      rp.q = qd;
      rp.k = kd;
      rp.v = vd;
      rp.q_heads = int(Hq);
      rp.kv_heads = int(Hkv);
      rp.head_dim = int(D);
      rp.rows = n;
      rp.row0 = row0 + c0;
      rp.q_head_stride = q_hs;
      rp.kv_head_stride = kv_hs;
      ck(kn::rope_split(rp), "rope_split");
      mark(s_rope);
    }
    if (opt.on_layer) {
      const Tensor3 hq = download_heads(qd, int(Hq), N, int(D), q_hs, row0);
      const Tensor3 hk = download_heads(kd, int(Hkv), N, int(D), kv_hs, row0);
      const Tensor3 hv = download_heads(vd, int(Hkv), N, int(D), kv_hs, row0);
      opt.on_layer(li, hq.view(), hk.view(), hv.view());
      mark(s_host);
    }
    if (li == opt.stop_after_layer) break;

    // Attention over all offset + N tokens, query rows [offset, offset + N).
    kn::AttentionParams ap;
    ap.q = qd;
    ap.k = kd;
    ap.v = vd;
    ap.o = od;
    ap.q_heads = int(Hq);
    ap.kv_heads = int(Hkv);
    ap.head_dim = int(D);
    ap.seq_len = offset + N;
    ap.row_begin = offset;
    ap.scale = static_cast<float>(c.scale());
    ap.window = window;
    if (cache) {
      ap.q_stride_head = ap.o_stride_head = q_hs;
      ap.k_stride_head = ap.v_stride_head = kv_hs;
      ap.q_stride_token = ap.k_stride_token = ap.v_stride_token = ap.o_stride_token = D;
    }
    // Host copies of q (times q_fold) and k for a host policy's mask.
    auto host_qk = [&]() {
      Tensor3 hq = download_heads(qd, int(Hq), N, int(D), q_hs, 0);
      if (q_fold != 1.0f)
        for (int64_t i = 0; i < hq.size(); ++i) hq.data()[i] *= q_fold;
      return std::pair<Tensor3, Tensor3>(std::move(hq), download_heads(kd, int(Hkv), N, int(D), kv_hs, 0));
    };
    if (window > 0) {  // a local layer: its exact window, whatever the policy
      ck(kn::full_attention(ap), "full_attention (sliding window)");
      mark(s_attend);
      if (policy && offset == 0) policy->windowed(li, N, int(window));
    } else if (full || offset > 0 || (device_policy && device_policy->dense(li))) {
      ck(kn::full_attention(ap), "full_attention");
      mark(s_attend);
      if (device_policy) device_policy->densities().push_back({li, 1.0, 1.0});
    } else if (device_policy) {
      DeviceOperands x;
      x.q = qd;
      x.k = kd;
      x.v = vd;
      x.o = od;
      x.q_heads = int(Hq);
      x.kv_heads = int(Hkv);
      x.head_dim = int(D);
      x.seq_len = N;
      if (cache) {
        x.q_head_stride = x.o_head_stride = q_hs;
        x.kv_head_stride = kv_hs;
      }
      pipeline_->select(x);
      pipeline_->copy_selected_count(counts_.as<int32_t>() + li, nullptr);
      mark(s_estimate);
      pipeline_->attend(x);
      mark(s_attend);
      device_policy->densities().push_back({li, -1.0, std::nan("")});  // block density read after the forward
      ++counted;
    } else if (mask_policy) {
      const auto [hq, hk] = host_qk();
      const std::optional<BlockMask> m = mask_policy->mask(li, hq.view(), hk.view());
      mark(s_estimate);
      if (!m) {
        ck(kn::full_attention(ap), "full_attention");
      } else {
        ensure(mask_indptr_, double(m->indptr().size()) * 4, "mask indptr");
        ensure(mask_indices_, double(std::max<size_t>(1, m->indices().size())) * 4, "mask indices");
        ck(mask_indptr_.upload(m->indptr().data(), m->indptr().size() * 4), "upload mask");
        if (!m->indices().empty()) ck(mask_indices_.upload(m->indices().data(), m->indices().size() * 4), "upload mask");
        kn::SparseAttentionParams sp;
        sp.attn = ap;
        sp.indptr = mask_indptr_.as<int32_t>();
        sp.indices = mask_indices_.as<int32_t>();
        sp.block = m->block();
        ck(kn::sparse_attention(sp), "sparse_attention");
      }
      mark(s_attend);
    } else {
      // Any other policy computes on the host (the CPU reference of its own attention).
      const auto [hq, hk] = host_qk();
      const Tensor3 hv = download_heads(vd, int(Hkv), N, int(D), kv_hs, 0);
      const Tensor3 o = policy->attend(li, hq.view(), hk.view(), hv.view());
      if (o.heads() != Hq || o.tokens() != N || o.dim() != D)
        throw Error("layer " + std::to_string(li) + ": attention '" + policy->name() + "' returned a wrong shape");
      upload_heads(o, od, q_hs, 0);
      mark(s_attend);
    }

    for (int64_t c0 = 0; c0 < N; c0 += C) {
      const int64_t n = std::min(C, N - c0);
      float* xr = x_.as<float>() + c0 * E;
      ck(kn::heads_to_rows(od, orow_.data(), int(Hq), n, int(D), q_hs, row0 + c0), "heads_to_rows");
      mark(s_to_rows);
      if (c.sandwich_norm) {  // x += rms_norm(o W_o^T): the output projection into float32 rows first
        gemm(orow_.data(), L.wo.data(), yrow_.data(), kn::ElemType::f32, n, E, Hq * D, 0.0f, "gemm (o)");
        mark(s_o_gemm);
        ck(kn::rms_norm_add_rows(yrow_.as<float>(), L.post_attn_norm.as<float>(), xr, n, E, eps), "rms_norm_add (attn)");
        mark(s_norm);
      } else {
        gemm(orow_.data(), L.wo.data(), xr, kn::ElemType::f32, n, E, Hq * D, 1.0f, "gemm (o)");
        mark(s_o_gemm);
      }
      ck(kn::rms_norm_rows(xr, L.ffn_norm.as<float>(), hn_.data(), n, E, eps), "rms_norm (ffn)");
      mark(s_norm);
      gemm(hn_.data(), L.wgu.data(), gu_.data(), kn::ElemType::bf16, n, 2 * F, E, 0.0f, "gemm (gate/up)");
      mark(s_mlp_gemm);
      if (c.act == Activation::gelu_tanh)
        ck(kn::gelu_mul(gu_.data(), act_.data(), n, F), "gelu_mul");
      else
        ck(kn::silu_mul(gu_.data(), act_.data(), n, F), "silu_mul");
      mark(s_act);
      if (c.sandwich_norm) {
        gemm(act_.data(), L.wd.data(), yrow_.data(), kn::ElemType::f32, n, E, F, 0.0f, "gemm (down)");
        mark(s_mlp_gemm);
        ck(kn::rms_norm_add_rows(yrow_.as<float>(), L.post_ffn_norm.as<float>(), xr, n, E, eps), "rms_norm_add (ffn)");
        mark(s_norm);
      } else {
        gemm(act_.data(), L.wd.data(), xr, kn::ElemType::f32, n, E, F, 1.0f, "gemm (down)");
        mark(s_mlp_gemm);
      }
      linear_flops += 2.0 * n * (Hq * D * E + 2 * F * E + F * E);
    }
    sample_memory();
  }
  if (cache) cache->n = offset + N;

  if (opt.stop_after_layer < 0) {
    const kn::DeviceBuffer& lm = c.tied_embeddings ? embd_ : out_;
    if (!opt.logits_at.empty()) {
      const int64_t R = static_cast<int64_t>(opt.logits_at.size());
      ensure(sel_, double(R) * E * 4, "logit rows");
      ensure(hn_, double(R) * E * 2, "normed rows");
      ensure(lg_, double(R) * V * 4, "logits");
      for (int64_t i = 0; i < R; ++i)
        ck(kn::copy_device(sel_.as<float>() + i * E, x_.as<float>() + opt.logits_at[i] * E, size_t(E) * 4), "gather rows");
      ck(kn::rms_norm_rows(sel_.as<float>(), out_norm_.as<float>(), hn_.data(), R, E, eps), "rms_norm (output)");
      gemm(hn_.data(), lm.data(), lg_.data(), kn::ElemType::f32, R, V, E, 0.0f, "gemm (logits)");
      if (c.final_softcap > 0) ck(kn::softcap(lg_.as<float>(), R * V, static_cast<float>(c.final_softcap)), "softcap");
      res.logits.resize(static_cast<size_t>(R * V));
      ck(lg_.download(res.logits.data(), res.logits.size() * 4), "download logits");
      mark(s_logits);
    }
    if (opt.nll_begin >= 0 && opt.nll_begin < N - 1) {
      const int64_t b = opt.nll_begin, cnt = N - 1 - b;
      for (int64_t c0 = 0; c0 < cnt; c0 += logit_rows) {
        const int64_t n = std::min(logit_rows, cnt - c0);
        ck(kn::rms_norm_rows(x_.as<float>() + (b + c0) * E, out_norm_.as<float>(), hn_.data(), n, E, eps),
           "rms_norm (output)");
        gemm(hn_.data(), lm.data(), lg_.data(), kn::ElemType::f32, n, V, E, 0.0f, "gemm (logits)");
        if (c.final_softcap > 0) ck(kn::softcap(lg_.as<float>(), n * V, static_cast<float>(c.final_softcap)), "softcap");
        ck(kn::logits_rows(lg_.as<float>(), n, V, tok_.as<int32_t>() + b + c0 + 1, nll_.as<double>() + c0, nullptr),
           "logits_rows");
      }
      res.nll.resize(static_cast<size_t>(cnt));
      ck(nll_.download(res.nll.data(), res.nll.size() * 8), "download nll");
      mark(s_logits);
    }
  }
  ck(kn::synchronize(), "synchronize (forward)");
  sample_memory();

  // Stage times from the gaps between consecutive events.
  double ms[kStages] = {0};
  for (size_t i = 1; i < ev; ++i) {
    float t = 0;
    ck(events_.elapsed_ms(i - 1, i, &t), "event time");
    ms[tags[i]] += t;
  }
  float total = 0;
  ck(events_.elapsed_ms(0, ev - 1, &total), "event time");
  DeviceStages& st = res.device;
  st.linear_ms = ms[s_qkv_gemm] + ms[s_o_gemm] + ms[s_mlp_gemm];
  st.elementwise_ms = ms[s_embed] + ms[s_norm] + ms[s_rope] + ms[s_to_rows] + ms[s_act];
  st.estimation_ms = ms[s_estimate];
  st.attention_ms = ms[s_attend];
  st.logits_ms = ms[s_logits];
  st.host_ms = ms[s_host];
  st.total_ms = total;
  st.linear_flops = linear_flops;
  st.peak_bytes = peak;
  ForwardTiming& tm = res.timing;
  tm.embed = ms[s_embed] / 1e3;
  tm.qkv = (ms[s_rope] + ms[s_qkv_gemm]) / 1e3;
  tm.attention = (ms[s_estimate] + ms[s_attend]) / 1e3;
  tm.mlp = (ms[s_to_rows] + ms[s_o_gemm] + ms[s_norm] + ms[s_mlp_gemm] + ms[s_act]) / 1e3;
  tm.logits = ms[s_logits] / 1e3;

  if (device_policy && counted > 0) {
    std::vector<int32_t> nnz(static_cast<size_t>(c.n_layers));
    ck(counts_.download(nnz.data(), nnz.size() * 4), "download mask sizes");
    const double causal = pipeline_->causal_blocks(N);
    for (LayerDensity& d : device_policy->densities())
      if (d.block_density < 0) d.block_density = double(nnz[d.layer]) / causal;
  }
  return res;
}

}  // namespace

}  // namespace proxyattn::model::detail

namespace proxyattn::model {
double forward_workspace_bytes(const proxyattn::ModelConfig& s, int64_t n, int64_t token_chunk) {
  return detail::workspace_bytes(s.hidden_size, s.intermediate_size, s.num_q_heads, s.num_kv_heads, s.head_dim, n,
                                 token_chunk > 0 ? token_chunk : detail::kDefaultChunk);
}
}  // namespace proxyattn::model

namespace proxyattn::model::detail {

std::unique_ptr<Model> load_cuda_model(const std::string& gguf_path, const LoadOptions& opt) {
  return std::make_unique<CudaModel>(gguf_path, opt);
}

std::unique_ptr<Model> random_cuda_llama(const ModelConfig& cfg, uint64_t seed, const LoadOptions& opt) {
  return std::make_unique<CudaModel>(cfg, seed, opt);
}

}  // namespace proxyattn::model::detail
