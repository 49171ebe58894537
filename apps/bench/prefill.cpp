// proxyattn-bench prefill: time to first token of a whole model (batch 1) on the model runtime's
// CUDA back end, seeded random bf16 weights of a configs/models shape, attention in every layer
// full or a method's device pipeline; stage breakdown from the forward's CUDA events, linear
// layers' TFLOP/s beside a plain cuBLAS GEMM ceiling measured in the same run, peak memory.
//
//   proxyattn-bench prefill --sweep configs/sweeps/prefill.json --out results/prefill
//   proxyattn-bench prefill --models configs/models/llama-3.1-8b.json --lengths 8K,32K
//       --methods full,proxyattn@density=0.1 --reps 3      (one command)
//
// Sweep file (kind "prefill"): name, description, figure, models [paths], lengths, methods,
// repetitions, warmup, seed, token_chunk, block, gpu_mem_fraction, and "peers" (read by
// scripts/bench_peers.py only). Methods: full | proxyattn@density=D | proxyattn@gamma=G |
// NAME (a registry method with a device estimate, at its native rule).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli_common.hpp"
#include "prefill.hpp"
#include "report.hpp"
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/device_pipeline.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/io.hpp"
#include "proxyattn/kernels.h"
#include "proxyattn/methods.hpp"
#include "proxyattn/model/model.hpp"
#include "proxyattn/model_config.hpp"
#include "proxyattn/progress.hpp"
#include "proxyattn/version.hpp"
#include "sweep.hpp"

