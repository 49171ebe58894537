// The method registry: the one list of methods and budget kinds (methods.hpp), and the generic
// entry points of estimator.hpp that dispatch through it.
#include <algorithm>

#include "method_util.hpp"
#include "proxyattn/budget.hpp"

namespace proxyattn {

namespace methods {
// One accessor per unit (its own file in this folder). Adding a method: its file, its line here.
const MethodInfo& proxy_method();
const MethodInfo& pooled_method();
const MethodInfo& xattn_method();
const MethodInfo& flexprefill_method();
const MethodInfo& vslash_method();
const MethodInfo& oracle_method();
}  // namespace methods

const std::vector<const MethodInfo*>& all_methods() {
  static const std::vector<const MethodInfo*> list{
      &methods::proxy_method(),  &methods::pooled_method(), &methods::xattn_method(),
      &methods::flexprefill_method(), &methods::vslash_method(), &methods::oracle_method()};
  return list;
}

const MethodInfo& proxyattn_method() { return methods::proxy_method(); }

std::string default_budget(const MethodInfo& m) {
  if (m.native != NativeRule::none) return "native";
  return m.exact_mass ? "oracle" : "dynamic";
}

std::string method_name_list() {
  std::string s;
  for (const MethodInfo* m : all_methods()) s += (s.empty() ? "" : ", ") + m->name;
  return s;
}

const MethodInfo& find_method(std::string_view name) {
  for (const MethodInfo* m : all_methods())
    if (m->name == name) return *m;
  throw Error("unknown method '" + std::string(name) + "' (valid: " + method_name_list() + ")");
}

std::string_view auto_density_name(AutoDensity a) {
  switch (a) {
    case AutoDensity::scaled_dynamic: return "scaled_dynamic";
    case AutoDensity::layer_global: return "layer_global";
    case AutoDensity::native_adjust: return "native_adjust";
  }
  return "?";
}

BlockScores MethodInfo::estimate(ConstView q, ConstView k, const EstimatorConfig& c) const {
  const AttentionShape s = check_qkv(q, k);
  validate_estimator_config(c, s.q_heads, name);
  return estimate_cpu(q, k, c);
}

std::vector<BlockScores> MethodInfo::estimate_coverages(ConstView q, ConstView k, const EstimatorConfig& c,
                                                        const std::vector<double>& coverages) const {
  if (!set_coverage) throw Error("estimate_coverages: method '" + name + "' has no coverage");
  const AttentionShape s = check_qkv(q, k);
  std::vector<BlockScores> out;
  for (double x : coverages) {
    EstimatorConfig cx = c;
    set_coverage(cx, x);
    validate_estimator_config(cx, s.q_heads, name);
    if (!estimate_cpu_coverages) out.push_back(estimate_cpu(q, k, cx));
  }
  if (estimate_cpu_coverages && !coverages.empty()) out = estimate_cpu_coverages(q, k, c, coverages);
  return out;
}

nlohmann::json MethodInfo::config_json(const EstimatorConfig& c) const {
  nlohmann::json j = nlohmann::json::object();
  for (const MethodOption& o : options) j[o.key] = o.get(c);
  return j;
}

void MethodInfo::apply_json(EstimatorConfig& c, const nlohmann::json& section) const {
  if (!section.is_object()) throw Error("estimator config: " + name + ": expected an object, got " + section.dump());
  for (const auto& [key, value] : section.items()) {
    auto it = std::find_if(options.begin(), options.end(), [&](const MethodOption& o) { return o.key == key; });
    if (it == options.end()) {
      std::string valid;
      for (const MethodOption& o : options) valid += (valid.empty() ? "" : ", ") + o.key;
      throw Error("estimator config: " + name + "." + key + ": unknown key (valid: " + (valid.empty() ? "none" : valid) + ")");
    }
    it->set(c, value);
  }
}

// ---- estimator.hpp entry points ------------------------------------------------------------------

void validate_estimator_config(const EstimatorConfig& c, int q_heads, std::string_view method) {
  methods::require(methods::pow2(c.block), "block = " + std::to_string(c.block) + " must be a positive power of two");
  if (!method.empty()) {
    find_method(method).validate(c, q_heads);
    return;
  }
  for (const MethodInfo* m : all_methods()) m->validate(c, q_heads);
}

std::vector<std::string> estimator_names() {
  std::vector<std::string> out;
  for (const MethodInfo* m : all_methods()) out.push_back(m->name);
  return out;
}

namespace {
class RegistryEstimator final : public Estimator {
 public:
  explicit RegistryEstimator(const MethodInfo& m) : m_(m) {}
  std::string name() const override { return m_.name; }
  std::string description() const override { return m_.description; }
  BlockScores estimate(ConstView q, ConstView k, const EstimatorConfig& c) const override {
    return m_.estimate(q, k, c);
  }

 private:
  const MethodInfo& m_;
};
}  // namespace

std::unique_ptr<Estimator> make_estimator(std::string_view name) {
  return std::make_unique<RegistryEstimator>(find_method(name));
}

bool renative_from_scores(BlockScores& s, const EstimatorConfig& c) {
  const MethodInfo* m = nullptr;
  for (const MethodInfo* x : all_methods())
    if (x->name == s.method) m = x;
  if (!m || m->native != NativeRule::from_scores) return false;
  validate_estimator_config(c, 0, m->name);
  if (s.heads <= 0 || s.score.size() != static_cast<size_t>(s.heads) * s.num_blocks * s.num_blocks)
    throw Error("renative_from_scores: block scores of '" + s.method + "' are empty or mis-shaped");
  m->renative(s, c);
  return true;
}

// ---- budget kinds -----------------------------------------------------------------------------

namespace {
BudgetKindInfo budget_kind(std::string name, bool reads_scores, bool needs_oracle, bool mean_of_dynamic, bool fig5c,
                           bool reads_last_block) {
  BudgetKindInfo b;
  b.name = name;
  b.description = make_budget(name)->description();
  b.reads_scores = reads_scores;
  b.needs_oracle_mass = needs_oracle;
  b.mean_of_dynamic = mean_of_dynamic;
  b.fig5c = fig5c;
  b.reads_last_block = reads_last_block;
  return b;
}
}  // namespace

const std::vector<const BudgetKindInfo*>& all_budget_kinds() {
  static const std::vector<BudgetKindInfo> kinds{
      // name, reads_scores, needs_oracle_mass, mean_of_dynamic, fig5c, reads_last_block
      budget_kind("dynamic", false, false, false, true, true),
      budget_kind("token", false, false, false, true, true),
      budget_kind("uniform", false, false, true, false, false),
      budget_kind("cumulative", true, false, false, false, false),
      budget_kind("oracle", false, true, false, false, false)};
  static const std::vector<const BudgetKindInfo*> list = [] {
    std::vector<const BudgetKindInfo*> l;
    for (const BudgetKindInfo& k : kinds) l.push_back(&k);
    return l;
  }();
  return list;
}

const BudgetKindInfo& find_budget_kind(std::string_view name) {
  std::string valid;
  for (const BudgetKindInfo* b : all_budget_kinds()) {
    if (b->name == name) return *b;
    valid += (valid.empty() ? "" : ", ") + b->name;
  }
  throw Error("unknown budget '" + std::string(name) + "' (valid: " + valid + ")");
}

}  // namespace proxyattn
