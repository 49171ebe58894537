// Output error of a block-sparse attention against full attention, reduced per head on the
// device (the analysis' `output_error` under --device cuda): sq_diff[h] += sum over the head's
// N x d outputs of (o - o_ref)^2 and sq_ref[h] += sum of o_ref^2, in float64. The [Hq, N, d]
// outputs never leave the device: at 128K one head's output is 64 MB.
#include "common.cuh"

namespace proxyattn::kernels {

using detail::fail;

namespace detail {
namespace {

constexpr int kThreads = 256;

__global__ void output_error_kernel(const float* __restrict__ o_ref, const float* __restrict__ o, int64_t per_head,
                                    int64_t chunk, double* __restrict__ sq_diff, double* __restrict__ sq_ref) {
  const int h = blockIdx.y;
  const int64_t begin = int64_t(blockIdx.x) * chunk, end = begin + chunk < per_head ? begin + chunk : per_head;
  const float* r = o_ref + int64_t(h) * per_head;
  const float* x = o + int64_t(h) * per_head;
  double dsum = 0, rsum = 0;
  for (int64_t t = begin + threadIdx.x; t < end; t += kThreads) {
    const double a = r[t], diff = double(x[t]) - a;
    dsum += diff * diff;
    rsum += a * a;
  }
  // Warp, then block reduction; one float64 atomic per block and head.
  for (int off = 16; off > 0; off >>= 1) {
    dsum += __shfl_xor_sync(0xffffffffu, dsum, off);
    rsum += __shfl_xor_sync(0xffffffffu, rsum, off);
  }
  __shared__ double sd[kThreads / 32], sr[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sd[warp] = dsum;
    sr[warp] = rsum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double a = 0, b = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      a += sd[w];
      b += sr[w];
    }
    atomicAdd(sq_diff + h, a);
    if (sq_ref) atomicAdd(sq_ref + h, b);
  }
}

}  // namespace
}  // namespace detail

Status output_error_sums(const OutputErrorParams& p) noexcept {
  if (!p.o_ref || !p.o || !p.sq_diff) return fail(Status::invalid_argument, "output_error_sums: null pointer");
  if (p.heads <= 0 || p.heads > 65535 || p.seq_len <= 0 || p.head_dim <= 0)
    return fail(Status::invalid_argument, "output_error_sums: heads in [1, 65535], seq_len and head_dim > 0");
  const int64_t per_head = p.seq_len * p.head_dim;
  // About 8 blocks per SM in all; each block a contiguous chunk of one head.
  const int64_t chunk = 64 * int64_t(detail::kThreads);
  const int64_t chunks = (per_head + chunk - 1) / chunk;
  if (chunks > 2147483647) return fail(Status::invalid_argument, "output_error_sums: head too large");
  const dim3 grid(unsigned(chunks), unsigned(p.heads));
  detail::output_error_kernel<<<grid, detail::kThreads, 0, detail::stream_of(p.stream)>>>(p.o_ref, p.o, per_head, chunk,
                                                                                      p.sq_diff, p.sq_ref);
  return detail::check_launch("output_error_sums launch");
}

}  // namespace proxyattn::kernels
