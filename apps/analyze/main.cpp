// proxyattn-analyze: head similarity, recall, budgets and output error of block-selection
// methods on Q/K(/V) stores. A thin front end: parse, validate, call analysis::analyze(), write
// the report (report.json + CSVs + report.md) into --out.
#include <map>
#include <optional>
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include "cli_common.hpp"
#include "cli_methods.hpp"
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/distributed.hpp"
#include "proxyattn/analysis/analyze.hpp"
#include "proxyattn/analysis/report.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/checked.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/host_memory.hpp"
#include "proxyattn/io.hpp"
#include "proxyattn/store.hpp"
#include "proxyattn/trace.hpp"

namespace {

using namespace proxyattn;

struct Args {
  analysis::AnalyzeConfig cfg;
  // Comma-separated lists, split here (one token each, so a list never swallows a STORE).
  std::string layers;  // "" = all
  std::string methods, sparsity, gamma, groups, topk;
  std::string out;
  std::map<std::string, std::string> method_options;  // registry flags (cli_methods.hpp)
  std::string budget_mode = "constant";
};

const char* kTopicHelp[][2] = {
    {"similarity", "Head x head similarity (top-k token overlap, cosine, Spearman), per-head oracle budget, proxy fidelity"},
    {"recall", "Each method's selection at fixed sparsities and at its native gamma: density, mass and block recall"},
    {"budget", "ProxyAttn budgets (dynamic/token/uniform/cumulative/oracle) vs the oracle budget; budgets at fixed sparsity"},
    {"error", "recall + budget selections with the output error ||O_sparse - O_full|| / ||O_full|| (needs V)"},
    {"all", "Every topic (output error skipped with a note for stores without V)"},
};

void add_options(CLI::App& sub, Args& a) {
  auto& c = a.cfg;
  sub.add_option("STORE", c.stores, "Q/K(/V) store files (HDF5); several are aggregated, per-store rows kept")
      ->required()
      ->expected(1, -1);
  sub.add_option("--out,-o", a.out, "Output directory (created): report.json, *.csv, report.md")->required();
  sub.add_option("--layers", a.layers, "Layers to analyse: list/ranges, e.g. 0,3,10-12 (default: all)");
  sub.add_option("--methods", a.methods, "Methods, comma-separated")
      ->default_str("proxy,pooled,xattn,flexprefill,vslash,oracle");
  sub.add_option("--sparsity", a.sparsity, "Fixed sparsities in [0, 1), comma-separated")
      ->default_str("0.5,0.7,0.8,0.9,0.95");
  sub.add_option("--gamma", a.gamma, "Coverages in (0, 1], comma-separated (oracle/dynamic budgets, natives)")
      ->default_str("0.9,0.95");
  sub.add_option("--groups", a.groups,
                 "ProxyAttn group counts (proxy heads), comma-separated, each dividing Hq (default: every divisor of Hq)");
  sub.add_option("--block", c.block, "Block size B (power of two; 64 or 128)")->default_val(128);
  sub.add_option("--density-rule", c.density_rule,
                 "How selections reach a fixed sparsity: auto, row_uniform, head_global, native_adjust")
      ->default_val("auto");
  sub.add_option("--topk", a.topk, "Top-k token fractions of N for the overlap, comma-separated")
      ->default_str("0.01,0.05");
  sub.add_option("--sim-rows", c.sim_rows, "Query blocks used for cosine/Spearman (0 = all)")->default_val(0);
  cli::add_method_options(sub, a.method_options);
  sub.add_option("--budget-mode", a.budget_mode, "dynamic/token/uniform budget across rows: constant or proportional")
      ->default_val("constant");
  sub.add_option("--k-min", c.budget.k_min, "Lower clamp of the dynamic/token budgets (blocks)")->default_val(2);
  sub.add_option("--device", c.device, "cpu or cuda")->default_val("cpu");
  sub.add_option("--threads", c.threads, "CPU threads (0 = all)")->default_val(0);
  sub.add_option("--lanes", c.lanes,
                 "(store, layer) units in flight, splitting the threads (0 = auto: 2 with --device cuda, "
                 "so one unit's CPU work overlaps the other's GPU work; 1 otherwise)")
      ->default_val(0);
  sub.add_flag("--quiet,-q", c.quiet, "No progress on stderr");
  sub.add_flag("--allow-nonfinite", c.allow_nonfinite, "Read layers holding NaN/Inf instead of failing");
}

// A list flag given with an empty value ('--methods ""') is an error, not the default.
void require_nonempty_values(const CLI::App& sub, const Args& a) {
  const std::pair<const char*, const std::string*> lists[] = {
      {"--layers", &a.layers}, {"--methods", &a.methods}, {"--sparsity", &a.sparsity},
      {"--gamma", &a.gamma},   {"--groups", &a.groups},   {"--topk", &a.topk}};
  for (const auto& [flag, value] : lists) {
    std::string v = *value;
    while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.pop_back();
    if (sub.count(flag) > 0 && v.empty()) throw Error(std::string(flag) + ": empty value");
  }
  if (sub.count("--out") > 0 && a.out.empty()) throw Error("--out: empty path");
}

// Upper bounds of the numeric flags (beyond them the work or memory is absurd, or a size
// computed from them would overflow).
void require_sane_numbers(const analysis::AnalyzeConfig& c) {
  if (c.block > 4096) throw Error("--block: " + std::to_string(c.block) + " too large (at most 4096)");
  if (c.block > 0 && c.block < 16)
    throw Error("--block: " + std::to_string(c.block) + " too small (at least 16: the per-head block matrices grow as (N/B)^2)");
  if (c.threads > 4096) throw Error("--threads: " + std::to_string(c.threads) + " too large (at most 4096)");
  if (c.lanes < 0 || c.lanes > 2) throw Error("--lanes: " + std::to_string(c.lanes) + " outside [0, 2]");
  if (c.sim_rows > (1 << 24)) throw Error("--sim-rows: " + std::to_string(c.sim_rows) + " too large");
  if (c.estimator.proxy.query_stride < 1 || c.estimator.proxy.query_stride > 4096)
    throw Error("--query-stride: " + std::to_string(c.estimator.proxy.query_stride) + " outside [1, 4096]");
  if (c.estimator.xattn.stride < 1 || c.estimator.xattn.stride > 4096)
    throw Error("--xattn-stride: " + std::to_string(c.estimator.xattn.stride) + " outside [1, 4096]");
  if (c.budget.k_min < 0 || c.budget.k_min > (1 << 24))
    throw Error("--k-min: " + std::to_string(c.budget.k_min) + " outside [0, 16777216]");
}


}  // namespace

