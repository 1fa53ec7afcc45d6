"""The README's support matrix, generated from every op family's backend TABLE.

``python -m regkernels.bench --support-matrix`` prints it; tests/test_registry.py checks that the
section of README.md between ``<!-- support-matrix:begin -->`` and ``<!-- support-matrix:end -->``
is exactly this output. It reads the tables only (not what this machine can run), so every machine
prints the same text.
"""
from __future__ import annotations

import importlib

import torch

from regkernels.ops._table import ALL_DTYPES, DEVICES, Kernel, Table, dtype_name

FAMILIES = ("gram", "conv", "svd", "beta_lasso", "jacobian")
BEGIN = "<!-- support-matrix:begin -->"
END = "<!-- support-matrix:end -->"

LEGEND = (
    "Generated from the backend tables (`TABLE` in `regkernels/ops/<family>.py`) by "
    "`python -m regkernels.bench --support-matrix`; a test checks that this section matches them. "
    "Per device, the backends in the order `backend=None` tries them: **bold** is what it runs for "
    "float32 inputs, *named* rows run only when asked for by name, [dtypes] are listed where a row "
    "does not take all of fp16 / bf16 / fp32 / fp64. Triton rows also run CPU tensors when named "
    "with `TRITON_INTERPRET=1` (how CI checks them). `reference` is the readable pure-torch oracle."
)


def tables() -> list[Table]:
    """The TABLE of every family module that has one, in FAMILIES order."""
    out = []
    for family in FAMILIES:
        table = getattr(importlib.import_module(f"regkernels.ops.{family}"), "TABLE", None)
        if table is not None:
            out.append(table)
    return out


def _cell(rows: list[Kernel], device: str) -> str:
    serving = [r for r in rows if r.serves(device)]
    default = next((r for r in serving if r.default and torch.float32 in r.dtypes), None)
    parts = []
    for r in serving:
        text = f"`{r.backend}`"
        if r is default:
            text = f"**{text}**"
        if tuple(r.dtypes) != ALL_DTYPES:
            text += " [" + ", ".join(dtype_name(d) for d in r.dtypes) + "]"
        if not r.default:
            text += " *named*"
        parts.append(text)
    return ", ".join(parts) or "—"


def support_matrix() -> str:
    """Markdown: one line per op, its backends on CPU and on CUDA tensors, and the rows' notes."""
    lines = [LEGEND, "", "| family | op | CPU tensors | CUDA tensors | notes |", "| --- | --- | --- | --- | --- |"]
    for table in tables():
        for op in table.ops():
            rows = table.rows_for(op)
            notes = "; ".join(f"`{r.backend}`: {r.note}" for r in rows if r.note)
            cells = " | ".join(_cell(rows, d) for d in DEVICES)
            lines.append(f"| {table.family} | `{op}` | {cells} | {notes} |")
    return "\n".join(lines)


def readme_section(text: str) -> str:
    """The text between the support-matrix markers of README.md (stripped)."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip()
