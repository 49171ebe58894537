#pragma once
// Structured synthetic Q/K/V shaped like a real model's long-context prefill, for lengths and
// models no capture covers. What makes it look like real attention (logits q.k/sqrt(d)):
// - RoPE (the model's rope_theta) on the high/mid-frequency pairs: queries and keys of a KV group
//   share a content vector there, so nearby keys score higher and slash-like stripes appear;
// - attention sinks: keys of the first tokens carry a large component along a direction every
//   query has;
// - topics: the sequence is cut into segments of 64..512 tokens, each about one of a few topics;
//   "content" keys carry their topic's direction (heavy-tailed salience), queries look for the
//   topic of their own segment. Topic directions are shared by all heads of a layer, so heads
//   agree on which tokens matter;
// - per-head temperature (query scale, log-stratified over [min_head_scale, max_head_scale]):
//   heads differ in how sparse they are;
// - planted needles: a few short spans whose keys align strongly with the late queries.
// The lowest-frequency quarter of the RoPE pairs is left unrotated (within a model's context
// those pairs barely rotate; leaving them fixed keeps sinks, needles and half of the topic
// signal intact at lengths past the context).
// Deterministic per seed: every value comes from a counter-based hash of (seed, layer, head,
// token, dim), so any layer can be generated alone and the output does not depend on threads.
// Memory O(N d H) for one layer.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "proxyattn/model_config.hpp"
#include "proxyattn/store.hpp"

namespace proxyattn {

struct SynthOptions {
  int64_t seq_len = 4096;   // N, 1 .. max_synth_len
  int num_layers = 0;       // generate layers [0, num_layers); 0 = all of the model's layers
  uint64_t seed = 0;
  bool with_v = true;
  // Structure; logits in units of q.k/sqrt(d) for a head of scale 1.
  int sink_tokens = 4;
  double sink_logit = 10.0;
  double local_logit = 3.0;      // at distance 0, decaying with distance through RoPE
  int num_topics = 6;
  double topic_logit = 2.5;      // per unit salience (content tokens have salience 1..3)
  double content_fraction = 0.15;
  int num_needles = 3;
  int needle_len = 8;
  double needle_logit = 10.0;
  double noise_logit = 0.7;      // std of the random part of a logit
  double min_head_scale = 0.5, max_head_scale = 3.0;
};

inline constexpr int64_t max_synth_len = int64_t{1} << 20;

class SynthGenerator {
 public:
  // Validates the model config and options (Error naming the field) and builds the O(N)
  // sequence structure (segments, topics, salience, needles).
  SynthGenerator(const ModelConfig& model, const SynthOptions& opts);

  const ModelConfig& model() const { return model_; }
  const SynthOptions& options() const { return opts_; }
  int num_layers() const { return layers_; }
  // Store attributes: model name, num_layers = the model's layer count, rope_applied = true.
  StoreMeta meta(DType dtype = DType::f16) const;

  // One layer, float32: q [Hq, N, d], k and v [Hkv, N, d]. Parallel over tokens (OpenMP);
  // identical for any thread count.
  LayerData layer(int layer) const;
  std::vector<int32_t> tokens() const;

  // First token of each planted needle span, ascending.
  const std::vector<int64_t>& needle_positions() const { return needles_; }
  // Queries at positions >= late_start() look for the needles.
  int64_t late_start() const { return late_start_; }
  // Temperature (query scale) of a query head.
  double head_scale(int layer, int head) const;
  // Topic id of each token's segment.
  const std::vector<uint8_t>& topics() const { return topic_; }

 private:
  ModelConfig model_;
  SynthOptions opts_;
  int layers_ = 0;
  std::vector<uint8_t> topic_;     // [N]
  std::vector<float> salience_;    // [N]
  std::vector<uint8_t> needle_;    // [N] 1 inside a needle span
  std::vector<int64_t> needles_;
  int64_t late_start_ = 0;
};

// Generates layer by layer and writes a store through StoreWriter (temp file + rename, so a
// failure leaves nothing behind). on_layer(l) is called after layer l is written.
void write_synth_store(const std::string& path, const SynthGenerator& gen, const WriteOptions& wopts,
                       const std::function<void(int layer)>& on_layer = {});

}  // namespace proxyattn