namespace proxyattn::bench {

namespace {

namespace kn = proxyattn::kernels;
using json = nlohmann::json;

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

struct PrefillMethod {
  std::string label;
  std::optional<PipelineSpec> spec;  // none: full attention
};

struct PrefillSweep {
  std::string name = "prefill", description, figure, source;
  std::vector<std::string> model_paths;
  std::vector<int64_t> lengths;
  std::vector<std::string> methods;
  int repetitions = 3, warmup = 1, block = 128;
  uint64_t seed = 1;
  int64_t token_chunk = 16384;
  double gpu_mem_fraction = 0.9;
  json raw = json::object();
};

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

PrefillSweep load_prefill_sweep(const std::string& path) {
  PrefillSweep s;
  if (path.empty()) {
    s.model_paths = {"configs/models/llama-3.1-8b.json"};
    s.lengths = {8192, 32768};
    s.methods = {"full", "proxyattn@density=0.1"};
    return s;
  }
  s.source = path;
  json j;
  try {
    j = json::parse(read_text(path));
  } catch (const json::parse_error& e) {
    std::string w = e.what();
    std::replace(w.begin(), w.end(), '\n', ' ');
    throw Error(path + ": invalid JSON: " + w);
  }
  if (!j.is_object()) throw Error(path + ": expected a JSON object");
  s.raw = j;
  static const std::vector<std::string> keys = {"name", "kind", "description", "figure", "models", "lengths",
                                                "methods", "repetitions", "warmup", "seed", "token_chunk", "block",
                                                "gpu_mem_fraction", "peers"};
  for (auto it = j.begin(); it != j.end(); ++it)
    if (std::find(keys.begin(), keys.end(), it.key()) == keys.end())
      throw Error(path + ": unknown key '" + it.key() + "' in a prefill sweep");
  if (j.value("kind", std::string()) != "prefill") throw Error(path + ": field 'kind' must be \"prefill\"");
  auto str = [&](const char* k, std::string& out) {
    if (!j.contains(k)) return;
    if (!j[k].is_string()) throw Error(path + ": field '" + k + "' must be a string");
    out = j[k].get<std::string>();
  };
  str("name", s.name);
  str("description", s.description);
  str("figure", s.figure);
  auto strings = [&](const char* k) {
    std::vector<std::string> v;
    if (!j.contains(k) || !j[k].is_array() || j[k].empty())
      throw Error(path + ": field '" + k + "' must be a non-empty array");
    for (const auto& x : j[k]) {
      if (x.is_string()) v.push_back(x.get<std::string>());
      else if (x.is_number_integer()) v.push_back(std::to_string(x.get<int64_t>()));
      else throw Error(path + ": field '" + k + "' holds " + x.dump() + " (strings expected)");
    }
    return v;
  };
  for (const std::string& m : strings("models")) s.model_paths.push_back(resolve_path(m, path));
  for (const std::string& l : strings("lengths")) s.lengths.push_back(parse_length(l, path + ": lengths"));
  s.methods = strings("methods");
  auto integer = [&](const char* k, int64_t lo, int64_t hi, auto& out) {
    if (!j.contains(k)) return;
    if (!j[k].is_number_integer() || j[k].get<int64_t>() < lo || j[k].get<int64_t>() > hi)
      throw Error(fmt::format("{}: field '{}' must be an integer in [{}, {}]", path, k, lo, hi));
    out = static_cast<std::decay_t<decltype(out)>>(j[k].get<int64_t>());
  };
  integer("repetitions", 1, 1000, s.repetitions);
  integer("warmup", 0, 1000, s.warmup);
  integer("seed", 0, INT64_MAX, s.seed);
  integer("token_chunk", 1, int64_t{1} << 24, s.token_chunk);
  integer("block", 64, 128, s.block);
  if (j.contains("gpu_mem_fraction")) {
    if (!j["gpu_mem_fraction"].is_number() || !(j["gpu_mem_fraction"].get<double>() > 0) ||
        j["gpu_mem_fraction"].get<double>() > 1)
      throw Error(path + ": field 'gpu_mem_fraction' must be in (0, 1]");
    s.gpu_mem_fraction = j["gpu_mem_fraction"].get<double>();
  }
  return s;
}

double parse_fraction(const std::string& v, const std::string& label) {
  size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || !(x > 0) || x > 1) throw Error("method '" + label + "': '" + v + "' is not a number in (0, 1]");
  return x;
}

PrefillMethod parse_prefill_method(const std::string& label, int block) {
  PrefillMethod m;
  m.label = label;
  if (label == "full") return m;
  PipelineSpec spec;
  spec.block = block;
  if (label.rfind("proxyattn@", 0) == 0) {
    spec.method = &proxyattn_method();
    const std::string arg = label.substr(10);
    if (arg.rfind("density=", 0) == 0) spec.density = parse_fraction(arg.substr(8), label);
    else if (arg.rfind("gamma=", 0) == 0) spec.gamma = parse_fraction(arg.substr(6), label);
    else throw Error("method '" + label + "': expected proxyattn@density=D or proxyattn@gamma=G");
  } else {
    spec.method = &find_method(label);  // Error listing the names
  }
  if (const std::string why = DevicePipeline::unsupported_reason(spec); !why.empty())
    throw Error("method '" + label + "': " + why);
  m.spec = spec;
  return m;
}

void ck(kn::Status s, const std::string& what) { throw_on_failure(s, what); }

// One GEMM through the runtime's launcher on its own buffers (seeded N(0, 1) operands,
// y = x . w^T (+ y when beta = 1)), timed as a sustained workload: back-to-back launches for
// `sustain_ms` first, then the median of 10 timed ones. Why sustained: under a long run the H200
// clocks down to its power limit (a square GEMM fell from 796 to 652 TFLOP/s between the start and
// the end of one sweep, 2026-12-03), so a cold burst of a few launches is not the rate a prefill
// of seconds can reach; the burst rate is reported beside it.
class GemmProbe {
 public:
  GemmProbe(int64_t m, int64_t n, int64_t k, kn::ElemType y_type, float beta) {
    const size_t y_elem = y_type == kn::ElemType::f32 ? 4 : 2;
    ck(a_.allocate(size_t(m * k) * 2), "alloc GEMM probe");
    ck(b_.allocate(size_t(n * k) * 2), "alloc GEMM probe");
    ck(c_.allocate(size_t(m * n) * y_elem), "alloc GEMM probe");
    ck(kn::fill_normal(a_.data(), kn::ElemType::bf16, m * k, 1, 1.0f), "fill");
    ck(kn::fill_normal(b_.data(), kn::ElemType::bf16, n * k, 2, 1.0f), "fill");
    ck(kn::fill_normal(c_.data(), y_type, m * n, 3, 1.0f), "fill");
    g_.x = a_.data();
    g_.w = b_.data();
    g_.y = c_.data();
    g_.y_type = y_type;
    g_.beta = beta;
    g_.m = m;
    g_.n = n;
    g_.k = k;
  }
  static double bytes(int64_t m, int64_t n, int64_t k, kn::ElemType y_type) {
    return double(m * k + n * k) * 2 + double(m * n) * (y_type == kn::ElemType::f32 ? 4 : 2);
  }
  double tflops(double sustain_ms) {
    kn::EventTimer ev;
    ck(kn::gemm(g_), "GEMM probe");  // the first call of a shape tunes it
    double spent = 0;
    while (spent < sustain_ms) {
      ck(ev.start(), "event");
      for (int i = 0; i < 8; ++i) ck(kn::gemm(g_), "GEMM probe");
      ck(ev.stop(), "event");
      float ms = 0;
      ck(ev.elapsed_ms(&ms), "event");
      spent += ms;
    }
    std::vector<double> t;
    for (int i = 0; i < 10; ++i) {
      ck(ev.start(), "event");
      ck(kn::gemm(g_), "GEMM probe");
      ck(ev.stop(), "event");
      float ms = 0;
      ck(ev.elapsed_ms(&ms), "event");
      t.push_back(ms);
    }
    return 2.0 * double(g_.m) * g_.n * g_.k / (median_of(t) * 1e-3) / 1e12;
  }

