// Sweep files: parse, merge the command-line overrides, validate every axis, expand methods.
#include "sweep.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "proxyattn/methods.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/estimator.hpp"

namespace proxyattn::bench {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::set<std::string> kKeys = {
    "name",  "description", "figure",     "device",     "model",          "dtypes",
    "lengths", "methods",   "densities",  "estimators", "gammas",         "proxyattn_densities",
    "proxy", "block",       "repetitions", "warmup",    "seed",           "inputs",
    "cpu_max_len", "k_min", "gpu_mem_fraction", "mask_file", "peers"};

// Built-in default (no --sweep): the Fig. 4 axes on the default model.
json default_sweep() {
  return json{{"name", "default"},
              {"lengths", {"4K", "8K", "16K", "32K", "64K", "128K"}},
              {"methods", {"full", "sparse", "estimate:proxy", "proxyattn"}},
              {"densities", {0.5, 0.2, 0.1, 0.05}},
              {"gammas", {0.95}},
              {"proxyattn_densities", {0.1}}};
}

// The llama-3.1-8b shape, used when the default model file cannot be found from this directory.
ModelConfig builtin_llama() {
  ModelConfig m;
  m.name = "llama-3.1-8b";
  m.num_layers = 32;
  m.num_q_heads = 32;
  m.num_kv_heads = 8;
  m.head_dim = 128;
  m.rope_theta = 500000.0;
  m.max_context = 131072;
  return m;
}

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

std::string read_file_text(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error(path + ": no such file");
  if (!fs::is_regular_file(path, ec)) throw Error(path + ": not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open for reading");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A field that must be a list; a scalar is accepted as a one-element list.
json as_list(const json& j, const std::string& where, const char* key) {
  const json& v = j.at(key);
  json list = v.is_array() ? v : json::array({v});
  if (list.empty()) throw Error(fmt::format("{}: '{}' is empty", where, key));
  return list;
}

double unit_interval(const json& v, const std::string& where, const std::string& key) {
  if (!v.is_number()) throw Error(fmt::format("{}: '{}' must hold numbers, found {}", where, key, v.dump()));
  const double d = v.get<double>();
  if (!(d > 0.0 && d <= 1.0))
    throw Error(fmt::format("{}: {} {} is outside (0, 1]", where, key, v.dump()));
  return d;
}

int64_t int_field(const json& v, const std::string& where, const std::string& key, int64_t lo, int64_t hi) {
  int64_t x = 0;
  if (v.is_number_integer()) {
    x = v.get<int64_t>();
  } else if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() &&
             std::fabs(v.get<double>()) < 9e15) {
    x = static_cast<int64_t>(v.get<double>());
  } else {
    throw Error(fmt::format("{}: '{}' must be an integer, found {}", where, key, v.dump()));
  }
  if (x < lo || x > hi) throw Error(fmt::format("{}: '{}' = {} is outside [{}, {}]", where, key, x, lo, hi));
  return x;
}

std::string string_field(const json& v, const std::string& where, const std::string& key) {
  if (!v.is_string()) throw Error(fmt::format("{}: '{}' must be a string, found {}", where, key, v.dump()));
  return v.get<std::string>();
}

ModelConfig inline_model(const json& j, const std::string& where) {
  const std::set<std::string> keys = {"name", "num_layers", "num_q_heads", "num_kv_heads",
                                      "head_dim", "rope_theta", "max_context"};
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!keys.count(it.key())) throw Error(fmt::format("{}: model: unknown field '{}'", where, it.key()));
  ModelConfig m = builtin_llama();
  m.name = j.contains("name") ? string_field(j.at("name"), where, "model.name") : "inline";
  auto get = [&](const char* k, int& dst) {
    if (j.contains(k)) dst = static_cast<int>(int_field(j.at(k), where, std::string("model.") + k, 1, 1 << 20));
  };
  get("num_layers", m.num_layers);
  get("num_q_heads", m.num_q_heads);
  get("num_kv_heads", m.num_kv_heads);
  get("head_dim", m.head_dim);
  if (j.contains("rope_theta")) {
    if (!j.at("rope_theta").is_number()) throw Error(where + ": model.rope_theta must be a number");
    m.rope_theta = j.at("rope_theta").get<double>();
  }
  if (j.contains("max_context"))
    m.max_context = int_field(j.at("max_context"), where, "model.max_context", 1, int64_t{1} << 40);
  validate_model_config(m, where + ": model");
  return m;
}

