"""Backend tables: what runs where, declared as one literal list of rows per op family.

Each public module ``regkernels/ops/<family>.py`` holds ``TABLE = Table("<family>", [Kernel(...), ...])``
and its public functions call ``TABLE.implementation(op, backend, device, dtype)`` after checking
their arguments. A row names its implementation as ``"module:function"``; the module is imported
when the table is built, only for rows whose backend can run in this process (the compiled
extension loaded, Triton installed), so a table never imports Triton where it is missing and a
lookup never imports anything (``torch.compile`` traces lookups as constants).

Backend names mean one thing everywhere (docs/design.md):

* ``"reference"``: the readable pure-torch oracle (``regkernels/reference/<family>.py``), any device;
* ``"torch"``: a composite of torch ops with a hand-written backward (``regkernels/composite``);
* ``"cpu"``: C++ kernels (``csrc/cpu``); ``"cuda"``: CUDA C++ kernels (``csrc/cuda``);
* ``"triton"``: Triton kernels (``regkernels/triton``) on CUDA tensors, and on CPU tensors when
  ``TRITON_INTERPRET=1`` (how CI runs them; only when named there).

``backend=None`` takes the first row (in table order) for the tensor's device whose backend can run
and whose ``dtypes`` hold the input's dtype, skipping rows with ``default=False``; the reference is
the last resort. A named backend that cannot take the input raises ``ValueError`` listing the
backends that can; nothing falls back silently.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from regkernels import _ext

BACKENDS = ("reference", "torch", "cpu", "cuda", "triton")
DEVICES = ("cpu", "cuda")
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)

_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bf16"`` (test ids, the support matrix)."""
    return _SHORT.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class Kernel:
    """One row of a backend table: ``op`` on ``device`` tensors by ``backend``.

    ``device``: "cpu", "cuda", or "any" (the reference and composites of device-generic torch ops).
    ``impl``: ``"module:function"`` taking the op's checked arguments as the reference takes them.
    ``dtypes``: the input dtypes it takes (float16/bfloat16 are computed in float32 by every backend).
    ``default``: ``backend=None`` may pick it (False: measured slower than another row on that
    device, run only when named). ``note``: one line for the support matrix.
    """

    op: str
    device: str
    backend: str
    impl: str
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    default: bool = True
    note: str = ""

    def serves(self, device_type: str) -> bool:
        """Whether this row is meant for ``device_type`` tensors (interpreted Triton aside)."""
        return self.device in ("any", device_type)


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run in this process, or None when it can."""
    if backend in ("cpu", "cuda") and not _ext.HAS_C:
        return f"the compiled extension regkernels._C did not load ({_ext._LOAD_ERROR})"
    if backend == "cuda" and not _ext.has_cuda_kernels():
        return "the extension was built without its CUDA sources"
    if backend == "triton" and not _ext.has_triton():
        return "Triton is not installed"
    return None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and _ext.has_triton()


class Table:
    """One op family's rows, checked when built, and its single dispatch point."""

    def __init__(self, family: str, rows: Sequence[Kernel]):
        self.family = family
        self.rows: tuple[Kernel, ...] = tuple(rows)
        seen: set[tuple[str, str, str]] = set()
        for r in self.rows:
            if r.backend not in BACKENDS:
                raise ValueError(f"Table {family!r}: backend must be one of {BACKENDS}; got {r}")
            if r.device not in DEVICES + ("any",):
                raise ValueError(f"Table {family!r}: device must be 'cpu', 'cuda' or 'any'; got {r}")
            key = (r.op, r.device, r.backend)
            if key in seen:
                raise ValueError(f"Table {family!r}: two rows for {key}")
            seen.add(key)
        for op in self.ops():
            if not any(r.backend == "reference" for r in self.rows if r.op == op):
                raise ValueError(f"Table {family!r}: op {op!r} has no reference row")
        self._impls: dict[Kernel, Callable] = {}
        for r in self.rows:
            if backend_unavailable(r.backend) is None:
                module, _, name = r.impl.partition(":")
                self._impls[r] = getattr(importlib.import_module(module), name)
        self._cache: dict[tuple, Callable] = {}

    # --------------------------------------------------------------- reading the table

    def ops(self) -> list[str]:
        """The family's ops, in table order."""
        return list(dict.fromkeys(r.op for r in self.rows))

    def rows_for(self, op: str) -> list[Kernel]:
        rows = [r for r in self.rows if r.op == op]
        if not rows:
            raise KeyError(f"Table {self.family!r} has no op {op!r}; it has {self.ops()}")
        return rows

    def _usable(self, r: Kernel, device_type: str, named: bool) -> str | None:
        """Why row ``r`` cannot run on ``device_type`` tensors now, or None."""
        why = backend_unavailable(r.backend)
        if why:
            return why
        if r.serves(device_type):
            return None
        if r.backend == "triton" and r.device == "cuda" and device_type == "cpu":
            if not _interpreted():
                return "Triton runs CPU tensors only interpreted (TRITON_INTERPRET=1)"
            return None if named else "interpreted Triton is used only when named"
        return f"it has no kernel for {device_type} tensors"

    def backends(self, op: str, device_type: str,
                 dtype: torch.dtype | Iterable[torch.dtype] | None = None) -> list[str]:
        """The backends that can run ``op`` when named, on ``device_type`` tensors now (of ``dtype``,
        or of every dtype listed), in table order."""
        dtypes = () if dtype is None else (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        return list(dict.fromkeys(r.backend for r in self.rows_for(op)
                                  if all(d in r.dtypes for d in dtypes)
                                  and self._usable(r, device_type, named=True) is None))

    def row(self, op: str, backend: str, device_type: str) -> Kernel | None:
        for r in self.rows_for(op):
            if r.backend == backend and (r.serves(device_type) or
                                         (backend == "triton" and r.device == "cuda")):
                return r
        return None

    def unusable(self, op: str, backend: str, device_type: str) -> str | None:
        """Why a *named* ``backend`` cannot run ``op`` on ``device_type`` tensors here, or None.

        The row's dtypes aside (see ``row(...).dtypes``); the generated tests skip with this reason.
        """
        r = self.row(op, backend, device_type)
        if r is None:
            return f"no {backend!r} backend for {device_type} tensors"
        why = self._usable(r, device_type, named=True)
        return None if why is None else f"the {backend!r} backend cannot run here: {why}"

    # --------------------------------------------------------------- dispatch

    def implementation(self, op: str, backend: str | None, device: torch.device,
                       dtype: torch.dtype | Iterable[torch.dtype], *, name: str | None = None) -> Callable:
        """The function computing ``op`` for inputs of ``dtype`` (or every dtype listed) on ``device``.

        ``name`` is the public op named in errors (default ``op``).
        """
        dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dict.fromkeys(dtype))
        key = (op, backend, device.type, dtypes, _interpreted())
        fn = self._cache.get(key)
        if fn is None:
            fn = self._cache[key] = self._resolve(op, backend, device.type, dtypes, name or op)
        return fn

    def _resolve(self, op: str, backend: str | None, device_type: str, dtypes: tuple, name: str) -> Callable:
        rows = self.rows_for(op)
        if backend is None:
            for r in rows:
                if r.default and all(d in r.dtypes for d in dtypes) and self._usable(r, device_type, False) is None:
                    return self._impls[r]
            raise ValueError(f"{name}: no backend takes {device_type} tensors of dtype "
                             f"{', '.join(map(str, dtypes))}; see docs/{self.family}.md")
        if backend not in BACKENDS:
            raise ValueError(f"{name}: backend must be None or one of {', '.join(map(repr, BACKENDS))}; "
                             f"got {backend!r}")
        can = self.backends(op, device_type, dtypes)
        if backend in can:
            return self._impls[self.row(op, backend, device_type)]
        why = self.unusable(op, backend, device_type) or (
            f"the {backend!r} backend takes {', '.join(map(str, self.row(op, backend, device_type).dtypes))}, "
            f"not {', '.join(map(str, dtypes))}")
        have = ", ".join(map(repr, can)) or "none"
        raise ValueError(f"{name}: {why}; backends that take {device_type} "
                         f"{'/'.join(dtype_name(d) for d in dtypes)} inputs here: {have}")

    # --------------------------------------------------------------- documentation

    def markdown(self) -> str:
        """The table as markdown: one line per row (README support matrix, docs)."""
        lines = ["| op | device | backend | dtypes | default | implementation | note |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            lines.append(f"| `{r.op}` | {r.device} | `{r.backend}` | {', '.join(dtype_name(d) for d in r.dtypes)} "
                         f"| {'yes' if r.default else 'named only'} | `{r.impl}` | {r.note} |")
        return "\n".join(lines)


def check_backend_keyword(op: str, backend) -> None:
    """``backend`` is None or a backend name (a TypeError for anything that is not a str)."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be None or one of {', '.join(map(repr, BACKENDS))}; "
                        f"got {type(backend).__name__}")