 private:
  kn::DeviceBuffer a_, b_, c_;
  kn::GemmParams g_;
};

constexpr int64_t kCeilingSize = 8192;  // the ceiling: a plain m = n = k = 8192 GEMM, bf16 out
constexpr double kSustainMs = 250;

// The model's four projection GEMMs at one token chunk, each alone and sustained, each beside the
// sustained ceiling measured just before it: which of them holds the linear layers below it.
// Output types and beta as the runtime launches them.
json model_gemm_shapes(const ModelConfig& c, int64_t rows, GemmProbe& ceiling) {
  const int64_t E = c.hidden_size, F = c.intermediate_size, D = c.head_dim;
  struct Shape {
    const char* name;
    int64_t n, k;
    kn::ElemType y;
    float beta;
  };
  const Shape shapes[] = {{"qkv", (c.num_q_heads + 2 * c.num_kv_heads) * D, E, kn::ElemType::bf16, 0.0f},
                          {"o (+= residual)", E, c.num_q_heads * D, kn::ElemType::f32, 1.0f},
                          {"gate/up", 2 * F, E, kn::ElemType::bf16, 0.0f},
                          {"down (+= residual)", E, F, kn::ElemType::f32, 1.0f}};
  json out = json::array();
  for (const Shape& s : shapes) {
    const double ceil_tf = ceiling.tflops(kSustainMs);
    const double tf = GemmProbe(rows, s.n, s.k, s.y, s.beta).tflops(kSustainMs);
    out.push_back({{"model", c.name}, {"gemm", s.name}, {"m", rows}, {"n", s.n}, {"k", s.k},
                   {"y", s.y == kn::ElemType::f32 ? "f32" : "bf16"}, {"beta", s.beta}, {"tflops", tf},
                   {"gemm_ceiling_tflops", ceil_tf}, {"pct_of_ceiling", 100.0 * tf / ceil_tf}});
  }
  return out;
}

const std::vector<std::string>& prefill_columns() {
  static const std::vector<std::string> c = {
      "source", "device", "model", "method", "n", "dtype", "layers", "density", "ttft_ms", "ttft_ms_min",
      "ttft_ms_max", "reps", "linear_ms", "elementwise_ms", "estimation_ms", "attention_ms", "logits_ms",
      "linear_tflops", "gemm_ceiling_tflops", "linear_pct_of_ceiling", "peak_mem_gib", "speedup_vs_full", "status",
      "reason"};
  return c;
}

std::string csv_cell(const json& v) {
  if (v.is_null()) return "";
  if (v.is_string()) {
    std::string s = v.get<std::string>();
    if (s.find_first_of(",\"\n") == std::string::npos) return s;
    std::string q = "\"";
    for (char ch : s) q += ch == '"' ? std::string("\"\"") : std::string(1, ch);
    return q + "\"";
  }
  if (v.is_number_float()) return fmt::format("{:.9g}", v.get<double>());
  return v.dump();
}

std::string rows_csv(const std::vector<json>& rows) {
  std::string out;
  for (size_t i = 0; i < prefill_columns().size(); ++i) out += (i ? "," : "") + prefill_columns()[i];
  out += "\n";
  for (const json& r : rows) {
    for (size_t i = 0; i < prefill_columns().size(); ++i)
      out += (i ? "," : "") + csv_cell(r.value(prefill_columns()[i], json()));
    out += "\n";
  }
  return out;
}

std::string rows_markdown(const std::vector<json>& rows, const json& ctx) {
  auto f = [](const json& v, const char* spec = "{:.1f}") {
    return v.is_null() ? std::string("–") : fmt::format(fmt::runtime(spec), v.get<double>());
  };
  std::string out = fmt::format("# proxyattn-bench prefill: {}\n\nDevice: {} · {} · git {} · TTFT = device time of the "
                                "whole forward (CUDA events), batch 1, random bf16 weights; GEMM ceiling = cuBLAS bf16 8192³ "
                                "sustained (250 ms of launches, then 10 timed), measured right after each case "
                                "(a cold burst at the start of the run: {:.0f} TFLOP/s)\n\n",
                                ctx.value("sweep", std::string("prefill")), ctx.value("device_name", std::string("?")),
                                ctx.value("date", std::string("?")), ctx.value("git_sha", std::string("?")),
                                ctx.value("gemm_ceiling_burst_tflops", 0.0));
  out += "| model | method | N | density | TTFT ms | linear ms | elementwise ms | estimation ms | attention ms | "
         "logits ms | linear TFLOP/s | ceiling TFLOP/s | linear % of ceiling | peak GiB | speedup vs full |\n";
  out += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  std::string skipped;
  for (const json& r : rows) {
    if (r["status"] != "ok") {
      skipped += fmt::format("- {} {} N={}: {} — {}\n", r["model"].get<std::string>(), r["method"].get<std::string>(),
                             r["n"].get<int64_t>(), r["status"].get<std::string>(), r["reason"].get<std::string>());
      continue;
    }
    out += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} % | {} | {} |\n",
                       r["model"].get<std::string>(), r["method"].get<std::string>(), r["n"].get<int64_t>(),
                       f(r["density"], "{:.3f}"), f(r["ttft_ms"]), f(r["linear_ms"]), f(r["elementwise_ms"]),
                       f(r["estimation_ms"]), f(r["attention_ms"]), f(r["logits_ms"]), f(r["linear_tflops"], "{:.0f}"),
                       f(r["gemm_ceiling_tflops"], "{:.0f}"), f(r["linear_pct_of_ceiling"], "{:.0f}"), f(r["peak_mem_gib"]), f(r["speedup_vs_full"], "{:.2f}×"));
  }
  if (!skipped.empty()) out += "\nNot run:\n\n" + skipped;
  if (ctx.contains("gemm_shapes") && !ctx["gemm_shapes"].empty()) {
    out += "\nEach projection GEMM alone at one token chunk, sustained, beside the sustained ceiling measured just "
           "before it:\n\n| model | GEMM | m × n × k | out | TFLOP/s | ceiling TFLOP/s | % ceiling |\n"
           "|---|---|---|---|---|---|---|\n";
    for (const json& g : ctx["gemm_shapes"])
      out += fmt::format("| {} | {} | {} × {} × {} | {} | {:.0f} | {:.0f} | {:.0f} |\n", g["model"].get<std::string>(),
                         g["gemm"].get<std::string>(), g["m"].get<int64_t>(), g["n"].get<int64_t>(),
                         g["k"].get<int64_t>(), g["y"].get<std::string>(), g["tflops"].get<double>(),
                         g["gemm_ceiling_tflops"].get<double>(),
                         g["pct_of_ceiling"].get<double>());
  }
  return out;
}

}  // namespace