DType parse_bench_dtype(const std::string& s, const std::string& where) {
  std::string l = s;
  for (char& c : l) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (l == "fp16" || l == "half") l = "f16";
  DType t;
  try {
    t = parse_dtype(l);
  } catch (const Error&) {
    throw Error(fmt::format("{}: unknown dtype '{}' (bf16 or fp16)", where, s));
  }
  if (t == DType::f32) throw Error(fmt::format("{}: dtype '{}' not supported: the kernels take bf16 or fp16", where, s));
  return t;
}

std::string num_label(double x) {
  std::string s = fmt::format("{:.6g}", x);
  return s;
}

std::string proxy_label(int g, int s) { return fmt::format("[g={},s={}]", g, s); }

struct Axes {
  std::vector<double> densities, gammas, pdensities;
  std::vector<std::string> estimators;
  std::vector<int> groups{1}, strides{1};
};

Method make_method(Family f, std::string label) {
  Method m;
  m.family = f;
  m.label = std::move(label);
  return m;
}

void add_unique(std::vector<Method>& out, Method m) {
  for (const Method& o : out)
    if (o.label == m.label) return;
  out.push_back(std::move(m));
}

double parse_unit_token(const std::string& tok, const std::string& num, const std::string& where,
                        const std::string& what) {
  size_t used = 0;
  double d = 0;
  try {
    d = std::stod(num, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != num.size())
    throw Error(fmt::format("{}: method '{}': '{}' is not a number", where, tok, num));
  if (!(d > 0.0 && d <= 1.0)) throw Error(fmt::format("{}: method '{}': {} {} is outside (0, 1]", where, tok, what, num));
  return d;
}

void expand_method(const std::string& tok, const Axes& ax, const std::string& where, std::vector<Method>& out) {
  const std::string valid =
      "full, sparse, sparse@D, estimate, estimate:NAME, proxyattn, proxyattn@gamma=G, proxyattn@density=D";
  auto need = [&](bool nonempty, const char* axis) {
    if (!nonempty)
      throw Error(fmt::format("{}: method '{}' needs a non-empty '{}' axis", where, tok, axis));
  };
  auto proxy_methods = [&](const Method& base) {
    for (int g : ax.groups)
      for (int s : ax.strides) {
        Method m = base;
        m.groups = g;
        m.query_stride = s;
        m.label = base.label + proxy_label(g, s);
        add_unique(out, m);
      }
  };
  if (tok == "full") {
    add_unique(out, make_method(Family::full, "full"));
  } else if (tok == "sparse") {
    need(!ax.densities.empty(), "densities");
    for (double d : ax.densities) {
      Method m = make_method(Family::sparse, "sparse@" + num_label(d));
      m.density = d;
      add_unique(out, m);
    }
  } else if (tok.rfind("sparse@", 0) == 0) {
    Method m = make_method(Family::sparse, "");
    m.density = parse_unit_token(tok, tok.substr(7), where, "density");
    m.label = "sparse@" + num_label(m.density);
    add_unique(out, m);
  } else if (tok == "estimate" || tok.rfind("estimate:", 0) == 0) {
    std::vector<std::string> names;
    if (tok == "estimate") {
      need(!ax.estimators.empty(), "estimators");
      names = ax.estimators;
    } else {
      names = {tok.substr(9)};
    }
    for (const std::string& n : names) {
      const MethodInfo* info = nullptr;
      for (const MethodInfo* x : all_methods())
        if (x->name == n) info = x;
      if (!info)
        throw Error(fmt::format("{}: method '{}': unknown estimator '{}' (valid: {})", where, tok, n,
                                method_name_list()));
      Method m = make_method(Family::estimate, "estimate:" + n);
      m.estimator = n;
      if (info->grouped()) proxy_methods(m);
      else add_unique(out, m);
    }
  } else if (tok == "proxyattn") {
    need(!ax.gammas.empty() || !ax.pdensities.empty(), "gammas' or 'proxyattn_densities");
    for (double g : ax.gammas) {
      Method m = make_method(Family::proxyattn, "proxyattn@gamma=" + num_label(g));
      m.gamma = g;
      m.groups = ax.groups.front();
      m.query_stride = ax.strides.front();
      add_unique(out, m);
    }
    for (double d : ax.pdensities) {
      Method m = make_method(Family::proxyattn, "proxyattn@density=" + num_label(d));
      m.gamma = ax.gammas.empty() ? 0.95 : ax.gammas.front();
      m.density = d;
      m.target_density = true;
      m.groups = ax.groups.front();
      m.query_stride = ax.strides.front();
      add_unique(out, m);
    }
  } else if (tok.rfind("proxyattn@gamma=", 0) == 0) {
    Method m = make_method(Family::proxyattn, "");
    m.gamma = parse_unit_token(tok, tok.substr(16), where, "gamma");
    m.label = "proxyattn@gamma=" + num_label(m.gamma);
    m.groups = ax.groups.front();
    m.query_stride = ax.strides.front();
    add_unique(out, m);
  } else if (tok.rfind("proxyattn@density=", 0) == 0) {
    Method m = make_method(Family::proxyattn, "");
    m.density = parse_unit_token(tok, tok.substr(18), where, "density");
    m.target_density = true;
    m.gamma = ax.gammas.empty() ? 0.95 : ax.gammas.front();
    m.label = "proxyattn@density=" + num_label(m.density);
    m.groups = ax.groups.front();
    m.query_stride = ax.strides.front();
    add_unique(out, m);
  } else {
    throw Error(fmt::format("{}: unknown method '{}' (valid: {})", where, tok, valid));
  }
}

}  // namespace

