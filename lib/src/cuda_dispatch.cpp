// Host-side dispatch from the lib types (views, BlockMask, BlockScores, Budgets) to the
// CUDA-free kernels API. Plain C++: conversion to bf16/fp16 happens on the device, every Status
// becomes an Error naming the operation.
#include "proxyattn/cuda_dispatch.hpp"
#include "proxyattn/select.hpp"
#include "proxyattn/methods.hpp"

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <cmath>
#include <cstdlib>
#include <string>

#include "proxyattn/dtype.hpp"
#include "proxyattn/error.hpp"
#include "proxyattn/kernels.h"
#include "proxyattn/trace.hpp"

namespace proxyattn {

namespace kk = proxyattn::kernels;

void throw_on_failure(kk::Status s, const std::string& what) {
  if (s == kk::Status::ok) return;
  std::string msg = what + ": " + kk::status_string(s);
  const char* d = kk::last_error_detail();
  if (d && *d) msg += std::string(" (") + d + ")";
  throw Error(msg);
}

namespace {

void check(kk::Status s, const std::string& what) { throw_on_failure(s, "cuda: " + what); }

kk::ElemType elem_of(DType t) {
  switch (t) {
    case DType::bf16: return kk::ElemType::bf16;
    case DType::f16: return kk::ElemType::f16;
    case DType::f32: break;
  }
  throw Error("cuda: compute dtype must be bfloat16 or float16, not float32");
}

kk::DeviceBuffer alloc(size_t bytes, const std::string& what) {
  kk::DeviceBuffer b;
  check(b.allocate(std::max<size_t>(bytes, 16)), "allocating " + what);
  return b;
}

// Uploads a float32 view as a contiguous [heads, tokens, dim] tensor of 16-bit type t (the
// compute dtypes, elem_of), rounded on the host in parallel so half the bytes cross the bus, a
// chunk of rows at a time into page-locked staging while the previous chunk crosses it (no
// pageable copy, no N-sized host buffer). The rounding is the device conversion's (round to
// nearest even; tests/gpu/test_full_attention.cpp, HostRounding).
kk::DeviceBuffer upload_view(ConstView v, kk::ElemType t, kk::StagedUpload& staging, const std::string& what) {
  if (t == kk::ElemType::f32) throw Error("cuda: upload_view: " + what + " must be uploaded as bf16 or f16");
  const size_t n = static_cast<size_t>(v.heads) * v.tokens * v.dim;
  kk::DeviceBuffer out = alloc(n * sizeof(uint16_t), what);
  const bool f16 = t == kk::ElemType::f16;
  const int64_t rows = v.heads * v.tokens, row_bytes = v.dim * int64_t(sizeof(uint16_t));
  const int64_t per_chunk = std::max<int64_t>(1, int64_t(staging.chunk_bytes()) / row_bytes);
  if (per_chunk * row_bytes > int64_t(staging.chunk_bytes()))
    throw Error("cuda: upload_view: a row of " + what + " exceeds the staging buffer");
  for (int64_t r0 = 0; r0 < rows; r0 += per_chunk) {
    const int64_t r1 = std::min(rows, r0 + per_chunk);
    void* buf = nullptr;
    check(staging.stage(&buf), "uploading " + what);
    uint16_t* half = static_cast<uint16_t*>(buf);
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = v.row(r / v.tokens, r % v.tokens);
      uint16_t* dst = half + size_t(r - r0) * v.dim;
      if (f16)
        floats_to_halves(src, dst, size_t(v.dim));
      else
        for (int64_t c = 0; c < v.dim; ++c) dst[c] = float_to_bf16(src[c]);
    }
    check(staging.push(static_cast<char*>(out.data()) + r0 * row_bytes, size_t((r1 - r0) * row_bytes)),
          "uploading " + what);
  }
  check(staging.finish(), "uploading " + what);  // complete before other threads read it
  return out;
}

template <class T>
std::vector<T> download(const kk::DeviceBuffer& b, size_t n, const std::string& what) {
  std::vector<T> out(n);
  check(b.download(out.data(), n * sizeof(T)), "downloading " + what);
  return out;
}

// Times the kernels between construction and stop() with CUDA events.
class KernelTimer {
 public:
  KernelTimer() { check(t_.start(), "event timer"); }
  double stop() {
    check(t_.stop(), "event timer");
    float ms = 0;
    check(t_.elapsed_ms(&ms), "event timer");
    return ms;
  }

 private:
  kk::EventTimer t_;
};

// Zero scores [H, Nb, Nb] of `method` for this shape.
BlockScores empty_scores(const char* method, const AttentionShape& sh, int block) {
  BlockScores s;
  s.method = method;
  s.heads = sh.q_heads;
  s.block = block;
  s.seq_len = sh.seq_len;
  s.num_blocks = num_blocks_for(sh.seq_len, block);
  s.score.assign(size_t(s.heads) * s.num_blocks * s.num_blocks, 0.0f);
  return s;
}

void check_block(int block, const char* what) {
  validate_block_size(block);
  if (block != 64 && block != 128)
    throw Error(std::string("cuda: ") + what + ": block " + std::to_string(block) + " unsupported (64 or 128)");
}

}  // namespace

bool cuda_available() noexcept { return kk::device_count() > 0; }

