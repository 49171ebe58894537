// run_method: estimator -> budget -> selection, timed.
#include "proxyattn/method.hpp"
#include "proxyattn/methods.hpp"

#include <chrono>
#include <string>

#include "proxyattn/error.hpp"

namespace proxyattn {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

Budgets budgets_from_mask(const BlockMask& mask, std::string kind) {
  Budgets b;
  b.kind = std::move(kind);
  b.heads = mask.heads();
  b.num_blocks = mask.num_blocks();
  b.per_head_k.assign(b.heads, 0.0);
  b.per_row_k.assign(static_cast<size_t>(b.heads) * b.num_blocks, 0);
  for (int h = 0; h < b.heads; ++h) {
    for (int i = 0; i < b.num_blocks; ++i)
      b.per_row_k[static_cast<size_t>(h) * b.num_blocks + i] = static_cast<int32_t>(mask.row(h, i).size());
    b.per_head_k[h] = static_cast<double>(mask.selected(h)) / b.num_blocks;
  }
  return b;
}

MethodResult run_method(ConstView q, ConstView k, const MethodSpec& spec, const BlockMass* oracle_mass,
                        const std::vector<float>* last_block_probs) {
  const MethodInfo& method = find_method(spec.estimator);
  const bool native = spec.budget == "native";
  std::unique_ptr<Budget> budget;
  if (!native) {
    budget = make_budget(spec.budget);  // unknown names fail before any work
    validate_budget_config(spec.budget_config);
  }
  MethodResult r;
  auto t0 = std::chrono::steady_clock::now();
  if (method.exact_mass && oracle_mass) {
    const AttentionShape s = check_qkv(q, k);
    validate_estimator_config(spec.config, s.q_heads, method.name);
    if (oracle_mass->block != spec.config.block || oracle_mass->heads != s.q_heads ||
        oracle_mass->seq_len != s.seq_len)
      throw Error("run_method: the given oracle block mass does not match the layer / block size");
    r.scores = scores_from_mass(*oracle_mass);
  } else {
    r.scores = method.estimate(q, k, spec.config);
  }
  r.estimate_seconds = seconds_since(t0);

  t0 = std::chrono::steady_clock::now();
  if (native) {
    if (!r.scores.native)
      throw Error("estimator '" + spec.estimator + "' has no native selection (budget 'native')");
    r.budgets = budgets_from_mask(*r.scores.native);
  } else {
    r.budgets = budget->compute(q, k, r.scores, spec.budget_config, oracle_mass, last_block_probs);
  }
  r.budget_seconds = seconds_since(t0);

  t0 = std::chrono::steady_clock::now();
  r.mask = native ? *r.scores.native : select_blocks(r.scores, r.budgets, spec.select);
  r.select_seconds = seconds_since(t0);
  return r;
}

}  // namespace proxyattn
