// The device pipeline (device_pipeline.hpp): the stages of one layer as launches of kernels.h.
#include "proxyattn/device_pipeline.hpp"

#include <algorithm>
#include <cmath>

#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/kernels.h"
#include "proxyattn/methods.hpp"

namespace proxyattn {

namespace kn = proxyattn::kernels;

namespace {

void ck(kn::Status s, const std::string& what) { throw_on_failure(s, what); }

enum class Kind { full, grouped, device };

Kind kind_of(const PipelineSpec& s) {
  if (!s.method) return Kind::full;
  if (s.method->grouped()) return Kind::grouped;
  return Kind::device;
}

int64_t blocks_of(int64_t n, int block) { return (n + block - 1) / block; }

// Block density of budgets k under the selection rule, in closed form per head:
// sum_i max(forced_i, min(k, i + 1)) with forced_0 = 1, forced_i = 2.
double scaled_density(const std::vector<int32_t>& k, double c, int nb) {
  const double causal = 0.5 * double(nb) * (nb + 1.0);
  double kept = 0;
  for (int32_t kh : k) {
    const int64_t kk = std::max<int64_t>(1, std::llround(c * kh));
    if (kk == 1) {
      kept += 1.0 + 2.0 * (nb - 1);
    } else if (kk >= nb) {
      kept += causal;
    } else {
      kept += 0.5 * double(kk) * (kk + 1.0) + double(nb - kk) * kk;
    }
  }
  return kept / (double(k.size()) * causal);
}

class EventPair {
 public:
  void start(void* s) { ck(t_.start(s), "EventTimer::start"); }
  void stop(void* s) {
    ck(t_.stop(s), "EventTimer::stop");
    used_ = true;
  }
  double ms() {
    if (!used_) return 0;
    float v = 0;
    ck(t_.elapsed_ms(&v), "EventTimer::elapsed_ms");
    return v;
  }
  void clear() { used_ = false; }

 private:
  kn::EventTimer t_;
  bool used_ = false;
};

}  // namespace

std::vector<int32_t> scale_budgets_to_density(const std::vector<int32_t>& k, double target, int nb, double* achieved) {
  double lo = 0, hi = 1;
  while (scaled_density(k, hi, nb) < target && hi < 1e9) hi *= 2;
  for (int it = 0; it < 80; ++it) {
    const double mid = 0.5 * (lo + hi);
    (scaled_density(k, mid, nb) < target ? lo : hi) = mid;
  }
  // The closer of the two brackets (density is a step function of c).
  const double dlo = scaled_density(k, lo, nb), dhi = scaled_density(k, hi, nb);
  const double c = std::fabs(dlo - target) <= std::fabs(dhi - target) ? lo : hi;
  if (achieved) *achieved = c == lo ? dlo : dhi;
  std::vector<int32_t> out(k.size());
  for (size_t h = 0; h < k.size(); ++h) out[h] = static_cast<int32_t>(std::max<int64_t>(1, std::llround(c * k[h])));
  return out;
}

struct DevicePipeline::Impl {
  PipelineSpec spec;
  AttentionShape max;
  Kind kind = Kind::full;
  nlohmann::json info = nlohmann::json::object();
  // Buffers sized for max.seq_len.
  kn::DeviceBuffer qg, kg, lse_g, scores, mass, kout, kscaled, bitmap, counts, indptr, indices, ws;
  bool scaled = false;     // kscaled holds budgets scaled from an earlier select (scale_once)
  bool selected = false;   // indptr/indices hold a selection for `nb`
  int heads = 0;
  int64_t nb = 0, n = 0;
  EventPair s_scores, s_budget, s_select, s_attn;

  EstimatorConfig config() const {
    EstimatorConfig c = spec.config;
    c.block = spec.block;
    return c;
  }

  void alloc(kn::DeviceBuffer& b, double bytes, const char* what) {
    ck(b.allocate(static_cast<size_t>(std::max(bytes, 4.0))), std::string("DevicePipeline: alloc ") + what);
  }

  // The one-pass scores' workspace, kept across calls: a stream-ordered allocation per call
  // would be timed as well.
  void use_workspace(kn::FusedScoreParams& f) {
    const size_t need = kn::fused_block_scores_workspace(f);
    if (need > ws.bytes()) ck(ws.allocate(need), "DevicePipeline: alloc fused_block_scores workspace");
    f.workspace = ws.data();
    f.workspace_bytes = ws.bytes();
  }

