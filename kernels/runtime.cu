// Runtime services behind the CUDA-free API: status text, device queries, memory, dtype
// conversion, fills, L2 flush and event timing. Kernels first, then the host functions.
#include <cstring>
#include <mutex>

#include "common.cuh"

namespace proxyattn::kernels {
namespace detail {

namespace {
thread_local char g_detail[512] = {0};

template <class D>
__global__ void convert_from_f32(const float* __restrict__ src, D* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_float<D>(src[i]);
}
template <class S>
__global__ void convert_to_f32(const S* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = to_float(src[i]);
}
template <class S, class D>
__global__ void convert_16(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_float<D>(to_float(src[i]));
}
template <class T>
__global__ void fill_kernel(T* dst, int64_t n, T value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = value;
}

unsigned grid_for(int64_t n) {
  int64_t g = (n + 255) / 256;
  return unsigned(g < 1 ? 1 : (g > 65535 ? 65535 : g));
}
}  // namespace

Status fail(Status st, const char* what) noexcept {
  std::snprintf(g_detail, sizeof g_detail, "%s", what);
  return st;
}

Status from_cuda(cudaError_t e, const char* where) noexcept {
  if (e == cudaSuccess) return Status::ok;
  std::snprintf(g_detail, sizeof g_detail, "%s: %s (%s)", where, cudaGetErrorName(e), cudaGetErrorString(e));
  if (e == cudaErrorMemoryAllocation) return Status::out_of_memory;
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) return Status::no_device;
  return Status::cuda_error;
}

Status check_launch(const char* where) noexcept { return from_cuda(cudaGetLastError(), where); }

}  // namespace detail

using detail::fail;
using detail::from_cuda;
using detail::stream_of;

const char* status_string(Status s) noexcept {
  switch (s) {
    case Status::ok: return "ok";
    case Status::no_cuda: return "built without CUDA";
    case Status::no_device: return "no CUDA device";
    case Status::invalid_argument: return "invalid argument";
    case Status::unsupported: return "unsupported";
    case Status::out_of_memory: return "out of device memory";
    case Status::cuda_error: return "CUDA error";
  }
  return "unknown status";
}

const char* last_error_detail() noexcept { return detail::g_detail; }

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

Status set_device(int device) noexcept { return from_cuda(cudaSetDevice(device), "cudaSetDevice"); }

Status init_context() noexcept { return from_cuda(cudaFree(nullptr), "cudaFree(0)"); }

Status current_device(int* current) noexcept {
  if (!current) return fail(Status::invalid_argument, "current_device: null output");
  return from_cuda(cudaGetDevice(current), "cudaGetDevice");
}

Status device_info(int device, DeviceInfo* out) noexcept {
  if (!out) return fail(Status::invalid_argument, "device_info: null output");
  cudaDeviceProp prop{};
  Status s = from_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  if (s != Status::ok) return s;
  std::snprintf(out->name, sizeof out->name, "%s", prop.name);
  out->sm_count = prop.multiProcessorCount;
  out->cc_major = prop.major;
  out->cc_minor = prop.minor;
  out->global_mem = prop.totalGlobalMem;
  out->l2_bytes = size_t(prop.l2CacheSize);
  return Status::ok;
}

int elem_size(ElemType t) noexcept { return t == ElemType::f32 ? 4 : 2; }

Status device_alloc(void** ptr, size_t bytes) noexcept {
  if (!ptr) return fail(Status::invalid_argument, "device_alloc: null output");
  *ptr = nullptr;
  return from_cuda(cudaMallocAsync(ptr, bytes, cudaStreamPerThread), "cudaMallocAsync");
}
Status device_free(void* ptr) noexcept {
  return ptr ? from_cuda(cudaFreeAsync(ptr, cudaStreamPerThread), "cudaFreeAsync") : Status::ok;
}
Status copy_to_device(void* dst, const void* src, size_t bytes, Stream s) noexcept {
  if (bytes == 0) return Status::ok;
  return from_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_of(s)), "copy_to_device");
}
Status copy_to_host(void* dst, const void* src, size_t bytes, Stream s) noexcept {
  if (bytes == 0) return Status::ok;
  Status st = from_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_of(s)), "copy_to_host");
  if (st != Status::ok) return st;
  return from_cuda(cudaStreamSynchronize(stream_of(s)), "copy_to_host sync");
}
Status copy_device(void* dst, const void* src, size_t bytes, Stream s) noexcept {
  if (bytes == 0) return Status::ok;
  return from_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_of(s)), "copy_device");
}
Status memset_device(void* dst, int byte, size_t bytes, Stream s) noexcept {
  if (bytes == 0) return Status::ok;
  return from_cuda(cudaMemsetAsync(dst, byte, bytes, stream_of(s)), "memset_device");
}
Status synchronize(Stream s) noexcept { return from_cuda(cudaStreamSynchronize(stream_of(s)), "synchronize"); }

