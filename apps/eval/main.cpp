// proxyattn-eval: the whole model (GGUF, C++ runtime) on token ids prepared in Python.
//
//   proxyattn-eval ppl --gguf M.gguf --tokens ids.txt [--last K] [--threads T]
//   proxyattn-eval generate --gguf M.gguf --tokens ids.txt [--max-new 30] [--stop 2,49152]
//   proxyattn-eval compare --gguf M.gguf --store qk.h5 [--rtol 2e-3]
//       (Q/K/V of every stored layer vs the runtime's, on the store's /tokens)
//   proxyattn-eval sweep --gguf M.gguf --eval-set set.json --out DIR [--methods ...] [--sparsity ...]
//       (accuracy with sparse attention in every layer: NIAH and perplexity per method x sparsity,
//        report.json + CSV + report.md; sweep.hpp)
//
// Token files hold integers separated by white space or commas (scripts/model_tokens.py writes
// them with the model's tokenizer); evaluation sets are JSON from scripts/prepare_eval.py.
#include <optional>
#include <map>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cli_methods.hpp"
#include "proxyattn/methods.hpp"
#include "proxyattn/method.hpp"
#include "cli_common.hpp"
#include "eval_set.hpp"
#include "proxyattn/analysis/report.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/host_memory.hpp"
#include "proxyattn/model/gguf.hpp"
#include "proxyattn/model/model.hpp"
#include "proxyattn/store.hpp"
#include "sweep.hpp"