int prefill_main(int argc, char** argv) {
  CLI::App app{"proxyattn-bench prefill: time to first token of a whole model (random bf16 weights, CUDA back end), "
               "full attention vs block-sparse methods in every layer",
               "proxyattn-bench prefill"};
  std::string sweep_path, out_dir;
  std::vector<std::string> models, lengths, methods;
  int reps = 0, warmup = -1;
  int64_t chunk = 0;
  bool quiet = false;
  app.add_option("--sweep", sweep_path, "prefill sweep (configs/sweeps/prefill.json)");
  app.add_option("--models", models, "model configs (configs/models/*.json with the whole-model fields)")->delimiter(',');
  app.add_option("--lengths", lengths, "sequence lengths, e.g. 8K,32K,131072")->delimiter(',');
  app.add_option("--methods", methods, "full, proxyattn@density=D, proxyattn@gamma=G, pooled, xattn, vslash")->delimiter(',');
  app.add_option("--reps", reps, "timed repetitions per case");
  app.add_option("--warmup", warmup, "untimed forwards before timing");
  app.add_option("--token-chunk", chunk, "rows per projection/MLP chunk");
  app.add_option("--out", out_dir, "write prefill.json, prefill.csv and prefill.md here");
  app.add_flag("--quiet", quiet, "no progress on stderr");
  return cli::run_main(app, argc, argv, [&]() -> int {
    PrefillSweep sw = load_prefill_sweep(sweep_path);
    if (!models.empty()) sw.model_paths = models;
    if (!lengths.empty()) {
      sw.lengths.clear();
      for (const std::string& l : lengths) sw.lengths.push_back(parse_length(l, "--lengths"));
    }
    if (!methods.empty()) sw.methods = methods;
    if (app.count("--reps")) {
      if (reps < 1) throw cli::usage_error("--reps", "must be >= 1");
      sw.repetitions = reps;
    }
    if (app.count("--warmup")) {
      if (warmup < 0) throw cli::usage_error("--warmup", "must be >= 0");
      sw.warmup = warmup;
    }
    if (app.count("--token-chunk")) {
      if (chunk < 1) throw cli::usage_error("--token-chunk", "must be >= 1");
      sw.token_chunk = chunk;
    }
    for (int64_t n : sw.lengths)
      if (n < 2) throw Error("lengths: " + std::to_string(n) + " is too short for a prefill");
    std::vector<ModelConfig> shapes;
    for (const std::string& p : sw.model_paths) {
      shapes.push_back(load_model_config(p));
      if (!shapes.back().has_full_shape())
        throw Error(p + ": no hidden_size / intermediate_size / vocab_size (a prefill needs the whole model's shape)");
    }
    std::vector<PrefillMethod> ms;
    for (const std::string& l : sw.methods) ms.push_back(parse_prefill_method(l, sw.block));
    if (!out_dir.empty()) {
      require_output_dir_target(out_dir, "--out", [](const std::string&, bool) { return true; });
      for (const char* f : {"prefill.json", "prefill.csv", "prefill.md"})
        require_output_file_target((std::filesystem::path(out_dir) / f).string());
    }
    if (kn::device_count() < 1)
      throw Error(std::string("the prefill benchmark needs a CUDA device: ") +
                  (built_with_cuda() ? "none found" : "this build has no CUDA kernels"));
    int dev = 0;
    kn::DeviceInfo info;
    ck(kn::current_device(&dev), "current_device");
    ck(kn::device_info(dev, &info), "device_info");

    // The ceiling's buffers stay allocated for the run (counted in every case's memory need).
    GemmProbe ceiling(kCeilingSize, kCeilingSize, kCeilingSize, kn::ElemType::bf16, 0.0f);
    const double ceiling_bytes = GemmProbe::bytes(kCeilingSize, kCeilingSize, kCeilingSize, kn::ElemType::bf16);
    const double burst = ceiling.tflops(0);
    json ctx = {{"sweep", sw.name},
                {"source", sw.source},
                {"description", sw.description},
                {"figure", sw.figure},
                {"device_name", info.name},
                {"sm_count", info.sm_count},
                {"global_mem_gib", double(info.global_mem) / kGiB},
                {"date", utc_now()},
                {"git_sha", git_sha()},
                {"version", version()},
                {"gemm_ceiling_burst_tflops", burst},
                {"gemm_ceiling", "cuBLASLt bf16 x bf16 -> bf16, fp32 compute, m = n = k = 8192, the runtime's launcher "
                                 "(tuned), sustained: 250 ms of back-to-back launches then the median of 10, measured "
                                 "right after each case (gemm_ceiling_tflops of each row); gemm_ceiling_burst_tflops: "
                                 "the median of 10 launches on the cold GPU at the start"},
                {"timing", "device time of the whole forward (CUDA events from its first to its last launch; host "
                           "waits inside it count), median of repetitions after warm-up; stages = sums of the gaps "
                           "between consecutive launches' events"},
                {"weights", "seeded random bf16 (N(0, 0.02)), unit norms; tokens seeded uniform over the vocabulary"},
                {"token_chunk", sw.token_chunk},
                {"block", sw.block},
                {"sweep_raw", sw.raw}};
    if (!quiet)
      std::fprintf(stderr, "proxyattn-bench prefill: %s, cuBLAS bf16 GEMM ceiling %.0f TFLOP/s (cold burst)\n",
                   info.name, burst);

    // Per-GEMM rates before any model is loaded (the probes need their own buffers).
    json gemm_shapes = json::array();
    for (const ModelConfig& shape : shapes)
      for (json& g : model_gemm_shapes(shape, std::min<int64_t>(sw.token_chunk, *std::max_element(sw.lengths.begin(),
                                                                                                    sw.lengths.end())),
                                       ceiling))
        gemm_shapes.push_back(std::move(g));
    ctx["gemm_shapes"] = gemm_shapes;

    std::vector<json> rows;
    Progress progress("prefill", int64_t(shapes.size() * sw.lengths.size() * ms.size()), quiet);
    for (size_t mi = 0; mi < shapes.size(); ++mi) {
      const ModelConfig& shape = shapes[mi];
      const double weights = model::model_weight_bytes(shape);
      const double limit = sw.gpu_mem_fraction * double(info.global_mem);
      std::unique_ptr<model::Model> mdl;
      for (int64_t n : sw.lengths) {
        for (const PrefillMethod& pm : ms) {
          json r = {{"source", "proxyattn-bench"}, {"device", "cuda"}, {"model", shape.name}, {"method", pm.label},
                    {"n", n}, {"dtype", "bf16"}, {"layers", shape.num_layers}, {"status", "ok"}, {"reason", ""}};
          for (const char* k : {"density", "ttft_ms", "ttft_ms_min", "ttft_ms_max", "linear_ms", "elementwise_ms",
                                "estimation_ms", "attention_ms", "logits_ms", "linear_tflops", "gemm_ceiling_tflops",
                                "linear_pct_of_ceiling", "peak_mem_gib", "speedup_vs_full"})
            r[k] = nullptr;
          r["reps"] = 0;
          const AttentionShape as{shape.num_q_heads, shape.num_kv_heads, shape.head_dim, n};
          const double need = weights + ceiling_bytes + model::forward_workspace_bytes(shape, n, sw.token_chunk) +
                              (pm.spec ? DevicePipeline::bytes(*pm.spec, as) : 0.0);
          std::string skip;
          // Random weights: lengths past the model's context are timed too (the paper's 256K).
          if (need > limit)
            skip = fmt::format("would not fit GPU memory: needs {:.1f} GiB, limit {:.1f} GiB ({:.0f} % of {:.1f} GiB)",
                               need / kGiB, limit / kGiB, 100 * sw.gpu_mem_fraction, double(info.global_mem) / kGiB);
          if (!skip.empty()) {
            r["status"] = "skipped";
            r["reason"] = skip;
            rows.push_back(r);
            progress.tick();
            continue;
          }
          try {
            if (!mdl) {
              model::LoadOptions lo;
              lo.backend = model::Backend::cuda;
              lo.token_chunk = sw.token_chunk;
              mdl = model::random_model(shape, sw.seed, lo);
            }
            std::mt19937_64 rng(sw.seed + uint64_t(n));
            std::vector<int32_t> toks(static_cast<size_t>(n));
            for (auto& t : toks) t = int32_t(rng() % uint64_t(shape.vocab_size));
            std::optional<model::DevicePipelineAttention> policy;
            if (pm.spec) policy.emplace(*pm.spec);
            model::ForwardOptions o;
            o.logits_at = {n - 1};
            o.allow_overlength = true;
            o.attention = policy ? &*policy : nullptr;
            for (int w = 0; w < sw.warmup; ++w) mdl->forward(toks, o);
            std::vector<double> ttft, lin, elem, est, att, lg;
            model::ForwardResult last;
            size_t peak = 0;
            for (int rep = 0; rep < sw.repetitions; ++rep) {
              last = mdl->forward(toks, o);
              const model::DeviceStages& s = last.device;
              ttft.push_back(s.total_ms);
              lin.push_back(s.linear_ms);
              elem.push_back(s.elementwise_ms);
              est.push_back(s.estimation_ms);
              att.push_back(s.attention_ms);
              lg.push_back(s.logits_ms);
              peak = std::max(peak, s.peak_bytes);
            }
            double density = 1.0;
            if (policy && !policy->densities().empty()) {
              density = 0;
              int counted = 0;
              for (const auto& d : policy->densities())
                if (!d.windowed()) {  // a sliding-window layer is not the method's
                  density += d.block_density;
                  ++counted;
                }
              density = counted ? density / counted : 1.0;
            }
            r["density"] = density;
            r["ttft_ms"] = median_of(ttft);
            r["ttft_ms_min"] = *std::min_element(ttft.begin(), ttft.end());
            r["ttft_ms_max"] = *std::max_element(ttft.begin(), ttft.end());
            r["reps"] = sw.repetitions;
            r["linear_ms"] = median_of(lin);
            r["elementwise_ms"] = median_of(elem);
            r["estimation_ms"] = median_of(est);
            r["attention_ms"] = median_of(att);
            r["logits_ms"] = median_of(lg);
            const double tf = last.device.linear_flops / (median_of(lin) * 1e-3) / 1e12;
            r["linear_tflops"] = tf;
            const double ceil_tf = ceiling.tflops(kSustainMs);  // the GPU as this case left it
            r["gemm_ceiling_tflops"] = ceil_tf;
            r["linear_pct_of_ceiling"] = 100.0 * tf / ceil_tf;
            r["peak_mem_gib"] = double(peak) / kGiB;
          } catch (const Error& e) {
            r["status"] = "error";
            r["reason"] = e.what();
          }
          rows.push_back(r);
          progress.tick();
          if (!quiet && r["status"] == "ok")
            std::fprintf(stderr, "  %s %s N=%lld: TTFT %.1f ms (linear %.1f, attention %.1f, estimation %.1f)\n",
                         shape.name.c_str(), pm.label.c_str(), static_cast<long long>(n), r["ttft_ms"].get<double>(),
                         r["linear_ms"].get<double>(), r["attention_ms"].get<double>(), r["estimation_ms"].get<double>());
        }
      }
    }
    progress.done();
    // A cold-style burst again after the sweep: how far the clock moved during the run.
    ctx["gemm_ceiling_burst_end_tflops"] = ceiling.tflops(0);
    // Speedup over our full attention's TTFT at the same (model, N).
    for (json& r : rows) {
      if (r["status"] != "ok") continue;
      for (const json& f : rows)
        if (f["status"] == "ok" && f["method"] == "full" && f["model"] == r["model"] && f["n"] == r["n"])
          r["speedup_vs_full"] = f["ttft_ms"].get<double>() / r["ttft_ms"].get<double>();
    }
    json rep = {{"context", ctx}, {"columns", prefill_columns()}, {"rows", rows}};
    std::printf("%s", rows_markdown(rows, ctx).c_str());
    if (!out_dir.empty()) {
      AtomicDir d(out_dir, "--out", [](const std::string&, bool) { return true; });
      d.write("prefill.json", rep.dump(2) + "\n");
      d.write("prefill.csv", rows_csv(rows));
      d.write("prefill.md", rows_markdown(rows, ctx));
      d.commit();
    }
    int errors = 0;
    for (const json& r : rows) errors += r["status"] == "error";
    if (errors) {
      std::fprintf(stderr, "proxyattn-bench prefill: error: %d case(s) failed (reasons in the report)\n", errors);
      return 1;
    }
    return 0;
  });
}

}  // namespace proxyattn::bench
