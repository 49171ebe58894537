// proxyattn-dump: look inside a Q/K store (info), pull one head out of it (export), or make a
// synthetic one (synth). A thin front end: the store, the statistics and the generator live in
// lib/.
#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "cli_common.hpp"
#include "proxyattn/checked.hpp"
#include "proxyattn/id_ranges.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/io.hpp"
#include "proxyattn/model_config.hpp"
#include "proxyattn/progress.hpp"
#include "proxyattn/store.hpp"
#include "proxyattn/synth.hpp"
#include "proxyattn/value_stats.hpp"

namespace {

using namespace proxyattn;
using json = nlohmann::json;

// ----- info -----------------------------------------------------------------------------------

struct InfoArgs {
  std::string file;
  bool json = false;
  bool quiet = false;
};

json stats_json(const ValueStats& s) {
  json j;
  j["count"] = s.count;
  j["nan"] = s.nan;
  j["inf"] = s.inf;
  if (s.count > 0) {
    j["min"] = s.min;
    j["max"] = s.max;
    j["mean"] = s.mean;
    j["std"] = s.std();
  } else {
    j["min"] = j["max"] = j["mean"] = j["std"] = nullptr;
  }
  return j;
}

std::string shape_text(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}


int cmd_info(const InfoArgs& a) {
  // info counts NaN/Inf instead of failing on them.
  StoreReader r(a.file, ReadOptions{.allow_nonfinite = true});
  const StoreMeta& m = r.meta();

  json j;
  j["file"] = a.file;
  j["attributes"] = store_attributes_json(m);
  if (m.needle) j["needle"] = {{"position", m.needle->position}, {"text", m.needle->text}};
  else j["needle"] = nullptr;
  j["tokens"] = r.has_tokens() ? json(m.seq_len) : json(nullptr);
  j["layers_stored"] = r.layers();
  // Layers grouped by their attention: "global" or "sliding window W".
  std::vector<std::pair<std::string, std::vector<int>>> by_attention;
  for (int l : r.layers()) {
    const LayerAttention& att = r.attention(l);
    const std::string key = att.sliding() ? fmt::format("sliding window {}", att.window) : "global";
    auto it = std::find_if(by_attention.begin(), by_attention.end(), [&](const auto& p) { return p.first == key; });
    if (it == by_attention.end()) by_attention.push_back({key, {l}});
    else it->second.push_back(l);
  }

  if (!a.json) {
    fmt::print("file           {}\n", a.file);
    fmt::print("model          {}\n", m.model);
    fmt::print("source         {}\n", m.source);
    fmt::print("creator        {}\n", m.creator);
    fmt::print("layers         {} stored of num_layers={} ({})\n", r.layers().size(), m.num_layers,
               format_id_ranges(r.layers()));
    fmt::print("heads          q {}, kv {} (GQA ratio {}), head_dim {}\n", m.num_q_heads, m.num_kv_heads,
               m.num_q_heads / m.num_kv_heads, m.head_dim);
    fmt::print("seq_len        {}\n", m.seq_len);
    fmt::print("rope           theta {}, {}\n", m.rope_theta, m.rope_applied ? "applied (post-RoPE Q/K)" : "not applied");
    fmt::print("dtype          {}\n", dtype_name(m.dtype));
    fmt::print("prompt_sha256  {}\n", m.prompt_sha256.empty() ? "(none)" : m.prompt_sha256);
    std::string att_text;
    for (const auto& [key, ls] : by_attention)
      att_text += (att_text.empty() ? "" : "; ") + key + ": " + format_id_ranges(ls);
    fmt::print("attention      {}\n", att_text);
    if (m.needle) fmt::print("needle         position {}: {}\n", m.needle->position, m.needle->text);
    fmt::print("tokens         {}\n", r.has_tokens() ? std::to_string(m.seq_len) + " ids" : std::string("(none)"));
    fmt::print("\n{:<6} {:<3} {:<18} {:<8} {:>11} {:>11} {:>11} {:>11} {:>6} {:>6}\n", "layer", "t", "shape",
               "dtype", "min", "max", "mean", "std", "nan", "inf");
    std::fflush(stdout);
  }

  Progress progress("info " + a.file, static_cast<int64_t>(r.layers().size()), a.quiet || !a.json);
  json layers = json::array();
  for (int l : r.layers()) {
    const LayerData ld = r.read_layer(l, true);
    json lj;
    lj["layer"] = l;
    const LayerAttention& att = r.attention(l);
    lj["attention"] = std::string(attention_kind_name(att.kind));
    lj["window"] = att.sliding() ? json(att.window) : json(nullptr);
    json tensors;
    auto one = [&](Tensor t, const Tensor3& x) {
      const std::vector<ValueStats> heads = value_stats_per_head(x);
      ValueStats all;
      for (const auto& h : heads) all.merge(h);
      const std::vector<int64_t> shape{x.heads(), x.tokens(), x.dim()};
      const std::string dt(dtype_name(r.dataset_dtype(l, t)));
      json tj = stats_json(all);
      tj["shape"] = shape;
      tj["dtype"] = dt;
      json hj = json::array();
      for (const auto& h : heads) hj.push_back(stats_json(h));
      tj["heads"] = hj;
      tensors[std::string(tensor_name(t))] = tj;
      if (!a.json) {
        auto num = [&](double v) { return all.count ? fmt::format("{:>11.4g}", v) : fmt::format("{:>11}", "-"); };
        fmt::print("{:<6} {:<3} {:<18} {:<8} {} {} {} {} {:>6} {:>6}\n", l, tensor_name(t), shape_text(shape), dt,
                   num(all.min), num(all.max), num(all.mean), num(all.std()), all.nan, all.inf);
        std::fflush(stdout);
      }
    };
    one(Tensor::q, ld.q);
    one(Tensor::k, ld.k);
    if (ld.v) one(Tensor::v, *ld.v);
    lj["tensors"] = tensors;
    layers.push_back(lj);
    progress.tick();
  }
  progress.done();
  if (a.json) {
    j["layers"] = layers;
    fmt::print("{}\n", j.dump(2));
  }
  return 0;
}

// ----- export ---------------------------------------------------------------------------------

struct ExportArgs {
  std::string file, out, tokens, qk = "q", format;
  int layer = -1, head = -1;
  bool allow_nonfinite = false;
};

std::string infer_format(const std::string& out) {
  const std::string ext = std::filesystem::path(out).extension().string();
  if (ext == ".csv") return "csv";
  if (ext == ".npy") return "npy";
  if (ext == ".bin" || ext == ".f32" || ext == ".raw") return "bin";
  throw cli::usage_error("--format", "not given and not implied by the extension of " + out + " (csv, npy or bin)");
}

// Little-endian float32 bytes of a [n, d] block.
void write_f32_le(std::ostream& os, const float* p, size_t n) {
  if constexpr (std::endian::native == std::endian::little) {
    os.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(n * sizeof(float)));
  } else {
    for (size_t i = 0; i < n; ++i) {
      uint32_t b;
      std::memcpy(&b, p + i, 4);
      b = ((b & 0xffu) << 24) | ((b & 0xff00u) << 8) | ((b >> 8) & 0xff00u) | (b >> 24);
      os.write(reinterpret_cast<const char*>(&b), 4);
    }
  }
}

