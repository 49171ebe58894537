// Kernel timings on the GPU (not a test): full causal attention per tile variant, block-sparse
// attention at several densities (random per-head blocks + diagonal, block 128, as the
// FlexAttention anchor), the ProxyAttn estimation pipeline (pool, proxy LSE, max-pool scores,
// last-block mass, dynamic budget, selection; then est.fused_*: the same with the one-pass
// fused_block_scores) and the oracle block mass. Shape of
// PERFORMANCE.md: bf16, 32 query heads, 8 KV heads, d 128, causal. CUDA-event medians.
//
//   proxyattn_kernel_bench [--lengths 4096,32768] [--variants 0,1,2] [--impls portable,hopper] [--reps 5]
//                          [--sparse-lengths 32768] [--est-lengths 32768,131072] [--csv FILE]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "proxyattn/kernels.h"

namespace kk = proxyattn::kernels;

namespace {

#define CK(x)                                                                                     \
  do {                                                                                            \
    kk::Status s_ = (x);                                                                          \
    if (s_ != kk::Status::ok) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s -> %s (%s)\n", __FILE__, __LINE__, #x, kk::status_string(s_), \
                   kk::last_error_detail());                                                      \
      throw std::runtime_error("kernel launch failed");                                           \
    }                                                                                             \
  } while (0)

__global__ void random_bf16(__nv_bfloat16* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed ^ uint32_t(i >> 32) * 40503u;
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    // Sum of two uniforms: roughly bell-shaped in [-scale, scale].
    const float u = float(x & 0xffff) / 65535.f + float(x >> 16) / 65535.f - 1.f;
    p[i] = __float2bfloat16_rn(u * scale);
  }
}

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> out;
  std::string str(s);
  size_t pos = 0;
  while (pos < str.size()) {
    size_t e = str.find(',', pos);
    if (e == std::string::npos) e = str.size();
    if (e > pos) out.push_back(std::stoll(str.substr(pos, e - pos)));
    pos = e + 1;
  }
  return out;
}

struct Buf {
  kk::DeviceBuffer b;
  explicit Buf(size_t bytes) { CK(b.allocate(bytes)); }
  void* p() const { return b.data(); }
};

void fill_random(const Buf& b, int64_t n, uint32_t seed, float scale) {
  random_bf16<<<4096, 256>>>(static_cast<__nv_bfloat16*>(b.p()), n, seed, scale);
  CK(kk::synchronize());
}

