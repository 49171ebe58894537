#!/usr/bin/env bash
# GPU check of the kernels, for the lent H100/H200 (run from the repository root):
#   1. configure + build with ninja (CUDA, sm_90a, ptxas reports in the build log)
#   2. the GPU tests (ctest -L gpu): every kernel vs the CPU reference; then
#      proxyattn-analyze --device cuda vs --device cpu on odd-shaped stores (scripts/analysis_parity.sh)
#   3. kernel timings (proxyattn_kernel_bench) and torch SDPA (flash, cuDNN) in the same run
#   4. compute-sanitizer memcheck and racecheck on the GPU tests at small sizes
#   5. a summary table (last lines of the output)
# Logs go to $OUT (default ./out/device_check). Whole script under ~9.5 minutes: each phase
# gets what is left of PROXYATTN_CHECK_BUDGET seconds (default 560).
# Env knobs: PROXYATTN_BENCH_LENGTHS (default 4096,16384,32768,65536,131072),
# PROXYATTN_BENCH_VARIANTS (portable schedules, default 0), PROXYATTN_SPARSE_LENGTHS (32768,131072),
# PROXYATTN_EST_LENGTHS (32768,131072), PROXYATTN_SKIP_SANITIZERS=1, PROXYATTN_SKIP_BENCH=1.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/out/device_check}
mkdir -p "$OUT"
BUILD=${PROXYATTN_DEVICE_BUILD:-$ROOT/build/device}
START=$(date +%s)
DEADLINE=$((START + ${PROXYATTN_CHECK_BUDGET:-560}))
left() { echo $((DEADLINE - $(date +%s))); }
# Seconds for a phase that must leave $1 seconds for the later ones (at least 10).
tl() { local t=$(($(left) - $1)); [ $t -lt 10 ] && t=10; echo $t; }
SUMMARY="$OUT/summary.md"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
stamp() { echo "[$(($(date +%s) - START))s] $*"; }

LENGTHS=${PROXYATTN_BENCH_LENGTHS:-4096,16384,32768,65536,131072}
VARIANTS=${PROXYATTN_BENCH_VARIANTS:-0}
SPARSE_LENGTHS=${PROXYATTN_SPARSE_LENGTHS:-32768,131072}
EST_LENGTHS=${PROXYATTN_EST_LENGTHS:-32768,131072}

# ---- 0. environment ----
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  cmake --version | head -1
  python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' 2>&1
} >"$OUT/env.txt"
stamp "environment"; cat "$OUT/env.txt"

# ---- 1. build ----
stamp "configure + build"
GPU_TESTS=$(cd "$ROOT/tests/gpu" && for f in test_*.cpp; do printf 'gpu_%s ' "${f%.cpp}"; done)
{
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPROXYATTN_ENABLE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90a -DPROXYATTN_PTXAS_VERBOSE=ON &&
    timeout $(tl 300) ninja -C "$BUILD" proxyattn_kernel_bench
  echo "bench build rc=$?"
  timeout $(tl 240) ninja -C "$BUILD" $GPU_TESTS proxyattn-analyze proxyattn-dump
  echo "tests build rc=$?"
} >"$OUT/build.log" 2>&1
BENCH_OK=0; [ -x "$BUILD/kernels/proxyattn_kernel_bench" ] && BENCH_OK=1
TESTS_OK=1
for t in $GPU_TESTS; do [ -x "$BUILD/tests/$t" ] || TESTS_OK=0; done
# SASS census of the kernels (tensor-core instructions, local-memory spills, ex2) per function.
if [ $BENCH_OK = 1 ] && command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$BUILD/kernels/proxyattn_kernel_bench" 2>/dev/null | python3 -c '
import re, sys
name, cnt = None, {}
rows = []
for line in sys.stdin:
    m = re.search(r"Function : (\S+)", line)
    if m:
        if name: rows.append((name, cnt))
        name, cnt = m.group(1), {}
        continue
    for op in ("HMMA", "LDL", "STL", "MUFU.EX2", "LDSM", "BAR.SYNC", "LDGSTS"):
        if op in line: cnt[op] = cnt.get(op, 0) + 1
