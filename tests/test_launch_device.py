"""Triton launches run on their tensors' device (docs/design.md#gpu-static-report): the
``on_device`` guard itself, and, read from the source, that every launch ``kernel[grid](...)`` in
``regkernels/triton`` sits inside a ``with on_device(...)`` block."""
from __future__ import annotations

import ast
import contextlib
import pathlib
import types

import pytest
import torch

from regkernels.triton import _launch

TRITON_DIR = pathlib.Path(__file__).resolve().parents[1] / "regkernels" / "triton"


def test_cpu_tensors_need_no_guard():
    assert isinstance(_launch.on_device(torch.zeros(1)), contextlib.nullcontext)


def test_a_tensor_on_another_cuda_device_makes_that_device_current(monkeypatch):
    entered = []

    class Recorder:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Recorder)
    fake = types.SimpleNamespace(device=torch.device("cuda", 1))
    with _launch.on_device(fake):
        pass
    assert entered == [1]
    # already current: nothing to switch
    same = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert isinstance(_launch.on_device(same), contextlib.nullcontext)


def _launches_outside_guard(tree: ast.AST) -> list[int]:
    """Line numbers of ``name[grid](...)`` calls not lexically inside ``with on_device(...)``."""
    bad: list[int] = []

    def guarded(node: ast.With) -> bool:
        return any(isinstance(it.context_expr, ast.Call) and getattr(it.context_expr.func, "id",
                   getattr(it.context_expr.func, "attr", None)) == "on_device" for it in node.items)

    def visit(node: ast.AST, inside: bool) -> None:
        if isinstance(node, ast.With) and guarded(node):
            inside = True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and not inside:
            bad.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return bad


@pytest.mark.parametrize("path", sorted(p for p in TRITON_DIR.glob("*.py") if p.name != "_launch.py"),
                         ids=lambda p: p.name)
def test_every_triton_launch_runs_under_on_device(path):
    bad = _launches_outside_guard(ast.parse(path.read_text()))
    assert not bad, f"{path.name}: launches outside `with on_device(...)` at lines {bad}"


def test_the_source_check_finds_an_unguarded_launch():
    src = "def f(x):\n    with on_device(x):\n        k[(1,)](x)\n    k2[(1,)](x)\n"
    assert _launches_outside_guard(ast.parse(src)) == [4]
