#pragma once
// Sweeps: declared axes (JSON, configs/sweeps/NAME.json, one per paper figure) expanded into
// the list of methods the tool times. Flags given on the command line override the file's axes.
//
//   {
//     "name": "fig4_speedup", "figure": "Fig. 4 analogue", "description": "...",
//     "model": "configs/models/llama-3.1-8b.json",      // or an inline object with the fields
//     "device": "auto",                                 // auto | cpu | cuda
//     "dtypes": ["bf16"], "lengths": ["4K", "8K", 131072],
//     "methods": ["full", "sparse", "estimate", "proxyattn"],
//     "densities": [0.5, 0.2, 0.1, 0.05],              // what bare "sparse" expands to
//     "estimators": ["proxy", "oracle"],               // what bare "estimate" expands to
//     "gammas": [0.95], "proxyattn_densities": [0.1],  // what bare "proxyattn" expands to
//     "proxy": {"groups": [1, 4], "query_stride": [1, 8]},  // estimate:proxy expands over both
//     "block": 128, "repetitions": 10, "warmup": 2, "seed": 1, "inputs": "synth",
//     "cpu_max_len": 8192, "k_min": 2, "gpu_mem_fraction": 0.9,
//     "peers": { ... }                                  // read by scripts/bench_peers.py only
//   }
//
// Method tokens: full | sparse | sparse@D | estimate | estimate:NAME | proxyattn |
// proxyattn@gamma=G | proxyattn@density=D. Every mistake (unknown key or method, empty axis,
// density or gamma outside (0, 1], malformed JSON) is an Error naming the file and the field.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "bench.hpp"

namespace proxyattn::bench {

struct SweepOverrides {
  std::optional<std::string> device, model, inputs, mask_file;
  std::vector<std::string> dtypes, lengths, methods, estimators;
  std::vector<double> densities, gammas, proxyattn_densities;
  std::vector<int> groups, query_strides;
  std::optional<int> block, repetitions, warmup, k_min;
  std::optional<uint64_t> seed;
  std::optional<int64_t> cpu_max_len;
  std::optional<double> gpu_mem_fraction;
};

// path empty: the built-in default sweep (lengths 4K..128K, full, sparse, estimate:proxy,
// proxyattn) with the overrides applied.
Sweep load_sweep(const std::string& path, const SweepOverrides& overrides);

// "4096", "4K", "128k", "1M" (binary multiples) -> tokens; Error naming `what` otherwise.
int64_t parse_length(const std::string& s, const std::string& what);
// Relative paths inside a sweep file resolve against the working directory, then the sweep
// file's folder, then the project root two levels above it (configs/sweeps/..).
std::string resolve_path(const std::string& p, const std::string& sweep_file);

// Shortest label of a length: 131072 -> "128K", 1000 -> "1000".
std::string length_label(int64_t n);

}  // namespace proxyattn::bench
