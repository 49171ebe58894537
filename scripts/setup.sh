#!/usr/bin/env bash
# Install everything (Debian packages + a Python venv) and build. Idempotent.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$PROXYATTN_ROOT"

APT_PACKAGES=(
  build-essential cmake ninja-build git pkg-config   # toolchain
  libhdf5-dev            # the Q/K store (HDF5 C API)
  libeigen3-dev          # CPU reference attention and estimators
  libcli11-dev           # command-line parsing of the tools
  libfmt-dev             # formatting in the tools and reports
  nlohmann-json3-dev     # reports, model configs, sweeps
  libgtest-dev           # tests
  libbenchmark-dev       # proxyattn-bench
  libtomlplusplus-dev    # optional: TOML model configs
  libopenmpi-dev openmpi-bin   # optional: split analysis/benchmark work across MPI ranks
  python3-venv           # the scripts' venv
)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$PROXYATTN_VENV/bin/python" ]; then
  python3 -m venv "$PROXYATTN_VENV"
fi
"$PROXYATTN_VENV/bin/pip" install -q --disable-pip-version-check -r scripts/requirements.txt

cmake --preset "$PROXYATTN_PRESET" -DPROXYATTN_PYTHON="$PROXYATTN_VENV/bin/python" >/dev/null
cmake --build "$PROXYATTN_BUILD" -j "$(nproc)"
echo "setup: built $PROXYATTN_BUILD (preset $PROXYATTN_PRESET)" >&2
