"""Loading of the compiled extension ``regkernels._C``.

Importing regkernels never fails because the extension is missing: the ops fall
back to their pure-torch references and one warning says so.
"""
from __future__ import annotations

import os
import warnings

import torch

REBUILD = "bash scripts/setup.sh (in a checkout) or pip install --no-build-isolation -e ."


def load_failure_message(error: str, built_for: str | None) -> str:
    """What the one warning says when ``regkernels._C`` does not load: why in words (never built,
    or built for another torch), the one command that rebuilds it, then the loader's own text."""
    if "undefined symbol" in error or (built_for is not None and built_for != torch.__version__):
        why = (f"the compiled extension was built for torch {built_for or 'another version'} and this is torch "
               f"{torch.__version__}")
    elif "_C" in error and ("No module named" in error or "cannot import name" in error):
        why = "the compiled extension regkernels._C is missing (not built in this checkout or install)"
    else:  # unforeseen: the loader's own words are the clue
        why = f"the compiled extension regkernels._C does not load ({error})"
    return f"regkernels: {why}; using the pure-torch references (slower). Rebuild it with: {REBUILD}"


def _built_for() -> str | None:
    try:
        from regkernels._build_info import TORCH_VERSION
    except ImportError:
        return None
    return TORCH_VERSION


_LOAD_ERROR: str | None = None
try:  # the import registers the C++ ops under torch.ops.regkernels
    from regkernels import _C  # noqa: F401

    HAS_C = True
except ImportError as exc:  # pragma: no cover - depends on the build
    HAS_C = False
    _LOAD_ERROR = str(exc)
    warnings.warn(load_failure_message(str(exc), _built_for()), RuntimeWarning, stacklevel=2)


# Both answers are fixed for the process and read once here: the backend tables consult them on
# every lookup that misses their cache, which torch.compile may trace (it cannot trace a C++ op
# returning a bool, or an import).
_CUDA_KERNELS = HAS_C and bool(torch.ops.regkernels.built_with_cuda())
try:
    import triton  # noqa: F401

    _TRITON = True
except ImportError:
    _TRITON = False


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA sources."""
    return _CUDA_KERNELS


def has_triton() -> bool:
    """True when Triton is installed (importable)."""
    return _TRITON


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors: Triton importable and ``TRITON_INTERPRET=1``.

    That is how CI checks the Triton kernels without a GPU (tests/conftest.py sets it); users
    never need it.
    """
    return os.environ.get("TRITON_INTERPRET") == "1" and has_triton()


if HAS_C:  # the C++ ops' fakes and autograd (regkernels/_C_ops.py)
    from regkernels import _C_ops  # noqa: E402,F401
