#pragma once
// The method registry. Every block-selection method (an estimator: proxy, pooled, xattn,
// flexprefill, vslash, oracle) and every budget kind is one unit, registered once
// (lib/src/methods/registry.cpp), that owns:
//   - its config section: defaults (EstimatorConfig), validation, JSON keys and CLI flags;
//   - its CPU estimate (the spec) and its GPU estimate where a kernel exists;
//   - its native selection rule (how it depends on the coverage gamma / tau);
//   - its cost model (the MPI balancers and the benchmark read it).
// The tools, the MPI split and the benchmarks iterate the registry; no code outside
// lib/src/methods/ compares method names. Adding a method: README "Adding a method".
//
//   for (const MethodInfo* m : all_methods()) ...;
//   const MethodInfo& x = find_method("xattn");           // Error listing the valid names
//   BlockScores s = x.estimate_cpu(q, k, config);
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "proxyattn/attention.hpp"
#include "proxyattn/estimator.hpp"

namespace proxyattn {

class CudaLayer;

// How a method's own ("native") selection depends on the coverage of the analysis (gamma).
enum class NativeRule {
  none,         // no own selection: a budget picks the blocks (proxy), or the analysis derives
                // the oracle's top-k per gamma from the exact mass (oracle)
  from_scores,  // a function of the scores and the coverage: re-derived for another gamma
                // without estimating again (pooled: gamma, xattn: tau)
  estimate,     // depends on the coverage through the estimate itself (flexprefill)
  fixed,        // independent of the coverage (vslash)
};

// How a fixed density is reached when the density rule is "auto" (select.hpp).
enum class AutoDensity {
  scaled_dynamic,  // the dynamic budgets scaled to the density (proxy)
  layer_global,    // the globally best blocks of the layer (oracle: the upper bound)
  native_adjust,   // the native selection cut or grown by score (methods with a native rule)
};
std::string_view auto_density_name(AutoDensity a);  // "scaled_dynamic", ...

// One knob of a method's config section: JSON key, CLI flag and accessors on EstimatorConfig.
struct MethodOption {
  std::string key;   // JSON key inside the method's section, e.g. "stride"
  std::string flag;  // CLI long flag without the dashes, e.g. "xattn-stride"; "" = JSON only
  std::string help;
  std::function<nlohmann::json(const EstimatorConfig&)> get;
  // Throws Error naming "<method>.<key>" when the value has the wrong type; range checks are
  // the method's validate().
  std::function<void(EstimatorConfig&, const nlohmann::json&)> set;
};

// The score-only native rules that have a device kernel (kernels::native_select).
enum class DeviceNativeRule {
  cumulative,      // per row, the fewest blocks reaching the threshold, plus sink and diagonal
  forced_then_cover,  // per row, sink and diagonal first, then by score while kept < threshold
};
struct DeviceNative {
  DeviceNativeRule rule;
  double threshold;
};

// One estimate on operands already on the GPU: the estimate stage of the device pipeline, shared
// by CudaLayer (the analysis) and the benchmark's GPU runner, so both time and use one launch
// sequence. Device pointers; elem: 1 = fp16, 2 = bf16 (kernels::ElemType).
struct DeviceEstimate {
  const void* q = nullptr;  // [Hq, N, d]
  const void* k = nullptr;  // [Hkv, N, d]
  int elem = 2;
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t seq_len = 0;
  const EstimatorConfig* config = nullptr;
  float* scores = nullptr;        // [Hq, Nb, Nb], every entry written
  uint8_t* bitmap = nullptr;      // [Hq, Nb, Nb]: the native selection (device_native_bitmap)
  int32_t* row_counts = nullptr;  // [Hq * Nb]: its row sums (device_native_bitmap)
  void* stream = nullptr;
};

struct MethodInfo {
  std::string name;
  std::string description;  // one line, for --help and reports
  NativeRule native = NativeRule::none;
  bool forced_blocks = true;   // sink and diagonal forced into its fixed-density selections
  bool exact_mass = false;     // its scores are the exact block mass (oracle): a mass computed
                               // elsewhere (the analysis' pass) can stand in for the estimate
  AutoDensity auto_density = AutoDensity::native_adjust;
  std::vector<MethodOption> options;