// .npy format 1.0: magic, version, little-endian header length, a Python dict literal padded
// with spaces to a multiple of 64 bytes and ended by '\n', then the raw C-order data.
std::string npy_header(int64_t rows, int64_t cols) {
  std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(rows) + ", " +
                     std::to_string(cols) + "), }";
  const size_t prefix = 10;  // magic(6) + version(2) + header_len(2)
  size_t total = prefix + dict.size() + 1;
  const size_t padded = (total + 63) / 64 * 64;
  dict.append(padded - total, ' ');
  dict.push_back('\n');
  std::string h = "\x93NUMPY";
  h.push_back('\x01');
  h.push_back('\x00');
  const uint16_t len = static_cast<uint16_t>(dict.size());
  h.push_back(static_cast<char>(len & 0xff));
  h.push_back(static_cast<char>(len >> 8));
  return h + dict;
}

int cmd_export(const ExportArgs& a) {
  const std::string format = a.format.empty() ? infer_format(a.out) : a.format;
  require_writable_parent(a.out);
  require_output_file_target(a.out);
  StoreReader r(a.file, ReadOptions{.allow_nonfinite = a.allow_nonfinite});
  const StoreMeta& m = r.meta();
  const Tensor which = parse_tensor(a.qk);
  const auto& ls = r.layers();
  if (std::find(ls.begin(), ls.end(), a.layer) == ls.end())
    throw Error("--layer " + std::to_string(a.layer) + ": not in " + a.file + " (layers stored: " + format_id_ranges(ls) + ")");
  if (which == Tensor::v && !r.has_v(a.layer))
    throw Error("--qk v: " + a.file + " has no v dataset in layer " + std::to_string(a.layer));
  const int heads = which == Tensor::q ? m.num_q_heads : m.num_kv_heads;
  if (a.head < 0 || a.head >= heads)
    throw Error("--head " + std::to_string(a.head) + ": outside [0, " + std::to_string(heads) + ") for " +
                std::string(tensor_name(which)) + " in " + a.file);
  int64_t t0 = 0, t1 = m.seq_len;
  if (!a.tokens.empty()) std::tie(t0, t1) = cli::parse_range(a.tokens, m.seq_len, "--tokens");

  const Tensor3 x = r.read(a.layer, which, a.head, a.head + 1, t0, t1);
  const int64_t n = x.tokens(), d = x.dim();

  AtomicFile f(a.out, format != "csv");
  std::ostream& os = f.stream();
  if (format == "npy") {
    os << npy_header(n, d);
    write_f32_le(os, x.data(), static_cast<size_t>(n * d));
  } else if (format == "bin") {
    write_f32_le(os, x.data(), static_cast<size_t>(n * d));
  } else {
    std::string line = "token";
    for (int64_t c = 0; c < d; ++c) line += fmt::format(",d{}", c);
    os << line << '\n';
    for (int64_t t = 0; t < n; ++t) {
      line = std::to_string(t0 + t);
      const float* row = x.row(0, t);
      for (int64_t c = 0; c < d; ++c) line += fmt::format(",{}", row[c]);  // shortest exact repr
      os << line << '\n';
    }
  }
  f.commit();
  return 0;
}

