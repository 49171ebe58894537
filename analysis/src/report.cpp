// Report document helpers and renderers (JSON -> CSV, JSON -> Markdown), atomic writing.
#include "proxyattn/analysis/report.hpp"

#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <system_error>

#include <fmt/core.h>

#include "analysis_kernels.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/io.hpp"
#include "proxyattn/methods.hpp"
#include "proxyattn/version.hpp"

namespace proxyattn::analysis {

using json = nlohmann::json;

namespace {

std::string utc_now() {
  const std::time_t t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t c = line.find(':');
      if (c != std::string::npos) {
        std::string v = line.substr(c + 1);
        while (!v.empty() && v.front() == ' ') v.erase(v.begin());
        return v;
      }
    }
  return "unknown";
}

// ---- cells -------------------------------------------------------------------------------------

bool is_missing(const json& v) {
  return v.is_null() || (v.is_number_float() && !std::isfinite(v.get<double>()));
}

std::string csv_cell(const json& v) {
  if (is_missing(v)) return "nan";
  if (v.is_number_integer() || v.is_number_unsigned()) return v.dump();
  if (v.is_number_float()) return fmt::format("{:.10g}", v.get<double>());
  if (v.is_boolean()) return v.get<bool>() ? "1" : "0";
  const std::string s = v.is_string() ? v.get<std::string>() : v.dump();
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) {
    if (c == '"') q += '"';
    q += c;
  }
  return q + "\"";
}

// ---- markdown helpers --------------------------------------------------------------------------

// Rows of a table as column-name -> value maps (small tables only: used for rendering).
struct Rows {
  std::vector<std::string> columns;
  std::vector<std::map<std::string, json>> rows;
};

Rows rows_of(const json& report, const std::string& name) {
  Rows r;
  if (!report.contains("tables") || !report["tables"].contains(name)) return r;
  const json& t = report["tables"][name];
  for (const auto& c : t["columns"]) r.columns.push_back(c.get<std::string>());
  for (const auto& row : t["rows"]) {
    std::map<std::string, json> m;
    for (size_t i = 0; i < r.columns.size() && i < row.size(); ++i) m[r.columns[i]] = row[i];
    r.rows.push_back(std::move(m));
  }
  return r;
}

double dbl(const json& v) {
  if (is_missing(v) || !v.is_number()) return std::nan("");
  return v.get<double>();
}

std::string str(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (is_missing(v)) return "";
  return v.dump();
}

// Fixed decimals, "–" for a missing value.
std::string fx(const json& v, int decimals) {
  const double x = dbl(v);
  if (!std::isfinite(x)) return "–";
  return fmt::format("{:.{}f}", x, decimals);
}

std::string signed_pct(const json& v) {
  const double x = dbl(v);
  if (!std::isfinite(x)) return "–";
  return fmt::format("{:+.1f} %", 100.0 * x);
}
std::string pct(const json& v) {
  const double x = dbl(v);
  if (!std::isfinite(x)) return "–";
  return fmt::format("{:.1f} %", 100.0 * x);
}

void table_header(std::ostringstream& o, const std::vector<std::string>& cols) {
  o << "|";
  for (const auto& c : cols) o << " " << c << " |";
  o << "\n|";
  for (size_t i = 0; i < cols.size(); ++i) o << (i == 0 ? " :--- |" : " ---: |");
  o << "\n";
}

void table_row(std::ostringstream& o, const std::vector<std::string>& cells) {
  o << "|";
  for (const auto& c : cells) o << " " << c << " |";
  o << "\n";
}

bool same_num(const json& v, double x) {
  const double y = dbl(v);
  return std::isfinite(y) && std::abs(y - x) < 1e-12;
}

// Label of a selection for tables: "proxy (g=1)" (grouped methods), "xattn".
std::string method_label(const std::map<std::string, json>& r) {
  std::string m = str(r.at("method"));
  for (const MethodInfo* x : all_methods())
    if (x->name == m && x->grouped()) m += " (g=" + str(r.at("groups")) + ")";
  return m;
}
bool is_proxyattn(const std::map<std::string, json>& r) { return str(r.at("method")) == proxyattn_method().name; }

// ---- sections ----------------------------------------------------------------------------------