std::string cuda_device_description() {
  const int n = kk::device_count();
  if (n <= 0) return "no CUDA device (" + std::string(kk::last_error_detail()) + ")";
  int dev = 0;
  if (kk::current_device(&dev) != kk::Status::ok) dev = 0;
  kk::DeviceInfo info;
  if (kk::device_info(dev, &info) != kk::Status::ok) return "CUDA device " + std::to_string(dev) + " (no properties)";
  return std::string(info.name) + " (sm_" + std::to_string(info.cc_major) + std::to_string(info.cc_minor) + ", " +
         std::to_string(info.sm_count) + " SMs)";
}

int use_cuda_device_for_rank(int local_rank) {
  const int n = kk::device_count();
  if (n <= 0) return -1;
  const int dev = local_rank % n;
  if (kk::set_device(dev) != kk::Status::ok)
    throw Error("cuda: cannot select device " + std::to_string(dev) + ": " + kk::last_error_detail());
  return dev;
}

int current_cuda_device() noexcept {
  if (kk::device_count() <= 0) return -1;
  int dev = -1;
  return kk::current_device(&dev) == kk::Status::ok ? dev : -1;
}

std::string cuda_module_loading() {
  const char* mode = std::getenv("CUDA_MODULE_LOADING");
  return mode && *mode ? mode : "default";
}

void load_cuda_kernels_eagerly() {
  if (!std::getenv("CUDA_MODULE_LOADING")) setenv("CUDA_MODULE_LOADING", "EAGER", 1);
}

std::future<void> start_cuda_context() {
  const int device = current_cuda_device();
  return std::async(std::launch::async, [device] {
    if (device < 0 || kk::set_device(device) != kk::Status::ok) return;
    (void)kk::init_context();
  });
}

void use_cuda_device(int device) {
  if (device < 0) return;
  if (kk::set_device(device) != kk::Status::ok)
    throw Error("cuda: cannot select device " + std::to_string(device) + ": " + kk::last_error_detail());
}

struct CudaLayer::Impl {
  AttentionShape s;
  DType dtype = DType::bf16;
  kk::ElemType et = kk::ElemType::bf16;
  kk::DeviceBuffer q, k, v;
  bool has_v = false;
  std::vector<double> q_sqnorm;  // per query head, for ProxyPool::max_norm
  std::atomic<double> last_ms{0};  // written by whichever thread ran the last call

  kk::AttentionParams attn_params() const {
    kk::AttentionParams p;
    p.q = q.data();
    p.k = k.data();
    p.v = has_v ? v.data() : nullptr;
    p.in_type = et;
    p.q_heads = s.q_heads;
    p.kv_heads = s.kv_heads;
    p.head_dim = s.head_dim;
    p.seq_len = s.seq_len;
    return p;
  }
  kk::PeerInput peer_input() const {
    kk::PeerInput p;
    p.q = q.data();
    p.k = k.data();
    p.in_type = et;
    p.q_heads = s.q_heads;
    p.kv_heads = s.kv_heads;
    p.head_dim = s.head_dim;
    p.seq_len = s.seq_len;
    return p;
  }
  // Computed once, on first use (the analysis calls a layer from two threads: the lock).
  mutable std::mutex cache_mutex;
  // The layer's own row LSE [Hq, N] (block mass, block max, row_lse read it).
  mutable kk::DeviceBuffer own_lse;
  const kk::DeviceBuffer& layer_lse() const {
    std::lock_guard lock(cache_mutex);
    if (!own_lse.data()) own_lse = lse_of(q.data(), k.data(), s.q_heads, s.kv_heads, 0);
    return own_lse;
  }
  // The full attention output [Hq, N, d] in float32: the reference of every output error. The
  // pass writes the row LSE too: kept when not yet known (then no LSE pass of its own).
  mutable kk::DeviceBuffer own_full_output;
  const kk::DeviceBuffer& full_output() const {
    std::lock_guard lock(cache_mutex);
    if (!own_full_output.data()) {
      own_full_output = alloc(size_t(s.q_heads) * s.seq_len * s.head_dim * sizeof(float), "full output");
      kk::AttentionParams p = attn_params();
      p.o = own_full_output.data();
      p.out_type = kk::ElemType::f32;
      kk::DeviceBuffer lse;
      if (!own_lse.data()) {
        lse = alloc(sizeof(float) * s.q_heads * s.seq_len, "lse");
        p.lse = lse.as<float>();
      }
      check(kk::full_attention(p), "full_attention");
      if (lse.data()) own_lse = std::move(lse);
    }
    return own_full_output;
  }
  // Row LSE of (qp, kp) with hq / hk heads into a [hq, N] device buffer.
  kk::DeviceBuffer lse_of(const void* qp, const void* kp, int hq, int hk, int64_t row_begin) const {
    kk::DeviceBuffer lse = alloc(sizeof(float) * hq * s.seq_len, "lse");
    kk::AttentionParams p = attn_params();
    p.q = qp;
    p.k = kp;
    p.v = nullptr;
    p.q_heads = hq;
    p.kv_heads = hk;
    p.lse = lse.as<float>();
    p.row_begin = row_begin;
    check(kk::row_lse(p), "row_lse");
    return lse;
  }
  kk::BlockScoreParams score_params(const void* qp, const void* kp, int hq, int hk, const float* lse, float* out,
                                    int block) const {
    kk::BlockScoreParams p;
    p.q = qp;
    p.k = kp;
    p.lse = lse;
    p.out = out;
    p.in_type = et;
    p.q_heads = hq;
    p.kv_heads = hk;
    p.head_dim = s.head_dim;
    p.seq_len = s.seq_len;
    p.block = block;
    return p;
  }
  // Last-block mass [Hq, Nb] on the device.
  kk::DeviceBuffer last_mass(int block) const {
    const int nb = num_blocks_for(s.seq_len, block);
    kk::DeviceBuffer lse = lse_of(q.data(), k.data(), s.q_heads, s.kv_heads, int64_t(nb - 1) * block);
    kk::DeviceBuffer out = alloc(sizeof(float) * s.q_heads * nb, "last-block mass");
    kk::BlockScoreParams p = score_params(q.data(), k.data(), s.q_heads, s.kv_heads, lse.as<float>(), out.as<float>(), block);
    p.row_block_begin = nb - 1;
    p.reduce = kk::BlockReduce::mean_sum;
    check(kk::block_scores(p), "last-block mass");
    check(kk::synchronize(), "last-block mass");
    return out;
  }
};

