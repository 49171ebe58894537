// GPU mode: our CUDA launchers (kernels.h, CUDA-free) timed with CUDA events on the default
// stream, the L2 flushed (kernels::flush_l2) before every repetition. Inputs are uploaded once
// per (N, dtype) and shared by the cases of that length; each case's own buffers are allocated
// in prepare (untimed) after the memory check, and freed in end_case.
//
// The methods run lib's device pipeline (DevicePipeline, device_pipeline.hpp: the stages, one
// launcher each, as the model runtime's CUDA back end runs them in every layer):
//   estimate:proxy / proxyattn: proxy scores (pool_heads, fused_block_scores max), the dynamic
//            budget (last-block mass, dynamic_budget), select_counts + select_fill; proxyattn adds
//            sparse_attention on that mask. proxyattn@density=D: the budgets are scaled to D once
//            in the untimed first run and kept (the scaling itself costs nothing on the device).
//   estimate:pooled / xattn / vslash: the registry's device estimate, the native rule on the
//            device, the CSR (default EstimatorConfig, as the CPU runner's native selection).
// flexprefill has no GPU kernel (skipped with the reason).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <optional>

#include <fmt/format.h>

#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/device_pipeline.hpp"
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

void ck(kn::Status s, const std::string& what) { throw_on_failure(s, what); }

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
    if (uses_pipeline(m))
      if (std::string why = DevicePipeline::unsupported_reason(pipeline_spec(m)); !why.empty()) return why;
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
        if (find_method(m.estimator).exact_mass) {
          ck(scores_.allocate(size_t(4) * hq * nb_ * nb_), "alloc oracle scores");
          break;
        }
        [[fallthrough]];
      case Family::proxyattn: {
        // Untimed first run: warms the kernels, scales the budgets (density), gives the mask.
        pipeline_.emplace(pipeline_spec(m), shape_at(n));
        pipeline_->select(operands());
        ck(kn::synchronize(), "synchronize (first selection)");
        mask_ = pipeline_->mask();
        stage_info_ = pipeline_->info();
        break;
      }
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
        if (pipeline_) pipeline_->select(operands());
        else run_oracle();
        total_.stop();
        t.total_ms = t.estimation_ms = total_.ms();
        if (pipeline_) stage_times(t);
        break;
      case Family::proxyattn: {
        total_.start();
        pipeline_->select(operands());
        pipeline_->attend(operands());
        total_.stop();
        t.total_ms = total_.ms();
        const PipelineTimes pt = stage_times(t);
        t.kernel_ms = pt.attention_ms;
        t.estimation_ms = pt.estimation_ms();
        break;
      }
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
    for (kn::DeviceBuffer* b : {&indptr_, &indices_, &scores_}) b->reset();
    pipeline_.reset();
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
    switch (m.family) {
      case Family::full:
        break;
      case Family::sparse:
        b += (hq * nb + 1) * 4 + hq * std::max(nb, std::round(m.density * causal_blocks)) * 4;
        break;
      case Family::estimate:
        if (!uses_pipeline(m)) {
          b += hq * nb * nb * 4;  // the oracle's mass
          break;
        }
        [[fallthrough]];
      case Family::proxyattn:
        b += DevicePipeline::bytes(pipeline_spec(m), shape_at(n));
        break;
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

  // Which cases run the device pipeline: ProxyAttn end to end and every estimate but the
  // oracle's mass passes (timed as row_lse + block_scores).
  static bool uses_pipeline(const Method& m) {
    return m.family == Family::proxyattn || (m.family == Family::estimate && !find_method(m.estimator).exact_mass);
  }
  PipelineSpec pipeline_spec(const Method& m) const {
    PipelineSpec p;
    const bool proxyattn = m.family == Family::proxyattn;
    p.method = proxyattn ? &proxyattn_method() : &find_method(m.estimator);
    p.block = sw_.block;
    p.groups = m.groups;
    p.query_stride = m.query_stride;
    p.gamma = proxyattn ? m.gamma : 0.95;
    p.k_min = sw_.k_min;
    if (proxyattn && m.target_density) p.density = m.density;
    p.scale_once = true;
    p.config = bench_config();
    return p;
  }
  DeviceOperands operands() const {
    DeviceOperands x;
    x.q = q_.data();
    x.k = k_.data();
    x.v = v_.data();
    x.o = o_.data();
    x.lse = lse_.as<float>();
    x.elem = static_cast<int>(elem(dt_));
    x.q_heads = sw_.model.num_q_heads;
    x.kv_heads = sw_.model.num_kv_heads;
    x.head_dim = sw_.model.head_dim;
    x.seq_len = n_;
    return x;
  }
  // The pipeline's stage times into the row; budget_ms only where the method has that stage.
  PipelineTimes stage_times(Timing& t) {
    const PipelineTimes pt = pipeline_->times();
    t.stages["scores_ms"] = pt.scores_ms;
    if (pipeline_spec(m_).method->grouped()) t.stages["budget_ms"] = pt.budget_ms;
    t.stages["select_ms"] = pt.select_ms;
    return pt;
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
  kn::DeviceBuffer q_, k_, v_, o_, lse_;
  Method m_;
  std::optional<BlockMask> mask_;
  nlohmann::json stage_info_ = nlohmann::json::object();
  kn::DeviceBuffer indptr_, indices_, scores_;  // sparse@ masks; the oracle's mass
  std::optional<DevicePipeline> pipeline_;
  EventPair total_;
};

}  // namespace

bool gpu_available() { return kn::device_count() > 0; }

std::unique_ptr<Runner> make_gpu_runner(const Sweep& sw) { return std::make_unique<GpuRunner>(sw); }

}  // namespace proxyattn::bench
