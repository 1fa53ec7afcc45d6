"""Importing regkernels works without a compiled extension and without Triton (CPU-only users)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_without_extension_falls_back_with_one_warning():
    res = _run("""
        import sys, warnings
        sys.modules["regkernels._C"] = None      # as if the extension was never built
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import regkernels
        msgs = [str(x.message) for x in w if "regkernels" in str(x.message)]
        assert len(msgs) == 1 and "pure-torch references" in msgs[0], msgs
        import torch
        W = torch.randn(6, 9, dtype=torch.float64)
        print(float(regkernels.frame_penalty(W, 0.5, 2.0)))
        p = torch.randn(10); p.grad = torch.randn(10)
        q = p.clone(); q.grad = p.grad.clone()
        regkernels.optim.BetaLasso([p], lr=0.1, lam=0.01, beta=1.0).step()   # reference path
        regkernels.optim.BetaLasso([q], lr=0.1, lam=0.01, beta=1.0, backend="reference").step()
        assert torch.equal(p, q)
        print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


def test_import_without_triton():
    res = _run("""
        import sys
        sys.modules["triton"] = None              # as on a CPU-only install without triton
        import regkernels
        from regkernels import _ext
        assert not _ext.has_triton()
        print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


def test_public_api_names():
    import regkernels

    for name in regkernels.__all__:
        assert hasattr(regkernels, name), name
    assert callable(regkernels.optim.BetaLasso)


@pytest.mark.parametrize("backend", ["gpu", 3])
def test_unknown_backend_is_rejected(backend):
    import torch

    import regkernels

    with pytest.raises((ValueError, TypeError), match="backend must be None or one of"):
        regkernels.frame_penalty(torch.randn(3, 4), 0.1, 1.0, backend=backend)
