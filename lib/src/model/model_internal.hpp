#pragma once
// Internal to the model runtime: back-end factories.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "proxyattn/model/model.hpp"

namespace proxyattn::gguf {
class File;
}

namespace proxyattn::model::detail {

// Llama family and Gemma-3 (read_model_config says which).
std::unique_ptr<Model> load_cpu_model(const std::string& gguf_path, const LoadOptions& opt);
std::unique_ptr<Model> load_cuda_model(const std::string& gguf_path, const LoadOptions& opt);
std::unique_ptr<Model> random_cuda_llama(const ModelConfig& cfg, uint64_t seed, const LoadOptions& opt);

// The argument checks every back end's forward starts with (tokens in the vocabulary, the
// context length, logits positions, nll_begin, stop_after_layer); offset = tokens cached.
void check_forward_args(const ModelConfig& c, std::span<const int32_t> tokens, const ForwardOptions& opt,
                        int64_t offset, bool has_cache);

// Undo llama.cpp's converter permutation of the rows [row0, row0 + heads * d) of a row-major
// [rows, cols] float matrix: GGUF row (2j + s) of a head is HF row (s * d/2 + j).
void unpermute_rope_rows(float* w, int64_t cols, int64_t row0, int heads, int d);

// Tensor `name` of the file dequantised to float32 rows (type and range checks first, rows in
// parallel): out holds rows() x cols() values.
void dequantize_tensor(const gguf::File& f, const std::string& name, float* out);

// RoPE inverse frequencies exactly as capture_qk.rope_cos_sin: float64, then float32
// (factors: rope_freqs.weight, or empty). The global layers' (rope_theta, the file's factors and
// linear scaling) and the sliding layers' (rope_theta_local, unscaled: Gemma-3).
std::vector<float> rope_inv_freq(const ModelConfig& c, const std::vector<float>& factors);
std::vector<float> rope_inv_freq_local(const ModelConfig& c);
std::vector<float> rope_inv_freq(double theta, int head_dim, const std::vector<float>& factors, double linear_factor);

}  // namespace proxyattn::model::detail