Status convert(const void* src, ElemType st, void* dst, ElemType dt, int64_t n, Stream s) noexcept {
  if (n < 0 || (n > 0 && (!src || !dst))) return fail(Status::invalid_argument, "convert: bad arguments");
  if (n == 0) return Status::ok;
  cudaStream_t cs = stream_of(s);
  const unsigned g = detail::grid_for(n);
  using bf = __nv_bfloat16;
  if (st == dt) return copy_device(dst, src, size_t(n) * elem_size(st), s);
  if (st == ElemType::f32 && dt == ElemType::bf16)
    detail::convert_from_f32<bf><<<g, 256, 0, cs>>>(static_cast<const float*>(src), static_cast<bf*>(dst), n);
  else if (st == ElemType::f32 && dt == ElemType::f16)
    detail::convert_from_f32<__half><<<g, 256, 0, cs>>>(static_cast<const float*>(src), static_cast<__half*>(dst), n);
  else if (st == ElemType::bf16 && dt == ElemType::f32)
    detail::convert_to_f32<bf><<<g, 256, 0, cs>>>(static_cast<const bf*>(src), static_cast<float*>(dst), n);
  else if (st == ElemType::f16 && dt == ElemType::f32)
    detail::convert_to_f32<__half><<<g, 256, 0, cs>>>(static_cast<const __half*>(src), static_cast<float*>(dst), n);
  else if (st == ElemType::bf16 && dt == ElemType::f16)
    detail::convert_16<bf, __half><<<g, 256, 0, cs>>>(static_cast<const bf*>(src), static_cast<__half*>(dst), n);
  else
    detail::convert_16<__half, bf><<<g, 256, 0, cs>>>(static_cast<const __half*>(src), static_cast<bf*>(dst), n);
  return detail::check_launch("convert");
}

Status fill(void* dst, ElemType t, int64_t n, float value, Stream s) noexcept {
  if (n < 0 || (n > 0 && !dst)) return fail(Status::invalid_argument, "fill: bad arguments");
  if (n == 0) return Status::ok;
  cudaStream_t cs = stream_of(s);
  const unsigned g = detail::grid_for(n);
  if (t == ElemType::f32)
    detail::fill_kernel<float><<<g, 256, 0, cs>>>(static_cast<float*>(dst), n, value);
  else if (t == ElemType::bf16)
    detail::fill_kernel<__nv_bfloat16><<<g, 256, 0, cs>>>(static_cast<__nv_bfloat16*>(dst), n,
                                                          __float2bfloat16_rn(value));
  else
    detail::fill_kernel<__half><<<g, 256, 0, cs>>>(static_cast<__half*>(dst), n, __float2half_rn(value));
  return detail::check_launch("fill");
}

Status flush_l2(Stream s) noexcept {
  // One process-wide scratch buffer of twice the L2 size, allocated on first use.
  static std::mutex mu;
  static void* buf = nullptr;
  static size_t bytes = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (!buf) {
    int dev = 0, l2 = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev);
    bytes = size_t(l2 > 0 ? l2 : (64 << 20)) * 2;
    Status st = from_cuda(cudaMalloc(&buf, bytes), "flush_l2 alloc");
    if (st != Status::ok) {
      buf = nullptr;
      return st;
    }
  }
  return from_cuda(cudaMemsetAsync(buf, 0, bytes, stream_of(s)), "flush_l2");
}

