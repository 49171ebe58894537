#!/usr/bin/env bash
# The analysis at the paper's scale (issue "Analysis at the paper's scale"): wall seconds of
# `proxyattn-analyze all` (defaults, I/O included) on synth Llama-3.1-8B-shaped stores with V,
#   - one layer at each of PROXYATTN_SCALE_LENGTHS (default 8192,32768,131072) with --device cuda,
#     and with --device cpu up to PROXYATTN_SCALE_CPU_MAX (default 32768);
#   - a store of PROXYATTN_SCALE_LAYERS layers (default 32) at 32K with --device cuda;
#   - --device cpu on 16K with 1 and with 2 layers (units must not serialise: <= 2.5x).
# PROXYATTN_SCALE_SKIP_STORES=1 runs the single layers only; PROXYATTN_SCALE_CPU_STORES=0 skips the 16K CPU pair.
# Writes OUT/scale.json and OUT/scale.md (the README table); a benchmark, not a test.
#   scripts/analysis_scale.sh BUILD_DIR OUT_DIR
set -uo pipefail
BUILD=${1:?BUILD_DIR}; OUT=${2:?OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DUMP="$BUILD/apps/proxyattn-dump"; ANALYZE="$BUILD/apps/proxyattn-analyze"
MODEL="$ROOT/configs/models/llama-3.1-8b.json"
LENGTHS=${PROXYATTN_SCALE_LENGTHS:-8192,32768,131072}
CPU_MAX=${PROXYATTN_SCALE_CPU_MAX:-32768}
LAYERS=${PROXYATTN_SCALE_LAYERS:-32}
STORES=${PROXYATTN_SCALE_STORES:-$OUT/stores}
mkdir -p "$OUT" "$STORES"
ROWS="$OUT/scale.jsonl"; : >"$ROWS"
now() { date +%s.%N; }
store() {  # N layers -> path (cached)
  local p="$STORES/llama8b_${1}_${2}l.h5"
  [ -f "$p" ] || "$DUMP" synth "$p" --model "$MODEL" --len "$1" --layers "$2" --seed 1 -q || return 1
  echo "$p"
}
run() {  # label device N layers
  local label=$1 dev=$2 n=$3 layers=$4 s t0 t1 rc
  s=$(store "$n" "$layers") || { echo "{\"case\": \"$label\", \"error\": \"synth failed\"}" >>"$ROWS"; return; }
  t0=$(now)
  "$ANALYZE" all "$s" --device "$dev" --out "$OUT/$label" -q >"$OUT/$label.log" 2>&1
  rc=$?
  t1=$(now)
  python3 - "$label" "$dev" "$n" "$layers" "$t0" "$t1" "$rc" "$OUT/$label/report.json" >>"$ROWS" <<'PY'
import json, sys
label, dev, n, layers, t0, t1, rc, rep = sys.argv[1:]
row = {"case": label, "device": dev, "seq_len": int(n), "layers": int(layers), "wall_seconds": float(t1) - float(t0),
       "rc": int(rc)}
try:
    r = json.load(open(rep))
    row["seconds_per_layer"] = row["wall_seconds"] / int(layers)
    row["stages"] = {k: round(v["wall_seconds"], 3) for k, v in r["timing"]["stages"].items()}
    row["threads"] = r["timing"]["threads"]
    row["parallel_over"] = r["timing"]["parallel_over"]
    row["device_name"] = r["device"].get("name", "cpu")
except Exception as e:  # a failed run: keep its rc and the log's last line
    row["error"] = str(e)
print(json.dumps(row))
PY
  echo "scale: $(tail -1 "$ROWS" | cut -c1-300)"
}
IFS=, read -ra NS <<<"$LENGTHS"
for n in "${NS[@]}"; do
  run "cuda_${n}_1l" cuda "$n" 1
  [ "$n" -le "$CPU_MAX" ] && run "cpu_${n}_1l" cpu "$n" 1
done
if [ "${PROXYATTN_SCALE_SKIP_STORES:-0}" != 1 ]; then
  if [ "${PROXYATTN_SCALE_CPU_STORES:-1}" = 1 ]; then
    run "cpu_16384_1l" cpu 16384 1
    run "cpu_16384_2l" cpu 16384 2
  fi
  run "cuda_32768_${LAYERS}l" cuda 32768 "$LAYERS"
fi
python3 - "$ROWS" "$OUT/scale.json" "$OUT/scale.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump(rows, open(sys.argv[2], "w"), indent=1)
with open(sys.argv[3], "w") as f:
    f.write("| case | device | N | layers | wall s | s / layer | threads | slowest stages (s) |\n|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        st = sorted(r.get("stages", {}).items(), key=lambda kv: -kv[1])[:4]
        f.write(f"| {r['case']} | {r.get('device_name', r.get('device'))} | {r.get('seq_len')} | {r.get('layers')} | "
                f"{r.get('wall_seconds', 0):.1f} | {r.get('seconds_per_layer', float('nan')):.2f} | {r.get('threads', '')} | "
                + ", ".join(f"{k} {v:.2f}" for k, v in st) + (f" rc={r['rc']}" if r.get("rc") else "") + " |\n")
print(open(sys.argv[3]).read())
PY
