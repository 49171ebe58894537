#!/usr/bin/env bash
# Focused GPU check of the Hopper attention kernels (faster than device_check.sh): build the
# Hopper test and the kernel timer, run the test, time hopper vs portable full and sparse
# attention. Run from the repository root on the GPU machine; logs under $OUT.
#   PROXYATTN_BENCH_LENGTHS (default 4096,16384,32768,65536,131072)
#   PROXYATTN_SPARSE_LENGTHS (default 131072)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/out/device_hopper}
BUILD=${PROXYATTN_DEVICE_BUILD:-$ROOT/build/device}
mkdir -p "$OUT"
START=$(date +%s)
stamp() { echo "[$(($(date +%s) - START))s] $*"; }
stamp "configure + build"
{
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPROXYATTN_ENABLE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90a -DPROXYATTN_PTXAS_VERBOSE=ON &&
    ninja -C "$BUILD" proxyattn_kernel_bench gpu_test_hopper_attention ${PROXYATTN_EXTRA_TARGETS:-}
  echo "build rc=$?"
} >"$OUT/build.log" 2>&1
grep -E "error|rc=" "$OUT/build.log" | head -20
grep -A2 "attn_sm90_kernel" "$OUT/build.log" | grep -E "registers|spill" | sort | uniq -c | head -6
stamp "hopper test"
timeout ${PROXYATTN_TEST_TIMEOUT:-240} "$BUILD/tests/gpu_test_hopper_attention" ${PROXYATTN_GTEST_ARGS:-} >"$OUT/test_hopper.log" 2>&1
echo "test rc=$?"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |tests ran|FAILED  \]" "$OUT/test_hopper.log" | head -30
grep -E "relerr" "$OUT/test_hopper.log" | sort -k6 -g -r | head -5
if [ "${PROXYATTN_SKIP_BENCH:-0}" != 1 ]; then
  stamp "timings"
  timeout ${PROXYATTN_BENCH_TIMEOUT:-200} "$BUILD/kernels/proxyattn_kernel_bench" \
    --lengths "${PROXYATTN_BENCH_LENGTHS:-4096,16384,32768,65536,131072}" --variants 0 \
    --sparse-lengths "${PROXYATTN_SPARSE_LENGTHS:-131072}" --est-lengths "${PROXYATTN_EST_LENGTHS:-}" \
    --csv "$OUT/kernel_bench.csv" 2>&1 | tee "$OUT/kernel_bench.log" | tail -30
fi
stamp "done"