  void select_grouped(const DeviceOperands& x) {
    const int hq = x.q_heads, hkv = x.kv_heads, g = spec.groups, d = x.head_dim;
    const int r = hq / hkv, per = hq / g;
    const auto et = static_cast<kn::ElemType>(x.elem);
    s_scores.start(x.stream);
    kn::PoolHeadsParams pq;
    pq.src = x.q;
    pq.dst = qg.data();
    pq.type = et;
    pq.heads = hq;
    pq.head_dim = d;
    pq.groups = g;
    pq.seq_len = x.seq_len;
    pq.stride_head = x.q_head_stride;
    pq.stream = x.stream;
    kn::PoolHeadsParams pk = pq;
    pk.src = x.k;
    pk.dst = kg.data();
    pk.heads = hkv;
    pk.stride_head = x.kv_head_stride;
    for (int gi = 0; gi < g; ++gi) {
      pq.head_begin[gi] = gi * per;
      pq.head_end[gi] = (gi + 1) * per;
      // The distinct KV heads the group's query heads read.
      pk.head_begin[gi] = (gi * per) / r;
      pk.head_end[gi] = ((gi + 1) * per - 1) / r + 1;
    }
    ck(kn::pool_heads(pq), "pool_heads (q)");
    ck(kn::pool_heads(pk), "pool_heads (k)");
    // The proxy heads' LSE and max-pool: one pass over Q K^T where the Hopper kernels apply.
    bool one_pass = false;
    kn::FusedScoreParams fs;
    kn::BlockScoreParams& bs = fs.scores;
    bs.q = qg.data();
    bs.k = kg.data();
    bs.out = scores.as<float>();
    bs.in_type = et;
    bs.q_heads = bs.kv_heads = g;
    bs.head_dim = d;
    bs.seq_len = x.seq_len;
    bs.block = spec.block;
    bs.query_stride = spec.query_stride;
    bs.reduce = kn::BlockReduce::max;
    bs.stream = x.stream;
    fs.lse_out = lse_g.as<float>();
    fs.one_pass = &one_pass;
    use_workspace(fs);
    ck(kn::fused_block_scores(fs), "fused_block_scores (proxy max-pool)");
    s_scores.stop(x.stream);
    info["proxy"]["passes"] = one_pass ? 1 : 2;

    s_budget.start(x.stream);
    // The last query block's mass per key block (one pass on Hopper, keys split over CTAs).
    kn::FusedScoreParams fm;
    kn::BlockScoreParams& ms = fm.scores;
    ms.q = x.q;
    ms.k = x.k;
    ms.q_stride_head = x.q_head_stride;
    ms.k_stride_head = x.kv_head_stride;
    ms.out = mass.as<float>();
    ms.in_type = et;
    ms.q_heads = hq;
    ms.kv_heads = hkv;
    ms.head_dim = d;
    ms.seq_len = x.seq_len;
    ms.block = spec.block;
    ms.row_block_begin = static_cast<int>(nb - 1);
    ms.reduce = kn::BlockReduce::mean_sum;
    ms.stream = x.stream;
    fm.one_pass = &one_pass;
    use_workspace(fm);
    ck(kn::fused_block_scores(fm), "fused_block_scores (last-block mass)");
    kn::BudgetParams bp;
    bp.mass = mass.as<float>();
    bp.heads = hq;
    bp.num_blocks = static_cast<int>(nb);
    bp.gamma = spec.gamma;
    bp.k_min = spec.k_min;
    bp.k_out = kout.as<int32_t>();
    bp.stream = x.stream;
    ck(kn::dynamic_budget(bp), "dynamic_budget");
    info["budget"]["passes"] = one_pass ? 1 : 2;
    const int32_t* head_k = kout.as<int32_t>();
    if (spec.density) {
      if (!(spec.scale_once && scaled)) {
        // The one host round trip of the method: the budgets scaled to the density.
        std::vector<int32_t> k(hq);
        ck(kout.download(k.data(), 4 * k.size(), x.stream), "download budgets");
        ck(kn::synchronize(x.stream), "synchronize (budget scaling)");
        double achieved = 0;
        const std::vector<int32_t> ks = scale_budgets_to_density(k, *spec.density, static_cast<int>(nb), &achieved);
        ck(kscaled.upload(ks.data(), 4 * ks.size(), x.stream), "upload scaled budgets");
        double mk = 0, mks = 0;
        for (int h = 0; h < hq; ++h) {
          mk += k[h];
          mks += ks[h];
        }
        info["budget"]["mean_k"] = mk / hq;
        info["budget"]["scaled_mean_k"] = mks / hq;
        info["budget"]["scaled_to_density"] = *spec.density;
        scaled = true;
      }
      head_k = kscaled.as<int32_t>();
    }
    s_budget.stop(x.stream);

    s_select.start(x.stream);
    kn::SelectParams sp;
    sp.scores = scores.as<float>();
    sp.score_heads = g;
    sp.heads = hq;
    sp.num_blocks = static_cast<int>(nb);
    sp.head_k = head_k;
    sp.mode = 0;
    sp.indptr = indptr.as<int32_t>();
    sp.indices = indices.as<int32_t>();
    sp.stream = x.stream;
    ck(kn::select_counts(sp), "select_counts");
    ck(kn::select_fill(sp), "select_fill");
    s_select.stop(x.stream);
  }

