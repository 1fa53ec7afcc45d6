"""Loading of the compiled extension ``regkernels._C``.

Importing regkernels never fails because the extension is missing: the ops fall
back to their pure-torch references and one warning says so.
"""
from __future__ import annotations

import os
import warnings

import torch

_LOAD_ERROR: str | None = None
try:  # the import registers the C++ ops under torch.ops.regkernels
    from regkernels import _C  # noqa: F401

    HAS_C = True
except ImportError as exc:  # pragma: no cover - depends on the build
    HAS_C = False
    _LOAD_ERROR = str(exc)
    warnings.warn(
        f"regkernels: compiled extension not available ({exc}); using the pure-torch references",
        RuntimeWarning,
        stacklevel=2,
    )


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
