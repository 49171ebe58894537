// One (store, layer) unit of the analysis: the exact quantities once, every method's
// selections, their metrics. Methods are read from the registry (methods.hpp) by trait; nothing
// here knows a method by name.
//
// CPU (--device cpu): three phases around one fused pass over the layer:
//   before  the selections that need neither the oracle nor its block max (methods whose
//           scores are not the block max, budgets read from the last block);
//   pass    oracle + output error of the "before" masks + prefix error tables of the rankings
//           the later masks are built from (oracle mass, block max, budget-driven scores);
//   after   the oracle's own selections, scores equal to the oracle's block max and the oracle
//           budget; their errors come from the prefix tables.
// GPU (--device cuda): the layer is uploaded first (with every core for its rounding), then the
// CPU-only estimates start on a background thread at a lower priority, the exact block mass and
// row LSE come from the kernels (the last block's float64 probabilities beside them), then
// every selection. The GPU estimates run ahead on a thread of their own, in the order the
// selections ask for them, so the CPU's selection work overlaps the next estimate's kernels.
// The output error of every distinct mask comes from block-sparse attention on the device, one
// shared pass per ranking whose prefixes the masks are, in batches on a worker thread (its own
// CUDA stream) as the masks are made (submit_errors). Never an N x N buffer, no CPU pass over
// the layer.
#include <omp.h>
#ifdef __linux__
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <future>
#include <mutex>
#include <optional>

#include "analyze_internal.hpp"
#include "proxyattn/analysis/layer_oracle.hpp"
#include "proxyattn/budget.hpp"
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/methods.hpp"
#include "proxyattn/select.hpp"
#include "proxyattn/trace.hpp"

namespace proxyattn::analysis::detail {

namespace {

// The CPU estimates in the background yield the cores to the layer's critical path (the
// selections, the metrics): this thread, and the OpenMP team it starts, at a lower priority
// (on Linux nice is per thread, inherited by the threads it creates). They finish in the
// waits for the GPU instead.
void yield_to_foreground() {
#ifdef __linux__
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
#endif
}

class LayerRun {
 public:
  LayerRun(const AnalyzeConfig& cfg, const Topics& topics, StoreCtx& store, LayerData&& data, Tables& tables,
           Aggregates& agg, Timing& timing, std::set<std::string>& notes)
      : cfg_(cfg), topics_(topics), store_(store), layer_(data.layer), T_(tables), A_(agg), tm_(timing),
        notes_(notes), data_(std::move(data)) {}

  ~LayerRun() { prefetch_stop_ = true; }  // an error: the GPU estimates not yet begun are skipped

  void run();

 private:
  enum class Phase { before, after };
  const BlockScores& scores(const MethodInfo& method, int groups, double gamma);
  std::string score_key(const MethodInfo& method, int groups, double gamma) const {
    // Only the coverage-driven natives depend on gamma; grouped methods on their groups.
    return method.name + "/" + std::to_string(groups) + "/" + (method.set_coverage ? short_num(gamma) : "");
  }
  // The CPU estimate of `method` at `gamma`, with its score_key; every gamma of cfg_ at once
  // where the method gives them together (coverages_in_one). Reads only q_, k_ and cfg_, so it
  // may run on another thread.
  std::vector<std::pair<std::string, BlockScores>> cpu_estimates(const MethodInfo& method, int groups, double gamma) const;
  // --device cuda: the CPU-only estimates (methods whose GPU estimate the analysis does not
  // take) start on a background thread once the layer is uploaded, so they run while the GPU
  // works, yielding the cores to the main thread.
  void start_cpu_estimates();
  struct Background {
    std::future<std::vector<std::pair<std::string, BlockScores>>> scores;  // by score_key
    double wall = 0, cpu = 0;  // of the estimate on its own thread
    // The selection order of the scores the "auto" fixed densities start from (written before
    // the scores are set).
    std::map<std::string, std::vector<int32_t>> orders;
  };
  // --device cuda: the scores computed on the GPU (the estimates the analysis takes from the
  // device, and the block max of the after-pass score sets), one after another on a thread of
  // their own, started once the exact quantities exist; scores() waits for its key.
  BlockScores gpu_scores(const MethodInfo& method, int groups, double gamma);
  BlockScores block_max_scores(const MethodInfo& method, std::vector<float> block_max) const;  // a group per head
  bool on_gpu(const MethodInfo& method, int groups) const {
    return cuda() && !method.exact_mass && (after_pass(method, groups) || (method.has_gpu() && method.gpu_in_analysis));
  }
  void start_gpu_estimates();
  struct Prefetch {
    const MethodInfo* method;
    int groups;
    double gamma;
    bool with_order;  // the selections will rank these scores (order_of): ranked on the worker too
    std::promise<BlockScores> promise;
    std::future<BlockScores> result = promise.get_future();
    // On the worker, written before the result is set:
    double wall = 0;
    std::vector<int32_t> order;  // selection_order of the scores, when with_order
  };
  // Methods whose estimate gives every gamma's native at once (estimate_coverages).
  static bool coverages_in_one(const MethodInfo& m) {
    return m.native == NativeRule::estimate && m.estimate_cpu_coverages && m.set_coverage;
  }
  const Budgets& budgets(const BudgetKindInfo& kind, const BlockScores& sc, double gamma);
  BlockMask fixed_selection(const MethodInfo& method, const BlockScores& sc, double density, std::string& rule);
  EstimatorConfig config_for(const MethodInfo& method, int groups, double gamma) const;
  // Scores equal to the oracle's block max: built after the pass on both devices (so the rows
  // come in the same order), taken from the CPU pass's block max on the CPU.
  bool after_pass(const MethodInfo& method, int groups) const {
    return method.equals_block_max && method.equals_block_max(config_for(method, groups, kNaN), H_);
  }
  bool from_pass(const MethodInfo& method, int groups) const { return !cuda() && after_pass(method, groups); }
  bool in_phase(bool needs_pass) const { return needs_pass == (phase_ == Phase::after); }
  // Adds a selection (once per id); make() runs only when it is added. Returns its index.
  template <class F>
  size_t add(SelDesc d, F&& make);
  void similarity();
  // The similarity topic's tables and aggregates from what similarity() took (reads only the
  // oracle, its budgets and these, so it may run on another thread).
  void similarity_tables(const std::vector<float>& probs, const std::vector<const BlockScores*>& proxies);
  void recall_selections();
  void budget_selections();
  void budget_selections_in_phase();
  void pass();
  void gpu_pass();  // the exact quantities on the device, then the GPU estimates started
  // --device cuda: the output errors are computed in batches on a worker thread while the CPU
  // goes on making selections. submit_errors() sends the distinct masks made since the last
  // batch with the rankings known by then (a ranking's prefix masks share one pass); masks that
  // are prefixes of `hold` wait for a later batch, so that ranking still gets a single pass.
  void submit_errors(const std::vector<int32_t>* hold);
  // The budget topic's score set's ranking while its budget selections are still to come in
  // this phase (they are prefixes of it), else null.
  const std::vector<int32_t>* budget_ranking_to_hold();
  // The rankings the GPU's shared error passes may use, built once each and kept (a batch on
  // the worker reads them).
  std::vector<const std::vector<int32_t>*> error_orders();
  void gpu_output_errors(std::vector<std::vector<double>>& rel, std::vector<int64_t>& empty);
  struct ErrorBatch {
    std::vector<const BlockMask*> masks;
    std::shared_future<MaskErrors> result;
    std::shared_ptr<double> wall = std::make_shared<double>(0.0);  // on the worker, after the wait
  };
  void evaluate();