  void select_device(const DeviceOperands& x) {
    const MethodInfo& m = *spec.method;
    const EstimatorConfig ec = config();
    if (x.q_head_stride || x.kv_head_stride)
      throw Error("DevicePipeline: " + m.name + "'s device estimate needs contiguous heads");
    DeviceEstimate d;
    d.q = x.q;
    d.k = x.k;
    d.elem = x.elem;
    d.q_heads = x.q_heads;
    d.kv_heads = x.kv_heads;
    d.head_dim = x.head_dim;
    d.seq_len = x.seq_len;
    d.config = &ec;
    d.scores = scores.as<float>();
    d.bitmap = bitmap.as<uint8_t>();
    d.row_counts = counts.as<int32_t>();
    d.stream = x.stream;
    s_scores.start(x.stream);
    m.estimate_device(d);
    s_scores.stop(x.stream);
    s_select.start(x.stream);
    if (!m.device_native_bitmap) {
      const DeviceNative rule = m.device_native(ec);
      kn::NativeSelectParams ns;
      ns.scores = scores.as<float>();
      ns.heads = x.q_heads;
      ns.num_blocks = static_cast<int>(nb);
      ns.bitmap = bitmap.as<uint8_t>();
      ns.row_counts = counts.as<int32_t>();
      ns.rule = rule.rule == DeviceNativeRule::cumulative ? kn::NativeRule::cumulative : kn::NativeRule::xattn;
      ns.threshold = rule.threshold;
      ns.stream = x.stream;
      ck(kn::native_select(ns), "native_select");
    }
    kn::CsrParams cp;
    cp.bitmap = bitmap.as<uint8_t>();
    cp.row_counts = counts.as<int32_t>();
    cp.heads = x.q_heads;
    cp.num_blocks = static_cast<int>(nb);
    cp.indptr = indptr.as<int32_t>();
    cp.indices = indices.as<int32_t>();
    cp.stream = x.stream;
    ck(kn::csr_indptr(cp), "csr_indptr");
    ck(kn::csr_fill(cp), "csr_fill");
    s_select.stop(x.stream);
  }

  kn::AttentionParams attention_params(const DeviceOperands& x) const {
    kn::AttentionParams a;
    a.q = x.q;
    a.k = x.k;
    a.v = x.v;
    a.o = x.o;
    a.lse = x.lse;
    a.in_type = a.out_type = static_cast<kn::ElemType>(x.elem);
    a.q_heads = x.q_heads;
    a.kv_heads = x.kv_heads;
    a.head_dim = x.head_dim;
    a.seq_len = x.seq_len;
    // Token strides stay contiguous (d); only the head strides vary.
    if (x.q_head_stride) {
      a.q_stride_head = x.q_head_stride;
      a.q_stride_token = x.head_dim;
    }
    if (x.kv_head_stride) {
      a.k_stride_head = a.v_stride_head = x.kv_head_stride;
      a.k_stride_token = a.v_stride_token = x.head_dim;
    }
    if (x.o_head_stride) {
      a.o_stride_head = x.o_head_stride;
      a.o_stride_token = x.head_dim;
    }
    a.stream = x.stream;
    return a;
  }