if name: rows.append((name, cnt))
for n, c in rows:
    if "attn_kernel" in n or "block_score" in n:
        print("sass", n[:90], " ".join(f"{k}={v}" for k, v in sorted(c.items())))
' >>"$OUT/build.log"
  grep "^sass" "$OUT/build.log" | grep "ILi128ELi2ELi4ELi64E13__nv_bfloat16LNS1_8AttnModeE0" | head -4
fi
grep -E "error|FAILED|rc=" "$OUT/build.log" | head -20
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -5
stamp "build done (bench $BENCH_OK, tests $TESTS_OK)"

# ---- 2. GPU tests ----
TEST_RESULT="not built"
if [ $TESTS_OK = 1 ]; then
  stamp "ctest -L gpu"
  (cd "$BUILD" && timeout $(tl 200) ctest -L gpu -V --timeout 300) >"$OUT/tests.log" 2>&1
  rc=$?
  TEST_RESULT=$(grep -E "tests passed|tests failed" "$OUT/tests.log" | tail -1)
  [ -z "$TEST_RESULT" ] && TEST_RESULT="ctest rc=$rc (timeout?)"
  grep -E "^\S*[0-9]+: \[  (FAILED|PASSED) |tests passed|tests failed|Failure|relative error" "$OUT/tests.log" | head -40
  stamp "tests: $TEST_RESULT"
fi

