#!/usr/bin/env bash
# Run the whole test suite (CPU tests, Python script tests; GPU tests skip without a device).
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$PROXYATTN_ROOT"
[ -d "$PROXYATTN_BUILD" ] || bash scripts/setup.sh
cmake --build "$PROXYATTN_BUILD" -j "$(nproc)"
ctest --test-dir "$PROXYATTN_BUILD" --output-on-failure -j "$(nproc)" "$@"