void section_stores(std::ostringstream& o, const json& report) {
  if (!report.contains("stores") || report["stores"].empty()) return;
  o << "## Stores\n\n";
  table_header(o, {"store", "model", "N", "layers", "Hq / Hkv", "d", "dtype", "V"});
  for (const auto& s : report["stores"]) {
    const std::string layers = s.contains("layers_analyzed")
                                   ? std::to_string(s["layers_analyzed"].size()) + " of " + str(s["num_layers"])
                                   : str(s["num_layers"]);
    table_row(o, {str(s["label"]), str(s["model"]), str(s["seq_len"]), layers,
                  str(s["num_q_heads"]) + " / " + str(s["num_kv_heads"]), str(s["head_dim"]), str(s["dtype"]),
                  s.value("has_v", false) ? "yes" : "no"});
  }
  o << "\n";
}

void section_similarity(std::ostringstream& o, const json& report) {
  const Rows L = rows_of(report, "similarity_layers");
  if (L.rows.empty()) return;
  const Rows B = rows_of(report, "head_budget_layers");
  const double gref = report["config"].value("gamma_ref", 0.95);
  o << "## Head similarity per layer\n\n"
    << "Mean over query-head pairs. Top-k overlap: |T_a ∩ T_b| / k of the top-k key tokens by "
       "the last query block's mean probability. Cosine / Spearman: block-mass rows M_a[i, :] vs "
       "M_b[i, :] (causal part), averaged over rows. Oracle budget: per head, blocks per row "
       "reaching γ = "
    << fmt::format("{:g}", gref)
    << " (mean over rows), shown as mean ± sd over heads and the sparsity range of the heads.\n\n";
  std::vector<std::string> topk_cols;
  for (const auto& c : L.columns)
    if (c.rfind("topk_overlap_", 0) == 0 && c.size() > 5 && c.substr(c.size() - 5) == "_mean") topk_cols.push_back(c);
  std::string store;
  for (const auto& r : L.rows) {
    if (str(r.at("store")) != store) {
      store = str(r.at("store"));
      o << "**" << store << "**\n\n";
      std::vector<std::string> h{"layer"};
      for (const auto& c : topk_cols)
        h.push_back("top-" + c.substr(13, c.size() - 13 - 5 - 3) + " % overlap");
      h.insert(h.end(), {"cosine", "Spearman", "oracle budget (blocks)", "head sparsity"});
      table_header(o, h);
    }
    std::vector<std::string> cells{str(r.at("layer"))};
    for (const auto& c : topk_cols) cells.push_back(fx(r.at(c), 3));
    cells.push_back(fx(r.at("cosine_mean"), 3));
    cells.push_back(fx(r.at("spearman_mean"), 3));
    std::string budget = "–", spars = "–";
    for (const auto& b : B.rows)
      if (str(b.at("store")) == store && str(b.at("layer")) == str(r.at("layer")) && same_num(b.at("gamma"), gref)) {
        budget = fx(b.at("budget_mean"), 1) + " ± " + fx(b.at("budget_std"), 1);
        spars = fx(b.at("sparsity_min"), 3) + " – " + fx(b.at("sparsity_max"), 3);
      }
    cells.push_back(budget);
    cells.push_back(spars);
    table_row(o, cells);
  }
  o << "\n";

  const Rows F = rows_of(report, "fidelity_summary");
  if (!F.rows.empty()) {
    o << "### Proxy fidelity\n\nRanking of the shared proxy score at each member head's own oracle "
         "budget: block recall vs the head's oracle blocks, and the mass kept relative to the "
         "oracle's (mean and 5th percentile over heads and layers).\n\n";
    table_header(o, {"groups", "γ", "block recall", "mass ratio", "mass ratio p5"});
    for (const auto& r : F.rows)
      table_row(o, {str(r.at("groups")), fx(r.at("gamma"), 2), fx(r.at("block_recall_mean"), 3),
                    fx(r.at("mass_ratio_mean"), 3), fx(r.at("mass_ratio_p5"), 3)});
    o << "\n";
  }
}

