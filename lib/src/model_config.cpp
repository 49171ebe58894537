// Model config loader: JSON always, TOML when toml++ is available (the GPU machine lacks it).
#include "proxyattn/model_config.hpp"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>
#ifdef PROXYATTN_HAVE_TOMLPP
#include <toml++/toml.h>
#endif

#include "proxyattn/error.hpp"

namespace proxyattn {

namespace {

std::string lower_ext(const std::string& path) {
  std::string e = std::filesystem::path(path).extension().string();
  for (char& c : e) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return e;
}

std::string read_text(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw Error(path + ": no such file");
  if (!std::filesystem::is_regular_file(path, ec)) throw Error(path + ": not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open for reading");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Integer field from JSON: must be an integer number (not a string, not 3.5).
int64_t json_int(const nlohmann::json& j, const std::string& path, const char* field) {
  if (!j.contains(field)) throw Error(path + ": field '" + std::string(field) + "' missing");
  const auto& v = j.at(field);
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15) return static_cast<int64_t>(d);
  }
  throw Error(path + ": field '" + std::string(field) + "' must be an integer, found " + v.dump());
}

double json_real(const nlohmann::json& j, const std::string& path, const char* field) {
  if (!j.contains(field)) throw Error(path + ": field '" + std::string(field) + "' missing");
  const auto& v = j.at(field);
  if (!v.is_number()) throw Error(path + ": field '" + std::string(field) + "' must be a number, found " + v.dump());
  return v.get<double>();
}

ModelConfig from_json(const std::string& path, const std::string& text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    // nlohmann's message carries line/column; keep it on one line.
    std::string what = e.what();
    for (char& c : what)
      if (c == '\n') c = ' ';
    throw Error(path + ": invalid JSON: " + what);
  }
  if (!j.is_object()) throw Error(path + ": expected a JSON object at the top level");
  ModelConfig c;
  if (!j.contains("name")) throw Error(path + ": field 'name' missing");
  if (!j.at("name").is_string()) throw Error(path + ": field 'name' must be a string");
  c.name = j.at("name").get<std::string>();
  auto as_int = [&](const char* f) {
    const int64_t v = json_int(j, path, f);
    if (v > std::numeric_limits<int>::max() || v < std::numeric_limits<int>::min())
      throw Error(path + ": field '" + std::string(f) + "' out of range: " + std::to_string(v));
    return static_cast<int>(v);
  };
  c.num_layers = as_int("num_layers");
  c.num_q_heads = as_int("num_q_heads");
  c.num_kv_heads = as_int("num_kv_heads");
  c.head_dim = as_int("head_dim");
  c.rope_theta = json_real(j, path, "rope_theta");
  c.max_context = json_int(j, path, "max_context");
  if (j.contains("hidden_size")) c.hidden_size = as_int("hidden_size");
  if (j.contains("intermediate_size")) c.intermediate_size = as_int("intermediate_size");
  if (j.contains("vocab_size")) c.vocab_size = json_int(j, path, "vocab_size");
  if (j.contains("rms_norm_eps")) c.rms_norm_eps = json_real(j, path, "rms_norm_eps");
  if (j.contains("qkv_bias")) {
    if (!j.at("qkv_bias").is_boolean()) throw Error(path + ": field 'qkv_bias' must be true or false");
    c.qkv_bias = j.at("qkv_bias").get<bool>();
  }
  return c;
}

