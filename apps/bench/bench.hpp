#pragma once
// proxyattn-bench: shared types of the sweep (what to time), the cases it expands to and the
// long-format result rows every output (JSON, CSV, Markdown) is rendered from. The peer script
// scripts/bench_peers.py writes rows of the same schema (kRowColumns).
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "proxyattn/block_mask.hpp"
#include "proxyattn/dtype.hpp"
#include "proxyattn/model_config.hpp"

namespace proxyattn::bench {

// What one timed case computes.
enum class Family {
  full,       // our full causal kernel (CPU: full_attention_cpu)
  sparse,     // our block-sparse kernel on a random mask of a given density, or a mask file
  estimate,   // one estimator's estimation alone (scores + budget + selection)
  proxyattn,  // end to end: proxy scores + dynamic budget + selection + block-sparse kernel
};
const char* family_name(Family f);

struct Method {
  Family family = Family::full;
  std::string label;         // "full", "sparse@0.1", "estimate:proxy[g=1,s=1]", "proxyattn@gamma=0.95"
  double density = 0;        // sparse: target density; proxyattn: target (when target_density)
  bool target_density = false;  // proxyattn: budgets scaled to `density` instead of gamma's own
  double gamma = 0;          // proxyattn: coverage of the dynamic budget
  std::string estimator;     // estimate: estimator name
  int groups = 1;            // proxy: g
  int query_stride = 1;      // proxy: s
  std::string mask_file;     // sparse: mask from this file (N taken from it) instead of a seed
};

struct Sweep {
  std::string name = "cli";
  std::string description;
  std::string figure;
  std::string source_file;            // sweep file path ("" when built from flags alone)
  std::string device = "auto";        // auto | cpu | cuda
  ModelConfig model;
  std::string model_source;           // path or "inline"
  std::vector<DType> dtypes;
  std::vector<int64_t> lengths;
  std::vector<Method> methods;        // expanded
  int block = 128;
  int repetitions = 10;
  int warmup = 2;
  uint64_t seed = 1;
  std::string inputs = "synth";       // synth | random
  int64_t cpu_max_len = 8192;
  int k_min = 2;
  double gpu_mem_fraction = 0.9;      // skip a case needing more than this share of device memory
  nlohmann::json raw;                 // the sweep as given (echoed into the report)
};

// One result row (long format). Times in milliseconds; NaN-free: absent values are nullopt and
// print as empty CSV cells / JSON null.
struct Row {
  std::string source = "proxyattn-bench";
  std::string device;                 // "cuda" | "cpu"
  std::string family;
  std::string method;
  int64_t n = 0;
  std::string dtype;
  int q_heads = 0, kv_heads = 0, head_dim = 0, block = 0;
  std::optional<double> density_target, density, element_density, gamma;
  std::optional<double> estimation_ms, kernel_ms, total_ms, total_ms_min, total_ms_max;
  int reps = 0;
  std::optional<double> tflops_done, tflops_effective, speedup_vs_full, pct_of_full;
  std::string status = "ok";          // ok | skipped | error
  std::string reason;
  nlohmann::json extra = nlohmann::json::object();  // per-stage medians, proxy config, ...
};

// CSV header / JSON keys of a row, in order; shared with scripts/bench_peers.py.
const std::vector<std::string>& row_columns();

// Dense-causal FLOPs 4 N^2 d H / 2 (PERFORMANCE.md's convention).
double dense_causal_flops(int64_t n, int head_dim, int q_heads);

// Fill the derived columns (TFLOP/s, speedup and % of the matching `full` row).
void finish_rows(std::vector<Row>& rows);

}  // namespace proxyattn::bench
