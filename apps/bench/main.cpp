// proxyattn-bench: kernel time over lengths x dtypes x methods (GPU: CUDA events, L2 flushed;
// CPU: the reference at small N), Google Benchmark underneath, long-format JSON/CSV/Markdown out.
//
//   proxyattn-bench --sweep configs/sweeps/fig4_speedup.json --out results/fig4 --export-masks masks/
//   proxyattn-bench --device cpu --lengths 512,1000 --methods full,sparse@0.2 --model configs/models/smollm2-135m.json
//   mpirun -np 8 proxyattn-bench --sweep ... --out DIR     # cases split over 8 ranks / GPUs
//   proxyattn-bench prefill --sweep configs/sweeps/prefill.json --out DIR   # whole-model TTFT
//
// Flags --benchmark_* go to Google Benchmark (e.g. --benchmark_out=gb.json); everything else is ours.
#include <fcntl.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <cstdio>
#include <ctime>
#include <functional>
#include <iostream>
#include <map>
#include <new>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include "bench.hpp"
#include "cli_common.hpp"
#include "distribute.hpp"
#include "masks.hpp"
#include "prefill.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/distributed.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/io.hpp"
#include "proxyattn/version.hpp"
#include "report.hpp"
#include "runner.hpp"
#include "sweep.hpp"

namespace proxyattn::bench {
namespace {

// Google Benchmark's console output goes to stderr (progress); --quiet silences it.
class QuietReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

// Under mpirun the ranks other than 0 parse the same command line as rank 0: their copies of
// --help, --version and parse errors go to /dev/null while this object lives.
class SilenceStdio {
 public:
  explicit SilenceStdio(bool on) {
    if (!on) return;
    std::fflush(stdout);
    std::fflush(stderr);
    const int null = ::open("/dev/null", O_WRONLY);
    if (null < 0) return;
    saved_out_ = ::dup(1);
    saved_err_ = ::dup(2);
    ::dup2(null, 1);
    ::dup2(null, 2);
    ::close(null);
  }
  ~SilenceStdio() {
    std::fflush(stdout);
    std::fflush(stderr);
    std::cout.flush();
    std::cerr.flush();
    if (saved_out_ >= 0) ::dup2(saved_out_, 1), ::close(saved_out_);
    if (saved_err_ >= 0) ::dup2(saved_err_, 2), ::close(saved_err_);
  }
  SilenceStdio(const SilenceStdio&) = delete;
  SilenceStdio& operator=(const SilenceStdio&) = delete;

 private:
  int saved_out_ = -1, saved_err_ = -1;
};

// Under mpirun, ranks other than 0 skip Google Benchmark's context block (rank 0's says it).
class RankConsoleReporter : public benchmark::ConsoleReporter {
 public:
  explicit RankConsoleReporter(bool context) : ConsoleReporter(OO_None), context_(context) {}
  bool ReportContext(const Context& c) override { return context_ ? ConsoleReporter::ReportContext(c) : true; }

