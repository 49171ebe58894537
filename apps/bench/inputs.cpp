// Host inputs of the bench (synth or seeded random) and the check files for the peer script.
#include <cmath>
#include <filesystem>
#include <numbers>

#include <fmt/format.h>

#include "proxyattn/error.hpp"
#include "proxyattn/io.hpp"
#include "proxyattn/synth.hpp"
#include "runner.hpp"

namespace proxyattn::bench {

namespace fs = std::filesystem;

namespace {

uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Counter-based normal values (Box-Muller on two hashed uniforms): deterministic for any thread
// count. Random data is fine for timing dense kernels; masks of proxyattn want synth structure.
void fill_normal(Tensor3& t, uint64_t seed, float scale) {
  float* p = t.data();
  const int64_t n = t.size();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t a = mix(seed ^ mix(static_cast<uint64_t>(i) * 2 + 1));
    const uint64_t b = mix(a + 0x9E3779B97F4A7C15ull);
    const double u1 = (static_cast<double>(a >> 11) + 0.5) * 0x1p-53;
    const double u2 = static_cast<double>(b >> 11) * 0x1p-53;
    p[i] = scale * static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
  }
}

void round_through(Tensor3& t, DType dtype) {
  float* p = t.data();
  const int64_t n = t.size();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) p[i] = round_to(dtype, p[i]);
}

}  // namespace

HostInputs make_inputs(const Sweep& sw, int64_t n, DType dtype) {
  HostInputs in;
  in.n = n;
  in.dtype = dtype;
  in.kind = sw.inputs;
  const ModelConfig& m = sw.model;
  if (sw.inputs == "synth") {
    SynthOptions o;
    o.seq_len = n;
    o.num_layers = 1;
    o.seed = sw.seed;
    o.with_v = true;
    SynthGenerator gen(m, o);
    LayerData layer = gen.layer(0);
    in.q = std::move(layer.q);
    in.k = std::move(layer.k);
    if (!layer.v) throw Error("synth: layer 0 has no V");
    in.v = std::move(*layer.v);
  } else {
    // fill_normal writes every element (in parallel): no zero-fill first.
    in.q = Tensor3::uninitialized(m.num_q_heads, n, m.head_dim);
    in.k = Tensor3::uninitialized(m.num_kv_heads, n, m.head_dim);
    in.v = Tensor3::uninitialized(m.num_kv_heads, n, m.head_dim);
    fill_normal(in.q, sw.seed * 3 + 0, 1.0f);
    fill_normal(in.k, sw.seed * 3 + 1, 1.0f);
    fill_normal(in.v, sw.seed * 3 + 2, 1.0f);
  }
  round_through(in.q, dtype);
  round_through(in.k, dtype);
  round_through(in.v, dtype);
  return in;
}

std::vector<uint16_t> to_half_bits(const Tensor3& t, DType dtype) {
  std::vector<uint16_t> out(static_cast<size_t>(t.size()));
  const float* p = t.data();
  const int64_t n = t.size();
  if (dtype == DType::bf16) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(p[i]);
  } else if (dtype == DType::f16) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_half(p[i]);
  } else {
    throw Error("to_half_bits: dtype must be bf16 or f16");
  }
  return out;
}

void write_check_files(const std::string& dir, const HostInputs& in, const std::vector<uint16_t>& o_bf16,
                       const BlockMask& mask, const nlohmann::json& info) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir, ec)) throw Error(dir + ": cannot create the check directory");
  auto write_bits = [&](const std::string& name, const std::vector<uint16_t>& bits) {
    AtomicFile f((fs::path(dir) / name).string(), /*binary=*/true);
    f.stream().write(reinterpret_cast<const char*>(bits.data()), static_cast<std::streamsize>(2 * bits.size()));
    f.commit();
  };
  write_bits("check_q.bin", to_half_bits(in.q, DType::bf16));
  write_bits("check_k.bin", to_half_bits(in.k, DType::bf16));
  write_bits("check_v.bin", to_half_bits(in.v, DType::bf16));
  write_bits("check_o.bin", o_bf16);
  write_mask_file((fs::path(dir) / "check_mask.pxm").string(), mask);
  nlohmann::json j = info;
  j["schema_version"] = 1;
  j["dtype"] = "bfloat16";
  j["layout"] = "q [Hq, N, d], k/v [Hkv, N, d], o [Hq, N, d], row-major, little-endian bf16";
  j["n"] = in.n;
  j["q_heads"] = in.q.heads();
  j["kv_heads"] = in.k.heads();
  j["head_dim"] = in.q.dim();
  j["inputs"] = in.kind;
  j["files"] = {{"q", "check_q.bin"}, {"k", "check_k.bin"}, {"v", "check_v.bin"}, {"o", "check_o.bin"},
                {"mask", "check_mask.pxm"}};
  j["density"] = mask.density();
  j["element_density"] = mask.element_density();
  write_file_atomic((fs::path(dir) / "check.json").string(), j.dump(2) + "\n");
}

void describe_density(Row& row, Family family, const BlockMask* mask) {
  if (family == Family::full) {
    row.density = 1.0;
    row.element_density = 1.0;
  } else if (mask) {
    row.density = mask->density();
    row.element_density = mask->element_density();
  }
}

}  // namespace proxyattn::bench