CudaLayer::CudaLayer(ConstView q, ConstView k, ConstView v, DType dtype) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.s = check_qkv(q, k, v);
  m.dtype = dtype;
  m.et = elem_of(dtype);
  if (m.s.head_dim != 64 && m.s.head_dim != 128 && m.s.head_dim != 256)
    throw Error("cuda: head_dim " + std::to_string(m.s.head_dim) + " unsupported (64, 128 or 256)");
  if (!cuda_available()) throw Error("cuda: " + cuda_device_description());
  {
    TraceScope trace("upload q, k, v", true);
    // Chunks of 32 MiB (a small layer: its largest tensor, so tests do not pin 64 MiB each).
    const size_t largest = size_t(std::max(q.heads, k.heads)) * q.tokens * q.dim * sizeof(uint16_t);
    kk::StagedUpload staging;
    check(staging.init(std::max<size_t>(std::min<size_t>(largest, size_t(32) << 20), size_t(q.dim) * sizeof(uint16_t))),
          "staging buffers for the upload");
    m.q = upload_view(q, m.et, staging, "q");
    m.k = upload_view(k, m.et, staging, "k");
    m.has_v = !v.empty();
    if (m.has_v) m.v = upload_view(v, m.et, staging, "v");
  }
  TraceScope trace("q square norms");
  m.q_sqnorm.assign(m.s.q_heads, 0.0);
#pragma omp parallel for schedule(dynamic)
  for (int h = 0; h < m.s.q_heads; ++h) {
    double acc = 0;
    for (int64_t t = 0; t < q.tokens; ++t) {
      const float* r = q.row(h, t);
      for (int64_t c = 0; c < q.dim; ++c) acc += double(r[c]) * r[c];
    }
    m.q_sqnorm[h] = acc;
  }
}
CudaLayer::~CudaLayer() = default;
CudaLayer::CudaLayer(CudaLayer&&) noexcept = default;
CudaLayer& CudaLayer::operator=(CudaLayer&&) noexcept = default;

const AttentionShape& CudaLayer::shape() const { return impl_->s; }
DType CudaLayer::dtype() const { return impl_->dtype; }
bool CudaLayer::has_v() const { return impl_->has_v; }
double CudaLayer::last_kernel_ms() const { return impl_->last_ms; }

AttentionOutput CudaLayer::full_attention() const {
  const Impl& m = *impl_;
  if (!m.has_v) throw Error("cuda: full_attention needs V (the layer was uploaded without it)");
  const size_t no = size_t(m.s.q_heads) * m.s.seq_len * m.s.head_dim, nl = size_t(m.s.q_heads) * m.s.seq_len;
  kk::DeviceBuffer o = alloc(no * sizeof(float), "o"), lse = alloc(nl * sizeof(float), "lse");
  kk::AttentionParams p = m.attn_params();
  p.o = o.data();
  p.out_type = kk::ElemType::f32;
  p.lse = lse.as<float>();
  KernelTimer t;
  check(kk::full_attention(p), "full_attention");
  impl_->last_ms = t.stop();
  AttentionOutput out{Tensor3::uninitialized(m.s.q_heads, m.s.seq_len, m.s.head_dim), {}};  // all downloaded
  check(o.download(out.o.data(), no * sizeof(float)), "downloading o");
  out.lse = download<float>(lse, nl, "lse");
  return out;
}

