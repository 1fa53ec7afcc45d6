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


def test_load_failure_says_missing_or_other_torch_and_how_to_rebuild():
    """The warning of an extension that does not load: in words, with the one rebuild command (not
    the loader's "circular import" or a mangled symbol)."""
    import torch

    from regkernels._ext import REBUILD, load_failure_message

    missing = load_failure_message("cannot import name '_C' from partially initialized module 'regkernels' "
                                   "(most likely due to a circular import)", None)
    assert "regkernels._C is missing" in missing and REBUILD in missing and "circular" not in missing
    stale = load_failure_message("/x/regkernels/_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv",
                                 "2.13.0+cpu")
    assert f"built for torch 2.13.0+cpu and this is torch {torch.__version__}" in stale
    assert REBUILD in stale and "_ZN3c10" not in stale
    other = load_failure_message("libcudart.so.13: cannot open shared object file", None)
    assert "libcudart" in other and REBUILD in other


def test_import_does_not_load_dynamo_or_dtensor():
    """torch._dynamo takes 1–1.5 s to import and torch.distributed.tensor 0.3–1 s more; regkernels
    needs the first only when something compiles, the second only when there are DTensors."""
    res = _run("""
        import sys, regkernels
        print([m for m in ("torch._dynamo", "torch.distributed.tensor") if m in sys.modules])
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_constant_result_marker_is_what_dynamo_sets():
    """regkernels._geometry marks frame_plan constant for torch.compile without importing dynamo, by
    the attribute torch._dynamo.assume_constant_result sets; if torch changes that, this fails."""
    import torch._dynamo

    f = torch._dynamo.assume_constant_result(lambda: 0)
    assert vars(f) == {"_dynamo_marked_constant": True}
    from regkernels._geometry import frame_plan

    assert frame_plan._dynamo_marked_constant is True
