// GPU mode: our CUDA launchers (kernels.h, CUDA-free) timed with CUDA events on the default
// stream, the L2 flushed (kernels::flush_l2) before every repetition. Inputs are uploaded once
// per (N, dtype) and shared by the cases of that length; each case's own buffers are allocated
// in prepare (untimed) after the memory check, and freed in end_case.
//
// ProxyAttn on the device (the chain the dispatch layer uses; every stage is one launcher):
//   scores:  pool_heads(Q), pool_heads(K) -> proxy heads; fused_block_scores(max) on them (row
//            LSE and max-pool: one pass over Q K^T on Hopper, row_lse + block_scores elsewhere)
//   budget:  fused_block_scores(mean_sum) of the last query block of every head (p_h; one pass
//            on Hopper, keys split over CTAs); dynamic_budget(gamma) -> k_h
//   select:  select_counts + select_fill (sink, diagonal, best proxy scores) -> CSR mask
//   kernel:  sparse_attention on that mask
// proxyattn@density=D: an untimed calibration run reads k_h back and finds the one scale c
// for which the budgets max(1, round(c k_h)) give mean density D; the timed runs execute every
// stage above and select with the scaled budgets (the scaling itself costs nothing on the device).
//
// The peers on the device (estimate:pooled / xattn / vslash, default EstimatorConfig, as the CPU
// runner's native selection), everything that produces the method's own mask:
//   pooled:  scores = pooled_scores (block means, logits, float64 softmax);
//            select = native_select (per-row gamma 0.9, sink + diagonal) + csr_indptr + csr_fill
//   xattn:   scores = xattn_scores (strided LSE pass + block-sum pass, stride 8);
//            select = native_select (tau 0.9) + CSR
//   vslash:  scores = vslash_scores (last-64-row LSE and statistics, top-k radix selects, block
//            scores and the native bitmap); select = CSR of that bitmap
// flexprefill has no GPU kernel (skipped with the reason).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <optional>

#include <fmt/format.h>

#include "proxyattn/methods.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/estimator.hpp"
#include "proxyattn/kernels.h"
#include "proxyattn/version.hpp"
#include "runner.hpp"
#include "sweep.hpp"

