#!/usr/bin/env bash
# Real long-context attention: capture Gemma-3-270M (Q4_K_M GGUF from PyPI) NIAH stores at
# 16K and 32K (cached under cache/stores/) and analyse their global layers with every method;
# reports in results/analysis-gemma3-niah<L>k/ (report.md first), figures beside them.
#   bash scripts/gemma3_analysis.sh [LENGTH ...]      (default: 16384 32768)
# The 32K capture takes about 5 minutes on 2 cores, its analysis about 2; pass --device cuda
# through PROXYATTN_ANALYZE_ARGS on a GPU machine.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$PROXYATTN_ROOT"
[ -x "$PROXYATTN_BUILD/apps/proxyattn-analyze" ] || bash scripts/setup.sh
py="$PROXYATTN_VENV/bin/python"
lengths=("$@")
[ ${#lengths[@]} -gt 0 ] || lengths=(16384 32768)
for n in "${lengths[@]}"; do
  store=$("$py" scripts/proxyattn_models.py store --name gemma3-270m --length "$n" --answer 12)
  out="results/analysis-gemma3-niah$((n / 1024))k"
  # shellcheck disable=SC2086
  "$PROXYATTN_BUILD/apps/proxyattn-analyze" all "$store" --out "$out" ${PROXYATTN_ANALYZE_ARGS:-}
  "$py" scripts/plot_figures.py "$out" --out "$out/figures"
  echo "gemma3: $out/report.md" >&2
done
