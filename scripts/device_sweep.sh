#!/usr/bin/env bash
# Kernel benchmark sweep on the GPU machine, all in under 10 minutes (run from anywhere):
#   1. configure + build proxyattn-bench (CUDA, sm_90a, Release, no tests)
#   2. for each sweep (default fig4_speedup, fig5b_estimation): proxyattn-bench writes
#      OUTDIR/<sweep>/bench.{json,csv,md} and the masks it timed (OUTDIR/<sweep>/masks), then
#      scripts/bench_peers.py times SDPA / FlexAttention / the XAttention estimator on the same
#      shapes and masks in the same run: OUTDIR/<sweep>/peers.{json,csv,md}. The first sweep also
#      writes a check case (OUTDIR/check) that bench_peers.py compares FlexAttention against.
#   3. extra sweeps (default fig4_256k) only when enough of the budget is left
#   4. figures + the P1-P4 table (scripts/bench_figures.py): OUTDIR/figures
# Usage: scripts/device_sweep.sh OUTDIR
# Env: PROXYATTN_SWEEPS ("fig4_speedup fig5b_estimation"), PROXYATTN_SWEEPS_IF_TIME ("fig4_256k"),
#      PROXYATTN_SWEEP_BUDGET (seconds, default 570), PROXYATTN_SWEEP_BUILD (build dir).
set -uo pipefail

OUTDIR=${1:?usage: scripts/device_sweep.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
BUILD=${PROXYATTN_SWEEP_BUILD:-$ROOT/build/sweep}
SWEEPS=${PROXYATTN_SWEEPS:-fig4_speedup fig5b_estimation}
IF_TIME=${PROXYATTN_SWEEPS_IF_TIME:-fig4_256k}
START=$(date +%s)
DEADLINE=$((START + ${PROXYATTN_SWEEP_BUDGET:-570}))
left() { echo $((DEADLINE - $(date +%s))); }
# Seconds a step may take while leaving $1 seconds for the later ones (at least 10).
tl() { local t=$(($(left) - $1)); [ $t -lt 10 ] && t=10; echo $t; }
stamp() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$OUTDIR/sweep.log"; }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  cmake --version | head -1
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "git: no repository"
} >"$OUTDIR/env.txt" 2>&1
stamp "environment: $(sed -n 3p "$OUTDIR/env.txt")"

# ---- 1. build ----
stamp "configure + build proxyattn-bench"
{
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPROXYATTN_ENABLE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90a -DBUILD_TESTING=OFF &&
    timeout $(tl 120) cmake --build "$BUILD" --target proxyattn-bench -j "$(nproc)"
  echo "build rc=$?"
} >"$OUTDIR/build.log" 2>&1
BENCH="$BUILD/apps/proxyattn-bench"
if [ ! -x "$BENCH" ]; then
  stamp "build FAILED"
  grep -E "error|Error|FAILED" "$OUTDIR/build.log" | head -30
  exit 1
fi
stamp "build done"

# ---- 2./3. sweeps ----
RC=0
run_sweep() {  # name, extra args of proxyattn-bench, extra args of bench_peers
  local name=$1 bargs=$2 pargs=$3 dir="$OUTDIR/$1"
  mkdir -p "$dir"
  stamp "proxyattn-bench --sweep $name"
  timeout $(tl 30) "$BENCH" --sweep "$ROOT/configs/sweeps/$name.json" --out "$dir" \
    --export-masks "$dir/masks" $bargs >"$dir/bench.stdout" 2>"$dir/bench.log"
  local rc=$?
  [ $rc -ne 0 ] && { RC=1; stamp "proxyattn-bench $name rc=$rc"; tail -3 "$dir/bench.log"; }
  stamp "bench_peers.py --sweep $name"
  timeout $(tl 15) $PY "$ROOT/scripts/bench_peers.py" --sweep "$ROOT/configs/sweeps/$name.json" \
    --masks "$dir/masks" --out "$dir" $pargs >"$dir/peers.stdout" 2>"$dir/peers.log"
  rc=$?
  [ $rc -ne 0 ] && { RC=1; stamp "bench_peers $name rc=$rc"; tail -3 "$dir/peers.log"; }
  grep -E "check N=" "$dir/peers.log" | tee -a "$OUTDIR/sweep.log"
}
first=1
for s in $SWEEPS; do
  if [ "$(left)" -lt 60 ]; then stamp "no time left for $s"; continue; fi
  if [ $first = 1 ]; then
    run_sweep "$s" "--export-check $OUTDIR/check" "--check $OUTDIR/check"
    first=0
  else
    run_sweep "$s" "" ""
  fi
done
for s in $IF_TIME; do
  # The 256K extension needs about 2.5 minutes (generation, ours, SDPA, FlexAttention compile).
  if [ "$(left)" -lt 170 ]; then stamp "skipped $s: $(left) s left"; continue; fi
  run_sweep "$s" "" ""
done

# ---- 4. figures and the P1-P4 table ----
stamp "figures"
$PY "$ROOT/scripts/bench_figures.py" "$OUTDIR" --out "$OUTDIR/figures" >"$OUTDIR/figures.log" 2>&1 ||
  stamp "bench_figures failed (see figures.log)"
for s in $SWEEPS $IF_TIME; do
  [ -f "$OUTDIR/$s/bench.md" ] && sed -n '1,200p' "$OUTDIR/$s/bench.md" | grep -E "^\| (full|sparse@0.1|proxyattn|estimate:proxy\[g=1,s=1\]|estimate:oracle)" | grep -E "131072|262144"
  [ -f "$OUTDIR/$s/peers.md" ] && grep -E "131072|262144" "$OUTDIR/$s/peers.md" | grep -E "^\| "
done
[ -f "$OUTDIR/figures/p_targets.md" ] && cat "$OUTDIR/figures/p_targets.md"
stamp "done rc=$RC"
exit $RC
