#pragma once
// Model shapes (configs/models/*.json, or *.toml when built with toml++): what `synth` needs to
// make a store shaped like a real model, and what the analysis tools print as context.
#include <cstdint>
#include <string>

namespace proxyattn {

struct ModelConfig {
  std::string name;
  int num_layers = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  double rope_theta = 10000.0;
  int64_t max_context = 0;
  // The rest of the model, optional (0 / defaults when absent): what a whole-model forward with
  // random weights needs (proxyattn-bench's prefill mode). has_full_shape() says whether present.
  int hidden_size = 0;        // E
  int intermediate_size = 0;  // F (SwiGLU MLP)
  int64_t vocab_size = 0;
  double rms_norm_eps = 1e-5;
  bool qkv_bias = false;      // Q/K/V projections with a bias (Qwen2)
  bool has_full_shape() const { return hidden_size > 0 && intermediate_size > 0 && vocab_size > 0; }
};

// Reads a JSON (or, with toml++, TOML) model config; keys are the field names above. Throws
// Error naming the file and the field on a missing/mistyped/out-of-range field, Hq % Hkv != 0,
// or an odd head_dim (RoPE rotates pairs).
ModelConfig load_model_config(const std::string& path);

// Whether this build reads .toml configs (toml++ is optional).
bool model_config_supports_toml();

// Same checks for a config built in code; `what` names its origin in messages.
void validate_model_config(const ModelConfig& c, const std::string& what);

}  // namespace proxyattn