 private:
  bool context_;
};

std::string hostname() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

Row base_row(const Sweep& sw, const Runner& runner, const Case& c) {
  Row r;
  r.device = runner.device();
  r.family = family_name(c.method.family);
  r.method = c.method.label;
  r.n = c.n;
  r.dtype = c.dtype == DType::f16 ? "fp16" : "bf16";
  r.q_heads = sw.model.num_q_heads;
  r.kv_heads = sw.model.num_kv_heads;
  r.head_dim = sw.model.head_dim;
  r.block = sw.block;
  if (c.method.family == Family::sparse && c.method.mask_file.empty()) r.density_target = c.method.density;
  if (c.method.family == Family::proxyattn) {
    r.gamma = c.method.gamma;
    if (c.method.target_density) r.density_target = c.method.density;
  }
  return r;
}

// The cases in run order: by length, then dtype, then the sweep's method order (so inputs are
// generated and uploaded once per length). Mask-file methods run at their file's length;
// file_density receives each mask file's block density (its cost under MPI).
std::vector<Case> expand_cases(const Sweep& sw, std::map<std::string, double>& file_density) {
  std::vector<int64_t> lengths = sw.lengths;
  std::map<std::string, int64_t> file_n;
  for (const Method& m : sw.methods)
    if (!m.mask_file.empty()) {
      const BlockMask mask = read_mask_file(m.mask_file);
      file_n[m.mask_file] = mask.seq_len();
      file_density[m.mask_file] = mask.density();
      if (std::find(lengths.begin(), lengths.end(), file_n[m.mask_file]) == lengths.end())
        lengths.push_back(file_n[m.mask_file]);
    }
  std::sort(lengths.begin(), lengths.end());
  std::vector<Case> cases;
  for (int64_t n : lengths)
    for (DType t : sw.dtypes)
      for (const Method& m : sw.methods) {
        const bool in_sweep = std::find(sw.lengths.begin(), sw.lengths.end(), n) != sw.lengths.end();
        if (!m.mask_file.empty() ? file_n[m.mask_file] != n : !in_sweep) continue;
        cases.push_back(Case{m, n, t});
      }
  return cases;
}

// ---- several MPI ranks -----------------------------------------------------------------------
// Every failure goes through agree(): all ranks stop together with the first failing rank's
// message, so no rank waits forever in a collective and no partial report is written.

bool g_agreed_failure = false;  // the exception in flight came out of agree() (every rank has it)

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::bad_alloc&) {
    return "out of memory";
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown failure";
  }
  return "";
}

void agree(const Distributed& dist, const std::string& error) {
  try {
    dist.agree_or_throw(error);
  } catch (...) {
    g_agreed_failure = true;
    throw;
  }
}

// One process: fn's exceptions propagate as they always did. Several ranks: collective.
void step(const Distributed& dist, const std::function<void()>& fn) {
  if (dist.size() == 1) return fn();
  agree(dist, error_of(fn));
}

struct CapturedMask {
  size_t index = 0;  // case
  std::string bytes;  // encode_mask
  nlohmann::json info;
};

