#!/usr/bin/env bash
# The main job on the default data: capture the real SmolLM2-135M needle-in-a-haystack 8K store
# (cached under cache/stores/ after the first run), analyse every layer with every method
# (similarity, recall, budgets, output error) and draw the figures.
#   out/main/report.md   the tables to read first (report.json, CSVs beside it)
#   out/main/figures/    the paper's analysis figures
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$PROXYATTN_ROOT"
[ -x "$PROXYATTN_BUILD/apps/proxyattn-analyze" ] || bash scripts/setup.sh
py="$PROXYATTN_VENV/bin/python"

store=$("$py" scripts/proxyattn_models.py store)        # fetch the model + capture when not cached
out=${PROXYATTN_MAIN_OUT:-out/main}
mkdir -p "$out"
"$PROXYATTN_BUILD/apps/proxyattn-analyze" all "$store" --out "$out"
"$py" scripts/plot_figures.py "$out" --out "$out/figures"
echo "main: report in $out/report.md, figures in $out/figures/" >&2
