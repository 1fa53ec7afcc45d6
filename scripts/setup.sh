#!/usr/bin/env bash
# Sets everything up on a fresh machine: torch (a CUDA build from PyPI on Linux x86-64), the
# build and test tools, then regkernels itself built in place against that torch.
# Re-running is cheap: pip finds what is installed and ninja rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

"$PY" -m pip install --quiet --disable-pip-version-check torch ninja pybind11 pytest pytest-benchmark hypothesis
# the example trainer's dataset (scikit-learn's bundled 8×8 digits, offline): an optional extra of
# regkernels, installed here because the test suite runs the example
"$PY" -m pip install --quiet --disable-pip-version-check scikit-learn
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# a parallel nvcc build needs ~2 GB per job; two jobs fit the smallest machines we run on
export MAX_JOBS="${MAX_JOBS:-2}"
# --no-build-isolation: build against the torch installed above, never a second copy
"$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation -e . \
  || { echo "setup.sh: building regkernels failed; rerun with: $PY -m pip install -v --no-build-isolation -e ." >&2; exit 1; }
"$PY" -c "import regkernels, torch; from regkernels import _ext; print('regkernels', regkernels.__version__, '| torch', torch.__version__, '| extension:', _ext.HAS_C, '| CUDA kernels built:', _ext.has_cuda_kernels() if _ext.HAS_C else False)"
