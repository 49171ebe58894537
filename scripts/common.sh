# Sourced by the other scripts: where the build lives and which preset made it.
# The cuda preset when nvcc is present (CI compiles and links the kernels too), cpu otherwise.
PROXYATTN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -d /usr/local/cuda/bin ]; then export PATH="$PATH:/usr/local/cuda/bin"; fi
if [ -z "${PROXYATTN_PRESET:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then PROXYATTN_PRESET=cuda; else PROXYATTN_PRESET=cpu; fi
fi
PROXYATTN_BUILD="$PROXYATTN_ROOT/build/$PROXYATTN_PRESET"
PROXYATTN_VENV="$PROXYATTN_ROOT/.venv"
export PROXYATTN_ROOT PROXYATTN_PRESET PROXYATTN_BUILD PROXYATTN_VENV
