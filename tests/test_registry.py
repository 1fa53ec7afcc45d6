"""The registry holds together: every torch.ops.regkernels op has a fake, is reached by an op case
(so tests/test_generated.py opchecks it) and is documented; every public op is in a TABLE and in
tests/op_cases.py; README's support matrix is the tables' (python -m regkernels.bench --support-matrix).
"""
from __future__ import annotations

import functools
import glob
import importlib
import os
import re

import pytest
import torch

import regkernels
from regkernels import _ext
from regkernels.bench.support import readme_section, support_matrix
from op_cases import CASES, FAMILIES, NOT_DISPATCHED, table_of, table_op

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_triton_modules():
    """Register the Triton custom ops (they exist only where Triton is installed)."""
    if not _ext.has_triton():
        return
    for path in sorted(glob.glob(os.path.join(ROOT, "regkernels", "triton", "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name != "__init__":
            importlib.import_module(f"regkernels.triton.{name}")


def registered_ops() -> list[str]:
    """Every op of the regkernels namespace, C++ (TORCH_LIBRARY) and Python (torch.library)."""
    _import_triton_modules()
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("regkernels::"))


def _schema(name: str):
    ns, op = name.split("::")
    packet = getattr(getattr(torch.ops, ns), op)
    return packet.default._schema


def _takes_tensors(name: str) -> bool:
    return any("Tensor" in str(a.type) for a in _schema(name).arguments)


def _has_fake(name: str) -> bool:
    entry = torch._library.simple_registry.singleton.find(name)
    if entry.fake_impl.kernel is not None:
        return True
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
               for key in ("Meta", "CompositeImplicitAutograd", "CompositeExplicitAutograd"))


OPS = registered_ops()


def test_the_namespace_is_not_empty():
    assert OPS, "no torch.ops.regkernels op is registered"


@pytest.mark.parametrize("name", OPS)
def test_op_has_a_fake(name):
    if not _takes_tensors(name):
        pytest.skip(f"{name} takes no tensors: it runs as is under FakeTensorMode")
    assert _has_fake(name), (f"{name} has no fake: add torch.library.register_fake (Python op) or a Meta "
                             f"kernel (C++ op); see docs/design.md")


@functools.lru_cache(maxsize=None)
def ops_reached() -> dict[str, list[str]]:
    """{qualified op name: [case-backend ...]} over one small CPU sample per (case, runnable backend)."""
    from test_generated import _small, reached_ops

    reached: dict[str, list[str]] = {}
    for case in CASES:
        table = table_of(case.family)
        op = table_op(case, table) if table is not None else None
        if op is None:
            continue
        for backend in dict.fromkeys(r.backend for r in table.rows_for(op)):
            row = table.row(op, backend, "cpu")
            if row is None or table.unusable(op, backend, "cpu") is not None:
                continue
            dtype = torch.float32 if torch.float32 in row.dtypes else row.dtypes[0]
            try:
                sample = _small(case, "cpu", dtype, need_grad=case.differentiable)
            except pytest.skip.Exception:
                continue
            if case.differentiable:
                sample = next(s for s in case.samples(torch.device("cpu"), dtype, True) if s.id == sample.id)
            for name in reached_ops(case, sample, backend):
                reached.setdefault(name, []).append(f"{case.name}-{backend}")
    return reached


@pytest.mark.parametrize("name", OPS)
def test_op_is_reached_by_an_op_case(name):
    if not _takes_tensors(name):
        pytest.skip(f"{name} takes no tensors (a build query): nothing to opcheck")
    if name.split("::")[1].endswith("triton") or "_triton_" in name or name.endswith("_triton_bwd"):
        if not _ext.triton_interpreted() and not torch.cuda.is_available():
            pytest.skip("Triton ops run here only interpreted (TRITON_INTERPRET=1)")
    assert name in ops_reached(), (f"{name} is reached by no case of tests/op_cases.py on CPU tensors, so "
                                   f"test_generated.py::test_opcheck never checks it; reached: "
                                   f"{sorted(ops_reached())}")


def _docs_text() -> str:
    pages = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    assert pages, "docs/ has no pages"
    return "\n".join(open(p, encoding="utf-8").read() for p in pages)


@pytest.mark.parametrize("name", OPS)
def test_op_is_documented(name):
    short = name.split("::")[1]
    assert re.search(rf"\b{re.escape(short)}\b", _docs_text()), \
        f"{name} is named on no page of docs/ (its family page or docs/design.md)"


# --------------------------------------------------------------------------- public ops, tables, cases

PUBLIC = [n for n in regkernels.__all__ if callable(getattr(regkernels, n)) and
          not isinstance(getattr(regkernels, n), type(regkernels))]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_has_a_table(family):
    assert table_of(family) is not None, f"regkernels/ops/{family}.py has no TABLE"


def _table_ops() -> set[str]:
    return {op for f in FAMILIES if table_of(f) is not None for op in table_of(f).ops()}


@pytest.mark.parametrize("name", PUBLIC)
def test_public_op_is_in_a_table_and_has_a_case(name):
    if name in NOT_DISPATCHED:
        pytest.skip(NOT_DISPATCHED[name])
    cases = [c for c in CASES if c.name == name]
    assert cases, f"regkernels.{name} has no OpCase in tests/op_cases.py"
    ops = _table_ops()
    assert any(alias in ops for c in cases for alias in c.table_ops), \
        f"regkernels.{name} is in no family's TABLE (aliases tried: {cases[0].table_ops})"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_table_op_has_a_case(family):
    table = table_of(family)
    if table is None:
        pytest.skip(f"regkernels/ops/{family}.py has no TABLE (test_family_has_a_table fails)")
    covered = {table_op(c, table) for c in CASES if c.family == family}
    missing = [op for op in table.ops() if op not in covered]
    assert not missing, f"the {family} TABLE's ops {missing} have no OpCase in tests/op_cases.py"


def test_readme_support_matrix_is_the_tables():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = readme_section(f.read())
    assert section == support_matrix().strip(), \
        "README.md's support matrix differs from the tables: paste `python -m regkernels.bench --support-matrix`"