AttentionOutput CudaLayer::sparse_attention(const BlockMask& mask) const {
  const Impl& m = *impl_;
  if (!m.has_v) throw Error("cuda: sparse_attention needs V (the layer was uploaded without it)");
  if (mask.heads() != m.s.q_heads || mask.seq_len() != m.s.seq_len)
    throw Error("cuda: sparse_attention: mask is for " + std::to_string(mask.heads()) + " heads x " +
                std::to_string(mask.seq_len()) + " tokens, layer has " + std::to_string(m.s.q_heads) + " x " +
                std::to_string(m.s.seq_len));
  check_block(mask.block(), "sparse_attention");
  const size_t no = size_t(m.s.q_heads) * m.s.seq_len * m.s.head_dim, nl = size_t(m.s.q_heads) * m.s.seq_len;
  kk::DeviceBuffer o = alloc(no * sizeof(float), "o"), lse = alloc(nl * sizeof(float), "lse");
  kk::DeviceBuffer ip = alloc(mask.indptr().size() * 4, "mask indptr");
  kk::DeviceBuffer ix = alloc(mask.indices().size() * 4, "mask indices");
  check(ip.upload(mask.indptr().data(), mask.indptr().size() * 4), "uploading mask indptr");
  check(ix.upload(mask.indices().data(), mask.indices().size() * 4), "uploading mask indices");
  kk::SparseAttentionParams sp;
  sp.attn = m.attn_params();
  sp.attn.o = o.data();
  sp.attn.out_type = kk::ElemType::f32;
  sp.attn.lse = lse.as<float>();
  sp.indptr = ip.as<int32_t>();
  sp.indices = ix.as<int32_t>();
  sp.block = mask.block();
  KernelTimer t;
  check(kk::sparse_attention(sp), "sparse_attention");
  impl_->last_ms = t.stop();
  AttentionOutput out{Tensor3::uninitialized(m.s.q_heads, m.s.seq_len, m.s.head_dim), {}};  // all downloaded
  check(o.download(out.o.data(), no * sizeof(float)), "downloading o");
  out.lse = download<float>(lse, nl, "lse");
  return out;
}

MaskErrors CudaLayer::output_errors(const std::vector<const BlockMask*>& masks,
                                     const std::vector<const std::vector<int32_t>*>& orders) const {
  const Impl& m = *impl_;
  if (!m.has_v) throw Error("cuda: output_errors needs V (the layer was uploaded without it)");
  const int H = m.s.q_heads;
  const int64_t N = m.s.seq_len;
  const size_t no = size_t(H) * N * m.s.head_dim;
  MaskErrors out;
  out.rel_error.assign(masks.size(), std::vector<double>(size_t(H), 0.0));
  out.empty_rows.assign(masks.size(), 0);
  if (masks.empty()) return out;
  for (const BlockMask* mask : masks) {
    if (mask->heads() != H || mask->seq_len() != N)
      throw Error("cuda: output_errors: mask is for " + std::to_string(mask->heads()) + " heads x " +
                  std::to_string(mask->seq_len()) + " tokens, layer has " + std::to_string(H) + " x " +
                  std::to_string(N));
    check_block(mask->block(), "output_errors");
  }
  // Each mask to the first order it is a prefix of (same block size), else to its own pass.
  std::vector<int> order_of(masks.size(), -1);
  std::optional<TraceScope> trace(std::in_place, "output errors: masks to orders");
#pragma omp parallel for schedule(dynamic)
  for (size_t x = 0; x < masks.size(); ++x)
    for (size_t r = 0; r < orders.size() && order_of[x] < 0; ++r)
      if (is_prefix_of_order(*masks[x], *orders[r])) order_of[x] = int(r);

  trace.emplace("output errors: full output", true);
  KernelTimer t;
  const kk::DeviceBuffer& o_full = m.full_output();
  kk::DeviceBuffer sums = alloc(size_t(2) * H * sizeof(double), "error sums");
  double* sq_diff = sums.as<double>();
  double* sq_ref = sq_diff + H;
  std::vector<double> host(size_t(2) * H);
  auto download_sums = [&](kk::DeviceBuffer& b, std::vector<double>& to) {
    check(b.download(to.data(), to.size() * sizeof(double)), "downloading error sums");
  };
  // ||O_full_h||^2 once (the reference against itself).
  check(kk::memset_device(sums.data(), 0, sums.bytes()), "zeroing error sums");
  kk::OutputErrorParams rp;
  rp.o_ref = rp.o = o_full.as<float>();
  rp.heads = H;
  rp.head_dim = m.s.head_dim;
  rp.seq_len = N;
  rp.sq_diff = sq_diff;
  rp.sq_ref = sq_ref;
  check(kk::output_error_sums(rp), "output_error_sums");
  download_sums(sums, host);
  const std::vector<double> ref(host.begin() + H, host.end());
  auto finish = [&](size_t x, const double* diff) {
    const BlockMask& mask = *masks[x];
    for (int h = 0; h < H; ++h) {
      out.rel_error[x][size_t(h)] = ref[size_t(h)] > 0 ? std::sqrt(diff[h] / ref[size_t(h)]) : 0.0;
      // A query block with no selected key block gives o = 0 on its rows (as the CPU's empty rows).
      for (int i = 0; i < mask.num_blocks(); ++i)
        if (mask.row(h, i).empty()) out.empty_rows[x] += std::min<int64_t>(mask.block(), N - int64_t(i) * mask.block());
    }
  };

  // One pass per order over the masks that are its prefixes.
  for (size_t r = 0; r < orders.size(); ++r) {
    std::vector<size_t> group;
    for (size_t x = 0; x < masks.size(); ++x)
      if (order_of[x] == int(r)) group.push_back(x);
    if (group.empty()) continue;
    trace.emplace("output errors: prefix pass of " + std::to_string(group.size()) + " masks", true);
    const int nb = masks[group[0]]->num_blocks(), block = masks[group[0]]->block();
    const std::vector<int32_t>& order = *orders[r];
    std::vector<int32_t> counts(group.size() * H * nb);
    for (size_t g = 0; g < group.size(); ++g)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < nb; ++i)
          counts[(g * H + h) * nb + i] = int32_t(masks[group[g]]->row(h, i).size());
    kk::DeviceBuffer d_order = alloc(order.size() * 4, "rank order");
    kk::DeviceBuffer d_counts = alloc(counts.size() * 4, "prefix counts");
    kk::DeviceBuffer d_err = alloc(group.size() * H * sizeof(double), "prefix error sums");
    check(d_order.upload(order.data(), order.size() * 4), "uploading rank order");
    check(d_counts.upload(counts.data(), counts.size() * 4), "uploading prefix counts");
    check(kk::memset_device(d_err.data(), 0, d_err.bytes()), "zeroing prefix error sums");
    kk::PrefixErrorParams pp;
    pp.attn = m.attn_params();
    pp.o_ref = o_full.as<float>();
    pp.order = d_order.as<int32_t>();
    pp.counts = d_counts.as<int32_t>();
    pp.masks = int(group.size());
    pp.block = block;
    pp.sq_diff = d_err.as<double>();
    check(kk::prefix_output_errors(pp), "prefix_output_errors");
    std::vector<double> err(group.size() * H);
    download_sums(d_err, err);
    for (size_t g = 0; g < group.size(); ++g) finish(group[g], err.data() + g * H);
  }

  // The rest: one block-sparse pass each (their output buffer only when there is one).
  kk::DeviceBuffer o;
  for (size_t x = 0; x < masks.size(); ++x) {
    if (order_of[x] >= 0) continue;
    trace.emplace("output errors: own pass", true);
    if (!o.data()) o = alloc(no * sizeof(float), "sparse output");
    const BlockMask& mask = *masks[x];
    kk::DeviceBuffer ip = alloc(mask.indptr().size() * 4, "mask indptr");
    kk::DeviceBuffer ix = alloc(std::max<size_t>(1, mask.indices().size()) * 4, "mask indices");
    check(ip.upload(mask.indptr().data(), mask.indptr().size() * 4), "uploading mask indptr");
    if (!mask.indices().empty()) check(ix.upload(mask.indices().data(), mask.indices().size() * 4), "uploading mask indices");
    kk::SparseAttentionParams sp;
    sp.attn = m.attn_params();
    sp.attn.o = o.data();
    sp.attn.out_type = kk::ElemType::f32;
    sp.indptr = ip.as<int32_t>();
    sp.indices = ix.as<int32_t>();
    sp.block = mask.block();
    check(kk::sparse_attention(sp), "sparse_attention");
    check(kk::memset_device(sums.data(), 0, sums.bytes()), "zeroing error sums");
    kk::OutputErrorParams ep;
    ep.o_ref = o_full.as<float>();
    ep.o = o.as<float>();
    ep.heads = H;
    ep.head_dim = m.s.head_dim;
    ep.seq_len = N;
    ep.sq_diff = sq_diff;
    check(kk::output_error_sums(ep), "output_error_sums");
    download_sums(sums, host);
    finish(x, host.data());
  }
  impl_->last_ms = t.stop();
  return out;
}

