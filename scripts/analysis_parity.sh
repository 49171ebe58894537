#!/usr/bin/env bash
# Parity of `proxyattn-analyze all --device cuda` with `--device cpu` (the spec): every numeric
# cell of every table within 1e-3 (scripts/compare_reports.py), on odd-shaped synth stores
# (GQA 1/3/4, head_dim 64/128/256, N not a multiple of the block, B 64 and 128) and on any real
# stores given. Needs a CUDA build and a GPU; run by scripts/device_check.sh.
#   scripts/analysis_parity.sh BUILD_DIR OUT_DIR [REAL_STORE ...]
# Exit 0 when every comparison is within tolerance; the per-table lines land in OUT_DIR/*.txt.
set -uo pipefail
BUILD=${1:?BUILD_DIR}; OUT=${2:?OUT_DIR}; shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PROXYATTN_PYTHON:-python3}
DUMP="$BUILD/apps/proxyattn-dump"; ANALYZE="$BUILD/apps/proxyattn-analyze"
mkdir -p "$OUT"
model() {  # name hq hkv d -> a model config beside the stores
  printf '{"name": "%s", "num_layers": 2, "num_q_heads": %d, "num_kv_heads": %d, "head_dim": %d, "rope_theta": 500000.0, "max_context": 131072}\n' \
    "$1" "$2" "$3" "$4" >"$OUT/$1.json"
}
# name hq hkv d N block layers
CASES=("gqa3_d64 9 3 64 1500 128 2" "gqa4_d128 8 2 128 1100 64 1" "gqa1_d256 3 3 256 700 128 1" "gqa4_d128b 8 2 128 2311 128 1"
       "gqa1_d64 4 4 64 999 64 1")
fail=0
compare() {  # label store block
  local label=$1 store=$2 block=$3
  for dev in cpu cuda; do
    "$ANALYZE" all "$store" --block "$block" --device $dev --out "$OUT/$label-$dev" -q >"$OUT/$label-$dev.log" 2>&1 ||
      { echo "parity $label: analyze --device $dev failed: $(tail -1 "$OUT/$label-$dev.log")"; fail=1; return; }
  done
  "$PY" "$ROOT/scripts/compare_reports.py" "$OUT/$label-cpu/report.json" "$OUT/$label-cuda/report.json" --tol 1e-3 \
    >"$OUT/$label.txt" 2>&1 || fail=1
  local cpu_s cuda_s
  cpu_s=$("$PY" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["timing"]["total_seconds"], 2))' "$OUT/$label-cpu/report.json")
  cuda_s=$("$PY" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["timing"]["total_seconds"], 2))' "$OUT/$label-cuda/report.json")
  echo "parity $label (B=$block): $(tail -1 "$OUT/$label.txt") [cpu ${cpu_s} s, cuda ${cuda_s} s]"
  grep MISMATCH "$OUT/$label.txt" | head -8
}
seed=11
for c in "${CASES[@]}"; do
  read -r name hq hkv d n block layers <<<"$c"
  model "$name" "$hq" "$hkv" "$d"
  "$DUMP" synth "$OUT/$name.h5" --model "$OUT/$name.json" --len "$n" --layers "$layers" --seed $((seed++)) -q ||
    { echo "parity $name: synth failed"; fail=1; continue; }
  compare "$name" "$OUT/$name.h5" "$block"
done
for store in "$@"; do
  [ -f "$store" ] || { echo "parity: $store: no such store (skipped)"; continue; }
  compare "$(basename "$store" .h5)" "$store" 128
done
exit $fail
