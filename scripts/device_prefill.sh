#!/usr/bin/env bash
# The whole-model checks on the GPU machine (run from the repository root), logs under $OUT:
#   1. configure + build with ninja (CUDA, sm_90a)
#   2. the GPU tests (ctest -L gpu), compute-sanitizer memcheck on the model runtime's test
#   3. proxyattn-bench (the kernel cases the device pipeline serves) and proxyattn-bench prefill
#   4. scripts/bench_peers.py --prefill (torch + SDPA) on the same sweep, when present
# Env: PREFILL_LENGTHS (default 8K,32K,128K), PREFILL_METHODS, PREFILL_MODELS, PREFILL_REPS (2),
# PROXYATTN_SKIP_TESTS=1, PROXYATTN_SKIP_SANITIZERS=1, PREFILL_BUDGET (seconds, default 560).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Logs and reports are written under $OUT/work and packed at the end into $OUT/device_prefill.tgz
# (the device tool returns at most 8 files).
DEST=${OUT:-$ROOT/out/device_prefill}
OUT=$DEST/work
mkdir -p "$OUT"
BUILD=${PROXYATTN_DEVICE_BUILD:-$ROOT/build/device}
START=$(date +%s)
DEADLINE=$((START + ${PREFILL_BUDGET:-560}))
tl() { local t=$((DEADLINE - $(date +%s) - $1)); [ $t -lt 10 ] && t=10; echo $t; }
stamp() { echo "[$(($(date +%s) - START))s] $*"; }
LENGTHS=${PREFILL_LENGTHS:-8K,32K,128K}
METHODS=${PREFILL_METHODS:-full,proxyattn@density=0.1,proxyattn@density=0.05,proxyattn@gamma=0.95,pooled,xattn,vslash}
MODELS=${PREFILL_MODELS:-configs/models/llama-3.1-8b.json}
REPS=${PREFILL_REPS:-2}

stamp "configure + build"
{ cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a &&
  timeout $(tl 400) ninja -C "$BUILD"; echo "build rc=$?"; } >"$OUT/build.log" 2>&1
tail -1 "$OUT/build.log"
if [ "${PROXYATTN_SKIP_TESTS:-0}" != 1 ]; then
  stamp "ctest -L gpu"
  (cd "$BUILD" && timeout $(tl 330) ctest -L gpu --output-on-failure --timeout 300) >"$OUT/gpu_tests.log" 2>&1
  grep -E "tests passed|tests failed|Failed|\*\*\*" "$OUT/gpu_tests.log" | head -20
fi
if [ "${PROXYATTN_SKIP_SANITIZERS:-0}" != 1 ] && command -v compute-sanitizer >/dev/null; then
  for t in gpu_test_model_cuda gpu_test_analysis_device; do
    stamp "compute-sanitizer memcheck $t"
    PROXYATTN_TEST_SMALL=1 timeout $(tl 250) compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$BUILD/tests/$t" --gtest_brief=1 >"$OUT/sanitize_$t.log" 2>&1
    echo "memcheck $t rc=$?"; grep -E "ERROR SUMMARY" "$OUT/sanitize_$t.log" | tail -1
  done
fi
stamp "proxyattn-bench (kernel cases)"
timeout $(tl 200) "$BUILD/apps/proxyattn-bench" --device cuda --lengths 32768,131072 --reps 3 --warmup 1 --quiet \
  --methods full,estimate:proxy,estimate:pooled,estimate:xattn,estimate:vslash,proxyattn@density=0.1 \
  --out "$OUT/bench_kernels" >"$OUT/bench_kernels.log" 2>&1
echo "bench rc=$?"; cat "$OUT/bench_kernels/bench.md" 2>/dev/null | head -30
stamp "proxyattn-bench prefill"
timeout $(tl 60) "$BUILD/apps/proxyattn-bench" prefill --sweep "$ROOT/configs/sweeps/prefill.json" \
  --models "$MODELS" --lengths "$LENGTHS" --methods "$METHODS" --reps "$REPS" --warmup 1 \
  --out "$OUT/prefill" >"$OUT/prefill.log" 2>&1
echo "prefill rc=$?"; cat "$OUT/prefill.log" | tail -40
# The evaluation model's shape (SmolLM2-135M's GGUF cannot reach this machine): issue 15's
# GPU-vs-CPU budget, measured with random weights of the same shape.
stamp "proxyattn-bench prefill (smollm2-135m shape)"
timeout $(tl 40) "$BUILD/apps/proxyattn-bench" prefill --models "$ROOT/configs/models/smollm2-135m.json" \
  --lengths 8K --methods full,proxyattn@density=0.1 --reps 5 --warmup 2 --quiet \
  --out "$OUT/prefill_smollm2" >"$OUT/prefill_smollm2.log" 2>&1
echo "prefill smollm2 rc=$?"; tail -8 "$OUT/prefill_smollm2.log"
if grep -q -- "--prefill" "$ROOT/scripts/bench_peers.py" 2>/dev/null; then
  stamp "bench_peers.py --prefill"
  timeout $(tl 5) python3 "$ROOT/scripts/bench_peers.py" --prefill --sweep "$ROOT/configs/sweeps/prefill.json" \
    --model "$MODELS" --lengths "$LENGTHS" --reps "$REPS" --out "$OUT/prefill_peers" >"$OUT/prefill_peers.log" 2>&1
  echo "peers rc=$?"; tail -20 "$OUT/prefill_peers.log"
fi
stamp "done"
tar -czf "$DEST/device_prefill.tgz" -C "$OUT" . && rm -rf "$OUT"