void section_recall(std::ostringstream& o, const json& report) {
  const Rows R = rows_of(report, "recall_vs_sparsity");
  if (R.rows.empty()) return;
  // Fixed-density rows: one line per method (and proxy group count), one column per target.
  std::vector<double> targets;
  std::vector<std::string> labels;
  std::map<std::pair<std::string, double>, const std::map<std::string, json>*> cell;
  for (const auto& r : R.rows) {
    if (str(r.at("budget")) != "fixed") continue;
    const double t = dbl(r.at("target_sparsity"));
    const std::string l = method_label(r);
    if (std::find(targets.begin(), targets.end(), t) == targets.end()) targets.push_back(t);
    if (std::find(labels.begin(), labels.end(), l) == labels.end()) labels.push_back(l);
    cell[{l, t}] = &r;
  }
  std::sort(targets.begin(), targets.end());
  bool any_error = false;
  for (const auto& r : R.rows)
    if (std::isfinite(dbl(r.at("output_error_mean")))) any_error = true;
  if (!labels.empty()) {
    o << "## Recall vs sparsity\n\nEach method's selection brought to the target sparsity "
         "(rule in selection_summary.csv). Cell: mean mass recall over heads and layers, "
         "(5th percentile over heads), [sparsity actually reached].\n\n";
    std::vector<std::string> h{"method"};
    for (double t : targets) h.push_back(fmt::format("s = {:g}", t));
    table_header(o, h);
    for (const auto& l : labels) {
      std::vector<std::string> cells{l};
      for (double t : targets) {
        auto it = cell.find({l, t});
        if (it == cell.end()) {
          cells.push_back("–");
          continue;
        }
        const auto& r = *it->second;
        cells.push_back(fx(r.at("mass_recall_mean"), 3) + " (" + fx(r.at("mass_recall_p5"), 3) + ") [" +
                        fx(r.at("sparsity"), 3) + "]");
      }
      table_row(o, cells);
    }
    o << "\n";
    if (any_error) {
      o << "Output error ||O_sparse − O_full||_F / ||O_full||_F at the same selections (mean over "
           "heads and layers):\n\n";
      table_header(o, h);
      for (const auto& l : labels) {
        std::vector<std::string> cells{l};
        for (double t : targets) {
          auto it = cell.find({l, t});
          cells.push_back(it == cell.end() ? "–" : fx(it->second->at("output_error_mean"), 4));
        }
        table_row(o, cells);
      }
      o << "\n";
    }
  }
  // Native operating points: the method's own rule at each gamma.
  bool header = false;
  for (const auto& r : R.rows) {
    const std::string b = str(r.at("budget"));
    const bool native = b == "native" || (is_proxyattn(r) && b == "dynamic" &&
                                          !std::isfinite(dbl(r.at("target_sparsity"))));
    if (!native) continue;
    if (!header) {
      o << "### Native operating points\n\nEach method with its own budget rule (proxy: dynamic "
           "budget; oracle: per-row γ cover).\n\n";
      table_header(o, {"method", "budget", "γ", "sparsity", "mass recall", "p5", "block recall", "output error"});
      header = true;
    }
    table_row(o, {method_label(r), b, fx(r.at("gamma"), 2), fx(r.at("sparsity"), 3), fx(r.at("mass_recall_mean"), 3),
                  fx(r.at("mass_recall_p5"), 3), fx(r.at("block_recall_mean"), 3), fx(r.at("output_error_mean"), 4)});
  }
  if (header) o << "\n";
}