#ifdef PROXYATTN_HAVE_TOMLPP
ModelConfig from_toml(const std::string& path, const std::string& text) {
  toml::table t;
  try {
    t = toml::parse(text, path);
  } catch (const toml::parse_error& e) {
    throw Error(path + ": invalid TOML at line " + std::to_string(e.source().begin.line) + ": " +
                std::string(e.description()));
  }
  // Accept the fields at the top level or under [model].
  const toml::table* tab = &t;
  if (auto m = t["model"].as_table()) tab = m;
  auto node = [&](const char* f) {
    auto n = (*tab)[f];
    if (!n) throw Error(path + ": field '" + std::string(f) + "' missing");
    return n;
  };
  auto as_int = [&](const char* f) -> int64_t {
    auto n = node(f);
    if (auto v = n.value<int64_t>(); v && n.is_integer()) return *v;
    throw Error(path + ": field '" + std::string(f) + "' must be an integer");
  };
  auto as_int32 = [&](const char* f) {
    const int64_t v = as_int(f);
    if (v > std::numeric_limits<int>::max() || v < std::numeric_limits<int>::min())
      throw Error(path + ": field '" + std::string(f) + "' out of range: " + std::to_string(v));
    return static_cast<int>(v);
  };
  ModelConfig c;
  {
    auto n = node("name");
    if (!n.is_string()) throw Error(path + ": field 'name' must be a string");
    c.name = *n.value<std::string>();
  }
  c.num_layers = as_int32("num_layers");
  c.num_q_heads = as_int32("num_q_heads");
  c.num_kv_heads = as_int32("num_kv_heads");
  c.head_dim = as_int32("head_dim");
  {
    auto n = node("rope_theta");
    if (!(n.is_floating_point() || n.is_integer()))
      throw Error(path + ": field 'rope_theta' must be a number");
    c.rope_theta = *n.value<double>();
  }
  c.max_context = as_int("max_context");
  return c;
}
#endif

}  // namespace

void validate_model_config(const ModelConfig& c, const std::string& what) {
  auto positive = [&](const char* f, int64_t v) {
    if (v <= 0) throw Error(what + ": field '" + std::string(f) + "' must be positive, found " + std::to_string(v));
  };
  if (c.name.empty()) throw Error(what + ": field 'name' must not be empty");
  positive("num_layers", c.num_layers);
  positive("num_q_heads", c.num_q_heads);
  positive("num_kv_heads", c.num_kv_heads);
  positive("head_dim", c.head_dim);
  positive("max_context", c.max_context);
  // Bounds far above any real model: past them a size computed from the config is absurd.
  auto at_most = [&](const char* f, int64_t v, int64_t hi) {
    if (v > hi) throw Error(what + ": field '" + std::string(f) + "' too large: " + std::to_string(v) +
                            " (at most " + std::to_string(hi) + ")");
  };
  at_most("num_layers", c.num_layers, 4096);
  at_most("num_q_heads", c.num_q_heads, 4096);
  at_most("num_kv_heads", c.num_kv_heads, 4096);
  at_most("head_dim", c.head_dim, 4096);
  if (c.num_q_heads % c.num_kv_heads != 0)
    throw Error(what + ": field 'num_q_heads' (" + std::to_string(c.num_q_heads) +
                ") is not a multiple of 'num_kv_heads' (" + std::to_string(c.num_kv_heads) + ")");
  if (c.head_dim % 2 != 0)
    throw Error(what + ": field 'head_dim' must be even (RoPE rotates pairs), found " + std::to_string(c.head_dim));
  if (!std::isfinite(c.rope_theta) || c.rope_theta <= 1.0)
    throw Error(what + ": field 'rope_theta' must be a number > 1, found " + std::to_string(c.rope_theta));
  // The optional whole-model fields: all three or none.
  const bool any = c.hidden_size != 0 || c.intermediate_size != 0 || c.vocab_size != 0;
  if (any) {
    positive("hidden_size", c.hidden_size);
    positive("intermediate_size", c.intermediate_size);
    positive("vocab_size", c.vocab_size);
    at_most("hidden_size", c.hidden_size, 1 << 17);
    at_most("intermediate_size", c.intermediate_size, 1 << 19);
    at_most("vocab_size", c.vocab_size, int64_t{1} << 22);
  }
  if (!std::isfinite(c.rms_norm_eps) || c.rms_norm_eps <= 0 || c.rms_norm_eps > 1)
    throw Error(what + ": field 'rms_norm_eps' must be in (0, 1], found " + std::to_string(c.rms_norm_eps));
}

bool model_config_supports_toml() {
#ifdef PROXYATTN_HAVE_TOMLPP
  return true;
#else
  return false;
#endif
}

ModelConfig load_model_config(const std::string& path) {
  const std::string ext = lower_ext(path);
  ModelConfig c;
  if (ext == ".toml") {
#ifdef PROXYATTN_HAVE_TOMLPP
    c = from_toml(path, read_text(path));
#else
    throw Error(path + ": TOML configs need toml++ (not available in this build); use the .json config");
#endif
  } else if (ext == ".json") {
    c = from_json(path, read_text(path));
  } else {
    throw Error(path + ": unknown config format '" + ext + "' (expected .json or .toml)");
  }
  validate_model_config(c, path);
  return c;
}

}  // namespace proxyattn
