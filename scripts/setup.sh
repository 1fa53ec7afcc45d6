#!/usr/bin/env bash
# Sets regkernels up in this checkout: torch (only when none is installed: a CUDA build from PyPI
# on Linux x86-64; an installed torch is never replaced), the build tools, then regkernels built in
# place against that torch (editable install).
#
#   bash scripts/setup.sh           # what using regkernels needs
#   bash scripts/setup.sh --test    # and what the test suite and the example trainer need
#
# Re-running is cheap: pip finds what is installed, and the compiled objects are kept in
# build/objects, so ninja rebuilds only the sources that changed (seconds when none did).
# PYTHON=... picks the interpreter; SETUP_DRY_RUN=1 prints the pip commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $arg (takes --test)" >&2; exit 2 ;;
  esac
done

pip_install() {
  if [ "${SETUP_DRY_RUN:-0}" = 1 ]; then
    echo "pip install $*"
  else
    "$PY" -m pip install --quiet --disable-pip-version-check "$@"
  fi
}

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup.sh: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  pip_install torch
fi
# the build: setuptools with PEP 639 metadata (pyproject.toml), ninja for parallel incremental builds
pip_install "setuptools>=77" wheel ninja
if [ "$TEST" = 1 ]; then
  # the tests; scikit-learn's bundled 8x8 digits (offline) for the example trainer's tests
  pip_install pytest pytest-benchmark hypothesis scikit-learn
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# a parallel nvcc build needs ~2 GB per job; two jobs fit the smallest machines we run on
export MAX_JOBS="${MAX_JOBS:-2}"
# --no-build-isolation: build against the torch installed above, never a second copy
pip_install --no-build-isolation -e . \
  || { echo "setup.sh: building regkernels failed; rerun with: $PY -m pip install -v --no-build-isolation -e ." >&2; exit 1; }
if [ "${SETUP_DRY_RUN:-0}" != 1 ]; then
  "$PY" -c "import regkernels, torch; from regkernels import _ext; print('regkernels', regkernels.__version__, '| torch', torch.__version__, '| extension:', _ext.HAS_C, '| CUDA kernels built:', _ext.has_cuda_kernels() if _ext.HAS_C else False)"
fi