void section_budget(std::ostringstream& o, const json& report) {
  const Rows S = rows_of(report, "budget_summary");
  if (S.rows.empty()) return;
  o << "## Budgets\n\nProxyAttn's scores with each budget. k: blocks per row actually used "
       "(mean over rows of min(k_row, i + 1)); oracle: fewest blocks reaching γ per row, mean "
       "over rows; error = (k − oracle) / oracle; mass reached: the budget applied to the exact "
       "ranking; mass recall: the budget applied to the proxy ranking (what the method keeps).\n\n";
  table_header(o, {"budget", "γ", "k", "oracle", "signed error", "|error|", "|error| p95", "mass reached",
                   "rows < γ", "mass recall", "density"});
  for (const auto& r : S.rows)
    table_row(o, {str(r.at("budget")), fx(r.at("gamma"), 2), fx(r.at("k_effective_mean"), 2),
                  fx(r.at("oracle_mean"), 2), signed_pct(r.at("rel_error_mean")), pct(r.at("abs_rel_error_mean")),
                  pct(r.at("abs_rel_error_p95")), fx(r.at("mass_reached_mean"), 3), pct(r.at("rows_below_gamma_mean")),
                  fx(r.at("mass_recall_mean"), 3), fx(r.at("density_mean"), 3)});
  o << "\n";

  const Rows H = rows_of(report, "budget_heads");
  if (!H.rows.empty()) {
    const double gref = report["config"].value("gamma_ref", 0.95);
    o << "### Budget error per head (γ = " << fmt::format("{:g}", gref)
      << ", mean over layers)\n\n";
    std::string store;
    for (const auto& r : H.rows) {
      const std::string b = str(r.at("budget"));
      if (b != "dynamic" || !same_num(r.at("gamma"), gref)) continue;
      if (str(r.at("store")) != store) {
        store = str(r.at("store"));
        o << "**" << store << "** (dynamic budget; token-level variant in the next column)\n\n";
        table_header(o, {"head", "k_h", "k used", "oracle", "signed error", "mass reached", "token: signed error",
                         "token: mass reached"});
      }
      std::string tok_err = "–", tok_mass = "–";
      for (const auto& t : H.rows)
        if (str(t.at("store")) == store && str(t.at("budget")) == "token" && same_num(t.at("gamma"), gref) &&
            str(t.at("head")) == str(r.at("head"))) {
          tok_err = signed_pct(t.at("rel_error_mean"));
          tok_mass = fx(t.at("mass_reached_mean"), 3);
        }
      table_row(o, {str(r.at("head")), fx(r.at("k_est_mean"), 1), fx(r.at("k_effective_mean"), 1),
                    fx(r.at("oracle_mean"), 1), signed_pct(r.at("rel_error_mean")), fx(r.at("mass_reached_mean"), 3),
                    tok_err, tok_mass});
    }
    o << "\n";
  }

  const Rows R = rows_of(report, "recall_vs_sparsity");
  bool header = false;
  for (const auto& r : R.rows) {
    const std::string b = str(r.at("budget")), rule = str(r.at("rule"));
    if (!is_proxyattn(r) || (rule != "scaled" && rule != "row_uniform") ||
        !std::isfinite(dbl(r.at("target_sparsity"))))
      continue;
    if (!header) {
      o << "### Budgets at a fixed sparsity\n\nProxyAttn's scores; dynamic/token budgets scaled "
           "to the target (per-head proportions kept), uniform = one k for every head.\n\n";
      table_header(o, {"budget", "γ", "target", "sparsity", "mass recall", "p5", "output error"});
      header = true;
    }
    table_row(o, {b, fx(r.at("gamma"), 2), fx(r.at("target_sparsity"), 2), fx(r.at("sparsity"), 3),
                  fx(r.at("mass_recall_mean"), 3), fx(r.at("mass_recall_p5"), 3), fx(r.at("output_error_mean"), 4)});
  }
  if (header) o << "\n";
}

// Indented JSON, except that every table row sits on one line (a report holds tens of
// thousands of rows; one value per line would make it unreadable).
std::string dump_report(const json& report) {
  std::string out = "{\n";
  bool first = true;
  for (const auto& [key, value] : report.items()) {
    out += first ? "" : ",\n";
    first = false;
    out += ' ';
    out += json(key).dump();
    out += ": ";
    if (key != "tables" || !value.is_object()) {
      // Nested lines one space in, under the key.
      std::string v = value.dump(1);
      for (size_t at = v.find('\n'); at != std::string::npos; at = v.find('\n', at + 2)) v.insert(at + 1, 1, ' ');
      out += v;
      continue;
    }
    out += "{";
    bool tfirst = true;
    for (const auto& [name, table] : value.items()) {
      out += tfirst ? "\n" : ",\n";
      tfirst = false;
      out += "  ";
      out += json(name).dump();
      out += ": {\"columns\": ";
      out += table.at("columns").dump();
      out += ",\n   \"rows\": [";
      const json& rows = table.at("rows");
      for (size_t i = 0; i < rows.size(); ++i) {
        out += i ? ",\n    " : "\n    ";
        out += rows[i].dump();
      }
      out += rows.empty() ? "]}" : "\n   ]}";
    }
    out += tfirst ? "}" : "\n }";
  }
  return out + "\n}\n";
}

}  // namespace

json report_skeleton(const std::string& tool, const std::string& command) {
  json r;
  r["schema_version"] = kReportSchemaVersion;
  r["tool"] = tool;
  r["command"] = command;
  r["created_utc"] = utc_now();
  r["version"] = version();
  r["git_sha"] = git_sha();
  r["built_with_cuda"] = built_with_cuda();
  r["library_versions"] = library_versions();
  r["device"] = {{"kind", "cpu"}, {"cpu", cpu_model()}, {"simd", kernels::using_avx2() ? "avx2+fma" : "scalar"}};
  r["config"] = json::object();
  r["stores"] = json::array();
  r["timing"] = json::object();
  r["notes"] = json::array();
  r["tables"] = json::object();
  return r;
}