// ----- synth ----------------------------------------------------------------------------------

struct SynthArgs {
  std::string out, model, dtype = "f16";
  int64_t len = 0;
  int layers = 0;
  std::string seed = "0";
  bool gzip = false, quiet = false, no_v = false;
};

// A seed is a decimal integer in [0, 2^64).
uint64_t parse_seed(const std::string& s) {
  if (s.empty() || s.size() > 20 || !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }))
    throw cli::usage_error("--seed", "'" + s + "' is not an integer in [0, 2^64)");
  errno = 0;
  const unsigned long long v = std::strtoull(s.c_str(), nullptr, 10);
  if (errno == ERANGE) throw cli::usage_error("--seed", "'" + s + "' is not an integer in [0, 2^64)");
  return static_cast<uint64_t>(v);
}

int cmd_synth(const SynthArgs& a) {
  const uint64_t seed = parse_seed(a.seed);
  if (a.out.empty()) throw cli::usage_error("OUT", "empty path");
  const ModelConfig cfg = load_model_config(a.model);
  if (a.len < 1 || a.len > max_synth_len)
    throw cli::usage_error("--len", std::to_string(a.len) + " outside [1, " + std::to_string(max_synth_len) + "]");
  if (a.layers < 0 || a.layers > cfg.num_layers)
    throw cli::usage_error("--layers", std::to_string(a.layers) + " outside [0, " + std::to_string(cfg.num_layers) +
                                           "] (" + cfg.name + " has " + std::to_string(cfg.num_layers) + " layers)");
  require_writable_parent(a.out);
  require_output_file_target(a.out);
  {
    // One layer of q, k, v in memory (float32) plus the writer's per-head scratch.
    const std::string what = "synth " + a.out;
    const int64_t heads = int64_t{cfg.num_q_heads} + 2 * int64_t{cfg.num_kv_heads};
    const int64_t layer = checked_product({heads, a.len, cfg.head_dim, 4}, what);
    require_fits(checked_add(layer, checked_product({a.len, cfg.head_dim, 4}, what), what), what);
  }
  SynthOptions so;
  so.seq_len = a.len;
  so.num_layers = a.layers;
  so.seed = seed;
  so.with_v = !a.no_v;
  const SynthGenerator gen(cfg, so);
  WriteOptions wo;
  wo.dtype = parse_dtype(a.dtype);
  wo.gzip = a.gzip;
  Progress progress("synth " + a.out, gen.num_layers(), a.quiet);
  write_synth_store(a.out, gen, wo, [&](int) { progress.tick(); });
  progress.done();
  if (!a.quiet) {
    std::error_code ec;
    const auto bytes = std::filesystem::file_size(a.out, ec);
    fmt::print("wrote {}: {} layers of {} (q {}, kv {}, d {}), N={}, {}, seed {}, {:.1f} MiB\n", a.out,
               gen.num_layers(), cfg.name, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, a.len,
               dtype_name(wo.dtype), a.seed, ec ? 0.0 : static_cast<double>(bytes) / (1024.0 * 1024.0));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Inspect, export and synthesize proxyattn Q/K stores (HDF5)", "proxyattn-dump"};
  cli::add_version_flag(app);
  app.require_subcommand(1);

  InfoArgs ia;
  auto* info = app.add_subcommand("info", "Attributes, layers, shapes, dtypes and value statistics of a store");
  info->add_option("FILE", ia.file, "Store (.h5)")->required();
  info->add_flag("--json", ia.json, "Machine-readable output with per-head statistics");
  info->add_flag("-q,--quiet", ia.quiet, "No progress on stderr");

  ExportArgs ea;
  auto* exp = app.add_subcommand("export", "Write one head of one layer's q, k or v as csv, npy or raw float32");
  exp->add_option("FILE", ea.file, "Store (.h5)")->required();
  exp->add_option("--layer", ea.layer, "Layer id")->required();
  exp->add_option("--head", ea.head, "Head index within the tensor (q: [0, Hq), k/v: [0, Hkv))")->required();
  exp->add_option("--tokens", ea.tokens, "Token range a:b (half-open; a or b may be omitted)");
  exp->add_option("--qk", ea.qk, "Which tensor")->check(CLI::IsMember({"q", "k", "v"}))->capture_default_str();
  exp->add_option("--format", ea.format, "Output format (default: from the extension of -o): csv = header line, then one row per "
                 "token (token index, d values); npy = float32 [tokens, d]; bin = raw little-endian float32")
      ->check(CLI::IsMember({"csv", "npy", "bin"}));
  exp->add_option("-o,--out", ea.out, "Output file")->required();
  exp->add_flag("--allow-nonfinite", ea.allow_nonfinite, "Export NaN/Inf values instead of failing");

  SynthArgs sa;
  auto* syn = app.add_subcommand("synth", "Write a structured synthetic store shaped like a model");
  syn->add_option("OUT", sa.out, "Output store (.h5)")->required();
  syn->add_option("--model", sa.model, "Model config, e.g. configs/models/llama-3.1-8b.json")->required();
  syn->add_option("--len", sa.len, "Sequence length N")->required();
  syn->add_option("--layers", sa.layers, "Generate the first L layers (default: all)");
  syn->add_option("--seed", sa.seed, "Random seed")->capture_default_str();
  syn->add_option("--dtype", sa.dtype, "Storage dtype")->check(CLI::IsMember({"f16", "f32", "float16", "float32"}))
      ->capture_default_str();
  syn->add_flag("--gzip", sa.gzip, "Shuffle + gzip compression");
  syn->add_flag("--no-v", sa.no_v, "Do not write V");
  syn->add_flag("-q,--quiet", sa.quiet, "No progress and no summary line");

  return cli::run_main(app, argc, argv, [&]() -> int {
    if (*info) return cmd_info(ia);
    if (*exp) return cmd_export(ea);
    if (syn->count("--layers") > 0 && sa.layers < 1)
      throw cli::usage_error("--layers", std::to_string(sa.layers) + " must be >= 1 (leave it out for all layers)");
    return cmd_synth(sa);
  });
}
