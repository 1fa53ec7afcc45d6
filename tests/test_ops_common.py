"""The shared dispatch and validation helpers of regkernels/ops/_common.py."""
from __future__ import annotations

import types

import pytest
import torch

from regkernels.ops._common import KernelTable, check_bounds, check_same_device, resolve_backend


def _table():
    ref = types.SimpleNamespace(op=lambda x: ("reference", x))
    return KernelTable(ref)


def test_kernel_table_prefers_registered_kernels_for_the_device():
    t = _table()
    cpu = torch.device("cpu")
    assert t.implementation("op", None, cpu)(1) == ("reference", 1)
    t.register("op", "cpu", "cpu", lambda x: ("cpu", x))
    t.register("op", "cpu", "triton", lambda x: ("triton", x))
    assert t.implementation("op", None, cpu)(2) == ("cpu", 2)          # first registered wins
    assert t.implementation("op", "triton", cpu)(3) == ("triton", 3)
    assert t.implementation("op", "reference", cpu)(4) == ("reference", 4)
    # a kernel for another device type does not apply
    t.register("op", "cuda", "cuda", lambda x: ("cuda", x))
    with pytest.raises(ValueError, match=r"op: no 'cuda' kernel for cpu tensors; available backends: "
                                         r"'reference', 'cpu', 'triton'"):
        t.implementation("op", "cuda", cpu)


def test_kernel_table_names_the_public_op_in_errors():
    with pytest.raises(ValueError, match="svb_: no 'cpu' kernel"):
        _table().implementation("op", "cpu", torch.device("cpu"), name="svb_")
    with pytest.raises(ValueError, match="backend must be one of"):
        _table().register("op", "cpu", "reference", lambda x: x)


def test_resolve_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="frame_penalty: backend must be one of None, 'reference'"):
        resolve_backend("frame_penalty", "gpu", torch.device("cpu"), ())


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


def test_kernel_table_named_only_kernels_run_when_named():
    ref = types.SimpleNamespace(op=lambda: "reference")
    table = KernelTable(ref)
    table.register("op", "cpu", "cpu", lambda: "kernel", default=False)
    cpu = torch.device("cpu")
    assert table.implementation("op", None, cpu)() == "reference"
    assert table.implementation("op", "cpu", cpu)() == "kernel"
    with pytest.raises(ValueError, match="op: no 'cuda' kernel for cpu tensors; available backends: 'reference', 'cpu'"):
        table.implementation("op", "cuda", cpu)
