// CPU mode: the CPU reference (attention.hpp) and the CPU estimators (method.hpp), timed with a
// steady clock. For small N only (cpu_max_len): it is the spec, not a fast path.
#include <chrono>
#include <optional>
#include <thread>

#include <fmt/format.h>

#include "proxyattn/methods.hpp"
#include "proxyattn/attention.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/method.hpp"
#include "runner.hpp"
#include "sweep.hpp"

namespace proxyattn::bench {

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// The budget each estimator's estimation is timed with: ProxyAttn's own dynamic budget, the
// oracle's coverage budget, the peers' native selection.
std::string estimate_budget(const std::string& estimator) { return default_budget(find_method(estimator)); }

class CpuRunner : public Runner {
 public:
  explicit CpuRunner(const Sweep& sw) : sw_(sw) {}
  std::string device() const override { return "cpu"; }
  std::string timing_method() const override {
    return fmt::format("steady_clock wall time, {} threads, no cache flush", cpu_threads() ? cpu_threads() : 0);
  }
  nlohmann::json context() const override {
    return {{"device_name", "CPU reference"},
            {"cpu_threads", cpu_threads()},
            {"hardware_threads", std::thread::hardware_concurrency()}};
  }

  std::string skip_reason(const Method& m, int64_t n, DType) const override {
    if (n > sw_.cpu_max_len)
      return fmt::format("N={} exceeds cpu_max_len {} (the CPU reference is O(N^2); raise --cpu-max-len to run it)",
                         n, sw_.cpu_max_len);
    if (m.family == Family::proxyattn && m.groups > 0 && sw_.model.num_q_heads % m.groups != 0)
      return fmt::format("proxy groups {} do not divide {} query heads", m.groups, sw_.model.num_q_heads);
    return "";
  }

  void prepare(const Method& m, int64_t n, DType dtype) override {
    m_ = m;
    if (!in_ || in_->n != n || in_->dtype != dtype) {
      in_.reset();
      in_ = make_inputs(sw_, n, dtype);
    }
    mask_.reset();
    if (m.family == Family::sparse) {
      mask_ = m.mask_file.empty() ? random_density_mask(sw_.model.num_q_heads, n, sw_.block, m.density, sw_.seed)
                                  : read_mask_file(m.mask_file);
      if (mask_->heads() != sw_.model.num_q_heads || mask_->seq_len() != n || mask_->block() != sw_.block)
        throw Error(fmt::format("{}: mask is {} heads x N={} x block {}, the case is {} x {} x {}", m.mask_file,
                                mask_->heads(), mask_->seq_len(), mask_->block(), sw_.model.num_q_heads, n, sw_.block));
    }
  }

  Timing run_once() override {
    Timing t;
    const ConstView q = in_->q, k = in_->k, v = in_->v;
    auto t0 = Clock::now();
    switch (m_.family) {
      case Family::full: {
        const AttentionOutput o = full_attention_cpu(q, k, v);
        t.kernel_ms = ms_since(t0);
        break;
      }
      case Family::sparse: {
        const AttentionOutput o = sparse_attention_cpu(q, k, v, *mask_);
        t.kernel_ms = ms_since(t0);
        break;
      }
      case Family::estimate: {
        const MethodResult r = run_method(q, k, spec(m_.estimator, estimate_budget(m_.estimator), 0.95));
        t.estimation_ms = ms_since(t0);
        stages(t, r);
        mask_ = r.mask;
        break;
      }
      case Family::proxyattn: {
        MethodResult r = run_method(q, k, spec(proxyattn_method().name, "dynamic", m_.gamma));
        if (m_.target_density) {
          auto t1 = Clock::now();
          r.mask = select_budgets_to_density(r.scores, r.budgets, m_.density);
          t.stages["density_scale_ms"] = ms_since(t1);
        }
        t.estimation_ms = ms_since(t0);
        stages(t, r);
        mask_ = std::move(r.mask);
        auto t1 = Clock::now();
        const AttentionOutput o = sparse_attention_cpu(q, k, v, *mask_);
        t.kernel_ms = ms_since(t1);
        break;
      }
    }
    t.total_ms = ms_since(t0);
    return t;
  }

  void describe(Row& row) override {
    describe_density(row, m_.family, mask_ ? &*mask_ : nullptr);
    if (m_.family == Family::estimate || m_.family == Family::proxyattn) {
      row.extra["inputs"] = in_->kind;
      if (m_.family == Family::proxyattn || find_method(m_.estimator).grouped())
        row.extra["proxy"] = {{"groups", m_.groups}, {"query_stride", m_.query_stride}, {"pool", "mean"}};
      row.extra["budget"] = m_.family == Family::proxyattn ? "dynamic" : estimate_budget(m_.estimator);
    }
  }

  const BlockMask* mask() const override { return mask_ ? &*mask_ : nullptr; }
  void end_case() override { mask_.reset(); }

  void export_check(const std::string& dir, int64_t n, double density) override {
    const HostInputs in = make_inputs(sw_, n, DType::bf16);
    const BlockMask mask = random_density_mask(sw_.model.num_q_heads, n, sw_.block, density, sw_.seed);
    const AttentionOutput o = sparse_attention_cpu(in.q, in.k, in.v, mask);
    write_check_files(dir, in, to_half_bits(o.o, DType::bf16), mask,
                      {{"producer", "proxyattn-bench CPU reference (sparse_attention_cpu, float32, rounded to bf16)"},
                       {"method", fmt::format("sparse@{}", density)}});
  }

 private:
  MethodSpec spec(const std::string& estimator, const std::string& budget, double gamma) const {
    MethodSpec s;
    s.estimator = estimator;
    s.budget = budget;
    s.config.block = sw_.block;
    s.config.proxy.groups = m_.groups;
    s.config.proxy.query_stride = m_.query_stride;
    s.budget_config.gamma = gamma;
    s.budget_config.k_min = sw_.k_min;
    return s;
  }
  static void stages(Timing& t, const MethodResult& r) {
    t.stages["scores_ms"] = r.estimate_seconds * 1e3;
    t.stages["budget_ms"] = r.budget_seconds * 1e3;
    t.stages["select_ms"] = r.select_seconds * 1e3;
  }

  const Sweep& sw_;
  Method m_;
  std::optional<HostInputs> in_;
  std::optional<BlockMask> mask_;
};

}  // namespace

std::unique_ptr<Runner> make_cpu_runner(const Sweep& sw) { return std::make_unique<CpuRunner>(sw); }

}  // namespace proxyattn::bench