size_t cuda_device_memory_bytes() noexcept {
  if (kk::device_count() <= 0) return 0;
  int dev = 0;
  if (kk::current_device(&dev) != kk::Status::ok) dev = 0;
  kk::DeviceInfo info;
  if (kk::device_info(dev, &info) != kk::Status::ok) return 0;
  return info.global_mem;
}

void CudaLayer::compute_full_output() const {
  if (!impl_->has_v) throw Error("cuda: compute_full_output needs V (the layer was uploaded without it)");
  KernelTimer t;
  (void)impl_->full_output();
  impl_->last_ms = t.stop();
}

std::vector<float> CudaLayer::row_lse() const {
  const Impl& m = *impl_;
  KernelTimer t;
  const kk::DeviceBuffer& lse = m.layer_lse();
  impl_->last_ms = t.stop();
  return download<float>(lse, size_t(m.s.q_heads) * m.s.seq_len, "lse");
}

BlockMass CudaLayer::block_mass(int block) const {
  const Impl& m = *impl_;
  check_block(block, "block_mass");
  const int nb = num_blocks_for(m.s.seq_len, block);
  const size_t nm = size_t(m.s.q_heads) * nb * nb;
  kk::DeviceBuffer out = alloc(nm * sizeof(float), "block mass");
  KernelTimer t;
  const kk::DeviceBuffer& lse = m.layer_lse();
  kk::BlockScoreParams p = m.score_params(m.q.data(), m.k.data(), m.s.q_heads, m.s.kv_heads, lse.as<float>(),
                                          out.as<float>(), block);
  p.reduce = kk::BlockReduce::mean_sum;
  check(kk::block_scores(p), "block_mass");
  impl_->last_ms = t.stop();
  BlockMass bm;
  bm.heads = m.s.q_heads;
  bm.num_blocks = nb;
  bm.block = block;
  bm.seq_len = m.s.seq_len;
  bm.mass = download<float>(out, nm, "block mass");
  return bm;
}