std::string resolve_path(const std::string& p, const std::string& sweep_file) {
  std::error_code ec;
  if (p.empty() || fs::path(p).is_absolute() || fs::exists(p, ec)) return p;
  if (!sweep_file.empty()) {
    const fs::path dir = fs::path(sweep_file).parent_path();
    for (const fs::path& c : {dir / p, dir / ".." / ".." / p})
      if (fs::exists(c, ec)) return c.lexically_normal().string();
  }
  return p;
}


int64_t parse_length(const std::string& s, const std::string& what) {
  std::string t;
  for (char c : s)
    if (!std::isspace(static_cast<unsigned char>(c))) t += c;
  if (t.empty()) throw Error(what + ": empty length");
  int64_t mult = 1;
  const char last = static_cast<char>(std::toupper(static_cast<unsigned char>(t.back())));
  if (last == 'K') mult = 1024;
  if (last == 'M') mult = 1024 * 1024;
  if (mult != 1) t.pop_back();
  if (t.empty() || !std::all_of(t.begin(), t.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
    throw Error(fmt::format("{}: length '{}' is not a positive integer (suffix K or M allowed)", what, s));
  if (t.size() > 12) throw Error(fmt::format("{}: length '{}' is too large", what, s));
  const int64_t n = std::stoll(t) * mult;
  if (n < 1) throw Error(fmt::format("{}: length '{}' must be at least 1", what, s));
  if (n > (int64_t{1} << 22)) throw Error(fmt::format("{}: length '{}' exceeds the limit of 4M tokens", what, s));
  return n;
}

std::string length_label(int64_t n) {
  if (n >= 1024 * 1024 && n % (1024 * 1024) == 0) return fmt::format("{}M", n / (1024 * 1024));
  if (n >= 1024 && n % 1024 == 0) return fmt::format("{}K", n / 1024);
  return std::to_string(n);
}

Sweep load_sweep(const std::string& path, const SweepOverrides& o) {
  json j;
  std::string where = "sweep";
  if (!path.empty()) {
    where = path;
    const std::string text = read_file_text(path);
    try {
      j = json::parse(text);
    } catch (const json::parse_error& e) {
      throw Error(path + ": invalid JSON: " + one_line(e.what()));
    }
    if (!j.is_object()) throw Error(path + ": expected a JSON object at the top level");
    if (j.contains("kind") && j["kind"] == "prefill")
      throw Error(path + ": a whole-model prefill sweep: run it with `proxyattn-bench prefill --sweep " + path + "`");
    for (auto it = j.begin(); it != j.end(); ++it)
      if (!kKeys.count(it.key()))
        throw Error(fmt::format("{}: unknown key '{}' (valid: {})", path, it.key(), fmt::join(kKeys, ", ")));
    for (const char* req : {"lengths", "methods"})
      if (!j.contains(req)) throw Error(fmt::format("{}: missing '{}'", path, req));
  } else {
    j = default_sweep();
  }
  Sweep sw;
  sw.raw = j;
  sw.source_file = path;

  // Command-line overrides replace the file's axes.
  auto over_list = [&](const char* key, const auto& v) {
    if (!v.empty()) j[key] = v;
  };
  over_list("dtypes", o.dtypes);
  over_list("lengths", o.lengths);
  over_list("methods", o.methods);
  over_list("estimators", o.estimators);
  over_list("densities", o.densities);
  over_list("gammas", o.gammas);
  over_list("proxyattn_densities", o.proxyattn_densities);
  if (!o.groups.empty()) j["proxy"]["groups"] = o.groups;
  if (!o.query_strides.empty()) j["proxy"]["query_stride"] = o.query_strides;
  if (o.device) j["device"] = *o.device;
  if (o.model) j["model"] = *o.model;
  if (o.inputs) j["inputs"] = *o.inputs;
  if (o.mask_file) j["mask_file"] = *o.mask_file;
  if (o.block) j["block"] = *o.block;
  if (o.repetitions) j["repetitions"] = *o.repetitions;
  if (o.warmup) j["warmup"] = *o.warmup;
  if (o.k_min) j["k_min"] = *o.k_min;
  if (o.seed) j["seed"] = *o.seed;
  if (o.cpu_max_len) j["cpu_max_len"] = *o.cpu_max_len;
  if (o.gpu_mem_fraction) j["gpu_mem_fraction"] = *o.gpu_mem_fraction;

  if (j.contains("name")) sw.name = string_field(j["name"], where, "name");
  if (j.contains("description")) sw.description = string_field(j["description"], where, "description");
  if (j.contains("figure")) sw.figure = string_field(j["figure"], where, "figure");
  if (j.contains("device")) {
    sw.device = string_field(j["device"], where, "device");
    if (sw.device != "auto" && sw.device != "cpu" && sw.device != "cuda")
      throw Error(fmt::format("{}: device '{}' unknown (auto, cpu or cuda)", where, sw.device));
  }
  if (j.contains("inputs")) {
    sw.inputs = string_field(j["inputs"], where, "inputs");
    if (sw.inputs != "synth" && sw.inputs != "random")
      throw Error(fmt::format("{}: inputs '{}' unknown (synth or random)", where, sw.inputs));
  }

  // Model: a path (JSON config) or an inline object; default llama-3.1-8b.
  if (j.contains("model") && j["model"].is_object()) {
    sw.model = inline_model(j["model"], where);
    sw.model_source = "inline";
  } else {
    const bool given = j.contains("model");
    std::string mp = given ? string_field(j["model"], where, "model") : "configs/models/llama-3.1-8b.json";
    mp = resolve_path(mp, path);
    std::error_code ec;
    if (!given && !fs::exists(mp, ec)) {
      sw.model = builtin_llama();
      sw.model_source = "built-in llama-3.1-8b";
    } else {
      sw.model = load_model_config(mp);
      sw.model_source = mp;
    }
  }

  if (j.contains("block")) sw.block = static_cast<int>(int_field(j["block"], where, "block", 16, 1024));
  if (sw.block != 64 && sw.block != 128)
    throw Error(fmt::format("{}: block {} not supported (64 or 128)", where, sw.block));
  if (j.contains("repetitions")) sw.repetitions = static_cast<int>(int_field(j["repetitions"], where, "repetitions", 1, 100000));
  if (j.contains("warmup")) sw.warmup = static_cast<int>(int_field(j["warmup"], where, "warmup", 0, 100000));
  if (j.contains("seed")) sw.seed = static_cast<uint64_t>(int_field(j["seed"], where, "seed", 0, int64_t{1} << 62));
  if (j.contains("cpu_max_len")) sw.cpu_max_len = int_field(j["cpu_max_len"], where, "cpu_max_len", 1, int64_t{1} << 22);
  if (j.contains("k_min")) sw.k_min = static_cast<int>(int_field(j["k_min"], where, "k_min", 1, 1 << 20));
  if (j.contains("gpu_mem_fraction")) {
    const json& v = j["gpu_mem_fraction"];
    sw.gpu_mem_fraction = unit_interval(v, where, "gpu_mem_fraction");
  }

  if (j.contains("dtypes")) {
    for (const json& v : as_list(j, where, "dtypes")) {
      const DType t = parse_bench_dtype(string_field(v, where, "dtypes"), where);
      if (std::find(sw.dtypes.begin(), sw.dtypes.end(), t) == sw.dtypes.end()) sw.dtypes.push_back(t);
    }
  } else {
    sw.dtypes = {DType::bf16};
  }

  if (!j.contains("lengths")) throw Error(where + ": missing 'lengths'");
  for (const json& v : as_list(j, where, "lengths")) {
    int64_t n = 0;
    if (v.is_string()) n = parse_length(v.get<std::string>(), where);
    else n = int_field(v, where, "lengths", 1, int64_t{1} << 22);
    if (std::find(sw.lengths.begin(), sw.lengths.end(), n) == sw.lengths.end()) sw.lengths.push_back(n);
  }

  Axes ax;
  if (j.contains("densities"))
    for (const json& v : as_list(j, where, "densities")) ax.densities.push_back(unit_interval(v, where, "density"));
  if (j.contains("gammas"))
    for (const json& v : as_list(j, where, "gammas")) ax.gammas.push_back(unit_interval(v, where, "gamma"));
  if (j.contains("proxyattn_densities"))
    for (const json& v : as_list(j, where, "proxyattn_densities"))
      ax.pdensities.push_back(unit_interval(v, where, "proxyattn_density"));
  if (j.contains("estimators")) {
    for (const json& v : as_list(j, where, "estimators")) ax.estimators.push_back(string_field(v, where, "estimators"));
  } else {
    ax.estimators = {proxyattn_method().name};
  }
  if (j.contains("proxy")) {
    const json& p = j["proxy"];
    if (!p.is_object()) throw Error(where + ": 'proxy' must be an object");
    for (auto it = p.begin(); it != p.end(); ++it)
      if (it.key() != "groups" && it.key() != "query_stride")
        throw Error(fmt::format("{}: proxy: unknown key '{}' (valid: groups, query_stride)", where, it.key()));
    if (p.contains("groups")) {
      ax.groups.clear();
      for (const json& v : as_list(p, where + ": proxy", "groups")) {
        const int g = static_cast<int>(int_field(v, where, "proxy.groups", 1, 4096));
        if (sw.model.num_q_heads % g != 0)
          throw Error(fmt::format("{}: proxy.groups = {} does not divide the {} query heads of {}", where, g,
                                  sw.model.num_q_heads, sw.model.name));
        ax.groups.push_back(g);
      }
    }
    if (p.contains("query_stride")) {
      ax.strides.clear();
      for (const json& v : as_list(p, where + ": proxy", "query_stride"))
        ax.strides.push_back(static_cast<int>(int_field(v, where, "proxy.query_stride", 1, sw.block)));
    }
  }

  if (!j.contains("methods")) throw Error(where + ": missing 'methods'");
  for (const json& v : as_list(j, where, "methods")) expand_method(string_field(v, where, "methods"), ax, where, sw.methods);
  if (j.contains("mask_file")) {
    Method m = make_method(Family::sparse, "sparse@file");
    m.mask_file = resolve_path(string_field(j["mask_file"], where, "mask_file"), path);
    add_unique(sw.methods, m);
  }
  if (sw.methods.empty()) throw Error(where + ": no methods to run");
  return sw;
}

}  // namespace proxyattn::bench