# ---- 2b. analysis parity: --device cuda vs --device cpu, every table within 1e-3 ----
PARITY_RESULT="not run"
if [ -x "$BUILD/apps/proxyattn-analyze" ]; then
  stamp "analysis parity"
  REAL_STORES=$(ls "$ROOT"/.carry/*.h5 "$ROOT"/cache/stores/smollm2-135m-niah8192-*.h5 2>/dev/null | head -2)
  timeout $(tl 150) bash "$ROOT/scripts/analysis_parity.sh" "$BUILD" "$OUT/parity" $REAL_STORES >"$OUT/parity.log" 2>&1
  rc=$?
  PARITY_RESULT="$(grep -c '^parity .*-> OK' "$OUT/parity.log") OK, $(grep -c '^parity .*-> MISMATCH' "$OUT/parity.log") mismatched (rc $rc)"
  grep -E "^parity|MISMATCH" "$OUT/parity.log" | head -20
fi

# ---- 3. timings ----
if [ $BENCH_OK = 1 ] && [ "${PROXYATTN_SKIP_BENCH:-0}" != 1 ]; then
  stamp "kernel bench"
  timeout $(tl 110) "$BUILD/kernels/proxyattn_kernel_bench" --lengths "$LENGTHS" --variants "$VARIANTS" \
    --sparse-lengths "$SPARSE_LENGTHS" --est-lengths "$EST_LENGTHS" --reps 5 >"$OUT/bench.log" 2>&1
  echo "bench rc=$?" >>"$OUT/bench.log"
  cat "$OUT/bench.log"
  stamp "torch SDPA"
  timeout $(tl 80) python3 - "$LENGTHS" >"$OUT/sdpa.log" 2>&1 <<'PY'
import sys, torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
lengths = [int(x) for x in sys.argv[1].split(",") if x]
H, HKV, D = 32, 8, 128
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
for n in lengths:
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g).repeat_interleave(H // HKV, 1)
    v = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g).repeat_interleave(H // HKV, 1)
    reps = 5 if n < 65536 else 3
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.cuda.synchronize()
                ts = []
                for _ in range(reps):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record(); F.scaled_dot_product_attention(q, k, v, is_causal=True); e.record(); e.synchronize()
                    ts.append(s.elapsed_time(e))
            ms = sorted(ts)[len(ts) // 2]
            print(f"sdpa_{name} N={n} {ms:.3f} ms {2.0 * n * n * D * H / (ms * 1e9):.1f} TFLOP/s", flush=True)
        except Exception as ex:  # a backend missing on this build
            print(f"sdpa_{name} N={n} failed: {ex}", flush=True)
    del q, k, v
    torch.cuda.empty_cache()
PY
  cat "$OUT/sdpa.log"
fi

# ---- 4. sanitizers ----
SAN_RESULT="skipped"
if [ $TESTS_OK = 1 ] && [ "${PROXYATTN_SKIP_SANITIZERS:-0}" != 1 ] && command -v compute-sanitizer >/dev/null; then
  SAN_RESULT=""
  : >"$OUT/sanitize.log"
  for tool in memcheck racecheck; do
    for t in $GPU_TESTS; do
      budget=$(($(left) - 15))
      if [ $budget -lt 20 ]; then SAN_RESULT+="$tool/$t:no-time "; continue; fi
      [ $budget -gt 150 ] && budget=150
      stamp "compute-sanitizer --tool $tool $t"
      echo "==== $tool $t" >>"$OUT/sanitize.log"
      PROXYATTN_TEST_SMALL=1 timeout $budget compute-sanitizer --tool $tool --error-exitcode 3 \
        "$BUILD/tests/$t" --gtest_brief=1 >>"$OUT/sanitize.log" 2>&1
      rc=$?
      case $rc in 0) r=clean ;; 3) r=ERRORS ;; 124) r=timeout ;; *) r="rc$rc" ;; esac
      SAN_RESULT+="$tool/${t#gpu_test_}:$r "
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize.log" | tail -1
    done
  done
fi

# ---- 5. summary ----
say ""
say "## device_check summary ($(head -2 "$OUT/env.txt" | tail -1 | cut -d, -f1), $(($(date +%s) - START)) s)"
say "- build: bench=$BENCH_OK tests=$TESTS_OK"
say "- GPU tests: $TEST_RESULT"
say "- analysis parity (cuda vs cpu, 1e-3): $PARITY_RESULT"
say "- sanitizers: $SAN_RESULT"
python3 - "$OUT/bench.log" "$OUT/sdpa.log" <<'PY' | tee -a "$SUMMARY"
import re, sys
ours, sdpa = {}, {}
try:
    for line in open(sys.argv[1]):
        m = re.match(r"full\s+N=(\d+)\s+(variant\d|hopper)\s+([\d.]+) ms\s+([\d.]+) TFLOP/s", line)
        if m:
            n = int(m[1]); ours.setdefault(n, []).append((float(m[3]), m[2].replace("variant", "v"), float(m[4])))
except OSError:
    pass
try:
    for line in open(sys.argv[2]):
        m = re.match(r"sdpa_(\w+) N=(\d+) ([\d.]+) ms ([\d.]+) TFLOP/s", line)
        if m:
            sdpa[(m[1], int(m[2]))] = (float(m[3]), float(m[4]))
except OSError:
    pass
print("\n| N | ours best (kernel) ms | TFLOP/s | all kernels TFLOP/s | SDPA flash ms (TFLOP/s) | SDPA cuDNN ms (TFLOP/s) | ours/flash speed |")
print("|---|---|---|---|---|---|---|")
for n in sorted(ours):
    best = min(ours[n])
    allv = " ".join(f"{v}:{tf:.0f}" for _, v, tf in sorted(ours[n], key=lambda x: x[1]))
    fl = sdpa.get(("flash", n)); cu = sdpa.get(("cudnn", n))
    fs = f"{fl[0]:.2f} ({fl[1]:.0f})" if fl else "-"
    cs = f"{cu[0]:.2f} ({cu[1]:.0f})" if cu else "-"
    ratio = f"{fl[0] / best[0]:.2f}x" if fl else "-"
    print(f"| {n} | {best[0]:.2f} ({best[1]}) | {best[2]:.0f} | {allv} | {fs} | {cs} | {ratio} |")
PY
grep -E "^(sparse|est\.total|oracle_mass)" "$OUT/bench.log" 2>/dev/null | tee -a "$SUMMARY"
stamp "done"