std::vector<float> CudaLayer::maxpool_block_scores(int block, int query_stride) const {
  const Impl& m = *impl_;
  check_block(block, "maxpool_block_scores");
  if (query_stride < 1) throw Error("cuda: maxpool_block_scores: query_stride must be >= 1");
  const int nb = num_blocks_for(m.s.seq_len, block);
  const size_t nm = size_t(m.s.q_heads) * nb * nb;
  kk::DeviceBuffer out = alloc(nm * sizeof(float), "block scores");
  KernelTimer t;
  const kk::DeviceBuffer& lse = m.layer_lse();
  kk::BlockScoreParams p = m.score_params(m.q.data(), m.k.data(), m.s.q_heads, m.s.kv_heads, lse.as<float>(),
                                          out.as<float>(), block);
  p.reduce = kk::BlockReduce::max;
  p.query_stride = query_stride;
  check(kk::block_scores(p), "maxpool_block_scores");
  impl_->last_ms = t.stop();
  return download<float>(out, nm, "block scores");
}

BlockScores CudaLayer::proxy_scores(const EstimatorConfig& config, ProxyPrecision precision) const {
  const Impl& m = *impl_;
  validate_estimator_config(config, m.s.q_heads, "proxy");
  const int block = config.block;
  check_block(block, "proxy_scores");
  const int g = config.proxy.groups, per = m.s.q_heads / g, r = m.s.group();
  const int nb = num_blocks_for(m.s.seq_len, block);
  const int64_t N = m.s.seq_len, d = m.s.head_dim;
  const size_t esz = kk::elem_size(m.et);
  const size_t per_group = size_t(nb) * nb;
  // Query heads [qb, qe) and KV heads [kb, ke) of group gi (the CPU's make_proxy_heads).
  auto ranges = [&](int gi, int32_t& qb, int32_t& qe, int32_t& kb, int32_t& ke) {
    const int h0 = gi * per, h1 = h0 + per;
    if (config.proxy.pool == ProxyPool::mean) {
      qb = h0;
      qe = h1;
      kb = h0 / r;
      ke = (h1 - 1) / r + 1;
    } else {
      int best = h0;
      for (int h = h0; h < h1; ++h)
        if (m.q_sqnorm[h] > m.q_sqnorm[best]) best = h;  // ties: the lower head
      qb = best;
      qe = best + 1;
      kb = best / r;
      ke = best / r + 1;
    }
  };
  kk::DeviceBuffer out = alloc(size_t(g) * per_group * sizeof(float), "proxy scores");
  std::optional<TraceScope> trace(std::in_place, "proxy scores: kernels g=" + std::to_string(g), true);
  if (precision == ProxyPrecision::exact) {
    KernelTimer t;
    for (int g0 = 0; g0 < g; g0 += kk::kMaxPoolGroups) {
      const int gn = std::min(g - g0, kk::kMaxPoolGroups);
      kk::ProxyExactParams pe;
      pe.in = m.peer_input();
      pe.groups = gn;
      for (int x = 0; x < gn; ++x) ranges(g0 + x, pe.q_begin[x], pe.q_end[x], pe.k_begin[x], pe.k_end[x]);
      pe.block = block;
      pe.query_stride = config.proxy.query_stride;
      pe.out = out.as<float>() + size_t(g0) * per_group;
      check(kk::proxy_scores_exact(pe), "proxy_scores (exact)");
    }
    impl_->last_ms = t.stop();
  } else {
    kk::DeviceBuffer qg = alloc(size_t(g) * N * d * esz, "proxy q"), kg = alloc(size_t(g) * N * d * esz, "proxy k");
    KernelTimer t;
    // Pool in chunks of kMaxPoolGroups groups.
    for (int g0 = 0; g0 < g; g0 += kk::kMaxPoolGroups) {
      const int gn = std::min(g - g0, kk::kMaxPoolGroups);
      kk::PoolHeadsParams pq, pk;
      pq.src = m.q.data();
      pq.dst = static_cast<char*>(qg.data()) + size_t(g0) * N * d * esz;
      pk.src = m.k.data();
      pk.dst = static_cast<char*>(kg.data()) + size_t(g0) * N * d * esz;
      pq.type = pk.type = m.et;
      pq.heads = m.s.q_heads;
      pk.heads = m.s.kv_heads;
      pq.head_dim = pk.head_dim = m.s.head_dim;
      pq.groups = pk.groups = gn;
      pq.seq_len = pk.seq_len = N;
      for (int x = 0; x < gn; ++x) ranges(g0 + x, pq.head_begin[x], pq.head_end[x], pk.head_begin[x], pk.head_end[x]);
      check(kk::pool_heads(pq), "proxy pool q");
      check(kk::pool_heads(pk), "proxy pool k");
    }
    kk::DeviceBuffer lse = m.lse_of(qg.data(), kg.data(), g, g, 0);
    kk::BlockScoreParams p = m.score_params(qg.data(), kg.data(), g, g, lse.as<float>(), out.as<float>(), block);
    p.reduce = kk::BlockReduce::max;
    p.query_stride = config.proxy.query_stride;
    check(kk::block_scores(p), "proxy block scores");
    impl_->last_ms = t.stop();
  }
  trace.emplace("proxy scores: download + copy to heads");
  const std::vector<float> gs = download<float>(out, size_t(g) * per_group, "proxy scores");

  BlockScores s = empty_scores("proxy", m.s, block);
  s.group_of_head.resize(s.heads);
#pragma omp parallel for
  for (int h = 0; h < s.heads; ++h) {
    s.group_of_head[h] = h / per;
    std::copy_n(gs.begin() + size_t(h / per) * per_group, per_group, s.score.begin() + size_t(h) * per_group);
  }
  return s;
}