  const AnalyzeConfig& cfg_;
  const Topics& topics_;
  StoreCtx& store_;
  int layer_;
  Tables& T_;
  Aggregates& A_;
  Timing& tm_;
  std::set<std::string>& notes_;
  int H_ = 0;

  // --device cuda: the layer's Q, K (and V for the output error) on the GPU, fp16: exact for the
  // float16 stores.
  CudaLayer& gpu() {
    if (!gpu_) gpu_ = std::make_unique<CudaLayer>(q_, k_, errors_ ? data_.v->view() : ConstView{}, DType::f16);
    return *gpu_;
  }
  bool cuda() const { return cfg_.device == "cuda"; }
  std::unique_ptr<CudaLayer> gpu_;

  Phase phase_ = Phase::before;
  bool errors_ = false;  // output error computed for this layer
  LayerData data_;
  ConstView q_, k_;
  LayerOracle oracle_;
  LayerPass pass_;                      // errors and prefix tables (oracle moved to oracle_)
  std::vector<int> explicit_of_;        // per selection: index into pass_.errors, or -1
  std::vector<OracleBudget> obudget_;   // per cfg.gamma
  // --device cuda: the last query block's token probabilities, computed beside the kernels
  // (gpu_pass) and waited for at their first use (dynamic / token budgets, head similarity).
  std::future<std::vector<double>> last_block_;
  const std::vector<float>& last_block_probs() {
    if (last_block_.valid()) {
      Timing::Scope scope(tm_, "last_block");  // what is left of it
      TraceScope trace("wait for the last block's probabilities");
      const std::vector<double> p = last_block_.get();
      oracle_.last_block_probs.assign(p.begin(), p.end());
    }
    return oracle_.last_block_probs;
  }
  // Each oracle mass row's ranking (mass_rank_positions), once: oracle budgets, top-k masks and
  // block recall read it.
  std::vector<int32_t> rank_pos_;
  const std::vector<int32_t>& rank_pos() {
    if (rank_pos_.empty()) rank_pos_ = mass_rank_positions(oracle_.mass);
    return rank_pos_;
  }
  std::map<std::string, BlockScores> score_cache_;
  std::map<std::string, Budgets> budget_cache_;
  // Selection order of each budget-driven score set (select.hpp selection_order): its budgets'
  // masks are then prefixes per row, no sort per mask.
  std::map<const BlockScores*, std::vector<int32_t>> order_cache_;
  // Fixed-density masks computed together with the one asked for, until they are asked for.
  std::map<std::pair<const BlockScores*, double>, BlockMask> density_cache_;
  const std::vector<int32_t>& order_of(const BlockScores& sc) {
    auto it = order_cache_.find(&sc);
    if (it == order_cache_.end()) it = order_cache_.emplace(&sc, selection_order(sc)).first;
    return it->second;
  }
  std::deque<Selection> sels_;  // a deque: the error batches hold pointers to its masks
  std::map<std::string, size_t> sel_index_;
  // Budget topic rows: accuracy is computed once the oracle budget exists.
  struct PendingBudget {
    std::string kind;
    double gamma;
    size_t gamma_index;
    const Budgets* budgets;
    size_t sel;
  };
  std::vector<PendingBudget> pending_;
  // Last member: destroyed first, so an estimate still running (after an error) is waited for
  // while the layer's data it reads is alive.
  std::map<std::string, std::shared_ptr<Background>> background_;  // one entry per key it fills
  // The output-error pipeline (submit_errors): read by the worker, so after what it reads.
  std::map<const BlockScores*, std::vector<int32_t>> error_own_orders_;  // oracle's, native-first
  std::vector<const BlockMask*> error_distinct_;  // every distinct mask seen, in first-seen order
  std::vector<const BlockMask*> error_waiting_;   // distinct, not yet submitted (held)
  std::vector<size_t> error_rep_;                 // per selection: its mask's index in error_distinct_
  bool budget_done_ = false;                      // the budget topic ran in this phase
  std::vector<ErrorBatch> error_batches_;         // destroyed (waited for) before what they read
  // The GPU estimates running ahead (start_gpu_estimates), by score key (score_cache_ is looked up
  // first, so a taken entry is not read again); the worker goes through them in order and is
  // waited for before them and the layer it reads are destroyed.
  std::map<std::string, std::unique_ptr<Prefetch>> prefetch_;
  std::atomic<bool> prefetch_stop_{false};
  std::future<void> prefetch_worker_;
  // --device cuda: the similarity topic on its own thread (its wall seconds); last: destroyed
  // (waited for) first.
  std::future<double> similarity_;
};

EstimatorConfig LayerRun::config_for(const MethodInfo& method, int groups, double gamma) const {
  EstimatorConfig c = cfg_.estimator;
  c.block = cfg_.block;
  if (method.set_groups) method.set_groups(c, groups);
  if (method.set_coverage && std::isfinite(gamma)) method.set_coverage(c, gamma);
  return c;
}

std::vector<std::pair<std::string, BlockScores>> LayerRun::cpu_estimates(const MethodInfo& method, int groups,
                                                                         double gamma) const {
  std::vector<std::pair<std::string, BlockScores>> out;
  if (coverages_in_one(method)) {
    std::vector<BlockScores> all = method.estimate_coverages(q_, k_, config_for(method, groups, kNaN), cfg_.gamma);
    for (size_t x = 0; x < all.size(); ++x) out.emplace_back(score_key(method, groups, cfg_.gamma[x]), std::move(all[x]));
  } else {
    out.emplace_back(score_key(method, groups, gamma), method.estimate(q_, k_, config_for(method, groups, gamma)));
  }
  return out;
}

void LayerRun::start_cpu_estimates() {
  const int threads = cpu_threads();
  for (const std::string& name : cfg_.methods) {
    const MethodInfo& m = find_method(name);
    if (m.grouped() || m.exact_mass || (m.has_gpu() && m.gpu_in_analysis)) continue;
    const double gamma = m.set_coverage ? gamma_ref(cfg_) : kNaN;
    std::vector<std::string> keys;  // what the estimate will fill
    if (coverages_in_one(m))
      for (double g : cfg_.gamma) keys.push_back(score_key(m, 0, g));
    else
      keys.push_back(score_key(m, 0, gamma));
    auto b = std::make_shared<Background>();
    Background* raw = b.get();
    const std::string ranked = cfg_.density_rule == "auto" ? score_key(m, 0, gamma) : "";
    b->scores = std::async(std::launch::async, [this, &m, gamma, raw, threads, ranked] {
      set_cpu_threads(threads);  // the lane's share of the cores, as on this thread
      yield_to_foreground();
      const auto w0 = std::chrono::steady_clock::now();
      const double c0 = cpu_now(true);
      auto out = cpu_estimates(m, 0, gamma);
      for (const auto& [k, sc] : out)
        if (k == ranked) raw->orders.emplace(k, selection_order(sc));
      raw->wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
      raw->cpu = cpu_now(true) - c0;
      return out;
    });
    for (const std::string& k : keys) background_.emplace(k, b);
  }
}

const BlockScores& LayerRun::scores(const MethodInfo& method, int groups, double gamma) {
  const std::string key = score_key(method, groups, gamma);
  auto it = score_cache_.find(key);
  if (it != score_cache_.end()) return it->second;
  if (auto pf = prefetch_.find(key); pf != prefetch_.end()) {
    // Computed ahead on the GPU thread: waiting for it is this stage's wall time, its own run
    // is reported beside, as "background".
    BlockScores s;
    {
      Timing::Scope scope(tm_, "estimate:" + method.name);
      TraceScope trace("wait for estimate " + key);
      s = pf->second->result.get();
    }
    tm_.stages["estimate:" + method.name + " (background)"].wall += pf->second->wall;
    const BlockScores& sc = score_cache_.emplace(key, std::move(s)).first->second;
    if (pf->second->with_order) order_cache_.emplace(&sc, std::move(pf->second->order));
    // The entry stays (emptied) until the worker is joined: the thread that set the result may
    // still be inside set_value.
    return sc;
  }
  if (auto bg = background_.find(key); bg != background_.end()) {
    // Waiting for it is this stage's wall time; its own run is reported beside, as "background".
    const std::shared_ptr<Background> b = bg->second;
    std::vector<std::pair<std::string, BlockScores>> got;
    {
      Timing::Scope scope(tm_, "estimate:" + method.name);
      got = b->scores.get();
    }
    Timing::Stage& st = tm_.stages["estimate:" + method.name + " (background)"];
    st.wall += b->wall;
    st.cpu += b->cpu;
    for (auto& [k, sc] : got) {
      background_.erase(k);
      const auto [at, fresh] = score_cache_.try_emplace(k, std::move(sc));
      if (auto o = b->orders.find(k); fresh && o != b->orders.end())
        order_cache_.emplace(&at->second, std::move(o->second));
    }
    return score_cache_.at(key);
  }
  const bool gpu_estimate = cuda() && method.has_gpu() && method.gpu_in_analysis;
  if (coverages_in_one(method) && !gpu_estimate &&
      std::find(cfg_.gamma.begin(), cfg_.gamma.end(), gamma) != cfg_.gamma.end()) {
    // The native selection depends on gamma through the estimate: every gamma in one estimate.
    Timing::Scope scope(tm_, "estimate:" + method.name);
    for (auto& [k, sc] : cpu_estimates(method, groups, gamma)) score_cache_.try_emplace(k, std::move(sc));
    return score_cache_.at(key);
  }
  if (method.native == NativeRule::from_scores && gamma != gamma_ref(cfg_)) {
    // The native selection is a function of the scores: score once (at the reference gamma),
    // then only redo the native rule for this gamma.
    BlockScores s = scores(method, groups, gamma_ref(cfg_));
    Timing::Scope scope(tm_, "estimate:" + method.name);
    renative_from_scores(s, config_for(method, groups, gamma));
    return score_cache_.emplace(key, std::move(s)).first->second;
  }
  Timing::Scope scope(tm_, "estimate:" + method.name);
  if (on_gpu(method, groups)) return score_cache_.emplace(key, gpu_scores(method, groups, gamma)).first->second;
  TraceScope trace("estimate " + key, true);
  BlockScores s;
  if (method.exact_mass)
    s = scores_from_mass(oracle_.mass);
  else if (after_pass(method, groups))
    s = block_max_scores(method, oracle_.block_max);  // the CPU pass's
  else
    s = method.estimate(q_, k_, config_for(method, groups, gamma));
  return score_cache_.emplace(key, std::move(s)).first->second;
}

BlockScores LayerRun::block_max_scores(const MethodInfo& method, std::vector<float> block_max) const {
  // One group per query head: the proxy is the head itself (either pooling), and its score is
  // the block max of the exact probabilities.
  BlockScores s;
  s.method = method.name;
  s.heads = H_;
  s.num_blocks = oracle_.mass.num_blocks;
  s.block = oracle_.mass.block;
  s.seq_len = oracle_.mass.seq_len;
  s.score = std::move(block_max);
  s.group_of_head.resize(static_cast<size_t>(H_));
  for (int h = 0; h < H_; ++h) s.group_of_head[static_cast<size_t>(h)] = h;
  return s;
}

BlockScores LayerRun::gpu_scores(const MethodInfo& method, int groups, double gamma) {
  // The block max from the score kernels on the layer's own heads (fp32 sums of exact fp16
  // products: the CPU's values to rounding); the methods whose GPU estimate the analysis trusts
  // (the exact ProxyAttn path: float32 proxy heads, so the scores are the CPU's to float
  // rounding), their native rules as on the CPU. The others (gpu_note) stay on the CPU.
  TraceScope trace("estimate " + score_key(method, groups, gamma), true);
  if (after_pass(method, groups)) return block_max_scores(method, gpu().maxpool_block_scores(cfg_.block, 1));
  return gpu().estimate(method.name, config_for(method, groups, gamma));
}

void LayerRun::start_gpu_estimates() {
  // What the topics will ask the GPU for, in the order they ask: the recall topic's methods
  // (the budget topic's first group among them), then the score sets made after the pass.
  std::vector<const MethodInfo*> methods;
  for (const std::string& name : cfg_.methods) methods.push_back(&find_method(name));
  const MethodInfo& proxy = proxyattn_method();
  if ((topics_.similarity || topics_.budget) && std::find(methods.begin(), methods.end(), &proxy) == methods.end())
    methods.push_back(&proxy);
  std::vector<Prefetch*> todo;
  for (const bool later : {false, true})
    for (const MethodInfo* m : methods) {
      std::vector<std::pair<int, double>> wanted;
      if (m->grouped()) {
        for (int g : store_.groups)
          if (topics_.recall || topics_.similarity || (topics_.budget && g == store_.groups.front()))
            wanted.emplace_back(g, kNaN);
      } else if (!m->exact_mass && topics_.recall) {
        wanted.emplace_back(0, m->set_coverage ? gamma_ref(cfg_) : kNaN);
      }
      for (const auto& [g, gamma] : wanted) {
        if (!on_gpu(*m, g) || after_pass(*m, g) != later) continue;
        auto p = std::make_unique<Prefetch>();
        p->method = m;
        p->groups = g;
        p->gamma = gamma;
        // Budget-driven masks are prefixes of the order; "auto" fixed densities start from it.
        p->with_order = m->grouped() || cfg_.density_rule == "auto";
        const auto [it, fresh] = prefetch_.try_emplace(score_key(*m, g, gamma), std::move(p));
        if (fresh) todo.push_back(it->second.get());
      }
    }
  if (todo.empty()) return;
  gpu();  // made (uploaded) here, before the worker reads it
  const int device = current_cuda_device(), threads = cpu_threads();
  prefetch_worker_ = std::async(std::launch::async, [this, todo, device, threads] {
    use_cuda_device(device);
    set_cpu_threads(threads);
    // Each estimate's ranking runs on a thread of its own beside the next estimate's kernels
    // (one at a time); the result is set once it is ranked.
    std::future<void> ranking;
    for (Prefetch* p : todo) {
      if (prefetch_stop_) {
        p->promise.set_exception(std::make_exception_ptr(Error("the layer's run stopped")));
        continue;
      }
      try {
        const auto w0 = std::chrono::steady_clock::now();
        BlockScores s = gpu_scores(*p->method, p->groups, p->gamma);
        p->wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
        if (ranking.valid()) ranking.get();
        ranking = std::async(std::launch::async, [this, p, threads, s = std::move(s)]() mutable {
          set_cpu_threads(threads);
          try {
            if (p->with_order) {
              TraceScope trace("selection order " + score_key(*p->method, p->groups, p->gamma));
              p->order = selection_order(s);
            }
            p->promise.set_value(std::move(s));
          } catch (...) {
            p->promise.set_exception(std::current_exception());
          }
        });
      } catch (...) {
        p->promise.set_exception(std::current_exception());
      }
    }
    if (ranking.valid()) ranking.get();
  });
}

const Budgets& LayerRun::budgets(const BudgetKindInfo& kind, const BlockScores& sc, double gamma) {
  // Only the kinds that read the scores are cached per score set (cached scores never move).
  std::string key = kind.name + "/" + short_num(gamma);
  if (kind.reads_scores) key += fmt::format("/{}", fmt::ptr(&sc));
  auto it = budget_cache_.find(key);
  if (it != budget_cache_.end()) return it->second;
  BudgetConfig c = cfg_.budget;
  c.gamma = gamma;
  if (kind.mean_of_dynamic) {
    // The baseline of the dynamic budget: the same blocks per row for every head, as many as
    // the dynamic budget gives on average at this gamma.
    const Budgets& dyn = budgets(find_budget_kind("dynamic"), sc, gamma);
    double mean = 0;
    for (double x : dyn.per_head_k) mean += x;
    mean /= static_cast<double>(dyn.per_head_k.size());
    c.uniform_k = std::max(1, static_cast<int>(std::lround(mean)));
  }
  Timing::Scope scope(tm_, "budget");
  TraceScope trace("budget " + key);
  const BlockMass* mass = kind.needs_oracle_mass ? &oracle_.mass : nullptr;
  // On the GPU path the last block's token probabilities are computed once beside the kernels
  // (gpu_pass) and waited for here by the kinds that read them; the CPU path lets the budget
  // compute them in float64 as the spec does.
  const std::vector<float>* probs = cuda() && kind.reads_last_block ? &last_block_probs() : nullptr;
  Budgets b = make_budget(kind.name)->compute(q_, k_, sc, c, mass, probs);
  return budget_cache_.emplace(key, std::move(b)).first->second;
}

BlockMask LayerRun::fixed_selection(const MethodInfo& method, const BlockScores& sc, double density,
                                    std::string& rule) {
  // Every fixed sparsity of this score set at once (each head's cells ranked once), kept until
  // asked for; any other density (none today) alone.
  std::vector<double> all;
  for (double s : cfg_.sparsity) all.push_back(1.0 - s);
  const bool batch = std::find(all.begin(), all.end(), density) != all.end();
  auto take = [&](std::vector<BlockMask> masks) {
    for (size_t x = 0; x < all.size(); ++x) density_cache_.emplace(std::make_pair(&sc, all[x]), std::move(masks[x]));
    auto it = density_cache_.find({&sc, density});
    BlockMask m = std::move(it->second);
    density_cache_.erase(it);
    return m;
  };
  if (batch) {
    auto it = density_cache_.find({&sc, density});
    if (it != density_cache_.end()) {
      rule = cfg_.density_rule == "auto" ? std::string(auto_density_name(method.auto_density)) : cfg_.density_rule;
      BlockMask m = std::move(it->second);
      density_cache_.erase(it);
      return m;
    }
  }
  if (cfg_.density_rule == "auto") {
    rule = auto_density_name(method.auto_density);
    auto dynamic = [&]() -> const Budgets& { return budgets(find_budget_kind("dynamic"), sc, gamma_ref(cfg_)); };
    auto mass = [&]() -> const BlockMass& { return oracle_.mass; };
    if (batch && method.auto_density == AutoDensity::native_adjust)
      return take(auto_density_masks(method, sc, all, dynamic, mass, &order_of(sc)));
    return auto_density_mask(method, sc, density, dynamic, mass, &order_of(sc));
  }
  // The oracle needs no forced blocks: its fixed-density selection is the upper bound.
  SelectOptions opts;
  if (!method.forced_blocks) opts.sink = opts.diagonal = false;
  rule = cfg_.density_rule;
  const DensityRule r = parse_density_rule(rule);
  if (batch && r != DensityRule::row_uniform) return take(select_to_densities(sc, all, r, opts));
  return select_to_density(sc, density, r, opts);
}

template <class F>
size_t LayerRun::add(SelDesc d, F&& make) {
  const std::string id = d.id();
  auto it = sel_index_.find(id);
  if (it != sel_index_.end()) return it->second;  // the same selection from two topics
  TraceScope trace("select " + id);
  sels_.push_back({std::move(d), make()});
  sel_index_.emplace(id, sels_.size() - 1);
  return sels_.size() - 1;
}

void LayerRun::similarity() {
  // What the topic reads from this thread's caches, taken here: the last block's probabilities
  // and every proxy group's scores.
  const std::vector<float>& probs = last_block_probs();
  std::vector<const BlockScores*> proxies;
  for (int g : store_.groups) proxies.push_back(&scores(proxyattn_method(), g, kNaN));
  if (!cuda()) {
    similarity_tables(probs, proxies);
    return;
  }
  // --device cuda: on a thread of its own (its tables and aggregates are written by it alone)
  // while this one goes on with the selections; waited for before the selection rows.
  const int threads = cpu_threads();
  similarity_ = std::async(std::launch::async, [this, &probs, proxies, threads] {
    set_cpu_threads(threads);
    const auto w0 = std::chrono::steady_clock::now();
    similarity_tables(probs, proxies);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
  });
}

void LayerRun::similarity_tables(const std::vector<float>& probs, const std::vector<const BlockScores*>& proxies) {
  const int H = oracle_.mass.heads, nb = oracle_.mass.num_blocks, r = oracle_.shape.group();
  SimilarityOptions so;
  so.topk_fractions = cfg_.topk_fractions;
  so.max_rows = cfg_.sim_rows;
  std::optional<TraceScope> trace(std::in_place, "head similarity");
  const HeadSimilarity s = head_similarity(oracle_.mass, probs, oracle_.shape.seq_len, so);
  trace.reset();
  const size_t F = s.topk_fractions.size();
  std::vector<std::vector<double>> pair_topk(F);
  std::vector<double> pair_cos, pair_sp, same_kv, cross_kv;
  const size_t last_f = F - 1;
  for (int a = 0; a < H; ++a)
    for (int b = 0; b < H; ++b) {
      json row = {store_.label, layer_, a, b, (a / r == b / r) ? 1 : 0};
      for (size_t f = 0; f < F; ++f) row.push_back(num(s.at(s.topk_overlap[f], a, b)));
      row.push_back(num(s.at(s.cosine, a, b)));
      row.push_back(num(s.at(s.spearman, a, b)));
      T_.sim_pairs->add(std::move(row));
      if (a < b) {
        for (size_t f = 0; f < F; ++f) pair_topk[f].push_back(s.at(s.topk_overlap[f], a, b));
        pair_cos.push_back(s.at(s.cosine, a, b));
        pair_sp.push_back(s.at(s.spearman, a, b));
        (a / r == b / r ? same_kv : cross_kv).push_back(s.at(s.topk_overlap[last_f], a, b));
      }
    }
  json row = {store_.label, layer_, H * (H - 1) / 2, s.rows_used};
  for (size_t f = 0; f < F; ++f) {
    const Summary sm = summarize(pair_topk[f]);
    row.push_back(num(sm.mean));
    row.push_back(num(sm.min));
  }
  const Summary sc = summarize(pair_cos), ss = summarize(pair_sp);
  row.push_back(num(sc.mean));
  row.push_back(num(sc.min));
  row.push_back(num(ss.mean));
  row.push_back(num(ss.min));
  row.push_back(num(mean_of(same_kv)));
  row.push_back(num(mean_of(cross_kv)));
  T_.sim_layers->add(std::move(row));

  // Per-head oracle budget at each gamma: "same tokens, different sparsity".
  const double causal = 0.5 * nb * (nb + 1.0);
  for (size_t gi = 0; gi < cfg_.gamma.size(); ++gi) {
    const OracleBudget& b = obudget_[gi];
    std::vector<double> head_mean, head_sparsity;
    for (int h = 0; h < H; ++h) {
      const std::vector<double> rows = b.rows(h);
      const Summary sm = summarize(rows);
      double sel = 0;
      for (double x : rows) sel += x;
      const double density = sel / causal;
      head_mean.push_back(sm.mean);
      head_sparsity.push_back(1.0 - density);
      T_.head_budget->add({store_.label, layer_, h, num(b.gamma), num(sm.mean), num(sm.min),
                           num(sm.p5), num(sm.p25), num(sm.median), num(sm.p75), num(sm.p95),
                           num(sm.max), b.at(h, nb - 1), num(density), num(1.0 - density)});
    }
    const Summary hm = summarize(head_mean), hs = summarize(head_sparsity);
    double var = 0;
    for (double x : head_mean) var += (x - hm.mean) * (x - hm.mean);
    const double sd = std::sqrt(var / static_cast<double>(H));
    T_.head_budget_layers->add({store_.label, layer_, num(b.gamma), num(hm.mean), num(sd),
                                num(hm.mean > 0 ? sd / hm.mean : kNaN), num(hm.min), num(hm.max),
                                num(hs.mean), num(hs.min), num(hs.max)});
  }

  // Fidelity of each proxy: its ranking at each member head's own oracle budget. Every group
  // count and gamma at once (each ranking taken once, at the largest budget), rows in (group,
  // gamma) order.
  std::vector<ScoreView> views;
  for (const BlockScores* sc : proxies) views.push_back({sc->score.data(), sc->heads, sc->num_blocks, H});
  std::vector<const OracleBudget*> at_gammas;
  for (const OracleBudget& b : obudget_) at_gammas.push_back(&b);
  trace.emplace("ranking fidelity");
  const auto fid = ranking_fidelity(views, oracle_.mass, at_gammas);  // [gamma][group][head]
  for (size_t gx = 0; gx < store_.groups.size(); ++gx) {
    const int g = store_.groups[gx];
    for (size_t gi = 0; gi < cfg_.gamma.size(); ++gi) {
      const auto& f = fid[gi][gx];
      auto& agg = A_.fidelity[{g, cfg_.gamma[gi]}];
      for (const RankingFidelity& x : f) {
        T_.fidelity->add({store_.label, layer_, g, num(cfg_.gamma[gi]), x.head,
                          proxy_group_of(x.head, H, g), num(x.block_recall), num(x.mass_recall),
                          num(x.mass_ratio)});
        agg[0].push_back(x.block_recall);
        agg[1].push_back(x.mass_recall);
        agg[2].push_back(x.mass_ratio);
      }
    }
  }
}


void LayerRun::recall_selections() {
  const double gref = gamma_ref(cfg_);
  for (const std::string& name : cfg_.methods) {
    const MethodInfo& m = find_method(name);
    Timing::Scope scope(tm_, "select");
    submit_errors(budget_ranking_to_hold());  // the previous method's masks
    const std::string auto_rule(auto_density_name(m.auto_density));
    const std::string rule0 = cfg_.density_rule == "auto" ? auto_rule : cfg_.density_rule;
    if (m.grouped()) {
      // Budget-driven: the dynamic budget at each gamma, and each fixed sparsity.
      for (int g : store_.groups) {
        if (!in_phase(after_pass(m, g))) continue;
        submit_errors(budget_ranking_to_hold());
        const BlockScores& sc = scores(m, g, kNaN);
        for (double gamma : cfg_.gamma)
          add({m.name, g, "dynamic", "", gamma, kNaN},
              [&] { return select_blocks_in_order(sc, order_of(sc), budgets(find_budget_kind("dynamic"), sc, gamma)); });
        for (double s : cfg_.sparsity) {
          std::string rule = rule0;
          add({m.name, g, "fixed", rule, kNaN, s}, [&] { return fixed_selection(m, sc, 1.0 - s, rule); });
        }
      }
    } else if (m.exact_mass) {
      // The oracle: its per-row top-k reaching each gamma, and each fixed sparsity.
      if (!in_phase(true)) continue;
      const BlockScores& sc = scores(m, 0, kNaN);
      for (size_t gi = 0; gi < cfg_.gamma.size(); ++gi)
        add({m.name, 0, "native", "", cfg_.gamma[gi], kNaN},
            [&] { return oracle_topk_mask(oracle_.mass, obudget_[gi].per_row, rank_pos()); });
      for (double s : cfg_.sparsity) {
        std::string rule = rule0;
        add({m.name, 0, "fixed", rule, kNaN, s}, [&] { return fixed_selection(m, sc, 1.0 - s, rule); });
      }
    } else {
      if (!in_phase(false)) continue;
      const bool by_gamma = m.set_coverage != nullptr;
      if (by_gamma) {
        for (double gamma : cfg_.gamma) {
          const BlockScores& sc = scores(m, 0, gamma);
          if (sc.native) add({m.name, 0, "native", "", gamma, kNaN}, [&] { return *sc.native; });
        }
      } else {
        const BlockScores& sc = scores(m, 0, kNaN);
        if (sc.native) add({m.name, 0, "native", "", kNaN, kNaN}, [&] { return *sc.native; });
      }
      const BlockScores& sc = scores(m, 0, by_gamma ? gref : kNaN);
      for (double s : cfg_.sparsity) {
        std::string rule = rule0;
        add({m.name, 0, "fixed", rule, kNaN, s}, [&] { return fixed_selection(m, sc, 1.0 - s, rule); });
      }
    }
  }
  Timing::Scope scope(tm_, "select");
  submit_errors(budget_ranking_to_hold());
}

void LayerRun::budget_selections() {
  budget_selections_in_phase();
  budget_done_ = true;
  Timing::Scope scope(tm_, "select");
  submit_errors(nullptr);  // the masks held for this topic are complete now
}

void LayerRun::budget_selections_in_phase() {
  Timing::Scope scope(tm_, "select");
  const MethodInfo& m = proxyattn_method();
  const int g0 = store_.groups.front();
  const bool g0_pass = after_pass(m, g0);
  const bool any_now = in_phase(g0_pass) || in_phase(true);
  if (!any_now) return;
  for (size_t gi = 0; gi < cfg_.gamma.size(); ++gi) {
    const double gamma = cfg_.gamma[gi];
    for (const BudgetKindInfo* kind : all_budget_kinds()) {
      if (!in_phase(g0_pass || kind->needs_oracle_mass)) continue;
      const BlockScores& sc = scores(m, g0, kNaN);
      const Budgets& b = budgets(*kind, sc, gamma);
      const size_t at =
          add({m.name, g0, kind->name, "", gamma, kNaN}, [&] { return select_blocks_in_order(sc, order_of(sc), b); });
      pending_.push_back({kind->name, gamma, gi, &b, at});
    }
    if (!in_phase(g0_pass)) continue;
    // Fig. 5c: the same scores with each budget brought to each fixed sparsity. The per-head
    // budgets keep their proportions (scaled); uniform is one k for every row and head.
    const BlockScores& sc = scores(m, g0, kNaN);
    for (double s : cfg_.sparsity)
      for (const BudgetKindInfo* kind : all_budget_kinds())
        if (kind->fig5c)
          add({m.name, g0, kind->name, "scaled", gamma, s},
              [&] { return select_budgets_to_density(sc, order_of(sc), budgets(*kind, sc, gamma), 1.0 - s); });
  }
  if (!in_phase(g0_pass)) return;
  const BlockScores& sc = scores(m, g0, kNaN);
  for (double s : cfg_.sparsity)
    add({m.name, g0, "uniform", "row_uniform", kNaN, s},
        [&] { return select_to_density(sc, order_of(sc), 1.0 - s, DensityRule::row_uniform); });
}

void LayerRun::pass() {
  if (!errors_) {
    Timing::Scope scope(tm_, "oracle");
    oracle_ = layer_oracle(q_, k_, cfg_.block);
  } else {
    Timing::Scope scope(tm_, "oracle+output_error");
    // Rankings for the masks built after the pass (and for "before" masks that are prefixes
    // of budget-driven scores, which then need no explicit evaluation).
    std::vector<Ranking> rankings;
    Ranking oracle_rank;
    oracle_rank.source = Ranking::Source::mass;
    rankings.push_back(oracle_rank);
    const MethodInfo& proxy = proxyattn_method();
    if (from_pass(proxy, H_) && std::find(store_.groups.begin(), store_.groups.end(), H_) != store_.groups.end()) {
      Ranking bm;
      bm.source = Ranking::Source::block_max;
      bm.sink = bm.diagonal = true;
      rankings.push_back(bm);
    }
    for (const auto& [key, sc] : score_cache_)
      if (find_method(sc.method).grouped()) {
        Ranking r;
        r.source = Ranking::Source::given;
        r.order = rank_orders(sc.score.data(), sc.heads, sc.num_blocks, true, true);
        rankings.push_back(std::move(r));
      }
    // The "before" masks that no ranking covers, once per distinct mask.
    std::vector<const BlockMask*> masks;
    explicit_of_.assign(sels_.size(), -1);
    for (size_t i = 0; i < sels_.size(); ++i) {
      const BlockMask& m = sels_[i].mask;
      bool covered = false;
      for (const Ranking& r : rankings)
        if (r.source == Ranking::Source::given && is_prefix_of_order(m, r.order)) covered = true;
      if (covered) continue;
      int found = -1;
      for (size_t c = 0; c < masks.size() && found < 0; ++c)
        if (*masks[c] == m) found = static_cast<int>(c);
      if (found < 0) {
        found = static_cast<int>(masks.size());
        masks.push_back(&m);
      }
      explicit_of_[i] = found;
    }
    pass_ = layer_pass(q_, k_, *data_.v, cfg_.block, masks, rankings);
    oracle_ = std::move(pass_.oracle);
  }
  Timing::Scope scope(tm_, "oracle");
  A_.store_blocks[store_.label] = oracle_.mass.num_blocks;
  for (double g : cfg_.gamma) obudget_.push_back(oracle_budget(oracle_.mass, g, rank_pos()));
}

void LayerRun::gpu_pass() {
  {
    Timing::Scope scope(tm_, "oracle:cuda");
    oracle_.shape = check_qkv(q_, k_);
    // The last query block's token probabilities (top-k token overlap, dynamic/token budgets):
    // B rows against every key, float64 on the CPU as the spec computes them; on another
    // thread from the start (the selections wait for them first), waited for where they are
    // first read (last_block_probs).
    const int threads = cpu_threads();
    last_block_ = std::async(std::launch::async, [this, threads] {
      set_cpu_threads(threads);
      return last_block_token_probs_cpu(q_, k_, cfg_.block);
    });
    {
      // Before the other CPU work: everything on the GPU waits for it.
      TraceScope trace("upload layer");
      gpu();
    }
    if (topics_.recall) start_cpu_estimates();  // only the recall topic scores the peers
    if (errors_) {
      // The output errors' reference first: its pass writes the row LSE the block mass reads,
      // so the layer needs no LSE pass of its own.
      TraceScope trace("full output + row lse", true);
      gpu().compute_full_output();
    }
    TraceScope trace("block mass + row lse", true);
    oracle_.mass = gpu().block_mass(cfg_.block);
    oracle_.lse = gpu().row_lse();
  }
  // The GPU estimates start before the oracle budgets: the device works while the CPU ranks.
  start_gpu_estimates();
  Timing::Scope scope(tm_, "oracle");
  TraceScope trace("oracle budgets");
  A_.store_blocks[store_.label] = oracle_.mass.num_blocks;
  for (double g : cfg_.gamma) obudget_.push_back(oracle_budget(oracle_.mass, g, rank_pos()));
}

// Output error of every selection on the device: the full output once, then each distinct
// mask's block-sparse output against it, reduced per head. The masks built from a score set's
// selection order (budgets, head-global densities) and the oracle's selections are prefixes of
// one ranking per score set: each ranking's masks share one pass (the CPU's prefix tables).
std::vector<const std::vector<int32_t>*> LayerRun::error_orders() {
  // Beyond the cached selection orders: the oracle's (no forced blocks), and per native mask the
  // order its native_adjust densities are prefixes of (forced, native, the rest).
  for (const auto& [key, sc] : score_cache_) {
    if (error_own_orders_.count(&sc)) continue;
    const MethodInfo& m = find_method(sc.method);
    if (m.exact_mass) {
      SelectOptions none;
      none.sink = none.diagonal = false;
      error_own_orders_.emplace(&sc, selection_order(sc, none));
    } else if (sc.native && m.forced_blocks) {
      const auto it = order_cache_.find(&sc);
      if (it != order_cache_.end()) error_own_orders_.emplace(&sc, native_first_order(*sc.native, it->second));
    }
  }
  std::vector<const std::vector<int32_t>*> orders;
  for (const auto& [sc, order] : order_cache_) orders.push_back(&order);
  for (const auto& [sc, order] : error_own_orders_) orders.push_back(&order);
  return orders;
}

const std::vector<int32_t>* LayerRun::budget_ranking_to_hold() {
  if (!topics_.budget || budget_done_) return nullptr;
  const MethodInfo& m = proxyattn_method();
  const int g0 = store_.groups.front();
  if (!in_phase(after_pass(m, g0))) return nullptr;  // its scores are made in the other phase
  return &order_of(scores(m, g0, kNaN));
}

void LayerRun::submit_errors(const std::vector<int32_t>* hold) {
  if (!cuda() || !errors_) return;
  TraceScope trace("submit output errors");
  // The new selections' masks, once each (a mask equal to one seen before shares its errors).
  for (size_t i = error_rep_.size(); i < sels_.size(); ++i) {
    const BlockMask& mask = sels_[i].mask;
    size_t found = error_distinct_.size();
    for (size_t c = 0; c < error_distinct_.size() && found == error_distinct_.size(); ++c)
      if (*error_distinct_[c] == mask) found = c;
    if (found == error_distinct_.size()) {
      error_distinct_.push_back(&mask);
      error_waiting_.push_back(&mask);
    }
    error_rep_.push_back(found);
  }
  std::vector<const BlockMask*> batch, held;
  for (const BlockMask* mask : error_waiting_) (hold && is_prefix_of_order(*mask, *hold) ? held : batch).push_back(mask);
  error_waiting_ = std::move(held);
  if (batch.empty()) return;
  const std::vector<const std::vector<int32_t>*> orders = error_orders();
  CudaLayer& layer = gpu();  // made (uploaded) here, before the worker reads it
  const int device = current_cuda_device();
  // One batch at a time on the device (each waits for the one before): bounded memory, and
  // the batches' passes in submission order.
  std::shared_future<MaskErrors> before;
  if (!error_batches_.empty()) before = error_batches_.back().result;
  ErrorBatch b;
  b.masks = std::move(batch);
  b.result = std::async(std::launch::async, [masks = b.masks, orders, device, &layer, before, wall = b.wall] {
               if (before.valid()) before.wait();
               use_cuda_device(device);
               const auto w0 = std::chrono::steady_clock::now();
               MaskErrors e = layer.output_errors(masks, orders);
               *wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
               return e;
             }).share();
  error_batches_.push_back(std::move(b));
}

void LayerRun::gpu_output_errors(std::vector<std::vector<double>>& rel, std::vector<int64_t>& empty) {
  std::map<const BlockMask*, std::pair<const MaskErrors*, size_t>> where;
  {
    TraceScope trace("wait for output errors");
    for (const ErrorBatch& b : error_batches_) {
      const MaskErrors& e = b.result.get();
      for (size_t x = 0; x < b.masks.size(); ++x) where[b.masks[x]] = {&e, x};
      tm_.stages["output_error:cuda (background)"].wall += *b.wall;
    }
  }
  for (size_t i = 0; i < sels_.size(); ++i) {
    const auto [e, x] = where.at(error_distinct_[error_rep_[i]]);
    rel[i] = e->rel_error[x];
    empty[i] = e->empty_rows[x];
  }
}

void LayerRun::evaluate() {
  const int H = oracle_.mass.heads;
  const size_t S = sels_.size();
  std::optional<Timing::Scope> scope(std::in_place, tm_, "metrics");
  std::vector<std::vector<HeadDensity>> dens(S);
  std::vector<std::vector<double>> mass(S), block(S);
  const std::vector<int32_t>& rank_pos = this->rank_pos();
  submit_errors(nullptr);  // what is left (--device cuda), computed while the CPU goes on below
  {
    TraceScope trace("density + recall of every selection");
    for (size_t i = 0; i < S; ++i) {
      dens[i] = density_per_head(sels_[i].mask);
      recall_per_head(sels_[i].mask, oracle_.mass, rank_pos, mass[i], block[i]);
    }
  }

  // Budget accuracy needs the oracle budget, known only now (before the output errors: on the
  // GPU path it runs while the last error batch does).
  std::vector<std::vector<BudgetAccuracy>> acc;
  {
    TraceScope trace("budget accuracy");
    std::vector<BudgetAccuracyRequest> requests;  // all at once: each mass row ranked once
    for (const PendingBudget& p : pending_)
      requests.push_back({p.budgets->per_head_k, p.budgets->per_row_k, &obudget_[p.gamma_index]});
    acc = budget_accuracy(requests, oracle_.mass, rank_pos);
  }

  // Output errors: from the pass (explicit masks), else from a prefix table; a mask neither
  // covers (none expected) gets a second, direct pass.
  std::vector<std::vector<double>> rel(S);
  std::vector<int64_t> empty(S, 0);
  const bool err = errors_ && S > 0;
  if (err && cuda()) {
    Timing::Scope e(tm_, "output_error:cuda");
    gpu_output_errors(rel, empty);
  } else if (err) {
    Timing::Scope e(tm_, "output_error");
    std::vector<size_t> left;
    for (size_t i = 0; i < S; ++i) {
      const int x = i < explicit_of_.size() ? explicit_of_[i] : -1;
      if (x >= 0) {
        rel[i] = pass_.errors.rel_error[static_cast<size_t>(x)];
        empty[i] = pass_.errors.empty_rows[static_cast<size_t>(x)];
        continue;
      }
      bool done = false;
      for (const PrefixErrors& t : pass_.prefix)
        if (!done) done = prefix_mask_errors(t, pass_.full_sq, sels_[i].mask, rel[i], empty[i]);
      if (!done) left.push_back(i);
    }
    if (!left.empty()) {
      std::vector<const BlockMask*> masks;
      for (size_t i : left) masks.push_back(&sels_[i].mask);
      const OutputErrors o = output_errors(q_, k_, *data_.v, oracle_, masks);
      for (size_t x = 0; x < left.size(); ++x) {
        rel[left[x]] = o.rel_error[x];
        empty[left[x]] = o.empty_rows[x];
      }
      tm_.second_pass_masks += static_cast<int64_t>(left.size());
    }
  }

  if (similarity_.valid()) {
    Timing::Scope sim(tm_, "similarity");
    TraceScope trace("wait for head similarity");
    tm_.stages["similarity (background)"].wall += similarity_.get();
  }

  TraceScope trace_rows("table rows");

  for (size_t i = 0; i < S; ++i) {
    const SelDesc& d = sels_[i].desc;
    const std::string id = d.id();
    auto [it, fresh] = A_.sel.try_emplace(id);
    SelAgg& agg = it->second;
    if (fresh) {
      agg.desc = d;
      A_.sel_order.push_back(id);
    }
    agg.stores.insert(store_.label);
    ++agg.layers;
    std::vector<double> ev(static_cast<size_t>(H), kNaN), dv;
    for (int h = 0; h < H; ++h) {
      const HeadDensity& hd = dens[i][static_cast<size_t>(h)];
      const double e = err ? rel[i][static_cast<size_t>(h)] : kNaN;
      ev[static_cast<size_t>(h)] = e;
      dv.push_back(hd.density);
      T_.selections->add({store_.label, layer_, id, d.method, d.groups, d.budget, d.rule,
                          num(d.gamma), num(d.target), h, hd.selected, num(hd.density),
                          num(hd.element_density), num(hd.sparsity()),
                          num(mass[i][static_cast<size_t>(h)]), num(block[i][static_cast<size_t>(h)]), num(e)});
      agg.density.push_back(hd.density);
      agg.element_density.push_back(hd.element_density);
      agg.mass.push_back(mass[i][static_cast<size_t>(h)]);
      agg.block.push_back(block[i][static_cast<size_t>(h)]);
      agg.error.push_back(e);
    }
    const Summary ms = summarize(mass[i]), es = summarize(ev);
    const double dmean = mean_of(dv);
    agg.layer_density.push_back(dmean);
    T_.selection_summary->add(
        {store_.label, layer_, id, d.method, d.groups, d.budget, d.rule, num(d.gamma), num(d.target),
         num(dmean), num(sels_[i].mask.element_density()), num(1.0 - dmean), num(ms.mean),
         num(ms.p5), num(ms.min), num(mean_of(block[i])), num(es.mean), num(es.max),
         err ? json(empty[i]) : json(nullptr)});
    if (std::isfinite(d.target) && std::abs((1.0 - dmean) - d.target) > 0.01)
      A_.missed[store_.label].push_back({id, d.target, 1.0 - dmean});
  }

  for (size_t pi = 0; pi < pending_.size(); ++pi) {
    const PendingBudget& p = pending_[pi];
    const size_t i = p.sel;
    auto& agg = A_.budget[{p.kind, p.gamma}];
    if (std::find(A_.budget_order.begin(), A_.budget_order.end(), std::make_pair(p.kind, p.gamma)) ==
        A_.budget_order.end())
      A_.budget_order.emplace_back(p.kind, p.gamma);
    for (const BudgetAccuracy& a : acc[pi]) {
      const size_t h = static_cast<size_t>(a.head);
      const double mr = mass[i][h], dn = dens[i][h].density;
      T_.budget_accuracy->add({store_.label, layer_, p.kind, num(p.gamma), a.head, num(a.k_est),
                               num(a.k_effective), num(a.oracle_mean), num(a.oracle_last_row),
                               num(a.rel_error), num(a.abs_rel_error), num(a.mass_reached),
                               num(a.rows_below_gamma), num(mr), num(dn)});
      for (BudgetAgg* b : {&agg, &A_.budget_heads[{store_.label, p.kind, p.gamma, a.head}]}) {
        b->k_est.push_back(a.k_est);
        b->k_eff.push_back(a.k_effective);
        b->oracle.push_back(a.oracle_mean);
        b->rel.push_back(a.rel_error);
        b->abs_rel.push_back(a.abs_rel_error);
        b->reached.push_back(a.mass_reached);
        b->below.push_back(a.rows_below_gamma);
        b->mass.push_back(mr);
        b->density.push_back(dn);
      }
    }
  }
}


void LayerRun::run() {
  q_ = data_.q.view();
  k_ = data_.k.view();
  H_ = data_.q.heads();
  errors_ = topics_.error && store_.error_ok && data_.v.has_value();
  // The same phases on both devices, so the rows come in the same order; on the GPU the exact
  // quantities come first and nothing waits for a pass.
  if (cuda()) gpu_pass();
  phase_ = Phase::before;
  if (topics_.recall) recall_selections();
  if (topics_.budget) budget_selections();
  if (!cuda()) pass();
  phase_ = Phase::after;
  budget_done_ = false;
  if (topics_.similarity) {
    Timing::Scope scope(tm_, "similarity");
    similarity();
  }
  if (topics_.recall) recall_selections();
  if (topics_.budget) budget_selections();
  evaluate();
}

}  // namespace

void run_layer(const AnalyzeConfig& cfg, const Topics& topics, StoreCtx& store, LayerData&& data, Tables& tables,
               Aggregates& agg, Timing& timing, std::set<std::string>& notes) {
  std::optional<LayerRun> run(std::in_place, cfg, topics, store, std::move(data), tables, agg, timing, notes);
  run->run();
  TraceScope trace("layer teardown");  // the layer's host buffers freed, its threads joined
  run.reset();
}

}  // namespace proxyattn::analysis::detail