  void check_operands(const DeviceOperands& x, bool need_o) const {
    if (!x.q || !x.k || (need_o && (!x.v || !x.o)))
      throw Error("DevicePipeline: null operand");
    if (x.q_heads != max.q_heads || x.kv_heads != max.kv_heads || x.head_dim != max.head_dim)
      throw Error("DevicePipeline: operands of " + std::to_string(x.q_heads) + "/" + std::to_string(x.kv_heads) +
                  " heads x d " + std::to_string(x.head_dim) + ", the pipeline was built for " +
                  std::to_string(max.q_heads) + "/" + std::to_string(max.kv_heads) + " x " + std::to_string(max.head_dim));
    if (x.seq_len < 1 || x.seq_len > max.seq_len)
      throw Error("DevicePipeline: N = " + std::to_string(x.seq_len) + " outside [1, " + std::to_string(max.seq_len) + "]");
  }
};

std::string DevicePipeline::unsupported_reason(const PipelineSpec& spec) {
  switch (kind_of(spec)) {
    case Kind::full: return "";
    case Kind::grouped:
      if (spec.groups > kn::kMaxPoolGroups)
        return "proxy groups " + std::to_string(spec.groups) + " exceed the pool_heads limit " +
               std::to_string(kn::kMaxPoolGroups);
      if (spec.groups < 1) return "proxy groups must be >= 1";
      return "";
    case Kind::device:
      if (!spec.method->estimate_device)
        return "no GPU kernel for estimator '" + spec.method->name + "' (the CPU reference has it: --device cpu)";
      if (!spec.method->device_native_bitmap && !spec.method->device_native)
        return "estimator '" + spec.method->name + "' has no device selection rule";
      if (spec.density) return "a fixed density is not implemented on the device for '" + spec.method->name + "'";
      return "";
  }
  return "";
}

double DevicePipeline::bytes(const PipelineSpec& spec, const AttentionShape& s) {
  const double hq = s.q_heads, d = s.head_dim, n = double(s.seq_len);
  const double nb = double(blocks_of(s.seq_len, spec.block));
  const double csr = (hq * nb + 1) * 4 + hq * nb * (nb + 1) / 2 * 4;
  switch (kind_of(spec)) {
    case Kind::full: return 0;
    case Kind::grouped: {
      const double g = spec.groups, bb = spec.block;
      double b = 2 * g * n * d * 2 + g * n * 4 + g * nb * nb * 4 + hq * nb * 4 + hq * 8 + csr;
      // fused_block_scores' workspace (per-tile statistics), at most its default limit.
      b += std::min(double(kn::FusedScoreParams{}.workspace_limit), std::max(g * nb * nb * bb, hq * nb * bb) * 8);
      return b;
    }
    case Kind::device: {
      // scores, bitmap, row counts, CSR, and the launchers' own scratch (the registry's).
      double b = hq * nb * nb * 5 + hq * nb * 4 + csr;
      EstimatorConfig c = spec.config;
      c.block = spec.block;
      if (spec.method->device_scratch_bytes) b += spec.method->device_scratch_bytes(s, c);
      return b;
    }
  }
  return 0;
}

DevicePipeline::DevicePipeline(const PipelineSpec& spec, const AttentionShape& max) : impl_(std::make_unique<Impl>()) {
  Impl& p = *impl_;
  p.spec = spec;
  p.max = max;
  p.kind = kind_of(spec);
  if (const std::string why = unsupported_reason(spec); !why.empty()) throw Error("DevicePipeline: " + why);
  if (max.q_heads < 1 || max.kv_heads < 1 || max.q_heads % max.kv_heads || max.seq_len < 1)
    throw Error("DevicePipeline: bad shape");
  if (p.kind == Kind::full) return;
  const EstimatorConfig ec = p.config();
  validate_estimator_config(ec, max.q_heads, spec.method->name);
  if (p.kind == Kind::grouped && max.q_heads % spec.groups)
    throw Error("DevicePipeline: proxy groups " + std::to_string(spec.groups) + " do not divide the " +
                std::to_string(max.q_heads) + " query heads");
  const double hq = max.q_heads, d = max.head_dim, n = double(max.seq_len);
  const double nb = double(blocks_of(max.seq_len, spec.block));
  if (hq * nb * (nb + 1) / 2 > 2147483647.0) throw Error("DevicePipeline: the block mask would overflow int32 CSR indices");
  p.alloc(p.indptr, (hq * nb + 1) * 4, "mask indptr");
  p.alloc(p.indices, hq * nb * (nb + 1) / 2 * 4, "mask indices");
  if (p.kind == Kind::grouped) {
    const double g = spec.groups;
    p.alloc(p.qg, g * n * d * 2, "proxy q");
    p.alloc(p.kg, g * n * d * 2, "proxy k");
    p.alloc(p.lse_g, g * n * 4, "proxy lse");
    p.alloc(p.scores, g * nb * nb * 4, "proxy scores");
    p.alloc(p.mass, hq * nb * 4, "last-block mass");
    p.alloc(p.kout, hq * 4, "budgets");
    p.alloc(p.kscaled, hq * 4, "scaled budgets");
    p.info["proxy"] = {{"groups", spec.groups}, {"query_stride", spec.query_stride}, {"pool", "mean"}};
    p.info["budget"] = {{"kind", "dynamic"}, {"gamma", spec.gamma}, {"k_min", spec.k_min}, {"mode", "constant"}};
  } else {
    p.alloc(p.scores, hq * nb * nb * 4, "peer scores");
    p.alloc(p.bitmap, hq * nb * nb, "peer bitmap");
    p.alloc(p.counts, hq * nb * 4, "peer row counts");
    nlohmann::json cfg = spec.method->config_json(ec);
    if (spec.method->device_native) cfg["coverage"] = spec.method->device_native(ec).threshold;
    p.info[spec.method->name] = cfg;
    p.info["budget"] = "native";
    p.info["timed"] = spec.method->device_timed;
  }
}

DevicePipeline::~DevicePipeline() = default;
DevicePipeline::DevicePipeline(DevicePipeline&&) noexcept = default;
DevicePipeline& DevicePipeline::operator=(DevicePipeline&&) noexcept = default;

bool DevicePipeline::sparse() const { return impl_->kind != Kind::full; }

void DevicePipeline::select(const DeviceOperands& x) {
  Impl& p = *impl_;
  p.s_scores.clear();
  p.s_budget.clear();
  p.s_select.clear();
  if (p.kind == Kind::full) return;
  p.check_operands(x, false);
  p.n = x.seq_len;
  p.nb = blocks_of(x.seq_len, p.spec.block);
  p.heads = x.q_heads;
  if (p.kind == Kind::grouped) p.select_grouped(x);
  else p.select_device(x);
  p.selected = true;
}

void DevicePipeline::attend(const DeviceOperands& x) {
  Impl& p = *impl_;
  p.check_operands(x, true);
  p.s_attn.clear();
  p.s_attn.start(x.stream);
  if (p.kind == Kind::full) {
    ck(kn::full_attention(p.attention_params(x)), "full_attention");
  } else {
    if (!p.selected || p.n != x.seq_len) throw Error("DevicePipeline::attend: no selection for this layer (select first)");
    kn::SparseAttentionParams sp;
    sp.attn = p.attention_params(x);
    sp.indptr = p.indptr.as<int32_t>();
    sp.indices = p.indices.as<int32_t>();
    sp.block = p.spec.block;
    ck(kn::sparse_attention(sp), "sparse_attention");
  }
  p.s_attn.stop(x.stream);
}

PipelineTimes DevicePipeline::times() {
  Impl& p = *impl_;
  PipelineTimes t;
  t.scores_ms = p.s_scores.ms();
  t.budget_ms = p.s_budget.ms();
  t.select_ms = p.s_select.ms();
  t.attention_ms = p.s_attn.ms();
  return t;
}

BlockMask DevicePipeline::mask() const {
  const Impl& p = *impl_;
  if (!p.selected) throw Error("DevicePipeline::mask: no selection");
  std::vector<int32_t> indptr(size_t(p.heads) * p.nb + 1);
  ck(p.indptr.download(indptr.data(), 4 * indptr.size()), "download mask indptr");
  ck(kn::synchronize(), "synchronize");
  std::vector<int32_t> indices(static_cast<size_t>(std::max(0, indptr.back())));
  if (!indices.empty()) ck(p.indices.download(indices.data(), 4 * indices.size()), "download mask indices");
  ck(kn::synchronize(), "synchronize");
  return BlockMask(p.heads, p.n, p.spec.block, std::move(indptr), std::move(indices));
}

double DevicePipeline::block_density() const {
  const Impl& p = *impl_;
  if (p.kind == Kind::full) return 1.0;
  if (!p.selected) throw Error("DevicePipeline::block_density: no selection");
  int32_t total = 0;
  ck(kn::copy_to_host(&total, p.indptr.as<int32_t>() + size_t(p.heads) * p.nb, 4), "download mask size");
  ck(kn::synchronize(), "synchronize");
  return double(total) / (double(p.heads) * 0.5 * double(p.nb) * (p.nb + 1.0));
}

void DevicePipeline::copy_selected_count(int32_t* dst, void* stream) const {
  const Impl& p = *impl_;
  if (p.kind == Kind::full || !p.selected) throw Error("DevicePipeline::copy_selected_count: no selection");
  ck(kn::copy_device(dst, p.indptr.as<int32_t>() + size_t(p.heads) * p.nb, 4, stream), "copy mask size");
}

double DevicePipeline::causal_blocks(int64_t n) const {
  const double nb = double(blocks_of(n, impl_->spec.block));
  return double(impl_->max.q_heads) * 0.5 * nb * (nb + 1.0);
}

const nlohmann::json& DevicePipeline::info() const { return impl_->info; }

}  // namespace proxyattn