BlockScores CudaLayer::device_estimate(const MethodInfo& method, const EstimatorConfig& config) const {
  const Impl& m = *impl_;
  validate_estimator_config(config, m.s.q_heads, method.name);
  if (!method.estimate_device) throw Error("cuda: '" + method.name + "' has no device estimate");
  BlockScores s = empty_scores(method.name.c_str(), m.s, config.block);
  const size_t cells = s.score.size();
  const std::string what = method.name + " scores";
  kk::DeviceBuffer out = alloc(cells * sizeof(float), what);
  kk::DeviceBuffer bm, counts;
  if (method.device_native_bitmap) {
    bm = alloc(cells, method.name + " bitmap");
    counts = alloc(size_t(s.heads) * s.num_blocks * sizeof(int32_t), method.name + " row counts");
  }
  DeviceEstimate d;
  d.q = m.q.data();
  d.k = m.k.data();
  d.elem = static_cast<int>(m.et);
  d.q_heads = m.s.q_heads;
  d.kv_heads = m.s.kv_heads;
  d.head_dim = m.s.head_dim;
  d.seq_len = m.s.seq_len;
  d.config = &config;
  d.scores = out.as<float>();
  d.bitmap = bm.as<uint8_t>();
  d.row_counts = counts.as<int32_t>();
  KernelTimer t;
  method.estimate_device(d);
  impl_->last_ms = t.stop();
  s.score = download<float>(out, cells, what);
  if (method.device_native_bitmap)
    s.native = BlockMask::from_bitmap(s.heads, s.seq_len, s.block, download<uint8_t>(bm, cells, method.name + " bitmap"));
  else
    renative_from_scores(s, config);  // the CPU's rule on the device scores (global selections too)
  return s;
}

BlockScores CudaLayer::pooled_scores(const EstimatorConfig& config) const {
  return device_estimate(find_method("pooled"), config);
}

BlockScores CudaLayer::xattn_scores(const EstimatorConfig& config) const {
  return device_estimate(find_method("xattn"), config);
}

BlockScores CudaLayer::vslash_scores(const EstimatorConfig& config) const {
  return device_estimate(find_method("vslash"), config);
}

bool CudaLayer::has_estimator(std::string_view name) { return find_method(name).has_gpu(); }

BlockScores CudaLayer::estimate(std::string_view name, const EstimatorConfig& config) const {
  const MethodInfo& m = find_method(name);  // throws for an unknown name, listing the valid ones
  if (!m.has_gpu()) throw Error("cuda: no GPU implementation of estimator '" + m.name + "' (it runs on the CPU)");
  validate_estimator_config(config, impl_->s.q_heads, m.name);
  return m.estimate_gpu(*this, config);
}

std::vector<double> CudaLayer::last_block_mass(int block) const {
  const Impl& m = *impl_;
  check_block(block, "last_block_mass");
  const int nb = num_blocks_for(m.s.seq_len, block);
  KernelTimer t;
  kk::DeviceBuffer mass = m.last_mass(block);
  impl_->last_ms = t.stop();
  const std::vector<float> f = download<float>(mass, size_t(m.s.q_heads) * nb, "last-block mass");
  return std::vector<double>(f.begin(), f.end());
}

Budgets CudaLayer::dynamic_budget(int block, const BudgetConfig& config) const {
  const Impl& m = *impl_;
  validate_budget_config(config);
  check_block(block, "dynamic_budget");
  const int nb = num_blocks_for(m.s.seq_len, block), H = m.s.q_heads;
  kk::DeviceBuffer kh = alloc(sizeof(int32_t) * H, "budgets"), kept = alloc(sizeof(double) * H, "budget mass");
  KernelTimer t;
  kk::DeviceBuffer mass = m.last_mass(block);
  kk::BudgetParams p;
  p.mass = mass.as<float>();
  p.heads = H;
  p.num_blocks = nb;
  p.gamma = config.gamma;
  p.k_min = config.k_min;
  p.k_out = kh.as<int32_t>();
  p.kept = kept.as<double>();
  check(kk::dynamic_budget(p), "dynamic_budget");
  impl_->last_ms = t.stop();
  const std::vector<int32_t> k = download<int32_t>(kh, H, "budgets");
  Budgets b;
  b.kind = "dynamic";
  b.heads = H;
  b.num_blocks = nb;
  b.per_head_k.resize(H);
  b.per_row_k.resize(size_t(H) * nb);
  b.last_block_mass = download<double>(kept, H, "budget mass");
  for (int h = 0; h < H; ++h) {
    b.per_head_k[h] = k[h];
    for (int i = 0; i < nb; ++i) b.per_row_k[size_t(h) * nb + i] = row_budget(k[h], i, nb, config.mode);
  }
  return b;
}