EventTimer::~EventTimer() {
  if (start_) cudaEventDestroy(static_cast<cudaEvent_t>(start_));
  if (stop_) cudaEventDestroy(static_cast<cudaEvent_t>(stop_));
}
Status EventTimer::start(Stream s) noexcept {
  if (!start_) {
    cudaEvent_t a, b;
    Status st = from_cuda(cudaEventCreate(&a), "cudaEventCreate");
    if (st != Status::ok) return st;
    st = from_cuda(cudaEventCreate(&b), "cudaEventCreate");
    if (st != Status::ok) {
      cudaEventDestroy(a);
      return st;
    }
    start_ = a;
    stop_ = b;
  }
  return from_cuda(cudaEventRecord(static_cast<cudaEvent_t>(start_), stream_of(s)), "cudaEventRecord");
}
Status EventTimer::stop(Stream s) noexcept {
  if (!stop_) return fail(Status::invalid_argument, "EventTimer::stop before start");
  return from_cuda(cudaEventRecord(static_cast<cudaEvent_t>(stop_), stream_of(s)), "cudaEventRecord");
}
Status EventTimer::elapsed_ms(float* ms) noexcept {
  if (!stop_ || !ms) return fail(Status::invalid_argument, "EventTimer::elapsed_ms before start/stop");
  Status st = from_cuda(cudaEventSynchronize(static_cast<cudaEvent_t>(stop_)), "cudaEventSynchronize");
  if (st != Status::ok) return st;
  return from_cuda(cudaEventElapsedTime(ms, static_cast<cudaEvent_t>(start_), static_cast<cudaEvent_t>(stop_)),
                   "cudaEventElapsedTime");
}

StagedUpload::~StagedUpload() {
  for (int b = 0; b < 2; ++b) {
    if (done_[b]) {
      cudaEventSynchronize(static_cast<cudaEvent_t>(done_[b]));  // no copy still reading the buffer
      cudaEventDestroy(static_cast<cudaEvent_t>(done_[b]));
    }
    if (buf_[b]) cudaFreeHost(buf_[b]);
  }
}
Status StagedUpload::init(size_t chunk_bytes) noexcept {
  if (chunk_ != 0) return fail(Status::invalid_argument, "StagedUpload::init twice");
  if (chunk_bytes == 0) return fail(Status::invalid_argument, "StagedUpload::init: zero bytes");
  for (int b = 0; b < 2; ++b) {
    Status st = from_cuda(cudaHostAlloc(&buf_[b], chunk_bytes, cudaHostAllocDefault), "cudaHostAlloc (staging)");
    if (st != Status::ok) return st;
    cudaEvent_t e;
    st = from_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    if (st != Status::ok) return st;
    done_[b] = e;
  }
  chunk_ = chunk_bytes;
  return Status::ok;
}
Status StagedUpload::stage(void** buffer) noexcept {
  if (!buffer) return fail(Status::invalid_argument, "StagedUpload::stage: null output");
  *buffer = nullptr;
  if (chunk_ == 0) return fail(Status::invalid_argument, "StagedUpload::stage before init");
  if (pending_[next_]) {
    Status st = from_cuda(cudaEventSynchronize(static_cast<cudaEvent_t>(done_[next_])), "staging wait");
    if (st != Status::ok) return st;
    pending_[next_] = false;
  }
  *buffer = buf_[next_];
  return Status::ok;
}
Status StagedUpload::push(void* dst, size_t bytes, Stream s) noexcept {
  if (chunk_ == 0 || bytes > chunk_) return fail(Status::invalid_argument, "StagedUpload::push: more than a chunk");
  if (bytes > 0) {
    Status st = from_cuda(cudaMemcpyAsync(dst, buf_[next_], bytes, cudaMemcpyHostToDevice, stream_of(s)),
                          "copy_to_device (staged)");
    if (st != Status::ok) return st;
    st = from_cuda(cudaEventRecord(static_cast<cudaEvent_t>(done_[next_]), stream_of(s)), "cudaEventRecord");
    if (st != Status::ok) return st;
    pending_[next_] = true;
  }
  next_ ^= 1;
  return Status::ok;
}
Status StagedUpload::finish() noexcept {
  for (int b = 0; b < 2; ++b)
    if (pending_[b]) {
      Status st = from_cuda(cudaEventSynchronize(static_cast<cudaEvent_t>(done_[b])), "staging wait");
      if (st != Status::ok) return st;
      pending_[b] = false;
    }
  return Status::ok;
}

}  // namespace proxyattn::kernels
