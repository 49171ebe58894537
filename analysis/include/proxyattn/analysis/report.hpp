#pragma once
// Reports are data first: one nlohmann::json document (report.json) that holds the provenance,
// the configuration and every number; CSV files and report.md are rendered from that document
// alone, so the three can never disagree.
//
// Layout of the document (schema_version 1):
//   schema_version, tool, command, argv, created_utc, version, git_sha, built_with_cuda,
//   library_versions, device {kind, threads, cpu, simd}, config {...}, stores [{...}],
//   timing {...}, notes [...], tables {name: {columns: [...], rows: [[...], ...]}}
// A table cell is a number, a string or null (a NaN / not applicable). Each table becomes
// <name>.csv (null written as "nan"); report.md shows the tables a person reads first.
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace proxyattn::analysis {

inline constexpr int kReportSchemaVersion = 1;

// A fresh document with the provenance fields filled in (version, git SHA, library versions,
// CUDA build flag, UTC time, CPU model).
nlohmann::json report_skeleton(const std::string& tool, const std::string& command);

// A JSON number, or null when x is not finite (JSON has no NaN).
nlohmann::json num(double x);

// Appends rows to report["tables"][name], creating it with `columns` on first use. Rows must
// have exactly one cell per column (Error otherwise).
class TableWriter {
 public:
  TableWriter(nlohmann::json& report, const std::string& name, std::vector<std::string> columns);
  void add(nlohmann::json row);  // a JSON array
  size_t column(const std::string& name) const;  // index, Error if absent

 private:
  nlohmann::json* table_;
  std::vector<std::string> columns_;
  std::string name_;
};

// CSV text of one table: a header line, then one line per row (RFC 4180 quoting; null -> nan;
// doubles with 10 significant digits).
std::string render_csv(const nlohmann::json& table);
// Markdown summary of a whole report (the tables a person reads first; see render order in
// report.cpp). Only the sections whose tables exist are rendered.
std::string render_markdown(const nlohmann::json& report);

// Writes report.json, one <table>.csv per table and report.md as one folder: staged in a fresh
// sibling "<dir>.tmp-<pid>" and put in place by one rename, or one atomic exchange with an
// earlier report in dir (which is then deleted). Readers see the old report or the new one,
// never a mix; nothing is created when it fails. dir may exist only as a folder holding a
// report's files (report.json, report.md, *.csv, figures/); anything else is an Error, never deleted.
// Missing parents are created. Throws Error naming the path. Returns the paths written.
std::vector<std::string> write_report(const nlohmann::json& report, const std::string& dir);
// The same with the text of report.md given (a tool that renders its own, proxyattn-eval).
std::vector<std::string> write_report(const nlohmann::json& report, const std::string& dir,
                                      const std::string& markdown);
// The checks of write_report (dir can be written and replaced), creating nothing; run before
// the work so a bad --out fails in a second.
void check_report_dir(const std::string& dir);

}  // namespace proxyattn::analysis