BlockMask select_blocks_cuda(const BlockScores& scores, const Budgets& budgets, const SelectOptions& options) {
  const int H = scores.heads, nb = scores.num_blocks;
  if (H <= 0 || nb <= 0 || scores.score.size() != size_t(H) * nb * nb)
    throw Error("cuda: select_blocks: scores of '" + scores.method + "' are empty or mis-shaped");
  if (budgets.heads != H || budgets.num_blocks != nb || budgets.per_row_k.size() != size_t(H) * nb)
    throw Error("cuda: select_blocks: budgets (" + std::to_string(budgets.heads) + " heads x " +
                std::to_string(budgets.num_blocks) + " blocks) do not match the scores (" + std::to_string(H) +
                " x " + std::to_string(nb) + ")");
  if (options.local_window < 0) throw Error("cuda: select_blocks: local_window must be >= 0");
  if (!cuda_available()) throw Error("cuda: " + cuda_device_description());
  kk::DeviceBuffer sc = alloc(scores.score.size() * sizeof(float), "scores");
  kk::DeviceBuffer rk = alloc(budgets.per_row_k.size() * sizeof(int32_t), "row budgets");
  kk::DeviceBuffer ip = alloc((size_t(H) * nb + 1) * sizeof(int32_t), "indptr");
  check(sc.upload(scores.score.data(), scores.score.size() * sizeof(float)), "uploading scores");
  check(rk.upload(budgets.per_row_k.data(), budgets.per_row_k.size() * sizeof(int32_t)), "uploading budgets");
  kk::SelectParams p;
  p.scores = sc.as<float>();
  p.score_heads = H;
  p.heads = H;
  p.num_blocks = nb;
  p.row_k = rk.as<int32_t>();
  p.sink = options.sink;
  p.diagonal = options.diagonal;
  p.local_window = options.local_window;
  p.indptr = ip.as<int32_t>();
  check(kk::select_counts(p), "select_counts");
  std::vector<int32_t> indptr = download<int32_t>(ip, size_t(H) * nb + 1, "indptr");
  kk::DeviceBuffer ix = alloc(size_t(indptr.back()) * sizeof(int32_t), "indices");
  p.indices = ix.as<int32_t>();
  check(kk::select_fill(p), "select_fill");
  std::vector<int32_t> indices = download<int32_t>(ix, size_t(indptr.back()), "indices");
  return BlockMask(H, scores.seq_len, scores.block, std::move(indptr), std::move(indices));
}

BlockMask native_select_cuda(const BlockScores& scores, const EstimatorConfig& config) {
  const int H = scores.heads, nb = scores.num_blocks;
  if (H <= 0 || nb <= 0 || scores.score.size() != size_t(H) * nb * nb)
    throw Error("cuda: native_select: scores of '" + scores.method + "' are empty or mis-shaped");
  const MethodInfo* method = nullptr;
  for (const MethodInfo* m : all_methods())
    if (m->name == scores.method) method = m;
  if (!method || !method->device_native)
    throw Error("cuda: native_select: '" + scores.method + "' has no score-only native rule on the GPU");
  validate_estimator_config(config, 0, method->name);
  const DeviceNative rule = method->device_native(config);
  kk::NativeSelectParams p;
  p.rule = rule.rule == DeviceNativeRule::cumulative ? kk::NativeRule::cumulative : kk::NativeRule::xattn;
  p.threshold = rule.threshold;
  if (!cuda_available()) throw Error("cuda: " + cuda_device_description());
  const size_t cells = scores.score.size(), rows = size_t(H) * nb;
  kk::DeviceBuffer sc = alloc(cells * sizeof(float), "scores"), bm = alloc(cells, "native bitmap");
  kk::DeviceBuffer counts = alloc(rows * sizeof(int32_t), "native row counts");
  kk::DeviceBuffer ip = alloc((rows + 1) * sizeof(int32_t), "indptr");
  check(sc.upload(scores.score.data(), cells * sizeof(float)), "uploading scores");
  p.scores = sc.as<float>();
  p.heads = H;
  p.num_blocks = nb;
  p.bitmap = bm.as<uint8_t>();
  p.row_counts = counts.as<int32_t>();
  check(kk::native_select(p), "native_select");
  kk::CsrParams c;
  c.bitmap = bm.as<uint8_t>();
  c.row_counts = counts.as<int32_t>();
  c.heads = H;
  c.num_blocks = nb;
  c.indptr = ip.as<int32_t>();
  check(kk::csr_indptr(c), "csr_indptr");
  std::vector<int32_t> indptr = download<int32_t>(ip, rows + 1, "indptr");
  kk::DeviceBuffer ix = alloc(size_t(indptr.back()) * sizeof(int32_t), "indices");
  c.indices = ix.as<int32_t>();
  check(kk::csr_fill(c), "csr_fill");
  std::vector<int32_t> indices = download<int32_t>(ix, size_t(indptr.back()), "indices");
  return BlockMask(H, scores.seq_len, scores.block, std::move(indptr), std::move(indices));
}

AttentionOutput full_attention_cuda(ConstView q, ConstView k, ConstView v, DType dtype) {
  return CudaLayer(q, k, v, dtype).full_attention();
}
AttentionOutput sparse_attention_cuda(ConstView q, ConstView k, ConstView v, const BlockMask& mask, DType dtype) {
  return CudaLayer(q, k, v, dtype).sparse_attention(mask);
}
BlockMass block_mass_cuda(ConstView q, ConstView k, int block, DType dtype) {
  return CudaLayer(q, k, {}, dtype).block_mass(block);
}

}  // namespace proxyattn