namespace proxyattn::bench {

namespace kn = proxyattn::kernels;

namespace {

void ck(kn::Status s, const std::string& what) {
  if (s == kn::Status::ok) return;
  const std::string detail = kn::last_error_detail();
  throw Error(fmt::format("{}: {}{}", what, kn::status_string(s), detail.empty() ? "" : " (" + detail + ")"));
}

kn::ElemType elem(DType t) { return t == DType::f16 ? kn::ElemType::f16 : kn::ElemType::bf16; }

// One line from a command (nvidia-smi for driver and clocks), "" when it is not there.
std::string command_line_output(const char* cmd) {
  std::string out;
  if (FILE* p = popen(cmd, "r")) {
    std::array<char, 512> buf{};
    while (fgets(buf.data(), static_cast<int>(buf.size()), p)) out += buf.data();
    pclose(p);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

// nvidia-smi's view of the GPU this process runs on (under MPI: its rank's GPU).
std::string smi_snapshot(int device) {
  return command_line_output(fmt::format(
      "nvidia-smi --id={} --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
      "power.draw,power.limit,temperature.gpu,pstate --format=csv,noheader 2>/dev/null | head -n 1",
      device).c_str());
}

double gib(double bytes) { return bytes / double(1 << 30); }

// Mean block density of per-head budgets k'_h = max(1, round(c k_h)) under the selection rule
// (row i keeps max(forced_i, min(k', i + 1)); forced = sink + diagonal).
double scaled_density(const std::vector<int32_t>& k, double c, int nb) {
  double kept = 0;
  for (int32_t kh : k) {
    const int64_t kk = std::max<int64_t>(1, std::llround(c * kh));
    for (int i = 0; i < nb; ++i) {
      const int64_t forced = i == 0 ? 1 : 2;
      kept += static_cast<double>(std::max(forced, std::min<int64_t>(kk, i + 1)));
    }
  }
  return kept / (static_cast<double>(k.size()) * nb * (nb + 1) / 2.0);
}

std::vector<int32_t> scale_budgets(const std::vector<int32_t>& k, double target, int nb, double* achieved) {
  double lo = 0, hi = 1;
  while (scaled_density(k, hi, nb) < target && hi < 1e9) hi *= 2;
  for (int it = 0; it < 80; ++it) {
    const double mid = 0.5 * (lo + hi);
    (scaled_density(k, mid, nb) < target ? lo : hi) = mid;
  }
  // The closer of the two brackets (density is a step function of c).
  const double dlo = scaled_density(k, lo, nb), dhi = scaled_density(k, hi, nb);
  const double c = std::fabs(dlo - target) <= std::fabs(dhi - target) ? lo : hi;
  *achieved = c == lo ? dlo : dhi;
  std::vector<int32_t> out(k.size());
  for (size_t h = 0; h < k.size(); ++h) out[h] = static_cast<int32_t>(std::max<int64_t>(1, std::llround(c * k[h])));
  return out;
}

class EventPair {
 public:
  void start() { ck(t_.start(), "EventTimer::start"); }
  void stop() { ck(t_.stop(), "EventTimer::stop"); }
  double ms() {
    float v = 0;
    ck(t_.elapsed_ms(&v), "EventTimer::elapsed_ms");
    return v;
  }

 private:
  kn::EventTimer t_;
};

class GpuRunner : public Runner {
 public:
  explicit GpuRunner(const Sweep& sw) : sw_(sw) {
    if (kn::device_count() < 1) {
      const std::string d = kn::last_error_detail();
      throw Error(fmt::format("no CUDA device: {}{}",
                              built_with_cuda() ? "none found" : "this build has no CUDA kernels",
                              d.empty() ? "" : " (" + d + ")"));
    }
    ck(kn::current_device(&dev_), "current_device");
    ck(kn::device_info(dev_, &info_), "device_info");
    smi_start_ = smi_snapshot(dev_);
  }

  std::string device() const override { return "cuda"; }
  std::string timing_method() const override {
    return "CUDA events on the default stream, L2 flushed before each repetition, median of repetitions";
  }
  nlohmann::json context() const override {
    return {{"device_name", info_.name},
            {"sm_count", info_.sm_count},
            {"compute_capability", fmt::format("{}.{}", info_.cc_major, info_.cc_minor)},
            {"global_mem_gib", gib(double(info_.global_mem))},
            {"l2_mib", double(info_.l2_bytes) / double(1 << 20)},
            {"nvidia_smi_fields", "name, driver_version, clocks.sm, clocks.max.sm, clocks.mem, clocks.max.mem, "
                                  "power.draw, power.limit, temperature.gpu, pstate"},
            {"nvidia_smi_start", smi_start_},
            {"nvidia_smi_end", smi_snapshot(dev_)},
            {"attention_kernels", info_.cc_major == 9 ? "hopper (wgmma + TMA, attention_sm90.cuh) for head_dim 64/128, "
                                                        "sparse block 128; portable mma.sync otherwise"
                                                      : "portable mma.sync (attention_core.cuh)"}};
  }

  std::string skip_reason(const Method& m, int64_t n, DType dtype) const override {
    const int hq = sw_.model.num_q_heads;
    if (m.family == Family::estimate && kind_of(m.estimator) == EstKind::none)
      return fmt::format("no GPU kernel for estimator '{}' (the CPU reference has it: --device cpu)", m.estimator);
    const bool proxy = m.family == Family::proxyattn || (m.family == Family::estimate && kind_of(m.estimator) == EstKind::proxy);
    if (proxy && m.groups > kn::kMaxPoolGroups)
      return fmt::format("proxy groups {} exceed the pool_heads limit {}", m.groups, kn::kMaxPoolGroups);
    const double need = double(case_bytes(m, n, dtype));
    const double limit = sw_.gpu_mem_fraction * double(info_.global_mem);
    if (need > limit)
      return fmt::format("would not fit GPU memory: needs {:.1f} GiB, limit {:.1f} GiB ({:.0f} % of {:.1f} GiB on {})",
                         gib(need), gib(limit), 100 * sw_.gpu_mem_fraction, gib(double(info_.global_mem)), info_.name);
    const int64_t nb = (n + sw_.block - 1) / sw_.block;
    if (int64_t{hq} * nb * (nb + 1) / 2 > int64_t{2147483647})
      return "the block mask would overflow int32 CSR indices";
    return "";
  }

  void prepare(const Method& m, int64_t n, DType dtype) override {
    m_ = m;
    if (n != n_ || dtype != dt_) load_inputs(n, dtype);
    nb_ = static_cast<int>((n + sw_.block - 1) / sw_.block);
    mask_.reset();
    stage_info_ = nlohmann::json::object();
    const int hq = sw_.model.num_q_heads;
    switch (m.family) {
      case Family::full:
        break;
      case Family::sparse: {
        mask_ = m.mask_file.empty() ? random_density_mask(hq, n, sw_.block, m.density, sw_.seed)
                                    : read_mask_file(m.mask_file);
        if (mask_->heads() != hq || mask_->seq_len() != n || mask_->block() != sw_.block)
          throw Error(fmt::format("{}: mask is {} heads x N={} x block {}, the case is {} x {} x {}", m.mask_file,
                                  mask_->heads(), mask_->seq_len(), mask_->block(), hq, n, sw_.block));
        ck(indptr_.allocate(4 * mask_->indptr().size()), "alloc indptr");
        ck(indices_.allocate(4 * std::max<size_t>(1, mask_->indices().size())), "alloc indices");
        ck(indptr_.upload(mask_->indptr().data(), 4 * mask_->indptr().size()), "upload indptr");
        if (!mask_->indices().empty())
          ck(indices_.upload(mask_->indices().data(), 4 * mask_->indices().size()), "upload indices");
        break;
      }
      case Family::estimate:
        if (kind_of(m.estimator) == EstKind::oracle) {
          ck(scores_.allocate(size_t(4) * hq * nb_ * nb_), "alloc oracle scores");
          break;
        }
        if (kind_of(m.estimator) == EstKind::device) {
          prepare_peer();
          break;
        }
        [[fallthrough]];
      case Family::proxyattn:
        prepare_proxy();
        break;
    }
  }

  Timing run_once() override {
    Timing t;
    ck(kn::flush_l2(), "flush_l2");
    switch (m_.family) {
      case Family::full:
        total_.start();
        ck(kn::full_attention(attn()), "full_attention");
        total_.stop();
        t.total_ms = t.kernel_ms = total_.ms();
        break;
      case Family::sparse:
        total_.start();
        ck(kn::sparse_attention(sparse_params()), "sparse_attention");
        total_.stop();
        t.total_ms = t.kernel_ms = total_.ms();
        break;
      case Family::estimate:
        total_.start();
        if (kind_of(m_.estimator) == EstKind::oracle) {
          run_oracle();
        } else if (kind_of(m_.estimator) == EstKind::device) {
          run_peer();
        } else {
          run_proxy_estimation(kscaled_ok_ ? kscaled_.as<int32_t>() : kout_.as<int32_t>());
        }
        total_.stop();
        t.total_ms = t.estimation_ms = total_.ms();
        if (kind_of(m_.estimator) == EstKind::device) {
          t.stages["scores_ms"] = s_scores_.ms();
          t.stages["select_ms"] = s_select_.ms();
        } else if (kind_of(m_.estimator) != EstKind::oracle) {
          proxy_stage_times(t);
        }
        break;
      case Family::proxyattn:
        total_.start();
        run_proxy_estimation(kscaled_ok_ ? kscaled_.as<int32_t>() : kout_.as<int32_t>());
        kern_.start();
        ck(kn::sparse_attention(sparse_params()), "sparse_attention (proxyattn mask)");
        kern_.stop();
        total_.stop();
        t.total_ms = total_.ms();
        t.kernel_ms = kern_.ms();
        proxy_stage_times(t);
        t.estimation_ms = t.stages["scores_ms"] + t.stages["budget_ms"] + t.stages["select_ms"];
        break;
    }
    ck(kn::synchronize(), "synchronize");
    return t;
  }

  void describe(Row& row) override {
    describe_density(row, m_.family, mask_ ? &*mask_ : nullptr);
    row.extra["inputs"] = inputs_kind_;
    for (auto it = stage_info_.begin(); it != stage_info_.end(); ++it) row.extra[it.key()] = it.value();
  }

  const BlockMask* mask() const override { return mask_ ? &*mask_ : nullptr; }

  void end_case() override {
    for (kn::DeviceBuffer* b :
         {&indptr_, &indices_, &qg_, &kg_, &lse_g_, &scores_, &mass_, &kout_, &kscaled_, &bitmap_, &counts_, &ws_})
      b->reset();
    kscaled_ok_ = false;
    mask_.reset();
  }

  void export_check(const std::string& dir, int64_t n, double density) override {
    const HostInputs in = make_inputs(sw_, n, DType::bf16);
    const BlockMask mask = random_density_mask(sw_.model.num_q_heads, n, sw_.block, density, sw_.seed);
    kn::DeviceBuffer q, k, v, o, ip, ix;
    auto up = [&](kn::DeviceBuffer& b, const Tensor3& t, const char* what) {
      const auto bits = to_half_bits(t, DType::bf16);
      ck(b.allocate(2 * bits.size()), std::string("alloc ") + what);
      ck(b.upload(bits.data(), 2 * bits.size()), std::string("upload ") + what);
    };
    up(q, in.q, "check q");
    up(k, in.k, "check k");
    up(v, in.v, "check v");
    ck(o.allocate(size_t(2) * in.q.size()), "alloc check o");
    ck(ip.allocate(4 * mask.indptr().size()), "alloc check indptr");
    ck(ix.allocate(4 * mask.indices().size()), "alloc check indices");
    ck(ip.upload(mask.indptr().data(), 4 * mask.indptr().size()), "upload check indptr");
    ck(ix.upload(mask.indices().data(), 4 * mask.indices().size()), "upload check indices");
    kn::SparseAttentionParams p;
    p.attn = base_params(q.data(), k.data(), v.data(), o.data(), nullptr, n, DType::bf16);
    p.indptr = ip.as<int32_t>();
    p.indices = ix.as<int32_t>();
    p.block = sw_.block;
    ck(kn::sparse_attention(p), "sparse_attention (check)");
    std::vector<uint16_t> out(static_cast<size_t>(in.q.size()));
    ck(o.download(out.data(), 2 * out.size()), "download check o");
    ck(kn::synchronize(), "synchronize");
    write_check_files(dir, in, out, mask,
                      {{"producer", fmt::format("proxyattn-bench sparse_attention on {}", info_.name)},
                       {"method", fmt::format("sparse@{}", density)}});
  }

 private:
  // Bytes a case allocates on the device (inputs, output, lse, its own buffers, L2 scratch).
  size_t case_bytes(const Method& m, int64_t n, DType dtype) const {
    const double es = dtype_size(dtype);
    const double hq = sw_.model.num_q_heads, hkv = sw_.model.num_kv_heads, d = sw_.model.head_dim;
    const double nb = double((n + sw_.block - 1) / sw_.block);
    const double causal_blocks = nb * (nb + 1) / 2;
    double b = (2 * hq + 2 * hkv) * n * d * es + hq * n * 4 + 2.0 * double(info_.l2_bytes) + (256 << 20);
    const double csr_max = (hq * nb + 1) * 4 + hq * causal_blocks * 4;
    switch (m.family) {
      case Family::full:
        break;
      case Family::sparse:
        b += (hq * nb + 1) * 4 + hq * std::max(nb, std::round(m.density * causal_blocks)) * 4;
        break;
      case Family::estimate:
        if (kind_of(m.estimator) == EstKind::oracle) {
          b += hq * nb * nb * 4;
          break;
        }
        if (kind_of(m.estimator) == EstKind::device) {
          // scores, bitmap, row counts, CSR, and the launchers' own scratch (the registry's).
          b += hq * nb * nb * 5 + hq * nb * 4 + csr_max;
          const MethodInfo& info = find_method(m.estimator);
          if (info.device_scratch_bytes) b += info.device_scratch_bytes(shape_at(n), bench_config());
          break;
        }
        [[fallthrough]];
      case Family::proxyattn: {
        const double g = m.groups;
        b += 2 * g * n * d * es + g * n * 4 + g * nb * nb * 4 + hq * nb * 4 + hq * 8 + csr_max;
        // fused_block_scores' workspace (per-tile statistics), at most its default limit.
        const double bb = sw_.block;
        b += std::min(double(kn::FusedScoreParams{}.workspace_limit), std::max(g * nb * nb * bb, hq * nb * bb) * 8);
        break;
      }
    }
    return static_cast<size_t>(b);
  }

  void load_inputs(int64_t n, DType dtype) {
    q_.reset(); k_.reset(); v_.reset(); o_.reset(); lse_.reset();
    n_ = 0;
    HostInputs in = make_inputs(sw_, n, dtype);
    inputs_kind_ = in.kind;
    auto up = [&](kn::DeviceBuffer& b, Tensor3& t, const char* what) {
      const auto bits = to_half_bits(t, dtype);
      t = Tensor3();  // release host memory early
      ck(b.allocate(2 * bits.size()), fmt::format("alloc {} (N={})", what, n));
      ck(b.upload(bits.data(), 2 * bits.size()), fmt::format("upload {}", what));
    };
    up(q_, in.q, "q");
    up(k_, in.k, "k");
    up(v_, in.v, "v");
    const size_t rows = size_t(sw_.model.num_q_heads) * n;
    ck(o_.allocate(rows * sw_.model.head_dim * dtype_size(dtype)), "alloc o");
    ck(lse_.allocate(rows * 4), "alloc lse");
    ck(kn::synchronize(), "synchronize after upload");
    n_ = n;
    dt_ = dtype;
  }

  kn::AttentionParams base_params(const void* q, const void* k, const void* v, void* o, float* lse, int64_t n,
                                  DType dtype) const {
    kn::AttentionParams a;
    a.q = q;
    a.k = k;
    a.v = v;
    a.o = o;
    a.lse = lse;
    a.in_type = a.out_type = elem(dtype);
    a.q_heads = sw_.model.num_q_heads;
    a.kv_heads = sw_.model.num_kv_heads;
    a.head_dim = sw_.model.head_dim;
    a.seq_len = n;
    return a;
  }
  kn::AttentionParams attn() const { return base_params(q_.data(), k_.data(), v_.data(), o_.data(), lse_.as<float>(), n_, dt_); }
  kn::SparseAttentionParams sparse_params() const {
    kn::SparseAttentionParams p;
    p.attn = attn();
    p.indptr = indptr_.as<int32_t>();
    p.indices = indices_.as<int32_t>();
    p.block = sw_.block;
    return p;
  }

  void prepare_proxy() {
    const int hq = sw_.model.num_q_heads, g = m_.groups, d = sw_.model.head_dim;
    const size_t es = dtype_size(dt_);
    const size_t nb = nb_;
    ck(qg_.allocate(size_t(g) * n_ * d * es), "alloc proxy q");
    ck(kg_.allocate(size_t(g) * n_ * d * es), "alloc proxy k");
    ck(lse_g_.allocate(size_t(g) * n_ * 4), "alloc proxy lse");
    ck(scores_.allocate(size_t(g) * nb * nb * 4), "alloc proxy scores");
    ck(mass_.allocate(size_t(hq) * nb * 4), "alloc last-block mass");
    ck(kout_.allocate(size_t(hq) * 4), "alloc budgets");
    ck(kscaled_.allocate(size_t(hq) * 4), "alloc scaled budgets");
    ck(indptr_.allocate((size_t(hq) * nb + 1) * 4), "alloc mask indptr");
    ck(indices_.allocate(size_t(hq) * nb * (nb + 1) / 2 * 4), "alloc mask indices");
    kscaled_ok_ = false;
    const bool proxyattn = m_.family == Family::proxyattn;
    const double gamma = proxyattn ? m_.gamma : 0.95;
    stage_info_["proxy"] = {{"groups", g}, {"query_stride", m_.query_stride}, {"pool", "mean"}};
    stage_info_["budget"] = {{"kind", "dynamic"}, {"gamma", gamma}, {"k_min", sw_.k_min}, {"mode", "constant"}};

    // Untimed first run: warms the kernels, gives the budgets and the mask.
    run_proxy_estimation(kout_.as<int32_t>());
    ck(kn::synchronize(), "synchronize (proxy calibration)");
    std::vector<int32_t> k(hq);
    ck(kout_.download(k.data(), 4 * k.size()), "download budgets");
    ck(kn::synchronize(), "synchronize");
    double mean_k = 0;
    for (int32_t x : k) mean_k += x;
    stage_info_["budget"]["mean_k"] = mean_k / hq;
    if (proxyattn && m_.target_density) {
      double achieved = 0;
      const std::vector<int32_t> ks = scale_budgets(k, m_.density, nb_, &achieved);
      ck(kscaled_.upload(ks.data(), 4 * ks.size()), "upload scaled budgets");
      kscaled_ok_ = true;
      double mean_ks = 0;
      for (int32_t x : ks) mean_ks += x;
      stage_info_["budget"]["scaled_to_density"] = m_.density;
      stage_info_["budget"]["scaled_mean_k"] = mean_ks / hq;
      run_proxy_estimation(kscaled_.as<int32_t>());
      ck(kn::synchronize(), "synchronize (scaled selection)");
    }
    // The mask the timed runs select (deterministic), read back and validated by BlockMask.
    std::vector<int32_t> indptr(size_t(hq) * nb_ + 1);
    ck(indptr_.download(indptr.data(), 4 * indptr.size()), "download mask indptr");
    ck(kn::synchronize(), "synchronize");
    std::vector<int32_t> indices(static_cast<size_t>(std::max(0, indptr.back())));
    if (!indices.empty()) ck(indices_.download(indices.data(), 4 * indices.size()), "download mask indices");
    ck(kn::synchronize(), "synchronize");
    mask_ = BlockMask(hq, n_, sw_.block, std::move(indptr), std::move(indices));
  }

  // The one-pass scores' workspace, allocated by the first (untimed, prepare) estimation and
  // kept for the timed ones: a stream-ordered allocation per call would be timed too.
  void use_workspace(kn::FusedScoreParams& f) {
    const size_t need = kn::fused_block_scores_workspace(f);
    if (need > ws_.bytes()) ck(ws_.allocate(need), "alloc fused_block_scores workspace");
    f.workspace = ws_.data();
    f.workspace_bytes = ws_.bytes();
  }

  void run_proxy_estimation(const int32_t* head_k) {
    const int hq = sw_.model.num_q_heads, hkv = sw_.model.num_kv_heads, g = m_.groups, d = sw_.model.head_dim;
    const int r = hq / hkv, per = hq / g;
    const kn::ElemType et = elem(dt_);
    s_scores_.start();
    kn::PoolHeadsParams pq;
    pq.src = q_.data();
    pq.dst = qg_.data();
    pq.type = et;
    pq.heads = hq;
    pq.head_dim = d;
    pq.groups = g;
    pq.seq_len = n_;
    kn::PoolHeadsParams pk = pq;
    pk.src = k_.data();
    pk.dst = kg_.data();
    pk.heads = hkv;
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
    bs.q = qg_.data();
    bs.k = kg_.data();
    bs.out = scores_.as<float>();
    bs.in_type = et;
    bs.q_heads = bs.kv_heads = g;
    bs.head_dim = d;
    bs.seq_len = n_;
    bs.block = sw_.block;
    bs.query_stride = m_.query_stride;
    bs.reduce = kn::BlockReduce::max;
    fs.lse_out = lse_g_.as<float>();
    fs.one_pass = &one_pass;
    use_workspace(fs);
    ck(kn::fused_block_scores(fs), "fused_block_scores (proxy max-pool)");
    s_scores_.stop();
    stage_info_["proxy"]["passes"] = one_pass ? 1 : 2;

    s_budget_.start();
    // The last query block's mass per key block (one pass on Hopper, keys split over CTAs).
    kn::FusedScoreParams fm;
    kn::BlockScoreParams& ms = fm.scores;
    ms.q = q_.data();
    ms.k = k_.data();
    ms.out = mass_.as<float>();
    ms.in_type = et;
    ms.q_heads = hq;
    ms.kv_heads = hkv;
    ms.head_dim = d;
    ms.seq_len = n_;
    ms.block = sw_.block;
    ms.row_block_begin = nb_ - 1;
    ms.reduce = kn::BlockReduce::mean_sum;
    fm.one_pass = &one_pass;
    use_workspace(fm);
    ck(kn::fused_block_scores(fm), "fused_block_scores (last-block mass)");
    kn::BudgetParams bp;
    bp.mass = mass_.as<float>();
    bp.heads = hq;
    bp.num_blocks = nb_;
    bp.gamma = m_.family == Family::proxyattn ? m_.gamma : 0.95;
    bp.k_min = sw_.k_min;
    bp.k_out = kout_.as<int32_t>();
    ck(kn::dynamic_budget(bp), "dynamic_budget");
    s_budget_.stop();
    stage_info_["budget"]["passes"] = one_pass ? 1 : 2;

    s_select_.start();
    kn::SelectParams sp;
    sp.scores = scores_.as<float>();
    sp.score_heads = g;
    sp.heads = hq;
    sp.num_blocks = nb_;
    sp.head_k = head_k;
    sp.mode = 0;
    sp.indptr = indptr_.as<int32_t>();
    sp.indices = indices_.as<int32_t>();
    ck(kn::select_counts(sp), "select_counts");
    ck(kn::select_fill(sp), "select_fill");
    s_select_.stop();
  }

  // How the runner times an estimator, from its registry traits: ProxyAttn's staged pipeline
  // (grouped), the oracle's mass passes (exact_mass), a one-launch device estimate, or none.
  enum class EstKind { proxy, oracle, device, none };
  static EstKind kind_of(const std::string& name) {
    const MethodInfo& m = find_method(name);
    if (m.grouped()) return EstKind::proxy;
    if (m.exact_mass) return EstKind::oracle;
    if (m.estimate_device) return EstKind::device;
    return EstKind::none;
  }
  // The estimators run with their defaults (what the bench times), at the sweep's block.
  EstimatorConfig bench_config() const {
    EstimatorConfig ec;
    ec.block = sw_.block;
    return ec;
  }
  AttentionShape shape_at(int64_t n) const {
    AttentionShape s;
    s.q_heads = sw_.model.num_q_heads;
    s.kv_heads = sw_.model.num_kv_heads;
    s.head_dim = sw_.model.head_dim;
    s.seq_len = n;
    return s;
  }

  void prepare_peer() {
    const int hq = sw_.model.num_q_heads;
    const size_t nb = nb_, cells = size_t(hq) * nb * nb;
    ck(scores_.allocate(4 * cells), "alloc peer scores");
    ck(bitmap_.allocate(cells), "alloc peer bitmap");
    ck(counts_.allocate(4 * size_t(hq) * nb), "alloc peer row counts");
    ck(indptr_.allocate((size_t(hq) * nb + 1) * 4), "alloc mask indptr");
    ck(indices_.allocate(size_t(hq) * nb * (nb + 1) / 2 * 4), "alloc mask indices");
    const MethodInfo& info = find_method(m_.estimator);
    const EstimatorConfig ec = bench_config();
    nlohmann::json cfg = info.config_json(ec);
    if (info.device_native) cfg["coverage"] = info.device_native(ec).threshold;
    stage_info_[m_.estimator] = cfg;
    stage_info_["budget"] = "native";
    stage_info_["timed"] = info.device_timed;
    // Untimed first run: warms the kernels and gives the mask.
    run_peer();
    ck(kn::synchronize(), "synchronize (peer warm-up)");
    std::vector<int32_t> indptr(size_t(hq) * nb_ + 1);
    ck(indptr_.download(indptr.data(), 4 * indptr.size()), "download mask indptr");
    std::vector<int32_t> indices(static_cast<size_t>(std::max(0, indptr.back())));
    if (!indices.empty()) ck(indices_.download(indices.data(), 4 * indices.size()), "download mask indices");
    ck(kn::synchronize(), "synchronize");
    mask_ = BlockMask(hq, n_, sw_.block, std::move(indptr), std::move(indices));
  }

  // The device pipeline's estimate stage (MethodInfo::estimate_device, the same launches the
  // analysis runs through CudaLayer), then the native rule on the device and the CSR.
  void run_peer() {
    const MethodInfo& info = find_method(m_.estimator);
    const EstimatorConfig ec = bench_config();
    DeviceEstimate d;
    d.q = q_.data();
    d.k = k_.data();
    d.elem = static_cast<int>(elem(dt_));
    d.q_heads = sw_.model.num_q_heads;
    d.kv_heads = sw_.model.num_kv_heads;
    d.head_dim = sw_.model.head_dim;
    d.seq_len = n_;
    d.config = &ec;
    d.scores = scores_.as<float>();
    d.bitmap = bitmap_.as<uint8_t>();
    d.row_counts = counts_.as<int32_t>();
    s_scores_.start();
    info.estimate_device(d);
    s_scores_.stop();
    s_select_.start();
    if (!info.device_native_bitmap) {
      const DeviceNative rule = info.device_native(ec);
      kn::NativeSelectParams ns;
      ns.scores = scores_.as<float>();
      ns.heads = d.q_heads;
      ns.num_blocks = nb_;
      ns.bitmap = bitmap_.as<uint8_t>();
      ns.row_counts = counts_.as<int32_t>();
      ns.rule = rule.rule == DeviceNativeRule::cumulative ? kn::NativeRule::cumulative : kn::NativeRule::xattn;
      ns.threshold = rule.threshold;
      ck(kn::native_select(ns), "native_select");
    }
    kn::CsrParams cp;
    cp.bitmap = bitmap_.as<uint8_t>();
    cp.row_counts = counts_.as<int32_t>();
    cp.heads = d.q_heads;
    cp.num_blocks = nb_;
    cp.indptr = indptr_.as<int32_t>();
    cp.indices = indices_.as<int32_t>();
    ck(kn::csr_indptr(cp), "csr_indptr");
    ck(kn::csr_fill(cp), "csr_fill");
    s_select_.stop();
  }

  void proxy_stage_times(Timing& t) {
    t.stages["scores_ms"] = s_scores_.ms();
    t.stages["budget_ms"] = s_budget_.ms();
    t.stages["select_ms"] = s_select_.ms();
  }

  void run_oracle() {
    kn::AttentionParams a = attn();
    a.o = nullptr;
    a.v = nullptr;
    ck(kn::row_lse(a), "row_lse (oracle)");
    kn::BlockScoreParams bs;
    bs.q = q_.data();
    bs.k = k_.data();
    bs.lse = lse_.as<float>();
    bs.out = scores_.as<float>();
    bs.in_type = elem(dt_);
    bs.q_heads = sw_.model.num_q_heads;
    bs.kv_heads = sw_.model.num_kv_heads;
    bs.head_dim = sw_.model.head_dim;
    bs.seq_len = n_;
    bs.block = sw_.block;
    bs.reduce = kn::BlockReduce::mean_sum;
    ck(kn::block_scores(bs), "block_scores (oracle mass)");
  }

  const Sweep& sw_;
  kn::DeviceInfo info_;
  int dev_ = 0;  // the current CUDA device (MPI: local rank % GPUs)
  std::string smi_start_;
  int64_t n_ = 0;
  DType dt_ = DType::bf16;
  int nb_ = 0;
  std::string inputs_kind_;
  kn::DeviceBuffer q_, k_, v_, o_, lse_, ws_;
  Method m_;
  std::optional<BlockMask> mask_;
  nlohmann::json stage_info_ = nlohmann::json::object();
  kn::DeviceBuffer indptr_, indices_, qg_, kg_, lse_g_, scores_, mass_, kout_, kscaled_, bitmap_, counts_;
  bool kscaled_ok_ = false;
  EventPair total_, kern_, s_scores_, s_budget_, s_select_;
};

}  // namespace

bool gpu_available() { return kn::device_count() > 0; }

std::unique_ptr<Runner> make_gpu_runner(const Sweep& sw) { return std::make_unique<GpuRunner>(sw); }

}  // namespace proxyattn::bench
