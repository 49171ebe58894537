// Rows -> JSON / CSV / Markdown, and the derived columns (TFLOP/s, speedup, % of full).
#include <ctime>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include "report.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <tuple>

#include <fmt/format.h>

#include "proxyattn/error.hpp"
#include "proxyattn/io.hpp"

namespace proxyattn::bench {

namespace fs = std::filesystem;
using nlohmann::json;

const char* family_name(Family f) {
  switch (f) {
    case Family::full: return "full";
    case Family::sparse: return "sparse";
    case Family::estimate: return "estimate";
    case Family::proxyattn: return "proxyattn";
  }
  return "?";
}

const std::vector<std::string>& row_columns() {
  static const std::vector<std::string> cols = {
      "source", "device", "family", "method", "n", "dtype", "q_heads", "kv_heads", "head_dim", "block",
      "density_target", "density", "element_density", "gamma", "estimation_ms", "kernel_ms", "total_ms",
      "total_ms_min", "total_ms_max", "reps", "tflops_done", "tflops_effective", "speedup_vs_full",
      "pct_of_full", "status", "reason"};
  return cols;
}

double dense_causal_flops(int64_t n, int head_dim, int q_heads) {
  return 4.0 * static_cast<double>(n) * static_cast<double>(n) * head_dim * q_heads / 2.0;
}

void finish_rows(std::vector<Row>& rows) {
  // Our `full` of the same (device, n, dtype) is the reference of speedup and % of full.
  std::map<std::tuple<std::string, int64_t, std::string>, double> full;
  for (const Row& r : rows)
    if (r.family == "full" && r.status == "ok" && r.total_ms) full[{r.device, r.n, r.dtype}] = *r.total_ms;
  for (Row& r : rows) {
    if (r.status != "ok" || !r.total_ms || *r.total_ms <= 0) continue;
    const double dense = dense_causal_flops(r.n, r.head_dim, r.q_heads);
    if (r.family != "estimate") {
      r.tflops_effective = dense / (*r.total_ms * 1e-3) / 1e12;
      const double kernel = r.kernel_ms ? *r.kernel_ms : *r.total_ms;
      if (r.element_density && kernel > 0) r.tflops_done = dense * *r.element_density / (kernel * 1e-3) / 1e12;
    }
    auto it = full.find({r.device, r.n, r.dtype});
    if (it != full.end()) {
      r.speedup_vs_full = it->second / *r.total_ms;
      r.pct_of_full = 100.0 * *r.total_ms / it->second;
    }
  }
}

json row_to_json(const Row& r) {
  auto opt = [](const std::optional<double>& v) { return v ? json(*v) : json(nullptr); };
  json j = {{"source", r.source},
            {"device", r.device},
            {"family", r.family},
            {"method", r.method},
            {"n", r.n},
            {"dtype", r.dtype},
            {"q_heads", r.q_heads},
            {"kv_heads", r.kv_heads},
            {"head_dim", r.head_dim},
            {"block", r.block},
            {"density_target", opt(r.density_target)},
            {"density", opt(r.density)},
            {"element_density", opt(r.element_density)},
            {"gamma", opt(r.gamma)},
            {"estimation_ms", opt(r.estimation_ms)},
            {"kernel_ms", opt(r.kernel_ms)},
            {"total_ms", opt(r.total_ms)},
            {"total_ms_min", opt(r.total_ms_min)},
            {"total_ms_max", opt(r.total_ms_max)},
            {"reps", r.reps},
            {"tflops_done", opt(r.tflops_done)},
            {"tflops_effective", opt(r.tflops_effective)},
            {"speedup_vs_full", opt(r.speedup_vs_full)},
            {"pct_of_full", opt(r.pct_of_full)},
            {"status", r.status},
            {"reason", r.reason}};
  if (!r.extra.empty()) j["extra"] = r.extra;
  return j;
}

Row row_from_json(const json& j) {
  auto opt = [&](const char* k) { return j.at(k).is_null() ? std::optional<double>() : j.at(k).get<double>(); };
  Row r;
  r.source = j.at("source").get<std::string>();
  r.device = j.at("device").get<std::string>();
  r.family = j.at("family").get<std::string>();
  r.method = j.at("method").get<std::string>();
  r.n = j.at("n").get<int64_t>();
  r.dtype = j.at("dtype").get<std::string>();
  r.q_heads = j.at("q_heads").get<int>();
  r.kv_heads = j.at("kv_heads").get<int>();
  r.head_dim = j.at("head_dim").get<int>();
  r.block = j.at("block").get<int>();
  r.density_target = opt("density_target");
  r.density = opt("density");
  r.element_density = opt("element_density");
  r.gamma = opt("gamma");
  r.estimation_ms = opt("estimation_ms");
  r.kernel_ms = opt("kernel_ms");
  r.total_ms = opt("total_ms");
  r.total_ms_min = opt("total_ms_min");
  r.total_ms_max = opt("total_ms_max");
  r.reps = j.at("reps").get<int>();
  r.tflops_done = opt("tflops_done");
  r.tflops_effective = opt("tflops_effective");
  r.speedup_vs_full = opt("speedup_vs_full");
  r.pct_of_full = opt("pct_of_full");
  r.status = j.at("status").get<std::string>();
  r.reason = j.at("reason").get<std::string>();
  r.extra = j.value("extra", json::object());
  return r;
}

namespace {

std::string csv_cell(const json& v) {
  if (v.is_null()) return "";
  if (v.is_string()) {
    const std::string s = v.get<std::string>();
    if (s.find_first_of(",\"\n") == std::string::npos) return s;
    std::string q = "\"";
    for (char c : s) {
      if (c == '"') q += '"';
      q += (c == '\n' ? ' ' : c);
    }
    return q + "\"";
  }
  if (v.is_number_float()) return fmt::format("{:.9g}", v.get<double>());
  return v.dump();
}

std::string fmt_opt(const std::optional<double>& v, const char* spec = "{:.3f}") {
  return v ? fmt::format(fmt::runtime(spec), *v) : std::string("–");
}

}  // namespace

std::string rows_to_csv(const std::vector<Row>& rows) {
  std::string out;
  const auto& cols = row_columns();
  for (size_t i = 0; i < cols.size(); ++i) {
    if (i) out += ',';
    out += cols[i];
  }
  out += '\n';
  for (const Row& r : rows) {
    const json j = row_to_json(r);
    for (size_t i = 0; i < cols.size(); ++i) {
      if (i) out += ',';
      out += csv_cell(j.at(cols[i]));
    }
    out += '\n';
  }
  return out;
}

std::string rows_to_markdown(const std::vector<Row>& rows, const json& ctx) {
  std::string out;
  out += fmt::format("# proxyattn-bench: {}\n\n", ctx.value("sweep", std::string("run")));
  out += fmt::format("Device: {} · model {} ({} q / {} kv heads, d = {}) · git {} · {} · timing: {}\n\n",
                     ctx.value("device_name", std::string("?")), ctx.value("model", std::string("?")),
                     ctx.value("q_heads", 0), ctx.value("kv_heads", 0), ctx.value("head_dim", 0),
                     ctx.value("git_sha", std::string("?")), ctx.value("date", std::string("?")),
                     ctx.value("timing", std::string("?")));
  // Under mpirun: which ranks (hosts, devices) ran how many cases.
  if (const json d = ctx.value("distributed", json::object()); d.value("ranks", 1) > 1) {
    std::string who;
    for (const json& r : d.value("per_rank", json::array()))
      who += fmt::format("{}rank {} {} {} ({} cases)", who.empty() ? "" : ", ", r.value("rank", 0),
                         r.value("host", std::string("?")), r.value("device_name", std::string("?")),
                         r.value("cases", 0));
    out += fmt::format("MPI: {} ranks: {}\n\n", d.value("ranks", 1), who);
  }
  out += "| method | N | dtype | density | est. ms | kernel ms | total ms (min–max) | TFLOP/s done | eff. TFLOP/s | speedup vs full |\n";
  out += "|---|---|---|---|---|---|---|---|---|---|\n";
  std::vector<const Row*> skipped;
  for (const Row& r : rows) {
    if (r.status != "ok") {
      skipped.push_back(&r);
      continue;
    }
    const std::string total = r.total_ms ? fmt::format("{:.3f} ({:.3f}–{:.3f})", *r.total_ms, r.total_ms_min.value_or(*r.total_ms),
                                                        r.total_ms_max.value_or(*r.total_ms))
                                         : "–";
    out += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n", r.method, r.n, r.dtype,
                       fmt_opt(r.density, "{:.4f}"), fmt_opt(r.estimation_ms), fmt_opt(r.kernel_ms), total,
                       fmt_opt(r.tflops_done, "{:.4g}"), fmt_opt(r.tflops_effective, "{:.4g}"),
                       fmt_opt(r.speedup_vs_full, "{:.2f}×"));
  }
  if (!skipped.empty()) {
    out += "\nNot run:\n\n";
    for (const Row* r : skipped) out += fmt::format("- {} N={} {}: {} — {}\n", r->method, r->n, r->dtype, r->status, r->reason);
  }
  return out;
}

void write_reports(const std::string& dir, const std::vector<Row>& rows, const json& context, const json& config) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir, ec)) throw Error(dir + ": cannot create the output directory");
  json j = {{"schema_version", 1}, {"tool", "proxyattn-bench"}, {"context", context}, {"config", config},
            {"columns", row_columns()}, {"rows", json::array()}};
  for (const Row& r : rows) j["rows"].push_back(row_to_json(r));
  // All three staged first, then renamed; bench.json (the one readers trust) last.
  AtomicFile csv((fs::path(dir) / "bench.csv").string()), md((fs::path(dir) / "bench.md").string()),
      js((fs::path(dir) / "bench.json").string());
  csv.stream() << rows_to_csv(rows);
  md.stream() << rows_to_markdown(rows, context);
  js.stream() << j.dump(2) << "\n";
  // Two runs on one --out: their three renames never interleave (a lock on the folder).
  const int lock = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (lock >= 0) ::flock(lock, LOCK_EX);
  try {
    csv.commit();
    md.commit();
    js.commit();
  } catch (...) {
    if (lock >= 0) ::close(lock);
    throw;
  }
  if (lock >= 0) ::close(lock);
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace proxyattn::bench
