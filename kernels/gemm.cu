// Linear layers of the model runtime: cuBLAS GEMMs with bf16 operands and fp32 compute (the
// projection weights are [out, in] row-major, as GGUF and Hugging Face store them). One handle
// per host thread and device, created on first use; it is bound to the caller's stream.
#include <cublas_v2.h>

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

// cuBLAS workspace per handle: NVIDIA recommends 32 MiB on Hopper (the default is smaller and
// rules out some of the faster kernels).
constexpr size_t kWorkspaceBytes = size_t(32) << 20;

// The calling thread's handle for the current device (handles are per device).
Status handle_for_thread(cublasHandle_t* out) {
  struct Handles {
    cublasHandle_t h[64] = {};
    void* ws[64] = {};
    ~Handles() {
      for (int i = 0; i < 64; ++i) {
        if (h[i]) cublasDestroy(h[i]);
        if (ws[i]) cudaFree(ws[i]);
      }
    }
  };
  thread_local Handles handles;
  int dev = 0;
  Status st = detail::from_cuda(cudaGetDevice(&dev), "gemm: cudaGetDevice");
  if (st != Status::ok) return st;
  if (dev < 0 || dev >= 64) return fail(Status::unsupported, "gemm: device index over 63");
  if (!handles.h[dev]) {
    const cublasStatus_t cs = cublasCreate(&handles.h[dev]);
    if (cs != CUBLAS_STATUS_SUCCESS) {
      handles.h[dev] = nullptr;
      return fail(cs == CUBLAS_STATUS_ALLOC_FAILED ? Status::out_of_memory : Status::cuda_error, cublas_name(cs));
    }
    if (cudaMalloc(&handles.ws[dev], kWorkspaceBytes) == cudaSuccess)
      cublasSetWorkspace(handles.h[dev], handles.ws[dev], kWorkspaceBytes);
    else
      cudaGetLastError();  // keep cuBLAS's default workspace
  }
  *out = handles.h[dev];
  return Status::ok;
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
  cublasHandle_t h = nullptr;
  Status st = handle_for_thread(&h);
  if (st != Status::ok) return st;
  cublasStatus_t cs = cublasSetStream(h, detail::stream_of(p.stream));
  // Column-major view: Y^T [n, m] = W [n, k] (op T of the col-major [k, n]) . X^T [k, m].
  if (cs == CUBLAS_STATUS_SUCCESS)
    cs = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(p.n), int(p.m), int(p.k), &p.alpha, p.w, CUDA_R_16BF, int(p.k),
                      p.x, CUDA_R_16BF, int(p.k), &p.beta, p.y, p.y_type == ElemType::f32 ? CUDA_R_32F : CUDA_R_16BF,
                      int(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (cs != CUBLAS_STATUS_SUCCESS) return fail(Status::cuda_error, cublas_name(cs));
  return detail::check_launch("gemm (cublasGemmEx)");
}

}  // namespace proxyattn::kernels
