// Linear layers of the model runtime: cuBLASLt matmuls with bf16 operands and fp32 compute (the
// projection weights are [out, in] row-major, as GGUF and Hugging Face store them).
//
// Why cuBLASLt and a tuner rather than cublasGemmEx: on the prefill's shapes (16K token rows x
// the projections of an 8B model) the first algorithm of cuBLAS's heuristic runs at 75-85 % of the
// square 8192^3 GEMM, and the best of its first few candidates at 83-88 % (H200, probe of
// 2026-12-03). So the first call of each shape times the heuristic's candidates and keeps the
// fastest (PROXYATTN_GEMM_TUNE=0 keeps the heuristic's first: the same algorithm on every run).
// The tuned algorithm can differ between runs; every candidate computes the same product in fp32.
#include <cublasLt.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <mutex>
#include <tuple>
#include <vector>

#include "common.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace {

const char* cublas_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLAS error";
  }
}

Status from_cublas(cublasStatus_t cs, const char* what) {
  if (cs == CUBLAS_STATUS_SUCCESS) return Status::ok;
  return fail(cs == CUBLAS_STATUS_ALLOC_FAILED ? Status::out_of_memory : Status::cuda_error,
              (std::string(what) + ": " + cublas_name(cs)).c_str());
}

// Workspace per handle: NVIDIA recommends 32 MiB on Hopper (less rules out some of the faster
// kernels). One handle and workspace per host thread and device, so that threads never share a
// workspace.
constexpr size_t kWorkspaceBytes = size_t(32) << 20;
constexpr int kCandidates = 8;  // the heuristic's first 8: the probe's best was always among them

struct ThreadHandle {
  cublasLtHandle_t h = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
};

Status handle_for_thread(int dev, ThreadHandle** out) {
  struct Handles {
    ThreadHandle t[64];
    ~Handles() {
      for (auto& x : t) {
        if (x.h) cublasLtDestroy(x.h);
        if (x.ws) cudaFree(x.ws);
      }
    }
  };
  thread_local Handles handles;
  if (dev < 0 || dev >= 64) return fail(Status::unsupported, "gemm: device index over 63");
  ThreadHandle& t = handles.t[dev];
  if (!t.h) {
    if (Status st = from_cublas(cublasLtCreate(&t.h), "gemm: cublasLtCreate"); st != Status::ok) {
      t.h = nullptr;
      return st;
    }
    if (cudaMalloc(&t.ws, kWorkspaceBytes) == cudaSuccess) {
      t.ws_bytes = kWorkspaceBytes;
    } else {
      t.ws = nullptr;
      cudaGetLastError();  // run without a workspace: fewer algorithms, still correct
    }
  }
  *out = &t;
  return Status::ok;
}

// The descriptors of one problem shape (column-major view, see gemm()) and its chosen algorithm.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
  }
};

using PlanKey = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int, bool, size_t>;  // dev m n k ldy y beta ws

bool tuning_enabled() {
  const char* e = std::getenv("PROXYATTN_GEMM_TUNE");
  return !(e && std::strcmp(e, "0") == 0);
}

Status describe(const GemmParams& p, int64_t ldy, Plan& plan) {
  const cudaDataType yt = p.y_type == ElemType::f32 ? CUDA_R_32F : CUDA_R_16BF;
  Status st = from_cublas(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "gemm: desc");
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  if (st == Status::ok)
    st = from_cublas(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "gemm");
  if (st == Status::ok)
    st = from_cublas(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "gemm");
  // W stored [k, n] column-major (= [n, k] row-major), X [k, m], Y [n, m] with leading dim ldy.
  if (st == Status::ok)
    st = from_cublas(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_16BF, uint64_t(p.k), uint64_t(p.n), p.k), "gemm");
  if (st == Status::ok)
    st = from_cublas(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_16BF, uint64_t(p.k), uint64_t(p.m), p.k), "gemm");
  if (st == Status::ok)
    st = from_cublas(cublasLtMatrixLayoutCreate(&plan.c, yt, uint64_t(p.n), uint64_t(p.m), ldy), "gemm");
  return st;
}

cublasStatus_t launch(const ThreadHandle& t, const Plan& plan, const cublasLtMatmulAlgo_t& algo, const GemmParams& p,
                      void* y, cudaStream_t s) {
  return cublasLtMatmul(t.h, plan.desc, &p.alpha, p.w, plan.a, p.x, plan.b, &p.beta, y, plan.c, y, plan.c, &algo,
                        t.ws, t.ws_bytes, s);
}