template <class F>
double median_ms(int reps, F&& f) {
  f();  // warm-up
  CK(kk::synchronize());
  std::vector<float> t;
  for (int r = 0; r < reps; ++r) {
    kk::EventTimer tm;
    CK(tm.start());
    f();
    CK(tm.stop());
    float ms = 0;
    CK(tm.elapsed_ms(&ms));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

constexpr int HQ = 32, HKV = 8, D = 128;

double causal_flops(int64_t n) { return 2.0 * double(n) * double(n) * D * HQ; }  // 4 N^2 d H / 2

FILE* g_csv = nullptr;
void row(const char* what, int64_t n, const std::string& cfg, double ms, double tflops, double extra) {
  std::printf("%-14s N=%-7lld %-22s %10.3f ms %8.1f TFLOP/s %s%.3f\n", what, (long long)n, cfg.c_str(), ms, tflops,
              extra >= 0 ? "x=" : "", extra >= 0 ? extra : 0.0);
  if (g_csv)
    std::fprintf(g_csv, "%s,%lld,%s,%.4f,%.2f,%.4f\n", what, (long long)n, cfg.c_str(), ms, tflops, extra);
  std::fflush(stdout);
}

struct Layer {
  int64_t n;
  Buf q, k, v, o;
  explicit Layer(int64_t n_)
      : n(n_), q(size_t(HQ) * n * D * 2), k(size_t(HKV) * n * D * 2), v(size_t(HKV) * n * D * 2), o(size_t(HQ) * n * D * 2) {
    fill_random(q, int64_t(HQ) * n * D, 1234u + uint32_t(n), 2.0f);
    fill_random(k, int64_t(HKV) * n * D, 99u + uint32_t(n), 2.0f);
    fill_random(v, int64_t(HKV) * n * D, 7u + uint32_t(n), 1.0f);
  }
  kk::AttentionParams params() const {
    kk::AttentionParams p;
    p.q = q.p();
    p.k = k.p();
    p.v = v.p();
    p.o = o.p();
    p.in_type = kk::ElemType::bf16;
    p.out_type = kk::ElemType::bf16;
    p.q_heads = HQ;
    p.kv_heads = HKV;
    p.head_dim = D;
    p.seq_len = n;
    return p;
  }
};

int reps_for(int64_t n, int reps) { return n >= 65536 ? std::max(2, reps / 2) : reps; }

double bench_full(const Layer& L, kk::AttnImpl impl, int variant, int reps) {
  kk::AttentionParams p = L.params();
  p.impl = impl;
  p.variant = variant;
  return median_ms(reps_for(L.n, reps), [&] { CK(kk::full_attention(p)); });
}

// Random per-head mask: each off-diagonal causal block kept with probability p, diagonal always.
void random_mask(int64_t n, int block, double p, std::vector<int32_t>& indptr, std::vector<int32_t>& indices,
                 uint64_t seed) {
  const int nb = int((n + block - 1) / block);
  std::mt19937_64 rng(seed);
  std::bernoulli_distribution keep(p);
  indptr.assign(1, 0);
  indices.clear();
  for (int h = 0; h < HQ; ++h)
    for (int i = 0; i < nb; ++i) {
      for (int j = 0; j < i; ++j)
        if (p >= 1.0 || keep(rng)) indices.push_back(j);
      indices.push_back(i);
      indptr.push_back(int32_t(indices.size()));
    }
}

}  // namespace

int run_bench(int argc, char** argv) {
  std::vector<int64_t> lengths = {4096, 8192, 16384, 32768, 65536, 131072};
  std::vector<int64_t> variants = {0, 1, 2, 3};
  std::vector<int64_t> sparse_lengths = {32768, 131072};
  std::vector<int64_t> est_lengths = {32768, 131072};
  std::vector<kk::AttnImpl> impls = {kk::AttnImpl::portable, kk::AttnImpl::hopper};
  int reps = 5;
  const char* csv = nullptr;
  for (int a = 1; a < argc; ++a) {
    auto next = [&]() -> const char* {
      if (a + 1 >= argc) {
        throw std::invalid_argument(std::string("missing value after ") + argv[a]);
      }
      return argv[++a];
    };
    if (!std::strcmp(argv[a], "--lengths")) lengths = parse_list(next());
    else if (!std::strcmp(argv[a], "--variants")) variants = parse_list(next());
    else if (!std::strcmp(argv[a], "--sparse-lengths")) sparse_lengths = parse_list(next());
    else if (!std::strcmp(argv[a], "--est-lengths")) est_lengths = parse_list(next());
    else if (!std::strcmp(argv[a], "--impls")) {
      impls.clear();
      for (const char* t = next(); *t;) {
        const char* e = std::strchr(t, ',');
        const std::string w(t, e ? size_t(e - t) : std::strlen(t));
        if (w == "portable") impls.push_back(kk::AttnImpl::portable);
        else if (w == "hopper") impls.push_back(kk::AttnImpl::hopper);
        else throw std::invalid_argument("--impls: unknown '" + w + "' (portable, hopper)");
        t = e ? e + 1 : t + std::strlen(t);
      }
    } else if (!std::strcmp(argv[a], "--reps")) reps = std::atoi(next());
    else if (!std::strcmp(argv[a], "--csv")) csv = next();
    else {
      std::fprintf(stderr, "unknown argument %s\n", argv[a]);
      return 2;
    }
  }
  if (kk::device_count() == 0) {
    std::fprintf(stderr, "no CUDA device: %s\n", kk::last_error_detail());
    return 77;
  }
  kk::DeviceInfo info;
  CK(kk::device_info(0, &info));
  std::printf("device: %s, %d SMs, sm_%d%d\n", info.name, info.sm_count, info.cc_major, info.cc_minor);
  if (csv) {
    g_csv = std::fopen(csv, "w");
    if (g_csv) std::fprintf(g_csv, "what,N,config,ms,tflops,extra\n");
  }

  // The Hopper kernels only where the device takes them (compute capability 9.x).
  if (info.cc_major != 9) impls.erase(std::remove(impls.begin(), impls.end(), kk::AttnImpl::hopper), impls.end());

  // ---- full attention ----
  std::vector<std::pair<int64_t, double>> best_full;  // N -> best ms of any impl / variant
  for (int64_t n : lengths) {
    Layer L(n);
    double best = 1e30;
    for (kk::AttnImpl impl : impls)
      for (int64_t v : variants) {
        if (impl == kk::AttnImpl::hopper && v != variants.front()) break;  // one schedule
        const double ms = bench_full(L, impl, int(v), reps);
        best = std::min(best, ms);
        const std::string cfg = impl == kk::AttnImpl::hopper ? "hopper" : "variant" + std::to_string(v);
        row("full", n, cfg, ms, causal_flops(n) / (ms * 1e9), -1);
      }
    best_full.push_back({n, best});
  }
  auto full_ms = [&](int64_t n, const Layer& L) {
    for (auto& [m, ms] : best_full)
      if (m == n) return ms;
    const double ms = bench_full(L, impls.back(), 0, reps);
    best_full.push_back({n, ms});
    return ms;
  };

  // ---- block-sparse attention ----
  for (int64_t n : sparse_lengths) {
    Layer L(n);
    const double fms = full_ms(n, L);
    for (double dens : {1.0, 0.5, 0.2, 0.1}) {
      std::vector<int32_t> indptr, indices;
      random_mask(n, 128, dens, indptr, indices, 42);
      const int nb = int((n + 127) / 128);
      const double density = double(indices.size()) / (double(HQ) * nb * (nb + 1) / 2.0);
      Buf ip(indptr.size() * 4), ix(indices.size() * 4);
      CK(ip.b.upload(indptr.data(), indptr.size() * 4));
      CK(ix.b.upload(indices.data(), indices.size() * 4));
      for (kk::AttnImpl impl : impls) {
        kk::SparseAttentionParams sp;
        sp.attn = L.params();
        sp.attn.impl = impl;
        sp.indptr = ip.b.as<int32_t>();
        sp.indices = ix.b.as<int32_t>();
        sp.block = 128;
        const double ms = median_ms(reps_for(n, reps), [&] { CK(kk::sparse_attention(sp)); });
        char cfg[96];
        std::snprintf(cfg, sizeof cfg, "%s B128 density %.3f", kk::attn_impl_name(impl), density);
        // extra = time / (density x best full time); target <= 1.2 (issue 5), 1.1 (P2)
        row("sparse", n, cfg, ms, causal_flops(n) * density / (ms * 1e9), ms / (density * fms));
      }
    }
  }

  // ---- ProxyAttn estimation (g = 1, block 128) and oracle mass ----
  for (int64_t n : est_lengths) {
    Layer L(n);
    const double fms = full_ms(n, L);
    const int B = 128, nb = int((n + B - 1) / B), G = 1;
    Buf qg(size_t(G) * n * D * 2), kg(size_t(G) * n * D * 2), lse_g(size_t(G) * n * 4), ag(size_t(G) * nb * nb * 4);
    Buf lse_h(size_t(HQ) * n * 4), mass(size_t(HQ) * nb * 4), kh(HQ * 4), kept(HQ * 8);
    Buf indptr(size_t(HQ) * nb * 4 + 4);
    kk::PoolHeadsParams pq, pk;
    pq.src = L.q.p();
    pq.dst = qg.p();
    pq.heads = HQ;
    pk.src = L.k.p();
    pk.dst = kg.p();
    pk.heads = HKV;
    pq.type = pk.type = kk::ElemType::bf16;
    pq.head_dim = pk.head_dim = D;
    pq.groups = pk.groups = G;
    pq.seq_len = pk.seq_len = n;
    pq.head_begin[0] = 0;
    pq.head_end[0] = HQ;
    pk.head_begin[0] = 0;
    pk.head_end[0] = HKV;
    kk::AttentionParams pl = L.params();
    pl.q = qg.p();
    pl.k = kg.p();
    pl.v = nullptr;
    pl.o = nullptr;
    pl.q_heads = pl.kv_heads = G;
    pl.lse = static_cast<float*>(lse_g.p());
    kk::BlockScoreParams ps;
    ps.q = qg.p();
    ps.k = kg.p();
    ps.lse = static_cast<float*>(lse_g.p());
    ps.out = static_cast<float*>(ag.p());
    ps.in_type = kk::ElemType::bf16;
    ps.q_heads = ps.kv_heads = G;
    ps.head_dim = D;
    ps.seq_len = n;
    ps.block = B;
    ps.reduce = kk::BlockReduce::max;
    kk::AttentionParams plast = L.params();
    plast.v = nullptr;
    plast.o = nullptr;
    plast.lse = static_cast<float*>(lse_h.p());
    plast.row_begin = int64_t(nb - 1) * B;
    kk::BlockScoreParams pm;
    pm.q = L.q.p();
    pm.k = L.k.p();
    pm.lse = static_cast<float*>(lse_h.p());
    pm.out = static_cast<float*>(mass.p());
    pm.in_type = kk::ElemType::bf16;
    pm.q_heads = HQ;
    pm.kv_heads = HKV;
    pm.head_dim = D;
    pm.seq_len = n;
    pm.block = B;
    pm.row_block_begin = nb - 1;
    kk::BudgetParams pb;
    pb.mass = static_cast<float*>(mass.p());
    pb.heads = HQ;
    pb.num_blocks = nb;
    pb.gamma = 0.95;
    pb.k_min = 2;
    pb.k_out = kh.b.as<int32_t>();
    pb.kept = kept.b.as<double>();
    kk::SelectParams sel;
    sel.scores = static_cast<float*>(ag.p());
    sel.score_heads = G;
    sel.heads = HQ;
    sel.num_blocks = nb;
    sel.head_k = kh.b.as<int32_t>();
    sel.indptr = indptr.b.as<int32_t>();
    const int r = reps_for(n, reps);
    const double t_pool = median_ms(r, [&] { CK(kk::pool_heads(pq)); CK(kk::pool_heads(pk)); });
    const double t_lse = median_ms(r, [&] { CK(kk::row_lse(pl)); });
    const double t_score = median_ms(r, [&] { CK(kk::block_scores(ps)); });
    const double t_budget = median_ms(r, [&] { CK(kk::row_lse(plast)); CK(kk::block_scores(pm)); CK(kk::dynamic_budget(pb)); });
    // indices sized by the counts of the budgets just computed
    std::vector<int32_t> khost(HQ);
    CK(kh.b.download(khost.data(), HQ * 4));
    CK(kk::select_counts(sel));
    int32_t n_sel = 0;
    CK(kk::copy_to_host(&n_sel, indptr.b.as<int32_t>() + size_t(HQ) * nb, 4));
    Buf indices(size_t(n_sel) * 4 + 16);
    sel.indices = indices.b.as<int32_t>();
    const double t_select = median_ms(r, [&] { CK(kk::select_counts(sel)); CK(kk::select_fill(sel)); });
    const double total = t_pool + t_lse + t_score + t_budget + t_select;
    double mean_k = 0;
    for (int h = 0; h < HQ; ++h) mean_k += khost[h];
    mean_k /= HQ;
    row("est.pool", n, "g1", t_pool, 0, -1);
    row("est.proxy_lse", n, "g1", t_lse, 0, -1);
    row("est.proxy_max", n, "g1 B128", t_score, 0, -1);
    row("est.budget", n, "gamma .95", t_budget, 0, mean_k);  // extra = mean k_h
    row("est.select", n, "B128", t_select, 0, -1);
    row("est.total", n, "vs full", total, 0, total / fms);  // extra = fraction of full time

    // The same estimation with fused_block_scores: LSE + max-pool in one pass (the proxy
    // scores) and the last-block mass in one key-split pass (the budget); 1 = one pass ran.
    kk::FusedScoreParams fs, fm;
    bool one_s = false, one_m = false;
    fs.scores = ps;
    fs.lse_out = static_cast<float*>(lse_g.p());
    fs.one_pass = &one_s;
    fm.scores = pm;
    fm.one_pass = &one_m;
    Buf ws(std::max(kk::fused_block_scores_workspace(fs), kk::fused_block_scores_workspace(fm)) + 16);
    fs.workspace = fm.workspace = ws.p();
    fs.workspace_bytes = fm.workspace_bytes = ws.b.bytes();
    const double t_fscore = median_ms(r, [&] { CK(kk::fused_block_scores(fs)); });
    const double t_fbudget = median_ms(r, [&] { CK(kk::fused_block_scores(fm)); CK(kk::dynamic_budget(pb)); });
    const double t_fmass = median_ms(r, [&] { CK(kk::fused_block_scores(fm)); });
    const double ftotal = t_pool + t_fscore + t_fbudget + t_select;
    row("est.fused_scores", n, "g1 B128 lse+max", t_fscore, 0, one_s ? 1 : 0);
    row("est.fused_mass", n, "last block", t_fmass, 0, one_m ? 1 : 0);
    row("est.fused_budget", n, "gamma .95", t_fbudget, 0, one_m ? 1 : 0);
    row("est.fused_total", n, "vs full", ftotal, 0, ftotal / fms);

    // Oracle mass (two passes) over all heads.
    Buf mfull(size_t(HQ) * nb * nb * 4);
    kk::AttentionParams pa = L.params();
    pa.v = nullptr;
    pa.o = nullptr;
    pa.lse = static_cast<float*>(lse_h.p());
    kk::BlockScoreParams po = pm;
    po.out = static_cast<float*>(mfull.p());
    po.row_block_begin = 0;
    const double t_mass = median_ms(std::max(2, r / 2), [&] { CK(kk::row_lse(pa)); CK(kk::block_scores(po)); });
    row("oracle_mass", n, "B128 two passes", t_mass, 2.0 * causal_flops(n) / 2 / (t_mass * 1e9), t_mass / fms);
  }
  if (g_csv) std::fclose(g_csv);
  return 0;
}

// Errors propagate here as exceptions: one line on stderr, non-zero exit.
int main(int argc, char** argv) {
  try {
    return run_bench(argc, argv);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "proxyattn_kernel_bench: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "proxyattn_kernel_bench: error: %s\n", e.what());
    return 1;
  }
}