  // Range checks of this method's section ("estimator config: xattn.stride = 3 must be ...").
  // q_heads <= 0 skips the checks that need the layer's shape.
  void (*validate)(const EstimatorConfig& c, int q_heads) = nullptr;
  // Sets the group count of a method configured per proxy group count (proxy); null otherwise.
  void (*set_groups)(EstimatorConfig& c, int groups) = nullptr;
  // True when, for c, the scores equal the block max of each head's exact probabilities, which
  // the analysis' oracle pass already computes (proxy with one group per head, query stride 1).
  bool (*equals_block_max)(const EstimatorConfig& c, int q_heads) = nullptr;
  // Sets the coverage knob that gamma drives (pooled.gamma, xattn.tau, flexprefill.gamma);
  // null when the method has none.
  void (*set_coverage)(EstimatorConfig& c, double gamma) = nullptr;
  // The CPU estimate (the spec); inputs already checked (check_qkv) and config validated.
  BlockScores (*estimate_cpu)(ConstView q, ConstView k, const EstimatorConfig& c) = nullptr;
  // native == estimate: estimate_cpu at each coverage of `coverages` (set_coverage) at once,
  // the coverage-independent work done once; element x equals estimate_cpu with coverage x.
  // Null: one estimate per coverage.
  std::vector<BlockScores> (*estimate_cpu_coverages)(ConstView q, ConstView k, const EstimatorConfig& c,
                                                     const std::vector<double>& coverages) = nullptr;
  // The GPU estimate on a resident layer; null when there is no kernel.
  BlockScores (*estimate_gpu)(const CudaLayer& layer, const EstimatorConfig& c) = nullptr;
  // The estimate on device operands (scores, and the native bitmap when device_native_bitmap);
  // throws Error naming the launch. Null when the method has no single-launch device estimate.
  void (*estimate_device)(const DeviceEstimate& d) = nullptr;
  bool device_native_bitmap = false;  // estimate_device writes the native selection itself (vslash)
  // Scratch the launchers take beyond the outputs (stream-ordered), for memory checks; bytes.
  double (*device_scratch_bytes)(const AttentionShape& s, const EstimatorConfig& c) = nullptr;
  std::string device_timed;           // what the device estimate's time covers (bench reports)
  // The analysis runs estimate_gpu under --device cuda (false: a kernel exists, but the
  // analysis keeps the CPU estimate; gpu_note says why).
  bool gpu_in_analysis = false;
  std::string gpu_note;
  // native == from_scores: recompute s.native for c's coverage from s.score alone.
  void (*renative)(BlockScores& s, const EstimatorConfig& c) = nullptr;
  // native == from_scores with a device kernel for the rule (native_select_cuda): which rule
  // and its threshold for config c; null when none. Throws Error for a config the kernel does
  // not cover (pooled.global).
  DeviceNative (*device_native)(const EstimatorConfig& c) = nullptr;
  // One line for the report's notes about the settings in force (null: nothing to say).
  std::string (*config_note)(const EstimatorConfig& c) = nullptr;
  // Work of one estimate relative to one causal attention of the layer (QK^T and PV over the
  // causal half): the MPI balancers and the benchmark's case costs.
  double (*cost)(const AttentionShape& s, const EstimatorConfig& c) = nullptr;

  bool has_gpu() const { return estimate_gpu != nullptr; }
  bool grouped() const { return set_groups != nullptr; }
  // Runs validate (block, then the section) and check_qkv, then estimate_cpu.
  BlockScores estimate(ConstView q, ConstView k, const EstimatorConfig& c) const;
  // estimate(q, k, c with set_coverage(x)) for each x of coverages, in one call where the method
  // has estimate_cpu_coverages.
  std::vector<BlockScores> estimate_coverages(ConstView q, ConstView k, const EstimatorConfig& c,
                                              const std::vector<double>& coverages) const;
  // The section as JSON ({key: value} of every option).
  nlohmann::json config_json(const EstimatorConfig& c) const;
  // Applies a JSON section ({key: value}); unknown keys are an Error naming them.
  void apply_json(EstimatorConfig& c, const nlohmann::json& section) const;
};

// Every method, in report order: proxy, pooled, xattn, flexprefill, vslash, oracle.
const std::vector<const MethodInfo*>& all_methods();
// Error "unknown method 'x' (valid: ...)" for an unknown name.
const MethodInfo& find_method(std::string_view name);
// The budget a method runs with by default: "native" for a method with its own rule, the oracle
// budget for the exact mass, ProxyAttn's "dynamic" budget otherwise.
std::string default_budget(const MethodInfo& m);
// The method the budget and fidelity topics study: ProxyAttn.
const MethodInfo& proxyattn_method();
// The names joined by ", " (error messages, --help).
std::string method_name_list();

// ---- budget kinds ----------------------------------------------------------------------------

struct BudgetKindInfo {
  std::string name;
  std::string description;
  bool reads_scores = false;      // depends on the estimator's scores (cumulative)
  bool needs_oracle_mass = false; // reads the exact block mass (oracle)
  bool mean_of_dynamic = false;   // uniform_k = round(mean dynamic k_h at the same gamma) (uniform)
  bool fig5c = false;             // brought to each fixed sparsity with its proportions (dynamic, token)
  bool reads_last_block = false;  // reads the last query block's token probabilities (dynamic, token)
};
// dynamic, token, uniform, cumulative, oracle (report order).
const std::vector<const BudgetKindInfo*>& all_budget_kinds();
const BudgetKindInfo& find_budget_kind(std::string_view name);

}  // namespace proxyattn
