// Structured synthetic Q/K/V (see synth.hpp for what each ingredient imitates).
//
// Vectors are built in "logit units" (q'.k' is the logit), then both are scaled by d^(1/4) so
// that q.k/sqrt(d) = q'.k'. Layout of one head vector (P = d/2 RoPE pairs, pair i = dims i and
// i + P, the rotate-half convention of HF Llama/Qwen, frequency theta^(-2i/d)):
//   pairs [0, R)        rotated by RoPE; the pairs with frequency in [1/256, 1/2] carry the
//                       shared "local" vector, pairs [P/2, R) half of the topic signal
//   pairs [R, P)        not rotated (lowest frequencies): the other half of the topic signal,
//                       and in the last pair the sink dim (i = P-1) and the needle dim (d-1)
// Noise is added to every dim; its size is solved so that the random part of a logit has std
// ~noise_logit for a head of scale 1.
#include "proxyattn/synth.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "proxyattn/error.hpp"
#include "proxyattn/version.hpp"

namespace proxyattn {

namespace {

// ----- counter-based randomness: every value is a pure function of its coordinates ---------

inline uint64_t mix64(uint64_t z) {  // splitmix64 finaliser
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

enum Stream : uint64_t {
  kQNoise = 1, kKNoise, kVNoise, kTopicDir, kTopicDirG, kLocalDir, kHead, kSegment, kSalience,
  kSalienceLayer, kNeedle, kToken
};

inline uint64_t key(uint64_t seed, uint64_t stream, uint64_t a = 0, uint64_t b = 0, uint64_t c = 0) {
  uint64_t h = mix64(seed ^ (stream * 0xd1b54a32d192ed03ULL));
  h = mix64(h ^ a);
  h = mix64(h ^ (b + 0x632be59bd9b4e019ULL));
  return mix64(h ^ (c + 0x8cb92ba72f3d8dd7ULL));
}
inline uint64_t elem(uint64_t row_key, uint64_t i) { return mix64(row_key + (i + 1) * 0x9e3779b97f4a7c15ULL); }

inline double uniform01(uint64_t h) { return static_cast<double>(h >> 11) * 0x1.0p-53; }

// Cheap approximately-normal value (sum of four 16-bit uniforms, unit variance): the noise
// needs no exact tails and this is several times faster than Box-Muller.
inline float gauss_fast(uint64_t h) {
  const uint32_t s = static_cast<uint32_t>(h & 0xffff) + static_cast<uint32_t>((h >> 16) & 0xffff) +
                     static_cast<uint32_t>((h >> 32) & 0xffff) + static_cast<uint32_t>(h >> 48);
  // mean 4 * 32767.5, variance 4 * (65536^2 - 1) / 12
  return static_cast<float>((static_cast<double>(s) - 131070.0) * (1.7320508075688772 / 65536.0));
}

// Exact standard normal (Box-Muller) for the few structural directions.
inline double gauss(uint64_t h) {
  const double u1 = (static_cast<double>(h >> 40) + 0.5) * 0x1.0p-24;
  const double u2 = static_cast<double>((h >> 16) & 0xffffff) * 0x1.0p-24;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

void normalize(std::vector<double>& v, double norm2) {
  double s = 0;
  for (double x : v) s += x * x;
  if (s <= 0) return;
  const double f = std::sqrt(norm2 / s);
  for (double& x : v) x *= f;
}

// ----- layout of a head vector --------------------------------------------------------------

struct Layout {
  int d = 0, P = 0, R = 0;            // dims, pairs, rotated pairs [0, R)
  std::vector<double> freq;           // [R]
  std::vector<int> local_dims;        // dims of the local band (both halves of each pair)
  std::vector<int> topic_rope_dims;   // rotated topic dims
  std::vector<int> topic_fixed_dims;  // unrotated topic dims
  int sink_dim = 0, needle_dim = 0;
};

Layout make_layout(int d, double theta) {
  Layout L;
  L.d = d;
  L.P = d / 2;
  const int fixed = std::max(1, L.P / 4);
  L.R = L.P - fixed;
  L.freq.resize(static_cast<size_t>(L.R));
  for (int i = 0; i < L.R; ++i) L.freq[static_cast<size_t>(i)] = std::pow(theta, -2.0 * i / d);
  std::vector<int> local_pairs;
  const int half = std::min(L.R, std::max(1, L.P / 2));
  for (int i = 0; i < half; ++i) {
    const double f = L.freq[static_cast<size_t>(i)];
    if (f >= 1.0 / 256 && f <= 0.5) local_pairs.push_back(i);
  }
  if (local_pairs.size() < 2) {  // extreme theta: fall back to the upper half of the rotated pairs
    local_pairs.clear();
    for (int i = half / 4; i < half; ++i) local_pairs.push_back(i);
  }
  for (int i : local_pairs) {
    L.local_dims.push_back(i);
    L.local_dims.push_back(i + L.P);
  }
  for (int i = half; i < L.R; ++i) {
    L.topic_rope_dims.push_back(i);
    L.topic_rope_dims.push_back(i + L.P);
  }
  for (int i = L.R; i < L.P - 1; ++i) {
    L.topic_fixed_dims.push_back(i);
    L.topic_fixed_dims.push_back(i + L.P);
  }
  L.sink_dim = L.P - 1;
  L.needle_dim = d - 1;
  return L;
}

void require(bool ok, const std::string& field, const std::string& why) {
  if (!ok) throw Error("synth: option " + field + " " + why);
}

}  // namespace

SynthGenerator::SynthGenerator(const ModelConfig& model, const SynthOptions& opts) : model_(model), opts_(opts) {
  validate_model_config(model_, "synth: model " + (model_.name.empty() ? std::string("config") : model_.name));
  const SynthOptions& o = opts_;
  require(o.seq_len >= 1 && o.seq_len <= max_synth_len, "seq_len",
          "must be in [1, " + std::to_string(max_synth_len) + "], got " + std::to_string(o.seq_len));
  require(o.num_layers >= 0 && o.num_layers <= model_.num_layers, "num_layers",
          "must be in [0, " + std::to_string(model_.num_layers) + "] (the model's layers), got " +
              std::to_string(o.num_layers));
  require(o.sink_tokens >= 0, "sink_tokens", "must be >= 0");
  require(o.num_topics >= 1 && o.num_topics <= 255, "num_topics", "must be in [1, 255]");
  require(o.content_fraction >= 0 && o.content_fraction <= 1, "content_fraction", "must be in [0, 1]");
  require(o.num_needles >= 0, "num_needles", "must be >= 0");
  require(o.needle_len >= 1, "needle_len", "must be >= 1");
  for (auto [name, v] : {std::pair<const char*, double>{"sink_logit", o.sink_logit},
                         {"local_logit", o.local_logit}, {"topic_logit", o.topic_logit},
                         {"needle_logit", o.needle_logit}, {"noise_logit", o.noise_logit}})
    require(std::isfinite(v) && v >= 0 && v <= 1000, name, "must be in [0, 1000]");
  require(std::isfinite(o.min_head_scale) && o.min_head_scale > 0, "min_head_scale", "must be positive");
  require(std::isfinite(o.max_head_scale) && o.max_head_scale >= o.min_head_scale, "max_head_scale",
          "must be >= min_head_scale");
  layers_ = o.num_layers == 0 ? model_.num_layers : o.num_layers;

  // Sequence structure, shared by all layers (it is "the text").
  const int64_t N = o.seq_len;
  topic_.resize(static_cast<size_t>(N));
  salience_.resize(static_cast<size_t>(N));
  needle_.assign(static_cast<size_t>(N), 0);
  int prev = -1;
  for (int64_t s = 0, seg = 0; s < N; ++seg) {
    const uint64_t h = key(o.seed, kSegment, static_cast<uint64_t>(seg));
    const int64_t len = 64 + static_cast<int64_t>(h % 449);
    int t = static_cast<int>((h >> 32) % static_cast<uint64_t>(o.num_topics));
    if (o.num_topics > 1 && t == prev) t = (t + 1) % o.num_topics;  // consecutive segments differ
    prev = t;
    for (int64_t e = std::min(N, s + len); s < e; ++s) topic_[static_cast<size_t>(s)] = static_cast<uint8_t>(t);
  }
  for (int64_t s = 0; s < N; ++s) {
    const uint64_t h = key(o.seed, kSalience, static_cast<uint64_t>(s));
    const bool content = uniform01(h) < o.content_fraction;
    // Content tokens: 1 + Exp(1)/2, capped at 3 (a tail, but not one that drowns sinks and
    // needles); the rest carry a faint trace of the topic.
    salience_[static_cast<size_t>(s)] =
        content ? static_cast<float>(std::min(3.0, 1.0 - 0.5 * std::log(1.0 - uniform01(mix64(h))))) : 0.15f;
  }
  const int64_t late_len = std::min<int64_t>(N, std::max<int64_t>(128, N / 16));
  late_start_ = N - late_len;
  const int64_t lo = N / 10, hi = std::min<int64_t>(late_start_, N - N / 10) - o.needle_len;
  int count = o.num_needles;
  while (count > 0 && (hi - lo) / count < 2 * o.needle_len) --count;
  if (count > 0) {
    const double span = static_cast<double>(hi - lo) / count;
    for (int j = 0; j < count; ++j) {
      const double u = uniform01(key(o.seed, kNeedle, static_cast<uint64_t>(j)));
      const int64_t p = lo + static_cast<int64_t>(span * j + (span - o.needle_len) * u);
      needles_.push_back(p);
      for (int64_t s = p; s < p + o.needle_len && s < N; ++s) needle_[static_cast<size_t>(s)] = 1;
    }
  }
}

double SynthGenerator::head_scale(int layer, int head) const {
  const int H = model_.num_q_heads;
  // Stratified over the log range: rank of the head under a per-layer random order, plus jitter,
  // so every layer spans dense to sparse heads.
  std::vector<std::pair<uint64_t, int>> order(static_cast<size_t>(H));
  for (int h = 0; h < H; ++h)
    order[static_cast<size_t>(h)] = {key(opts_.seed, kHead, static_cast<uint64_t>(layer), static_cast<uint64_t>(h)), h};
  std::sort(order.begin(), order.end());
  int rank = 0;
  for (int i = 0; i < H; ++i)
    if (order[static_cast<size_t>(i)].second == head) rank = i;
  const double jitter = uniform01(key(opts_.seed, kHead, static_cast<uint64_t>(layer), static_cast<uint64_t>(head), 1));
  const double u = (rank + jitter) / H;
  return opts_.min_head_scale * std::pow(opts_.max_head_scale / opts_.min_head_scale, u);
}

StoreMeta SynthGenerator::meta(DType dtype) const {
  StoreMeta m;
  m.model = model_.name;
  m.source = "synthetic (seed " + std::to_string(opts_.seed) + ", layers 0-" + std::to_string(layers_ - 1) +
             " of " + std::to_string(model_.num_layers) + ")";
  m.num_layers = model_.num_layers;
  m.num_q_heads = model_.num_q_heads;
  m.num_kv_heads = model_.num_kv_heads;
  m.head_dim = model_.head_dim;
  m.seq_len = opts_.seq_len;
  m.rope_theta = model_.rope_theta;
  m.rope_applied = true;
  m.dtype = dtype;
  m.prompt_sha256 = "";
  m.creator = "proxyattn " + version() + " synth";
  if (!needles_.empty()) {
    std::string text = "synthetic needles of " + std::to_string(opts_.needle_len) + " tokens at";
    for (int64_t p : needles_) {
      text += ' ';
      text += std::to_string(p);
    }
    m.needle = Needle{needles_.front(), text};
  }
  return m;
}

std::vector<int32_t> SynthGenerator::tokens() const {
  std::vector<int32_t> t(static_cast<size_t>(opts_.seq_len));
  for (int64_t s = 0; s < opts_.seq_len; ++s)
    t[static_cast<size_t>(s)] =
        s == 0 ? 1 : 2 + static_cast<int32_t>(key(opts_.seed, kToken, static_cast<uint64_t>(s)) % 31998);
  return t;
}

LayerData SynthGenerator::layer(int l) const {
  if (l < 0 || l >= layers_)
    throw Error("synth: layer " + std::to_string(l) + " outside [0, " + std::to_string(layers_) + ")");
  const SynthOptions& o = opts_;
  const int d = model_.head_dim, Hq = model_.num_q_heads, Hkv = model_.num_kv_heads, r = Hq / Hkv;
  const int64_t N = o.seq_len;
  const uint64_t seed = o.seed, L = static_cast<uint64_t>(l);
  const Layout lay = make_layout(d, model_.rope_theta);

  // Topic directions: per layer, lightly perturbed per KV head; half the energy in the rotated
  // topic dims, half in the fixed ones (all of it in one part when the other is empty).
  const size_t nrope = lay.topic_rope_dims.size(), nfixed = lay.topic_fixed_dims.size();
  const double e_rope = nfixed == 0 ? 1.0 : (nrope == 0 ? 0.0 : 0.5);
  const int T = o.num_topics;
  std::vector<std::vector<double>> topic_dir(static_cast<size_t>(Hkv * T));  // [g * T + j] over rope then fixed dims
  for (int g = 0; g < Hkv; ++g)
    for (int j = 0; j < T; ++j) {
      std::vector<double> a(nrope), b(nfixed);
      for (size_t i = 0; i < nrope + nfixed; ++i) {
        const double base = gauss(key(seed, kTopicDir, L, static_cast<uint64_t>(j), i));
        const double pert = gauss(key(seed, kTopicDirG, L, static_cast<uint64_t>(g * T + j), i));
        (i < nrope ? a[i] : b[i - nrope]) = base + 0.25 * pert;
      }
      normalize(a, e_rope);
      normalize(b, 1.0 - e_rope);
      a.insert(a.end(), b.begin(), b.end());
      topic_dir[static_cast<size_t>(g * T + j)] = std::move(a);
    }
  // Local vector per KV head, unit norm over the local band.
  std::vector<std::vector<double>> local_dir(static_cast<size_t>(Hkv));
  for (int g = 0; g < Hkv; ++g) {
    std::vector<double> c(lay.local_dims.size());
    for (size_t i = 0; i < c.size(); ++i) c[i] = gauss(key(seed, kLocalDir, L, static_cast<uint64_t>(g), i));
    normalize(c, 1.0);
    local_dir[static_cast<size_t>(g)] = std::move(c);
  }
  // Per query head: temperature and mild weights of each ingredient (heads agree on tokens,
  // differ in mix and sparsity).
  struct HeadParams { double scale, w_sink, w_local, w_topic; };
  std::vector<HeadParams> hp(static_cast<size_t>(Hq));
  for (int h = 0; h < Hq; ++h) {
    auto w = [&](uint64_t i) { return 0.6 + 0.8 * uniform01(key(seed, kHead, L, static_cast<uint64_t>(h), 2 + i)); };
    hp[static_cast<size_t>(h)] = {head_scale(l, h), w(0), w(1), w(2)};
  }

  // Noise per dim sigma (logit units): q_struct.k_noise + k_struct.q_noise + noise.noise has
  // variance ~ 2 S sigma^2 + d sigma^4 = noise_logit^2, with S the structural energy.
  const double S = o.sink_logit + o.local_logit + o.topic_logit;
  const double n2 = o.noise_logit * o.noise_logit;
  const double sig2 = (-2 * S + std::sqrt(4 * S * S + 4.0 * d * n2)) / (2.0 * d);
  const float sigma = static_cast<float>(std::sqrt(std::max(sig2, 0.0)));
  const double out_scale = std::pow(static_cast<double>(d), 0.25);
  const double a_sink = std::sqrt(o.sink_logit), a_local = std::sqrt(o.local_logit),
               a_topic = std::sqrt(o.topic_logit), a_needle = std::sqrt(o.needle_logit);

  LayerData out;
  out.layer = l;
  // Every row of each is written below, by the thread that owns its token.
  out.q = Tensor3::uninitialized(Hq, N, d);
  out.k = Tensor3::uninitialized(Hkv, N, d);
  if (o.with_v) out.v = Tensor3::uninitialized(Hkv, N, d);

#pragma omp parallel
  {
    std::vector<double> x(static_cast<size_t>(d)), cs(static_cast<size_t>(lay.R)), sn(static_cast<size_t>(lay.R));
    auto rotate_store = [&](float* dst, double scale) {
      for (int i = 0; i < lay.R; ++i) {
        const double a = x[static_cast<size_t>(i)], b = x[static_cast<size_t>(i + lay.P)];
        x[static_cast<size_t>(i)] = a * cs[static_cast<size_t>(i)] - b * sn[static_cast<size_t>(i)];
        x[static_cast<size_t>(i + lay.P)] = a * sn[static_cast<size_t>(i)] + b * cs[static_cast<size_t>(i)];
      }
      for (int c = 0; c < d; ++c) dst[c] = static_cast<float>(x[static_cast<size_t>(c)] * scale);
    };
    auto add_topic = [&](const std::vector<double>& dir, double amp) {
      for (size_t i = 0; i < nrope; ++i) x[static_cast<size_t>(lay.topic_rope_dims[i])] += amp * dir[i];
      for (size_t i = 0; i < nfixed; ++i) x[static_cast<size_t>(lay.topic_fixed_dims[i])] += amp * dir[nrope + i];
    };
    auto add_local = [&](const std::vector<double>& dir, double amp) {
      for (size_t i = 0; i < dir.size(); ++i) x[static_cast<size_t>(lay.local_dims[i])] += amp * dir[i];
    };
    auto noise = [&](uint64_t row_key) {
      for (int c = 0; c < d; ++c) x[static_cast<size_t>(c)] = sigma * gauss_fast(elem(row_key, static_cast<uint64_t>(c)));
    };

#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t) {
      const uint64_t T_ = static_cast<uint64_t>(t);
      for (int i = 0; i < lay.R; ++i) {
        const double ang = static_cast<double>(t) * lay.freq[static_cast<size_t>(i)];
        cs[static_cast<size_t>(i)] = std::cos(ang);
        sn[static_cast<size_t>(i)] = std::sin(ang);
      }
      const int topic = topic_[static_cast<size_t>(t)];
      const double sal = salience_[static_cast<size_t>(t)] *
                         std::exp(0.3 * gauss_fast(key(seed, kSalienceLayer, L, T_)));
      const bool is_needle = needle_[static_cast<size_t>(t)] != 0, late = t >= late_start_;
      for (int g = 0; g < Hkv; ++g) {
        noise(key(seed, kKNoise, L, static_cast<uint64_t>(g), T_));
        if (t < o.sink_tokens) x[static_cast<size_t>(lay.sink_dim)] += a_sink * (t == 0 ? 1.0 : 0.7);
        if (is_needle) x[static_cast<size_t>(lay.needle_dim)] += a_needle;
        add_topic(topic_dir[static_cast<size_t>(g * T + topic)], a_topic * sal);
        add_local(local_dir[static_cast<size_t>(g)], a_local);
        rotate_store(out.k.row(g, t), out_scale);
      }
      for (int h = 0; h < Hq; ++h) {
        const HeadParams& p = hp[static_cast<size_t>(h)];
        const int g = h / r;
        noise(key(seed, kQNoise, L, static_cast<uint64_t>(h), T_));
        x[static_cast<size_t>(lay.sink_dim)] += a_sink * p.w_sink;
        if (late) x[static_cast<size_t>(lay.needle_dim)] += a_needle;
        add_topic(topic_dir[static_cast<size_t>(g * T + topic)], a_topic * p.w_topic);
        add_local(local_dir[static_cast<size_t>(g)], a_local * p.w_local);
        rotate_store(out.q.row(h, t), out_scale * p.scale);
      }
      if (out.v) {
        // Values: unit normal; sink tokens' values small, as in real models (a no-op target).
        const float vs = t < o.sink_tokens ? 0.2f : 1.0f;
        for (int g = 0; g < Hkv; ++g) {
          const uint64_t rk = key(seed, kVNoise, L, static_cast<uint64_t>(g), T_);
          float* dst = out.v->row(g, t);
          for (int c = 0; c < d; ++c) dst[c] = vs * gauss_fast(elem(rk, static_cast<uint64_t>(c)));
        }
      }
    }
  }
  return out;
}

void write_synth_store(const std::string& path, const SynthGenerator& gen, const WriteOptions& wopts,
                       const std::function<void(int layer)>& on_layer) {
  StoreWriter w(path, gen.meta(wopts.dtype), wopts);
  for (int l = 0; l < gen.num_layers(); ++l) {
    const LayerData ld = gen.layer(l);
    ConstView vv;
    if (ld.v) vv = ld.v->view();
    w.write_layer(l, ld.q, ld.k, ld.v ? &vv : nullptr);
    if (on_layer) on_layer(l);
  }
  w.write_tokens(gen.tokens());
  w.commit();
}

}  // namespace proxyattn