json num(double x) { return std::isfinite(x) ? json(x) : json(nullptr); }

TableWriter::TableWriter(json& report, const std::string& name, std::vector<std::string> columns)
    : columns_(std::move(columns)), name_(name) {
  json& t = report["tables"][name];
  if (t.is_null()) {
    t = {{"columns", columns_}, {"rows", json::array()}};
  } else if (t["columns"] != json(columns_)) {
    throw Error("report table '" + name + "' already exists with other columns");
  }
  table_ = &t;
}

void TableWriter::add(json row) {
  if (!row.is_array() || row.size() != columns_.size())
    throw Error("report table '" + name_ + "': row has " + std::to_string(row.is_array() ? row.size() : 0) +
                " cells, table has " + std::to_string(columns_.size()) + " columns");
  (*table_)["rows"].push_back(std::move(row));
}

size_t TableWriter::column(const std::string& name) const {
  for (size_t i = 0; i < columns_.size(); ++i)
    if (columns_[i] == name) return i;
  throw Error("report table '" + name_ + "' has no column '" + name + "'");
}

std::string render_csv(const json& table) {
  std::string out;
  const json& cols = table.at("columns");
  for (size_t i = 0; i < cols.size(); ++i) {
    if (i) out += ',';
    out += csv_cell(cols[i]);
  }
  out += "\n";
  for (const json& row : table.at("rows")) {
    for (size_t i = 0; i < row.size(); ++i) {
      if (i) out += ',';
      out += csv_cell(row[i]);
    }
    out += "\n";
  }
  return out;
}

std::string render_markdown(const json& report) {
  std::ostringstream o;
  o << "# " << report.value("tool", std::string("report")) << " " << report.value("command", std::string()) << "\n\n";
  o << "Created " << report.value("created_utc", std::string("?")) << " by version "
    << report.value("version", std::string("?")) << " (git " << report.value("git_sha", std::string("?")) << ")";
  if (report.contains("device"))
    o << ", device " << report["device"].value("kind", std::string("?")) << " ("
      << report["device"].value("cpu", std::string("?")) << ", " << str(report["device"].value("threads", json()))
      << " threads)";
  if (report.contains("timing") && report["timing"].contains("total_seconds"))
    o << ", " << fmt::format("{:.1f}", report["timing"]["total_seconds"].get<double>()) << " s";
  o << ". Every number below comes from report.json; the CSV files hold the per-head detail.\n\n";
  section_stores(o, report);
  section_similarity(o, report);
  section_recall(o, report);
  section_budget(o, report);
  if (report.contains("notes") && !report["notes"].empty()) {
    o << "## Notes\n\n";
    for (const auto& n : report["notes"]) o << "- " << str(n) << "\n";
    o << "\n";
  }
  return o.str();
}

namespace {
// Entries an earlier report folder may hold: its own files and the figures/ that
// scripts/plot_figures.py draws from it (stale once the report is replaced, so replaced with
// it). Anything else (notes of the user, other folders) makes --out refused, never deleted.
bool report_entry(const std::string& name, bool regular) {
  if (name == "figures") return true;
  if (!regular) return false;
  if (name == "report.json" || name == "report.md") return true;
  return name.size() > 4 && name.compare(name.size() - 4, 4, ".csv") == 0 &&
         name.find('/') == std::string::npos;
}
}  // namespace

void check_report_dir(const std::string& dir) { require_output_dir_target(dir, "--out", report_entry); }

std::vector<std::string> write_report(const json& report, const std::string& dir) {
  return write_report(report, dir, render_markdown(report));
}

std::vector<std::string> write_report(const json& report, const std::string& dir, const std::string& markdown) {
  // Rendered first (a failure here creates nothing), then written into a fresh staging folder
  // that replaces dir in one step (AtomicDir): a reader never sees two runs' files mixed.
  std::vector<std::pair<std::string, std::string>> files;
  if (report.contains("tables"))
    for (const auto& [name, table] : report["tables"].items()) {
      if (name.empty() || name.find_first_of("/\\") != std::string::npos || name[0] == '.')
        throw Error("report table name '" + name + "' is not a plain file name");
      files.emplace_back(name + ".csv", render_csv(table));
    }
  files.emplace_back("report.md", markdown);
  files.emplace_back("report.json", dump_report(report));

  AtomicDir out(dir, "--out", report_entry);
  for (const auto& [name, text] : files) out.write(name, text);
  return out.commit();
}

}  // namespace proxyattn::analysis
