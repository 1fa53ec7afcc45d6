"""The backend table (regkernels/ops/_table.py) and the shared validation helpers (ops/_common.py)."""
from __future__ import annotations

import pytest
import torch

from regkernels import _ext
from regkernels.ops._common import check_bounds, check_same_device
from regkernels.ops._table import ALL_DTYPES, HALF_AND_FLOAT, Kernel, Table

needs_ext = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not available")
CPU = torch.device("cpu")
F32, F64 = torch.float32, torch.float64

# implementations named by string: stdlib functions that tell the rows apart by their result
REF, CPP, TRITON, TORCH = "operator:pos", "operator:neg", "operator:invert", "operator:abs"


def _table(*rows: Kernel) -> Table:
    return Table("test", list(rows) + [Kernel("op", "any", "reference", REF)])


@needs_ext
def test_none_takes_the_first_usable_default_row_for_the_device_and_dtype():
    t = _table(Kernel("op", "cuda", "cuda", CPP), Kernel("op", "cpu", "cpu", CPP, HALF_AND_FLOAT),
               Kernel("op", "any", "torch", TORCH))
    assert t.implementation("op", None, CPU, F32)(3) == -3          # C++ first for float32 CPU tensors
    assert t.implementation("op", None, CPU, F64)(-3) == 3          # float64: the next row, "torch"
    assert t.implementation("op", "reference", CPU, F64)(-3) == -3
    assert t.backends("op", "cpu", F32) == ["cpu", "torch", "reference"]
    assert t.backends("op", "cpu", F64) == ["torch", "reference"]


@needs_ext
def test_a_named_backend_that_cannot_take_the_input_raises_listing_what_can():
    t = _table(Kernel("op", "cpu", "cpu", CPP, HALF_AND_FLOAT), Kernel("op", "cuda", "triton", TRITON, HALF_AND_FLOAT))
    with pytest.raises(ValueError, match=r"pub: the 'cpu' backend takes torch.float16, torch.bfloat16, "
                                         r"torch.float32, not torch.float64; backends that take cpu fp64 inputs "
                                         r"here: 'reference'"):
        t.implementation("op", "cpu", CPU, F64, name="pub")
    with pytest.raises(ValueError, match=r"op: no 'cuda' backend for cpu tensors; backends that take cpu "
                                         r"fp32 inputs here: 'cpu', .*'reference'"):
        t.implementation("op", "cuda", CPU, F32)
    with pytest.raises(ValueError, match=r"op: backend must be None or one of 'reference', 'torch', 'cpu', 'cuda', "
                                         r"'triton'; got 'gpu'"):
        t.implementation("op", "gpu", CPU, F32)


def test_interpreted_triton_runs_cpu_tensors_only_when_named(monkeypatch):
    if not _ext.has_triton():
        pytest.skip("Triton not installed")
    t = _table(Kernel("op", "cuda", "triton", TRITON, HALF_AND_FLOAT))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert t.implementation("op", None, CPU, F32)(5) == 5            # never picked by None on CPU
    assert t.implementation("op", "triton", CPU, F32)(5) == ~5
    with pytest.raises(ValueError, match=r"'triton' backend takes .*not torch.float64"):
        t.implementation("op", "triton", CPU, F64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"cannot run here: Triton runs CPU tensors only interpreted"):
        t.implementation("op", "triton", CPU, F32)


@needs_ext
def test_named_only_rows_and_dtype_lists():
    t = _table(Kernel("op", "cpu", "cpu", CPP, default=False))
    assert t.implementation("op", None, CPU, F32)(2) == 2
    assert t.implementation("op", "cpu", CPU, F32)(2) == -2
    # mixed dtypes (penalty_multi): a row must take every one of them
    t2 = _table(Kernel("op", "cpu", "cpu", CPP, (F32,)))
    assert t2.implementation("op", None, CPU, [F32, F32])(2) == -2
    assert t2.implementation("op", None, CPU, [F32, F64])(2) == 2
    with pytest.raises(ValueError, match="not torch.float32, torch.float64"):
        t2.implementation("op", "cpu", CPU, [F32, F64])


def test_tables_are_checked_when_built():
    with pytest.raises(ValueError, match="backend must be one of"):
        _table(Kernel("op", "cpu", "gpu", CPP))
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'any'"):
        _table(Kernel("op", "xla", "cpu", CPP))
    with pytest.raises(ValueError, match=r"two rows for \('op', 'any', 'reference'\)"):
        _table(Kernel("op", "any", "reference", REF))
    with pytest.raises(ValueError, match="op 'other' has no reference row"):
        _table(Kernel("other", "cpu", "cpu", CPP))
    with pytest.raises(KeyError, match="has no op 'nope'"):
        _table().rows_for("nope")
    assert "| `op` | any | `reference` | fp16, bf16, fp32, fp64 | yes | `operator:pos` |" in _table().markdown()
    assert ALL_DTYPES[-1] is torch.float64


def test_check_bounds_and_devices():
    with pytest.raises(ValueError, match="need A <= B; got A=2, B=1"):
        check_bounds("op", "A", 2, "B", 1)
    with pytest.raises(ValueError, match="A must be >= 0"):
        check_bounds("op", "A", -1, "B", 1)
    with pytest.raises(TypeError, match="A must be a real number"):
        check_bounds("op", "A", torch.tensor(1.0), "B", 1)
    meta = torch.empty(2, device="meta")
    with pytest.raises(ValueError, match="all tensors must be on one device; got x on cpu, y on meta"):
        check_same_device("op", x=torch.zeros(2), y=meta)


@needs_ext
def test_a_lookup_compiles_with_a_cold_cache():
    # the first lookup of a key may happen while torch.compile traces: everything it consults
    # (the extension's CUDA build, Triton's presence, the interpreter flag) must be traceable
    t = Table("test", [Kernel("op", "cpu", "cpu", "torch:sin"), Kernel("op", "cuda", "cuda", "torch:sin"),
                       Kernel("op", "cuda", "triton", "torch:sin"), Kernel("op", "any", "reference", "torch:cos")])

    def f(x, backend):
        return t.implementation("op", backend, x.device, x.dtype)(x)

    x = torch.randn(3)
    for backend in ("cpu", None, "reference"):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True)(x, backend)
        torch.testing.assert_close(out, x.cos() if backend == "reference" else x.sin())