namespace {

using namespace proxyattn;

std::vector<int32_t> read_tokens(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("--tokens " + path + ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string s = ss.str();
  std::vector<int32_t> out;
  size_t i = 0;
  while (i < s.size()) {
    const char ch = s[i];
    if (ch == ' ' || ch == '\n' || ch == '\r' || ch == '\t' || ch == ',') {
      ++i;
      continue;
    }
    size_t j = i;
    if (s[j] == '-') ++j;
    int64_t v = 0;
    const size_t digits = j;
    while (j < s.size() && s[j] >= '0' && s[j] <= '9') {
      v = v * 10 + (s[j] - '0');
      if (v > INT32_MAX) throw Error("--tokens " + path + ": value at byte " + std::to_string(i) + " is out of range");
      ++j;
    }
    if (j == digits || (j < s.size() && !(s[j] == ' ' || s[j] == '\n' || s[j] == '\r' || s[j] == '\t' || s[j] == ',')))
      throw Error("--tokens " + path + ": not an integer at byte " + std::to_string(i) + " (expected token ids)");
    out.push_back(static_cast<int32_t>(s[i] == '-' ? -v : v));
    i = j;
  }
  if (out.empty()) throw Error("--tokens " + path + ": no token ids");
  return out;
}

struct Common {
  std::string gguf, tokens;
  std::string backend = "cpu";
  int threads = 0;
  bool allow_overlength = false;
  bool quiet = false;
};

// The options every subcommand has (--tokens where it reads token files).
void add_model_options(CLI::App* s, Common& c) {
  s->add_option("--gguf", c.gguf, "Model file (Llama family GGUF)")->required();
  s->add_option("--backend", c.backend, "Model back end: cpu or cuda")->capture_default_str();
  s->add_option("--threads", c.threads, "CPU threads (0 = all)")->capture_default_str();
  s->add_flag("-q,--quiet", c.quiet, "No progress on stderr");
}

void add_common(CLI::App* s, Common& c) {
  add_model_options(s, c);
  s->add_option("--tokens", c.tokens, "Token ids (text: integers separated by white space or commas)")->required();
  s->add_flag("--allow-overlength", c.allow_overlength, "Allow more tokens than the model's context length");
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

model::Backend backend_of(const Common& c) {
  try {
    return model::parse_backend(c.backend);
  } catch (const Error& e) {
    throw cli::usage_error("--backend", e.what());
  }
}

std::unique_ptr<model::Model> open(const Common& c) {
  const auto t0 = std::chrono::steady_clock::now();
  model::LoadOptions lo;
  lo.threads = c.threads;
  lo.backend = backend_of(c);
  auto m = model::load_model(c.gguf, lo);
  const auto& k = m->config();
  if (!c.quiet)
    std::fprintf(stderr, "proxyattn-eval: %s: %d layers, %d q heads, %d kv heads, head dim %d, vocab %lld, context %lld (%.1f s to load)\n",
                 c.gguf.c_str(), k.n_layers, k.n_head, k.n_head_kv, k.head_dim, static_cast<long long>(k.vocab_size),
                 static_cast<long long>(k.n_ctx), seconds_since(t0));
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  proxyattn::reexec_with_huge_pages(argv);  // before threads and CUDA (host_memory.hpp)
  CLI::App app{"Run a GGUF model with the C++ runtime on prepared token ids", "proxyattn-eval"};
  cli::add_version_flag(app);
  app.require_subcommand(1);

  Common pc;
  int64_t last = 0;
  // Sparse attention in every layer from a registered method (the analysis' estimators, budgets
  // and selection: run_method), the first --dense-layers layers dense.
  std::string method, budget;
  double gamma = 0.95;
  int groups = 1, block = 128, dense_layers = 0;
  std::map<std::string, std::string> method_options;
  auto* ppl = app.add_subcommand("ppl", "Perplexity of the tokens (each given its prefix) in one prefill");
  add_common(ppl, pc);
  ppl->add_option("--last", last, "Score only the last K predicted tokens (0 = all)")->capture_default_str();
  ppl->add_option("--method", method, "Block-sparse attention in every layer with this method (" + method_name_list() +
                                          "); default: full attention");
  ppl->add_option("--budget", budget, "Its budget: native, dynamic, token, uniform, cumulative, oracle (default: the "
                                      "method's own rule, dynamic for proxy)");
  ppl->add_option("--gamma", gamma, "Coverage of the budget / native rule")->capture_default_str();
  ppl->add_option("--groups", groups, "ProxyAttn group count")->capture_default_str();
  ppl->add_option("--block", block, "Block size (power of two)")->capture_default_str();
  ppl->add_option("--dense-layers", dense_layers, "Keep the first L layers dense")->capture_default_str();
  cli::add_method_options(*ppl, method_options);

  Common gc;
  int max_new = 30;
  std::vector<int32_t> stop;
  auto* gen = app.add_subcommand("generate", "Greedy continuation of the tokens (KV cache); prints the new ids");
  add_common(gen, gc);
  gen->add_option("--max-new", max_new, "New tokens at most")->capture_default_str();
  gen->add_option("--stop", stop, "Token ids that end the continuation")->delimiter(',');

  Common cc;
  std::string store_path;
  double rtol = 2e-3;
  auto* cmp = app.add_subcommand("compare", "Q/K/V of every layer of a capture_qk.py store vs the runtime's, on the store's tokens");
  add_model_options(cmp, cc);
  cmp->add_option("--store", store_path, "Q/K store written by scripts/capture_qk.py from the same model")->required();
  cmp->add_option("--rtol", rtol, "Limit on max|x - ref| / max|ref| per layer and tensor")->capture_default_str();

  // The accuracy sweep: the flags of proxyattn-analyze where they mean the same.
  Common sc;
  std::string set_path, out_dir, s_methods = "proxy,pooled,xattn,flexprefill,vslash,oracle", s_sparsity = "0.5,0.8,0.9",
                               s_gamma = "0.9,0.95", s_groups = "1", budget_mode = "constant";
  eval::SweepConfig sw;
  bool no_native = false;
  std::map<std::string, std::string> sweep_options;
  auto* swp = app.add_subcommand("sweep", "Accuracy with sparse attention in every layer: NIAH retrieval and perplexity "
                                          "per method x sparsity (and native points), full attention as the baseline");
  add_model_options(swp, sc);
  swp->add_option("--eval-set", set_path, "Evaluation set (JSON) from scripts/prepare_eval.py for this model")->required();
  swp->add_option("--out,-o", out_dir, "Output folder: report.json, points/niah/ppl/layers.csv, report.md")->required();
  swp->add_option("--methods", s_methods, "Methods, comma-separated (" + method_name_list() + ")")->capture_default_str();
  swp->add_option("--sparsity", s_sparsity, "Fixed sparsities in [0, 1), comma-separated")->capture_default_str();
  swp->add_option("--gamma", s_gamma, "Coverages in (0, 1] of the native points; the largest drives the fixed-sparsity "
                                      "selections")->capture_default_str();
  swp->add_option("--groups", s_groups, "ProxyAttn group counts, comma-separated, each dividing Hq")->capture_default_str();
  swp->add_flag("--no-native", no_native, "Only the fixed sparsities, not each method's own operating points");
  swp->add_option("--block", sw.estimator.block, "Block size B (power of two)")->capture_default_str();
  swp->add_option("--dense-layers", sw.dense_layers, "Keep the first L layers dense")->capture_default_str();
  cli::add_method_options(*swp, sweep_options);
  swp->add_option("--budget-mode", budget_mode, "dynamic/token/uniform budget across rows: constant or proportional")
      ->capture_default_str();
  swp->add_option("--k-min", sw.budget.k_min, "Lower clamp of the dynamic budget (blocks)")->capture_default_str();
  swp->add_flag("--allow-overlength", sc.allow_overlength, "Allow prompts over the model's context length");

  return cli::run_main(app, argc, argv, [&]() -> int {
    if (*swp) {
      const std::pair<const char*, const std::string*> lists[] = {
          {"--methods", &s_methods}, {"--sparsity", &s_sparsity}, {"--gamma", &s_gamma}, {"--groups", &s_groups}};
      for (const auto& [flag, value] : lists)
        if (value->find_first_not_of(" \t") == std::string::npos) throw Error(std::string(flag) + ": empty value");
      sw.methods = cli::split_list(s_methods, "--methods");
      sw.sparsities = cli::number_list(s_sparsity, "--sparsity");
      sw.gammas = cli::number_list(s_gamma, "--gamma");
      sw.groups = cli::int_list(s_groups, "--groups");
      sw.native = !no_native;
      cli::apply_method_options(*swp, sweep_options, sw.estimator);
      sw.budget.mode = parse_budget_mode(budget_mode);
      if (sc.threads < 0 || sc.threads > 4096) throw cli::usage_error("--threads", "must be in [0, 4096]");
      if (sw.estimator.block < 16 || sw.estimator.block > 4096)
        throw cli::usage_error("--block", std::to_string(sw.estimator.block) + " outside [16, 4096]");
      backend_of(sc);
      // Every check before the model's weights are read: the output folder, the set's structure,
      // the set against the model's identity, the points against the registry.
      analysis::check_report_dir(out_dir);
      const eval::EvalSet set = eval::read_eval_set(set_path);
      eval::ModelIdentity ident;
      int q_heads = 0;
      {
        const gguf::File f(sc.gguf);
        const model::ModelConfig mc = model::read_model_config(f);
        ident = eval::identity_of(f, mc);
        q_heads = mc.n_head;
        if (sw.dense_layers >= mc.n_layers)
          throw cli::usage_error("--dense-layers", std::to_string(sw.dense_layers) + " leaves no sparse layer (the model has " +
                                                       std::to_string(mc.n_layers) + ")");
      }
      eval::check_set_against_model(set, ident, sc.allow_overlength);
      const std::vector<eval::Point> points = eval::expand_points(sw, q_heads);
      auto m = open(sc);
      eval::SweepOptions so;
      so.allow_overlength = sc.allow_overlength;
      so.quiet = sc.quiet;
      nlohmann::json report = eval::run_sweep(*m, set, sw, points, so);
      report["argv"] = std::vector<std::string>(argv, argv + argc);
      const auto files = analysis::write_report(report, out_dir, eval::render_sweep_markdown(report));
      if (!sc.quiet)
        std::fprintf(stderr, "proxyattn-eval sweep: %zu points, %zu files in %s (%.1f s)\n", points.size(), files.size(),
                     out_dir.c_str(), report["timing"]["total_seconds"].get<double>());
      return 0;
    }
    if (*cmp) {
      StoreReader st(store_path);
      if (!st.has_tokens()) throw Error("--store " + store_path + ": no /tokens dataset");
      const auto toks = st.tokens();
      auto m = open(cc);
      const auto& k = m->config();
      const auto& meta = st.meta();
      if (meta.num_q_heads != k.n_head || meta.num_kv_heads != k.n_head_kv || meta.head_dim != k.head_dim ||
          meta.num_layers != k.n_layers)
        throw Error("--store " + store_path + ": shapes (layers, heads, head dim) differ from the model's");
      const auto& layers = st.layers();
      model::ForwardOptions o;
      o.stop_after_layer = layers.back();
      o.allow_overlength = true;
      double worst = 0;
      auto rel = [](ConstView x, const Tensor3& ref) {
        double m = 0, e = 0;
        for (int64_t h = 0; h < ref.heads(); ++h)
          for (int64_t t = 0; t < ref.tokens(); ++t)
            for (int64_t c = 0; c < ref.dim(); ++c) {
              m = std::max(m, static_cast<double>(std::abs(ref(h, t, c))));
              e = std::max(e, static_cast<double>(std::abs(x(h, t, c) - ref(h, t, c))));
            }
        return m > 0 ? e / m : e;
      };
      std::printf("layer  rel_err_q  rel_err_k  rel_err_v\n");
      o.on_layer = [&](int l, ConstView q, ConstView kk, ConstView v) {
        if (!std::binary_search(layers.begin(), layers.end(), l)) return;
        const LayerData d = st.read_layer(l, st.has_v(l));
        const double eq = rel(q, d.q), ek = rel(kk, d.k), ev = d.v ? rel(v, *d.v) : 0.0;
        worst = std::max({worst, eq, ek, ev});
        std::printf("%5d  %9.2e  %9.2e  %9.2e\n", l, eq, ek, ev);
        std::fflush(stdout);
      };
      const auto t0 = std::chrono::steady_clock::now();
      m->forward(toks, o);
      std::printf("worst relative error %.2e over %zu layers of %zu tokens (limit %.1e), forward %.2f s\n", worst,
                  layers.size(), toks.size(), rtol, seconds_since(t0));
      if (worst > rtol) throw Error("--store " + store_path + ": worst relative error " + std::to_string(worst) + " over the limit");
      return 0;
    }
    if (*ppl) {
      if (last < 0) throw cli::usage_error("--last", "must be >= 0");
      const auto toks = read_tokens(pc.tokens);
      if (toks.size() < 2) throw Error("--tokens " + pc.tokens + ": perplexity needs at least 2 tokens");
      auto m = open(pc);
      model::ForwardOptions o;
      std::optional<model::BlockMaskAttention> sparse;
      if (!method.empty()) {
        const MethodInfo& mi = [&]() -> const MethodInfo& {
          try {
            return find_method(method);
          } catch (const Error& e) {
            throw cli::usage_error("--method", e.what());
          }
        }();
        MethodSpec spec;
        spec.estimator = mi.name;
        spec.budget = budget.empty() ? default_budget(mi) : budget;
        spec.config.block = block;
        cli::apply_method_options(*ppl, method_options, spec.config);
        if (mi.set_groups) mi.set_groups(spec.config, groups);
        if (mi.set_coverage) mi.set_coverage(spec.config, gamma);
        spec.budget_config.gamma = gamma;
        // Everything the registry and budgets refuse, before the forward.
        validate_estimator_config(spec.config, m->config().n_head, mi.name);
        if (spec.budget != "native") {
          make_budget(spec.budget);
          validate_budget_config(spec.budget_config);
        } else if (mi.native == NativeRule::none) {
          throw cli::usage_error("--budget", "method '" + mi.name + "' has no native selection; give a budget");
        }
        if (dense_layers < 0) throw cli::usage_error("--dense-layers", "must be >= 0");
        std::vector<int> dense;
        for (int l = 0; l < std::min(dense_layers, m->config().n_layers); ++l) dense.push_back(l);
        sparse.emplace([spec](int, ConstView q, ConstView k) { return std::optional<BlockMask>(run_method(q, k, spec).mask); },
                       dense);
        o.attention = &*sparse;
      }
      const int64_t n = static_cast<int64_t>(toks.size());
      o.nll_begin = last > 0 ? std::max<int64_t>(0, n - 1 - last) : 0;
      o.allow_overlength = pc.allow_overlength;
      const auto t0 = std::chrono::steady_clock::now();
      const auto r = m->forward(toks, o);
      const double dt = seconds_since(t0);
      double s = 0;
      for (double x : r.nll) s += x;
      std::printf("perplexity %.3f over %zu predicted tokens of %lld (forward %.2f s, %.0f tokens/s)\n",
                  std::exp(s / static_cast<double>(r.nll.size())), r.nll.size(), static_cast<long long>(n), dt,
                  static_cast<double>(n) / dt);
      if (sparse) {
        double bd = 0, ed = 0;
        int sparse_layers = 0;
        for (const auto& d : sparse->densities())
          if (d.layer >= dense_layers && !d.windowed()) {
            bd += d.block_density;
            ed += d.element_density;
            ++sparse_layers;
          }
        if (sparse_layers > 0)
          std::printf("attention %s, %d sparse layers: block density %.4f, element density %.4f (means over layers)\n",
                      method.c_str(), sparse_layers, bd / sparse_layers, ed / sparse_layers);
      }
      if (!pc.quiet)
        std::fprintf(stderr, "proxyattn-eval: embed %.2f s, qkv+rope %.2f s, attention %.2f s, out+mlp %.2f s, logits %.2f s\n",
                     r.timing.embed, r.timing.qkv, r.timing.attention, r.timing.mlp, r.timing.logits);
      return 0;
    }
    if (max_new < 1) throw cli::usage_error("--max-new", "must be at least 1");
    const auto toks = read_tokens(gc.tokens);
    auto m = open(gc);
    const auto t0 = std::chrono::steady_clock::now();
    if (!gc.allow_overlength && static_cast<int64_t>(toks.size()) + max_new > m->config().n_ctx)
      throw Error("--tokens " + gc.tokens + ": " + std::to_string(toks.size()) + " tokens + " + std::to_string(max_new) +
                  " new exceed the context length " + std::to_string(m->config().n_ctx));
    const auto out = m->generate(toks, max_new, stop, nullptr, gc.allow_overlength);
    const double dt = seconds_since(t0);
    std::string line;
    for (int32_t t : out) line += (line.empty() ? "" : " ") + std::to_string(t);
    std::printf("%s\n", line.c_str());
    if (!gc.quiet) std::fprintf(stderr, "proxyattn-eval: %zu new tokens in %.2f s\n", out.size(), dt);
    return 0;
  });
}