// One warm-up, then the mean of 3 launches per candidate. Writes go to `y` when beta == 0 (the
// real launch overwrites it next) and to a scratch buffer otherwise (the residual stream must be
// accumulated exactly once). A candidate that fails to launch is skipped.
Status tune(const ThreadHandle& t, Plan& plan, const GemmParams& p, int64_t ldy,
            const cublasLtMatmulHeuristicResult_t* cand, int n_cand, cudaStream_t s) {
  plan.algo = cand[0].algo;
  if (n_cand < 2 || !tuning_enabled()) return Status::ok;
  void* y = p.y;
  void* scratch = nullptr;
  if (p.beta != 0.0f) {
    const size_t y_bytes = size_t(p.m) * size_t(ldy) * (p.y_type == ElemType::f32 ? 4 : 2);
    if (cudaMalloc(&scratch, y_bytes) != cudaSuccess) {
      cudaGetLastError();
      return Status::ok;  // no room to tune: keep the heuristic's first choice
    }
    y = scratch;
  }
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  Status st = detail::from_cuda(cudaEventCreate(&e0), "gemm tune: event");
  if (st == Status::ok) st = detail::from_cuda(cudaEventCreate(&e1), "gemm tune: event");
  float best_ms = -1;
  for (int i = 0; i < n_cand && st == Status::ok; ++i) {
    bool ok = launch(t, plan, cand[i].algo, p, y, s) == CUBLAS_STATUS_SUCCESS;
    ok = ok && cudaEventRecord(e0, s) == cudaSuccess;
    for (int r = 0; ok && r < 3; ++r) ok = launch(t, plan, cand[i].algo, p, y, s) == CUBLAS_STATUS_SUCCESS;
    ok = ok && cudaEventRecord(e1, s) == cudaSuccess;
    float ms = 0;
    ok = ok && cudaEventSynchronize(e1) == cudaSuccess && cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess;
    if (!ok) {
      // A launch error is sticky only for a broken context: then the real launch reports it.
      cudaGetLastError();
      continue;
    }
    if (best_ms < 0 || ms < best_ms) {
      best_ms = ms;
      plan.algo = cand[i].algo;
    }
  }
  if (e0) cudaEventDestroy(e0);
  if (e1) cudaEventDestroy(e1);
  if (scratch) cudaFree(scratch);
  return st;
}

// Plans outlive threads (an algorithm depends on the shape and the device, not the handle).
std::mutex g_plans_mutex;
std::map<PlanKey, std::unique_ptr<Plan>>& plans() {
  static auto* m = new std::map<PlanKey, std::unique_ptr<Plan>>();  // never destroyed: no exit-order issue
  return *m;
}

}  // namespace

Status gemm(const GemmParams& p) noexcept {
  if (!p.x || !p.w || !p.y || p.m <= 0 || p.n <= 0 || p.k <= 0)
    return fail(Status::invalid_argument, "gemm: null pointer or empty shape");
  if (p.y_type != ElemType::bf16 && p.y_type != ElemType::f32)
    return fail(Status::invalid_argument, "gemm: y must be bf16 or f32");
  if (p.beta != 0.0f && p.y_type != ElemType::f32)
    return fail(Status::invalid_argument, "gemm: accumulating into y (beta != 0) needs f32 y");
  const int64_t ldy = p.ldy ? p.ldy : p.n;
  if (ldy < p.n || p.m > 2147483647 || p.n > 2147483647 || p.k > 2147483647 || ldy > 2147483647)
    return fail(Status::invalid_argument, "gemm: leading dimension below n or a dimension over 2^31");
  int dev = 0;
  Status st = detail::from_cuda(cudaGetDevice(&dev), "gemm: cudaGetDevice");
  if (st != Status::ok) return st;
  ThreadHandle* t = nullptr;
  if ((st = handle_for_thread(dev, &t)) != Status::ok) return st;
  const cudaStream_t s = detail::stream_of(p.stream);
  try {
    const PlanKey key{dev, p.m, p.n, p.k, ldy, int(p.y_type), p.beta != 0.0f, t->ws_bytes};
    std::lock_guard<std::mutex> lock(g_plans_mutex);  // tuning is once per shape; launches are cheap
    auto it = plans().find(key);
    if (it == plans().end()) {
      auto plan = std::make_unique<Plan>();
      if ((st = describe(p, ldy, *plan)) != Status::ok) return st;
      cublasLtMatmulPreference_t pref = nullptr;
      st = from_cublas(cublasLtMatmulPreferenceCreate(&pref), "gemm: preference");
      if (st == Status::ok)
        st = from_cublas(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                              &t->ws_bytes, sizeof t->ws_bytes),
                         "gemm: preference");
      cublasLtMatmulHeuristicResult_t cand[kCandidates];
      int n_cand = 0;
      if (st == Status::ok)
        st = from_cublas(cublasLtMatmulAlgoGetHeuristic(t->h, plan->desc, plan->a, plan->b, plan->c, plan->c, pref,
                                                        kCandidates, cand, &n_cand),
                         "gemm: no cuBLASLt algorithm for this shape");
      if (pref) cublasLtMatmulPreferenceDestroy(pref);
      if (st == Status::ok && n_cand < 1) st = fail(Status::unsupported, "gemm: no cuBLASLt algorithm for this shape");
      if (st == Status::ok) st = tune(*t, *plan, p, ldy, cand, n_cand, s);
      if (st != Status::ok) return st;
      it = plans().emplace(key, std::move(plan)).first;
    }
    st = from_cublas(launch(*t, *it->second, it->second->algo, p, p.y, s), "gemm: cublasLtMatmul");
  } catch (const std::bad_alloc&) {
    return fail(Status::out_of_memory, "gemm: host allocation");
  }
  if (st != Status::ok) return st;
  return detail::check_launch("gemm (cublasLtMatmul)");
}

}  // namespace proxyattn::kernels