int main(int argc, char** argv) {
  reexec_with_huge_pages(argv);  // before MPI, threads and CUDA (host_memory.hpp)
  load_cuda_kernels_eagerly();   // before any CUDA call (cuda_dispatch.hpp)
  // Under mpirun every rank runs its share of the (store, layer) units; rank 0 alone prints
  // progress and errors (the others' lines would repeat it) and writes the report.
  std::optional<Distributed> dist_holder;
  try {
    dist_holder.emplace(argc, argv);
    if (dist_holder->size() > 1) use_cuda_device_for_rank(dist_holder->local_rank());  // one GPU per rank
  } catch (const std::exception& e) {
    cli::print_error("proxyattn-analyze", e.what());
    return cli::kExitFailure;
  }
  const Distributed& dist = *dist_holder;
  if (!dist.is_root()) (void)std::freopen("/dev/null", "w", stderr);
  CLI::App app{"Head similarity, recall, budget accuracy and output error of block-sparse attention "
               "methods on Q/K(/V) stores. Writes report.json, CSV tables and report.md into --out.",
               "proxyattn-analyze"};
  cli::add_version_flag(app);
  app.require_subcommand(1);
  Args a;
  std::vector<CLI::App*> subs;
  for (const auto& t : kTopicHelp) {
    CLI::App* s = app.add_subcommand(t[0], t[1]);
    add_options(*s, a);
    subs.push_back(s);
  }
  return cli::run_main(app, argc, argv, [&] {
    auto& c = a.cfg;
    const CLI::App* parsed = nullptr;
    for (CLI::App* s : subs)
      if (s->parsed()) {
        c.command = s->get_name();
        parsed = s;
      }
    if (parsed) require_nonempty_values(*parsed, a);
    c.argv.assign(argv, argv + argc);
    if (!a.layers.empty()) c.layers = cli::parse_int_list(a.layers, 1 << 20, "--layers");
    if (!a.methods.empty()) c.methods = cli::split_list(a.methods, "--methods");
    if (!a.sparsity.empty()) c.sparsity = cli::number_list(a.sparsity, "--sparsity");
    if (!a.gamma.empty()) c.gamma = cli::number_list(a.gamma, "--gamma");
    if (!a.groups.empty()) c.groups = cli::int_list(a.groups, "--groups");
    if (!a.topk.empty()) c.topk_fractions = cli::number_list(a.topk, "--topk");
    if (parsed) cli::apply_method_options(*parsed, a.method_options, c.estimator);
    c.budget.mode = parse_budget_mode(a.budget_mode);
    if (c.threads < 0) throw Error("--threads: must be >= 0");
    require_sane_numbers(c);
    for (const std::string& path : c.stores) {  // a path that cannot even be looked at: one clean line
      std::error_code ec;
      const auto st = std::filesystem::status(path, ec);
      if (ec && st.type() != std::filesystem::file_type::not_found)
        throw Error(path + ": cannot access (" + ec.message() + ")");
      if (st.type() == std::filesystem::file_type::directory) throw Error(path + ": not a regular file (is a directory)");
    }
    analysis::validate_config(c);
    // Checks only: the report folder is created when the report is committed, so a failed run
    // leaves nothing behind.
    if (dist.is_root()) analysis::check_report_dir(a.out);
    if (c.threads > 0) {
      omp_set_num_threads(c.threads);
      set_cpu_threads(c.threads);
    }
    const nlohmann::json report = analysis::analyze(c, &dist);
    if (report.is_null()) return 0;  // not rank 0: rank 0 writes the report
    std::optional<TraceScope> trace(std::in_place, "write report");
    const std::vector<std::string> files = analysis::write_report(report, a.out);
    trace.reset();
    if (!c.quiet)
      std::printf("%s\n", fmt::format("proxyattn-analyze {}: {} files in {} ({:.1f} s)", c.command, files.size(),
                                      a.out, report["timing"]["total_seconds"].get<double>())
                              .c_str());
    return 0;
  });
}
