#pragma once
// Runners time one case at a time: prepare (untimed: inputs, masks, calibration), then
// run_once per repetition. The CPU runner times the CPU reference with a steady clock; the GPU
// runner times the CUDA launchers (kernels.h) with CUDA events, the L2 flushed before each
// repetition. Both are CUDA-free at compile time: without CUDA the GPU runner reports
// "built without CUDA" when asked for.
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "bench.hpp"
#include "masks.hpp"
#include "proxyattn/tensor.hpp"

namespace proxyattn::bench {

// Stage times of one repetition, milliseconds.
struct Timing {
  double estimation_ms = 0;  // estimation + budget + selection (0 for full / sparse)
  double kernel_ms = 0;      // attention kernel (0 for estimate)
  double total_ms = 0;       // the whole timed region
  std::map<std::string, double> stages;
};

// One layer of host inputs, float32 values already rounded through the case dtype (what the
// kernels see after conversion).
struct HostInputs {
  int64_t n = 0;
  DType dtype = DType::bf16;
  std::string kind;  // synth | random
  Tensor3 q, k, v;
};
// Layer 0 of a synth store of this length (SynthGenerator, seed) or seeded normal values.
HostInputs make_inputs(const Sweep& sw, int64_t n, DType dtype);
// Raw 16-bit patterns of a tensor in `dtype` (bf16 / f16).
std::vector<uint16_t> to_half_bits(const Tensor3& t, DType dtype);

class Runner {
 public:
  virtual ~Runner() = default;
  virtual std::string device() const = 0;           // "cpu" | "cuda"
  virtual std::string timing_method() const = 0;
  virtual nlohmann::json context() const = 0;       // device name, memory, ...
  // Reason this case cannot run here (checked before anything is allocated), or "".
  virtual std::string skip_reason(const Method& m, int64_t n, DType dtype) const = 0;
  // Untimed setup of one case. Throws Error.
  virtual void prepare(const Method& m, int64_t n, DType dtype) = 0;
  // One repetition. Throws Error.
  virtual Timing run_once() = 0;
  // Case facts after the runs (density, element density, config) into the row.
  virtual void describe(Row& row) = 0;
  // The mask of the case, for --export-masks (sparse / proxyattn), or null.
  virtual const BlockMask* mask() const = 0;
  // Frees the case's buffers (inputs stay cached for the next case of the same length).
  virtual void end_case() = 0;
  // Writes DIR/check_{q,k,v,o}.bin (bf16), DIR/check_mask.pxm and DIR/check.json: the block-
  // sparse output of this device on a random density mask of length n, for the peer check.
  virtual void export_check(const std::string& dir, int64_t n, double density) = 0;
};

std::unique_ptr<Runner> make_cpu_runner(const Sweep& sw);
// Throws Error("...built without CUDA / no CUDA device...") when no GPU can be used.
std::unique_ptr<Runner> make_gpu_runner(const Sweep& sw);
// Whether a CUDA device is usable (built with CUDA and one found).
bool gpu_available();

// The density facts of a case into its row (both runners): 1 for full attention, the mask's
// block and element density when the case has a mask, untouched otherwise.
void describe_density(Row& row, Family family, const BlockMask* mask);

// Writes the check files common to both runners.
void write_check_files(const std::string& dir, const HostInputs& in, const std::vector<uint16_t>& o_bf16,
                       const BlockMask& mask, const nlohmann::json& info);

}  // namespace proxyattn::bench