int run(int argc, char** argv, const Distributed& dist) {
  const bool multi = dist.size() > 1, root = dist.is_root();
  // The whole-model mode has its own flags (prefill.cpp); one process, one GPU.
  if (argc > 1 && std::string(argv[1]) == "prefill") {
    if (multi) throw Error("prefill: runs as one process (no mpirun)");
    return prefill_main(argc - 1, argv + 1);
  }
  // Google Benchmark takes its own --benchmark_* flags; CLI11 gets the rest. Under mpirun each
  // rank other than 0 writes --benchmark_out=F to F.rankR (its own cases).
  static char gb_name[] = "proxyattn-bench";  // GB prints errors as "<argv0>: error: ..."
  std::vector<char*> gb_args{gb_name}, our_args{argv[0]};
  std::vector<std::string> renamed;
  renamed.reserve(static_cast<size_t>(argc));  // no reallocation: gb_args points into it
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--benchmark_", 0) != 0) {
      our_args.push_back(argv[i]);
    } else if (multi && !root && a.rfind("--benchmark_out=", 0) == 0) {
      renamed.push_back(a + ".rank" + std::to_string(dist.rank()));
      gb_args.push_back(renamed.back().data());
    } else {
      gb_args.push_back(argv[i]);
    }
  }
  std::optional<SilenceStdio> silence(std::in_place, multi && !root);
  int gb_argc = static_cast<int>(gb_args.size());
  benchmark::Initialize(&gb_argc, gb_args.data());
  if (benchmark::ReportUnrecognizedArguments(gb_argc, gb_args.data())) return 2;

  CLI::App app{"proxyattn-bench: attention kernel time over lengths, densities and methods "
               "(GPU: CUDA events, L2 flushed; CPU: the reference at small N). Under mpirun the "
               "cases are split over the ranks (one GPU each) and rank 0 writes the report.",
               "proxyattn-bench"};
  cli::add_version_flag(app);
  std::string sweep_path, out_dir, export_masks, export_check;
  SweepOverrides o;
  std::string device, model, inputs, mask_file;
  int64_t check_len = 2048;
  double check_density = 0.1;
  int cpu_threads_opt = 0;
  bool quiet = false;
  app.add_option("--sweep", sweep_path, "sweep file (configs/sweeps/NAME.json); flags below override its axes");
  app.add_option("--device", device, "auto (default: cuda when a GPU is usable), cpu or cuda");
  app.add_option("--model", model, "model config (default configs/models/llama-3.1-8b.json)");
  app.add_option("--lengths", o.lengths, "sequence lengths, e.g. 4K,8K,131072")->delimiter(',');
  app.add_option("--dtypes", o.dtypes, "bf16 and/or fp16")->delimiter(',');
  app.add_option("--methods", o.methods,
                 "full, sparse, sparse@D, estimate, estimate:NAME, proxyattn, proxyattn@gamma=G, proxyattn@density=D")
      ->delimiter(',');
  app.add_option("--densities", o.densities, "densities of bare 'sparse'")->delimiter(',');
  app.add_option("--estimators", o.estimators, "estimators of bare 'estimate'")->delimiter(',');
  app.add_option("--gammas", o.gammas, "gammas of bare 'proxyattn'")->delimiter(',');
  app.add_option("--proxyattn-densities", o.proxyattn_densities, "target densities of bare 'proxyattn'")->delimiter(',');
  app.add_option("--groups", o.groups, "proxy groups g (estimate:proxy expands over them)")->delimiter(',');
  app.add_option("--query-stride", o.query_strides, "proxy query stride s")->delimiter(',');
  app.add_option("--mask-file", mask_file, "also time the block-sparse kernel on this .pxm mask (its N)");
  app.add_option("--inputs", inputs, "synth (default) or random");
  int block = 0, reps = 0, warmup = -1, k_min = 0;
  int64_t seed = -1, cpu_max_len = 0;
  double mem_frac = 0;
  app.add_option("--block", block, "mask block size (64 or 128)");
  app.add_option("--reps", reps, "timed repetitions per case");
  app.add_option("--warmup", warmup, "untimed runs before timing");
  app.add_option("--seed", seed, "seed of inputs and random masks");
  app.add_option("--k-min", k_min, "dynamic budget lower clamp");
  app.add_option("--cpu-max-len", cpu_max_len, "longest N the CPU reference runs (default 8192)");
  app.add_option("--cpu-threads", cpu_threads_opt, "threads of the CPU reference (0 = OpenMP default)");
  app.add_option("--gpu-mem-fraction", mem_frac, "skip cases needing more than this share of GPU memory (0.9)");
  app.add_option("--out", out_dir, "write bench.json, bench.csv and bench.md here");
  app.add_option("--export-masks", export_masks, "write every timed mask (.pxm) and manifest.json here");
  app.add_option("--export-check", export_check,
                 "write a check case (bf16 q/k/v, our block-sparse output, its mask) for scripts/bench_peers.py");
  app.add_option("--check-len", check_len, "length of the check case (default 2048)");
  app.add_option("--check-density", check_density, "density of the check case's mask (default 0.1)");
  app.add_flag("--quiet", quiet, "no progress on stderr");
  if (auto code = cli::parse(app, static_cast<int>(our_args.size()), our_args.data())) return *code;
  silence.reset();

  // Progress on stderr: under mpirun every rank's lines carry "[rank R] ".
  std::optional<PrefixedStderr> progress_stream;
  if (multi) progress_stream.emplace(fmt::format("[rank {}] ", dist.rank()));
  std::ostream& progress = multi ? static_cast<std::ostream&>(*progress_stream) : std::cerr;

  Sweep sw;
  std::vector<Case> cases;
  std::map<std::string, double> file_density;
  std::string dev;
  step(dist, [&] {
    if (!device.empty()) o.device = device;
    if (!model.empty()) o.model = model;
    if (!inputs.empty()) o.inputs = inputs;
    if (!mask_file.empty()) o.mask_file = mask_file;
    // A flag that is given is checked and used; 0 or -1 are never "the default".
    auto given = [&](const char* flag) { return app.count(flag) > 0; };
    auto in_range = [](const char* flag, int64_t v, int64_t lo, int64_t hi) {
      if (v < lo || v > hi) throw Error(fmt::format("{}: {} outside [{}, {}]", flag, v, lo, hi));
    };
    if (given("--block")) in_range("--block", block, 1, 4096);
    if (given("--reps")) in_range("--reps", reps, 1, 1000000);
    if (given("--warmup")) in_range("--warmup", warmup, 0, 1000000);
    if (given("--k-min")) in_range("--k-min", k_min, 1, 1 << 24);
    if (given("--seed")) in_range("--seed", seed, 0, INT64_MAX);
    if (given("--cpu-max-len")) in_range("--cpu-max-len", cpu_max_len, 1, int64_t{1} << 24);
    if (given("--cpu-threads")) in_range("--cpu-threads", cpu_threads_opt, 0, 4096);
    if (given("--check-len")) in_range("--check-len", check_len, 1, int64_t{1} << 24);
    if (given("--gpu-mem-fraction") && !(mem_frac > 0 && mem_frac <= 1))
      throw Error(fmt::format("--gpu-mem-fraction: {} outside (0, 1]", mem_frac));
    for (const char* f : {"--out", "--export-masks", "--export-check", "--sweep", "--model", "--mask-file", "--device", "--inputs"})
      if (given(f) && app.get_option(f)->as<std::string>().empty()) throw Error(std::string(f) + ": empty value");
    if (given("--block")) o.block = block;
    if (given("--reps")) o.repetitions = reps;
    if (given("--warmup")) o.warmup = warmup;
    if (given("--k-min")) o.k_min = k_min;
    if (given("--seed")) o.seed = static_cast<uint64_t>(seed);
    if (given("--cpu-max-len")) o.cpu_max_len = cpu_max_len;
    if (given("--gpu-mem-fraction")) o.gpu_mem_fraction = mem_frac;
    if (!(check_density > 0 && check_density <= 1))
      throw Error(fmt::format("--check-density {} is outside (0, 1]", check_density));
    if (check_len < 1) throw Error("--check-len must be >= 1");
    if (reps < 0) throw Error("--reps must be >= 1");
    if (cpu_threads_opt < 0) throw Error("--cpu-threads must be >= 0");
    if (cpu_threads_opt > 0) {
      omp_set_num_threads(cpu_threads_opt);  // every OpenMP region (inputs, masks), not only the kernels
      set_cpu_threads(cpu_threads_opt);
    }

    sw = load_sweep(sweep_path, o);
    cases = expand_cases(sw, file_density);
    if (cases.empty()) throw Error("the sweep expands to no cases");
    if (!out_dir.empty() && root) {
      // Checked before hours of timing; created only when the report is written.
      require_output_dir_target(out_dir, "--out", [](const std::string&, bool) { return true; });
      for (const char* f : {"bench.json", "bench.csv", "bench.md"})
        require_output_file_target((std::filesystem::path(out_dir) / f).string());
    }
    dev = sw.device;
    if (dev == "auto") dev = gpu_available() ? "cuda" : "cpu";
  });
  // Every rank uses rank 0's choice (a rank without the GPU rank 0 found fails, saying so).
  if (multi) dev = dist.broadcast_from_root(dev);

  std::unique_ptr<Runner> runner;
  MaskExporter exporter;  // rank 0's; the other ranks send their masks there
  int gpu = -1;
  std::vector<double> cost(cases.size(), 0.0);
  step(dist, [&] {
    if (multi && dev == "cuda") gpu = use_cuda_device_for_rank(dist.local_rank());  // one GPU per rank
    runner = dev == "cuda" ? make_gpu_runner(sw) : make_cpu_runner(sw);
    if (!export_masks.empty() && root) exporter = MaskExporter(export_masks);
    if (!export_check.empty() && root) {
      if (!quiet)
        progress << fmt::format("proxyattn-bench: writing the check case (N={}) to {}\n", check_len, export_check)
                 << std::flush;
      runner->export_check(export_check, check_len, check_density);
    }
    // Rank 0 plans the split (its skip reasons: a skipped case costs nothing) and sends it out.
    if (multi && root)
      for (size_t i = 0; i < cases.size(); ++i)
        if (runner->skip_reason(cases[i].method, cases[i].n, cases[i].dtype).empty())
          cost[i] = case_cost(sw, cases[i], cases[i].method.mask_file.empty() ? 0.0 : file_density[cases[i].method.mask_file]);
  });
  std::vector<int> owner(cases.size(), 0);
  if (multi) {
    const std::string plan = dist.broadcast_from_root(root ? nlohmann::json(assign_by_cost(cost, dist.size())).dump() : "");
    owner = nlohmann::json::parse(plan).get<std::vector<int>>();
  }

  nlohmann::json ctx = runner->context();
  std::string cmd;
  for (int i = 0; i < argc; ++i) cmd += (i ? " " : "") + std::string(argv[i]);
  ctx["tool"] = "proxyattn-bench";
  ctx["version"] = version();
  ctx["git_sha"] = git_sha();
  ctx["built_with_cuda"] = built_with_cuda();
  ctx["library_versions"] = library_versions();
  ctx["date"] = utc_now();
  ctx["host"] = hostname();
  ctx["command"] = cmd;
  ctx["device"] = dev;
  ctx["timing"] = runner->timing_method();
  ctx["sweep"] = sw.name;
  ctx["figure"] = sw.figure;
  ctx["model"] = sw.model.name;
  ctx["model_source"] = sw.model_source;
  ctx["q_heads"] = sw.model.num_q_heads;
  ctx["kv_heads"] = sw.model.num_kv_heads;
  ctx["head_dim"] = sw.model.head_dim;
  ctx["inputs"] = sw.inputs;
  ctx["flops"] = "dense causal 4 N^2 d Hq / 2; work done = that x element density (kernel time)";
  benchmark::AddCustomContext("proxyattn_device", ctx.value("device_name", std::string("?")));
  benchmark::AddCustomContext("proxyattn_git_sha", git_sha());
  if (ctx.contains("nvidia_smi_start")) benchmark::AddCustomContext("nvidia_smi", ctx["nvidia_smi_start"].get<std::string>());
  if (multi) benchmark::AddCustomContext("proxyattn_rank", fmt::format("{} of {}", dist.rank(), dist.size()));

  std::vector<Row> rows;
  rows.reserve(cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    Row r = base_row(sw, *runner, c);
    r.status = "skipped";
    if (owner[i] != dist.rank()) {
      r.reason = fmt::format("run by rank {}", owner[i]);  // replaced by that rank's row on rank 0
    } else {
      const std::string why = runner->skip_reason(c.method, c.n, c.dtype);
      r.reason = why.empty() ? "filtered out by --benchmark_filter" : why;
    }
    rows.push_back(std::move(r));
  }
  // Masks to export: one process writes them as it goes; under mpirun each rank keeps the first
  // of every (method, N) among its cases and rank 0 writes, in case order, the first overall.
  const bool export_on = !export_masks.empty();
  std::vector<CapturedMask> captured;
  std::set<std::pair<std::string, int64_t>> captured_keys;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (owner[i] != dist.rank() || rows[i].reason != "filtered out by --benchmark_filter") continue;
    const Case c = cases[i];
    const std::string name = fmt::format("{}/N={}/{}", c.method.label, length_label(c.n), rows[i].dtype);
    Runner* rn = runner.get();
    Row* row = &rows[i];
    const int warm = sw.warmup;
    benchmark::RegisterBenchmark(name.c_str(), [&, rn, row, c, warm, i](benchmark::State& st) {
      std::vector<Timing> times;
      try {
        rn->prepare(c.method, c.n, c.dtype);
        for (int w = 0; w < warm; ++w) rn->run_once();
        for (auto _ : st) {
          const Timing t = rn->run_once();
          st.SetIterationTime(t.total_ms * 1e-3);
          times.push_back(t);
        }
        rn->describe(*row);
        // The masks the peers time again (FlexAttention): random density and ProxyAttn's own.
        const bool exportable = c.method.family == Family::sparse || c.method.family == Family::proxyattn;
        if (exportable && export_on && rn->mask()) {
          if (!multi) {
            if (!exporter.has(c.method.label, c.n)) exporter.add(c.method.label, c.n, *rn->mask(), {{"dtype_timed", row->dtype}});
          } else if (captured_keys.insert({c.method.label, c.n}).second) {
            captured.push_back({i, encode_mask(*rn->mask()), {{"dtype_timed", row->dtype}}});
          }
        }
        rn->end_case();
      } catch (const std::exception& e) {
        row->status = "error";
        row->reason = e.what();
        st.SkipWithError(e.what());
        try {
          rn->end_case();
        } catch (...) {
        }
        return;
      }
      std::vector<double> total, est, kern;
      std::map<std::string, std::vector<double>> stages;
      for (const Timing& t : times) {
        total.push_back(t.total_ms);
        est.push_back(t.estimation_ms);
        kern.push_back(t.kernel_ms);
        for (const auto& [k, v] : t.stages) stages[k].push_back(v);
      }
      row->status = "ok";
      row->reason.clear();
      row->reps = static_cast<int>(times.size());
      row->total_ms = median_of(total);
      row->total_ms_min = *std::min_element(total.begin(), total.end());
      row->total_ms_max = *std::max_element(total.begin(), total.end());
      if (c.method.family == Family::estimate || c.method.family == Family::proxyattn) row->estimation_ms = median_of(est);
      if (c.method.family != Family::estimate) row->kernel_ms = median_of(kern);
      for (const auto& [k, v] : stages) row->extra["stages_median"][k] = median_of(v);
      st.counters["median_ms"] = *row->total_ms;
    })
        ->UseManualTime()
        ->Iterations(sw.repetitions)
        ->Unit(benchmark::kMillisecond);
  }

  if (quiet) {
    QuietReporter rep;
    benchmark::RunSpecifiedBenchmarks(&rep);
  } else {
    RankConsoleReporter rep(root);
    rep.SetOutputStream(&progress);
    rep.SetErrorStream(&progress);
    benchmark::RunSpecifiedBenchmarks(&rep);
  }
  benchmark::Shutdown();

  nlohmann::json per_rank = nlohmann::json::array();
  auto rank_info = [&](int r, const nlohmann::json& part, size_t ncases) {
    double mine = 0, all = 0;
    for (size_t i = 0; i < cases.size(); ++i) {
      all += cost[i];
      if (owner[i] == r) mine += cost[i];
    }
    nlohmann::json info = {{"rank", r},
                           {"host", part.at("host")},
                           {"local_rank", part.at("local_rank")},
                           {"device", part.at("device")},
                           {"device_name", part.at("device_name")},
                           {"gpu", part.at("gpu")},
                           {"cases", ncases}};
    if (multi) info["cost_share"] = all > 0 ? mine / all : 0.0;
    return info;
  };
  const nlohmann::json my_part = {{"host", dist.hostname()},
                                  {"local_rank", dist.local_rank()},
                                  {"device", dev},
                                  {"device_name", ctx.value("device_name", std::string("?"))},
                                  {"gpu", gpu >= 0 ? nlohmann::json(gpu) : nlohmann::json(nullptr)}};
  if (!multi) {
    per_rank.push_back(rank_info(0, my_part, cases.size()));
  } else {
    // A failed case fails the run (no report with holes); then every rank sends its rows and
    // masks to rank 0 as CBOR (doubles bit-exact).
    std::string failed;
    for (size_t i = 0; i < cases.size() && failed.empty(); ++i)
      if (owner[i] == dist.rank() && rows[i].status == "error")
        failed = fmt::format("{} N={} {}: {}", rows[i].method, rows[i].n, rows[i].dtype, rows[i].reason);
    dist.barrier_sleeping();  // a rank done early waits without spinning on a core the others time
    agree(dist, failed);
    nlohmann::json part = my_part;
    part["rows"] = nlohmann::json::array();
    part["masks"] = nlohmann::json::array();
    if (!root) {
      for (size_t i = 0; i < cases.size(); ++i)
        if (owner[i] == dist.rank()) part["rows"].push_back({{"case", i}, {"row", row_to_json(rows[i])}});
      for (CapturedMask& m : captured) {
        part["masks"].push_back({{"case", m.index}, {"info", m.info},
                                 {"bytes", nlohmann::json::binary(std::vector<uint8_t>(m.bytes.begin(), m.bytes.end()))}});
        std::string().swap(m.bytes);
      }
    }
    std::vector<std::string> parts;
    {
      const std::vector<uint8_t> cbor = nlohmann::json::to_cbor(part);
      part = nullptr;
      parts = dist.gather_to_root(std::string(cbor.begin(), cbor.end()));
    }
    if (!root) return 0;  // rank 0 writes the report
    std::map<size_t, CapturedMask> masks;
    for (CapturedMask& m : captured) masks[m.index] = std::move(m);
    for (int r = 0; r < dist.size(); ++r) {
      const nlohmann::json p = r == 0 ? my_part : nlohmann::json::from_cbor(parts[static_cast<size_t>(r)]);
      std::string().swap(parts[static_cast<size_t>(r)]);
      size_t n = 0;
      for (size_t i = 0; i < cases.size(); ++i) n += owner[i] == r;
      per_rank.push_back(rank_info(r, p, n));
      if (r == 0) continue;  // rank 0's rows are in place
      for (const nlohmann::json& e : p.at("rows")) {
        const size_t i = e.at("case").get<size_t>();
        if (i >= rows.size() || owner[i] != r) throw Error(fmt::format("rank {} sent a row of case {} it does not own", r, i));
        rows[i] = row_from_json(e.at("row"));
      }
      for (const nlohmann::json& e : p.at("masks")) {
        const auto& bin = e.at("bytes").get_binary();
        masks[e.at("case").get<size_t>()] = {e.at("case").get<size_t>(), std::string(bin.begin(), bin.end()), e.at("info")};
      }
    }
    for (auto& [i, m] : masks) {
      if (exporter.has(cases[i].method.label, cases[i].n)) continue;
      exporter.add(cases[i].method.label, cases[i].n,
                   decode_mask(m.bytes, fmt::format("mask of {} N={} from rank {}", cases[i].method.label, cases[i].n, owner[i])),
                   m.info);
      std::string().swap(m.bytes);
    }
  }
  ctx["distributed"] = {{"ranks", dist.size()},
                        {"mpi", dist.active()},
                        {"per_rank", per_rank},
                        {"case_rank", owner},
                        {"assignment", multi ? cost_model_text() : "one process: every case"}};

  finish_rows(rows);
  ctx["nvidia_smi_end"] = runner->context().value("nvidia_smi_end", std::string());
  nlohmann::json config = sw.raw;
  config["resolved"] = {{"device", dev},
                        {"model", sw.model.name},
                        {"block", sw.block},
                        {"repetitions", sw.repetitions},
                        {"warmup", sw.warmup},
                        {"seed", sw.seed},
                        {"inputs", sw.inputs},
                        {"cpu_max_len", sw.cpu_max_len},
                        {"k_min", sw.k_min},
                        {"gpu_mem_fraction", sw.gpu_mem_fraction}};
  if (!out_dir.empty()) write_reports(out_dir, rows, ctx, config);
  exporter.write();
  std::fputs(rows_to_markdown(rows, ctx).c_str(), stdout);
  int errors = 0;
  for (const Row& r : rows) errors += r.status == "error";
  if (errors) {
    std::fprintf(stderr, "proxyattn-bench: error: %d case(s) failed (reasons in the report)\n", errors);
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace proxyattn::bench

int main(int argc, char** argv) {
  using proxyattn::cli::guarded;
  // MPI_Init only under a launcher (mpirun/srun); otherwise one rank and no MPI call.
  std::optional<proxyattn::Distributed> dist;
  if (const int rc = guarded("proxyattn-bench", [&] {
        dist.emplace(argc, argv);
        return 0;
      }))
    return rc;
  if (dist->size() == 1 || dist->is_root())
    return guarded("proxyattn-bench", [&] { return proxyattn::bench::run(argc, argv, *dist); });
  // The other ranks: a failure every rank agreed on is printed once, by rank 0; anything else
  // (which should not happen outside agree) is printed here, naming the rank.
  try {
    return proxyattn::bench::run(argc, argv, *dist);
  } catch (const std::exception& e) {
    if (!proxyattn::bench::g_agreed_failure)
      proxyattn::cli::print_error("proxyattn-bench", "rank " + std::to_string(dist->rank()) + ": " + e.what());
  } catch (...) {
    if (!proxyattn::bench::g_agreed_failure)
      proxyattn::cli::print_error("proxyattn-bench", "rank " + std::to_string(dist->rank()) + ": unknown failure");
  }
  return proxyattn::cli::kExitFailure;
}
