// The analysis driver: stores -> (store, layer) units -> scheduled over threads / MPI ranks ->
// merged report. The pieces: layer_run.cpp (one unit), tables.cpp (the per-unit tables),
// aggregates.cpp (cross-store tables), wire.cpp (MPI), analyze_internal.hpp (shared types).
#include "proxyattn/analysis/analyze.hpp"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <atomic>
#include <future>
#include <mutex>
#include <thread>

#include "analyze_internal.hpp"
#include "proxyattn/checked.hpp"
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/distributed.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/host_memory.hpp"
#include "proxyattn/id_ranges.hpp"
#include "proxyattn/methods.hpp"
#include "proxyattn/progress.hpp"
#include "proxyattn/select.hpp"
#include "proxyattn/trace.hpp"

namespace proxyattn::analysis {

namespace detail {

Topics topics_of(const std::string& command) {
  Topics t;
  if (command == "similarity") t.similarity = true;
  else if (command == "recall") t.recall = true;
  else if (command == "budget") t.budget = true;
  else if (command == "error") t.recall = t.budget = t.error = true;
  else if (command == "all") t.similarity = t.recall = t.budget = t.error = true;
  else
    throw Error("unknown subcommand '" + command + "' (valid: similarity, recall, budget, error, all)");
  return t;
}

}  // namespace detail

using namespace detail;

std::vector<int> divisors(int n) {
  std::vector<int> d;
  for (int x = 1; x <= n; ++x)
    if (n % x == 0) d.push_back(x);
  return d;
}

void validate_config(const AnalyzeConfig& cfg) {
  topics_of(cfg.command);
  if (cfg.stores.empty()) throw Error("STORE: at least one store file is required");
  if (cfg.methods.empty()) throw Error("--methods: empty list (valid: " + method_name_list() + ")");
  for (const auto& m : cfg.methods) {
    try {
      find_method(m);
    } catch (const Error& e) {
      throw Error(std::string("--methods: ") + e.what());
    }
  }
  if (cfg.sparsity.empty()) throw Error("--sparsity: empty list");
  for (double s : cfg.sparsity)
    if (!(s >= 0.0 && s < 1.0)) throw Error("--sparsity: " + short_num(s) + " outside [0, 1)");
  if (cfg.gamma.empty()) throw Error("--gamma: empty list");
  for (double g : cfg.gamma)
    if (!(g > 0.0 && g <= 1.0)) throw Error("--gamma: " + short_num(g) + " outside (0, 1]");
  for (int g : cfg.groups)
    if (g < 1) throw Error("--groups: " + std::to_string(g) + " must be >= 1");
  if (cfg.block <= 0 || (cfg.block & (cfg.block - 1)) != 0)
    throw Error("--block: " + std::to_string(cfg.block) + " is not a positive power of two");
  if (cfg.density_rule != "auto") {
    try {
      parse_density_rule(cfg.density_rule);
    } catch (const Error&) {
      throw Error("--density-rule: unknown rule '" + cfg.density_rule +
                  "' (valid: auto, row_uniform, head_global, native_adjust)");
    }
  }
  if (cfg.topk_fractions.empty()) throw Error("top-k fractions: empty list");
  for (double f : cfg.topk_fractions)
    if (!(f > 0.0 && f <= 1.0)) throw Error("top-k fraction " + short_num(f) + " outside (0, 1]");
  if (cfg.sim_rows < 0) throw Error("--sim-rows: must be >= 0");
  if (cfg.device == "cuda" && !cuda_available()) {
    // "no CUDA device (<driver detail>)"; the detail is empty on a build without CUDA.
    std::string why = cuda_device_description();
    if (why.size() > 3 && why.compare(why.size() - 3, 3, " ()") == 0) why.resize(why.size() - 3);
    throw Error("--device cuda: " + why + " (needs a CUDA build and a visible GPU); use --device cpu");
  }
  if (cfg.device != "cpu" && cfg.device != "cuda") throw Error("--device: unknown device '" + cfg.device + "' (valid: cpu, cuda)");
  EstimatorConfig ec = cfg.estimator;
  ec.block = cfg.block;
  validate_estimator_config(ec);
  validate_budget_config(cfg.budget);
}

namespace {

json store_json(const StoreCtx& s) {
  const StoreMeta& m = s.reader->meta();
  json j = store_attributes_json(m);
  j["label"] = s.label;
  j["path"] = s.path;
  if (m.needle) j["needle"] = {{"position", m.needle->position}, {"text", m.needle->text}};
  else j["needle"] = nullptr;
  j["layers_analyzed"] = s.layers;
  j["proxy_groups"] = s.groups;
  j["has_v"] = s.error_ok;
  return j;
}

struct LayerCounts {
  double score_sets = 0, masks = 0;
};
// How many [Hq, Nb, Nb] score sets and block masks one unit holds at most.
LayerCounts layer_counts(const AnalyzeConfig& cfg, const StoreCtx& s) {
  const double methods = static_cast<double>(cfg.methods.size()), groups = static_cast<double>(s.groups.size());
  const double gammas = static_cast<double>(cfg.gamma.size()), sparsities = static_cast<double>(cfg.sparsity.size());
  LayerCounts c;
  c.score_sets = groups + methods * gammas + 2;  // + the oracle mass and block max
  c.masks = (methods + groups) * (gammas + sparsities) + 5 * gammas + 2 * gammas * sparsities + sparsities;
  return c;
}

// Host bytes of one unit: Q/K(/V) float32 twice (the layer and the one read ahead), the score
// sets, the masks (CSR, at most half the causal blocks on average), the oracle's arrays.
double host_layer_bytes(const AnalyzeConfig& cfg, const Topics& topics, const StoreCtx& s) {
  const StoreMeta& m = s.reader->meta();
  const double N = static_cast<double>(m.seq_len), d = m.head_dim, hq = m.num_q_heads, hkv = m.num_kv_heads;
  const double nb = std::ceil(N / cfg.block), cells = hq * nb * nb;
  const bool v = topics.error && s.error_ok;
  const LayerCounts c = layer_counts(cfg, s);
  const double layer = (hq + hkv * (v ? 2 : 1)) * N * d * 4;
  return 2 * layer + (c.score_sets + 4) * cells * 4 + c.masks * cells * 0.5 * 4 * 0.5 + 2 * hq * N * 4;
}

// Device bytes of one unit (--device cuda): Q/K/V fp16, the full and one sparse output in
// float32, LSE, a few score arrays and one mask's CSR.
double gpu_layer_bytes(const AnalyzeConfig& cfg, const Topics& topics, const StoreCtx& s) {
  const StoreMeta& m = s.reader->meta();
  const double N = static_cast<double>(m.seq_len), d = m.head_dim, hq = m.num_q_heads, hkv = m.num_kv_heads;
  const double nb = std::ceil(N / cfg.block), cells = hq * nb * nb;
  const bool v = topics.error && s.error_ok;
  return (hq + hkv * (v ? 2 : 1)) * N * d * 2 + (v ? 2 * hq * N * d * 4 : 0) + hq * N * 8 + 6 * cells * 4 +
         double(1 << 29);
}

void check_fits(const AnalyzeConfig& cfg, const Topics& topics, const StoreCtx& s) {
  // The estimates are doubles of products of file values: compare before converting.
  const double host = static_cast<double>(host_layer_bytes(cfg, topics, s));
  const double have = static_cast<double>(available_memory_bytes());
  if (host > have)
    throw Error(fmt::format("{}: seq_len {} with --block {}: one layer needs about {} of host memory (Q/K/V float32 "
                            "with the layer read ahead, and the block matrices: score sets and masks of every "
                            "method), only {} available; analyse fewer methods/groups/sparsities or a shorter store",
                            s.path, s.reader->meta().seq_len, cfg.block, format_bytes(host > 9e18 ? INT64_MAX : static_cast<int64_t>(host)),
                            format_bytes(static_cast<int64_t>(have))));
  if (cfg.device != "cuda") return;
  const double gpu = static_cast<double>(gpu_layer_bytes(cfg, topics, s));
  const double dev = static_cast<double>(cuda_device_memory_bytes());
  if (dev > 0 && gpu > 0.9 * dev)
    throw Error(fmt::format("{}: seq_len {} with --block {}: one layer needs about {} of GPU memory (Q/K/V fp16, "
                            "full and sparse outputs float32, score arrays), the device has {}; use --device cpu or "
                            "a shorter store",
                            s.path, s.reader->meta().seq_len, cfg.block, format_bytes(gpu > 9e18 ? INT64_MAX : static_cast<int64_t>(gpu)),
                            format_bytes(static_cast<int64_t>(dev))));
}

// Cost of one unit in FLOP-like units for the MPI balance: the oracle pass (QK^T and PV over the
// causal half), the output error pass when V is read, and every method's estimate.
double unit_cost(const AnalyzeConfig& cfg, const Topics& topics, const StoreCtx& s) {
  const StoreMeta& m = s.reader->meta();
  AttentionShape sh;
  sh.q_heads = m.num_q_heads;
  sh.kv_heads = m.num_kv_heads;
  sh.head_dim = m.head_dim;
  sh.seq_len = m.seq_len;
  EstimatorConfig c = cfg.estimator;
  c.block = cfg.block;
  double units = 1.0 + (topics.error && s.error_ok ? 1.0 : 0.0);
  for (const std::string& name : cfg.methods) {
    const MethodInfo& method = find_method(name);
    const double configs = method.grouped() ? static_cast<double>(s.groups.size()) : 1.0;
    units += configs * method.cost(sh, c);
  }
  return static_cast<double>(m.seq_len) * static_cast<double>(m.seq_len) * m.num_q_heads * m.head_dim * units;
}

}  // namespace

json analyze(const AnalyzeConfig& cfg_in, const Distributed* dist) {
  AnalyzeConfig cfg = cfg_in;
  validate_config(cfg);
  const Topics topics = topics_of(cfg.command);
  std::sort(cfg.gamma.begin(), cfg.gamma.end());
  cfg.gamma.erase(std::unique(cfg.gamma.begin(), cfg.gamma.end()), cfg.gamma.end());
  std::sort(cfg.sparsity.begin(), cfg.sparsity.end());
  cfg.sparsity.erase(std::unique(cfg.sparsity.begin(), cfg.sparsity.end()), cfg.sparsity.end());
  std::sort(cfg.groups.begin(), cfg.groups.end());
  cfg.groups.erase(std::unique(cfg.groups.begin(), cfg.groups.end()), cfg.groups.end());
  const auto wall0 = std::chrono::steady_clock::now();
  const double cpu0 = cpu_now();
  // --device cuda: the driver makes the context while the stores are opened and read.
  std::future<void> context;
  if (cfg.device == "cuda") context = start_cuda_context();

  // Open and check every store before the heavy work.
  std::vector<StoreCtx> stores;
  std::set<std::string> notes;
  std::map<std::string, int> label_count;
  for (const std::string& path : cfg.stores) {
    StoreCtx s;
    s.path = path;
    if (!std::filesystem::exists(path)) throw Error(path + ": no such store file");
    ReadOptions ro;
    ro.allow_nonfinite = cfg.allow_nonfinite;
    s.reader = std::make_unique<StoreReader>(path, ro);
    const StoreMeta& m = s.reader->meta();
    std::string label = std::filesystem::path(path).stem().string();
    if (const int n = ++label_count[label]; n > 1) label += "#" + std::to_string(n);
    s.label = label;
    const std::vector<int>& have = s.reader->layers();
    if (have.empty()) throw Error(path + ": the store holds no layers");
    // Sliding-window (local) layers attend a band, not the causal triangle: every metric here
    // (oracle, recall, density) is over the causal triangle, so they are never analysed as if
    // they were global. By default the global layers are analysed and the notes say so; a
    // sliding layer asked for by --layers is an error.
    std::vector<int> sliding, global;
    int64_t window = 0;
    for (int l : have) {
      const LayerAttention& att = s.reader->attention(l);
      (att.sliding() ? sliding : global).push_back(l);
      if (att.sliding()) window = att.window;
    }
    if (cfg.layers.empty()) {
      if (global.empty())
        throw Error(path + ": every layer is sliding-window (window " + std::to_string(window) +
                    "); the analysis covers global (full causal) layers only, banded analysis is not supported yet");
      s.layers = global;
      if (!sliding.empty())
        notes.insert(label + ": sliding-window layers " + format_id_ranges(sliding) + " (window " +
                     std::to_string(window) + ") not analysed: the metrics are over the causal triangle and a "
                     "banded analysis is not supported yet; global layers " + format_id_ranges(global) + " analysed");
    } else {
      for (int l : cfg.layers) {
        if (std::find(have.begin(), have.end(), l) == have.end())
          throw Error("--layers: layer " + std::to_string(l) + " is not in " + path + " (layers " +
                      format_id_ranges(have) + ")");
        if (std::find(sliding.begin(), sliding.end(), l) != sliding.end())
          throw Error("--layers: layer " + std::to_string(l) + " of " + path + " is sliding-window (window " +
                      std::to_string(s.reader->attention(l).window) +
                      "): banded analysis is not supported yet; analyse its global layers (" +
                      (global.empty() ? std::string("none") : format_id_ranges(global)) + ")");
      }
      s.layers = cfg.layers;
    }
    if (cfg.groups.empty()) {
      s.groups = divisors(m.num_q_heads);
    } else {
      for (int g : cfg.groups)
        if (m.num_q_heads % g != 0)
          throw Error("--groups: " + std::to_string(g) + " does not divide the " +
                      std::to_string(m.num_q_heads) + " query heads of " + path);
      s.groups = cfg.groups;
    }
    s.error_ok = true;
    for (int l : s.layers)
      if (!s.reader->has_v(l)) s.error_ok = false;
    if (topics.error && !s.error_ok) {
      if (cfg.command == "error")
        throw Error(path + ": no V in some analysed layers; the output error needs V (capture "
                    "with V, or use the recall subcommand)");
      notes.insert(s.label + ": no V in some analysed layers, output error skipped");
    }
    stores.push_back(std::move(s));
  }

  json report = report_skeleton("proxyattn-analyze", cfg.command);
  report["argv"] = cfg.argv;
  report["device"]["kind"] = cfg.device;
  report["device"]["threads"] = omp_get_max_threads();
  if (cfg.device == "cuda") {
    report["device"]["name"] = cuda_device_description();
    std::string on_gpu, on_cpu;
    for (const std::string& name : cfg.methods) {
      const MethodInfo& m = find_method(name);
      if (m.has_gpu() && m.gpu_in_analysis) on_gpu += (on_gpu.empty() ? "" : ", ") + m.name;
      else on_cpu += (on_cpu.empty() ? "" : ", ") + m.name + (m.gpu_note.empty() ? " (no GPU kernel)" : " (" + m.gpu_note + ")");
    }
    notes.insert("--device cuda: on the GPU (fp16 operands, fp32 accumulation): exact block mass and row LSE, the "
                 "output error of every selection (block-sparse attention against full attention, fp32 outputs), "
                 "the scores of " + (on_gpu.empty() ? std::string("no method") : on_gpu) +
                 " (natives: the CPU's rules on the GPU scores); on the CPU: " + (on_cpu.empty() ? std::string("no method") : on_cpu) +
                 ", the last block's token probabilities, budgets, selections and the metrics over the block arrays. "
                 "Tables match --device cpu within 1e-3; a mask can differ only at a near tie of the CPU's own "
                 "decision (scores within float rounding at a cut)");
  }
  for (const std::string& name : cfg.methods) {
    const MethodInfo& m = find_method(name);
    if (m.config_note) notes.insert(m.config_note(cfg.estimator));
  }
  json& c = report["config"];
  c["command"] = cfg.command;
  c["layers"] = cfg.layers.empty() ? json("all") : json(cfg.layers);
  c["methods"] = cfg.methods;
  c["sparsity"] = cfg.sparsity;
  c["gamma"] = cfg.gamma;
  c["gamma_ref"] = gamma_ref(cfg);
  c["groups"] = cfg.groups.empty() ? json("divisors of Hq") : json(cfg.groups);
  c["block"] = cfg.block;
  c["density_rule"] = cfg.density_rule;
  c["topk_fractions"] = cfg.topk_fractions;
  c["sim_rows"] = cfg.sim_rows;
  c["allow_nonfinite"] = cfg.allow_nonfinite;
  c["budget_kinds"] = json::array();
  for (const BudgetKindInfo* k : all_budget_kinds()) c["budget_kinds"].push_back(k->name);
  c["estimator"] = json::object();
  for (const MethodInfo* m : all_methods())
    if (!m->options.empty()) c["estimator"][m->name] = m->config_json(cfg.estimator);
  c["budget"] = {{"k_min", cfg.budget.k_min}, {"mode", std::string(budget_mode_name(cfg.budget.mode))},
                 {"uniform_k", "round(mean dynamic k_h at the same gamma)"}};
  report["stores"] = json::array();
  for (const StoreCtx& s : stores) report["stores"].push_back(store_json(s));

  make_tables(report, cfg, topics);  // every table exists (with its columns) even when empty

  // Units of work: (store, layer).
  struct Unit {
    StoreCtx* store = nullptr;
    int layer = 0;
    json doc = json::object();
    Aggregates agg;
    Timing tm;
    std::set<std::string> notes;
    std::string error;
  };
  std::vector<Unit> units;
  for (StoreCtx& s : stores)
    for (int l : s.layers) {
      Unit u;
      u.store = &s;
      u.layer = l;
      units.push_back(std::move(u));
    }
  // Across MPI ranks: units balanced by cost (the registry's cost model), each rank runs its
  // own, rank 0 receives every result and merges in (store, layer) order exactly as one process
  // would.
  const int ranks = dist ? dist->size() : 1, rank = dist ? dist->rank() : 0;
  std::vector<int> owner(units.size(), 0);
  if (ranks > 1) {
    std::vector<double> cost;
    for (const Unit& u : units) cost.push_back(unit_cost(cfg, topics, *u.store));
    owner = assign_by_cost(cost, ranks);
  }
  std::vector<Unit*> mine;
  for (size_t i = 0; i < units.size(); ++i)
    if (owner[i] == rank) mine.push_back(&units[i]);

  // Fail before any work when one layer cannot fit (host memory, GPU memory).
  for (const StoreCtx& s : stores) check_fits(cfg, topics, s);

  // Schedule. Units run in parallel (one thread each, serial inside: no thousands of tiny
  // parallel regions) only when they keep every thread busy over the rounds (at least 75 %)
  // and that many layers fit in memory; otherwise units run one after another with the work
  // inside parallel over (head, block), and the next layer is read from HDF5 while the current
  // one computes. So 2 layers cost about twice 1 layer whatever the thread count.
  const int threads = omp_get_max_threads();
  double unit_bytes = 0;
  for (const StoreCtx& s : stores) unit_bytes = std::max(unit_bytes, host_layer_bytes(cfg, topics, s));
  const size_t n_mine = mine.size();
  const size_t rounds = threads > 0 ? (n_mine + static_cast<size_t>(threads) - 1) / static_cast<size_t>(threads) : 0;
  const double busy = rounds ? static_cast<double>(n_mine) / (static_cast<double>(rounds) * threads) : 0.0;
  const bool outer = cfg.device == "cpu" && threads > 1 && n_mine >= static_cast<size_t>(threads) && busy >= 0.75 &&
                     unit_bytes * threads <= 0.25 * static_cast<double>(available_memory_bytes());
  // Two units in flight (lanes) when they run one after another: on the GPU one unit's CPU
  // stages overlap the other's kernels. Both must fit: host memory for two units (each with its
  // own block matrices) and the GPU for two.
  int lanes = 1;
  if (!outer && n_mine >= 2 && threads >= 2) {
    double gpu_bytes = 0;
    for (const StoreCtx& s : stores) gpu_bytes = std::max(gpu_bytes, gpu_layer_bytes(cfg, topics, s));
    const double dev = cfg.device == "cuda" ? static_cast<double>(cuda_device_memory_bytes()) : 0.0;
    const bool fits = 2 * unit_bytes <= 0.5 * static_cast<double>(available_memory_bytes()) &&
                      (cfg.device != "cuda" || 2 * gpu_bytes <= 0.9 * dev);
    const int wanted = cfg.lanes > 0 ? cfg.lanes : (cfg.device == "cuda" ? 2 : 1);
    lanes = wanted == 2 && fits ? 2 : 1;
  }
  Progress progress("analyze " + cfg.command, static_cast<int64_t>(mine.size()), cfg.quiet);
  auto read_unit = [&](const Unit& u) {
    // One HDF5 reader per store, shared by the units: reads never overlap.
    static std::mutex read_mutex;
    std::lock_guard lock(read_mutex);
    return u.store->reader->read_layer(u.layer, topics.error && u.store->error_ok);
  };
  auto run_unit = [&](Unit& u, LayerData&& data, double read_wall, double read_cpu) {
    u.tm.thread_clock = outer;
    u.tm.reset();
    u.tm.stages["read"].wall += read_wall;
    u.tm.stages["read"].cpu += read_cpu;
    progress.set_label(fmt::format("analyze {}: {} layer {}", cfg.command, u.store->label, u.layer));
    Tables T = make_tables(u.doc, cfg, topics);
    run_layer(cfg, topics, *u.store, std::move(data), T, u.agg, u.tm, u.notes);
    u.tm.switch_to("other");
    progress.tick();
  };
  auto guarded = [](Unit& u, auto&& f) {
    try {
      f();
    } catch (const std::exception& e) {
      u.error = e.what();
    }
  };
  if (outer) {
    const int levels = omp_get_max_active_levels();
    omp_set_max_active_levels(1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (size_t i = 0; i < mine.size(); ++i)
      guarded(*mine[i], [&] {
        const auto w0 = std::chrono::steady_clock::now();
        const double c0 = cpu_now(true);
        LayerData data = read_unit(*mine[i]);
        run_unit(*mine[i], std::move(data), seconds_since(w0), cpu_now(true) - c0);
      });
    omp_set_max_active_levels(levels);
  } else if (lanes == 2) {
    // Each lane takes the next unit, reads it (reads are serialised) and runs it with half the
    // threads; a failure stops both lanes after their current unit.
    std::atomic<size_t> next_unit{0};
    std::atomic<bool> failed{false};
    const int device = cfg.device == "cuda" ? current_cuda_device() : -1;  // per host thread in CUDA
    std::mutex lane_error_mutex;
    std::string lane_error;
    auto lane = [&](int lane_threads) {
      omp_set_num_threads(lane_threads);
      set_cpu_threads(lane_threads);
      try {
        use_cuda_device(device);
      } catch (const std::exception& e) {
        const std::lock_guard lock(lane_error_mutex);
        lane_error = e.what();
        failed = true;
      }
      while (!failed) {
        const size_t i = next_unit++;
        if (i >= mine.size()) return;
        guarded(*mine[i], [&] {
          const auto w0 = std::chrono::steady_clock::now();
          LayerData data = read_unit(*mine[i]);
          run_unit(*mine[i], std::move(data), seconds_since(w0), 0.0);
        });
        if (!mine[i]->error.empty()) failed = true;
      }
    };
    const int main_threads = omp_get_max_threads(), main_cpu = cpu_threads();
    std::thread other(lane, threads - threads / 2);
    lane(threads / 2);
    other.join();
    if (!lane_error.empty() && mine.front()->error.empty()) mine.front()->error = lane_error;  // reported as a unit's
    omp_set_num_threads(main_threads);
    set_cpu_threads(main_cpu == main_threads ? 0 : main_cpu);
  } else {
    // The read of unit i + 1 overlaps the work of unit i (its time is not in any stage: the
    // first read is).
    std::future<LayerData> next;
    auto start_read = [&](size_t i) { next = std::async(std::launch::async, [&, i] { return read_unit(*mine[i]); }); };
    if (!mine.empty()) start_read(0);
    for (size_t i = 0; i < mine.size(); ++i) {
      const auto w0 = std::chrono::steady_clock::now();
      std::optional<LayerData> data;
      guarded(*mine[i], [&] { data = next.get(); });
      const double read_wall = seconds_since(w0);
      if (i + 1 < mine.size() && !data) break;  // a read failed: stop, report it
      if (i + 1 < mine.size()) start_read(i + 1);
      if (data) guarded(*mine[i], [&] { run_unit(*mine[i], std::move(*data), read_wall, 0.0); });
      if (!mine[i]->error.empty()) {
        if (next.valid()) next.wait();
        break;
      }
    }
  }
  json rank_info = json::array();
  std::string first_error;
  for (const Unit* u : mine)
    if (!u->error.empty()) {
      first_error = u->error;
      break;
    }
  if (ranks == 1) {
    if (!first_error.empty()) throw Error(first_error);
  } else {
    dist->agree_or_throw(first_error);  // one failing rank fails them all, with its message
    json out = json::array();
    for (size_t i = 0; i < units.size(); ++i) {
      if (owner[i] != rank) continue;
      const Unit& u = units[i];
      json stages = json::object();
      for (const auto& [name, st] : u.tm.stages) stages[name] = json::array({st.wall, st.cpu});
      out.push_back({{"unit", i}, {"doc", u.doc}, {"agg", aggregates_wire(u.agg)}, {"stages", stages},
                     {"second_pass_masks", u.tm.second_pass_masks}, {"notes", u.notes}});
    }
    const json mine_doc = {{"host", dist->hostname()}, {"device", cfg.device}, {"units", std::move(out)}};
    const std::vector<uint8_t> bytes = json::to_cbor(mine_doc);
    const std::vector<std::string> parts = dist->gather_to_root(std::string(bytes.begin(), bytes.end()));
    if (!dist->is_root()) return json();  // rank 0 writes the report
    for (int r = 0; r < ranks; ++r) {
      json part = json::from_cbor(parts[static_cast<size_t>(r)]);
      rank_info.push_back({{"rank", r}, {"host", part.at("host")}, {"device", part.at("device")},
                           {"units", part.at("units").size()}});
      if (r == 0) continue;  // rank 0's units are already in place
      for (json& e : part.at("units")) {
        Unit& u = units.at(e.at("unit").get<size_t>());
        u.doc = std::move(e.at("doc"));
        u.agg = aggregates_unwire(e.at("agg"));
        for (const auto& [name, st] : e.at("stages").items())
          u.tm.stages[name] = {st.at(0).get<double>(), st.at(1).get<double>()};
        u.tm.second_pass_masks = e.at("second_pass_masks").get<int64_t>();
        u.notes = e.at("notes").get<std::set<std::string>>();
      }
    }
  }
  report["distributed"] = {{"ranks", ranks},
                           {"mpi", dist && dist->active()},
                           {"per_rank", rank_info},
                           {"assignment", "longest-processing-time first by cost N^2 * Hq * d per (store, layer)"}};

  // Merge the units in (store, layer) order: rows, aggregates, timing, notes.
  Aggregates A;
  Timing tm;
  std::map<std::string, double> store_seconds;
  for (Unit& u : units) {
    for (auto& [name, table] : u.doc["tables"].items()) {
      json& rows = report["tables"][name]["rows"];
      for (auto& r : table["rows"]) rows.push_back(std::move(r));
    }
    merge_into(A, std::move(u.agg));
    tm.second_pass_masks += u.tm.second_pass_masks;
    for (const auto& [stage, st] : u.tm.stages) {
      tm.stages[stage].wall += st.wall;
      tm.stages[stage].cpu += st.cpu;
      store_seconds[u.store->label] += st.wall;
    }
    notes.insert(u.notes.begin(), u.notes.end());
  }
  json per_store = json::array();
  for (const StoreCtx& s : stores)
    per_store.push_back({{"store", s.label}, {"layers", s.layers.size()}, {"thread_seconds", store_seconds[s.label]}});
  progress.done();
  std::optional<TraceScope> trace(std::in_place, "aggregate tables");
  aggregate_tables(report, cfg, A);
  trace.reset();

  json& t = report["timing"];
  t["total_seconds"] = seconds_since(wall0);
  t["total_cpu_seconds"] = cpu_now() - cpu0;
  t["threads"] = threads;
  t["parallel_over"] = outer ? "layers" : (lanes == 2 ? "heads and blocks, 2 units in flight" : "heads and blocks");
  t["lanes"] = lanes;
  t["host_huge_pages"] = host_huge_pages();
  t["cuda_module_loading"] = cuda_module_loading();
  // Exclusive per stage, summed over units (thread-seconds when units ran in parallel);
  // estimate:<method> is each estimator's scoring time.
  json stages = json::object();
  for (const auto& [name, st] : tm.stages) stages[name] = {{"wall_seconds", st.wall}, {"cpu_seconds", st.cpu}};
  t["stages"] = stages;
  t["second_pass_masks"] = tm.second_pass_masks;
  t["per_store"] = per_store;
  // Fixed sparsities that were not reached, summarised per store: the ceiling that the forced
  // sink and diagonal blocks set, then any other miss with its range over layers.
  for (const auto& [label, misses] : A.missed) {
    const int nb = A.store_blocks[label];
    const double ceiling = nb > 1 ? 1.0 - (2.0 * nb - 1.0) / (0.5 * nb * (nb + 1.0)) : 0.0;
    std::set<double> capped;
    std::map<std::string, std::pair<double, double>> other;  // "id" -> reached range
    for (const auto& m : misses) {
      if (std::abs(m.reached - ceiling) < 0.005) {
        capped.insert(m.target);
        continue;
      }
      auto [it, fresh] = other.try_emplace(m.id, m.reached, m.reached);
      it->second.first = std::min(it->second.first, m.reached);
      it->second.second = std::max(it->second.second, m.reached);
    }
    if (!capped.empty()) {
      std::string ts;
      for (double t : capped) ts += (ts.empty() ? "" : ", ") + short_num(t);
      notes.insert(fmt::format("{}: with Nb = {} blocks the sink and diagonal blocks alone keep sparsity <= "
                               "{:.3f}; targets {} give that ceiling for every method that forces them",
                               label, nb, ceiling, ts));
    }
    for (const auto& [id, range] : other)
      notes.insert(fmt::format("{}: {} reached sparsity {:.3f}{} (target off by more than 0.01)", label, id,
                               range.first, range.second > range.first + 1e-9
                                                ? fmt::format(" to {:.3f} over layers", range.second)
                                                : std::string()));
  }
  report["notes"] = json(std::vector<std::string>(notes.begin(), notes.end()));
  return report;
}

}  // namespace proxyattn::analysis