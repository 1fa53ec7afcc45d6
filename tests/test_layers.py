"""The package's layering (docs/design.md), read from the source: the import graph of the
``regkernels`` modules has no cycle, and each layer imports only the layers below it.

Every ``import`` counts, module level or inside a function (a lazy import hides a cycle, it does
not remove it); ``from pkg import name`` is an edge to ``pkg.name`` when that is a module.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "regkernels"


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The regkernels modules that module ``name`` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    # a module's own ancestor packages are initialised before it by Python itself (e.g.
    # ``from regkernels import _C``, a compiled module this walk does not list): not an edge
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in out if m in MODULES and m != name and m not in ancestors}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(GRAPH[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# what each layer must never import (prefix match)
_ANY = ("regkernels.",)
FORBIDDEN = {
    "regkernels._numerics": _ANY,
    "regkernels._dtypes": _ANY,
    # the sharded-weight helpers (collectives, gathers) sit below every op family
    "regkernels.distributed": _ANY,
    "regkernels.reference": ("regkernels.ops", "regkernels.composite", "regkernels.triton", "regkernels._C_ops",
                             "regkernels.nn", "regkernels.optim", "regkernels.bench", "regkernels._ext"),
    "regkernels._geometry": ("regkernels.ops", "regkernels.composite", "regkernels.triton", "regkernels._C_ops",
                             "regkernels.nn", "regkernels.optim", "regkernels.bench", "regkernels.reference"),
    "regkernels.composite": ("regkernels.ops", "regkernels.triton", "regkernels._C_ops", "regkernels.nn",
                             "regkernels.optim", "regkernels.bench"),
    "regkernels.triton": ("regkernels.ops", "regkernels._C_ops", "regkernels.nn", "regkernels.optim",
                          "regkernels.bench"),
    "regkernels._C_ops": ("regkernels.ops", "regkernels.triton", "regkernels.nn", "regkernels.optim",
                          "regkernels.bench"),
    "regkernels.ops": ("regkernels.nn", "regkernels.optim", "regkernels.bench", "regkernels.triton",
                       "regkernels.composite", "regkernels._C_ops"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_the_layers_below(layer):
    bad = sorted(f"{m} imports {dep}" for m, deps in GRAPH.items() if m == layer or m.startswith(layer + ".")
                 for dep in deps if dep.startswith(FORBIDDEN[layer]))
    assert not bad, "; ".join(bad)


def test_ops_name_their_implementations_only_in_their_tables():
    # ops/<family>.py reaches kernels through the TABLE's "module:function" strings, never by import
    # (checked above); and every family module defines exactly one TABLE
    for name, path in MODULES.items():
        if name.startswith("regkernels.ops.") and not name.rpartition(".")[2].startswith("_"):
            tree = ast.parse(path.read_text())
            tables = [n for n in tree.body if isinstance(n, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == "TABLE" for t in n.targets)]
            assert len(tables) == 1, f"{name} must define one module-level TABLE"
