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


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA sources."""
    return HAS_C and bool(torch.ops.regkernels.built_with_cuda())


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors: Triton importable and ``TRITON_INTERPRET=1``.

    That is how CI checks the Triton kernels without a GPU (tests/conftest.py sets it); users
    never need it.
    """
    return os.environ.get("TRITON_INTERPRET") == "1" and has_triton()


if HAS_C:  # the C++ ops' fakes and autograd (regkernels/_C_ops.py)
    from regkernels import _C_ops  # noqa: E402,F401
